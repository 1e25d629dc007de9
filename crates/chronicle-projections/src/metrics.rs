//! Prometheus metrics, two kinds:
//!
//! - **database-derived gauges and totals**, read from `projection_state`
//!   and the dead-letter queue, so that every worker (and any process with
//!   database access) reports the same figures;
//! - **this process's counters and histograms**, recorded by the runtime
//!   through the [`metrics`] facade after every step ([`record_step`]):
//!   events processed, retries, dead-lettered, parked, step duration and
//!   batch size, per projection and partition (`chronicle_runner_*`).
//!   They reach [`render_metrics`] when this crate's recorder is installed
//!   ([`install_metrics_recorder`]; [`serve_metrics`] installs it). An
//!   application that installs a recorder of its own (an OpenTelemetry or
//!   StatsD exporter) gets the same series through it instead.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chronicle_postgres::PgPool;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, SharedString, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{Result, StepOutcome};

/// Records what one step did, in this process's metrics (the `metrics`
/// facade: a no-op until a recorder is installed). Steps that did not hold
/// the partition record nothing; the duration and batch-size histograms
/// only take steps that read at least one event, so idle polls do not
/// drown them.
pub(crate) fn record_step(
    projection: &str,
    partition: u32,
    outcome: &StepOutcome,
    elapsed: Duration,
) {
    if !outcome.claimed {
        return;
    }
    let labels = || {
        vec![
            Label::new("projection", projection.to_owned()),
            Label::new("partition", partition.to_string()),
        ]
    };
    metrics::counter!("chronicle_runner_steps_total", labels()).increment(1);
    metrics::counter!("chronicle_runner_events_processed_total", labels())
        .increment(u64::from(outcome.handled));
    metrics::counter!("chronicle_runner_retries_total", labels())
        .increment(u64::from(outcome.retries));
    metrics::counter!("chronicle_runner_dead_lettered_total", labels())
        .increment(u64::from(outcome.dead_lettered));
    metrics::counter!("chronicle_runner_parked_total", labels())
        .increment(u64::from(outcome.parked));
    let batch = outcome.handled + outcome.dead_lettered + outcome.parked;
    if batch > 0 {
        metrics::histogram!("chronicle_runner_step_duration_seconds", labels())
            .record(elapsed.as_secs_f64());
        metrics::histogram!("chronicle_runner_batch_size", labels()).record(f64::from(batch));
    }
}

/// The help text of this crate's process metrics.
const HELP: &[(&str, &str)] = &[
    (
        "chronicle_runner_steps_total",
        "Steps this process ran while holding the partition.",
    ),
    (
        "chronicle_runner_events_processed_total",
        "Events this process handled (applied or skipped).",
    ),
    (
        "chronicle_runner_retries_total",
        "Handler retries this process made.",
    ),
    (
        "chronicle_runner_dead_lettered_total",
        "Events this process dead-lettered.",
    ),
    (
        "chronicle_runner_parked_total",
        "Events this process parked behind a dead letter of their aggregate.",
    ),
    (
        "chronicle_runner_step_duration_seconds",
        "Duration of the steps that read at least one event.",
    ),
    (
        "chronicle_runner_batch_size",
        "Events per step, for the steps that read at least one event.",
    ),
];

/// Histogram buckets for durations in seconds.
const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets for counts.
const COUNTS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0,
];

/// A metric's identity: name and labels (sorted by the facade's order).
type Id = (String, Vec<(String, String)>);

fn id(key: &Key) -> Id {
    (
        key.name().to_owned(),
        key.labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect(),
    )
}

/// This process's metrics, as recorded through the facade.
#[derive(Default)]
struct Registry {
    counters: Mutex<BTreeMap<Id, Arc<AtomicCounter>>>,
    gauges: Mutex<BTreeMap<Id, Arc<AtomicGauge>>>,
    histograms: Mutex<BTreeMap<Id, Arc<BucketHistogram>>>,
    help: Mutex<BTreeMap<String, String>>,
}

#[derive(Default)]
struct AtomicCounter(AtomicU64);

impl metrics::CounterFn for AtomicCounter {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// An `f64` in an atomic's bits.
#[derive(Default)]
struct AtomicGauge(AtomicU64);

impl AtomicGauge {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(f(f64::from_bits(bits)).to_bits())
            });
    }
}

impl metrics::GaugeFn for AtomicGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// A Prometheus histogram: fixed buckets, sum and count.
struct BucketHistogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl metrics::HistogramFn for BucketHistogram {
    fn record(&self, value: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        state.buckets[bucket] += 1;
        state.sum += value;
        state.count += 1;
    }
}

/// The [`metrics::Recorder`] this crate installs.
struct ProcessRecorder(Arc<Registry>);

impl metrics::Recorder for ProcessRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = lock(&self.0.counters);
        Counter::from_arc(counters.entry(id(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = lock(&self.0.gauges);
        Gauge::from_arc(gauges.entry(id(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let bounds = if key.name().ends_with("_seconds") {
            SECONDS
        } else {
            COUNTS
        };
        let mut histograms = lock(&self.0.histograms);
        let h = histograms.entry(id(key)).or_insert_with(|| {
            Arc::new(BucketHistogram {
                bounds,
                state: Mutex::new(HistogramState {
                    buckets: vec![0; bounds.len() + 1],
                    ..HistogramState::default()
                }),
            })
        });
        Histogram::from_arc(h.clone())
    }
}

impl ProcessRecorder {
    fn describe(&self, key: KeyName, description: SharedString) {
        lock(&self.0.help).insert(key.as_str().to_owned(), description.into_owned());
    }
}

/// Locks a registry map; a panic while holding it cannot leave a map
/// half-updated (single inserts), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `Some` when this crate's recorder is the process's recorder.
static RECORDER: OnceLock<Option<Arc<Registry>>> = OnceLock::new();

/// Installs this crate's metrics recorder as the process's `metrics`
/// recorder, so that [`render_metrics`] (and [`serve_metrics`]) include the
/// runtime's per-process counters and histograms. Idempotent; call it at
/// start-up, before the runners, since the facade drops what is recorded
/// before a recorder exists. Returns `false` when another recorder was
/// installed first: the series then go to that one.
///
/// ```
/// assert!(chronicle_projections::install_metrics_recorder());
/// assert!(chronicle_projections::install_metrics_recorder(), "idempotent");
/// ```
pub fn install_metrics_recorder() -> bool {
    RECORDER
        .get_or_init(|| {
            let registry = Arc::new(Registry::default());
            match metrics::set_global_recorder(ProcessRecorder(registry.clone())) {
                Ok(()) => {
                    for (name, help) in HELP {
                        lock(&registry.help).insert((*name).to_owned(), (*help).to_owned());
                    }
                    Some(registry)
                }
                Err(_) => {
                    tracing::warn!(
                        "another metrics recorder is installed; the runtime's process metrics go                          to it and /metrics shows only the database-derived figures"
                    );
                    None
                }
            }
        })
        .is_some()
}

/// This process's recorded metrics in the Prometheus text format (empty
/// when this crate's recorder is not installed).
fn render_process(out: &mut String) {
    let Some(Some(registry)) = RECORDER.get() else {
        return;
    };
    let help = lock(&registry.help).clone();
    let header = |out: &mut String, name: &str, kind: &str| {
        let text = help.get(name).map_or("", String::as_str);
        let _ = writeln!(out, "# HELP {name} {text}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    let labels = |pairs: &[(String, String)], extra: Option<(&str, String)>| {
        let mut all: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if let Some((k, v)) = extra {
            all.push(format!("{k}=\"{v}\""));
        }
        if all.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", all.join(","))
        }
    };
    let mut last = None;
    for ((name, pairs), c) in lock(&registry.counters).iter() {
        if last != Some(name) {
            header(out, name, "counter");
            last = Some(name);
        }
        let _ = writeln!(
            out,
            "{name}{} {}",
            labels(pairs, None),
            c.0.load(Ordering::Relaxed)
        );
    }
    let mut last = None;
    for ((name, pairs), g) in lock(&registry.gauges).iter() {
        if last != Some(name) {
            header(out, name, "gauge");
            last = Some(name);
        }
        let value = f64::from_bits(g.0.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}{} {value}", labels(pairs, None));
    }
    let mut last = None;
    for ((name, pairs), h) in lock(&registry.histograms).iter() {
        if last != Some(name) {
            header(out, name, "histogram");
            last = Some(name);
        }
        let state = lock(&h.state);
        let mut cumulative = 0;
        for (i, n) in state.buckets.iter().enumerate() {
            cumulative += n;
            let le = h.bounds.get(i).map_or("+Inf".to_owned(), f64::to_string);
            let _ = writeln!(
                out,
                "{name}_bucket{} {cumulative}",
                labels(pairs, Some(("le", le)))
            );
        }
        let _ = writeln!(out, "{name}_sum{} {}", labels(pairs, None), state.sum);
        let _ = writeln!(out, "{name}_count{} {}", labels(pairs, None), state.count);
    }
}

/// Renders every projection's metrics in the Prometheus text format:
/// from the database, events processed, failures, lag in events and
/// seconds (per projection and partition), dead-lettered and parked events,
/// and the age of the oldest parked event (per projection); then this
/// process's `chronicle_runner_*` counters and histograms, when
/// [`install_metrics_recorder`] installed this crate's recorder.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_projections::Result<()> {
/// let text = chronicle_projections::render_metrics(&pool).await?;
/// assert!(text.contains("chronicle_projection_lag_events"));
/// # Ok(()) }
/// ```
pub async fn render_metrics(pool: &PgPool) -> Result<String> {
    let client = pool.get().await?;
    let partitions = client
        .query_typed(
            "SELECT projection, partition, events_processed, failure_count, lag_events,
                    lag_seconds, status
               FROM projection_state ORDER BY projection, partition",
            &[],
        )
        .await?;
    let letters = client
        .query_typed(
            "SELECT s.projection,
                    count(d.id) FILTER (WHERE d.state = 'failed'),
                    count(d.id) FILTER (WHERE d.state = 'parked'),
                    coalesce(extract(epoch FROM now() - min(d.created_at)
                                     FILTER (WHERE d.state = 'parked'))::float8, 0)
               FROM (SELECT DISTINCT projection FROM projection_state) AS s
               LEFT JOIN projection_dead_letters d ON d.projection = s.projection
              GROUP BY s.projection ORDER BY s.projection",
            &[],
        )
        .await?;
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = String>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for sample in samples {
                let _ = writeln!(out, "{name}{sample}");
            }
        };
    let per_partition = |column: usize, float: bool| {
        partitions.iter().map(move |r| {
            let value = if float {
                r.get::<_, f64>(column).to_string()
            } else {
                r.get::<_, i64>(column).to_string()
            };
            format!(
                "{{projection=\"{}\",partition=\"{}\"}} {value}",
                escape(r.get(0)),
                r.get::<_, i32>(1)
            )
        })
    };
    family(
        "chronicle_projection_events_processed_total",
        "counter",
        "Events handled (applied or skipped).",
        &mut per_partition(2, false),
    );
    family(
        "chronicle_projection_failures_total",
        "counter",
        "Failed handler attempts (retries and dead letters).",
        &mut per_partition(3, false),
    );
    family(
        "chronicle_projection_lag_events",
        "gauge",
        "Events after the checkpoint when last measured.",
        &mut per_partition(4, false),
    );
    family(
        "chronicle_projection_lag_seconds",
        "gauge",
        "Age of the oldest event not yet handled.",
        &mut per_partition(5, true),
    );
    family(
        "chronicle_projection_up",
        "gauge",
        "1 when the partition is running or rebuilding.",
        &mut partitions.iter().map(|r| {
            let status: &str = r.get(6);
            format!(
                "{{projection=\"{}\",partition=\"{}\",status=\"{status}\"}} {}",
                escape(r.get(0)),
                r.get::<_, i32>(1),
                u8::from(matches!(status, "running" | "rebuilding"))
            )
        }),
    );
    let per_projection = |column: usize, float: bool| {
        letters.iter().map(move |r| {
            let value = if float {
                r.get::<_, f64>(column).to_string()
            } else {
                r.get::<_, i64>(column).to_string()
            };
            format!("{{projection=\"{}\"}} {value}", escape(r.get(0)))
        })
    };
    family(
        "chronicle_projection_dead_lettered",
        "gauge",
        "Events waiting in the dead-letter queue after failing.",
        &mut per_projection(1, false),
    );
    family(
        "chronicle_projection_parked",
        "gauge",
        "Events parked behind a dead-lettered event of their aggregate.",
        &mut per_projection(2, false),
    );
    family(
        "chronicle_projection_oldest_parked_seconds",
        "gauge",
        "Age of the oldest parked event (0: none).",
        &mut per_projection(3, true),
    );
    render_process(&mut out);
    Ok(out)
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` ([`render_metrics`]) on `listener` until the
/// future is dropped; anything else gets `404`. Installs this crate's
/// metrics recorder first ([`install_metrics_recorder`]).
pub async fn serve_metrics(listener: TcpListener, pool: PgPool) -> std::io::Result<()> {
    install_metrics_recorder();
    loop {
        let (mut stream, _) = listener.accept().await?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let request = String::from_utf8_lossy(&buf);
            let target = request.split(' ').nth(1).unwrap_or("");
            let is_metrics = request.starts_with("GET ")
                && (target == "/metrics" || target.starts_with("/metrics?"));
            let (status, content_type, body) = if is_metrics {
                match render_metrics(&pool).await {
                    Ok(text) => ("200 OK", "text/plain; version=0.0.4", text),
                    Err(e) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("cannot read projection state: {e}\n"),
                    ),
                }
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
