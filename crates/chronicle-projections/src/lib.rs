//! The Chronicle projection runtime on PostgreSQL.
//!
//! A projection is a [`chronicle_core::ProjectionHandler`] over
//! [`PgContext`]. [`PgProjection::step`] is the one provider-agnostic unit
//! of work: claim a partition lease (a row with an owner and an expiry, no
//! session state), read a batch after the partition's checkpoint from the
//! gap-safe feed (partition = `chronicle_partition(aggregate_id, N)`, a
//! stable hash computed in SQL), apply the handler with retries
//! ([`RetryPolicy`]: exponential backoff with jitter, 3 retries by default),
//! dead-letter what still fails and park that aggregate's later events
//! behind it, verify per-aggregate version order, and commit the handler's
//! writes with the checkpoint in one transaction (exactly-once effect for
//! read models in the same database). [`Runner`] loops the step for every
//! partition in tokio tasks; [`LocalAdapter`] is the in-process
//! [`chronicle_core::ProjectionAdapter`]. [`PgProjection::dlq_retry`]
//! replays an aggregate's dead letters in order. Dead letters and lagging
//! partitions raise alerts through a [`chronicle_core::AlertSink`]
//! ([`LogAlertSink`] by default, [`WebhookAlertSink`] for a JSON POST).
//! [`DeploymentConfig`] reads the spec's deployment YAML.
//!
//! ```no_run
//! # async fn demo(pool: chronicle_postgres::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
//! use chronicle_projections::{PgContext, PgProjection, ProjectionOptions, Runner, RunnerOptions};
//! use tokio_postgres::types::Type;
//!
//! struct UserEmails;
//!
//! #[async_trait]
//! impl ProjectionHandler<PgContext> for UserEmails {
//!     fn name(&self) -> &str {
//!         "user-emails"
//!     }
//!
//!     async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
//!         let Some(email) = event.event_data["email"].as_str() else {
//!             return ProjectionResult::Skipped;
//!         };
//!         // Same transaction as the checkpoint: applied exactly once.
//!         match ctx.client().execute_typed(
//!             "INSERT INTO user_emails (user_id, email) VALUES ($1, $2)
//!              ON CONFLICT (user_id) DO UPDATE SET email = excluded.email",
//!             &[(&event.aggregate_id, Type::UUID), (&email, Type::TEXT)],
//!         ).await {
//!             Ok(_) => ProjectionResult::Done,
//!             Err(e) => ProjectionResult::retry(e),
//!         }
//!     }
//! }
//!
//! let projection = PgProjection::new(pool, UserEmails, ProjectionOptions::default())?;
//! let runner = Runner::start(Arc::new(projection), RunnerOptions::default()).await?;
//! // ...
//! runner.stop().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod config;
pub mod dlq;
mod dlq_config;
mod metrics;
mod projection;
mod queue;
pub mod queue_dlq;
mod runner;
mod sql;
mod state;
mod webhook;

pub use chronicle_step::vars;
pub use chronicle_step::{
    Error, LAG_COUNT_CAP, LogAlertSink, PgContext, ProjectionOptions, ProjectionStep, Result,
    RetryPolicy, StepOutcome, describe,
};
pub use config::{
    CLOUDFLARE_CRON_CPU, CLOUDFLARE_MAX_CONCURRENCY, CLOUDFLARE_MEMORY_MB, ConfigError,
    DeploymentConfig, HandlerRegistry, ProjectionConfig, Provider, parse_yaml,
};
pub use dlq::{DeadLetter, DeadLetterDetail, DeadLetterState, ReplayReport};
pub use dlq_config::{BrokerBlock, DeadLetterBackend, DeadLetterConfig};
pub use metrics::{install_metrics_recorder, render_metrics, serve_metrics};
pub use projection::{BlueGreenReport, PgProjection, PoolSource, TokioRuntime};
pub use queue::{PgDeadLetterQueue, QueueError};
pub use runner::{LocalAdapter, Runner, RunnerOptions};
pub use state::{health, load as load_state};
pub use webhook::WebhookAlertSink;

/// A projection handler on PostgreSQL, shared between tasks.
pub type SharedHandler = std::sync::Arc<dyn chronicle_core::ProjectionHandler<PgContext>>;
