//! `chronicle bench relay`, small, against the NATS server and the
//! RabbitMQ broker on loopback (`CHRONICLE_NATS_URL`, `CHRONICLE_AMQP_URL`):
//! the report's shape, every event on the broker on both sides, and the
//! scratch schema gone. Built with the `nats` and `rabbitmq` features
//! (`brokers` in CI). No timing is asserted.
#![cfg(all(feature = "nats", feature = "rabbitmq"))]

mod support;

use serde_json::Value;
use support::{chronicle, fails, fresh_database, ok};

#[test]
fn relay_cases_relay_every_event_to_each_broker_and_clean_up() {
    let url = fresh_database();
    let out = ok(&chronicle(
        Some(&url),
        &["--output", "json", "bench", "relay", "--events", "500"],
        None,
    ));
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(report["benchmark"], "relay");
    let cases = report["cases"].as_array().expect("cases");
    let brokers: Vec<&str> = cases
        .iter()
        .filter_map(|c| c["name"].as_str()?.split(':').next())
        .collect();
    assert_eq!(brokers, ["ceiling", "nats", "rabbitmq"], "{report}");
    for case in cases {
        for field in ["events_per_sec", "raw_events_per_sec", "ratio"] {
            let value = case[field].as_f64().unwrap_or(0.0);
            assert!(value > 0.0 && value.is_finite(), "{field} of {case}");
        }
        // The messages found on each side's destination afterwards.
        assert_eq!(case["rows"], 500, "{case}");
        assert_eq!(case["raw_rows"], 500, "{case}");
    }
    assert_eq!(
        support::psql_value(
            &url,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'chronicle_bench%'"
        ),
        "0",
        "the scratch schema is gone"
    );
}

#[test]
fn an_unknown_broker_is_refused() {
    let url = fresh_database();
    let err = fails(
        &chronicle(
            Some(&url),
            &["bench", "relay", "--events", "10", "--brokers", "nats,mqtt"],
            None,
        ),
        2,
    );
    assert!(err.contains("`mqtt` is not a broker"), "{err}");
}
