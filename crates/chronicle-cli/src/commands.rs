//! The subcommands and what they do.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chronicle_core::{
    EventAppender, EventReader, ExpectedVersion, Metadata, NewEvent, Position, TimeRange,
};
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{MigrateOptions, PgEventStore, migrate};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::output::{
    OutputFormat, event_json, write_events, write_json_lines, write_record, write_table,
};
use crate::ui::{note, notice};
use crate::{Cli, Database, Registry};

/// A command line that parsed but makes no sense (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Nothing exists where the command looked (exit code 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// A count of at least 1 (`--batch-size`, `--page`): a clap value parser.
pub(crate) fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the schema (idempotent; safe to run concurrently).
    #[command(after_help = "Examples:
  chronicle migrate
  chronicle migrate --partitions 16 --database-url postgres://app@db/app")]
    Migrate {
        /// Hash-partition `events` by aggregate_id into N partitions (only
        /// when the table is first created).
        #[arg(long, value_name = "N")]
        partitions: Option<u16>,
    },
    /// Append one event from flags, or JSON lines from --file or stdin.
    #[command(after_help = r#"Examples:
  chronicle append --aggregate-id 0193a1b2-0000-7000-8000-000000000001 \
      --aggregate-type user --event-type UserRegistered --data '{"name":"Ada"}' \
      --expected-version no-stream
  chronicle append --file events.jsonl              # one transaction: all or nothing
  chronicle append --output json < events.jsonl
  chronicle append --file big.jsonl --batch-size 10000
  chronicle append --file big.jsonl --batch-size 10000 --resume-from 40001"#)]
    Append(AppendArgs),
    /// Read events: one aggregate's stream, the global feed, or one type.
    #[command(after_help = "Examples:
  chronicle read stream 0193a1b2-0000-7000-8000-000000000001
  chronicle read all --after 0-0 --limit 500 --output json
  chronicle read type UserRegistered --from 2026-01-01T00:00:00Z")]
    Read {
        /// Which events.
        #[command(subcommand)]
        what: ReadCommand,
    },
    /// An aggregate's state (its events' data merged in order, RFC 7396),
    /// now or as of a version or a time.
    #[command(after_help = "Examples:
  chronicle state 0193a1b2-0000-7000-8000-000000000001
  chronicle state 0193a1b2-0000-7000-8000-000000000001 --as-of 3
  chronicle state 0193a1b2-0000-7000-8000-000000000001 --as-of 2026-11-27T08:00:00Z --output json")]
    State {
        /// The aggregate.
        aggregate_id: Uuid,
        /// A version number, or an RFC 3339 time such as 2026-11-27T08:00:00Z.
        #[arg(long, value_name = "VERSION|TIMESTAMP")]
        as_of: Option<String>,
    },
    /// Schema version, event count, head position and what holds the feed back.
    #[command(after_help = "Examples:
  chronicle status
  chronicle status --output json --database-url postgres://app@db/app")]
    Status,
    /// A guided walkthrough of the event store (uses the embedded default
    /// unless --database-url is given); for people, so it has no JSON output.
    #[command(after_help = "Examples:
  chronicle demo
  chronicle demo --database-url postgres://localhost/scratch")]
    Demo,
    /// Projections: the handlers this binary carries, where each partition
    /// stands, running workers and rebuilding read models.
    #[command(after_help = "Examples:
  chronicle projections list
  chronicle projections status user-profile
  chronicle projections run user-profile
  chronicle projections rebuild user-profile --blue-green")]
    Projections {
        /// What to show.
        #[command(subcommand)]
        action: ProjectionsCommand,
    },
    /// The projections' dead-letter queue: list, show, retry, discard.
    #[command(after_help = "Examples:
  chronicle dlq list user-profile
  chronicle dlq retry user-profile 0193a1b2-0000-7000-8000-000000000001
  chronicle dlq --config chronicle.yaml list user-profile   # the broker in dead_letters:")]
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqCommand,
        /// The deployment YAML whose `dead_letters:` names the queue's
        /// backend (default: PostgreSQL, the event store's database).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// The event relay: publish the store's events to brokers (NATS,
    /// RabbitMQ, SQS, Kafka, Pub/Sub) as a projection, and its status.
    #[command(after_help = "Examples:
  chronicle relay run --config relay.yaml
  chronicle relay status --config relay.yaml --output json")]
    Relay {
        /// What to do.
        #[command(subcommand)]
        action: crate::relay::RelayCommand,
    },
    /// Manage the embedded development cluster.
    #[command(after_help = "Examples:
  chronicle dev status
  chronicle dev stop
  CHRONICLE_HOME=/tmp/chronicle chronicle dev start")]
    Dev {
        /// What to do with it.
        #[command(subcommand)]
        action: DevCommand,
    },
    /// Schema evolution: plan, run, verify, roll back eager upcasts of
    /// stored events (definitions: --config, default ./upcasters.yaml).
    #[command(after_help = "Examples:
  chronicle upcast plan --config upcasters.yaml
  chronicle upcast run --check
  chronicle upcast rollback --all")]
    Upcast(crate::upcast::UpcastArgs),
    /// Aggregate snapshots: list them, drop them, or have the application
    /// rebuild them.
    #[command(after_help = "Examples:
  chronicle snapshots list --aggregate-type account
  chronicle snapshots drop --aggregate-type account --output json")]
    Snapshots(crate::snapshots::SnapshotsArgs),
    /// Field encryption keys: list, rotate the key-encryption key, rotate
    /// or shred a subject's data keys.
    #[command(after_help = "Examples:
  chronicle keys list --subject 0193a1b2-0000-7000-8000-000000000001
  chronicle keys --keyring keyring.yaml rotate-kek")]
    Keys(crate::keys::KeysArgs),
    /// The hash-chained audit log of field encryption: list, seal, verify.
    #[command(after_help = "Examples:
  chronicle audit list --operation shred
  chronicle audit verify --save-anchor audit-anchor.json")]
    Audit(crate::audit::AuditArgs),
    /// Benchmarks that print figures and ratios against raw PostgreSQL.
    #[command(after_help = "Examples:
  chronicle bench append --output json
  chronicle bench upcast --events 100000")]
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Deploy the projections of a deployment file to their provider
    /// (Cloudflare Workers): upload, cron trigger, queue consumer.
    #[command(after_help = "Examples:
  chronicle deploy -c chronicle.yaml --dry-run
  chronicle deploy -c chronicle.yaml --projection user-profile
  CHRONICLE_SECRETS_DIR=/run/secrets chronicle deploy --output json

Credentials come from the secret store, never from flags: cloudflare-account-id,
cloudflare-api-token and (without config.hyperdrive) cloudflare-database-url,
as files in --secrets-dir or as CHRONICLE_CLOUDFLARE_ACCOUNT_ID, ...")]
    Deploy(crate::deploy::DeployArgs),
    /// How many invocations run a deployed projection at once.
    #[command(after_help = "Examples:
  chronicle scale user-profile 4
  chronicle scale user-profile 1 -c deploy/chronicle.yaml --output json")]
    Scale(crate::deploy::ScaleArgs),
    /// Health, lag and dead letters of a projection, and what its provider
    /// reports of it.
    #[command(after_help = "Examples:
  chronicle monitor user-profile
  chronicle monitor user-profile --watch --interval 5s --output json")]
    Monitor(crate::deploy::MonitorArgs),
    /// Remove a deployed projection from its provider (its state, read
    /// model and dead letters stay in the database).
    #[command(after_help = "Examples:
  chronicle undeploy user-profile -c chronicle.yaml")]
    Undeploy(crate::deploy::UndeployArgs),
    /// A shell completion script, on standard output (needs no database).
    #[command(after_help = "Examples:
  chronicle completions bash > ~/.local/share/bash-completion/completions/chronicle
  chronicle completions zsh > ~/.zfunc/_chronicle     # with fpath+=~/.zfunc
  chronicle completions fish > ~/.config/fish/completions/chronicle.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page, on standard output; with --out-dir, one page per
    /// subcommand written there (needs no database).
    #[command(after_help = "Examples:
  chronicle man | man -l -
  chronicle man --out-dir ~/.local/share/man/man1")]
    Man {
        /// Write chronicle.1 and a page per subcommand (chronicle-read-all.1
        /// and so on) to this folder instead, created if missing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `chronicle append` arguments.
#[derive(Debug, Args)]
pub struct AppendArgs {
    /// The aggregate's id.
    #[arg(long)]
    aggregate_id: Option<Uuid>,
    /// The aggregate's type (at most 50 characters).
    #[arg(long)]
    aggregate_type: Option<String>,
    /// The event's type (at most 100 characters).
    #[arg(long)]
    event_type: Option<String>,
    /// The event's data: a JSON object.
    #[arg(long)]
    data: Option<String>,
    /// The event's metadata: a JSON object (correlation_id, causation_id,
    /// actor, schema_version, anything else).
    #[arg(long)]
    metadata: Option<String>,
    /// The event id (default: a new UUIDv7); reuse it to retry idempotently.
    #[arg(long)]
    event_id: Option<Uuid>,
    /// The version the aggregate must be at: a number, `any` or `no-stream`.
    #[arg(long, default_value = "any")]
    expected_version: ExpectedVersion,
    /// Read JSON lines from this file (`-` for stdin) instead of flags. Each
    /// line: {"aggregate_id", "aggregate_type", "event_type", "data",
    /// "metadata"?, "event_id"?, "expected_version"?}. Every line is checked
    /// first, then the import commits as one transaction: all of it or
    /// nothing. Give lines an event_id to make a rerun store nothing twice.
    #[arg(long, conflicts_with_all = ["aggregate_id", "aggregate_type", "event_type", "data"])]
    file: Option<PathBuf>,
    /// Commit the import in transactions of N lines instead of one (for
    /// imports too large for one transaction). On a failure the batches
    /// before it stay committed and the last committed line is printed.
    #[arg(long, value_name = "N", value_parser = at_least_one,
          conflicts_with_all = ["aggregate_id", "aggregate_type", "event_type", "data", "metadata", "event_id"])]
    batch_size: Option<usize>,
    /// Start the import at this line of the input (1-based, blank lines
    /// counted), skipping the lines before it: what a failed --batch-size
    /// import prints.
    #[arg(long, value_name = "LINE", value_parser = at_least_one,
          conflicts_with_all = ["aggregate_id", "aggregate_type", "event_type", "data", "metadata", "event_id"])]
    resume_from: Option<usize>,
}

/// `chronicle read` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReadCommand {
    /// One aggregate's events, by version range.
    #[command(after_help = "Examples:
  chronicle read stream 0193a1b2-0000-7000-8000-000000000001
  chronicle read stream 0193a1b2-0000-7000-8000-000000000001 --from 2 --to 5 --output json")]
    Stream {
        /// The aggregate.
        aggregate_id: Uuid,
        /// First version.
        #[arg(long, default_value_t = 1)]
        from: u32,
        /// Last version (default: the latest).
        #[arg(long)]
        to: Option<u32>,
    },
    /// The global feed, resumable from a checkpoint (the next one is printed
    /// on standard error).
    #[command(after_help = "Examples:
  chronicle read all --limit 1000 --output json > feed.jsonl
  chronicle read all --after 1234-567 --limit 100")]
    All {
        /// Read after this checkpoint (as printed by a previous read).
        #[arg(long, default_value = "0-0")]
        after: Position,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Events of one type in a time range.
    #[command(after_help = "Examples:
  chronicle read type UserRegistered
  chronicle read type UserRegistered --from 2026-01-01T00:00:00Z --to 2026-02-01T00:00:00Z")]
    Type {
        /// The event type.
        event_type: String,
        /// From this time (inclusive, RFC 3339).
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// Until this time (exclusive, RFC 3339).
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `chronicle projections` subcommands.
#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Checkpoint, status, lag, failures, owner and heartbeat per partition.
    #[command(after_help = "Examples:
  chronicle projections status
  chronicle projections status user-profile --output json")]
    Status {
        /// Only this projection.
        name: Option<String>,
    },
    /// The projection handlers this binary carries.
    #[command(after_help = "Examples:
  chronicle projections list
  chronicle projections list --output json")]
    List,
    /// Run projections in this process until Ctrl-C: workers share
    /// partitions through leases with any other running process.
    #[command(after_help = "Examples:
  chronicle projections run user-profile
  chronicle projections run --config chronicle.yaml --metrics-addr 127.0.0.1:9464
  chronicle projections run user-profile --lease 10s --heartbeat 2s --shutdown-timeout 20s

SIGTERM and SIGINT stop claiming partitions, let the steps under way commit
(or roll them back after --shutdown-timeout), release every lease and exit 0.")]
    Run {
        /// The projections to run (default: every one in --config, or every
        /// registered handler).
        names: Vec<String>,
        /// The deployment YAML (`projections: NAME: handler, provider, config`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to LISTEN for appends, so caught-up workers wake at once
        /// (default: the database URL). Give the direct URL when
        /// --database-url goes through a transaction-mode pooler; workers
        /// poll either way.
        #[arg(long, env = "CHRONICLE_LISTEN_URL", hide_env_values = true)]
        listen_url: Option<String>,
        /// Serve Prometheus metrics on `GET http://ADDR/metrics` (e.g.
        /// 127.0.0.1:9464): this process's steps, retries and dead letters,
        /// and every projection's lag and queue from the database; and
        /// `GET /health` (200 while the database answers, else 503).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// How long a partition lease lasts without renewal (default: the
        /// file's config.lease, else 30s). A worker that dies is taken
        /// over once it expires.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        lease: Option<std::time::Duration>,
        /// How often the leases held are renewed (default: the file's
        /// config.heartbeat, else a third of the lease); at most a third of
        /// the lease.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        heartbeat: Option<std::time::Duration>,
        /// How often an idle partition polls for work (default: the file's
        /// config.poll_interval, else 250ms).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        poll_interval: Option<std::time::Duration>,
        /// On SIGTERM or SIGINT, how long the steps under way get to commit
        /// before they are rolled back; the leases are released either way
        /// and the exit status is 0.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
        shutdown_timeout: std::time::Duration,
    },
    /// Replay a projection's history from a checkpoint (default: the start),
    /// with a progress bar; a failure stops the rebuild.
    #[command(after_help = "Examples:
  chronicle projections rebuild user-profile
  chronicle projections rebuild user-profile --from 1234-567 --blue-green")]
    Rebuild {
        /// The projection.
        name: String,
        /// Replay events after this feed checkpoint.
        #[arg(long, default_value = "0-0")]
        from: Position,
        /// Build the new model beside the live one (which keeps serving)
        /// and swap it in when caught up; needs a projection registered
        /// with its own schema.
        #[arg(long)]
        blue_green: bool,
        /// The deployment YAML the projection runs with: its settings and
        /// `subscribe:` apply to the rebuild (and a changed subscription is
        /// recorded by it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `chronicle dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead-lettered and parked events of a projection, each aggregate's in
    /// version order.
    #[command(after_help = "Examples:
  chronicle dlq list user-profile
  chronicle dlq list user-profile --aggregate-id 0193a1b2-0000-7000-8000-000000000001 --output json")]
    List {
        /// The projection.
        projection: String,
        /// Only this aggregate.
        #[arg(long)]
        aggregate_id: Option<Uuid>,
    },
    /// One dead letter in full: queue state, attempts, error, timestamps,
    /// the event as stored (encrypted fields stay envelopes) and the events
    /// parked behind it. Exits 4 when the event is not in the queue.
    #[command(after_help = "Examples:
  chronicle dlq show user-profile 0193a1b2-0000-7000-8000-0000000000e1")]
    Show {
        /// The projection.
        projection: String,
        /// The dead-lettered (or parked) event.
        event_id: Uuid,
    },
    /// Replay an aggregate's dead-lettered event and the events parked
    /// behind it, in order, through the (fixed) handler.
    #[command(after_help = "Examples:
  chronicle dlq retry user-profile 0193a1b2-0000-7000-8000-000000000001")]
    Retry {
        /// The projection.
        projection: String,
        /// The aggregate whose sequence to replay.
        aggregate_id: Uuid,
    },
    /// Drop an aggregate's failed event without delivering it, then replay
    /// the events parked behind it.
    #[command(after_help = "Examples:
  chronicle dlq discard user-profile 0193a1b2-0000-7000-8000-000000000001")]
    Discard {
        /// The projection.
        projection: String,
        /// The aggregate.
        aggregate_id: Uuid,
    },
}

/// `chronicle dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start the embedded cluster (it also starts on demand).
    #[command(after_help = "Examples:
  chronicle dev start
  export DATABASE_URL=$(chronicle dev start --output json | jq -r .url)")]
    Start,
    /// Stop the embedded cluster; its data stays.
    #[command(after_help = "Examples:
  chronicle dev stop")]
    Stop,
    /// Stop the embedded cluster and delete its data.
    #[command(after_help = "Examples:
  chronicle dev reset
  CHRONICLE_HOME=/tmp/chronicle chronicle dev reset")]
    Reset,
    /// Whether it runs, where, and its URL.
    #[command(after_help = "Examples:
  chronicle dev status
  chronicle dev status --output json")]
    Status,
}

/// `chronicle bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Appends against plain INSERTs, stream loads, feed reads against COPY.
    #[command(after_help = "Examples:
  chronicle bench append
  chronicle bench append --events 4000 --synchronous-commit false --output json")]
    Append(crate::bench::AppendBenchArgs),
    /// Appends and reads with two encrypted fields per event against the
    /// same without encryption.
    #[command(after_help = "Examples:
  chronicle bench crypto
  chronicle bench crypto --events 2000 --profile")]
    Crypto(crate::bench::CryptoBenchArgs),
    /// Eager upcast with backup against a raw `UPDATE ... jsonb_set`, and
    /// lazy upcasting on read against plain reads.
    #[command(after_help = "Examples:
  chronicle bench upcast --events 100000 --output json")]
    Upcast(crate::bench_upcast::UpcastBenchArgs),
    /// Projection catch-up (no-op and upsert read model, 1 and 4
    /// partitions) against a raw COPY read and a raw batched upsert, and
    /// the lag of a tailing projection at half the append capacity.
    #[command(after_help = "Examples:
  chronicle bench projections --events 100000")]
    Projections(crate::bench_projections::ProjectionsBenchArgs),
    /// Loading a long-lived aggregate through its snapshot against a raw
    /// prepared SELECT of the snapshot row plus the tail, and against
    /// loading it without a snapshot.
    #[command(after_help = "Examples:
  chronicle bench snapshots
  chronicle bench snapshots --events 100000 --tail 50 --output json")]
    Snapshots(crate::bench_snapshots::SnapshotsBenchArgs),
    /// The relay draining the store's events to each broker against that
    /// broker's client library publishing the same messages (pipelined,
    /// with publisher acknowledgements). Needs the broker features.
    #[command(after_help = "Examples:
  chronicle bench relay
  chronicle bench relay --events 20000 --payload-bytes 256 --brokers nats,rabbitmq --output json")]
    Relay(crate::bench_relay::RelayBenchArgs),
}

/// The name of `command` when it opens no database (so `--database-url`
/// does not apply to it).
pub(crate) fn without_database(command: &Command) -> Option<&'static str> {
    match command {
        Command::Dev { .. } => Some("dev"),
        Command::Completions { .. } => Some("completions"),
        Command::Man { .. } => Some("man"),
        Command::Deploy(args) if args.dry_run() => Some("deploy --dry-run"),
        _ => None,
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli, registry: &Registry) -> Result<()> {
    let format = cli.output;
    match cli.command {
        Command::Completions { shell } => return crate::generate::completions(shell, format),
        Command::Man { out_dir } => return crate::generate::man(out_dir.as_deref(), format),
        Command::Dev { action } => return dev(action, format),
        Command::Demo if format == OutputFormat::Json => {
            bail!(UsageError(
                "the demo is a narrated walkthrough for people and prints no JSON: run it without \
                 --output json"
                    .into()
            ));
        }
        Command::Demo => {
            return crate::demo::run(cli.database_url.as_deref(), cli.connect_timeout).await;
        }
        Command::Deploy(args) if args.dry_run() => {
            return crate::deploy::dry_run(args, registry, format).await;
        }
        Command::Bench { what } => {
            let mut db = Database::resolve(cli.database_url.as_deref())?;
            db.connect_timeout = cli.connect_timeout;
            tracing::info!("database: {}", db.describe());
            return match what {
                BenchCommand::Append(args) => crate::bench::append(&db, args, format).await,
                BenchCommand::Crypto(args) => crate::bench::crypto(&db, args, format).await,
                BenchCommand::Upcast(args) => crate::bench_upcast::upcast(&db, args, format).await,
                BenchCommand::Projections(args) => {
                    crate::bench_projections::projections(&db, args, format).await
                }
                BenchCommand::Snapshots(args) => {
                    crate::bench_snapshots::snapshots(&db, args, format).await
                }
                BenchCommand::Relay(args) => crate::bench_relay::relay(&db, args, format).await,
            };
        }
        _ => {}
    }
    let mut db = Database::resolve(cli.database_url.as_deref())?;
    db.connect_timeout = cli.connect_timeout;
    db.worker = matches!(
        cli.command,
        Command::Projections {
            action: ProjectionsCommand::Run { .. }
        } | Command::Relay {
            action: crate::relay::RelayCommand::Run { .. }
        }
    );
    tracing::info!("database: {}", db.describe());
    match cli.command {
        Command::Migrate { partitions } => {
            let pool = db.pool().await?;
            let report = migrate(&pool, MigrateOptions { partitions }).await?;
            write_record(
                &json!({ "schema_version": report.version, "applied": report.applied }),
                format,
            )?;
        }
        Command::Append(args) => append(&db, args, format).await?,
        Command::Read { what } => read(&db, what, format).await?,
        Command::State {
            aggregate_id,
            as_of,
        } => state(&db, aggregate_id, as_of, format).await?,
        Command::Status => {
            let status = db.store().await?.status().await?;
            let mut value = serde_json::to_value(&status)?;
            if let Some(head) = status.head {
                value["head"] = json!(head.to_string());
            }
            value["database"] = json!(if db.embedded {
                "embedded"
            } else {
                "DATABASE_URL"
            });
            write_record(&value, format)?;
        }
        Command::Projections { action } => projections(&db, registry, action, format).await?,
        Command::Dlq { action, config } => {
            dlq(&db, registry, action, config.as_deref(), format).await?
        }
        Command::Relay { action } => crate::relay::run(&db, action, format).await?,
        Command::Keys(args) => {
            crate::keys::run(&db, args, format).await?;
            crate::audit::seal_written(&db).await;
        }
        Command::Audit(args) => crate::audit::run(&db, args, format).await?,
        Command::Snapshots(args) => crate::snapshots::run(&db, args, format).await?,
        Command::Deploy(args) => crate::deploy::deploy(&db, args, registry, format).await?,
        Command::Scale(args) => crate::deploy::scale(&db, args, format).await?,
        Command::Monitor(args) => crate::deploy::monitor(&db, args, format).await?,
        Command::Undeploy(args) => crate::deploy::undeploy(&db, args, format).await?,
        Command::Upcast(args) => {
            crate::upcast::run(&db, registry, args, format).await?;
            crate::audit::seal_written(&db).await;
        }
        Command::Dev { .. }
        | Command::Demo
        | Command::Bench { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

fn dev(action: DevCommand, format: OutputFormat) -> Result<()> {
    let dir = EmbeddedPostgres::default_dir();
    match action {
        DevCommand::Start => {
            let pg = EmbeddedPostgres::start(&dir)?;
            write_record(
                &json!({ "running": true, "dir": dir, "url": pg.url() }),
                format,
            )?;
        }
        DevCommand::Stop => {
            let was = EmbeddedPostgres::stop(&dir)?;
            write_record(&json!({ "stopped": was, "dir": dir }), format)?;
        }
        DevCommand::Reset => {
            EmbeddedPostgres::reset(&dir)?;
            write_record(&json!({ "reset": true, "dir": dir }), format)?;
        }
        DevCommand::Status => {
            let status = EmbeddedPostgres::status(&dir);
            write_record(
                &json!({
                    "running": EmbeddedPostgres::is_running(&dir),
                    "dir": status.cluster_dir,
                    "pid": status.pid,
                    "postgres_version": status.pg_version,
                    "url": status.url,
                }),
                format,
            )?;
        }
    }
    Ok(())
}

/// The options a projection is opened with, and whether its partition
/// count was asked for by a deployment file (and where), or is a default
/// that gives way to the count the projection already runs with.
#[derive(Debug, Clone, Default)]
struct Deployed {
    options: chronicle_projections::ProjectionOptions,
    /// `FILE:LINE: projections.NAME.config.concurrency` when a deployment
    /// file sets the partition count (or leaves it at its default).
    partitions_from: Option<String>,
    /// Where the deployment file runs it (`local` without a file).
    provider: chronicle_projections::Provider,
    /// The deployment file's heartbeat and poll intervals (`None`: no
    /// file, so the runner's defaults).
    runner: Option<(Option<std::time::Duration>, std::time::Duration)>,
}

impl Deployed {
    fn from_config(origin: &str, p: &chronicle_projections::ProjectionConfig) -> Deployed {
        let line = p.concurrency_line.unwrap_or(p.line);
        let default = if p.concurrency_line.is_none() {
            " (not set, so the default)"
        } else {
            ""
        };
        Deployed {
            provider: p.provider,
            options: p.options(),
            runner: Some((p.heartbeat, p.poll_interval)),
            partitions_from: Some(format!(
                "{origin}:{line}: projections.{}.config.concurrency{default}",
                p.name
            )),
        }
    }
}

/// A projection of a registered handler, its setup SQL run.
/// Its statements are sent as the store's are (`statement_cache` in the
/// URL). Without a deployment file it takes the partition count it already
/// runs with; a deployment file asking for another count is refused, naming
/// the line.
async fn open_projection(
    store: &PgEventStore,
    registry: &Registry,
    name: &str,
    deployed: Deployed,
) -> Result<std::sync::Arc<chronicle_projections::PgProjection>> {
    let pool = store.pool();
    let options = chronicle_projections::ProjectionOptions {
        statement_cache: store.caches_statements(),
        ..deployed.options
    };
    let handler = registry.handlers().get(name).ok_or_else(|| {
        UsageError(format!(
            "no projection handler named `{name}` in this binary; it has: {}. \
             Applications register theirs with chronicle_cli::run(registry)",
            registry.handlers().names().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let existing = chronicle_projections::load_state(pool, Some(name)).await?;
    let options = match (existing.first(), deployed.partitions_from) {
        (Some(state), Some(from)) if state.partitions != options.partitions => {
            bail!(UsageError(format!(
                "{from}: asks for {} partitions, but `{name}` runs with {} in this database, and a \
                 projection's partition count is fixed once it has run; set `concurrency: {}`",
                options.partitions, state.partitions, state.partitions
            )));
        }
        (Some(state), None) => chronicle_projections::ProjectionOptions {
            partitions: state.partitions,
            ..options
        },
        _ => options,
    };
    let mut projection = match crate::upcast::read_chain(registry)? {
        // The handler sees every event at the newest version of its type.
        Some(chain) => chronicle_projections::PgProjection::new(
            pool.clone(),
            chronicle_upcast::UpcastingHandler::new(handler, chain),
            options,
        )?,
        None => chronicle_projections::PgProjection::new(pool.clone(), handler, options)?,
    };
    if let Some(schema) = registry.read_model_schema(name) {
        // Validates the name before it goes into SQL.
        projection = projection.with_read_model_schema(schema)?;
    }
    setup_read_model(pool, registry, name).await?;
    Ok(std::sync::Arc::new(projection))
}

/// Runs the setup SQL of the handler `name` (its read model's tables),
/// with its read model's schema, created if missing, first on the search
/// path.
pub(crate) async fn setup_read_model(
    pool: &chronicle_postgres::PgPool,
    registry: &Registry,
    name: &str,
) -> Result<()> {
    let Some(sql) = registry.setup_sql(name) else {
        return Ok(());
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if let Some(schema) = registry.read_model_schema(name) {
        if !chronicle_sql::is_plain_identifier(schema, 63) {
            bail!(UsageError(format!(
                "the read model schema `{schema}` of `{name}` is not a plain identifier"
            )));
        }
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SELECT set_config('search_path', '{schema}, ' || current_setting('search_path'), true)"
        ))
        .await?;
    }
    tx.batch_execute(sql)
        .await
        .with_context(|| format!("setting up the read model of `{name}`"))?;
    tx.commit().await?;
    Ok(())
}

/// A rebuild's progress bar in events (see [`crate::ui::progress`]).
fn rebuild_bar(format: OutputFormat, doing: &str, name: &str, len: u64) -> indicatif::ProgressBar {
    let bar = crate::ui::progress(
        format,
        Some(len),
        &format!("{{spinner}} {doing} {{msg}} [{{bar:30}}] {{pos}}/{{len}} events"),
    );
    bar.set_message(name.to_owned());
    bar
}

async fn rebuild_blue_green(
    store: &PgEventStore,
    registry: &Registry,
    name: &str,
    options: Deployed,
    from: Position,
    format: OutputFormat,
) -> Result<()> {
    let pool = store.pool();
    let projection = open_projection(store, registry, name, options).await?;
    if projection.read_model_schema().is_none() {
        bail!(UsageError(format!(
            "`{name}` keeps its read model in the shared schema; a blue/green rebuild needs it in a schema \
             of its own (Registry::projection_in_schema). Rebuild it in place without --blue-green"
        )));
    }
    let total: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    let bar = rebuild_bar(format, "building the new", name, total as u64);
    let report = projection
        .rebuild_blue_green(from, registry.setup_sql(name).unwrap_or(""), |n| {
            bar.set_position(n)
        })
        .await;
    bar.finish_and_clear();
    let report = report?;
    write_record(
        &json!({
            "projection": name,
            "rebuilt_from": from.to_string(),
            "replayed": report.replayed,
            "seconds": report.elapsed.as_secs_f64(),
            "swapped": true,
        }),
        format,
    )?;
    Ok(())
}

/// Every projection of the deployment YAML at `path` that resolves to a
/// registered handler: the handler's name and what it deploys with.
fn read_deployment(registry: &Registry, path: &std::path::Path) -> Result<Vec<(String, Deployed)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let origin = path.display().to_string();
    let deployment = chronicle_projections::DeploymentConfig::from_yaml(&origin, &text)
        .map_err(|e| UsageError(e.to_string()))?;
    Ok(deployment
        .resolve(&origin, registry.handlers())
        .map_err(|e| UsageError(e.to_string()))?
        .into_iter()
        .map(|(p, _)| {
            (
                p.handler_name().to_owned(),
                Deployed::from_config(&origin, &p),
            )
        })
        .collect())
}

/// What `name` is deployed with in the YAML at `config` (the defaults
/// without one).
fn deployed_options(
    registry: &Registry,
    config: Option<&std::path::Path>,
    name: &str,
) -> Result<Deployed> {
    let Some(path) = config else {
        return Ok(Deployed::default());
    };
    read_deployment(registry, path)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, options)| options)
        .ok_or_else(|| {
            UsageError(format!(
                "{} does not deploy a projection named `{name}`",
                path.display()
            ))
            .into()
        })
}

/// `projections run`'s lease and shutdown flags (`None`: the deployment
/// file's, else the defaults).
struct Timing {
    lease: Option<std::time::Duration>,
    heartbeat: Option<std::time::Duration>,
    poll_interval: Option<std::time::Duration>,
    shutdown: std::time::Duration,
}

/// Waits for SIGTERM (what systemd, Docker and Kubernetes send) or SIGINT
/// (Ctrl-C); returns the signal's name.
pub(crate) async fn termination() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn run_projections(
    store: &PgEventStore,
    registry: &Registry,
    names: Vec<String>,
    config: Option<PathBuf>,
    listen_url: &str,
    timing: Timing,
) -> Result<()> {
    use chronicle_projections::{Runner, RunnerOptions};
    let mut selected: Vec<(String, Deployed)> = Vec::new();
    if let Some(path) = config {
        let deployed = read_deployment(registry, &path)?;
        if let Some(missing) = names.iter().find(|n| deployed.iter().all(|(d, _)| d != *n)) {
            bail!(UsageError(format!(
                "{} does not deploy a projection named `{missing}` (it deploys: {}); run it \
                 without --config, or add it to the file",
                path.display(),
                deployed
                    .iter()
                    .map(|(d, _)| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for (name, deployed) in deployed {
            if !names.is_empty() && !names.contains(&name) {
                continue;
            }
            if deployed.provider != chronicle_projections::Provider::Local {
                let why = format!(
                    "{name} has provider `{}` in {}: it runs there (`chronicle deploy`), not here",
                    deployed.provider,
                    path.display()
                );
                if names.contains(&name) {
                    bail!(UsageError(format!(
                        "{why}; run it here with `chronicle projections run {name}` without --config"
                    )));
                }
                note!("{why}");
                continue;
            }
            selected.push((name, deployed));
        }
    } else {
        let all: Vec<String> = if names.is_empty() {
            registry.handlers().names().map(str::to_owned).collect()
        } else {
            names
        };
        selected.extend(all.into_iter().map(|n| (n, Deployed::default())));
    }
    if selected.is_empty() {
        bail!(UsageError(
            "no projection to run: name one, or give --config".into()
        ));
    }
    let listener = match chronicle_postgres::PgOptions::from_url(listen_url)?
        .listen(chronicle_postgres::EVENTS_CHANNEL)
        .await
    {
        Ok(listener) => Some(listener),
        Err(e) => {
            notice!("warning: {e}; the workers poll instead");
            None
        }
    };
    // Listening before the workers start: a signal that comes while they
    // start still stops them cleanly.
    let signalled = tokio::spawn(termination());
    let mut runners = Vec::new();
    for (name, mut deployed) in selected {
        if let Some(lease) = timing.lease {
            deployed.options.lease_ttl = lease;
        }
        let defaults = RunnerOptions::default();
        let (file_heartbeat, file_poll) = deployed
            .runner
            .unwrap_or((defaults.heartbeat_interval, defaults.poll_interval));
        let runner = RunnerOptions {
            listener: listener.clone(),
            heartbeat_interval: timing.heartbeat.or(file_heartbeat),
            poll_interval: timing.poll_interval.unwrap_or(file_poll),
            ..defaults
        };
        if let Err(e) = runner.validate(deployed.options.lease_ttl) {
            bail!(UsageError(format!(
                "`{name}`: {e} (set by --lease, --heartbeat and --poll-interval, else by the \
                 deployment file's config.lease, config.heartbeat and config.poll_interval)"
            )));
        }
        if deployed.options.lease_ttl < std::time::Duration::from_secs(1) {
            bail!(UsageError(format!(
                "`{name}`: a lease of {} is too short; a lease must last at least 1s, or a slow \
                 step or renewal lets it lapse",
                humantime::format_duration(deployed.options.lease_ttl)
            )));
        }
        let projection = open_projection(store, registry, &name, deployed).await?;
        runners.push(Runner::start(projection, runner).await?);
        note!("running `{name}`");
    }
    note!(
        "SIGTERM or Ctrl-C stops the workers and releases their partitions; `chronicle projections status` shows progress"
    );
    let signal = signalled.await.context("waiting for a signal")??;
    note!(
        "{signal}: stopping; the steps under way get {} to commit",
        humantime::format_duration(timing.shutdown)
    );
    let stopping: Vec<_> = runners
        .into_iter()
        .map(|runner| tokio::spawn(runner.shutdown(timing.shutdown)))
        .collect();
    for stopped in stopping {
        if !stopped.await.unwrap_or(false) {
            notice!(
                "warning: a step did not commit within --shutdown-timeout and was rolled back; \
                 its events are handled again from the checkpoint"
            );
        }
    }
    drop(listener);
    note!("stopped; every lease is released");
    Ok(())
}

async fn rebuild_projection(
    store: &PgEventStore,
    registry: &Registry,
    name: &str,
    options: Deployed,
    from: Position,
    format: OutputFormat,
) -> Result<()> {
    use chronicle_core::ProjectionStatus;
    use chronicle_projections::{Runner, RunnerOptions};
    let projection = open_projection(store, registry, name, options).await?;
    projection.rebuild(from).await?;
    let runner = Runner::start(projection.clone(), RunnerOptions::default()).await?;
    let bar = rebuild_bar(format, "rebuilding", name, 0);
    let result = loop {
        let health = projection.health().await?;
        let processed: u64 = health.partitions.iter().map(|p| p.events_processed).sum();
        bar.set_length(processed + health.lag_events);
        bar.set_position(processed);
        if let Some(failed) = health
            .partitions
            .iter()
            .find(|p| p.status == ProjectionStatus::Failed)
        {
            break Err(anyhow::anyhow!(
                "the rebuild of `{name}` stopped on partition {}: {}; fix the handler and run the rebuild again",
                failed.partition,
                failed.last_error.as_deref().unwrap_or("unknown error")
            ));
        }
        if health.lag_events == 0
            && health
                .partitions
                .iter()
                .all(|p| p.status == ProjectionStatus::Running)
        {
            break Ok(health);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    runner.stop().await;
    bar.finish_and_clear();
    let health = result?;
    write_record(
        &json!({ "projection": name, "rebuilt_from": from.to_string(), "partitions": health.partitions.len(), "lag_events": health.lag_events }),
        format,
    )?;
    Ok(())
}

async fn projections(
    db: &Database,
    registry: &Registry,
    action: ProjectionsCommand,
    format: OutputFormat,
) -> Result<()> {
    let store = db.store().await?;
    let pool = store.pool().clone();
    let name = match action {
        ProjectionsCommand::Status { name } => name,
        ProjectionsCommand::List => return list_projections(registry, format),
        ProjectionsCommand::Run {
            names,
            config,
            listen_url,
            metrics_addr,
            lease,
            heartbeat,
            poll_interval,
            shutdown_timeout,
        } => {
            let timing = Timing {
                lease,
                heartbeat,
                poll_interval,
                shutdown: shutdown_timeout,
            };
            let listen_url = listen_url.unwrap_or_else(|| db.url.clone());
            if let Some(addr) = metrics_addr {
                chronicle_projections::install_metrics_recorder();
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                note!("metrics on http://{addr}/metrics");
                let pool = pool.clone();
                tokio::spawn(async move {
                    if let Err(e) = chronicle_projections::serve_metrics(listener, pool).await {
                        tracing::warn!(error = %e, "the metrics endpoint stopped");
                    }
                });
            }
            return run_projections(&store, registry, names, config, &listen_url, timing).await;
        }
        ProjectionsCommand::Rebuild {
            name,
            from,
            blue_green,
            config,
        } => {
            let options = deployed_options(registry, config.as_deref(), &name)?;
            return if blue_green {
                rebuild_blue_green(&store, registry, &name, options, from, format).await
            } else {
                rebuild_projection(&store, registry, &name, options, from, format).await
            };
        }
    };
    let states = chronicle_projections::load_state(&pool, name.as_deref()).await?;
    if states.is_empty() {
        bail!(NotFound(match name {
            Some(n) => format!("no projection named `{n}` has run against this database"),
            None => "no projection has run against this database yet".to_owned(),
        }));
    }
    match format {
        OutputFormat::Json => {
            let rows = states
                .iter()
                .map(serde_json::to_value)
                .collect::<serde_json::Result<Vec<_>>>()?;
            write_json_lines(rows)?;
        }
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "projection",
                    "partition",
                    "status",
                    "checkpoint",
                    "lag events",
                    "lag s",
                    "processed",
                    "failures",
                    "owner",
                    "heartbeat",
                    "last error",
                ]);
            for s in &states {
                table.add_row(vec![
                    s.projection.clone(),
                    format!("{}/{}", s.partition, s.partitions),
                    if s.stalled {
                        format!("{} (stalled)", s.status)
                    } else {
                        s.status.to_string()
                    },
                    s.checkpoint.to_string(),
                    s.lag_events.to_string(),
                    format!("{:.1}", s.lag_seconds),
                    s.events_processed.to_string(),
                    s.failure_count.to_string(),
                    s.owner.clone().unwrap_or_else(|| "-".into()),
                    s.heartbeat
                        .map(|h| h.format("%H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            write_table(&table)?;
        }
    }
    Ok(())
}

/// `chronicle projections list`: the registered handlers, by name, and
/// where each keeps its read model.
fn list_projections(registry: &Registry, format: OutputFormat) -> Result<()> {
    let names: Vec<&str> = registry.handlers().names().collect();
    match format {
        OutputFormat::Json => write_json_lines(names.iter().map(|name| {
            json!({
                "name": name,
                "read_model_schema": registry.read_model_schema(name),
            })
        }))?,
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec!["projection", "read model schema"]);
            for name in &names {
                table.add_row(vec![
                    (*name).to_owned(),
                    registry
                        .read_model_schema(name)
                        .unwrap_or("(shared)")
                        .to_owned(),
                ]);
            }
            write_table(&table)?;
        }
    }
    Ok(())
}

/// The broker `config`'s `dead_letters:` names for `projection`'s queue
/// (`None`: PostgreSQL).
async fn dlq_queue(
    config: Option<&std::path::Path>,
    projection: &str,
) -> Result<Option<std::sync::Arc<dyn chronicle_core::MessageQueue>>> {
    let Some(path) = config else {
        return Ok(None);
    };
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read {origin}: {e}")))?;
    let deployment = chronicle_projections::DeploymentConfig::from_yaml(&origin, &text)
        .map_err(|e| UsageError(e.to_string()))?;
    let d = &deployment.dead_letters;
    crate::dlq_backend::open(&d.backend, projection, &origin, d.line).await
}

async fn dlq(
    db: &Database,
    registry: &Registry,
    action: DlqCommand,
    config: Option<&std::path::Path>,
    format: OutputFormat,
) -> Result<()> {
    let store = db.store().await?;
    let pool = store.pool().clone();
    let projection_name = match &action {
        DlqCommand::List { projection, .. }
        | DlqCommand::Show { projection, .. }
        | DlqCommand::Retry { projection, .. }
        | DlqCommand::Discard { projection, .. } => projection.clone(),
    };
    let broker = dlq_queue(config, &projection_name).await?;
    let discard = matches!(action, DlqCommand::Discard { .. });
    let (projection, aggregate_id) = match action {
        DlqCommand::List {
            projection,
            aggregate_id,
        } => (projection, aggregate_id),
        DlqCommand::Show {
            projection,
            event_id,
        } => {
            return match &broker {
                None => crate::dlq_show::show(&pool, &projection, event_id, format).await,
                Some(queue) => {
                    crate::dlq_show::show_from_queue(&**queue, &pool, &projection, event_id, format)
                        .await
                }
            };
        }
        DlqCommand::Retry {
            projection,
            aggregate_id,
        }
        | DlqCommand::Discard {
            projection,
            aggregate_id,
        } => {
            let p = open_projection(&store, registry, &projection, Deployed::default()).await?;
            let report = match (&broker, discard) {
                (None, true) => p.dlq_discard(aggregate_id).await?,
                (None, false) => p.dlq_retry(aggregate_id).await?,
                (Some(queue), true) => p.dlq_discard_from(&**queue, aggregate_id).await?,
                (Some(queue), false) => p.dlq_retry_from(&**queue, aggregate_id).await?,
            };
            write_record(&serde_json::to_value(&report)?, format)?;
            if let Some(error) = report.error {
                bail!(
                    "the replay stopped at a new failure: {error}; the event is dead-lettered again and the rest stay parked"
                );
            }
            return Ok(());
        }
    };
    let letters = match &broker {
        None => chronicle_projections::dlq::list(&pool, &projection, aggregate_id).await?,
        Some(queue) => {
            chronicle_projections::queue_dlq::list(&**queue, &projection, aggregate_id).await?
        }
    };
    match format {
        OutputFormat::Json => {
            let rows = letters
                .iter()
                .map(serde_json::to_value)
                .collect::<serde_json::Result<Vec<_>>>()?;
            write_json_lines(rows)?;
        }
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "aggregate_id",
                    "version",
                    "event_type",
                    "state",
                    "attempts",
                    "since",
                    "error",
                ]);
            for l in &letters {
                table.add_row(vec![
                    l.aggregate_id.to_string(),
                    l.version.to_string(),
                    l.event_type.clone(),
                    format!("{:?}", l.state).to_lowercase(),
                    l.attempts.to_string(),
                    l.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    l.error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            write_table(&table)?;
            note!(
                "{} dead-lettered or parked event(s) for `{projection}`",
                letters.len()
            );
        }
    }
    Ok(())
}

pub(crate) fn parse_metadata(raw: Option<Value>, what: &str) -> Result<Metadata> {
    match raw {
        None | Some(Value::Null) => Ok(Metadata::default()),
        Some(v @ Value::Object(_)) => serde_json::from_value(v).map_err(|e| {
            UsageError(format!("{what}: metadata fields have the wrong type: {e}")).into()
        }),
        Some(_) => Err(UsageError(format!("{what}: metadata must be a JSON object")).into()),
    }
}

pub(crate) fn parse_expected(raw: Option<Value>, what: &str) -> Result<ExpectedVersion> {
    Ok(match raw {
        None | Some(Value::Null) => ExpectedVersion::Any,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(ExpectedVersion::Exact)
            .ok_or_else(|| UsageError(format!("{what}: expected_version {n} is not a version")))?,
        Some(Value::String(s)) => s
            .parse()
            .map_err(|e: String| UsageError(format!("{what}: {e}")))?,
        Some(other) => bail!(UsageError(format!(
            "{what}: expected_version must be a number, \"any\" or \"no-stream\", got {other}"
        ))),
    })
}

async fn append(db: &Database, args: AppendArgs, format: OutputFormat) -> Result<()> {
    let mut batch: Vec<(String, Uuid, String, ExpectedVersion, NewEvent)> = Vec::new();
    let from_flags = args.aggregate_id.is_some()
        || args.aggregate_type.is_some()
        || args.event_type.is_some()
        || args.data.is_some();
    if from_flags {
        let missing: Vec<&str> = [
            ("--aggregate-id", args.aggregate_id.is_none()),
            ("--aggregate-type", args.aggregate_type.is_none()),
            ("--event-type", args.event_type.is_none()),
            ("--data", args.data.is_none()),
        ]
        .into_iter()
        .filter_map(|(flag, missing)| missing.then_some(flag))
        .collect();
        if !missing.is_empty() {
            bail!(UsageError(format!(
                "append from flags needs {}; or pass --file PATH (or pipe JSON lines to stdin)",
                missing.join(", ")
            )));
        }
        let data: Value = serde_json::from_str(args.data.as_deref().unwrap_or_default())
            .map_err(|e| UsageError(format!("--data is not valid JSON: {e}")))?;
        let metadata = match args.metadata.as_deref() {
            Some(raw) => parse_metadata(
                Some(
                    serde_json::from_str(raw)
                        .map_err(|e| UsageError(format!("--metadata is not valid JSON: {e}")))?,
                ),
                "--metadata",
            )?,
            None => Metadata::default(),
        };
        let mut event =
            NewEvent::new(args.event_type.unwrap_or_default(), data).with_metadata(metadata);
        if let Some(id) = args.event_id {
            event = event.with_id(id);
        }
        batch.push((
            "flags".into(),
            args.aggregate_id.unwrap_or_default(),
            args.aggregate_type.unwrap_or_default(),
            args.expected_version,
            event,
        ));
        let store = db.store().await?;
        for (what, aggregate_id, aggregate_type, expected, event) in batch {
            let event_id = event.event_id;
            let outcome = store
                .append(aggregate_id, &aggregate_type, expected, vec![event])
                .await
                .with_context(|| format!("{what}: append to aggregate {aggregate_id} failed"))?;
            write_record(
                &json!({
                    "aggregate_id": aggregate_id,
                    "event_id": event_id,
                    "version": outcome.version,
                    "appended": outcome.appended,
                }),
                format,
            )?;
        }
        return Ok(());
    }
    if args.file.is_none() && std::io::stdin().is_terminal() {
        bail!(UsageError(
            "no events given: pass --aggregate-id, --aggregate-type, --event-type and --data, or --file PATH, or pipe JSON lines to stdin".into()
        ));
    }
    let reader: Box<dyn BufRead> = match args.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
        _ => Box::new(std::io::stdin().lock()),
    };
    let options = crate::import::ImportOptions {
        batch_size: args.batch_size,
        resume_from: args.resume_from,
    };
    crate::import::import(db, reader, options, format).await
}

async fn read(db: &Database, what: ReadCommand, format: OutputFormat) -> Result<()> {
    let store = db.store().await?;
    match what {
        ReadCommand::Stream {
            aggregate_id,
            from,
            to,
        } => {
            let events = store.read_stream(aggregate_id, from, to).await?;
            if events.is_empty() && from <= 1 {
                bail!(NotFound(format!("aggregate {aggregate_id} has no events")));
            }
            write_events(&events, format)?;
        }
        ReadCommand::All { after, limit } => {
            let batch = store.read_all(after, limit).await?;
            write_events(&batch.events, format)?;
            note!(
                "next checkpoint: {}  (resume with --after {})",
                batch.next,
                batch.next
            );
        }
        ReadCommand::Type {
            event_type,
            from,
            to,
            limit,
        } => {
            let events = store
                .read_by_type(&event_type, TimeRange { from, to }, limit)
                .await?;
            write_events(&events, format)?;
        }
    }
    Ok(())
}

/// JSON merge patch (RFC 7396) of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn state(db: &Database, id: Uuid, as_of: Option<String>, format: OutputFormat) -> Result<()> {
    let store = db.store().await?;
    let events = match as_of.as_deref() {
        None => store.read_stream(id, 1, None).await?,
        Some(s) => match s.parse::<u32>() {
            Ok(version) => store.read_stream(id, 1, Some(version)).await?,
            Err(_) => {
                let at: DateTime<Utc> = s.parse().map_err(|_| {
                    UsageError(format!(
                        "--as-of `{s}` is neither a version number nor an RFC 3339 time such as 2026-11-27T08:00:00Z"
                    ))
                })?;
                store.read_stream_as_of(id, at).await?
            }
        },
    };
    let Some(last) = events.last() else {
        bail!(NotFound(format!(
            "aggregate {id} has no events{}",
            as_of.map(|a| format!(" as of {a}")).unwrap_or_default()
        )));
    };
    let mut state = Value::Object(Default::default());
    for e in &events {
        merge(&mut state, &e.event_data);
    }
    let record = json!({
        "aggregate_id": id,
        "aggregate_type": last.aggregate_type,
        "version": last.version,
        "last_event": event_json(last)["event_type"],
        "as_of": last.timestamp,
        "state": state,
    });
    write_record(&record, format)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut v = json!({ "a": 1, "b": { "c": 2, "d": 3 } });
        merge(&mut v, &json!({ "a": null, "b": { "c": 4 }, "e": [1] }));
        assert_eq!(v, json!({ "b": { "c": 4, "d": 3 }, "e": [1] }));
    }

    #[test]
    fn expected_version_from_json_lines() {
        assert_eq!(
            parse_expected(Some(json!(3)), "l").unwrap(),
            ExpectedVersion::Exact(3)
        );
        assert_eq!(
            parse_expected(Some(json!("no-stream")), "l").unwrap(),
            ExpectedVersion::NoStream
        );
        assert_eq!(parse_expected(None, "l").unwrap(), ExpectedVersion::Any);
        assert!(parse_expected(Some(json!(true)), "l").is_err());
    }
}
