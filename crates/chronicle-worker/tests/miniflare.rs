//! The user-profile Worker run for real: built by `worker-build`, run in
//! Miniflare (workerd) on loopback against a throwaway PostgreSQL reached
//! over TCP, fired by its cron trigger and by queue wake-ups.
//!
//! Needs `worker-build` and `wasm-bindgen` (at the version of the
//! workspace's `wasm-bindgen` crate) on the PATH or in `WASM_BINDGEN_BIN`,
//! and `npm ci` run in `tools/cloudflare-local` (`.ci/run` does both). A missing tool
//! fails the test with the command that installs it.

use std::path::Path;
use std::time::Duration;

use chronicle_adapter_contract::cloudflare::{Variant, build_worker, tools_dir};
use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
use chronicle_postgres::testing::{TestDb, fresh_db};
use serde_json::{Value, json};
use uuid::Uuid;

/// Runs the built Worker in Miniflare: `rounds` cron triggers, then the
/// queue `messages`. Returns the script's JSON report.
async fn run_worker(build: &Path, url: &str, rounds: u32, messages: Value) -> Value {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(tools_dir().join("run-worker.mjs"))
        .current_dir(tools_dir())
        .env("BUILD_DIR", build)
        .env("DATABASE_URL", url)
        .env("ROUNDS", rounds.to_string())
        .env("QUEUE_MESSAGES", messages.to_string());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("Miniflare finished within 2 minutes")
        .expect("node is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Miniflare run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("a JSON report");
    serde_json::from_str(line).expect("the report is JSON")
}

/// The example's read model (user_profile::projection::READ_MODEL_DDL in
/// its schema; a product crate does not depend on an example), with
/// `constraint` added to the table.
async fn read_model(db: &TestDb, constraint: &str) {
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE SCHEMA user_profile;
             CREATE TABLE user_profile.user_profiles (
                 user_id UUID PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
                 closed BOOLEAN NOT NULL DEFAULT false, version INTEGER NOT NULL {constraint})"
        ))
        .await
        .unwrap();
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_profile_worker_projects_real_events_exactly_once_in_miniflare() {
    let build = tokio::task::spawn_blocking(|| build_worker(Variant::Default))
        .await
        .unwrap();
    let db = fresh_db().await;
    read_model(&db, "").await;
    let users: Vec<Uuid> = (0..25).map(|_| Uuid::now_v7()).collect();
    for (i, user) in users.iter().enumerate() {
        db.store
            .append(
                *user,
                "user",
                ExpectedVersion::NoStream,
                vec![
                    NewEvent::new(
                        "UserRegistered",
                        json!({ "email": format!("u{i}@example.com"), "name": format!("User {i}") }),
                    ),
                    NewEvent::new("NameChanged", json!({ "name": format!("Renamed {i}") })),
                ],
            )
            .await
            .unwrap();
    }
    // Not the projection's: its subscription leaves it in the store.
    db.store
        .append(
            Uuid::now_v7(),
            "customer",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "CustomerRegistered",
                json!({ "name": "Grace" }),
            )],
        )
        .await
        .unwrap();
    let url = db.tcp_url().await;

    // The cron trigger, twice: the second finds nothing new.
    let report = run_worker(&build, &url, 2, json!([])).await;
    for outcome in report["outcomes"].as_array().unwrap() {
        assert_eq!(outcome["outcome"], "ok", "{report}");
    }
    let rows = scalar(
        &db,
        "SELECT count(*) FROM user_profile.user_profiles WHERE name LIKE 'Renamed %' AND version = 2",
    )
    .await;
    assert_eq!(
        rows, 25,
        "every user registered and renamed, in order: {report}"
    );
    assert_eq!(
        scalar(&db, "SELECT sum(events_processed)::int8 FROM projection_state WHERE projection = 'user-profile'").await,
        50,
        "each event handled once, the customer's not at all"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM projection_state WHERE projection = 'user-profile'
              AND owner = 'cloudflare-worker' AND lag_events = 0"
        )
        .await,
        2,
        "both partitions held by the Worker and caught up"
    );

    // More events, then a queue wake-up for every partition.
    for user in &users[..10] {
        db.store
            .append(
                *user,
                "user",
                ExpectedVersion::Exact(2),
                vec![NewEvent::new(
                    "EmailChanged",
                    json!({ "email": "new@example.com" }),
                )],
            )
            .await
            .unwrap();
    }
    let report = run_worker(
        &build,
        &url,
        0,
        json!([{ "projection": "user-profile", "partitions": [] }]),
    )
    .await;
    assert!(
        report["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap_or("").contains("handled: 10")),
        "the queue consumer stepped the new events: {report}"
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM user_profile.user_profiles WHERE email = 'new@example.com' AND version = 3").await,
        10
    );
    assert_eq!(
        scalar(&db, "SELECT sum(events_processed)::int8 FROM projection_state WHERE projection = 'user-profile'").await,
        60
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM projection_dead_letters").await,
        0
    );
}

/// A handler failure inside the Worker takes the same path as in a local
/// runner: retried with exponential backoff (3 retries), then
/// dead-lettered, the aggregate's later events parked behind it, the other
/// aggregates going on; the dead-letter queue the CLI lists shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_in_the_worker_retries_with_backoff_then_dead_letters_in_sequence() {
    let build = tokio::task::spawn_blocking(|| build_worker(Variant::Default))
        .await
        .unwrap();
    let db = fresh_db().await;
    // The read model refuses one address: the handler's INSERT fails with
    // a database error, which it reports as retryable.
    read_model(&db, ", CHECK (email NOT LIKE '%@refused.test')").await;
    let poisoned = Uuid::now_v7();
    let healthy = Uuid::now_v7();
    for (user, email) in [
        (poisoned, "ada@refused.test"),
        (healthy, "grace@example.com"),
    ] {
        db.store
            .append(
                user,
                "user",
                ExpectedVersion::NoStream,
                vec![
                    NewEvent::new("UserRegistered", json!({ "email": email, "name": "N" })),
                    NewEvent::new("NameChanged", json!({ "name": "Later" })),
                ],
            )
            .await
            .unwrap();
    }
    let url = db.tcp_url().await;
    let report = run_worker(&build, &url, 1, json!([])).await;
    assert_eq!(report["outcomes"][0]["outcome"], "ok", "{report}");

    let letters = chronicle_projections::dlq::list(&db.pool, "user-profile", None)
        .await
        .unwrap();
    let failed: Vec<_> = letters
        .iter()
        .filter(|l| l.state == chronicle_projections::DeadLetterState::Failed)
        .collect();
    let parked: Vec<_> = letters
        .iter()
        .filter(|l| l.state == chronicle_projections::DeadLetterState::Parked)
        .collect();
    assert_eq!(failed.len(), 1, "{letters:?}");
    assert_eq!(
        (
            failed[0].aggregate_id,
            failed[0].version,
            failed[0].attempts
        ),
        (poisoned, 1, 4),
        "the first try and 3 retries: {letters:?}"
    );
    assert!(
        failed[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("user_profiles_email_check"),
        "the database's reason is kept: {letters:?}"
    );
    assert_eq!(
        parked
            .iter()
            .map(|l| (l.aggregate_id, l.version))
            .collect::<Vec<_>>(),
        vec![(poisoned, 2)],
        "the aggregate's later event waits behind it"
    );
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM user_profile.user_profiles WHERE user_id = '{healthy}' AND version = 2")).await,
        1,
        "the other aggregate went on"
    );
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT count(*) FROM user_profile.user_profiles WHERE user_id = '{poisoned}'"
            )
        )
        .await,
        0
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT sum(failure_count)::int8 FROM projection_state WHERE projection = 'user-profile'"
        )
        .await,
        4,
        "every failed try is counted"
    );
}
