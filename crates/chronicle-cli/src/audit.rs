//! `chronicle audit`: the hash-chained audit log of field encryption.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chronicle_core::TimeRange;
use chronicle_crypto::{AuditOperation, AuditOutcome, AuditRecord, ChainHead, SubjectId};
use chronicle_postgres::{AuditQuery, PgAuditSink};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::json;
use uuid::Uuid;

use crate::Database;
use crate::commands::UsageError;
use crate::output::{OutputFormat, write_json_lines, write_record, write_table};
use crate::ui::{note, notice};

/// `chronicle audit` arguments.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    action: AuditCommand,
}

/// `chronicle audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first; every filter given must match.
    #[command(after_help = "Examples:
  chronicle audit list --subject 0193a1b2-0000-7000-8000-000000000001
  chronicle audit list --operation decrypt --from 2026-01-01T00:00:00Z --output json")]
    List {
        /// Only this subject's records.
        #[arg(long)]
        subject: Option<String>,
        /// Only this operation: encrypt, decrypt, reencrypt, create-key,
        /// rotate, rewrap, shred.
        #[arg(long)]
        operation: Option<String>,
        /// Only this outcome: success, denied, shredded, failed.
        #[arg(long)]
        outcome: Option<String>,
        /// Only records covering this event.
        #[arg(long)]
        event_id: Option<Uuid>,
        /// Only this actor's records.
        #[arg(long)]
        actor: Option<String>,
        /// From this time (inclusive, RFC 3339).
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// Until this time (exclusive, RFC 3339).
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        /// Records after this id (to page on).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Link the committed records not in a chain yet into it (writers
    /// store records unlinked; a sealer links them after commit, and
    /// `list` and `verify` seal first), after deriving the `encrypt`
    /// records of newly committed encrypted events.
    #[command(after_help = "Examples:
  chronicle audit seal")]
    Seal,
    /// Seal, then check every hash chain of the log: edited, deleted,
    /// inserted and re-linked rows, rows cut from the end, unlinked rows
    /// planted below the sealer's horizon; exits 1 if anything is wrong.
    #[command(after_help = "Examples:
  chronicle audit verify
  chronicle audit verify --anchor audit-anchor.json --save-anchor audit-anchor.json")]
    Verify {
        /// Also check against chain heads saved earlier outside the
        /// database (a file written by --save-anchor): catches a log
        /// rewritten or cut together with its head rows.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
        /// Save the verified chain heads to this file, to pass to
        /// --anchor later (keep it outside the database's reach).
        #[arg(long, value_name = "FILE")]
        save_anchor: Option<PathBuf>,
    },
}

/// How long `audit seal|list|verify` wait for open transactions that
/// hold the sealer's horizon back.
const SEAL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The audit log is not intact (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error(
    "the audit log is not intact: {0} problem(s) found, listed above; keep the database for \
     investigation, restore the log from a backup to continue, and compare against a saved \
     anchor (`chronicle audit verify --anchor FILE`) to rule out a truncated tail"
)]
pub struct Tampered(pub usize);

/// Seals the audit records a command wrote (key operations, upcasting
/// with a keyring): a short-lived process has no background sealer, so
/// without this its records would wait for the next seal anywhere. Best
/// effort: the command's work is done, and a failure is only reported.
pub async fn seal_written(db: &Database) {
    let sealed = async {
        let pool = db.store().await?.pool().clone();
        anyhow::Ok(PgAuditSink::new(pool).seal().await?)
    };
    if let Err(e) = sealed.await {
        notice!(
            "warning: the audit records just written are not sealed yet ({e:#}); \
             `chronicle audit seal` links them"
        );
    }
}

/// Runs `chronicle audit`.
pub async fn run(db: &Database, args: AuditArgs, format: OutputFormat) -> Result<()> {
    let pool = db.store().await?.pool().clone();
    let audit = PgAuditSink::new(pool);
    match args.action {
        AuditCommand::List {
            subject,
            operation,
            outcome,
            event_id,
            actor,
            from,
            to,
            after,
            limit,
        } => {
            let query = AuditQuery {
                subject: subject.map(SubjectId::new),
                operation: operation
                    .map(|o| o.parse::<AuditOperation>())
                    .transpose()
                    .map_err(|e| UsageError(format!("--operation: {e}")))?,
                outcome: outcome
                    .map(|o| o.parse::<AuditOutcome>())
                    .transpose()
                    .map_err(|e| UsageError(format!("--outcome: {e}")))?,
                event_id,
                actor,
                range: TimeRange { from, to },
                after_id: after,
                limit,
            };
            audit.seal_all(SEAL_WAIT).await?;
            let records = audit.list(&query).await?;
            write_records(&records, format)?;
            if format == OutputFormat::Table {
                note!("{} record(s)", records.len());
                if records.len() == limit
                    && let Some(last) = records.last()
                {
                    note!("more: --after {}", last.id);
                }
            }
        }
        AuditCommand::Seal => {
            let (sealed, unsealed) = audit.seal_all(SEAL_WAIT).await?;
            write_record(&json!({ "sealed": sealed, "unsealed": unsealed }), format)?;
        }
        AuditCommand::Verify {
            anchor,
            save_anchor,
        } => {
            audit.seal_all(SEAL_WAIT).await?;
            let report = match &anchor {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let heads: BTreeMap<u16, ChainHead> =
                        serde_json::from_str(&text).map_err(|e| {
                            UsageError(format!(
                                "{} is not an anchor file written by --save-anchor: {e}",
                                path.display()
                            ))
                        })?;
                    audit.verify_against(&heads).await?
                }
                None => audit.verify().await?,
            };
            let rows_per_chain: BTreeMap<String, usize> = report
                .chains
                .iter()
                .filter(|c| c.rows > 0)
                .map(|c| (c.chain.to_string(), c.rows))
                .collect();
            let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
            write_record(
                &json!({
                    "intact": report.is_intact(),
                    "rows_checked": report.checked,
                    "chains": report.chains.len(),
                    "rows_per_chain": rows_per_chain,
                    "checked_against_anchor": anchor.is_some(),
                    "unsealed": report.unsealed,
                    "problems": problems,
                }),
                format,
            )?;
            if format == OutputFormat::Table {
                for p in &problems {
                    notice!("problem: {p}");
                }
                if report.unsealed > 0 {
                    note!(
                        "{} record(s) are not sealed yet, so not checked: an open transaction \
                         older than them holds the sealer back (`chronicle status` shows the \
                         oldest); run `chronicle audit verify` again once it has ended",
                        report.unsealed
                    );
                }
            }
            if !report.is_intact() {
                bail!(Tampered(report.problems.len()));
            }
            if let Some(path) = save_anchor {
                let text = serde_json::to_string_pretty(&report.heads())?;
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                note!(
                    "chain heads saved to {}; verify against them later with --anchor",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

fn write_records(records: &[AuditRecord], format: OutputFormat) -> Result<()> {
    match format {
        OutputFormat::Json => {
            let rows = records
                .iter()
                .map(serde_json::to_value)
                .collect::<serde_json::Result<Vec<_>>>()?;
            write_json_lines(rows)?;
        }
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "id",
                    "chain:seq",
                    "at",
                    "operation",
                    "outcome",
                    "subject",
                    "key",
                    "events",
                    "fields",
                    "actor",
                    "purpose",
                ]);
            for r in records {
                let e = &r.entry;
                let events = match e.event_ids.as_slice() {
                    [] => "-".to_owned(),
                    [one] => one.to_string(),
                    many => format!("{} events", many.len()),
                };
                table.add_row(vec![
                    r.id.to_string(),
                    if r.sealed {
                        format!("{}:{}", r.chain, r.seq)
                    } else {
                        "unsealed".into()
                    },
                    e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                    e.operation.to_string(),
                    e.outcome.to_string(),
                    e.subject
                        .as_ref()
                        .map_or_else(|| "-".into(), ToString::to_string),
                    e.key_id
                        .map_or_else(|| "-".into(), |k| short(&k.to_string())),
                    events,
                    if e.fields.is_empty() {
                        "-".into()
                    } else {
                        e.fields.join(" ")
                    },
                    e.actor.clone(),
                    e.purpose.clone(),
                ]);
            }
            write_table(&table)?;
        }
    }
    Ok(())
}

/// The last 12 characters of a UUID: enough to tell keys apart in a table.
fn short(id: &str) -> String {
    format!("…{}", &id[id.len().saturating_sub(12)..])
}
