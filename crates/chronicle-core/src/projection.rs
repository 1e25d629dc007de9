//! Projection traits and types: what a projection handler is, what it
//! answers, how a runtime reports a projection's state, and how alerts leave
//! the runtime. No I/O: the runtime lives in `chronicle-projections`.
//!
//! The spec's TypeScript interfaces map to Rust as follows:
//!
//! | spec | here |
//! |---|---|
//! | `ProjectionHandler.handle(event)` | [`ProjectionHandler::handle`], given the runtime's context (for a PostgreSQL read model: the transaction that also commits the checkpoint) |
//! | `ProjectionHandler.getProjectionState()` | [`ProjectionState`], read by the runtime from its state table (the handler does not keep it) |
//! | `ProjectionHandler.rebuild(fromVersion?)` | [`ProjectionHandler::rebuild`], the hook that resets the read model before the runtime replays from a [`Position`] |
//! | `ProjectionAdapter.deploy/scale/monitor` | [`ProjectionAdapter`] |

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventEnvelope, Position, Subscription};

/// A boxed error a handler or adapter may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectionResult {
    /// The event was applied.
    Done,
    /// The event does not concern this projection; nothing was written.
    Skipped,
    /// A transient failure (a timeout, a busy dependency): the runtime rolls
    /// back what the handler wrote for this event and tries again with
    /// backoff; when the retries are exhausted the event is dead-lettered.
    Retry(String),
    /// A permanent failure (the event cannot be applied as it is): the
    /// runtime rolls back what the handler wrote for this event and
    /// dead-letters it at once, parking the aggregate's later events.
    Fail(String),
}

impl ProjectionResult {
    /// A retryable failure with `reason`.
    pub fn retry(reason: impl fmt::Display) -> Self {
        ProjectionResult::Retry(reason.to_string())
    }

    /// A permanent failure with `reason`.
    pub fn fail(reason: impl fmt::Display) -> Self {
        ProjectionResult::Fail(reason.to_string())
    }

    /// Whether the event was handled (applied or skipped).
    pub fn is_success(&self) -> bool {
        matches!(self, ProjectionResult::Done | ProjectionResult::Skipped)
    }
}

/// A projection: folds events into a read model.
///
/// `C` is the runtime's context; the PostgreSQL runtime passes a context
/// whose transaction also commits the projection's checkpoint, so what the
/// handler writes there takes effect exactly once. Side effects outside that
/// database are at least once: use [`EventEnvelope::event_id`] to make them
/// idempotent.
///
/// The runtime calls `handle` for each aggregate's events in version order,
/// and never for two events of one aggregate at the same time.
///
/// ```
/// use async_trait::async_trait;
/// use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
///
/// /// Counts registrations into a plain counter (the context).
/// struct Registrations;
///
/// #[async_trait]
/// impl ProjectionHandler<u64> for Registrations {
///     fn name(&self) -> &str {
///         "registrations"
///     }
///
///     async fn handle(&self, event: &EventEnvelope, count: &mut u64) -> ProjectionResult {
///         if event.event_type != "UserRegistered" {
///             return ProjectionResult::Skipped;
///         }
///         *count += 1;
///         ProjectionResult::Done
///     }
/// }
/// assert_eq!(Registrations.name(), "registrations");
/// ```
#[async_trait]
pub trait ProjectionHandler<C: Send + ?Sized>: Send + Sync {
    /// The projection's name: the key of its checkpoints and dead letters.
    /// Stable across deployments.
    fn name(&self) -> &str;

    /// The events this projection consumes (default: every event).
    ///
    /// The runtime hands [`ProjectionHandler::handle`] only events that
    /// match, filtering where the events are stored, and still moves the
    /// checkpoint past the others. The runtime records the subscription a
    /// read model was built with; changing it later needs a rebuild (the
    /// read model would otherwise miss, or keep, the events the change
    /// adds or removes), and a deployment may override it.
    ///
    /// ```
    /// # use async_trait::async_trait;
    /// # use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult, Subscription};
    /// struct Orders;
    ///
    /// #[async_trait]
    /// impl ProjectionHandler<()> for Orders {
    ///     fn name(&self) -> &str {
    ///         "orders"
    ///     }
    ///
    ///     fn subscription(&self) -> Subscription {
    ///         Subscription::all().with_aggregate_types(["order"])
    ///     }
    ///
    ///     async fn handle(&self, _: &EventEnvelope, _: &mut ()) -> ProjectionResult {
    ///         ProjectionResult::Done
    ///     }
    /// }
    /// assert!(!Orders.subscription().matches("UserRegistered", "user"));
    /// ```
    fn subscription(&self) -> Subscription {
        Subscription::all()
    }

    /// Applies one event.
    async fn handle(&self, event: &EventEnvelope, ctx: &mut C) -> ProjectionResult;

    /// Applies several events (feed order; each aggregate's in version
    /// order) and returns one result per event, in order. It may stop at
    /// the first failure: events without a result count as not handled.
    ///
    /// A runtime may call this on its fast path, so a handler can write a
    /// read model in one statement per batch. When anything fails, the
    /// runtime rolls the whole batch back and goes through the events one
    /// by one with [`ProjectionHandler::handle`], so both must have the same
    /// effect. The default calls `handle` for each event in turn.
    async fn handle_batch(&self, events: &[EventEnvelope], ctx: &mut C) -> Vec<ProjectionResult> {
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            let result = self.handle(event, ctx).await;
            let failed = !result.is_success();
            results.push(result);
            if failed {
                break;
            }
        }
        results
    }

    /// Prepares the read model for a replay of every event after `from`
    /// ([`Position::START`]: the whole history), e.g. by deleting its rows.
    /// Called in the same transaction that resets the checkpoints. The
    /// default does nothing.
    async fn rebuild(&self, ctx: &mut C, from: Position) -> Result<(), BoxError> {
        let _ = (ctx, from);
        Ok(())
    }
}

#[async_trait]
impl<C: Send + ?Sized, H: ProjectionHandler<C> + ?Sized> ProjectionHandler<C> for Arc<H> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn subscription(&self) -> Subscription {
        (**self).subscription()
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut C) -> ProjectionResult {
        (**self).handle(event, ctx).await
    }

    async fn handle_batch(&self, events: &[EventEnvelope], ctx: &mut C) -> Vec<ProjectionResult> {
        (**self).handle_batch(events, ctx).await
    }

    async fn rebuild(&self, ctx: &mut C, from: Position) -> Result<(), BoxError> {
        (**self).rebuild(ctx, from).await
    }
}

/// The lifecycle status of a projection partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionStatus {
    /// Processing events.
    Running,
    /// Held by an operator; no events are processed.
    Paused,
    /// Replaying history after a rebuild; a failure stops it.
    Rebuilding,
    /// Stopped by an error that needs an operator (see the last error).
    Failed,
    /// Stopped on purpose.
    Stopped,
}

impl ProjectionStatus {
    /// The status as stored (`running`, `paused`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionStatus::Running => "running",
            ProjectionStatus::Paused => "paused",
            ProjectionStatus::Rebuilding => "rebuilding",
            ProjectionStatus::Failed => "failed",
            ProjectionStatus::Stopped => "stopped",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => ProjectionStatus::Running,
            "paused" => ProjectionStatus::Paused,
            "rebuilding" => ProjectionStatus::Rebuilding,
            "failed" => ProjectionStatus::Failed,
            "stopped" => ProjectionStatus::Stopped,
            _ => return None,
        })
    }
}

impl fmt::Display for ProjectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one partition of a projection stands (the spec's
/// `getProjectionState()`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionState {
    /// The projection's name.
    pub projection: String,
    /// The partition, `0..partitions`.
    pub partition: u32,
    /// How many partitions the projection has.
    pub partitions: u32,
    /// The events its read model is built from.
    #[serde(default)]
    pub subscription: Subscription,
    /// Every event of this partition at or before this position is handled.
    pub checkpoint: Position,
    /// The partition's status.
    pub status: ProjectionStatus,
    /// Events of this partition after the checkpoint. Read through
    /// `chronicle_projections::load_state` (and everything built on it:
    /// status, health, metrics), measured against the head of the feed at
    /// the time of asking; elsewhere, as of the partition's last step.
    pub lag_events: u64,
    /// Age in seconds of the oldest event not yet handled (0: caught up),
    /// measured as [`ProjectionState::lag_events`] is.
    pub lag_seconds: f64,
    /// Events handled (applied or skipped) so far.
    pub events_processed: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Failures (retries and dead letters) so far.
    pub failure_count: u64,
    /// The worker holding the partition's lease, if any.
    pub owner: Option<String>,
    /// When the owner last reported.
    pub heartbeat: Option<DateTime<Utc>>,
    /// When the lease expires (another worker may take over after it).
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// Whether the partition is stalled: it is running or rebuilding, but
    /// no worker holds a live lease on it, and either its last owner's
    /// lease expired (the worker died) or events wait behind it (nobody
    /// runs it). `false` when not measured (older records).
    #[serde(default)]
    pub stalled: bool,
}

/// What [`ProjectionAdapter::deploy`] started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentResult {
    /// The projection deployed.
    pub projection: String,
    /// The adapter that runs it (`local`, `cloudflare`, …).
    pub provider: String,
    /// How many partition workers it runs.
    pub instances: u32,
}

/// The health of a deployed projection (the spec's `HealthStatus`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// The projection.
    pub projection: String,
    /// `true` when every partition is running or rebuilding, none is
    /// stalled ([`ProjectionState::stalled`]) and none is past the lag
    /// threshold.
    pub healthy: bool,
    /// The largest lag in events over the partitions.
    pub lag_events: u64,
    /// The largest lag in seconds over the partitions.
    pub lag_seconds: f64,
    /// Events waiting in the dead-letter queue (failed and parked).
    pub dead_letters: u64,
    /// Every partition's state.
    pub partitions: Vec<ProjectionState>,
    /// What the provider reports of the deployment (`None`: the adapter
    /// runs it in this process, or was not asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderStatus>,
}

/// What a serverless provider reports of a deployed projection: whether
/// its code is deployed, and facts by name (the script's last change, its
/// triggers, the consumer's settings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatus {
    /// The provider (`cloudflare`, ...).
    pub provider: String,
    /// Whether the provider runs the projection's code.
    pub deployed: bool,
    /// Facts by name, in the provider's terms.
    pub details: std::collections::BTreeMap<String, String>,
}

/// Runs projection handlers somewhere: in this process, on a serverless
/// provider. Every adapter runs the same provider-agnostic step.
#[async_trait]
pub trait ProjectionAdapter<C: Send + ?Sized>: Send + Sync {
    /// Starts running `handler`.
    async fn deploy(
        &self,
        handler: Arc<dyn ProjectionHandler<C>>,
    ) -> Result<DeploymentResult, BoxError>;

    /// Changes how many partition workers run `projection`, without losing
    /// or duplicating work.
    async fn scale(&self, projection: &str, instances: u32) -> Result<(), BoxError>;

    /// The health and lag of `projection`.
    async fn monitor(&self, projection: &str) -> Result<HealthStatus, BoxError>;

    /// Stops all work on `projection` and removes what `deploy` set up to
    /// run it. Its state, read model and dead letters stay in the
    /// database: a later `deploy` takes up where it stopped.
    async fn undeploy(&self, projection: &str) -> Result<(), BoxError>;
}

/// Something an operator should look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Alert {
    /// An event was dead-lettered; its aggregate's later events are parked
    /// behind it until it is retried or discarded.
    DeadLettered {
        /// The projection.
        projection: String,
        /// The event.
        event_id: Uuid,
        /// Its aggregate.
        aggregate_id: Uuid,
        /// Its version.
        version: u32,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// No worker holds a running partition's lease while its last
    /// owner's lease has expired or events wait behind it: the workers
    /// died, none runs, or all are full. Raised by a worker that sees it
    /// on two heartbeats in a row.
    Stalled {
        /// The projection.
        projection: String,
        /// The partition.
        partition: u32,
        /// Events waiting behind it.
        lag_events: u64,
        /// The worker that held it last, if any.
        last_owner: Option<String>,
    },
    /// A projection partition is further behind than the threshold.
    Lagging {
        /// The projection.
        projection: String,
        /// The partition.
        partition: u32,
        /// Events behind.
        lag_events: u64,
        /// Seconds behind.
        lag_seconds: f64,
    },
}

/// Where alerts go (a log, a webhook, a pager).
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// Delivers `alert`. Failing to deliver is reported, never fatal to
    /// the projection.
    async fn alert(&self, alert: &Alert) -> Result<(), BoxError>;
}
