//! The `MessageQueue` contract on the PostgreSQL dead-letter queue:
//! deduplication by id, order within a group, a group's head blocking the
//! rest of its group while other groups flow, depth; and the queue and the
//! step sharing one table.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chronicle_core::{Message, MessageQueue, Receipt};
use chronicle_projections::{
    DeadLetterState, PgDeadLetterQueue, PgProjection, ProjectionOptions, QueueError, dlq,
};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{Ledger, append_one, create_read_model, drain, read_model};
use crate::support::{TestDb, fresh_db};

/// A message for a made-up event of `group` at `version`.
fn message(id: Uuid, group: Uuid, version: u32) -> Message {
    Message::new(
        id.to_string(),
        group.to_string(),
        json!({ "event_type": "Deposited", "version": version, "position": format!("{}-{}", 1000 + version, version) }),
    )
}

async fn registered_queue(db: &TestDb, name: &'static str) -> Arc<dyn MessageQueue> {
    let projection = PgProjection::new(
        db.pool.clone(),
        Ledger::new(name),
        ProjectionOptions {
            partitions: 3,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    Arc::new(PgDeadLetterQueue::new(db.pool.clone(), name))
}

fn ids(deliveries: &[chronicle_core::Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.message.id.clone()).collect()
}

#[tokio::test]
async fn publishing_the_same_id_twice_is_a_no_op() {
    let db = fresh_db().await;
    let queue = registered_queue(&db, "dedup").await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (a1, a2, b1) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    queue
        .publish(&[
            message(a1, a, 1).with_attribute("error", "first failure"),
            message(a2, a, 2),
            message(b1, b, 1),
        ])
        .await
        .unwrap();
    // Again, with another error and in another batch: nothing changes.
    queue
        .publish(&[
            message(a1, a, 1).with_attribute("error", "second failure"),
            message(b1, b, 1),
        ])
        .await
        .unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.messages, depth.groups), (3, Some(2)));
    assert!(depth.oldest.is_some());
    let a_group = queue.peek(&a.to_string(), 10).await.unwrap();
    assert_eq!(
        a_group.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        [a1.to_string(), a2.to_string()]
    );
    assert_eq!(a_group[0].attributes["error"], "first failure");
    assert_eq!(a_group[0].attributes["state"], "failed");
    assert_eq!(a_group[1].attributes["state"], "parked");
    assert!(
        !a_group[1].attributes.contains_key("error"),
        "a parked event has not failed"
    );
}

#[tokio::test]
async fn a_groups_head_blocks_it_while_other_groups_flow_in_order() {
    let db = fresh_db().await;
    let queue = registered_queue(&db, "groups").await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let a_ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let b_ids: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    queue
        .publish(&[
            message(a_ids[0], a, 1).with_attribute("error", "boom"),
            message(b_ids[0], b, 1).with_attribute("error", "bang"),
            message(a_ids[1], a, 2),
        ])
        .await
        .unwrap();
    queue
        .publish(&[message(a_ids[2], a, 3), message(b_ids[1], b, 2)])
        .await
        .unwrap();

    // Heads only, oldest first; receiving again without an ack hands out
    // the same heads (nothing is lost, nothing skipped).
    let heads = queue.receive(10).await.unwrap();
    assert_eq!(ids(&heads), [a_ids[0].to_string(), b_ids[0].to_string()]);
    assert_eq!(heads[0].message.group, a.to_string());
    assert_eq!(heads[0].message.attributes["error"], "boom");
    assert_eq!(
        ids(&queue.receive(1).await.unwrap()),
        [a_ids[0].to_string()]
    );
    assert_eq!(ids(&queue.receive(10).await.unwrap()), ids(&heads));

    // Group b flows while a's head stays unacknowledged.
    queue.ack(&[heads[1].receipt.clone()]).await.unwrap();
    let next = queue.receive(10).await.unwrap();
    assert_eq!(ids(&next), [a_ids[0].to_string(), b_ids[1].to_string()]);
    assert_eq!(
        next[1].message.attributes["state"], "parked",
        "released, not yet tried"
    );
    queue.ack(&[next[1].receipt.clone()]).await.unwrap();

    // Acknowledging a's head releases a's events one by one, in order.
    let mut delivered = Vec::new();
    loop {
        let heads = queue.receive(10).await.unwrap();
        let Some(head) = heads.first() else { break };
        assert_eq!(heads.len(), 1, "only group a is left");
        delivered.push(head.message.id.clone());
        queue
            .ack(std::slice::from_ref(&head.receipt))
            .await
            .unwrap();
        // Acknowledging twice is a no-op.
        queue
            .ack(std::slice::from_ref(&head.receipt))
            .await
            .unwrap();
    }
    assert_eq!(
        delivered,
        a_ids.iter().map(Uuid::to_string).collect::<Vec<_>>()
    );
    let depth = queue.depth().await.unwrap();
    assert_eq!(
        (depth.messages, depth.groups, depth.oldest),
        (0, Some(0), None)
    );
}

#[tokio::test]
async fn bad_messages_and_receipts_are_refused_with_the_reason() {
    let db = fresh_db().await;
    let queue = PgDeadLetterQueue::new(db.pool.clone(), "refusals");
    let group = Uuid::now_v7();
    // Not registered yet.
    let err = queue
        .publish(&[message(Uuid::now_v7(), group, 1)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not registered"), "{err}");
    let queue = registered_queue(&db, "refusals").await;

    let good = message(Uuid::now_v7(), group, 1);
    let bad = Message::new("not-a-uuid", group.to_string(), json!({}));
    let err = queue.publish(&[good.clone(), bad]).await.unwrap_err();
    assert!(
        matches!(err.downcast_ref::<QueueError>(), Some(QueueError::InvalidMessage { id, .. }) if id == "not-a-uuid"),
        "{err}"
    );
    let no_version = Message::new(
        Uuid::now_v7().to_string(),
        group.to_string(),
        json!({ "event_type": "E", "position": "1-1" }),
    );
    let err = queue.publish(&[no_version]).await.unwrap_err();
    assert!(err.to_string().contains("payload.version"), "{err}");
    assert_eq!(
        queue.depth().await.unwrap().messages,
        0,
        "nothing of a refused batch is published"
    );

    // Only a group's head can be acknowledged.
    let second = message(Uuid::now_v7(), group, 2);
    queue.publish(&[good, second.clone()]).await.unwrap();
    let letters = dlq::list(&db.pool, "refusals", Some(group)).await.unwrap();
    let err = queue
        .ack(&[Receipt::new(letters[1].id.to_string())])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<QueueError>(), Some(QueueError::NotHead { event_id, .. }) if event_id.to_string() == second.id),
        "{err}"
    );
    assert!(queue.ack(&[Receipt::new("head")]).await.is_err());
    // A group is ordered by version: an older event cannot queue last.
    let err = queue
        .publish(&[message(Uuid::now_v7(), group, 2)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not after version 2"), "{err}");
    assert_eq!(queue.depth().await.unwrap().messages, 2);
}

#[tokio::test]
async fn the_queue_and_the_step_share_the_dead_letters() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let (sick, well) = (Uuid::now_v7(), Uuid::now_v7());
    append_one(&db, sick, json!({ "amount": 1 })).await;
    let poison = append_one(&db, sick, json!({ "amount": 2, "poison": true })).await;
    append_one(&db, well, json!({ "amount": 3 })).await;
    let ledger = Ledger::new("shared-queue");
    let projection = PgProjection::new(
        db.pool.clone(),
        ledger.clone(),
        ProjectionOptions {
            partitions: 2,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;

    let queue = PgDeadLetterQueue::new(db.pool.clone(), "shared-queue");
    let heads = queue.receive(10).await.unwrap();
    assert_eq!(ids(&heads), [poison.to_string()]);
    assert_eq!(heads[0].message.group, sick.to_string());
    assert_eq!(heads[0].message.attributes["error"], "poison event");
    assert_eq!(heads[0].message.payload["version"], 2);
    assert_eq!(heads[0].delivery_count, 1, "one handler attempt");

    // The step parks the aggregate's next event behind the queue's head.
    let third = append_one(&db, sick, json!({ "amount": 4 })).await;
    drain(&projection).await;
    let group = queue.peek(&sick.to_string(), 10).await.unwrap();
    assert_eq!(
        group.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        [poison.to_string(), third.to_string()]
    );

    // The operator's retry goes through the same queue: after the fix it
    // delivers the group in order and empties it.
    ledger.shared.fixed.store(true, Ordering::SeqCst);
    let report = projection.dlq_retry(sick).await.unwrap();
    assert_eq!(report.delivered, [poison, third]);
    assert_eq!(queue.depth().await.unwrap().messages, 0);
    assert_eq!(read_model(&db).await[&sick].1, [1, 2, 3]);
    assert!(
        dlq::list(&db.pool, "shared-queue", None)
            .await
            .unwrap()
            .iter()
            .all(|l| l.state != DeadLetterState::Failed)
    );
}

#[tokio::test]
async fn show_describes_a_dead_letter_its_event_and_what_waits_behind_it() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let sick = Uuid::now_v7();
    let poison = append_one(&db, sick, json!({ "amount": 1, "poison": true })).await;
    let second = append_one(&db, sick, json!({ "amount": 2 })).await;
    let third = append_one(&db, sick, json!({ "amount": 3 })).await;
    let projection = PgProjection::new(
        db.pool.clone(),
        Ledger::new("shown"),
        ProjectionOptions {
            partitions: 1,
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;

    let head = dlq::show(&db.pool, "shown", poison).await.unwrap().unwrap();
    assert_eq!((head.place, head.group_size), (1, 3));
    assert_eq!(head.letter.state, DeadLetterState::Failed);
    assert_eq!(head.letter.error.as_deref(), Some("poison event"));
    assert!(head.blocked_by.is_none());
    let event = head.event.as_ref().unwrap();
    assert_eq!(event.event_data, json!({ "amount": 1, "poison": true }));
    assert_eq!(
        head.parked_behind
            .iter()
            .map(|l| l.event_id)
            .collect::<Vec<_>>(),
        [second, third]
    );

    let parked = dlq::show(&db.pool, "shown", second).await.unwrap().unwrap();
    assert_eq!(
        (parked.place, parked.letter.state),
        (2, DeadLetterState::Parked)
    );
    assert_eq!(parked.blocked_by.map(|l| l.event_id), Some(poison));
    assert_eq!(parked.parked_behind.len(), 1);

    assert!(
        dlq::show(&db.pool, "shown", Uuid::now_v7())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        dlq::show(&db.pool, "other", poison)
            .await
            .unwrap()
            .is_none()
    );
}
