//! What a newcomer does first: `chronicle demo`, then every command it says
//! to try. Each must exit 0 without a warning, and running the demo's
//! projection afterwards must dead-letter nothing.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

mod support;

use support::{command, fresh_database, json_lines, ok, run};

/// `chronicle args` on `url`, from `home` (the demo's keyring lands there).
fn chronicle_in(home: &Path, url: &str, args: &[&str]) -> Output {
    let mut cmd = command(Some(url), args);
    cmd.current_dir(home).env("CHRONICLE_HOME", home);
    run(cmd, None)
}

/// The commands under each `Try:` line of the demo's output.
fn try_lines(demo: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut under_try = false;
    for line in demo.lines() {
        if line.trim_end() == "Try:" {
            under_try = true;
        } else if under_try && line.starts_with("  chronicle ") {
            commands.push(line.split_whitespace().skip(1).map(str::to_owned).collect());
        } else {
            under_try = false;
        }
    }
    commands
}

fn assert_quiet_success(args: &[String], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "`chronicle {}` failed\nstdout: {}\nstderr: {stderr}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("warn") && !lower.contains("error"),
        "`chronicle {}` warned: {stderr}",
        args.join(" ")
    );
}

/// Runs `chronicle projections run ...` until every partition of its
/// projections is held and caught up, then stops it with Ctrl-C (SIGINT).
fn run_until_caught_up(home: &Path, url: &str, args: &[String]) -> Output {
    let mut cmd = command(
        Some(url),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    cmd.current_dir(home).env("CHRONICLE_HOME", home);
    let child = cmd.spawn().expect("start chronicle projections run");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = json_lines(&ok(&chronicle_in(
            home,
            url,
            &["projections", "status", "--output", "json"],
        )));
        let caught_up = !status.is_empty()
            && status
                .iter()
                .all(|p| p["owner"].is_string() && p["lag_events"] == 0);
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "`chronicle {}` did not catch up: {status:?}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill is installed");
    assert!(interrupted.success());
    child.wait_with_output().expect("chronicle stops")
}

#[test]
fn every_command_the_demo_suggests_works_and_its_projection_dead_letters_nothing() {
    let url = fresh_database();
    let home = tempfile::tempdir().expect("a temporary directory");
    let demo = ok(&chronicle_in(home.path(), &url, &["demo"]));
    let commands = try_lines(&demo);
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with(&["projections".to_owned(), "run".to_owned()])),
        "the demo suggests running its projection: {commands:?}"
    );
    assert!(commands.len() >= 8, "{commands:?}");
    for args in &commands {
        let out = if args.starts_with(&["projections".to_owned(), "run".to_owned()]) {
            run_until_caught_up(home.path(), &url, args)
        } else {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            chronicle_in(home.path(), &url, &args)
        };
        assert_quiet_success(args, &out);
    }
    let dead_letters = ok(&chronicle_in(
        home.path(),
        &url,
        &["dlq", "list", "user-profile", "--output", "json"],
    ));
    assert_eq!(
        json_lines(&dead_letters),
        Vec::<serde_json::Value>::new(),
        "nothing dead-lettered after the demo and a run of its projection"
    );
    for partition in json_lines(&ok(&chronicle_in(
        home.path(),
        &url,
        &["projections", "status", "user-profile", "--output", "json"],
    ))) {
        assert_eq!(partition["status"], "running", "{partition}");
        assert_eq!(partition["lag_events"], 0, "{partition}");
        assert_eq!(
            partition["subscription"]["aggregate_types"],
            serde_json::json!(["user"]),
            "{partition}"
        );
    }
}
