//! A row of `events` as an [`EventEnvelope`].

use chronicle_core::{EventEnvelope, Position};
use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use crate::Xid8;
use crate::types::MetadataColumn;

/// The columns every read of `events` selects, in the order
/// [`decode_event`] decodes them.
pub const EVENT_COLUMNS: &str = "event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, \
                       version, timestamp, encrypted_fields, transaction_id, global_position";

/// Decodes a row of `events` selected with [`EVENT_COLUMNS`] (the store's reads and the projection step's).
pub fn decode_event(row: &Row) -> Result<EventEnvelope, tokio_postgres::Error> {
    let version: i32 = row.try_get(6)?;
    let timestamp: Option<DateTime<Utc>> = row.try_get(7)?;
    let encrypted: Option<Vec<String>> = row.try_get(8)?;
    let xid: Xid8 = row.try_get(9)?;
    Ok(EventEnvelope {
        event_id: row.try_get(0)?,
        aggregate_id: row.try_get(1)?,
        aggregate_type: row.try_get(2)?,
        event_type: row.try_get(3)?,
        event_data: row.try_get(4)?,
        metadata: row.try_get::<_, MetadataColumn>(5)?.0,
        version: u32::try_from(version).unwrap_or(0),
        timestamp: timestamp.unwrap_or_default(),
        encrypted_fields: encrypted.unwrap_or_default(),
        position: Position::new(xid.0, row.try_get(10)?),
    })
}
