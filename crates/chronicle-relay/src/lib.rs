//! Event streaming for Chronicle: the store's events published to
//! brokers, and a broker's stream fed back into a projection handler.
//!
//! - [`Relay`]: a [`chronicle_core::ProjectionHandler`] that publishes each
//!   event to the [`chronicle_core::MessageQueue`] its [`Route`] names and
//!   returns once the broker acknowledged. Run it as a projection
//!   (`chronicle_projections::PgProjection` + `Runner`, or
//!   `chronicle relay run`): checkpoints, partition leases, retries and
//!   sequenced dead letters are the projection runtime's, so the relay
//!   survives restarts and `kill -9`, never skips an event of the
//!   gap-safe feed, and publishes **at least once** (a crash replays at
//!   most the batches whose checkpoint had not committed).
//! - [`RelayConfig`]: the relay's YAML (brokers, routes by event type or
//!   aggregate type, headers from metadata, `decrypt` opt-in).
//! - [`Route::message`] / [`decode_event`]: the wire shape. Message id =
//!   event id (the broker's deduplication key where it has one), group =
//!   aggregate id (ordering key), payload = the event envelope as JSON,
//!   attributes = `chronicle-event-type`, `chronicle-aggregate-type`,
//!   `chronicle-schema-version` and the route's headers.
//! - [`StreamConsumer`]: receives from a queue, drops duplicates by event
//!   id and aggregate version, calls the same handler, acknowledges after
//!   it succeeded, retries with backoff and dead-letters a poison message
//!   with its aggregate's later messages parked behind it.
//!
//! The relay reaches brokers only through `MessageQueue` trait objects:
//! this crate depends on no broker client (the CLI opens the queues).
//! docs/brokers.md states each broker's guarantees and the runbook.
//!
//! ```
//! use std::sync::Arc;
//! use chronicle_core::{MemoryQueue, MessageQueue};
//! use chronicle_relay::{Relay, RelayConfig};
//!
//! let config = RelayConfig::from_yaml("relay.yaml", "relay:
//!   brokers:
//!     events: { backend: nats, url: 'nats://127.0.0.1:4222' }
//!   routes:
//!     - aggregate_types: [order]
//!       broker: events
//!       destination: orders
//! ").unwrap();
//! // The CLI opens each destination on its broker; a test can use memory.
//! let mut relay = Relay::builder(config.name.clone());
//! for route in &config.routes {
//!     let queue: Arc<dyn MessageQueue> = Arc::new(MemoryQueue::new(route.destination.clone()));
//!     relay = relay.route(route.clone(), queue);
//! }
//! let relay = relay.build().unwrap();
//! // chronicle_projections::PgProjection::new(pool, relay, config.projection_options())
//! # let _ = relay;
//! ```
#![deny(missing_docs)]

mod config;
mod consumer;
mod relay;
mod route;

pub use config::RelayConfig;
pub use consumer::{
    ATTEMPTS_ATTRIBUTE, ConsumeReport, DEAD_LETTER_ATTRIBUTE, REASON_ATTRIBUTE, StreamConsumer,
};
pub use relay::{Relay, RelayBuilder};
pub use route::{
    AGGREGATE_TYPE_ATTRIBUTE, ATTRIBUTE_PREFIX, EVENT_TYPE_ATTRIBUTE, Route,
    SCHEMA_VERSION_ATTRIBUTE, decode_event,
};

/// What the relay refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An impossible relay (no route, decryption without an encryptor).
    #[error("relay configuration: {0}")]
    Config(String),
}

/// A result with the relay's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
