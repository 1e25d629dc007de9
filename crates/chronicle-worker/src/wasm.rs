//! The Worker side: a runtime of JavaScript timers, a connection over
//! `worker::Socket`, and the invocations.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chronicle_core::ProjectionHandler;
use chronicle_sql::SingleConnection;
use chronicle_step::vars::{BUDGET_MS, WORKER_ID};
use chronicle_step::{OneConnection, PgContext, ProjectionOptions, ProjectionStep, Runtime};
use futures_util::future::join;
use serde::{Deserialize, Serialize};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, NoTls};
use worker::{Date, Delay, Env, MessageBatch, SecureTransport, Socket};

/// The host's timers (`setTimeout`) and `Math.random`: the step's
/// [`Runtime`] in a Worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerRuntime;

impl Runtime for WorkerRuntime {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        Delay::from(duration)
    }

    fn random(&self) -> f64 {
        worker::js_sys::Math::random()
    }
}

/// How a projection Worker runs: the projection's options, the time one
/// invocation may spend stepping, and the name its leases carry.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The projection's options (partitions, batch size, retries, ...).
    pub options: ProjectionOptions,
    /// How long one invocation steps before it returns (default 20 s,
    /// under the Workers' 30 s CPU limit). A
    /// new step starts only when twice the slowest step so far still
    /// fits, so the window size and this budget keep an invocation inside
    /// the provider's limits.
    pub budget: Duration,
    /// The lease owner the Worker writes into `projection_state`: the
    /// variable `CHRONICLE_WORKER_ID`, else `cloudflare-worker`. Every
    /// invocation of the Worker uses the same one, so the next invocation
    /// takes up the leases the last one left at once, while two running at
    /// the same time never step one partition together (a step holds the
    /// partition's row lock); another runtime takes a partition over when
    /// its lease expires.
    pub worker_id: String,
    /// The read model's own schema, first on the handler's search path
    /// (see `ProjectionStep::with_read_model_schema`), if it has one.
    pub read_model_schema: Option<String>,
}

impl WorkerSettings {
    /// Settings for `options`, overridden by the Worker's variables: the
    /// projection's options as a deployment sets them
    /// (`chronicle_step::vars`: partitions, batch size, retries, handler
    /// timeout, subscription), the budget from `CHRONICLE_BUDGET_MS` (the
    /// adapter sets it from the deployment's `timeout`) and the lease owner
    /// from `CHRONICLE_WORKER_ID`. A variable that does not parse is an
    /// error naming it.
    pub fn from_env(env: &Env, options: ProjectionOptions) -> worker::Result<Self> {
        let var = |name: &str| env.var(name).ok().map(|v| v.to_string());
        let options =
            chronicle_step::vars::from_vars(options, var).map_err(worker::Error::RustError)?;
        let budget = match var(BUDGET_MS) {
            Some(text) => {
                let ms: u64 = text.parse().map_err(|_| {
                    worker::Error::RustError(format!(
                        "{BUDGET_MS} is `{text}`, not a number of milliseconds"
                    ))
                })?;
                Duration::from_millis(ms)
            }
            None => Duration::from_secs(20),
        };
        Ok(WorkerSettings {
            options,
            budget,
            worker_id: var(WORKER_ID).unwrap_or_else(|| "cloudflare-worker".to_owned()),
            read_model_schema: None,
        })
    }
}

/// What one invocation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InvocationReport {
    /// Steps run.
    pub steps: u32,
    /// Events handled.
    pub handled: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
    /// Partitions left caught up.
    pub caught_up: u32,
    /// Whether the budget ended the invocation before every partition was
    /// caught up.
    pub stopped_by_budget: bool,
}

/// A queue message that wakes the Worker for a projection's partitions
/// (all of them when `partitions` is empty). A relay of appends, or an
/// operator, publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wake {
    /// The projection.
    pub projection: String,
    /// The partitions to step; empty: every one.
    #[serde(default)]
    pub partitions: Vec<u32>,
}

fn pg(e: tokio_postgres::Error) -> worker::Error {
    worker::Error::RustError(format!("PostgreSQL: {}", chronicle_step::describe(&e)))
}

fn step_error(e: chronicle_step::Error) -> worker::Error {
    worker::Error::RustError(e.to_string())
}

/// Opens the invocation's connection: through the Hyperdrive binding `DB`
/// when the Worker has one (the proxy speaks TLS to the database; the
/// Worker's leg is plain), else to the secret `DATABASE_URL` (plain TCP:
/// a local database, or a tunnel).
pub async fn connect(
    env: &Env,
) -> worker::Result<(Client, tokio_postgres::Connection<Socket, NoTlsStream>)> {
    let (config, host, port) = match env.hyperdrive("DB") {
        Ok(hd) => {
            let mut config = Config::new();
            config
                .user(hd.user())
                .password(hd.password())
                .dbname(hd.database())
                .ssl_mode(SslMode::Disable);
            (config, hd.host(), hd.port())
        }
        Err(_) => {
            let url = env.secret("DATABASE_URL").map_err(|_| {
                worker::Error::RustError(
                    "no database: bind Hyperdrive as DB, or set the secret DATABASE_URL".to_owned(),
                )
            })?;
            let mut config = Config::from_str(&url.to_string()).map_err(pg)?;
            // tokio-postgres defaults to `prefer`, which would try TLS on a
            // socket opened without it.
            config.ssl_mode(SslMode::Disable);
            let host = match config.get_hosts().first() {
                Some(Host::Tcp(h)) => h.clone(),
                _ => {
                    return Err(worker::Error::RustError(
                        "DATABASE_URL needs a TCP host".to_owned(),
                    ));
                }
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            (config, host, port)
        }
    };
    let socket = Socket::builder()
        .secure_transport(SecureTransport::Off)
        .connect(host, port)?;
    config.connect_raw(socket, NoTls).await.map_err(pg)
}

/// A cron trigger's invocation: steps every partition of the projection
/// until it is caught up or the budget is spent. The leases it took stay
/// its Worker's until they expire (see [`WorkerSettings::worker_id`]).
pub async fn run_scheduled<H>(
    env: &Env,
    handler: H,
    settings: &WorkerSettings,
) -> worker::Result<InvocationReport>
where
    H: ProjectionHandler<PgContext> + 'static,
{
    let partitions: Vec<u32> = (0..settings.options.partitions).collect();
    run(env, handler, settings, partitions).await
}

/// A queue consumer's invocation: steps the partitions the batch's
/// messages name for this projection (every partition for a message that
/// names none), then acknowledges the batch. On an error nothing is
/// acknowledged and the error is returned, so the queue delivers the
/// messages again.
pub async fn run_queue<H>(
    env: &Env,
    batch: &MessageBatch<Wake>,
    handler: H,
    settings: &WorkerSettings,
) -> worker::Result<InvocationReport>
where
    H: ProjectionHandler<PgContext> + 'static,
{
    let name = handler.name().to_owned();
    let messages = batch.messages()?;
    let mut partitions = Vec::new();
    for message in &messages {
        let wake = message.body();
        if wake.projection != name {
            continue;
        }
        if wake.partitions.is_empty() {
            partitions.extend(0..settings.options.partitions);
        } else {
            partitions.extend(wake.partitions.iter().copied());
        }
    }
    partitions.sort_unstable();
    partitions.dedup();
    let report = run(env, handler, settings, partitions).await?;
    batch.ack_all();
    Ok(report)
}

async fn run<H>(
    env: &Env,
    handler: H,
    settings: &WorkerSettings,
    partitions: Vec<u32>,
) -> worker::Result<InvocationReport>
where
    H: ProjectionHandler<PgContext> + 'static,
{
    let mut step = ProjectionStep::new(handler, settings.options.clone()).map_err(step_error)?;
    if let Some(schema) = &settings.read_model_schema {
        step = step.with_read_model_schema(schema).map_err(step_error)?;
    }
    let (client, connection) = connect(env).await?;
    let work = async move {
        let source = OneConnection::new(SingleConnection::new(client));
        let report = steps(&step, &source, settings, &partitions).await;
        // Closing the client ends the connection's future: the socket is
        // closed before the invocation returns.
        drop(source);
        report
    };
    let (report, closed) = join(work, connection).await;
    closed.map_err(pg)?;
    report.map_err(step_error)
}

async fn steps(
    step: &ProjectionStep,
    source: &OneConnection,
    settings: &WorkerSettings,
    partitions: &[u32],
) -> chronicle_step::Result<InvocationReport> {
    step.register(source).await?;
    let budget = settings.budget.as_millis() as f64;
    let started = Date::now().as_millis() as f64;
    let mut slowest = 0.0f64;
    let mut report = InvocationReport::default();
    'partitions: for &partition in partitions {
        loop {
            let now = Date::now().as_millis() as f64;
            if now - started + 2.0 * slowest > budget {
                report.stopped_by_budget = true;
                break 'partitions;
            }
            let outcome = step
                .step(source, partition, &settings.worker_id, &WorkerRuntime)
                .await?;
            slowest = slowest.max(Date::now().as_millis() as f64 - now);
            report.steps += 1;
            report.handled += u64::from(outcome.handled);
            report.dead_lettered += u64::from(outcome.dead_lettered);
            if !outcome.claimed {
                break;
            }
            if outcome.caught_up {
                report.caught_up += 1;
                break;
            }
        }
    }
    Ok(report)
}
