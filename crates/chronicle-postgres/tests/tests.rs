//! Integration tests of the PostgreSQL event store, against a real server.
//!
//! Every scenario in `store.rs` runs twice: directly, and through PgBouncer
//! in transaction-pooling mode.

mod support;

mod combine;
mod concurrency;
mod crypto;
mod import;
mod json;
mod migrations;
mod repository;
mod snapshots;
mod store;
mod tls;
