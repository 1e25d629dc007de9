//! Aggregate snapshots on the `snapshots` table (migration 14):
//! [`SnapshotStore`] for [`PgEventStore`], and listing and dropping them
//! for `chronicle snapshots`.

use async_trait::async_trait;
use chronicle_core::{AggregateId, Snapshot, SnapshotLoad, SnapshotStore};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::types::JsonbText;
use crate::{Error, PgEventStore};
use chronicle_sql::decode_event;

/// The newest snapshot with the asked versions and the events after it, in
/// one statement: the snapshot's row (its state in column 12, NULL on
/// event rows) and the events, with the stored size of their data in
/// column 11. The tail's own `ORDER BY` makes it an index range scan of
/// `(aggregate_id, version)` in a generic plan too; an outer `ORDER BY`
/// over the union would not (the planner then estimates a third of the
/// aggregate's events and reads all of them). Readers check the order.
const LOAD_SNAPSHOT: &str = "\
SELECT NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, s.version, \
       NULL::timestamptz, NULL::text[], NULL::xid8, NULL::bigint, 0, s.state, s.created_at \
  FROM snapshots s \
 WHERE s.aggregate_id = $1 AND s.aggregate_type = $2 \
   AND s.schema_version = $3 AND s.upcaster_version = $4 \
UNION ALL \
(SELECT event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version, \
        timestamp, encrypted_fields, transaction_id, global_position, pg_column_size(event_data), \
        NULL::jsonb, NULL::timestamptz \
   FROM events \
  WHERE aggregate_id = $1 \
    AND version > coalesce((SELECT version FROM snapshots \
                             WHERE aggregate_id = $1 AND aggregate_type = $2 \
                               AND schema_version = $3 AND upcaster_version = $4), 0) \
  ORDER BY version)";

/// Stores a snapshot unless the aggregate's own data subject (its id, the
/// default subject) is shredded, replacing an older snapshot or one of
/// other versions. `FOR SHARE` on the subject's row orders the write with
/// a shred (which locks it `FOR UPDATE`): a write waiting for a shred sees
/// its tombstone and stores nothing; a shred waiting for a write deletes
/// what it stored.
const SAVE_SNAPSHOT: &str = "\
WITH subject AS (SELECT shredded_at FROM chronicle_key_subjects \
                  WHERE subject = $1::text FOR SHARE) \
INSERT INTO snapshots (aggregate_id, aggregate_type, version, schema_version, upcaster_version, state) \
SELECT $1, $2, $3, $4, $5, $6 \
 WHERE NOT EXISTS (SELECT 1 FROM subject WHERE shredded_at IS NOT NULL) \
ON CONFLICT (aggregate_id) DO UPDATE \
   SET aggregate_type = EXCLUDED.aggregate_type, version = EXCLUDED.version, \
       schema_version = EXCLUDED.schema_version, upcaster_version = EXCLUDED.upcaster_version, \
       state = EXCLUDED.state, created_at = now() \
 WHERE snapshots.version < EXCLUDED.version \
    OR snapshots.schema_version <> EXCLUDED.schema_version \
    OR snapshots.upcaster_version <> EXCLUDED.upcaster_version";

/// One stored snapshot, without its state: what `chronicle snapshots list`
/// shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// Its type.
    pub aggregate_type: String,
    /// The version of the last event folded into the snapshot.
    pub version: u32,
    /// The aggregate's `SNAPSHOT_VERSION` when it was written.
    pub schema_version: u32,
    /// The upcaster chain's version when it was written.
    pub upcaster_version: u32,
    /// The stored size of the state, in bytes.
    pub state_bytes: u64,
    /// The aggregate's current version (its last event's).
    pub aggregate_version: u32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl PgEventStore {
    /// Sends `sql` prepared when the store caches statements (and again
    /// unnamed if a pooler lost it), and collects its rows.
    async fn snapshot_query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, Error> {
        loop {
            let client = self.pool().get().await?;
            let cached = self.caches_statements();
            let result = crate::Statements::new(cached)
                .query_raw(&client, sql, params)
                .await;
            let rows = match result {
                Ok(rows) => rows,
                Err(e) if cached && self.lost_prepared_statement(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            return Ok(rows.try_collect().await?);
        }
    }

    /// The stored snapshots, oldest aggregate id first, of one aggregate
    /// type or of all; with each aggregate's current version, so a stale
    /// snapshot shows.
    ///
    /// ```no_run
    /// # async fn demo(store: chronicle_postgres::PgEventStore) -> Result<(), chronicle_postgres::Error> {
    /// for s in store.list_snapshots(Some("account")).await? {
    ///     println!("{} at {} of {}", s.aggregate_id, s.version, s.aggregate_version);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_snapshots(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, Error> {
        let client = self.pool().get().await?;
        let rows = client
            .query_typed(
                "SELECT s.aggregate_id, s.aggregate_type, s.version, s.schema_version, \
                        s.upcaster_version, pg_column_size(s.state)::bigint, \
                        (SELECT coalesce(max(e.version), 0) FROM events e \
                          WHERE e.aggregate_id = s.aggregate_id), s.created_at \
                   FROM snapshots s \
                  WHERE $1::text IS NULL OR s.aggregate_type = $1 \
                  ORDER BY s.aggregate_id",
                &[(&aggregate_type, Type::TEXT)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SnapshotInfo {
                aggregate_id: r.get(0),
                aggregate_type: r.get(1),
                version: to_u32(i64::from(r.get::<_, i32>(2))),
                schema_version: to_u32(r.get(3)),
                upcaster_version: to_u32(r.get(4)),
                state_bytes: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
                aggregate_version: to_u32(i64::from(r.get::<_, i32>(6))),
                created_at: r.get(7),
            })
            .collect())
    }

    /// Deletes the snapshots of every aggregate of `aggregate_type`;
    /// returns how many there were. Repositories fold those aggregates from
    /// their first event until a command stores a new snapshot.
    pub async fn drop_snapshots_of_type(&self, aggregate_type: &str) -> Result<u64, Error> {
        let client = self.pool().get().await?;
        Ok(client
            .execute_typed(
                "DELETE FROM snapshots WHERE aggregate_type = $1",
                &[(&aggregate_type, Type::TEXT)],
            )
            .await?)
    }
}

#[async_trait]
impl SnapshotStore for PgEventStore {
    async fn load_snapshot(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        schema_version: u32,
        upcaster_version: u32,
    ) -> chronicle_core::Result<SnapshotLoad> {
        let (schema, upcaster) = (i64::from(schema_version), i64::from(upcaster_version));
        let rows = self
            .snapshot_query(
                LOAD_SNAPSHOT,
                &[
                    (&aggregate_id, Type::UUID),
                    (&aggregate_type, Type::TEXT),
                    (&schema, Type::INT8),
                    (&upcaster, Type::INT8),
                ],
            )
            .await?;
        let mut load = SnapshotLoad {
            tail: Vec::with_capacity(rows.len()),
            ..SnapshotLoad::default()
        };
        for row in &rows {
            let state: Option<serde_json::Value> = row.try_get(12).map_err(Error::from)?;
            match state {
                Some(state) => {
                    let version: i32 = row.try_get(6).map_err(Error::from)?;
                    load.snapshot = Some(Snapshot {
                        aggregate_id,
                        aggregate_type: aggregate_type.to_owned(),
                        version: to_u32(i64::from(version)),
                        schema_version,
                        upcaster_version,
                        state,
                        created_at: row.try_get(13).map_err(Error::from)?,
                    });
                }
                None => {
                    let bytes: i32 = row.try_get(11).map_err(Error::from)?;
                    load.tail_bytes += u64::try_from(bytes).unwrap_or(0);
                    load.tail.push(decode_event(row).map_err(Error::from)?);
                }
            }
        }
        // A parallel plan could interleave the branches' rows.
        if !load.tail.is_sorted_by_key(|e| e.version) {
            load.tail.sort_by_key(|e| e.version);
        }
        Ok(load)
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> chronicle_core::Result<()> {
        let version = i32::try_from(snapshot.version).unwrap_or(i32::MAX);
        let schema = i64::from(snapshot.schema_version);
        let upcaster = i64::from(snapshot.upcaster_version);
        let state = JsonbText(snapshot.state.to_string());
        let params: [(&(dyn ToSql + Sync), Type); 6] = [
            (&snapshot.aggregate_id, Type::UUID),
            (&snapshot.aggregate_type, Type::TEXT),
            (&version, Type::INT4),
            (&schema, Type::INT8),
            (&upcaster, Type::INT8),
            (&state, Type::JSONB),
        ];
        let result: Result<(), Error> = async {
            loop {
                let client = self.pool().get().await?;
                let cached = self.caches_statements();
                match crate::Statements::new(cached)
                    .execute(&client, SAVE_SNAPSHOT, &params)
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) if cached && self.lost_prepared_statement(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(
                aggregate_id = %snapshot.aggregate_id,
                version = snapshot.version,
                error = %e,
                "could not store a snapshot; loads fold the events instead"
            );
        }
        Ok(result?)
    }

    async fn delete_snapshots(&self, aggregate_id: AggregateId) -> chronicle_core::Result<u64> {
        let client = self.pool().get().await.map_err(Error::from)?;
        Ok(client
            .execute_typed(
                "DELETE FROM snapshots WHERE aggregate_id = $1",
                &[(&aggregate_id, Type::UUID)],
            )
            .await
            .map_err(Error::from)?)
    }
}

/// Deletes, inside a shredding's transaction, the snapshots that may hold
/// the subject's fields in clear: the snapshot of the aggregate whose id is
/// the subject (the default subject), and of every aggregate with an event
/// encrypted under one of `keys` (the subject's keys, just destroyed). The
/// second part reads the encrypted events of snapshotted aggregates; shreds
/// are rare, and a snapshot must not outlive the key.
pub(crate) async fn delete_for_shred(
    tx: &impl GenericClient,
    subject: &str,
    keys: &[Uuid],
) -> Result<u64, tokio_postgres::Error> {
    tx.execute_typed(
        "DELETE FROM snapshots s \
          WHERE s.aggregate_id::text = $1 \
             OR (cardinality($2::uuid[]) > 0 AND EXISTS ( \
                 SELECT 1 FROM events e, unnest(e.encrypted_fields) AS f(pointer) \
                  WHERE e.aggregate_id = s.aggregate_id AND e.encrypted_fields IS NOT NULL \
                    AND e.event_data #> chronicle_pointer_path(f.pointer) ->> 'kid' \
                        = ANY($2::uuid[]::text[])))",
        &[(&subject, Type::TEXT), (&keys, Type::UUID_ARRAY)],
    )
    .await
}
