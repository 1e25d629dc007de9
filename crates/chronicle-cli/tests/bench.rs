//! The benchmarks, small: every case of `bench append`, `bench projections`,
//! `bench upcast` and `bench snapshots` runs, and both sides of each touched the same rows
//! (a baseline that did less, or more, would fail the run).

mod support;

use serde_json::Value;
use support::{chronicle, fresh_database, ok};

/// Runs `chronicle --output json bench ARGS` on a fresh database and
/// returns its cases, each checked: positive rates, and as many rows on
/// the raw side as on the store's.
fn cases(benchmark: &str, args: &[&str]) -> Vec<Value> {
    let url = fresh_database();
    let mut all = vec!["--output", "json", "bench", benchmark];
    all.extend_from_slice(args);
    let out = ok(&chronicle(Some(&url), &all, None));
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(report["benchmark"], benchmark);
    let cases = report["cases"].as_array().expect("cases").clone();
    assert!(!cases.is_empty());
    for case in &cases {
        for field in ["events_per_sec", "raw_events_per_sec", "ratio"] {
            let value = case[field].as_f64().unwrap_or(0.0);
            assert!(value > 0.0 && value.is_finite(), "{field} of {case}");
        }
        let (rows, raw_rows) = (case["rows"].as_u64(), case["raw_rows"].as_u64());
        assert!(rows.is_some_and(|r| r > 0), "no rows in {case}");
        assert_eq!(rows, raw_rows, "both sides touch the same rows: {case}");
    }
    assert_eq!(
        support::psql_value(
            &url,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'chronicle_bench%'"
        ),
        "0",
        "the scratch schema is gone"
    );
    cases
}

fn names(cases: &[Value]) -> Vec<&str> {
    cases.iter().filter_map(|c| c["name"].as_str()).collect()
}

#[test]
fn append_cases_touch_the_same_rows_on_both_sides() {
    let cases = cases(
        "append",
        &[
            "--events",
            "64",
            "--batches",
            "8",
            "--feed-events",
            "1000",
            "--commands",
            "64",
            "--synchronous-commit",
            "false",
        ],
    );
    let names = names(&cases);
    for prefix in [
        "append 1 event, 1 writers",
        "append 100-event batch, 4 writers",
        "load a 1,000-event aggregate (vs raw prepared SELECT, rows streamed and decoded)",
        "execute a command (load + decide + append), 16 tasks (vs hand-written prepared SELECT + INSERT)",
        "execute a command (load + decide + append), 16 tasks, aggregate cache (vs hand-written prepared SELECT + INSERT)",
        "read the global feed",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(prefix)),
            "no case {prefix:?} in {names:?}"
        );
    }
    let load = cases
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .starts_with("load a 1,000-event")
        })
        .unwrap();
    assert_eq!(load["rows"], 50_000, "50 loads of 1,000 events: {load}");
    let commands: Vec<_> = cases
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("execute a command"))
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(
        commands.iter().all(|c| c["rows"] == 64),
        "one event per command: {commands:?}"
    );
}

#[test]
fn projections_cases_touch_the_same_rows_on_both_sides() {
    let cases = cases(
        "projections",
        &[
            "--events",
            "2000",
            "--batch-size",
            "500",
            "--lag-seconds",
            "1",
        ],
    );
    let names = names(&cases);
    for prefix in [
        "no-op catch-up, 1 partition(s)",
        "no-op catch-up subscribed to one aggregate type",
        "no-op catch-up subscribed to one event type",
        "upsert read model, 4 partition(s), vs raw sum-per-account upsert",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(prefix)),
            "no case {prefix:?} in {names:?}"
        );
    }
    assert!(cases.iter().all(|c| c["rows"] == 2000), "{cases:?}");
}

#[test]
fn upcast_cases_touch_the_same_rows_on_both_sides() {
    let cases = cases(
        "upcast",
        &["--events", "2000", "--batch-size", "500", "--page", "500"],
    );
    assert_eq!(cases.len(), 2, "{cases:?}");
    assert!(cases.iter().all(|c| c["rows"] == 2000), "{cases:?}");
}

#[test]
fn snapshot_cases_touch_the_same_rows_on_both_sides() {
    let cases = cases(
        "snapshots",
        &["--events", "2000", "--tail", "20", "--seconds", "0.2"],
    );
    let names = names(&cases);
    assert_eq!(cases.len(), 3, "{names:?}");
    assert!(names[0].contains("snapshot + 20-event tail"), "{names:?}");
    assert!(names[1].contains("without a snapshot"), "{names:?}");
}
