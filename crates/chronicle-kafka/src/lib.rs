//! [`KafkaQueue`]: Chronicle's [`MessageQueue`] on Kafka, through
//! librdkafka (the `rdkafka` crate, librdkafka built from source).
//!
//! One queue is the topic `chronicle.<name>` with a fixed number of
//! partitions ([`KafkaOptions::partitions`], default 8), read by the
//! consumer group `chronicle.<name>`:
//!
//! - **Ordering and one head per partition.** A record's key is its group
//!   and its partition is [`partition_of`]`(group, partitions)` (a SHA-256
//!   of the group, chosen by the adapter so every publisher agrees). A
//!   partition is a log: the consumer hands out its first uncommitted
//!   record and nothing else of that partition until the record is
//!   acknowledged, which commits the offset after it. So at most one head
//!   per group, and the other groups of the same partition wait behind it
//!   (as in any Kafka consumer that keeps order). Partitions are shared
//!   among the group's consumers by Kafka's group protocol.
//! - **Redelivery**: [`MessageQueue::nack`] hands the same record out again
//!   at the next receive. A consumer that dies is removed from the group
//!   when its session times out ([`KafkaOptions::session_timeout`], the
//!   visibility timeout; at once when it leaves cleanly), and its
//!   partitions resume at their committed offsets in another consumer, so
//!   its unacknowledged heads are delivered again. A consumer that stays
//!   alive without calling receive for `max.poll.interval.ms` (5 minutes)
//!   is removed too.
//! - **No deduplication.** Kafka has no deduplication by message id: the
//!   idempotent producer only drops its own retries within one producer
//!   session, so a message published twice is delivered twice. The id
//!   travels in the `chronicle-id` header; make the consumer idempotent with
//!   it.
//! - [`Delivery::delivery_count`] counts the deliveries by this consumer
//!   (it starts again at 1 in the consumer that takes a partition over).
//! - [`MessageQueue::depth`] is, over the partitions, the high watermark
//!   minus the group's committed offset. `peek` is not offered.
//!
//! ```no_run
//! use chronicle_core::{Message, MessageQueue};
//! use chronicle_kafka::{KafkaOptions, KafkaQueue};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), chronicle_core::BoxError> {
//! let queue = KafkaQueue::connect(&KafkaOptions::new("127.0.0.1:9092"), "user-profile").await?;
//! queue.publish(&[Message::new("evt-1", "account-7", json!({ "n": 1 }))]).await?;
//! for delivery in queue.receive(10).await? {
//!     queue.ack(&[delivery.receipt]).await?;
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{BoxError, Delivery, Message, MessageQueue, QueueDepth, Receipt};
use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// The header carrying [`Message::id`].
pub const ID_HEADER: &str = "chronicle-id";
/// The header carrying [`Message::attributes`] as a JSON object.
pub const ATTRIBUTES_HEADER: &str = "chronicle-attributes";

/// What can go wrong with a Kafka queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name is not usable in a topic name.
    #[error("`{0}` cannot name a Kafka queue: use letters, digits, `-` and `_`")]
    InvalidName(String),
    /// A receipt this handle did not issue.
    #[error(
        "`{0}` is not a receipt of this Kafka consumer; acknowledge through the handle that received it"
    )]
    InvalidReceipt(String),
    /// A record this crate did not publish.
    #[error("record {partition}/{offset} of `{topic}` is not a Chronicle message: {reason}")]
    Foreign {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// What is wrong.
        reason: String,
    },
    /// The broker or the client failed.
    #[error("Kafka {action}: {source}")]
    Kafka {
        /// What was being done.
        action: &'static str,
        /// The client's error.
        source: KafkaError,
    },
    /// A blocking client call could not finish (the runtime shut down).
    #[error("Kafka {0}: the blocking call was cancelled")]
    Cancelled(&'static str),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn kafka(action: &'static str) -> impl FnOnce(KafkaError) -> Error {
    move |source| Error::Kafka { action, source }
}

/// How to reach the brokers, and the queue's shape.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    brokers: String,
    partitions: i32,
    replication: i32,
    session_timeout: Duration,
    receive_wait: Duration,
    extra: BTreeMap<String, String>,
}

impl KafkaOptions {
    /// The brokers (`host:port`, comma-separated).
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaOptions {
            brokers: brokers.into(),
            partitions: 8,
            replication: 1,
            session_timeout: Duration::from_secs(30),
            receive_wait: Duration::from_millis(200),
            extra: BTreeMap::new(),
        }
    }

    /// The partitions of a topic this creates (default 8). Every handle on
    /// a queue must use the topic's count.
    pub fn partitions(&mut self, partitions: i32) -> &mut Self {
        self.partitions = partitions.max(1);
        self
    }

    /// The replication factor of a topic this creates (default 1).
    pub fn replication(&mut self, replication: i32) -> &mut Self {
        self.replication = replication.max(1);
        self
    }

    /// The consumer's session timeout (default 30 s): how long a dead
    /// consumer keeps its partitions, so the visibility timeout.
    pub fn session_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.session_timeout = timeout;
        self
    }

    /// How long a receive that finds nothing waits (default 200 ms).
    pub fn receive_wait(&mut self, wait: Duration) -> &mut Self {
        self.receive_wait = wait;
        self
    }

    /// A librdkafka setting for every client (TLS, SASL, timeouts), e.g.
    /// `security.protocol`.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The brokers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.extra {
            config.set(k, v);
        }
        config
    }
}

/// The partition of `group` among `partitions`: the first eight bytes of
/// the group's SHA-256, modulo the partition count.
///
/// ```
/// let p = chronicle_kafka::partition_of("account-7", 8);
/// assert!((0..8).contains(&p));
/// ```
pub fn partition_of(group: &str, partitions: i32) -> i32 {
    let digest = Sha256::digest(group.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % partitions.max(1) as u64) as i32
}

/// What this consumer fetched of one partition and not yet committed past.
#[derive(Default)]
struct Lane {
    records: VecDeque<OwnedMessage>,
    /// The head is handed out and not settled.
    in_flight: bool,
    /// Deliveries of the head by this consumer.
    deliveries: u32,
}

struct ConsumerState {
    consumer: Arc<BaseConsumer>,
    lanes: HashMap<i32, Lane>,
}

/// A [`MessageQueue`] on a Kafka topic; see the crate documentation. Each
/// value is a handle: a producer, and from the first receive a consumer in
/// the queue's consumer group.
pub struct KafkaQueue {
    name: String,
    topic: String,
    options: KafkaOptions,
    producer: FutureProducer,
    /// Reads watermarks and committed offsets without joining the group.
    probe: Arc<BaseConsumer>,
    consumer: Mutex<Option<ConsumerState>>,
}

impl std::fmt::Debug for KafkaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaQueue")
            .field("topic", &self.topic)
            .field("brokers", &self.options.brokers)
            .finish_non_exhaustive()
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    action: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Cancelled(action))?
}

impl KafkaQueue {
    /// Connects and opens the queue `name`, creating its topic when
    /// missing.
    pub async fn connect(options: &KafkaOptions, name: &str) -> Result<Self> {
        if name.is_empty()
            || name.len() > 200
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let topic = format!("chronicle.{name}");
        let admin: AdminClient<DefaultClientContext> = options
            .client_config()
            .create()
            .map_err(kafka("create an admin client"))?;
        let results = admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    options.partitions,
                    TopicReplication::Fixed(options.replication),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka("create the topic"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::Kafka {
                        action: "create the topic",
                        source: KafkaError::AdminOp(code),
                    });
                }
            }
        }
        let producer: FutureProducer = options
            .client_config()
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(kafka("create a producer"))?;
        let probe: BaseConsumer = options
            .client_config()
            .set("group.id", &topic)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka("create a consumer"))?;
        Ok(KafkaQueue {
            name: name.to_owned(),
            topic,
            options: options.clone(),
            producer,
            probe: Arc::new(probe),
            consumer: Mutex::new(None),
        })
    }

    fn start_consumer(&self) -> Result<ConsumerState> {
        let consumer: BaseConsumer = self
            .options
            .client_config()
            .set("group.id", &self.topic)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                self.options.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.options.session_timeout.as_millis() / 3)
                    .max(100)
                    .to_string(),
            )
            .create()
            .map_err(kafka("create a consumer"))?;
        consumer
            .subscribe(&[&self.topic])
            .map_err(kafka("subscribe"))?;
        Ok(ConsumerState {
            consumer: Arc::new(consumer),
            lanes: HashMap::new(),
        })
    }

    fn decode(&self, m: &OwnedMessage, deliveries: u32) -> Result<Delivery> {
        use rdkafka::Message as _;
        let foreign = |reason: String| Error::Foreign {
            topic: self.topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            reason,
        };
        let mut id = None;
        let mut attributes = BTreeMap::new();
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                let value = h.value.map(String::from_utf8_lossy);
                match (h.key, value) {
                    (ID_HEADER, Some(v)) => id = Some(v.into_owned()),
                    (ATTRIBUTES_HEADER, Some(v)) => {
                        attributes = serde_json::from_str(&v)
                            .map_err(|e| foreign(format!("bad {ATTRIBUTES_HEADER}: {e}")))?;
                    }
                    _ => {}
                }
            }
        }
        let id = id.ok_or_else(|| foreign(format!("no {ID_HEADER} header")))?;
        let group = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .ok_or_else(|| foreign("no key".into()))?;
        let payload = serde_json::from_slice(m.payload().unwrap_or(b"null"))
            .map_err(|e| foreign(format!("value is not JSON: {e}")))?;
        Ok(Delivery {
            message: Message {
                id,
                group,
                payload,
                attributes,
            },
            receipt: Receipt::new(format!("{}:{}", m.partition(), m.offset())),
            delivery_count: deliveries,
            enqueued_at: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::<Utc>::from_timestamp_millis),
        })
    }

    fn parse(&self, r: &Receipt) -> Result<(i32, i64)> {
        let bad = || Error::InvalidReceipt(r.to_string());
        let (p, o) = r.as_str().split_once(':').ok_or_else(bad)?;
        Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
    }
}

#[async_trait]
impl MessageQueue for KafkaQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        // One at a time, each confirmed: a batch in flight could be
        // reordered by a retry of an earlier record.
        for m in messages {
            let payload = serde_json::to_vec(&m.payload)?;
            let mut headers = OwnedHeaders::new().insert(Header {
                key: ID_HEADER,
                value: Some(m.id.as_bytes()),
            });
            let attributes;
            if !m.attributes.is_empty() {
                attributes = serde_json::to_vec(&m.attributes)?;
                headers = headers.insert(Header {
                    key: ATTRIBUTES_HEADER,
                    value: Some(&attributes),
                });
            }
            let record = FutureRecord::to(&self.topic)
                .key(m.group.as_bytes())
                .payload(&payload)
                .partition(partition_of(&m.group, self.options.partitions))
                .timestamp(Utc::now().timestamp_millis())
                .headers(headers);
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| kafka("publish")(e))?;
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut guard = self.consumer.lock().await;
        if guard.is_none() {
            *guard = Some(self.start_consumer()?);
        }
        let Some(state) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let deadline = tokio::time::Instant::now() + self.options.receive_wait;
        loop {
            // Take in what the client fetched; never blocks.
            while let Some(next) = state.consumer.poll(Duration::ZERO) {
                let m = next.map_err(kafka("receive"))?.detach();
                use rdkafka::Message as _;
                let lane = state.lanes.entry(m.partition()).or_default();
                // A record at or before one already held means the
                // partition was taken away and given back: the client
                // starts again at the committed offset.
                if lane
                    .records
                    .back()
                    .is_some_and(|last| last.offset() >= m.offset())
                {
                    *lane = Lane::default();
                }
                lane.records.push_back(m);
            }
            // Forget partitions this consumer no longer owns.
            let owned = state
                .consumer
                .assignment()
                .map_err(kafka("read the assignment"))?;
            let owned: Vec<i32> = owned
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            state.lanes.retain(|p, _| owned.contains(p));
            let mut out = Vec::new();
            let mut partitions: Vec<i32> = state.lanes.keys().copied().collect();
            partitions.sort_unstable();
            for p in partitions {
                if out.len() >= max {
                    break;
                }
                let lane = state.lanes.get_mut(&p).expect("listed above");
                if lane.in_flight {
                    continue;
                }
                if let Some(head) = lane.records.front() {
                    lane.in_flight = true;
                    lane.deliveries += 1;
                    out.push(self.decode(head, lane.deliveries)?);
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let parsed = receipts
            .iter()
            .map(|r| self.parse(r))
            .collect::<Result<Vec<_>>>()?;
        let mut guard = self.consumer.lock().await;
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        let mut commit = TopicPartitionList::new();
        for (p, offset) in parsed {
            use rdkafka::Message as _;
            let Some(lane) = state.lanes.get_mut(&p) else {
                continue;
            };
            // Only the head can be acknowledged; an earlier offset is
            // committed already (a second ack is a no-op).
            if lane.records.front().is_some_and(|h| h.offset() == offset) {
                lane.records.pop_front();
                lane.in_flight = false;
                lane.deliveries = 0;
                commit
                    .add_partition_offset(&self.topic, p, Offset::Offset(offset + 1))
                    .map_err(kafka("acknowledge"))?;
            }
        }
        if commit.count() == 0 {
            return Ok(());
        }
        let consumer = state.consumer.clone();
        blocking("acknowledge", move || {
            consumer
                .commit(&commit, CommitMode::Sync)
                .map_err(kafka("acknowledge"))
        })
        .await?;
        Ok(())
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let parsed = receipts
            .iter()
            .map(|r| self.parse(r))
            .collect::<Result<Vec<_>>>()?;
        let mut guard = self.consumer.lock().await;
        if let Some(state) = guard.as_mut() {
            for (p, offset) in parsed {
                use rdkafka::Message as _;
                if let Some(lane) = state.lanes.get_mut(&p)
                    && lane.records.front().is_some_and(|h| h.offset() == offset)
                {
                    lane.in_flight = false;
                }
            }
        }
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let probe = self.probe.clone();
        let topic = self.topic.clone();
        let partitions = self.options.partitions;
        let messages = blocking("read the depth", move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = probe
                .committed_offsets(tpl, Duration::from_secs(10))
                .map_err(kafka("read the committed offsets"))?;
            let mut total = 0u64;
            for p in 0..partitions {
                let (low, high) = probe
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .map_err(kafka("read the watermarks"))?;
                let from = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.max(low),
                    _ => low,
                };
                total += u64::try_from(high - from).unwrap_or(0);
            }
            Ok(total)
        })
        .await?;
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
    fn partitions_spread_groups() {
        let used: std::collections::BTreeSet<i32> = (0..200)
            .map(|i| partition_of(&format!("g{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8);
    }

    #[test]
    fn queues_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<KafkaQueue>();
        check::<Error>();
    }
}
