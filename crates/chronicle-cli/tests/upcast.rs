//! `chronicle upcast` as a user runs it: plan, run (with Ctrl-C and a
//! resume), status, verify, rollback, a second runner refused, and the
//! exit codes of mistakes.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::{fails, fresh_database, json_lines, ok, psql_value};

fn command(url: &str, args: &[&str]) -> Command {
    support::command(Some(url), args)
}

fn chronicle(url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    support::run(command(url, args), stdin)
}

/// `n` ItemAdded v1 events as JSON lines, 10 per aggregate.
fn items(n: usize) -> String {
    let mut lines = String::new();
    let mut aggregate = uuid::Uuid::now_v7();
    for i in 0..n {
        if i % 10 == 0 {
            aggregate = uuid::Uuid::now_v7();
        }
        lines.push_str(
            &serde_json::json!({
                "aggregate_id": aggregate,
                "aggregate_type": "Cart",
                "event_type": "ItemAdded",
                "data": { "name": format!("item {i}"), "n": i },
            })
            .to_string(),
        );
        lines.push('\n');
    }
    lines
}

const UPCASTERS: &str = "upcasters:
  - event_type: ItemAdded
    from: 1
    steps:
      - rename: { from: /name, to: /title }
      - add: { path: /qty, default: 1 }
    schema:
      type: object
      required: [title, qty]
";

#[test]
fn plan_run_status_verify_rollback_and_mistakes() {
    let url = fresh_database();
    let url = url.as_str();
    ok(&chronicle(url, &["migrate"], None));
    ok(&chronicle(
        url,
        &["append", "--file", "-"],
        Some(&items(30)),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("upcasters.yaml");
    std::fs::write(&config, UPCASTERS).unwrap();
    let config = config.to_str().unwrap();

    // Mistakes: exit 2, naming what to do.
    let err = fails(
        &chronicle(
            url,
            &["upcast", "plan", "--config", "/nonexistent.yaml"],
            None,
        ),
        2,
    );
    assert!(err.contains("--config PATH"), "{err}");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "upcasters:\n  - event_type: ItemAdded\n    from: 1\n    steps:\n      - rename: { from: name, to: /title }\n",
    )
    .unwrap();
    let err = fails(
        &chronicle(
            url,
            &["upcast", "plan", "--config", bad.to_str().unwrap()],
            None,
        ),
        2,
    );
    assert!(err.contains("bad.yaml:5:"), "{err}");
    assert!(err.contains("`/name`"), "{err}");
    let err = fails(&chronicle(url, &["upcast", "rollback"], None), 2);
    assert!(err.contains("--all"), "{err}");

    // Plan: a dry run.
    let plan = json_lines(&ok(&chronicle(
        url,
        &["upcast", "plan", "--config", config, "--output", "json"],
        None,
    )));
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0]["events"], 30);
    assert_eq!(plan[0]["to_version"], 2);
    let diff = plan[0]["sample_diff"].as_str().unwrap();
    assert!(diff.contains("> /name -> /title"), "{diff}");
    assert!(diff.contains("+ /qty: 1"), "{diff}");
    let table = ok(&chronicle(
        url,
        &["upcast", "plan", "--config", config],
        None,
    ));
    assert!(table.contains("ItemAdded v1"), "{table}");

    // A second runner holds the key: refused with exit 3, naming it.
    psql_value(
        url,
        "INSERT INTO chronicle_upcast_leases (event_type, from_version, owner_id, owner, expires_at) \
         VALUES ('ItemAdded', 1, gen_random_uuid(), 'ops-box pid 4242', now() + interval '1 hour')",
    );
    let err = fails(
        &chronicle(url, &["upcast", "run", "--config", config], None),
        3,
    );
    assert!(
        err.contains("already being run by ops-box pid 4242"),
        "{err}"
    );
    assert_eq!(
        psql_value(
            url,
            "SELECT count(*) FROM events WHERE metadata->>'schema_version' = '2'"
        ),
        "0"
    );
    psql_value(url, "DELETE FROM chronicle_upcast_leases");

    // Run, status, verify.
    let runs = json_lines(&ok(&chronicle(
        url,
        &[
            "upcast",
            "run",
            "--config",
            config,
            "--batch-size",
            "7",
            "--check",
            "--output",
            "json",
        ],
        None,
    )));
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "completed");
    assert_eq!(runs[0]["events_upcast"], 30);
    assert_eq!(runs[0]["batches"], 5);
    let run_id = runs[0]["run_id"].as_str().unwrap().to_owned();
    let status = json_lines(&ok(&chronicle(
        url,
        &["upcast", "status", "--output", "json"],
        None,
    )));
    assert_eq!(status.len(), 1);
    assert_eq!(status[0]["run_id"], run_id.as_str());
    let verified = json_lines(&ok(&chronicle(
        url,
        &["upcast", "verify", "--config", config, "--output", "json"],
        None,
    )));
    assert_eq!(verified[0]["ok"], true, "{verified:?}");
    assert_eq!(verified[0]["backup_count"], 30);

    // Rollback: unknown run 4, then the real one.
    let err = fails(
        &chronicle(
            url,
            &["upcast", "rollback", "0196f7e4-0000-7000-8000-000000000000"],
            None,
        ),
        4,
    );
    assert!(err.contains("chronicle upcast status"), "{err}");
    ok(&chronicle(url, &["upcast", "rollback", &run_id], None));
    assert_eq!(
        psql_value(
            url,
            "SELECT count(*) FROM events WHERE event_data ? 'name' AND NOT event_data ? 'title'"
        ),
        "30"
    );
    let status = json_lines(&ok(&chronicle(
        url,
        &["upcast", "status", "--output", "json"],
        None,
    )));
    assert_eq!(status[0]["status"], "rolled_back");
}

#[test]
fn ctrl_c_stops_a_run_and_running_again_continues_it() {
    let url = fresh_database();
    let url = url.as_str();
    ok(&chronicle(url, &["migrate"], None));
    ok(&chronicle(
        url,
        &["append", "--file", "-"],
        Some(&items(3000)),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("upcasters.yaml");
    std::fs::write(&config, UPCASTERS).unwrap();
    let config = config.to_str().unwrap();

    let child = command(
        url,
        &["upcast", "run", "--config", config, "--batch-size", "2"],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while psql_value(
        url,
        "SELECT coalesce(max(events_upcast), 0) FROM chronicle_upcast_runs",
    ) == "0"
    {
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let err = fails(&out, 1);
    assert!(err.contains("interrupted"), "{err}");
    assert!(err.contains("again to continue"), "{err}");
    let done: i64 = psql_value(url, "SELECT events_upcast FROM chronicle_upcast_runs")
        .parse()
        .unwrap();
    assert!(done > 0 && done < 3000, "{done}");
    assert_eq!(
        psql_value(url, "SELECT status FROM chronicle_upcast_runs"),
        "running"
    );
    // The lease was released: the next run starts at once and continues.
    assert_eq!(
        psql_value(url, "SELECT count(*) FROM chronicle_upcast_leases"),
        "0"
    );
    let runs = json_lines(&ok(&chronicle(
        url,
        &["upcast", "run", "--config", config, "--output", "json"],
        None,
    )));
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["events_upcast"], 3000);
    assert_eq!(
        psql_value(url, "SELECT count(*) FROM chronicle_upcast_runs"),
        "1"
    );
    assert_eq!(
        psql_value(
            url,
            "SELECT count(*) FROM events WHERE metadata->>'schema_version' = '2'"
        ),
        "3000"
    );
}
