//! [`ProjectionStep`]: one projection's step on PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chronicle_core::{
    Alert, AlertSink, EventEnvelope, Position, ProjectionHandler, ProjectionResult,
    ProjectionStatus, Subscription,
};
use chronicle_sql::{Connection, Statements, Xid8, decode_event as envelope};
use futures_util::future::Either;
use futures_util::{FutureExt, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::alert::LogAlertSink;
use crate::feed::{EVENT, FIRST, Feed, LAST, OrderCheck, WINDOW_KIND};
use crate::runtime::{ConnectionSource, Runtime};
use crate::{Error, PgContext, Result, RetryPolicy};

/// How far into the feed lag is measured: a partition's backlog is counted
/// among the next this many events of the feed, so a longer backlog is
/// reported as a lower bound ("at least").
pub const LAG_COUNT_CAP: i64 = 100_000;

/// How a projection runs. Every field has a default ([`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionOptions {
    /// Partitions: `N` in `partition = hash(aggregate_id) mod N`, the most
    /// workers that can run the projection in parallel (the spec's
    /// `concurrency`; default 4). Fixed once registered.
    pub partitions: u32,
    /// Events of the partition handled per step, about (default 500). A
    /// step reads `batch_size * partitions` rows of the feed (at most
    /// 50,000) and keeps its partition's.
    pub batch_size: u32,
    /// Retries of a failing event before it is dead-lettered (default:
    /// 3 retries, from 100 ms doubling, equal jitter).
    pub retry: RetryPolicy,
    /// How long a partition lease lasts without a heartbeat; a dead
    /// worker's partitions are taken over after it (default 30 s).
    pub lease_ttl: Duration,
    /// How long one handler call may take before it counts as a retryable
    /// failure (default 30 s, the spec's `timeout`).
    pub handler_timeout: Duration,
    /// A partition further behind than this raises an
    /// [`Alert::Lagging`] (default 5 minutes, the spec's "a few minutes").
    pub lag_alert_after: Duration,
    /// Whether a step's own statements (claim, feed window, checkpoint) are
    /// prepared once per connection (default on). Turn it off behind a
    /// pooler in transaction mode that cannot keep prepared statements
    /// (the store's URL says so with `statement_cache=off`).
    pub statement_cache: bool,
    /// Whether a step commits as the session is configured (its
    /// `synchronous_commit`, normally waiting for the WAL to reach the
    /// disk) instead of without waiting (default: without).
    ///
    /// Not waiting costs nothing in correctness: the read model, the dead
    /// letters and the checkpoint commit together or not at all, so a crash
    /// can only take back the last steps' commits as a whole, and their
    /// events are handled again from the checkpoint that survived (a read
    /// model in the same database sees them once; external effects were
    /// at-least-once already). A reader may then see the read model step
    /// back and catch up again. Waiting for a disk flush on every step
    /// bounds catch-up at small batches.
    pub synchronous_commit: bool,
    /// The events the projection consumes, in place of its handler's
    /// [`ProjectionHandler::subscription`] (default `None`: the handler's).
    /// A deployment's `subscribe:` sets it. Like the handler's own, it is
    /// recorded at registration, and changing it needs a rebuild.
    pub subscription: Option<Subscription>,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        ProjectionOptions {
            partitions: 4,
            batch_size: 500,
            retry: RetryPolicy::default(),
            lease_ttl: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
            lag_alert_after: Duration::from_secs(300),
            statement_cache: true,
            synchronous_commit: false,
            subscription: None,
        }
    }
}

impl ProjectionOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |option, reason: &str| {
            Err(Error::Config {
                option,
                reason: reason.to_owned(),
            })
        };
        if self.partitions == 0 || self.partitions > 4096 {
            return bad("partitions", "must be between 1 and 4096");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.lease_ttl < Duration::from_millis(100) {
            return bad("lease_ttl", "must be at least 100 ms");
        }
        if self.handler_timeout.is_zero() {
            return bad("handler_timeout", "must be more than zero");
        }
        if let Some(Err(e)) = self.subscription.as_ref().map(Subscription::validate) {
            return bad("subscription", &e.to_string());
        }
        self.retry.validate()
    }
}

/// What one [`ProjectionStep::step`] did.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StepOutcome {
    /// Whether this worker held the partition's lease for the step (and
    /// still holds it). `false`: another worker holds it, or the step is
    /// running a dead-letter retry; nothing was done.
    pub claimed: bool,
    /// The partition's status (`None` when not claimed).
    pub status: Option<ProjectionStatus>,
    /// Events handled (applied or skipped).
    pub handled: u32,
    /// Retries made.
    pub retries: u32,
    /// Events dead-lettered by this step.
    pub dead_lettered: u32,
    /// Events parked behind an earlier dead letter of their aggregate.
    pub parked: u32,
    /// The partition's checkpoint after the step.
    pub checkpoint: Position,
    /// Whether the step read everything the feed had for the partition.
    pub caught_up: bool,
    /// Whether the step's window held any row of the feed, any
    /// partition's.
    pub saw_feed: bool,
    /// Events of the partition after the checkpoint (counted among the
    /// next [`LAG_COUNT_CAP`] events of the feed; while one of several
    /// partitions catches up, the feed's backlog over the partition count).
    pub lag_events: u64,
    /// Age of the oldest event not yet handled, in seconds.
    pub lag_seconds: f64,
}

/// How often a partition's backlog is counted while it is behind.
const LAG_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// What one step works on.
#[derive(Debug, Clone, Copy)]
struct Batch {
    partition: u32,
    checkpoint: Position,
    horizon: u64,
    status: ProjectionStatus,
    count_lag: bool,
}

/// The first failure of an optimistic run, carried into the careful run.
#[derive(Debug)]
struct Carried {
    event_id: Uuid,
    result: ProjectionResult,
}

/// How a step's transaction ended.
enum Flow {
    Committed(StepOutcome),
    /// Roll back and run the batch again carefully; with the failure that
    /// caused it when the handler named the event.
    Restart(Option<Carried>),
}

/// How a step applies its batch.
enum Mode {
    /// The whole batch in one handler call, no savepoints.
    Optimistic,
    /// Event by event, each in a savepoint, with the failure carried from
    /// the optimistic run.
    Careful(Option<Carried>),
}

/// What applying one event with retries came to
/// ([`ProjectionStep::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied (or skipped by the handler), after this many retries.
    Handled {
        /// Retries it took.
        retries: u32,
    },
    /// Still failing after the retries: to be dead-lettered.
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
}

/// One projection's step: its handler, options and subscription, and
/// the statements that run it on PostgreSQL.
///
/// [`ProjectionStep::step`] is the provider-agnostic unit of work every
/// adapter runs: claim the partition's lease, read a batch after the
/// checkpoint from the gap-safe feed, apply the handler with retries,
/// dead-letter and park what fails, commit the handler's writes and the
/// checkpoint in one transaction. It takes its connection from a
/// [`ConnectionSource`] and its timers from a [`Runtime`]: a tokio process
/// loops it over a pool, a Worker over the one connection it opened.
pub struct ProjectionStep {
    handler: Arc<dyn ProjectionHandler<PgContext>>,
    name: Arc<str>,
    options: ProjectionOptions,
    alerts: Arc<dyn AlertSink>,
    schema: Option<Arc<str>>,
    feed: Arc<Feed>,
    seen: Mutex<HashMap<u32, SeenVersions>>,
}

/// The last version of each aggregate a partition's steps met in the feed,
/// as of the partition's checkpoint: the order check needs the database
/// only for aggregates not met before. Kept while this process's steps are
/// the ones advancing the partition (the checkpoint it was kept at is the
/// one claimed), dropped otherwise.
#[derive(Debug, Default)]
struct SeenVersions {
    checkpoint: Position,
    last: AggregateMap<u32>,
}

/// Per-aggregate maps on the step's hot path: foldhash (randomly seeded)
/// instead of SipHash; a catch-up looks up every event's aggregate twice.
type AggregateMap<V> = HashMap<Uuid, V, foldhash::fast::RandomState>;
type AggregateSet = HashSet<Uuid, foldhash::fast::RandomState>;

/// Aggregates remembered per partition before the memory starts over.
const SEEN_VERSIONS_CAP: usize = 1_000_000;

impl std::fmt::Debug for ProjectionStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionStep")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

const CLAIM: &str = "\
UPDATE projection_state s
   SET owner = $3, heartbeat = now(), updated_at = now(),
       lease_expires_at = now() + make_interval(secs => $4)
  FROM (SELECT projection, partition FROM projection_state
         WHERE projection = $1 AND partition = $2
           AND (owner IS NULL OR owner = $3 OR lease_expires_at IS NULL OR lease_expires_at < now())
           FOR UPDATE SKIP LOCKED) c
 WHERE s.projection = c.projection AND s.partition = c.partition
RETURNING s.checkpoint_xid, s.checkpoint_position, s.status, s.partitions,
          pg_snapshot_xmin(pg_current_snapshot()), s.lag_seconds,
          s.lag_counted_at IS NULL OR s.lag_counted_at < now() - make_interval(secs => $5),
          s.subscription IS NOT DISTINCT FROM $6, s.subscription";

/// What a step learned of its window besides the events.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    /// The window's last row, when the window was full.
    end: Option<Position>,
    /// Whether it held any row, any partition's.
    saw_feed: bool,
}

const ROLLBACK_EVENT: &str =
    "ROLLBACK TO SAVEPOINT chronicle_event; RELEASE SAVEPOINT chronicle_event";

const INSERT_DEAD_LETTER: &str = "\
INSERT INTO projection_dead_letters
       (projection, aggregate_id, event_id, event_type, version, transaction_id, global_position,
        state, attempts, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (projection, event_id) DO NOTHING";

impl ProjectionStep {
    /// The step of `handler` with `options`. Call
    /// [`ProjectionStep::register`] once before stepping (runners do).
    pub fn new(
        handler: impl ProjectionHandler<PgContext> + 'static,
        options: ProjectionOptions,
    ) -> Result<Self> {
        Self::from_shared(Arc::new(handler), options)
    }

    /// [`ProjectionStep::new`] for a handler already shared.
    pub fn from_shared(
        handler: Arc<dyn ProjectionHandler<PgContext>>,
        options: ProjectionOptions,
    ) -> Result<Self> {
        options.validate()?;
        let name: Arc<str> = Arc::from(handler.name());
        if name.trim().is_empty() {
            return Err(Error::Config {
                option: "name",
                reason: "the handler's name is empty".to_owned(),
            });
        }
        let subscription = match &options.subscription {
            Some(subscription) => subscription.clone(),
            None => {
                let own = handler.subscription();
                own.validate().map_err(|e| Error::Config {
                    option: "subscription",
                    reason: format!("the handler `{name}` declares an impossible {e}"),
                })?;
                own
            }
        };
        let feed = Arc::new(Feed::new(subscription, options.partitions));
        Ok(ProjectionStep {
            handler,
            name,
            options,
            alerts: Arc::new(LogAlertSink),
            schema: None,
            feed,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Sends alerts to `sink` instead of the log ([`LogAlertSink`], the
    /// default).
    pub fn with_alerts(mut self, sink: impl AlertSink + 'static) -> Self {
        self.alerts = Arc::new(sink);
        self
    }

    /// Keeps the read model in its own PostgreSQL schema: every step, the
    /// rebuild hook and dead-letter replays run with `schema` first on the
    /// search path, so the handler's unqualified table names resolve there
    /// (other names fall through to the rest of the path). Readers query
    /// `schema.table`. This is what a blue/green rebuild
    /// builds anew and swaps.
    ///
    /// `schema` is a lowercase identifier (letters, digits, `_`) of at most
    /// 57 characters (`__next` is appended during a blue/green rebuild).
    ///
    /// ```no_run
    /// # fn demo(handler: impl chronicle_core::ProjectionHandler<chronicle_step::PgContext> + 'static) -> chronicle_step::Result<()> {
    /// use chronicle_step::{ProjectionOptions, ProjectionStep};
    ///
    /// let projection = ProjectionStep::new(handler, ProjectionOptions::default())?
    ///     .with_read_model_schema("user_profile")?;
    /// # Ok(()) }
    /// ```
    pub fn with_read_model_schema(mut self, schema: &str) -> Result<Self> {
        if !chronicle_sql::is_plain_identifier(schema, 57) {
            return Err(Error::Config {
                option: "read_model_schema",
                reason: format!(
                    "`{schema}` is not a plain schema name: use at most 57 lowercase letters, digits and _"
                ),
            });
        }
        self.schema = Some(Arc::from(schema));
        Ok(self)
    }

    /// The read model's schema, if it has its own.
    pub fn read_model_schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// Opens a transaction on `conn` for the handler outside a step (a
    /// dead-letter replay, a rebuild): the read model's schema first on the
    /// search path.
    pub async fn context(
        &self,
        conn: Box<dyn Connection>,
        partition: Option<u32>,
        worker: &str,
    ) -> Result<PgContext> {
        let ctx = PgContext::begin(conn, self.name.clone(), partition, Arc::from(worker)).await?;
        self.scope_search_path(ctx.client()).await?;
        Ok(ctx)
    }

    /// The handler.
    pub fn handler(&self) -> &Arc<dyn ProjectionHandler<PgContext>> {
        &self.handler
    }

    /// The same step under another name with its read model in another
    /// schema: the shadow projection a blue/green rebuild builds.
    pub fn shadow(&self, name: &str, schema: &str) -> Result<Self> {
        ProjectionStep {
            handler: self.handler.clone(),
            name: Arc::from(name),
            options: self.options.clone(),
            alerts: self.alerts.clone(),
            schema: None,
            feed: self.feed.clone(),
            seen: Mutex::new(HashMap::new()),
        }
        .with_read_model_schema(schema)
    }

    /// The subscription as `projection_state.subscription` stores it
    /// (`None`: every event).
    pub fn stored_subscription(&self) -> &Option<serde_json::Value> {
        self.feed.stored()
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options.
    pub fn options(&self) -> &ProjectionOptions {
        &self.options
    }

    /// The events this projection consumes: the options' subscription, else
    /// the handler's.
    pub fn subscription(&self) -> &Subscription {
        self.feed.subscription()
    }

    /// Creates the projection's partition rows if missing (idempotent),
    /// recording its subscription. Fails when the projection exists with
    /// another partition count ([`Error::PartitionMismatch`]) or was built
    /// from another subscription ([`Error::SubscriptionChanged`]: rebuild
    /// it).
    pub async fn register(&self, source: &dyn ConnectionSource) -> Result<()> {
        self.register_rows(source, true).await
    }

    /// [`ProjectionStep::register`] without the subscription check: for a
    /// rebuild, which records the subscription itself.
    pub async fn register_for_rebuild(&self, source: &dyn ConnectionSource) -> Result<()> {
        self.register_rows(source, false).await
    }

    /// [`ProjectionStep::register`], checking the stored subscription when
    /// `check_subscription`.
    async fn register_rows(
        &self,
        source: &dyn ConnectionSource,
        check_subscription: bool,
    ) -> Result<()> {
        let conn = source.acquire().await?;
        let registered = self.register_on(conn.client(), check_subscription).await;
        source.give_back(conn);
        registered
    }

    async fn register_on(
        &self,
        client: &tokio_postgres::Client,
        check_subscription: bool,
    ) -> Result<()> {
        let n = self.options.partitions as i32;
        let existing = client
            .query_typed(
                "SELECT DISTINCT partitions, subscription FROM projection_state WHERE projection = $1",
                &[(&&*self.name, Type::TEXT)],
            )
            .await?;
        if let Some(row) = existing.iter().find(|r| r.get::<_, i32>(0) != n) {
            return Err(Error::PartitionMismatch {
                projection: self.name.to_string(),
                registered: row.get::<_, i32>(0) as u32,
                requested: self.options.partitions,
            });
        }
        if check_subscription {
            for row in &existing {
                self.check_subscription(row.get(1))?;
            }
        }
        client
            .execute_typed(
                "INSERT INTO projection_state (projection, partition, partitions, subscription)
                 SELECT $1, g, $2, $3 FROM generate_series(0, $2 - 1) AS g
                 ON CONFLICT (projection, partition) DO NOTHING",
                &[
                    (&&*self.name, Type::TEXT),
                    (&n, Type::INT4),
                    (self.feed.stored(), Type::JSONB),
                ],
            )
            .await?;
        Ok(())
    }

    /// Fails unless `stored` (a partition row's subscription) is this
    /// projection's.
    fn check_subscription(&self, stored: Option<serde_json::Value>) -> Result<()> {
        let stored = Feed::read_stored(&self.name, stored)?;
        if &stored == self.subscription() {
            return Ok(());
        }
        Err(Error::SubscriptionChanged {
            projection: self.name.to_string(),
            stored,
            requested: self.subscription().clone(),
        })
    }

    /// Runs one step on `partition` as `worker`: claims (or extends) the
    /// partition's lease, reads up to `batch_size` events after its
    /// checkpoint, applies them, and commits the handler's writes, the dead
    /// letters and the new checkpoint in one transaction.
    ///
    /// Returns with `claimed: false` at once when another worker's lease is
    /// live or another transaction holds the partition. The lease stays
    /// with `worker` (extended by `lease_ttl` from the commit) until
    /// [`ProjectionStep::release`] or expiry.
    #[tracing::instrument(level = "debug", skip(self, source, rt), fields(projection = %self.name))]
    pub async fn step<R: Runtime>(
        &self,
        source: &dyn ConnectionSource,
        partition: u32,
        worker: &str,
        rt: &R,
    ) -> Result<StepOutcome> {
        if partition >= self.options.partitions {
            return Err(Error::Config {
                option: "partition",
                reason: format!(
                    "{partition} is not below the partition count {}",
                    self.options.partitions
                ),
            });
        }
        let worker: Arc<str> = Arc::from(worker);
        // Optimistic first: no savepoints (each would be a subtransaction,
        // and a transaction with more than 64 of them slows every snapshot
        // in the cluster). On the first failure the batch is rolled back and
        // run again carefully, each event in a savepoint.
        match self
            .step_once(source, partition, &worker, Mode::Optimistic, rt)
            .await?
        {
            Flow::Committed(outcome) => Ok(outcome),
            Flow::Restart(carried) => {
                match self
                    .step_once(source, partition, &worker, Mode::Careful(carried), rt)
                    .await?
                {
                    Flow::Committed(outcome) => Ok(outcome),
                    Flow::Restart(_) => unreachable!("a careful run does not restart"),
                }
            }
        }
    }

    async fn step_once<R: Runtime>(
        &self,
        source: &dyn ConnectionSource,
        partition: u32,
        worker: &Arc<str>,
        mode: Mode,
        rt: &R,
    ) -> Result<Flow> {
        let conn = source.acquire().await?;
        let mut ctx = PgContext::deferred(conn, self.name.clone(), Some(partition), worker.clone());
        let name: &str = &self.name;
        let slot = partition as i32;
        let owner: &str = worker;
        let ttl = self.options.lease_ttl.as_secs_f64();
        let lag_interval = LAG_COUNT_INTERVAL.as_secs_f64();
        let claim_params: [(&(dyn ToSql + Sync), Type); 6] = [
            (&name, Type::TEXT),
            (&slot, Type::INT4),
            (&owner, Type::TEXT),
            (&ttl, Type::FLOAT8),
            (&lag_interval, Type::FLOAT8),
            (self.feed.stored(), Type::JSONB),
        ];
        // BEGIN, the read model's search path and the claim in one round
        // trip (requests on a connection go out in the order they are first
        // polled).
        let client = ctx.client();
        let statements = self.statements();
        let begin = if self.options.synchronous_commit {
            "BEGIN"
        } else {
            "BEGIN; SET LOCAL synchronous_commit = off"
        };
        let (begun, scoped, claim) = futures_util::future::join3(
            client.batch_execute(begin),
            self.scope_search_path(client),
            statements.query_opt(ctx.connection(), CLAIM, &claim_params),
        )
        .await;
        let claim = begun.and(scoped).and(claim);
        let row = match claim {
            Ok(Some(row)) => row,
            Ok(None) => {
                give_back(source, ctx.rollback().await);
                return Ok(Flow::Committed(StepOutcome::default()));
            }
            Err(e) => {
                give_back(source, ctx.rollback().await);
                return Err(e.into());
            }
        };
        let checkpoint = Position::new(row.get::<_, Xid8>(0).0, row.get(1));
        let status = ProjectionStatus::parse(row.get(2)).unwrap_or(ProjectionStatus::Failed);
        let partitions: i32 = row.get(3);
        let horizon: Xid8 = row.get(4);
        let previous_lag: f64 = row.get(5);
        let count_lag: bool = row.get(6);
        if !row.get::<_, bool>(7) {
            // Rebuilt with another subscription since this process
            // registered: its handler would build the model from other
            // events.
            give_back(source, ctx.rollback().await);
            return Err(Error::SubscriptionChanged {
                projection: self.name.to_string(),
                stored: Feed::read_stored(&self.name, row.get(8))?,
                requested: self.subscription().clone(),
            });
        }
        if partitions as u32 != self.options.partitions {
            give_back(source, ctx.rollback().await);
            return Err(Error::PartitionMismatch {
                projection: self.name.to_string(),
                registered: partitions as u32,
                requested: self.options.partitions,
            });
        }
        if !matches!(
            status,
            ProjectionStatus::Running | ProjectionStatus::Rebuilding
        ) {
            give_back(source, ctx.rollback().await);
            return Ok(Flow::Committed(StepOutcome {
                status: Some(status),
                checkpoint,
                ..StepOutcome::default()
            }));
        }
        let mut alerts = Vec::new();
        let batch = Batch {
            partition,
            checkpoint,
            horizon: horizon.0,
            status,
            count_lag,
        };
        let mut seen = self.take_seen(partition, checkpoint);
        let processed = self
            .process(&mut ctx, &batch, mode, &mut alerts, &mut seen, rt)
            .await;
        match processed {
            Ok(Flow::Restart(carried)) => {
                give_back(source, ctx.rollback().await);
                Ok(Flow::Restart(carried))
            }
            Ok(Flow::Committed(outcome)) => {
                source.give_back(ctx.commit().await?);
                seen.checkpoint = outcome.checkpoint;
                self.keep_seen(partition, seen);
                let threshold = self.options.lag_alert_after.as_secs_f64();
                if outcome.lag_seconds >= threshold && previous_lag < threshold {
                    alerts.push(Alert::Lagging {
                        projection: self.name.to_string(),
                        partition,
                        lag_events: outcome.lag_events,
                        lag_seconds: outcome.lag_seconds,
                    });
                }
                self.send_alerts(&alerts).await;
                tracing::debug!(
                    partition,
                    handled = outcome.handled,
                    dead_lettered = outcome.dead_lettered,
                    parked = outcome.parked,
                    checkpoint = %outcome.checkpoint,
                    "projection step committed"
                );
                Ok(Flow::Committed(outcome))
            }
            Err(e) => {
                give_back(source, ctx.rollback().await);
                if matches!(
                    e,
                    Error::OrderViolation { .. } | Error::RebuildFailed { .. }
                ) {
                    tracing::error!(partition, error = %e, "projection partition stopped");
                    self.mark_failed(source, partition, &e.to_string()).await?;
                }
                Err(e)
            }
        }
    }

    /// How a step sends its statements: prepared per connection, or
    /// unnamed ([`ProjectionOptions::statement_cache`]).
    pub fn statements(&self) -> Statements {
        Statements::new(self.options.statement_cache)
    }

    /// Feed rows read per step: about `batch_size` of the partition's own
    /// events, at most 50,000 rows.
    fn window(&self) -> i64 {
        let batch = i64::from(self.options.batch_size);
        (batch * i64::from(self.options.partitions)).clamp(batch.min(50_000), 50_000)
    }

    async fn process<R: Runtime>(
        &self,
        ctx: &mut PgContext,
        batch: &Batch,
        mode: Mode,
        alerts: &mut Vec<Alert>,
        seen: &mut SeenVersions,
        rt: &R,
    ) -> Result<Flow> {
        let Batch {
            partition,
            checkpoint,
            horizon,
            status,
            ..
        } = *batch;
        let n = self.options.partitions as i32;
        let p = partition as i32;
        // Read a window of the (subscribed) feed in index order and keep
        // this partition's events. (Filtering the whole feed by partition
        // lets the planner, which cannot estimate the hash filter, scan and
        // sort the table.) Each event says whether its aggregate has dead
        // letters (a subplan on the dead letters' index).
        let window = self.window();
        let checkpoint_xid = Xid8(checkpoint.transaction_id);
        let horizon = Xid8(horizon);
        let name: &str = &self.name;
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&checkpoint_xid, Type::XID8),
            (&checkpoint.global_position, Type::INT8),
            (&horizon, Type::XID8),
            (&n, Type::INT4),
            (&p, Type::INT4),
            (&window, Type::INT8),
            (&name, Type::TEXT),
        ];
        params.extend(self.feed.type_params());
        let rows = self
            .statements()
            .query_raw(ctx.connection(), self.feed.window_sql(), &params)
            .await?;
        futures_util::pin_mut!(rows);
        let probed = self.feed.order_check() == OrderCheck::Probed;
        let mut events = Vec::new();
        let mut blocked = AggregateSet::default();
        let mut seen_window = Window::default();
        let mut last = None;
        while let Some(row) = rows.try_next().await? {
            match row.get::<_, i32>(WINDOW_KIND) {
                EVENT => {
                    let event = envelope(&row)?;
                    if row.get::<_, bool>(WINDOW_KIND + 1) {
                        blocked.insert(event.aggregate_id);
                    }
                    if probed && row.get::<_, bool>(WINDOW_KIND + 2) {
                        return Err(Error::OrderViolation {
                            projection: self.name.to_string(),
                            partition,
                            aggregate_id: event.aggregate_id,
                            version: event.version,
                            missing: event.version - 1,
                        });
                    }
                    last = Some(event.position);
                    events.push(event);
                }
                FIRST => seen_window.saw_feed = true,
                LAST => {
                    seen_window.end = Some(Position::new(
                        row.get::<_, Xid8>(WINDOW_KIND - 2).0,
                        row.get(WINDOW_KIND - 1),
                    ))
                }
                kind => unreachable!("the window statement has no row kind {kind}"),
            }
        }
        if self.feed.window_is_whole(self.options.partitions) {
            // Every row of the window is the partition's.
            seen_window.saw_feed = !events.is_empty();
            if events.len() as i64 == window {
                seen_window.end = last;
            }
        }
        self.verify_order(ctx, partition, checkpoint, &events, &seen.last)
            .await?;
        if seen.last.len() + events.len() > SEEN_VERSIONS_CAP {
            seen.last.clear();
        }
        for event in &events {
            seen.last.insert(event.aggregate_id, event.version);
        }

        let mut outcome = StepOutcome {
            claimed: true,
            status: Some(status),
            ..StepOutcome::default()
        };
        let mut last_error = None;
        let mut careful = match mode {
            Mode::Careful(carried) => carried,
            Mode::Optimistic => {
                let (parked, runnable): (Vec<_>, Vec<_>) = events
                    .into_iter()
                    .partition(|e| blocked.contains(&e.aggregate_id));
                for event in &parked {
                    outcome.parked += self
                        .insert_dead_letter(ctx, event, "parked", 0, None)
                        .await? as u32;
                }
                if let Some(restart) = self.call_batch(ctx, &runnable, rt).await {
                    return Ok(Flow::Restart(restart));
                }
                outcome.handled += runnable.len() as u32;
                return self.finish(ctx, batch, outcome, seen_window, None).await;
            }
        };
        for event in &events {
            if blocked.contains(&event.aggregate_id) {
                outcome.parked += self
                    .insert_dead_letter(ctx, event, "parked", 0, None)
                    .await? as u32;
                continue;
            }
            let first = match careful.take() {
                Some(c) if c.event_id == event.event_id => Some(c.result),
                other => {
                    careful = other;
                    None
                }
            };
            match self.apply(ctx, event, first, rt).await? {
                Applied::Handled { retries } => {
                    outcome.handled += 1;
                    outcome.retries += retries;
                }
                Applied::Failed { attempts, error } => {
                    outcome.retries += attempts - 1;
                    if status == ProjectionStatus::Rebuilding {
                        return Err(Error::RebuildFailed {
                            projection: self.name.to_string(),
                            partition,
                            event_id: event.event_id,
                            reason: error,
                        });
                    }
                    self.insert_dead_letter(ctx, event, "failed", attempts, Some(&error))
                        .await?;
                    blocked.insert(event.aggregate_id);
                    outcome.dead_lettered += 1;
                    tracing::warn!(
                        projection = %self.name,
                        event_id = %event.event_id,
                        aggregate_id = %event.aggregate_id,
                        version = event.version,
                        attempts,
                        error = %error,
                        "event dead-lettered; the aggregate's later events are parked"
                    );
                    alerts.push(Alert::DeadLettered {
                        projection: self.name.to_string(),
                        event_id: event.event_id,
                        aggregate_id: event.aggregate_id,
                        version: event.version,
                        attempts,
                        error: error.clone(),
                    });
                    last_error = Some(error);
                }
            }
        }

        self.finish(ctx, batch, outcome, seen_window, last_error)
            .await
    }

    /// Advances the checkpoint past the window, measures lag and updates
    /// the partition's row, in the step's transaction.
    async fn finish(
        &self,
        ctx: &mut PgContext,
        batch: &Batch,
        mut outcome: StepOutcome,
        window: Window,
        last_error: Option<String>,
    ) -> Result<Flow> {
        let Batch {
            partition,
            checkpoint,
            horizon,
            status,
            count_lag,
        } = *batch;
        let n = self.options.partitions as i32;
        let p = partition as i32;
        outcome.caught_up = window.end.is_none();
        outcome.saw_feed = window.saw_feed;
        outcome.checkpoint = match window.end {
            // The whole window is handled (other partitions' rows in it
            // are theirs): resume after it.
            Some(end) => end,
            // Everything of the partition below the horizon is handled, and
            // every transaction below it has ended: resume at the horizon.
            None => checkpoint.max(Position::new(horizon, 0)),
        };

        // The age of the oldest pending event is cheap (the next event of
        // the partition); counting the backlog is not, so it is counted when
        // caught up (the backlog is then small) or every few seconds. While
        // a partition of several catches up, its share is estimated as the
        // feed's backlog over the partition count, from the feed index
        // alone: the exact count reads every row's aggregate id.
        let count_lag = count_lag || outcome.caught_up;
        let failures = i64::from(outcome.retries + outcome.dead_lettered);
        let handled = i64::from(outcome.handled);
        let ttl = self.options.lease_ttl.as_secs_f64();
        // One statement: the lag figures are subqueries of the update (the
        // count's only runs when asked for).
        let checkpoint_xid = Xid8(outcome.checkpoint.transaction_id);
        let name: &str = &self.name;
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&name, Type::TEXT),
            (&p, Type::INT4),
            (&checkpoint_xid, Type::XID8),
            (&outcome.checkpoint.global_position, Type::INT8),
            (&count_lag, Type::BOOL),
            (&handled, Type::INT8),
            (&failures, Type::INT8),
            (&last_error, Type::TEXT),
            (&outcome.caught_up, Type::BOOL),
            (&ttl, Type::FLOAT8),
            (&n, Type::INT4),
            (&LAG_COUNT_CAP, Type::INT8),
        ];
        params.extend(self.feed.type_params());
        let updated = self
            .statements()
            .query_one(ctx.connection(), self.feed.finish_sql(), &params)
            .await?;
        outcome.lag_events = updated.get::<_, i64>(0) as u64;
        outcome.lag_seconds = updated.get(1);
        if outcome.caught_up && status == ProjectionStatus::Rebuilding {
            outcome.status = Some(ProjectionStatus::Running);
        }
        Ok(Flow::Committed(outcome))
    }

    /// Checks that every aggregate's events arrive in version order: within
    /// the batch each follows its predecessor, and the predecessor of an
    /// aggregate's first event in the batch was handled by an earlier step
    /// (it lies at or before the checkpoint).
    async fn verify_order(
        &self,
        ctx: &PgContext,
        partition: u32,
        checkpoint: Position,
        events: &[EventEnvelope],
        seen: &AggregateMap<u32>,
    ) -> Result<()> {
        let violation = |aggregate_id, version, missing| Error::OrderViolation {
            projection: self.name.to_string(),
            partition,
            aggregate_id,
            version,
            missing,
        };
        let check = self.feed.order_check();
        let gaps = check == OrderCheck::Gaps;
        let order = batch_order(events, seen, check);
        let in_batch = order
            .in_batch
            .map(|(aggregate_id, version, missing)| violation(aggregate_id, version, missing));
        let (ids, previous): (Vec<Uuid>, Vec<i32>) = order
            .predecessors
            .into_iter()
            .map(|(id, v)| (id, v as i32))
            .unzip();
        if ids.is_empty() {
            return in_batch.map_or(Ok(()), Err);
        }
        let ahead = self
            .statements()
            .query_opt(
                ctx.connection(),
                "SELECT f.a, f.v FROM unnest($1::uuid[], $2::int4[]) AS f(a, v)
                   JOIN events e ON e.aggregate_id = f.a AND e.version = f.v
                  WHERE (e.transaction_id, e.global_position) > ($3, $4)
                    AND (NOT $5 OR (e.transaction_id, e.global_position) >
                         (SELECT n.transaction_id, n.global_position FROM events n
                           WHERE n.aggregate_id = f.a AND n.version = f.v + 1))
                  LIMIT 1",
                &[
                    (&ids, Type::UUID_ARRAY),
                    (&previous, Type::INT4_ARRAY),
                    (&Xid8(checkpoint.transaction_id), Type::XID8),
                    (&checkpoint.global_position, Type::INT8),
                    (&gaps, Type::BOOL),
                ],
            )
            .await?;
        match ahead {
            Some(row) => {
                let missing = row.get::<_, i32>(1) as u32;
                Err(violation(row.get(0), missing + 1, missing))
            }
            None => in_batch.map_or(Ok(()), Err),
        }
    }

    /// Queues `event`; returns whether a row was inserted (nothing is
    /// queued twice).
    async fn insert_dead_letter(
        &self,
        ctx: &PgContext,
        event: &EventEnvelope,
        state: &str,
        attempts: u32,
        error: Option<&str>,
    ) -> Result<bool> {
        let inserted = ctx
            .client()
            .execute_typed(
                INSERT_DEAD_LETTER,
                &[
                    (&&*self.name, Type::TEXT),
                    (&event.aggregate_id, Type::UUID),
                    (&event.event_id, Type::UUID),
                    (&event.event_type, Type::TEXT),
                    (&(event.version as i32), Type::INT4),
                    (&Xid8(event.position.transaction_id), Type::XID8),
                    (&event.position.global_position, Type::INT8),
                    (&state, Type::TEXT),
                    (&(attempts as i32), Type::INT4),
                    (&error, Type::TEXT),
                ],
            )
            .await?;
        Ok(inserted > 0)
    }

    /// Calls the handler once: a timeout counts as a retryable failure, a
    /// panic as a permanent one.
    async fn call<R: Runtime>(
        &self,
        ctx: &mut PgContext,
        event: &EventEnvelope,
        rt: &R,
    ) -> ProjectionResult {
        let call = AssertUnwindSafe(self.handler.handle(event, ctx)).catch_unwind();
        match within(rt, self.options.handler_timeout, call).await {
            None => ProjectionResult::Retry(format!(
                "the handler took longer than {:?}",
                self.options.handler_timeout
            )),
            Some(Err(panic)) => ProjectionResult::Fail(format!(
                "the handler panicked: {}",
                panic_message(panic.as_ref())
            )),
            Some(Ok(result)) => result,
        }
    }

    /// Calls the handler once on the whole batch; `None` when every event
    /// was handled, else what the careful rerun needs to know.
    async fn call_batch<R: Runtime>(
        &self,
        ctx: &mut PgContext,
        events: &[EventEnvelope],
        rt: &R,
    ) -> Option<Option<Carried>> {
        if events.is_empty() {
            return None;
        }
        let call = AssertUnwindSafe(self.handler.handle_batch(events, ctx)).catch_unwind();
        let results = match within(rt, self.options.handler_timeout, call).await {
            // A timeout or a panic does not say which event: find out one
            // by one.
            None | Some(Err(_)) => return Some(None),
            Some(Ok(results)) => results,
        };
        for (event, result) in events.iter().zip(&results) {
            if !result.is_success() {
                return Some(Some(Carried {
                    event_id: event.event_id,
                    result: result.clone(),
                }));
            }
        }
        (results.len() < events.len()).then_some(None)
    }

    /// Applies `event` with the retry policy, each attempt in a savepoint
    /// that is rolled back when the attempt fails. `first` is the result of
    /// a first attempt already made (and rolled back) by an optimistic run.
    pub async fn apply<R: Runtime>(
        &self,
        ctx: &mut PgContext,
        event: &EventEnvelope,
        mut first: Option<ProjectionResult>,
        rt: &R,
    ) -> Result<Applied> {
        let policy = self.options.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (reason, permanent) = match first.take() {
                // Already tried, and nothing of it is left to roll back.
                Some(ProjectionResult::Retry(reason)) => (reason, false),
                Some(ProjectionResult::Fail(reason)) => (reason, true),
                Some(ProjectionResult::Done | ProjectionResult::Skipped) | None => {
                    ctx.exec("SAVEPOINT chronicle_event").await?;
                    match self.call(ctx, event, rt).await {
                        ProjectionResult::Done | ProjectionResult::Skipped => {
                            ctx.exec("RELEASE SAVEPOINT chronicle_event").await?;
                            return Ok(Applied::Handled {
                                retries: attempt - 1,
                            });
                        }
                        ProjectionResult::Retry(reason) => {
                            ctx.exec(ROLLBACK_EVENT).await?;
                            (reason, false)
                        }
                        ProjectionResult::Fail(reason) => {
                            ctx.exec(ROLLBACK_EVENT).await?;
                            (reason, true)
                        }
                    }
                }
            };
            if permanent || attempt > policy.max_retries {
                return Ok(Applied::Failed {
                    attempts: attempt,
                    error: reason,
                });
            }
            let delay = policy.delay_with(attempt, rt.random());
            tracing::debug!(event_id = %event.event_id, attempt, ?delay, %reason, "retrying event");
            rt.sleep(delay).await;
        }
    }

    /// Gives `partition`'s lease up if `worker` holds it; returns whether
    /// it did.
    pub async fn release(
        &self,
        source: &dyn ConnectionSource,
        partition: u32,
        worker: &str,
    ) -> Result<bool> {
        let conn = source.acquire().await?;
        let n = conn
            .client()
            .execute_typed(
                "UPDATE projection_state SET owner = NULL, lease_expires_at = NULL, updated_at = now()
                  WHERE projection = $1 AND partition = $2 AND owner = $3",
                &[
                    (&&*self.name, Type::TEXT),
                    (&(partition as i32), Type::INT4),
                    (&worker, Type::TEXT),
                ],
            )
            .await;
        source.give_back(conn);
        Ok(n? > 0)
    }

    /// Stops `partition` (status `failed`) with `error` as its last error.
    pub async fn mark_failed(
        &self,
        source: &dyn ConnectionSource,
        partition: u32,
        error: &str,
    ) -> Result<()> {
        let conn = source.acquire().await?;
        let marked = conn
            .client()
            .execute_typed(
                "UPDATE projection_state
                    SET status = 'failed', last_error = $3, failure_count = failure_count + 1,
                        updated_at = now()
                  WHERE projection = $1 AND partition = $2",
                &[
                    (&&*self.name, Type::TEXT),
                    (&(partition as i32), Type::INT4),
                    (&error, Type::TEXT),
                ],
            )
            .await;
        source.give_back(conn);
        marked?;
        Ok(())
    }

    /// Delivers `alerts` to the alert sink; a failed delivery is logged.
    pub async fn send_alerts(&self, alerts: &[Alert]) {
        for alert in alerts {
            if let Err(e) = self.alerts.alert(alert).await {
                tracing::warn!(error = %e, ?alert, "could not deliver an alert");
            }
        }
    }

    /// In a transaction: puts the read model's schema, if any, first on
    /// the search path until the transaction ends.
    pub async fn scope_search_path(
        &self,
        client: &tokio_postgres::Client,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        if let Some(schema) = &self.schema {
            client
                .query_typed(
                    "SELECT set_config('search_path',
                                       quote_ident($1) || ', ' || current_setting('search_path'), true)",
                    &[(&&**schema, Type::TEXT)],
                )
                .await?;
        }
        Ok(())
    }

    /// The versions met by this process's last step on `partition`, if
    /// that step left the partition at `checkpoint` (else an empty memory).
    fn take_seen(&self, partition: u32, checkpoint: Position) -> SeenVersions {
        let kept = self.seen.lock().expect("seen versions").remove(&partition);
        match kept {
            Some(seen) if seen.checkpoint == checkpoint => seen,
            _ => SeenVersions {
                checkpoint,
                last: AggregateMap::default(),
            },
        }
    }

    fn keep_seen(&self, partition: u32, seen: SeenVersions) {
        self.seen
            .lock()
            .expect("seen versions")
            .insert(partition, seen);
    }
}

/// Per-aggregate order within one batch.
#[derive(Debug, Default, PartialEq)]
struct BatchOrder {
    /// The first violation inside the batch: (aggregate, version that
    /// arrived, version that should have come first).
    in_batch: Option<(Uuid, u32, u32)>,
    /// For each aggregate's first event in the batch with a version above
    /// 1 and not met in an earlier batch: the aggregate and the version
    /// that must already be handled. With [`OrderCheck::Gaps`], also each
    /// event whose predecessor is not the event met before it: the version
    /// that must come before it in the feed. None with
    /// [`OrderCheck::Probed`]: the window statement looked each up.
    predecessors: Vec<(Uuid, u32)>,
}

/// Checks each aggregate's versions in `events` against each other and
/// against the versions `seen` before. Under a subscription (`check` other
/// than [`OrderCheck::Consecutive`]) versions may skip: a skipped
/// predecessor is looked up instead of being a violation, or was probed by
/// the window statement already.
fn batch_order(
    events: &[EventEnvelope],
    seen: &AggregateMap<u32>,
    check: OrderCheck,
) -> BatchOrder {
    let mut last = AggregateMap::with_capacity_and_hasher(events.len(), Default::default());
    let mut order = BatchOrder::default();
    for e in events {
        match last
            .get(&e.aggregate_id)
            .or_else(|| seen.get(&e.aggregate_id))
        {
            // Events the subscription does not take lie between: the
            // one before must come before this one.
            Some(&v) if check == OrderCheck::Gaps && e.version > v + 1 => {
                order.predecessors.push((e.aggregate_id, e.version - 1));
            }
            Some(&v) if check == OrderCheck::Probed && e.version > v + 1 => {}
            // A gap: the missing version comes later.
            Some(&v) if e.version > v + 1 => {
                order
                    .in_batch
                    .get_or_insert((e.aggregate_id, e.version, v + 1));
            }
            // An earlier version after a later one.
            Some(&v) if e.version <= v => {
                order.in_batch.get_or_insert((e.aggregate_id, v, e.version));
            }
            Some(_) => {}
            None if e.version > 1 && check != OrderCheck::Probed => {
                order.predecessors.push((e.aggregate_id, e.version - 1))
            }
            None => {}
        }
        last.insert(e.aggregate_id, e.version);
    }
    order
}

/// Gives a connection back to `source`, if a rollback left one.
fn give_back(source: &dyn ConnectionSource, conn: Option<Box<dyn Connection>>) {
    if let Some(conn) = conn {
        source.give_back(conn);
    }
}

/// `future`'s output, unless `limit` passes first.
async fn within<R: Runtime, F: std::future::Future>(
    rt: &R,
    limit: Duration,
    future: F,
) -> Option<F::Output> {
    let future = std::pin::pin!(future);
    let timer = std::pin::pin!(rt.sleep(limit));
    match futures_util::future::select(future, timer).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(_) => None,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(aggregate_id: Uuid, version: u32) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::now_v7(),
            aggregate_id,
            aggregate_type: "t".to_owned(),
            event_type: "E".to_owned(),
            event_data: serde_json::json!({}),
            metadata: chronicle_core::Metadata::default(),
            version,
            timestamp: chrono::Utc::now(),
            encrypted_fields: Vec::new(),
            position: Position::START,
        }
    }

    #[test]
    fn consecutive_versions_pass_and_name_their_predecessors() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let none = AggregateMap::default();
        let order = batch_order(
            &[event(a, 1), event(b, 4), event(a, 2), event(b, 5)],
            &none,
            OrderCheck::Consecutive,
        );
        assert_eq!(order.in_batch, None);
        assert_eq!(
            order.predecessors,
            [(b, 3)],
            "b's version 3 must be handled already"
        );
    }

    #[test]
    fn a_gap_or_a_step_back_is_a_violation() {
        let a = Uuid::now_v7();
        let none = AggregateMap::default();
        let gap = batch_order(&[event(a, 1), event(a, 3)], &none, OrderCheck::Consecutive);
        assert_eq!(gap.in_batch, Some((a, 3, 2)));
        let back = batch_order(&[event(a, 2), event(a, 1)], &none, OrderCheck::Consecutive);
        assert_eq!(back.in_batch, Some((a, 2, 1)));
        assert_eq!(back.predecessors, [(a, 1)]);
        let repeat = batch_order(&[event(a, 1), event(a, 1)], &none, OrderCheck::Consecutive);
        assert_eq!(repeat.in_batch, Some((a, 1, 1)));
    }

    #[test]
    fn versions_met_in_earlier_batches_need_no_lookup() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let seen: AggregateMap<u32> = [(a, 3), (b, 7)].into_iter().collect();
        let order = batch_order(
            &[event(a, 4), event(b, 8), event(c, 2), event(a, 5)],
            &seen,
            OrderCheck::Consecutive,
        );
        assert_eq!(order.in_batch, None);
        assert_eq!(order.predecessors, [(c, 1)], "only c was never met");
        let skipped = batch_order(&[event(b, 9)], &seen, OrderCheck::Consecutive);
        assert_eq!(
            skipped.in_batch,
            Some((b, 9, 8)),
            "b's version 8 never came"
        );
        let again = batch_order(&[event(a, 3)], &seen, OrderCheck::Consecutive);
        assert_eq!(again.in_batch, Some((a, 3, 3)), "a's version 3 came before");
    }

    #[test]
    fn a_subscription_skips_versions_and_looks_the_skipped_one_up() {
        let a = Uuid::now_v7();
        let seen: AggregateMap<u32> = [(a, 2)].into_iter().collect();
        let order = batch_order(
            &[event(a, 5), event(a, 6), event(a, 9)],
            &seen,
            OrderCheck::Gaps,
        );
        assert_eq!(order.in_batch, None);
        assert_eq!(
            order.predecessors,
            [(a, 4), (a, 8)],
            "versions 4 and 8 must come before 5 and 9"
        );
        let back = batch_order(&[event(a, 2)], &seen, OrderCheck::Gaps);
        assert_eq!(back.in_batch, Some((a, 2, 2)), "still never a step back");
        let probed = batch_order(&[event(a, 5), event(a, 9)], &seen, OrderCheck::Probed);
        assert_eq!(
            probed,
            BatchOrder::default(),
            "the window statement looked them up"
        );
        let back = batch_order(&[event(a, 9), event(a, 5)], &seen, OrderCheck::Probed);
        assert_eq!(back.in_batch, Some((a, 9, 5)));
    }

    #[test]
    fn impossible_options_are_refused() {
        let bad = [
            ProjectionOptions {
                partitions: 0,
                ..ProjectionOptions::default()
            },
            ProjectionOptions {
                batch_size: 0,
                ..ProjectionOptions::default()
            },
            ProjectionOptions {
                lease_ttl: Duration::ZERO,
                ..ProjectionOptions::default()
            },
            ProjectionOptions {
                handler_timeout: Duration::ZERO,
                ..ProjectionOptions::default()
            },
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
        assert!(ProjectionOptions::default().validate().is_ok());
    }
}
