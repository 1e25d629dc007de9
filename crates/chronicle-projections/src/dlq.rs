//! The sequenced dead-letter queue: list, retry, discard.
//!
//! When an event fails for good, it is queued as `failed` and every later
//! event of its aggregate is queued behind it as `parked`, in version order,
//! while other aggregates flow on. [`PgProjection::dlq_retry`] replays the
//! sequence in order through the handler; [`PgProjection::dlq_discard`]
//! drops the failed event and replays the rest.

use std::sync::Arc;

use chronicle_core::{Alert, Position};
use chronicle_postgres::PgPool;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::projection::Applied;
use crate::sql::{COLUMNS, Xid8, envelope};
use crate::{Error, PgContext, PgProjection, Result};

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

/// The dead letters of `projection` (of one aggregate when given), each
/// aggregate's in version order.
pub async fn list(
    pool: &PgPool,
    projection: &str,
    aggregate_id: Option<Uuid>,
) -> Result<Vec<DeadLetter>> {
    let client = pool.get().await?;
    let rows = client
        .query_typed(
            "SELECT id, projection, aggregate_id, event_id, event_type, version, transaction_id,
                    global_position, state, attempts, error, created_at, updated_at
               FROM projection_dead_letters
              WHERE projection = $1 AND ($2::uuid IS NULL OR aggregate_id = $2)
              ORDER BY aggregate_id, version",
            &[(&projection, Type::TEXT), (&aggregate_id, Type::UUID)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
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
        })
        .collect())
}

/// How many events `projection` has in the dead-letter queue.
pub async fn count(pool: &PgPool, projection: &str) -> Result<u64> {
    let client = pool.get().await?;
    let row = client
        .query_typed_one(
            "SELECT count(*) FROM projection_dead_letters WHERE projection = $1",
            &[(&projection, Type::TEXT)],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
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
        let conn = self.pool().get().await?;
        let mut ctx = PgContext::begin(conn, self.shared_name(), None, Arc::from("dlq")).await?;
        let mut alerts = Vec::new();
        let result = self
            .replay_in(&mut ctx, aggregate_id, discard_head, &mut alerts)
            .await;
        match result {
            Ok(report) => {
                ctx.commit().await?;
                self.send_alerts(&alerts).await;
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
        // Hold the aggregate's partition: waits for a running step, and
        // steps skip it until this transaction ends.
        let partition = ctx
            .client()
            .query_typed_opt(
                "SELECT s.partition FROM projection_state s
                  WHERE s.projection = $1
                    AND s.partition = chronicle_partition($2, s.partitions)
                    FOR UPDATE",
                &[(&name, Type::TEXT), (&aggregate_id, Type::UUID)],
            )
            .await?
            .ok_or_else(|| Error::NotRegistered(name.clone()))?;
        ctx.set_partition(Some(partition.get::<_, i32>(0) as u32));
        let letters = ctx
            .client()
            .query_typed(
                "SELECT id, event_id, state FROM projection_dead_letters
                  WHERE projection = $1 AND aggregate_id = $2
                  ORDER BY version
                    FOR UPDATE",
                &[(&name, Type::TEXT), (&aggregate_id, Type::UUID)],
            )
            .await?;
        if letters.is_empty() {
            return Err(Error::NoDeadLetters {
                projection: name,
                aggregate_id,
            });
        }
        let mut report = ReplayReport::default();
        for (i, letter) in letters.iter().enumerate() {
            let id: i64 = letter.get(0);
            let event_id: Uuid = letter.get(1);
            let failed = letter.get::<_, &str>(2) == "failed";
            if i == 0 && discard_head && failed {
                delete(ctx, id).await?;
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
                    delete(ctx, id).await?;
                    report.delivered.push(event_id);
                }
                Applied::Failed { attempts, error } => {
                    ctx.client()
                        .execute_typed(
                            "UPDATE projection_dead_letters
                                SET state = 'failed', attempts = attempts + $2, error = $3,
                                    updated_at = now()
                              WHERE id = $1",
                            &[
                                (&id, Type::INT8),
                                (&(attempts as i32), Type::INT4),
                                (&error, Type::TEXT),
                            ],
                        )
                        .await?;
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
                        (&partition.get::<_, i32>(0), Type::INT4),
                        (&(report.delivered.len() as i64), Type::INT8),
                    ],
                )
                .await?;
        }
        Ok(report)
    }
}

async fn delete(ctx: &PgContext, id: i64) -> Result<()> {
    ctx.client()
        .execute_typed(
            "DELETE FROM projection_dead_letters WHERE id = $1",
            &[(&id, Type::INT8)],
        )
        .await?;
    Ok(())
}
