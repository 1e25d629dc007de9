//! Blue/green rebuild: a new model is built beside the live one while the
//! live one serves and keeps up with appends, and swapped in at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, Position, ProjectionHandler, ProjectionResult};
use chronicle_projections::{
    Error, PgContext, PgProjection, ProjectionOptions, Runner, RunnerOptions, load_state,
};
use tokio_postgres::types::Type;

use crate::ledger::{append_more, deposit, wait_for_horizon};
use crate::support::{TestDb, fresh_db};

const SETUP: &str = "CREATE TABLE IF NOT EXISTS totals (
    account UUID PRIMARY KEY,
    points BIGINT NOT NULL
)";

/// Counts points per account into `totals`, unqualified: the table is found
/// in the projection's read-model schema. Each event is worth `weight`
/// points, so a model built by another weight is told apart.
#[derive(Clone)]
struct Points {
    weight: Arc<AtomicI64>,
}

#[async_trait]
impl ProjectionHandler<PgContext> for Points {
    fn name(&self) -> &str {
        "points"
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        let weight = self.weight.load(Ordering::SeqCst);
        match ctx
            .client()
            .execute_typed(
                "INSERT INTO totals (account, points) VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET points = totals.points + excluded.points",
                &[(&event.aggregate_id, Type::UUID), (&weight, Type::INT8)],
            )
            .await
        {
            Ok(_) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(e),
        }
    }
}

async fn points(db: &TestDb) -> i64 {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT coalesce(sum(points), 0)::int8 FROM rm_points.totals",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn event_count(db: &TestDb) -> i64 {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_points(db: &TestDb, expected: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while points(db).await != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the model has {} points, expected {expected}",
            points(db).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database with the live read model's schema `rm_points` set up.
async fn db_with_live_model() -> TestDb {
    let db = fresh_db().await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "BEGIN; CREATE SCHEMA rm_points; SET LOCAL search_path = rm_points; {SETUP}; COMMIT"
        ))
        .await
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_rebuild_swaps_in_a_complete_model_readers_never_see_half_built() {
    let db = db_with_live_model().await;
    let accounts = deposit(&db, 50, 20).await; // 1,000 events
    wait_for_horizon(&db).await;
    let weight = Arc::new(AtomicI64::new(1));
    let handler = Points {
        weight: weight.clone(),
    };
    let options = ProjectionOptions {
        partitions: 3,
        batch_size: 100,
        ..ProjectionOptions::default()
    };
    let live = Arc::new(
        PgProjection::new(db.pool.clone(), handler.clone(), options.clone())
            .unwrap()
            .with_read_model_schema("rm_points")
            .unwrap(),
    );
    let runner = Runner::start(
        live.clone(),
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    wait_for_points(&db, 1_000).await;

    // A reader: the total only grows while the live model keeps up with
    // appends; a half-built model would show it dropping.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            let (mut last, mut reads) = (0i64, 0u32);
            while !stop.load(Ordering::SeqCst) {
                let now: i64 = client
                    .query_one(
                        "SELECT coalesce(sum(points), 0)::int8 FROM rm_points.totals",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert!(
                    now >= last,
                    "a reader saw the model shrink: {last} -> {now}"
                );
                (last, reads) = (now, reads + 1);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reads
        })
    };
    // Appends during the rebuild, and a new model: ten points an event.
    weight.store(10, Ordering::SeqCst);
    let appends = async {
        for _ in 0..5 {
            append_more(&db, &accounts[..20], 1).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    let (report, ()) = tokio::join!(
        live.rebuild_blue_green(Position::START, SETUP, |_| {}),
        appends
    );
    let report = report.unwrap();
    assert!(report.replayed >= 1_000, "{report:?}");

    // Every event, appended before or during the rebuild, counts ten
    // points in the swapped-in model: it was built whole by the new
    // handler, and the live workers went on from its checkpoints.
    let total = event_count(&db).await;
    assert_eq!(total, 1_100);
    wait_for_points(&db, 10 * total).await;
    stop.store(true, Ordering::SeqCst);
    assert!(reader.await.unwrap() > 0);

    let states = load_state(&db.pool, None).await.unwrap();
    assert!(
        states.iter().all(|s| s.projection == "points"),
        "the shadow projection is gone: {states:#?}"
    );
    let schemas: Vec<String> = db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'rm_points%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, ["rm_points"]);
    runner.stop().await;
}

/// Fails on every event while `failing` is set.
#[derive(Clone)]
struct Flaky {
    inner: Points,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl ProjectionHandler<PgContext> for Flaky {
    fn name(&self) -> &str {
        "points"
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        if self.failing.load(Ordering::SeqCst) {
            ProjectionResult::fail("the new handler has a bug")
        } else {
            self.inner.handle(event, ctx).await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_blue_green_rebuild_leaves_the_live_model_and_says_what_to_do() {
    let db = db_with_live_model().await;
    deposit(&db, 10, 5).await;
    wait_for_horizon(&db).await;
    let failing = Arc::new(AtomicBool::new(false));
    let handler = Flaky {
        inner: Points {
            weight: Arc::new(AtomicI64::new(1)),
        },
        failing: failing.clone(),
    };
    let projection = PgProjection::new(db.pool.clone(), handler, ProjectionOptions::default())
        .unwrap()
        .with_read_model_schema("rm_points")
        .unwrap();
    projection.register().await.unwrap();
    for p in 0..ProjectionOptions::default().partitions {
        while !projection.step(p, "live").await.unwrap().caught_up {}
    }
    assert_eq!(points(&db).await, 50);

    failing.store(true, Ordering::SeqCst);
    let err = projection
        .rebuild_blue_green(Position::START, SETUP, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BlueGreenStopped { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("live model is unchanged")
            && message.contains("run the blue/green rebuild again"),
        "{message}"
    );
    assert_eq!(points(&db).await, 50, "the live model is as it was");
    let live: Vec<String> = load_state(&db.pool, Some("points"))
        .await
        .unwrap()
        .iter()
        .map(|s| s.status.to_string())
        .collect();
    assert!(live.iter().all(|s| s == "running"), "{live:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_needs_the_model_in_its_own_schema() {
    let db = fresh_db().await;
    let handler = Points {
        weight: Arc::new(AtomicI64::new(1)),
    };
    let projection =
        PgProjection::new(db.pool.clone(), handler, ProjectionOptions::default()).unwrap();
    let err = projection
        .rebuild_blue_green(Position::START, SETUP, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config {
                option: "read_model_schema",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("schema of its own"), "{err}");
    let bad = PgProjection::new(
        db.pool.clone(),
        Points {
            weight: Arc::new(AtomicI64::new(1)),
        },
        ProjectionOptions::default(),
    )
    .unwrap()
    .with_read_model_schema("Robert'); DROP TABLE events;--");
    assert!(bad.is_err());
}
