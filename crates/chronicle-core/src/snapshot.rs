//! Aggregate snapshots: an aggregate's folded state stored at a version, so
//! that loading it reads the snapshot and only the events after it.
//!
//! An aggregate opts in with [`Snapshotting`] (its state serializable, a
//! [`SnapshotPolicy`] and a [`Snapshotting::SNAPSHOT_VERSION`]); a store
//! opts in with [`SnapshotStore`]; [`crate::Repository::load_snapshotted`]
//! and [`crate::Repository::execute_snapshotted`] use both.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Aggregate, AggregateId, EventEnvelope, EventStore, Result};

/// When a repository stores a new snapshot of an aggregate.
///
/// ```
/// use chronicle_core::SnapshotPolicy;
///
/// assert!(SnapshotPolicy::EveryEvents(100).is_due(100, 0));
/// assert!(!SnapshotPolicy::EveryEvents(100).is_due(99, 1 << 30));
/// assert!(SnapshotPolicy::TailBytes(1 << 20).is_due(3, 2 << 20));
/// assert!(!SnapshotPolicy::Never.is_due(u32::MAX, u64::MAX));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotPolicy {
    /// Never store snapshots (loading still uses one left by earlier code).
    Never,
    /// When at least this many events were folded on top of the newest
    /// snapshot (or from the start, without one). 0 counts as 1.
    EveryEvents(u32),
    /// When the event data folded on top of the newest snapshot is at
    /// least this many bytes (as the store measures it: PostgreSQL's stored
    /// size of `event_data`, the JSON text length elsewhere).
    TailBytes(u64),
}

impl SnapshotPolicy {
    /// Whether a snapshot is due after folding `events` events holding
    /// `bytes` bytes of data on top of the newest snapshot.
    pub fn is_due(&self, events: u32, bytes: u64) -> bool {
        match *self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::EveryEvents(n) => events >= n.max(1),
            SnapshotPolicy::TailBytes(n) => events > 0 && bytes >= n,
        }
    }
}

/// An aggregate whose state can be snapshotted: serializable, with a
/// version of its serialized form and a policy.
///
/// Bump [`Snapshotting::SNAPSHOT_VERSION`] whenever the state's shape or
/// its `apply` changes: snapshots of another version are ignored and
/// replaced, never decoded.
///
/// ```
/// use chronicle_core::{Aggregate, DomainEvent, SnapshotPolicy, Snapshotting};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum CounterEvent { Added { by: i64 } }
/// impl DomainEvent for CounterEvent {}
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("never fails")]
/// struct Never;
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { total: i64 }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Event = CounterEvent;
///     type Command = i64;
///     type Error = Never;
///     fn apply(&mut self, CounterEvent::Added { by }: CounterEvent) { self.total += by; }
///     fn handle(&self, by: i64) -> Result<Vec<CounterEvent>, Never> {
///         Ok(vec![CounterEvent::Added { by }])
///     }
/// }
///
/// impl Snapshotting for Counter {
///     const SNAPSHOT_VERSION: u32 = 1;
///     fn snapshot_policy() -> SnapshotPolicy { SnapshotPolicy::EveryEvents(500) }
/// }
/// assert_eq!(Counter::snapshot_policy(), SnapshotPolicy::EveryEvents(500));
/// ```
pub trait Snapshotting: Aggregate + Serialize + DeserializeOwned {
    /// The version of the serialized state (the snapshot's
    /// `schema_version`).
    const SNAPSHOT_VERSION: u32;

    /// When to store a new snapshot (default: every 100 events).
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::EveryEvents(100)
    }
}

/// A stored snapshot: an aggregate's state after its first `version`
/// events.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The aggregate.
    pub aggregate_id: AggregateId,
    /// Its type ([`Aggregate::TYPE`]).
    pub aggregate_type: String,
    /// The version of the last event folded into `state`.
    pub version: u32,
    /// [`Snapshotting::SNAPSHOT_VERSION`] of the code that wrote it.
    pub schema_version: u32,
    /// The upcaster chain's version when it was written
    /// ([`crate::Repository::upcaster_version`]).
    pub upcaster_version: u32,
    /// The serialized state.
    pub state: Value,
    /// When it was stored (`None` before it is).
    pub created_at: Option<DateTime<Utc>>,
}

/// What [`SnapshotStore::load_snapshot`] returns: the newest usable
/// snapshot, and the events after it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SnapshotLoad {
    /// The newest snapshot with the asked schema and upcaster versions, if
    /// any.
    pub snapshot: Option<Snapshot>,
    /// The events after the snapshot's version (all of them without one),
    /// in version order.
    pub tail: Vec<EventEnvelope>,
    /// The size of the tail's event data in bytes, as the store measures it
    /// (for [`SnapshotPolicy::TailBytes`]).
    pub tail_bytes: u64,
}

/// A store that keeps aggregate snapshots beside the events.
///
/// Implementations must ignore (never return) a snapshot whose
/// `schema_version` or `upcaster_version` differ from the ones asked for,
/// and should let [`SnapshotStore::save_snapshot`] replace such a
/// snapshot.
#[async_trait]
pub trait SnapshotStore: EventStore {
    /// The aggregate's newest snapshot written with these versions, and the
    /// events after it; one round trip where the store can.
    async fn load_snapshot(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        schema_version: u32,
        upcaster_version: u32,
    ) -> Result<SnapshotLoad>;

    /// Stores `snapshot`, replacing an older one of the aggregate (or one of
    /// other versions). A snapshot older than the stored one is not stored.
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()>;

    /// Deletes the aggregate's snapshots; returns how many there were.
    async fn delete_snapshots(&self, aggregate_id: AggregateId) -> Result<u64>;
}

/// A snapshot write handed to the repository's spawner
/// ([`crate::Repository::spawn_snapshots`]).
pub type SnapshotTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_events_counts_as_one_and_bytes_need_an_event() {
        assert!(SnapshotPolicy::EveryEvents(0).is_due(1, 0));
        assert!(!SnapshotPolicy::EveryEvents(0).is_due(0, 0));
        assert!(!SnapshotPolicy::TailBytes(0).is_due(0, 0));
        assert!(SnapshotPolicy::TailBytes(0).is_due(1, 0));
    }
}
