//! `chronicle deploy`, `scale`, `monitor` and `undeploy` run as an
//! operator would, against a local Cloudflare (the API v4 server of
//! `tools/cloudflare-local`, running the uploaded Worker in Miniflare) and
//! a test database the Worker reaches over TCP.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use chronicle_adapter_contract::cloudflare::{LocalCloudflare, Variant, build_worker, workspace};
use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
use chronicle_postgres::testing::fresh_db;
use serde_json::{Value, json};
use uuid::Uuid;

mod support;

/// The deployment file: user-profile on Cloudflare, its Worker the
/// example's crate.
fn deployment(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("chronicle.yaml");
    let worker = workspace().join("examples/user-profile-worker");
    std::fs::write(
        &path,
        format!(
            "projections:\n  user-profile:\n    handler: ./src/projections/user-profile\n    provider: cloudflare\n    worker: '{}'\n    config:\n      timeout: '10s'\n      concurrency: 2\n{extra}",
            worker.display()
        ),
    )
    .unwrap();
    path
}

/// `chronicle` with `args` against `url`, the local Cloudflare at `api`.
fn chronicle(url: &str, api: &str, args: &[&str]) -> Output {
    let mut cmd = support::command(Some(url), args);
    cmd.env("CLOUDFLARE_API_BASE_URL", api)
        .env_remove("CHRONICLE_SECRETS_DIR")
        .env_remove("CHRONICLE_CLOUDFLARE_ACCOUNT_ID")
        .env_remove("CHRONICLE_CLOUDFLARE_API_TOKEN")
        .env_remove("CHRONICLE_CLOUDFLARE_DATABASE_URL");
    support::run(cmd, None)
}

fn json_line(out: &Output) -> Value {
    let stdout = support::ok(out);
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_scale_monitor_and_undeploy_a_cloudflare_projection() {
    let db = fresh_db().await;
    tokio::task::spawn_blocking(|| build_worker(Variant::Default))
        .await
        .unwrap();
    let local = LocalCloudflare::start(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = deployment(dir.path(), "");
    let file = file.to_str().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let secrets = secrets.to_str().unwrap().to_owned();
    let (url, api) = (db.url.clone(), local.base_url.clone());
    let run = move |args: Vec<String>| {
        let (url, api) = (url.clone(), api.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                chronicle(&url, &api, &args)
            })
            .await
            .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // `a` against the file with the secrets folder, in JSON.
    let with_secrets = |a: &[&str]| {
        let mut v = args(a);
        v.extend(args(&[
            "-c",
            file,
            "--secrets-dir",
            &secrets,
            "--output",
            "json",
        ]));
        v
    };

    // The plan, with no credentials and no database.
    let out = run(args(&["deploy", "-c", file, "--dry-run"])).await;
    let plan = support::ok(&out);
    for line in [
        "Cloudflare Worker `chronicle-user-profile`",
        "index_bg.wasm (application/wasm",
        "cron trigger: * * * * *",
        "max_concurrency 2",
        "config.timeout = 10s: limits.cpu_ms = 10000",
        "config.memory = (not set): 128 MB",
    ] {
        assert!(plan.contains(line), "{line:?} not in:\n{plan}");
    }
    let out = run(args(&[
        "deploy",
        "-c",
        file,
        "--dry-run",
        "--output",
        "json",
    ]))
    .await;
    assert_eq!(json_line(&out)["plan"]["cpu_ms"], 10000);

    // Credentials come from the secret store; a missing one is named.
    let out = run(args(&["deploy", "-c", file])).await;
    let err = support::fails(&out, 1);
    assert!(
        err.contains("cloudflare-account-id") && err.contains("CHRONICLE_CLOUDFLARE_ACCOUNT_ID"),
        "{err}"
    );
    for (name, value) in [
        ("cloudflare-account-id", local.account.clone()),
        ("cloudflare-api-token", local.token.clone()),
    ] {
        std::fs::write(Path::new(&secrets).join(name), value).unwrap();
    }
    let out = run(with_secrets(&["deploy"])).await;
    let err = support::fails(&out, 1);
    assert!(err.contains("cloudflare-database-url"), "{err}");
    std::fs::write(
        Path::new(&secrets).join("cloudflare-database-url"),
        db.tcp_url().await,
    )
    .unwrap();

    // Deploy; appended events reach the read model through the Worker.
    let out = run(with_secrets(&["deploy"])).await;
    let deployed = json_line(&out);
    assert_eq!(
        (
            deployed["provider"].as_str(),
            deployed["script"].as_str(),
            deployed["instances"].as_u64()
        ),
        (Some("cloudflare"), Some("chronicle-user-profile"), Some(2)),
        "{deployed}"
    );
    let users: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    for user in &users {
        db.store
            .append(
                *user,
                "user",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(
                    "UserRegistered",
                    json!({ "email": "a@b.c", "name": "N" }),
                )],
            )
            .await
            .unwrap();
    }
    let monitor = with_secrets(&["monitor", "user-profile"]);
    let started = Instant::now();
    let health = loop {
        let health = json_line(&run(monitor.clone()).await);
        let processed: u64 = health["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["events_processed"].as_u64().unwrap())
            .sum();
        if processed == 8 && health["lag_events"] == 0 {
            break health;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not caught up: {health}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(health["provider"]["deployed"], true, "{health}");
    assert_eq!(
        health["provider"]["details"]["crons"], "* * * * *",
        "{health}"
    );
    assert!(
        health["partitions"][0]["owner"]
            .as_str()
            .is_some_and(|o| o == "cloudflare/chronicle-user-profile")
            || health["partitions"][1]["owner"] == "cloudflare/chronicle-user-profile",
        "{health}"
    );

    // Scale within the partitions; beyond them is refused with the range.
    let out = run(with_secrets(&["scale", "user-profile", "1"])).await;
    assert_eq!(json_line(&out)["max_concurrency"], 1);
    let out = run(with_secrets(&["scale", "user-profile", "3"])).await;
    let err = support::fails(&out, 2);
    assert!(err.contains("ask for 1 to 2"), "{err}");
    let health = json_line(&run(monitor.clone()).await);
    assert_eq!(
        health["provider"]["details"]["max_concurrency"], "1",
        "{health}"
    );

    // Undeploy, then nothing left to undeploy.
    let undeploy = with_secrets(&["undeploy", "user-profile"]);
    assert_eq!(json_line(&run(undeploy.clone()).await)["undeployed"], true);
    let err = support::fails(&run(undeploy).await, 4);
    assert!(err.contains("nothing to undeploy"), "{err}");
    assert_eq!(
        local.script("chronicle-user-profile").await["deployed"],
        false
    );
    local.stop().await;
}

#[test]
fn limits_above_cloudflares_are_refused_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = deployment(dir.path(), "      memory: '256MB'\n");
    let out = support::chronicle(
        None,
        &["deploy", "-c", file.to_str().unwrap(), "--dry-run"],
        None,
    );
    let err = support::fails(&out, 2);
    assert!(
        err.contains(":9:")
            && err.contains("projections.user-profile.config.memory")
            && err.contains("128MB"),
        "{err}"
    );
    // A local projection is not deployed anywhere: the command says where
    // it runs instead.
    let local = dir.path().join("local.yaml");
    std::fs::write(
        &local,
        "projections:\n  user-profile:\n    handler: user-profile\n",
    )
    .unwrap();
    let out = support::chronicle(
        None,
        &["deploy", "-c", local.to_str().unwrap(), "--dry-run"],
        None,
    );
    let err = support::fails(&out, 2);
    assert!(err.contains("no projection to a provider"), "{err}");
}
