//! [`SqsQueue`]: Chronicle's [`MessageQueue`] on an Amazon SQS FIFO queue.
//!
//! One queue is the FIFO queue `<name>.fifo` (created when missing, with
//! content-based deduplication off):
//!
//! - **Ordering and one head per group**: [`Message::group`] is the
//!   `MessageGroupId`. SQS hands out a group's next message only once the
//!   messages before it are deleted or their visibility timeout ran out,
//!   across every consumer. A receive may still return several messages of
//!   one group in a row (SQS allows it); the adapter keeps the first and
//!   makes the others visible again at once, so the caller sees one head
//!   per group (SQS still counts those receives in `ApproximateReceiveCount`).
//! - **Redelivery**: [`MessageQueue::nack`] sets the visibility timeout of
//!   the message to zero (deliverable again, still first of its group); a
//!   head not deleted within the queue's visibility timeout
//!   ([`SqsOptions::visibility_timeout`]) goes to the next receive.
//! - **Deduplication**: [`Message::id`] is the `MessageDeduplicationId`
//!   (an id SQS would refuse, over 128 characters or with other than
//!   ASCII letters, digits and punctuation, is replaced by its SHA-256 in
//!   hex). SQS drops a message whose id it saw in the last five minutes,
//!   *even if the first was deleted meanwhile*.
//! - **Payload and attributes**: the body is the JSON payload; the id and
//!   the attributes travel as the message attributes `chronicle-id` and
//!   `chronicle-attributes` (JSON).
//! - [`MessageQueue::depth`] is SQS's approximate count of visible, in
//!   flight and delayed messages; `peek` is not offered (SQS cannot browse
//!   without receiving).
//!
//! Credentials, region and endpoint come from the usual AWS configuration
//! (environment, profile, instance role), or an [`aws_config::SdkConfig`]
//! you load.
//!
//! ```no_run
//! use chronicle_core::{Message, MessageQueue};
//! use chronicle_sqs::{SqsOptions, SqsQueue};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), chronicle_core::BoxError> {
//! let queue = SqsQueue::connect(&SqsOptions::new(), "user-profile-dlq").await?;
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
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use chronicle_core::{BoxError, Delivery, Message, MessageQueue, QueueDepth, Receipt};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub use aws_config;
pub use aws_sdk_sqs;

/// The message attribute carrying [`Message::id`].
pub const ID_ATTRIBUTE: &str = "chronicle-id";
/// The message attribute carrying [`Message::attributes`] as JSON.
pub const ATTRIBUTES_ATTRIBUTE: &str = "chronicle-attributes";

/// What can go wrong with an SQS queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name is not usable.
    #[error(
        "`{0}` cannot name an SQS FIFO queue: use letters, digits, `-` and `_`, at most 75 characters"
    )]
    InvalidName(String),
    /// The group is not a valid `MessageGroupId`.
    #[error(
        "group `{0}` cannot be an SQS MessageGroupId: 1 to 128 ASCII letters, digits or punctuation"
    )]
    InvalidGroup(String),
    /// A message this crate did not publish.
    #[error("a message on `{queue}` is not a Chronicle message: {reason}")]
    Foreign {
        /// The queue.
        queue: String,
        /// What is wrong.
        reason: String,
    },
    /// Some entries of a batch failed.
    #[error("SQS {action}: {failed} of the batch failed: {reason}")]
    Batch {
        /// What was being done.
        action: &'static str,
        /// How many entries failed.
        failed: usize,
        /// The first failure's code and message.
        reason: String,
    },
    /// The service or the network failed.
    #[error("SQS {action}: {source}")]
    Sqs {
        /// What was being done.
        action: &'static str,
        /// The SDK's error, with its service code when there is one.
        source: BoxError,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn sqs<E: std::error::Error + Send + Sync + 'static>(
    action: &'static str,
) -> impl FnOnce(aws_sdk_sqs::error::SdkError<E>) -> Error {
    move |e| Error::Sqs {
        action,
        source: Box::new(std::io::Error::other(
            aws_sdk_sqs::error::DisplayErrorContext(e).to_string(),
        )),
    }
}

/// The queue's settings.
#[derive(Debug, Clone)]
pub struct SqsOptions {
    endpoint_url: Option<String>,
    region: Option<String>,
    visibility_timeout: Duration,
    wait: Duration,
}

impl Default for SqsOptions {
    fn default() -> Self {
        SqsOptions::new()
    }
}

impl SqsOptions {
    /// AWS's endpoint and region from the environment, a 30 s visibility
    /// timeout, 1 s long polls.
    pub fn new() -> Self {
        SqsOptions {
            endpoint_url: None,
            region: None,
            visibility_timeout: Duration::from_secs(30),
            wait: Duration::from_secs(1),
        }
    }

    /// Another endpoint (a local SQS-compatible server). Default: AWS's.
    pub fn endpoint_url(&mut self, url: impl Into<String>) -> &mut Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// The region. Default: the environment's (`AWS_REGION`, the profile).
    pub fn region(&mut self, region: impl Into<String>) -> &mut Self {
        self.region = Some(region.into());
        self
    }

    /// The visibility timeout of a queue this creates (whole seconds, 0 to
    /// 12 hours; default 30 s). An existing queue keeps its own.
    pub fn visibility_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.visibility_timeout = timeout;
        self
    }

    /// How long a receive that finds nothing waits (long polling, whole
    /// seconds up to 20; default 1 s).
    pub fn wait(&mut self, wait: Duration) -> &mut Self {
        self.wait = wait;
        self
    }
}

/// A [`MessageQueue`] on an SQS FIFO queue; see the crate documentation.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    name: String,
    url: String,
    client: Client,
    wait: Duration,
}

impl SqsQueue {
    /// Loads the AWS configuration (with the options' endpoint and region)
    /// and opens the queue `name` (`<name>.fifo`), creating it when
    /// missing.
    pub async fn connect(options: &SqsOptions, name: &str) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(url) = &options.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(region) = &options.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        Self::with_config(&loader.load().await, options, name).await
    }

    /// Opens the queue `name` with an AWS configuration you loaded.
    pub async fn with_config(
        config: &aws_config::SdkConfig,
        options: &SqsOptions,
        name: &str,
    ) -> Result<Self> {
        if name.is_empty()
            || name.len() > 75
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let client = Client::new(config);
        let out = client
            .create_queue()
            .queue_name(format!("{name}.fifo"))
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false")
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                options.visibility_timeout.as_secs().to_string(),
            )
            .send()
            .await;
        let url = match out {
            Ok(out) => out.queue_url,
            // It exists with other attributes: use it as it is.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_name_exists()) =>
            {
                None
            }
            Err(e) => return Err(sqs("create the queue")(e)),
        };
        let url = match url {
            Some(url) => url,
            None => client
                .get_queue_url()
                .queue_name(format!("{name}.fifo"))
                .send()
                .await
                .map_err(sqs("find the queue"))?
                .queue_url
                .unwrap_or_default(),
        };
        Ok(SqsQueue {
            name: name.to_owned(),
            url,
            client,
            wait: options.wait,
        })
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn decode(&self, m: &aws_sdk_sqs::types::Message) -> Result<Delivery> {
        let foreign = |reason: String| Error::Foreign {
            queue: self.name.clone(),
            reason,
        };
        let attr = |name: &str| {
            m.message_attributes()
                .and_then(|a| a.get(name))
                .and_then(|v| v.string_value())
        };
        let system = |name: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&name));
        let id = attr(ID_ATTRIBUTE)
            .ok_or_else(|| foreign(format!("no {ID_ATTRIBUTE} attribute")))?
            .to_owned();
        let group = system(MessageSystemAttributeName::MessageGroupId)
            .ok_or_else(|| foreign("no MessageGroupId".into()))?
            .clone();
        let attributes: BTreeMap<String, String> = match attr(ATTRIBUTES_ATTRIBUTE) {
            None => BTreeMap::new(),
            Some(json) => serde_json::from_str(json)
                .map_err(|e| foreign(format!("bad {ATTRIBUTES_ATTRIBUTE}: {e}")))?,
        };
        let payload = serde_json::from_str(m.body().unwrap_or("null"))
            .map_err(|e| foreign(format!("body is not JSON: {e}")))?;
        let receipt = m
            .receipt_handle()
            .ok_or_else(|| foreign("no receipt handle".into()))?;
        Ok(Delivery {
            message: Message {
                id,
                group,
                payload,
                attributes,
            },
            receipt: Receipt::new(receipt),
            delivery_count: system(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
            enqueued_at: system(MessageSystemAttributeName::SentTimestamp)
                .and_then(|t| t.parse::<i64>().ok())
                .and_then(DateTime::<Utc>::from_timestamp_millis),
        })
    }

    /// Sets the visibility timeout of `receipts` to zero.
    async fn release(&self, receipts: &[String]) -> Result<()> {
        for chunk in receipts.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(0)
                        .build()
                        .expect("id, receipt handle and timeout are set")
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sqs("give messages back"))?;
            // A receipt whose message is gone (deleted) is not an error.
            let failed: Vec<_> = out
                .failed()
                .iter()
                .filter(|f| {
                    f.code() != "ReceiptHandleIsInvalid" && f.code() != "MessageNotInflight"
                })
                .collect();
            if let Some(first) = failed.first() {
                return Err(Error::Batch {
                    action: "give messages back",
                    failed: failed.len(),
                    reason: format!("{}: {}", first.code(), first.message().unwrap_or("")),
                });
            }
        }
        Ok(())
    }
}

/// `id` as a `MessageDeduplicationId`: itself when SQS takes it, else its
/// SHA-256 in hex.
///
/// ```
/// use chronicle_sqs::deduplication_id;
///
/// assert_eq!(deduplication_id("0193a1b2-0000-7000-8000-000000000001"), "0193a1b2-0000-7000-8000-000000000001");
/// assert_eq!(deduplication_id("grüße").len(), 64);
/// ```
pub fn deduplication_id(id: &str) -> String {
    if sqs_token(id) {
        id.to_owned()
    } else {
        Sha256::digest(id.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// 1 to 128 ASCII letters, digits or punctuation.
fn sqs_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic())
}

#[async_trait]
impl MessageQueue for SqsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        if let Some(bad) = messages.iter().find(|m| !sqs_token(&m.group)) {
            return Err(Error::InvalidGroup(bad.group.clone()).into());
        }
        for chunk in messages.chunks(10) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, m) in chunk.iter().enumerate() {
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(serde_json::to_string(&m.payload)?)
                    .message_group_id(&m.group)
                    .message_deduplication_id(deduplication_id(&m.id))
                    .message_attributes(ID_ATTRIBUTE, string_attribute(&m.id));
                if !m.attributes.is_empty() {
                    entry = entry.message_attributes(
                        ATTRIBUTES_ATTRIBUTE,
                        string_attribute(&serde_json::to_string(&m.attributes)?),
                    );
                }
                entries.push(entry.build().map_err(|e| Error::Sqs {
                    action: "publish",
                    source: e.into(),
                })?);
            }
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sqs("publish"))?;
            if let Some(first) = out.failed().first() {
                return Err(Error::Batch {
                    action: "publish",
                    failed: out.failed().len(),
                    reason: format!("{}: {}", first.code(), first.message().unwrap_or("")),
                }
                .into());
            }
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(self.wait.as_secs().min(20) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(sqs("receive"))?;
        let mut seen = BTreeSet::new();
        let mut heads = Vec::new();
        let mut behind = Vec::new();
        for m in out.messages() {
            let d = self.decode(m)?;
            if seen.insert(d.message.group.clone()) {
                heads.push(d);
            } else {
                behind.push(d.receipt.as_str().to_owned());
            }
        }
        self.release(&behind).await?;
        Ok(heads)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        for chunk in receipts.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r.as_str())
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sqs("acknowledge"))?;
            if let Some(first) = out.failed().first() {
                return Err(Error::Batch {
                    action: "acknowledge",
                    failed: out.failed().len(),
                    reason: format!("{}: {}", first.code(), first.message().unwrap_or("")),
                }
                .into());
            }
        }
        Ok(())
    }

    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let receipts: Vec<String> = receipts.iter().map(|r| r.as_str().to_owned()).collect();
        Ok(self.release(&receipts).await?)
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(sqs("read the queue's depth"))?;
        let messages = out
            .attributes()
            .map(|a| {
                a.values()
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        Ok(QueueDepth {
            messages,
            groups: None,
            oldest: None,
        })
    }
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(sqs_token("account-7"));
        assert!(!sqs_token(""));
        assert!(!sqs_token("a b"));
        assert!(!sqs_token(&"x".repeat(129)));
    }

    #[test]
    fn queues_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SqsQueue>();
        check::<Error>();
    }
}
