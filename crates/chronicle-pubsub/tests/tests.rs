//! `PubSubQueue` against the Pub/Sub emulator, started on a free loopback
//! port for this test process: `$PUBSUB_EMULATOR_BIN`, the Cloud SDK's
//! `cloud-pubsub-emulator` script, or `gcloud beta emulators pubsub
//! start`. Where the machine has none of them, each test prints that
//! Pub/Sub was not exercised, and passes.

use std::sync::OnceLock;
use std::time::Duration;

use chronicle_core::{Message, MessageQueue};
use chronicle_pubsub::{Error, PubSubOptions, PubSubQueue};
use chronicle_queue_contract::server::{Server, find_program};
use chronicle_queue_contract::{Dedup, Spec, run_contract};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

/// The emulator's command line for a port, when the machine has one.
fn emulator_command() -> Option<Box<dyn Fn(u16) -> Vec<String> + Send + Sync>> {
    let script = std::env::var("PUBSUB_EMULATOR_BIN").ok().or_else(|| {
        [
            "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
            "/usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .map(str::to_owned)
    });
    if let Some(script) = script {
        return Some(Box::new(move |port| {
            vec![
                script.clone(),
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
            ]
        }));
    }
    let gcloud = find_program("gcloud")?;
    Some(Box::new(move |port| {
        vec![
            gcloud.clone(),
            "beta".into(),
            "emulators".into(),
            "pubsub".into(),
            "start".into(),
            format!("--host-port=127.0.0.1:{port}"),
        ]
    }))
}

fn emulator() -> Option<&'static Server> {
    static EMULATOR: OnceLock<Option<Server>> = OnceLock::new();
    EMULATOR
        .get_or_init(|| {
            let command = emulator_command()?;
            Some(
                Server::start(
                    "pubsub-emulator",
                    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
                    Duration::from_secs(90),
                    command,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .as_ref()
}

fn options() -> Option<PubSubOptions> {
    let Some(server) = emulator() else {
        println!(
            "Pub/Sub was not exercised: no Pub/Sub emulator on this machine \
             (install the Cloud SDK's pubsub-emulator component, or set PUBSUB_EMULATOR_BIN)"
        );
        return None;
    };
    let mut options = PubSubOptions::new("chronicle-tests");
    options
        .endpoint(format!("http://127.0.0.1:{}", server.port))
        .ack_deadline(DEADLINE);
    Some(options)
}

#[tokio::test]
async fn pubsub_passes_the_queue_contract() {
    let Some(options) = options() else { return };
    let spec = Spec {
        dedup: Dedup::None("Pub/Sub does not deduplicate publishes"),
        visibility_timeout: DEADLINE,
        exact_depth: false,
        wait: Duration::from_secs(10),
        ..Spec::default()
    };
    run_contract(&spec, |name: String| {
        let options = options.clone();
        async move { PubSubQueue::connect(&options, &name).await.unwrap() }
    })
    .await;
}

#[tokio::test]
async fn depth_is_refused_and_groups_are_required() {
    let Some(options) = options() else { return };
    let q = PubSubQueue::connect(&options, "refusals").await.unwrap();
    let err = q.depth().await.unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::Unsupported(_))),
        "{err}"
    );
    let err = q
        .publish(&[Message::new("m", "", json!(1))])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NoGroup(_))),
        "{err}"
    );
    assert!(matches!(
        PubSubQueue::connect(&options, "bad name").await,
        Err(Error::InvalidName(_))
    ));
}
