//! Shared helpers: brokers, appends, running the relay, collecting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, ExpectedVersion, MessageQueue, NewEvent, ProjectionHandler,
    ProjectionResult,
};
use chronicle_nats::{NatsOptions, NatsQueue};
use chronicle_postgres::testing::TestDb;
use chronicle_projections::{PgProjection, ProjectionOptions, Runner, RunnerOptions};
use chronicle_rabbitmq::{RabbitOptions, RabbitQueue};
use chronicle_relay::{Relay, Route};
use serde_json::json;
use uuid::Uuid;

pub use chronicle_postgres::testing::fresh_db;

pub fn nats_options() -> NatsOptions {
    let url =
        std::env::var("CHRONICLE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let mut o = NatsOptions::new(url);
    o.ack_wait(Duration::from_secs(5));
    o
}

pub async fn nats(name: &str) -> Arc<dyn MessageQueue> {
    Arc::new(
        NatsQueue::connect(&nats_options(), name)
            .await
            .unwrap_or_else(|e| {
                panic!("no NATS JetStream on loopback ({e:#}); start nats-server -js")
            }),
    )
}

pub async fn rabbit(name: &str) -> Arc<dyn MessageQueue> {
    let url = std::env::var("CHRONICLE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    Arc::new(
        RabbitQueue::connect(&RabbitOptions::new(url), name)
            .await
            .unwrap_or_else(|e| panic!("no RabbitMQ on loopback ({e:#})")),
    )
}

/// A unique queue name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::now_v7().simple().to_string()[20..])
}

/// What was appended: aggregate -> event ids in version order.
pub type Appended = BTreeMap<Uuid, Vec<Uuid>>;

/// Appends `per` events to each of `aggregates` new aggregates of
/// `aggregate_type`, in rounds (so the feed interleaves them).
pub async fn append(
    db: &TestDb,
    aggregate_type: &str,
    aggregates: usize,
    per: usize,
    appended: &mut Appended,
) {
    let ids: Vec<Uuid> = (0..aggregates).map(|_| Uuid::now_v7()).collect();
    for round in 0..per {
        for id in &ids {
            let mut e = NewEvent::new(
                if round == 0 { "Opened" } else { "Changed" },
                json!({ "n": round, "pad": "x".repeat(64) }),
            );
            e.metadata.extra.insert("tenant".into(), json!("acme"));
            appended.entry(*id).or_default().push(e.event_id);
            db.store
                .append(*id, aggregate_type, ExpectedVersion::Any, vec![e])
                .await
                .unwrap();
        }
    }
}

pub fn total(appended: &Appended) -> usize {
    appended.values().map(Vec::len).sum()
}

pub fn options() -> ProjectionOptions {
    ProjectionOptions {
        partitions: 2,
        batch_size: 200,
        lease_ttl: Duration::from_secs(2),
        ..ProjectionOptions::default()
    }
}

pub async fn start_relay(db: &TestDb, relay: Relay, options: ProjectionOptions) -> Runner {
    let projection = PgProjection::new(db.pool.clone(), relay, options).unwrap();
    Runner::start(
        Arc::new(projection),
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Events the relay projection `name` handled (published or skipped).
pub async fn processed(db: &TestDb, name: &str) -> u64 {
    chronicle_projections::load_state(&db.pool, Some(name))
        .await
        .unwrap()
        .iter()
        .map(|p| p.events_processed)
        .sum()
}

pub async fn wait_processed(db: &TestDb, name: &str, n: u64, within: Duration) {
    let start = Instant::now();
    loop {
        let p = processed(db, name).await;
        if p >= n {
            return;
        }
        assert!(
            start.elapsed() < within,
            "the relay handled {p} of {n} events in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay of aggregate type `order` to `queue`, headers from metadata.
pub fn relay(name: &str, queue: Arc<dyn MessageQueue>) -> Relay {
    Relay::builder(name)
        .route(
            Route::new("broker", queue.name().to_owned())
                .aggregate_types(["order"])
                .header("tenant", "tenant"),
            queue,
        )
        .build()
        .unwrap()
}

/// A handler collecting what it is given, failing on `poison` ids.
pub struct Collect {
    pub poison: Vec<Uuid>,
}

#[async_trait]
impl ProjectionHandler<Vec<EventEnvelope>> for Collect {
    fn name(&self) -> &str {
        "collect"
    }

    async fn handle(
        &self,
        event: &EventEnvelope,
        seen: &mut Vec<EventEnvelope>,
    ) -> ProjectionResult {
        if self.poison.contains(&event.event_id) {
            return ProjectionResult::retry("poison");
        }
        seen.push(event.clone());
        ProjectionResult::Done
    }
}

/// Groups what the consumer saw by aggregate, in the order seen.
pub fn by_aggregate(seen: &[EventEnvelope]) -> Appended {
    let mut out = Appended::new();
    for e in seen {
        out.entry(e.aggregate_id).or_default().push(e.event_id);
    }
    out
}

/// Tests that use NATS hold this for reading; the test that restarts NATS
/// holds it for writing, so it never pulls the server from under another
/// test of this binary.
pub static NATS_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
