//! The broker restarted mid-relay (NATS): the relay reconnects and
//! resumes with no gap. Restarts the loopback nats-server with
//! start-stop-daemon, and starts it again at the end even on failure.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn start_nats() {
    let _ = std::fs::create_dir_all("/var/lib/nats-server");
    let status = Command::new("start-stop-daemon")
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/nats-server",
            "--",
            "-a",
            "127.0.0.1",
            "-p",
            "4222",
            "-js",
            "-sd",
            "/var/lib/nats-server",
            "-l",
            "/var/log/nats-server.log",
        ])
        .status()
        .expect("start-stop-daemon");
    assert!(status.success(), "starting nats-server: {status}");
    for _ in 0..100 {
        if std::net::TcpStream::connect("127.0.0.1:4222").is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nats-server did not come back on 127.0.0.1:4222");
}

fn stop_nats() {
    let status = Command::new("start-stop-daemon")
        .args(["--stop", "--retry", "10", "--exec", "/usr/sbin/nats-server"])
        .status()
        .expect("start-stop-daemon");
    assert!(status.success(), "stopping nats-server: {status}");
}

/// Starts NATS again when dropped (the test failed half-way).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        start_nats();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_resumes_with_no_gap_after_nats_restarts() {
    let _nats = NATS_LOCK.write().await;
    let _restore = Restore;
    let db = fresh_db().await;
    let qname = unique("restart");
    let queue = nats(&qname).await;
    let name = unique("relay");
    let runner = start_relay(&db, relay(&name, queue.clone()), options()).await;
    let mut orders = Appended::new();
    append(&db, "order", 10, 20, &mut orders).await;
    wait_processed(&db, &name, 200, Duration::from_secs(60)).await;

    // The broker goes away while events keep coming.
    stop_nats();
    let mut during = Appended::new();
    append(&db, "order", 10, 10, &mut during).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        processed(&db, &name).await < 300,
        "nothing is relayed while NATS is down"
    );
    start_nats();
    wait_processed(&db, &name, 300, Duration::from_secs(120)).await;
    runner.stop().await;
    orders.extend(during);

    assert_eq!(
        queue.depth().await.unwrap().messages,
        300,
        "no gap, no duplicate"
    );
    for (aggregate, ids) in orders.iter().step_by(4) {
        let got: Vec<String> = queue
            .peek(&aggregate.to_string(), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
        assert_eq!(got, want, "aggregate {aggregate}");
    }
    let dead: i64 = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM projection_dead_letters WHERE projection = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "an outage is not a poison event");
}
