//! Integration tests of the AWS KMS key provider against a real moto server
//! (moto's KMS-compatible server mode) over HTTP on loopback. The server is
//! started by the tests; without moto installed they fail and say how to
//! install it.

mod support;

mod kms;
mod secrets;
