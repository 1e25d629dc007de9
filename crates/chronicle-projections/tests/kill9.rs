//! kill -9 a worker process mid-batch, repeatedly, during a catch-up; the
//! read model ends equal to the history's fold: no loss, no double effect.
//!
//! The worker is this test binary itself, re-run with `--ignored --exact
//! kill9::kill9_worker_process` and `CHRONICLE_KILL9_URL` set, so that
//! [`kill9_worker_process`] runs a [`Runner`] until killed.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chronicle_postgres::PgOptions;
use chronicle_projections::{PgProjection, ProjectionOptions, Runner, RunnerOptions};

use crate::ledger::{
    Ledger, create_read_model, deposit, events_processed, expected_model, read_model,
    wait_until_processed,
};
use crate::support::fresh_db;

const URL_VAR: &str = "CHRONICLE_KILL9_URL";

/// The catch-up's length.
const EVENTS: u64 = 100_000;

fn options() -> ProjectionOptions {
    ProjectionOptions {
        partitions: 3,
        batch_size: 500,
        lease_ttl: Duration::from_millis(700),
        ..ProjectionOptions::default()
    }
}

/// Not a test on its own: the worker process of the test below, which
/// starts it with `--ignored`; a normal run lists it as ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for kill_dash_nine_mid_batch_repeatedly_loses_nothing_and_applies_nothing_twice"]
async fn kill9_worker_process() {
    let Ok(url) = std::env::var(URL_VAR) else {
        return;
    };
    let pool = PgOptions::from_url(&url).unwrap().pool().unwrap();
    let ledger = Ledger::new("kill9");
    let projection = Arc::new(PgProjection::new(pool, ledger, options()).unwrap());
    let runner = Runner::start(
        projection,
        RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    runner.stop().await;
}

/// A worker process, killed with SIGKILL when dropped (also when the test
/// fails half-way).
struct Worker(Child);

impl Worker {
    fn spawn(url: &str) -> Worker {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "kill9::kill9_worker_process",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(URL_VAR, url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Worker(child)
    }

    fn kill(mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_mid_batch_repeatedly_loses_nothing_and_applies_nothing_twice() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    deposit(&db, 1_000, 100).await; // 100,000 events
    let mut kills = 0;
    // Kill workers through the first half of the catch-up (at most 30
    // rounds of a second or two), then let a last one finish.
    for round in 0..30u64 {
        // Two worker processes share the partitions; let them work a while
        // (past the previous round's leases), then SIGKILL both wherever
        // they are.
        let workers = [Worker::spawn(&db.url), Worker::spawn(&db.url)];
        tokio::time::sleep(Duration::from_millis(1_200 + 97 * (round % 7))).await;
        for worker in workers {
            worker.kill();
            kills += 1;
        }
        let processed = events_processed(&db, "kill9").await;
        if processed >= EVENTS / 2 {
            break;
        }
    }
    assert!(kills >= 6, "the catch-up should outlive several workers");
    let processed_before_last = events_processed(&db, "kill9").await;
    // A last worker, left alone, finishes.
    let last = Worker::spawn(&db.url);
    wait_until_processed(&db, "kill9", EVENTS, Duration::from_secs(600)).await;
    last.kill();

    eprintln!("kills: {kills}, handled before the last worker: {processed_before_last}");
    assert!(
        processed_before_last > 0,
        "the killed workers made progress: {processed_before_last}"
    );
    let model = read_model(&db).await;
    assert_eq!(
        model,
        expected_model(&db).await,
        "no loss, no double effect"
    );
    assert!(
        model
            .values()
            .all(|(_, v)| v.iter().copied().eq(1..=v.len() as i32)),
        "versions in order"
    );
    let client = db.pool.get().await.unwrap();
    let effects: i64 = client
        .query_typed_one("SELECT count(*) FROM ledger_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(effects, EVENTS as i64);
    let dead: i64 = client
        .query_typed_one("SELECT count(*) FROM projection_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "no double effect was refused into the DLQ");
}
