//! Prometheus metrics from the state table and the dead-letter queue,
//! rendered and served over real HTTP.

use serde_json::json;
use uuid::Uuid;

use chronicle_projections::{PgProjection, ProjectionOptions, render_metrics, serve_metrics};

use crate::ledger::{Ledger, append_one, create_read_model, drain};
use crate::support::fresh_db;

#[tokio::test]
async fn metrics_report_progress_dead_letters_and_parked_events() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let (sick, well) = (Uuid::now_v7(), Uuid::now_v7());
    append_one(&db, sick, json!({ "amount": 1, "poison": true })).await;
    append_one(&db, sick, json!({ "amount": 2 })).await;
    append_one(&db, sick, json!({ "amount": 3 })).await;
    append_one(&db, well, json!({ "amount": 4 })).await;
    let projection = PgProjection::new(
        db.pool.clone(),
        Ledger::new("metered"),
        ProjectionOptions {
            partitions: 2,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;

    let text = render_metrics(&db.pool).await.unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("chronicle_projection_dead_lettered{projection=\"metered\"}"),
        1.0
    );
    assert_eq!(
        value("chronicle_projection_parked{projection=\"metered\"}"),
        2.0
    );
    assert!(value("chronicle_projection_oldest_parked_seconds{projection=\"metered\"}") >= 0.0);
    let processed: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("chronicle_projection_events_processed_total{projection=\"metered\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        processed, 1.0,
        "only the healthy account's event was handled"
    );
    assert!(text.contains("# TYPE chronicle_projection_lag_seconds gauge"));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("chronicle_projection_lag_events{projection=\"metered\""))
            .count(),
        2,
        "one sample per partition"
    );

    // Over real HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(serve_metrics(listener, db.pool.clone()));
    let get = |path: &'static str| async move {
        reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .unwrap()
    };
    let answer = get("/metrics").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = answer.text().await.unwrap();
    assert!(
        body.contains("chronicle_projection_parked{projection=\"metered\"} 2"),
        "{body}"
    );
    let health = get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok\n");
    assert_eq!(get("/other").await.status(), 404);
    server.abort();
}

/// This process's counters and histograms, recorded by a `Runner`, next to
/// the database-derived figures on the served `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_records_retries_and_dead_letters_served_on_metrics() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use chronicle_projections::{RetryPolicy, Runner, RunnerOptions, install_metrics_recorder};

    assert!(
        install_metrics_recorder(),
        "no other recorder in this process"
    );
    let db = fresh_db().await;
    create_read_model(&db).await;
    let (sick, flaky, well) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    append_one(&db, sick, json!({ "amount": 1, "poison": true })).await;
    append_one(&db, sick, json!({ "amount": 2 })).await;
    append_one(&db, flaky, json!({ "amount": 3, "flaky": 2 })).await;
    append_one(&db, well, json!({ "amount": 4 })).await;
    let projection = Arc::new(
        PgProjection::new(
            db.pool.clone(),
            Ledger::new("metered-runner"),
            ProjectionOptions {
                partitions: 2,
                retry: RetryPolicy {
                    initial_delay: Duration::from_millis(1),
                    ..RetryPolicy::default()
                },
                ..ProjectionOptions::default()
            },
        )
        .unwrap(),
    );
    let runner = Runner::start(
        projection.clone(),
        RunnerOptions {
            poll_interval: Duration::from_millis(5),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    // Until both partitions have seen everything: the two healthy events
    // handled, the poison event dead-lettered and its successor parked.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = chronicle_projections::load_state(&db.pool, Some("metered-runner"))
            .await
            .unwrap();
        let processed: u64 = state.iter().map(|s| s.events_processed).sum();
        let queued = chronicle_projections::dlq::count(&db.pool, "metered-runner")
            .await
            .unwrap();
        if processed == 2 && queued == 2 && state.iter().all(|s| s.lag_events == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the runner did not catch up: {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.stop().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(serve_metrics(listener, db.pool.clone()));
    let answer = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer = answer.text().await.unwrap();
    server.abort();

    // Summed over the partitions of this projection.
    let total = |name: &str| -> f64 {
        let prefix = format!("{name}{{");
        answer
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("projection=\"metered-runner\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(total("chronicle_runner_retries_total"), 2.0, "{answer}");
    assert_eq!(
        total("chronicle_runner_dead_lettered_total"),
        1.0,
        "{answer}"
    );
    assert_eq!(total("chronicle_runner_parked_total"), 1.0, "{answer}");
    assert_eq!(
        total("chronicle_runner_events_processed_total"),
        2.0,
        "{answer}"
    );
    assert!(answer.contains("# TYPE chronicle_runner_step_duration_seconds histogram"));
    assert!(
        total("chronicle_runner_step_duration_seconds_count") >= 1.0,
        "{answer}"
    );
    assert_eq!(
        total("chronicle_runner_batch_size_sum"),
        4.0,
        "every event was in one step's batch once: {answer}"
    );
    let inf = answer
        .lines()
        .filter(|l| {
            l.starts_with("chronicle_runner_batch_size_bucket{")
                && l.contains("projection=\"metered-runner\"")
                && l.contains("le=\"+Inf\"")
        })
        .count();
    assert!(
        inf >= 1,
        "a +Inf bucket per partition that read events: {answer}"
    );
    // The database-derived figures are still there.
    assert!(answer.contains("chronicle_projection_parked{projection=\"metered-runner\"} 1"));
    assert!(answer.contains("chronicle_projection_dead_lettered{projection=\"metered-runner\"} 1"));
}
