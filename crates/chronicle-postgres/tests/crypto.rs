//! Field encryption over PostgreSQL: `PgDataKeyStore`, `PgAuditSink` and
//! `EncryptedStore<PgEventStore>` against a real server.

use std::sync::Arc;

use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, Position, TimeRange};
use chronicle_crypto::{
    AccessContext, AuditEntry, AuditOperation, AuditOutcome, ChainHead, ChainProblem, DataKey,
    DataKeyId, DataKeyStore, EncryptedStore, EncryptionConfig, Error as CryptoError,
    FieldEncryptor, FieldEncryptorBuilder, GroupCommitAuditSink, KeyLookup, KeyProvider,
    LocalKeyring, ReadMode, Redaction, StoredDataKey, SubjectId, WrappedKey,
};
use chronicle_postgres::{AuditQuery, PgAuditSink, PgDataKeyStore, PgEventStore, PgReencryptor};
use chrono::{Duration, Utc};
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::support::{TestDb, fresh_db, fresh_db_via_pgbouncer};

/// Declares a test that runs directly, and its twin through PgBouncer.
macro_rules! scenario {
    ($name:ident, $via:ident) => {
        #[tokio::test]
        async fn $name() {
            scenarios::$name(fresh_db().await).await;
        }

        #[tokio::test]
        async fn $via() {
            scenarios::$name(fresh_db_via_pgbouncer().await).await;
        }
    };
}

scenario!(
    no_plaintext_reaches_any_table,
    no_plaintext_reaches_any_table_via_pgbouncer
);
scenario!(
    first_keys_and_audit_appends_are_race_safe,
    first_keys_and_audit_appends_are_race_safe_via_pgbouncer
);

const CONFIG: &str = r#"
encryption:
  events:
    UserRegistered:
      fields: ["/email", "/address/street"]
    OrderPlaced:
      subject: /customer_id
      fields: ["/card"]
"#;

struct Kit {
    db: TestDb,
    keyring: Arc<LocalKeyring>,
    keys: Arc<PgDataKeyStore>,
    audit: Arc<PgAuditSink>,
    store: EncryptedStore<PgEventStore>,
}

impl Kit {
    fn new(db: TestDb) -> Kit {
        let keyring = Arc::new(LocalKeyring::generate().unwrap());
        let keys = Arc::new(PgDataKeyStore::new(db.pool.clone()));
        let audit = Arc::new(PgAuditSink::new(db.pool.clone()));
        let encryptor = encryptor(&keyring, &keys, &audit);
        let store = EncryptedStore::new(
            Arc::new(db.store.clone()),
            encryptor,
            AccessContext::new("signup-service", "registration"),
        );
        Kit {
            db,
            keyring,
            keys,
            audit,
            store,
        }
    }

    /// A second encryptor over the same tables, with an empty key cache (as
    /// in another process).
    fn fresh_encryptor(&self, keyring: Arc<dyn KeyProvider>) -> Arc<FieldEncryptor> {
        Arc::new(
            FieldEncryptorBuilder::new(
                EncryptionConfig::from_yaml(CONFIG).unwrap(),
                keyring,
                self.keys.clone(),
                self.audit.clone(),
            )
            .build(),
        )
    }

    fn store_with(&self, encryptor: Arc<FieldEncryptor>) -> EncryptedStore<PgEventStore> {
        EncryptedStore::new(
            Arc::new(self.db.store.clone()),
            encryptor,
            AccessContext::new("other-process", "test"),
        )
    }

    async fn register(&self, user: Uuid, email: &str, street: &str) -> Uuid {
        let event = NewEvent::new(
            "UserRegistered",
            json!({
                "email": email,
                "name": "Visible Name",
                "address": { "street": street, "city": "Oslo" },
            }),
        );
        let id = event.event_id;
        self.store
            .append(user, "user", ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        id
    }

    async fn exec(&self, sql: &str) {
        let client = self.db.pool.get().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        let client = self.db.pool.get().await.unwrap();
        client.query_typed_one(sql, &[]).await.unwrap().get(0)
    }
}

fn encryptor(
    keyring: &Arc<LocalKeyring>,
    keys: &Arc<PgDataKeyStore>,
    audit: &Arc<PgAuditSink>,
) -> Arc<FieldEncryptor> {
    Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(CONFIG).unwrap(),
            keyring.clone(),
            keys.clone(),
            audit.clone(),
        )
        .build(),
    )
}

fn ops(records: &[chronicle_crypto::AuditRecord]) -> Vec<&'static str> {
    records.iter().map(|r| r.entry.operation.as_str()).collect()
}

/// How many rows of every table in the database contain `needle` anywhere
/// in any column (each row cast to text), by table.
async fn tables_containing(db: &TestDb, needle: &str) -> Vec<(String, i64)> {
    let client = db.pool.get().await.unwrap();
    let tables = client
        .query_typed(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)
               FROM information_schema.tables
              WHERE table_type = 'BASE TABLE'
                AND table_schema NOT IN ('pg_catalog', 'information_schema')
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(
        tables.len() >= 6,
        "expected the events, key and audit tables"
    );
    let mut found = Vec::new();
    for t in tables {
        let table: String = t.get(0);
        let n: i64 = client
            .query_typed_one(
                &format!("SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0"),
                &[(&needle, Type::TEXT)],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            found.push((table, n));
        }
    }
    found
}

mod scenarios {
    use super::*;

    pub async fn no_plaintext_reaches_any_table(db: TestDb) {
        let kit = Kit::new(db);
        let mut secrets = Vec::new();
        let mut users = Vec::new();
        for i in 0..3 {
            let user = Uuid::now_v7();
            let email = format!("secret-mail-{i}@example.com");
            let street = format!("{i} Secret Street");
            kit.register(user, &email, &street).await;
            let card = format!("4111-0000-secret-{i}");
            kit.store
                .append(
                    Uuid::now_v7(),
                    "order",
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new(
                        "OrderPlaced",
                        json!({ "customer_id": user.to_string(), "card": card, "total": 42 }),
                    )],
                )
                .await
                .unwrap();
            secrets.extend([email, street, card]);
            users.push(user);
        }
        // Decrypting reads (audited) leave nothing behind either.
        // The feed holds back events while any transaction in the cluster
        // (another test's) is older: poll.
        let mut feed = kit.store.read_all(Position::START, 100).await.unwrap();
        for _ in 0..200 {
            if feed.events.len() == 6 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            feed = kit.store.read_all(Position::START, 100).await.unwrap();
        }
        assert_eq!(feed.events.len(), 6);
        assert!(
            feed.events.iter().all(
                |e| e.encrypted_fields.is_empty() && !e.event_data.to_string().contains("$enc")
            )
        );
        for (i, user) in users.iter().enumerate() {
            let read = kit.store.read_stream(*user, 1, None).await.unwrap();
            assert_eq!(read[0].event_data["email"], secrets[3 * i]);
            assert_eq!(read[0].event_data["address"]["street"], secrets[3 * i + 1]);
            assert!(read[0].encrypted_fields.is_empty());
        }
        let orders = kit
            .store
            .read_by_type("OrderPlaced", TimeRange::default(), 10)
            .await
            .unwrap();
        let cards: Vec<&Value> = orders.iter().map(|e| &e.event_data["card"]).collect();
        assert_eq!(cards, [&secrets[2], &secrets[5], &secrets[8]]);

        for secret in &secrets {
            assert_eq!(
                tables_containing(&kit.db, secret).await,
                vec![],
                "plaintext {secret:?} found in the database"
            );
        }
        // The scan does find what is not encrypted.
        assert_eq!(
            tables_containing(&kit.db, "Visible Name").await,
            vec![("public.events".to_owned(), 3)]
        );
        let raw = kit.db.store.read_stream(users[0], 1, None).await.unwrap();
        assert_eq!(raw[0].encrypted_fields, ["/email", "/address/street"]);
        assert_eq!(raw[0].event_data["email"]["$enc"], "v1");
        assert_eq!(
            kit.count("SELECT count(*) FROM chronicle_data_keys").await,
            3
        );
        assert!(kit.audit.verify().await.unwrap().is_intact());
    }

    pub async fn first_keys_and_audit_appends_are_race_safe(db: TestDb) {
        let kit = Kit::new(db);
        let subject = SubjectId::new(format!("racer-{}", Uuid::now_v7()));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let keys = kit.keys.clone();
                let subject = subject.clone();
                tokio::spawn(async move {
                    keys.insert_first(StoredDataKey {
                        id: DataKeyId::new(),
                        subject,
                        wrapped: WrappedKey {
                            kek_id: "k1".into(),
                            ciphertext: vec![i; 40],
                        },
                        created_at: Utc::now(),
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                KeyLookup::Found(k) => winners.push(k.id),
                other => panic!("expected a key, got {other:?}"),
            }
        }
        winners.dedup();
        assert_eq!(winners.len(), 1, "every racer gets the same first key");
        assert_eq!(
            kit.keys.current(&subject).await.unwrap(),
            kit.keys.get(winners[0]).await.unwrap()
        );
        assert_eq!(
            kit.count("SELECT count(*) FROM chronicle_data_keys").await,
            1
        );

        let ctx = AccessContext::new("racer", "test");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let audit = kit.audit.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        let batch = (0..3)
                            .map(|_| {
                                AuditEntry::new(
                                    AuditOperation::Decrypt,
                                    AuditOutcome::Success,
                                    &ctx,
                                )
                                .with_field(Uuid::now_v7(), "/email")
                            })
                            .collect();
                        chronicle_crypto::AuditSink::append(&*audit, batch)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let report = kit.audit.verify().await.unwrap();
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.checked, 120);
        assert_eq!(report.head, kit.audit.head().await.unwrap());
        assert_eq!(report.head.seq, 120);
        // Small pages verify the same.
        let paged = kit.audit.verify_paged(7).await.unwrap();
        assert_eq!(paged, report);
    }
}

#[tokio::test]
async fn tampered_moved_or_wrongly_keyed_ciphertext_fails_clearly() {
    let kit = Kit::new(fresh_db().await);
    let user = Uuid::now_v7();
    let first = kit.register(user, "ada@example.com", "1 Main St").await;
    let second = kit.register(user, "ada@work.example", "2 Side St").await;

    // Flip one bit of the first event's email ciphertext.
    let client = kit.db.pool.get().await.unwrap();
    client
        .execute_typed(
            "UPDATE events SET event_data = jsonb_set(event_data, '{email,ct}', to_jsonb(
                 encode(set_byte(decode(event_data#>>'{email,ct}', 'base64'), 0,
                        get_byte(decode(event_data#>>'{email,ct}', 'base64'), 0) # 1), 'base64')))
              WHERE event_id = $1",
            &[(&first, Type::UUID)],
        )
        .await
        .unwrap();
    let err = kit.store.read_stream(user, 1, None).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("failed authentication"), "{message}");
    assert!(message.contains(&first.to_string()), "{message}");
    assert!(message.contains("/email"), "{message}");
    assert!(!message.contains("ada@"), "{message}");
    match CryptoError::in_store_error(&err) {
        Some(CryptoError::Tampered {
            event_id, field, ..
        }) => assert_eq!((*event_id, field.as_str()), (first, "/email")),
        other => panic!("expected Tampered, got {other:?}"),
    }
    // The second event alone still reads.
    let read = kit.store.read_stream(user, 2, Some(2)).await.unwrap();
    assert_eq!(read[0].event_data["email"], "ada@work.example");
    // The failure was audited.
    let failed = kit
        .audit
        .list(&AuditQuery {
            outcome: Some(AuditOutcome::Failed),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].entry.event_id, Some(first));

    // Move the second event's intact ciphertexts into the first event: the
    // same key, but bound to another event.
    client
        .execute_typed(
            "UPDATE events SET event_data = jsonb_set(event_data, '{address,street}',
                 (SELECT event_data#>'{address,street}' FROM events WHERE event_id = $2))
              WHERE event_id = $1",
            &[(&first, Type::UUID), (&second, Type::UUID)],
        )
        .await
        .unwrap();
    client
        .execute_typed(
            "UPDATE events SET event_data = jsonb_set(event_data, '{email}',
                 (SELECT event_data->'email' FROM events WHERE event_id = $2))
              WHERE event_id = $1",
            &[(&first, Type::UUID), (&second, Type::UUID)],
        )
        .await
        .unwrap();
    let err = kit.store.read_stream(user, 1, Some(1)).await.unwrap_err();
    assert!(
        matches!(
            CryptoError::in_store_error(&err),
            Some(CryptoError::Tampered { event_id, .. }) if *event_id == first
        ),
        "{err}"
    );

    // A wrong key-encryption key: another keyring (unknown KEK id), and a
    // keyring with the right id but other key material.
    let other = kit.fresh_encryptor(Arc::new(LocalKeyring::generate().unwrap()));
    let err = kit
        .store_with(other)
        .read_stream(user, 2, Some(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            CryptoError::in_store_error(&err),
            Some(CryptoError::UnknownKek { .. })
        ),
        "{err}"
    );
    let impostor =
        LocalKeyring::with_key(kit.keyring.current_key_id(), DataKey::generate().unwrap()).unwrap();
    let err = kit
        .store_with(kit.fresh_encryptor(Arc::new(impostor)))
        .read_stream(user, 2, Some(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            CryptoError::in_store_error(&err),
            Some(CryptoError::UnwrapFailed { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("could not be unwrapped"), "{err}");
}

#[tokio::test]
async fn data_key_rotation_keeps_old_events_readable() {
    let kit = Kit::new(fresh_db().await);
    let user = Uuid::now_v7();
    kit.register(user, "old@example.com", "Old Road").await;
    let subject = SubjectId::from_aggregate(user);
    let ctx = AccessContext::new("ops", "rotation");
    let new_key = kit
        .store
        .encryptor()
        .rotate_data_key(&ctx, &subject)
        .await
        .unwrap();
    kit.register(user, "new@example.com", "New Road").await;

    let raw = kit.db.store.read_stream(user, 1, None).await.unwrap();
    let kid = |i: usize| {
        raw[i].event_data["email"]["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_ne!(kid(0), kid(1));
    assert_eq!(kid(1), new_key.to_string());

    // This process and a fresh one (keys from the tables) read both.
    let fresh = kit.store_with(kit.fresh_encryptor(kit.keyring.clone()));
    for store in [&kit.store, &fresh] {
        let read = store.read_stream(user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], "old@example.com");
        assert_eq!(read[1].event_data["email"], "new@example.com");
    }
    assert_eq!(
        kit.keys.current(&subject).await.unwrap(),
        kit.keys.get(new_key).await.unwrap()
    );
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_data_keys").await,
        2
    );
    let listed = kit.keys.keys(Some(&subject), None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].id, new_key);
    assert_eq!(
        listed.iter().map(|k| k.current).collect::<Vec<_>>(),
        [false, true]
    );
    assert!(
        listed
            .iter()
            .all(|k| k.kek_id.is_some() && k.shredded_at.is_none())
    );
    let page = kit.keys.keys(None, Some(listed[0].id), 10).await.unwrap();
    assert_eq!(page, listed[1..]);

    // Re-encrypting the old event under the newest key, written back by the
    // caller, keeps it readable.
    let mut old = kit.db.store.read_stream(user, 1, Some(1)).await.unwrap();
    let n = kit
        .store
        .encryptor()
        .reencrypt_events(&ctx, &mut old)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(old[0].event_data["email"]["kid"], new_key.to_string());
    let mut opened = old.clone();
    kit.store
        .encryptor()
        .decrypt_events(&ctx, &mut opened)
        .await
        .unwrap();
    assert_eq!(opened[0].event_data["address"]["street"], "Old Road");
}

#[tokio::test]
async fn reencryption_job_moves_old_fields_to_the_newest_key() {
    let kit = Kit::new(fresh_db().await);
    let (user, other) = (Uuid::now_v7(), Uuid::now_v7());
    for i in 0..3 {
        kit.register(user, &format!("v{i}@example.com"), "Street")
            .await;
    }
    kit.register(other, "other@example.com", "Elsewhere").await;
    let subject = SubjectId::from_aggregate(user);
    let ctx = AccessContext::new("ops", "key-exposure-42");
    let newest = kit
        .store
        .encryptor()
        .rotate_data_key(&ctx, &subject)
        .await
        .unwrap();
    kit.register(user, "v3@example.com", "Street").await;
    let other_before = kit.db.store.read_stream(other, 1, None).await.unwrap();

    let job = PgReencryptor::new(kit.db.pool.clone(), kit.store.encryptor().clone());
    let mut pages = 0;
    let done = job
        .reencrypt_subject(&ctx, &subject, None, 2, |_| pages += 1)
        .await
        .unwrap();
    assert_eq!(
        (done.scanned, done.rewritten, done.fields, done.skipped),
        (3, 3, 6, 0)
    );
    assert_eq!(pages, 3, "two full pages and the empty end");

    let raw = kit.db.store.read_stream(user, 1, None).await.unwrap();
    for event in &raw {
        assert_eq!(event.event_data["email"]["kid"], newest.to_string());
        assert_eq!(
            event.event_data["address"]["street"]["kid"],
            newest.to_string()
        );
        assert_eq!(event.encrypted_fields, ["/email", "/address/street"]);
    }
    let read = kit.store.read_stream(user, 1, None).await.unwrap();
    let emails: Vec<&Value> = read.iter().map(|e| &e.event_data["email"]).collect();
    assert_eq!(
        emails,
        [
            "v0@example.com",
            "v1@example.com",
            "v2@example.com",
            "v3@example.com"
        ]
    );
    // Versions and feed positions are untouched; the other subject too.
    assert_eq!(
        raw.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(
        kit.db.store.read_stream(other, 1, None).await.unwrap(),
        other_before
    );
    // Nothing left to do.
    let again = job
        .reencrypt_subject(&ctx, &subject, None, 2, |_| {})
        .await
        .unwrap();
    assert_eq!((again.scanned, again.rewritten), (0, 0));
    let audited = kit
        .audit
        .list(&AuditQuery {
            operation: Some(AuditOperation::Reencrypt),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(audited.len(), 6);
}

#[tokio::test]
async fn kek_rewrap_over_postgres_keeps_everything_readable() {
    let kit = Kit::new(fresh_db().await);
    let mut users = Vec::new();
    for i in 0..5 {
        let user = Uuid::now_v7();
        kit.register(user, &format!("u{i}@example.com"), "Street")
            .await;
        users.push(user);
    }
    let old_kek = kit.keyring.current_key_id();
    let new_kek = kit.keyring.rotate().unwrap();
    assert_eq!(
        kit.keys.count_by_kek().await.unwrap(),
        vec![(old_kek.clone(), 5)]
    );
    let ctx = AccessContext::new("ops", "kek-rotation");
    let encryptor = kit.store.encryptor();

    // Interrupted after one page, then resumed from the cursor.
    let page = encryptor.rewrap_page(&ctx, None, 2).await.unwrap();
    assert_eq!((page.scanned, page.rewrapped), (2, 2));
    let mut seen = Vec::new();
    let total = encryptor
        .rewrap_all(&ctx, 2, |p| seen.push(p.scanned))
        .await
        .unwrap();
    // The resumed run starts over, skipping the two already done.
    assert_eq!((total.scanned, total.rewrapped), (5, 3));
    assert_eq!(seen, [2, 4, 5]);
    assert_eq!(
        kit.keys.count_by_kek().await.unwrap(),
        vec![(new_kek.clone(), 5)]
    );
    // Repeating it is a no-op.
    let again = encryptor.rewrap_all(&ctx, 100, |_| {}).await.unwrap();
    assert_eq!(again.rewrapped, 0);

    // The old KEK can go: a fresh process without it reads everything.
    kit.keyring.remove(&old_kek).unwrap();
    let fresh = kit.store_with(kit.fresh_encryptor(kit.keyring.clone()));
    for (i, user) in users.iter().enumerate() {
        let read = fresh.read_stream(*user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], format!("u{i}@example.com"));
    }
    let rewraps = kit
        .audit
        .list(&AuditQuery {
            operation: Some(AuditOperation::Rewrap),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rewraps.len(), 5);
    assert!(
        rewraps
            .iter()
            .all(|r| r.entry.kek_id.as_ref() == Some(&new_kek))
    );
}

#[tokio::test]
async fn shredding_redacts_one_subject_and_spares_the_others() {
    let kit = Kit::new(fresh_db().await);
    let (shredded, spared) = (Uuid::now_v7(), Uuid::now_v7());
    kit.register(shredded, "gone@example.com", "Gone Road")
        .await;
    kit.register(spared, "kept@example.com", "Kept Road").await;
    kit.store
        .append(
            Uuid::now_v7(),
            "order",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "OrderPlaced",
                json!({ "customer_id": shredded.to_string(), "card": "4111-gone" }),
            )],
        )
        .await
        .unwrap();
    let subject = SubjectId::from_aggregate(shredded);
    kit.store
        .encryptor()
        .rotate_data_key(&AccessContext::new("ops", "rotation"), &subject)
        .await
        .unwrap();

    let destroyed = kit
        .store
        .encryptor()
        .shred(&AccessContext::new("dpo", "erasure-17"), &subject)
        .await
        .unwrap();
    assert_eq!(destroyed.len(), 2);
    assert_eq!(
        kit.count(&format!(
            "SELECT count(*) FROM chronicle_data_keys WHERE subject = '{}' AND wrapped_key IS NULL AND kek_id IS NULL AND shredded_at IS NOT NULL",
            subject.as_str()
        ))
        .await,
        2
    );
    let listed = kit.keys.keys(Some(&subject), None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|k| !k.current && k.kek_id.is_none() && k.shredded_at.is_some())
    );

    // This process, and another one whose cache never saw the keys.
    let fresh = kit.store_with(kit.fresh_encryptor(kit.keyring.clone()));
    for store in [&kit.store, &fresh] {
        let read = store.read_stream(shredded, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], Redaction::Shredded.marker());
        assert_eq!(
            read[0].event_data["address"]["street"],
            Redaction::Shredded.marker()
        );
        assert_eq!(read[0].event_data["name"], "Visible Name");
        let orders = store
            .read_by_type("OrderPlaced", TimeRange::default(), 10)
            .await
            .unwrap();
        assert_eq!(orders[0].event_data["card"], Redaction::Shredded.marker());
        let read = store.read_stream(spared, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], "kept@example.com");
    }
    // The stream itself is intact and replayable.
    assert_eq!(
        kit.db
            .store
            .read_stream(shredded, 1, None)
            .await
            .unwrap()
            .len(),
        1
    );
    // No new data for the subject.
    let err = fresh
        .append(
            shredded,
            "user",
            ExpectedVersion::Exact(1),
            vec![NewEvent::new(
                "UserRegistered",
                json!({ "email": "again@example.com" }),
            )],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            CryptoError::in_store_error(&err),
            Some(CryptoError::SubjectShredded { .. })
        ),
        "{err}"
    );
    assert_eq!(
        tables_containing(&kit.db, "again@example.com").await,
        vec![]
    );
    // Shredding again destroys nothing more.
    let again = kit
        .store
        .encryptor()
        .shred(&AccessContext::new("dpo", "erasure-17"), &subject)
        .await
        .unwrap();
    assert!(again.is_empty());
}

#[tokio::test]
async fn redacting_and_ciphertext_readers_need_no_keys() {
    let kit = Kit::new(fresh_db().await);
    let user = Uuid::now_v7();
    kit.register(user, "ada@example.com", "1 Main St").await;
    let before = kit.audit.head().await.unwrap();
    let read = kit
        .store
        .reading(ReadMode::Redact)
        .read_stream(user, 1, None)
        .await
        .unwrap();
    assert_eq!(read[0].event_data["email"], Redaction::Denied.marker());
    let raw = kit
        .store
        .reading(ReadMode::Ciphertext)
        .read_stream(user, 1, None)
        .await
        .unwrap();
    assert_eq!(raw[0].event_data["email"]["$enc"], "v1");
    assert_eq!(kit.audit.head().await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_audit_appends_keep_one_record_per_decrypted_field() {
    let kit = Kit::new(fresh_db().await);
    let user = Uuid::now_v7();
    kit.register(user, "ada@example.com", "1 Main St").await;
    let grouped = Arc::new(GroupCommitAuditSink::new(kit.audit.clone()));
    let encryptor = Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(CONFIG).unwrap(),
            kit.keyring.clone(),
            kit.keys.clone(),
            grouped,
        )
        .build(),
    );
    let store = kit.store_with(encryptor);
    let before = kit.audit.head().await.unwrap().seq;
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.with_context(AccessContext::new(format!("reader-{i}"), "load"));
            tokio::spawn(async move {
                for _ in 0..5 {
                    let read = store.read_stream(user, 1, None).await.unwrap();
                    assert_eq!(read[0].event_data["email"], "ada@example.com");
                }
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.head.seq - before, 16 * 5 * 2);
    let reader_3 = kit
        .audit
        .list(&AuditQuery {
            actor: Some("reader-3".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(reader_3.len(), 10);
}

/// Appends, reads, rotates and shreds; returns the records' operations.
async fn audited_history(kit: &Kit) -> Vec<&'static str> {
    let user = Uuid::now_v7();
    kit.register(user, "ada@example.com", "1 Main St").await;
    let support = kit
        .store
        .with_context(AccessContext::new("support:alice", "ticket-4711"));
    support.read_stream(user, 1, None).await.unwrap();
    let subject = SubjectId::from_aggregate(user);
    let ops_ctx = AccessContext::new("ops", "maintenance");
    kit.store
        .encryptor()
        .rotate_data_key(&ops_ctx, &subject)
        .await
        .unwrap();
    kit.store
        .encryptor()
        .shred(&AccessContext::new("dpo", "erasure-17"), &subject)
        .await
        .unwrap();
    ops(&kit.audit.list(&AuditQuery::default()).await.unwrap())
}

#[tokio::test]
async fn audit_log_has_one_record_per_operation_and_filters() {
    let kit = Kit::new(fresh_db().await);
    let start = Utc::now() - Duration::seconds(1);
    let history = audited_history(&kit).await;
    assert_eq!(
        history,
        [
            "create-key",
            "encrypt",
            "encrypt",
            "decrypt",
            "decrypt",
            "rotate",
            "shred",
            "shred"
        ]
    );
    let all = kit.audit.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_audit_log").await,
        8
    );
    let decrypts = &all[3..5];
    assert!(decrypts.iter().all(|r| r.entry.actor == "support:alice"
        && r.entry.purpose == "ticket-4711"
        && r.entry.outcome == AuditOutcome::Success));
    let fields: Vec<_> = decrypts
        .iter()
        .map(|r| r.entry.field.clone().unwrap())
        .collect();
    assert_eq!(fields, ["/email", "/address/street"]);

    // Filters.
    let subject = all[0].entry.subject.clone().unwrap();
    let by_subject = kit
        .audit
        .list(&AuditQuery {
            subject: Some(subject.clone()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(by_subject.len(), 8);
    let other = kit
        .audit
        .list(&AuditQuery {
            subject: Some(SubjectId::new("nobody")),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert!(other.is_empty());
    let shreds = kit
        .audit
        .list(&AuditQuery {
            operation: Some(AuditOperation::Shred),
            actor: Some("dpo".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(shreds.len(), 2);
    let in_range = kit
        .audit
        .list(&AuditQuery {
            range: TimeRange {
                from: Some(start),
                to: Some(Utc::now() + Duration::seconds(1)),
            },
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(in_range.len(), 8);
    let future = kit
        .audit
        .list(&AuditQuery {
            range: TimeRange {
                from: Some(Utc::now() + Duration::seconds(60)),
                to: None,
            },
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert!(future.is_empty());
    let page = kit
        .audit
        .list(&AuditQuery {
            after_seq: 2,
            limit: 3,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
    let by_event = kit
        .audit
        .list(&AuditQuery {
            event_id: all[1].entry.event_id,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(ops(&by_event), ["encrypt", "encrypt", "decrypt", "decrypt"]);

    // Round trip: what was stored hashes as it was chained.
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.checked, 8);
    assert_eq!(
        report.head,
        ChainHead {
            seq: 8,
            hash: all[7].hash
        }
    );
}

/// One audited history, tampered with case after case (as a superuser
/// could, with the append-only triggers disabled) and restored in between.
struct Tamper {
    kit: Kit,
}

impl Tamper {
    async fn new() -> Tamper {
        let kit = Kit::new(fresh_db().await);
        audited_history(&kit).await;
        kit.exec(
            "CREATE TABLE audit_backup AS SELECT * FROM chronicle_audit_log;
             CREATE TABLE audit_head_backup AS SELECT * FROM chronicle_audit_head;",
        )
        .await;
        Tamper { kit }
    }

    /// Runs `sql` with the triggers disabled, verifies, restores.
    async fn problems(&self, sql: &str) -> Vec<ChainProblem> {
        self.kit
            .exec(&format!(
                "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
                 ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
                 {sql};"
            ))
            .await;
        let problems = self.kit.audit.verify().await.unwrap().problems;
        self.kit
            .exec(
                "DELETE FROM chronicle_audit_log;
                 INSERT INTO chronicle_audit_log SELECT * FROM audit_backup;
                 DELETE FROM chronicle_audit_head;
                 INSERT INTO chronicle_audit_head SELECT * FROM audit_head_backup;
                 ALTER TABLE chronicle_audit_log ENABLE TRIGGER USER;
                 ALTER TABLE chronicle_audit_head ENABLE TRIGGER USER;",
            )
            .await;
        assert!(self.kit.audit.verify().await.unwrap().is_intact());
        problems
    }

    /// Inserts a record as row `seq`.
    async fn insert(&self, seq: i64, record: &chronicle_crypto::AuditRecord) {
        let client = self.kit.db.pool.get().await.unwrap();
        let e = &record.entry;
        client
            .execute_typed(
                "INSERT INTO chronicle_audit_log (seq, at, operation, outcome, subject, key_id,
                                                  kek_id, event_id, field, actor, purpose,
                                                  prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &[
                    (&seq, Type::INT8),
                    (&e.at, Type::TIMESTAMPTZ),
                    (&e.operation.as_str(), Type::TEXT),
                    (&e.outcome.as_str(), Type::TEXT),
                    (&e.subject.as_ref().map(SubjectId::as_str), Type::TEXT),
                    (&e.key_id.map(|k| k.as_uuid()), Type::UUID),
                    (&e.kek_id.as_ref().map(|k| k.as_str()), Type::TEXT),
                    (&e.event_id, Type::UUID),
                    (&e.field, Type::TEXT),
                    (&e.actor, Type::TEXT),
                    (&e.purpose, Type::TEXT),
                    (&record.prev_hash.as_bytes().as_slice(), Type::BYTEA),
                    (&record.hash.as_bytes().as_slice(), Type::BYTEA),
                ],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn audit_log_refuses_changes_and_verify_catches_tampering() {
    let t = Tamper::new().await;
    // The triggers refuse every change.
    let client = t.kit.db.pool.get().await.unwrap();
    for sql in [
        "UPDATE chronicle_audit_log SET actor = 'mallory' WHERE seq = 3",
        "DELETE FROM chronicle_audit_log WHERE seq = 8",
        "TRUNCATE chronicle_audit_log",
        "UPDATE chronicle_audit_head SET seq = 2",
        "DELETE FROM chronicle_audit_head",
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err:?}"
        );
    }
    drop(client);
    assert!(t.kit.audit.verify().await.unwrap().is_intact());

    // Edited.
    assert_eq!(
        t.problems("UPDATE chronicle_audit_log SET purpose = 'nothing to see' WHERE seq = 4")
            .await,
        [ChainProblem::Edited { seq: 4 }]
    );
    assert_eq!(
        t.problems("UPDATE chronicle_audit_log SET operation = 'bogus' WHERE seq = 2")
            .await,
        [ChainProblem::Edited { seq: 2 }]
    );
    // Deleted, in the middle.
    assert_eq!(
        t.problems("DELETE FROM chronicle_audit_log WHERE seq IN (4, 5)")
            .await,
        [ChainProblem::Deleted {
            first_seq: 4,
            last_seq: 5
        }]
    );
    // Deleted from the end: only the head row tells.
    assert_eq!(
        t.problems("DELETE FROM chronicle_audit_log WHERE seq = 8")
            .await,
        [ChainProblem::Truncated {
            last_seq: 7,
            expected_seq: 8
        }]
    );

    // Inserted: a correctly hashed forgery after row 4, the rest renumbered
    // and the head moved along.
    let all = t.kit.audit.list(&AuditQuery::default()).await.unwrap();
    let mut head = ChainHead {
        seq: 4,
        hash: all[3].hash,
    };
    let forged = head.link(
        AuditEntry::new(
            AuditOperation::Decrypt,
            AuditOutcome::Success,
            &AccessContext::new("support:alice", "ticket-4711"),
        )
        .with_field(Uuid::now_v7(), "/email"),
    );
    t.kit
        .exec(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             UPDATE chronicle_audit_log SET seq = -seq WHERE seq >= 5;
             UPDATE chronicle_audit_log SET seq = 1 - seq WHERE seq < 0;
             UPDATE chronicle_audit_head SET seq = seq + 1;",
        )
        .await;
    t.insert(5, &forged).await;
    assert_eq!(
        t.problems("SELECT 1").await,
        [ChainProblem::Inserted { seq: 5 }]
    );

    // Inserted after the head, without moving the anchor (INSERT is not
    // even refused by the triggers).
    let mut head = t.kit.audit.head().await.unwrap();
    let forged = head.link(AuditEntry::new(
        AuditOperation::Rotate,
        AuditOutcome::Success,
        &AccessContext::new("mallory", "cover-up"),
    ));
    t.insert(9, &forged).await;
    assert_eq!(
        t.problems("SELECT 1").await,
        [ChainProblem::BeyondHead {
            first_seq: 9,
            last_seq: 9
        }]
    );
}

#[tokio::test]
async fn an_outside_anchor_catches_a_rewritten_or_cut_log() {
    let t = Tamper::new().await;
    let anchor = t.kit.audit.head().await.unwrap();
    assert_eq!(anchor.seq, 8);
    assert!(
        t.kit
            .audit
            .verify_against(&anchor)
            .await
            .unwrap()
            .is_intact()
    );

    // Cut the last two rows and move the head back: the table agrees with
    // itself, the outside anchor does not.
    t.kit
        .exec(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             DELETE FROM chronicle_audit_log WHERE seq > 6;
             UPDATE chronicle_audit_head SET (seq, hash) =
                 (SELECT seq, hash FROM chronicle_audit_log WHERE seq = 6);",
        )
        .await;
    assert!(t.kit.audit.verify().await.unwrap().is_intact());
    assert_eq!(
        t.kit.audit.verify_against(&anchor).await.unwrap().problems,
        [ChainProblem::Truncated {
            last_seq: 6,
            expected_seq: 8
        }]
    );
    assert_eq!(t.problems("SELECT 1").await, []);

    // Rewrite row 5 and re-chain everything after it, head included.
    let all = t.kit.audit.list(&AuditQuery::default()).await.unwrap();
    let mut head = ChainHead {
        seq: 4,
        hash: all[3].hash,
    };
    let mut forged = Vec::new();
    for (i, record) in all[4..].iter().enumerate() {
        let mut entry = record.entry.clone();
        if i == 0 {
            entry.actor = "someone-else".into();
        }
        forged.push(head.link(entry));
    }
    t.kit
        .exec(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             DELETE FROM chronicle_audit_log WHERE seq >= 5;",
        )
        .await;
    for record in &forged {
        t.insert(record.seq as i64, record).await;
    }
    let client = t.kit.db.pool.get().await.unwrap();
    client
        .execute_typed(
            "UPDATE chronicle_audit_head SET seq = $1, hash = $2",
            &[
                (&(head.seq as i64), Type::INT8),
                (&head.hash.as_bytes().as_slice(), Type::BYTEA),
            ],
        )
        .await
        .unwrap();
    assert!(t.kit.audit.verify().await.unwrap().is_intact());
    assert_eq!(
        t.kit.audit.verify_against(&anchor).await.unwrap().problems,
        [ChainProblem::HeadMismatch { seq: 8 }]
    );
}
