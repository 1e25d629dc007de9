//! Versioned migrations: idempotent, concurrent, guarded, partitioned.

use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
use chronicle_postgres::{Error, MigrateOptions, PgEventStore, migrate, migrate::latest_version};
use serde_json::json;
use uuid::Uuid;

use crate::support::empty_db;

#[tokio::test]
async fn migrate_is_recorded_and_idempotent() {
    let db = empty_db().await;
    let first = migrate(&db.pool, MigrateOptions::default()).await.unwrap();
    assert_eq!(first.applied, (1..=latest_version()).collect::<Vec<_>>());
    let second = migrate(&db.pool, MigrateOptions::default()).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.version, latest_version());

    // The spec's table, exactly, plus the feed columns.
    let client = db.pool.get().await.unwrap();
    let columns: Vec<(String, String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns \
              WHERE table_name = 'events' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected = [
        ("event_id", "uuid", "NO"),
        ("aggregate_id", "uuid", "NO"),
        ("aggregate_type", "character varying", "NO"),
        ("event_type", "character varying", "NO"),
        ("event_data", "jsonb", "NO"),
        ("metadata", "jsonb", "YES"),
        ("version", "integer", "NO"),
        ("timestamp", "timestamp with time zone", "YES"),
        ("encrypted_fields", "ARRAY", "YES"),
        ("global_position", "bigint", "NO"),
        ("transaction_id", "xid8", "NO"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(columns, expected);
    let indexes: Vec<String> = client
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'events' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in [
        "events_aggregate_id_version_key",
        "events_pkey",
        "idx_events_aggregate_version",
        "idx_events_feed",
        "idx_events_timestamp",
        "idx_events_type_timestamp",
    ] {
        assert!(
            indexes.contains(&name.to_string()),
            "missing index {name}: {indexes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_migrating_at_once_serialize() {
    let db = empty_db().await;
    let (a, b) = tokio::join!(
        migrate(&db.pool, MigrateOptions::default()),
        migrate(&db.pool, MigrateOptions::default())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.applied.len() + b.applied.len(),
        latest_version() as usize,
        "{a:?} {b:?}"
    );
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let db = empty_db().await;
    migrate(&db.pool, MigrateOptions::default()).await.unwrap();
    let client = db.pool.get().await.unwrap();
    client
        .batch_execute("INSERT INTO chronicle_schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
        .await
        .unwrap();
    let err = migrate(&db.pool, MigrateOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { database: 999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade chronicle"), "{err}");
    let err = chronicle_postgres::ensure_schema(&**client)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }));
}

#[tokio::test]
async fn hash_partitioned_events_work_the_same() {
    let db = empty_db().await;
    migrate(
        &db.pool,
        MigrateOptions {
            partitions: Some(4),
        },
    )
    .await
    .unwrap();
    let client = db.pool.get().await.unwrap();
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    let store = PgEventStore::new(db.pool.clone());
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        store
            .append(
                *id,
                "p",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("A", json!({})), NewEvent::new("B", json!({}))],
            )
            .await
            .unwrap();
    }
    let err = store
        .append(
            ids[0],
            "p",
            ExpectedVersion::Exact(1),
            vec![NewEvent::new("C", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    let feed = crate::support::read_feed(&store, 40).await;
    assert_eq!(feed.len(), 40);
    // Same layout again is fine; another layout is refused with a reason.
    migrate(
        &db.pool,
        MigrateOptions {
            partitions: Some(4),
        },
    )
    .await
    .unwrap();
    let err = migrate(
        &db.pool,
        MigrateOptions {
            partitions: Some(8),
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("4 hash partitions"), "{err}");
    let err = migrate(
        &db.pool,
        MigrateOptions {
            partitions: Some(0),
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("between 1 and 1024"), "{err}");
}
