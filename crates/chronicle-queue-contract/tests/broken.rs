//! Every property can fail: each broken queue below breaks one promise,
//! and the property that checks it says so.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{BoxError, Delivery, MemoryQueue, Message, MessageQueue, QueueDepth, Receipt};
use chronicle_queue_contract::{
    Dedup, Outcome, Spec, a_dead_consumers_head_is_redelivered, deduplication,
    nack_redelivers_the_head, one_head_per_group, publish_receive_ack,
};

use crate::memory::registry;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// `ack` does nothing.
    AckIgnored,
    /// Every message is its own group internally: no head blocking.
    NoBlocking,
    /// A batch is published back to front.
    Reordered,
    /// `nack` does nothing (the head waits for the timeout).
    NackIgnored,
    /// Receiving removes the message (at most once).
    LosesUnacked,
    /// Duplicates are queued again.
    NoDedup,
    /// Changes the payload on the way.
    Mangles,
}

struct Broken {
    inner: Arc<MemoryQueue>,
    fault: Fault,
}

const SEP: char = '\u{1f}';

#[async_trait]
impl MessageQueue for Broken {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        let mut messages = messages.to_vec();
        match self.fault {
            Fault::Reordered => messages.reverse(),
            Fault::NoBlocking => {
                for m in &mut messages {
                    m.group = format!("{}{SEP}{}", m.group, m.id);
                }
            }
            Fault::NoDedup => {
                for m in &mut messages {
                    m.id = format!("{}{SEP}{}", m.id, uuid::Uuid::new_v4());
                }
            }
            Fault::Mangles => {
                for m in &mut messages {
                    m.payload["mangled"] = true.into();
                }
            }
            _ => {}
        }
        self.inner.publish(&messages).await
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut out = self.inner.receive(max).await?;
        for d in &mut out {
            if let Some((g, _)) = d.message.group.split_once(SEP) {
                d.message.group = g.to_owned();
            }
            if let Some((id, _)) = d.message.id.split_once(SEP) {
                d.message.id = id.to_owned();
            }
        }
        if self.fault == Fault::LosesUnacked {
            let receipts: Vec<Receipt> = out.iter().map(|d| d.receipt.clone()).collect();
            self.inner.ack(&receipts).await?;
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        if self.fault == Fault::AckIgnored {
            return Ok(());
        }
        self.inner.ack(receipts).await
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        if self.fault == Fault::NackIgnored {
            return Ok(());
        }
        self.inner.nack(receipts).await
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        self.inner.depth().await
    }
}

const TIMEOUT: Duration = Duration::from_millis(400);

fn spec() -> Spec {
    Spec {
        visibility_timeout: TIMEOUT,
        wait: Duration::from_secs(1),
        settle: Duration::from_millis(300),
        ..Spec::default()
    }
}

fn broken(fault: Fault) -> impl Fn(String) -> std::future::Ready<Broken> {
    let open = registry(TIMEOUT);
    move |name| {
        std::future::ready(Broken {
            inner: open(name).into_inner(),
            fault,
        })
    }
}

fn fails(outcome: Outcome, property: &str, says: &str) {
    let failure = outcome.expect_err("the broken queue passed");
    assert_eq!(failure.property, property);
    assert!(
        failure.message.contains(says),
        "{property} failed for another reason: {failure}"
    );
}

#[tokio::test]
async fn an_ack_that_does_nothing_fails_publish_receive_ack() {
    let open = broken(Fault::AckIgnored);
    fails(
        publish_receive_ack(&spec(), &open).await,
        "publish_receive_ack",
        "delivered again",
    );
}

#[tokio::test]
async fn a_changed_payload_fails_publish_receive_ack() {
    let open = broken(Fault::Mangles);
    fails(
        publish_receive_ack(&spec(), &open).await,
        "publish_receive_ack",
        "received",
    );
}

#[tokio::test]
async fn a_queue_without_head_blocking_fails_one_head_per_group() {
    let open = broken(Fault::NoBlocking);
    fails(
        one_head_per_group(&spec(), &open).await,
        "one_head_per_group",
        "two messages of one group",
    );
}

#[tokio::test]
async fn a_reordered_group_fails_one_head_per_group() {
    let open = broken(Fault::Reordered);
    fails(
        one_head_per_group(&spec(), &open).await,
        "one_head_per_group",
        "only the head may come",
    );
}

#[tokio::test]
async fn a_nack_that_does_nothing_fails_nack_redelivers_the_head() {
    let open = broken(Fault::NackIgnored);
    fails(
        nack_redelivers_the_head(&spec(), &open).await,
        "nack_redelivers_the_head",
        "the nack did nothing",
    );
}

#[tokio::test]
async fn losing_unacknowledged_messages_fails_the_dead_consumer_property() {
    let open = broken(Fault::LosesUnacked);
    fails(
        a_dead_consumers_head_is_redelivered(&spec(), &open).await,
        "a_dead_consumers_head_is_redelivered",
        "first",
    );
}

#[tokio::test]
async fn duplicates_fail_deduplication_and_a_wrong_statement_too() {
    let open = broken(Fault::NoDedup);
    fails(
        deduplication(&spec(), &open).await,
        "deduplication",
        "delivers it once",
    );
    // A queue that does deduplicate while its adapter says it does not.
    let honest = Spec {
        dedup: Dedup::None("says so"),
        ..spec()
    };
    fails(
        deduplication(&honest, &registry(TIMEOUT)).await,
        "deduplication",
        "all three should come",
    );
}
