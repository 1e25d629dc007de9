//! The provider-agnostic message queue: what the dead-letter queue (and later
//! event streaming) is built on. No I/O: implementations live elsewhere
//! (`PgDeadLetterQueue` in `chronicle-projections`, the broker adapters in
//! `chronicle-nats`, `chronicle-rabbitmq`, `chronicle-sqs`, `chronicle-kafka`
//! and `chronicle-pubsub`; docs/brokers.md compares them).
//!
//! The model is the common ground of the FIFO brokers:
//!
//! | here | SQS FIFO | Pub/Sub | Kafka | NATS JetStream | AMQP |
//! |---|---|---|---|---|---|
//! | [`Message::id`] (deduplication) | `MessageDeduplicationId` | an attribute checked by the subscriber | the key + idempotent producer | `Nats-Msg-Id` | `message_id` |
//! | [`Message::group`] (ordering) | `MessageGroupId` | ordering key | record key (partition) | subject token | single-active-consumer queue |
//! | [`Message::payload`] | body (JSON) | data | value | payload | body |
//! | [`Message::attributes`] | message attributes | attributes | headers | headers | headers |
//! | [`Delivery::receipt`] / [`MessageQueue::ack`] | receipt handle / `DeleteMessage` | ack id / `Acknowledge` | offset / commit | reply subject / `Ack` | delivery tag / `basic.ack` |
//!
//! Order holds within a group, and a group's head that is not acknowledged
//! blocks the rest of its group while other groups flow.
//!
//! **Redelivery.** A head handed out by [`MessageQueue::receive`] is in
//! flight until it is acknowledged ([`MessageQueue::ack`]: gone), given
//! back ([`MessageQueue::nack`]: deliverable again at once, still the head
//! of its group), or its queue's *visibility timeout* runs out. That
//! timeout is how "a consumer died without acknowledging" is defined: a
//! consumer that stops (crashes, loses its connection, hangs) simply never
//! acknowledges, and once the timeout the queue was configured with has
//! passed, its heads are delivered again, to any consumer. The timeout is
//! each queue's setting (SQS's visibility timeout, JetStream's `ack_wait`,
//! Pub/Sub's ack deadline, Kafka's session timeout, AMQP's connection
//! heartbeat); [`MemoryQueue`] and the PostgreSQL dead-letter queue default
//! to zero, handing an unacknowledged head out again at the next receive.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::BoxError;

/// One message: an id for deduplication, a group for ordering, a JSON
/// payload and string attributes.
///
/// ```
/// use chronicle_core::Message;
/// use serde_json::json;
///
/// let m = Message::new("evt-1", "account-7", json!({ "amount": 5 }))
///     .with_attribute("reason", "poison event");
/// assert_eq!(m.attributes["reason"], "poison event");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The message's identity. Publishing a message whose id is already in
    /// the queue (or, for a broker, within its deduplication window) is a
    /// no-op. For events, the event id.
    pub id: String,
    /// The ordering group: messages of one group are delivered in order,
    /// one at a time. For events, the aggregate id.
    pub group: String,
    /// The body.
    pub payload: Value,
    /// String attributes (headers), sorted by name.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl Message {
    /// A message without attributes.
    pub fn new(id: impl Into<String>, group: impl Into<String>, payload: Value) -> Self {
        Message {
            id: id.into(),
            group: group.into(),
            payload,
            attributes: BTreeMap::new(),
        }
    }

    /// Sets attribute `name` to `value`.
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }
}

/// The token that acknowledges one delivery (an SQS receipt handle, a
/// Pub/Sub ack id, a row id). Opaque: only the queue that issued it reads
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Receipt(String);

impl Receipt {
    /// A receipt holding `token` (for queue implementations).
    pub fn new(token: impl Into<String>) -> Self {
        Receipt(token.into())
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message handed out by [`MessageQueue::receive`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Acknowledges this delivery ([`MessageQueue::ack`]).
    pub receipt: Receipt,
    /// How many times the message has been handed out, this time included
    /// (1 on the first delivery), as far as the queue counts.
    pub delivery_count: u32,
    /// When the message was published, when the queue knows.
    pub enqueued_at: Option<DateTime<Utc>>,
}

/// How much a queue holds ([`MessageQueue::depth`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueDepth {
    /// Messages published and not acknowledged (for brokers that only
    /// estimate it, the estimate).
    pub messages: u64,
    /// Groups with at least one message, when the queue can tell.
    pub groups: Option<u64>,
    /// When the oldest message was published, when the queue can tell.
    pub oldest: Option<DateTime<Utc>>,
}

/// A FIFO message queue with ordering groups and deduplication.
///
/// The contract every implementation keeps:
///
/// - **Deduplication**: [`publish`](MessageQueue::publish) of a message
///   whose [`Message::id`] is still in the queue is a no-op (a broker may
///   bound this by its deduplication window).
/// - **Order within a group**: a group's messages are delivered in the
///   order they were published.
/// - **Head-of-group blocking**: [`receive`](MessageQueue::receive) hands
///   out at most the head of each group; until the head is acknowledged
///   the rest of its group waits, while other groups flow. A head received
///   and not acknowledged is delivered again: at once after
///   [`nack`](MessageQueue::nack), else once the queue's visibility timeout
///   has passed (a consumer that died without acknowledging; see the
///   module documentation).
/// - **At least once**: a consumer may see a message more than once; make
///   its effect idempotent with the message id.
///
/// Object safe: hold queues as `Arc<dyn MessageQueue>`.
///
/// ```
/// use chronicle_core::{Message, MemoryQueue, MessageQueue};
/// use serde_json::json;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let queue: Box<dyn MessageQueue> = Box::new(MemoryQueue::new("dead-letters"));
/// queue.publish(&[
///     Message::new("e1", "account-a", json!({ "n": 1 })),
///     Message::new("e2", "account-a", json!({ "n": 2 })),
///     Message::new("e3", "account-b", json!({ "n": 3 })),
///     Message::new("e1", "account-a", json!({ "n": 1 })), // a duplicate: no-op
/// ]).await?;
/// assert_eq!(queue.depth().await?.messages, 3);
///
/// // One head per group: e2 waits behind e1.
/// let heads = queue.receive(10).await?;
/// let ids: Vec<_> = heads.iter().map(|d| d.message.id.as_str()).collect();
/// assert_eq!(ids, ["e1", "e3"]);
///
/// // Acknowledging e1 releases e2.
/// queue.ack(&[heads[0].receipt.clone()]).await?;
/// let heads = queue.receive(10).await?;
/// let ids: Vec<_> = heads.iter().map(|d| d.message.id.as_str()).collect();
/// assert_eq!(ids, ["e2", "e3"]);
/// # Ok::<(), chronicle_core::BoxError>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait MessageQueue: Send + Sync {
    /// The queue's name (a projection's, a topic's).
    fn name(&self) -> &str;

    /// Publishes `messages` in order. Messages whose id is already queued
    /// are skipped. An implementation that can publishes the batch
    /// atomically; otherwise a failure may leave a prefix published, and
    /// publishing the batch again is safe (deduplication).
    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError>;

    /// Up to `max` group heads, oldest first: at most one message per
    /// group, never a message while an earlier one of its group is queued.
    /// Empty when nothing is queued.
    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError>;

    /// Acknowledges deliveries: each message is removed and the next
    /// message of its group becomes the head. Acknowledging a message that
    /// is already gone is a no-op.
    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError>;

    /// Gives deliveries back without processing them (a negative
    /// acknowledgement): each message becomes deliverable again at once,
    /// still the head of its group, without waiting for the visibility
    /// timeout; the rest of its group keeps waiting behind it. Giving back
    /// a message that is already gone (or already redelivered) is a no-op.
    ///
    /// ```
    /// use chronicle_core::{Message, MemoryQueue, MessageQueue};
    /// use serde_json::json;
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// // Received heads stay in flight for a minute unless given back.
    /// let queue = MemoryQueue::new("q").with_visibility_timeout(Duration::from_secs(60));
    /// queue.publish(&[
    ///     Message::new("e1", "account-a", json!(1)),
    ///     Message::new("e2", "account-a", json!(2)),
    /// ]).await?;
    /// let heads = queue.receive(10).await?;
    /// assert_eq!(heads[0].message.id, "e1");
    /// assert!(queue.receive(10).await?.is_empty()); // e1 in flight, e2 waits
    ///
    /// queue.nack(&[heads[0].receipt.clone()]).await?;
    /// let again = queue.receive(10).await?;
    /// assert_eq!(again[0].message.id, "e1"); // still the head
    /// assert_eq!(again[0].delivery_count, 2);
    /// # Ok::<(), chronicle_core::BoxError>(())
    /// # }).unwrap();
    /// ```
    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError>;

    /// How many messages (and groups) are queued.
    async fn depth(&self) -> Result<QueueDepth, BoxError>;

    /// Up to `limit` messages of `group`, in order, without delivering
    /// them (inspection). Queues that cannot browse return an error saying
    /// so (the default).
    async fn peek(&self, group: &str, limit: usize) -> Result<Vec<Message>, BoxError> {
        let _ = (group, limit);
        Err(format!("queue `{}` cannot be browsed", self.name()).into())
    }
}

#[async_trait]
impl<Q: MessageQueue + ?Sized> MessageQueue for Arc<Q> {
    fn name(&self) -> &str {
        (**self).name()
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        (**self).publish(messages).await
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        (**self).receive(max).await
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        (**self).ack(receipts).await
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        (**self).nack(receipts).await
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        (**self).depth().await
    }

    async fn peek(&self, group: &str, limit: usize) -> Result<Vec<Message>, BoxError> {
        (**self).peek(group, limit).await
    }
}

/// A [`MessageQueue`] in this process's memory: the reference semantics,
/// for tests and examples. Nothing survives the process.
///
/// Its visibility timeout is zero unless set
/// ([`MemoryQueue::with_visibility_timeout`]): a head received and not
/// acknowledged is handed out again at the next receive.
///
/// ```
/// use chronicle_core::{MemoryQueue, MessageQueue};
///
/// let queue = MemoryQueue::new("test");
/// assert_eq!(queue.name(), "test");
/// ```
#[derive(Debug, Default)]
pub struct MemoryQueue {
    name: String,
    visibility_timeout: Duration,
    state: Mutex<MemoryState>,
}

/// One queued message.
#[derive(Debug)]
struct Queued {
    message: Message,
    published: DateTime<Utc>,
    deliveries: u32,
    /// In flight until then (received, not acknowledged nor given back).
    invisible_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    next: u64,
    /// seq -> message.
    messages: BTreeMap<u64, Queued>,
    /// id -> seq, for deduplication.
    ids: BTreeMap<String, u64>,
}

impl MemoryQueue {
    /// An empty queue called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        MemoryQueue {
            name: name.into(),
            visibility_timeout: Duration::ZERO,
            state: Mutex::default(),
        }
    }

    /// Keeps a received head in flight (not handed out again, its group
    /// blocked) for `timeout` unless it is acknowledged or given back
    /// first: how long a consumer that dies holding it delays it. Default
    /// zero: handed out again at the next receive.
    ///
    /// ```
    /// use chronicle_core::MemoryQueue;
    /// use std::time::Duration;
    ///
    /// let queue = MemoryQueue::new("q").with_visibility_timeout(Duration::from_secs(30));
    /// ```
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    fn seq(&self, receipt: &Receipt) -> Result<u64, BoxError> {
        receipt
            .as_str()
            .parse()
            .map_err(|_| format!("`{receipt}` is not a receipt of queue `{}`", self.name).into())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic elsewhere cannot leave the maps inconsistent (every
        // update is a single insert or remove), so a poisoned lock is safe.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl MessageQueue for MemoryQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        let mut state = self.state();
        for message in messages {
            let seq = state.next;
            if let Entry::Vacant(slot) = state.ids.entry(message.id.clone()) {
                slot.insert(seq);
                state.next += 1;
                state.messages.insert(
                    seq,
                    Queued {
                        message: message.clone(),
                        published: Utc::now(),
                        deliveries: 0,
                        invisible_until: None,
                    },
                );
            }
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut state = self.state();
        let now = Utc::now();
        let until = (!self.visibility_timeout.is_zero()).then(|| {
            now + chrono::Duration::from_std(self.visibility_timeout)
                .unwrap_or(chrono::Duration::MAX)
        });
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (seq, queued) in state.messages.iter_mut() {
            if out.len() >= max {
                break;
            }
            // Only a group's first message is its head; an in-flight head
            // blocks its group.
            if !seen.insert(queued.message.group.clone()) {
                continue;
            }
            if queued.invisible_until.is_some_and(|t| t > now) {
                continue;
            }
            queued.deliveries += 1;
            queued.invisible_until = until;
            out.push(Delivery {
                message: queued.message.clone(),
                receipt: Receipt::new(seq.to_string()),
                delivery_count: queued.deliveries,
                enqueued_at: Some(queued.published),
            });
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let seqs = receipts
            .iter()
            .map(|r| self.seq(r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = self.state();
        for seq in seqs {
            if let Some(queued) = state.messages.remove(&seq) {
                state.ids.remove(&queued.message.id);
            }
        }
        Ok(())
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let seqs = receipts
            .iter()
            .map(|r| self.seq(r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = self.state();
        for seq in seqs {
            if let Some(queued) = state.messages.get_mut(&seq) {
                queued.invisible_until = None;
            }
        }
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let state = self.state();
        let groups: std::collections::BTreeSet<&str> = state
            .messages
            .values()
            .map(|q| q.message.group.as_str())
            .collect();
        Ok(QueueDepth {
            messages: state.messages.len() as u64,
            groups: Some(groups.len() as u64),
            oldest: state.messages.values().map(|q| q.published).min(),
        })
    }

    async fn peek(&self, group: &str, limit: usize) -> Result<Vec<Message>, BoxError> {
        Ok(self
            .state()
            .messages
            .values()
            .filter(|q| q.message.group == group)
            .take(limit)
            .map(|q| q.message.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(deliveries: &[Delivery]) -> Vec<&str> {
        deliveries.iter().map(|d| d.message.id.as_str()).collect()
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_groups_keep_their_order() {
        let q = MemoryQueue::new("q");
        q.publish(&[
            Message::new("a1", "a", json!(1)),
            Message::new("b1", "b", json!(2)),
            Message::new("a2", "a", json!(3)),
        ])
        .await
        .unwrap();
        q.publish(&[Message::new("a1", "a", json!("changed"))])
            .await
            .unwrap();
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.messages, depth.groups), (3, Some(2)));
        assert_eq!(
            q.peek("a", 10).await.unwrap(),
            [
                Message::new("a1", "a", json!(1)),
                Message::new("a2", "a", json!(3))
            ]
        );

        let first = q.receive(10).await.unwrap();
        assert_eq!(ids(&first), ["a1", "b1"]);
        // Not acknowledged: delivered again, and a2 still waits.
        let again = q.receive(10).await.unwrap();
        assert_eq!(ids(&again), ["a1", "b1"]);
        assert_eq!(again[0].delivery_count, 2);
        // Group b flows on while a is blocked.
        q.ack(&[again[1].receipt.clone()]).await.unwrap();
        assert_eq!(ids(&q.receive(10).await.unwrap()), ["a1"]);
        q.ack(&[again[0].receipt.clone()]).await.unwrap();
        assert_eq!(ids(&q.receive(1).await.unwrap()), ["a2"]);
        // Acknowledging twice is a no-op; a bad receipt is refused.
        q.ack(&[again[0].receipt.clone()]).await.unwrap();
        assert!(q.ack(&[Receipt::new("x")]).await.is_err());
        assert!(q.nack(&[Receipt::new("x")]).await.is_err());
    }

    #[tokio::test]
    async fn an_in_flight_head_blocks_its_group_until_nack_or_timeout() {
        let q = MemoryQueue::new("q").with_visibility_timeout(Duration::from_millis(50));
        q.publish(&[
            Message::new("a1", "a", json!(1)),
            Message::new("a2", "a", json!(2)),
        ])
        .await
        .unwrap();
        let first = q.receive(10).await.unwrap();
        assert_eq!(ids(&first), ["a1"]);
        assert!(q.receive(10).await.unwrap().is_empty());
        q.nack(&first.iter().map(|d| d.receipt.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        let second = q.receive(10).await.unwrap();
        assert_eq!(ids(&second), ["a1"]);
        assert_eq!(second[0].delivery_count, 2);
        // Nobody acknowledges: after the timeout it is handed out again.
        std::thread::sleep(Duration::from_millis(80));
        let third = q.receive(10).await.unwrap();
        assert_eq!((ids(&third), third[0].delivery_count), (vec!["a1"], 3));
        // A nack of an acknowledged message is a no-op.
        q.ack(&[third[0].receipt.clone()]).await.unwrap();
        q.nack(&[third[0].receipt.clone()]).await.unwrap();
        assert_eq!(ids(&q.receive(10).await.unwrap()), ["a2"]);
    }

    #[test]
    fn queues_are_object_safe_and_send() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<dyn MessageQueue>();
        assert_send_sync::<Message>();
        assert_send_sync::<Delivery>();
        let _: Arc<dyn MessageQueue> = Arc::new(MemoryQueue::new("q"));
    }
}
