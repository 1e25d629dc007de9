//! `chronicle bench projections`: catch-up of the projection runtime against
//! a raw read and a raw upsert of the same rows, catch-up of projections
//! subscribed to a tenth of the store against one subscribed to all of it,
//! and the lag of a tailing projection under a steady append load, in one
//! run on one server (a scratch schema, dropped afterwards).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, ExpectedVersion, NewEvent, ProjectionHandler, ProjectionResult,
    Subscription,
};
use chronicle_postgres::{EVENTS_CHANNEL, PgEventStore, PgPool};
use chronicle_projections::{
    PgContext, PgProjection, ProjectionOptions, Runner, RunnerOptions, load_state,
};
use clap::Args;
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::Database;
use crate::bench::{Case, Scratch, Side, copy_rows, write_cases};
use crate::output::OutputFormat;
use crate::output::outln;

/// `chronicle bench projections` arguments.
#[derive(Debug, Args)]
pub struct ProjectionsBenchArgs {
    /// Events caught up per case (10 per aggregate).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per step and partition.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Seconds of steady appends in the lag case.
    #[arg(long, default_value_t = 20)]
    lag_seconds: u64,
}

/// Does nothing: the runtime's own cost.
struct NoOp {
    name: String,
    subscription: Subscription,
}

impl NoOp {
    fn new(name: String) -> Self {
        NoOp {
            name,
            subscription: Subscription::all(),
        }
    }
}

#[async_trait]
impl ProjectionHandler<PgContext> for NoOp {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscription(&self) -> Subscription {
        self.subscription.clone()
    }

    async fn handle(&self, _: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        ProjectionResult::Done
    }
}

/// Account balances, upserted in one statement per batch, as a read model
/// written for throughput would be.
struct Upsert(String);

#[async_trait]
impl ProjectionHandler<PgContext> for Upsert {
    fn name(&self) -> &str {
        &self.0
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        self.handle_batch(std::slice::from_ref(event), ctx)
            .await
            .pop()
            .unwrap_or(ProjectionResult::Done)
    }

    async fn handle_batch(
        &self,
        events: &[EventEnvelope],
        ctx: &mut PgContext,
    ) -> Vec<ProjectionResult> {
        // One statement cannot touch a row twice: sum per account first.
        let mut sums: HashMap<Uuid, i64> = HashMap::new();
        for e in events {
            *sums.entry(e.aggregate_id).or_default() +=
                e.event_data["amount"].as_i64().unwrap_or(0);
        }
        let (accounts, amounts): (Vec<_>, Vec<_>) = sums.into_iter().unzip();
        let result = ctx
            .client()
            .execute_typed(
                "INSERT INTO balances (account, balance) SELECT * FROM unnest($1::uuid[], $2::int8[])
                 ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance",
                &[(&accounts, Type::UUID_ARRAY), (&amounts, Type::INT8_ARRAY)],
            )
            .await;
        let outcome = match result {
            Ok(_) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(e),
        };
        vec![outcome; events.len()]
    }
}

/// Records how long after its append each event was handled.
struct Lag {
    name: String,
    samples: Arc<Mutex<Vec<f64>>>,
}

#[async_trait]
impl ProjectionHandler<PgContext> for Lag {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, event: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        let lag = (chrono::Utc::now() - event.timestamp).as_seconds_f64();
        self.samples.lock().expect("samples").push(lag);
        ProjectionResult::Done
    }
}

/// Runs `chronicle bench projections`.
pub async fn projections(
    db: &Database,
    args: ProjectionsBenchArgs,
    format: OutputFormat,
) -> Result<()> {
    let scratch = Scratch::create(db).await?;
    let result = run(db, &scratch, &args, format).await;
    scratch.drop_schema().await?;
    let (cases, lag) = result?;
    match format {
        OutputFormat::Json => crate::output::write_record(
            &json!({ "benchmark": "projections", "cases": cases, "lag": lag }),
            format,
        )?,
        OutputFormat::Table => {
            write_cases(&cases)?;
            outln!(
                "lag while appending {:.0} events/s (half of the {:.0} events/s measured just before; \
                 notifications off, the default, so the runner polls every 250 ms): \
                 p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} events",
                lag["load_events_per_sec"].as_f64().unwrap_or(0.0),
                lag["append_capacity_events_per_sec"]
                    .as_f64()
                    .unwrap_or(0.0),
                lag["p50_ms"].as_f64().unwrap_or(0.0),
                lag["p99_ms"].as_f64().unwrap_or(0.0),
                lag["max_ms"].as_f64().unwrap_or(0.0),
                lag["events"],
            )?;
        }
    }
    Ok(())
}

async fn run(
    db: &Database,
    scratch: &Scratch,
    args: &ProjectionsBenchArgs,
    format: OutputFormat,
) -> Result<(Vec<Case>, serde_json::Value)> {
    let progress = crate::ui::spinner(format);
    let pool = scratch.pool(true, 8, None)?;
    let n = args.events as i64;
    progress.set_message(format!("loading {n} events"));
    let client = pool.get().await?;
    // A tenth of the aggregates are loans, a tenth of each aggregate's
    // events (its fifth) are audits: what the subscribed cases take.
    client
        .execute_typed(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version)
             SELECT gen_random_uuid(), a.id, CASE WHEN a.n % 10 = 0 THEN 'loan' ELSE 'account' END,
                    CASE WHEN v = 5 THEN 'Audited' ELSE 'Deposited' END,
                    jsonb_build_object('amount', v), '{}', v
               FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1) AS n) a,
                    generate_series(1, 10) AS v
              ORDER BY v",
            &[(&(n / 10), Type::INT8)],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE events").await?;
    client
        .batch_execute(
            "CREATE TABLE balances (account UUID PRIMARY KEY, balance BIGINT NOT NULL);
             CREATE TABLE raw_balances (account UUID PRIMARY KEY, balance BIGINT NOT NULL);",
        )
        .await?;
    let events = (n / 10 * 10) as u64;

    progress.set_message("raw COPY read");
    let started = Instant::now();
    let rows = copy_rows(&client, "COPY events TO STDOUT").await?;
    let raw_read = Side::new(rows as f64 / started.elapsed().as_secs_f64(), rows);

    // The same sums as the read model, by hand: one statement that sums
    // per account and upserts each account once (faster than sending the
    // handler's batched upserts from here: the server reads the events in
    // place, nothing crosses the wire). It counts the events it summed.
    progress.set_message("raw aggregate-and-upsert");
    let started = Instant::now();
    let summed: i64 = client
        .query_typed_one(
            "WITH sums AS (
                 SELECT aggregate_id, sum((event_data->>'amount')::bigint) AS amount, count(*) AS n
                   FROM events GROUP BY aggregate_id),
             upserted AS (
                 INSERT INTO raw_balances (account, balance)
                 SELECT aggregate_id, amount FROM sums
                 ON CONFLICT (account) DO UPDATE SET balance = raw_balances.balance + excluded.balance)
             SELECT coalesce(sum(n), 0)::int8 FROM sums",
            &[],
        )
        .await?
        .get(0);
    let raw_upsert = Side::new(
        summed as f64 / started.elapsed().as_secs_f64(),
        summed as u64,
    );

    let mut cases = Vec::new();
    let mut everything = Vec::new();
    for partitions in [1, 4] {
        progress.set_message(format!("no-op catch-up, {partitions} partition(s)"));
        let secs = catch_up(
            &pool,
            NoOp::new(format!("noop-{partitions}")),
            partitions,
            args.batch_size,
            events,
        )
        .await?;
        let side = Side::new(
            events as f64 / secs,
            handled(&pool, &format!("noop-{partitions}")).await?,
        );
        everything.push((partitions, side));
        cases.push(Case::new(
            format!(
                "no-op catch-up, {partitions} partition(s), vs COPY TO STDOUT (rows not decoded)"
            ),
            side,
            raw_read,
            None,
        )?);
    }
    // The store's events caught up per second by a projection taking a
    // tenth of them, against the one above taking all with as many
    // partitions.
    for (what, subscription) in [
        (
            "aggregate type",
            Subscription::all().with_aggregate_types(["loan"]),
        ),
        (
            "event type",
            Subscription::all().with_event_types(["Audited"]),
        ),
    ] {
        let taken: i64 = client
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_type = ANY($1) OR event_type = ANY($2)",
                &[
                    &subscription.aggregate_types(),
                    &subscription.event_types(),
                ],
            )
            .await?
            .get(0);
        for &(partitions, all) in &everything {
            progress.set_message(format!(
                "catch-up subscribed to one {what}, {partitions} partition(s)"
            ));
            let name = format!("subscribed-{}-{partitions}", what.replace(' ', "-"));
            let handler = NoOp {
                name: name.clone(),
                subscription: subscription.clone(),
            };
            let secs = catch_up(&pool, handler, partitions, args.batch_size, taken as u64).await?;
            let read = handled(&pool, &name).await?;
            anyhow::ensure!(
                read == taken as u64,
                "the {what} subscription handled {read} events of the {taken} it takes"
            );
            // Both sides pass every event of the store: the rows are the
            // store's events the checkpoints went past (the subscribed one
            // handles `taken` of them).
            cases.push(Case::new(
                format!(
                    "no-op catch-up subscribed to one {what} ({:.0}% of the store), \
                     {partitions} partition(s), vs subscribed to every event",
                    100.0 * taken as f64 / events as f64
                ),
                Side::new(events as f64 / secs, events),
                all,
                None,
            )?);
        }
    }
    for partitions in [1, 4] {
        progress.set_message(format!("upsert catch-up, {partitions} partition(s)"));
        client.batch_execute("TRUNCATE balances").await?;
        let name = format!("upsert-{partitions}");
        let rate = events as f64
            / catch_up(
                &pool,
                Upsert(name.clone()),
                partitions,
                args.batch_size,
                events,
            )
            .await?;
        let same: bool = client
            .query_one(
                "SELECT NOT EXISTS (SELECT account, balance FROM balances
                                    EXCEPT SELECT account, balance FROM raw_balances)",
                &[],
            )
            .await?
            .get(0);
        anyhow::ensure!(same, "the upsert read model differs from the raw upsert");
        cases.push(Case::new(
            format!(
                "upsert read model, {partitions} partition(s), vs raw sum-per-account upsert in one statement"
            ),
            Side::new(rate, handled(&pool, &name).await?),
            raw_upsert,
            None,
        )?);
    }
    drop(client);

    progress.set_message("lag under a steady append load");
    let lag = lag_under_load(db, scratch, &pool, args.lag_seconds).await?;
    progress.finish_and_clear();
    Ok((cases, lag))
}

/// Events the projection `name` handled, over its partitions.
async fn handled(pool: &PgPool, name: &str) -> Result<u64> {
    Ok(load_state(pool, Some(name))
        .await?
        .iter()
        .map(|s| s.events_processed)
        .sum())
}

/// Seconds a projection takes from its start until it has handled
/// `events` events (of the whole table: the ones it subscribes to).
async fn catch_up(
    pool: &PgPool,
    handler: impl ProjectionHandler<PgContext> + 'static,
    partitions: u32,
    batch_size: u32,
    events: u64,
) -> Result<f64> {
    let name = handler.name().to_owned();
    let options = ProjectionOptions {
        partitions,
        batch_size,
        ..ProjectionOptions::default()
    };
    let projection = Arc::new(PgProjection::new(pool.clone(), handler, options)?);
    let started = Instant::now();
    let runner = Runner::start(
        projection,
        RunnerOptions {
            poll_interval: Duration::from_millis(5),
            ..RunnerOptions::default()
        },
    )
    .await?;
    loop {
        let done: u64 = load_state(pool, Some(&name))
            .await?
            .iter()
            .map(|s| s.events_processed)
            .sum();
        if done >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    runner.stop().await;
    Ok(secs)
}

/// Measures the append capacity (16 writers, one event per append), then
/// appends at half of it for `seconds` while a projection tails (listening,
/// but with notifications off, the default: it polls every 250 ms), and
/// reports the lag from append to handling.
async fn lag_under_load(
    db: &Database,
    scratch: &Scratch,
    pool: &PgPool,
    seconds: u64,
) -> Result<serde_json::Value> {
    const WRITERS: usize = 16;
    let store = PgEventStore::new(scratch.pool(true, WRITERS, None)?);
    let capacity = append_for(&store, WRITERS, Duration::from_secs(3), None).await?;

    let samples = Arc::new(Mutex::new(Vec::new()));
    let handler = Lag {
        name: "lag".to_owned(),
        samples: samples.clone(),
    };
    let projection = Arc::new(PgProjection::new(
        pool.clone(),
        handler,
        ProjectionOptions {
            partitions: 4,
            ..ProjectionOptions::default()
        },
    )?);
    // Start from the end: only the events appended under load count.
    projection.register().await?;
    pool.get()
        .await?
        .batch_execute(
            "UPDATE projection_state
                SET checkpoint_xid = pg_snapshot_xmax(pg_current_snapshot()), checkpoint_position = 0
              WHERE projection = 'lag'",
        )
        .await?;
    let listener = db
        .options()?
        .listen(EVENTS_CHANNEL)
        .await
        .context("LISTEN for the lag case")?;
    let runner = Runner::start(
        projection,
        RunnerOptions {
            listener: Some(listener),
            ..RunnerOptions::default()
        },
    )
    .await?;
    let load = capacity / 2.0;
    let appended = append_for(
        &store,
        WRITERS,
        Duration::from_secs(seconds),
        Some(load / WRITERS as f64),
    )
    .await?
        * seconds as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (samples.lock().expect("samples").len() as f64) < appended.floor()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.stop().await;
    let mut lags = std::mem::take(&mut *samples.lock().expect("samples"));
    anyhow::ensure!(!lags.is_empty(), "the tailing projection handled nothing");
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize] * 1000.0;
    Ok(json!({
        "append_capacity_events_per_sec": capacity,
        "load_events_per_sec": load,
        "events": lags.len(),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
    }))
}

/// Appends single events from `writers` tasks for `duration`, each at most
/// `rate` appends per second when given; returns events per second.
async fn append_for(
    store: &PgEventStore,
    writers: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<f64> {
    let started = Instant::now();
    let tasks = (0..writers).map(|_| async move {
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
        let mut done = 0u64;
        while started.elapsed() < duration {
            let event = NewEvent::new("Deposited", json!({ "amount": 1 }));
            store
                .append(
                    Uuid::now_v7(),
                    "account",
                    ExpectedVersion::NoStream,
                    vec![event],
                )
                .await?;
            done += 1;
            if let Some(interval) = interval {
                let next = started + interval.mul_f64(done as f64);
                tokio::time::sleep_until(next.into()).await;
            }
        }
        anyhow::Ok(done)
    });
    let mut total = 0u64;
    for done in futures_util::future::join_all(tasks).await {
        total += done?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
