//! Types and traits of Chronicle, the event-sourcing toolkit on PostgreSQL.
//!
//! This crate does no I/O. It defines what an event is ([`NewEvent`] before it
//! is stored, [`EventEnvelope`] after), how appends state their concurrency
//! expectation ([`ExpectedVersion`]), where a reader stands in the global feed
//! ([`Position`]), the store traits ([`EventAppender`], [`EventReader`],
//! [`EventStore`]), the [`Aggregate`] model that folds events into state,
//! snapshots ([`Snapshotting`], [`SnapshotStore`]),
//! the projection traits ([`ProjectionHandler`], [`ProjectionAdapter`],
//! [`AlertSink`]) and the provider-agnostic [`MessageQueue`] that dead
//! letters go through.
//! The PostgreSQL implementation lives in `chronicle-postgres`.
//!
//! ```
//! use chronicle_core::{ExpectedVersion, Metadata, NewEvent};
//! use serde_json::json;
//!
//! let event = NewEvent::new("UserRegistered", json!({ "email": "ada@example.com" }))
//!     .with_metadata(Metadata::default().with_actor("signup-service"));
//! assert_eq!(event.metadata.schema_version, 1);
//! assert_eq!(ExpectedVersion::NoStream.to_string(), "no-stream");
//! ```
#![deny(missing_docs)]

mod aggregate;
mod cache;
mod error;
mod event;
mod position;
mod projection;
mod queue;
mod repository;
mod snapshot;
mod snapshot_repository;
mod store;
mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
mod version;

pub use aggregate::{Aggregate, DecodeError, DomainEvent};
pub use cache::AggregateCache;
pub use error::{Error, Result, Validation};
pub use event::{EventEnvelope, Metadata, NewEvent};
pub use position::{Position, PositionParseError};
pub use projection::{
    Alert, AlertSink, BoxError, DeploymentResult, HealthStatus, ProjectionAdapter,
    ProjectionHandler, ProjectionResult, ProjectionState, ProjectionStatus, ProviderStatus,
};
pub use queue::{Delivery, MemoryQueue, Message, MessageQueue, QueueDepth, Receipt};
pub use repository::{CommandError, Repository};
pub use snapshot::{
    Snapshot, SnapshotLoad, SnapshotPolicy, SnapshotStore, SnapshotTask, Snapshotting,
};
pub use store::{AppendOutcome, EventAppender, EventReader, EventStore, FeedBatch, TimeRange};
pub use subscription::{Subscription, SubscriptionError};
pub use version::ExpectedVersion;

/// The aggregate identifier type. Aggregates are identified by UUID, as in the
/// spec's `events.aggregate_id UUID NOT NULL`.
pub type AggregateId = uuid::Uuid;
