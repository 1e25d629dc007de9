//! kill -9 a relay process mid-batch, repeatedly, during a catch-up: the
//! stream ends with every event, in order (NATS deduplicates the replayed
//! window by `Nats-Msg-Id`, so its count is exact).
//!
//! The relay process is this test binary, re-run with `--ignored --exact
//! kill9::kill9_relay_process` and the database URL and queue name in the
//! environment.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chronicle_postgres::PgOptions;
use chronicle_projections::ProjectionOptions;

use crate::support::*;

const URL_VAR: &str = "CHRONICLE_RELAY_KILL9_URL";
const QUEUE_VAR: &str = "CHRONICLE_RELAY_KILL9_QUEUE";
const NAME: &str = "kill9-relay";

fn kill9_options() -> ProjectionOptions {
    ProjectionOptions {
        partitions: 3,
        batch_size: 100,
        lease_ttl: Duration::from_millis(700),
        ..ProjectionOptions::default()
    }
}

/// Not a test on its own: the relay process of the test below, which
/// starts it with `--ignored`; a normal run lists it as ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for a_relay_killed_with_sigkill_mid_batch_loses_nothing"]
async fn kill9_relay_process() {
    let (Ok(url), Ok(queue)) = (std::env::var(URL_VAR), std::env::var(QUEUE_VAR)) else {
        return;
    };
    let pool = PgOptions::from_url(&url).unwrap().pool().unwrap();
    let q = nats(&queue).await;
    let projection =
        chronicle_projections::PgProjection::new(pool, relay(NAME, q), kill9_options()).unwrap();
    let runner = chronicle_projections::Runner::start(
        std::sync::Arc::new(projection),
        chronicle_projections::RunnerOptions {
            poll_interval: Duration::from_millis(20),
            ..chronicle_projections::RunnerOptions::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    runner.stop().await;
}

/// A relay process, killed with SIGKILL when dropped.
struct RelayProcess(Child);

impl RelayProcess {
    fn spawn(url: &str, queue: &str) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "kill9::kill9_relay_process",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(URL_VAR, url)
            .env(QUEUE_VAR, queue)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        RelayProcess(child)
    }

    fn kill(mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_mid_batch_loses_nothing() {
    let _nats = NATS_LOCK.read().await;
    let db = fresh_db().await;
    let orders = append_chunked(&db, 120, 100, 10).await; // 12,000 events
    let events = total(&orders) as u64;
    let qname = unique("kill9");
    let queue = nats(&qname).await;
    let mut kills = 0;
    for round in 0..30u64 {
        // Kill each process shortly after it starts publishing: mid-batch.
        let before = processed(&db, NAME).await;
        let p = RelayProcess::spawn(&db.url, &qname);
        let start = std::time::Instant::now();
        while processed(&db, NAME).await == before && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(10 + 17 * (round % 5))).await;
        p.kill();
        kills += 1;
        // At least five kills, and a catch-up left for the last relay.
        let done = processed(&db, NAME).await;
        if (kills >= 5 && done >= events / 2) || done >= events * 8 / 10 {
            break;
        }
    }
    let before_last = processed(&db, NAME).await;
    let last = RelayProcess::spawn(&db.url, &qname);
    wait_processed(&db, NAME, events, Duration::from_secs(300)).await;
    last.kill();
    eprintln!("kills: {kills}, relayed before the last process: {before_last}");
    assert!(
        before_last > 0 && before_last < events,
        "killed mid-catch-up: {before_last}"
    );
    assert!(
        kills >= 5,
        "the catch-up should outlive several relays: {kills}"
    );
    // Every event is in the stream exactly once (JetStream drops the
    // replayed window's copies by Nats-Msg-Id) ...
    assert_eq!(queue.depth().await.unwrap().messages, events);
    // ... and each aggregate's events are in version order.
    for (aggregate, ids) in orders.iter().take(8) {
        let got: Vec<String> = queue
            .peek(&aggregate.to_string(), 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
        assert_eq!(got, want, "aggregate {aggregate}");
    }
}

/// Appends `per` events to each of `aggregates` aggregates, `chunk` at a
/// time per aggregate, round-robin.
async fn append_chunked(
    db: &chronicle_postgres::testing::TestDb,
    aggregates: usize,
    per: usize,
    chunk: usize,
) -> Appended {
    use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
    let ids: Vec<uuid::Uuid> = (0..aggregates).map(|_| uuid::Uuid::now_v7()).collect();
    let mut appended = Appended::new();
    for _ in 0..per / chunk {
        for id in &ids {
            let events: Vec<NewEvent> = (0..chunk)
                .map(|n| NewEvent::new("Changed", serde_json::json!({ "n": n })))
                .collect();
            appended
                .entry(*id)
                .or_default()
                .extend(events.iter().map(|e| e.event_id));
            db.store
                .append(*id, "order", ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    }
    appended
}
