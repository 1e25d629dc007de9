//! The Chronicle event store on PostgreSQL.
//!
//! - [`PgOptions`] parses a database URL (TLS by `sslmode`, a pool,
//!   connection retries for databases that scale to zero) and builds a
//!   [`PgPool`].
//! - [`migrate()`] applies the versioned schema: the spec's `events` table plus
//!   `global_position` and `transaction_id`, and the `chronicle_append`
//!   function.
//! - [`PgEventStore`] implements [`chronicle_core::EventAppender`] and
//!   [`chronicle_core::EventReader`]: one-round-trip appends with optimistic
//!   concurrency and idempotency, per-aggregate reads, reads as of a time,
//!   reads by type and time range, and the gap-safe global feed; and
//!   [`chronicle_core::SnapshotStore`]: an aggregate's newest snapshot and
//!   the events after it in one statement (table `snapshots`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
//! use chronicle_postgres::{migrate, MigrateOptions, PgEventStore, PgOptions};
//! use serde_json::json;
//!
//! let pool = PgOptions::from_url("postgres://localhost/app?sslmode=require")?
//!     .connect()
//!     .await?;
//! migrate(&pool, MigrateOptions::default()).await?;
//! let store = PgEventStore::new(pool);
//! let outcome = store
//!     .append(uuid::Uuid::now_v7(), "user", ExpectedVersion::NoStream, vec![
//!         NewEvent::new("UserRegistered", json!({ "name": "Ada" })),
//!     ])
//!     .await?;
//! assert_eq!(outcome.version, 1);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod append_all;
mod audit;
mod backoff;
mod combine;
mod connect;
mod error;
mod keys;
mod listen;
pub mod migrate;
mod reencrypt;
mod snapshots;
mod status;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use append_all::{AppendAllError, AppendRequest};
pub use audit::{AUDIT_CHAINS, AuditQuery, DEFAULT_VERIFY_PAGE, PgAuditSink};
pub use chronicle_sql::Statements;
pub use combine::CombineStats;
pub use connect::{PgOptions, PgPool, SslMode, connections_closed};
pub use error::{Error, Result};
pub use keys::{DataKeyInfo, KEYS_CHANNEL, KeyListenerState, PgDataKeyStore, PgKeyListener};
pub use listen::{EVENTS_CHANNEL, Listener};
pub use migrate::{MigrateOptions, MigrateReport, ensure_schema, migrate};
pub use reencrypt::{PgReencryptor, ReencryptProgress};
pub use snapshots::SnapshotInfo;
pub use status::{OpenTransaction, StoreStatus};
pub use store::{DEFAULT_MAX_PAYLOAD_BYTES, MAX_JSON_DEPTH, PgEventStore};

/// Wire types and row decoding for crates that query the store's tables
/// themselves (from `chronicle-sql`).
pub mod sql {
    pub use chronicle_sql::{EVENT_COLUMNS, Xid8, decode_event, is_plain_identifier};
}

/// The README's code, compiled (and its `no_run` snippets type-checked)
/// by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        send_sync::<crate::PgEventStore>();
        send_sync::<crate::PgOptions>();
        send_sync::<crate::PgPool>();
        send_sync::<crate::Error>();
        send_sync::<crate::StoreStatus>();
        send_sync::<chronicle_core::Error>();
        send_sync::<chronicle_core::EventEnvelope>();
        send_sync::<chronicle_core::NewEvent>();
        send_sync::<chronicle_core::Repository<crate::PgEventStore>>();
    }
}
