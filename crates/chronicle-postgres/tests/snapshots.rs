//! Aggregate snapshots on PostgreSQL: one-statement loads, replacement by
//! version, invalidation by versions, and deletion by a shred.

use std::sync::Arc;

use chronicle_core::{
    Aggregate, DomainEvent, EventAppender, ExpectedVersion, NewEvent, Repository, Snapshot,
    SnapshotPolicy, SnapshotStore, Snapshotting,
};
use chronicle_crypto::{
    AccessContext, EncryptionConfig, FieldEncryptorBuilder, LocalKeyring, SubjectId,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::support::{fresh_db, fresh_db_via_pgbouncer};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TallyEvent {
    Added { by: i64 },
}
impl DomainEvent for TallyEvent {}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    total: i64,
    applied: u32,
}

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Event = TallyEvent;
    type Command = i64;
    type Error = Never;
    fn apply(&mut self, TallyEvent::Added { by }: TallyEvent) {
        self.total += by;
        self.applied += 1;
    }
    fn handle(&self, by: i64) -> Result<Vec<TallyEvent>, Never> {
        Ok(vec![TallyEvent::Added { by }])
    }
}

impl Snapshotting for Tally {
    const SNAPSHOT_VERSION: u32 = 2;
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::EveryEvents(10)
    }
}

async fn snapshots_are_used_replaced_and_ignored(db: chronicle_postgres::testing::TestDb) {
    let mut repo = Repository::new(db.store.clone());
    let id = Uuid::now_v7();
    for i in 1..=25 {
        repo.execute_snapshotted::<Tally>(id, i).await.unwrap();
    }
    let listed = db.store.list_snapshots(Some("tally")).await.unwrap();
    assert_eq!(listed.len(), 1, "one row per aggregate: {listed:?}");
    assert_eq!((listed[0].version, listed[0].aggregate_version), (20, 25));
    assert_eq!(listed[0].schema_version, 2);

    let load = db.store.load_snapshot(id, "tally", 2, 0).await.unwrap();
    assert_eq!(load.snapshot.as_ref().unwrap().version, 20);
    assert_eq!(
        load.tail.iter().map(|e| e.version).collect::<Vec<_>>(),
        (21..=25).collect::<Vec<_>>()
    );
    assert!(load.tail_bytes > 0);
    let (tally, version) = repo.load_snapshotted::<Tally>(id).await.unwrap();
    assert_eq!((tally.total, version), ((1..=25).sum(), 25));
    assert_eq!(tally.applied, 25);

    // Other versions: no snapshot, every event.
    for (schema, upcaster) in [(3, 0), (2, 9)] {
        let load = db
            .store
            .load_snapshot(id, "tally", schema, upcaster)
            .await
            .unwrap();
        assert!(load.snapshot.is_none());
        assert_eq!(load.tail.len(), 25);
    }
    // An older snapshot does not replace a newer one; other versions do.
    let older = Snapshot {
        aggregate_id: id,
        aggregate_type: "tally".into(),
        version: 5,
        schema_version: 2,
        upcaster_version: 0,
        state: json!({ "total": -1, "applied": 0 }),
        created_at: None,
    };
    db.store.save_snapshot(&older).await.unwrap();
    assert_eq!(db.store.list_snapshots(None).await.unwrap()[0].version, 20);
    repo.upcaster_version(9);
    for i in 26..=35 {
        repo.execute_snapshotted::<Tally>(id, i).await.unwrap();
    }
    // The first command under the new chain folds all 25 events, finds a
    // snapshot due and replaces the one of the old chain.
    let listed = db.store.list_snapshots(None).await.unwrap();
    assert_eq!((listed[0].version, listed[0].upcaster_version), (26, 9));

    assert_eq!(db.store.delete_snapshots(id).await.unwrap(), 1);
    let (tally, version) = repo.load_snapshotted::<Tally>(id).await.unwrap();
    assert_eq!((tally.total, version), ((1..=35).sum(), 35));
    assert_eq!(repo.rebuild_snapshot::<Tally>(id).await.unwrap(), 35);
    assert_eq!(db.store.drop_snapshots_of_type("tally").await.unwrap(), 1);
    assert!(db.store.list_snapshots(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn snapshots_are_loaded_with_their_tail_and_replaced_by_version() {
    snapshots_are_used_replaced_and_ignored(fresh_db().await).await;
}

#[tokio::test]
async fn snapshots_work_through_pgbouncer() {
    snapshots_are_used_replaced_and_ignored(fresh_db_via_pgbouncer().await).await;
}

#[tokio::test]
async fn a_snapshot_write_on_a_spawned_task_does_not_hold_up_the_command() {
    let db = fresh_db().await;
    let mut repo = Repository::new(db.store.clone());
    repo.spawn_snapshots(|task| {
        tokio::spawn(task);
    });
    let id = Uuid::now_v7();
    for i in 1..=10 {
        repo.execute_snapshotted::<Tally>(id, i).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db.store.list_snapshots(None).await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the spawned write never landed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(db.store.list_snapshots(None).await.unwrap()[0].version, 10);
}

const CONFIG: &str = r#"
encryption:
  events:
    UserRegistered:
      fields: ["/email"]
    OrderPlaced:
      subject: /customer_id
      fields: ["/card"]
"#;

#[tokio::test]
async fn a_shred_deletes_every_snapshot_holding_the_subjects_fields_and_refuses_new_ones() {
    let db = fresh_db().await;
    let keys = Arc::new(db.store.data_key_store());
    let audit = Arc::new(db.store.audit_sink());
    let encryptor = Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(CONFIG).unwrap(),
            Arc::new(LocalKeyring::generate().unwrap()),
            keys,
            audit,
        )
        .build(),
    );
    let store = db
        .store
        .clone()
        .encrypted(encryptor.clone(), AccessContext::new("app", "test"));
    let (user, order, other_user) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (id, ty, event) in [
        (
            user,
            "user",
            NewEvent::new("UserRegistered", json!({ "email": "gone@example.com" })),
        ),
        (
            order,
            "order",
            NewEvent::new(
                "OrderPlaced",
                json!({ "customer_id": user.to_string(), "card": "4111-gone" }),
            ),
        ),
        (
            other_user,
            "user",
            NewEvent::new("UserRegistered", json!({ "email": "kept@example.com" })),
        ),
    ] {
        store
            .append(id, ty, ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
    }
    // Snapshots as a decrypting repository would store them: in clear.
    for (id, ty, pii) in [
        (user, "user", "gone@example.com"),
        (order, "order", "4111-gone"),
        (other_user, "user", "kept@example.com"),
    ] {
        db.store
            .save_snapshot(&Snapshot {
                aggregate_id: id,
                aggregate_type: ty.into(),
                version: 1,
                schema_version: 1,
                upcaster_version: 0,
                state: json!({ "pii": pii }),
                created_at: None,
            })
            .await
            .unwrap();
    }
    encryptor
        .shred(
            &AccessContext::new("dpo", "erasure"),
            &SubjectId::from_aggregate(user),
        )
        .await
        .unwrap();
    let left: Vec<Uuid> = db
        .store
        .list_snapshots(None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.aggregate_id)
        .collect();
    assert_eq!(
        left,
        vec![other_user],
        "the user's and the order's snapshots go"
    );

    // A write that lost the race to the shred stores nothing.
    db.store
        .save_snapshot(&Snapshot {
            aggregate_id: user,
            aggregate_type: "user".into(),
            version: 1,
            schema_version: 1,
            upcaster_version: 0,
            state: json!({ "pii": "gone@example.com" }),
            created_at: None,
        })
        .await
        .unwrap();
    let client = db.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FROM snapshots WHERE state::text LIKE '%gone%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
}
