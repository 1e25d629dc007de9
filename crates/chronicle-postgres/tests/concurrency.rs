//! Optimistic concurrency and the gap-safe feed under real concurrent
//! transactions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chronicle_core::{Error, EventAppender, EventReader, ExpectedVersion, NewEvent, Position};
use rand::Rng;
use serde_json::json;
use uuid::Uuid;

use crate::support::fresh_db;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_writers_at_one_expected_version_exactly_one_wins() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    let rounds = 12;
    for round in 0..rounds {
        let expected = if round == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(round)
        };
        let tasks: Vec<_> = (0..64)
            .map(|task| {
                let store = db.store.clone();
                tokio::spawn(async move {
                    store
                        .append(
                            id,
                            "counter",
                            expected,
                            vec![NewEvent::new("Incremented", json!({ "task": task }))],
                        )
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(out) => {
                    wins += 1;
                    assert_eq!(out.version, round + 1);
                }
                Err(Error::Conflict { actual, .. }) => {
                    assert_eq!(actual, round + 1, "conflict names the version that won")
                }
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer wins");
    }
    let versions: Vec<u32> = db
        .store
        .read_stream(id, 1, None)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(
        versions,
        (1..=rounds).collect::<Vec<_>>(),
        "versions are contiguous from 1"
    );
}

/// Appends inside an explicit transaction on a raw client, which the test
/// keeps open for as long as it likes.
async fn append_in_tx(client: &tokio_postgres::Client, aggregate: Uuid, ty: &str) -> Uuid {
    try_append_in_tx(client, aggregate, ty).await.unwrap()
}

/// As [`append_in_tx`], but returns the error of an append that lost the
/// race for its version (SQLSTATE CH409: the caller rolls back and retries
/// in a new transaction).
async fn try_append_in_tx(
    client: &tokio_postgres::Client,
    aggregate: Uuid,
    ty: &str,
) -> Result<Uuid, tokio_postgres::Error> {
    let event_id = Uuid::now_v7();
    let row = client
        .query_one(
            "SELECT status FROM chronicle_append($1, 'feed', NULL, ARRAY[$2::uuid], ARRAY[$3::text], ARRAY['{}'::jsonb], ARRAY['{}'::jsonb], ARRAY[NULL::jsonb])",
            &[&aggregate, &event_id, &ty],
        )
        .await?;
    assert_eq!(row.get::<_, i32>(0), 0);
    Ok(event_id)
}

#[tokio::test]
async fn the_feed_waits_for_an_open_transaction_and_skips_nothing() {
    let db = fresh_db().await;
    let (t1, c1) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c1);
    let (t2, c2) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c2);

    t1.batch_execute("BEGIN").await.unwrap();
    let first = append_in_tx(&t1, Uuid::now_v7(), "T1").await;
    let t1_xid: u64 = t1
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    t2.batch_execute("BEGIN").await.unwrap();
    let second = append_in_tx(&t2, Uuid::now_v7(), "T2").await;
    t2.batch_execute("COMMIT").await.unwrap();

    // T2 committed, but T1 (older) is open: the feed does not move past it.
    let batch = db.store.read_all(Position::START, 100).await.unwrap();
    assert!(
        batch.events.is_empty(),
        "nothing is handed out past the open T1: {:?}",
        batch.events
    );
    assert_eq!(batch.next, Position::START);
    let status = db.store.status().await.unwrap();
    let holder = status
        .oldest_open_transaction
        .expect("an open transaction is reported as holding the feed back");
    assert!(holder.open_seconds >= 0.0);
    assert!(
        status.feed_horizon <= t1_xid,
        "the horizon {} is not past T1 ({t1_xid})",
        status.feed_horizon
    );

    t1.batch_execute("COMMIT").await.unwrap();
    // Other tests' transactions on the cluster may still hold the horizon
    // for a moment; read until something arrives.
    let mut next = batch.next;
    let mut ids: Vec<Uuid> = Vec::new();
    for _ in 0..1500 {
        let batch = db.store.read_all(next, 100).await.unwrap();
        ids.extend(batch.events.iter().map(|e| e.event_id));
        next = batch.next;
        if ids.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ids,
        vec![first, second],
        "both, in transaction order, nothing skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_eight_writers_with_pauses_and_a_tailing_reader() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 2_000;
    let db = fresh_db().await;
    let aggregates: Vec<Uuid> = (0..24).map(|_| Uuid::now_v7()).collect();

    let reader = {
        let store = db.store.clone();
        tokio::spawn(async move {
            let mut after = Position::START;
            let mut seen = HashSet::new();
            let mut last_version: HashMap<Uuid, u32> = HashMap::new();
            let mut polls = 0u64;
            while seen.len() < WRITERS * PER_WRITER {
                let batch = store.read_all(after, 500).await.unwrap();
                polls += 1;
                for e in &batch.events {
                    assert!(
                        seen.insert(e.event_id),
                        "event {} handed out twice",
                        e.event_id
                    );
                    let last = last_version.entry(e.aggregate_id).or_insert(0);
                    assert_eq!(
                        e.version,
                        *last + 1,
                        "aggregate {} out of order in the feed",
                        e.aggregate_id
                    );
                    *last = e.version;
                }
                after = batch.next;
                if batch.events.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(
                    polls < 200_000,
                    "the reader stalled at {after} with {} seen",
                    seen.len()
                );
            }
            seen
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = db.url.clone();
            let aggregates = aggregates.clone();
            tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut written = Vec::with_capacity(PER_WRITER);
                for i in 0..PER_WRITER {
                    let (aggregate, pause) = {
                        let mut rng = rand::rng();
                        (
                            aggregates[rng.random_range(0..aggregates.len())],
                            rng.random_range(0..400u64),
                        )
                    };
                    // An "any" append that loses the race for its version
                    // aborts its transaction; retry in a new one.
                    let mut races = 0;
                    let event_id = loop {
                        client.batch_execute("BEGIN").await.unwrap();
                        match try_append_in_tx(&client, aggregate, &format!("w{w}-{i}")).await {
                            Ok(id) => break id,
                            Err(e)
                                if e.code().map(|c| c.code()) == Some("CH409") && races < 100 =>
                            {
                                races += 1;
                                client.batch_execute("ROLLBACK").await.unwrap();
                            }
                            Err(e) => panic!("append failed: {e:?}"),
                        }
                    };
                    written.push(event_id);
                    if pause > 300 {
                        tokio::time::sleep(Duration::from_micros(pause * 5)).await;
                    }
                    client.batch_execute("COMMIT").await.unwrap();
                }
                written
            })
        })
        .collect();

    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader caught up")
        .unwrap();
    assert_eq!(
        seen, committed,
        "the reader saw every committed event exactly once"
    );
}
