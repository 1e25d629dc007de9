//! What `chronicle status` reports about a store.

use chronicle_core::Position;
use serde::Serialize;

use crate::{PgEventStore, Result, migrate};
use chronicle_sql::Xid8;

/// The state of an event store at a glance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreStatus {
    /// The schema version recorded in the database.
    pub schema_version: i32,
    /// The schema version this binary needs.
    pub binary_schema_version: i32,
    /// How many events are stored.
    pub event_count: i64,
    /// The last event's feed position, if any event is stored.
    pub head: Option<Position>,
    /// The feed's horizon: events of transactions at or above this id are
    /// not handed to feed readers yet (`pg_snapshot_xmin`).
    pub feed_horizon: u64,
    /// The oldest transaction still open that holds the horizon back.
    pub oldest_open_transaction: Option<OpenTransaction>,
}

/// A transaction that holds the feed's horizon back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenTransaction {
    /// Its backend's process id (for `pg_terminate_backend`).
    pub pid: i32,
    /// Its transaction id.
    pub xid: String,
    /// The database it runs in: xids are cluster-wide, so a transaction in
    /// any database of the cluster holds the feed back.
    pub database: Option<String>,
    /// How long it has been open, in seconds.
    pub open_seconds: f64,
    /// Its backend state (`active`, `idle in transaction`, …).
    pub state: Option<String>,
    /// The start of its current or last query.
    pub query: Option<String>,
}

impl PgEventStore {
    /// Schema version, event count, head position and the oldest open
    /// transaction holding the global feed back.
    pub async fn status(&self) -> Result<StoreStatus> {
        let client = self.pool().get().await?;
        let schema_version = migrate::schema_version(&**client).await?;
        let counts = client
            .query_typed_one(
                "SELECT (SELECT count(*) FROM events), pg_snapshot_xmin(pg_current_snapshot())",
                &[],
            )
            .await?;
        let head = client
            .query_typed_opt(
                "SELECT transaction_id, global_position FROM events \
                  ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| Position::new(r.get::<_, Xid8>(0).0, r.get(1)));
        let oldest = client
            .query_typed_opt(
                "SELECT pid, backend_xid::text, \
                        extract(epoch FROM now() - xact_start)::float8, state, left(query, 200), datname::text \
                   FROM pg_stat_activity \
                  WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                  ORDER BY age(backend_xid) DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| OpenTransaction {
                pid: r.get(0),
                xid: r.get(1),
                open_seconds: r.get::<_, Option<f64>>(2).unwrap_or(0.0),
                state: r.get(3),
                query: r.get(4),
                database: r.get(5),
            });
        Ok(StoreStatus {
            schema_version,
            binary_schema_version: migrate::latest_version(),
            event_count: counts.get(0),
            head,
            feed_horizon: counts.get::<_, Xid8>(1).0,
            oldest_open_transaction: oldest,
        })
    }
}
