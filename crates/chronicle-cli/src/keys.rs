//! `chronicle keys`: data keys and key-encryption keys of field encryption.
//!
//! The keyring (the key-encryption keys) comes from, in order: `--keyring
//! PATH`; `CHRONICLE_KEYRING` (a keyring document, JSON or YAML, or the path
//! of a keyring file); and, only on the embedded development database, the
//! development keyring `chronicle demo` creates in `.chronicle/keyring.yaml`
//! (`$CHRONICLE_HOME/keyring.yaml` when that is set). Against a
//! `--database-url` a keyring must be named: production never falls back to
//! a development key. Listing and shredding do not use it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chronicle_crypto::{
    AccessContext, DataKeyId, EncryptionConfig, FieldEncryptor, FieldEncryptorBuilder, KeyProvider,
    LocalKeyring, SubjectId,
};
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{PgDataKeyStore, PgEventStore, PgPool, PgReencryptor};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::Database;
use crate::commands::{NotFound, UsageError};
use crate::output::{OutputFormat, outln, write_json_lines, write_record, write_table};
use crate::ui::note;

/// The environment variable naming the keyring: a document or a path.
pub const KEYRING_ENV: &str = "CHRONICLE_KEYRING";

/// `chronicle keys` arguments.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The keyring file (JSON or YAML). Default: $CHRONICLE_KEYRING (a
    /// keyring document or a path), else the development keyring in
    /// .chronicle/ when the database is the embedded default.
    #[arg(long, global = true, value_name = "PATH")]
    keyring: Option<PathBuf>,
    /// Who acts, for the audit log (default: cli:$USER).
    #[arg(long, global = true)]
    actor: Option<String>,
    /// Why, for the audit log (a ticket, a change id).
    #[arg(long, global = true)]
    purpose: Option<String>,
    /// What to do.
    #[command(subcommand)]
    action: KeysCommand,
}

/// `chronicle keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Data keys: subject, key-encryption key, current, created, re-wrapped,
    /// shredded (never key material).
    #[command(after_help = "Examples:
  chronicle keys list
  chronicle keys list --subject 0193a1b2-0000-7000-8000-000000000001 --output json")]
    List {
        /// Only this subject's keys.
        #[arg(long)]
        subject: Option<String>,
        /// List keys after this key id (to page on).
        #[arg(long, value_name = "KEY_ID")]
        after: Option<DataKeyId>,
        /// At most this many keys.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Add a new key-encryption key to the keyring file and re-wrap every
    /// data key under it (no event is rewritten). Resumable: run it again
    /// with --resume after an interruption.
    #[command(after_help = "Examples:
  chronicle keys --keyring keyring.yaml rotate-kek
  chronicle keys --keyring keyring.yaml rotate-kek --resume")]
    RotateKek {
        /// Do not add a key: finish re-wrapping under the current one.
        #[arg(long)]
        resume: bool,
        /// Data keys per page (one transaction each).
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
    },
    /// Give a subject a new data key for new events; old events stay
    /// readable under their keys.
    #[command(after_help = "Examples:
  chronicle keys --keyring keyring.yaml rotate 0193a1b2-0000-7000-8000-000000000001
  chronicle keys --keyring keyring.yaml rotate 0193a1b2-0000-7000-8000-000000000001 --reencrypt")]
    Rotate {
        /// The subject (by default the aggregate id).
        subject: String,
        /// Also rewrite the subject's stored fields under the new key.
        #[arg(long)]
        reencrypt: bool,
    },
    /// Destroy every data key of a subject: its fields become permanently
    /// unreadable everywhere; its events stay and replay.
    #[command(after_help = "Examples:
  chronicle keys shred 0193a1b2-0000-7000-8000-000000000001
  chronicle keys shred 0193a1b2-0000-7000-8000-000000000001 --yes --actor dpo --purpose erasure-17")]
    Shred {
        /// The subject (by default the aggregate id).
        subject: String,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// Where the keyring came from.
pub(crate) enum KeyringSource {
    File(PathBuf),
    Env,
}

/// The keyring and where it came from.
pub(crate) struct Keyring {
    pub(crate) keyring: Arc<LocalKeyring>,
    source: KeyringSource,
}

/// The development keyring `chronicle demo` creates.
pub fn dev_keyring_path() -> PathBuf {
    match std::env::var_os("CHRONICLE_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("keyring.yaml"),
        _ => EmbeddedPostgres::default_dir()
            .parent()
            .map_or_else(|| PathBuf::from(".chronicle"), Path::to_path_buf)
            .join("keyring.yaml"),
    }
}

/// The development keyring, created (and saved, owner-only) if missing.
pub fn dev_keyring() -> Result<(Arc<LocalKeyring>, PathBuf)> {
    let path = dev_keyring_path();
    if path.exists() {
        let keyring = LocalKeyring::from_file(&path)
            .with_context(|| format!("reading the development keyring {}", path.display()))?;
        return Ok((Arc::new(keyring), path));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let keyring = LocalKeyring::generate()?;
    keyring
        .write_file(&path)
        .with_context(|| format!("writing the development keyring {}", path.display()))?;
    Ok((Arc::new(keyring), path))
}

/// The keyring named by `--keyring PATH` or by ${KEYRING_ENV} (a keyring
/// document or a path), if either is given.
pub(crate) fn named_keyring(flag: Option<&Path>) -> Result<Option<Keyring>> {
    if let Some(path) = flag {
        let keyring = LocalKeyring::from_file(path)
            .with_context(|| format!("--keyring {}", path.display()))?;
        return Ok(Some(Keyring {
            keyring: Arc::new(keyring),
            source: KeyringSource::File(path.to_owned()),
        }));
    }
    if let Ok(value) = std::env::var(KEYRING_ENV) {
        let text = value.trim_start();
        if text.starts_with('{') || text.contains("keys:") {
            let keyring = LocalKeyring::parse(text).with_context(|| format!("${KEYRING_ENV}"))?;
            return Ok(Some(Keyring {
                keyring: Arc::new(keyring),
                source: KeyringSource::Env,
            }));
        }
        let path = PathBuf::from(value);
        let keyring = LocalKeyring::from_file(&path)
            .with_context(|| format!("${KEYRING_ENV} ({})", path.display()))?;
        return Ok(Some(Keyring {
            keyring: Arc::new(keyring),
            source: KeyringSource::File(path),
        }));
    }
    Ok(None)
}

fn load_keyring(db: &Database, flag: Option<&Path>) -> Result<Keyring> {
    if let Some(keyring) = named_keyring(flag)? {
        return Ok(keyring);
    }
    let dev = dev_keyring_path();
    if db.embedded && dev.exists() {
        let keyring = LocalKeyring::from_file(&dev)
            .with_context(|| format!("reading the development keyring {}", dev.display()))?;
        return Ok(Keyring {
            keyring: Arc::new(keyring),
            source: KeyringSource::File(dev),
        });
    }
    bail!(UsageError(format!(
        "no keyring: pass --keyring PATH or set {KEYRING_ENV} (a keyring document or file){}",
        if db.embedded {
            format!(
                "; `chronicle demo` creates a development keyring at {}",
                dev.display()
            )
        } else {
            String::new()
        }
    )))
}

fn encryptor(store: &PgEventStore, provider: Arc<dyn KeyProvider>) -> Arc<FieldEncryptor> {
    Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::new(),
            provider,
            Arc::new(store.data_key_store()),
            Arc::new(store.audit_sink()),
        )
        .build(),
    )
}

fn context(args: &KeysArgs, what: &str) -> AccessContext {
    let actor = args.actor.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    });
    let purpose = args
        .purpose
        .clone()
        .unwrap_or_else(|| format!("chronicle keys {what}"));
    AccessContext::new(actor, purpose)
}

/// Fails with exit code 4 unless the subject ever had a data key.
async fn require_subject(keys: &PgDataKeyStore, subject: &SubjectId) -> Result<()> {
    if keys.keys(Some(subject), None, 1).await?.is_empty() {
        bail!(NotFound(format!(
            "subject \"{subject}\" has no data keys (subjects are aggregate ids unless the encryption config names a subject field; `chronicle keys list` shows them)"
        )));
    }
    Ok(())
}

/// Runs `chronicle keys`.
pub async fn run(db: &Database, args: KeysArgs, format: OutputFormat) -> Result<()> {
    let store = db.store().await?;
    let pool = store.pool().clone();
    let keys = store.data_key_store();
    match &args.action {
        KeysCommand::List {
            subject,
            after,
            limit,
        } => {
            let subject = subject.as_deref().map(SubjectId::new);
            let listed = keys.keys(subject.as_ref(), *after, *limit).await?;
            if listed.is_empty()
                && let Some(subject) = &subject
            {
                require_subject(&keys, subject).await?;
            }
            write_keys(&listed, format)?;
            if format == OutputFormat::Table {
                let by_kek = keys.count_by_kek().await?;
                let summary: Vec<String> =
                    by_kek.iter().map(|(k, n)| format!("{k}: {n}")).collect();
                note!(
                    "{} key(s) listed; live keys by key-encryption key: {}",
                    listed.len(),
                    if summary.is_empty() {
                        "none".to_owned()
                    } else {
                        summary.join(", ")
                    }
                );
                if listed.len() == *limit
                    && let Some(last) = listed.last()
                {
                    note!("more: --after {}", last.id);
                }
            }
        }
        KeysCommand::RotateKek { resume, batch_size } => {
            let ring = load_keyring(db, args.keyring.as_deref())?;
            let before = ring.keyring.current_key_id();
            let current = if *resume {
                before.clone()
            } else {
                let KeyringSource::File(path) = &ring.source else {
                    bail!(UsageError(format!(
                        "rotate-kek adds a key to the keyring and must save it first, but ${KEYRING_ENV} holds the document itself: add a key to it yourself, make it current, and run `chronicle keys rotate-kek --resume`"
                    )));
                };
                let new = ring.keyring.rotate()?;
                // Saved before any data key is wrapped under it.
                ring.keyring
                    .write_file(path)
                    .with_context(|| format!("saving the keyring {}", path.display()))?;
                note!(
                    "added key-encryption key {new} to {} (current); re-wrapping data keys",
                    path.display()
                );
                new
            };
            let total: u64 = keys.count_by_kek().await?.iter().map(|(_, n)| n).sum();
            let bar = crate::ui::progress(
                format,
                Some(total),
                "{bar:40} {pos}/{len} data keys re-wrapped {msg}",
            );
            let crypto = encryptor(&store, ring.keyring.clone());
            let ctx = context(&args, "rotate-kek");
            let done = crypto
                .rewrap_all(&ctx, (*batch_size).max(1), |p| bar.set_position(p.scanned))
                .await
                .map_err(|e| {
                    anyhow::Error::new(e).context(
                        "re-wrapping stopped; run `chronicle keys rotate-kek --resume` to finish (keys done so far are skipped)",
                    )
                })?;
            bar.finish_and_clear();
            let left: Vec<Value> = keys
                .count_by_kek()
                .await?
                .into_iter()
                .filter(|(k, _)| *k != current)
                .map(|(k, n)| json!({ "kek_id": k.as_str(), "keys": n }))
                .collect();
            let old: Vec<String> = ring
                .keyring
                .key_ids()
                .into_iter()
                .filter(|k| *k != current)
                .map(|k| k.to_string())
                .collect();
            write_record(
                &json!({
                    "kek_id": current.as_str(),
                    "previous_kek_id": before.as_str(),
                    "scanned": done.scanned,
                    "rewrapped": done.rewrapped,
                    "still_under_other_keks": left,
                    "older_keks_in_keyring": old,
                }),
                format,
            )?;
            if format == OutputFormat::Table && !old.is_empty() {
                note!(
                    "every data key is wrapped under {current}; remove the older key-encryption keys from the keyring once backups taken before now have expired"
                );
            }
        }
        KeysCommand::Rotate { subject, reencrypt } => {
            let subject = SubjectId::new(subject.clone());
            require_subject(&keys, &subject).await?;
            let ring = load_keyring(db, args.keyring.as_deref())?;
            let crypto = encryptor(&store, ring.keyring.clone());
            let ctx = context(&args, "rotate");
            let id = crypto.rotate_data_key(&ctx, &subject).await?;
            let mut record = json!({ "subject": subject.as_str(), "key_id": id.to_string() });
            if *reencrypt {
                let bar = crate::ui::spinner(format);
                let done = PgReencryptor::new(pool.clone(), crypto)
                    .reencrypt_subject(&ctx, &subject, None, 500, |p| {
                        bar.set_message(format!("{} events re-encrypted", p.rewritten));
                        bar.tick();
                    })
                    .await?;
                bar.finish_and_clear();
                record["events_rewritten"] = json!(done.rewritten);
                record["fields_reencrypted"] = json!(done.fields);
                record["events_skipped"] = json!(done.skipped);
            }
            write_record(&record, format)?;
        }
        KeysCommand::Shred { subject, yes } => {
            let subject = SubjectId::new(subject.clone());
            require_subject(&keys, &subject).await?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!(UsageError(format!(
                        "shredding \"{subject}\" cannot be undone; pass --yes to confirm"
                    )));
                }
                crate::ui::prompt(format_args!(
                    "Shredding destroys every data key of \"{subject}\": its encrypted fields become unreadable for good. Type the subject to confirm:"
                ));
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != subject.as_str() {
                    bail!(UsageError("not confirmed; nothing was shredded".into()));
                }
            }
            // Shredding needs no key-encryption key; any provider will do.
            let crypto = encryptor(&store, Arc::new(LocalKeyring::generate()?));
            let destroyed = crypto.shred(&context(&args, "shred"), &subject).await?;
            write_record(
                &json!({
                    "subject": subject.as_str(),
                    "keys_destroyed": destroyed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
                format,
            )?;
        }
    }
    Ok(())
}

fn write_keys(
    keys: &[chronicle_postgres::DataKeyInfo],
    format: OutputFormat,
) -> crate::output::Result {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
    };
    match format {
        OutputFormat::Json => write_json_lines(keys.iter().map(|k| {
            json!({
                "key_id": k.id.to_string(),
                "subject": k.subject.as_str(),
                "kek_id": k.kek_id.as_ref().map(|k| k.as_str()),
                "current": k.current,
                "created_at": k.created_at,
                "rewrapped_at": k.rewrapped_at,
                "shredded_at": k.shredded_at,
            })
        })),
        OutputFormat::Table => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "key_id",
                    "subject",
                    "kek",
                    "current",
                    "created",
                    "re-wrapped",
                    "shredded",
                ]);
            for k in keys {
                table.add_row(vec![
                    k.id.to_string(),
                    k.subject.to_string(),
                    k.kek_id
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), ToString::to_string),
                    if k.current { "yes" } else { "" }.to_owned(),
                    time(Some(k.created_at)).unwrap_or_default(),
                    time(k.rewrapped_at).unwrap_or_else(|| "-".into()),
                    time(k.shredded_at).unwrap_or_else(|| "-".into()),
                ]);
            }
            write_table(&table)
        }
    }
}

/// The encryption config of `chronicle demo`'s section.
const DEMO_CONFIG: &str = r#"
encryption:
  events:
    CustomerRegistered:
      fields: ["/email", "/phone"]
    CustomerEmailChanged:
      fields: ["/email"]
"#;

/// `chronicle demo`'s field-encryption section, steps `n` to `n + 3`: an
/// encrypted PII field in the raw table, the decrypted and audited read, a
/// data-key rotation, and crypto-shredding, with the development keyring.
pub async fn demo(store: &chronicle_postgres::PgEventStore, n: u32) -> Result<()> {
    use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent};
    use chronicle_crypto::{GroupCommitAuditSink, Redaction};
    use chronicle_postgres::AuditQuery;
    use tokio_postgres::types::Type;

    let pool = store.pool().clone();
    let (keyring, path) = dev_keyring()?;
    let audit = Arc::new(store.audit_sink());
    let crypto = Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(DEMO_CONFIG)?,
            keyring,
            Arc::new(store.data_key_store()),
            Arc::new(GroupCommitAuditSink::new(audit.clone())),
        )
        .build(),
    );
    let signup = AccessContext::new("signup-service", "registration");
    let writer = store.clone().encrypted(crypto.clone(), signup);
    let customer = uuid::Uuid::now_v7();
    let subject = SubjectId::from_aggregate(customer);

    outln!("\n== {n}. Field-level encryption: the email and phone are encrypted in the writer")?;
    outln!(
        "keyring: {} (development; production uses a KMS); the config:{DEMO_CONFIG}",
        path.display()
    )?;
    let registered = NewEvent::new(
        "CustomerRegistered",
        json!({ "name": "Grace Hopper", "email": "grace@navy.example", "phone": "+1 555 0100", "plan": "pro" }),
    );
    writer
        .append(
            customer,
            "customer",
            ExpectedVersion::NoStream,
            vec![registered],
        )
        .await?;
    let raw = |pool: PgPool| async move {
        let rows = pool
            .get()
            .await?
            .query_typed(
                "SELECT version, event_data, encrypted_fields FROM events \
                  WHERE aggregate_id = $1 ORDER BY version",
                &[(&customer, Type::UUID)],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| {
                    (
                        r.get::<_, i32>(0),
                        r.get::<_, Value>(1),
                        r.get::<_, Option<Vec<String>>>(2).unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let rows = raw(pool.clone()).await?;
    outln!(
        "the row in the events table (encrypted_fields = {:?}):",
        rows[0].2
    )?;
    outln!("{}", serde_json::to_string_pretty(&rows[0].1)?)?;
    outln!(
        "The plaintext never left this process; the envelope's associated data binds it to this event, aggregate and field."
    )?;

    outln!(
        "\n== {}. A reader holding the keys gets plaintext, and the read is audited",
        n + 1
    )?;
    let support = writer.with_context(AccessContext::new("support:alice", "ticket-4711"));
    let read = support.read_stream(customer, 1, None).await?;
    outln!("support:alice (ticket-4711) reads: {}", read[0].event_data)?;
    let records = audit
        .list(&AuditQuery {
            subject: Some(subject.clone()),
            ..AuditQuery::default()
        })
        .await?;
    for r in &records {
        let what = if r.entry.event_ids.is_empty() {
            format!(
                "key {}",
                r.entry.key_id.map(|k| k.to_string()).unwrap_or_default()
            )
        } else {
            format!(
                "{} event(s), fields {}",
                r.entry.event_ids.len(),
                r.entry.fields.join(" ")
            )
        };
        outln!(
            "  audit #{} {} {} by {} for {}: {what}",
            r.id,
            r.entry.operation,
            r.entry.outcome,
            r.entry.actor,
            r.entry.purpose,
        )?;
    }

    outln!(
        "\n== {}. Key rotation: a new data key for new events; old events stay readable",
        n + 2
    )?;
    let ops = AccessContext::new("ops", "quarterly-rotation");
    let new_key = crypto.rotate_data_key(&ops, &subject).await?;
    writer
        .append(
            customer,
            "customer",
            ExpectedVersion::Exact(1),
            vec![NewEvent::new(
                "CustomerEmailChanged",
                json!({ "email": "grace.hopper@navy.example" }),
            )],
        )
        .await?;
    for (version, data, _) in raw(pool.clone()).await? {
        outln!(
            "  v{version}: /email under data key {}",
            data["email"]["kid"].as_str().unwrap_or("?")
        )?;
    }
    outln!(
        "(new key {new_key}; `chronicle keys rotate-kek` re-wraps every data key under a new key-encryption key without touching events)"
    )?;
    for e in support.read_stream(customer, 1, None).await? {
        outln!("  v{} reads {}", e.version, e.event_data)?;
    }

    outln!(
        "\n== {}. Crypto-shredding: the customer's data keys are destroyed (erasure request)",
        n + 3
    )?;
    let destroyed = crypto
        .shred(&AccessContext::new("dpo", "erasure-request-17"), &subject)
        .await?;
    outln!(
        "{} data key(s) destroyed; the same read now:",
        destroyed.len()
    )?;
    let after = support.read_stream(customer, 1, None).await?;
    for e in &after {
        outln!("  v{} reads {}", e.version, e.event_data)?;
    }
    anyhow::ensure!(
        after[0].event_data["email"] == Redaction::Shredded.marker(),
        "the shredded field should read as redacted"
    );
    outln!(
        "The stream is intact and replays ({} events, versions unchanged); only the encrypted fields are gone, in the store, in rebuilt projections and in dead-letter copies alike.",
        after.len()
    )?;
    // Records are linked into the hash chain after commit; wait for the
    // ones just written, then check the chain.
    audit.seal_all(std::time::Duration::from_secs(10)).await?;
    let report = audit.verify().await?;
    outln!(
        "audit log: {} records sealed into the hash chain after commit ({} not yet), {}",
        report.checked,
        report.unsealed,
        if report.is_intact() {
            "intact"
        } else {
            "NOT INTACT"
        }
    )?;
    crate::demo::print_try(&[
        format!("chronicle keys list --subject {customer}"),
        format!("chronicle audit list --subject {customer}"),
        "chronicle audit verify".to_owned(),
    ])?;
    Ok(())
}
