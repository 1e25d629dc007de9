//! Encrypted fields through an eager migration, with `chronicle-crypto` on
//! PostgreSQL: data keys in `chronicle_data_keys`, audit in
//! `chronicle_audit_log`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent};
use chronicle_crypto::{
    AccessContext, DataKeyStore, EncryptedStore, EncryptionConfig, FieldEncryptor,
    FieldEncryptorBuilder, KeyLookup, LocalKeyring, Redaction, SubjectId,
};
use chronicle_postgres::testing::fresh_db;
use chronicle_postgres::{PgAuditSink, PgDataKeyStore};
use chronicle_upcast::{CryptoFieldCipher, PgUpcaster, UpcastConfig, UpcasterChain};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::upcast::snapshot;

const UPCASTERS: &str = r#"
upcasters:
  - event_type: UserRegistered
    from: 1
    steps:
      - move: { from: /email, to: /contact/email }
      - rename: { from: /name, to: /full_name }
      - add: { path: /contact/verified, default: false }
    schema:
      type: object
      required: [contact, full_name, address]
"#;

const ACTOR: &str = "chronicle-upcast";

#[tokio::test]
async fn encrypted_fields_go_through_an_eager_migration_readable_audited_and_never_in_plaintext() {
    let db = fresh_db().await;
    let kek = Arc::new(LocalKeyring::generate().unwrap());
    let keys = Arc::new(PgDataKeyStore::new(db.pool.clone()));
    let audit = Arc::new(PgAuditSink::new(db.pool.clone()));
    let encryptor: Arc<FieldEncryptor> = Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(
                "encryption:\n  events:\n    UserRegistered:\n      fields: [\"/email\", \"/address/street\"]\n",
            )
            .unwrap(),
            kek.clone(),
            keys.clone(),
            audit.clone(),
        )
        .build(),
    );
    let app = AccessContext::new("signup-service", "registration");
    let store = EncryptedStore::new(Arc::new(db.store.clone()), encryptor.clone(), app.clone());

    // 12 users, one event each, two encrypted fields per event.
    let mut users: HashMap<Uuid, (String, String)> = HashMap::new();
    for i in 0..12 {
        let id = Uuid::now_v7();
        let email = format!("person{i}@example.com");
        let street = format!("{i} Secret Lane");
        store
            .append(
                id,
                "User",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(
                    "UserRegistered",
                    json!({
                        "email": email,
                        "name": format!("Person {i}"),
                        "address": { "street": street, "city": "Leeds" },
                    }),
                )],
            )
            .await
            .unwrap();
        users.insert(id, (email, street));
    }
    let mut ids: Vec<Uuid> = users.keys().copied().collect();
    ids.sort();
    // One subject rotated its key (its fields must move to the new one),
    // one was shredded (its fields must stay gone).
    let rotated = ids[0];
    let shredded = ids[1];
    let new_key = encryptor
        .rotate_data_key(&app, &SubjectId::from_aggregate(rotated))
        .await
        .unwrap();
    encryptor
        .shred(
            &AccessContext::new("dpo", "erasure"),
            &SubjectId::from_aggregate(shredded),
        )
        .await
        .unwrap();
    let before = snapshot(&db).await;
    assert!(!text_of(&db, "events").await.contains("@example.com"));

    let chain = UpcasterChain::builder()
        .config(UpcastConfig::from_yaml("up.yaml", UPCASTERS).unwrap())
        .build()
        .unwrap();
    let mut upcaster = PgUpcaster::new(db.pool.clone(), chain);
    upcaster.cipher(Arc::new(CryptoFieldCipher::new(
        kek.clone(),
        keys.clone(),
        audit.clone(),
        AccessContext::new(ACTOR, "schema migration UserRegistered v2"),
    )));
    let plan = upcaster.plan().await.unwrap();
    assert_eq!((plan[0].events, plan[0].encrypted), (12, 12));
    let report = upcaster.run(5, |_| {}).await.unwrap();
    assert_eq!(report.events_upcast(), 12);

    // No plaintext anywhere: not in the events, not in the backup, not in
    // the run's bookkeeping.
    for table in ["events", "chronicle_upcast_backup", "chronicle_upcast_runs"] {
        let text = text_of(&db, table).await;
        for (email, street) in users.values() {
            assert!(!text.contains(email.as_str()), "{email} in {table}");
            assert!(!text.contains(street.as_str()), "{street} in {table}");
        }
    }

    // Stored: v2, envelopes at the new pointers, under each subject's
    // current key; the shredded subject's markers carried over.
    let client = db.pool.get().await.unwrap();
    for row in client
        .query(
            "SELECT aggregate_id, event_data, metadata, encrypted_fields FROM events",
            &[],
        )
        .await
        .unwrap()
    {
        let id: Uuid = row.get(0);
        let data: Value = row.get(1);
        let metadata: Value = row.get(2);
        let fields: Vec<String> = row.get(3);
        assert_eq!(metadata["schema_version"], 2);
        assert_eq!(
            fields.iter().cloned().collect::<BTreeSet<_>>(),
            BTreeSet::from(["/address/street".to_owned(), "/contact/email".to_owned()])
        );
        assert!(data.get("email").is_none(), "{data}");
        assert_eq!(data["contact"]["verified"], false);
        if id == shredded {
            assert_eq!(data["contact"]["email"], Redaction::Shredded.marker());
            assert_eq!(data["address"]["street"], Redaction::Shredded.marker());
            continue;
        }
        let current = match keys.current(&SubjectId::from_aggregate(id)).await.unwrap() {
            KeyLookup::Found(k) => k.id.to_string(),
            other => panic!("{other:?}"),
        };
        for pointer in ["/contact/email", "/address/street"] {
            let envelope = data.pointer(pointer).unwrap();
            assert_eq!(envelope["$enc"], "v1", "{data}");
            assert_eq!(envelope["kid"], current.as_str(), "{id} {pointer}");
        }
        if id == rotated {
            assert_eq!(current, new_key.to_string());
        }
    }

    // Readable afterwards through the encrypting store.
    let reader = store.with_context(AccessContext::new("support", "ticket"));
    for (id, (email, street)) in &users {
        let events = reader.read_stream(*id, 1, None).await.unwrap();
        let data = &events[0].event_data;
        if *id == shredded {
            assert_eq!(data["contact"]["email"], Redaction::Shredded.marker());
        } else {
            assert_eq!(data["contact"]["email"], email.as_str(), "{data}");
            assert_eq!(data["address"]["street"], street.as_str(), "{data}");
            assert_eq!(
                data["full_name"].as_str().map(|n| n.starts_with("Person")),
                Some(true)
            );
        }
    }

    // Audited: every field decrypted (the shredded ones as such) and every
    // live one re-encrypted, by the runner's context. (A record covers one
    // call's fields of a subject and key; the cipher calls once per event.)
    let audited: HashMap<(String, String), i64> = client
        .query(
            "SELECT operation, outcome, sum(cardinality(fields))::int8 FROM chronicle_audit_log \
              WHERE actor = $1 GROUP BY operation, outcome",
            &[&ACTOR],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    assert_eq!(
        audited.get(&("decrypt".into(), "success".into())),
        Some(&22),
        "{audited:?}"
    );
    assert_eq!(
        audited.get(&("decrypt".into(), "shredded".into())),
        Some(&2),
        "{audited:?}"
    );
    assert_eq!(
        audited.get(&("encrypt".into(), "success".into())),
        Some(&22),
        "{audited:?}"
    );

    // Verify with the cipher compares plaintext: clean, although every
    // field was re-encrypted under fresh nonces.
    let run_id = report.runs[0].run_id;
    let v = upcaster.verify(run_id).await.unwrap();
    assert_eq!((v.backup_count, v.current_count), (12, 12));
    assert_eq!((v.encrypted, v.compared_plaintext), (12, true));
    assert!(v.is_ok(), "{v:?}");

    // Without the cipher the envelopes are compared as stored, and differ;
    // the report says why.
    let plain = PgUpcaster::new(
        db.pool.clone(),
        UpcasterChain::builder()
            .config(UpcastConfig::from_yaml("up.yaml", UPCASTERS).unwrap())
            .build()
            .unwrap(),
    );
    let v = plain.verify(run_id).await.unwrap();
    assert!(!v.is_ok());
    assert_eq!((v.encrypted, v.compared_plaintext), (12, false));

    // A field changed after the run is found, even one inside the data
    // next to envelopes.
    let client = db.pool.get().await.unwrap();
    let tampered: Uuid = client
        .query_one(
            "UPDATE events SET event_data = jsonb_set(event_data, '{contact,verified}', 'true') \
              WHERE event_id = (SELECT event_id FROM events WHERE aggregate_id <> $1 \
                                 ORDER BY global_position LIMIT 1) RETURNING event_id",
            &[&shredded],
        )
        .await
        .unwrap()
        .get(0);
    let v = upcaster.verify(run_id).await.unwrap();
    assert_eq!(v.mismatches, vec![tampered]);
    client
        .execute(
            "UPDATE events SET event_data = jsonb_set(event_data, '{contact,verified}', 'false') \
              WHERE event_id = $1",
            &[&tampered],
        )
        .await
        .unwrap();
    assert!(upcaster.verify(run_id).await.unwrap().is_ok());

    // Rollback restores the original envelopes byte for byte, readable at
    // their old pointers again.
    upcaster.rollback(report.runs[0].run_id).await.unwrap();
    assert_eq!(snapshot(&db).await, before);
    let events = reader.read_stream(rotated, 1, None).await.unwrap();
    assert_eq!(events[0].event_data["email"], users[&rotated].0.as_str());
}

async fn text_of(db: &chronicle_postgres::testing::TestDb, table: &str) -> String {
    let client = db.pool.get().await.unwrap();
    let rows = client
        .query(&format!("SELECT t::text FROM {table} t"), &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}
