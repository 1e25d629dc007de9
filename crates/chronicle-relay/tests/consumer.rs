//! The consumer side: a poison event dead-lettered with its aggregate's
//! later events parked behind it (NATS); duplicates dropped by event id
//! (RabbitMQ, which does not deduplicate).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chronicle_projections::RetryPolicy;
use chronicle_relay::{DEAD_LETTER_ATTRIBUTE, StreamConsumer};

use crate::support::*;

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        initial_delay: Duration::from_millis(10),
        ..RetryPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_its_aggregate_parked_behind_it_on_nats() {
    let _nats = NATS_LOCK.read().await;
    let db = fresh_db().await;
    let mut orders = Appended::new();
    append(&db, "order", 4, 5, &mut orders).await;
    let (&victim, victim_ids) = orders.iter().next().unwrap();
    let poison = victim_ids[2]; // version 3
    let qname = unique("poison");
    let queue = nats(&qname).await;
    let dlq = nats(&format!("{qname}-dlq")).await;
    let name = unique("relay");
    let runner = start_relay(&db, relay(&name, queue.clone()), options()).await;
    wait_processed(&db, &name, 20, Duration::from_secs(60)).await;

    let mut consumer = StreamConsumer::new(
        queue.clone(),
        dlq.clone(),
        Arc::new(Collect {
            poison: vec![poison],
        }),
    )
    .retry(fast_retries());
    let mut seen = Vec::new();
    let mut report = chronicle_relay::ConsumeReport::default();
    let start = Instant::now();
    while report.handled + report.dead_lettered + report.parked < 20 {
        assert!(start.elapsed() < Duration::from_secs(60), "{report:?}");
        let r = consumer.poll(&mut seen).await.unwrap();
        report.handled += r.handled;
        report.dead_lettered += r.dead_lettered;
        report.parked += r.parked;
        report.retries += r.retries;
    }
    assert_eq!(
        (
            report.handled,
            report.dead_lettered,
            report.parked,
            report.retries
        ),
        (17, 1, 2, 2)
    );
    let got = by_aggregate(&seen);
    assert_eq!(
        got[&victim],
        victim_ids[..2],
        "the victim stops before the poison"
    );
    for (id, ids) in &orders {
        if *id != victim {
            assert_eq!(&got[id], ids, "other aggregates flow");
        }
    }
    // The dead-letter queue holds the victim's sequence from the poison on.
    let letters = dlq.peek(&victim.to_string(), 10).await.unwrap();
    let ids: Vec<String> = letters.iter().map(|m| m.id.clone()).collect();
    let expected: Vec<String> = victim_ids[2..].iter().map(|u| u.to_string()).collect();
    assert_eq!(ids, expected);
    assert_eq!(letters[0].attributes[DEAD_LETTER_ATTRIBUTE], "failed");
    assert_eq!(letters[1].attributes[DEAD_LETTER_ATTRIBUTE], "parked");
    assert!(letters[0].attributes["chronicle-reason"].contains("poison"));

    // A restarted consumer knows the aggregate is parked (from the
    // dead-letter queue): a later event of it is parked too, not applied.
    let mut more = Appended::new();
    more.insert(victim, Vec::new());
    let mut e = chronicle_core::NewEvent::new("Changed", serde_json::json!({ "n": 99 }));
    e.metadata
        .extra
        .insert("tenant".into(), serde_json::json!("acme"));
    let late = e.event_id;
    use chronicle_core::EventAppender;
    db.store
        .append(
            victim,
            "order",
            chronicle_core::ExpectedVersion::Any,
            vec![e],
        )
        .await
        .unwrap();
    wait_processed(&db, &name, 21, Duration::from_secs(30)).await;
    runner.stop().await;
    let mut restarted = StreamConsumer::new(
        queue.clone(),
        dlq.clone(),
        Arc::new(Collect { poison: vec![] }),
    );
    assert_eq!(restarted.load_parked().await.unwrap(), 1);
    let mut seen2 = Vec::new();
    let start = Instant::now();
    loop {
        let r = restarted.poll(&mut seen2).await.unwrap();
        if r.parked == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen2.is_empty());
    let letters = dlq.peek(&victim.to_string(), 10).await.unwrap();
    assert_eq!(letters.last().unwrap().id, late.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_on_the_wire_are_dropped_by_event_id_on_rabbitmq() {
    let db = fresh_db().await;
    let mut orders = Appended::new();
    append(&db, "order", 6, 4, &mut orders).await;
    let qname = unique("dups");
    let queue = rabbit(&qname).await;
    // Two relays over the same events: every event is published twice
    // (RabbitMQ does not deduplicate).
    for _ in 0..2 {
        let name = unique("relay");
        let runner = start_relay(&db, relay(&name, queue.clone()), options()).await;
        wait_processed(&db, &name, 24, Duration::from_secs(60)).await;
        runner.stop().await;
    }
    let mut consumer = StreamConsumer::new(
        queue.clone(),
        rabbit(&format!("{qname}-dlq")).await,
        Arc::new(Collect { poison: vec![] }),
    );
    let mut seen = Vec::new();
    let mut report = chronicle_relay::ConsumeReport::default();
    let start = Instant::now();
    while report.received < 48 {
        assert!(start.elapsed() < Duration::from_secs(60), "{report:?}");
        let r = consumer.poll(&mut seen).await.unwrap();
        report.received += r.received;
        report.duplicates += r.duplicates;
        if r.received == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(report.duplicates, 24, "every second copy dropped");
    assert_eq!(
        by_aggregate(&seen),
        orders,
        "each event applied once, in order"
    );
}
