//! `chronicle bench snapshots`: loading one long-lived aggregate through
//! its snapshot against a raw prepared `SELECT` of the snapshot row plus
//! the tail, and against loading it without a snapshot, in one run on one
//! server (a scratch schema, dropped afterwards).

use std::time::{Duration, Instant};

use anyhow::Result;
use chronicle_core::{
    Aggregate, DomainEvent, Repository, Snapshot, SnapshotPolicy, SnapshotStore, Snapshotting,
};
use chronicle_postgres::{PgEventStore, PgPool};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Database;
use crate::bench::{Case, Scratch, Side, write_report};
use crate::commands::at_least_one;
use crate::output::OutputFormat;

/// `chronicle bench snapshots` arguments.
#[derive(Debug, Args)]
pub struct SnapshotsBenchArgs {
    /// The aggregate's events.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one)]
    events: usize,
    /// Events after the snapshot (the tail every load folds).
    #[arg(long, default_value_t = 50)]
    tail: usize,
    /// How long each snapshot-load side runs, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum LedgerEvent {
    Posted { amount: i64, memo: String },
}
impl DomainEvent for LedgerEvent {}

#[derive(Debug, thiserror::Error)]
#[error("the bench ledger takes no commands")]
struct NoCommands;

/// A ledger: a balance, a count and the last memo.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    balance: i64,
    postings: u64,
    last_memo: String,
}

impl Aggregate for Ledger {
    const TYPE: &'static str = "bench-ledger";
    type Event = LedgerEvent;
    type Command = ();
    type Error = NoCommands;
    fn apply(&mut self, LedgerEvent::Posted { amount, memo }: LedgerEvent) {
        self.balance += amount;
        self.postings += 1;
        self.last_memo = memo;
    }
    fn handle(&self, _: ()) -> Result<Vec<LedgerEvent>, NoCommands> {
        Err(NoCommands)
    }
}

impl Snapshotting for Ledger {
    const SNAPSHOT_VERSION: u32 = 1;
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::EveryEvents(1_000)
    }
}

/// What the raw side reads: the snapshot row and the tail, one prepared
/// statement each, sent together on one connection (pipelined: one round
/// trip), decoded into `serde_json::Value`s and summed.
const RAW_SNAPSHOT: &str = "SELECT version, state FROM snapshots WHERE aggregate_id = $1";
const RAW_TAIL: &str = "SELECT version, event_type, event_data FROM events \
     WHERE aggregate_id = $1 AND version > (SELECT version FROM snapshots WHERE aggregate_id = $1) \
     ORDER BY version";
const RAW_ALL: &str = "SELECT version, event_type, event_data FROM events \
     WHERE aggregate_id = $1 ORDER BY version";

/// Runs `chronicle bench snapshots`.
pub async fn snapshots(
    db: &Database,
    args: SnapshotsBenchArgs,
    format: OutputFormat,
) -> Result<()> {
    anyhow::ensure!(
        args.tail < args.events,
        "--tail must be below --events (the snapshot needs at least one event)"
    );
    let scratch = Scratch::create(db).await?;
    let result = cases(&scratch, &args, format).await;
    scratch.drop_schema().await?;
    let cases = result?;
    write_report("snapshots", &cases, format)?;
    Ok(())
}

async fn cases(
    scratch: &Scratch,
    args: &SnapshotsBenchArgs,
    format: OutputFormat,
) -> Result<Vec<Case>> {
    let progress = crate::ui::spinner(format);
    progress.enable_steady_tick(Duration::from_millis(200));
    let pool = scratch.pool(true, 2, None)?;
    let n = args.events as i64;
    let id = Uuid::now_v7();
    progress.set_message(format!("loading {n} events of one aggregate"));
    load(&pool, id, n).await?;
    let store = PgEventStore::new(pool.clone());
    let repo = Repository::new(store.clone());
    let at = (args.events - args.tail) as u32;
    let (state, version) = repo.load_at_version::<Ledger>(id, at).await?;
    store
        .save_snapshot(&Snapshot {
            aggregate_id: id,
            aggregate_type: Ledger::TYPE.into(),
            version,
            schema_version: Ledger::SNAPSHOT_VERSION,
            upcaster_version: 0,
            state: serde_json::to_value(&state)?,
            created_at: None,
        })
        .await?;
    pool.get()
        .await?
        .batch_execute("VACUUM ANALYZE events")
        .await?;
    pool.get()
        .await?
        .batch_execute("VACUUM ANALYZE snapshots")
        .await?;
    let (full, _) = repo.load::<Ledger>(id).await?;
    let events = args.events as u64;
    let mut cases = Vec::new();

    progress.set_message("snapshot + tail: Repository against raw prepared SELECTs");
    let snapshot_load = || async {
        let (s, v) = repo.load_snapshotted::<Ledger>(id).await?;
        anyhow::ensure!(
            u64::from(v) == events && s.balance == full.balance,
            "the snapshot load is off"
        );
        Ok(())
    };
    // As many loads on each side as the repository does in the window.
    let calibration = timed(Duration::from_secs_f64(args.seconds), events, snapshot_load).await?;
    let loads = (calibration.rows / events).max(1);
    let (mut ours, mut raw) = (Side::default(), Side::default());
    for _ in 0..2 {
        ours = ours.best(fixed(loads, events, snapshot_load).await?);
        raw = raw.best(fixed(loads, events, || raw_snapshot_load(&pool, id, events)).await?);
    }
    cases.push(Case::new(
        format!(
            "load a {n}-event aggregate from its snapshot + {}-event tail (vs raw prepared SELECT of snapshot row + tail), {loads} loads; events/s counts {n} per load",
            args.tail
        ),
        ours,
        raw,
        None,
    )?);

    progress.set_message(format!("without a snapshot: {n} events per load"));
    let (mut whole, mut raw_whole) = (Side::default(), Side::default());
    for _ in 0..2 {
        whole = whole.best(
            fixed(1, events, || async {
                repo.load::<Ledger>(id).await?;
                Ok(())
            })
            .await?,
        );
        raw_whole = raw_whole.best(fixed(1, events, || raw_full_load(&pool, id, events)).await?);
    }
    cases.push(Case::new(
        format!(
            "load a {n}-event aggregate without a snapshot (vs raw prepared SELECT of every event)"
        ),
        whole,
        raw_whole,
        None,
    )?);
    // Same unit on both sides: one load of the aggregate.
    let per_load = |side: Side| Side::new(side.rate, events);
    cases.push(Case::new(
        format!(
            "load a {n}-event aggregate with its snapshot (vs Repository::load folding every event, in the raw column)"
        ),
        per_load(ours),
        per_load(whole),
        None,
    )?);
    progress.finish_and_clear();
    Ok(cases)
}

/// `n` Posted events of aggregate `id`, in one set-based insert per 100,000.
async fn load(pool: &PgPool, id: Uuid, n: i64) -> Result<()> {
    let client = pool.get().await?;
    let mut start = 0i64;
    while start < n {
        let end = (start + 100_000).min(n);
        client
            .execute(
                "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
                                     event_data, metadata, version) \
                 SELECT gen_random_uuid(), $3, 'bench-ledger', 'Posted', \
                        jsonb_build_object('amount', (g % 201) - 100, 'memo', 'posting ' || g), \
                        jsonb_build_object('schema_version', 1, 'actor', 'bench'), g::int + 1 \
                   FROM generate_series($1::bigint, $2::bigint - 1) AS g",
                &[&start, &end, &id],
            )
            .await?;
        start = end;
    }
    Ok(())
}

/// The raw read of the snapshot row and the tail, both prepared and
/// pipelined, with the same folding work as the repository (the balance).
async fn raw_snapshot_load(pool: &PgPool, id: Uuid, events: u64) -> Result<()> {
    let client = pool.get().await?;
    let (snapshot, tail) = (
        client.prepare_cached(RAW_SNAPSHOT).await?,
        client.prepare_cached(RAW_TAIL).await?,
    );
    let (row, tail) = futures_util::future::try_join(
        client.query_one(&snapshot, &[&id]),
        client.query(&tail, &[&id]),
    )
    .await?;
    let state: Value = row.get(1);
    let mut balance = state["balance"].as_i64().unwrap_or(0);
    let mut version: i32 = row.get(0);
    for r in &tail {
        let data: Value = r.get(2);
        balance += data["amount"].as_i64().unwrap_or(0);
        version = r.get(0);
    }
    anyhow::ensure!(version as u64 == events, "the raw read is off");
    std::hint::black_box(balance);
    Ok(())
}

async fn raw_full_load(pool: &PgPool, id: Uuid, events: u64) -> Result<()> {
    let client = pool.get().await?;
    let all = client.prepare_cached(RAW_ALL).await?;
    let rows = client.query(&all, &[&id]).await?;
    let mut balance = 0i64;
    for r in &rows {
        let data: Value = r.get(2);
        balance += data["amount"].as_i64().unwrap_or(0);
    }
    anyhow::ensure!(rows.len() as u64 == events, "the raw read is off");
    std::hint::black_box(balance);
    Ok(())
}

/// Runs `load` for `window`; the rate counts `events` per load.
async fn timed<F, Fut>(window: Duration, events: u64, mut load: F) -> Result<Side>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let mut loads = 0u64;
    while started.elapsed() < window {
        load().await?;
        loads += 1;
    }
    let rows = loads * events;
    Ok(Side::new(
        rows as f64 / started.elapsed().as_secs_f64(),
        rows,
    ))
}

/// Runs `load` `loads` times; the rate counts `events` per load.
async fn fixed<F, Fut>(loads: u64, events: u64, mut load: F) -> Result<Side>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    for _ in 0..loads {
        load().await?;
    }
    let rows = loads * events;
    Ok(Side::new(
        rows as f64 / started.elapsed().as_secs_f64(),
        rows,
    ))
}
