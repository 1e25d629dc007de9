//! [`RabbitQueue`]: Chronicle's [`MessageQueue`] on RabbitMQ (AMQP 0.9.1).
//!
//! One queue is a fixed number of *lanes* ([`RabbitOptions::lanes`],
//! default 16): durable classic queues `chronicle.<name>.<lane>`, each
//! declared with `x-single-active-consumer`. A message of group `g` goes
//! to lane [`lane_of`]`(g, lanes)` (a SHA-256 of the group, so every
//! publisher agrees), through the default exchange, persistent, with
//! publisher confirms.
//!
//! - **One head per lane, so at most one per group.** A handle consumes
//!   every lane with a prefetch of 1 once it first receives; the single
//!   active consumer rule gives each lane to one consumer at a time across
//!   every handle and process, and the prefetch lets that consumer hold one
//!   unacknowledged message. A group's later messages wait behind its head
//!   — and so do the messages of the other groups hashed to the same lane.
//!   This is the AMQP shape of a partitioned log: more lanes, less
//!   collateral blocking, more queues and consumers. (Exact per-group
//!   blocking would need a queue per group, and RabbitMQ has no way to list
//!   queues over AMQP for a consumer to find them.)
//! - **Redelivery**: [`MessageQueue::nack`] is `basic.nack` with requeue: a
//!   classic queue puts the message back at its place, the head of its
//!   lane. A consumer that dies is noticed when its connection closes (at
//!   once for a crash, which closes the socket; after the heartbeat,
//!   [`RabbitOptions::heartbeat`], for a lost network) and its unacknowledged
//!   head goes to the next consumer: the heartbeat is the visibility
//!   timeout. A consumer that stays connected and never acknowledges is
//!   cut off by the broker's `consumer_timeout` (30 minutes by default).
//! - **No deduplication.** RabbitMQ does not deduplicate: the message id
//!   travels as the AMQP `message_id` property, and a message published
//!   twice is delivered twice. Make the consumer idempotent with the id
//!   (the event id, for dead letters).
//! - **Receipts** are per connection: a delivery is acknowledged through the
//!   handle that received it.
//! - [`MessageQueue::depth`] counts the messages waiting in the lanes; the
//!   heads held by consumers are not counted. `peek` is not offered
//!   (AMQP cannot browse a queue without taking its messages).
//! - [`Delivery::delivery_count`] is 1 for a first delivery and 2 for a
//!   redelivery (classic queues only flag redeliveries).
//!
//! ```no_run
//! use chronicle_core::{Message, MessageQueue};
//! use chronicle_rabbitmq::{RabbitOptions, RabbitQueue};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), chronicle_core::BoxError> {
//! let options = RabbitOptions::new("amqp://guest:guest@127.0.0.1:5672/%2f");
//! let queue = RabbitQueue::connect(&options, "user-profile").await?;
//! queue.publish(&[Message::new("evt-1", "account-7", json!({ "n": 1 }))]).await?;
//! for delivery in queue.receive(10).await? {
//!     queue.ack(&[delivery.receipt]).await?;
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{BoxError, Delivery, Message, MessageQueue, QueueDepth, Receipt};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// The header carrying [`Message::group`].
pub const GROUP_HEADER: &str = "chronicle-group";
/// The header carrying [`Message::attributes`] as a JSON object.
pub const ATTRIBUTES_HEADER: &str = "chronicle-attributes";

/// What can go wrong with a RabbitMQ queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name is not usable.
    #[error("`{0}` cannot name a RabbitMQ queue: use letters, digits, `-` and `_`")]
    InvalidName(String),
    /// A receipt this handle did not issue.
    #[error(
        "`{0}` is not a receipt of this RabbitMQ connection; acknowledge through the handle that received it"
    )]
    InvalidReceipt(String),
    /// A message this crate did not publish.
    #[error("a message on `{queue}` is not a Chronicle message: {reason}")]
    Foreign {
        /// The lane queue.
        queue: String,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused a publish (a negative publisher confirm).
    #[error("RabbitMQ did not confirm the publish of message `{0}`")]
    NotConfirmed(String),
    /// The broker or the connection failed.
    #[error("RabbitMQ {action}: {source}")]
    Amqp {
        /// What was being done.
        action: &'static str,
        /// The client's error.
        source: lapin::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn amqp(action: &'static str) -> impl FnOnce(lapin::Error) -> Error {
    move |source| Error::Amqp { action, source }
}

/// How to reach the broker, and the queue's shape.
#[derive(Debug, Clone)]
pub struct RabbitOptions {
    url: String,
    lanes: u16,
    heartbeat: Duration,
    receive_wait: Duration,
}

impl RabbitOptions {
    /// The broker at `url` (`amqp://user:password@host:port/vhost`,
    /// `amqps://` for TLS).
    pub fn new(url: impl Into<String>) -> Self {
        RabbitOptions {
            url: url.into(),
            lanes: 16,
            heartbeat: Duration::from_secs(30),
            receive_wait: Duration::from_millis(200),
        }
    }

    /// How many lane queues the groups are hashed onto (default 16). Every
    /// handle on a queue must use the same number.
    pub fn lanes(&mut self, lanes: u16) -> &mut Self {
        self.lanes = lanes.max(1);
        self
    }

    /// The connection heartbeat (default 30 s; whole seconds): how long a
    /// consumer whose network went away keeps its head.
    pub fn heartbeat(&mut self, heartbeat: Duration) -> &mut Self {
        self.heartbeat = heartbeat;
        self
    }

    /// How long a receive that finds nothing waits for a delivery (default
    /// 200 ms).
    pub fn receive_wait(&mut self, wait: Duration) -> &mut Self {
        self.receive_wait = wait;
        self
    }

    /// The broker URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The lane of `group` among `lanes`: the first eight bytes of the group's
/// SHA-256, modulo the lane count.
///
/// ```
/// let lane = chronicle_rabbitmq::lane_of("account-7", 16);
/// assert!(lane < 16);
/// assert_eq!(lane, chronicle_rabbitmq::lane_of("account-7", 16));
/// ```
pub fn lane_of(group: &str, lanes: u16) -> u16 {
    let digest = Sha256::digest(group.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(lanes.max(1))) as u16
}

/// One lane's consumer: its channel (acks go back on it), the delivery
/// stream and the tags handed out and not yet settled.
struct LaneConsumer {
    channel: Channel,
    consumer: Consumer,
    outstanding: BTreeSet<u64>,
}

/// A [`MessageQueue`] on RabbitMQ lane queues; see the crate
/// documentation. Each value is a handle with its own connection.
pub struct RabbitQueue {
    name: String,
    options: RabbitOptions,
    connection: std::sync::Arc<Connection>,
    publisher: Mutex<Channel>,
    /// Started at the first receive: a handle that only publishes never
    /// takes messages.
    consumers: Mutex<Option<Vec<LaneConsumer>>>,
    /// Tells this handle's receipts from another connection's.
    handle_id: String,
}

impl std::fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueue")
            .field("name", &self.name)
            .field("lanes", &self.options.lanes)
            .finish_non_exhaustive()
    }
}

impl RabbitQueue {
    /// Connects and declares the queue's lanes (idempotent).
    pub async fn connect(options: &RabbitOptions, name: &str) -> Result<Self> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let url = with_heartbeat(&options.url, options.heartbeat);
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .map_err(amqp("connect"))?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(amqp("open a channel"))?;
        for lane in 0..options.lanes {
            declare(&publisher, &lane_queue(name, lane)).await?;
        }
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("turn on publisher confirms"))?;
        Ok(RabbitQueue {
            name: name.to_owned(),
            options: options.clone(),
            connection: std::sync::Arc::new(connection),
            publisher: Mutex::new(publisher),
            consumers: Mutex::new(None),
            handle_id: format!("{:016x}", rand_id()),
        })
    }

    /// Consumes every lane, prefetch 1 each.
    async fn start_consumers(&self) -> Result<Vec<LaneConsumer>> {
        let mut lanes = Vec::with_capacity(usize::from(self.options.lanes));
        for lane in 0..self.options.lanes {
            let channel = self
                .connection
                .create_channel()
                .await
                .map_err(amqp("open a channel"))?;
            channel
                .basic_qos(1, BasicQosOptions { global: false })
                .await
                .map_err(amqp("set the prefetch"))?;
            let consumer = channel
                .basic_consume(
                    lane_queue(&self.name, lane).into(),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("consume a lane"))?;
            lanes.push(LaneConsumer {
                channel,
                consumer,
                outstanding: BTreeSet::new(),
            });
        }
        Ok(lanes)
    }

    fn decode(&self, lane: u16, d: &lapin::message::Delivery) -> Result<Delivery> {
        let queue = lane_queue(&self.name, lane);
        let foreign = |reason: &str| Error::Foreign {
            queue: queue.clone(),
            reason: reason.to_owned(),
        };
        let p = &d.properties;
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| foreign("no message_id"))?;
        let headers = p.headers().as_ref().ok_or_else(|| foreign("no headers"))?;
        let text = |key: &str| -> Option<String> {
            match headers.inner().get(key)? {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            }
        };
        let group = text(GROUP_HEADER).ok_or_else(|| foreign("no chronicle-group header"))?;
        let attributes: BTreeMap<String, String> = match text(ATTRIBUTES_HEADER) {
            None => BTreeMap::new(),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| foreign(&format!("bad {ATTRIBUTES_HEADER} header: {e}")))?,
        };
        let payload = serde_json::from_slice(&d.data)
            .map_err(|e| foreign(&format!("body is not JSON: {e}")))?;
        let enqueued_at = p
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0));
        Ok(Delivery {
            message: Message {
                id,
                group,
                payload,
                attributes,
            },
            receipt: Receipt::new(format!("{}:{lane}:{}", self.handle_id, d.delivery_tag)),
            delivery_count: if d.redelivered { 2 } else { 1 },
            enqueued_at,
        })
    }

    /// The lane and delivery tag of each receipt, all of this handle.
    fn parse(&self, receipts: &[Receipt]) -> Result<Vec<(u16, u64)>> {
        receipts
            .iter()
            .map(|r| {
                let bad = || Error::InvalidReceipt(r.to_string());
                let mut parts = r.as_str().split(':');
                let (Some(handle), Some(lane), Some(tag), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                if handle != self.handle_id {
                    return Err(bad());
                }
                let lane: u16 = lane.parse().map_err(|_| bad())?;
                let tag: u64 = tag.parse().map_err(|_| bad())?;
                if lane >= self.options.lanes {
                    return Err(bad());
                }
                Ok((lane, tag))
            })
            .collect()
    }

    /// Acks or nacks (with requeue) the receipts still outstanding.
    async fn settle(&self, receipts: &[Receipt], ack: bool) -> Result<()> {
        let parsed = self.parse(receipts)?;
        let mut consumers = self.consumers.lock().await;
        let Some(lanes) = consumers.as_mut() else {
            return Ok(());
        };
        for (lane, tag) in parsed {
            let lane = &mut lanes[usize::from(lane)];
            // Settling a tag twice would close the channel: a receipt
            // already settled is a no-op.
            if !lane.outstanding.remove(&tag) {
                continue;
            }
            if ack {
                lane.channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                    .map_err(amqp("acknowledge"))?;
            } else {
                lane.channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        },
                    )
                    .await
                    .map_err(amqp("give a message back"))?;
            }
        }
        Ok(())
    }

    /// Closes the connection: unacknowledged heads go to other consumers
    /// at once. Dropping the handle does the same in the background.
    pub async fn close(self) -> Result<()> {
        self.connection
            .close(200, ShortString::from("closed"))
            .await
            .map_err(amqp("close"))
    }
}

impl Drop for RabbitQueue {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let connection = self.connection.clone();
            runtime.spawn(async move {
                let _ = connection.close(200, ShortString::from("dropped")).await;
            });
        }
    }
}

fn lane_queue(name: &str, lane: u16) -> String {
    format!("chronicle.{name}.{lane}")
}

async fn declare(channel: &Channel, queue: &str) -> Result<lapin::Queue> {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(amqp("declare a lane queue"))
}

/// `url` with `heartbeat=<seconds>` added unless it names one.
fn with_heartbeat(url: &str, heartbeat: Duration) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={}", heartbeat.as_secs().max(1))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[async_trait]
impl MessageQueue for RabbitQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        if messages.is_empty() {
            return Ok(());
        }
        let channel = self.publisher.lock().await;
        let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = FieldTable::default();
            headers.insert(
                GROUP_HEADER.into(),
                AMQPValue::LongString(LongString::from(m.group.as_bytes().to_vec())),
            );
            if !m.attributes.is_empty() {
                headers.insert(
                    ATTRIBUTES_HEADER.into(),
                    AMQPValue::LongString(LongString::from(serde_json::to_vec(&m.attributes)?)),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(m.id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(now)
                .with_headers(headers);
            let body = serde_json::to_vec(&m.payload)?;
            let lane = lane_of(&m.group, self.options.lanes);
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    lane_queue(&self.name, lane).into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .map_err(amqp("publish"))?;
            confirms.push((m.id.clone(), confirm));
        }
        // Every message is sent: the confirms are awaited without the
        // channel, so another caller (another relay partition) publishes
        // meanwhile instead of waiting for this batch's round trip.
        drop(channel);
        for (id, confirm) in confirms {
            let confirmation = confirm.await.map_err(amqp("publish"))?;
            if !confirmation.is_ack() {
                return Err(Error::NotConfirmed(id).into());
            }
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut guard = self.consumers.lock().await;
        if guard.is_none() {
            *guard = Some(self.start_consumers().await?);
        }
        let Some(lanes) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let deadline = tokio::time::Instant::now() + self.options.receive_wait;
        let mut out = Vec::new();
        loop {
            for (lane, consumer) in lanes.iter_mut().enumerate() {
                if out.len() >= max {
                    break;
                }
                // Whatever the broker already pushed; never waits.
                while let Some(Some(next)) = consumer.consumer.next().now_or_never() {
                    let d = next.map_err(amqp("receive"))?;
                    consumer.outstanding.insert(d.delivery_tag);
                    out.push(self.decode(lane as u16, &d)?);
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        Ok(self.settle(receipts, true).await?)
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        Ok(self.settle(receipts, false).await?)
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let channel = self.publisher.lock().await;
        let mut messages = 0u64;
        for lane in 0..self.options.lanes {
            let queue = declare(&channel, &lane_queue(&self.name, lane)).await?;
            messages += u64::from(queue.message_count());
        }
        Ok(QueueDepth {
            messages,
            groups: None,
            oldest: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_added_to_the_url() {
        let h = Duration::from_secs(5);
        assert_eq!(
            with_heartbeat("amqp://h/%2f", h),
            "amqp://h/%2f?heartbeat=5"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=8192", h),
            "amqp://h/%2f?frame_max=8192&heartbeat=5"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=9", h),
            "amqp://h/%2f?heartbeat=9"
        );
    }

    #[test]
    fn lanes_spread_groups() {
        let used: BTreeSet<u16> = (0..200).map(|i| lane_of(&format!("g{i}"), 16)).collect();
        assert_eq!(used.len(), 16);
    }

    #[test]
    fn queues_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RabbitQueue>();
        check::<Error>();
    }
}
