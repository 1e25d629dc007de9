//! [`CloudflareWorkerAdapter`]: the [`ProjectionAdapter`] that runs a
//! projection as a Cloudflare Worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    BoxError, DeploymentResult, HealthStatus, ProjectionAdapter, ProjectionHandler, ProviderStatus,
};
use chronicle_crypto::SecretStore;
use chronicle_postgres::PgPool;
use chronicle_projections::{
    CLOUDFLARE_MAX_CONCURRENCY, PgContext, PgProjection, ProjectionOptions,
};
use serde_json::json;
use tokio_postgres::types::Type;

use crate::api::{CloudflareApi, Consumer, ConsumerSettings, Queue};
use crate::error::{Error, Result};
use crate::plan::{DATABASE_URL_SECRET, Database, WorkerPlan, queue_names, script_name, worker_id};

/// Runs projections as Cloudflare Workers: `deploy` uploads the Worker
/// (the user's crate, built by worker-build, that hands the handler to
/// `chronicle_worker::projection_worker!`) with its bindings and limits,
/// sets its cron trigger, and makes it the consumer of its wake queue;
/// `scale` changes the consumer's `max_concurrency`; `monitor` reads
/// health and lag from `projection_state` and what Cloudflare reports of
/// the script and consumer; `undeploy` removes the consumer, the script
/// and the queues and hands the Worker's leases back.
///
/// The projection is registered in the database before the upload, so a
/// partition-count or subscription mismatch fails the deploy, not the
/// Worker.
///
/// ```no_run
/// # use chronicle_core::ProjectionHandler;
/// # use chronicle_projections::PgContext;
/// # async fn demo(
/// #     pool: chronicle_postgres::PgPool,
/// #     config: chronicle_projections::ProjectionConfig,
/// #     handler: std::sync::Arc<dyn ProjectionHandler<PgContext>>,
/// # ) -> Result<(), chronicle_core::BoxError> {
/// use std::sync::Arc;
/// use chronicle_cloudflare::{CloudflareApi, CloudflareWorkerAdapter, WorkerPlan};
/// use chronicle_core::ProjectionAdapter;
/// use chronicle_crypto::EnvSecrets;
///
/// let secrets = Arc::new(EnvSecrets::with_prefix("CHRONICLE_"));
/// let api = CloudflareApi::from_secrets(secrets.as_ref(), None).await?;
/// let plan = WorkerPlan::new(&config, "examples/user-profile-worker/build".as_ref())?;
/// let adapter = CloudflareWorkerAdapter::new(api, pool, secrets).with_plan(plan);
/// adapter.deploy(handler).await?; // e.g. the user-profile projection
/// adapter.scale("user-profile", 2).await?;
/// println!("{:?}", adapter.monitor("user-profile").await?);
/// # Ok(()) }
/// ```
pub struct CloudflareWorkerAdapter {
    api: CloudflareApi,
    pool: PgPool,
    secrets: Arc<dyn SecretStore>,
    plans: BTreeMap<String, WorkerPlan>,
}

impl std::fmt::Debug for CloudflareWorkerAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareWorkerAdapter")
            .field("api", &self.api)
            .field("plans", &self.plans.keys())
            .finish_non_exhaustive()
    }
}

/// What `deploy` created or changed on Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    /// The Worker.
    pub script: String,
    /// Whether the Worker existed before (a redeploy).
    pub replaced: bool,
    /// The queues created by this deploy.
    pub created_queues: Vec<String>,
    /// The consumer's id.
    pub consumer_id: String,
}

impl CloudflareWorkerAdapter {
    /// An adapter deploying with `api`, registering projections in `pool`,
    /// reading the Worker's database URL from `secrets` (when it has no
    /// Hyperdrive binding).
    pub fn new(api: CloudflareApi, pool: PgPool, secrets: Arc<dyn SecretStore>) -> Self {
        CloudflareWorkerAdapter {
            api,
            pool,
            secrets,
            plans: BTreeMap::new(),
        }
    }

    /// Adds what `deploy` does for the plan's projection.
    pub fn with_plan(mut self, plan: WorkerPlan) -> Self {
        self.plans.insert(plan.projection.clone(), plan);
        self
    }

    /// The API client.
    pub fn api(&self) -> &CloudflareApi {
        &self.api
    }

    /// Carries out `plan` on Cloudflare (queues, upload, cron trigger,
    /// consumer), in the order that leaves no window in which a wake
    /// message has no consumer able to run it.
    pub async fn apply(&self, plan: &WorkerPlan) -> Result<Applied> {
        let database_url = match &plan.database {
            Database::Hyperdrive { .. } => None,
            Database::Secret => Some(
                crate::api::require(
                    self.secrets.as_ref(),
                    DATABASE_URL_SECRET,
                    "the PostgreSQL URL the Worker connects to (or set `config.hyperdrive`)",
                )
                .await?,
            ),
        };
        let modules = plan.read_modules()?;
        let replaced = self.api.script(&plan.script).await?.is_some();
        let mut created_queues = Vec::new();
        let wake = self
            .ensure_queue(&plan.wake_queue, &mut created_queues)
            .await?;
        self.ensure_queue(&plan.dead_letter_queue, &mut created_queues)
            .await?;
        let metadata = plan.metadata(database_url.as_deref().map(String::as_str));
        self.api
            .upload_script(&plan.script, &metadata, &modules)
            .await?;
        self.api.put_schedules(&plan.script, &plan.crons).await?;
        let consumer = self
            .set_consumer(&wake, &plan.script, &plan.consumer, &plan.dead_letter_queue)
            .await?;
        Ok(Applied {
            script: plan.script.clone(),
            replaced,
            created_queues,
            consumer_id: consumer.consumer_id,
        })
    }

    /// Sets how many invocations run `projection` at once (the wake
    /// queue consumer's `max_concurrency`): at least 1, at most the
    /// partition count (more would find no partition free) and
    /// Cloudflare's 250. Returns the consumer's new settings.
    pub async fn scale_to(&self, projection: &str, instances: u32) -> Result<ConsumerSettings> {
        let script = script_name(projection)?;
        let partitions = self.registered_partitions(projection).await?;
        let most = partitions.min(CLOUDFLARE_MAX_CONCURRENCY);
        if instances == 0 || instances > most {
            return Err(Error::Invalid(format!(
                "cannot run {instances} invocations of `{projection}` at once: it has {partitions} \
                 partitions (fixed once registered; a rebuild with a larger `concurrency` adds more) \
                 and Cloudflare runs at most {CLOUDFLARE_MAX_CONCURRENCY}; ask for 1 to {most} \
                 (`chronicle undeploy` stops it)"
            )));
        }
        let (wake, dead_letter_queue) = queue_names(&script);
        let queue = self
            .api
            .find_queue(&wake)
            .await?
            .ok_or_else(|| Error::NotDeployed(projection.to_owned(), script.clone()))?;
        let consumer = self
            .consumer_of(&queue, &script)
            .await?
            .ok_or_else(|| Error::NotDeployed(projection.to_owned(), script.clone()))?;
        let settings = ConsumerSettings {
            max_concurrency: instances,
            ..consumer.settings
        };
        let dead_letter_queue = consumer.dead_letter_queue.unwrap_or(dead_letter_queue);
        let updated = self
            .api
            .set_consumer(
                &queue.queue_id,
                Some(&consumer.consumer_id),
                &script,
                &settings,
                &dead_letter_queue,
            )
            .await?;
        Ok(updated.settings)
    }

    /// What Cloudflare reports of `projection`'s Worker and consumer.
    pub async fn provider_status(&self, projection: &str) -> Result<ProviderStatus> {
        let script = script_name(projection)?;
        let mut details = BTreeMap::new();
        details.insert("script".to_owned(), script.clone());
        let found = self.api.script(&script).await?;
        if let Some(s) = &found {
            if let Some(modified) = &s.modified_on {
                details.insert("modified_on".to_owned(), modified.clone());
            }
            if let Some(etag) = &s.etag {
                details.insert("etag".to_owned(), etag.clone());
            }
            details.insert(
                "crons".to_owned(),
                self.api.schedules(&script).await?.join(", "),
            );
        }
        let (wake, _) = queue_names(&script);
        match self.api.find_queue(&wake).await? {
            None => {
                details.insert("wake_queue".to_owned(), "(none)".to_owned());
            }
            Some(queue) => {
                details.insert("wake_queue".to_owned(), wake);
                if let Some(c) = self.consumer_of(&queue, &script).await? {
                    let s = c.settings;
                    details.insert(
                        "consumer".to_owned(),
                        format!(
                            "max_concurrency {}, batch {}, {} retries, wait {} ms, dead-letter queue {}",
                            s.max_concurrency,
                            s.batch_size,
                            s.max_retries,
                            s.max_wait_time_ms,
                            c.dead_letter_queue.as_deref().unwrap_or("(none)")
                        ),
                    );
                    details.insert("max_concurrency".to_owned(), s.max_concurrency.to_string());
                }
            }
        }
        Ok(ProviderStatus {
            provider: "cloudflare".to_owned(),
            deployed: found.is_some(),
            details,
        })
    }

    /// Removes `projection`'s consumer, Worker (with its cron trigger) and
    /// queues, then hands back the leases the Worker held so another
    /// runtime takes the partitions at once. Returns whether there was a
    /// Worker. The state, read model and dead letters stay.
    pub async fn remove(&self, projection: &str) -> Result<bool> {
        let script = script_name(projection)?;
        let (wake, dead_letter_queue) = queue_names(&script);
        if let Some(queue) = self.api.find_queue(&wake).await?
            && let Some(c) = self.consumer_of(&queue, &script).await?
        {
            self.api
                .delete_consumer(&queue.queue_id, &c.consumer_id)
                .await?;
        }
        let existed = self.api.delete_script(&script).await?;
        for name in [wake, dead_letter_queue] {
            if let Some(queue) = self.api.find_queue(&name).await? {
                self.api.delete_queue(&queue.queue_id).await?;
            }
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(chronicle_projections::Error::from)?;
        client
            .execute_typed(
                "UPDATE projection_state SET owner = NULL, lease_expires_at = NULL, updated_at = now()
                  WHERE projection = $1 AND owner = $2",
                &[(&projection, Type::TEXT), (&worker_id(&script), Type::TEXT)],
            )
            .await
            .map_err(chronicle_projections::Error::from)?;
        Ok(existed)
    }

    /// Publishes a wake message: the Worker steps `partitions` of
    /// `projection` (every one when empty) now rather than at its next
    /// cron tick.
    pub async fn wake(&self, projection: &str, partitions: &[u32]) -> Result<()> {
        let script = script_name(projection)?;
        let (wake, _) = queue_names(&script);
        let queue = self
            .api
            .find_queue(&wake)
            .await?
            .ok_or_else(|| Error::NotDeployed(projection.to_owned(), script.clone()))?;
        self.api
            .send_message(
                &queue.queue_id,
                &json!({ "projection": projection, "partitions": partitions }),
            )
            .await
    }

    async fn ensure_queue(&self, name: &str, created: &mut Vec<String>) -> Result<Queue> {
        if let Some(queue) = self.api.find_queue(name).await? {
            return Ok(queue);
        }
        let queue = self.api.create_queue(name).await?;
        created.push(name.to_owned());
        Ok(queue)
    }

    async fn consumer_of(&self, queue: &Queue, script: &str) -> Result<Option<Consumer>> {
        Ok(self
            .api
            .consumers(&queue.queue_id)
            .await?
            .into_iter()
            .find(|c| c.script_name.as_deref() == Some(script)))
    }

    async fn set_consumer(
        &self,
        queue: &Queue,
        script: &str,
        settings: &ConsumerSettings,
        dead_letter_queue: &str,
    ) -> Result<Consumer> {
        let consumers = self.api.consumers(&queue.queue_id).await?;
        if let Some(other) = consumers
            .iter()
            .find(|c| c.script_name.as_deref().is_some_and(|s| s != script))
        {
            return Err(Error::Invalid(format!(
                "the queue `{}` is consumed by the Worker `{}`; a queue has one Worker consumer. \
                 Remove that consumer, or rename the projection",
                queue.queue_name,
                other.script_name.as_deref().unwrap_or("?")
            )));
        }
        let existing = consumers
            .into_iter()
            .find(|c| c.script_name.as_deref() == Some(script));
        self.api
            .set_consumer(
                &queue.queue_id,
                existing.as_ref().map(|c| c.consumer_id.as_str()),
                script,
                settings,
                dead_letter_queue,
            )
            .await
    }

    async fn registered_partitions(&self, projection: &str) -> Result<u32> {
        let client = self
            .pool
            .get()
            .await
            .map_err(chronicle_projections::Error::from)?;
        let row = client
            .query_opt(
                "SELECT max(partitions) FROM projection_state WHERE projection = $1",
                &[&projection],
            )
            .await
            .map_err(chronicle_projections::Error::from)?;
        row.and_then(|r| r.get::<_, Option<i32>>(0))
            .map(|n| n as u32)
            .ok_or_else(|| {
                Error::Projection(chronicle_projections::Error::NotRegistered(
                    projection.to_owned(),
                ))
            })
    }
}

#[async_trait]
impl ProjectionAdapter<PgContext> for CloudflareWorkerAdapter {
    async fn deploy(
        &self,
        handler: Arc<dyn ProjectionHandler<PgContext>>,
    ) -> Result<DeploymentResult, BoxError> {
        let name = handler.name().to_owned();
        let plan = self.plans.get(&name).ok_or_else(|| {
            Error::Invalid(format!(
                "projection `{name}` has no Cloudflare plan in this adapter (its deployment file \
                 entry with `provider: cloudflare` and its Worker bundle)"
            ))
        })?;
        // The options the Worker will run with: its variables over the
        // defaults, exactly as `chronicle_worker` reads them.
        let options = chronicle_projections::vars::from_vars(ProjectionOptions::default(), |k| {
            plan.vars.get(k).cloned()
        })
        .map_err(Error::Invalid)?;
        let projection = PgProjection::new(self.pool.clone(), handler, options)?;
        projection.register().await?;
        let applied = self.apply(plan).await?;
        tracing::info!(
            script = applied.script,
            replaced = applied.replaced,
            "deployed"
        );
        Ok(DeploymentResult {
            projection: name,
            provider: "cloudflare".to_owned(),
            instances: plan.consumer.max_concurrency,
        })
    }

    async fn scale(&self, projection: &str, instances: u32) -> Result<(), BoxError> {
        self.scale_to(projection, instances).await?;
        Ok(())
    }

    async fn monitor(&self, projection: &str) -> Result<HealthStatus, BoxError> {
        let lag_alert_after = ProjectionOptions::default().lag_alert_after;
        let mut health =
            chronicle_projections::health(&self.pool, projection, lag_alert_after).await?;
        health.provider = Some(self.provider_status(projection).await?);
        Ok(health)
    }

    async fn undeploy(&self, projection: &str) -> Result<(), BoxError> {
        if self.remove(projection).await? {
            Ok(())
        } else {
            Err(Error::NotDeployed(projection.to_owned(), script_name(projection)?).into())
        }
    }
}
