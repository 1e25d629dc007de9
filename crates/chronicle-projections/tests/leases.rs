//! Partition leases: two runners never process one partition at once, a
//! runner can be scaled down live, and a killed runner's partitions are
//! taken over after its lease expires with no loss and no double effect.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chronicle_projections::{PgProjection, ProjectionOptions, Runner, RunnerOptions, load_state};

use crate::ledger::{
    Ledger, append_more, create_read_model, deposit, expected_model, read_model,
    wait_until_processed,
};
use crate::support::fresh_db;

fn runner(worker: &str, max_partitions: usize) -> RunnerOptions {
    RunnerOptions {
        worker_id: worker.to_owned(),
        poll_interval: Duration::from_millis(20),
        error_backoff: Duration::from_millis(100),
        max_partitions,
        heartbeat_interval: None,
        listener: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_never_process_the_same_partition_at_once() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let accounts = deposit(&db, 60, 20).await; // 1,200 events
    let ledger = Ledger::new("shared");
    *ledger.shared.delay.lock().unwrap() = Duration::from_millis(1);
    let options = ProjectionOptions {
        partitions: 4,
        batch_size: 25,
        lease_ttl: Duration::from_secs(2),
        ..ProjectionOptions::default()
    };
    // Two independent projection objects (as in two processes), one handler
    // state to observe both.
    let a = Arc::new(PgProjection::new(db.pool.clone(), ledger.clone(), options.clone()).unwrap());
    let b = Arc::new(PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap());
    let runner_a = Runner::start(a, runner("worker-a", 2)).await.unwrap();
    // Leases are first come, first served: let A take its two partitions
    // before B starts, so that both work.
    let deadline = Instant::now() + Duration::from_secs(10);
    while runner_a.held_partitions() < 2 {
        assert!(Instant::now() < deadline, "A never took two partitions");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let runner_b = Runner::start(b, runner("worker-b", usize::MAX))
        .await
        .unwrap();
    wait_until_processed(&db, "shared", 1_200, Duration::from_secs(120)).await;

    assert_eq!(
        ledger.shared.overlaps.load(Ordering::SeqCst),
        0,
        "a partition ran twice at once"
    );
    let workers: HashSet<String> = ledger
        .shared
        .workers
        .lock()
        .unwrap()
        .values()
        .flatten()
        .cloned()
        .collect();
    assert_eq!(
        workers.len(),
        2,
        "both workers took partitions: {workers:?}"
    );
    assert_eq!(runner_a.held_partitions(), 2);
    assert_eq!(runner_b.held_partitions(), 2);

    // Scale worker A down to nothing, live: its partitions go to B after
    // their current step; nothing lost, nothing done twice.
    runner_a.scale(0);
    append_more(&db, &accounts, 2).await;
    wait_until_processed(&db, "shared", 1_320, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while runner_b.held_partitions() < 4 {
        assert!(
            Instant::now() < deadline,
            "B did not take A's partitions over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runner_a.held_partitions(), 0);
    let state = load_state(&db.pool, Some("shared")).await.unwrap();
    assert!(
        state.iter().all(|s| s.owner.as_deref() == Some("worker-b")),
        "{state:#?}"
    );

    let model = read_model(&db).await;
    assert_eq!(model, expected_model(&db).await);
    assert_eq!(ledger.shared.overlaps.load(Ordering::SeqCst), 0);
    runner_a.stop().await;
    runner_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runners_lease_is_taken_over_after_expiry() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 5, 20).await; // 100 events
    let ledger = Ledger::new("takeover");
    *ledger.shared.delay.lock().unwrap() = Duration::from_millis(20);
    let options = ProjectionOptions {
        partitions: 1,
        batch_size: 5,
        lease_ttl: Duration::from_secs(1),
        ..ProjectionOptions::default()
    };
    let a = Arc::new(PgProjection::new(db.pool.clone(), ledger.clone(), options.clone()).unwrap());
    let runner_a = Runner::start(a, runner("doomed", usize::MAX))
        .await
        .unwrap();
    // Let A commit a few batches, then kill it in the middle of one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = load_state(&db.pool, Some("takeover")).await.unwrap();
        if state[0].events_processed >= 15 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runner A made no progress: {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    runner_a.abort();
    let killed_at = Instant::now();

    let b = PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap();
    let state = b.state().await.unwrap();
    assert_eq!(
        state[0].owner.as_deref(),
        Some("doomed"),
        "the dead worker still owns the lease"
    );
    assert!(state[0].events_processed < 100);
    let first = b.step(0, "rescuer").await.unwrap();
    assert!(!first.claimed, "a live lease is respected");

    // After expiry the rescuer takes over and finishes from the checkpoint.
    let took_over = loop {
        let out = b.step(0, "rescuer").await.unwrap();
        if out.claimed {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        took_over >= Duration::from_millis(500),
        "taken over after {took_over:?}, before the lease could have expired"
    );
    loop {
        if b.step(0, "rescuer").await.unwrap().caught_up {
            break;
        }
    }
    let state = b.state().await.unwrap();
    assert_eq!(state[0].owner.as_deref(), Some("rescuer"));
    assert_eq!(state[0].events_processed, 100, "every event handled once");
    assert_eq!(
        read_model(&db).await,
        expected_model(&db).await,
        "no loss, no double effect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_partitions_show_live_lag_and_stall() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let accounts = deposit(&db, 4, 5).await; // 20 events
    let ledger = Ledger::new("stalls");
    let options = ProjectionOptions {
        partitions: 2,
        lease_ttl: Duration::from_secs(1),
        ..ProjectionOptions::default()
    };
    let projection = Arc::new(PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap());
    let doomed = Runner::start(projection.clone(), runner("doomed", usize::MAX))
        .await
        .unwrap();
    wait_until_processed(&db, "stalls", 20, Duration::from_secs(60)).await;
    let health = projection.health().await.unwrap();
    assert!(health.healthy, "{health:#?}");
    assert!(
        health
            .partitions
            .iter()
            .all(|p| !p.stalled && p.lag_events == 0)
    );

    doomed.abort();
    append_more(&db, &accounts, 5).await; // 20 more, nobody to handle them
    // While the dead worker's leases live, nothing is stalled yet, but the
    // lag already counts what waits.
    let state = load_state(&db.pool, Some("stalls")).await.unwrap();
    assert_eq!(
        state.iter().map(|p| p.lag_events).sum::<u64>(),
        20,
        "{state:#?}"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let health = projection.health().await.unwrap();
    assert!(!health.healthy, "{health:#?}");
    assert!(health.lag_events > 0);
    assert!(health.lag_seconds > 1.0, "{health:#?}");
    assert!(
        health.partitions.iter().all(|p| p.stalled),
        "every partition of the dead worker is stalled: {health:#?}"
    );
    let metrics = chronicle_projections::render_metrics(&db.pool)
        .await
        .unwrap();
    assert!(
        metrics.contains("chronicle_projection_stalled{projection=\"stalls\",partition=\"0\"} 1"),
        "{metrics}"
    );

    // A new worker takes over: caught up, nothing stalled.
    let rescuer = Runner::start(projection.clone(), runner("rescuer", usize::MAX))
        .await
        .unwrap();
    wait_until_processed(&db, "stalls", 40, Duration::from_secs(60)).await;
    let health = projection.health().await.unwrap();
    assert!(health.healthy, "{health:#?}");
    rescuer.stop().await;
}
