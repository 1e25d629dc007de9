//! [`Runner`]: loops the step over every partition in tokio tasks, and
//! [`LocalAdapter`], the in-process [`ProjectionAdapter`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{
    Alert, BoxError, DeploymentResult, HealthStatus, ProjectionAdapter, ProjectionHandler,
};
use chronicle_postgres::{Listener, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{PgContext, PgProjection, ProjectionOptions, Result};

/// How a [`Runner`] polls and how many partitions it holds.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// This worker's id, recorded as the lease owner (default: host name,
    /// process id and a random suffix).
    pub worker_id: String,
    /// How long a caught-up or unclaimed partition waits before polling
    /// again (default 250 ms). Polling is the truth: nothing relies on a
    /// session. A partition whose worker died is taken over at the first
    /// poll after its lease expires, so takeover takes at most
    /// [`ProjectionOptions::lease_ttl`] plus this.
    pub poll_interval: Duration,
    /// How often the leases this worker holds are renewed besides its
    /// steps (default `None`: a third of [`ProjectionOptions::lease_ttl`],
    /// 10 s for the default lease), so a lease outlives a long wait or a
    /// long step. Must be at most a third of the lease: a renewal can be late by a slow
    /// database round trip, and a lease that lapses while its worker lives
    /// lets another worker step the partition too (the steps stay
    /// serialized by the partition's row lock, but the work is split for
    /// no reason).
    pub heartbeat_interval: Option<Duration>,
    /// How long to wait after a failed step (default 1 s).
    pub error_backoff: Duration,
    /// The most partitions this worker holds at once (default: all), so
    /// several workers can split a projection.
    pub max_partitions: usize,
    /// Wake-ups on appends (default none: poll only). With one, a
    /// caught-up partition steps as soon as an append commits instead of
    /// at its next poll (appends notify once the events table's
    /// `chronicle_events_notify` trigger is enabled); open it with
    /// `PgOptions::listen(chronicle_postgres::EVENTS_CHANNEL)` on a direct
    /// connection (a transaction-mode pooler does not deliver
    /// notifications; polling still works through one).
    pub listener: Option<Listener>,
}

impl RunnerOptions {
    /// Checks these options against the lease they renew: a poll interval
    /// above zero, and a heartbeat interval, when given, above zero and at
    /// most a third of `lease_ttl`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chronicle_projections::RunnerOptions;
    ///
    /// let options = RunnerOptions {
    ///     heartbeat_interval: Some(Duration::from_secs(20)),
    ///     ..RunnerOptions::default()
    /// };
    /// assert!(options.validate(Duration::from_secs(30)).is_err());
    /// assert!(options.validate(Duration::from_secs(60)).is_ok());
    /// ```
    pub fn validate(&self, lease_ttl: Duration) -> Result<()> {
        let bad = |option, reason: String| Err(crate::Error::Config { option, reason });
        if self.poll_interval.is_zero() {
            return bad("poll_interval", "must be more than zero".to_owned());
        }
        let Some(heartbeat) = self.heartbeat_interval else {
            return Ok(());
        };
        if heartbeat.is_zero() {
            return bad("heartbeat_interval", "must be more than zero".to_owned());
        }
        if heartbeat * 3 > lease_ttl {
            return bad(
                "heartbeat_interval",
                format!(
                    "is {:?}, but must be at most a third of the lease ({lease_ttl:?}), so that \
                     a late renewal does not let the lease lapse; shorten it or lengthen the lease",
                    heartbeat
                ),
            );
        }
        Ok(())
    }
}

impl Default for RunnerOptions {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
        RunnerOptions {
            worker_id: format!(
                "{host}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            poll_interval: Duration::from_millis(250),
            heartbeat_interval: None,
            error_backoff: Duration::from_secs(1),
            max_partitions: usize::MAX,
            listener: None,
        }
    }
}

/// Runs a projection in this process: one tokio task per partition, each
/// looping [`PgProjection::step`] while it can claim the partition's lease.
/// Dropping a runner stops it as [`Runner::stop`] does, without waiting.
///
/// ```no_run
/// # async fn demo(projection: chronicle_projections::PgProjection) -> chronicle_projections::Result<()> {
/// use std::sync::Arc;
/// use chronicle_projections::{Runner, RunnerOptions};
///
/// let runner = Runner::start(Arc::new(projection), RunnerOptions::default()).await?;
/// // ... until shutdown:
/// runner.stop().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Runner {
    projection: Arc<PgProjection>,
    worker_id: Arc<str>,
    stop: watch::Sender<bool>,
    limit: Arc<AtomicUsize>,
    owned: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
    heartbeat: JoinHandle<()>,
}

impl Runner {
    /// Checks the options ([`RunnerOptions::validate`]), registers the
    /// projection (idempotent) and starts its partition tasks and the
    /// heartbeat that renews the leases it holds.
    pub async fn start(projection: Arc<PgProjection>, options: RunnerOptions) -> Result<Runner> {
        options.validate(projection.options().lease_ttl)?;
        projection.register().await?;
        let (stop, stopped) = watch::channel(false);
        let worker_id: Arc<str> = Arc::from(options.worker_id.as_str());
        let limit = Arc::new(AtomicUsize::new(options.max_partitions));
        let held = Arc::new(AtomicUsize::new(0));
        let owned = Arc::new(AtomicUsize::new(0));
        let tasks = (0..projection.options().partitions)
            .map(|partition| {
                let task = PartitionTask {
                    projection: projection.clone(),
                    partition,
                    worker_id: worker_id.clone(),
                    options: options.clone(),
                    limit: limit.clone(),
                    held: held.clone(),
                    owned: owned.clone(),
                    stopped: stopped.clone(),
                    recheck: 0,
                };
                tokio::spawn(task.run())
            })
            .collect();
        let heartbeat = tokio::spawn(heartbeat(
            projection.clone(),
            worker_id.clone(),
            options
                .heartbeat_interval
                .unwrap_or(projection.options().lease_ttl / 3),
            stopped,
        ));
        Ok(Runner {
            projection,
            worker_id,
            stop,
            limit,
            owned,
            tasks,
            heartbeat,
        })
    }

    /// This worker's id (the lease owner).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The projection run.
    pub fn projection(&self) -> &Arc<PgProjection> {
        &self.projection
    }

    /// How many partitions this worker holds now.
    pub fn held_partitions(&self) -> usize {
        self.owned.load(Ordering::SeqCst)
    }

    /// Changes the most partitions this worker holds, live: partitions over
    /// the limit are released after their current step commits, so no work
    /// is lost or done twice.
    pub fn scale(&self, max_partitions: usize) {
        self.limit.store(max_partitions, Ordering::SeqCst);
    }

    /// Stops after the current steps commit and releases the leases.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.heartbeat.await;
    }

    /// Stops within `grace`: no partition is claimed any more, the steps
    /// under way commit and their leases are released; steps still under
    /// way when `grace` runs out are cancelled (their transactions roll
    /// back: the connections are closed) and their leases released all the
    /// same. Returns whether every step ended within `grace`.
    ///
    /// ```no_run
    /// # async fn demo(runner: chronicle_projections::Runner) {
    /// use std::time::Duration;
    ///
    /// if !runner.shutdown(Duration::from_secs(10)).await {
    ///     eprintln!("a step was rolled back; its events are handled again by the next worker");
    /// }
    /// # }
    /// ```
    pub async fn shutdown(self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let mut finished = true;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                finished = false;
            }
        }
        let _ = self.heartbeat.await;
        if !finished {
            // The cancelled tasks did not release their partitions.
            for partition in 0..self.projection.options().partitions {
                if let Err(e) = self.projection.release(partition, &self.worker_id).await {
                    tracing::warn!(partition, error = %e, "could not release a lease; it expires on its own");
                }
            }
        }
        finished
    }

    /// Stops at once without releasing anything, as a crashed worker
    /// would: open transactions are rolled back (their connections are
    /// closed) and the leases stay until they expire.
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.heartbeat.abort();
    }
}

/// Renews every live lease `worker` holds on `projection` each `interval`
/// until stopped. A partition whose step is under way is skipped (its row
/// is locked, and its commit renews the lease).
async fn heartbeat(
    projection: Arc<PgProjection>,
    worker: Arc<str>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let ttl = projection.options().lease_ttl.as_secs_f64();
    let mut stalled_before: Vec<u32> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = stopped.changed() => if changed.is_err() || *stopped.borrow() { return },
        }
        let renewed = async {
            let client = projection.pool().get().await?;
            client
                .execute_typed(
                    "UPDATE projection_state s
                        SET heartbeat = now(), lease_expires_at = now() + make_interval(secs => $3)
                       FROM (SELECT projection, partition FROM projection_state
                              WHERE projection = $1 AND owner = $2 AND lease_expires_at > now()
                                FOR UPDATE SKIP LOCKED) c
                      WHERE s.projection = c.projection AND s.partition = c.partition",
                    &[
                        (&projection.name(), tokio_postgres::types::Type::TEXT),
                        (&&*worker, tokio_postgres::types::Type::TEXT),
                        (&ttl, tokio_postgres::types::Type::FLOAT8),
                    ],
                )
                .await?;
            Ok::<_, crate::Error>(())
        };
        if let Err(e) = renewed.await {
            tracing::warn!(projection = projection.name(), error = %e, "could not renew the leases; retrying at the next heartbeat");
        }
        stalled_before = alert_stalled(&projection, &stalled_before).await;
    }
}

/// Raises [`Alert::Stalled`] for each partition of `projection` that is
/// stalled now and was at the last heartbeat too (a takeover within one
/// beat raises nothing); returns the partitions stalled now.
async fn alert_stalled(projection: &PgProjection, before: &[u32]) -> Vec<u32> {
    let states = match projection.state().await {
        Ok(states) => states,
        Err(e) => {
            tracing::debug!(projection = projection.name(), error = %e, "could not read the partitions' state");
            return Vec::new();
        }
    };
    let stalled: Vec<_> = states.into_iter().filter(|p| p.stalled).collect();
    let alerts: Vec<Alert> = stalled
        .iter()
        .filter(|p| before.contains(&p.partition))
        .map(|p| Alert::Stalled {
            projection: p.projection.clone(),
            partition: p.partition,
            lag_events: p.lag_events,
            last_owner: p.owner.clone(),
        })
        .collect();
    projection.portable().send_alerts(&alerts).await;
    stalled.iter().map(|p| p.partition).collect()
}

struct PartitionTask {
    projection: Arc<PgProjection>,
    partition: u32,
    worker_id: Arc<str>,
    options: RunnerOptions,
    limit: Arc<AtomicUsize>,
    /// Partitions held plus partitions being tried (for the limit).
    held: Arc<AtomicUsize>,
    /// Partitions held (for reporting).
    owned: Arc<AtomicUsize>,
    stopped: watch::Receiver<bool>,
    /// Quick looks left after a notification (see `wait_for_events`).
    recheck: u32,
}

/// Quick looks after a notification whose step found nothing: 10 ms,
/// doubling, about 2.5 s in all.
const RECHECKS: u32 = 8;
const RECHECK_FIRST: Duration = Duration::from_millis(10);

impl PartitionTask {
    async fn run(mut self) {
        let mut holding = false;
        loop {
            if self.stopping() {
                break;
            }
            let limit = self.limit.load(Ordering::SeqCst);
            if holding {
                // Scaled down: give this partition up if over the limit.
                let over = self
                    .owned
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n > limit).then(|| n - 1)
                    })
                    .is_ok();
                if over {
                    holding = false;
                    self.held.fetch_sub(1, Ordering::SeqCst);
                    self.release().await;
                    continue;
                }
            } else if self.held.fetch_add(1, Ordering::SeqCst) >= limit {
                self.held.fetch_sub(1, Ordering::SeqCst);
                self.pause(self.options.poll_interval).await;
                continue;
            }
            // From here this task counts in `held`.
            let started = std::time::Instant::now();
            match self.projection.step(self.partition, &self.worker_id).await {
                Ok(outcome) if outcome.claimed => {
                    crate::metrics::record_step(
                        self.projection.name(),
                        self.partition,
                        &outcome,
                        started.elapsed(),
                    );
                    if !holding {
                        self.owned.fetch_add(1, Ordering::SeqCst);
                    }
                    holding = true;
                    if outcome.caught_up {
                        // The feed moved (this partition's events or
                        // another's): the notified append is visible, so
                        // no more quick looks for it in any partition.
                        if outcome.saw_feed {
                            self.recheck = 0;
                        }
                        self.wait_for_events().await;
                    }
                }
                Ok(_) => {
                    if holding {
                        self.owned.fetch_sub(1, Ordering::SeqCst);
                    }
                    holding = false;
                    self.held.fetch_sub(1, Ordering::SeqCst);
                    self.pause(self.options.poll_interval).await;
                }
                Err(e @ crate::Error::SubscriptionChanged { .. }) => {
                    // Rebuilt from other events by another process: this
                    // handler must not write into that model.
                    tracing::error!(
                        projection = self.projection.name(),
                        partition = self.partition,
                        error = %e,
                        "projection worker stopped"
                    );
                    if !holding {
                        self.held.fetch_sub(1, Ordering::SeqCst);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        partition = self.partition,
                        error = %e,
                        "projection step failed; retrying after a pause"
                    );
                    if !holding {
                        self.held.fetch_sub(1, Ordering::SeqCst);
                    }
                    self.pause(self.options.error_backoff).await;
                }
            }
        }
        if holding {
            self.held.fetch_sub(1, Ordering::SeqCst);
            self.owned.fetch_sub(1, Ordering::SeqCst);
            self.release().await;
        }
    }

    async fn release(&self) {
        if let Err(e) = self
            .projection
            .release(self.partition, &self.worker_id)
            .await
        {
            tracing::warn!(partition = self.partition, error = %e, "could not release a lease; it expires on its own");
        }
    }

    /// Stop was asked for, or the [`Runner`] was dropped.
    fn stopping(&self) -> bool {
        *self.stopped.borrow() || self.stopped.has_changed().is_err()
    }

    /// Waits for the next append's notification, at most the poll
    /// interval. After a notification whose step found no new feed rows (the
    /// append's transaction is still above the feed's horizon, held back by
    /// another open transaction), looks again soon, backing off, before
    /// waiting for the next notification.
    async fn wait_for_events(&mut self) {
        let Some(mut listener) = self.options.listener.take() else {
            return self.pause(self.options.poll_interval).await;
        };
        if self.recheck > 0 {
            let delay = RECHECK_FIRST * 2u32.pow(RECHECKS - self.recheck);
            self.recheck -= 1;
            self.pause(delay.min(self.options.poll_interval)).await;
        } else if !self.stopping() {
            tokio::select! {
                _ = listener.notified() => self.recheck = RECHECKS,
                _ = tokio::time::sleep(self.options.poll_interval) => {}
                _ = self.stopped.changed() => {}
            }
        }
        self.options.listener = Some(listener);
    }

    async fn pause(&mut self, delay: Duration) {
        if self.stopping() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.stopped.changed() => {}
        }
    }
}

/// The in-process [`ProjectionAdapter`]: `deploy` starts a [`Runner`]
/// (replacing the projection's running one, after its current steps,
/// when it is deployed already), `scale` changes how many partitions it
/// holds, `monitor` reads health and lag from `projection_state`,
/// `undeploy` stops it.
pub struct LocalAdapter {
    pool: PgPool,
    options: ProjectionOptions,
    runner: RunnerOptions,
    schemas: HashMap<String, String>,
    running: Mutex<HashMap<String, Runner>>,
}

impl std::fmt::Debug for LocalAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAdapter")
            .field("options", &self.options)
            .field("runner", &self.runner)
            .finish_non_exhaustive()
    }
}

impl LocalAdapter {
    /// An adapter deploying projections on `pool` with these options.
    pub fn new(pool: PgPool, options: ProjectionOptions, runner: RunnerOptions) -> Self {
        LocalAdapter {
            pool,
            options,
            runner,
            schemas: HashMap::new(),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Deploys `projection` with its read model in `schema`
    /// ([`PgProjection::with_read_model_schema`]).
    pub fn with_read_model_schema(mut self, projection: &str, schema: &str) -> Self {
        self.schemas
            .insert(projection.to_owned(), schema.to_owned());
        self
    }

    /// Stops a deployed projection (after its current steps commit);
    /// returns whether it was running.
    pub async fn stop(&self, projection: &str) -> bool {
        let runner = self
            .running
            .lock()
            .expect("adapter lock")
            .remove(projection);
        match runner {
            Some(runner) => {
                runner.stop().await;
                true
            }
            None => false,
        }
    }

    fn with_runner<T>(
        &self,
        projection: &str,
        f: impl FnOnce(&Runner) -> T,
    ) -> Result<T, BoxError> {
        let running = self.running.lock().expect("adapter lock");
        let runner = running
            .get(projection)
            .ok_or_else(|| format!("projection `{projection}` is not deployed here"))?;
        Ok(f(runner))
    }
}

#[async_trait]
impl ProjectionAdapter<PgContext> for LocalAdapter {
    async fn deploy(
        &self,
        handler: Arc<dyn ProjectionHandler<PgContext>>,
    ) -> Result<DeploymentResult, BoxError> {
        let name = handler.name().to_owned();
        let mut projection = PgProjection::new(self.pool.clone(), handler, self.options.clone())?;
        if let Some(schema) = self.schemas.get(&name) {
            projection = projection.with_read_model_schema(schema)?;
        }
        // A redeploy: the running handler finishes its current steps
        // (they commit or roll back whole) before the new one starts.
        self.stop(&name).await;
        let runner = Runner::start(Arc::new(projection), self.runner.clone()).await?;
        let instances = self
            .options
            .partitions
            .min(u32::try_from(self.runner.max_partitions).unwrap_or(u32::MAX));
        let replaced = self
            .running
            .lock()
            .expect("adapter lock")
            .insert(name.clone(), runner);
        if let Some(other) = replaced {
            // Two deploys of one projection raced: the last one runs.
            other.stop().await;
        }
        Ok(DeploymentResult {
            projection: name,
            provider: "local".to_owned(),
            instances,
        })
    }

    async fn scale(&self, projection: &str, instances: u32) -> Result<(), BoxError> {
        self.with_runner(projection, |r| r.scale(instances as usize))
    }

    async fn monitor(&self, projection: &str) -> Result<HealthStatus, BoxError> {
        let runner = self.with_runner(projection, |r| r.projection().clone())?;
        Ok(runner.health().await?)
    }

    async fn undeploy(&self, projection: &str) -> Result<(), BoxError> {
        if self.stop(projection).await {
            Ok(())
        } else {
            Err(format!("projection `{projection}` is not deployed here").into())
        }
    }
}
