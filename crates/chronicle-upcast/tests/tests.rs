//! Integration tests of eager and lazy upcasting against a real PostgreSQL.

mod crypto;
mod lease;
mod upcast;
