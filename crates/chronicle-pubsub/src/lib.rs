//! [`PubSubQueue`]: Chronicle's [`MessageQueue`] on Google Cloud Pub/Sub,
//! over its REST API (reqwest).
//!
//! One queue is the topic `chronicle-<name>` and its subscription
//! `chronicle-<name>` with message ordering on (both created when
//! missing):
//!
//! - **Ordering and one head per group**: [`Message::group`] is the
//!   ordering key. Pub/Sub delivers a key's messages in order and, while
//!   they are outstanding at one subscriber, to no other; a pull may hand
//!   one subscriber several messages of a key at once, so the handle keeps
//!   the later ones leased (extending their ack deadlines at each receive)
//!   and hands out only the head, the next one when the head is
//!   acknowledged. So at most one head per group per queue.
//! - **Redelivery**: [`MessageQueue::nack`] hands the head out again at
//!   this handle's next receive (another handle's receipt is given back to
//!   Pub/Sub with an ack deadline of zero). A consumer that dies stops
//!   extending its leases: after the subscription's ack deadline
//!   ([`PubSubOptions::ack_deadline`], 10 s to 600 s, the visibility
//!   timeout) Pub/Sub redelivers the key's messages, in order.
//! - **No deduplication by id.** Pub/Sub does not drop a second publish of
//!   the same message (exactly-once delivery, a subscription setting, is
//!   about acknowledgements, not publishes): a message published twice is
//!   delivered twice. The id travels in the `chronicle-id` attribute; make
//!   the consumer idempotent with it.
//! - **Payload and attributes**: `data` is the JSON payload; the
//!   attributes travel as the `chronicle-attributes` attribute (JSON).
//! - [`Delivery::delivery_count`] counts this handle's deliveries (Pub/Sub
//!   reports attempts only with a dead-letter policy).
//! - [`MessageQueue::depth`] is refused: the Pub/Sub API does not report a
//!   subscription's backlog (Cloud Monitoring's
//!   `subscription/num_undelivered_messages` does). `peek` is not offered.
//! - **Authentication**: a bearer token you supply
//!   ([`PubSubOptions::access_token`], e.g. from
//!   `gcloud auth print-access-token`), or none against the emulator.
//!   Refreshing tokens and service-account keys are not built.
//!
//! ```no_run
//! use chronicle_core::{Message, MessageQueue};
//! use chronicle_pubsub::{PubSubOptions, PubSubQueue};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), chronicle_core::BoxError> {
//! let mut options = PubSubOptions::new("my-project");
//! options.endpoint("http://127.0.0.1:8085"); // the emulator
//! let queue = PubSubQueue::connect(&options, "user-profile").await?;
//! queue.publish(&[Message::new("evt-1", "account-7", json!({ "n": 1 }))]).await?;
//! for delivery in queue.receive(10).await? {
//!     queue.ack(&[delivery.receipt]).await?;
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chronicle_core::{BoxError, Delivery, Message, MessageQueue, QueueDepth, Receipt};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// The attribute carrying [`Message::id`].
pub const ID_ATTRIBUTE: &str = "chronicle-id";
/// The attribute carrying [`Message::attributes`] as JSON.
pub const ATTRIBUTES_ATTRIBUTE: &str = "chronicle-attributes";

/// What can go wrong with a Pub/Sub queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name is not usable in a topic name.
    #[error("`{0}` cannot name a Pub/Sub queue: use letters, digits, `-` and `_` (at most 200)")]
    InvalidName(String),
    /// An empty group: Pub/Sub would not order it.
    #[error("a Pub/Sub message needs a group (its ordering key); `{0}` has none")]
    NoGroup(String),
    /// A message this crate did not publish.
    #[error("Pub/Sub message {message_id} is not a Chronicle message: {reason}")]
    Foreign {
        /// Pub/Sub's message id.
        message_id: String,
        /// What is wrong.
        reason: String,
    },
    /// The API answered with an error.
    #[error("Pub/Sub {action}: HTTP {status}: {body}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// The HTTP status.
        status: u16,
        /// The answer's body.
        body: String,
    },
    /// The request failed.
    #[error("Pub/Sub {action}: {source}")]
    Http {
        /// What was being done.
        action: &'static str,
        /// The client's error.
        source: reqwest::Error,
    },
    /// Asked for what the Pub/Sub API does not offer.
    #[error("Pub/Sub: {0}")]
    Unsupported(&'static str),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the API is, which project, the subscription's ack deadline.
#[derive(Debug, Clone)]
pub struct PubSubOptions {
    project: String,
    endpoint: String,
    access_token: Option<String>,
    ack_deadline: Duration,
}

impl PubSubOptions {
    /// The project `project` on Google's endpoint
    /// (`https://pubsub.googleapis.com`), a 10 s ack deadline.
    pub fn new(project: impl Into<String>) -> Self {
        PubSubOptions {
            project: project.into(),
            endpoint: "https://pubsub.googleapis.com".into(),
            access_token: None,
            ack_deadline: Duration::from_secs(10),
        }
    }

    /// Another endpoint, e.g. the emulator's `http://127.0.0.1:8085`.
    pub fn endpoint(&mut self, url: impl Into<String>) -> &mut Self {
        self.endpoint = url.into().trim_end_matches('/').to_owned();
        self
    }

    /// The OAuth 2 bearer token sent with each request (default none).
    pub fn access_token(&mut self, token: impl Into<String>) -> &mut Self {
        self.access_token = Some(token.into());
        self
    }

    /// The ack deadline of a subscription this creates (10 s to 600 s;
    /// default 10 s): the visibility timeout.
    pub fn ack_deadline(&mut self, deadline: Duration) -> &mut Self {
        self.ack_deadline = deadline.clamp(Duration::from_secs(10), Duration::from_secs(600));
        self
    }

    /// The endpoint.
    pub fn endpoint_url(&self) -> &str {
        &self.endpoint
    }
}

/// A message this handle holds (leased): the key's head or waiting
/// behind it.
struct Held {
    ack_id: String,
    message_id: String,
    delivery: Delivery,
    leased_until: Instant,
    in_flight: bool,
    deliveries: u32,
}

/// A [`MessageQueue`] on a Pub/Sub topic and ordered subscription; see the
/// crate documentation.
pub struct PubSubQueue {
    name: String,
    http: reqwest::Client,
    options: PubSubOptions,
    topic: String,
    subscription: String,
    /// ordering key -> the messages held, in order.
    held: Mutex<BTreeMap<String, VecDeque<Held>>>,
}

impl std::fmt::Debug for PubSubQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubQueue")
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PullResponse {
    #[serde(default)]
    received_messages: Vec<Received>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Received {
    ack_id: String,
    message: PubsubMessage,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PubsubMessage {
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    message_id: String,
    publish_time: Option<DateTime<Utc>>,
    #[serde(default)]
    ordering_key: String,
}

impl PubSubQueue {
    /// Opens the queue `name`, creating its topic and subscription when
    /// missing.
    pub async fn connect(options: &PubSubOptions, name: &str) -> Result<Self> {
        if name.is_empty()
            || name.len() > 200
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| Error::Http {
                action: "build a client",
                source,
            })?;
        let project = &options.project;
        let queue = PubSubQueue {
            name: name.to_owned(),
            http,
            options: options.clone(),
            topic: format!("projects/{project}/topics/chronicle-{name}"),
            subscription: format!("projects/{project}/subscriptions/chronicle-{name}"),
            held: Mutex::default(),
        };
        queue
            .call_allowing(
                "create the topic",
                reqwest::Method::PUT,
                &queue.topic,
                &json!({}),
                409,
            )
            .await?;
        let subscription = json!({
            "topic": queue.topic,
            "ackDeadlineSeconds": options.ack_deadline.as_secs(),
            "enableMessageOrdering": true,
        });
        queue
            .call_allowing(
                "create the subscription",
                reqwest::Method::PUT,
                &queue.subscription,
                &subscription,
                409,
            )
            .await?;
        Ok(queue)
    }

    async fn call(&self, action: &'static str, path: &str, body: &Value) -> Result<Value> {
        self.call_allowing(action, reqwest::Method::POST, path, body, 0)
            .await
    }

    /// One API call; an answer with status `allowed` counts as success
    /// (409: it exists already).
    async fn call_allowing(
        &self,
        action: &'static str,
        method: reqwest::Method,
        path: &str,
        body: &Value,
        allowed: u16,
    ) -> Result<Value> {
        let url = format!("{}/v1/{path}", self.options.endpoint);
        let mut request = self.http.request(method, url).json(body);
        if let Some(token) = &self.options.access_token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|source| Error::Http { action, source })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|source| Error::Http { action, source })?;
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        if status.as_u16() == allowed {
            return Ok(Value::Null);
        }
        Err(Error::Api {
            action,
            status: status.as_u16(),
            body: text,
        })
    }

    async fn modify_deadline(&self, ack_ids: &[String], seconds: u64) -> Result<()> {
        if ack_ids.is_empty() {
            return Ok(());
        }
        self.call(
            "extend leases",
            &format!("{}:modifyAckDeadline", self.subscription),
            &json!({ "ackIds": ack_ids, "ackDeadlineSeconds": seconds }),
        )
        .await?;
        Ok(())
    }

    fn decode(&self, r: &Received) -> Result<Delivery> {
        let m = &r.message;
        let foreign = |reason: String| Error::Foreign {
            message_id: m.message_id.clone(),
            reason,
        };
        let id = m
            .attributes
            .get(ID_ATTRIBUTE)
            .cloned()
            .ok_or_else(|| foreign(format!("no {ID_ATTRIBUTE} attribute")))?;
        let attributes = match m.attributes.get(ATTRIBUTES_ATTRIBUTE) {
            None => BTreeMap::new(),
            Some(json) => serde_json::from_str(json)
                .map_err(|e| foreign(format!("bad {ATTRIBUTES_ATTRIBUTE}: {e}")))?,
        };
        let data = BASE64
            .decode(&m.data)
            .map_err(|e| foreign(format!("data is not base64: {e}")))?;
        let payload =
            serde_json::from_slice(&data).map_err(|e| foreign(format!("data is not JSON: {e}")))?;
        Ok(Delivery {
            message: Message {
                id,
                group: m.ordering_key.clone(),
                payload,
                attributes,
            },
            receipt: Receipt::new(r.ack_id.clone()),
            delivery_count: 0,
            enqueued_at: m.publish_time,
        })
    }
}

#[async_trait]
impl MessageQueue for PubSubQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            if m.group.is_empty() {
                return Err(Error::NoGroup(m.id.clone()).into());
            }
            let mut attributes = BTreeMap::from([(ID_ATTRIBUTE.to_owned(), m.id.clone())]);
            if !m.attributes.is_empty() {
                attributes.insert(
                    ATTRIBUTES_ATTRIBUTE.to_owned(),
                    serde_json::to_string(&m.attributes)?,
                );
            }
            out.push(json!({
                "data": BASE64.encode(serde_json::to_vec(&m.payload)?),
                "attributes": attributes,
                "orderingKey": m.group,
            }));
        }
        // One request: Pub/Sub keeps a request's messages of one key in
        // order.
        self.call(
            "publish",
            &format!("{}:publish", self.topic),
            &json!({ "messages": out }),
        )
        .await?;
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let mut held = self.held.lock().await;
        let deadline = self.options.ack_deadline;
        // Keep what waits behind a head leased (the heads in flight too:
        // this consumer is alive).
        let now = Instant::now();
        let renew: Vec<String> = held
            .values()
            .flatten()
            .filter(|h| h.leased_until <= now + deadline / 2)
            .map(|h| h.ack_id.clone())
            .collect();
        self.modify_deadline(&renew, deadline.as_secs()).await?;
        for h in held.values_mut().flatten() {
            if renew.contains(&h.ack_id) {
                h.leased_until = now + deadline;
            }
        }
        let pulled: PullResponse = serde_json::from_value(
            self.call(
                "pull",
                &format!("{}:pull", self.subscription),
                &json!({ "maxMessages": 100, "returnImmediately": true }),
            )
            .await?,
        )
        .unwrap_or(PullResponse {
            received_messages: Vec::new(),
        });
        let now = Instant::now();
        for r in &pulled.received_messages {
            let delivery = self.decode(r)?;
            let key = held.entry(r.message.ordering_key.clone()).or_default();
            // Delivered again (a lease ran out): the same message under a
            // new ack id.
            if let Some(h) = key
                .iter_mut()
                .find(|h| h.message_id == r.message.message_id)
            {
                h.ack_id = r.ack_id.clone();
                h.delivery.receipt = Receipt::new(r.ack_id.clone());
                h.leased_until = now + deadline;
                h.in_flight = false;
                continue;
            }
            key.push_back(Held {
                ack_id: r.ack_id.clone(),
                message_id: r.message.message_id.clone(),
                delivery,
                leased_until: now + deadline,
                in_flight: false,
                deliveries: 0,
            });
        }
        let mut out = Vec::new();
        for key in held.values_mut() {
            if out.len() >= max {
                break;
            }
            if let Some(head) = key.front_mut()
                && !head.in_flight
            {
                head.in_flight = true;
                head.deliveries += 1;
                let mut d = head.delivery.clone();
                d.delivery_count = head.deliveries;
                out.push(d);
            }
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let ack_ids: Vec<&str> = receipts.iter().map(Receipt::as_str).collect();
        self.call(
            "acknowledge",
            &format!("{}:acknowledge", self.subscription),
            &json!({ "ackIds": ack_ids }),
        )
        .await?;
        let mut held = self.held.lock().await;
        for key in held.values_mut() {
            key.retain(|h| !ack_ids.contains(&h.ack_id.as_str()));
        }
        held.retain(|_, key| !key.is_empty());
        Ok(())
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let mut held = self.held.lock().await;
        let mut elsewhere = Vec::new();
        for r in receipts {
            match held.values_mut().flatten().find(|h| h.ack_id == r.as_str()) {
                Some(h) => h.in_flight = false,
                None => elsewhere.push(r.as_str().to_owned()),
            }
        }
        self.modify_deadline(&elsewhere, 0).await?;
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        Err(Error::Unsupported(
            "the API does not report a subscription's backlog; read Cloud Monitoring's \
             subscription/num_undelivered_messages",
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_clamped() {
        let mut o = PubSubOptions::new("p");
        o.ack_deadline(Duration::from_secs(1));
        assert_eq!(o.ack_deadline, Duration::from_secs(10));
        o.endpoint("http://127.0.0.1:1/");
        assert_eq!(o.endpoint_url(), "http://127.0.0.1:1");
    }

    #[test]
    fn queues_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PubSubQueue>();
        check::<Error>();
    }
}
