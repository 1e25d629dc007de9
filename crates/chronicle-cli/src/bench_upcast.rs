//! `chronicle bench upcast`: the eager runner against a raw SQL rewrite of
//! the same rows, and lazy upcasting on read against plain reads, in one
//! run on one server (a scratch schema, dropped afterwards).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chronicle_core::{EventReader, Position};
use chronicle_postgres::{PgEventStore, PgPool};
use chronicle_upcast::{PgUpcaster, UpcastConfig, UpcasterChain, UpcastingReader};
use clap::Args;

use crate::Database;
use crate::bench::{Case, Scratch, Side, write_report};
use crate::commands::at_least_one;
use crate::output::OutputFormat;

/// `chronicle bench upcast` arguments.
#[derive(Debug, Args)]
pub struct UpcastBenchArgs {
    /// Events rewritten per side (10 per aggregate).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per batch of the eager runner.
    #[arg(long, default_value_t = 5_000, value_parser = at_least_one)]
    batch_size: usize,
    /// Events per page in the read cases.
    #[arg(long, default_value_t = 5_000, value_parser = at_least_one)]
    page: usize,
}

/// The migration measured: what the raw UPDATE below does too.
const UPCASTERS: &str = r#"
upcasters:
  - event_type: ItemAdded
    from: 1
    steps:
      - rename: { from: /name, to: /title }
      - add: { path: /qty, default: 1 }
"#;

/// The same rewrite as one set-based statement.
const RAW_UPDATE: &str = "UPDATE events \
    SET event_data = jsonb_set(jsonb_set(event_data - 'name', '{title}', event_data -> 'name'), \
                               '{qty}', coalesce(event_data -> 'qty', '1')), \
        metadata = jsonb_set(coalesce(metadata, '{}'), '{schema_version}', '2') \
  WHERE event_type = 'ItemAdded' \
    AND coalesce((metadata ->> 'schema_version')::int, 1) = 1";

/// Runs `chronicle bench upcast`.
pub async fn upcast(db: &Database, args: UpcastBenchArgs, format: OutputFormat) -> Result<()> {
    let scratch = Scratch::create(db).await?;
    let result = cases(&scratch, &args, format).await;
    scratch.drop_schema().await?;
    let cases = result?;
    write_report("upcast", &cases, format)?;
    Ok(())
}

async fn cases(
    scratch: &Scratch,
    args: &UpcastBenchArgs,
    format: OutputFormat,
) -> Result<Vec<Case>> {
    let progress = crate::ui::spinner(format);
    progress.enable_steady_tick(Duration::from_millis(200));
    let pool = scratch.pool(true, 4, None)?;
    let n = args.events as i64;
    progress.set_message(format!("loading {n} ItemAdded v1 events"));
    load(&pool, n).await?;
    settle(&pool).await?;

    let chain = Arc::new(
        UpcasterChain::builder()
            .config(UpcastConfig::from_yaml("bench", UPCASTERS)?)
            .build()?,
    );
    let upcaster = PgUpcaster::new(pool.clone(), chain.clone());
    let store = PgEventStore::new(pool.clone());
    let mut cases = Vec::new();

    // Lazy first, while every event is at v1 and so is upcast on read.
    progress.set_message("reading the feed, plain and lazily upcast");
    let lazy = UpcastingReader::new(store.clone(), chain.clone());
    let (mut plain, mut upcast) = (Side::default(), Side::default());
    for _ in 0..2 {
        plain = plain.best(read_feed(&store, n, args.page, false).await?);
        upcast = upcast.best(read_feed(&lazy, n, args.page, true).await?);
    }
    cases.push(Case::new(
        format!("read the feed with lazy upcasting, {n} events at v1 (vs plain read)"),
        upcast,
        plain,
        None,
    )?);

    // Raw: the whole rewrite as one UPDATE.
    progress.set_message(format!("raw UPDATE ... jsonb_set of {n} events"));
    let started = Instant::now();
    let updated = pool.get().await?.execute(RAW_UPDATE, &[]).await?;
    let raw = Side::new(updated as f64 / started.elapsed().as_secs_f64(), updated);
    anyhow::ensure!(
        updated == n as u64,
        "the raw UPDATE rewrote {updated} of {n} rows"
    );
    // Back to v1 for the runner: the same rows, settled again.
    progress.set_message("restoring v1");
    pool.get()
        .await?
        .batch_execute(
            "UPDATE events SET event_data = jsonb_set(event_data - 'title' - 'qty', '{name}', event_data -> 'title'), \
                    metadata = jsonb_set(metadata, '{schema_version}', '1')",
        )
        .await?;
    settle(&pool).await?;

    progress.set_message(format!("eager upcast with backup of {n} events"));
    let started = Instant::now();
    let report = upcaster
        .run(args.batch_size, |p| {
            progress.set_message(format!("eager upcast with backup: {} of {n}", p.done))
        })
        .await?;
    let ours = report.events_upcast() as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.events_upcast() == n as u64,
        "the runner rewrote {} of {n} events",
        report.events_upcast()
    );
    cases.push(Case::new(
        format!(
            "eager upcast with backup, {n} events, batches of {} (vs raw UPDATE ... jsonb_set)",
            args.batch_size
        ),
        Side::new(ours, report.events_upcast()),
        raw,
        None,
    )?);
    progress.finish_and_clear();
    Ok(cases)
}

/// `n` ItemAdded v1 events over aggregates of 10, in one set-based insert
/// per 100,000.
async fn load(pool: &PgPool, n: i64) -> Result<()> {
    let client = pool.get().await?;
    let mut start = 0i64;
    while start < n {
        let end = (start + 100_000).min(n);
        client
            .execute(
                "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
                                     event_data, metadata, version) \
                 SELECT gen_random_uuid(), md5('agg' || (g / 10))::uuid, 'Cart', 'ItemAdded', \
                        jsonb_build_object('name', 'item ' || g, 'price', (g % 1000) / 4.0, \
                                           'n', g, 'sku', 'SKU-' || g), \
                        jsonb_build_object('schema_version', 1, 'actor', 'bench'), \
                        (g % 10)::int + 1 \
                   FROM generate_series($1::bigint, $2::bigint - 1) AS g",
                &[&start, &end],
            )
            .await?;
        start = end;
    }
    Ok(())
}

/// Hint bits, visibility map, statistics: a table in steady state.
async fn settle(pool: &PgPool) -> Result<()> {
    pool.get()
        .await?
        .batch_execute("VACUUM ANALYZE events")
        .await?;
    Ok(())
}

/// Reads the whole feed in pages; events/s, with the events read.
async fn read_feed<R: EventReader>(reader: &R, n: i64, page: usize, upcast: bool) -> Result<Side> {
    let started = Instant::now();
    let mut after = Position::START;
    let mut read = 0i64;
    loop {
        let batch = reader.read_all(after, page).await?;
        if batch.events.is_empty() {
            break;
        }
        if upcast {
            anyhow::ensure!(
                batch.events.iter().all(|e| e.metadata.schema_version == 2),
                "the lazy reader returned an event below v2"
            );
        }
        read += batch.events.len() as i64;
        after = batch.next;
    }
    anyhow::ensure!(read == n, "the feed returned {read} of {n} events");
    Ok(Side::new(
        read as f64 / started.elapsed().as_secs_f64(),
        read as u64,
    ))
}
