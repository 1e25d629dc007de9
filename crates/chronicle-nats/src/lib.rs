//! [`NatsQueue`]: Chronicle's [`MessageQueue`] on NATS JetStream.
//!
//! One queue is one stream, `CHRONICLE_<name>`, with work-queue retention
//! (an acknowledged message is removed) over the subjects
//! `chronicle.<name>.*`: a message of group `g` is published to
//! `chronicle.<name>.g`, so **the group is a subject token** (an aggregate
//! id is one as it is; a group with `.`, `*`, `>`, `/`, `\` or whitespace is
//! refused).
//!
//! - **One head per group.** Each group has a durable pull consumer of its
//!   own, `g-<group>`, filtered to its subject, with explicit acks and
//!   `max_ack_pending = 1`: the server hands out a group's next message
//!   only once its head is acknowledged, and every handle on the queue
//!   (every process) pulls through the same consumer, so the rule holds
//!   across consumers. A receive lists the subjects that hold messages and
//!   pulls at most one message from each group's consumer. Why not one
//!   consumer with `max_ack_pending`: that limit is per consumer, so one
//!   slow head would block every group. The cost is a consumer per group
//!   with messages (idle ones are removed by the server after
//!   [`NatsOptions::inactive_threshold`]) and a round trip per group per
//!   receive, which suits a dead-letter queue (few, stuck groups), not a
//!   firehose.
//! - **Redelivery**: [`MessageQueue::nack`] sends `-NAK` (redelivered at
//!   once); a head not acknowledged within the consumer's `ack_wait`
//!   ([`NatsOptions::ack_wait`], the visibility timeout) is redelivered to
//!   whichever handle pulls next.
//! - **Deduplication**: the message id is sent as `Nats-Msg-Id`; the
//!   stream drops a second message with the same id within its
//!   `duplicate_window` ([`NatsOptions::duplicate_window`], default two
//!   minutes), *even if the first was acknowledged meanwhile*.
//! - **Payload and attributes**: the body is the JSON payload; attributes
//!   travel as one `Chronicle-Attributes` header (a JSON object).
//! - **Browse**: [`MessageQueue::peek`] reads a group with direct gets
//!   (`allow_direct`), delivering nothing.
//!
//! ```no_run
//! use chronicle_core::{Message, MessageQueue};
//! use chronicle_nats::{NatsOptions, NatsQueue};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), chronicle_core::BoxError> {
//! let mut options = NatsOptions::new("nats://127.0.0.1:4222");
//! options.ack_wait(Duration::from_secs(60));
//! let queue = NatsQueue::connect(&options, "user-profile").await?;
//! queue.publish(&[Message::new("evt-1", "account-7", json!({ "n": 1 }))]).await?;
//! for delivery in queue.receive(10).await? {
//!     // … handle it, then:
//!     queue.ack(&[delivery.receipt]).await?;
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use chronicle_core::{BoxError, Delivery, Message, MessageQueue, QueueDepth, Receipt};
use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};

/// How long a pull request may take to be answered.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// Publish acks one `publish` call awaits at most at once (older ones are
/// awaited before more are sent).
const PUBLISH_WINDOW: usize = 1024;

/// Publish acks in flight on one handle, over all its callers: room for
/// 64 concurrent callers' windows.
const MAX_ACKS_IN_FLIGHT: usize = 64 * PUBLISH_WINDOW;

/// The header carrying [`Message::attributes`] as a JSON object.
pub const ATTRIBUTES_HEADER: &str = "Chronicle-Attributes";

/// What can go wrong with a NATS queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name cannot be a stream name and subject token.
    #[error(
        "`{0}` cannot name a NATS queue: use letters, digits, `-` and `_` (it is a stream name and a subject token)"
    )]
    InvalidName(String),
    /// The group cannot be a subject token and consumer name.
    #[error(
        "group `{group}` cannot be a NATS subject token: it must be non-empty and have no `.`, `*`, `>`, `/`, `\\` or whitespace"
    )]
    InvalidGroup {
        /// The group.
        group: String,
    },
    /// A receipt this queue did not issue.
    #[error(
        "`{0}` is not a JetStream acknowledgement subject; use the receipts `receive` returned"
    )]
    InvalidReceipt(String),
    /// A message on the stream that this crate did not publish.
    #[error("message {sequence} on `{subject}` is not a Chronicle message: {reason}")]
    Foreign {
        /// Its subject.
        subject: String,
        /// Its stream sequence.
        sequence: u64,
        /// What is wrong.
        reason: String,
    },
    /// The server or the connection failed.
    #[error("NATS {action}: {source}")]
    Nats {
        /// What was being done.
        action: &'static str,
        /// The client's error.
        source: BoxError,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn nats<E: Into<BoxError>>(action: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Nats {
        action,
        source: e.into(),
    }
}

/// How to reach the server, and the stream and consumer settings.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    url: String,
    ack_wait: Duration,
    duplicate_window: Duration,
    inactive_threshold: Duration,
    replicas: usize,
}

impl NatsOptions {
    /// The server at `url` (`nats://host:port`; several, comma-separated).
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(120),
            inactive_threshold: Duration::from_secs(3600),
            replicas: 1,
        }
    }

    /// The visibility timeout: how long a received head stays in flight
    /// before it is redelivered (each group consumer's `ack_wait`). Default
    /// 30 s. Set when a group's consumer is created.
    pub fn ack_wait(&mut self, timeout: Duration) -> &mut Self {
        self.ack_wait = timeout;
        self
    }

    /// How long the stream remembers a message id to drop duplicates.
    /// Default 2 minutes. Set when the stream is created.
    pub fn duplicate_window(&mut self, window: Duration) -> &mut Self {
        self.duplicate_window = window;
        self
    }

    /// How long a group's consumer may sit unused before the server
    /// removes it (it is made again when the group has messages). Default
    /// 1 hour.
    pub fn inactive_threshold(&mut self, threshold: Duration) -> &mut Self {
        self.inactive_threshold = threshold;
        self
    }

    /// The stream's replicas (default 1; 3 on a cluster).
    pub fn replicas(&mut self, replicas: usize) -> &mut Self {
        self.replicas = replicas;
        self
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A [`MessageQueue`] on a JetStream stream; see the crate documentation
/// for the design. Each value is a handle with its own connection; any
/// number of handles (in any number of processes) may share a queue.
pub struct NatsQueue {
    name: String,
    stream_name: String,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    options: NatsOptions,
    /// Group consumers known to exist.
    consumers: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueue")
            .field("name", &self.name)
            .field("url", &self.options.url)
            .finish_non_exhaustive()
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
}

impl NatsQueue {
    /// Connects to the server and opens the queue `name`, creating its
    /// stream when it does not exist.
    pub async fn connect(options: &NatsOptions, name: &str) -> Result<Self> {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || name.is_empty()
        {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let client = async_nats::connect(options.url.as_str())
            .await
            .map_err(nats("connect"))?;
        // Each publish holds one of these until its ack is awaited: with
        // the client's default (5,000), callers publishing concurrently
        // (relay partitions) could together hold every permit while each
        // waits for one more, and hang. `publish` keeps at most
        // PUBLISH_WINDOW per call in flight.
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .build(client.clone());
        let stream_name = format!("CHRONICLE_{name}");
        let stream = js
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![format!("chronicle.{name}.*")],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: options.duplicate_window,
                allow_direct: true,
                num_replicas: options.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(nats("create the stream"))?;
        Ok(NatsQueue {
            name: name.to_owned(),
            stream_name,
            client,
            js,
            stream,
            options: options.clone(),
            consumers: Mutex::default(),
        })
    }

    fn subject(&self, group: &str) -> Result<String> {
        if !valid_token(group) {
            return Err(Error::InvalidGroup {
                group: group.to_owned(),
            });
        }
        Ok(format!("chronicle.{}.{group}", self.name))
    }

    /// The group's consumer, created when missing.
    async fn ensure_consumer(&self, group: &str, subject: &str) -> Result<String> {
        let durable = format!("g-{group}");
        let known = self
            .consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&durable);
        if !known {
            self.stream
                .get_or_create_consumer(
                    &durable,
                    consumer::pull::Config {
                        durable_name: Some(durable.clone()),
                        filter_subject: subject.to_owned(),
                        ack_policy: consumer::AckPolicy::Explicit,
                        deliver_policy: consumer::DeliverPolicy::All,
                        ack_wait: self.options.ack_wait,
                        max_ack_pending: 1,
                        inactive_threshold: self.options.inactive_threshold,
                        ..Default::default()
                    },
                )
                .await
                .map_err(nats("create a group consumer"))?;
            self.consumers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(durable.clone());
        }
        Ok(durable)
    }

    /// Pulls the group's head if it is not in flight: one no-wait pull
    /// request; the server answers with the message, or a status (no
    /// messages, or the one allowed message is pending).
    async fn pull_head(&self, group: &str, subject: &str) -> Result<Option<Delivery>> {
        let durable = self.ensure_consumer(group, subject).await?;
        let api = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream_name, durable);
        // A subscription of its own: the message comes back under its
        // stream subject, not the inbox, so the client's shared request
        // inbox would not route it.
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(nats("pull a group's head"))?;
        self.client
            .publish_with_reply(
                api,
                inbox,
                Bytes::from_static(br#"{"batch":1,"no_wait":true}"#),
            )
            .await
            .map_err(nats("pull a group's head"))?;
        let message = match tokio::time::timeout(PULL_TIMEOUT, replies.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(nats("pull a group's head")("the subscription closed"));
            }
            Err(_) => {
                return Err(nats("pull a group's head")(format!(
                    "no answer within {PULL_TIMEOUT:?}"
                )));
            }
        };
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // The consumer was removed for inactivity meanwhile: forget
            // it; the next receive makes it again.
            self.consumers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&durable);
            return Ok(None);
        }
        if message
            .status
            .is_some_and(|s| s != async_nats::StatusCode::OK)
        {
            // 404 no messages, 408 timeout, 409 max ack pending: nothing
            // to hand out now.
            return Ok(None);
        }
        let js_message = jetstream::Message {
            message,
            context: self.js.clone(),
        };
        let info = js_message.info().map_err(|e| Error::Foreign {
            subject: subject.to_owned(),
            sequence: 0,
            reason: format!("no JetStream metadata: {e}"),
        })?;
        let (sequence, delivered, published) = (
            info.stream_sequence,
            info.delivered,
            to_chrono(info.published),
        );
        let message = js_message.message;
        let receipt = message
            .reply
            .as_ref()
            .map(|r| Receipt::new(r.as_str()))
            .ok_or_else(|| Error::Foreign {
                subject: subject.to_owned(),
                sequence,
                reason: "no acknowledgement subject".into(),
            })?;
        let decoded = decode(
            group,
            message.subject.as_str(),
            sequence,
            message.headers.as_ref(),
            &message.payload,
        )?;
        Ok(Some(Delivery {
            message: decoded,
            receipt,
            delivery_count: u32::try_from(delivered).unwrap_or(u32::MAX),
            enqueued_at: Some(published),
        }))
    }

    /// Sends `body` (`+ACK`, `-NAK`) to each receipt's subject.
    async fn reply(&self, receipts: &[Receipt], body: &'static [u8]) -> Result<()> {
        for r in receipts {
            if !r.as_str().starts_with("$JS.ACK.") {
                return Err(Error::InvalidReceipt(r.to_string()));
            }
        }
        for r in receipts {
            self.client
                .publish(r.as_str().to_owned(), Bytes::from_static(body))
                .await
                .map_err(nats("acknowledge"))?;
        }
        self.client.flush().await.map_err(nats("acknowledge"))?;
        Ok(())
    }

    /// The groups with messages, sorted.
    async fn groups(&self) -> Result<Vec<String>> {
        let prefix = format!("chronicle.{}.", self.name);
        let mut info = self
            .stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(nats("list the groups"))?;
        let mut groups = Vec::new();
        while let Some((subject, count)) = info.try_next().await.map_err(nats("list the groups"))? {
            if count > 0
                && let Some(group) = subject.strip_prefix(&prefix)
            {
                groups.push(group.to_owned());
            }
        }
        groups.sort();
        Ok(groups)
    }
}

fn to_chrono(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX))
}

fn decode(
    group: &str,
    subject: &str,
    sequence: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Message> {
    let foreign = |reason: String| Error::Foreign {
        subject: subject.to_owned(),
        sequence,
        reason,
    };
    let id = headers
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| foreign("no Nats-Msg-Id header".into()))?;
    let attributes: BTreeMap<String, String> = match headers.and_then(|h| h.get(ATTRIBUTES_HEADER))
    {
        None => BTreeMap::new(),
        Some(v) => serde_json::from_str(v.as_str())
            .map_err(|e| foreign(format!("bad {ATTRIBUTES_HEADER} header: {e}")))?,
    };
    let payload =
        serde_json::from_slice(payload).map_err(|e| foreign(format!("body is not JSON: {e}")))?;
    Ok(Message {
        id,
        group: group.to_owned(),
        payload,
        attributes,
    })
}

#[async_trait]
impl MessageQueue for NatsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        let subjects = messages
            .iter()
            .map(|m| self.subject(&m.group))
            .collect::<Result<Vec<_>>>()?;
        let mut acks =
            std::collections::VecDeque::with_capacity(messages.len().min(PUBLISH_WINDOW));
        for (m, subject) in messages.iter().zip(subjects) {
            if acks.len() >= PUBLISH_WINDOW
                && let Some(ack) = acks.pop_front()
            {
                let ack: jetstream::context::PublishAckFuture = ack;
                ack.await.map_err(nats("publish"))?;
            }
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.as_str());
            if !m.attributes.is_empty() {
                let attributes = serde_json::to_string(&m.attributes)?;
                headers.insert(ATTRIBUTES_HEADER, attributes.as_str());
            }
            let body = serde_json::to_vec(&m.payload)?;
            acks.push_back(
                self.js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .map_err(nats("publish"))?,
            );
        }
        for ack in acks {
            ack.await.map_err(nats("publish"))?;
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut out = Vec::new();
        for group in self.groups().await? {
            if out.len() >= max {
                break;
            }
            let subject = self.subject(&group)?;
            if let Some(d) = self.pull_head(&group, &subject).await? {
                out.push(d);
            }
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        Ok(self.reply(receipts, b"+ACK").await?)
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        Ok(self.reply(receipts, b"-NAK").await?)
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let mut stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(nats("read the stream"))?;
        let info = stream.info().await.map_err(nats("read the stream"))?;
        let state = &info.state;
        Ok(QueueDepth {
            messages: state.messages,
            groups: Some(state.subjects_count),
            oldest: (state.messages > 0).then(|| to_chrono(state.first_timestamp)),
        })
    }

    async fn peek(&self, group: &str, limit: usize) -> Result<Vec<Message>, BoxError> {
        let subject = self.subject(group)?;
        let mut out = Vec::new();
        let mut from = None;
        while out.len() < limit {
            match self
                .stream
                .direct_get_next_for_subject(subject.as_str(), from)
                .await
            {
                Ok(m) => {
                    from = Some(m.sequence + 1);
                    out.push(decode(
                        group,
                        m.subject.as_str(),
                        m.sequence,
                        Some(&m.headers),
                        &m.payload,
                    )?);
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(nats("browse a group")(e).into()),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(valid_token("0193a1b2-0000-7000-8000-000000000001"));
        for bad in ["", "a.b", "a b", "a*", ">", "a/b"] {
            assert!(!valid_token(bad), "{bad}");
        }
    }

    #[test]
    fn queues_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NatsQueue>();
        check::<Error>();
    }
}
