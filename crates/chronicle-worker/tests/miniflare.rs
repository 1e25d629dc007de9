//! The user-profile Worker run for real: built by `worker-build`, run in
//! Miniflare (workerd) on loopback against a throwaway PostgreSQL reached
//! over TCP, fired by its cron trigger and by queue wake-ups.
//!
//! Needs `worker-build` and `wasm-bindgen` (at the version of the
//! workspace's `wasm-bindgen` crate) on the PATH or in `WASM_BINDGEN_BIN`,
//! and `npm ci` run in `tools/cloudflare-local` (`.ci/run` does both). A missing tool
//! fails the test with the command that installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
use chronicle_postgres::testing::{TestDb, fresh_db};
use serde_json::{Value, json};
use tokio::net::{TcpListener, UnixStream};
use uuid::Uuid;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/cloudflare-local")
}

/// Builds `examples/user-profile-worker` with worker-build (no download:
/// wasm-bindgen and esbuild come from this machine) into a folder of its
/// own; returns the folder.
fn build_worker() -> PathBuf {
    let wasm_bindgen = std::env::var_os("WASM_BINDGEN_BIN")
        .map(PathBuf::from)
        .or_else(|| which("wasm-bindgen"))
        .expect(
            "wasm-bindgen is not installed: cargo install wasm-bindgen-cli --version <the \
             wasm-bindgen version in Cargo.lock> (or set WASM_BINDGEN_BIN)",
        );
    let worker_build = which("worker-build")
        .expect("worker-build is not installed: cargo install worker-build --version 0.8.7");
    let esbuild = js_dir().join("node_modules/@esbuild/linux-x64/bin/esbuild");
    assert!(
        esbuild.exists(),
        "the test's npm packages are missing: (cd {} && npm ci)",
        js_dir().display()
    );
    let crate_dir = workspace().join("examples/user-profile-worker");
    let out = Command::new(worker_build)
        .args(["--release"])
        .current_dir(&crate_dir)
        .env("WASM_BINDGEN_BIN", wasm_bindgen)
        .env("ESBUILD_BIN", esbuild)
        .output()
        .expect("run worker-build");
    assert!(
        out.status.success(),
        "worker-build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let build = crate_dir.join("build");
    assert!(
        build.join("index_bg.wasm").exists(),
        "no wasm in {}",
        build.display()
    );
    build
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
        .map(|dir| dir.join(tool))
        .find(|p| p.exists())
}

/// A TCP port on loopback that forwards to the test cluster's Unix socket
/// (the throwaway clusters listen on a socket only; a Worker speaks TCP).
async fn tcp_to(db: &TestDb) -> u16 {
    let config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    let socket = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Unix(dir)), Some(port)) => {
            dir.join(format!(".s.PGSQL.{port}"))
        }
        other => panic!("the test cluster is not on a Unix socket: {other:?}"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    port
}

/// Runs the built Worker in Miniflare: `rounds` cron triggers, then the
/// queue `messages`. Returns the script's JSON report.
async fn run_worker(build: &Path, url: &str, rounds: u32, messages: Value) -> Value {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(js_dir().join("run-worker.mjs"))
        .current_dir(js_dir())
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
    let build = tokio::task::spawn_blocking(build_worker).await.unwrap();
    let db = fresh_db().await;
    // The example's read model (user_profile::projection::READ_MODEL_DDL
    // in its schema; a product crate does not depend on an example).
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE SCHEMA user_profile;
             CREATE TABLE user_profile.user_profiles (
                 user_id UUID PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
                 closed BOOLEAN NOT NULL DEFAULT false, version INTEGER NOT NULL)",
        )
        .await
        .unwrap();
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
    let port = tcp_to(&db).await;
    let config: tokio_postgres::Config = db.url.parse().unwrap();
    let user = config.get_user().unwrap_or("postgres");
    let url = format!("postgresql://{user}:unused@127.0.0.1:{port}/{}", db.name);

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
