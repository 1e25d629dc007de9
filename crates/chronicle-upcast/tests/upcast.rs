//! Eager runs (plan, run, crash and resume, verify, rollback), validation
//! failures, concurrent writers, and eager against lazy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, EventReader, ExpectedVersion, Metadata, NewEvent, Position,
};
use chronicle_postgres::testing::{
    TestDb, empty_db, event_count, fresh_db, fresh_db_via_pgbouncer,
};
use chronicle_postgres::{MigrateOptions, migrate};
use chronicle_upcast::{
    Error, FieldCipher, FnUpcaster, PgUpcaster, RunError, RunStatus, UpcastConfig, UpcastEvent,
    UpcastFailure, UpcasterChain, UpcastingReader,
};
use serde_json::{Value, json};
use uuid::Uuid;

const V1_TO_V2: &str = r#"
upcasters:
  - event_type: ItemAdded
    from: 1
    steps:
      - rename: { from: /name, to: /title }
      - add: { path: /qty, default: 1 }
"#;

/// ItemAdded v1 -> v2 (YAML) -> v3 (Rust: price in cents), with a JSON
/// Schema for v3. While `fail` is set, the v2 -> v3 step fails on the
/// event with `"n": 150`.
pub(crate) fn chain(fail: Arc<AtomicBool>) -> UpcasterChain {
    UpcasterChain::builder()
        .config(UpcastConfig::from_yaml("up.yaml", V1_TO_V2).unwrap())
        .upcaster(FnUpcaster::new("ItemAdded", 2, move |event| {
            if fail.load(Ordering::SeqCst) && event.data["n"] == 150 {
                return Err(UpcastFailure::new("injected failure").at("/n"));
            }
            let data = event.data.as_object_mut().expect("an object");
            let price = data.remove("price").unwrap_or(Value::Null);
            let cents = match price.as_f64() {
                Some(p) => json!((p * 100.0).round() as i64),
                None => price,
            };
            data.insert("price_cents".into(), cents);
            Ok(())
        }))
        .schema(
            "ItemAdded",
            3,
            json!({
                "type": "object",
                "required": ["title", "qty", "price_cents"],
                "properties": { "price_cents": { "type": "integer" } }
            }),
        )
        .build()
        .unwrap()
}

fn v1(n: u64) -> NewEvent {
    NewEvent::new(
        "ItemAdded",
        json!({ "name": format!("item {n}"), "price": (n as f64) / 4.0, "n": n }),
    )
}

/// Appends `n` ItemAdded v1 events (numbered from `start`) over aggregates
/// of 10, every 7th aggregate also getting a v2 event and an unrelated one.
pub(crate) async fn seed(db: &TestDb, start: u64, n: u64) {
    let mut i = start;
    while i < start + n {
        let mut events: Vec<NewEvent> = (i..(i + 10).min(start + n)).map(v1).collect();
        if i.is_multiple_of(70) {
            events.push(
                NewEvent::new(
                    "ItemAdded",
                    json!({ "title": "already v2", "qty": 2, "price": 1.5, "n": -1 }),
                )
                .with_metadata(
                    Metadata::default()
                        .with_schema_version(2)
                        .with_actor("seed"),
                ),
            );
            events.push(NewEvent::new("CartOpened", json!({ "by": "seed" })));
        }
        i += 10;
        db.store
            .append(Uuid::now_v7(), "Cart", ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
}

/// Every row as PostgreSQL prints it, in feed order.
pub(crate) async fn snapshot(
    db: &TestDb,
) -> Vec<(Uuid, String, String, Option<String>, Option<String>)> {
    let client = db.pool.get().await.unwrap();
    client
        .query(
            "SELECT event_id, event_type, event_data::text, metadata::text, encrypted_fields::text \
               FROM events ORDER BY global_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The whole feed through `reader`, waiting until all `expected` events
/// arrive: open transactions of other tests on the cluster hold the feed's
/// horizon back for a moment (xids are cluster-wide).
async fn read_everything<R: EventReader>(reader: &R, expected: i64) -> Vec<EventEnvelope> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut all = Vec::new();
    let mut after = Position::default();
    while (all.len() as i64) < expected {
        let batch = reader.read_all(after, 1000).await.unwrap();
        if batch.events.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the feed stalled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        after = batch.next;
        all.extend(batch.events);
    }
    assert_eq!(all.len() as i64, expected);
    all
}

pub(crate) async fn old_versions_left(db: &TestDb) -> i64 {
    let client = db.pool.get().await.unwrap();
    client
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'ItemAdded' \
                AND coalesce((metadata ->> 'schema_version')::int, 1) < 3",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn eager_and_lazy_give_the_same_events() {
    eager_and_lazy(fresh_db().await).await;
}

#[tokio::test]
async fn eager_and_lazy_give_the_same_events_via_pgbouncer() {
    eager_and_lazy(fresh_db_via_pgbouncer().await).await;
}

async fn eager_and_lazy(db: TestDb) {
    seed(&db, 0, 300).await;
    let chain = Arc::new(chain(Arc::default()));
    let lazy: HashMap<Uuid, EventEnvelope> = read_everything(
        &UpcastingReader::new(db.store.clone(), chain.clone()),
        event_count(&db).await,
    )
    .await
    .into_iter()
    .map(|e| (e.event_id, e))
    .collect();

    let upcaster = PgUpcaster::new(db.pool.clone(), chain.clone());
    let mut calls = 0;
    let report = upcaster.run(64, |_| calls += 1).await.unwrap();
    assert_eq!(report.runs.len(), 2, "{report:?}");
    assert_eq!(report.events_upcast(), 300 + 5);
    assert!(calls >= 5);
    assert_eq!(old_versions_left(&db).await, 0);

    let eager = read_everything(&db.store, event_count(&db).await).await;
    assert_eq!(eager.len(), lazy.len());
    for event in &eager {
        assert_eq!(Some(event), lazy.get(&event.event_id), "{}", event.event_id);
        if event.event_type == "ItemAdded" {
            assert_eq!(event.metadata.schema_version, 3);
            assert!(event.event_data["price_cents"].is_i64(), "{event:?}");
        }
    }
    // Lazy over the rewritten store changes nothing.
    let again = read_everything(
        &UpcastingReader::new(db.store.clone(), chain),
        event_count(&db).await,
    )
    .await;
    assert_eq!(again, eager);

    for run in &report.runs {
        let v = upcaster.verify(run.run_id).await.unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!(v.status, RunStatus::Completed);
    }
    // Nothing left: a second run does nothing.
    assert!(upcaster.run(64, |_| {}).await.unwrap().runs.is_empty());
}

#[tokio::test]
async fn plan_counts_and_shows_a_diff_without_writing() {
    let db = fresh_db().await;
    seed(&db, 0, 100).await;
    let before = snapshot(&db).await;
    let upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    let plan = upcaster.plan().await.unwrap();
    let counts: Vec<_> = plan
        .iter()
        .map(|p| (p.migration.from_version, p.events))
        .collect();
    assert_eq!(counts, [(1, 100), (2, 2)]);
    let diff = plan[0].sample.as_ref().unwrap().diff().unwrap().to_string();
    assert!(diff.contains("/name -> /title"), "{diff}");
    assert_eq!(snapshot(&db).await, before);
}

#[tokio::test]
async fn a_crash_and_a_failure_mid_run_resume_then_rollback_restores_every_byte() {
    let db = fresh_db().await;
    seed(&db, 0, 300).await;
    let before = snapshot(&db).await;
    let fail = Arc::new(AtomicBool::new(true));
    let upcaster = PgUpcaster::new(db.pool.clone(), chain(fail.clone()));

    // A crash after two batches: the task dies in the progress callback.
    let crashing = upcaster.clone();
    let crashed = tokio::spawn(async move {
        crashing
            .run(40, |p| {
                if p.done >= 80 {
                    panic!("simulated crash");
                }
            })
            .await
    })
    .await;
    assert!(crashed.unwrap_err().is_panic());
    let runs = upcaster.runs().await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Running);
    assert_eq!(runs[0].events_upcast, 80);
    let interrupted = runs[0].run_id;

    // Resumed, it stops at the injected failure; that batch is not written.
    let err = upcaster.run(40, |_| {}).await.unwrap_err();
    let bad = before
        .iter()
        .find(|r| r.2.contains("\"n\": 150"))
        .map(|r| r.0)
        .unwrap();
    assert_eq!(err.event_id(), Some(bad), "{err}");
    assert!(
        matches!(&err, RunError::Event { run_id, source, .. } if *run_id == interrupted && matches!(**source, Error::Upcast { .. })),
        "{err}"
    );
    let failed = upcaster.run_info(interrupted).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.failed_event_id, Some(bad));
    assert!(failed.events_upcast.is_multiple_of(40));
    assert!(failed.events_upcast < 150);
    assert_eq!(
        300 + 5 - old_versions_left(&db).await,
        failed.events_upcast as i64
    );

    // Fixed, it resumes the same run and completes.
    fail.store(false, Ordering::SeqCst);
    let report = upcaster.run(40, |_| {}).await.unwrap();
    assert_eq!(report.runs[0].run_id, interrupted);
    assert_eq!(report.events_upcast(), 305);
    assert_eq!(old_versions_left(&db).await, 0);
    for run in &report.runs {
        assert!(upcaster.verify(run.run_id).await.unwrap().is_ok());
    }
    assert_ne!(snapshot(&db).await, before);

    // Roll everything back: byte for byte the original store.
    for run in report.runs.iter().rev() {
        let info = upcaster.rollback(run.run_id).await.unwrap();
        assert_eq!(info.status, RunStatus::RolledBack);
        let v = upcaster.verify(run.run_id).await.unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!(v.backup_checksum, v.current_checksum);
    }
    assert_eq!(snapshot(&db).await, before);
    let again = upcaster.rollback(interrupted).await.unwrap_err();
    assert!(matches!(again, RunError::WrongStatus { .. }), "{again}");
}

#[tokio::test]
async fn a_validation_failure_names_the_event_and_leaves_the_store_untouched() {
    let db = fresh_db().await;
    seed(&db, 0, 50).await;
    let bad = Uuid::now_v7();
    db.store
        .append(
            Uuid::now_v7(),
            "Cart",
            ExpectedVersion::Any,
            vec![
                NewEvent::new(
                    "ItemAdded",
                    json!({ "name": "odd", "price": "abc", "n": 9 }),
                )
                .with_id(bad),
            ],
        )
        .await
        .unwrap();
    let before = snapshot(&db).await;
    let upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    let err = upcaster.run(1000, |_| {}).await.unwrap_err();
    assert_eq!(err.event_id(), Some(bad));
    assert!(
        matches!(
            &err,
            RunError::Event { source, .. } if matches!(**source, Error::SchemaViolation { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    assert_eq!(snapshot(&db).await, before);
    // `check` finds it without writing anything, whatever the batch size.
    let err = upcaster.check(7).await.unwrap_err();
    assert!(
        matches!(&err, RunError::Invalid { event_id, .. } if *event_id == bad),
        "{err}"
    );
    let client = db.pool.get().await.unwrap();
    let backed_up: i64 = client
        .query_one("SELECT count(*) FROM chronicle_upcast_backup", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(backed_up, 0);
}

/// A stand-in for chronicle-crypto: an "envelope" is `{"$enc": "v1",
/// "ct": <plaintext>, "at": <pointer>}`, bound to its pointer like the
/// real one.
#[derive(Default)]
struct FakeCipher {
    calls: AtomicUsize,
}

#[async_trait]
impl FieldCipher for FakeCipher {
    async fn decrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for pointer in event.encrypted_fields.clone() {
            let slot = event
                .data
                .pointer_mut(&pointer)
                .ok_or_else(|| UpcastFailure::new("missing").at(&pointer))?;
            if slot["at"] != json!(pointer) {
                return Err(UpcastFailure::new("bound to another pointer").at(&pointer));
            }
            *slot = slot["ct"].clone();
        }
        Ok(())
    }

    async fn encrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        for pointer in event.encrypted_fields.clone() {
            let slot = event
                .data
                .pointer_mut(&pointer)
                .ok_or_else(|| UpcastFailure::new("missing").at(&pointer))?;
            *slot = json!({ "$enc": "v1", "ct": slot.clone(), "at": pointer });
        }
        Ok(())
    }
}

#[tokio::test]
async fn encrypted_fields_are_decrypted_upcast_and_reencrypted() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    let mut event = NewEvent::new(
        "ItemAdded",
        json!({ "name": { "$enc": "v1", "ct": "secret", "at": "/name" }, "price": 2, "n": 1 }),
    )
    .with_id(id);
    event.encrypted_fields = vec!["/name".into()];
    db.store
        .append(Uuid::now_v7(), "Cart", ExpectedVersion::Any, vec![event])
        .await
        .unwrap();
    seed(&db, 0, 20).await;
    let before = snapshot(&db).await;
    let cipher = Arc::new(FakeCipher::default());
    let mut upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    upcaster.cipher(cipher.clone());
    let report = upcaster.run(8, |_| {}).await.unwrap();
    assert_eq!(cipher.calls.load(Ordering::SeqCst), 1);
    let stored = read_everything(&db.store, event_count(&db).await)
        .await
        .into_iter()
        .find(|e| e.event_id == id)
        .unwrap();
    assert_eq!(stored.encrypted_fields, ["/title"]);
    assert_eq!(
        stored.event_data["title"],
        json!({ "$enc": "v1", "ct": "secret", "at": "/title" })
    );
    assert_eq!(stored.event_data["price_cents"], 200);
    for run in report.runs.iter().rev() {
        upcaster.rollback(run.run_id).await.unwrap();
    }
    assert_eq!(snapshot(&db).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_during_a_run_are_all_upcast() {
    let db = fresh_db().await;
    seed(&db, 0, 200).await;
    let upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    // The writers start once the run has committed its first batch.
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let writers: Vec<_> = (0..3_u64)
        .map(|w| {
            let store = db.store.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let _go = started.acquire().await.unwrap();
                for i in 0..50 {
                    store
                        .append(
                            Uuid::now_v7(),
                            "Cart",
                            ExpectedVersion::Any,
                            vec![v1(10_000 + w * 100 + i)],
                        )
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let first = upcaster
        .run(20, |p| {
            if p.done == 20 {
                started.add_permits(3);
            }
        })
        .await
        .unwrap();
    started.add_permits(3);
    for w in writers {
        w.await.unwrap();
    }
    // Whatever committed after the first run finished, the next one takes.
    let second = upcaster.run(20, |_| {}).await.unwrap();
    assert_eq!(old_versions_left(&db).await, 0);
    assert_eq!(
        first.events_upcast() + second.events_upcast(),
        200 + 3 + 150
    );
}

#[tokio::test]
async fn works_on_a_hash_partitioned_store() {
    let db = empty_db().await;
    migrate(
        &db.pool,
        MigrateOptions {
            partitions: Some(4),
        },
    )
    .await
    .unwrap();
    seed(&db, 0, 80).await;
    let before = snapshot(&db).await;
    let upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    let report = upcaster.run(16, |_| {}).await.unwrap();
    assert_eq!(report.events_upcast(), 80 + 2);
    assert_eq!(old_versions_left(&db).await, 0);
    for run in report.runs.iter().rev() {
        assert!(upcaster.verify(run.run_id).await.unwrap().is_ok());
        upcaster.rollback(run.run_id).await.unwrap();
    }
    assert_eq!(snapshot(&db).await, before);
}

/// A cart written against ItemAdded v3 only.
#[derive(Debug, Default)]
struct Cart {
    titles: Vec<String>,
    cents: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum CartEvent {
    ItemAdded {
        title: String,
        qty: i64,
        price_cents: i64,
        n: i64,
    },
}

impl chronicle_core::DomainEvent for CartEvent {}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl chronicle_core::Aggregate for Cart {
    const TYPE: &'static str = "Cart";
    type Event = CartEvent;
    type Command = (String, i64);
    type Error = Never;

    fn apply(&mut self, event: CartEvent) {
        let CartEvent::ItemAdded {
            title, price_cents, ..
        } = event;
        self.titles.push(title);
        self.cents += price_cents;
    }

    fn handle(&self, (title, price_cents): (String, i64)) -> Result<Vec<CartEvent>, Never> {
        Ok(vec![CartEvent::ItemAdded {
            title,
            qty: 1,
            price_cents,
            n: 0,
        }])
    }
}

#[tokio::test]
async fn a_repository_over_the_upcasting_reader_sees_and_writes_the_newest_version() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    db.store
        .append(id, "Cart", ExpectedVersion::NoStream, vec![v1(4), v1(8)])
        .await
        .unwrap();
    let repo = chronicle_core::Repository::new(UpcastingReader::new(
        db.store.clone(),
        chain(Arc::default()),
    ));
    // v1 events (name, price in units) load as v3 (title, price_cents).
    let (cart, version) = repo.load::<Cart>(id).await.unwrap();
    assert_eq!(version, 2);
    assert_eq!(cart.titles, ["item 4", "item 8"]);
    assert_eq!(cart.cents, 100 + 200);

    // A command's event is stored as v3, so it is not upcast again.
    repo.execute::<Cart>(id, ("pen".into(), 250)).await.unwrap();
    let stored = db.store.read_stream(id, 3, None).await.unwrap();
    assert_eq!(stored[0].metadata.schema_version, 3);
    assert_eq!(stored[0].event_data["price_cents"], 250);
    let (cart, version) = repo.load::<Cart>(id).await.unwrap();
    assert_eq!((version, cart.cents), (3, 550));
}

/// Snapshots folded from events an eager run rewrites (or a rollback
/// restores) are stale: the run's transactions delete them, and leave the
/// snapshots of aggregates it did not touch.
#[tokio::test]
async fn an_eager_run_and_its_rollback_delete_the_snapshots_of_what_they_rewrite() {
    use chronicle_core::{Snapshot, SnapshotStore};

    let db = fresh_db().await;
    seed(&db, 0, 20).await;
    let carts: Vec<Uuid> = db
        .pool
        .get()
        .await
        .unwrap()
        .query("SELECT DISTINCT aggregate_id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(carts.len(), 2);
    let untouched = Uuid::now_v7();
    db.store
        .append(
            untouched,
            "Cart",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("CartOpened", json!({ "by": "x" }))],
        )
        .await
        .unwrap();
    let save_all = |ids: Vec<Uuid>| {
        let store = db.store.clone();
        async move {
            for id in ids {
                let snapshot = Snapshot {
                    aggregate_id: id,
                    aggregate_type: "Cart".to_owned(),
                    version: 1,
                    schema_version: 1,
                    upcaster_version: 0,
                    state: json!({ "items": 1 }),
                    created_at: None,
                };
                store.save_snapshot(&snapshot).await.unwrap();
            }
        }
    };
    let snapshotted = |db: &TestDb| {
        let store = db.store.clone();
        async move {
            let mut ids: Vec<Uuid> = store
                .list_snapshots(None)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.aggregate_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let mut all = carts.clone();
    all.push(untouched);
    save_all(all).await;
    assert_eq!(snapshotted(&db).await.len(), 3);

    let upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    let report = upcaster.run(64, |_| {}).await.unwrap();
    assert_eq!(snapshotted(&db).await, vec![untouched], "{report:?}");

    save_all(carts).await;
    for run in report.runs.iter().rev() {
        upcaster.rollback(run.run_id).await.unwrap();
    }
    assert_eq!(snapshotted(&db).await, vec![untouched]);
}
