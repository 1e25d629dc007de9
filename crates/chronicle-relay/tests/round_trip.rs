//! Append, relay, consume, compare: NATS and RabbitMQ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chronicle_core::{EventEnvelope, MessageQueue};
use chronicle_relay::{StreamConsumer, decode_event};

use crate::support::*;

/// Consumes `queue` into a collecting handler until `n` events were
/// handled (or `within` passed).
pub async fn consume(
    queue: Arc<dyn MessageQueue>,
    dlq: Arc<dyn MessageQueue>,
    n: usize,
    within: Duration,
) -> (Vec<EventEnvelope>, chronicle_relay::ConsumeReport) {
    let mut consumer =
        StreamConsumer::new(queue, dlq, Arc::new(Collect { poison: vec![] })).batch_size(256);
    let mut seen = Vec::new();
    let mut total = chronicle_relay::ConsumeReport::default();
    let start = Instant::now();
    while seen.len() < n && start.elapsed() < within {
        let r = consumer.poll(&mut seen).await.unwrap();
        total.duplicates += r.duplicates;
        total.received += r.received;
        if r.received == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (seen, total)
}

async fn round_trip(queue: Arc<dyn MessageQueue>, dlq: Arc<dyn MessageQueue>) {
    let db = fresh_db().await;
    let mut orders = Appended::new();
    append(&db, "order", 12, 6, &mut orders).await;
    let mut users = Appended::new();
    append(&db, "user", 5, 2, &mut users).await; // no route: not published
    let name = unique("relay");
    let runner = start_relay(&db, relay(&name, queue.clone()), options()).await;
    wait_processed(
        &db,
        &name,
        (total(&orders) + total(&users)) as u64,
        Duration::from_secs(60),
    )
    .await;
    runner.stop().await;

    let (seen, _) = consume(queue.clone(), dlq, total(&orders), Duration::from_secs(60)).await;
    assert_eq!(
        by_aggregate(&seen),
        orders,
        "every order event, in version order, once"
    );
    let e = &seen[0];
    assert_eq!(e.aggregate_type, "order");
    assert_eq!(e.metadata.extra["tenant"], "acme");
    assert!(e.position.global_position > 0);
    assert_eq!(e.event_data["pad"].as_str().unwrap().len(), 64);
    // Nothing else was published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        queue.receive(10).await.unwrap().is_empty(),
        "only routed events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_relay_round_trip() {
    let _nats = NATS_LOCK.read().await;
    let name = unique("rt");
    round_trip(nats(&name).await, nats(&format!("{name}-dlq")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_relay_round_trip() {
    let name = unique("rt");
    round_trip(rabbit(&name).await, rabbit(&format!("{name}-dlq")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_carries_ids_attributes_and_headers() {
    let _nats = NATS_LOCK.read().await;
    let db = fresh_db().await;
    let mut orders = Appended::new();
    append(&db, "order", 1, 1, &mut orders).await;
    let q = nats(&unique("attrs")).await;
    let name = unique("relay");
    let runner = start_relay(&db, relay(&name, q.clone()), options()).await;
    wait_processed(&db, &name, 1, Duration::from_secs(30)).await;
    runner.stop().await;
    let d = q.receive(1).await.unwrap().remove(0);
    let (aggregate, ids) = orders.into_iter().next().unwrap();
    assert_eq!(d.message.id, ids[0].to_string());
    assert_eq!(d.message.group, aggregate.to_string());
    let a = &d.message.attributes;
    assert_eq!(a["chronicle-event-type"], "Opened");
    assert_eq!(a["chronicle-aggregate-type"], "order");
    assert_eq!(a["chronicle-schema-version"], "1");
    assert_eq!(a["tenant"], "acme");
    assert_eq!(decode_event(&d.message).unwrap().version, 1);
}
