//! `RabbitQueue` against the RabbitMQ broker on loopback:
//! `CHRONICLE_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`. A
//! broker that is not there fails the tests; it is not skipped.

use std::sync::Arc;
use std::time::Duration;

use chronicle_core::{Message, MessageQueue, Receipt};
use chronicle_queue_contract::{Dedup, Spec, run_contract};
use chronicle_rabbitmq::{Error, RabbitOptions, RabbitQueue, lane_of};
use serde_json::json;

const LANES: u16 = 8;
const HEARTBEAT: Duration = Duration::from_secs(5);

fn options() -> RabbitOptions {
    let url = std::env::var("CHRONICLE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let mut options = RabbitOptions::new(url);
    options.lanes(LANES).heartbeat(HEARTBEAT);
    options
}

async fn open(name: String) -> RabbitQueue {
    let options = options();
    RabbitQueue::connect(&options, &name)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no RabbitMQ broker at {} ({e:#}); start one: rabbitmq-server -detached",
                options.url()
            )
        })
}

#[tokio::test]
async fn rabbitmq_passes_the_queue_contract() {
    let spec = Spec {
        dedup: Dedup::None("RabbitMQ has no deduplication; message_id is carried for consumers"),
        visibility_timeout: HEARTBEAT,
        lane_of: Some(Arc::new(|g: &str| u64::from(lane_of(g, LANES)))),
        ..Spec::default()
    };
    run_contract(&spec, open).await;
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn a_head_blocks_the_groups_of_its_lane_and_no_other() {
    let q = open(unique("lanes")).await;
    let a = "group-a";
    let same = (0..)
        .map(|i| format!("same-{i}"))
        .find(|g| lane_of(g, LANES) == lane_of(a, LANES))
        .unwrap();
    let other = (0..)
        .map(|i| format!("other-{i}"))
        .find(|g| lane_of(g, LANES) != lane_of(a, LANES))
        .unwrap();
    q.publish(&[
        Message::new("a1", a, json!(1)),
        Message::new("s1", same.as_str(), json!(2)),
        Message::new("o1", other.as_str(), json!(3)),
    ])
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..20 {
        got.extend(q.receive(10).await.unwrap());
    }
    got.sort_by(|x, y| x.message.id.cmp(&y.message.id));
    let ids: Vec<&str> = got.iter().map(|d| d.message.id.as_str()).collect();
    assert_eq!(ids, ["a1", "o1"], "s1 shares a1's lane and waits");
    q.ack(&[got[0].receipt.clone()]).await.unwrap();
    let next = loop {
        let next = q.receive(10).await.unwrap();
        if !next.is_empty() {
            break next;
        }
    };
    assert_eq!(next[0].message.id, "s1");
    q.ack(&[next[0].receipt.clone(), got[1].receipt.clone()])
        .await
        .unwrap();
    assert_eq!(q.depth().await.unwrap().messages, 0);
}

#[tokio::test]
async fn receipts_of_another_connection_are_refused_and_names_checked() {
    let name = unique("receipts");
    let (a, b) = (open(name.clone()).await, open(name).await);
    a.publish(&[Message::new("m", "g", json!(null))])
        .await
        .unwrap();
    let d = loop {
        let got = a.receive(1).await.unwrap();
        if let Some(d) = got.into_iter().next() {
            break d;
        }
    };
    let err = b.ack(std::slice::from_ref(&d.receipt)).await.unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::InvalidReceipt(_))),
        "{err}"
    );
    assert!(b.ack(&[Receipt::new("x")]).await.is_err());
    a.ack(&[d.receipt]).await.unwrap();
    assert!(matches!(
        RabbitQueue::connect(&options(), "bad name").await,
        Err(Error::InvalidName(_))
    ));
    // Not browsable: it says so.
    let err = a.peek("g", 1).await.unwrap_err();
    assert!(err.to_string().contains("cannot be browsed"), "{err}");
}
