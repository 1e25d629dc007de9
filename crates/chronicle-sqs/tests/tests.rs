//! `SqsQueue` against moto's server (an SQS-compatible server, started on
//! a free loopback port for this test process). Without moto installed
//! the tests fail, saying how to install it; they are not skipped.

use std::sync::OnceLock;
use std::time::Duration;

use chronicle_core::{Message, MessageQueue};
use chronicle_queue_contract::server::Server;
use chronicle_queue_contract::{Spec, run_contract};
use chronicle_sqs::aws_config::{self, BehaviorVersion, Region};
use chronicle_sqs::aws_sdk_sqs::config::Credentials;
use chronicle_sqs::{Error, SqsOptions, SqsQueue};
use serde_json::json;

const VISIBILITY: Duration = Duration::from_secs(2);

fn moto() -> &'static Server {
    static MOTO: OnceLock<Server> = OnceLock::new();
    MOTO.get_or_init(|| {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let check = std::process::Command::new(&python)
            .args(["-c", "import moto.server, flask, flask_cors"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        assert!(
            check.status.success(),
            "moto's server mode is needed for the SQS tests and is not installed: \
             run `pip install 'moto[server]'` (.ci/run installs it)"
        );
        Server::start(
            "moto-sqs",
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            Duration::from_secs(60),
            |port| {
                vec![
                    python.clone(),
                    "-m".into(),
                    "moto.server".into(),
                    "-H".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ]
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    })
}

async fn open(name: String) -> SqsQueue {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .endpoint_url(format!("http://127.0.0.1:{}", moto().port))
        .load()
        .await;
    let mut options = SqsOptions::new();
    options.visibility_timeout(VISIBILITY).wait(Duration::ZERO);
    SqsQueue::with_config(&config, &options, &name)
        .await
        .unwrap()
}

#[tokio::test]
async fn sqs_fifo_passes_the_queue_contract() {
    let spec = Spec {
        visibility_timeout: VISIBILITY,
        ..Spec::default()
    };
    run_contract(&spec, open).await;
}

#[tokio::test]
async fn ids_sqs_refuses_are_hashed_and_groups_checked() {
    let q = open("odd-ids".into()).await;
    let long = "é".repeat(100);
    q.publish(&[Message::new(long.as_str(), "g", json!(1))])
        .await
        .unwrap();
    // The same id again: the hashed deduplication id drops it.
    q.publish(&[Message::new(long.as_str(), "g", json!(1))])
        .await
        .unwrap();
    let got = q.receive(10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, long);
    q.ack(&[got[0].receipt.clone()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(q.receive(10).await.unwrap().is_empty());
    let err = q
        .publish(&[Message::new("x", "a group", json!(1))])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::InvalidGroup(_))),
        "{err}"
    );
    assert!(matches!(
        SqsQueue::connect(&SqsOptions::new(), "bad.name").await,
        Err(Error::InvalidName(_))
    ));
}
