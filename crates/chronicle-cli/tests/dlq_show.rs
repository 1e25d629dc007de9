//! `chronicle dlq show`: one dead letter in full, run as a user would.

use std::process::Output;

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, ExpectedVersion, NewEvent, ProjectionHandler, ProjectionResult,
};
use chronicle_projections::{PgContext, PgProjection, ProjectionOptions, RetryPolicy};
use serde_json::{Value, json};
use uuid::Uuid;

mod support;

use support::{fresh_database, ok};

fn chronicle(url: &str, args: &[&str]) -> Output {
    support::chronicle(Some(url), args, None)
}

/// Fails on events marked poison.
struct Picky;

#[async_trait]
impl ProjectionHandler<PgContext> for Picky {
    fn name(&self) -> &str {
        "picky-show"
    }

    async fn handle(&self, event: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        if event.event_data["poison"] == true {
            ProjectionResult::fail("poison pill")
        } else {
            ProjectionResult::Done
        }
    }
}

#[test]
fn dlq_show_prints_a_dead_letter_its_stored_event_and_what_is_parked_behind_it() {
    let url = fresh_database();
    ok(&chronicle(&url, &["migrate"]));
    let missing = chronicle(
        &url,
        &["dlq", "show", "picky-show", &Uuid::now_v7().to_string()],
    );
    assert_eq!(missing.status.code(), Some(4), "no such projection exits 4");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no projection named `picky-show`"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // An envelope as the encryption layer stores it: show must print it as
    // stored, never decrypt it.
    let envelope =
        json!({ "$enc": "v1", "kid": "k-1", "iv": "AAECAwQFBgcICQoL", "ct": "c2VjcmV0" });
    let aggregate = Uuid::now_v7();
    let mut poison = NewEvent::new("EmailChanged", json!({ "email": envelope, "poison": true }));
    poison.encrypted_fields = vec!["/email".to_owned()];
    let second = NewEvent::new("NameChanged", json!({ "name": "Ada" }));
    let third = NewEvent::new("NameChanged", json!({ "name": "Ada L." }));
    let ids = [poison.event_id, second.event_id, third.event_id];
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = chronicle_postgres::PgOptions::from_url(&url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let store = chronicle_postgres::PgEventStore::new(pool.clone());
        store
            .append(
                aggregate,
                "user",
                ExpectedVersion::NoStream,
                vec![poison, second, third],
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
        let mut queued = 0;
        for _ in 0..500 {
            let out = projection.step(0, "cli-test").await.unwrap();
            queued += out.dead_lettered + out.parked;
            if queued >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(queued, 3, "one dead letter and two parked events");
    });

    let head: Value = serde_json::from_str(&ok(&chronicle(
        &url,
        &[
            "dlq",
            "show",
            "picky-show",
            &ids[0].to_string(),
            "--output",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(head["state"], "failed");
    assert_eq!(head["aggregate_id"], aggregate.to_string());
    assert_eq!(head["version"], 1);
    assert_eq!(head["attempts"], 1);
    assert_eq!(head["error"], "poison pill");
    assert_eq!(
        (head["place_in_group"].clone(), head["group_size"].clone()),
        (json!(1), json!(3))
    );
    assert_eq!(head["blocked_by"], Value::Null);
    assert!(head["created_at"].is_string() && head["updated_at"].is_string());
    assert_eq!(
        head["event"]["event_data"]["email"], envelope,
        "stored, not decrypted"
    );
    assert_eq!(head["event"]["encrypted_fields"], json!(["/email"]));
    assert_eq!(head["event"]["event_type"], "EmailChanged");
    let behind: Vec<(Value, Value, Value)> = head["parked_behind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["event_id"].clone(),
                l["version"].clone(),
                l["state"].clone(),
            )
        })
        .collect();
    assert_eq!(
        behind,
        [
            (json!(ids[1].to_string()), json!(2), json!("parked")),
            (json!(ids[2].to_string()), json!(3), json!("parked")),
        ],
        "in order"
    );

    let parked: Value = serde_json::from_str(&ok(&chronicle(
        &url,
        &[
            "dlq",
            "show",
            "picky-show",
            &ids[1].to_string(),
            "--output",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(parked["state"], "parked");
    assert_eq!(parked["place_in_group"], 2);
    assert_eq!(parked["blocked_by"], ids[0].to_string());
    assert_eq!(parked["attempts"], 0);
    assert_eq!(parked["parked_behind"].as_array().map(Vec::len), Some(1));

    let table = ok(&chronicle(
        &url,
        &["dlq", "show", "picky-show", &ids[0].to_string()],
    ));
    for expected in [
        "poison pill",
        "head of its aggregate's group (3 queued)",
        "\"$enc\": \"v1\"",
        "parked behind it",
        &ids[2].to_string(),
    ] {
        assert!(table.contains(expected), "`{expected}` missing in\n{table}");
    }

    let unknown = Uuid::now_v7();
    let out = chronicle(&url, &["dlq", "show", "picky-show", &unknown.to_string()]);
    assert_eq!(out.status.code(), Some(4), "an unknown event exits 4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "event {unknown} is not in the dead-letter queue of `picky-show`"
        )),
        "{stderr}"
    );
    let out = chronicle(&url, &["dlq", "show", "picky-show", "not-a-uuid"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed id is a usage error"
    );
}
