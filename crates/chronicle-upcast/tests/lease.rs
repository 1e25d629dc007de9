//! One runner per migration key: the lease in `chronicle_upcast_leases`.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use chronicle_postgres::testing::{TestDb, fresh_db, fresh_db_via_pgbouncer};
use chronicle_upcast::{PgUpcaster, RunError, RunStatus};

use crate::upcast::{chain, old_versions_left, seed, snapshot};

fn runner(db: &TestDb, label: &str) -> PgUpcaster {
    let mut upcaster = PgUpcaster::new(db.pool.clone(), chain(Arc::default()));
    upcaster.owner(label);
    upcaster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_second_runner_is_refused_while_the_first_holds_the_key() {
    second_runner_refused(fresh_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_second_runner_is_refused_while_the_first_holds_the_key_via_pgbouncer() {
    second_runner_refused(fresh_db_via_pgbouncer().await).await;
}

async fn second_runner_refused(db: TestDb) {
    seed(&db, 0, 200).await;
    let first = runner(&db, "runner A");
    let second = runner(&db, "runner B");

    // A stops after its first batch until told to go on (its lease held).
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let a = first.clone();
    let running = tokio::spawn(async move {
        let mut once = Some((started_tx, go_rx));
        a.run(20, move |_| {
            if let Some((started, go)) = once.take() {
                started.send(()).unwrap();
                go.recv().unwrap();
            }
        })
        .await
    });
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();

    let leases = second.leases().await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].owner, "runner A");
    assert_eq!(leases[0].owner_id, first.owner_id());
    let run_id = leases[0].run_id.expect("the first batch recorded its run");

    let err = second.run(20, |_| {}).await.unwrap_err();
    match &err {
        RunError::LeaseHeld {
            event_type,
            from_version,
            owner,
            owner_id,
            ..
        } => {
            assert_eq!((event_type.as_str(), *from_version), ("ItemAdded", 1));
            assert_eq!(owner, "runner A");
            assert_eq!(*owner_id, first.owner_id());
        }
        other => panic!("expected LeaseHeld, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("already being run by runner A"),
        "{message}"
    );
    assert!(message.contains("chronicle upcast status"), "{message}");
    // Refused without touching the run.
    assert_eq!(
        second.run_info(run_id).await.unwrap().status,
        RunStatus::Running
    );
    // Nor can it roll the run back under the runner's feet.
    let err = second.rollback(run_id).await.unwrap_err();
    assert!(matches!(err, RunError::LeaseHeld { .. }), "{err}");

    go_tx.send(()).unwrap();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.events_upcast(), 203);
    assert!(second.leases().await.unwrap().is_empty(), "released");
    // Free again: the second runner finds nothing left to do.
    assert!(second.run(20, |_| {}).await.unwrap().runs.is_empty());
    assert_eq!(old_versions_left(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_resumes_at_once_after_release_or_after_expiry() {
    let db = fresh_db().await;
    seed(&db, 0, 200).await;
    let before = snapshot(&db).await;

    // Ctrl-C: the run's future is dropped after two batches, and the CLI
    // releases the process's leases; another process resumes at once.
    let mut first = runner(&db, "runner A");
    first.lease_ttl(Duration::from_secs(600));
    let stop = Arc::new(tokio::sync::Notify::new());
    let signal = stop.clone();
    tokio::select! {
        biased;
        _ = stop.notified() => {}
        r = first.run(20, move |p| if p.done == 40 { signal.notify_one() }) => {
            panic!("the run ended before the interruption: {r:?}")
        }
    }
    let interrupted = first.runs().await.unwrap()[0].clone();
    assert_eq!(interrupted.status, RunStatus::Running);
    assert!(interrupted.events_upcast >= 40 && interrupted.events_upcast.is_multiple_of(20));
    assert_eq!(first.release_leases().await.unwrap(), 1);

    // A crash: the lease stays until it expires.
    let mut second = runner(&db, "runner B");
    // Long enough that a slow machine's crash comes well within it.
    second.lease_ttl(Duration::from_secs(5));
    let b = second.clone();
    let crashed = tokio::spawn(async move {
        b.run(20, |p| {
            if p.done >= 100 {
                panic!("simulated crash");
            }
        })
        .await
    })
    .await;
    assert!(crashed.unwrap_err().is_panic());

    let third = runner(&db, "runner C");
    let err = third.run(20, |_| {}).await.unwrap_err();
    assert!(
        matches!(&err, RunError::LeaseHeld { owner, .. } if owner == "runner B"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(5100)).await;
    let report = third.run(20, |_| {}).await.unwrap();
    assert_eq!(report.runs[0].run_id, interrupted.run_id, "the same run");
    assert_eq!(report.events_upcast(), 203);
    assert_eq!(old_versions_left(&db).await, 0);

    // And everything rolls back to the original bytes.
    for run in report.runs.iter().rev() {
        third.rollback(run.run_id).await.unwrap();
    }
    assert_eq!(snapshot(&db).await, before);
    assert!(third.leases().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_runner_that_lost_its_lease_stops_without_writing() {
    let db = fresh_db().await;
    seed(&db, 0, 200).await;
    let mut slow = runner(&db, "slow runner");
    slow.lease_ttl(Duration::from_millis(300));
    let s = slow.clone();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let task = tokio::spawn(async move {
        let mut once = Some(started_tx);
        s.run(20, move |_| {
            if let Some(started) = once.take() {
                started.send(()).unwrap();
                // Longer than the lease: another runner takes the key over.
                std::thread::sleep(Duration::from_millis(2500));
            }
        })
        .await
    });
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    // Wait until the slow runner's lease has expired.
    let client = db.pool.get().await.unwrap();
    for _ in 0..100 {
        let expired: bool = client
            .query_one(
                "SELECT bool_and(expires_at < clock_timestamp()) FROM chronicle_upcast_leases",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if expired {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fast = runner(&db, "fast runner");
    let report = fast.run(20, |_| {}).await.unwrap();
    assert_eq!(report.events_upcast(), 203);

    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, RunError::LeaseLost { .. }), "{err}");
    assert!(err.to_string().contains("lost its lease"), "{err}");
    // The run the fast runner completed stays completed.
    for run in &report.runs {
        let info = fast.run_info(run.run_id).await.unwrap();
        assert_eq!(info.status, RunStatus::Completed);
        assert!(fast.verify(run.run_id).await.unwrap().is_ok());
    }
}
