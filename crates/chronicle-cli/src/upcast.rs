//! `chronicle upcast plan|run|verify|rollback|status`: eager schema
//! migrations of stored events, from declarative YAML and Rust upcasters; and the
//! upcasting step of `chronicle demo`.
//!
//! Definitions come from `--config PATH` (default `./upcasters.yaml`, or
//! `$CHRONICLE_UPCASTERS`), in the format `chronicle_upcast::UpcastConfig`
//! reads, chained with the Rust upcasters of the binary's
//! [`Registry`](crate::Registry).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chronicle_postgres::PgEventStore;
use chronicle_upcast::{
    CryptoFieldCipher, DEFAULT_BATCH_SIZE, Mode, PgUpcaster, PlanEntry, RunError, RunInfo,
    RunStatus, UpcastConfig, UpcasterChain, VerifyReport,
};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::commands::{NotFound, UsageError};
use crate::output::{OutputFormat, outln, write_json_lines, write_table, write_text};
use crate::ui::note;
use crate::{Database, Registry};

/// Where the upcaster definitions are read from by default.
pub const DEFAULT_CONFIG: &str = "upcasters.yaml";

/// `chronicle upcast` arguments.
#[derive(Debug, Args)]
pub struct UpcastArgs {
    /// What to do.
    #[command(subcommand)]
    action: UpcastCommand,
}

/// Where the definitions are.
#[derive(Debug, Args)]
struct ConfigArg {
    /// The YAML file with the upcasters (`upcasters:` list, optional
    /// `default_mode` and per-type `modes`) [default: upcasters.yaml; may
    /// be absent when the binary carries Rust upcasters]
    #[arg(long, value_name = "PATH", env = "CHRONICLE_UPCASTERS")]
    config: Option<PathBuf>,
}

/// `chronicle upcast` subcommands.
#[derive(Debug, Subcommand)]
enum UpcastCommand {
    /// Per migration: how many stored events it touches and one event
    /// before and after (a dry run: writes nothing).
    #[command(after_help = "Examples:
  chronicle upcast plan
  chronicle upcast plan --config migrations/upcasters.yaml --output json")]
    Plan {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Rewrite every event of every eager migration to the newest version
    /// of its type, in batches, backing up each original. Resumable: after
    /// Ctrl-C or a crash, run it again and it continues where it stopped.
    #[command(after_help = "Examples:
  chronicle upcast run --check
  chronicle upcast run --batch-size 500 --keyring keyring.yaml")]
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Events per batch (one transaction each).
        #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        /// Upcast and validate every matching event first, without
        /// writing, so a bad event stops the run before any batch commits.
        #[arg(long)]
        check: bool,
        /// A local keyring file (JSON or YAML, as `LocalKeyring` writes;
        /// default: $CHRONICLE_KEYRING, a keyring document or a path):
        /// encrypted fields are decrypted, upcast and re-encrypted under
        /// their subject's current data key, audited. Needed when matching
        /// events hold encrypted fields.
        #[arg(long, value_name = "PATH")]
        keyring: Option<PathBuf>,
    },
    /// Compare runs' backups with the store: counts and checksums.
    #[command(after_help = "Examples:
  chronicle upcast verify
  chronicle upcast verify 0193a1b2-0000-7000-8000-0000000000c1 --keyring keyring.yaml")]
    Verify {
        /// The runs (default: every run).
        run_ids: Vec<Uuid>,
        #[command(flatten)]
        config: ConfigArg,
        /// The keyring the run used (default: $CHRONICLE_KEYRING): events
        /// with encrypted fields are then compared as plaintext
        /// (re-encryption never gives the same ciphertext twice).
        /// Decryptions are audited.
        #[arg(long, value_name = "PATH")]
        keyring: Option<PathBuf>,
    },
    /// Restore runs' original events from the backup, byte for byte.
    #[command(after_help = "Examples:
  chronicle upcast rollback 0193a1b2-0000-7000-8000-0000000000c1
  chronicle upcast rollback --all")]
    Rollback {
        /// The runs to roll back, in the order given.
        run_ids: Vec<Uuid>,
        /// Every run not yet rolled back, newest first.
        #[arg(long, conflicts_with = "run_ids")]
        all: bool,
    },
    /// Every run: status, progress, who is running it now.
    #[command(after_help = "Examples:
  chronicle upcast status
  chronicle upcast status --output json")]
    Status,
}

/// Runs `chronicle upcast ...`.
pub async fn run(
    db: &Database,
    registry: &Registry,
    args: UpcastArgs,
    format: OutputFormat,
) -> Result<()> {
    let store = db.store().await?;
    let pool = store.pool().clone();
    match args.action {
        UpcastCommand::Plan { config } => {
            let upcaster = PgUpcaster::new(pool, load_chain(&config, registry)?);
            plan(&upcaster, format).await
        }
        UpcastCommand::Run {
            config,
            batch_size,
            check,
            keyring,
        } => {
            let chain = load_chain(&config, registry)?;
            let mut upcaster = PgUpcaster::new(pool.clone(), chain);
            let cipher = cipher(&store, keyring.as_deref(), "upcast run")?;
            let has_keyring = cipher.is_some();
            if let Some(cipher) = cipher {
                upcaster.cipher(Arc::new(cipher));
            }
            run_migrations(&upcaster, batch_size, check, has_keyring, format).await
        }
        UpcastCommand::Verify {
            run_ids,
            config,
            keyring,
        } => {
            let mut upcaster = PgUpcaster::new(pool.clone(), load_chain(&config, registry)?);
            if let Some(cipher) = cipher(&store, keyring.as_deref(), "upcast verify")? {
                upcaster.cipher(Arc::new(cipher));
            }
            verify(&upcaster, run_ids, format).await
        }
        UpcastCommand::Rollback { run_ids, all } => {
            // Restoring needs only the backup, not the definitions.
            let upcaster = PgUpcaster::new(pool, UpcasterChain::builder().build()?);
            rollback(&upcaster, run_ids, all, format).await
        }
        UpcastCommand::Status => {
            let upcaster = PgUpcaster::new(pool, UpcasterChain::builder().build()?);
            status(&upcaster, format).await
        }
    }
}

/// The exit code of an upcast error, where README's table has one: a key
/// another runner holds is a concurrency conflict (3), an unknown run is
/// not found (4).
pub fn exit_code(e: &RunError) -> Option<u8> {
    match e {
        RunError::LeaseHeld { .. } => Some(crate::EXIT_CONFLICT),
        RunError::RunNotFound(_) => Some(crate::EXIT_NOT_FOUND),
        _ => None,
    }
}

/// The chain projections apply before their handlers (lazy upcasting):
/// when `$CHRONICLE_UPCASTERS` names a YAML file or the binary carries
/// Rust upcasters, the same chain `chronicle upcast` uses (see
/// [`load_chain`]); `None` otherwise.
pub(crate) fn read_chain(registry: &Registry) -> Result<Option<UpcasterChain>> {
    let config = std::env::var_os("CHRONICLE_UPCASTERS").map(PathBuf::from);
    if config.is_none() && registry.upcasters().is_empty() {
        return Ok(None);
    }
    load_chain(&ConfigArg { config }, registry).map(Some)
}

/// The chain of the binary's Rust upcasters and the YAML definitions. The
/// YAML file may be missing only when it was not named and the binary
/// carries Rust upcasters.
fn load_chain(arg: &ConfigArg, registry: &Registry) -> Result<UpcasterChain> {
    let mut builder = UpcasterChain::builder();
    for upcaster in registry.upcasters() {
        builder.upcaster(upcaster.clone());
    }
    let path = arg.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let origin = path.display().to_string();
            let config =
                UpcastConfig::from_yaml(&origin, &text).map_err(|e| UsageError(e.to_string()))?;
            builder.config(config);
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && arg.config.is_none()
                && !registry.upcasters().is_empty() => {}
        Err(e) => bail!(UsageError(format!(
            "cannot read the upcaster definitions at {}: {e}; pass --config PATH (or set \
             CHRONICLE_UPCASTERS) to the YAML file with your `upcasters:` list",
            path.display()
        ))),
    }
    builder
        .build()
        .map_err(|e| UsageError(e.to_string()).into())
}

/// The cipher over the keyring named by `--keyring` or $CHRONICLE_KEYRING,
/// if any; its decryptions and encryptions are audited as `command`'s.
fn cipher(
    store: &PgEventStore,
    keyring: Option<&std::path::Path>,
    command: &str,
) -> Result<Option<CryptoFieldCipher>> {
    let Some(keyring) = crate::keys::named_keyring(keyring).map_err(|e| {
        UsageError(format!(
            "cannot load the keyring: {e:#}; pass --keyring PATH (or set CHRONICLE_KEYRING) to \
             the keyring that wraps the data keys of this database"
        ))
    })?
    else {
        return Ok(None);
    };
    Ok(Some(CryptoFieldCipher::new(
        keyring.keyring,
        Arc::new(store.data_key_store()),
        Arc::new(store.audit_sink()),
        chronicle_crypto::AccessContext::new(
            format!("chronicle-upcast@{}", whoami()),
            format!("schema migration (chronicle {command})"),
        ),
    )))
}

fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("pid {}", std::process::id()))
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Lazy => "lazy",
        _ => "eager",
    }
}

fn plan_json(entry: &PlanEntry) -> Value {
    let m = &entry.migration;
    let (diff, sample_error) = match &entry.sample {
        Some(sample) => match (&sample.after, sample.diff()) {
            (Ok(_), Some(diff)) => (Some(diff), None),
            (Err(e), _) => (None, Some(e.to_string())),
            _ => (None, None),
        },
        None => (None, None),
    };
    json!({
        "event_type": m.event_type,
        "from_version": m.from_version,
        "to_event_type": m.latest.event_type,
        "to_version": m.latest.schema_version,
        "mode": mode_name(m.mode),
        "events": entry.events,
        "encrypted_events": entry.encrypted,
        "sample_diff": diff.as_ref().map(ToString::to_string),
        "sample_changes": diff.map(|d| d.changes),
        "sample_error": sample_error,
    })
}

/// Writes what a plan shows, in either format.
fn write_plan(entries: &[PlanEntry], format: OutputFormat) -> crate::output::Result {
    match format {
        OutputFormat::Json => write_json_lines(entries.iter().map(plan_json))?,
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec!["migration", "to", "mode", "events", "encrypted"]);
            for e in entries {
                let m = &e.migration;
                table.add_row(vec![
                    format!("{} v{}", m.event_type, m.from_version),
                    format!("{} v{}", m.latest.event_type, m.latest.schema_version),
                    mode_name(m.mode).to_owned(),
                    e.events.to_string(),
                    e.encrypted.to_string(),
                ]);
            }
            write_table(&table)?;
            for e in entries {
                let Some(sample) = &e.sample else { continue };
                let m = &e.migration;
                outln!(
                    "\nsample of {} v{} (first matching event):",
                    m.event_type,
                    m.from_version
                )?;
                match (&sample.after, sample.diff()) {
                    (Err(err), _) => outln!(
                        "  FAILS: {err}\n  (`chronicle upcast run` would stop at this event)"
                    )?,
                    (Ok(_), Some(diff)) => write_text(diff.to_string())?,
                    (Ok(_), None) => {}
                }
            }
        }
    }
    Ok(())
}

async fn plan(upcaster: &PgUpcaster, format: OutputFormat) -> Result<()> {
    let entries = upcaster.plan().await?;
    if entries.is_empty() {
        bail!(UsageError(
            "the definitions hold no upcasters: add entries under `upcasters:`".into()
        ));
    }
    write_plan(&entries, format)?;
    if format == OutputFormat::Table {
        let eager: u64 = entries
            .iter()
            .filter(|e| e.migration.mode != Mode::Lazy)
            .map(|e| e.events)
            .sum();
        note!(
            "dry run: nothing written. `chronicle upcast run` rewrites {eager} event(s) of the \
             eager migrations (lazy ones are upcast on read)"
        );
    }
    Ok(())
}

fn run_json(r: &RunInfo, lease: Option<&chronicle_upcast::LeaseInfo>) -> Value {
    json!({
        "run_id": r.run_id,
        "event_type": r.event_type,
        "from_version": r.from_version,
        "to_event_type": r.to_event_type,
        "to_version": r.to_version,
        "status": r.status.as_str(),
        "events_upcast": r.events_upcast,
        "batches": r.batches,
        "cursor": r.cursor,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "error": r.error,
        "failed_event_id": r.failed_event_id,
        "running_on": lease.map(|l| l.owner.clone()),
    })
}

fn write_runs(
    runs: &[RunInfo],
    leases: &[chronicle_upcast::LeaseInfo],
    format: OutputFormat,
) -> crate::output::Result {
    let lease_of = |r: &RunInfo| {
        leases.iter().find(|l| {
            r.status == RunStatus::Running
                && l.event_type == r.event_type
                && l.from_version == r.from_version
        })
    };
    match format {
        OutputFormat::Json => write_json_lines(runs.iter().map(|r| run_json(r, lease_of(r)))),
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "run_id",
                    "migration",
                    "status",
                    "events",
                    "batches",
                    "started",
                    "finished",
                    "running on",
                    "error",
                ]);
            for r in runs {
                table.add_row(vec![
                    r.run_id.to_string(),
                    format!(
                        "{} v{} -> {} v{}",
                        r.event_type, r.from_version, r.to_event_type, r.to_version
                    ),
                    r.status.to_string(),
                    r.events_upcast.to_string(),
                    r.batches.to_string(),
                    r.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    r.finished_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                    lease_of(r)
                        .map(|l| l.owner.clone())
                        .unwrap_or_else(|| "-".into()),
                    r.error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            write_table(&table)
        }
    }
}

async fn run_migrations(
    upcaster: &PgUpcaster,
    batch_size: usize,
    check: bool,
    has_cipher: bool,
    format: OutputFormat,
) -> Result<()> {
    if batch_size == 0 {
        bail!(UsageError("--batch-size must be at least 1".into()));
    }
    let entries = upcaster.plan().await?;
    let eager: Vec<&PlanEntry> = entries
        .iter()
        .filter(|e| e.migration.mode != Mode::Lazy)
        .collect();
    if !has_cipher && let Some(e) = eager.iter().find(|e| e.encrypted > 0) {
        bail!(UsageError(format!(
            "{} event(s) of {} v{} hold encrypted fields, which are bound to their place in the \
             event: pass --keyring PATH so they are decrypted, upcast and re-encrypted under their \
             subject's current key (nothing was written)",
            e.encrypted, e.migration.event_type, e.migration.from_version
        )));
    }
    let total: u64 = eager.iter().map(|e| e.events).sum();
    let totals: HashMap<(String, u32), u64> = eager
        .iter()
        .map(|e| {
            (
                (e.migration.event_type.clone(), e.migration.from_version),
                e.events,
            )
        })
        .collect();
    if check {
        let checked = upcaster.check(batch_size).await?;
        if format == OutputFormat::Table {
            note!("checked {checked} event(s): every one upcasts and validates");
        }
    }
    let bar = crate::ui::progress(
        format,
        Some(total),
        "{msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut done: HashMap<(String, u32), u64> = HashMap::new();
    let progress = |p: &chronicle_upcast::Progress| {
        let key = (p.event_type.clone(), p.from_version);
        let planned = totals.get(&key).copied().unwrap_or(0);
        let this_call = planned.saturating_sub(p.remaining);
        done.insert(key, this_call);
        let pos: u64 = done.values().sum();
        if pos > bar.length().unwrap_or(0) {
            bar.set_length(pos);
        }
        bar.set_position(pos);
        bar.set_message(format!("{} v{}", p.event_type, p.from_version));
    };
    let outcome = tokio::select! {
        r = upcaster.run(batch_size, progress) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(outcome) = outcome else {
        bar.abandon_with_message("interrupted");
        // The batch in flight was rolled back with its transaction; give
        // up the leases so the next run starts at once.
        let _ = upcaster.release_leases().await;
        bail!(
            "interrupted: the batch in flight was rolled back, every committed batch is kept \
             (with its backup). Run `chronicle upcast run` again to continue where it stopped, \
             or `chronicle upcast rollback --all` to undo"
        );
    };
    match outcome {
        Ok(report) => {
            bar.finish_and_clear();
            if report.runs.is_empty() {
                if format == OutputFormat::Table {
                    note!("nothing to upcast: no stored event matches an eager migration");
                }
                return Ok(());
            }
            write_runs(&report.runs, &[], format)?;
            if format == OutputFormat::Table {
                note!(
                    "{} event(s) upcast. `chronicle upcast verify` compares the store with the \
                     backup; `chronicle upcast rollback RUN_ID` restores the originals",
                    report.events_upcast()
                );
            }
            Ok(())
        }
        Err(e) => {
            bar.abandon();
            Err(e.into())
        }
    }
}

fn verify_json(v: &VerifyReport) -> Value {
    json!({
        "run_id": v.run_id,
        "status": v.status.as_str(),
        "ok": v.is_ok(),
        "backup_count": v.backup_count,
        "current_count": v.current_count,
        "backup_checksum": v.backup_checksum.to_string(),
        "expected_checksum": v.expected_checksum.to_string(),
        "current_checksum": v.current_checksum.to_string(),
        "mismatches": v.mismatches,
        "encrypted": v.encrypted,
        "compared_plaintext": v.compared_plaintext,
    })
}

async fn verify(upcaster: &PgUpcaster, run_ids: Vec<Uuid>, format: OutputFormat) -> Result<()> {
    let run_ids = if run_ids.is_empty() {
        let all: Vec<Uuid> = upcaster.runs().await?.iter().map(|r| r.run_id).collect();
        if all.is_empty() {
            bail!(NotFound(
                "no upcast run to verify: `chronicle upcast run` has not run on this database"
                    .into()
            ));
        }
        all
    } else {
        run_ids
    };
    let mut reports = Vec::new();
    for id in run_ids {
        reports.push(upcaster.verify(id).await?);
    }
    match format {
        OutputFormat::Json => write_json_lines(reports.iter().map(verify_json))?,
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "run_id",
                    "status",
                    "result",
                    "backup",
                    "in store",
                    "expected checksum",
                    "store checksum",
                ]);
            for v in &reports {
                table.add_row(vec![
                    v.run_id.to_string(),
                    v.status.to_string(),
                    if v.is_ok() { "ok" } else { "MISMATCH" }.to_owned(),
                    v.backup_count.to_string(),
                    v.current_count.to_string(),
                    v.expected_checksum.to_string()[..16].to_owned(),
                    v.current_checksum.to_string()[..16].to_owned(),
                ]);
            }
            write_table(&table)?;
        }
    }
    let bad: Vec<&VerifyReport> = reports.iter().filter(|v| !v.is_ok()).collect();
    if let Some(v) = bad.first() {
        let hint = if v.encrypted > 0 && !v.compared_plaintext {
            format!(
                "{} of its events hold encrypted fields, compared as stored: a run with \
                 --keyring re-encrypted them with fresh nonces, so verify with --keyring PATH to \
                 compare them as plaintext",
                v.encrypted
            )
        } else {
            "if the definitions changed since that run, verify with the ones it ran with; \
             otherwise something rewrote the events after the run"
                .to_owned()
        };
        bail!(
            "{} run(s) do not match their backup; first: run {} ({} of {} backed-up events in \
             the store, differing events: {}). {hint}",
            bad.len(),
            v.run_id,
            v.current_count,
            v.backup_count,
            v.mismatches
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

async fn rollback(
    upcaster: &PgUpcaster,
    run_ids: Vec<Uuid>,
    all: bool,
    format: OutputFormat,
) -> Result<()> {
    let run_ids = if all {
        // Newest first, so a later run never blocks an earlier one.
        upcaster
            .runs()
            .await?
            .into_iter()
            .filter(|r| r.status != RunStatus::RolledBack)
            .map(|r| r.run_id)
            .collect()
    } else if run_ids.is_empty() {
        bail!(UsageError(
            "name the runs to roll back (`chronicle upcast status` lists them), or pass --all"
                .into()
        ));
    } else {
        run_ids
    };
    let mut restored = Vec::new();
    for id in run_ids {
        restored.push(
            upcaster
                .rollback(id)
                .await
                .with_context(|| format!("rolling back upcast run {id}"))?,
        );
    }
    if restored.is_empty() {
        if format == OutputFormat::Table {
            note!("nothing to roll back: every run is already rolled back");
        }
        return Ok(());
    }
    write_runs(&restored, &[], format)?;
    if format == OutputFormat::Table {
        note!(
            "{} run(s) rolled back: their events hold the original bytes again",
            restored.len()
        );
    }
    Ok(())
}

async fn status(upcaster: &PgUpcaster, format: OutputFormat) -> Result<()> {
    let runs = upcaster.runs().await?;
    let leases = upcaster.leases().await?;
    if runs.is_empty() && format == OutputFormat::Table {
        note!("no upcast run yet: `chronicle upcast plan` shows what a run would do");
        return Ok(());
    }
    write_runs(&runs, &leases, format)?;
    Ok(())
}

/// The demo's migration: UserRegistered v1 -> v2.
const DEMO_UPCASTERS: &str = r#"
upcasters:
  - event_type: UserRegistered
    from: 1
    steps:
      - rename: { from: /name, to: /display_name }
      - add: { path: /locale, default: "en" }
    schema:
      type: object
      required: [email, display_name, locale]
"#;

/// `chronicle demo`'s upcasting step (numbered `n`): plan, run, verify and
/// roll back one migration over the demo's events.
pub async fn demo(store: &PgEventStore, n: u32) -> Result<()> {
    use chronicle_core::EventReader;
    outln!(
        "\n== {n}. Schema evolution: UserRegistered v1 -> v2 (rename /name, add /locale), eagerly, then rolled back"
    )?;
    let chain = UpcasterChain::builder()
        .config(UpcastConfig::from_yaml("demo upcasters", DEMO_UPCASTERS)?)
        .build()?;
    outln!("the definition (as in an upcasters.yaml):{DEMO_UPCASTERS}")?;
    let upcaster = PgUpcaster::new(store.pool().clone(), chain);
    let entries = upcaster.plan().await?;
    outln!("`chronicle upcast plan`: a dry run, nothing written")?;
    write_plan(&entries, OutputFormat::Table)?;
    let report = upcaster.run(DEFAULT_BATCH_SIZE, |_| {}).await?;
    outln!(
        "\n`chronicle upcast run`: {} event(s) rewritten in batches, each original copied to the backup first",
        report.events_upcast()
    )?;
    let registered = store
        .read_by_type(
            "UserRegistered",
            chronicle_core::TimeRange {
                from: None,
                to: None,
            },
            10_000,
        )
        .await;
    if let Some(e) = registered.ok().and_then(|events| events.into_iter().last()) {
        outln!(
            "the newest UserRegistered now reads v{}: {}",
            e.metadata.schema_version,
            e.event_data
        )?;
    }
    for run in &report.runs {
        let v = upcaster.verify(run.run_id).await?;
        outln!(
            "`chronicle upcast verify`: run {} {} ({} backed up, {} in the store, checksum {}…)",
            run.run_id,
            if v.is_ok() { "ok" } else { "MISMATCH" },
            v.backup_count,
            v.current_count,
            &v.current_checksum.to_string()[..16]
        )?;
    }
    for run in report.runs.iter().rev() {
        upcaster.rollback(run.run_id).await?;
        let v = upcaster.verify(run.run_id).await?;
        outln!(
            "`chronicle upcast rollback`: run {} restored; the store equals the backup byte for byte: {}",
            run.run_id,
            v.backup_checksum == v.current_checksum
        )?;
    }
    outln!(
        "the same definitions applied on read instead (`modes: {{ UserRegistered: lazy }}`) give \
         the same events without rewriting the store"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chronicle_upcast::FnUpcaster;

    use super::*;

    fn registry() -> Registry {
        let mut registry = Registry::new();
        registry.upcaster(FnUpcaster::new("Item", 1, |event| {
            event.data["qty"] = 1.into();
            Ok(())
        }));
        registry
    }

    #[test]
    fn rust_upcasters_chain_with_the_yaml_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.yaml");
        std::fs::write(
            &path,
            "upcasters:\n  - event_type: Item\n    from: 2\n    steps:\n      - rename: { from: /qty, to: /quantity }\n",
        )
        .unwrap();
        let arg = ConfigArg { config: Some(path) };
        let chain = load_chain(&arg, &registry()).unwrap();
        assert_eq!(chain.latest_version("Item"), Some(3));
    }

    #[test]
    fn the_default_file_may_be_missing_only_when_the_binary_has_rust_upcasters() {
        let missing = ConfigArg { config: None };
        // The tests run in the crate folder, which has no upcasters.yaml.
        assert!(!std::path::Path::new(DEFAULT_CONFIG).exists());
        let chain = load_chain(&missing, &registry()).unwrap();
        assert_eq!(chain.latest_version("Item"), Some(2));

        let err = load_chain(&missing, &Registry::new()).unwrap_err();
        assert!(err.to_string().contains("pass --config PATH"), "{err}");

        // A file named explicitly must exist, Rust upcasters or not.
        let named = ConfigArg {
            config: Some("/nonexistent/up.yaml".into()),
        };
        let err = load_chain(&named, &registry()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/up.yaml"), "{err}");
    }
}
