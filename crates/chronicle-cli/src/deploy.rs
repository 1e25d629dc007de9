//! `chronicle deploy`, `scale`, `monitor` and `undeploy`: the projections
//! of a deployment file on their providers. Cloudflare projections go
//! through [`CloudflareWorkerAdapter`]; local ones run in `chronicle
//! projections run`, and these commands say so rather than pretend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chronicle_cloudflare::{CloudflareApi, CloudflareWorkerAdapter, WorkerPlan};
use chronicle_core::{HealthStatus, ProjectionAdapter};
use chronicle_crypto::{EnvSecrets, FileSecrets, SecretStore};
use chronicle_projections::{DeploymentConfig, ProjectionConfig, ProjectionOptions, Provider};
use clap::Args;
use serde_json::{Value, json};

use crate::commands::{NotFound, UsageError};
use crate::output::{OutputFormat, write_record};
use crate::ui::note;
use crate::{Database, Registry};

/// The deployment file when none is named.
const DEFAULT_CONFIG: &str = "chronicle.yaml";

/// Where the provider's credentials come from.
#[derive(Debug, Args)]
pub struct ProviderArgs {
    /// The deployment file (default ./chronicle.yaml).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// A folder with one file per secret (cloudflare-account-id,
    /// cloudflare-api-token, cloudflare-database-url). Default: environment
    /// variables CHRONICLE_CLOUDFLARE_ACCOUNT_ID and so on.
    #[arg(long, env = "CHRONICLE_SECRETS_DIR", value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// The Cloudflare API to call (default: Cloudflare's own; wrangler
    /// reads the same variable).
    #[arg(long, env = "CLOUDFLARE_API_BASE_URL", value_name = "URL")]
    cloudflare_api_url: Option<String>,
}

/// `chronicle deploy` arguments.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Deploy this projection only (default: every `provider: cloudflare`
    /// projection of the file).
    #[arg(long, value_name = "NAME")]
    projection: Option<String>,
    /// Print the plan (what is uploaded, the triggers, how each limit maps)
    /// and change nothing; needs no credentials and no database.
    #[arg(long)]
    dry_run: bool,
    /// The worker-build output to upload in place of `<worker>/build`
    /// (with --projection when the file deploys several).
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    #[command(flatten)]
    provider: ProviderArgs,
}

impl DeployArgs {
    /// Whether the command opens no database.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }
}

/// `chronicle scale` arguments.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The projection.
    name: String,
    /// How many invocations may run it at once (at most its partition
    /// count).
    instances: u32,
    #[command(flatten)]
    provider: ProviderArgs,
}

/// `chronicle monitor` arguments.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// The projection.
    name: String,
    /// Keep printing until interrupted (Ctrl-C).
    #[arg(long)]
    watch: bool,
    /// How often --watch prints (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[command(flatten)]
    provider: ProviderArgs,
}

/// `chronicle undeploy` arguments.
#[derive(Debug, Args)]
pub struct UndeployArgs {
    /// The projection.
    name: String,
    #[command(flatten)]
    provider: ProviderArgs,
}

/// The file, read and validated, and where it is.
struct File {
    path: PathBuf,
    config: DeploymentConfig,
}

impl ProviderArgs {
    /// The deployment file: the named one (which must exist), else
    /// ./chronicle.yaml when it exists.
    fn file(&self) -> Result<Option<File>> {
        let (path, named) = match &self.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        if !named && !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the deployment file {}", path.display()))?;
        let origin = path.display().to_string();
        let config =
            DeploymentConfig::from_yaml(&origin, &text).map_err(|e| UsageError(e.to_string()))?;
        Ok(Some(File { path, config }))
    }

    fn require_file(&self) -> Result<File> {
        self.file()?.ok_or_else(|| {
            UsageError(format!(
                "no deployment file: ./{DEFAULT_CONFIG} does not exist; name one with --config"
            ))
            .into()
        })
    }

    fn secrets(&self) -> Arc<dyn SecretStore> {
        match &self.secrets_dir {
            Some(dir) => Arc::new(FileSecrets::new(dir)),
            None => Arc::new(EnvSecrets::with_prefix("CHRONICLE_")),
        }
    }

    async fn cloudflare(&self, db: &Database) -> Result<CloudflareWorkerAdapter> {
        let secrets = self.secrets();
        let api = CloudflareApi::from_secrets(secrets.as_ref(), self.cloudflare_api_url.as_deref())
            .await?;
        Ok(CloudflareWorkerAdapter::new(api, db.pool().await?, secrets))
    }
}

impl File {
    fn projection(&self, name: &str) -> Result<&ProjectionConfig> {
        self.config.projections.get(name).ok_or_else(|| {
            NotFound(format!(
                "{} has no projection `{name}` (it has: {})",
                self.path.display(),
                self.config
                    .projections
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into()
        })
    }

    /// The worker-build output of `p`: `bundle` when given, else
    /// `<worker>/build` relative to the file.
    fn bundle(&self, p: &ProjectionConfig, bundle: Option<&Path>) -> Result<PathBuf> {
        if let Some(dir) = bundle {
            return Ok(dir.to_path_buf());
        }
        let worker = p.worker.as_deref().ok_or_else(|| {
            UsageError(format!(
                "{}:{}: projections.{}: a Cloudflare projection names its Worker's crate: add \
                 `worker: ./path/to/crate` (the crate that calls chronicle_worker::projection_worker!), \
                 or give --bundle DIR",
                self.path.display(),
                p.line,
                p.name
            ))
        })?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        Ok(base.join(worker).join("build"))
    }
}

/// Refuses a local projection for a provider command, saying what to do.
fn local_refusal(p: &ProjectionConfig, command: &str) -> anyhow::Error {
    UsageError(format!(
        "projection `{}` has provider `{}`: its workers run in `chronicle projections run --config \
         FILE`, not on a provider, so there is nothing to {command}. Give it `provider: cloudflare` \
         to run it as a Worker",
        p.name, p.provider
    ))
    .into()
}

/// The Cloudflare projections `args` selects, with their plans.
fn plans(args: &DeployArgs, registry: &Registry, file: &File) -> Result<Vec<WorkerPlan>> {
    let origin = file.path.display().to_string();
    let resolved = file
        .config
        .resolve(&origin, registry.handlers())
        .map_err(|e| UsageError(e.to_string()))?;
    let selected: Vec<&ProjectionConfig> = match &args.projection {
        Some(name) => {
            let p = file.projection(name)?;
            if p.provider != Provider::Cloudflare {
                return Err(local_refusal(p, "deploy"));
            }
            vec![p]
        }
        None => {
            for (p, _) in resolved
                .iter()
                .filter(|(p, _)| p.provider == Provider::Local)
            {
                note!(
                    "{}: local, not deployed: run it with `chronicle projections run --config {origin}`",
                    p.name
                );
            }
            file.config
                .projections
                .values()
                .filter(|p| p.provider == Provider::Cloudflare)
                .collect()
        }
    };
    if selected.is_empty() {
        bail!(UsageError(format!(
            "{origin} deploys no projection to a provider: give one `provider: cloudflare`"
        )));
    }
    if args.bundle.is_some() && selected.len() > 1 {
        bail!(UsageError(
            "--bundle names one Worker, and the file deploys several: add --projection NAME".into()
        ));
    }
    selected
        .into_iter()
        .map(|p| {
            let bundle = file.bundle(p, args.bundle.as_deref())?;
            Ok(WorkerPlan::new(p, &bundle)?)
        })
        .collect()
}

/// `chronicle deploy --dry-run`: the plans, and nothing else.
pub async fn dry_run(args: DeployArgs, registry: &Registry, format: OutputFormat) -> Result<()> {
    let file = args.provider.require_file()?;
    for plan in plans(&args, registry, &file)? {
        match format {
            OutputFormat::Json => write_record(&json!({ "dry_run": true, "plan": plan }), format)?,
            OutputFormat::Table => crate::output::write_text(plan.to_string())?,
        }
    }
    Ok(())
}

/// `chronicle deploy`.
pub async fn deploy(
    db: &Database,
    args: DeployArgs,
    registry: &Registry,
    format: OutputFormat,
) -> Result<()> {
    let file = args.provider.require_file()?;
    let plans = plans(&args, registry, &file)?;
    let mut adapter = args.provider.cloudflare(db).await?;
    let pool = db.pool().await?;
    for plan in &plans {
        adapter = adapter.with_plan(plan.clone());
    }
    for plan in &plans {
        let handler = registry
            .handlers()
            .get(&plan.projection)
            .expect("resolved above");
        crate::commands::setup_read_model(&pool, registry, &plan.projection).await?;
        let result = adapter
            .deploy(handler)
            .await
            .map_err(anyhow::Error::from_boxed)?;
        write_record(
            &json!({
                "projection": result.projection,
                "provider": result.provider,
                "script": plan.script,
                "instances": result.instances,
                "cron": plan.crons.join(", "),
                "wake_queue": plan.wake_queue,
                "dead_letter_queue": plan.dead_letter_queue,
            }),
            format,
        )?;
    }
    Ok(())
}

/// `chronicle scale`.
pub async fn scale(db: &Database, args: ScaleArgs, format: OutputFormat) -> Result<()> {
    let file = args.provider.require_file()?;
    let p = file.projection(&args.name)?;
    if p.provider != Provider::Cloudflare {
        return Err(local_refusal(p, "scale"));
    }
    let adapter = args.provider.cloudflare(db).await?;
    let settings = adapter.scale_to(&args.name, args.instances).await?;
    write_record(
        &json!({
            "projection": args.name,
            "provider": "cloudflare",
            "max_concurrency": settings.max_concurrency,
        }),
        format,
    )
    .map_err(Into::into)
}

/// `chronicle undeploy`.
pub async fn undeploy(db: &Database, args: UndeployArgs, format: OutputFormat) -> Result<()> {
    let file = args.provider.require_file()?;
    let p = file.projection(&args.name)?;
    if p.provider != Provider::Cloudflare {
        return Err(local_refusal(p, "undeploy"));
    }
    let adapter = args.provider.cloudflare(db).await?;
    if !adapter.remove(&args.name).await? {
        bail!(NotFound(format!(
            "projection `{}` has no Worker on Cloudflare (`{}`); nothing to undeploy",
            args.name,
            chronicle_cloudflare::script_name(&args.name)?
        )));
    }
    write_record(
        &json!({ "projection": args.name, "provider": "cloudflare", "undeployed": true }),
        format,
    )
    .map_err(Into::into)
}

/// `chronicle monitor`: health and lag from the database, and for a
/// Cloudflare projection what Cloudflare reports.
pub async fn monitor(db: &Database, args: MonitorArgs, format: OutputFormat) -> Result<()> {
    let file = args.provider.file()?;
    let cloudflare = match &file {
        Some(file) => file
            .config
            .projections
            .get(&args.name)
            .is_some_and(|p| p.provider == Provider::Cloudflare),
        None => false,
    };
    let adapter = if cloudflare {
        Some(args.provider.cloudflare(db).await?)
    } else {
        None
    };
    let pool = db.pool().await?;
    let lag_alert_after = ProjectionOptions::default().lag_alert_after;
    loop {
        let health = match &adapter {
            Some(adapter) => adapter
                .monitor(&args.name)
                .await
                .map_err(anyhow::Error::from_boxed)?,
            None => chronicle_projections::health(&pool, &args.name, lag_alert_after).await?,
        };
        write_health(&health, format)?;
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn write_health(health: &HealthStatus, format: OutputFormat) -> Result<()> {
    if format == OutputFormat::Json {
        let mut value = serde_json::to_value(health)?;
        value["at"] = json!(chrono::Utc::now().to_rfc3339());
        return write_record(&value, format).map_err(Into::into);
    }
    let owners: Vec<String> = health
        .partitions
        .iter()
        .map(|p| {
            format!(
                "#{} {}{} at {}, {} behind, owner {}",
                p.partition,
                p.status,
                if p.stalled { " (stalled)" } else { "" },
                p.checkpoint,
                p.lag_events,
                p.owner.as_deref().unwrap_or("-")
            )
        })
        .collect();
    let mut record = json!({
        "projection": health.projection,
        "healthy": health.healthy,
        "lag_events": health.lag_events,
        "lag_seconds": format!("{:.1}", health.lag_seconds),
        "dead_letters": health.dead_letters,
        "partitions": owners.join("\n"),
    });
    if let Some(provider) = &health.provider {
        record["provider"] = json!(provider.provider);
        record["deployed"] = json!(provider.deployed);
        for (k, v) in &provider.details {
            record[k] = Value::String(v.clone());
        }
    }
    write_record(&record, format).map_err(Into::into)
}
