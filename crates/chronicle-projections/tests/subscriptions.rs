//! Subscriptions: a projection reads only the events it takes, its
//! checkpoint still passes the others, lag counts only its own, and a
//! changed subscription is refused until a rebuild records it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, ExpectedVersion, NewEvent, Position, ProjectionHandler,
    ProjectionResult, Subscription,
};
use chronicle_projections::{Error, PgContext, PgProjection, ProjectionOptions};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{drain, wait_for_horizon};
use crate::support::{TestDb, fresh_db};

/// Records every event it is handed, with its own subscription.
#[derive(Clone)]
struct Recorder {
    name: &'static str,
    subscription: Subscription,
    seen: Arc<Mutex<Vec<EventEnvelope>>>,
}

impl Recorder {
    fn new(name: &'static str, subscription: Subscription) -> Self {
        Recorder {
            name,
            subscription,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<EventEnvelope> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl ProjectionHandler<PgContext> for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    fn subscription(&self) -> Subscription {
        self.subscription.clone()
    }

    async fn handle(&self, event: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        self.seen.lock().unwrap().push(event.clone());
        ProjectionResult::Done
    }
}

/// Accounts get `Deposited` and `Withdrawn` in turn, users `Registered` and
/// `Renamed`; appended interleaved so that every window mixes them.
/// Returns every stored event as (aggregate type, event type, aggregate id,
/// version).
async fn mixed_store(db: &TestDb, aggregates: usize, per_aggregate: u32) -> Vec<Stored> {
    let mut stored = Vec::new();
    let ids: Vec<(Uuid, &str)> = (0..aggregates)
        .map(|i| (Uuid::now_v7(), if i % 3 == 0 { "user" } else { "account" }))
        .collect();
    for version in 1..=per_aggregate {
        for (id, aggregate_type) in &ids {
            let event_type = match (*aggregate_type, version % 2) {
                ("user", 1) => "Registered",
                ("user", _) => "Renamed",
                (_, 1) => "Deposited",
                _ => "Withdrawn",
            };
            db.store
                .append(
                    *id,
                    aggregate_type,
                    ExpectedVersion::Exact(version - 1),
                    vec![NewEvent::new(event_type, json!({ "n": version }))],
                )
                .await
                .unwrap();
            stored.push(Stored {
                aggregate_type: aggregate_type.to_string(),
                event_type: event_type.to_owned(),
                aggregate_id: *id,
                version,
            });
        }
    }
    wait_for_horizon(db).await;
    stored
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    aggregate_type: String,
    event_type: String,
    aggregate_id: Uuid,
    version: u32,
}

/// Checks that `seen` holds exactly the events of `stored` that
/// `subscription` takes, each once, every aggregate's in version order.
fn assert_exactly_subscribed(
    seen: &[EventEnvelope],
    stored: &[Stored],
    subscription: &Subscription,
) {
    let expected: HashSet<(Uuid, u32)> = stored
        .iter()
        .filter(|s| subscription.matches(&s.event_type, &s.aggregate_type))
        .map(|s| (s.aggregate_id, s.version))
        .collect();
    assert!(!expected.is_empty(), "the case takes some events");
    let mut got = HashSet::new();
    let mut last: BTreeMap<Uuid, u32> = BTreeMap::new();
    for e in seen {
        assert!(
            subscription.matches(&e.event_type, &e.aggregate_type),
            "{subscription}: handed {} of a {}",
            e.event_type,
            e.aggregate_type
        );
        assert!(
            got.insert((e.aggregate_id, e.version)),
            "handed twice: {e:?}"
        );
        let before = last.insert(e.aggregate_id, e.version).unwrap_or(0);
        assert!(
            before < e.version,
            "out of order: {before} then {}",
            e.version
        );
    }
    assert_eq!(got, expected, "{subscription}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_is_handed_exactly_the_events_it_subscribes_to() {
    let db = fresh_db().await;
    let stored = mixed_store(&db, 30, 8).await;
    let cases = [
        (
            "by-aggregate",
            Subscription::all().with_aggregate_types(["user"]),
        ),
        // Every other version of each account: the order check meets gaps.
        (
            "by-event",
            Subscription::all().with_event_types(["Deposited"]),
        ),
        (
            "by-both",
            Subscription::all()
                .with_event_types(["Registered", "Deposited", "Withdrawn"])
                .with_aggregate_types(["account"]),
        ),
        (
            "nothing-matches",
            Subscription::all().with_event_types(["Unknown"]),
        ),
    ];
    for partitions in [1, 3] {
        for (name, subscription) in &cases {
            let name: &'static str = Box::leak(format!("{name}-{partitions}").into_boxed_str());
            let recorder = Recorder::new(name, subscription.clone());
            let options = ProjectionOptions {
                partitions,
                // Small windows: many steps, each passing unrelated events.
                batch_size: 7,
                ..ProjectionOptions::default()
            };
            let projection = PgProjection::new(db.pool.clone(), recorder.clone(), options).unwrap();
            projection.register().await.unwrap();
            let total = drain(&projection).await;
            let seen = recorder.seen();
            if *name == format!("nothing-matches-{partitions}") {
                assert!(seen.is_empty());
            } else {
                assert_exactly_subscribed(&seen, &stored, subscription);
            }
            assert_eq!(total.handled as usize, seen.len());
            let state = projection.state().await.unwrap();
            assert_eq!(
                state.iter().map(|s| s.events_processed).sum::<u64>() as usize,
                seen.len()
            );
            for s in &state {
                assert_eq!(&s.subscription, subscription, "recorded");
                assert_eq!((s.lag_events, s.lag_seconds), (0, 0.0), "{name}: {s:?}");
                assert!(
                    s.checkpoint > Position::START,
                    "{name}: the checkpoint passed the feed even with nothing taken"
                );
            }
        }
    }
}

#[tokio::test]
async fn lag_counts_only_the_subscribed_events() {
    let db = fresh_db().await;
    let deposits = Subscription::all().with_event_types(["Deposited"]);
    let recorder = Recorder::new("lag", deposits.clone());
    let options = ProjectionOptions {
        partitions: 1,
        batch_size: 5,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), recorder.clone(), options).unwrap();
    projection.register().await.unwrap();
    // 20 deposits among 180 other events.
    for i in 0..200u32 {
        let event_type = if i % 10 == 0 { "Deposited" } else { "Viewed" };
        db.store
            .append(
                Uuid::now_v7(),
                "account",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(event_type, json!({ "i": i }))],
            )
            .await
            .unwrap();
    }
    wait_for_horizon(&db).await;
    let first = projection.step(0, "worker-1").await.unwrap();
    assert_eq!(first.handled, 5);
    assert!(!first.caught_up);
    assert_eq!(
        first.lag_events, 15,
        "15 deposits wait; the 180 other events are not lag"
    );
    assert!(first.lag_seconds > 0.0);
    let rest = drain(&projection).await;
    assert_eq!(rest.handled, 15);
    assert_eq!(recorder.seen().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_subscription_needs_a_rebuild_which_records_it() {
    let db = fresh_db().await;
    let stored = mixed_store(&db, 12, 4).await;
    let users = Subscription::all().with_aggregate_types(["user"]);
    let accounts = Subscription::all().with_aggregate_types(["account"]);
    let options = ProjectionOptions {
        partitions: 2,
        ..ProjectionOptions::default()
    };
    let old = Recorder::new("model", users.clone());
    let running = PgProjection::new(db.pool.clone(), old.clone(), options.clone()).unwrap();
    running.register().await.unwrap();
    drain(&running).await;
    assert_exactly_subscribed(&old.seen(), &stored, &users);

    // The deployment overrides the handler's subscription.
    let new = Recorder::new("model", users.clone());
    let changed = PgProjection::new(
        db.pool.clone(),
        new.clone(),
        ProjectionOptions {
            subscription: Some(accounts.clone()),
            ..options.clone()
        },
    )
    .unwrap();
    assert_eq!(changed.subscription(), &accounts);
    let err = changed.register().await.unwrap_err();
    assert!(matches!(err, Error::SubscriptionChanged { .. }), "{err}");
    let message = err.to_string();
    for needle in [
        "every event of aggregate type user",
        "every event of aggregate type account",
        "chronicle projections rebuild model",
    ] {
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(
        running.state().await.unwrap()[0].subscription,
        users,
        "nothing stored changed"
    );

    changed.rebuild(Position::START).await.unwrap();
    changed.register().await.unwrap();
    // A worker still running the old handler stops instead of writing.
    let err = running.step(0, "worker-1").await.unwrap_err();
    assert!(matches!(err, Error::SubscriptionChanged { .. }), "{err}");
    drain(&changed).await;
    assert_exactly_subscribed(&new.seen(), &stored, &accounts);
    for s in changed.state().await.unwrap() {
        assert_eq!(s.subscription, accounts);
    }
}

/// A projection registered before subscriptions existed (its rows carry
/// none) took every event: a handler that subscribes now needs a rebuild,
/// one that takes everything runs on.
#[tokio::test]
async fn rows_without_a_subscription_mean_every_event() {
    let db = fresh_db().await;
    let everything = Recorder::new("legacy", Subscription::all());
    let projection =
        PgProjection::new(db.pool.clone(), everything, ProjectionOptions::default()).unwrap();
    projection.register().await.unwrap();
    let stored: Option<serde_json::Value> = db
        .pool
        .get()
        .await
        .unwrap()
        .query_typed_one(
            "SELECT subscription FROM projection_state WHERE projection = 'legacy' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, None, "every event is stored as NULL");
    projection.register().await.unwrap();
    let narrower = Recorder::new("legacy", Subscription::all().with_event_types(["A"]));
    let err = PgProjection::new(db.pool.clone(), narrower, ProjectionOptions::default())
        .unwrap()
        .register()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("built from every event"), "{err}");
}

#[tokio::test]
async fn an_impossible_subscription_is_refused_before_anything_runs() {
    let db = fresh_db().await;
    let empty_name = Recorder::new("bad", Subscription::all().with_event_types([""]));
    let err =
        PgProjection::new(db.pool.clone(), empty_name, ProjectionOptions::default()).unwrap_err();
    assert!(err.to_string().contains("empty event type"), "{err}");
    let long = "x".repeat(51);
    let options = ProjectionOptions {
        subscription: Some(Subscription::all().with_aggregate_types([long.as_str()])),
        ..ProjectionOptions::default()
    };
    let err = PgProjection::new(
        db.pool.clone(),
        Recorder::new("bad", Subscription::all()),
        options,
    )
    .unwrap_err();
    assert!(err.to_string().contains("50 characters"), "{err}");
}

/// The feed hands out an aggregate's version 2 before its version 1 (an
/// append inside a transaction that had already written); a subscription
/// still stops the partition instead of applying them out of order.
#[tokio::test]
async fn out_of_order_versions_stop_a_subscribed_partition() {
    for (name, subscription) in [
        (
            "order-by-event",
            Subscription::all().with_event_types(["Deposited"]),
        ),
        (
            "order-by-aggregate",
            Subscription::all().with_aggregate_types(["account"]),
        ),
    ] {
        let db = fresh_db().await;
        let account = Uuid::now_v7();
        crate::ledger::append_out_of_order(&db, account).await;

        let recorder = Recorder::new(name, subscription);
        let options = ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        };
        let projection = PgProjection::new(db.pool.clone(), recorder.clone(), options).unwrap();
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
            "{name}: {err}"
        );
        assert!(recorder.seen().is_empty(), "{name}: nothing handled");
        assert_eq!(
            projection.state().await.unwrap()[0].status,
            chronicle_core::ProjectionStatus::Failed
        );
    }
}
