//! `chronicle dlq show PROJECTION EVENT_ID`: one dead letter in full.

use anyhow::{Result, bail};
use chronicle_postgres::PgPool;
use chronicle_projections::{DeadLetter, DeadLetterState, dlq};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::OutputFormat;
use crate::commands::NotFound;
use crate::output::{event_json, outln, write_record, write_table};

fn state(letter: &DeadLetter) -> &'static str {
    match letter.state {
        DeadLetterState::Failed => "failed",
        DeadLetterState::Parked => "parked",
    }
}

fn letter_json(letter: &DeadLetter) -> Value {
    json!({
        "event_id": letter.event_id,
        "version": letter.version,
        "event_type": letter.event_type,
        "state": state(letter),
        "attempts": letter.attempts,
        "error": letter.error,
        "created_at": letter.created_at,
    })
}

/// Prints the dead letter of `projection` for `event_id`: its queue state,
/// attempts, error and timestamps, the event as stored (never decrypted:
/// encrypted fields stay envelopes) and the events parked behind it.
/// Exits 4 when the event is not in that projection's queue.
pub(crate) async fn show(
    pool: &PgPool,
    projection: &str,
    event_id: Uuid,
    format: OutputFormat,
) -> Result<()> {
    let Some(detail) = dlq::show(pool, projection, event_id).await? else {
        if chronicle_projections::load_state(pool, Some(projection))
            .await?
            .is_empty()
        {
            bail!(NotFound(format!(
                "no projection named `{projection}` has run against this database; \
                 `chronicle projections status` lists those that have"
            )));
        }
        bail!(NotFound(format!(
            "event {event_id} is not in the dead-letter queue of `{projection}` \
             (never dead-lettered, or already retried or discarded); \
             `chronicle dlq list {projection}` shows what is queued"
        )));
    };
    print(&detail, format)
}

/// [`show`] for a broker's dead-letter queue (`dead_letters:` in the
/// deployment YAML). Exits 4 when the queue does not hold the event.
pub(crate) async fn show_from_queue(
    queue: &dyn chronicle_core::MessageQueue,
    pool: &PgPool,
    projection: &str,
    event_id: Uuid,
    format: OutputFormat,
) -> Result<()> {
    let Some(detail) =
        chronicle_projections::queue_dlq::show(queue, pool, projection, event_id).await?
    else {
        bail!(NotFound(format!(
            "event {event_id} is not in the dead-letter queue `{}` of `{projection}` \
             (never dead-lettered, already retried or discarded, or behind a head on a broker \
             that cannot browse); `chronicle dlq list {projection}` shows what is queued",
            queue.name()
        )));
    };
    print(&detail, format)
}

fn print(detail: &chronicle_projections::DeadLetterDetail, format: OutputFormat) -> Result<()> {
    let letter = &detail.letter;
    let event = detail.event.as_ref().map(event_json);
    match format {
        OutputFormat::Json => {
            let value = json!({
                "projection": letter.projection,
                "event_id": letter.event_id,
                "aggregate_id": letter.aggregate_id,
                "event_type": letter.event_type,
                "version": letter.version,
                "position": letter.position.to_string(),
                "state": state(letter),
                "sequence": letter.id,
                "place_in_group": detail.place,
                "group_size": detail.group_size,
                "blocked_by": detail.blocked_by.as_ref().map(|h| h.event_id),
                "attempts": letter.attempts,
                "error": letter.error,
                "created_at": letter.created_at,
                "updated_at": letter.updated_at,
                "event": event,
                "parked_behind": detail.parked_behind.iter().map(letter_json).collect::<Vec<_>>(),
            });
            write_record(&value, format)?;
        }
        OutputFormat::Table => {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED);
            let time =
                |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
            let rows: Vec<(&str, String)> = vec![
                ("projection", letter.projection.clone()),
                ("event_id", letter.event_id.to_string()),
                ("aggregate_id", letter.aggregate_id.to_string()),
                ("event_type", letter.event_type.clone()),
                ("version", letter.version.to_string()),
                ("position", letter.position.to_string()),
                ("state", state(letter).to_owned()),
                (
                    "queue",
                    match &detail.blocked_by {
                        None => format!(
                            "head of its aggregate's group ({} queued)",
                            detail.group_size
                        ),
                        Some(head) => format!(
                            "{} of {} in its aggregate's group, behind {}",
                            detail.place, detail.group_size, head.event_id
                        ),
                    },
                ),
                ("attempts", letter.attempts.to_string()),
                ("error", letter.error.clone().unwrap_or_else(|| "-".into())),
                ("queued at", time(letter.created_at)),
                ("updated at", time(letter.updated_at)),
            ];
            for (k, v) in rows {
                table.add_row(vec![k.to_owned(), v]);
            }
            match &detail.event {
                Some(e) => {
                    table.add_row(vec!["aggregate_type".to_owned(), e.aggregate_type.clone()]);
                    table.add_row(vec!["timestamp".to_owned(), time(e.timestamp)]);
                    table.add_row(vec![
                        "event_data".to_owned(),
                        serde_json::to_string_pretty(&e.event_data)?,
                    ]);
                    table.add_row(vec![
                        "metadata".to_owned(),
                        e.metadata.to_json().to_string(),
                    ]);
                    if !e.encrypted_fields.is_empty() {
                        table.add_row(vec![
                            "encrypted_fields".to_owned(),
                            format!("{} (shown as stored)", e.encrypted_fields.join(", ")),
                        ]);
                    }
                }
                None => {
                    table.add_row(vec![
                        "event".to_owned(),
                        "not in the events table any more".to_owned(),
                    ]);
                }
            }
            write_table(&table)?;
            if detail.parked_behind.is_empty() {
                outln!("nothing is parked behind it")?;
            } else {
                let mut parked = Table::new();
                parked.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
                    "parked behind it",
                    "version",
                    "event_type",
                    "state",
                    "since",
                ]);
                for l in &detail.parked_behind {
                    parked.add_row(vec![
                        l.event_id.to_string(),
                        l.version.to_string(),
                        l.event_type.clone(),
                        state(l).to_owned(),
                        time(l.created_at),
                    ]);
                }
                write_table(&parked)?;
            }
        }
    }
    Ok(())
}
