//! `chronicle bench append`: the store against raw PostgreSQL, same run.
//!
//! Every case runs the store's operation and the nearest raw SQL equivalent
//! on the same server, in a scratch schema that is dropped afterwards, and
//! prints both rates and their ratio. Round trips per append are counted on
//! the wire: each switch from reading the server's answer to writing the
//! next request is one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, Position};
use chronicle_postgres::{MigrateOptions, PgEventStore, PgOptions, PgPool, migrate};
use clap::Args;
use deadpool_postgres::Connect;
use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::Database;
use crate::bench_commands::command_case;
use crate::output::{OutputFormat, write_record, write_table};
use crate::ui::notice;

/// `chronicle bench append` arguments.
#[derive(Debug, Args)]
pub struct AppendBenchArgs {
    /// Single-event appends per case (split across the writers).
    #[arg(long, default_value_t = 16_000)]
    events: usize,
    /// 100-event batches per batch case (split across the writers).
    #[arg(long, default_value_t = 400)]
    batches: usize,
    /// Events in the feed-read case.
    #[arg(long, default_value_t = 100_000)]
    feed_events: usize,
    /// Commands per command case (split across 16 tasks).
    #[arg(long, default_value_t = 16_000)]
    commands: usize,
    /// Run only the `synchronous_commit` setting given (default: both).
    #[arg(long)]
    synchronous_commit: Option<bool>,
    /// Combined batches in flight at once for the store's single-event
    /// appends (0: write-combining off; default: the store's, 2).
    #[arg(long)]
    combined_batches_in_flight: Option<usize>,
}

/// One side of a case: its rate and the rows it touched (written, read or
/// rewritten) in the measured run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Side {
    /// Events per second.
    pub rate: f64,
    /// Rows touched in the run the rate comes from.
    pub rows: u64,
    /// Per-call latency in the run the rate comes from, where measured.
    pub latency: Option<Latency>,
}

/// Percentiles of the time one call took, from its start to its answer, in
/// milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Latency {
    /// The median.
    pub p50_ms: f64,
    /// The 99th percentile.
    pub p99_ms: f64,
}

impl Latency {
    /// The percentiles of `samples` (nearest rank); none when empty.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Some(Latency {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
        })
    }
}

/// A timed run of calls: events per second and each call's latency.
pub(crate) struct Run {
    rate: f64,
    latency: Option<Latency>,
}

/// A run measured as a rate alone (no per-call latency).
impl From<f64> for Run {
    fn from(rate: f64) -> Run {
        Run {
            rate,
            latency: None,
        }
    }
}

impl Side {
    pub(crate) fn new(rate: f64, rows: u64) -> Side {
        Side {
            rate,
            rows,
            latency: None,
        }
    }

    /// The faster of two runs.
    pub(crate) fn best(self, other: Side) -> Side {
        if other.rate > self.rate { other } else { self }
    }
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// What was measured.
    pub name: String,
    /// The store's rate.
    pub events_per_sec: f64,
    /// The raw SQL rate on the same run.
    pub raw_events_per_sec: f64,
    /// `events_per_sec / raw_events_per_sec`.
    pub ratio: f64,
    /// Rows the store's side touched in its measured run.
    pub rows: u64,
    /// Rows the raw side touched in its measured run: equal to `rows`, or
    /// the benchmark fails, so that a baseline cannot do less (or more).
    pub raw_rows: u64,
    /// Protocol round trips per store call, where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_trips_per_call: Option<f64>,
    /// The store's median latency per call, in milliseconds, where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    /// The store's 99th-percentile latency per call, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// The raw side's median latency per call, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_p50_ms: Option<f64>,
    /// The raw side's 99th-percentile latency per call, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_p99_ms: Option<f64>,
}

impl Case {
    /// A case from both sides' measured runs; fails when they touched
    /// different numbers of rows.
    pub(crate) fn new(
        name: String,
        ours: Side,
        raw: Side,
        round_trips: Option<f64>,
    ) -> Result<Case> {
        anyhow::ensure!(
            ours.rows == raw.rows && ours.rows > 0,
            "{name}: the store's side touched {} rows and the raw side {}; a baseline must do \
             the same work",
            ours.rows,
            raw.rows
        );
        Ok(Case {
            ratio: if raw.rate > 0.0 {
                ours.rate / raw.rate
            } else {
                0.0
            },
            name,
            events_per_sec: ours.rate,
            raw_events_per_sec: raw.rate,
            rows: ours.rows,
            raw_rows: raw.rows,
            round_trips_per_call: round_trips,
            p50_ms: ours.latency.map(|l| l.p50_ms),
            p99_ms: ours.latency.map(|l| l.p99_ms),
            raw_p50_ms: raw.latency.map(|l| l.p50_ms),
            raw_p99_ms: raw.latency.map(|l| l.p99_ms),
        })
    }
}

/// Rows in the scratch schema's `events`.
pub(crate) async fn count_events(pool: &PgPool) -> Result<u64> {
    let n: i64 = pool
        .get()
        .await?
        .query_typed_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    Ok(n as u64)
}

/// Lines (rows) in a `COPY … TO STDOUT` text stream.
pub(crate) async fn copy_rows(client: &deadpool_postgres::Object, copy: &str) -> Result<u64> {
    let stream = client.copy_out(copy).await?;
    let rows = stream
        .map_ok(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .try_fold(0, |a, n| async move { Ok(a + n) })
        .await?;
    Ok(rows)
}

/// A scratch schema on the target database, dropped on [`Scratch::drop_schema`].
pub(crate) struct Scratch {
    options: PgOptions,
    schema: String,
}

impl Scratch {
    pub(crate) async fn create(db: &Database) -> Result<Scratch> {
        let schema = format!("chronicle_bench_{}", std::process::id());
        let admin = db.options()?.connect().await?;
        admin
            .get()
            .await?
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .context(
                "cannot create the benchmark's scratch schema (needs CREATE on the database)",
            )?;
        let options = db.options()?;
        let scratch = Scratch { options, schema };
        migrate(&scratch.pool(true, 1, None)?, MigrateOptions::default()).await?;
        Ok(scratch)
    }

    /// A pool whose sessions see only the scratch schema.
    pub(crate) fn pool(
        &self,
        synchronous_commit: bool,
        size: usize,
        counter: Option<Arc<Counter>>,
    ) -> Result<PgPool> {
        let mut options = self.options.clone();
        options.config_mut().options(format!(
            "-c search_path={} -c synchronous_commit={}",
            self.schema,
            if synchronous_commit { "on" } else { "off" }
        ));
        options.max_connections(size);
        Ok(match counter {
            Some(counter) => options.pool_with(CountingConnect { counter })?,
            None => options.pool()?,
        })
    }

    async fn truncate(&self) -> Result<()> {
        let pool = self.pool(true, 1, None)?;
        pool.get().await?.batch_execute("TRUNCATE events").await?;
        Ok(())
    }

    pub(crate) async fn drop_schema(self) -> Result<()> {
        let pool = self.pool(true, 1, None)?;
        pool.get()
            .await?
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await?;
        Ok(())
    }
}

/// Runs `chronicle bench append`.
pub async fn append(db: &Database, args: AppendBenchArgs, format: OutputFormat) -> Result<()> {
    let scratch = Scratch::create(db).await?;
    let result = run_cases(&scratch, &args, format).await;
    scratch.drop_schema().await?;
    let cases = result?;
    write_report("append", &cases, format)?;
    Ok(())
}

/// `chronicle bench crypto` arguments.
#[derive(Debug, Args)]
pub struct CryptoBenchArgs {
    /// Events appended per side and run, at least 500 (fewer make the
    /// append ratio move by ±0.1 from run to run).
    #[arg(long, default_value_t = 8000)]
    events: usize,
    /// Events per aggregate (each aggregate is one data subject with one
    /// data key).
    #[arg(long, default_value_t = 20)]
    per_aggregate: usize,
    /// Concurrent writers and readers (the read cases also run with four
    /// times as many readers).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// How many times each read case reads every aggregate (4,000 reads
    /// per run by default; at 1,000 the read ratios moved by ±0.1).
    #[arg(long, default_value_t = 10)]
    read_passes: usize,
    /// Run only the `synchronous_commit` setting given (default: both).
    #[arg(long)]
    synchronous_commit: Option<bool>,
    /// Plain JSON added to every event (a `details` object of about this
    /// many bytes), on both sides: the default event is ~110 bytes with
    /// half its fields encrypted, a small event's worst case.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Seconds between the background sealer's rounds (it derives the
    /// `encrypt` records and links every record into the chain; the run
    /// ends with a full seal and a verification either way), 0.01 to 3600.
    #[arg(long, default_value_t = 1.0, value_parser = seal_interval)]
    seal_every: f64,
    /// Also break the read cost down: ciphertext reads through the
    /// wrapper, decryption with the audit records thrown away, and the
    /// audit sink without group commit.
    #[arg(long)]
    profile: bool,
}

/// `--seal-every`: a number of seconds from 0.01 to 3600.
fn seal_interval(text: &str) -> std::result::Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if (0.01..=3600.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{text} is out of range: give 0.01 to 3600 seconds"))
    }
}

/// CPU time spent, from Linux's `/proc` (zeros, shown as not measured, elsewhere): the machine's
/// (every core, the database's share included) and this process's, in
/// microseconds, and the operations it was spent on. For `--profile`: a
/// ratio can fall because the database works harder or because the
/// client does.
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    machine_us: u64,
    process_us: u64,
    ops: usize,
}

impl CpuUse {
    /// The counters now (`ops` 0).
    fn now() -> Self {
        // The machine: busy time of every core, in USER_HZ (1/100 s) ticks.
        let machine_us = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let ticks: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal …
                let idle = ticks.get(3)? + ticks.get(4)?;
                Some((ticks.iter().take(8).sum::<u64>() - idle) * 10_000)
            })
            .unwrap_or(0);
        // This process: every thread's time on a CPU, in nanoseconds.
        let process_us = std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                    .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .sum::<u64>()
                    / 1000
            })
            .unwrap_or(0);
        CpuUse {
            machine_us,
            process_us,
            ops: 0,
        }
    }

    /// What was spent since `self` on `ops` operations.
    fn since(self, ops: usize) -> Self {
        let now = CpuUse::now();
        CpuUse {
            machine_us: now.machine_us.saturating_sub(self.machine_us),
            process_us: now.process_us.saturating_sub(self.process_us),
            ops,
        }
    }
}

impl std::ops::AddAssign for CpuUse {
    fn add_assign(&mut self, other: Self) {
        self.machine_us += other.machine_us;
        self.process_us += other.process_us;
        self.ops += other.ops;
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.machine_us == 0 && self.process_us == 0 {
            return write!(f, "not measured (it reads Linux's /proc)");
        }
        let ops = self.ops.max(1) as f64;
        let machine = self.machine_us as f64 / ops;
        let process = self.process_us as f64 / ops;
        write!(
            f,
            "{machine:.0} µs on the machine, {process:.0} µs of them in this process"
        )
    }
}

/// An audit sink that drops everything: for `--profile` only.
struct NullAudit;

#[async_trait::async_trait]
impl chronicle_crypto::AuditSink for NullAudit {
    async fn append(&self, _: Vec<chronicle_crypto::AuditEntry>) -> chronicle_crypto::Result<()> {
        Ok(())
    }
}

/// Times the appends of the sink underneath: for `--profile` only.
struct TimedAudit {
    inner: Arc<dyn chronicle_crypto::AuditSink>,
    appends: AtomicU64,
    entries: AtomicU64,
    micros: AtomicU64,
}

impl TimedAudit {
    fn new(inner: Arc<dyn chronicle_crypto::AuditSink>) -> Self {
        TimedAudit {
            inner,
            appends: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        }
    }

    /// "N appends, E entries each, L ms each", and resets.
    fn report(&self) -> String {
        let n = self.appends.swap(0, Ordering::Relaxed).max(1);
        let e = self.entries.swap(0, Ordering::Relaxed);
        let us = self.micros.swap(0, Ordering::Relaxed);
        format!(
            "{n} audit appends, {:.1} entries each, {:.2} ms each",
            e as f64 / n as f64,
            us as f64 / n as f64 / 1000.0
        )
    }
}

#[async_trait::async_trait]
impl chronicle_crypto::AuditSink for TimedAudit {
    async fn append(
        &self,
        entries: Vec<chronicle_crypto::AuditEntry>,
    ) -> chronicle_crypto::Result<()> {
        let started = Instant::now();
        let n = entries.len() as u64;
        let result = self.inner.append(entries).await;
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(n, Ordering::Relaxed);
        self.micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }
}

/// Runs `chronicle bench crypto`: appends and per-aggregate reads with two
/// encrypted fields per event (local keyring; data keys and the
/// hash-chained audit log in PostgreSQL: each append's writer context in
/// its events' metadata, from which a sealer running every second derives
/// the `encrypt` records and links every record into the chain; each
/// read's `decrypt` record through a group-commit sink before the read
/// returns), against the same without encryption, in the same run.
pub async fn crypto(db: &Database, args: CryptoBenchArgs, format: OutputFormat) -> Result<()> {
    // Each side appends --events twice before the bulk-read case reads
    // 1,000 of its events back.
    anyhow::ensure!(
        args.events >= 500,
        "--events {} is too few: the bulk-read case reads 1,000 events of each side, \
         and each side appends --events twice first; pass --events 500 or more",
        args.events
    );
    let scratch = Scratch::create(db).await?;
    let result = crypto_cases(&scratch, &args, format).await;
    scratch.drop_schema().await?;
    let cases = result?;
    write_report("crypto", &cases, format)?;
    Ok(())
}

async fn crypto_cases(
    scratch: &Scratch,
    args: &CryptoBenchArgs,
    format: OutputFormat,
) -> Result<Vec<Case>> {
    use chronicle_crypto::{
        AccessContext, EncryptionConfig, FieldEncryptorBuilder, GroupCommitAuditSink, LocalKeyring,
    };
    use chronicle_postgres::{PgAuditSink, PgDataKeyStore};

    let progress = crate::ui::spinner(format);
    progress.enable_steady_tick(Duration::from_millis(200));
    let writers = args.writers.max(1);
    let many = writers * 4;
    let modes: Vec<bool> = match args.synchronous_commit {
        Some(m) => vec![m],
        None => vec![true, false],
    };
    let mut cases = Vec::new();
    // One keyring for the run: the bulk reads of the second setting read
    // events encrypted in the first.
    let keyring = Arc::new(LocalKeyring::generate()?);
    for sync in modes {
        let tag = if sync { "sync on" } else { "sync off" };
        // The encrypted side's connections count their round trips.
        let counter = Arc::new(Counter::default());
        let pool = scratch.pool(sync, many + 2, Some(counter.clone()))?;
        let plain_pool = scratch.pool(sync, many + 2, None)?;
        let config = EncryptionConfig::from_yaml(
            "encryption:\n  events:\n    UserRegistered:\n      fields: [\"/email\", \"/address/street\"]\n",
        )?;
        let with_sink = |sink: Arc<dyn chronicle_crypto::AuditSink>| {
            let encryptor = FieldEncryptorBuilder::new(
                config.clone(),
                keyring.clone(),
                Arc::new(PgDataKeyStore::new(pool.clone())),
                sink,
            )
            .build();
            let store: Arc<dyn chronicle_core::EventStore> =
                Arc::new(PgEventStore::new(pool.clone()).encrypted(
                    Arc::new(encryptor),
                    AccessContext::new("bench", "benchmark"),
                ));
            store
        };
        let audit = Arc::new(PgAuditSink::new(pool.clone()));
        // Records are linked into the hash chain after commit, as an
        // application's sealer does: its cost is part of the run.
        let sealer = audit.spawn_sealer(Duration::from_secs_f64(args.seal_every.max(0.01)));
        let timed = Arc::new(TimedAudit::new(audit.clone()));
        let sink: Arc<dyn chronicle_crypto::AuditSink> = if args.profile {
            timed.clone()
        } else {
            audit.clone()
        };
        // One group-commit append in flight (the library's default): each
        // waits for a WAL flush, and readers arriving meanwhile share the
        // next one.
        let encrypted = with_sink(Arc::new(GroupCommitAuditSink::new(sink)));
        let plain: Arc<dyn chronicle_core::EventStore> =
            Arc::new(PgEventStore::new(plain_pool.clone()));
        let aggregates = args.events.div_ceil(args.per_aggregate.max(1));

        // Appends: sides alternate, each keeps its best of two runs (new
        // aggregates, so new subjects and keys, every run).
        let name = format!("append 1 event, 2 encrypted fields, {writers} writers, {tag}");
        progress.set_message(name.clone());
        let (mut ours, mut theirs, mut trips) = (Side::default(), Side::default(), 0f64);
        let mut secret_ids = Vec::new();
        let mut plain_ids = Vec::new();
        let (mut secret_cpu, mut plain_cpu) = (CpuUse::default(), CpuUse::default());
        for _ in 0..2 {
            secret_ids = (0..aggregates).map(|_| Uuid::now_v7()).collect();
            plain_ids = (0..aggregates).map(|_| Uuid::now_v7()).collect();
            counter.reset();
            let cpu = CpuUse::now();
            let (rate, calls) = user_appends(&encrypted, &secret_ids, args, SECRET_TYPE).await?;
            secret_cpu += cpu.since(calls);
            if rate > ours.rate {
                ours = Side::new(rate, calls as u64);
                trips = counter.round_trips() as f64 / calls as f64;
            }
            let cpu = CpuUse::now();
            let (rate, calls) = user_appends(&plain, &plain_ids, args, PLAIN_TYPE).await?;
            plain_cpu += cpu.since(calls);
            theirs = theirs.best(Side::new(rate, calls as u64));
        }
        if args.profile {
            progress.suspend(|| {
                notice!("{name}: CPU per append, encrypted {secret_cpu}; plain {plain_cpu}")
            });
        }
        cases.push(Case::new(name, ours, theirs, Some(trips))?);

        scratch
            .pool(true, 1, None)?
            .get()
            .await?
            .batch_execute("VACUUM ANALYZE events")
            .await?;
        // What the server and the wire alone pay for the larger rows: the
        // store's stream read as raw SQL on both sides, rows not decoded.
        // No reader that returns the fields can beat this ratio.
        let name = format!(
            "floor: read {}-event streams as raw SQL, rows not decoded, {writers} readers, {tag}",
            args.per_aggregate
        );
        progress.set_message(name.clone());
        let (mut ours, mut theirs) = (Side::default(), Side::default());
        for _ in 0..2 {
            let side = raw_stream_reads(&plain_pool, &secret_ids, writers, args.read_passes);
            ours = ours.best(side.await?);
            let side = raw_stream_reads(&plain_pool, &plain_ids, writers, args.read_passes);
            theirs = theirs.best(side.await?);
        }
        cases.push(Case::new(name, ours, theirs, None)?);
        for readers in [writers, many] {
            let name = format!(
                "read {}-event streams + decrypt + audit, {readers} readers, {tag}",
                args.per_aggregate
            );
            progress.set_message(name.clone());
            let (mut ours, mut theirs, mut trips) = (Side::default(), Side::default(), 0f64);
            let (mut secret_cpu, mut plain_cpu) = (CpuUse::default(), CpuUse::default());
            for _ in 0..2 {
                counter.reset();
                let cpu = CpuUse::now();
                let (side, calls) =
                    user_reads(&encrypted, &secret_ids, readers, args.read_passes, true).await?;
                secret_cpu += cpu.since(calls);
                if side.rate > ours.rate {
                    ours = side;
                    trips = counter.round_trips() as f64 / calls as f64;
                }
                let cpu = CpuUse::now();
                let (side, calls) =
                    user_reads(&plain, &plain_ids, readers, args.read_passes, true).await?;
                plain_cpu += cpu.since(calls);
                theirs = theirs.best(side);
            }
            if args.profile {
                progress.suspend(|| {
                    notice!(
                        "{name}: {}; CPU per read, encrypted {secret_cpu}; plain {plain_cpu}",
                        timed.report()
                    )
                });
            }
            cases.push(Case::new(name, ours, theirs, Some(trips))?);
        }
        // Bulk reads, as a projection or an export reads: 1,000 events per
        // call (one audit record per subject in them).
        let name = format!("read 1,000 events by type + decrypt + audit, {writers} readers, {tag}");
        progress.set_message(name.clone());
        let (mut ours, mut theirs, mut trips) = (Side::default(), Side::default(), 0f64);
        for _ in 0..2 {
            counter.reset();
            let (side, calls) =
                bulk_reads(&encrypted, SECRET_TYPE, writers, args.read_passes).await?;
            if side.rate > ours.rate {
                ours = side;
                trips = counter.round_trips() as f64 / calls as f64;
            }
            theirs = theirs.best(
                bulk_reads(&plain, PLAIN_TYPE, writers, args.read_passes)
                    .await?
                    .0,
            );
        }
        if args.profile {
            progress.suspend(|| notice!("{name}: {}", timed.report()));
        }
        cases.push(Case::new(name, ours, theirs, Some(trips))?);

        if args.profile {
            let in_flight = format!("decrypt + audit, group commit, {writers} in flight");
            let variants: [(&str, Arc<dyn chronicle_core::EventStore>); 4] = [
                (
                    "ciphertext through the wrapper",
                    Arc::new(
                        PgEventStore::new(pool.clone())
                            .encrypted(
                                Arc::new(
                                    FieldEncryptorBuilder::new(
                                        config.clone(),
                                        keyring.clone(),
                                        Arc::new(PgDataKeyStore::new(pool.clone())),
                                        Arc::new(NullAudit),
                                    )
                                    .build(),
                                ),
                                AccessContext::new("bench", "benchmark"),
                            )
                            .reading(chronicle_crypto::ReadMode::Ciphertext),
                    ),
                ),
                (
                    "decrypt, audit records dropped",
                    with_sink(Arc::new(NullAudit)),
                ),
                (
                    "decrypt + audit without group commit",
                    with_sink(timed.clone()),
                ),
                (
                    &in_flight,
                    with_sink(Arc::new(GroupCommitAuditSink::with_max_in_flight(
                        timed.clone(),
                        writers,
                    ))),
                ),
            ];
            // The audit append alone, as a 20-event read's record, from
            // as many tasks as there are readers: what one record costs.
            for tasks in [writers, many] {
                let name = format!("profile: audit appends alone, {tasks} tasks, {tag}");
                progress.set_message(name.clone());
                let cpu = CpuUse::now();
                let calls =
                    audit_appends(&audit, tasks, secret_ids.len() * args.read_passes).await?;
                let cpu = cpu.since(calls);
                progress.suspend(|| notice!("{name}: CPU per append {cpu}"));
            }
            for (what, store) in variants {
                for readers in [writers, many] {
                    let name = format!("profile: read + {what}, {readers} readers, {tag}");
                    progress.set_message(name.clone());
                    counter.reset();
                    let check = !what.starts_with("ciphertext");
                    let cpu = CpuUse::now();
                    let (ours, calls) =
                        user_reads(&store, &secret_ids, readers, args.read_passes, check).await?;
                    let cpu = cpu.since(calls);
                    let trips = counter.round_trips() as f64 / calls as f64;
                    let theirs = user_reads(&plain, &plain_ids, readers, args.read_passes, true)
                        .await?
                        .0;
                    let audited = if what.contains("audit without") || what.contains("in flight") {
                        format!("{}; ", timed.report())
                    } else {
                        String::new()
                    };
                    progress.suspend(|| notice!("{name}: {audited}CPU per read {cpu}"));
                    cases.push(Case::new(name, ours, theirs, Some(trips))?);
                }
            }
        }
        sealer.abort();
        anyhow::ensure!(
            audit.verify().await?.is_intact(),
            "the benchmark's audit log does not verify"
        );
    }
    progress.finish_and_clear();
    Ok(cases)
}

/// Each reader reads the first 1,000 events of `event_type` `passes` times
/// over. Returns events/s and the number of reads.
async fn bulk_reads(
    store: &Arc<dyn chronicle_core::EventStore>,
    event_type: &'static str,
    readers: usize,
    passes: usize,
) -> Result<(Side, usize)> {
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<(usize, usize)>>> = Vec::new();
    for _ in 0..readers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (mut events, mut calls) = (0, 0);
            for _ in 0..passes.max(1) * 2 {
                let read = store
                    .read_by_type(event_type, chronicle_core::TimeRange::default(), 1000)
                    .await?;
                anyhow::ensure!(
                    read.len() == 1000 && read.iter().all(|e| e.event_data["email"].is_string()),
                    "a bulk read returned {} events, or an undecrypted field",
                    read.len()
                );
                events += read.len();
                calls += 1;
            }
            Ok((events, calls))
        }));
    }
    read_rate(started, tasks).await
}

/// Reads every aggregate's stream `passes` times, spread over the readers,
/// with the store's statement as raw SQL (prepared), counting the rows
/// without decoding them: what the server and the wire pay.
async fn raw_stream_reads(
    pool: &PgPool,
    ids: &[Uuid],
    readers: usize,
    passes: usize,
) -> Result<Side> {
    const READ: &str = "SELECT event_id, aggregate_id, aggregate_type, event_type, event_data, \
                        metadata, version, timestamp, encrypted_fields, transaction_id, global_position \
                        FROM events WHERE aggregate_id = $1 AND version BETWEEN $2 AND $3 ORDER BY version";
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<(usize, usize)>>> = Vec::new();
    for r in 0..readers {
        let pool = pool.clone();
        let mine: Vec<Uuid> = ids.iter().skip(r).step_by(readers).copied().collect();
        tasks.push(tokio::spawn(async move {
            let client = pool.get().await?;
            let read = client
                .prepare_typed_cached(READ, &[Type::UUID, Type::INT4, Type::INT4])
                .await?;
            let (mut events, mut calls) = (0, 0);
            for _ in 0..passes.max(1) {
                for id in &mine {
                    events += client.query(&read, &[id, &1i32, &i32::MAX]).await?.len();
                    calls += 1;
                }
            }
            Ok((events, calls))
        }));
    }
    Ok(read_rate(started, tasks).await?.0)
}

/// `calls` appends of one record like a 20-event read's (20 events, two
/// fields), spread over `tasks`: for `--profile`. Returns `calls`.
async fn audit_appends(
    audit: &Arc<chronicle_postgres::PgAuditSink>,
    tasks: usize,
    calls: usize,
) -> Result<usize> {
    use chronicle_crypto::{
        AccessContext, AuditEntry, AuditOperation, AuditOutcome, AuditSink, DataKeyId, SubjectId,
    };
    let handles: Vec<JoinHandle<Result<()>>> = (0..tasks)
        .map(|t| {
            let audit = audit.clone();
            let mine = calls / tasks + usize::from(t < calls % tasks);
            tokio::spawn(async move {
                let context = AccessContext::new("bench", "benchmark");
                for _ in 0..mine {
                    let mut entry =
                        AuditEntry::new(AuditOperation::Decrypt, AuditOutcome::Success, &context)
                            .with_subject(&SubjectId::new(format!("user-{t}")))
                            .with_key(DataKeyId::from_uuid(Uuid::now_v7()));
                    for _ in 0..20 {
                        let event = Uuid::now_v7();
                        entry.add(event, "/email");
                        entry.add(event, "/address/street");
                    }
                    audit.append(vec![entry]).await?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(calls)
}

/// Waits for reader tasks that return (events, reads): events per second
/// since `started` with the events read, and the number of reads.
async fn read_rate(
    started: Instant,
    tasks: Vec<JoinHandle<Result<(usize, usize)>>>,
) -> Result<(Side, usize)> {
    let (mut events, mut calls) = (0, 0);
    for t in tasks {
        let (e, c) = t.await??;
        events += e;
        calls += c;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    Ok((Side::new(rate, events as u64), calls))
}

/// The encrypted side's event type, and the plain side's (the same
/// events, not in the encryption config), so that each side can read its
/// own events by type.
const SECRET_TYPE: &str = "UserRegistered";
const PLAIN_TYPE: &str = "UserRegisteredPlain";

/// The benchmark's event: two of its fields are encrypted on the
/// encrypted side; `payload_bytes` of plain `details` (in ~30-byte
/// entries) make it larger.
fn user_event(n: usize, event_type: &str, payload_bytes: usize) -> NewEvent {
    let mut data = json!({
        "email": format!("user{n}@example.com"),
        "name": "A. Person",
        "address": { "street": format!("{n} Long Road"), "city": "Leeds" },
        "plan": "pro",
    });
    if payload_bytes > 0 {
        let details: serde_json::Map<String, serde_json::Value> = (0..payload_bytes.div_ceil(30))
            .map(|i| (format!("d{i:03}"), json!(format!("value {n:>8} of {i:>4}"))))
            .collect();
        data["details"] = serde_json::Value::Object(details);
    }
    NewEvent::new(event_type, data)
}

/// Appends `per_aggregate` single-event appends to each aggregate, the
/// aggregates spread over the writers. Returns events/s and the number of
/// appends.
async fn user_appends(
    store: &Arc<dyn chronicle_core::EventStore>,
    ids: &[Uuid],
    args: &CryptoBenchArgs,
    event_type: &'static str,
) -> Result<(f64, usize)> {
    let writers = args.writers.max(1);
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<usize>>> = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let mine: Vec<Uuid> = ids.iter().skip(w).step_by(writers).copied().collect();
        let per = args.per_aggregate.max(1);
        let payload_bytes = args.payload_bytes;
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for id in mine {
                for v in 0..per {
                    let expected = if v == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(v as u32)
                    };
                    store
                        .append(
                            id,
                            "user",
                            expected,
                            vec![user_event(n, event_type, payload_bytes)],
                        )
                        .await?;
                    n += 1;
                }
            }
            Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), total))
}

/// Reads every aggregate's stream `passes` times, spread over the readers,
/// checking (with `check`) that every field came back decrypted. Returns
/// events/s with the events read, and the number of reads.
async fn user_reads(
    store: &Arc<dyn chronicle_core::EventStore>,
    ids: &[Uuid],
    readers: usize,
    passes: usize,
    check: bool,
) -> Result<(Side, usize)> {
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<(usize, usize)>>> = Vec::new();
    for r in 0..readers {
        let store = store.clone();
        let mine: Vec<Uuid> = ids.iter().skip(r).step_by(readers).copied().collect();
        tasks.push(tokio::spawn(async move {
            let (mut events, mut calls) = (0, 0);
            for _ in 0..passes.max(1) {
                for id in &mine {
                    let read = store.read_stream(*id, 1, None).await?;
                    anyhow::ensure!(
                        !check || read.iter().all(|e| e.event_data["email"].is_string()),
                        "a read returned an undecrypted or redacted field"
                    );
                    events += read.len();
                    calls += 1;
                }
            }
            Ok((events, calls))
        }));
    }
    read_rate(started, tasks).await
}

/// A benchmark's cases: one JSON object `{"benchmark", "cases"}`, or the
/// table of [`write_cases`].
pub(crate) fn write_report(
    benchmark: &str,
    cases: &[Case],
    format: OutputFormat,
) -> crate::output::Result {
    match format {
        OutputFormat::Json => {
            write_record(&json!({ "benchmark": benchmark, "cases": cases }), format)
        }
        OutputFormat::Table => write_cases(cases),
    }
}

/// Writes cases as a table with ratios.
pub fn write_cases(cases: &[Case]) -> crate::output::Result {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec![
            "case",
            "chronicle ev/s",
            "raw ev/s",
            "ratio",
            "round trips/call",
            "p50 / p99 ms",
            "raw p50 / p99 ms",
        ]);
    let latency = |p50: Option<f64>, p99: Option<f64>| match (p50, p99) {
        (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
        _ => "-".into(),
    };
    for c in cases {
        table.add_row(vec![
            c.name.clone(),
            format!("{:.0}", c.events_per_sec),
            format!("{:.0}", c.raw_events_per_sec),
            format!("{:.2}x", c.ratio),
            c.round_trips_per_call
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            latency(c.p50_ms, c.p99_ms),
            latency(c.raw_p50_ms, c.raw_p99_ms),
        ]);
    }
    write_table(&table)
}

async fn run_cases(
    scratch: &Scratch,
    args: &AppendBenchArgs,
    format: OutputFormat,
) -> Result<Vec<Case>> {
    let progress = crate::ui::spinner(format);
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut cases = Vec::new();
    let modes: Vec<bool> = match args.synchronous_commit {
        Some(m) => vec![m],
        None => vec![true, false],
    };
    for sync in modes {
        let tag = if sync { "sync on" } else { "sync off" };
        // (writers, events per append, appends per case)
        let shapes = [
            (1usize, 1usize, args.events),
            (4, 1, args.events),
            (16, 1, args.events),
            (1, 100, args.batches),
            (4, 100, args.batches),
        ];
        for (writers, size, calls) in shapes {
            let name = if size == 1 {
                format!("append 1 event, {writers} writers, {tag}")
            } else {
                format!("append {size}-event batch, {writers} writers, {tag}")
            };
            progress.set_message(name.clone());
            // Round trips are counted on a pool of their own, in a run of
            // their own: the timed runs go through plain sockets on both
            // sides.
            let counter = Arc::new(Counter::default());
            let counted = combining(
                PgEventStore::new(scratch.pool(sync, writers, Some(counter.clone()))?),
                args,
            );
            appends(&counted, writers, writers * 8, size).await?;
            counter.reset();
            appends(&counted, writers, writers * 8, size).await?;
            let trips = counter.round_trips() as f64 / (writers * 8) as f64;
            drop(counted);
            let store = combining(PgEventStore::new(scratch.pool(sync, writers, None)?), args);
            let raw = scratch.pool(sync, writers, None)?;
            warm(&store, &raw, writers).await?;
            // Warm both sides' sessions as an application's are: each
            // connection has run its statements (and PL/pgSQL its cached
            // plans) more than the five custom-planned times.
            appends(&store, writers, writers * 8, size).await?;
            raw_inserts(&raw, writers, writers * 8, size).await?;
            scratch.truncate().await?;
            // Alternate which side goes first and keep each one's best of
            // two, so neither always runs on the warmer (or fuller) table.
            let (mut ours, mut theirs) = (Side::default(), Side::default());
            for round in 0..2 {
                if round == 1 {
                    let side = rows_added(&raw, raw_inserts(&raw, writers, calls, size)).await?;
                    theirs = theirs.best(side);
                }
                let side = rows_added(&raw, appends(&store, writers, calls, size)).await?;
                ours = ours.best(side);
                if round == 0 {
                    let side = rows_added(&raw, raw_inserts(&raw, writers, calls, size)).await?;
                    theirs = theirs.best(side);
                }
                scratch.truncate().await?;
            }
            cases.push(Case::new(name, ours, theirs, Some(trips))?);
        }
    }

    progress.set_message("loading a 1,000-event aggregate");
    let pool = scratch.pool(false, 4, None)?;
    let store = PgEventStore::new(pool.clone());
    let id = Uuid::now_v7();
    for chunk in 0..10 {
        let events = (0..100).map(|i| event(chunk * 100 + i)).collect();
        store
            .append(id, "bench", ExpectedVersion::Any, events)
            .await?;
    }
    // Both sides warm (statements prepared, pages cached), then best of
    // two, alternating.
    let rounds = 50;
    stream_loads(&store, id, 5).await?;
    raw_stream_loads(&pool, id, 5).await?;
    let (mut ours, mut theirs) = (Side::default(), Side::default());
    for _ in 0..2 {
        ours = ours.best(stream_loads(&store, id, rounds).await?);
        theirs = theirs.best(raw_stream_loads(&pool, id, rounds).await?);
    }
    cases.push(Case::new(
        "load a 1,000-event aggregate (vs raw prepared SELECT, rows streamed and decoded)".into(),
        ours,
        theirs,
        None,
    )?);

    // The command path: 16 tasks, each on aggregates of its own, sync off
    // (the software, not the disk).
    let tasks = 16;
    let commands_pool = scratch.pool(false, tasks, None)?;
    for cache in [0, 100_000] {
        progress.set_message(format!("executing commands, cache of {cache}"));
        cases.push(command_case(&commands_pool, tasks, args.commands, cache).await?);
    }
    drop(commands_pool);
    scratch.truncate().await?;

    progress.set_message(format!("filling the feed with {} events", args.feed_events));
    let writers = 4;
    appends(&store, writers, args.feed_events.div_ceil(100), 100).await?;
    let total = {
        let c = pool.get().await?;
        c.query_typed_one("SELECT count(*) FROM events", &[])
            .await?
            .get::<_, i64>(0)
    };
    // Settle the table first (hint bits, visibility map, statistics), as a
    // feed in steady state is; otherwise whichever side reads first pays for
    // setting hint bits on every fresh row. Then best of two for each side.
    pool.get()
        .await?
        .batch_execute("VACUUM ANALYZE events")
        .await?;
    // The feed stops at the horizon: wait until every append is below it
    // (a transaction open anywhere in the cluster holds it back).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let visible: bool = pool
            .get()
            .await?
            .query_typed_one(
                "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true)
                   FROM events",
                &[],
            )
            .await?
            .get(0);
        if visible {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the feed horizon stayed behind the appends for 30 s: a transaction open in the \
             cluster holds it back (`chronicle status` shows which)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.set_message("reading the feed");
    let (mut ours, mut theirs) = (Side::default(), Side::default());
    for _ in 0..2 {
        let started = Instant::now();
        let mut after = Position::START;
        let mut read = 0i64;
        loop {
            let batch = store.read_all(after, 5000).await?;
            if batch.events.is_empty() {
                break;
            }
            read += batch.events.len() as i64;
            after = batch.next;
        }
        anyhow::ensure!(read == total, "the feed returned {read} of {total} events");
        let rate = read as f64 / started.elapsed().as_secs_f64();
        ours = ours.best(Side::new(rate, read as u64));

        let client = pool.get().await?;
        let started = Instant::now();
        let rows = copy_rows(&client, "COPY events TO STDOUT").await?;
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        theirs = theirs.best(Side::new(rate, rows));
    }
    cases.push(Case::new(
        format!("read the global feed, {total} events (vs raw COPY TO STDOUT, rows not decoded)"),
        ours,
        theirs,
        None,
    )?);
    progress.finish_and_clear();
    Ok(cases)
}

/// `store` with write-combining as `args` say.
fn combining(mut store: PgEventStore, args: &AppendBenchArgs) -> PgEventStore {
    match args.combined_batches_in_flight {
        Some(0) => store.combine_appends(false),
        Some(n) => store.combined_batches_in_flight(n),
        None => &mut store,
    };
    store
}

/// Runs `work` (a timed run of appends), with the rows it added to
/// `events`.
pub(crate) async fn rows_added<R: Into<Run>>(
    pool: &PgPool,
    work: impl std::future::Future<Output = Result<R>>,
) -> Result<Side> {
    let before = count_events(pool).await?;
    let run: Run = work.await?.into();
    let rows = count_events(pool).await?.saturating_sub(before);
    Ok(Side {
        latency: run.latency,
        ..Side::new(run.rate, rows)
    })
}

/// `rounds` loads of aggregate `id` through the store: events/s, with
/// the events loaded.
async fn stream_loads(store: &PgEventStore, id: Uuid, rounds: usize) -> Result<Side> {
    let started = Instant::now();
    let mut rows = 0u64;
    for _ in 0..rounds {
        rows += store.read_stream(id, 1, None).await?.len() as u64;
    }
    Ok(Side::new(
        rows as f64 / started.elapsed().as_secs_f64(),
        rows,
    ))
}

/// `transaction_id`, decoded as a client must: an `xid8` is 8 big-endian
/// bytes.
#[allow(
    dead_code,
    reason = "decoded as a client would; the benchmark reads no field"
)]
struct RawXid8(u64);

impl<'a> tokio_postgres::types::FromSql<'a> for RawXid8 {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawXid8(u64::from_be_bytes(raw.try_into()?)))
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }
}

/// The metadata a hand-written client keeps: the fields it knows, decoded
/// straight from the JSON (serde derive), unknown ones skipped.
#[derive(serde::Deserialize)]
#[allow(
    dead_code,
    reason = "decoded as a client would; the benchmark reads no field"
)]
struct RawMetadata {
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    actor: Option<String>,
    schema_version: Option<u32>,
}

/// One event as a hand-written client would hold it: every column the
/// store reads, decoded (the data as a JSON tree, the metadata typed).
#[allow(
    dead_code,
    reason = "decoded as a client would; the benchmark reads no field"
)]
struct RawEvent {
    event_id: Uuid,
    aggregate_id: Uuid,
    aggregate_type: String,
    event_type: String,
    event_data: serde_json::Value,
    metadata: RawMetadata,
    version: i32,
    timestamp: chrono::DateTime<chrono::Utc>,
    encrypted_fields: Option<Vec<String>>,
    transaction_id: RawXid8,
    global_position: i64,
}

/// `rounds` loads of aggregate `id` by hand, the fastest natural way: the
/// store's statement, prepared once on the connection, rows decoded into
/// [`RawEvent`]s as they stream in. Events/s, with the events loaded.
async fn raw_stream_loads(pool: &PgPool, id: Uuid, rounds: usize) -> Result<Side> {
    let client = pool.get().await?;
    let statement = client
        .prepare_typed_cached(
            &format!(
                "SELECT {} FROM events WHERE aggregate_id = $1 AND version BETWEEN $2 AND $3 \
                 ORDER BY version",
                chronicle_postgres::sql::EVENT_COLUMNS
            ),
            &[Type::UUID, Type::INT4, Type::INT4],
        )
        .await?;
    let started = Instant::now();
    let mut rows = 0u64;
    for _ in 0..rounds {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&id, &1i32, &i32::MAX];
        let stream = client.query_raw(&statement, params).await?;
        futures_util::pin_mut!(stream);
        let mut events = Vec::new();
        while let Some(r) = stream.try_next().await? {
            events.push(RawEvent {
                event_id: r.try_get(0)?,
                aggregate_id: r.try_get(1)?,
                aggregate_type: r.try_get(2)?,
                event_type: r.try_get(3)?,
                event_data: r.try_get(4)?,
                metadata: r
                    .try_get::<_, tokio_postgres::types::Json<RawMetadata>>(5)?
                    .0,
                version: r.try_get(6)?,
                timestamp: r.try_get(7)?,
                encrypted_fields: r.try_get(8)?,
                transaction_id: r.try_get(9)?,
                global_position: r.try_get(10)?,
            });
        }
        rows += events.len() as u64;
    }
    Ok(Side::new(
        rows as f64 / started.elapsed().as_secs_f64(),
        rows,
    ))
}

fn event(i: usize) -> NewEvent {
    NewEvent::new(
        "BenchEvent",
        json!({ "n": i, "email": "someone@example.com", "name": "A. Person", "tags": ["a", "b"] }),
    )
}

/// One connection of each pool opened, so neither side pays for connecting.
async fn warm(store: &PgEventStore, raw: &PgPool, writers: usize) -> Result<()> {
    let mut held = Vec::new();
    for _ in 0..writers {
        held.push(store.pool().get().await?);
        held.push(raw.get().await?);
    }
    Ok(())
}

/// `calls` appends of `size` events, spread over `writers` tasks, each on
/// its own aggregates with exact expected versions. Returns events/s and
/// each append's latency.
async fn appends(store: &PgEventStore, writers: usize, calls: usize, size: usize) -> Result<Run> {
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<Vec<Duration>>>> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let mine = calls / writers + usize::from(w < calls % writers);
            tokio::spawn(async move {
                let mut id = Uuid::now_v7();
                let mut version = 0u32;
                let mut latencies = Vec::with_capacity(mine);
                for i in 0..mine {
                    if version >= 1000 {
                        id = Uuid::now_v7();
                        version = 0;
                    }
                    let expected = ExpectedVersion::after(version);
                    let events = (0..size).map(|j| event(i * size + j)).collect();
                    let call = Instant::now();
                    version = store.append(id, "bench", expected, events).await?.version;
                    latencies.push(call.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    finish(started, calls * size, tasks).await
}

/// Waits for `tasks` (each returning its calls' latencies): the rate of
/// `events` since `started`, and the latency percentiles over all calls.
async fn finish(
    started: Instant,
    events: usize,
    tasks: Vec<JoinHandle<Result<Vec<Duration>>>>,
) -> Result<Run> {
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Run {
        rate: events as f64 / started.elapsed().as_secs_f64(),
        latency: Latency::of(latencies),
    })
}

/// The same rows with plain INSERTs, one statement per call: `VALUES` for
/// one event, `INSERT … SELECT FROM unnest(…)` for a batch; prepared once
/// per connection, as the store's appends are. Returns events/s and each
/// statement's latency.
async fn raw_inserts(pool: &PgPool, writers: usize, calls: usize, size: usize) -> Result<Run> {
    const ONE: &str = "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version) \
                       VALUES ($1, $2, 'bench', 'BenchEvent', $3, $4, $5)";
    const MANY: &str = "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version) \
                        SELECT t.id, $2, 'bench', 'BenchEvent', t.d, t.m, $3 + t.n::int \
                          FROM unnest($1::uuid[], $4::jsonb[], $5::jsonb[]) WITH ORDINALITY AS t(id, d, m, n)";
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<Vec<Duration>>>> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            let mine = calls / writers + usize::from(w < calls % writers);
            tokio::spawn(async move {
                let client = pool.get().await?;
                let one = client
                    .prepare_typed_cached(
                        ONE,
                        &[Type::UUID, Type::UUID, Type::JSONB, Type::JSONB, Type::INT4],
                    )
                    .await?;
                let many = client
                    .prepare_typed_cached(
                        MANY,
                        &[
                            Type::UUID_ARRAY,
                            Type::UUID,
                            Type::INT4,
                            Type::JSONB_ARRAY,
                            Type::JSONB_ARRAY,
                        ],
                    )
                    .await?;
                let mut id = Uuid::now_v7();
                let mut version = 0i32;
                let mut latencies = Vec::with_capacity(mine);
                for i in 0..mine {
                    if version >= 1000 {
                        id = Uuid::now_v7();
                        version = 0;
                    }
                    if size == 1 {
                        // One row: the plainest INSERT there is.
                        let data = event(i).data;
                        let meta = json!({ "schema_version": 1 });
                        let v = version + 1;
                        let call = Instant::now();
                        client
                            .execute(&one, &[&Uuid::now_v7(), &id, &data, &meta, &v])
                            .await?;
                        latencies.push(call.elapsed());
                        version = v;
                        continue;
                    }
                    let ids: Vec<Uuid> = (0..size).map(|_| Uuid::now_v7()).collect();
                    let data: Vec<serde_json::Value> =
                        (0..size).map(|j| event(i * size + j).data).collect();
                    let meta: Vec<serde_json::Value> =
                        (0..size).map(|_| json!({ "schema_version": 1 })).collect();
                    let call = Instant::now();
                    client
                        .execute(&many, &[&ids, &id, &version, &data, &meta])
                        .await?;
                    latencies.push(call.elapsed());
                    version += size as i32;
                }
                Ok(latencies)
            })
        })
        .collect();
    finish(started, calls * size, tasks).await
}

/// Counts request/response round trips on the sockets it creates.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    round_trips: AtomicU64,
}

impl Counter {
    fn reset(&self) {
        self.round_trips.store(0, Ordering::Relaxed);
    }

    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }
}

/// A socket that counts each first write after a read (or at the start) as
/// one round trip.
struct CountingStream<S> {
    inner: S,
    counter: Arc<Counter>,
    awaiting_reply: AtomicBool,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.awaiting_reply.store(false, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0)
            && !self.awaiting_reply.swap(true, Ordering::Relaxed)
        {
            self.counter.round_trips.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens plain (non-TLS) connections through a [`CountingStream`].
struct CountingConnect {
    counter: Arc<Counter>,
}

impl Connect for CountingConnect {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let config = config.clone();
        let counter = self.counter.clone();
        Box::pin(async move {
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let host = config.get_hosts().first().cloned();
            macro_rules! finish {
                ($socket:expr) => {{
                    let stream = CountingStream {
                        inner: $socket,
                        counter,
                        awaiting_reply: AtomicBool::new(false),
                    };
                    let (client, connection) =
                        config.connect_raw(stream, tokio_postgres::NoTls).await?;
                    let handle = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok((client, handle))
                }};
            }
            match host {
                Some(Host::Unix(dir)) => {
                    if let Ok(socket) =
                        tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await
                    {
                        return finish!(socket);
                    }
                }
                Some(Host::Tcp(h)) => {
                    if let Ok(socket) = tokio::net::TcpStream::connect((h.as_str(), port)).await {
                        let _ = socket.set_nodelay(true);
                        return finish!(socket);
                    }
                }
                None => {}
            }
            // The socket could not be opened: let tokio-postgres try, so the
            // error it reports is its own.
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            Ok((
                client,
                tokio::spawn(async move {
                    let _ = connection.await;
                }),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_whose_sides_touched_different_rows_is_refused() {
        let e = Case::new("x".into(), Side::new(2.0, 10), Side::new(1.0, 9), None).unwrap_err();
        assert!(
            e.to_string().contains("touched 10 rows and the raw side 9"),
            "{e}"
        );
        assert!(Case::new("x".into(), Side::new(1.0, 0), Side::new(1.0, 0), None).is_err());
        let case = Case::new("x".into(), Side::new(3.0, 10), Side::new(2.0, 10), None).unwrap();
        assert_eq!((case.ratio, case.rows, case.raw_rows), (1.5, 10, 10));
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        assert_eq!(Latency::of(Vec::new()), None);
        // 1 ms .. 200 ms, shuffled: the median is the 100th, p99 the 198th.
        let samples: Vec<Duration> = (1..=200u64)
            .rev()
            .map(|ms| Duration::from_millis((ms * 37) % 200 + 1))
            .collect();
        let l = Latency::of(samples).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms), (100.0, 198.0));
        let one = Latency::of(vec![Duration::from_micros(1500)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (1.5, 1.5));
        let side = Side {
            latency: Some(one),
            ..Side::new(2.0, 10)
        };
        let case = Case::new("x".into(), side, Side::new(1.0, 10), None).unwrap();
        assert_eq!((case.p50_ms, case.raw_p50_ms), (Some(1.5), None));
    }
}
