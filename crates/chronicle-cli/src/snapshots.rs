//! `chronicle snapshots list|rebuild|drop`: the `snapshots` table.
//!
//! The CLI does not know the aggregates' Rust types, so it cannot fold
//! their events into state: `rebuild` deletes the selected snapshots, and
//! the application's `Repository` stores new ones by each aggregate's
//! policy (or at once with `Repository::rebuild_snapshot`).

use anyhow::Result;
use chronicle_core::SnapshotStore;
use clap::{Args, Subcommand};
use serde_json::json;
use uuid::Uuid;

use crate::Database;
use crate::commands::{NotFound, UsageError};
use crate::output::{OutputFormat, write_json_lines, write_record, write_table};

/// `chronicle snapshots` arguments.
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// What to do.
    #[command(subcommand)]
    action: SnapshotsCommand,
}

/// Which snapshots: one aggregate's, or every one of a type.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// The aggregate whose snapshot to delete.
    aggregate_id: Option<Uuid>,
    /// Every snapshot of this aggregate type.
    #[arg(long)]
    aggregate_type: Option<String>,
}

/// `chronicle snapshots` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// Stored snapshots: aggregate, type, version (and the aggregate's
    /// current one), schema and upcaster versions, size, when.
    #[command(after_help = "Examples:
  chronicle snapshots list
  chronicle snapshots list --aggregate-type account --output json")]
    List {
        /// Only snapshots of this aggregate type.
        #[arg(long)]
        aggregate_type: Option<String>,
    },
    /// Makes the application rebuild snapshots: the CLI cannot fold events
    /// without the aggregate's Rust type, so it deletes the selected
    /// snapshots, and the application's Repository stores new ones on the
    /// next command its policy finds due (or at once through
    /// Repository::rebuild_snapshot). Until then loads fold every event.
    /// Exit code 4 when the aggregate has no snapshot.
    #[command(after_help = "Examples:
  chronicle snapshots rebuild 0193a1b2-0000-7000-8000-000000000001
  chronicle snapshots rebuild --aggregate-type account --output json")]
    Rebuild(Selection),
    /// Deletes snapshots; loads fold every event until a command stores a
    /// new one. Exit code 4 when the aggregate has no snapshot.
    #[command(after_help = "Examples:
  chronicle snapshots drop 0193a1b2-0000-7000-8000-000000000001
  chronicle snapshots drop --aggregate-type account --output json")]
    Drop(Selection),
}

/// Runs `chronicle snapshots`.
pub async fn run(db: &Database, args: SnapshotsArgs, format: OutputFormat) -> Result<()> {
    let store = db.store().await?;
    match args.action {
        SnapshotsCommand::List { aggregate_type } => {
            let list = store.list_snapshots(aggregate_type.as_deref()).await?;
            match format {
                OutputFormat::Json => write_json_lines(list.iter().map(|s| json!(s)))?,
                OutputFormat::Table => {
                    let mut table = comfy_table::Table::new();
                    table
                        .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                        .set_header(vec![
                            "aggregate",
                            "type",
                            "version",
                            "of",
                            "schema",
                            "upcaster",
                            "bytes",
                            "created",
                        ]);
                    for s in &list {
                        table.add_row(vec![
                            s.aggregate_id.to_string(),
                            s.aggregate_type.clone(),
                            s.version.to_string(),
                            s.aggregate_version.to_string(),
                            s.schema_version.to_string(),
                            s.upcaster_version.to_string(),
                            s.state_bytes.to_string(),
                            s.created_at.to_rfc3339(),
                        ]);
                    }
                    write_table(&table)?;
                }
            }
        }
        SnapshotsCommand::Rebuild(selection) => {
            let dropped = drop(&store, &selection).await?;
            write_record(
                &json!({
                    "dropped": dropped,
                    "rebuilt_by": "the application's Repository, on the next command its snapshot policy finds due",
                }),
                format,
            )?;
        }
        SnapshotsCommand::Drop(selection) => {
            let dropped = drop(&store, &selection).await?;
            write_record(&json!({ "dropped": dropped }), format)?;
        }
    }
    Ok(())
}

async fn drop(store: &chronicle_postgres::PgEventStore, selection: &Selection) -> Result<u64> {
    match (selection.aggregate_id, &selection.aggregate_type) {
        (Some(id), None) => match store.delete_snapshots(id).await? {
            0 => Err(NotFound(format!("no snapshot of aggregate {id}")).into()),
            n => Ok(n),
        },
        (None, Some(ty)) => Ok(store.drop_snapshots_of_type(ty).await?),
        _ => Err(UsageError("give an AGGREGATE_ID or --aggregate-type".into()).into()),
    }
}
