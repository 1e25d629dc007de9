//! What `jsonb` can store is accepted and read back equal; what it cannot
//! is refused with the path named, compared against PostgreSQL itself.

use chronicle_core::{Error, EventAppender, EventReader, ExpectedVersion, NewEvent};
use chronicle_postgres::MAX_JSON_DEPTH;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Number, Value, json};
use uuid::Uuid;

use crate::support::{TestDb, event_count, fresh_db};

/// Appends `data` as one event's data; its read-back data when stored.
async fn round_trip(db: &TestDb, data: Value) -> Result<Value, Error> {
    let id = Uuid::now_v7();
    db.store
        .append(
            id,
            "doc",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Put", data)],
        )
        .await?;
    let events = db.store.read_stream(id, 1, None).await?;
    Ok(events
        .into_iter()
        .next()
        .expect("the stored event")
        .event_data)
}

/// Whether PostgreSQL's own `jsonb` input accepts `text`.
async fn jsonb_accepts(db: &TestDb, text: &str) -> bool {
    let client = db.pool.get().await.expect("connect");
    client
        .query_typed_one(
            "SELECT $1::text::jsonb",
            &[(&text, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .is_ok()
}

#[tokio::test]
async fn an_escaped_backslash_u0000_is_stored_and_a_decoded_nul_is_refused_by_path() {
    let db = fresh_db().await;
    // The text `C:\u0000dir`: a backslash, then `u0000`; jsonb stores it.
    let path = json!({ "path": "C:\\u0000dir" });
    assert!(jsonb_accepts(&db, &path.to_string()).await);
    assert_eq!(round_trip(&db, path.clone()).await.unwrap(), path);

    for (data, pointer) in [
        (json!({ "a": [1, { "k": "x\u{0}y" }] }), "at /a/1/k:"),
        (
            json!({ "we/ird~": { "n\u{0}l": 1 } }),
            "at /we~1ird~0/n\u{0}l:",
        ),
    ] {
        assert!(!jsonb_accepts(&db, &data.to_string()).await);
        match round_trip(&db, data).await {
            Err(Error::Invalid(v)) => {
                assert_eq!(v.field, "events[0].event_data");
                assert!(v.reason.starts_with(pointer), "{v}");
                assert!(v.reason.contains("NUL character"), "{v}");
            }
            other => panic!("not refused: {other:?}"),
        }
    }
    let metadata = chronicle_core::Metadata {
        actor: Some("nul\u{0}".into()),
        ..Default::default()
    };
    let err = db
        .store
        .append(
            Uuid::now_v7(),
            "doc",
            ExpectedVersion::Any,
            vec![NewEvent::new("Put", json!({})).with_metadata(metadata)],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid events[0].metadata: at /actor:"),
        "{err}"
    );
    assert_eq!(event_count(&db).await, 1, "only the valid event is stored");
}

fn nested(depth: usize) -> Value {
    (1..depth).fold(json!({}), |inner, _| json!({ "n": inner }))
}

#[tokio::test]
async fn nesting_is_stored_as_deep_as_it_can_be_read_back() {
    let db = fresh_db().await;
    let deepest = nested(MAX_JSON_DEPTH);
    assert_eq!(round_trip(&db, deepest.clone()).await.unwrap(), deepest);
    match round_trip(&db, nested(MAX_JSON_DEPTH + 1)).await {
        Err(Error::Invalid(v)) => assert!(v.reason.contains("nests deeper than 127"), "{v}"),
        other => panic!("stored data it could not read back: {other:?}"),
    }
}

/// Any JSON value: strings with escapes, control characters, NULs and
/// non-ASCII; integers over the whole `i64` and `u64` ranges; floats from
/// subnormal to huge; nesting of objects and arrays.
fn any_json() -> impl Strategy<Value = Value> {
    let text = "(\\\\u0000|\\\\|\"|\u{0}|\u{1}|\n|\t|é|€|𝄞|\u{fffd}|[a-z/~])*";
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO)
            .prop_map(|f| Value::Number(Number::from_f64(f).expect("finite"))),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text, inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Equal as JSON: `jsonb` keeps numbers as `numeric`, so a float with an
/// integral value (`2.7785726568956192e17`) reads back as that integer;
/// numbers compare by value, everything else exactly.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || ((x.is_f64() || y.is_f64()) && x.as_f64() == y.as_f64())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn every_value_jsonb_accepts_is_stored_and_read_back_equal_and_the_rest_refused_by_path() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(fresh_db());
    let mut runner = TestRunner::new(Config {
        cases: 200,
        ..Config::default()
    });
    let (stored, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&any_json(), |value| {
            let data = json!({ "v": value });
            let (accepted, result) = runtime.block_on(async {
                let accepted = jsonb_accepts(&db, &data.to_string()).await;
                (accepted, round_trip(&db, data.clone()).await)
            });
            match (accepted, result) {
                (true, Ok(back)) => {
                    stored.set(stored.get() + 1);
                    prop_assert!(same_json(&back, &data), "{back} != {data}");
                }
                (false, Err(Error::Invalid(v))) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(v.reason.starts_with("at /v"), "{}", v);
                }
                (accepted, other) => {
                    return Err(TestCaseError::fail(format!(
                        "jsonb accepts it: {accepted}; the store: {other:?}; value {data}"
                    )));
                }
            }
            Ok(())
        })
        .unwrap();
    let (stored, refused) = (stored.get(), refused.get());
    assert!(
        stored > 20 && refused > 20,
        "stored {stored}, refused {refused}"
    );
}
