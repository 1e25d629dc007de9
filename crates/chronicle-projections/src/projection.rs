//! [`PgProjection`]: one projection on a PostgreSQL pool, run by tokio:
//! the portable [`ProjectionStep`] with a pool, timers and the operator's
//! work (state, pause, rebuild, blue/green).

use std::sync::Arc;
use std::time::Duration;

use chronicle_core::{
    AlertSink, HealthStatus, Position, ProjectionHandler, ProjectionResult, ProjectionState,
    ProjectionStatus, Subscription,
};
use chronicle_postgres::PgPool;
use chronicle_sql::{Connection, Xid8};
use chronicle_step::{
    Applied, ConnectionSource, ProjectionOptions, ProjectionStep, Runtime, StepOutcome,
};
use futures_util::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::{Error, PgContext, Result};

/// Tokio's timers and the thread's random numbers: the [`Runtime`] native
/// runners give the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn sleep(&self, duration: Duration) -> impl std::future::Future<Output = ()> {
        tokio::time::sleep(duration)
    }

    fn random(&self) -> f64 {
        rand::random()
    }
}

/// A deadpool pool as the step's [`ConnectionSource`]: a connection per
/// transaction, back to the pool after it.
#[derive(Clone)]
pub struct PoolSource(pub PgPool);

impl std::fmt::Debug for PoolSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PoolSource").finish_non_exhaustive()
    }
}

impl ConnectionSource for PoolSource {
    fn acquire(&self) -> BoxFuture<'_, chronicle_step::Result<Box<dyn Connection>>> {
        Box::pin(async move {
            let conn = self.0.get().await?;
            Ok(Box::new(conn) as Box<dyn Connection>)
        })
    }
}

/// One projection on a PostgreSQL pool: the portable [`ProjectionStep`]
/// (what every adapter runs), looped here by tokio, with what an operator
/// does to it: state and health, pause and resume, rebuild in place or
/// blue/green, dead-letter replays.
///
/// [`PgProjection::step`] runs one step on a pooled connection;
/// [`crate::Runner`] loops it for every partition.
pub struct PgProjection {
    source: PoolSource,
    portable: ProjectionStep,
}

impl std::fmt::Debug for PgProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProjection")
            .field("step", &self.portable)
            .finish_non_exhaustive()
    }
}

impl PgProjection {
    /// A projection running `handler` on `pool` (migrated to the
    /// projection tables). Call [`PgProjection::register`] once before
    /// stepping (the runner does).
    pub fn new(
        pool: PgPool,
        handler: impl ProjectionHandler<PgContext> + 'static,
        options: ProjectionOptions,
    ) -> Result<Self> {
        Ok(PgProjection {
            source: PoolSource(pool),
            portable: ProjectionStep::new(handler, options)?,
        })
    }

    /// Sends alerts to `sink` instead of the log
    /// ([`crate::LogAlertSink`], the default).
    pub fn with_alerts(mut self, sink: impl AlertSink + 'static) -> Self {
        self.portable = self.portable.with_alerts(sink);
        self
    }

    /// Keeps the read model in its own PostgreSQL schema (see
    /// [`ProjectionStep::with_read_model_schema`]): what
    /// [`PgProjection::rebuild_blue_green`] builds anew and swaps.
    ///
    /// ```no_run
    /// # fn demo(pool: chronicle_postgres::PgPool, handler: impl chronicle_core::ProjectionHandler<chronicle_projections::PgContext> + 'static) -> chronicle_projections::Result<()> {
    /// use chronicle_projections::{PgProjection, ProjectionOptions};
    ///
    /// let projection = PgProjection::new(pool, handler, ProjectionOptions::default())?
    ///     .with_read_model_schema("user_profile")?;
    /// # Ok(()) }
    /// ```
    pub fn with_read_model_schema(mut self, schema: &str) -> Result<Self> {
        self.portable = self.portable.with_read_model_schema(schema)?;
        Ok(self)
    }

    /// The read model's schema, if it has its own.
    pub fn read_model_schema(&self) -> Option<&str> {
        self.portable.read_model_schema()
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        self.portable.name()
    }

    /// The options.
    pub fn options(&self) -> &ProjectionOptions {
        self.portable.options()
    }

    /// The events this projection consumes: the options' subscription, else
    /// the handler's.
    pub fn subscription(&self) -> &Subscription {
        self.portable.subscription()
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.source.0
    }

    /// The portable step this projection runs.
    pub fn portable(&self) -> &ProjectionStep {
        &self.portable
    }

    /// Creates the projection's partition rows if missing (idempotent),
    /// recording its subscription ([`ProjectionStep::register`]).
    pub async fn register(&self) -> Result<()> {
        self.portable.register(&self.source).await
    }

    /// Runs one step on `partition` as `worker` on a pooled connection
    /// ([`ProjectionStep::step`]).
    pub async fn step(&self, partition: u32, worker: &str) -> Result<StepOutcome> {
        self.portable
            .step(&self.source, partition, worker, &TokioRuntime)
            .await
    }

    /// Gives `partition`'s lease up if `worker` holds it; returns whether
    /// it did.
    pub async fn release(&self, partition: u32, worker: &str) -> Result<bool> {
        self.portable.release(&self.source, partition, worker).await
    }

    /// Opens a transaction for the handler outside a step (a dead-letter
    /// replay): the read model's schema first on the search path.
    pub(crate) async fn context(&self, partition: Option<u32>, worker: &str) -> Result<PgContext> {
        let conn = self.source.acquire().await?;
        self.portable.context(conn, partition, worker).await
    }

    /// Applies `event` with the retry policy in `ctx` ([`ProjectionStep::apply`]).
    pub(crate) async fn apply(
        &self,
        ctx: &mut PgContext,
        event: &chronicle_core::EventEnvelope,
        first: Option<ProjectionResult>,
    ) -> Result<Applied> {
        self.portable.apply(ctx, event, first, &TokioRuntime).await
    }

    /// Every partition's state (the spec's `getProjectionState()`).
    pub async fn state(&self) -> Result<Vec<ProjectionState>> {
        crate::state::load(self.pool(), Some(self.portable.name())).await
    }

    /// Health and lag from the state table and the dead-letter queue.
    pub async fn health(&self) -> Result<HealthStatus> {
        crate::state::health(
            self.pool(),
            self.portable.name(),
            self.portable.options().lag_alert_after,
        )
        .await
    }

    /// Stops processing (status `paused`) until [`PgProjection::resume`].
    pub async fn pause(&self) -> Result<()> {
        self.set_status(ProjectionStatus::Paused).await
    }

    /// Resumes a paused, stopped or failed projection (status `running`).
    /// A rebuild stopped by a failure continues as a normal run (failures
    /// dead-letter again); call [`PgProjection::rebuild`] again to replay
    /// under the rebuild's rules.
    pub async fn resume(&self) -> Result<()> {
        self.set_status(ProjectionStatus::Running).await
    }

    async fn set_status(&self, status: ProjectionStatus) -> Result<()> {
        let client = self.pool().get().await?;
        let n = client
            .execute_typed(
                "UPDATE projection_state SET status = $2, updated_at = now() WHERE projection = $1",
                &[
                    (&self.portable.name(), Type::TEXT),
                    (&status.as_str(), Type::TEXT),
                ],
            )
            .await?;
        if n == 0 {
            return Err(Error::NotRegistered(self.portable.name().to_owned()));
        }
        Ok(())
    }

    /// Replays the history after `from` ([`Position::START`]: all of it):
    /// in one transaction, waits for running steps, calls the handler's
    /// [`ProjectionHandler::rebuild`] hook, resets every partition's
    /// checkpoint to `from` with status `rebuilding`, and drops the dead
    /// letters after `from` (they will be met again). Workers then replay;
    /// a failure during the replay stops it (status `failed`) instead of
    /// dead-lettering, and each partition returns to `running` when caught
    /// up.
    ///
    /// The projection is registered first if it is not, and the rebuild
    /// records its subscription: this is how a changed subscription is
    /// taken ([`Error::SubscriptionChanged`]).
    pub async fn rebuild(&self, from: Position) -> Result<()> {
        self.portable.register_for_rebuild(&self.source).await?;
        let mut ctx = self.context(None, "rebuild").await?;
        let result = self.rebuild_in(&mut ctx, from).await;
        match result {
            Ok(()) => ctx.commit().await.map(drop),
            Err(e) => {
                ctx.rollback().await;
                Err(e)
            }
        }
    }

    async fn rebuild_in(&self, ctx: &mut PgContext, from: Position) -> Result<()> {
        let locked = ctx
            .client()
            .query_typed(
                "SELECT partition FROM projection_state WHERE projection = $1 FOR UPDATE",
                &[(&self.portable.name(), Type::TEXT)],
            )
            .await?;
        if locked.is_empty() {
            return Err(Error::NotRegistered(self.portable.name().to_owned()));
        }
        self.portable
            .handler()
            .rebuild(ctx, from)
            .await
            .map_err(|e| Error::RebuildHook {
                projection: self.portable.name().to_owned(),
                reason: e.to_string(),
            })?;
        ctx.client()
            .execute_typed(
                "UPDATE projection_state
                    SET checkpoint_xid = $2, checkpoint_position = $3, status = 'rebuilding',
                        subscription = $4, last_error = NULL, updated_at = now()
                  WHERE projection = $1",
                &[
                    (&self.portable.name(), Type::TEXT),
                    (&Xid8(from.transaction_id), Type::XID8),
                    (&from.global_position, Type::INT8),
                    (self.portable.stored_subscription(), Type::JSONB),
                ],
            )
            .await?;
        ctx.client()
            .execute_typed(
                "DELETE FROM projection_dead_letters
                  WHERE projection = $1 AND (transaction_id, global_position) > ($2, $3)",
                &[
                    (&self.portable.name(), Type::TEXT),
                    (&Xid8(from.transaction_id), Type::XID8),
                    (&from.global_position, Type::INT8),
                ],
            )
            .await?;
        Ok(())
    }

    /// Rebuilds the read model beside the live one and swaps it in when
    /// it has caught up, so readers never see a half-built model (blue/green).
    ///
    /// Needs the read model in its own schema
    /// ([`PgProjection::with_read_model_schema`]). In order:
    ///
    /// 1. creates the schema `<schema>__next` (dropping a leftover of an
    ///    earlier attempt), runs `setup_sql` and the handler's
    ///    [`ProjectionHandler::rebuild`] hook in it, and registers a shadow
    ///    projection `<name>~next` at `from` with status `rebuilding`;
    /// 2. replays the history into it, partition by partition, while the
    ///    live projection keeps running and serving; `progress` gets the
    ///    events replayed so far after every step. A failure stops the
    ///    rebuild (nothing is dead-lettered) and leaves the live model as
    ///    it was;
    /// 3. when every shadow partition has caught up, in one transaction
    ///    that waits for running live steps: renames the live schema away
    ///    and `<schema>__next` to `<schema>`, drops the old one, moves the
    ///    shadow's checkpoints and dead letters to the projection, and
    ///    removes the shadow. Live workers continue from the shadow's
    ///    checkpoints, into the new model.
    pub async fn rebuild_blue_green(
        &self,
        from: Position,
        setup_sql: &str,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<BlueGreenReport> {
        let Some(schema) = self.portable.read_model_schema().map(str::to_owned) else {
            return Err(Error::Config {
                option: "read_model_schema",
                reason: format!(
                    "a blue/green rebuild of `{}` needs its read model in a schema of its own; \
                     register it with one (with_read_model_schema) or rebuild in place",
                    self.portable.name()
                ),
            });
        };
        // The live model keeps its subscription until the swap.
        self.portable.register_for_rebuild(&self.source).await?;
        let started = std::time::Instant::now();
        let next = format!("{schema}__next");
        let shadow = PgProjection {
            source: self.source.clone(),
            portable: self
                .portable
                .shadow(&format!("{}~next", self.portable.name()), &next)?,
        };

        // 1. The empty model and the shadow's partitions.
        let mut ctx = shadow.context(None, "blue-green").await?;
        let prepared = async {
            ctx.exec(&format!(
                "DROP SCHEMA IF EXISTS {next} CASCADE; CREATE SCHEMA {next}"
            ))
            .await?;
            for table in ["projection_dead_letters", "projection_state"] {
                ctx.client()
                    .execute_typed(
                        &format!("DELETE FROM {table} WHERE projection = $1"),
                        &[(&shadow.portable.name(), Type::TEXT)],
                    )
                    .await?;
            }
            ctx.client()
                .execute_typed(
                    "INSERT INTO projection_state
                            (projection, partition, partitions, checkpoint_xid, checkpoint_position, status,
                             subscription)
                     SELECT $1, g, $2, $3, $4, 'rebuilding', $5 FROM generate_series(0, $2 - 1) AS g",
                    &[
                        (&shadow.portable.name(), Type::TEXT),
                        (&(self.portable.options().partitions as i32), Type::INT4),
                        (&Xid8(from.transaction_id), Type::XID8),
                        (&from.global_position, Type::INT8),
                        (self.portable.stored_subscription(), Type::JSONB),
                    ],
                )
                .await?;
            if !setup_sql.trim().is_empty() {
                ctx.exec(setup_sql).await?;
            }
            self.portable.handler()
                .rebuild(&mut ctx, from)
                .await
                .map_err(|e| Error::RebuildHook {
                    projection: shadow.portable.name().to_owned(),
                    reason: e.to_string(),
                })
        }
        .await;
        match prepared {
            Ok(()) => drop(ctx.commit().await?),
            Err(e) => {
                ctx.rollback().await;
                return Err(e);
            }
        }

        // 2. Replay; every partition at once.
        let worker = format!("blue-green-{}", Uuid::now_v7().simple());
        let mut replayed = 0u64;
        let mut done = vec![false; self.portable.options().partitions as usize];
        while done.iter().any(|d| !d) {
            let steps = (0..self.portable.options().partitions)
                .filter(|p| !done[*p as usize])
                .map(|p| {
                    let (shadow, worker) = (&shadow, &worker);
                    async move { (p, shadow.step(p, worker).await) }
                });
            let mut idle = true;
            for (p, outcome) in futures_util::future::join_all(steps).await {
                let outcome = outcome.map_err(|e| match e {
                    Error::RebuildFailed {
                        event_id, reason, ..
                    } => Error::BlueGreenStopped {
                        projection: self.portable.name().to_owned(),
                        event_id,
                        reason,
                    },
                    other => other,
                })?;
                replayed += u64::from(outcome.handled);
                idle &= !outcome.claimed;
                done[p as usize] = outcome.claimed
                    && outcome.caught_up
                    && outcome.status == Some(ProjectionStatus::Running);
            }
            progress(replayed);
            if idle {
                // Another process holds a shadow partition's lease.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // 3. The swap.
        let conn = self.source.acquire().await?;
        let ctx = PgContext::begin(
            conn,
            Arc::from(self.portable.name()),
            None,
            Arc::from(worker),
        )
        .await?;
        let swapped = self.swap_in(&ctx, &shadow, &schema, &next).await;
        match swapped {
            Ok(()) => drop(ctx.commit().await?),
            Err(e) => {
                ctx.rollback().await;
                return Err(e);
            }
        }
        Ok(BlueGreenReport {
            replayed,
            elapsed: started.elapsed(),
        })
    }

    async fn swap_in(
        &self,
        ctx: &PgContext,
        shadow: &PgProjection,
        schema: &str,
        next: &str,
    ) -> Result<()> {
        let client = ctx.client();
        let rows = client
            .query_typed(
                "SELECT projection, status FROM projection_state
                  WHERE projection = $1 OR projection = $2
                  ORDER BY projection, partition FOR UPDATE",
                &[
                    (&self.portable.name(), Type::TEXT),
                    (&shadow.portable.name(), Type::TEXT),
                ],
            )
            .await?;
        if let Some(row) = rows.iter().find(|r| {
            r.get::<_, &str>(0) == shadow.portable.name() && r.get::<_, &str>(1) != "running"
        }) {
            return Err(Error::Config {
                option: "rebuild",
                reason: format!(
                    "the new model of `{}` is {} instead of caught up (another process paused or \
                     failed it); the live model is unchanged: run the blue/green rebuild again",
                    self.portable.name(),
                    row.get::<_, &str>(1)
                ),
            });
        }
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE;
                 ALTER SCHEMA {next} RENAME TO {schema};"
            ))
            .await?;
        let (live_name, new_name): (&str, &str) = (self.portable.name(), shadow.portable.name());
        let live: (&(dyn ToSql + Sync), Type) = (&live_name, Type::TEXT);
        let new: (&(dyn ToSql + Sync), Type) = (&new_name, Type::TEXT);
        client
            .execute_typed(
                "UPDATE projection_state l
                    SET checkpoint_xid = s.checkpoint_xid, checkpoint_position = s.checkpoint_position,
                        subscription = s.subscription,
                        status = 'running', lag_events = s.lag_events, lag_seconds = s.lag_seconds,
                        lag_counted_at = s.lag_counted_at, last_error = NULL, updated_at = now()
                   FROM projection_state s
                  WHERE l.projection = $1 AND s.projection = $2 AND s.partition = l.partition",
                &[live.clone(), new.clone()],
            )
            .await?;
        client
            .execute_typed(
                "DELETE FROM projection_dead_letters WHERE projection = $1",
                std::slice::from_ref(&live),
            )
            .await?;
        client
            .execute_typed(
                "UPDATE projection_dead_letters SET projection = $1 WHERE projection = $2",
                &[live.clone(), new.clone()],
            )
            .await?;
        client
            .execute_typed(
                "DELETE FROM projection_state WHERE projection = $1",
                std::slice::from_ref(&new),
            )
            .await?;
        Ok(())
    }
}

/// What a [`PgProjection::rebuild_blue_green`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BlueGreenReport {
    /// Events replayed into the new model before the swap.
    pub replayed: u64,
    /// How long the rebuild took, swap included.
    pub elapsed: Duration,
}
