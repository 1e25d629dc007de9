//! The contract every [`ProjectionAdapter`] must pass, run against the
//! `user-profile` projection on a fresh database:
//!
//! 1. `deploy` starts it;
//! 2. events flow into the read model exactly once while a writer
//!    appends, and `monitor`'s lag falls to zero;
//! 3. `scale` up and down during the appends loses and duplicates
//!    nothing;
//! 4. a poison event is dead-lettered and its aggregate's later events
//!    wait behind it while the other aggregates go on;
//! 5. a redeploy with a changed handler takes effect (the fixed handler
//!    skips what the old one dead-lettered), and `dlq retry` with it
//!    releases the parked events;
//! 6. `undeploy` stops all work.
//!
//! An adapter's test implements [`Subject`] and calls [`run`]; one that
//! fails it is not done.

pub mod cloudflare;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, ExpectedVersion, NewEvent, ProjectionAdapter, ProjectionHandler,
};
use chronicle_postgres::testing::TestDb;
use chronicle_projections::{DeadLetterState, PgContext, PgProjection, ProjectionOptions};
use serde_json::json;
use user_profile::projection::{READ_MODEL_DDL, READ_MODEL_SCHEMA, UserProfileProjection};
use uuid::Uuid;

/// The projection the suite deploys.
pub const PROJECTION: &str = "user-profile";

/// The partition count the suite's deployments use.
pub const PARTITIONS: u32 = 2;

/// An adapter under test, with what the suite cannot do through the
/// [`ProjectionAdapter`] trait alone.
#[async_trait]
pub trait Subject: Send + Sync {
    /// The provider's name, for messages.
    fn provider(&self) -> &'static str;

    /// The adapter, deploying `user-profile` with [`PARTITIONS`]
    /// partitions on the suite's database. `fixed`: what it deploys runs
    /// the fixed handler ([`fixed_handler`]); an adapter that runs the
    /// handler object it is given ignores it, one that uploads code
    /// switches to the fixed build.
    async fn adapter(&self, fixed: bool) -> Arc<dyn ProjectionAdapter<PgContext>>;
}

/// The handler the suite deploys first.
pub fn handler() -> Arc<dyn ProjectionHandler<PgContext>> {
    Arc::new(UserProfileProjection::default())
}

/// The fixed handler: it skips events that do not decode instead of
/// failing on them.
pub fn fixed_handler() -> Arc<dyn ProjectionHandler<PgContext>> {
    let fixed = UserProfileProjection::default();
    fixed.lenient();
    Arc::new(fixed)
}

/// Creates the read model `user-profile` writes.
pub async fn create_read_model(db: &TestDb) {
    db.pool
        .get()
        .await
        .expect("a connection")
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {READ_MODEL_SCHEMA};
             SET search_path = {READ_MODEL_SCHEMA}; {READ_MODEL_DDL}; RESET search_path"
        ))
        .await
        .expect("the read model is created");
}

/// Runs the contract against `subject` on `db` (fresh and migrated).
pub async fn run(subject: &dyn Subject, db: &TestDb) {
    let provider = subject.provider();
    create_read_model(db).await;
    let adapter = subject.adapter(false).await;
    let deployed = adapter.deploy(handler()).await.expect("deploy");
    assert_eq!(
        (deployed.projection.as_str(), deployed.provider.as_str()),
        (PROJECTION, provider)
    );

    // 2 and 3: a writer appends while the adapter scales up and down.
    let users: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    let writer = {
        let store = db.store.clone();
        let users = users.clone();
        tokio::spawn(async move {
            for round in 0..3u32 {
                for (i, user) in users.iter().enumerate() {
                    let event = match round {
                        0 => NewEvent::new(
                            "UserRegistered",
                            json!({ "email": format!("u{i}@example.com"), "name": format!("User {i}") }),
                        ),
                        1 => NewEvent::new(
                            "EmailChanged",
                            json!({ "email": format!("v{i}@example.com") }),
                        ),
                        _ => {
                            NewEvent::new("NameChanged", json!({ "name": format!("Renamed {i}") }))
                        }
                    };
                    let expected = if round == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(round)
                    };
                    store
                        .append(*user, "user", expected, vec![event])
                        .await
                        .expect("append");
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    adapter
        .scale(PROJECTION, PARTITIONS)
        .await
        .expect("scale up");
    tokio::time::sleep(Duration::from_millis(400)).await;
    adapter.scale(PROJECTION, 1).await.expect("scale down");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // One instance may hold fewer partitions than there are (a local
    // runner holds one; the others wait for another process): back to
    // one per partition before the end is awaited.
    adapter
        .scale(PROJECTION, PARTITIONS)
        .await
        .expect("scale back up");
    writer.await.expect("the writer finished");
    let appended = 3 * users.len() as i64;
    wait_until(db, "every event projected once", || async {
        count(db, "SELECT count(*) FROM user_profile.user_profiles WHERE version = 3 AND name LIKE 'Renamed %' AND email LIKE 'v%'").await
            == users.len() as i64
            && processed(db).await >= appended
    })
    .await;
    assert_eq!(
        processed(db).await,
        appended,
        "each event handled exactly once"
    );
    wait_until(db, "monitor reports no lag", || async {
        adapter
            .monitor(PROJECTION)
            .await
            .is_ok_and(|h| h.lag_events == 0 && h.dead_letters == 0)
    })
    .await;

    // 4: a poison event; its aggregate's next event waits behind it.
    let poisoned = users[0];
    db.store
        .append(
            poisoned,
            "user",
            ExpectedVersion::Exact(3),
            vec![
                NewEvent::new("NameChanged", json!({ "name": 42 })),
                NewEvent::new(
                    "EmailChanged",
                    json!({ "email": "after-the-poison@example.com" }),
                ),
            ],
        )
        .await
        .expect("append the poison");
    let newcomer = Uuid::now_v7();
    register(db, newcomer, "newcomer@example.com").await;
    wait_until(db, "the poison dead-lettered, the next event parked, others going on", || async {
        let letters = chronicle_projections::dlq::list(&db.pool, PROJECTION, None)
            .await
            .unwrap_or_default();
        let shape: Vec<_> = letters
            .iter()
            .map(|l| (l.aggregate_id, l.version, l.state))
            .collect();
        shape == vec![(poisoned, 4, DeadLetterState::Failed), (poisoned, 5, DeadLetterState::Parked)]
            && count(db, &format!("SELECT count(*) FROM user_profile.user_profiles WHERE user_id = '{newcomer}'")).await == 1
    })
    .await;
    assert_eq!(
        count(
            db,
            &format!(
                "SELECT version::int8 FROM user_profile.user_profiles WHERE user_id = '{poisoned}'"
            )
        )
        .await,
        3,
        "nothing of the poisoned aggregate after the poison is applied"
    );
    let health = adapter.monitor(PROJECTION).await.expect("monitor");
    assert_eq!(health.dead_letters, 2, "{health:?}");

    // 5: a redeploy with the fixed handler runs it: a new undecodable
    // event is skipped, not dead-lettered; `dlq retry` with it releases
    // the parked event.
    let fixed = subject.adapter(true).await;
    fixed.deploy(fixed_handler()).await.expect("redeploy");
    let other = users[1];
    db.store
        .append(
            other,
            "user",
            ExpectedVersion::Exact(3),
            vec![
                NewEvent::new("NameChanged", json!({ "name": ["not", "a", "name"] })),
                NewEvent::new("EmailChanged", json!({ "email": "fixed@example.com" })),
            ],
        )
        .await
        .expect("append");
    wait_until(
        db,
        "the redeployed handler skips what the old one refused",
        || async {
            count(
                db,
                &format!(
                    "SELECT version::int8 FROM user_profile.user_profiles WHERE user_id = '{other}'"
                ),
            )
            .await
                == 5
        },
    )
    .await;
    let options = ProjectionOptions {
        partitions: PARTITIONS,
        ..ProjectionOptions::default()
    };
    let retry = PgProjection::new(db.pool.clone(), fixed_handler(), options)
        .and_then(|p| p.with_read_model_schema(READ_MODEL_SCHEMA))
        .expect("the projection opens");
    let report = retry.dlq_retry(poisoned).await.expect("dlq retry");
    assert_eq!(report.delivered.len(), 2, "{report:?}");
    assert_eq!(
        count(db, &format!("SELECT count(*) FROM user_profile.user_profiles WHERE user_id = '{poisoned}' AND version = 5 AND email = 'after-the-poison@example.com'")).await,
        1
    );
    assert_eq!(
        count(db, "SELECT count(*) FROM projection_dead_letters").await,
        0
    );

    // 6: undeploy stops all work.
    fixed.undeploy(PROJECTION).await.expect("undeploy");
    let settled = processed(db).await;
    let late = Uuid::now_v7();
    register(db, late, "late@example.com").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(
            db,
            &format!("SELECT count(*) FROM user_profile.user_profiles WHERE user_id = '{late}'")
        )
        .await,
        0,
        "nothing runs after undeploy"
    );
    assert_eq!(processed(db).await, settled, "no step ran after undeploy");
}

async fn register(db: &TestDb, user: Uuid, email: &str) {
    db.store
        .append(
            user,
            "user",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "UserRegistered",
                json!({ "email": email, "name": "N" }),
            )],
        )
        .await
        .expect("append");
}

/// A count (or any `int8`) from `sql`; 0 when it returns no row or NULL.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let client = db.pool.get().await.expect("a connection");
    client
        .query_opt(sql, &[])
        .await
        .expect("the query runs")
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0)
}

/// Events handled by the projection, over its partitions.
pub async fn processed(db: &TestDb) -> i64 {
    count(
        db,
        "SELECT sum(events_processed)::int8 FROM projection_state WHERE projection = 'user-profile'",
    )
    .await
}

/// Waits up to 90 s for `done`; fails with the projection's state.
pub async fn wait_until<F, Fut>(db: &TestDb, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > Duration::from_secs(90) {
            let state = chronicle_projections::load_state(&db.pool, Some(PROJECTION)).await;
            let letters = chronicle_projections::dlq::list(&db.pool, PROJECTION, None).await;
            panic!("not within 90 s: {what}\nstate: {state:#?}\ndead letters: {letters:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
