//! `chronicle dlq list|show|retry|discard` on a broker chosen in the
//! deployment YAML (`dead_letters: { backend: … }`), run as a user would,
//! against the NATS server and the RabbitMQ broker on loopback
//! (`CHRONICLE_NATS_URL`, `CHRONICLE_AMQP_URL`). Built with the `nats` and
//! `rabbitmq` features (`brokers` in CI).
#![cfg(all(feature = "nats", feature = "rabbitmq"))]

use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    EventAppender, EventEnvelope, EventReader, ExpectedVersion, MessageQueue, NewEvent,
    ProjectionHandler, ProjectionResult,
};
use chronicle_projections::{
    DeadLetterBackend, PgContext, PgDeadLetterQueue, PgProjection, ProjectionOptions,
};
use serde_json::{Value, json};
use uuid::Uuid;

mod support;

use support::{fresh_database, json_lines, ok};

/// Registers `user-profile` (its partitions) the way a runner would.
struct Registration;

#[async_trait]
impl ProjectionHandler<PgContext> for Registration {
    fn name(&self) -> &str {
        "user-profile"
    }

    async fn handle(&self, _: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        ProjectionResult::Done
    }
}

/// Two profiles, each with two events, dead-lettered into `queue`: the
/// first event of each failed ("boom"), the second parked behind it.
async fn dead_letters(url: &str, queue: &dyn MessageQueue) -> Vec<(Uuid, Vec<Uuid>)> {
    let pool = chronicle_postgres::PgOptions::from_url(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let store = chronicle_postgres::PgEventStore::new(pool.clone());
    let projection = PgProjection::new(
        pool,
        Registration,
        ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    let mut out = Vec::new();
    for who in ["ada", "grace"] {
        let aggregate = Uuid::now_v7();
        store
            .append(
                aggregate,
                "user",
                ExpectedVersion::NoStream,
                vec![
                    NewEvent::new(
                        "UserRegistered",
                        json!({ "email": format!("{who}@example.com"), "name": who }),
                    ),
                    NewEvent::new("NameChanged", json!({ "name": format!("{who}!") })),
                ],
            )
            .await
            .unwrap();
        let events = store.read_stream(aggregate, 1, None).await.unwrap();
        let messages: Vec<_> = events
            .iter()
            .enumerate()
            .map(|(i, e)| PgDeadLetterQueue::message(e, 3, (i == 0).then_some("boom")))
            .collect();
        queue.publish(&messages).await.unwrap();
        out.push((aggregate, events.iter().map(|e| e.event_id).collect()));
    }
    out
}

fn chronicle(url: &str, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["dlq", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    support::chronicle(Some(url), &all, None)
}

/// The same session on any broker: `browses` says whether `list` sees
/// the events parked behind a head (NATS) or only the heads (RabbitMQ).
async fn session(backend_yaml: &str, backend: DeadLetterBackend, browses: bool) {
    let url = fresh_database();
    ok(&support::chronicle(Some(&url), &["migrate"], None));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chronicle.yaml");
    std::fs::write(
        &config,
        format!("projections:\n  user-profile:\n    handler: user-profile\n{backend_yaml}"),
    )
    .unwrap();
    // A queue of its own for this run: the same name as the CLI's.
    let queue = open(&backend).await;
    drain(&*queue).await;
    drop(queue);
    let queue = open(&backend).await;
    let groups = dead_letters(&url, &*queue).await;
    drop(queue);

    let listed = json_lines(&ok(&chronicle(
        &url,
        &config,
        &["list", "user-profile", "--output", "json"],
    )));
    let heads: Vec<&Value> = listed.iter().filter(|l| l["state"] == "failed").collect();
    assert_eq!(heads.len(), 2, "{listed:?}");
    assert!(
        heads
            .iter()
            .all(|h| h["error"] == "boom" && h["attempts"] == 3)
    );
    assert_eq!(listed.len(), if browses { 4 } else { 2 }, "{listed:?}");

    let (first, first_events) = &groups[0];
    let shown: Value = serde_json::from_str(&ok(&chronicle(
        &url,
        &config,
        &[
            "show",
            "user-profile",
            &first_events[0].to_string(),
            "--output",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(shown["aggregate_id"], first.to_string());
    assert_eq!(shown["state"], "failed");
    assert_eq!(shown["event"]["event_type"], "UserRegistered");
    assert_eq!(shown["group_size"], if browses { 2 } else { 1 });

    // Retry replays the head and what is behind it through the handler.
    let report: Value = serde_json::from_str(&ok(&chronicle(
        &url,
        &config,
        &[
            "retry",
            "user-profile",
            &first.to_string(),
            "--output",
            "json",
        ],
    )))
    .unwrap();
    let delivered: Vec<String> = first_events.iter().map(Uuid::to_string).collect();
    assert_eq!(report["delivered"], json!(delivered));
    let name = support::psql_value(
        &url,
        &format!("SELECT name FROM user_profile.user_profiles WHERE user_id = '{first}'"),
    );
    assert_eq!(name, "ada!");

    // Discard drops the failed head and replays the rest.
    let (second, second_events) = &groups[1];
    let report: Value = serde_json::from_str(&ok(&chronicle(
        &url,
        &config,
        &[
            "discard",
            "user-profile",
            &second.to_string(),
            "--output",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(report["discarded"], json!([second_events[0].to_string()]));
    assert_eq!(report["delivered"], json!([second_events[1].to_string()]));

    let empty = ok(&chronicle(
        &url,
        &config,
        &["list", "user-profile", "--output", "json"],
    ));
    assert!(json_lines(&empty).is_empty(), "{empty}");
    let gone = chronicle(
        &url,
        &config,
        &["show", "user-profile", &first_events[0].to_string()],
    );
    assert_eq!(gone.status.code(), Some(4));
}

async fn open(backend: &DeadLetterBackend) -> Arc<dyn MessageQueue> {
    let name = DeadLetterBackend::queue_name("user-profile");
    match backend {
        DeadLetterBackend::Nats { url, .. } => Arc::new(
            chronicle_nats::NatsQueue::connect(
                &chronicle_nats::NatsOptions::new(url.clone()),
                &name,
            )
            .await
            .expect("the NATS server on loopback"),
        ),
        DeadLetterBackend::RabbitMq { url, .. } => Arc::new(
            chronicle_rabbitmq::RabbitQueue::connect(
                &chronicle_rabbitmq::RabbitOptions::new(url.clone()),
                &name,
            )
            .await
            .expect("the RabbitMQ broker on loopback"),
        ),
        other => panic!("not a backend of these tests: {other:?}"),
    }
}

/// Empties the queue: the CLI's queue name is fixed by the projection,
/// and a broker keeps what an earlier run left.
async fn drain(queue: &dyn MessageQueue) {
    let mut quiet = 0;
    while quiet < 10 {
        let got = queue.receive(100).await.unwrap();
        if got.is_empty() {
            quiet += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        quiet = 0;
        let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
        queue.ack(&receipts).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_commands_work_on_nats() {
    let url =
        std::env::var("CHRONICLE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    session(
        &format!("dead_letters:\n  backend: nats\n  url: {url}\n  visibility_timeout: 5s\n"),
        DeadLetterBackend::Nats {
            url: url.clone(),
            visibility_timeout: None,
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_commands_work_on_rabbitmq() {
    let url = std::env::var("CHRONICLE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    session(
        &format!("dead_letters:\n  backend: rabbitmq\n  url: {url}\n  heartbeat: 5s\n"),
        DeadLetterBackend::RabbitMq {
            url: url.clone(),
            heartbeat: None,
            lanes: None,
        },
        false,
    )
    .await;
}
