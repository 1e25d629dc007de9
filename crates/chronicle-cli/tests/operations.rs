//! Running workers in production: SIGTERM stops `projections run` cleanly
//! within its bound, commands close their connections before exiting, and
//! logs come as JSON for shippers or as plain text off a terminal.

mod support;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::*;

/// The tests that read the server's log run one at a time, so that one's
/// connections do not show in another's part of the log.
static SERVER_LOG: Mutex<()> = Mutex::new(());

const USERS: &str = r#"{"aggregate_id":"0193a1b2-0000-7000-8000-0000000000b1","aggregate_type":"user","event_type":"UserRegistered","data":{"email":"ada@example.com","name":"Ada"}}
{"aggregate_id":"0193a1b2-0000-7000-8000-0000000000b2","aggregate_type":"user","event_type":"UserRegistered","data":{"email":"grace@example.com","name":"Grace"}}"#;

fn server_log() -> String {
    let path = server().cluster_dir().join("postgres.log");
    std::fs::read_to_string(&path).unwrap_or_default()
}

fn held(url: &str) -> i64 {
    psql_value(
        url,
        "SELECT count(*) FROM projection_state WHERE owner IS NOT NULL AND lease_expires_at > now()",
    )
    .parse()
    .unwrap()
}

#[test]
fn sigterm_stops_the_workers_releases_every_lease_and_exits_0() {
    let _log = SERVER_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let url = fresh_database();
    ok(&chronicle(Some(&url), &["migrate"], None));
    ok(&chronicle(Some(&url), &["append"], Some(USERS)));
    let mut worker = command(
        Some(&url),
        &[
            "projections",
            "run",
            "user-profile",
            "--shutdown-timeout",
            "3s",
        ],
    )
    .spawn()
    .expect("start the worker");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions = loop {
        let registered: i64 = psql_value(&url, "SELECT count(*) FROM projection_state")
            .parse()
            .unwrap_or(0);
        if registered > 0 && held(&url) == registered {
            break registered;
        }
        assert!(Instant::now() < deadline, "the worker took no partition");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(partitions > 0);
    let term = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(
            term.elapsed() < Duration::from_secs(3 + 5),
            "still running past --shutdown-timeout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = worker.wait_with_output().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM ends the worker cleanly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql_value(
            &url,
            "SELECT count(*) FROM projection_state WHERE owner IS NOT NULL OR lease_expires_at IS NOT NULL"
        ),
        "0",
        "every lease is released"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGTERM"));
}

#[test]
fn commands_close_their_connections_before_exiting() {
    let _log = SERVER_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let url = fresh_database();
    // A session that ends without PostgreSQL's Terminate message is
    // logged at DEBUG1 ("unexpected EOF on client connection") on a Unix
    // socket, and as "connection reset by peer" on TCP: log this
    // database's sessions at that level.
    let name = url
        .split('/')
        .find_map(|part| part.strip_prefix("cli_"))
        .and_then(|rest| rest.split('?').next())
        .map(|id| format!("cli_{id}"))
        .expect("the test URL names its database");
    psql_value(
        &server().url(),
        &format!("ALTER DATABASE {name} SET log_min_messages = debug1"),
    );
    let before = server_log().len();
    ok(&chronicle(Some(&url), &["migrate"], None));
    ok(&chronicle(Some(&url), &["append"], Some(USERS)));
    for args in [&["read", "all"][..], &["status"], &["projections", "list"]] {
        ok(&chronicle(Some(&url), args, None));
    }
    let log = server_log();
    let during = log.get(before..).unwrap_or_default();
    for cut in [
        "unexpected EOF",
        "Connection reset by peer",
        "Broken pipe",
        "connection to client lost",
    ] {
        assert!(
            !during.contains(cut),
            "the server saw a connection cut ({cut}):\n{during}"
        );
    }
}

#[test]
fn logs_are_json_lines_for_shippers_and_plain_off_a_terminal() {
    let url = fresh_database();
    ok(&chronicle(Some(&url), &["migrate"], None));
    let json = chronicle(
        Some(&url),
        &["--log-format", "json", "-vv", "status", "--output", "json"],
        None,
    );
    ok(&json);
    let stderr = String::from_utf8_lossy(&json.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["fields"]["message"].is_string()),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "no colour codes: {stderr}");

    // Text, to a pipe (not a terminal): no colour codes either.
    let text = chronicle(Some(&url), &["-vv", "status"], None);
    ok(&text);
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(stderr.contains("DEBUG"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes: {stderr}");

    let refused = chronicle(Some(&url), &["--log-format", "xml", "status"], None);
    assert_eq!(refused.status.code(), Some(2));
}
