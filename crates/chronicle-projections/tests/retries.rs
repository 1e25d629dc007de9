//! Retries with backoff: transient failures are retried per the policy,
//! their partial writes rolled back; exhausted retries dead-letter.

use std::time::Duration;

use chronicle_projections::{DeadLetterState, PgProjection, ProjectionOptions, RetryPolicy, dlq};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{Ledger, append_one, create_read_model, drain, read_model};
use crate::support::fresh_db;

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        initial_delay: Duration::from_millis(80),
        multiplier: 2.0,
        max_delay: Duration::from_secs(5),
        jitter: 0.5,
    }
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff_and_applied_once() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let account = Uuid::now_v7();
    let flaky = append_one(&db, account, json!({ "amount": 5, "flaky": 2 })).await;
    let hopeless = append_one(&db, Uuid::now_v7(), json!({ "amount": 7, "flaky": 99 })).await;
    let ledger = Ledger::new("retries");
    let options = ProjectionOptions {
        partitions: 1,
        retry: policy(),
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(db.pool.clone(), ledger.clone(), options).unwrap();
    projection.register().await.unwrap();
    let out = drain(&projection).await;
    assert_eq!((out.handled, out.dead_lettered), (1, 1));
    assert_eq!(
        out.retries,
        2 + 3,
        "two retries for one event, three for the other"
    );

    let times = ledger.shared.attempt_times.lock().unwrap().clone();
    // Gaps between attempts follow the policy: base 80, 160, 320 ms, each
    // scaled into [0.5, 1.0] by jitter (plus scheduling slack above).
    let gaps = |id: Uuid| -> Vec<Duration> { times[&id].windows(2).map(|w| w[1] - w[0]).collect() };
    let flaky_gaps = gaps(flaky);
    assert_eq!(flaky_gaps.len(), 2, "1 attempt + 2 retries");
    let hopeless_gaps = gaps(hopeless);
    assert_eq!(
        hopeless_gaps.len(),
        3,
        "1 attempt + 3 retries, then dead-lettered"
    );
    for gaps in [&flaky_gaps[..], &hopeless_gaps[..]] {
        for (i, gap) in gaps.iter().enumerate() {
            let base = policy().base_delay(i as u32 + 1);
            assert!(
                *gap >= base / 2 && *gap <= base + Duration::from_millis(400),
                "retry {}: waited {gap:?}, policy says within [{:?}, {base:?}]",
                i + 1,
                base / 2
            );
        }
    }

    // The failed attempts' writes were rolled back: the flaky event counts
    // once, the hopeless one not at all.
    let model = read_model(&db).await;
    assert_eq!(model[&account], (5, vec![1]));
    assert_eq!(model.len(), 1);
    let letters = dlq::list(&db.pool, "retries", None).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].event_id, letters[0].state, letters[0].attempts),
        (hopeless, DeadLetterState::Failed, 4)
    );
    let state = &projection.state().await.unwrap()[0];
    assert_eq!(
        state.failure_count,
        2 + 3 + 1,
        "retries plus the dead letter"
    );
    assert_eq!(state.last_error.as_deref(), Some("transient failure 4"));
}
