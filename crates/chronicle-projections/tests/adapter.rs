//! The LocalAdapter (deploy, scale, monitor), pause and resume, lag
//! alerts, and compile-time Send/Sync checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chronicle_core::{Alert, ProjectionAdapter, ProjectionHandler, ProjectionStatus};
use chronicle_projections::{
    LocalAdapter, PgContext, PgProjection, ProjectionOptions, Runner, RunnerOptions,
};

use crate::ledger::{
    Alerts, Ledger, append_more, create_read_model, deposit, drain, expected_model, read_model,
    wait_for_horizon, wait_until_processed,
};
use crate::support::fresh_db;

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PgProjection>();
    send_sync::<Runner>();
    send_sync::<LocalAdapter>();
    send_sync::<PgContext>();
    send_sync::<chronicle_projections::Error>();
    send_sync::<Arc<dyn ProjectionHandler<PgContext>>>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_adapter_deploys_scales_and_monitors() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let accounts = deposit(&db, 20, 10).await;
    let adapter = LocalAdapter::new(
        db.pool.clone(),
        ProjectionOptions {
            partitions: 3,
            ..ProjectionOptions::default()
        },
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        },
    );
    let handler: Arc<dyn ProjectionHandler<PgContext>> = Arc::new(Ledger::new("adapted"));
    let deployed = adapter.deploy(handler.clone()).await.unwrap();
    assert_eq!(
        (
            deployed.projection.as_str(),
            deployed.provider.as_str(),
            deployed.instances
        ),
        ("adapted", "local", 3)
    );
    // Deploying again replaces the running handler (a redeploy).
    assert_eq!(adapter.deploy(handler).await.unwrap().projection, "adapted");
    wait_until_processed(&db, "adapted", 200, Duration::from_secs(60)).await;
    let health = adapter.monitor("adapted").await.unwrap();
    assert!(health.healthy, "{health:#?}");
    assert_eq!((health.lag_events, health.dead_letters), (0, 0));

    // Scale to one partition worker, live; work goes on.
    adapter.scale("adapted", 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owned = adapter
            .monitor("adapted")
            .await
            .unwrap()
            .partitions
            .iter()
            .filter(|p| p.owner.is_some())
            .count();
        if owned <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scale(1) did not release partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    adapter.scale("adapted", 3).await.unwrap();
    append_more(&db, &accounts, 2).await;
    wait_until_processed(&db, "adapted", 240, Duration::from_secs(60)).await;
    assert_eq!(read_model(&db).await, expected_model(&db).await);
    assert!(adapter.stop("adapted").await);
    assert!(!adapter.stop("adapted").await);
    assert!(adapter.monitor("adapted").await.is_err());
}

#[tokio::test]
async fn paused_projections_do_nothing_until_resumed() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 3, 4).await;
    wait_for_horizon(&db).await;
    let projection = PgProjection::new(
        db.pool.clone(),
        Ledger::new("pausable"),
        ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    projection.pause().await.unwrap();
    let out = projection.step(0, "w").await.unwrap();
    assert_eq!(
        (out.claimed, out.status, out.handled),
        (false, Some(ProjectionStatus::Paused), 0)
    );
    assert!(read_model(&db).await.is_empty());
    assert!(!projection.health().await.unwrap().healthy);
    projection.resume().await.unwrap();
    assert_eq!(drain(&projection).await.handled, 12);
}

#[tokio::test]
async fn a_lagging_partition_raises_one_alert() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 1, 40).await;
    wait_for_horizon(&db).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alerts = Alerts::default();
    let projection = PgProjection::new(
        db.pool.clone(),
        Ledger::new("laggard"),
        ProjectionOptions {
            partitions: 1,
            batch_size: 10,
            lag_alert_after: Duration::from_millis(200),
            ..ProjectionOptions::default()
        },
    )
    .unwrap()
    .with_alerts(alerts.clone());
    projection.register().await.unwrap();
    drain(&projection).await;
    let alerts = alerts.0.lock().unwrap();
    assert!(
        matches!(
            &alerts[..],
            [Alert::Lagging {
                partition: 0,
                lag_events: 30,
                ..
            }]
        ),
        "one alert when the threshold is crossed, none while still behind: {alerts:?}"
    );
}

/// A partition no worker takes (this one is full) while events wait
/// behind it is reported by the worker's heartbeat, once it has stayed so
/// for two beats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_nobody_runs_raises_a_stalled_alert() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 20, 2).await;
    let alerts = Alerts::default();
    let projection = Arc::new(
        PgProjection::new(
            db.pool.clone(),
            Ledger::new("stalling"),
            ProjectionOptions {
                partitions: 2,
                lease_ttl: Duration::from_millis(600),
                ..ProjectionOptions::default()
            },
        )
        .unwrap()
        .with_alerts(alerts.clone()),
    );
    let runner = Runner::start(
        projection.clone(),
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            heartbeat_interval: Some(Duration::from_millis(100)),
            max_partitions: 1,
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let stalled = loop {
        let stalled: Vec<u32> = alerts
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|a| match a {
                Alert::Stalled {
                    partition,
                    lag_events,
                    ..
                } if *lag_events > 0 => Some(*partition),
                _ => None,
            })
            .collect();
        if !stalled.is_empty() {
            break stalled;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no stalled alert"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let owners: Vec<Option<String>> = projection
        .state()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.owner)
        .collect();
    for partition in &stalled {
        assert_eq!(owners[*partition as usize], None, "{owners:?}");
    }
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_runner_stops_it_and_releases_its_leases() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 4, 3).await;
    let projection = Arc::new(
        PgProjection::new(
            db.pool.clone(),
            Ledger::new("dropped"),
            ProjectionOptions {
                partitions: 2,
                ..ProjectionOptions::default()
            },
        )
        .unwrap(),
    );
    let runner = Runner::start(
        projection.clone(),
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    wait_until_processed(&db, "dropped", 12, Duration::from_secs(30)).await;
    drop(runner);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = projection.state().await.unwrap();
        if state.iter().all(|s| s.owner.is_none()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leases were not released: {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stopped for good: new events stay unhandled.
    let before = projection.state().await.unwrap();
    deposit(&db, 1, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = projection.state().await.unwrap();
    assert_eq!(
        before.iter().map(|s| s.events_processed).sum::<u64>(),
        after.iter().map(|s| s.events_processed).sum::<u64>()
    );
}
