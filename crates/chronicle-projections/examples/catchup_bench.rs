//! Catch-up throughput of the projection runtime against raw reads and
//! writes of the same rows, on a throwaway local PostgreSQL.
//!
//! Run with: `cargo run --release -p chronicle-projections --example catchup_bench [EVENTS]`
//!
//! Prints events per second for: a raw `COPY events TO STDOUT`; catch-up
//! with a no-op handler at 1 and 4 partitions; a raw batched upsert of the
//! same rows; catch-up with an upsert read model at 1 and 4 partitions;
//! with the ratios the targets are stated in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{MigrateOptions, PgOptions, PgPool, migrate};
use chronicle_projections::{
    PgContext, PgProjection, ProjectionOptions, Runner, RunnerOptions, load_state,
};
use futures_util::StreamExt;
use tokio_postgres::types::Type;

struct NoOp(String);

#[async_trait]
impl ProjectionHandler<PgContext> for NoOp {
    fn name(&self) -> &str {
        &self.0
    }

    async fn handle(&self, _: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        ProjectionResult::Done
    }
}

struct Upsert(String);

#[async_trait]
impl ProjectionHandler<PgContext> for Upsert {
    fn name(&self) -> &str {
        &self.0
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        let amount = event.event_data["amount"].as_i64().unwrap_or(0);
        match ctx
            .client()
            .execute_typed(
                "INSERT INTO balances (account, balance) VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance",
                &[(&event.aggregate_id, Type::UUID), (&amount, Type::INT8)],
            )
            .await
        {
            Ok(_) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(e),
        }
    }

    /// One multi-row upsert per batch: amounts summed per account first
    /// (one statement cannot touch a row twice).
    async fn handle_batch(
        &self,
        events: &[EventEnvelope],
        ctx: &mut PgContext,
    ) -> Vec<ProjectionResult> {
        let mut sums: std::collections::HashMap<uuid::Uuid, i64> = Default::default();
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

async fn catch_up(
    pool: &PgPool,
    handler: impl ProjectionHandler<PgContext> + 'static,
    partitions: u32,
    events: u64,
) -> f64 {
    let name = handler.name().to_owned();
    let projection = PgProjection::new(
        pool.clone(),
        handler,
        ProjectionOptions {
            partitions,
            batch_size: 1000,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let runner = Runner::start(
        Arc::new(projection),
        RunnerOptions {
            poll_interval: Duration::from_millis(5),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    loop {
        let done: u64 = load_state(pool, Some(&name))
            .await
            .unwrap()
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
    events as f64 / secs
}

#[tokio::main]
async fn main() {
    let events: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("EVENTS is a number"))
        .unwrap_or(200_000);
    // BENCH_DATABASE_URL: an empty database to use instead of a throwaway
    // cluster.
    let (pg, url) = match std::env::var("BENCH_DATABASE_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let pg = EmbeddedPostgres::throwaway().expect("start a throwaway PostgreSQL");
            let url = pg.url();
            (Some(pg), url)
        }
    };
    let mut options = PgOptions::from_url(&url).unwrap();
    options.max_connections(16);
    let pool = options.pool().unwrap();
    migrate(&pool, MigrateOptions::default()).await.unwrap();
    let client = pool.get().await.unwrap();
    let accounts = (events / 10) as i64;
    client
        .execute_typed(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version)
             SELECT gen_random_uuid(), a.id, 'account', 'Deposited', jsonb_build_object('amount', v), '{}', v
               FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, $1)) a,
                    generate_series(1, 10) AS v
              ORDER BY v",
            &[(&accounts, Type::INT8)],
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE events").await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE balances (account UUID PRIMARY KEY, balance BIGINT NOT NULL);
             CREATE TABLE raw_balances (account UUID PRIMARY KEY, balance BIGINT NOT NULL);",
        )
        .await
        .unwrap();

    let started = Instant::now();
    let stream = client.copy_out("COPY events TO STDOUT").await.unwrap();
    let bytes = stream
        .fold(0usize, |n, chunk| async move { n + chunk.unwrap().len() })
        .await;
    let raw_read = events as f64 / started.elapsed().as_secs_f64();
    assert!(bytes > 0);

    // ON CONFLICT cannot touch a row twice in one statement: upsert in
    // batches of one version at a time, as a batched writer would.
    let started_batched = Instant::now();
    for v in 1..=10 {
        client
            .execute_typed(
                "INSERT INTO raw_balances (account, balance)
                 SELECT aggregate_id, (event_data->>'amount')::bigint FROM events WHERE version = $1
                 ON CONFLICT (account) DO UPDATE SET balance = raw_balances.balance + excluded.balance",
                &[(&v, Type::INT4)],
            )
            .await
            .unwrap();
    }
    let raw_upsert = events as f64 / started_batched.elapsed().as_secs_f64();
    drop(client);

    println!("{events} events");
    println!("raw COPY read:             {raw_read:>12.0} events/s");
    for partitions in [1, 4] {
        let rate = catch_up(
            &pool,
            NoOp(format!("noop-{partitions}")),
            partitions,
            events,
        )
        .await;
        println!(
            "no-op catch-up, {partitions} partition(s): {rate:>10.0} events/s  ({:.2}x raw read)",
            rate / raw_read
        );
    }
    println!("raw batched upsert:        {raw_upsert:>12.0} events/s");
    for partitions in [1, 4] {
        let client = pool.get().await.unwrap();
        client.batch_execute("TRUNCATE balances").await.unwrap();
        drop(client);
        let rate = catch_up(
            &pool,
            Upsert(format!("upsert-{partitions}")),
            partitions,
            events,
        )
        .await;
        println!(
            "upsert catch-up, {partitions} partition(s): {rate:>9.0} events/s  ({:.2}x raw upsert)",
            rate / raw_upsert
        );
    }
    pool.close();
    drop(pg);
}
