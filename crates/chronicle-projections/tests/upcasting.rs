//! Lazy upcasting before a projection's handler (`UpcastingHandler`): the
//! handler, written against the newest version only, sees old events
//! upcast; an event the chain refuses is parked in the dead-letter queue
//! with its aggregate's later events, not skipped.

use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
use chronicle_projections::{DeadLetterState, PgProjection, ProjectionOptions, dlq};
use chronicle_upcast::{FnUpcaster, UpcastFailure, UpcasterChain, UpcastingHandler};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::{Ledger, create_read_model, drain, read_model};
use crate::support::fresh_db;

/// `Deposited` v1 held `cents`; v2 (what the ledger reads) holds `amount`.
fn chain() -> UpcasterChain {
    UpcasterChain::builder()
        .upcaster(FnUpcaster::new("Deposited", 1, |event| {
            let cents = event
                .data
                .as_object_mut()
                .and_then(|d| d.remove("cents"))
                .ok_or_else(|| UpcastFailure::new("no cents in a v1 deposit").at("/cents"))?;
            event.data["amount"] = cents;
            Ok(())
        }))
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_handler_sees_every_event_at_the_newest_version() {
    let db = fresh_db().await;
    create_read_model(&db).await;
    let (old, new, mixed) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let v1 = |cents: i64| NewEvent::new("Deposited", json!({ "cents": cents }));
    let v2 = |amount: i64| {
        NewEvent::new("Deposited", json!({ "amount": amount }))
            .with_metadata(chronicle_core::Metadata::default().with_schema_version(2))
    };
    let store = &db.store;
    store
        .append(
            old,
            "account",
            ExpectedVersion::NoStream,
            vec![v1(1), v1(2)],
        )
        .await
        .unwrap();
    store
        .append(
            new,
            "account",
            ExpectedVersion::NoStream,
            vec![v2(10), v2(20)],
        )
        .await
        .unwrap();
    // The poison: a v1 deposit without cents, then a good one behind it.
    let poison = NewEvent::new("Deposited", json!({ "note": "lost" }));
    let poison_id = poison.event_id;
    store
        .append(
            mixed,
            "account",
            ExpectedVersion::NoStream,
            vec![v1(100), poison, v2(5)],
        )
        .await
        .unwrap();

    let ledger = Ledger::new("upcast-ledger");
    let options = ProjectionOptions {
        partitions: 2,
        batch_size: 3,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(
        db.pool.clone(),
        UpcastingHandler::new(ledger.clone(), chain()),
        options,
    )
    .unwrap();
    projection.register().await.unwrap();
    drain(&projection).await;

    let model = read_model(&db).await;
    assert_eq!(
        model[&old],
        (3, vec![1, 2]),
        "v1 events upcast: cents -> amount"
    );
    assert_eq!(model[&new], (30, vec![1, 2]), "v2 events as stored");
    assert_eq!(
        model[&mixed],
        (100, vec![1]),
        "stopped before the refused event"
    );

    let letters = dlq::list(&db.pool, "upcast-ledger", Some(mixed))
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(
        (letters[0].event_id, letters[0].state),
        (poison_id, DeadLetterState::Failed)
    );
    let error = letters[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("upcasting before the handler failed") && error.contains("no cents"),
        "{error}"
    );
    assert_eq!(letters[1].state, DeadLetterState::Parked);
}
