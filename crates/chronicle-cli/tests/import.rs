//! `chronicle append --file` / stdin: all-or-nothing imports, batches and
//! resuming, the input's encoding, JSON that jsonb stores, and failing fast
//! when the database is not there.

mod support;

use std::time::{Duration, Instant};

use support::{chronicle, fresh_database, json_lines, ok};

fn line(id: &str, ty: &str, event: &str, data: &str, expected: &str) -> String {
    format!(
        r#"{{"aggregate_id":"{id}","aggregate_type":"{ty}","event_type":"{event}","data":{data},"expected_version":{expected}}}"#
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn count(url: Option<&str>) -> u64 {
    let status = json_lines(&ok(&chronicle(url, &["status", "--output", "json"], None)));
    status[0]["event_count"].as_u64().unwrap()
}

const ORDER: &str = "0193a1b2-0000-7000-8000-00000000000a";

#[test]
fn a_bad_line_in_the_middle_stores_nothing_and_is_named() {
    let url = fresh_database();
    let url = Some(url.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let first = line(ORDER, "order", "Placed", "{}", "\"no-stream\"");
    let last = line(ORDER, "order", "Closed", "{}", "\"any\"");
    let long_type = "t".repeat(51);
    for (middle, code, says) in [
        (
            line(ORDER, &long_type, "Paid", "{}", "1"),
            2,
            "line 2: invalid aggregate_type",
        ),
        (
            line(ORDER, "order", "Paid", "[1,2]", "1"),
            2,
            "line 2: invalid data: must be a JSON object",
        ),
        (
            line(ORDER, "order", "Paid", r#"{"a":"x\u0000"}"#, "1"),
            2,
            "line 2: invalid data: at /a: the string contains a NUL",
        ),
        (
            line(ORDER, "order", "Paid", "{}", "7"),
            3,
            "line 2: append to aggregate",
        ),
    ] {
        let out = chronicle(
            url,
            &["append"],
            Some(&format!("{first}\n{middle}\n{last}\n")),
        );
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("nothing was stored"),
            "{}",
            stderr(&out)
        );
        assert_eq!(count(url), 0, "nothing of the input was stored");
    }
}

#[test]
fn batches_commit_in_chunks_and_resume_from_the_printed_line() {
    let url = fresh_database();
    let url = Some(url.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let ids: Vec<String> = (1..=5)
        .map(|i| format!("0193a1b2-0000-7000-8000-0000000001{i:02}"))
        .collect();
    let lines = |bad: bool| -> String {
        (1..=5u32)
            .map(|v| {
                let expected = if bad && v == 4 { 9 } else { v - 1 };
                format!(
                    r#"{{"aggregate_id":"{ORDER}","aggregate_type":"order","event_type":"E{v}","data":{{}},"expected_version":{expected},"event_id":"{}"}}"#,
                    ids[v as usize - 1]
                )
                .replace("\"expected_version\":0", "\"expected_version\":\"no-stream\"")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let out = chronicle(
        url,
        &["append", "--batch-size", "2", "--output", "json"],
        Some(&lines(true)),
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("line 4: append to aggregate"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("last committed line: 2") && stderr(&out).contains("--resume-from 3"),
        "{}",
        stderr(&out)
    );
    let committed = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        committed
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(count(url), 2);

    let out = json_lines(&ok(&chronicle(
        url,
        &[
            "append",
            "--batch-size",
            "2",
            "--resume-from",
            "3",
            "--output",
            "json",
        ],
        Some(&lines(false)),
    )));
    assert_eq!(
        out.iter()
            .map(|r| r["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(count(url), 5);

    // With event ids, a rerun from the start stores nothing twice.
    let again = chronicle(url, &["append", "--output", "json"], Some(&lines(false)));
    let again = json_lines(&ok(&again));
    assert!(again.iter().all(|r| r["appended"] == false), "{again:?}");
    assert_eq!(count(url), 5);

    let out = chronicle(url, &["append", "--resume-from", "9"], Some(&lines(false)));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("past the input's last line (5)"),
        "{}",
        stderr(&out)
    );
    let out = chronicle(url, &["append", "--batch-size", "0"], Some(&lines(false)));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn invalid_utf8_is_a_usage_error_naming_line_and_offset() {
    let url = fresh_database();
    let url = Some(url.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let good = line(ORDER, "order", "Placed", "{}", "\"any\"");
    let mut input = format!("{good}\n").into_bytes();
    let offset = input.len() + 14;
    input.extend_from_slice(b"{\"aggregate_id\xff\": 1}\n");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &input).unwrap();
    let out = chronicle(
        url,
        &["append", "--file", file.path().to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("line 2: invalid UTF-8 at byte offset {offset}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(url), 0);
}

#[test]
fn a_backslash_u0000_in_the_text_is_stored_and_a_decoded_nul_is_refused() {
    let url = fresh_database();
    let url = Some(url.as_str());
    ok(&chronicle(url, &["migrate"], None));
    let append = |data: &str| {
        chronicle(
            url,
            &[
                "append",
                "--aggregate-id",
                ORDER,
                "--aggregate-type",
                "dir",
                "--event-type",
                "Set",
                "--data",
                data,
            ],
            None,
        )
    };
    ok(&append(r#"{"path":"C:\\u0000dir"}"#));
    let events = json_lines(&ok(&chronicle(
        url,
        &["read", "stream", ORDER, "--output", "json"],
        None,
    )));
    assert_eq!(events[0]["event_data"]["path"], "C:\\u0000dir");
    let out = append(r#"{"path":{"to":"C:\u0000dir"}}"#);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("at /path/to: the string contains a NUL"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_closed_port_fails_fast_with_one_line_naming_host_and_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://nobody@127.0.0.1:{port}/none?sslmode=disable");
    for (args, within) in [
        (vec!["status"], Duration::from_secs(6)),
        (
            vec!["status", "--connect-timeout", "1s"],
            Duration::from_secs(2),
        ),
    ] {
        let started = Instant::now();
        let out = chronicle(Some(&url), &args, None);
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(took < within, "{args:?} took {took:?}");
        let text = stderr(&out);
        assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(text.contains("check that the server runs"), "{text}");
    }
    let started = Instant::now();
    let out = chronicle(Some(&format!("{url}&connect_timeout=1")), &["status"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let out = chronicle(
        None,
        &["completions", "bash", "--connect-timeout", "1s"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused where no database is opened"
    );
}
