//! Prometheus metrics, read from `projection_state` and the dead-letter
//! queue, so that every worker (and any process with database access)
//! reports the same figures.

use std::fmt::Write as _;

use chronicle_postgres::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Result;

/// Renders every projection's metrics in the Prometheus text format:
/// events processed, failures, lag in events and seconds (per projection
/// and partition), dead-lettered and parked events, and the age of the
/// oldest parked event (per projection).
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
    Ok(out)
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` ([`render_metrics`]) on `listener` until the
/// future is dropped; anything else gets `404`.
pub async fn serve_metrics(listener: TcpListener, pool: PgPool) -> std::io::Result<()> {
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
