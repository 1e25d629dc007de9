//! The repository over the real store: decide, save, retry on conflict,
//! and load as of a version or a time.

use chronicle_core::{Aggregate, CommandError, DomainEvent, Repository};
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
