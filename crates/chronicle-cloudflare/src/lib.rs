//! Run a Chronicle projection as a Cloudflare Worker.
//!
//! [`CloudflareWorkerAdapter`] is the [`chronicle_core::ProjectionAdapter`]
//! for Cloudflare: it deploys the Worker a user builds from their handler
//! (a crate calling `chronicle_worker::projection_worker!`, built by
//! worker-build) through the Cloudflare API v4, the calls `wrangler deploy`
//! makes: the module upload with its metadata (main module, compatibility
//! date, bindings, `limits.cpu_ms`), the cron trigger, the wake queue and
//! its dead-letter queue, and the Queues consumer (batch size,
//! `max_concurrency`, retries, dead-letter queue). The account id and API
//! token come from a [`chronicle_crypto::SecretStore`], never from the
//! deployment file or the command line.
//!
//! [`WorkerPlan`] is what a deploy will do, built from the deployment
//! file's entry ([`chronicle_projections::ProjectionConfig`]), which has
//! already refused what Cloudflare cannot give (more than 128 MB, more than
//! 30 s of CPU per cron invocation, more than 250 concurrent consumers).
//! [`CloudflareApi`] is the client.
#![deny(missing_docs)]

mod adapter;
mod api;
mod error;
mod plan;

pub use adapter::{Applied, CloudflareWorkerAdapter};
pub use api::{
    ACCOUNT_ID_SECRET, API_TOKEN_SECRET, CloudflareApi, Consumer, ConsumerSettings,
    DEFAULT_BASE_URL, Module, Queue, Script,
};
pub use error::{ApiMessage, Error, Result};
pub use plan::{
    COMPATIBILITY_DATE, CRON, DATABASE_URL_SECRET, Database, LimitMapping, PlannedModule,
    WorkerPlan, script_name,
};
