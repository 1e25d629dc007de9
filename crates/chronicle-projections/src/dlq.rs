//! The sequenced dead-letter queue: list, show, retry, discard.
//!
//! When an event fails for good, it is queued as `failed` and every later
//! event of its aggregate is queued behind it as `parked`, in version order,
//! while other aggregates flow on. [`PgProjection::dlq_retry`] replays the
//! sequence in order through the handler; [`PgProjection::dlq_discard`]
//! drops the failed event and replays the rest. The queue is a
//! [`chronicle_core::MessageQueue`] ([`crate::PgDeadLetterQueue`]: one
//! queue per projection, one group per aggregate); these operator functions
//! use its group primitives inside their own transactions.

use chronicle_core::{Alert, EventEnvelope, Position};
use chronicle_postgres::PgPool;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::queue::{
    LETTER_COLUMNS, Removed, group_letters, lock_groups, queue_depth, record_failure, remove_head,
};
use crate::sql::{COLUMNS, Xid8, envelope};
use crate::{Error, PgContext, PgProjection, Result};
use chronicle_step::Applied;

/// Why an event is in the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterState {
    /// The handler failed on it (after its retries).
    Failed,
    /// An earlier event of its aggregate failed; it waits behind it.
    Parked,
}

/// One event in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The queue's sequence number.
    pub id: i64,
    /// The projection.
    pub projection: String,
    /// The event's aggregate.
    pub aggregate_id: Uuid,
    /// The event.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The event's version in its aggregate.
    pub version: u32,
    /// The event's feed position.
    pub position: Position,
    /// Failed or parked.
    pub state: DeadLetterState,
    /// Attempts made (0 for a parked event).
    pub attempts: u32,
    /// The last error (failed events).
    pub error: Option<String>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// What a dead-letter retry or discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Events delivered to the handler and removed from the queue, in order.
    pub delivered: Vec<Uuid>,
    /// Events dropped without delivery (discard).
    pub discarded: Vec<Uuid>,
    /// Events still queued (after a new failure).
    pub remaining: u32,
    /// The failure that stopped the replay, if any.
    pub error: Option<String>,
}

/// One dead letter in full ([`show`]): the queue row, where it stands in
/// its group, the event as stored, and what waits behind it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetterDetail {
    /// The queue row.
    pub letter: DeadLetter,
    /// Its place in its aggregate's group, 1 for the head.
    pub place: u32,
    /// How many events the group holds.
    pub group_size: u32,
    /// The group's head when this event is parked behind it.
    pub blocked_by: Option<DeadLetter>,
    /// The event as stored in the events table (encrypted fields stay
    /// envelopes); `None` when the event is no longer stored.
    pub event: Option<EventEnvelope>,
    /// The events of the group after this one, in order.
    pub parked_behind: Vec<DeadLetter>,
}

/// Decodes a row of [`LETTER_COLUMNS`].
pub(crate) fn decode_letter(r: &Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        projection: r.get(1),
        aggregate_id: r.get(2),
        event_id: r.get(3),
        event_type: r.get(4),
        version: r.get::<_, i32>(5) as u32,
        position: Position::new(r.get::<_, Xid8>(6).0, r.get(7)),
        state: if r.get::<_, &str>(8) == "failed" {
            DeadLetterState::Failed
        } else {
            DeadLetterState::Parked
        },
        attempts: r.get::<_, i32>(9) as u32,
        error: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
    }
}

/// The dead letters of `projection` (of one aggregate when given), each
/// aggregate's in version order.
pub async fn list(
    pool: &PgPool,
    projection: &str,
    aggregate_id: Option<Uuid>,
) -> Result<Vec<DeadLetter>> {
    let client = pool.get().await?;
    if let Some(aggregate_id) = aggregate_id {
        return group_letters(&client, projection, aggregate_id, false).await;
    }
    let rows = client
        .query_typed(
            &format!(
                "SELECT {LETTER_COLUMNS} FROM projection_dead_letters
                  WHERE projection = $1
                  ORDER BY aggregate_id, version"
            ),
            &[(&projection, Type::TEXT)],
        )
        .await?;
    Ok(rows.iter().map(decode_letter).collect())
}

/// How many events `projection` has in the dead-letter queue (its
/// [`chronicle_core::MessageQueue::depth`]).
pub async fn count(pool: &PgPool, projection: &str) -> Result<u64> {
    let client = pool.get().await?;
    let depth = queue_depth(&client, projection).await?;
    Ok(depth.messages)
}

/// The dead letter of `projection` for `event_id` in full, or `None` when
/// that event is not in the projection's dead-letter queue. Reads the event
/// as stored (payload untouched: encrypted fields stay envelopes).
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool, event_id: uuid::Uuid) -> chronicle_projections::Result<()> {
/// if let Some(detail) = chronicle_projections::dlq::show(&pool, "user-profile", event_id).await? {
///     println!("{} of {} in its group; {} parked behind", detail.place, detail.group_size,
///              detail.parked_behind.len());
/// }
/// # Ok(()) }
/// ```
pub async fn show(
    pool: &PgPool,
    projection: &str,
    event_id: Uuid,
) -> Result<Option<DeadLetterDetail>> {
    let client = pool.get().await?;
    let aggregate = client
        .query_typed_opt(
            "SELECT aggregate_id FROM projection_dead_letters WHERE projection = $1 AND event_id = $2",
            &[(&projection, Type::TEXT), (&event_id, Type::UUID)],
        )
        .await?;
    let Some(aggregate) = aggregate else {
        return Ok(None);
    };
    let group = group_letters(&client, projection, aggregate.get(0), false).await?;
    let Some(index) = group.iter().position(|l| l.event_id == event_id) else {
        // Acknowledged in between.
        return Ok(None);
    };
    let event = client
        .query_typed_opt(
            &format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"),
            &[(&event_id, Type::UUID)],
        )
        .await?
        .map(|row| envelope(&row))
        .transpose()?;
    Ok(Some(DeadLetterDetail {
        letter: group[index].clone(),
        place: index as u32 + 1,
        group_size: group.len() as u32,
        blocked_by: (index > 0).then(|| group[0].clone()),
        event,
        parked_behind: group[index + 1..].to_vec(),
    }))
}

impl PgProjection {
    /// Replays `aggregate_id`'s dead letters in version order through the
    /// handler (with the retry policy), removing each one delivered. A new
    /// failure stops the replay: that event becomes the failed head and the
    /// rest stay parked. Runs in one transaction that holds the aggregate's
    /// partition, so no step of that partition runs meanwhile.
    pub async fn dlq_retry(&self, aggregate_id: Uuid) -> Result<ReplayReport> {
        self.replay(aggregate_id, false).await
    }

    /// Drops `aggregate_id`'s failed event without delivering it, then
    /// replays the events parked behind it as [`PgProjection::dlq_retry`]
    /// does.
    pub async fn dlq_discard(&self, aggregate_id: Uuid) -> Result<ReplayReport> {
        self.replay(aggregate_id, true).await
    }

    async fn replay(&self, aggregate_id: Uuid, discard_head: bool) -> Result<ReplayReport> {
        // The handler runs: in the read model's schema, if it has one.
        let mut ctx = self.context(None, "dlq").await?;
        let mut alerts = Vec::new();
        let result = self
            .replay_in(&mut ctx, aggregate_id, discard_head, &mut alerts)
            .await;
        match result {
            Ok(report) => {
                ctx.commit().await?;
                self.portable().send_alerts(&alerts).await;
                Ok(report)
            }
            Err(e) => {
                ctx.rollback().await;
                Err(e)
            }
        }
    }

    async fn replay_in(
        &self,
        ctx: &mut PgContext,
        aggregate_id: Uuid,
        discard_head: bool,
        alerts: &mut Vec<Alert>,
    ) -> Result<ReplayReport> {
        let name = self.name().to_owned();
        // Hold the aggregate's partition (the queue's group lock): waits
        // for a running step, and steps skip it until this transaction ends.
        let partition = lock_groups(ctx.client(), &name, &[aggregate_id]).await?[0];
        ctx.set_partition(Some(partition));
        let letters = group_letters(ctx.client(), &name, aggregate_id, true).await?;
        if letters.is_empty() {
            return Err(Error::NoDeadLetters {
                projection: name,
                aggregate_id,
            });
        }
        let mut report = ReplayReport::default();
        for (i, letter) in letters.iter().enumerate() {
            let (id, event_id) = (letter.id, letter.event_id);
            let failed = letter.state == DeadLetterState::Failed;
            if i == 0 && discard_head && failed {
                ack_head(ctx, &name, id).await?;
                report.discarded.push(event_id);
                continue;
            }
            let event = ctx
                .client()
                .query_typed_opt(
                    &format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"),
                    &[(&event_id, Type::UUID)],
                )
                .await?
                .ok_or(Error::EventMissing { event_id })?;
            let event = envelope(&event)?;
            match self.apply(ctx, &event, None).await? {
                Applied::Handled { .. } => {
                    ack_head(ctx, &name, id).await?;
                    report.delivered.push(event_id);
                }
                Applied::Failed { attempts, error } => {
                    record_failure(ctx.client(), id, attempts, &error).await?;
                    alerts.push(Alert::DeadLettered {
                        projection: name.clone(),
                        event_id,
                        aggregate_id,
                        version: event.version,
                        attempts,
                        error: error.clone(),
                    });
                    report.remaining = (letters.len() - i) as u32;
                    report.error = Some(error);
                    break;
                }
            }
        }
        if !report.delivered.is_empty() || !report.discarded.is_empty() {
            ctx.client()
                .execute_typed(
                    "UPDATE projection_state
                        SET events_processed = events_processed + $3, updated_at = now()
                      WHERE projection = $1 AND partition = $2",
                    &[
                        (&name, Type::TEXT),
                        (&(partition as i32), Type::INT4),
                        (&(report.delivered.len() as i64), Type::INT8),
                    ],
                )
                .await?;
        }
        Ok(report)
    }
}

/// Removes the group's head `id` (the queue's ack, in the replay's
/// transaction; the rows are locked, so it is the head).
async fn ack_head(ctx: &PgContext, projection: &str, id: i64) -> Result<()> {
    match remove_head(ctx.client(), projection, id).await? {
        Removed::Yes | Removed::Gone => Ok(()),
        Removed::NotHead { event_id, .. } => Err(Error::Config {
            option: "dead letter",
            reason: format!(
                "{event_id} is no longer its group's head (another replay ran meanwhile); run the replay again"
            ),
        }),
    }
}
