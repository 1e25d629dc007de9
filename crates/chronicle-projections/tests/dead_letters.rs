//! The sequenced dead-letter queue: a poison event parks its aggregate's
//! later events while others flow; retry after the fix delivers them in
//! order; nothing is parked twice.

use std::sync::atomic::Ordering;

use chronicle_core::Alert;
use chronicle_projections::{DeadLetterState, Error, PgProjection, ProjectionOptions, dlq};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{
    Alerts, Ledger, append_one, create_read_model, drain, events_processed, read_model,
};
use crate::support::{TestDb, fresh_db, fresh_db_via_pgbouncer};

#[tokio::test]
async fn poison_event_parks_its_aggregate_and_retry_delivers_in_order() {
    poison_scenario(fresh_db().await).await;
}

#[tokio::test]
async fn poison_event_parks_its_aggregate_and_retry_delivers_in_order_via_pgbouncer() {
    poison_scenario(fresh_db_via_pgbouncer().await).await;
}

fn versions(model: &std::collections::BTreeMap<Uuid, (i64, Vec<i32>)>, id: Uuid) -> Vec<i32> {
    model.get(&id).map(|(_, v)| v.clone()).unwrap_or_default()
}

async fn poison_scenario(db: TestDb) {
    create_read_model(&db).await;
    let (sick, well_a, well_b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    append_one(&db, sick, json!({ "amount": 1 })).await;
    let poison = append_one(&db, sick, json!({ "amount": 2, "poison": true })).await;
    let sick3 = append_one(&db, sick, json!({ "amount": 3 })).await;
    for i in 0..5 {
        append_one(&db, well_a, json!({ "amount": i })).await;
        append_one(&db, well_b, json!({ "amount": i })).await;
    }
    let sick4 = append_one(&db, sick, json!({ "amount": 4 })).await;

    let ledger = Ledger::new("balances");
    let alerts = Alerts::default();
    let options = ProjectionOptions {
        partitions: 2,
        batch_size: 4,
        // Off through PgBouncer (the URL says so).
        statement_cache: db.store.caches_statements(),
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), ledger.clone(), options)
        .unwrap()
        .with_alerts(alerts.clone());
    projection.register().await.unwrap();
    drain(&projection).await;

    // The sick account stopped at version 1; the others flowed on.
    let model = read_model(&db).await;
    assert_eq!(versions(&model, sick), [1]);
    assert_eq!(versions(&model, well_a), [1, 2, 3, 4, 5]);
    assert_eq!(versions(&model, well_b), [1, 2, 3, 4, 5]);
    assert_eq!(
        ledger.shared.attempts.lock().unwrap()[&poison],
        1,
        "a permanent failure is not retried"
    );

    let letters = dlq::list(&db.pool, "balances", None).await.unwrap();
    let summary: Vec<_> = letters
        .iter()
        .map(|l| (l.event_id, l.version, l.state, l.attempts))
        .collect();
    assert_eq!(
        summary,
        [
            (poison, 2, DeadLetterState::Failed, 1),
            (sick3, 3, DeadLetterState::Parked, 0),
            (sick4, 4, DeadLetterState::Parked, 0),
        ]
    );
    assert_eq!(letters[0].error.as_deref(), Some("poison event"));
    {
        let alerts = alerts.0.lock().unwrap();
        assert!(
            matches!(&alerts[..], [Alert::DeadLettered { event_id, version: 2, .. }] if *event_id == poison),
            "one dead-letter alert: {alerts:?}"
        );
    }

    // Later events of the sick account keep parking, in order; the others
    // still advance; nothing is parked twice.
    let sick5 = append_one(&db, sick, json!({ "amount": 5 })).await;
    append_one(&db, well_a, json!({ "amount": 9 })).await;
    drain(&projection).await;
    drain(&projection).await;
    assert_eq!(versions(&read_model(&db).await, well_a), [1, 2, 3, 4, 5, 6]);
    let letters = dlq::list(&db.pool, "balances", Some(sick)).await.unwrap();
    assert_eq!(
        letters.iter().map(|l| l.version).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert_eq!(dlq::count(&db.pool, "balances").await.unwrap(), 4);
    let health = projection.health().await.unwrap();
    assert_eq!(health.dead_letters, 4);

    // Retrying before the fix fails again at the head; nothing moves.
    let report = projection.dlq_retry(sick).await.unwrap();
    assert!(report.delivered.is_empty());
    assert_eq!(report.remaining, 4);
    assert_eq!(report.error.as_deref(), Some("poison event"));
    let head = &dlq::list(&db.pool, "balances", Some(sick)).await.unwrap()[0];
    assert_eq!(
        (head.event_id, head.state, head.attempts),
        (poison, DeadLetterState::Failed, 2)
    );
    assert_eq!(versions(&read_model(&db).await, sick), [1]);

    // After the fix, retry delivers the parked sequence in order.
    ledger.shared.fixed.store(true, Ordering::SeqCst);
    let report = projection.dlq_retry(sick).await.unwrap();
    assert_eq!(report.delivered, [poison, sick3, sick4, sick5]);
    assert_eq!((report.remaining, report.error), (0, None));
    assert_eq!(versions(&read_model(&db).await, sick), [1, 2, 3, 4, 5]);
    assert_eq!(dlq::count(&db.pool, "balances").await.unwrap(), 0);
    assert!(matches!(
        projection.dlq_retry(sick).await,
        Err(Error::NoDeadLetters { .. })
    ));

    // The account flows normally again.
    append_one(&db, sick, json!({ "amount": 6 })).await;
    drain(&projection).await;
    let model = read_model(&db).await;
    assert_eq!(versions(&model, sick), [1, 2, 3, 4, 5, 6]);
    assert_eq!(model[&sick].0, 1 + 2 + 3 + 4 + 5 + 6);
    let processed = events_processed(&db, projection.name()).await;
    assert_eq!(processed, 17, "every event counted once");
}

#[tokio::test]
async fn discard_drops_the_failed_event_and_delivers_the_parked_ones() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let account = Uuid::now_v7();
    append_one(&db, account, json!({ "amount": 1 })).await;
    let poison = append_one(&db, account, json!({ "amount": 100, "poison": true })).await;
    let third = append_one(&db, account, json!({ "amount": 3 })).await;
    let options = ProjectionOptions {
        partitions: 1,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), Ledger::new("discard"), options).unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;
    let report = projection.dlq_discard(account).await.unwrap();
    assert_eq!(
        (report.discarded, report.delivered),
        (vec![poison], vec![third])
    );
    let model = read_model(&db).await;
    assert_eq!(model[&account], (4, vec![1, 3]));
    assert_eq!(dlq::count(&db.pool, "discard").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_while_a_runner_tails_the_aggregate_keeps_its_order() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use chronicle_projections::{Runner, RunnerOptions};

    use crate::ledger::{expected_model, wait_until_processed};

    let db = fresh_db().await;
    create_read_model(&db).await;
    let sick = Uuid::now_v7();
    let others: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    append_one(&db, sick, json!({ "amount": 1, "poison": true })).await;
    let ledger = Ledger::new("tailing");
    let projection = Arc::new(
        PgProjection::new(
            db.pool.clone(),
            ledger.clone(),
            ProjectionOptions {
                partitions: 3,
                batch_size: 7,
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
    // A writer keeps appending to the sick account (and others) while the
    // operator fixes the handler and retries.
    let writer = {
        let db_pool = db.pool.clone();
        let others = others.clone();
        tokio::spawn(async move {
            let store = chronicle_postgres::PgEventStore::new(db_pool);
            for i in 0..60u32 {
                for id in std::iter::once(&sick).chain(&others) {
                    chronicle_core::EventAppender::append(
                        &store,
                        *id,
                        "account",
                        chronicle_core::ExpectedVersion::Any,
                        vec![chronicle_core::NewEvent::new(
                            "Deposited",
                            json!({ "amount": i }),
                        )],
                    )
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dlq::count(&db.pool, "tailing").await.unwrap() < 3 {
        assert!(Instant::now() < deadline, "nothing was parked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ledger.shared.fixed.store(true, Ordering::SeqCst);
    let report = projection.dlq_retry(sick).await.unwrap();
    assert!(
        report.delivered.len() >= 3 && report.error.is_none(),
        "{report:?}"
    );
    writer.await.unwrap();
    // 61 events for the sick account, 60 for each other one.
    wait_until_processed(&db, "tailing", 61 + 5 * 60, Duration::from_secs(60)).await;
    runner.stop().await;

    assert_eq!(
        dlq::count(&db.pool, "tailing").await.unwrap(),
        0,
        "nothing stays parked"
    );
    let model = read_model(&db).await;
    assert_eq!(
        versions(&model, sick),
        (1..=61).collect::<Vec<_>>(),
        "in order, once"
    );
    assert_eq!(model, expected_model(&db).await);
}

/// A handler whose batch call panics when a batch holds a poison event:
/// the runtime cannot tell which event failed and must find it one by one.
struct PanickyBatches(Ledger);

#[async_trait::async_trait]
impl chronicle_core::ProjectionHandler<chronicle_projections::PgContext> for PanickyBatches {
    fn name(&self) -> &str {
        "panicky"
    }

    async fn handle(
        &self,
        event: &chronicle_core::EventEnvelope,
        ctx: &mut chronicle_projections::PgContext,
    ) -> chronicle_core::ProjectionResult {
        self.0.handle(event, ctx).await
    }

    async fn handle_batch(
        &self,
        events: &[chronicle_core::EventEnvelope],
        ctx: &mut chronicle_projections::PgContext,
    ) -> Vec<chronicle_core::ProjectionResult> {
        let mut results = Vec::new();
        for event in events {
            // Write first, then blow up: the batch must be rolled back.
            results.push(self.0.handle(event, ctx).await);
            assert!(event.event_data["poison"] != json!(true), "batch poisoned");
        }
        results
    }
}

#[tokio::test]
async fn a_batch_that_fails_without_naming_the_event_is_replayed_event_by_event() {
    use chronicle_core::ProjectionHandler as _;

    let db = fresh_db().await;
    create_read_model(&db).await;
    let (sick, well) = (Uuid::now_v7(), Uuid::now_v7());
    append_one(&db, well, json!({ "amount": 1 })).await;
    append_one(&db, sick, json!({ "amount": 2 })).await;
    let poison = append_one(&db, sick, json!({ "amount": 3, "poison": true })).await;
    append_one(&db, well, json!({ "amount": 4 })).await;
    let parked = append_one(&db, sick, json!({ "amount": 5 })).await;
    let ledger = Ledger::new("panicky");
    let handler = PanickyBatches(ledger.clone());
    assert_eq!(handler.name(), "panicky");
    let projection = PgProjection::new(
        db.pool.clone(),
        handler,
        ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    let out = drain(&projection).await;
    assert_eq!((out.handled, out.dead_lettered, out.parked), (3, 1, 1));
    let model = read_model(&db).await;
    assert_eq!(model[&well], (5, vec![1, 2]));
    assert_eq!(
        model[&sick],
        (2, vec![1]),
        "the panicking batch's writes were rolled back"
    );
    let letters = dlq::list(&db.pool, "panicky", None).await.unwrap();
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.event_id, l.state, l.error.clone()))
            .collect::<Vec<_>>(),
        [
            (
                poison,
                DeadLetterState::Failed,
                Some("poison event".to_owned())
            ),
            (parked, DeadLetterState::Parked, None),
        ]
    );
}

/// Partitions stepped in turn by one worker, through small windows full of
/// the other partitions' events: the read model comes out right, every
/// aggregate in order, and a poison event parks its aggregate's later
/// events, however the windows cut them.
#[tokio::test]
async fn partitions_stepped_in_turn_keep_order_and_park_behind_dead_letters() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let ids = crate::ledger::deposit(&db, 40, 3).await;
    let sick = ids[7];
    let poison = append_one(&db, sick, json!({ "amount": 100, "poison": true })).await;
    let mut later = Vec::new();
    crate::ledger::append_more(&db, &ids, 3).await;
    for amount in [1000, 2000] {
        later.push(append_one(&db, sick, json!({ "amount": amount })).await);
    }
    crate::ledger::wait_for_horizon(&db).await;

    let ledger = Ledger::new("lockstep");
    let options = ProjectionOptions {
        partitions: 4,
        batch_size: 8,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap();
    projection.register().await.unwrap();
    let mut rounds = 0;
    loop {
        let mut done = true;
        for partition in 0..4 {
            let out = projection.step(partition, "worker-1").await.unwrap();
            done &= out.caught_up && out.lag_events == 0;
        }
        if done {
            break;
        }
        rounds += 1;
        assert!(rounds < 100, "never caught up");
    }
    assert!(rounds > 3, "the windows were small enough to take turns");

    let model = read_model(&db).await;
    for id in &ids {
        if *id == sick {
            // Its first three deposits, then the poison: stopped there.
            assert_eq!(versions(&model, *id), [1, 2, 3], "{id}");
        } else {
            assert_eq!(versions(&model, *id), [1, 2, 3, 4, 5, 6], "{id}");
        }
    }
    let letters = dlq::list(&db.pool, "lockstep", Some(sick)).await.unwrap();
    let states: Vec<_> = letters.iter().map(|l| (l.event_id, l.state)).collect();
    assert_eq!(states[0], (poison, DeadLetterState::Failed));
    assert_eq!(states.len(), 1 + 3 + later.len(), "{states:?}");
    assert!(
        states[1..]
            .iter()
            .all(|(_, s)| *s == DeadLetterState::Parked),
        "{states:?}"
    );
    let handled = events_processed(&db, projection.name()).await;
    // Every deposit once, but the sick account's three behind the poison.
    assert_eq!(handled, 40 * 6 - 3);
}
