//! The contract every [`MessageQueue`] passes, as a library its tests run.
//!
//! Each broker adapter (`chronicle-nats`, `chronicle-rabbitmq`,
//! `chronicle-sqs`, `chronicle-kafka`, `chronicle-pubsub`) runs
//! [`run_contract`] against its real broker on loopback; this crate's own
//! tests run it against [`chronicle_core::MemoryQueue`] and the PostgreSQL
//! dead-letter queue, and against deliberately broken queues to show that
//! every property can fail.
//!
//! The properties, one function each (every one returns a [`Failure`]
//! that says what was expected and what came):
//!
//! - [`publish_receive_ack`]: what is published is received as published
//!   (id, group, payload, attributes), [`MessageQueue::depth`] counts it,
//!   and what is acknowledged is not delivered again, even after the
//!   visibility timeout.
//! - [`one_head_per_group`]: order within a group; at most one message of a
//!   group in flight, later ones waiting behind it while a group in
//!   another lane flows.
//! - [`nack_redelivers_the_head`]: a negative acknowledgement makes the head
//!   deliverable again before the visibility timeout, still ahead of its
//!   group.
//! - [`a_dead_consumers_head_is_redelivered`]: a consumer that goes away
//!   holding a head (its handle dropped unacknowledged) delays it by at
//!   most the visibility timeout; another consumer then gets it, still
//!   ahead of its group.
//! - [`deduplication`]: with [`Dedup::ById`], publishing an id still queued
//!   is a no-op; with [`Dedup::None`], the duplicate is delivered (so the
//!   adapter's statement that it does not deduplicate is checked too).
//!
//! [`server::Server`] starts a broker the machine does not run (moto,
//! tansu, the Pub/Sub emulator) on a free loopback port for a test
//! process.
//!
//! ```no_run
//! use chronicle_core::MemoryQueue;
//! use chronicle_queue_contract::{Dedup, Spec, run_contract};
//! use std::sync::Arc;
//!
//! # async fn demo() {
//! // `open(name)` returns a new handle (a new consumer) on queue `name`:
//! // here every name is a new queue, and each handle is the queue itself.
//! let queues = std::sync::Mutex::new(std::collections::HashMap::new());
//! let spec = Spec { dedup: Dedup::ById, ..Spec::default() };
//! run_contract(&spec, |name: String| {
//!     let q: Arc<MemoryQueue> = queues
//!         .lock()
//!         .unwrap()
//!         .entry(name.clone())
//!         .or_insert_with(|| Arc::new(MemoryQueue::new(name)))
//!         .clone();
//!     async move { q }
//! })
//! .await;
//! # }
//! ```
#![deny(missing_docs)]

pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chronicle_core::{Delivery, Message, MessageQueue, Receipt};
use serde_json::json;
use uuid::Uuid;

/// Whether a queue drops a message whose id is still queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedup {
    /// Publishing an id still queued (within the broker's window) is a
    /// no-op.
    ById,
    /// The broker does not deduplicate: a duplicate is delivered again.
    /// The reason is the adapter's plain statement of why.
    None(&'static str),
}

/// Which lane a group's messages travel in, for queues whose head blocks a
/// lane (a shard queue, a partition) rather than only its group.
pub type LaneOf = Arc<dyn Fn(&str) -> u64 + Send + Sync>;

/// What the queue under test promises, and how long to wait for it.
#[derive(Clone)]
pub struct Spec {
    /// Deduplication (default [`Dedup::ById`]).
    pub dedup: Dedup,
    /// How long a received head stays in flight when its consumer neither
    /// acknowledges nor gives it back: the queue's configured visibility or
    /// acknowledgement timeout (default zero: the next receive hands it out
    /// again).
    pub visibility_timeout: Duration,
    /// How long a published or released message may take to become
    /// receivable (default 5 s).
    pub wait: Duration,
    /// How long to watch for something that must not arrive (default 1 s).
    pub settle: Duration,
    /// Whether [`Delivery::delivery_count`] counts deliveries (1, then 2
    /// after a redelivery). Default true.
    pub counts_deliveries: bool,
    /// Whether [`MessageQueue::depth`] is exact (default true); else it is
    /// not checked (an estimate, or a queue that cannot tell).
    pub exact_depth: bool,
    /// The lane of a group when heads block a lane, not just a group
    /// (default: none, every group its own lane).
    pub lane_of: Option<LaneOf>,
    /// The message of `group` at place `seq` (1, 2, …) that the properties
    /// publish; the queue must hand it back equal, except for attributes
    /// it adds. Default [`generic_message`].
    pub message: fn(group: &str, seq: u32) -> Message,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            dedup: Dedup::ById,
            visibility_timeout: Duration::ZERO,
            wait: Duration::from_secs(5),
            settle: Duration::from_secs(1),
            counts_deliveries: true,
            exact_depth: true,
            lane_of: None,
            message: generic_message,
        }
    }
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spec")
            .field("dedup", &self.dedup)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("wait", &self.wait)
            .field("settle", &self.settle)
            .field("counts_deliveries", &self.counts_deliveries)
            .field("exact_depth", &self.exact_depth)
            .field("lanes", &self.lane_of.is_some())
            .finish_non_exhaustive()
    }
}

/// A message with a nested, non-ASCII JSON payload and two attributes.
///
/// ```
/// let m = chronicle_queue_contract::generic_message("g", 2);
/// assert_eq!(m.group, "g");
/// assert_eq!(m.payload["version"], 2);
/// ```
pub fn generic_message(group: &str, seq: u32) -> Message {
    Message::new(
        Uuid::new_v4().to_string(),
        group,
        json!({
            "event_type": "ContractChecked",
            "version": seq,
            "position": format!("{}-{seq}", 1000 + seq),
            "body": { "note": "grüße ✓", "list": [1, 2.5, null, true] },
        }),
    )
    .with_attribute("attempts", "0")
    .with_attribute("reason", "contract: ünïcode & spaces")
}

/// A broken promise: what was expected, and what the queue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The property.
    pub property: &'static str,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.property, self.message)
    }
}

impl std::error::Error for Failure {}

/// The result of one property.
pub type Outcome = Result<(), Failure>;

/// Runs every property on fresh queues and panics with every failure.
/// `open(name)` must return a new handle (a new consumer, its own
/// connection) on the queue `name`, creating the queue when needed; each
/// property uses names of its own.
pub async fn run_contract<Q, F, Fut>(spec: &Spec, open: F)
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let failures: Vec<Failure> = [
        publish_receive_ack(spec, &open).await,
        one_head_per_group(spec, &open).await,
        nack_redelivers_the_head(spec, &open).await,
        a_dead_consumers_head_is_redelivered(spec, &open).await,
        deduplication(spec, &open).await,
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(|f| format!("- {f}")).collect();
        panic!(
            "the MessageQueue contract failed ({} of 5 properties):\n{}",
            failures.len(),
            list.join("\n")
        );
    }
}

/// A fresh queue name for `property` (letters, digits and `-`; short
/// enough for every broker's limits).
fn queue_name(property: &str) -> String {
    let id = Uuid::new_v4().simple().to_string();
    format!("ct-{property}-{}", &id[..12])
}

/// A fresh group (a UUID, as aggregate ids are).
fn new_group() -> String {
    Uuid::new_v4().to_string()
}

/// A group in a lane other than `other`'s, when lanes are a thing.
fn group_in_another_lane(spec: &Spec, other: &str) -> String {
    loop {
        let g = new_group();
        match &spec.lane_of {
            Some(lane) if lane(&g) == lane(other) => continue,
            _ => return g,
        }
    }
}

struct Check {
    property: &'static str,
}

impl Check {
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, Failure> {
        Err(Failure {
            property: self.property,
            message: message.into(),
        })
    }

    fn ensure(&self, ok: bool, message: impl FnOnce() -> String) -> Outcome {
        if ok { Ok(()) } else { self.fail(message()) }
    }

    fn call<T>(&self, what: &str, r: Result<T, chronicle_core::BoxError>) -> Result<T, Failure> {
        r.or_else(|e| self.fail(format!("{what} failed: {e}")))
    }

    /// Every delivery received within `within` (polling), until `done`
    /// says enough, checking that no receive hands out two messages of
    /// one group.
    async fn collect<Q: MessageQueue + ?Sized>(
        &self,
        q: &Q,
        within: Duration,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> Result<Vec<Delivery>, Failure> {
        let start = Instant::now();
        let mut all = Vec::new();
        loop {
            let batch = self.call("receive", q.receive(10).await)?;
            let groups: BTreeSet<&str> = batch.iter().map(|d| d.message.group.as_str()).collect();
            if groups.len() != batch.len() {
                return self.fail(format!(
                    "one receive handed out two messages of one group: {:?}",
                    describe(&batch)
                ));
            }
            let empty = batch.is_empty();
            all.extend(batch);
            if done(&all) || start.elapsed() >= within {
                return Ok(all);
            }
            if empty {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The message equals the one published, but for attributes the
    /// queue added.
    fn same(&self, got: &Message, sent: &Message) -> Outcome {
        let extra_ok = sent
            .attributes
            .iter()
            .all(|(k, v)| got.attributes.get(k) == Some(v));
        self.ensure(
            got.id == sent.id && got.group == sent.group && got.payload == sent.payload && extra_ok,
            || format!("received {got:?}, published {sent:?}"),
        )
    }
}

fn describe(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| {
            format!(
                "{} (group {}, delivery {})",
                d.message.id, d.message.group, d.delivery_count
            )
        })
        .collect()
}

fn has(id: &str) -> impl Fn(&[Delivery]) -> bool + '_ {
    move |all: &[Delivery]| all.iter().any(|d| d.message.id == id)
}

/// The last delivery of `id`, whose receipt is the current one.
fn last_of<'a>(all: &'a [Delivery], id: &str) -> Option<&'a Delivery> {
    all.iter().rev().find(|d| d.message.id == id)
}

/// What is published is received as published, counted by `depth`, and
/// gone once acknowledged (not redelivered after the visibility timeout;
/// acknowledging twice is a no-op).
pub async fn publish_receive_ack<Q, F, Fut>(spec: &Spec, open: &F) -> Outcome
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let c = Check {
        property: "publish_receive_ack",
    };
    let q = open(queue_name("basic")).await;
    let (g1, g2) = (new_group(), new_group());
    let g2 = if spec.lane_of.is_some() {
        group_in_another_lane(spec, &g1)
    } else {
        g2
    };
    let sent = [(spec.message)(&g1, 1), (spec.message)(&g2, 1)];
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    c.call("publish", q.publish(&sent).await)?;
    if spec.exact_depth {
        let depth = c.call("depth", q.depth().await)?;
        c.ensure(depth.messages == 2, || {
            format!("depth after publishing 2 messages: {depth:?}")
        })?;
        c.ensure(depth.groups.is_none_or(|g| g == 2), || {
            format!("depth after publishing into 2 groups: {depth:?}")
        })?;
    }
    let all = c
        .collect(&q, spec.wait, |all| {
            sent.iter()
                .all(|m| all.iter().any(|d| d.message.id == m.id))
        })
        .await?;
    for m in &sent {
        let Some(d) = all.iter().find(|d| d.message.id == m.id) else {
            return c.fail(format!(
                "published {} and did not receive it within {:?} (received {:?})",
                m.id,
                spec.wait,
                describe(&all)
            ));
        };
        c.same(&d.message, m)?;
        if spec.counts_deliveries {
            c.ensure(d.delivery_count == 1, || {
                format!("first delivery of {} counted {}", m.id, d.delivery_count)
            })?;
        }
        if let Some(at) = d.enqueued_at {
            c.ensure(
                at >= before && at <= chrono::Utc::now() + chrono::Duration::seconds(5),
                || format!("{} enqueued_at {at} is not the time it was published", m.id),
            )?;
        }
    }
    let receipts: Vec<Receipt> = sent
        .iter()
        .filter_map(|m| last_of(&all, &m.id).map(|d| d.receipt.clone()))
        .collect();
    c.call("ack", q.ack(&receipts).await)?;
    c.call("a second ack of the same receipts", q.ack(&receipts).await)?;
    let after = c
        .collect(&q, spec.visibility_timeout + spec.settle, |all| {
            !all.is_empty()
        })
        .await?;
    c.ensure(after.is_empty(), || {
        format!(
            "acknowledged messages were delivered again: {:?}",
            describe(&after)
        )
    })?;
    if spec.exact_depth {
        let depth = c.call("depth", q.depth().await)?;
        c.ensure(depth.messages == 0, || {
            format!("depth after acknowledging everything: {depth:?}")
        })?;
    }
    Ok(())
}

/// Order within a group, one head per group: a group's later messages wait
/// behind its unacknowledged head while a group in another lane flows, and
/// acknowledging the head releases the next, in publishing order.
pub async fn one_head_per_group<Q, F, Fut>(spec: &Spec, open: &F) -> Outcome
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let c = Check {
        property: "one_head_per_group",
    };
    let q = open(queue_name("order")).await;
    let a = new_group();
    let b = group_in_another_lane(spec, &a);
    let group_a: Vec<Message> = (1..=3).map(|n| (spec.message)(&a, n)).collect();
    let b1 = (spec.message)(&b, 1);
    // Two batches: the group is ordered across publishes too.
    c.call("publish", q.publish(&group_a[..2]).await)?;
    c.call(
        "publish",
        q.publish(&[b1.clone(), group_a[2].clone()]).await,
    )?;
    // Watch for the settle time after both heads came: only a1 from a.
    let heads = c
        .collect(&q, spec.wait, |all| {
            has(&group_a[0].id)(all) && has(&b1.id)(all)
        })
        .await?;
    let more = c
        .collect(&q, spec.settle, |all| {
            all.iter()
                .any(|d| d.message.group == a && d.message.id != group_a[0].id)
        })
        .await?;
    let seen: Vec<Delivery> = heads.into_iter().chain(more).collect();
    c.ensure(has(&b1.id)(&seen), || {
        format!(
            "group b's head did not flow while group a's head was in flight (received {:?})",
            describe(&seen)
        )
    })?;
    let of_a: Vec<&str> = seen
        .iter()
        .filter(|d| d.message.group == a)
        .map(|d| d.message.id.as_str())
        .collect();
    c.ensure(
        !of_a.is_empty() && of_a.iter().all(|id| *id == group_a[0].id),
        || {
            format!(
                "group a published {:?}; with its head unacknowledged it handed out {of_a:?} \
                 (only the head may come)",
                ids_of(&group_a)
            )
        },
    )?;
    // Release the group one head at a time.
    let mut current = last_of(&seen, &group_a[0].id).cloned();
    for (i, next) in group_a.iter().enumerate().skip(1) {
        let head = current.take().ok_or_else(|| Failure {
            property: c.property,
            message: format!("lost track of head {}", group_a[i - 1].id),
        })?;
        c.call("ack", q.ack(std::slice::from_ref(&head.receipt)).await)?;
        let got = c
            .collect(&q, spec.wait, |all| {
                all.iter().any(|d| d.message.group == a)
            })
            .await?;
        let first_of_a = got.iter().find(|d| d.message.group == a);
        match first_of_a {
            Some(d) if d.message.id == next.id => {
                c.same(&d.message, next)?;
                current = Some(d.clone());
            }
            Some(d) => {
                return c.fail(format!(
                    "after acknowledging {}, group a handed out {} instead of {} (published order {:?})",
                    head.message.id,
                    d.message.id,
                    next.id,
                    ids_of(&group_a)
                ));
            }
            None => {
                return c.fail(format!(
                    "after acknowledging {}, {} did not come within {:?}",
                    head.message.id, next.id, spec.wait
                ));
            }
        }
    }
    let mut tail = vec![];
    if let Some(d) = current {
        tail.push(d.receipt);
    }
    if let Some(d) = last_of(&seen, &b1.id) {
        tail.push(d.receipt.clone());
    }
    c.call("ack", q.ack(&tail).await)?;
    Ok(())
}

fn ids_of(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

/// A nacked head is deliverable again before the visibility timeout,
/// still ahead of its group, and counted as a redelivery.
pub async fn nack_redelivers_the_head<Q, F, Fut>(spec: &Spec, open: &F) -> Outcome
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let c = Check {
        property: "nack_redelivers_the_head",
    };
    let q = open(queue_name("nack")).await;
    let a = new_group();
    let sent = [(spec.message)(&a, 1), (spec.message)(&a, 2)];
    c.call("publish", q.publish(&sent).await)?;
    let first = c.collect(&q, spec.wait, has(&sent[0].id)).await?;
    let Some(head) = last_of(&first, &sent[0].id).cloned() else {
        return c.fail(format!(
            "published {} and did not receive it within {:?}",
            sent[0].id, spec.wait
        ));
    };
    let nacked = Instant::now();
    c.call("nack", q.nack(std::slice::from_ref(&head.receipt)).await)?;
    let again = c
        .collect(&q, spec.wait, |all| {
            all.iter().any(|d| d.message.group == a)
        })
        .await?;
    let took = nacked.elapsed();
    match again.iter().find(|d| d.message.group == a) {
        None => {
            return c.fail(format!(
                "after a nack, {} was not delivered again within {:?}",
                sent[0].id, spec.wait
            ));
        }
        Some(d) if d.message.id != sent[0].id => {
            return c.fail(format!(
                "after a nack of the head {}, the group handed out {} first",
                sent[0].id, d.message.id
            ));
        }
        Some(d) => {
            c.same(&d.message, &sent[0])?;
            if spec.counts_deliveries {
                c.ensure(d.delivery_count >= 2, || {
                    format!(
                        "the redelivery of {} counted {} deliveries",
                        d.message.id, d.delivery_count
                    )
                })?;
            }
            if !spec.visibility_timeout.is_zero() {
                c.ensure(took < spec.visibility_timeout, || {
                    format!(
                        "{} came back after {took:?}, not before the visibility timeout {:?}: \
                         the nack did nothing",
                        d.message.id, spec.visibility_timeout
                    )
                })?;
            }
        }
    }
    // Then the rest of the group in order.
    let head = last_of(&again, &sent[0].id).cloned();
    if let Some(head) = head {
        c.call("ack", q.ack(&[head.receipt]).await)?;
    }
    let rest = c.collect(&q, spec.wait, has(&sent[1].id)).await?;
    match last_of(&rest, &sent[1].id) {
        Some(d) => c.call("ack", q.ack(std::slice::from_ref(&d.receipt)).await),
        None => c.fail(format!(
            "after acknowledging the redelivered head, {} did not come within {:?}",
            sent[1].id, spec.wait
        )),
    }
}

/// A consumer that goes away holding a head (its handle dropped without
/// acknowledging) delays it by at most the visibility timeout: a new
/// consumer then receives it, still ahead of its group.
pub async fn a_dead_consumers_head_is_redelivered<Q, F, Fut>(spec: &Spec, open: &F) -> Outcome
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let c = Check {
        property: "a_dead_consumers_head_is_redelivered",
    };
    let name = queue_name("death");
    let doomed = open(name.clone()).await;
    let a = new_group();
    let sent = [(spec.message)(&a, 1), (spec.message)(&a, 2)];
    c.call("publish", doomed.publish(&sent).await)?;
    let got = c.collect(&doomed, spec.wait, has(&sent[0].id)).await?;
    c.ensure(has(&sent[0].id)(&got), || {
        format!(
            "published {} and did not receive it within {:?}",
            sent[0].id, spec.wait
        )
    })?;
    drop(doomed);
    let died = Instant::now();
    let heir = open(name).await;
    let within = spec.visibility_timeout + spec.wait;
    let again = c
        .collect(&heir, within, |all| {
            all.iter().any(|d| d.message.group == a)
        })
        .await?;
    match again.iter().find(|d| d.message.group == a) {
        None => c.fail(format!(
            "the consumer holding {} went away; no other consumer got it within {within:?} \
             (visibility timeout {:?})",
            sent[0].id, spec.visibility_timeout
        )),
        Some(d) if d.message.id != sent[0].id => c.fail(format!(
            "the consumer holding the head {} went away; the next consumer got {} first",
            sent[0].id, d.message.id
        )),
        Some(d) => {
            c.same(&d.message, &sent[0])?;
            let receipt = d.receipt.clone();
            c.call("ack", heir.ack(&[receipt]).await)?;
            let rest = c.collect(&heir, spec.wait, has(&sent[1].id)).await?;
            let Some(next) = last_of(&rest, &sent[1].id) else {
                return c.fail(format!(
                    "{} did not follow its redelivered head within {:?} ({:?} after the death)",
                    sent[1].id,
                    spec.wait,
                    died.elapsed()
                ));
            };
            c.call("ack", heir.ack(std::slice::from_ref(&next.receipt)).await)
        }
    }
}

/// [`Dedup::ById`]: publishing an id still queued, alone or in a batch, is
/// a no-op. [`Dedup::None`]: the duplicate is delivered again.
pub async fn deduplication<Q, F, Fut>(spec: &Spec, open: &F) -> Outcome
where
    Q: MessageQueue,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Q>,
{
    let c = Check {
        property: "deduplication",
    };
    let q = open(queue_name("dedup")).await;
    let (a, b) = (new_group(), new_group());
    let m = (spec.message)(&a, 1);
    let other = (spec.message)(&b, 1);
    c.call("publish", q.publish(std::slice::from_ref(&m)).await)?;
    c.call("publish again", q.publish(std::slice::from_ref(&m)).await)?;
    c.call(
        "publish again in a batch",
        q.publish(&[m.clone(), other.clone()]).await,
    )?;
    // Receive and acknowledge everything for a while; count deliveries of
    // each id (a redelivery of an unacknowledged message does not count:
    // every delivery is acknowledged at once).
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + spec.wait + spec.settle;
    let expected_m = match spec.dedup {
        Dedup::ById => 1,
        Dedup::None(_) => 3,
    };
    while Instant::now() < deadline {
        let batch = c.call("receive", q.receive(10).await)?;
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for d in &batch {
            *counts.entry(d.message.id.clone()).or_default() += 1;
        }
        let receipts: Vec<Receipt> = batch.iter().map(|d| d.receipt.clone()).collect();
        c.call("ack", q.ack(&receipts).await)?;
        if counts.get(&m.id) == Some(&expected_m) && counts.get(&other.id) == Some(&1) {
            // Keep watching for the settle time: nothing more may come.
            let more = c.collect(&q, spec.settle, |all| !all.is_empty()).await?;
            for d in &more {
                *counts.entry(d.message.id.clone()).or_default() += 1;
            }
            break;
        }
    }
    let got_m = counts.get(&m.id).copied().unwrap_or(0);
    let got_other = counts.get(&other.id).copied().unwrap_or(0);
    c.ensure(got_other == 1, || {
        format!(
            "{} was published once and delivered {got_other} time(s)",
            other.id
        )
    })?;
    match &spec.dedup {
        Dedup::ById => c.ensure(got_m == 1, || {
            format!(
                "{} was published three times while queued and delivered {got_m} time(s); \
                 a queue that deduplicates delivers it once",
                m.id
            )
        }),
        Dedup::None(why) => c.ensure(got_m == 3, || {
            format!(
                "{} was published three times and delivered {got_m} time(s); the adapter says \
                 it does not deduplicate ({why}), so all three should come",
                m.id
            )
        }),
    }
}

/// The receipts of `deliveries`.
///
/// ```
/// assert!(chronicle_queue_contract::receipts(&[]).is_empty());
/// ```
pub fn receipts(deliveries: &[Delivery]) -> Vec<Receipt> {
    deliveries.iter().map(|d| d.receipt.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fresh_and_short() {
        let (a, b) = (queue_name("x"), queue_name("x"));
        assert_ne!(a, b);
        assert!(a.len() <= 20, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
