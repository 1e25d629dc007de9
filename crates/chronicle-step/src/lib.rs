//! The provider-agnostic projection step of Chronicle: one piece of code
//! that runs a projection handler in a tokio process, a Cloudflare Worker
//! (`wasm32-unknown-unknown`), a Lambda or a Vercel function alike.
//!
//! [`ProjectionStep::step`] is one unit of work on one partition: claim
//! the partition's lease (a row with an owner and an expiry, never a
//! session lock, so it works through transaction poolers and Hyperdrive),
//! read a window of the gap-safe feed after the checkpoint (only the
//! events the projection's [`chronicle_core::Subscription`] takes), apply
//! the handler with retries ([`RetryPolicy`]), dead-letter what still fails
//! and park the aggregate's later events behind it, verify per-aggregate
//! version order, and commit the handler's writes ([`PgContext`]), the dead
//! letters and the checkpoint in one transaction: an exactly-once effect
//! for read models in the same database.
//!
//! It has no runtime of its own: its connection comes from a
//! [`ConnectionSource`] (a pool, or the [`OneConnection`] a serverless
//! invocation opened) and its timers and randomness from a [`Runtime`].
//! `chronicle-projections` loops it over a deadpool pool in tokio tasks;
//! `chronicle-worker` runs it in a Cloudflare Worker.
//!
//! ```no_run
//! # async fn demo(client: tokio_postgres::Client, rt: impl chronicle_step::Runtime) -> chronicle_step::Result<()> {
//! use async_trait::async_trait;
//! use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
//! use chronicle_sql::SingleConnection;
//! use chronicle_step::{OneConnection, PgContext, ProjectionOptions, ProjectionStep};
//!
//! struct Count;
//!
//! #[async_trait]
//! impl ProjectionHandler<PgContext> for Count {
//!     fn name(&self) -> &str {
//!         "count"
//!     }
//!
//!     async fn handle(&self, _: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
//!         match ctx.client().execute("UPDATE counter SET n = n + 1", &[]).await {
//!             Ok(_) => ProjectionResult::Done,
//!             Err(e) => ProjectionResult::retry(e),
//!         }
//!     }
//! }
//!
//! let step = ProjectionStep::new(Count, ProjectionOptions::default())?;
//! let source = OneConnection::new(SingleConnection::new(client));
//! step.register(&source).await?;
//! let outcome = step.step(&source, 0, "worker-1", &rt).await?;
//! println!("handled {} events", outcome.handled);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod alert;
mod context;
mod error;
mod feed;
mod lag;
mod retry;
mod runtime;
mod step;
pub mod vars;

pub use alert::LogAlertSink;
pub use context::PgContext;
pub use error::{Error, Result, describe};
pub use lag::{Lag, LagProbe};
pub use retry::RetryPolicy;
pub use runtime::{ConnectionSource, OneConnection, Runtime};
pub use step::{Applied, LAG_COUNT_CAP, ProjectionOptions, ProjectionStep, StepOutcome};

/// What a `projection_state.subscription` value means (`None`: every
/// event); an error names the projection when it cannot be read.
pub fn read_stored_subscription(
    projection: &str,
    stored: Option<serde_json::Value>,
) -> Result<chronicle_core::Subscription> {
    feed::Feed::read_stored(projection, stored)
}
