//! Lazy upcasting: the chain applied on read.

use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    AggregateId, AppendOutcome, EventAppender, EventEnvelope, EventReader, ExpectedVersion,
    FeedBatch, NewEvent, Position, TimeRange,
};
use chrono::{DateTime, Utc};

use crate::UpcasterChain;

/// An [`EventReader`] that returns every event at the newest version of
/// its type: it applies the [`UpcasterChain`] to what the inner reader
/// returns.
///
/// By default the chain is applied to every event, whatever its type's
/// [`Mode`](crate::Mode): for an event already at its newest version that is one map
/// lookup, and it covers events appended at an old version while an eager
/// run is in progress, so projections and aggregates always see the newest
/// version. [`UpcastingReader::lazy_only`] restricts it to event types in
/// [`Mode::Lazy`](crate::Mode::Lazy).
///
/// It also appends (when the inner store does), so a
/// [`Repository`](chronicle_core::Repository) over it loads aggregates at
/// the newest version of every event: code on top of it reads and writes
/// the newest versions only. Appended events whose metadata carries the
/// default schema version 1 are stamped with the newest version the chain
/// knows for their type; other versions are kept as given.
///
/// A chain failure is returned as [`chronicle_core::Error::Backend`] with
/// the chain's [`Error`](crate::Error) (naming the event) as its source.
/// Encrypted fields are not decrypted here: wrap a reader that decrypts
/// first when upcasters need plaintext.
///
/// ```no_run
/// # async fn demo(store: chronicle_postgres::PgEventStore, chain: chronicle_upcast::UpcasterChain) -> chronicle_core::Result<()> {
/// use chronicle_core::{EventReader, Position};
/// use chronicle_upcast::UpcastingReader;
///
/// let reader = UpcastingReader::new(store, chain);
/// let batch = reader.read_all(Position::default(), 100).await?;
/// // Every event in `batch` is at the newest version of its type.
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct UpcastingReader<R> {
    inner: R,
    chain: Arc<UpcasterChain>,
    lazy_only: bool,
}

impl<R> UpcastingReader<R> {
    /// Applies `chain` to every event `inner` returns.
    pub fn new(inner: R, chain: impl Into<Arc<UpcasterChain>>) -> Self {
        UpcastingReader {
            inner,
            chain: chain.into(),
            lazy_only: false,
        }
    }

    /// When `yes`, applies the chain only to event types whose mode is
    /// [`Mode::Lazy`](crate::Mode::Lazy), returning the others as stored. Default: `false`
    /// (upcast everything).
    pub fn lazy_only(mut self, yes: bool) -> Self {
        self.lazy_only = yes;
        self
    }

    /// The inner reader.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// The chain.
    pub fn chain(&self) -> &UpcasterChain {
        &self.chain
    }

    fn upcast(&self, envelope: EventEnvelope) -> chronicle_core::Result<EventEnvelope> {
        if !self.chain.upcasts_on_read(&envelope, self.lazy_only) {
            return Ok(envelope);
        }
        self.chain.upcast_envelope(envelope).map_err(|e| {
            chronicle_core::Error::backend(format!("upcasting on read failed: {e}"), e)
        })
    }

    fn upcast_all(&self, events: Vec<EventEnvelope>) -> chronicle_core::Result<Vec<EventEnvelope>> {
        events.into_iter().map(|e| self.upcast(e)).collect()
    }
}

#[async_trait]
impl<R: EventReader> EventReader for UpcastingReader<R> {
    async fn read_stream(
        &self,
        aggregate_id: AggregateId,
        from: u32,
        to: Option<u32>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let events = self.inner.read_stream(aggregate_id, from, to).await?;
        self.upcast_all(events)
    }

    async fn read_stream_as_of(
        &self,
        aggregate_id: AggregateId,
        at: DateTime<Utc>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let events = self.inner.read_stream_as_of(aggregate_id, at).await?;
        self.upcast_all(events)
    }

    async fn read_all(&self, after: Position, limit: usize) -> chronicle_core::Result<FeedBatch> {
        let batch = self.inner.read_all(after, limit).await?;
        Ok(FeedBatch {
            events: self.upcast_all(batch.events)?,
            next: batch.next,
        })
    }

    /// Reads events stored under `event_type` and upcasts them; the
    /// results may carry the newer name when the chain renames the type.
    async fn read_by_type(
        &self,
        event_type: &str,
        range: TimeRange,
        limit: usize,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let events = self.inner.read_by_type(event_type, range, limit).await?;
        self.upcast_all(events)
    }
}

#[async_trait]
impl<R: EventAppender> EventAppender for UpcastingReader<R> {
    async fn append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> chronicle_core::Result<AppendOutcome> {
        for event in &mut events {
            if event.metadata.schema_version == 1
                && let Some(latest) = self.chain.latest_version(&event.event_type)
            {
                event.metadata.schema_version = latest;
            }
        }
        self.inner
            .append(aggregate_id, aggregate_type, expected, events)
            .await
    }
}
