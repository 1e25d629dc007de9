//! `NatsQueue` against the NATS server on loopback (with JetStream):
//! `CHRONICLE_NATS_URL`, default `nats://127.0.0.1:4222`. A server that is
//! not there fails the tests; it is not skipped.

use std::time::Duration;

use chronicle_core::{Message, MessageQueue};
use chronicle_nats::{Error, NatsOptions, NatsQueue};
use chronicle_queue_contract::{Spec, run_contract};
use serde_json::json;

const ACK_WAIT: Duration = Duration::from_secs(3);

fn options() -> NatsOptions {
    let url =
        std::env::var("CHRONICLE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let mut options = NatsOptions::new(url);
    options.ack_wait(ACK_WAIT);
    options
}

async fn open(name: String) -> NatsQueue {
    let options = options();
    NatsQueue::connect(&options, &name).await.unwrap_or_else(|e| {
        panic!(
            "no NATS JetStream server at {} ({e:#}); start one: nats-server -a 127.0.0.1 -p 4222 -js",
            options.url()
        )
    })
}

#[tokio::test]
async fn nats_passes_the_queue_contract() {
    let spec = Spec {
        visibility_timeout: ACK_WAIT,
        ..Spec::default()
    };
    run_contract(&spec, open).await;
}

#[tokio::test]
async fn a_group_is_browsed_without_delivering_it() {
    let q = open(format!("peek-{}", uuid_like())).await;
    let sent = [
        Message::new("p1", "agg-1", json!({ "n": 1 })).with_attribute("why", "x"),
        Message::new("p2", "agg-1", json!({ "n": 2 })),
        Message::new("p3", "agg-2", json!({ "n": 3 })),
    ];
    q.publish(&sent).await.unwrap();
    assert_eq!(q.peek("agg-1", 10).await.unwrap(), sent[..2]);
    assert_eq!(q.peek("agg-1", 1).await.unwrap(), sent[..1]);
    assert!(q.peek("agg-3", 10).await.unwrap().is_empty());
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.messages, depth.groups), (3, Some(2)));
    assert!(depth.oldest.is_some());
    // Browsing delivered nothing: the heads are the first delivery.
    let heads = q.receive(10).await.unwrap();
    assert_eq!(heads.len(), 2);
    assert!(heads.iter().all(|d| d.delivery_count == 1));
}

#[tokio::test]
async fn a_group_that_is_not_a_subject_token_is_refused() {
    let q = open(format!("tokens-{}", uuid_like())).await;
    let err = q
        .publish(&[Message::new("x", "a.b", json!(null))])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::InvalidGroup { group }) if group == "a.b"),
        "{err}"
    );
    assert!(matches!(
        NatsQueue::connect(&options(), "bad.name").await,
        Err(Error::InvalidName(_))
    ));
    let err = q
        .ack(&[chronicle_core::Receipt::new("nope")])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not a JetStream acknowledgement subject")
    );
}

#[tokio::test]
async fn a_duplicate_within_the_window_is_dropped_even_after_an_ack() {
    let q = open(format!("window-{}", uuid_like())).await;
    let m = Message::new("once", "agg", json!(1));
    q.publish(std::slice::from_ref(&m)).await.unwrap();
    let d = q.receive(10).await.unwrap();
    q.ack(&[d[0].receipt.clone()]).await.unwrap();
    q.publish(std::slice::from_ref(&m)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(q.receive(10).await.unwrap().is_empty());
    assert_eq!(q.depth().await.unwrap().messages, 0);
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
