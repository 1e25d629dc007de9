//! `chronicle relay run|status`: the event relay (chronicle-relay) as a
//! projection on this database, publishing to the brokers its YAML names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chronicle_core::MessageQueue;
use chronicle_relay::{Relay, RelayConfig};
use clap::Subcommand;
use serde_json::json;

use crate::Database;
use crate::commands::UsageError;
use crate::output::OutputFormat;
use crate::output::write_record;
use crate::ui::{note, notice};

/// `chronicle relay …`.
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// Publish the store's events to the routes' brokers until SIGTERM or
    /// SIGINT (at least once; checkpointed like a projection).
    #[command(after_help = "Examples:
  chronicle relay run --config relay.yaml
  chronicle relay run -c relay.yaml --keyring keys.json   # routes with decrypt: true")]
    Run {
        /// The relay YAML (`relay:` with brokers and routes).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// The keyring routes with `decrypt: true` read through (else
        /// $CHRONICLE_KEYRING).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// On SIGTERM or SIGINT, how long the steps under way get to
        /// commit before they are rolled back (and published again by the
        /// next run).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        shutdown_timeout: Duration,
    },
    /// Where the relay stands: per partition, its checkpoint (the last
    /// published position), status and lag; the routes.
    #[command(after_help = "Examples:
  chronicle relay status --config relay.yaml
  chronicle relay status -c relay.yaml --output json")]
    Status {
        /// The relay YAML.
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
}

fn read_config(path: &Path) -> Result<RelayConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    RelayConfig::from_yaml(&path.display().to_string(), &text)
        .map_err(|e| UsageError(e.to_string()).into())
}

/// Runs `action`.
pub async fn run(db: &Database, action: RelayCommand, format: OutputFormat) -> Result<()> {
    match action {
        RelayCommand::Run {
            config,
            keyring,
            shutdown_timeout,
        } => relay_run(db, &config, keyring.as_deref(), shutdown_timeout).await,
        RelayCommand::Status { config } => relay_status(db, &config, format).await,
    }
}

async fn relay_run(
    db: &Database,
    path: &Path,
    keyring: Option<&Path>,
    shutdown: Duration,
) -> Result<()> {
    use chronicle_projections::{PgProjection, Runner, RunnerOptions};
    let config = read_config(path)?;
    let origin = path.display().to_string();
    let store = db.store().await?;
    let mut builder = Relay::builder(config.name.clone()).publish_timeout(config.publish_timeout);
    // One connection per destination, shared by the routes that name it.
    let mut queues: Vec<((String, String), Arc<dyn MessageQueue>)> = Vec::new();
    for (broker, destination) in config.destinations() {
        let (backend, line) = &config.brokers[&broker];
        let queue = crate::dlq_backend::open_named(
            backend,
            &destination,
            &origin,
            *line,
            &format!("relay.brokers.{broker}.backend"),
        )
        .await?
        .expect("the relay config refuses postgres");
        queues.push(((broker, destination), queue));
    }
    for route in &config.routes {
        let queue = queues
            .iter()
            .find(|((b, d), _)| *b == route.broker && *d == route.destination)
            .map(|(_, q)| q.clone())
            .expect("every destination is open");
        builder = builder.route(route.clone(), queue);
    }
    if config.routes.iter().any(|r| r.decrypt) {
        let Some(keys) = crate::keys::named_keyring(keyring)? else {
            bail!(UsageError(format!(
                "{origin}: a route has `decrypt: true`: pass --keyring PATH or set {} so the \
                 relay can decrypt (audited), or remove `decrypt: true`",
                crate::keys::KEYRING_ENV
            )));
        };
        builder = builder.encryptor(Arc::new(
            chronicle_crypto::FieldEncryptorBuilder::new(
                chronicle_crypto::EncryptionConfig::new(),
                keys.keyring.clone(),
                Arc::new(store.data_key_store()),
                Arc::new(store.audit_sink()),
            )
            .build(),
        ));
    }
    let relay = builder.build().map_err(|e| UsageError(e.to_string()))?;
    let projection = Arc::new(PgProjection::new(
        db.pool().await?,
        relay,
        config.projection_options(),
    )?);
    let signalled = tokio::spawn(crate::commands::termination());
    let runner = Runner::start(projection, RunnerOptions::default()).await?;
    note!(
        "relaying as `{}` over {} partitions to {} destination(s); SIGTERM or Ctrl-C stops it, \
         `chronicle relay status` shows progress",
        config.name,
        config.partitions,
        queues.len()
    );
    let signal = signalled.await.context("waiting for a signal")??;
    note!(
        "{signal}: stopping; the publishes under way get {} to commit",
        humantime::format_duration(shutdown)
    );
    if !runner.shutdown(shutdown).await {
        notice!(
            "warning: a step did not commit within --shutdown-timeout and was rolled back; its \
             events are published again from the checkpoint (at least once)"
        );
    }
    note!("stopped; every lease is released");
    Ok(())
}

async fn relay_status(db: &Database, path: &Path, format: OutputFormat) -> Result<()> {
    let config = read_config(path)?;
    let pool = db.pool().await?;
    let partitions = chronicle_projections::load_state(&pool, Some(&config.name)).await?;
    let lag: u64 = partitions.iter().map(|p| p.lag_events).sum();
    let published = partitions.iter().map(|p| p.checkpoint).max();
    let value = json!({
        "relay": config.name,
        "registered": !partitions.is_empty(),
        "lag_events": lag,
        "last_checkpoint": published.map(|p| p.to_string()),
        "partitions": partitions.iter().map(|p| json!({
            "partition": p.partition,
            "status": p.status.to_string(),
            "checkpoint": p.checkpoint.to_string(),
            "lag_events": p.lag_events,
            "lag_seconds": p.lag_seconds,
            "events_processed": p.events_processed,
            "stalled": p.stalled,
            "last_error": p.last_error,
        })).collect::<Vec<_>>(),
        "routes": config.routes.iter().map(|r| json!({
            "event_types": r.event_types,
            "aggregate_types": r.aggregate_types,
            "broker": r.broker,
            "backend": config.brokers[&r.broker].0.as_str(),
            "destination": r.destination,
            "headers": r.headers,
            "decrypt": r.decrypt,
        })).collect::<Vec<_>>(),
    });
    write_record(&value, format)?;
    Ok(())
}
