//! A test projection: account balances in a PostgreSQL read model, with
//! knobs for poison events, transient failures, slowness and a record of
//! which worker handled which partition when.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chronicle_core::{
    Alert, AlertSink, BoxError, EventAppender, EventEnvelope, ExpectedVersion, NewEvent, Position,
    ProjectionHandler, ProjectionResult,
};
use chronicle_projections::{PgContext, PgProjection, StepOutcome, load_state};
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::support::TestDb;

/// Shared knobs and observations.
#[derive(Default)]
pub struct Shared {
    /// Poison events fail permanently until this is set.
    pub fixed: AtomicBool,
    /// Sleep this long in every call.
    pub delay: Mutex<Duration>,
    /// Partitions being handled right now, and by whom.
    in_flight: Mutex<HashMap<u32, String>>,
    /// Times two calls overlapped on one partition.
    pub overlaps: AtomicUsize,
    /// Which workers handled each partition.
    pub workers: Mutex<HashMap<u32, HashSet<String>>>,
    /// Attempts per event id.
    pub attempts: Mutex<HashMap<Uuid, u32>>,
    /// When each attempt started, per event id.
    pub attempt_times: Mutex<HashMap<Uuid, Vec<Instant>>>,
}

/// The balances projection.
#[derive(Clone, Default)]
pub struct Ledger {
    pub shared: Arc<Shared>,
    pub name: &'static str,
}

impl Ledger {
    pub fn new(name: &'static str) -> Self {
        Ledger {
            shared: Arc::default(),
            name,
        }
    }
}

struct InFlight<'a> {
    shared: &'a Shared,
    partition: Option<u32>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.partition {
            self.shared.in_flight.lock().unwrap().remove(&p);
        }
    }
}

#[async_trait]
impl ProjectionHandler<PgContext> for Ledger {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        let shared = &*self.shared;
        let partition = ctx.partition();
        if let Some(p) = partition {
            let mut in_flight = shared.in_flight.lock().unwrap();
            if in_flight.insert(p, ctx.worker().to_owned()).is_some() {
                shared.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            shared
                .workers
                .lock()
                .unwrap()
                .entry(p)
                .or_default()
                .insert(ctx.worker().to_owned());
        }
        let _guard = InFlight { shared, partition };
        let attempt = {
            let mut attempts = shared.attempts.lock().unwrap();
            let n = attempts.entry(event.event_id).or_default();
            *n += 1;
            *n
        };
        shared
            .attempt_times
            .lock()
            .unwrap()
            .entry(event.event_id)
            .or_default()
            .push(Instant::now());
        let delay = *shared.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }

        let amount = event.event_data["amount"].as_i64().unwrap_or(0);
        let version = event.version as i32;
        // Write first: a failed attempt's writes must be rolled back.
        let written = ctx
            .client()
            .execute_typed(
                "INSERT INTO ledger (account, balance, versions) VALUES ($1, $2, ARRAY[$3])
                 ON CONFLICT (account) DO UPDATE
                   SET balance = ledger.balance + excluded.balance,
                       versions = ledger.versions || excluded.versions",
                &[
                    (&event.aggregate_id, Type::UUID),
                    (&amount, Type::INT8),
                    (&version, Type::INT4),
                ],
            )
            .await
            .and(
                ctx.client()
                    .execute_typed(
                        "INSERT INTO ledger_events (event_id) VALUES ($1)",
                        &[(&event.event_id, Type::UUID)],
                    )
                    .await,
            );
        if let Err(e) = written {
            return ProjectionResult::fail(format!("read model write failed: {e:?}"));
        }
        if event.event_data["poison"] == json!(true) && !shared.fixed.load(Ordering::SeqCst) {
            return ProjectionResult::fail("poison event");
        }
        if let Some(flaky) = event.event_data["flaky"].as_u64()
            && u64::from(attempt) <= flaky
        {
            return ProjectionResult::retry(format!("transient failure {attempt}"));
        }
        ProjectionResult::Done
    }

    async fn rebuild(&self, ctx: &mut PgContext, _from: Position) -> Result<(), BoxError> {
        ctx.client()
            .batch_execute("TRUNCATE ledger, ledger_events")
            .await?;
        Ok(())
    }
}

/// Creates the read model tables.
pub async fn create_read_model(db: &TestDb) {
    let client = db.pool.get().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE ledger (account UUID PRIMARY KEY, balance BIGINT NOT NULL, versions INTEGER[] NOT NULL);
             CREATE TABLE ledger_events (event_id UUID PRIMARY KEY);",
        )
        .await
        .unwrap();
}

/// account -> (balance, versions handled in order).
pub async fn read_model(db: &TestDb) -> BTreeMap<Uuid, (i64, Vec<i32>)> {
    let client = db.pool.get().await.unwrap();
    client
        .query_typed("SELECT account, balance, versions FROM ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// The read model the whole history should produce.
pub async fn expected_model(db: &TestDb) -> BTreeMap<Uuid, (i64, Vec<i32>)> {
    let client = db.pool.get().await.unwrap();
    client
        .query_typed(
            "SELECT aggregate_id, sum((event_data->>'amount')::bigint)::bigint,
                    array_agg(version ORDER BY version)
               FROM events GROUP BY aggregate_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Appends `per_account` deposits to each of `accounts` new accounts, in
/// appends of up to 10 events; returns the account ids.
pub async fn deposit(db: &TestDb, accounts: usize, per_account: u32) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..accounts).map(|_| Uuid::now_v7()).collect();
    append_more(db, &ids, per_account).await;
    ids
}

/// Appends `n` more deposits to each account.
pub async fn append_more(db: &TestDb, ids: &[Uuid], n: u32) {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(10);
        for (i, id) in ids.iter().enumerate() {
            let events = (0..chunk)
                .map(|k| NewEvent::new("Deposited", json!({ "amount": (i as u32 % 7) + k + 1 })))
                .collect();
            db.store
                .append(*id, "account", ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
        left -= chunk;
    }
}

/// Appends one event with `data` to `account`.
pub async fn append_one(db: &TestDb, account: Uuid, data: serde_json::Value) -> Uuid {
    let event = NewEvent::new("Deposited", data);
    let id = event.event_id;
    db.store
        .append(account, "account", ExpectedVersion::Any, vec![event])
        .await
        .unwrap();
    id
}

/// Stores `account`'s versions 1 and 2 so that the feed hands out version
/// 2 first: a transaction T1 takes an xid (as if it had written something)
/// before T2 appends version 1; T1 then appends version 2 and commits, and
/// the feed is ordered by xid. Waits until both are below the horizon.
pub async fn append_out_of_order(db: &TestDb, account: Uuid) {
    let mut c1 = db.pool.get().await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    t1.query_typed("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    append_one(db, account, json!({ "amount": 1 })).await;
    t1.query_typed(
        "SELECT status FROM chronicle_append($1, 'account', NULL, ARRAY[$2]::uuid[], ARRAY['Deposited'],
                ARRAY['{\"amount\": 2}'::jsonb], ARRAY['{}'::jsonb], ARRAY[NULL::jsonb])",
        &[(&account, Type::UUID), (&Uuid::now_v7(), Type::UUID)],
    )
    .await
    .unwrap();
    t1.commit().await.unwrap();
    wait_for_horizon(db).await;
}

/// Waits until `projection` has handled `events` events in total and
/// every partition has no lag; panics after `timeout`.
/// Events the projection's partitions have handled, summed.
pub async fn events_processed(db: &TestDb, projection: &str) -> u64 {
    load_state(&db.pool, Some(projection))
        .await
        .unwrap()
        .iter()
        .map(|s| s.events_processed)
        .sum()
}

pub async fn wait_until_processed(db: &TestDb, projection: &str, events: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let state = load_state(&db.pool, Some(projection)).await.unwrap();
        let processed: u64 = state.iter().map(|s| s.events_processed).sum();
        if processed >= events && !state.is_empty() && state.iter().all(|s| s.lag_events == 0) {
            assert_eq!(processed, events, "handled more events than were appended");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projection {projection} did not catch up in {timeout:?}: {processed}/{events} handled; {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects alerts.
#[derive(Clone, Default)]
pub struct Alerts(pub Arc<Mutex<Vec<Alert>>>);

#[async_trait]
impl AlertSink for Alerts {
    async fn alert(&self, alert: &Alert) -> Result<(), BoxError> {
        self.0.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

/// Steps every partition until each has nothing left (lag 0: the feed's
/// horizon may trail the appends while other tests' transactions run);
/// returns the outcomes summed.
pub async fn drain(projection: &PgProjection) -> StepOutcome {
    let mut total = StepOutcome::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    for partition in 0..projection.options().partitions {
        loop {
            let out = projection.step(partition, "worker-1").await.unwrap();
            assert!(out.claimed);
            total.handled += out.handled;
            total.retries += out.retries;
            total.dead_lettered += out.dead_lettered;
            total.parked += out.parked;
            if out.caught_up && out.lag_events == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partition {partition} never drained: {out:?}"
            );
            if out.caught_up {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    total
}

/// Waits until every stored event is below the feed's horizon (other
/// tests' open transactions in the same cluster hold it back).
pub async fn wait_for_horizon(db: &TestDb) {
    let client = db.pool.get().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let visible: bool = client
            .query_typed_one(
                "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if visible {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the feed horizon never passed the appends"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
