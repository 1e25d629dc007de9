//! Appends and reads: the scenarios, each run directly and through PgBouncer.

use chronicle_core::{
    Error, EventAppender, EventReader, ExpectedVersion, Metadata, NewEvent, Position, TimeRange,
};
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestDb, event_count, fresh_db, fresh_db_via_pgbouncer};

/// Declares a test that runs directly, and its twin through PgBouncer.
macro_rules! scenario {
    ($name:ident, $via:ident) => {
        #[tokio::test]
        async fn $name() {
            scenarios::$name(fresh_db().await).await;
        }

        #[tokio::test]
        async fn $via() {
            scenarios::$name(fresh_db_via_pgbouncer().await).await;
        }
    };
}

scenario!(
    single_and_multi_event_appends,
    single_and_multi_event_appends_via_pgbouncer
);

/// Captures what is logged, for the checks of a log line.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prepared statements through a PgBouncer that cannot keep them (1.18, in
/// transaction mode, without `statement_cache=off` in the URL): the store
/// notices the first lost or clashing statement (SQLSTATE 42P05 or 26000),
/// says so once, and every append goes through with unnamed statements.
#[tokio::test]
async fn an_old_pgbouncer_is_detected_and_appends_fall_back_to_unnamed_statements() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let db = fresh_db_via_pgbouncer().await;
    let mut options = chronicle_postgres::PgOptions::from_url(&db.url).unwrap();
    options.max_connections(4);
    let store = chronicle_postgres::PgEventStore::new(options.pool().unwrap());
    assert!(store.caches_statements(), "on unless the URL says off");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = Uuid::now_v7();
                for v in 0..25u32 {
                    let expected = match v {
                        0 => ExpectedVersion::NoStream,
                        v => ExpectedVersion::Exact(v),
                    };
                    let events = vec![event("Noted", json!({ "v": v }))];
                    store.append(id, "note", expected, events).await?;
                }
                Ok::<_, Error>(id)
            })
        })
        .collect();
    for t in tasks {
        let id = t.await.unwrap().expect("every append goes through");
        assert_eq!(store.read_stream(id, 1, None).await.unwrap().len(), 25);
    }
    assert!(!store.caches_statements(), "the pooler was detected");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let said = text
        .matches("sending unnamed statements from now on")
        .count();
    assert_eq!(said, 1, "one log line, not {said}:\n{text}");
    assert!(text.contains("add statement_cache=off"), "{text}");
    assert_eq!(event_count(&db).await, 100);
}
scenario!(
    conflicts_carry_the_actual_version,
    conflicts_carry_the_actual_version_via_pgbouncer
);
scenario!(
    reappending_the_same_ids_is_idempotent,
    reappending_the_same_ids_is_idempotent_via_pgbouncer
);
scenario!(
    bad_input_is_refused_and_nothing_is_stored,
    bad_input_is_refused_and_nothing_is_stored_via_pgbouncer
);
scenario!(
    reads_by_range_type_time_and_feed,
    reads_by_range_type_time_and_feed_via_pgbouncer
);
scenario!(
    status_reports_head_and_count,
    status_reports_head_and_count_via_pgbouncer
);

fn event(ty: &str, data: serde_json::Value) -> NewEvent {
    NewEvent::new(ty, data)
}

mod scenarios {
    use super::*;

    pub async fn single_and_multi_event_appends(db: TestDb) {
        let store = &db.store;
        let id = Uuid::now_v7();
        let correlation = Uuid::now_v7();
        let first = event("Registered", json!({ "email": "ada@example.com" })).with_metadata(
            Metadata::default()
                .with_correlation_id(correlation)
                .with_causation_id(correlation)
                .with_actor("signup")
                .with_schema_version(2),
        );
        let first_id = first.event_id;
        assert_eq!(first_id.get_version_num(), 7, "event ids default to UUIDv7");
        let out = store
            .append(id, "user", ExpectedVersion::NoStream, vec![first])
            .await
            .unwrap();
        assert_eq!((out.version, out.appended), (1, true));

        let batch: Vec<_> = (0..3)
            .map(|i| event("Renamed", json!({ "name": format!("n{i}") })))
            .collect();
        let out = store
            .append(id, "user", ExpectedVersion::Exact(1), batch)
            .await
            .unwrap();
        assert_eq!(out.version, 4);

        let events = store.read_stream(id, 1, None).await.unwrap();
        let versions: Vec<u32> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, vec![1, 2, 3, 4]);
        let e = &events[0];
        assert_eq!(e.event_id, first_id);
        assert_eq!(e.aggregate_type, "user");
        assert_eq!(e.event_type, "Registered");
        assert_eq!(e.event_data, json!({ "email": "ada@example.com" }));
        assert_eq!(e.metadata.correlation_id, Some(correlation));
        assert_eq!(e.metadata.causation_id, Some(correlation));
        assert_eq!(e.metadata.actor.as_deref(), Some("signup"));
        assert_eq!(e.metadata.schema_version, 2);
        assert!(e.timestamp <= Utc::now());
        // The batch shares one transaction and is in position order.
        let tail = &events[1..];
        assert!(tail.windows(2).all(|w| w[0].position < w[1].position
            && w[0].position.transaction_id == w[1].position.transaction_id));

        let out = store
            .append(
                id,
                "user",
                ExpectedVersion::Any,
                vec![event("Touched", json!({}))],
            )
            .await
            .unwrap();
        assert_eq!(out.version, 5);
    }

    pub async fn conflicts_carry_the_actual_version(db: TestDb) {
        let store = &db.store;
        let id = Uuid::now_v7();
        store
            .append(
                id,
                "user",
                ExpectedVersion::NoStream,
                vec![event("A", json!({})), event("B", json!({}))],
            )
            .await
            .unwrap();
        for expected in [
            ExpectedVersion::NoStream,
            ExpectedVersion::Exact(1),
            ExpectedVersion::Exact(12),
        ] {
            match store
                .append(id, "user", expected, vec![event("C", json!({}))])
                .await
            {
                Err(Error::Conflict {
                    aggregate_id,
                    expected: e,
                    actual,
                }) => {
                    assert_eq!((aggregate_id, e, actual), (id, expected, 2));
                }
                other => panic!("expected a conflict for {expected}, got {other:?}"),
            }
        }
        // A conflict at a two-digit version is still typed (some peers parse messages).
        for _ in 0..10 {
            store
                .append(
                    id,
                    "user",
                    ExpectedVersion::Any,
                    vec![event("C", json!({}))],
                )
                .await
                .unwrap();
        }
        let err = store
            .append(
                id,
                "user",
                ExpectedVersion::Exact(11),
                vec![event("C", json!({}))],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { actual: 12, .. }), "{err:?}");
        assert_eq!(event_count(&db).await, 12);
    }

    pub async fn reappending_the_same_ids_is_idempotent(db: TestDb) {
        let store = &db.store;
        let id = Uuid::now_v7();
        let batch = vec![event("A", json!({ "n": 1 })), event("B", json!({ "n": 2 }))];
        let first = store
            .append(id, "user", ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap();
        assert!(first.appended);
        // A retry of the same append (say after a lost acknowledgement) succeeds
        // with the same outcome and writes nothing.
        let again = store
            .append(id, "user", ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap();
        assert_eq!((again.version, again.appended), (2, false));
        assert_eq!(event_count(&db).await, 2);

        // Only part of a batch already stored: refused, nothing written.
        let mixed = vec![event("C", json!({})), batch[0].clone()];
        let err = store
            .append(id, "user", ExpectedVersion::Exact(2), mixed)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::DuplicateEventId { event_id } if event_id == batch[0].event_id),
            "{err:?}"
        );
        // The same id in another aggregate: refused.
        let err = store
            .append(
                Uuid::now_v7(),
                "user",
                ExpectedVersion::Any,
                vec![batch[1].clone()],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateEventId { .. }), "{err:?}");
        assert_eq!(event_count(&db).await, 2);
    }

    pub async fn bad_input_is_refused_and_nothing_is_stored(db: TestDb) {
        let mut store = db.store.clone();
        store.max_payload_bytes(1024);
        let id = Uuid::now_v7();
        let ok = || event("Fine", json!({ "a": 1 }));
        let cases: Vec<(&str, Uuid, String, Vec<NewEvent>)> = vec![
            ("aggregate_id", Uuid::nil(), "user".into(), vec![ok()]),
            ("aggregate_type", id, "x".repeat(51), vec![ok()]),
            ("aggregate_type", id, String::new(), vec![ok()]),
            ("events", id, "user".into(), vec![]),
            (
                "events[1].event_type",
                id,
                "user".into(),
                vec![ok(), event(&"t".repeat(101), json!({}))],
            ),
            (
                "events[2].event_data",
                id,
                "user".into(),
                vec![ok(), ok(), event("Arr", json!([1, 2]))],
            ),
            (
                "events[0].event_data",
                id,
                "user".into(),
                vec![event("Str", json!("text"))],
            ),
            (
                "events[1].event_data",
                id,
                "user".into(),
                vec![ok(), event("Big", json!({ "blob": "x".repeat(2000) }))],
            ),
            (
                "events[0].event_data",
                id,
                "user".into(),
                vec![event("Nul", json!({ "s": "a\u{0}b" }))],
            ),
            (
                "events[1].event_id",
                id,
                "user".into(),
                vec![ok(), ok().with_id(Uuid::nil())],
            ),
        ];
        for (field, aggregate, ty, events) in cases {
            let err = store
                .append(aggregate, &ty, ExpectedVersion::Any, events)
                .await
                .unwrap_err();
            match &err {
                Error::Invalid(v) => assert_eq!(v.field, field, "{err}"),
                other => panic!("expected a validation error on {field}, got {other:?}"),
            }
            assert!(
                err.to_string().contains(field),
                "the message names the field: {err}"
            );
        }
        let twice = ok();
        let err = store
            .append(id, "user", ExpectedVersion::Any, vec![twice.clone(), twice])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Invalid(v) if v.field == "events[1].event_id"),
            "{err:?}"
        );
        assert_eq!(
            event_count(&db).await,
            0,
            "nothing of any refused batch is stored"
        );

        // 50 and 100 characters (not bytes) are fine.
        store
            .append(
                id,
                &"é".repeat(50),
                ExpectedVersion::NoStream,
                vec![event(&"é".repeat(100), json!({}))],
            )
            .await
            .unwrap();
        assert_eq!(event_count(&db).await, 1);
    }

    pub async fn reads_by_range_type_time_and_feed(db: TestDb) {
        let store = &db.store;
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        for i in 0..5 {
            store
                .append(
                    a,
                    "order",
                    ExpectedVersion::Any,
                    vec![event("Placed", json!({ "i": i }))],
                )
                .await
                .unwrap();
        }
        let middle = Utc::now();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        for i in 0..3 {
            store
                .append(
                    b,
                    "order",
                    ExpectedVersion::Any,
                    vec![event("Shipped", json!({ "i": i }))],
                )
                .await
                .unwrap();
        }
        store
            .append(
                a,
                "order",
                ExpectedVersion::Any,
                vec![event("Shipped", json!({ "i": 9 }))],
            )
            .await
            .unwrap();

        let range: Vec<u32> = store
            .read_stream(a, 2, Some(4))
            .await
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(range, vec![2, 3, 4]);
        assert!(
            store
                .read_stream(Uuid::now_v7(), 1, None)
                .await
                .unwrap()
                .is_empty()
        );

        let as_of = store.read_stream_as_of(a, middle).await.unwrap();
        assert_eq!(as_of.len(), 5, "the Shipped event came after `middle`");

        let shipped = store
            .read_by_type("Shipped", TimeRange::default(), 100)
            .await
            .unwrap();
        assert_eq!(shipped.len(), 4);
        let early = store
            .read_by_type(
                "Placed",
                TimeRange {
                    from: None,
                    to: Some(middle),
                },
                100,
            )
            .await
            .unwrap();
        assert_eq!(early.len(), 5);
        let late = store
            .read_by_type(
                "Placed",
                TimeRange {
                    from: Some(middle),
                    to: None,
                },
                100,
            )
            .await
            .unwrap();
        assert!(late.is_empty());

        // The feed, in pages, resumable from the printed checkpoint. Open
        // transactions of other tests on the cluster may hold the horizon
        // back for a moment: keep reading until all 9 arrive.
        let mut after = Position::START;
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while seen.len() < 9 {
            let batch = store.read_all(after, 3).await.unwrap();
            if batch.events.is_empty() {
                assert_eq!(batch.next, after);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the feed stalled at {after}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
            seen.extend(batch.events.iter().map(|e| e.position));
            after = batch.next.to_string().parse().unwrap();
        }
        assert!(
            store.read_all(after, 3).await.unwrap().events.is_empty(),
            "nothing past the last event"
        );
        assert_eq!(seen.len(), 9);
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "feed order is strictly increasing"
        );
    }

    pub async fn status_reports_head_and_count(db: TestDb) {
        let status = db.store.status().await.unwrap();
        assert_eq!(status.event_count, 0);
        assert_eq!(status.head, None);
        assert_eq!(status.schema_version, status.binary_schema_version);
        let id = Uuid::now_v7();
        db.store
            .append(
                id,
                "x",
                ExpectedVersion::NoStream,
                vec![event("A", json!({}))],
            )
            .await
            .unwrap();
        let status = db.store.status().await.unwrap();
        assert_eq!(status.event_count, 1);
        let last = db.store.read_stream(id, 1, None).await.unwrap()[0].position;
        assert_eq!(status.head, Some(last));
        // The horizon passes the committed append once no older transaction
        // (of any test on this cluster) is open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while db.store.status().await.unwrap().feed_horizon <= last.transaction_id {
            assert!(
                std::time::Instant::now() < deadline,
                "the feed horizon never passed {last}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
