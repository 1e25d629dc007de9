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
//!
//! The text format is `metrics-exporter-prometheus`'s; [`serve_metrics`]
//! serves it with axum on `GET /metrics`, beside `GET /health`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chronicle_postgres::PgPool;
use metrics::Label;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// How often the installed recorder folds histogram samples into their
/// buckets between scrapes, so that memory stays flat when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// `Some` when this crate's recorder is the process's recorder.
static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process recorder: histograms (not summaries) with the buckets
/// above, `_seconds` names in [`SECONDS`], the rest in [`COUNTS`].
fn process_recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), COUNTS))
        .map(PrometheusBuilder::build_recorder)
        // Only an empty bucket list is refused, and neither is empty.
        .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder())
}

/// Installs this crate's metrics recorder (a `metrics-exporter-prometheus`
/// recorder) as the process's `metrics` recorder, so that
/// [`render_metrics`] (and [`serve_metrics`]) include the runtime's
/// per-process counters and histograms. Idempotent; call it at start-up,
/// before the runners, since the facade drops what is recorded before a
/// recorder exists. Called inside a tokio runtime, it also starts the
/// recorder's upkeep task. Returns `false` when another recorder was
/// installed first: the series then go to that one.
///
/// ```
/// assert!(chronicle_projections::install_metrics_recorder());
/// assert!(chronicle_projections::install_metrics_recorder(), "idempotent");
/// ```
pub fn install_metrics_recorder() -> bool {
    RECORDER
        .get_or_init(|| {
            let recorder = process_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    for (name, help) in HELP {
                        if name.ends_with("_total") {
                            metrics::describe_counter!(*name, *help);
                        } else {
                            metrics::describe_histogram!(*name, *help);
                        }
                    }
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        let upkeep = handle.clone();
                        runtime.spawn(async move {
                            loop {
                                tokio::time::sleep(UPKEEP).await;
                                upkeep.run_upkeep();
                            }
                        });
                    }
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!(
                        "another metrics recorder is installed; the runtime's process metrics go \
                         to it and /metrics shows only the database-derived figures"
                    );
                    None
                }
            }
        })
        .is_some()
}

/// Renders every projection's metrics in the Prometheus text format:
/// from the database, events processed, failures, lag in events and
/// seconds (per projection and partition), dead-lettered and parked events,
/// and the age of the oldest parked event (per projection); then this
/// process's `chronicle_runner_*` counters and histograms, when
/// [`install_metrics_recorder`] installed this crate's recorder.
///
/// The database-derived figures go through a recorder of their own, built
/// for each call, so a projection that no longer exists leaves no series
/// behind.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_projections::Result<()> {
/// let text = chronicle_projections::render_metrics(&pool).await?;
/// assert!(text.contains("chronicle_projection_lag_events"));
/// # Ok(()) }
/// ```
pub async fn render_metrics(pool: &PgPool) -> Result<String> {
    // The lag as of now, against the head of the feed.
    let partitions = crate::state::load(pool, None).await?;
    let client = pool.get().await?;
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
    drop(client);
    let database = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&database, || {
        use metrics::{counter, describe_counter, describe_gauge, gauge};
        describe_counter!(
            "chronicle_projection_events_processed_total",
            "Events handled (applied or skipped)."
        );
        describe_counter!(
            "chronicle_projection_failures_total",
            "Failed handler attempts (retries and dead letters)."
        );
        describe_gauge!(
            "chronicle_projection_lag_events",
            "Events of the partition waiting after its checkpoint, measured at the scrape."
        );
        describe_gauge!(
            "chronicle_projection_lag_seconds",
            "Age of the partition's oldest event not yet handled, at the scrape."
        );
        describe_gauge!(
            "chronicle_projection_up",
            "1 when the partition is running or rebuilding."
        );
        describe_gauge!(
            "chronicle_projection_stalled",
            "1 when the partition is running but no worker holds its lease while its last \
             owner's lease expired or events wait."
        );
        describe_gauge!(
            "chronicle_projection_dead_lettered",
            "Events waiting in the dead-letter queue after failing."
        );
        describe_gauge!(
            "chronicle_projection_parked",
            "Events parked behind a dead-lettered event of their aggregate."
        );
        describe_gauge!(
            "chronicle_projection_oldest_parked_seconds",
            "Age of the oldest parked event (0: none)."
        );
        for p in &partitions {
            let labels = || {
                vec![
                    Label::new("projection", p.projection.clone()),
                    Label::new("partition", p.partition.to_string()),
                ]
            };
            counter!("chronicle_projection_events_processed_total", labels())
                .absolute(p.events_processed);
            counter!("chronicle_projection_failures_total", labels()).absolute(p.failure_count);
            gauge!("chronicle_projection_lag_events", labels()).set(p.lag_events as f64);
            gauge!("chronicle_projection_lag_seconds", labels()).set(p.lag_seconds);
            gauge!("chronicle_projection_stalled", labels()).set(f64::from(u8::from(p.stalled)));
            let up = matches!(
                p.status,
                chronicle_core::ProjectionStatus::Running
                    | chronicle_core::ProjectionStatus::Rebuilding
            );
            let mut with_status = labels();
            with_status.push(Label::new("status", p.status.as_str()));
            gauge!("chronicle_projection_up", with_status).set(f64::from(u8::from(up)));
        }
        for r in &letters {
            let labels = vec![Label::new("projection", r.get::<_, String>(0))];
            gauge!("chronicle_projection_dead_lettered", labels.clone())
                .set(r.get::<_, i64>(1) as f64);
            gauge!("chronicle_projection_parked", labels.clone()).set(r.get::<_, i64>(2) as f64);
            gauge!("chronicle_projection_oldest_parked_seconds", labels).set(r.get::<_, f64>(3));
        }
    });
    let mut out = database.handle().render();
    if let Some(Some(process)) = RECORDER.get() {
        out.push_str(&process.render());
    }
    Ok(out)
}

/// The Prometheus text format's content type.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics` ([`render_metrics`]; `503` when the database cannot be
/// read) and `GET /health` (`200 ok` when the database answers, else
/// `503`); anything else `404`.
fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics or /health\n") })
        .with_state(pool)
}

async fn metrics_page(State(pool): State<PgPool>) -> Response {
    match render_metrics(&pool).await {
        Ok(text) => ([(header::CONTENT_TYPE, EXPOSITION)], text).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read projection state: {e}\n"),
        )
            .into_response(),
    }
}

async fn health(State(pool): State<PgPool>) -> Response {
    let answer = async {
        let client = pool.get().await?;
        client.query_typed("SELECT 1", &[]).await?;
        Ok::<_, crate::Error>(())
    };
    match answer.await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database does not answer: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves `GET /metrics` ([`render_metrics`]) and `GET /health` (`200`
/// when the database answers, `503` when it does not) on `listener` with
/// axum, until the future is dropped; anything else gets `404`. Installs
/// this crate's metrics recorder first ([`install_metrics_recorder`]).
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
/// chronicle_projections::serve_metrics(listener, pool).await
/// # }
/// ```
pub async fn serve_metrics(listener: TcpListener, pool: PgPool) -> std::io::Result<()> {
    install_metrics_recorder();
    axum::serve(listener, router(pool)).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    /// A pool whose server is not there: nothing listens on port 1.
    fn unreachable_pool() -> PgPool {
        chronicle_postgres::PgOptions::from_url("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
            .connect_timeout(Duration::from_millis(100))
            .pool()
            .unwrap()
    }

    async fn get(path: &str) -> (StatusCode, String) {
        let answer = router(unreachable_pool())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = answer.status();
        let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn without_a_database_health_and_metrics_say_503() {
        let (status, body) = get("/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("does not answer"), "{body}");
        let (status, body) = get("/metrics").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("cannot read projection state"), "{body}");
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        let (status, body) = get("/").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/metrics"), "{body}");
        let (status, _) = get("/metrics/x").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
