//! The store traits: appending, reading, and both.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{AggregateId, EventEnvelope, ExpectedVersion, NewEvent, Position, Result};

/// The result of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The aggregate's version after the append: the version of its last
    /// event. Pass it as `ExpectedVersion::Exact` to the next append.
    pub version: u32,
    /// `false` when every event id was already stored by an earlier identical
    /// append, so nothing new was written (an idempotent retry).
    pub appended: bool,
}

/// A page of the global feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedBatch {
    /// The events, in feed order.
    pub events: Vec<EventEnvelope>,
    /// Where to resume: the last event's position, or the position read
    /// after when the batch is empty.
    pub next: Position,
}

/// A half-open time range `[from, to)`; `None` leaves that end open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeRange {
    /// Inclusive lower bound.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound.
    pub to: Option<DateTime<Utc>>,
}

/// Appends events to one aggregate at a time, atomically.
#[async_trait]
pub trait EventAppender: Send + Sync {
    /// Appends `events` to the aggregate as one atomic unit, after checking
    /// `expected` against its current version.
    ///
    /// Fails with [`crate::Error::Conflict`] when the version does not match,
    /// with [`crate::Error::Invalid`] when any event is malformed (and then
    /// nothing is stored). Appending the same event ids again succeeds
    /// without writing anything.
    async fn append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome>;
}

/// Reads events: per aggregate, across aggregates, by type and time.
#[async_trait]
pub trait EventReader: Send + Sync {
    /// The aggregate's events with `from <= version <= to` (`to = None`: to
    /// the end), in version order.
    async fn read_stream(
        &self,
        aggregate_id: AggregateId,
        from: u32,
        to: Option<u32>,
    ) -> Result<Vec<EventEnvelope>>;

    /// The aggregate's events stored at or before `at`, in version order.
    async fn read_stream_as_of(
        &self,
        aggregate_id: AggregateId,
        at: DateTime<Utc>,
    ) -> Result<Vec<EventEnvelope>>;

    /// Up to `limit` events of the global feed after `after`, never skipping
    /// an event of a transaction that commits late.
    async fn read_all(&self, after: Position, limit: usize) -> Result<FeedBatch>;

    /// Up to `limit` events of one type in the time range, oldest first.
    async fn read_by_type(
        &self,
        event_type: &str,
        range: TimeRange,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>>;
}

/// Anything that both appends and reads.
pub trait EventStore: EventAppender + EventReader {}

impl<T: EventAppender + EventReader + ?Sized> EventStore for T {}
