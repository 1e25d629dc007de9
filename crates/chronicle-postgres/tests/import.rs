//! `PgEventStore::append_all`: many appends in one transaction, all or none.

use chronicle_core::{Error, EventReader, ExpectedVersion, NewEvent};
use chronicle_postgres::AppendRequest;
use serde_json::json;
use uuid::Uuid;

use crate::support::{event_count, fresh_db, fresh_db_via_pgbouncer};

fn request(id: Uuid, expected: ExpectedVersion, event: NewEvent) -> AppendRequest {
    AppendRequest {
        aggregate_id: id,
        aggregate_type: "order".into(),
        expected,
        events: vec![event],
    }
}

#[tokio::test]
async fn a_failing_append_leaves_nothing_of_the_list_stored() {
    for db in [fresh_db().await, fresh_db_via_pgbouncer().await] {
        let order = Uuid::now_v7();
        let list = vec![
            request(
                order,
                ExpectedVersion::NoStream,
                NewEvent::new("Placed", json!({})),
            ),
            request(
                order,
                ExpectedVersion::Exact(1),
                NewEvent::new("Paid", json!({})),
            ),
            // A conflict: the order is at version 2 by now.
            request(
                order,
                ExpectedVersion::Exact(1),
                NewEvent::new("Shipped", json!({})),
            ),
        ];
        let err = db.store.append_all(&list).await.unwrap_err();
        assert_eq!(err.index, Some(2));
        assert!(
            matches!(err.source, Error::Conflict { actual: 2, .. }),
            "{:?}",
            err.source
        );
        assert_eq!(event_count(&db).await, 0, "nothing of the list was stored");

        // Validation comes before anything is sent.
        let mut bad = list[..2].to_vec();
        bad.push(request(
            order,
            ExpectedVersion::Exact(2),
            NewEvent::new("X", json!([1])),
        ));
        let err = db.store.append_all(&bad).await.unwrap_err();
        assert_eq!(err.index, Some(2));
        assert!(
            err.source.to_string().contains("events[0].event_data"),
            "{}",
            err.source
        );

        // The same id on two appends is refused, naming both.
        let twin = NewEvent::new("Placed", json!({}));
        let other = Uuid::now_v7();
        let err = db
            .store
            .append_all(&[
                request(order, ExpectedVersion::Any, twin.clone()),
                request(other, ExpectedVersion::Any, twin),
            ])
            .await
            .unwrap_err();
        assert_eq!(err.index, Some(1));
        assert!(
            err.source.to_string().contains("append 0"),
            "{}",
            err.source
        );
        assert_eq!(event_count(&db).await, 0);

        // The fixed list goes in whole; run again, it stores nothing twice.
        let mut good = list[..2].to_vec();
        good.push(request(
            order,
            ExpectedVersion::Exact(2),
            NewEvent::new("Shipped", json!({})),
        ));
        let first = db.store.append_all(&good).await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|o| (o.version, o.appended))
                .collect::<Vec<_>>(),
            [(1, true), (2, true), (3, true)]
        );
        let again = db.store.append_all(&good).await.unwrap();
        assert!(again.iter().all(|o| !o.appended), "{again:?}");
        assert_eq!(db.store.read_stream(order, 1, None).await.unwrap().len(), 3);
    }
}
