//! [`PgDeadLetterQueue`]: the [`MessageQueue`] over `projection_dead_letters`,
//! the default dead-letter queue.
//!
//! One queue per projection; a message is an event, its id the event id and
//! its group the aggregate id. A group's head is the event that failed
//! (`failed`); what is published behind it waits (`parked`), in version
//! order. The step writes the same rows in its own transaction, so a dead
//! letter and the checkpoint that passes it commit together.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    BoxError, Delivery, EventEnvelope, Message, MessageQueue, Position, QueueDepth, Receipt,
};
use chronicle_postgres::PgPool;
use serde_json::json;
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::dlq::{DeadLetter, DeadLetterState, decode_letter};
use crate::sql::Xid8;
use crate::{Error, PgContext, Result};

/// The columns [`decode_letter`] reads, in order.
pub(crate) const LETTER_COLUMNS: &str = "id, projection, aggregate_id, event_id, event_type, \
    version, transaction_id, global_position, state, attempts, error, created_at, updated_at";

/// What can go wrong with the PostgreSQL dead-letter queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A message does not describe an event (nothing of the batch was
    /// published).
    #[error("dead-letter message `{id}`: {reason}")]
    InvalidMessage {
        /// The message's id.
        id: String,
        /// What is wrong, and what the queue expects.
        reason: String,
    },
    /// A receipt this queue did not issue.
    #[error(
        "`{0}` is not a receipt of this dead-letter queue; acknowledge the receipts `receive` returned"
    )]
    InvalidReceipt(String),
    /// Acknowledging a message that is not its group's head would skip
    /// the events before it.
    #[error(
        "dead letter {event_id} (aggregate {aggregate_id}) of `{projection}` is not its group's head; \
         acknowledge the events before it first"
    )]
    NotHead {
        /// The projection.
        projection: String,
        /// The aggregate.
        aggregate_id: Uuid,
        /// The event.
        event_id: Uuid,
    },
    /// The database or the runtime failed.
    #[error(transparent)]
    Runtime(#[from] Error),
}

impl From<tokio_postgres::Error> for QueueError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueueError::Runtime(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for QueueError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        QueueError::Runtime(e.into())
    }
}

/// The dead-letter queue of one projection, in PostgreSQL: the default
/// [`MessageQueue`] behind the sequenced DLQ.
///
/// - **Messages** are events: [`Message::id`] is the event id,
///   [`Message::group`] the aggregate id, the payload
///   `{"event_type", "version", "position"}` ([`PgDeadLetterQueue::message`]
///   builds it) and the attributes `error` and `attempts` for the first
///   failure. Received messages also carry `state` (`failed` or `parked`).
/// - **Deduplication**: `UNIQUE (projection, event_id)`; an event is never
///   queued twice while it is in the queue.
/// - **Order**: a group is ordered by the events' versions. Publishing into
///   an empty group makes the event the failed head; publishing into a
///   group that has one parks the event behind it.
/// - **Receive** returns the heads, oldest first, and never removes
///   anything: a head stays until it is acknowledged (a visibility timeout
///   of zero: a consumer that dies holding a head delays nobody, and
///   **nack** has nothing to undo). **Ack** removes a head, and the next
///   event of its group becomes the head (still `parked`: it has not been
///   tried yet).
///   [`Delivery::delivery_count`] is the handler attempts made on the event
///   (0 for a released head not tried yet), since receiving changes
///   nothing.
///
/// Writes lock the groups' partition rows in `projection_state`, so they
/// wait for a running step of those partitions and steps wait for them.
/// The projection must be registered.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> Result<(), chronicle_core::BoxError> {
/// use chronicle_core::MessageQueue;
/// use chronicle_projections::PgDeadLetterQueue;
///
/// let queue = PgDeadLetterQueue::new(pool, "user-profile");
/// for delivery in queue.receive(10).await? {
///     println!(
///         "aggregate {} is blocked by event {}: {}",
///         delivery.message.group,
///         delivery.message.id,
///         delivery.message.attributes.get("error").map_or("-", String::as_str)
///     );
/// }
/// println!("{} queued", queue.depth().await?.messages);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgDeadLetterQueue {
    pool: PgPool,
    projection: String,
}

impl std::fmt::Debug for PgDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDeadLetterQueue")
            .field("projection", &self.projection)
            .finish_non_exhaustive()
    }
}

/// One event to queue, validated.
#[derive(Debug)]
struct Letter {
    event_id: Uuid,
    aggregate_id: Uuid,
    event_type: String,
    version: i32,
    position: Position,
    attempts: i32,
    error: Option<String>,
}

impl PgDeadLetterQueue {
    /// The dead-letter queue of `projection` on `pool`.
    pub fn new(pool: PgPool, projection: impl Into<String>) -> Self {
        PgDeadLetterQueue {
            pool,
            projection: projection.into(),
        }
    }

    /// The message for `event`, failed after `attempts` attempts with
    /// `error` (published into an empty group it becomes the failed head;
    /// behind a head it is parked and the failure fields are not kept).
    ///
    /// ```
    /// use chronicle_core::{EventEnvelope, Metadata, Position};
    /// use chronicle_projections::PgDeadLetterQueue;
    ///
    /// let event = EventEnvelope {
    ///     event_id: uuid::Uuid::now_v7(),
    ///     aggregate_id: uuid::Uuid::now_v7(),
    ///     aggregate_type: "user".into(),
    ///     event_type: "UserRegistered".into(),
    ///     event_data: serde_json::json!({}),
    ///     metadata: Metadata::default(),
    ///     version: 1,
    ///     timestamp: chrono::Utc::now(),
    ///     encrypted_fields: Vec::new(),
    ///     position: Position::new(900, 7),
    /// };
    /// let m = PgDeadLetterQueue::message(&event, 4, Some("bad email"));
    /// assert_eq!(m.id, event.event_id.to_string());
    /// assert_eq!(m.payload["position"], "900-7");
    /// assert_eq!(m.attributes["error"], "bad email");
    /// ```
    pub fn message(event: &EventEnvelope, attempts: u32, error: Option<&str>) -> Message {
        let mut m = Message::new(
            event.event_id.to_string(),
            event.aggregate_id.to_string(),
            json!({
                "event_type": event.event_type,
                "version": event.version,
                "position": event.position.to_string(),
            }),
        )
        .with_attribute("attempts", attempts.to_string());
        if let Some(error) = error {
            m = m.with_attribute("error", error);
        }
        m
    }

    /// The projection whose queue this is.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// Opens a transaction for a write.
    async fn begin(&self) -> Result<PgContext, QueueError> {
        let conn = self.pool.get().await?;
        Ok(PgContext::begin(
            Box::new(conn),
            Arc::from(self.projection.as_str()),
            None,
            Arc::from("dead-letter-queue"),
        )
        .await?)
    }

    fn decode(message: &Message) -> Result<Letter, QueueError> {
        let bad = |reason: String| QueueError::InvalidMessage {
            id: message.id.clone(),
            reason,
        };
        let event_id = message
            .id
            .parse()
            .map_err(|_| bad("the id must be the event's id (a UUID)".into()))?;
        let aggregate_id = message.group.parse().map_err(|_| {
            bad(format!(
                "the group `{}` must be the aggregate id (a UUID)",
                message.group
            ))
        })?;
        let p = &message.payload;
        let event_type = p["event_type"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("payload.event_type must be the event's type".into()))?
            .to_owned();
        let version = p["version"]
            .as_u64()
            .and_then(|v| i32::try_from(v).ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| bad("payload.version must be the event's version (1 or more)".into()))?;
        let position = p["position"]
            .as_str()
            .and_then(|s| s.parse::<Position>().ok())
            .ok_or_else(|| {
                bad(
                    "payload.position must be the event's feed position, TRANSACTION-POSITION"
                        .into(),
                )
            })?;
        let attempts = match message.attributes.get("attempts") {
            None => 0,
            Some(a) => a
                .parse::<u32>()
                .ok()
                .and_then(|a| i32::try_from(a).ok())
                .ok_or_else(|| bad(format!("attribute attempts `{a}` is not a count")))?,
        };
        Ok(Letter {
            event_id,
            aggregate_id,
            event_type,
            version,
            position,
            attempts,
            error: message.attributes.get("error").cloned(),
        })
    }
}

impl DeadLetter {
    /// This dead letter as a queue message, with the attributes `state`,
    /// `attempts` and (for a failed event) `error`.
    pub fn to_message(&self) -> Message {
        let mut m = Message::new(
            self.event_id.to_string(),
            self.aggregate_id.to_string(),
            json!({
                "event_type": self.event_type,
                "version": self.version,
                "position": self.position.to_string(),
            }),
        )
        .with_attribute(
            "state",
            match self.state {
                DeadLetterState::Failed => "failed",
                DeadLetterState::Parked => "parked",
            },
        )
        .with_attribute("attempts", self.attempts.to_string());
        if let Some(error) = &self.error {
            m = m.with_attribute("error", error.clone());
        }
        m
    }
}

#[async_trait]
impl MessageQueue for PgDeadLetterQueue {
    fn name(&self) -> &str {
        &self.projection
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        let letters = messages
            .iter()
            .map(Self::decode)
            .collect::<Result<Vec<_>, _>>()?;
        if letters.is_empty() {
            return Ok(());
        }
        let ctx = self.begin().await?;
        let result = async {
            let groups: Vec<Uuid> = letters.iter().map(|l| l.aggregate_id).collect();
            lock_groups(ctx.client(), &self.projection, &groups).await?;
            for letter in &letters {
                insert(ctx.client(), &self.projection, letter).await?;
            }
            Ok::<_, QueueError>(())
        }
        .await;
        Ok(finish(ctx, result).await?)
    }

    async fn receive(&self, max: usize) -> Result<Vec<Delivery>, BoxError> {
        let client = self.pool.get().await.map_err(QueueError::from)?;
        let heads = heads(&client, &self.projection, max).await?;
        Ok(heads
            .into_iter()
            .map(|letter| Delivery {
                receipt: Receipt::new(letter.id.to_string()),
                delivery_count: letter.attempts,
                enqueued_at: Some(letter.created_at),
                message: letter.to_message(),
            })
            .collect())
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        let ids = receipts
            .iter()
            .map(|r| {
                r.as_str()
                    .parse::<i64>()
                    .map_err(|_| QueueError::InvalidReceipt(r.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(());
        }
        let ctx = self.begin().await?;
        let result = async {
            let client = ctx.client();
            let groups: Vec<Uuid> = client
                .query_typed(
                    "SELECT aggregate_id FROM projection_dead_letters
                      WHERE projection = $1 AND id = ANY($2)",
                    &[(&self.projection, Type::TEXT), (&ids, Type::INT8_ARRAY)],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            lock_groups(client, &self.projection, &groups).await?;
            for id in ids {
                if let Removed::NotHead {
                    aggregate_id,
                    event_id,
                } = remove_head(client, &self.projection, id).await?
                {
                    return Err(QueueError::NotHead {
                        projection: self.projection.clone(),
                        aggregate_id,
                        event_id,
                    });
                }
            }
            Ok(())
        }
        .await;
        Ok(finish(ctx, result).await?)
    }

    /// Receiving changes nothing (a visibility timeout of zero), so a head
    /// is deliverable again already: this only checks the receipts.
    async fn nack(&self, receipts: &[Receipt]) -> Result<(), BoxError> {
        for r in receipts {
            r.as_str()
                .parse::<i64>()
                .map_err(|_| QueueError::InvalidReceipt(r.to_string()))?;
        }
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        let client = self.pool.get().await.map_err(QueueError::from)?;
        Ok(queue_depth(&client, &self.projection).await?)
    }

    async fn peek(&self, group: &str, limit: usize) -> Result<Vec<Message>, BoxError> {
        let aggregate_id: Uuid = group.parse().map_err(|_| QueueError::InvalidMessage {
            id: group.to_owned(),
            reason: "a group of the dead-letter queue is an aggregate id (a UUID)".into(),
        })?;
        let client = self.pool.get().await.map_err(QueueError::from)?;
        let letters = group_letters(&client, &self.projection, aggregate_id, false).await?;
        Ok(letters
            .iter()
            .take(limit)
            .map(DeadLetter::to_message)
            .collect())
    }
}

/// Commits `ctx` when `result` is a success, else rolls it back.
async fn finish<T>(ctx: PgContext, result: Result<T, QueueError>) -> Result<T, QueueError> {
    match result {
        Ok(value) => {
            ctx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            ctx.rollback().await;
            Err(e)
        }
    }
}

/// Locks the partition rows of `groups` in `projection_state` (in
/// partition order, so concurrent writers do not deadlock) and returns the
/// partitions locked, sorted. Waits for a running step of those partitions;
/// steps skip them until the transaction ends.
pub(crate) async fn lock_groups(
    client: &Client,
    projection: &str,
    groups: &[Uuid],
) -> Result<Vec<u32>> {
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let distinct: Vec<Uuid> = groups
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rows = client
        .query_typed(
            "SELECT s.partition FROM projection_state s
              WHERE s.projection = $1
                AND s.partition IN (SELECT chronicle_partition(g, s.partitions)
                                      FROM unnest($2::uuid[]) AS g)
              ORDER BY s.partition
                FOR UPDATE",
            &[(&projection, Type::TEXT), (&distinct, Type::UUID_ARRAY)],
        )
        .await?;
    if rows.is_empty() {
        return Err(Error::NotRegistered(projection.to_owned()));
    }
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
}

/// Queues `letter`: the failed head of an empty group, parked behind an
/// existing head otherwise. Returns whether a row was inserted (an event is
/// never queued twice). Refuses an event whose version is not after the
/// group's last: a group is ordered by version.
async fn insert(client: &Client, projection: &str, letter: &Letter) -> Result<bool, QueueError> {
    let seen = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM projection_dead_letters
                             WHERE projection = $1 AND event_id = $3),
                    (SELECT max(version) FROM projection_dead_letters
                      WHERE projection = $1 AND aggregate_id = $2)",
            &[
                (&projection, Type::TEXT),
                (&letter.aggregate_id, Type::UUID),
                (&letter.event_id, Type::UUID),
            ],
        )
        .await?;
    if seen.get::<_, bool>(0) {
        return Ok(false);
    }
    if let Some(last) = seen.get::<_, Option<i32>>(1)
        && last >= letter.version
    {
        return Err(QueueError::InvalidMessage {
            id: letter.event_id.to_string(),
            reason: format!(
                "version {} is not after version {last}, the last queued for aggregate {}; \
                 a group is ordered by version, so publish an aggregate's events in order",
                letter.version, letter.aggregate_id
            ),
        });
    }
    let n = client
        .execute_typed(
            "INSERT INTO projection_dead_letters
                    (projection, aggregate_id, event_id, event_type, version, transaction_id,
                     global_position, state, attempts, error)
             SELECT $1, $2, $3, $4, $5, $6, $7,
                    CASE WHEN h.blocked THEN 'parked' ELSE 'failed' END,
                    CASE WHEN h.blocked THEN 0 ELSE $8 END,
                    CASE WHEN h.blocked THEN NULL ELSE $9 END
               FROM (SELECT EXISTS (SELECT 1 FROM projection_dead_letters
                                     WHERE projection = $1 AND aggregate_id = $2) AS blocked) AS h
             ON CONFLICT (projection, event_id) DO NOTHING",
            &[
                (&projection, Type::TEXT),
                (&letter.aggregate_id, Type::UUID),
                (&letter.event_id, Type::UUID),
                (&letter.event_type, Type::TEXT),
                (&letter.version, Type::INT4),
                (&Xid8(letter.position.transaction_id), Type::XID8),
                (&letter.position.global_position, Type::INT8),
                (&letter.attempts, Type::INT4),
                (&letter.error, Type::TEXT),
            ],
        )
        .await?;
    Ok(n > 0)
}

/// How many events (and aggregates) `projection` has queued.
pub(crate) async fn queue_depth(client: &Client, projection: &str) -> Result<QueueDepth> {
    let row = client
        .query_typed_one(
            "SELECT count(*), count(DISTINCT aggregate_id), min(created_at)
               FROM projection_dead_letters WHERE projection = $1",
            &[(&projection, Type::TEXT)],
        )
        .await?;
    Ok(QueueDepth {
        messages: row.get::<_, i64>(0) as u64,
        groups: Some(row.get::<_, i64>(1) as u64),
        oldest: row.get(2),
    })
}

/// Up to `max` group heads of `projection`, oldest first.
pub(crate) async fn heads(
    client: &Client,
    projection: &str,
    max: usize,
) -> Result<Vec<DeadLetter>> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = client
        .query_typed(
            &format!(
                "SELECT {LETTER_COLUMNS} FROM (
                     SELECT DISTINCT ON (aggregate_id) {LETTER_COLUMNS}
                       FROM projection_dead_letters
                      WHERE projection = $1
                      ORDER BY aggregate_id, version) AS h
                  ORDER BY id
                  LIMIT $2"
            ),
            &[(&projection, Type::TEXT), (&max, Type::INT8)],
        )
        .await?;
    Ok(rows.iter().map(decode_letter).collect())
}

/// `aggregate_id`'s queued events in order (locked for update when asked).
pub(crate) async fn group_letters(
    client: &Client,
    projection: &str,
    aggregate_id: Uuid,
    for_update: bool,
) -> Result<Vec<DeadLetter>> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT {LETTER_COLUMNS} FROM projection_dead_letters
                  WHERE projection = $1 AND aggregate_id = $2
                  ORDER BY version {}",
                if for_update { "FOR UPDATE" } else { "" }
            ),
            &[(&projection, Type::TEXT), (&aggregate_id, Type::UUID)],
        )
        .await?;
    Ok(rows.iter().map(decode_letter).collect())
}

/// What [`remove_head`] did.
pub(crate) enum Removed {
    /// The head was removed; the next event of its group is the head now.
    Yes,
    /// Nothing by that id is queued (acknowledged already).
    Gone,
    /// An earlier event of its group is still queued.
    NotHead { aggregate_id: Uuid, event_id: Uuid },
}

/// Removes the queued event `id` if it is its group's head.
pub(crate) async fn remove_head(client: &Client, projection: &str, id: i64) -> Result<Removed> {
    let row = client
        .query_typed_opt(
            "WITH target AS (
                 SELECT d.id, d.aggregate_id, d.event_id,
                        NOT EXISTS (SELECT 1 FROM projection_dead_letters e
                                     WHERE e.projection = d.projection
                                       AND e.aggregate_id = d.aggregate_id
                                       AND e.version < d.version) AS is_head
                   FROM projection_dead_letters d
                  WHERE d.projection = $1 AND d.id = $2),
             removed AS (
                 DELETE FROM projection_dead_letters
                  WHERE id IN (SELECT id FROM target WHERE is_head)
              RETURNING id)
             SELECT aggregate_id, event_id, is_head FROM target",
            &[(&projection, Type::TEXT), (&id, Type::INT8)],
        )
        .await?;
    Ok(match row {
        None => Removed::Gone,
        Some(r) if r.get::<_, bool>(2) => Removed::Yes,
        Some(r) => Removed::NotHead {
            aggregate_id: r.get(0),
            event_id: r.get(1),
        },
    })
}

/// Records a new failure of the queued event `id`: it becomes (or stays)
/// the failed head, `attempts` more attempts, the last error.
pub(crate) async fn record_failure(
    client: &Client,
    id: i64,
    attempts: u32,
    error: &str,
) -> Result<()> {
    client
        .execute_typed(
            "UPDATE projection_dead_letters
                SET state = 'failed', attempts = attempts + $2, error = $3, updated_at = now()
              WHERE id = $1",
            &[
                (&id, Type::INT8),
                (&(attempts as i32), Type::INT4),
                (&error, Type::TEXT),
            ],
        )
        .await?;
    Ok(())
}
