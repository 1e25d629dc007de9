//! Catch-up, live tailing, rebuild, lag, and the order check.

use std::sync::Arc;
use std::time::Duration;

use chronicle_core::{Position, ProjectionStatus};
use chronicle_projections::{
    Error, PgProjection, ProjectionOptions, Runner, RunnerOptions, load_state,
};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{
    Ledger, append_more, create_read_model, deposit, drain, expected_model, read_model,
    wait_for_horizon, wait_until_processed,
};
use crate::support::fresh_db;

fn runner_options() -> RunnerOptions {
    RunnerOptions {
        poll_interval: Duration::from_millis(50),
        ..RunnerOptions::default()
    }
}

/// With a poll interval of ten minutes, only the append's notification can
/// bring the new events in before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_runner_wakes_on_append_notifications_not_its_next_poll() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let accounts = deposit(&db, 20, 2).await;
    wait_for_horizon(&db).await;
    let ledger = Ledger::new("wakes");
    let options = ProjectionOptions {
        partitions: 2,
        ..ProjectionOptions::default()
    };
    let projection = Arc::new(PgProjection::new(db.pool.clone(), ledger, options).unwrap());
    let listener = chronicle_postgres::PgOptions::from_url(&db.url)
        .unwrap()
        .listen(chronicle_postgres::EVENTS_CHANNEL)
        .await
        .unwrap();
    let runner = Runner::start(
        projection,
        RunnerOptions {
            poll_interval: Duration::from_secs(600),
            listener: Some(listener),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    wait_until_processed(&db, "wakes", 40, Duration::from_secs(60)).await;
    // Notifications are opt-in: the trigger is installed disabled.
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE events ENABLE TRIGGER chronicle_events_notify")
        .await
        .unwrap();
    for round in 1..=3 {
        // Let both partitions go back to waiting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        append_more(&db, &accounts[..5], 1).await;
        wait_until_processed(&db, "wakes", 40 + 5 * round, Duration::from_secs(30)).await;
    }
    assert_eq!(read_model(&db).await, expected_model(&db).await);
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_of_thousands_of_events_equals_the_expected_read_model() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let accounts = deposit(&db, 120, 30).await; // 3,600 events
    let ledger = Ledger::new("ledger");
    let options = ProjectionOptions {
        partitions: 4,
        batch_size: 250,
        ..ProjectionOptions::default()
    };
    let projection = Arc::new(PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap());
    let runner = Runner::start(projection.clone(), runner_options())
        .await
        .unwrap();
    wait_until_processed(&db, "ledger", 3_600, Duration::from_secs(120)).await;

    // Live tailing: appends while the runner runs are picked up.
    append_more(&db, &accounts[..40], 5).await;
    wait_until_processed(&db, "ledger", 3_800, Duration::from_secs(60)).await;

    let model = read_model(&db).await;
    assert_eq!(
        model,
        expected_model(&db).await,
        "read model equals the history's fold"
    );
    assert!(
        model
            .values()
            .all(|(_, versions)| versions.iter().copied().eq(1..=versions.len() as i32)),
        "every account saw its versions in order, once"
    );
    assert_eq!(
        ledger
            .shared
            .overlaps
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    let health = projection.health().await.unwrap();
    assert!(health.healthy, "{health:#?}");
    assert_eq!((health.lag_events, health.dead_letters), (0, 0));
    assert_eq!(health.partitions.len(), 4);
    assert!(
        health
            .partitions
            .iter()
            .all(|p| p.owner.as_deref() == Some(runner.worker_id()))
    );

    runner.stop().await;
    let state = load_state(&db.pool, Some("ledger")).await.unwrap();
    assert!(
        state.iter().all(|s| s.owner.is_none()),
        "stop releases the leases: {state:#?}"
    );

    // Rebuild from the start: the hook empties the read model, the replay
    // fills it again, and the partitions return to running.
    projection.rebuild(Position::START).await.unwrap();
    let state = load_state(&db.pool, Some("ledger")).await.unwrap();
    assert!(
        state
            .iter()
            .all(|s| s.status == ProjectionStatus::Rebuilding && s.checkpoint == Position::START)
    );
    assert!(read_model(&db).await.is_empty());
    drain(&projection).await;
    let state = load_state(&db.pool, Some("ledger")).await.unwrap();
    assert!(
        state.iter().all(|s| s.status == ProjectionStatus::Running),
        "{state:#?}"
    );
    assert_eq!(
        read_model(&db).await,
        expected_model(&db).await,
        "rebuild reproduces the model"
    );
}

#[tokio::test]
async fn lag_is_measured_in_events_and_seconds() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 1, 100).await;
    wait_for_horizon(&db).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let options = ProjectionOptions {
        partitions: 1,
        batch_size: 30,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), Ledger::new("lag"), options).unwrap();
    projection.register().await.unwrap();
    let first = projection.step(0, "w").await.unwrap();
    assert_eq!((first.handled, first.lag_events), (30, 70));
    assert!(!first.caught_up);
    assert!(
        first.lag_seconds >= 1.0,
        "oldest pending event is over a second old: {}",
        first.lag_seconds
    );
    let state = projection.state().await.unwrap();
    assert_eq!(state[0].lag_events, 70);
    assert_eq!(state[0].events_processed, 30);
    for _ in 0..3 {
        projection.step(0, "w").await.unwrap();
    }
    let state = projection.state().await.unwrap();
    assert_eq!(
        (
            state[0].lag_events,
            state[0].lag_seconds,
            state[0].events_processed
        ),
        (0, 0.0, 100)
    );
}

#[tokio::test]
async fn out_of_order_versions_stop_the_partition() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let account = Uuid::now_v7();
    crate::ledger::append_out_of_order(&db, account).await;

    let options = ProjectionOptions {
        partitions: 1,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), Ledger::new("order"), options).unwrap();
    projection.register().await.unwrap();
    let err = projection.step(0, "w").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::OrderViolation {
                version: 2,
                missing: 1,
                ..
            }
        ),
        "{err}"
    );
    let state = projection.state().await.unwrap();
    assert_eq!(state[0].status, ProjectionStatus::Failed);
    assert!(
        state[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("version 2")
    );
    assert_eq!(
        state[0].checkpoint,
        Position::START,
        "nothing of the batch was committed"
    );
    assert!(read_model(&db).await.is_empty());
    // A failed partition is not processed until an operator resumes it.
    let idle = projection.step(0, "w").await.unwrap();
    assert_eq!(
        (idle.claimed, idle.status),
        (false, Some(ProjectionStatus::Failed))
    );
}

#[tokio::test]
async fn a_failure_during_a_rebuild_stops_it_instead_of_dead_lettering() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let account = Uuid::now_v7();
    crate::ledger::append_one(&db, account, json!({ "amount": 1 })).await;
    crate::ledger::append_one(&db, account, json!({ "amount": 2, "poison": true })).await;
    deposit(&db, 3, 5).await;
    let ledger = Ledger::new("rebuilt");
    ledger
        .shared
        .fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let projection = PgProjection::new(
        db.pool.clone(),
        ledger.clone(),
        ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;
    assert_eq!(read_model(&db).await, expected_model(&db).await);

    // The handler regresses; a rebuild meets the poison event and stops.
    ledger
        .shared
        .fixed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    projection.rebuild(Position::START).await.unwrap();
    let err = projection.step(0, "worker-1").await.unwrap_err();
    assert!(matches!(err, Error::RebuildFailed { .. }), "{err}");
    let state = &projection.state().await.unwrap()[0];
    assert_eq!(state.status, ProjectionStatus::Failed);
    assert_eq!(
        state.checkpoint,
        Position::START,
        "the failed batch was not committed"
    );
    assert!(
        state
            .last_error
            .as_deref()
            .unwrap()
            .contains("poison event")
    );
    assert_eq!(
        chronicle_projections::dlq::count(&db.pool, "rebuilt")
            .await
            .unwrap(),
        0,
        "nothing is dead-lettered during a rebuild"
    );
    assert!(
        read_model(&db).await.is_empty(),
        "the rebuild hook emptied the model"
    );
    let idle = projection.step(0, "worker-1").await.unwrap();
    assert_eq!(idle.status, Some(ProjectionStatus::Failed));

    // Fixed and resumed: the replay completes.
    ledger
        .shared
        .fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    projection.resume().await.unwrap();
    drain(&projection).await;
    assert_eq!(read_model(&db).await, expected_model(&db).await);
}

/// Records the step transaction's `synchronous_commit` for every event.
struct CommitMode {
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl chronicle_core::ProjectionHandler<chronicle_projections::PgContext> for CommitMode {
    fn name(&self) -> &str {
        "commit-mode"
    }

    async fn handle(
        &self,
        _: &chronicle_core::EventEnvelope,
        ctx: &mut chronicle_projections::PgContext,
    ) -> chronicle_core::ProjectionResult {
        let row = ctx
            .client()
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .await;
        match row {
            Ok(row) => {
                self.seen.lock().unwrap().push(row.get(0));
                chronicle_core::ProjectionResult::Done
            }
            Err(e) => chronicle_core::ProjectionResult::Fail(e.to_string()),
        }
    }
}

/// Steps commit without waiting for the flush unless the options ask for
/// it; the setting is the step's own (`SET LOCAL`), not the session's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_commit_without_waiting_for_the_flush_unless_asked() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 3, 2).await;
    wait_for_horizon(&db).await;
    // Sessions that wait for the flush by default (the test cluster's
    // default is off).
    let mut options = chronicle_postgres::PgOptions::from_url(&db.url).unwrap();
    options.config_mut().options("-c synchronous_commit=on");
    let pool = options.pool().unwrap();
    for (durable, expected) in [(false, "off"), (true, "on")] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let options = ProjectionOptions {
            partitions: 1,
            synchronous_commit: durable,
            ..ProjectionOptions::default()
        };
        let projection =
            PgProjection::new(pool.clone(), CommitMode { seen: seen.clone() }, options).unwrap();
        projection.register().await.unwrap();
        projection.rebuild(Position::START).await.unwrap();
        drain(&projection).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 6, "every event handled once: {seen:?}");
        assert!(seen.iter().all(|s| s == expected), "{durable}: {seen:?}");
    }
    let session: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(session, "on", "the step's setting does not outlive it");
}
