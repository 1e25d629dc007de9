//! The `chronicle` binary, run as a user would: exit codes, JSON output,
//! JSON lines on stdin, and the embedded default across invocations.

use std::process::{Command, Stdio};

mod support;

use support::{chronicle, fresh_database, json_lines, ok, psql_value};

#[test]
fn append_read_state_and_exit_codes() {
    let url = fresh_database();
    let url = Some(url.as_str());
    let migrated = json_lines(&ok(&chronicle(url, &["migrate", "--output", "json"], None)));
    assert_eq!(
        migrated[0]["applied"].as_array().map(Vec::len),
        Some(migrated[0]["schema_version"].as_u64().unwrap() as usize)
    );
    let again = json_lines(&ok(&chronicle(url, &["migrate", "--output", "json"], None)));
    assert_eq!(again[0]["applied"], serde_json::json!([]));

    let id = "0193a1b2-0000-7000-8000-000000000001";
    let append = |data: &str, expected: &str| {
        chronicle(
            url,
            &[
                "append",
                "--aggregate-id",
                id,
                "--aggregate-type",
                "user",
                "--event-type",
                "Renamed",
                "--data",
                data,
                "--metadata",
                r#"{"actor":"cli-test"}"#,
                "--expected-version",
                expected,
                "--output",
                "json",
            ],
            None,
        )
    };
    let first = json_lines(&ok(&append(r#"{"name":"Ada"}"#, "no-stream")));
    assert_eq!(first[0]["version"], 1);
    ok(&append(r#"{"name":"Ada L.","city":"London"}"#, "1"));

    let conflict = append(r#"{"name":"B"}"#, "1");
    assert_eq!(
        conflict.status.code(),
        Some(3),
        "a conflict exits 3: {}",
        String::from_utf8_lossy(&conflict.stderr)
    );
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("actual version is 2"));

    let bad = append(r#"[1,2]"#, "any");
    assert_eq!(bad.status.code(), Some(2), "bad input exits 2");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("event_data"),
        "the field is named"
    );

    let usage = chronicle(url, &["append", "--aggregate-id", id], None);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--event-type"));

    let missing = chronicle(
        url,
        &["read", "stream", "0193a1b2-0000-7000-8000-0000000000ff"],
        None,
    );
    assert_eq!(missing.status.code(), Some(4), "not found exits 4");

    let rows = json_lines(&ok(&chronicle(
        url,
        &["read", "stream", id, "--output", "json"],
        None,
    )));
    assert_eq!(rows.len(), 2);
    for key in [
        "event_id",
        "aggregate_id",
        "aggregate_type",
        "event_type",
        "event_data",
        "metadata",
        "version",
        "timestamp",
        "encrypted_fields",
        "global_position",
    ] {
        assert!(
            rows[0].get(key).is_some(),
            "read json has `{key}`: {}",
            rows[0]
        );
    }
    assert_eq!(rows[0]["metadata"]["actor"], "cli-test");
    assert_eq!(rows[1]["version"], 2);

    let state = json_lines(&ok(&chronicle(
        url,
        &["state", id, "--as-of", "1", "--output", "json"],
        None,
    )));
    assert_eq!(state[0]["state"], serde_json::json!({ "name": "Ada" }));
    let state = json_lines(&ok(&chronicle(
        url,
        &["state", id, "--output", "json"],
        None,
    )));
    assert_eq!(
        state[0]["state"],
        serde_json::json!({ "name": "Ada L.", "city": "London" })
    );
    let bad_time = chronicle(url, &["state", id, "--as-of", "yesterday"], None);
    assert_eq!(bad_time.status.code(), Some(2));

    // The gap-safe feed holds events back while an older transaction is
    // open anywhere on the server, which this binary's other tests share:
    // wait for the horizon to pass them.
    let started = std::time::Instant::now();
    let all = loop {
        let all = json_lines(&ok(&chronicle(
            url,
            &["read", "all", "--output", "json"],
            None,
        )));
        if all.len() == 2 || started.elapsed() > std::time::Duration::from_secs(30) {
            break all;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(all.len(), 2);
    let typed = json_lines(&ok(&chronicle(
        url,
        &["read", "type", "Renamed", "--output", "json"],
        None,
    )));
    assert_eq!(typed.len(), 2);
    let status = json_lines(&ok(&chronicle(url, &["status", "--output", "json"], None)));
    assert_eq!(status[0]["event_count"], 2);
}

#[test]
fn json_lines_on_stdin_are_checked_before_anything_is_stored() {
    let url = fresh_database();
    let url = Some(url.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let good = r#"{"aggregate_id":"0193a1b2-0000-7000-8000-000000000002","aggregate_type":"order","event_type":"Placed","data":{"n":1},"expected_version":"no-stream"}"#;
    let broken = r#"{"aggregate_id":"0193a1b2-0000-7000-8000-000000000002","aggregate_type":"order","event_type":"Paid","data":{"n":2},"surprise":true}"#;
    let out = chronicle(url, &["append"], Some(&format!("{good}\n{broken}\n")));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = json_lines(&ok(&chronicle(url, &["status", "--output", "json"], None)));
    assert_eq!(
        status[0]["event_count"], 0,
        "nothing of the input was stored"
    );

    let second = good
        .replace("Placed", "Shipped")
        .replace("\"no-stream\"", "1");
    let out = json_lines(&ok(&chronicle(
        url,
        &["append", "--output", "json"],
        Some(&format!("{good}\n\n{second}\n")),
    )));
    assert_eq!(out.len(), 2);
    assert_eq!(out[1]["version"], 2);
}

#[test]
fn the_embedded_default_keeps_data_between_invocations() {
    let home = tempfile::Builder::new()
        .prefix("chronicle-cli-home")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let home_path = home.path().join("pg");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_chronicle"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env("CHRONICLE_HOME", &home_path)
            .output()
            .expect("run chronicle");
        ok(&out)
    };
    run(&["migrate"]);
    run(&[
        "append",
        "--aggregate-id",
        "0193a1b2-0000-7000-8000-000000000003",
        "--aggregate-type",
        "note",
        "--event-type",
        "Written",
        "--data",
        r#"{"text":"persisted"}"#,
    ]);
    let all = json_lines(&run(&["read", "all", "--output", "json"]));
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["event_data"]["text"], "persisted");
    let status = json_lines(&run(&["dev", "status", "--output", "json"]));
    assert_eq!(status[0]["running"], true);
    run(&["dev", "stop"]);
    // Stopped, the data stays: the next command starts the cluster again.
    let all = json_lines(&run(&["read", "all", "--output", "json"]));
    assert_eq!(all.len(), 1);
    run(&["dev", "reset"]);
    assert!(
        !home_path.join("data").exists(),
        "reset deletes the cluster"
    );
}

/// A projection run in-process with one poison event; the CLI then shows
/// its partitions and the dead letter with the parked event behind it.
#[test]
fn projections_status_and_dead_letters_are_shown() {
    use async_trait::async_trait;
    use chronicle_core::{
        EventAppender, EventEnvelope, ExpectedVersion, NewEvent, ProjectionHandler,
        ProjectionResult,
    };
    use chronicle_projections::{PgContext, PgProjection, ProjectionOptions, RetryPolicy};

    struct Picky;

    #[async_trait]
    impl ProjectionHandler<PgContext> for Picky {
        fn name(&self) -> &str {
            "picky"
        }

        async fn handle(&self, event: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
            if event.event_data["poison"] == true {
                ProjectionResult::fail("poison pill")
            } else {
                ProjectionResult::Done
            }
        }
    }

    let url = fresh_database();
    let missing = chronicle(Some(&url), &["projections", "status", "picky"], None);
    assert_eq!(
        missing.status.code(),
        Some(1),
        "the schema is not migrated yet"
    );
    ok(&chronicle(Some(&url), &["migrate"], None));
    let missing = chronicle(Some(&url), &["projections", "status", "picky"], None);
    assert_eq!(missing.status.code(), Some(4), "no such projection exits 4");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let poisoned = uuid::Uuid::now_v7();
    runtime.block_on(async {
        let pool = chronicle_postgres::PgOptions::from_url(&url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let store = chronicle_postgres::PgEventStore::new(pool.clone());
        let events = vec![
            NewEvent::new("A", serde_json::json!({ "poison": true })),
            NewEvent::new("B", serde_json::json!({})),
        ];
        store
            .append(poisoned, "thing", ExpectedVersion::NoStream, events)
            .await
            .unwrap();
        store
            .append(
                uuid::Uuid::now_v7(),
                "thing",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("C", serde_json::json!({}))],
            )
            .await
            .unwrap();
        let options = ProjectionOptions {
            partitions: 1,
            retry: RetryPolicy::none(),
            ..ProjectionOptions::default()
        };
        let projection = PgProjection::new(pool, Picky, options).unwrap();
        projection.register().await.unwrap();
        let mut handled = 0;
        for _ in 0..200 {
            let out = projection.step(0, "cli-test").await.unwrap();
            handled += out.handled + out.dead_lettered + out.parked;
            if handled >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(handled, 3);
    });

    let states = json_lines(&ok(&chronicle(
        Some(&url),
        &["projections", "status", "--output", "json"],
        None,
    )));
    assert_eq!(states.len(), 1);
    assert_eq!(states[0]["projection"], "picky");
    let table = ok(&chronicle(Some(&url), &["projections", "status"], None));
    assert!(table.contains("picky"), "{table}");

    let letters = json_lines(&ok(&chronicle(
        Some(&url),
        &["dlq", "list", "picky", "--output", "json"],
        None,
    )));
    assert_eq!(
        letters.len(),
        2,
        "the poison event and the one parked behind it: {letters:?}"
    );
    assert_eq!(letters[0]["aggregate_id"], poisoned.to_string());
    assert_eq!(letters[0]["version"], 1);
    assert_eq!(letters[1]["version"], 2);
}

/// The stock binary's user-profile projection through the CLI: run until
/// SIGINT, a poisoned user dead-lettered, retry that fails again, discard
/// that delivers the parked event, and a rebuild from the start.
#[test]
fn projections_run_dlq_retry_discard_and_rebuild() {
    let url = fresh_database();
    let db = Some(url.as_str());
    ok(&chronicle(db, &["migrate"], None));
    let listed = ok(&chronicle(db, &["projections", "list"], None));
    assert!(listed.contains("user-profile"), "{listed}");

    let ada = "0193a1b2-0000-7000-8000-0000000000a1";
    let grace = "0193a1b2-0000-7000-8000-0000000000a2";
    let lines = [
        format!(
            r#"{{"aggregate_id":"{ada}","aggregate_type":"user","event_type":"UserRegistered","data":{{"email":"ada@example.com","name":"Ada"}}}}"#
        ),
        format!(
            r#"{{"aggregate_id":"{ada}","aggregate_type":"user","event_type":"NameChanged","data":{{"name":42}}}}"#
        ),
        format!(
            r#"{{"aggregate_id":"{ada}","aggregate_type":"user","event_type":"EmailChanged","data":{{"email":"ada@engine.org"}}}}"#
        ),
        format!(
            r#"{{"aggregate_id":"{grace}","aggregate_type":"user","event_type":"UserRegistered","data":{{"email":"grace@example.com","name":"Grace"}}}}"#
        ),
    ];
    ok(&chronicle(db, &["append"], Some(&lines.join("\n"))));

    let mut worker = Command::new(env!("CARGO_BIN_EXE_chronicle"))
        .args(["projections", "run", "user-profile"])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while psql_value(&url, "SELECT count(*) FROM projection_dead_letters") != "2"
        || psql_value(&url, "SELECT count(*) FROM user_profile.user_profiles") != "2"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not process the events"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = worker.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = worker.wait().unwrap();
    assert!(exit.success(), "Ctrl-C stops the worker cleanly: {exit:?}");

    let letters = json_lines(&ok(&chronicle(
        db,
        &["dlq", "list", "user-profile", "--output", "json"],
        None,
    )));
    assert_eq!(letters.len(), 2);
    let retry = chronicle(db, &["dlq", "retry", "user-profile", ada], None);
    assert_eq!(
        retry.status.code(),
        Some(1),
        "the unfixed handler fails again"
    );
    assert!(String::from_utf8_lossy(&retry.stderr).contains("new failure"));
    assert_eq!(
        psql_value(&url, "SELECT count(*) FROM projection_dead_letters"),
        "2",
        "nothing lost"
    );

    let discarded = json_lines(&ok(&chronicle(
        db,
        &["dlq", "discard", "user-profile", ada, "--output", "json"],
        None,
    )));
    assert_eq!(
        discarded[0]["delivered"].as_array().map(Vec::len),
        Some(1),
        "the parked event is delivered"
    );
    assert_eq!(discarded[0]["discarded"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        psql_value(
            &url,
            &format!("SELECT email FROM user_profile.user_profiles WHERE user_id = '{ada}'")
        ),
        "ada@engine.org"
    );

    // A rebuild replays history; it stops on the malformed event, by design.
    let rebuild = chronicle(
        db,
        &["projections", "rebuild", "user-profile", "--output", "json"],
        None,
    );
    assert_eq!(rebuild.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&rebuild.stderr).contains("stopped on partition"),
        "{}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    // From after the malformed event it completes.
    let all = json_lines(&ok(&chronicle(
        db,
        &["read", "all", "--output", "json"],
        None,
    )));
    let after = format!("{}-{}", all[1]["transaction_id"], all[1]["global_position"]);
    let done = json_lines(&ok(&chronicle(
        db,
        &[
            "projections",
            "rebuild",
            "user-profile",
            "--from",
            &after,
            "--output",
            "json",
        ],
        None,
    )));
    assert_eq!(done[0]["lag_events"], 0);
}

/// Every deployment key and flag is honoured or refused, never accepted
/// and ignored: providers without an adapter, `memory` for a local worker,
/// a name the file does not deploy, a partition count the projection does
/// not run with, and `--database-url` where no database is opened.
#[test]
fn deployment_keys_and_flags_are_honoured_or_refused() {
    let url = fresh_database();
    let db = Some(url.as_str());
    ok(&chronicle(db, &["migrate"], None));
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let deployment = |settings: &str| {
        format!("projections:\n  user-profile:\n    handler: user-profile\n{settings}")
    };
    let refused = |args: &[&str]| {
        let out = chronicle(db, args, None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    for provider in ["lambda", "vercel"] {
        let path = file(
            &format!("{provider}.yaml"),
            &deployment(&format!("    provider: {provider}\n")),
        );
        let stderr = refused(&["projections", "run", "--config", &path]);
        assert!(
            stderr.contains(&format!(
                "{path}:4:15: projections.user-profile.provider: provider `{provider}` has no \
                 adapter in this build; use `local` or `cloudflare`"
            )),
            "{stderr}"
        );
    }
    // A Cloudflare projection runs on Cloudflare: `projections run` leaves
    // it to `chronicle deploy`, saying so.
    let cloudflare = file("cloudflare.yaml", &deployment("    provider: cloudflare\n"));
    let stderr = refused(&["projections", "run", "--config", &cloudflare]);
    assert!(
        stderr.contains("user-profile has provider `cloudflare`")
            && stderr.contains("chronicle deploy"),
        "{stderr}"
    );
    let stderr = refused(&[
        "projections",
        "run",
        "user-profile",
        "--config",
        &cloudflare,
    ]);
    assert!(stderr.contains("without --config"), "{stderr}");
    let memory = file(
        "memory.yaml",
        &deployment("    config:\n      memory: 128MB\n"),
    );
    let stderr = refused(&["projections", "run", "--config", &memory]);
    assert!(
        stderr.contains(&format!("{memory}:5:")) && stderr.contains("config.memory"),
        "{stderr}"
    );

    let two = file("two.yaml", &deployment("    config: { concurrency: 2 }\n"));
    let stderr = refused(&["projections", "run", "nobody", "--config", &two]);
    assert!(
        stderr.contains("does not deploy a projection named `nobody`"),
        "{stderr}"
    );
    // The rebuild registers the projection with the file's two partitions;
    // a file asking for another count is refused, with the line.
    let rebuilt = json_lines(&ok(&chronicle(
        db,
        &[
            "projections",
            "rebuild",
            "user-profile",
            "--config",
            &two,
            "--output",
            "json",
        ],
        None,
    )));
    assert_eq!(rebuilt[0]["partitions"], 2, "concurrency is honoured");
    let four = file(
        "four.yaml",
        &deployment("    config:\n      concurrency: 4\n"),
    );
    let stderr = refused(&["projections", "run", "--config", &four]);
    assert!(
        stderr.contains(&format!(
            "{four}:5: projections.user-profile.config.concurrency: asks for 4 partitions, but \
             `user-profile` runs with 2"
        )),
        "{stderr}"
    );
    let default = file("default.yaml", &deployment(""));
    let stderr = refused(&[
        "projections",
        "rebuild",
        "user-profile",
        "--config",
        &default,
    ]);
    assert!(
        stderr.contains("concurrency (not set, so the default): asks for 4"),
        "{stderr}"
    );

    // --database-url where no database is opened.
    for args in [&["dev", "status"][..], &["completions", "bash"], &["man"]] {
        let mut all = args.to_vec();
        all.extend(["--database-url", url.as_str()]);
        let stderr = refused(&all);
        assert!(stderr.contains("--database-url does not apply"), "{stderr}");
    }
    // DATABASE_URL is ambient: `dev` says it leaves it alone.
    let home = tempfile::tempdir().unwrap();
    let mut status = support::command(db, &["dev", "status"]);
    status.env("CHRONICLE_HOME", home.path());
    let status = support::run(status, None);
    assert!(status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("DATABASE_URL is set"),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn snapshots_list_drop_and_rebuild() {
    let database = fresh_database();
    let url = Some(database.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let (a, b) = (
        "0193a1b2-0000-7000-8000-00000000000a",
        "0193a1b2-0000-7000-8000-00000000000b",
    );
    psql_value(
        &database,
        &format!(
            "INSERT INTO snapshots (aggregate_id, aggregate_type, version, schema_version, \
                                    upcaster_version, state) \
             VALUES ('{a}', 'account', 3, 1, 0, '{{\"balance\": 5}}'), \
                    ('{b}', 'ledger', 7, 2, 9, '{{}}') RETURNING 1"
        ),
    );
    let listed = json_lines(&ok(&chronicle(
        url,
        &["snapshots", "list", "--output", "json"],
        None,
    )));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["aggregate_id"], a);
    assert_eq!(listed[0]["version"], 3);
    assert_eq!(listed[0]["aggregate_version"], 0);
    assert_eq!(listed[1]["upcaster_version"], 9);
    let only = json_lines(&ok(&chronicle(
        url,
        &[
            "snapshots",
            "list",
            "--aggregate-type",
            "ledger",
            "--output",
            "json",
        ],
        None,
    )));
    assert_eq!(only.len(), 1);

    let dropped = json_lines(&ok(&chronicle(
        url,
        &["snapshots", "drop", a, "--output", "json"],
        None,
    )));
    assert_eq!(dropped[0]["dropped"], 1);
    support::fails(&chronicle(url, &["snapshots", "drop", a], None), 4);
    support::fails(&chronicle(url, &["snapshots", "drop"], None), 2);
    let rebuilt = json_lines(&ok(&chronicle(
        url,
        &[
            "snapshots",
            "rebuild",
            "--aggregate-type",
            "ledger",
            "--output",
            "json",
        ],
        None,
    )));
    assert_eq!(rebuilt[0]["dropped"], 1);
    assert_eq!(psql_value(&database, "SELECT count(*) FROM snapshots"), "0");
}
