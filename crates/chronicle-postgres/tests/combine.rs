//! Write-combined appends: many tasks, one store, each append its own
//! outcome; a connection killed mid-batch.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chronicle_core::{Error, EventAppender, EventReader, ExpectedVersion, NewEvent};
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestDb, fresh_db, fresh_db_via_pgbouncer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_each_get_their_own_outcome() {
    sixty_four_tasks(fresh_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_each_get_their_own_outcome_via_pgbouncer() {
    sixty_four_tasks(fresh_db_via_pgbouncer().await).await;
}

/// What one task saw.
#[derive(Default)]
struct Seen {
    /// Events acknowledged as stored, with their aggregate and version.
    stored: Vec<(Uuid, Uuid, u32)>,
    /// Events refused with a conflict (never stored).
    refused: Vec<Uuid>,
    /// Conflicts that were forced (a stale expected version).
    forced_conflicts: usize,
}

fn ev(task: usize, round: usize) -> NewEvent {
    NewEvent::new("Happened", json!({ "task": task, "round": round }))
}

/// 64 tasks on one store, each round: an append to its own aggregate; a
/// repeat of it (stores nothing); a forced conflict on its own aggregate
/// (a stale expected version); an append to one of 8 shared aggregates at
/// the version it just read (a conflict when another task got there
/// first); an `Any` append to a shared aggregate.
async fn sixty_four_tasks(db: TestDb) {
    const TASKS: usize = 64;
    const ROUNDS: usize = 6;
    let mut store = db.store.clone();
    store.combine_appends(true);
    let shared: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let own = Uuid::now_v7();
                let mut version = 0u32;
                let mut seen = Seen::default();
                for round in 0..ROUNDS {
                    let expected = ExpectedVersion::Exact(version);
                    let event = ev(task, round);
                    let out = store
                        .append(own, "own", expected, vec![event.clone()])
                        .await
                        .unwrap_or_else(|e| panic!("task {task} round {round}: own append: {e:?}"));
                    assert!(out.appended);
                    assert_eq!(out.version, version + 1);
                    version += 1;
                    seen.stored.push((event.event_id, own, version));

                    let again = store
                        .append(own, "own", expected, vec![event])
                        .await
                        .expect("a repeat is not an error");
                    assert_eq!((again.appended, again.version), (false, version));

                    let stale = ev(task, round);
                    match store
                        .append(
                            own,
                            "own",
                            ExpectedVersion::Exact(version - 1),
                            vec![stale.clone()],
                        )
                        .await
                    {
                        Err(Error::Conflict {
                            aggregate_id,
                            actual,
                            ..
                        }) => {
                            assert_eq!(aggregate_id, own, "the conflict names its aggregate");
                            assert_eq!(actual, version);
                            seen.forced_conflicts += 1;
                            seen.refused.push(stale.event_id);
                        }
                        other => panic!("task {task}: a stale append gave {other:?}"),
                    }

                    let target = shared[(task + round) % shared.len()];
                    let current = store
                        .read_stream(target, 1, None)
                        .await
                        .unwrap()
                        .last()
                        .map_or(0, |e| e.version);
                    let event = ev(task, round);
                    match store
                        .append(
                            target,
                            "shared",
                            ExpectedVersion::Exact(current),
                            vec![event.clone()],
                        )
                        .await
                    {
                        Ok(out) => {
                            assert_eq!(out.version, current + 1);
                            seen.stored.push((event.event_id, target, out.version));
                        }
                        Err(Error::Conflict {
                            aggregate_id,
                            actual,
                            ..
                        }) => {
                            assert_eq!(aggregate_id, target, "the conflict names its aggregate");
                            assert!(actual > current, "another writer got there first");
                            seen.refused.push(event.event_id);
                        }
                        Err(other) => panic!("task {task}: shared append: {other:?}"),
                    }

                    let target = shared[(task * 3 + round) % shared.len()];
                    let event = ev(task, round);
                    let out = store
                        .append(target, "shared", ExpectedVersion::Any, vec![event.clone()])
                        .await
                        .unwrap_or_else(|e| panic!("task {task}: an any append: {e:?}"));
                    seen.stored.push((event.event_id, target, out.version));
                }
                seen
            })
        })
        .collect();
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    let mut forced = 0;
    for t in tasks {
        let seen = t.await.unwrap();
        stored.extend(seen.stored);
        refused.extend(seen.refused);
        forced += seen.forced_conflicts;
    }
    assert_eq!(forced, TASKS * ROUNDS, "every forced conflict was reported");

    // Every acknowledged event is stored exactly once, at the version its
    // caller was told; nothing refused is stored; nothing else is.
    let client = db.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT event_id, aggregate_id, version FROM events ORDER BY aggregate_id, version",
            &[],
        )
        .await
        .unwrap();
    let mut in_db: HashMap<Uuid, (Uuid, u32)> = HashMap::new();
    let mut versions: HashMap<Uuid, Vec<u32>> = HashMap::new();
    for r in &rows {
        let (id, aggregate, version): (Uuid, Uuid, i32) = (r.get(0), r.get(1), r.get(2));
        assert!(
            in_db.insert(id, (aggregate, version as u32)).is_none(),
            "{id} stored twice"
        );
        versions.entry(aggregate).or_default().push(version as u32);
    }
    assert_eq!(
        rows.len(),
        stored.len(),
        "only acknowledged events are stored"
    );
    for (id, aggregate, version) in &stored {
        assert_eq!(
            in_db.get(id),
            Some(&(*aggregate, *version)),
            "acknowledged {id} is stored as its caller was told"
        );
    }
    let refused: HashSet<Uuid> = refused.into_iter().collect();
    assert!(refused.iter().all(|id| !in_db.contains_key(id)));
    for (aggregate, v) in versions {
        assert_eq!(
            v,
            (1..=v.len() as u32).collect::<Vec<_>>(),
            "{aggregate}: versions contiguous from 1"
        );
    }
    let stats = store.combine_stats().expect("combining is on");
    assert!(
        stats.batches < stats.appends,
        "concurrent appends shared batches: {stats:?}"
    );
}

#[tokio::test]
async fn a_lone_append_goes_at_once_and_combining_can_be_turned_off() {
    let db = fresh_db().await;
    let store = db.store.clone();
    let stats = store.combine_stats().expect("on by default");
    assert_eq!((stats.appends, stats.batches), (0, 0));
    let id = Uuid::now_v7();
    let out = store
        .append(id, "lone", ExpectedVersion::NoStream, vec![ev(0, 0)])
        .await
        .unwrap();
    assert_eq!(out.version, 1);
    let stats = store.combine_stats().unwrap();
    assert_eq!(
        (stats.appends, stats.batches),
        (0, 0),
        "a lone append goes by the one-statement path, in no batch"
    );
    // Several events are never combined: the plain path.
    store
        .append(
            id,
            "lone",
            ExpectedVersion::Exact(1),
            vec![ev(0, 1), ev(0, 2)],
        )
        .await
        .unwrap();
    assert_eq!(store.combine_stats().unwrap().appends, 0);

    let mut plain = store.clone();
    plain.combine_appends(false);
    assert_eq!(plain.combine_stats(), None);
    let out = plain
        .append(id, "lone", ExpectedVersion::Exact(3), vec![ev(0, 3)])
        .await
        .unwrap();
    assert_eq!(out.version, 4);
    let err = plain
        .append(id, "lone", ExpectedVersion::Exact(3), vec![ev(0, 4)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 4, .. }), "{err:?}");
}

/// Inserts version 1 of `aggregate` in an open transaction on `client`,
/// so that a combined append of version 1 waits for it.
async fn hold_version_one(client: &tokio_postgres::Client, aggregate: Uuid) {
    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
             event_data, version) VALUES ('{}', '{aggregate}', 'held', 'Held', '{{}}', 1)",
            Uuid::now_v7()
        ))
        .await
        .unwrap();
}

/// Waits until `n` backends wait for a lock.
async fn lock_waiters(client: &tokio_postgres::Client, n: i64) {
    for _ in 0..500 {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} backends wait for a lock");
}

/// The pid of the backend running a combined batch that waits for a lock.
async fn waiting_batch(client: &tokio_postgres::Client) -> i32 {
    for _ in 0..500 {
        let row = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity \
                  WHERE wait_event_type = 'Lock' AND query LIKE '%chronicle_append_combined%' \
                    AND datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no combined batch waits for a lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_killed_mid_batch_fails_every_caller_of_that_batch_and_stores_none_of_it() {
    let db = fresh_db().await;
    let mut store = db.store.clone();
    store.combined_batches_in_flight(1);
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    // S1, S2 and S3 hold rows in open transactions; the monitor watches
    // (in autocommit: a transaction would keep one view of
    // pg_stat_activity).
    let (s1, s2, s3, monitor) = (
        connect().await,
        connect().await,
        connect().await,
        connect().await,
    );
    let (k1, k2, k3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    hold_version_one(&s1, k1).await;
    hold_version_one(&s2, k2).await;
    hold_version_one(&s3, k3).await;

    // A goes alone (the one lone slot), B is the drain's first batch (the
    // one drain): both wait for a held row.
    let append = |aggregate: Uuid| {
        let store = store.clone();
        let event = ev(0, 0);
        let id = event.event_id;
        (
            id,
            tokio::spawn(async move {
                store
                    .append(aggregate, "victim", ExpectedVersion::NoStream, vec![event])
                    .await
            }),
        )
    };
    let (_, a) = append(k1);
    lock_waiters(&monitor, 1).await;
    let (_, b) = append(k3);
    lock_waiters(&monitor, 2).await;
    // Queued behind B: 20 appends on fresh aggregates, and C, which will
    // wait for S2's row.
    let victims: Vec<_> = (0..20).map(|_| append(Uuid::now_v7())).collect();
    let (c_id, c) = append(k2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s1.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(a.await.unwrap().unwrap().version, 1, "A went in");
    s3.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(b.await.unwrap().unwrap().version, 1, "B went in");

    // Batch 2 (the 20 and C) waits for S2's row: kill its connection.
    let pid = waiting_batch(&monitor).await;
    monitor
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let mut ids = vec![c_id];
    for (id, t) in victims.into_iter().chain([(c_id, c)]) {
        let err = t
            .await
            .unwrap()
            .expect_err("no caller of the killed batch is acknowledged");
        assert!(
            matches!(&err, Error::Backend { message, .. } if message.contains("may or may not")),
            "{err:?}"
        );
        ids.push(id);
    }
    s2.batch_execute("ROLLBACK").await.unwrap();
    let stored: i64 = monitor
        .query_one(
            "SELECT count(*) FROM events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "nothing of the killed batch is stored");
    // The store goes on (the dead connection is dropped from the pool).
    let out = store
        .append(k2, "victim", ExpectedVersion::NoStream, vec![ev(1, 0)])
        .await
        .unwrap();
    assert_eq!(out.version, 1);
}
