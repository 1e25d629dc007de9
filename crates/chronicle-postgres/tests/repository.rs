//! The repository over the real store: decide, save, retry on conflict,
//! load as of a version or a time, and the in-process aggregate cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chronicle_core::{Aggregate, CommandError, DomainEvent, Repository};
use chronicle_core::{
    AggregateId, AppendOutcome, EventAppender, EventEnvelope, EventReader, ExpectedVersion,
    FeedBatch, NewEvent, Position, TimeRange,
};
use chronicle_postgres::PgEventStore;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::support::fresh_db;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added { by: i64 },
}

impl DomainEvent for CounterEvent {}

#[derive(Debug, thiserror::Error)]
#[error("the counter may not pass {0}")]
struct Limit(i64);

#[derive(Debug, Default)]
struct Counter {
    total: i64,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Event = CounterEvent;
    type Command = i64;
    type Error = Limit;

    fn apply(&mut self, CounterEvent::Added { by }: CounterEvent) {
        self.total += by;
    }

    fn handle(&self, by: i64) -> Result<Vec<CounterEvent>, Limit> {
        if self.total + by > 1000 {
            return Err(Limit(1000));
        }
        Ok(vec![CounterEvent::Added { by }])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_retry_on_conflict_and_all_land() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    let mut repo = Repository::new(db.store.clone());
    repo.max_retries(50);
    let tasks: Vec<_> = (1..=16)
        .map(|i| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.execute::<Counter>(id, i).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every command lands after retries");
    }
    let (counter, version) = repo.load::<Counter>(id).await.unwrap();
    assert_eq!(version, 16);
    assert_eq!(counter.total, (1..=16).sum::<i64>());

    match repo.execute::<Counter>(id, 5000).await {
        Err(CommandError::Domain(Limit(1000))) => {}
        other => panic!("expected the domain error, got {other:?}"),
    }
    assert_eq!(
        repo.load::<Counter>(id).await.unwrap().1,
        16,
        "a refused command stores nothing"
    );
}

#[tokio::test]
async fn load_as_of_version_and_time() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    let repo = Repository::new(db.store.clone());
    repo.execute::<Counter>(id, 1).await.unwrap();
    repo.execute::<Counter>(id, 10).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    repo.execute::<Counter>(id, 100).await.unwrap();

    let (at_one, v) = repo.load_at_version::<Counter>(id, 1).await.unwrap();
    assert_eq!((at_one.total, v), (1, 1));
    let (then, v) = repo.load_at_time::<Counter>(id, between).await.unwrap();
    assert_eq!((then.total, v), (11, 2));
    let (now, v) = repo.load::<Counter>(id).await.unwrap();
    assert_eq!((now.total, v), (111, 3));
}

/// The store, counting stream reads: a command decided on cached state
/// reads nothing.
#[derive(Clone)]
struct CountingReads {
    store: PgEventStore,
    reads: Arc<AtomicUsize>,
}

impl CountingReads {
    fn new(store: PgEventStore) -> Self {
        CountingReads {
            store,
            reads: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventAppender for CountingReads {
    async fn append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> chronicle_core::Result<AppendOutcome> {
        self.store
            .append(aggregate_id, aggregate_type, expected, events)
            .await
    }
}

#[async_trait]
impl EventReader for CountingReads {
    async fn read_stream(
        &self,
        aggregate_id: AggregateId,
        from: u32,
        to: Option<u32>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.store.read_stream(aggregate_id, from, to).await
    }

    async fn read_stream_as_of(
        &self,
        aggregate_id: AggregateId,
        at: DateTime<Utc>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        self.store.read_stream_as_of(aggregate_id, at).await
    }

    async fn read_all(&self, after: Position, limit: usize) -> chronicle_core::Result<FeedBatch> {
        self.store.read_all(after, limit).await
    }

    async fn read_by_type(
        &self,
        event_type: &str,
        range: TimeRange,
        limit: usize,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        self.store.read_by_type(event_type, range, limit).await
    }
}

#[tokio::test]
async fn a_cached_aggregate_is_decided_without_reading_it() {
    let db = fresh_db().await;
    let store = CountingReads::new(db.store.clone());
    let mut repo = Repository::new(store.clone());
    repo.cache(10);
    let id = Uuid::now_v7();
    assert_eq!(repo.execute::<Counter>(id, 1).await.unwrap(), 1);
    assert_eq!(store.reads(), 1, "the first command reads the aggregate");
    assert_eq!(repo.execute::<Counter>(id, 10).await.unwrap(), 2);
    assert_eq!(repo.execute::<Counter>(id, 100).await.unwrap(), 3);
    assert_eq!(store.reads(), 1, "the next ones decide on the kept state");
    assert_eq!(repo.aggregate_cache().unwrap().len(), 1);
    let (counter, version) = repo.load::<Counter>(id).await.unwrap();
    assert_eq!((counter.total, version), (111, 3));

    // A command decided on the kept state as a refusal is decided again on
    // the stored state (another process may have changed it); the fresh
    // state is kept.
    let reads = store.reads();
    assert!(matches!(
        repo.execute::<Counter>(id, 5000).await,
        Err(CommandError::Domain(Limit(1000)))
    ));
    assert_eq!(store.reads(), reads + 1);
    assert_eq!(repo.execute::<Counter>(id, 1).await.unwrap(), 4);
    assert_eq!(store.reads(), reads + 1);
}

#[tokio::test]
async fn a_stale_cache_entry_never_stores_a_wrong_decision() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    // Two processes on one store, each with its own cache.
    let ours = CountingReads::new(db.store.clone());
    let mut here = Repository::new(ours.clone());
    here.cache(10);
    let mut there = Repository::new(db.store.clone());
    there.cache(10);

    here.execute::<Counter>(id, 600).await.unwrap();
    // The other process appends behind our cache's back.
    there.execute::<Counter>(id, 300).await.unwrap();
    // On our kept state (600) 600 + 200 would pass; on the stored state
    // (900) it must be refused, and nothing stored.
    let reads = ours.reads();
    match here.execute::<Counter>(id, 200).await {
        Err(CommandError::Domain(Limit(1000))) => {}
        other => panic!("a decision on stale state was stored: {other:?}"),
    }
    assert_eq!(ours.reads(), reads + 1, "the conflict made it read again");
    let (counter, version) = here.load::<Counter>(id).await.unwrap();
    assert_eq!((counter.total, version), (900, 2));

    // Now our entry is the stored state; the other process's is stale.
    here.execute::<Counter>(id, 100).await.unwrap();
    match there.execute::<Counter>(id, 50).await {
        Err(CommandError::Domain(Limit(1000))) => {}
        other => panic!("a decision on stale state was stored: {other:?}"),
    }
    // A refusal on stale state is not the answer either: the other process
    // lowers the total, and our kept state (1000) would refuse what the
    // stored state (500) allows.
    there.execute::<Counter>(id, -500).await.unwrap();
    assert_eq!(here.execute::<Counter>(id, 400).await.unwrap(), 5);
    let (counter, version) = here.load::<Counter>(id).await.unwrap();
    assert_eq!((counter.total, version), (900, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_with_caches_all_land_once() {
    let db = fresh_db().await;
    let id = Uuid::now_v7();
    let mut cached = Repository::new(db.store.clone());
    cached.cache(4).max_retries(100);
    let mut other = Repository::new(db.store.clone());
    other.cache(4).max_retries(100);
    // Clones share one cache; `other` is a second process.
    let tasks: Vec<_> = (1..=24)
        .map(|i| {
            let repo = if i % 3 == 0 {
                other.clone()
            } else {
                cached.clone()
            };
            tokio::spawn(async move {
                for _ in 0..3 {
                    repo.execute::<Counter>(id, i).await?;
                }
                Ok::<_, CommandError<Limit>>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every command lands after retries");
    }
    let (counter, version) = cached.load::<Counter>(id).await.unwrap();
    assert_eq!(version, 72);
    assert_eq!(counter.total, 3 * (1..=24).sum::<i64>());
    // Whatever either cache kept is the stored state or behind it, and the
    // next command on it lands on top of everything stored.
    let after = cached.execute::<Counter>(id, 0).await.unwrap();
    assert_eq!(after, 73);
    let after = other.execute::<Counter>(id, 0).await.unwrap();
    assert_eq!(after, 74);
}

#[tokio::test]
async fn the_cache_keeps_at_most_its_capacity_least_recently_used_out_first() {
    let db = fresh_db().await;
    let store = CountingReads::new(db.store.clone());
    let mut repo = Repository::new(store.clone());
    repo.cache(2);
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for id in [a, b, a, c] {
        repo.execute::<Counter>(id, 1).await.unwrap();
    }
    assert_eq!(store.reads(), 3, "a was kept between its commands");
    assert_eq!(repo.aggregate_cache().unwrap().len(), 2);
    // b was the least recently used: evicted for c, and read again.
    repo.execute::<Counter>(a, 1).await.unwrap();
    assert_eq!(store.reads(), 3);
    repo.execute::<Counter>(b, 1).await.unwrap();
    assert_eq!(store.reads(), 4);
    assert_eq!(repo.load::<Counter>(a).await.unwrap().1, 3);
    assert_eq!(repo.load::<Counter>(b).await.unwrap().1, 2);

    // Without a cache every command reads.
    let store = CountingReads::new(db.store.clone());
    let repo = Repository::new(store.clone());
    repo.execute::<Counter>(a, 1).await.unwrap();
    repo.execute::<Counter>(a, 1).await.unwrap();
    assert_eq!(store.reads(), 2);
}
