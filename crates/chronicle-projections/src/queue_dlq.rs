//! The dead-letter operations (`list`, `show`, `retry`, `discard`) on any
//! [`MessageQueue`] holding dead letters in the format of
//! [`PgDeadLetterQueue::message`](crate::PgDeadLetterQueue::message): a
//! broker chosen with `dead_letters:` in the deployment YAML.
//!
//! A broker hands out only each group's head, so these work through
//! `receive`: listing receives the heads and gives them back at once
//! ([`MessageQueue::nack`]), and reads the rest of each group with
//! [`MessageQueue::peek`] where the queue can browse (NATS); on the
//! others a list shows each aggregate's head only. A replay handles the
//! head in its own transaction and acknowledges it after the commit: at
//! least once (a crash between the two replays it again), where the
//! PostgreSQL queue's replay is one transaction.

use std::time::Duration;

use chronicle_core::{BoxError, Delivery, MessageQueue, Position};
use chronicle_step::Applied;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::dlq::{DeadLetter, DeadLetterState, ReplayReport};
use crate::queue::lock_groups;
use crate::sql::{COLUMNS, envelope};
use crate::{Error, PgProjection};

/// What can go wrong with dead letters on a broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueDlqError {
    /// The queue failed.
    #[error("dead-letter queue `{queue}`: {source}")]
    Queue {
        /// The queue's name.
        queue: String,
        /// The queue's error.
        source: BoxError,
    },
    /// A message in the queue is not a dead letter.
    #[error("dead-letter queue `{queue}`: message `{id}` is not a dead letter: {reason}")]
    NotADeadLetter {
        /// The queue's name.
        queue: String,
        /// The message id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The database or the handler's runtime failed.
    #[error(transparent)]
    Runtime(#[from] Error),
}

fn queue_error(queue: &dyn MessageQueue) -> impl FnOnce(BoxError) -> QueueDlqError + '_ {
    move |source| QueueDlqError::Queue {
        queue: queue.name().to_owned(),
        source,
    }
}

/// How long to keep receiving when looking for heads: a broker may take a
/// moment to hand them out (a Kafka consumer first joins its group).
const LOOK: Duration = Duration::from_secs(8);

/// Receives every head the queue hands out within [`LOOK`] (stopping
/// early once a receive comes back empty after some came), then gives
/// them all back.
async fn heads(queue: &dyn MessageQueue) -> Result<Vec<Delivery>, QueueDlqError> {
    let deadline = tokio::time::Instant::now() + LOOK;
    let mut all: Vec<Delivery> = Vec::new();
    loop {
        let batch = queue.receive(100).await.map_err(queue_error(queue))?;
        let empty = batch.is_empty();
        for d in batch {
            if !all.iter().any(|h| h.message.group == d.message.group) {
                all.push(d);
            }
        }
        if (empty && !all.is_empty()) || tokio::time::Instant::now() >= deadline {
            break;
        }
        if empty {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let receipts: Vec<_> = all.iter().map(|d| d.receipt.clone()).collect();
    queue.nack(&receipts).await.map_err(queue_error(queue))?;
    Ok(all)
}

/// The message as a dead letter: the head `failed` (when it carries an
/// error) and the rest `parked`.
fn letter(
    queue: &dyn MessageQueue,
    projection: &str,
    m: &chronicle_core::Message,
    head: bool,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<DeadLetter, QueueDlqError> {
    let bad = |reason: &str| QueueDlqError::NotADeadLetter {
        queue: queue.name().to_owned(),
        id: m.id.clone(),
        reason: reason.to_owned(),
    };
    let event_id = m.id.parse().map_err(|_| bad("its id is not an event id"))?;
    let aggregate_id = m
        .group
        .parse()
        .map_err(|_| bad("its group is not an aggregate id"))?;
    let version = m.payload["version"]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad("payload.version is missing"))?;
    let position: Position = m.payload["position"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("payload.position is missing"))?;
    let failed = head || m.attributes.get("state").is_some_and(|s| s == "failed");
    Ok(DeadLetter {
        id: 0,
        projection: projection.to_owned(),
        aggregate_id,
        event_id,
        event_type: m.payload["event_type"].as_str().unwrap_or("").to_owned(),
        version,
        position,
        state: if failed {
            DeadLetterState::Failed
        } else {
            DeadLetterState::Parked
        },
        attempts: m
            .attributes
            .get("attempts")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        error: if failed {
            m.attributes.get("error").cloned()
        } else {
            None
        },
        created_at: at,
        updated_at: at,
    })
}

/// The dead letters of `projection` in `queue` (of one aggregate when
/// given), each aggregate's in order: its head, then, where the queue can
/// browse, the events parked behind it. [`DeadLetter::id`] is 0 (a broker
/// has no row id).
pub async fn list(
    queue: &dyn MessageQueue,
    projection: &str,
    aggregate_id: Option<Uuid>,
) -> Result<Vec<DeadLetter>, QueueDlqError> {
    let mut heads = heads(queue).await?;
    heads.sort_by(|a, b| a.message.group.cmp(&b.message.group));
    let mut out = Vec::new();
    for head in heads {
        let at = head.enqueued_at.unwrap_or_else(chrono::Utc::now);
        let first = letter(queue, projection, &head.message, true, at)?;
        if aggregate_id.is_some_and(|a| a != first.aggregate_id) {
            continue;
        }
        // Not browsable: the head alone.
        let rest: Vec<chronicle_core::Message> = queue
            .peek(&head.message.group, 10_000)
            .await
            .unwrap_or_default();
        out.push(first);
        for m in rest.iter().filter(|m| m.id != head.message.id) {
            out.push(letter(queue, projection, m, false, at)?);
        }
    }
    Ok(out)
}

impl PgProjection {
    /// [`PgProjection::dlq_retry`] on a broker's dead-letter queue: takes
    /// `aggregate_id`'s head from `queue`, applies it through the handler
    /// in a transaction holding the aggregate's partition, acknowledges it
    /// once committed, and goes on with the next until the group is empty
    /// or the handler fails (the head is then given back: it stays the
    /// group's head).
    pub async fn dlq_retry_from(
        &self,
        queue: &dyn MessageQueue,
        aggregate_id: Uuid,
    ) -> Result<ReplayReport, QueueDlqError> {
        self.replay_from(queue, aggregate_id, false).await
    }

    /// [`PgProjection::dlq_discard`] on a broker's dead-letter queue:
    /// acknowledges `aggregate_id`'s head without delivering it, then
    /// replays the rest as [`PgProjection::dlq_retry_from`] does.
    pub async fn dlq_discard_from(
        &self,
        queue: &dyn MessageQueue,
        aggregate_id: Uuid,
    ) -> Result<ReplayReport, QueueDlqError> {
        self.replay_from(queue, aggregate_id, true).await
    }

    async fn replay_from(
        &self,
        queue: &dyn MessageQueue,
        aggregate_id: Uuid,
        discard_head: bool,
    ) -> Result<ReplayReport, QueueDlqError> {
        let name = self.name().to_owned();
        let group = aggregate_id.to_string();
        let mut report = ReplayReport::default();
        loop {
            let Some(head) = head_of(queue, &group).await? else {
                break;
            };
            let event_id: Uuid =
                head.message
                    .id
                    .parse()
                    .map_err(|_| QueueDlqError::NotADeadLetter {
                        queue: queue.name().to_owned(),
                        id: head.message.id.clone(),
                        reason: "its id is not an event id".into(),
                    })?;
            if discard_head && report.delivered.is_empty() && report.discarded.is_empty() {
                queue
                    .ack(std::slice::from_ref(&head.receipt))
                    .await
                    .map_err(queue_error(queue))?;
                report.discarded.push(event_id);
                continue;
            }
            let mut ctx = self.context(None, "dlq").await?;
            let applied = async {
                let partition = lock_groups(ctx.client(), &name, &[aggregate_id]).await?[0];
                ctx.set_partition(Some(partition));
                let row = ctx
                    .client()
                    .query_typed_opt(
                        &format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"),
                        &[(&event_id, Type::UUID)],
                    )
                    .await?
                    .ok_or(Error::EventMissing { event_id })?;
                let event = envelope(&row)?;
                self.apply(&mut ctx, &event, None).await
            }
            .await;
            match applied {
                Ok(Applied::Handled { .. }) => {
                    ctx.commit().await?;
                    queue
                        .ack(std::slice::from_ref(&head.receipt))
                        .await
                        .map_err(queue_error(queue))?;
                    report.delivered.push(event_id);
                }
                Ok(Applied::Failed { error, .. }) => {
                    ctx.rollback().await;
                    queue
                        .nack(std::slice::from_ref(&head.receipt))
                        .await
                        .map_err(queue_error(queue))?;
                    report.remaining = 1;
                    report.error = Some(error);
                    break;
                }
                Err(e) => {
                    ctx.rollback().await;
                    queue
                        .nack(std::slice::from_ref(&head.receipt))
                        .await
                        .map_err(queue_error(queue))?;
                    return Err(e.into());
                }
            }
        }
        if report.delivered.is_empty() && report.discarded.is_empty() && report.error.is_none() {
            return Err(Error::NoDeadLetters {
                projection: name,
                aggregate_id,
            }
            .into());
        }
        Ok(report)
    }
}

/// Receives until `group`'s head comes (giving back every other head at
/// once), for at most [`LOOK`].
async fn head_of(queue: &dyn MessageQueue, group: &str) -> Result<Option<Delivery>, QueueDlqError> {
    let deadline = tokio::time::Instant::now() + LOOK;
    loop {
        let batch = queue.receive(100).await.map_err(queue_error(queue))?;
        let (mine, others): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|d| d.message.group == group);
        let receipts: Vec<_> = others.iter().map(|d| d.receipt.clone()).collect();
        queue.nack(&receipts).await.map_err(queue_error(queue))?;
        if let Some(head) = mine.into_iter().next() {
            return Ok(Some(head));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One dead letter of `queue` in full, as [`crate::dlq::show`] gives it
/// for the PostgreSQL queue: where it stands in its group (as far as the
/// queue can browse), the event as stored in `pool`'s events table, and
/// what waits behind it. `None` when the queue does not hold it.
pub async fn show(
    queue: &dyn MessageQueue,
    pool: &chronicle_postgres::PgPool,
    projection: &str,
    event_id: Uuid,
) -> Result<Option<crate::DeadLetterDetail>, QueueDlqError> {
    let letters = list(queue, projection, None).await?;
    let Some(found) = letters.iter().find(|l| l.event_id == event_id) else {
        return Ok(None);
    };
    let group: Vec<DeadLetter> = letters
        .iter()
        .filter(|l| l.aggregate_id == found.aggregate_id)
        .cloned()
        .collect();
    let index = group
        .iter()
        .position(|l| l.event_id == event_id)
        .expect("found in the list");
    let client = pool.get().await.map_err(Error::from)?;
    let event = client
        .query_typed_opt(
            &format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"),
            &[(&event_id, Type::UUID)],
        )
        .await
        .map_err(Error::from)?
        .map(|row| envelope(&row))
        .transpose()
        .map_err(Error::from)?;
    Ok(Some(crate::DeadLetterDetail {
        letter: group[index].clone(),
        place: index as u32 + 1,
        group_size: group.len() as u32,
        blocked_by: (index > 0).then(|| group[0].clone()),
        event,
        parked_behind: group[index + 1..].to_vec(),
    }))
}
