//! [`StreamConsumer`]: a broker's stream into a [`ProjectionHandler`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chronicle_core::{
    BoxError, Delivery, EventEnvelope, Message, MessageQueue, ProjectionHandler, ProjectionResult,
    Receipt, Subscription,
};
use chronicle_projections::RetryPolicy;
use uuid::Uuid;

use crate::decode_event;

/// Attribute of a dead-lettered message: `failed` (the poison message) or
/// `parked` (a later message of its aggregate, held behind it).
pub const DEAD_LETTER_ATTRIBUTE: &str = "chronicle-dead-letter";
/// Attribute of a dead-lettered message: why it failed.
pub const REASON_ATTRIBUTE: &str = "chronicle-reason";
/// Attribute of a dead-lettered message: the handler attempts.
pub const ATTEMPTS_ATTRIBUTE: &str = "chronicle-attempts";

/// What [`StreamConsumer::poll`] (or a run) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeReport {
    /// Messages received.
    pub received: u64,
    /// Handled by the handler (done or skipped), then acknowledged.
    pub handled: u64,
    /// Dropped as duplicates (an event id or aggregate version already
    /// handled), acknowledged without calling the handler.
    pub duplicates: u64,
    /// Handler retries.
    pub retries: u64,
    /// Poison messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Later messages of a dead-lettered aggregate moved behind it.
    pub parked: u64,
}

impl ConsumeReport {
    fn add(&mut self, other: &ConsumeReport) {
        self.received += other.received;
        self.handled += other.handled;
        self.duplicates += other.duplicates;
        self.retries += other.retries;
        self.dead_lettered += other.dead_lettered;
        self.parked += other.parked;
    }
}

/// Feeds the events a relay published to a [`MessageQueue`] into a
/// [`ProjectionHandler`], so a service that does not read the event store
/// projects from a broker with the same handler code.
///
/// For each message it receives (one head per group, that is per
/// aggregate, as the queue hands them out):
///
/// 1. **Duplicates are dropped**: a message whose event id this consumer
///    handled recently (a bounded set, [`StreamConsumer::seen_capacity`]),
///    or whose version is at or below the last version it handled of the
///    aggregate, is acknowledged without calling the handler.
/// 2. The handler is called (`handle`, with the consumer's context); an
///    event outside the handler's [`ProjectionHandler::subscription`] is
///    acknowledged as skipped.
/// 3. **Acknowledged only after the handler succeeded.** A `Retry` is
///    retried with the [`RetryPolicy`]'s backoff (default: 3 retries from
///    100 ms); when the retries run out, or on `Fail`, or when the message
///    does not carry an event, the message is **dead-lettered**: published
///    to the dead-letter queue (group = aggregate id, attributes saying why),
///    then acknowledged.
/// 4. **Its aggregate's later messages are parked behind it**: they are
///    published to the dead-letter queue in order, in the same group, and
///    acknowledged, so the dead-letter queue holds the aggregate's
///    sequence from the poison message on; other aggregates flow.
///
/// What is guaranteed: at least once into the handler; within an
/// aggregate, version order (the queue's per-group order) and no version
/// applied twice by one consumer process; across restarts, a message
/// redelivered after its handler succeeded but before its acknowledgement
/// reached the broker is handled again. A handler with external effects
/// must therefore be idempotent by event id (or by aggregate version);
/// a handler writing to a database can keep the last applied version per
/// aggregate in the same transaction and skip what is at or below it.
///
/// The set of parked aggregates is read back from the dead-letter queue's
/// heads when the consumer starts ([`StreamConsumer::load_parked`]) and
/// every [`StreamConsumer::parked_refresh`]; an aggregate whose dead
/// letters were all replayed (for example by another `StreamConsumer`
/// reading the dead-letter queue) flows again after the next refresh.
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use chronicle_core::{EventEnvelope, MemoryQueue, MessageQueue, ProjectionHandler, ProjectionResult};
/// use chronicle_relay::StreamConsumer;
///
/// struct Count;
///
/// #[async_trait]
/// impl ProjectionHandler<u64> for Count {
///     fn name(&self) -> &str { "count" }
///     async fn handle(&self, _: &EventEnvelope, n: &mut u64) -> ProjectionResult {
///         *n += 1;
///         ProjectionResult::Done
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let stream: Arc<dyn MessageQueue> = Arc::new(MemoryQueue::new("orders"));
/// let dlq: Arc<dyn MessageQueue> = Arc::new(MemoryQueue::new("orders-dlq"));
/// let mut consumer = StreamConsumer::new(stream, dlq, Arc::new(Count));
/// let mut n = 0u64;
/// let report = consumer.poll(&mut n).await?;
/// assert_eq!(report.received, 0);
/// # Ok::<(), chronicle_core::BoxError>(())
/// # }).unwrap();
/// ```
pub struct StreamConsumer<C: Send + ?Sized + 'static> {
    queue: Arc<dyn MessageQueue>,
    dead_letters: Arc<dyn MessageQueue>,
    handler: Arc<dyn ProjectionHandler<C>>,
    subscription: Subscription,
    retry: RetryPolicy,
    batch: usize,
    idle_wait: Duration,
    parked_refresh: Duration,
    seen: SeenIds,
    versions: HashMap<Uuid, u32>,
    parked: HashSet<String>,
    parked_at: Option<Instant>,
}

/// The most aggregates whose last version is remembered before the map is
/// started afresh.
const VERSIONS_CAP: usize = 100_000;

impl<C: Send + ?Sized + 'static> StreamConsumer<C> {
    /// A consumer of `queue` into `handler`, dead-lettering to
    /// `dead_letters`.
    pub fn new(
        queue: Arc<dyn MessageQueue>,
        dead_letters: Arc<dyn MessageQueue>,
        handler: Arc<dyn ProjectionHandler<C>>,
    ) -> Self {
        let subscription = handler.subscription();
        StreamConsumer {
            queue,
            dead_letters,
            handler,
            subscription,
            retry: RetryPolicy::default(),
            batch: 64,
            idle_wait: Duration::from_millis(200),
            parked_refresh: Duration::from_secs(30),
            seen: SeenIds::new(100_000),
            versions: HashMap::new(),
            parked: HashSet::new(),
            parked_at: None,
        }
    }

    /// Retries before a message is dead-lettered (default
    /// [`RetryPolicy::default`]: 3 retries, 100 ms doubling, jitter).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Messages received per poll (default 64).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Event ids remembered for deduplication (default 100,000).
    pub fn seen_capacity(mut self, n: usize) -> Self {
        self.seen = SeenIds::new(n.max(1));
        self
    }

    /// How long [`StreamConsumer::run`] waits after a poll that received
    /// nothing (default 200 ms).
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.idle_wait = wait;
        self
    }

    /// How often [`StreamConsumer::run`] reads the parked aggregates back
    /// from the dead-letter queue (default 30 s).
    pub fn parked_refresh(mut self, every: Duration) -> Self {
        self.parked_refresh = every;
        self
    }

    /// The aggregates (groups) whose messages are held behind a dead
    /// letter.
    pub fn parked_groups(&self) -> impl Iterator<Item = &str> {
        self.parked.iter().map(String::as_str)
    }

    /// Reads the parked aggregates from the dead-letter queue: its heads
    /// (received and given back at once). Exact where the queue holds one
    /// head per group (PostgreSQL, NATS, SQS, Pub/Sub, memory); on a queue
    /// with wider lanes (RabbitMQ, Kafka) only the groups at the head of a
    /// lane are seen. Returns how many groups are parked.
    pub async fn load_parked(&mut self) -> Result<usize, BoxError> {
        let mut groups = HashSet::new();
        let mut receipts: Vec<Receipt> = Vec::new();
        for _ in 0..100 {
            let heads = self.dead_letters.receive(100).await?;
            let mut new = false;
            for d in heads {
                new |= groups.insert(d.message.group.clone());
                receipts.push(d.receipt);
            }
            if !new {
                break;
            }
        }
        if !receipts.is_empty() {
            self.dead_letters.nack(&receipts).await?;
        }
        // Groups parked by this process stay parked even if the broker's
        // view lags behind the publish.
        self.parked = groups;
        self.parked_at = Some(Instant::now());
        Ok(self.parked.len())
    }

    /// Receives one batch and handles it (see the type's documentation).
    /// An error is the queue's (receive, acknowledge, dead-letter
    /// publish); what was handled before it stays handled.
    pub async fn poll(&mut self, ctx: &mut C) -> Result<ConsumeReport, BoxError> {
        if self.parked_at.is_none() {
            self.load_parked().await?;
        }
        let mut report = ConsumeReport::default();
        let deliveries = self.queue.receive(self.batch).await?;
        for d in deliveries {
            report.received += 1;
            self.one(d, ctx, &mut report).await?;
        }
        Ok(report)
    }

    /// Polls until `stop` turns true (checked between polls, so a batch in
    /// hand is finished), refreshing the parked set every
    /// [`StreamConsumer::parked_refresh`]. Queue errors are logged and
    /// retried after a second.
    pub async fn run(
        &mut self,
        ctx: &mut C,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> ConsumeReport {
        let mut total = ConsumeReport::default();
        while !*stop.borrow() {
            if self
                .parked_at
                .is_some_and(|t| t.elapsed() >= self.parked_refresh)
                && let Err(e) = self.load_parked().await
            {
                tracing::warn!(queue = %self.dead_letters.name(), error = %e, "reading the parked aggregates failed");
            }
            let wait = match self.poll(ctx).await {
                Ok(r) => {
                    total.add(&r);
                    if r.received == 0 {
                        self.idle_wait
                    } else {
                        Duration::ZERO
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue.name(), error = %e, "consuming failed; retrying");
                    Duration::from_secs(1)
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        total
    }

    async fn one(
        &mut self,
        d: Delivery,
        ctx: &mut C,
        report: &mut ConsumeReport,
    ) -> Result<(), BoxError> {
        let event = match decode_event(&d.message) {
            Ok(e) => e,
            Err(reason) => {
                self.dead_letter(&d.message, "failed", &reason, 0).await?;
                report.dead_lettered += 1;
                return self.queue.ack(&[d.receipt]).await;
            }
        };
        if self.parked.contains(&d.message.group) {
            self.dead_letter(&d.message, "parked", "parked behind a dead letter", 0)
                .await?;
            report.parked += 1;
            return self.queue.ack(&[d.receipt]).await;
        }
        if self.seen.contains(&d.message.id)
            || self
                .versions
                .get(&event.aggregate_id)
                .is_some_and(|v| event.version <= *v)
        {
            report.duplicates += 1;
            return self.queue.ack(&[d.receipt]).await;
        }
        if !self
            .subscription
            .matches(&event.event_type, &event.aggregate_type)
        {
            self.handled(&event);
            report.handled += 1;
            return self.queue.ack(&[d.receipt]).await;
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let failure = match self.call(&event, ctx).await {
                ProjectionResult::Done | ProjectionResult::Skipped => None,
                ProjectionResult::Retry(r) if attempt <= self.retry.max_retries => {
                    report.retries += 1;
                    let delay = self.retry.delay_with(attempt, rand::random::<f64>());
                    tracing::debug!(event_id = %event.event_id, attempt, reason = %r, "retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                ProjectionResult::Retry(r) | ProjectionResult::Fail(r) => Some(r),
            };
            return match failure {
                None => {
                    self.handled(&event);
                    report.handled += 1;
                    self.queue.ack(&[d.receipt]).await
                }
                Some(reason) => {
                    tracing::warn!(
                        queue = %self.queue.name(),
                        event_id = %event.event_id,
                        aggregate_id = %event.aggregate_id,
                        version = event.version,
                        attempts = attempt,
                        reason = %reason,
                        "message dead-lettered; the aggregate's later messages are parked"
                    );
                    self.dead_letter(&d.message, "failed", &reason, attempt)
                        .await?;
                    report.dead_lettered += 1;
                    self.queue.ack(&[d.receipt]).await
                }
            };
        }
    }

    async fn call(&self, event: &EventEnvelope, ctx: &mut C) -> ProjectionResult {
        self.handler.handle(event, ctx).await
    }

    fn handled(&mut self, event: &EventEnvelope) {
        self.seen.insert(event.event_id.to_string());
        if self.versions.len() >= VERSIONS_CAP {
            self.versions.clear();
        }
        self.versions.insert(event.aggregate_id, event.version);
    }

    /// Publishes `message` to the dead-letter queue with why, and parks
    /// its group.
    async fn dead_letter(
        &mut self,
        message: &Message,
        kind: &str,
        reason: &str,
        attempts: u32,
    ) -> Result<(), BoxError> {
        let letter = message
            .clone()
            .with_attribute(DEAD_LETTER_ATTRIBUTE, kind)
            .with_attribute(
                REASON_ATTRIBUTE,
                reason.chars().take(1000).collect::<String>(),
            )
            .with_attribute(ATTEMPTS_ATTRIBUTE, attempts.to_string());
        self.dead_letters.publish(&[letter]).await?;
        self.parked.insert(message.group.clone());
        Ok(())
    }
}

/// A bounded set of ids: the oldest is forgotten first.
struct SeenIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl SeenIds {
    fn new(cap: usize) -> Self {
        SeenIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seen_set_forgets_the_oldest() {
        let mut s = SeenIds::new(2);
        s.insert("a".into());
        s.insert("b".into());
        s.insert("a".into());
        assert!(s.contains("a") && s.contains("b"));
        s.insert("c".into());
        assert!(!s.contains("a") && s.contains("b") && s.contains("c"));
    }
}
