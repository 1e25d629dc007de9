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
use chronicle_postgres::{
    AuditQuery, PgAuditSink, PgDataKeyStore, PgEventStore, PgOptions, PgPool, PgReencryptor,
};
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

/// How long a test waits for other tests' open transactions (same
/// cluster) that hold the audit sealer's horizon back.
const SEAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

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
        let pool = db.pool.clone();
        Kit::over(db, pool)
    }

    /// A kit whose key store, audit sink and store share one connection:
    /// every audit record lands in the chain that connection's backend
    /// picks, so that tests can tamper with one chain by row numbers.
    fn single_connection(db: TestDb) -> Kit {
        let mut options = PgOptions::from_url(&db.url).unwrap();
        options.max_connections(1);
        let pool = options.pool().unwrap();
        Kit::over(db, pool)
    }

    fn over(db: TestDb, pool: PgPool) -> Kit {
        let keyring = Arc::new(LocalKeyring::generate().unwrap());
        let inner = db.store_on(pool.clone());
        let keys = Arc::new(inner.data_key_store());
        let audit = Arc::new(inner.audit_sink());
        let encryptor = encryptor(&keyring, &keys, &audit);
        let store = inner.encrypted(
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
        self.db
            .store
            .clone()
            .encrypted(encryptor, AccessContext::new("other-process", "test"))
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
        assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap().1, 0);
        let report = kit.audit.verify().await.unwrap();
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.checked, 120);
        assert_eq!(report.heads(), kit.audit.heads().await.unwrap());
        assert_eq!(kit.audit.len().await.unwrap(), 120);
        assert_eq!(report.chains.len(), 16);
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
    assert_eq!(failed[0].entry.event_id(), Some(first));
    assert_eq!(failed[0].entry.field(), Some("/email"));

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
    // One record per batch of the job (2 events, then 1), listing them.
    assert_eq!(audited.len(), 2);
    assert_eq!(
        audited
            .iter()
            .map(|r| r.entry.event_ids.len())
            .collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(
        audited
            .iter()
            .all(|r| r.entry.fields == ["/email", "/address/street"]
                && r.entry.key_id == Some(newest))
    );
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
    let before = kit.audit.heads().await.unwrap();
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
    assert_eq!(kit.audit.heads().await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_audit_appends_keep_one_record_per_read() {
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
    kit.audit.seal_all(SEAL_WAIT).await.unwrap();
    let before = kit.audit.len().await.unwrap();
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
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap().1, 0);
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(kit.audit.len().await.unwrap() - before, 16 * 5);
    let reader_3 = kit
        .audit
        .list(&AuditQuery {
            actor: Some("reader-3".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(reader_3.len(), 5);
    assert!(
        reader_3
            .iter()
            .all(|r| r.entry.fields == ["/email", "/address/street"])
    );
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
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap().1, 0);
    ops(&kit.audit.list(&AuditQuery::default()).await.unwrap())
}

#[tokio::test]
async fn audit_log_has_one_record_per_operation_and_filters() {
    let kit = Kit::new(fresh_db().await);
    let start = Utc::now() - Duration::seconds(1);
    let history = audited_history(&kit).await;
    assert_eq!(
        history,
        // The encrypt record is stored by the sealer, from the event (so
        // after the records written before the seal) ...
        [
            "create-key",
            "decrypt",
            "rotate",
            "shred",
            "shred",
            "encrypt"
        ]
    );
    let all = kit.audit.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_audit_log").await,
        6
    );
    // ... and sealed in the place of the event's transaction, which stored
    // the key's creation.
    let encrypt = &all[5];
    assert_eq!(all[0].chain, encrypt.chain);
    assert_eq!(encrypt.seq, all[0].seq + 1);
    assert_eq!(
        (encrypt.entry.actor.as_str(), encrypt.entry.purpose.as_str()),
        ("signup-service", "registration")
    );
    assert_eq!(encrypt.entry.subject, all[0].entry.subject);
    assert_eq!(encrypt.entry.key_id, all[0].entry.key_id);
    let decrypt = &all[1].entry;
    assert_eq!(
        (
            decrypt.actor.as_str(),
            decrypt.purpose.as_str(),
            decrypt.outcome
        ),
        ("support:alice", "ticket-4711", AuditOutcome::Success)
    );
    assert_eq!(decrypt.fields, ["/email", "/address/street"]);
    assert_eq!(decrypt.event_ids, encrypt.entry.event_ids);
    assert_eq!(encrypt.entry.fields, ["/email", "/address/street"]);

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
    assert_eq!(by_subject.len(), 6);
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
    assert_eq!(in_range.len(), 6);
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
            after_id: all[1].id,
            limit: 3,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page, all[2..5]);
    let by_event = kit
        .audit
        .list(&AuditQuery {
            event_id: encrypt.entry.event_id(),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(ops(&by_event), ["decrypt", "encrypt"]);

    // Round trip: what was stored hashes as it was chained.
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.checked, 6);
    let heads = kit.audit.heads().await.unwrap();
    assert_eq!(report.heads(), heads);
    let last = all.iter().max_by_key(|r| r.seq).unwrap();
    assert_eq!(
        heads[&last.chain],
        ChainHead {
            seq: last.seq,
            hash: last.hash
        }
    );
}

/// An encrypted append stores no audit row: the sealer derives its
/// `encrypt` record from the event, one per append and key, even behind a
/// backlog of more events than it reads in one round.
#[tokio::test]
async fn encrypt_records_are_derived_from_the_events_behind_a_backlog() {
    let kit = Kit::new(fresh_db().await);
    // More plain events than one sealing round reads (20,000).
    kit.exec(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, version)
         SELECT gen_random_uuid(), gen_random_uuid(), 'other', 'Plain', '{}', 1
           FROM generate_series(1, 25000)",
    )
    .await;
    // And, before the encrypted events, more stored records than one
    // round seals (5,000): the derived records after the cut wait for the
    // next round.
    let ctx = AccessContext::new("ops", "backlog");
    chronicle_crypto::AuditSink::append(
        &*kit.audit,
        (0..5001)
            .map(|_| AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, &ctx))
            .collect(),
    )
    .await
    .unwrap();
    let user = Uuid::now_v7();
    let first = kit.register(user, "ada@example.com", "1 Main St").await;
    let two: Vec<NewEvent> = ["/email", "/address/street"]
        .iter()
        .map(|_| {
            NewEvent::new(
                "UserRegistered",
                json!({ "email": "ada@example.org", "address": { "street": "2 Side St" } }),
            )
        })
        .collect();
    let ids: Vec<Uuid> = two.iter().map(|e| e.event_id).collect();
    kit.store
        .append(user, "user", ExpectedVersion::Exact(1), two)
        .await
        .unwrap();
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_audit_log WHERE operation = 'encrypt'")
            .await,
        0,
        "the appends stored no encrypt row"
    );
    // The writer's context travels in the events' metadata.
    let raw = kit.store.inner().read_stream(user, 1, None).await.unwrap();
    assert!(raw.iter().all(|e| e.metadata.extra["$encrypted_by"]
        == json!({ "actor": "signup-service", "purpose": "registration" })));

    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap().1, 0);
    let encrypts = kit
        .audit
        .list(&AuditQuery {
            operation: Some(AuditOperation::Encrypt),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(encrypts.len(), 2, "{encrypts:#?}");
    assert_eq!(encrypts[0].entry.event_ids, [first]);
    assert_eq!(encrypts[1].entry.event_ids, ids);
    let subject = SubjectId::from_aggregate(user);
    for record in &encrypts {
        assert_eq!(record.entry.subject.as_ref(), Some(&subject));
        assert_eq!(record.entry.fields, ["/email", "/address/street"]);
        assert_eq!(record.entry.actor, "signup-service");
        assert!(record.sealed);
    }
    assert_eq!(encrypts[0].entry.key_id, encrypts[1].entry.key_id);
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    // A second pass finds nothing new to record.
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap(), (0, 0));

    // Behind an open transaction, an encrypted event counts as pending
    // (with its key's create-key record) until its record is derived.
    let holder = kit.db.pool.get().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    kit.register(Uuid::now_v7(), "bob@example.com", "3 Hill St")
        .await;
    assert_eq!(kit.audit.seal().await.unwrap(), 0);
    assert_eq!(kit.audit.verify().await.unwrap().unsealed, 2);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap(), (2, 0));
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_audit_log WHERE operation = 'encrypt'")
            .await,
        3
    );
    // Pointers with escapes reach the right envelope.
    assert_eq!(
        kit.count(
            "SELECT count(*) FROM (SELECT chronicle_pointer_path('/a~1b/c~0d/0') AS p) t
              WHERE p = ARRAY['a/b', 'c~d', '0']"
        )
        .await,
        1
    );
}

/// A binary ahead of its schema (migration 12 not applied) is told what
/// to do, and stores nothing.
#[tokio::test]
async fn a_schema_older_than_the_binary_names_chronicle_migrate() {
    let kit = Kit::new(fresh_db().await);
    kit.exec("ALTER TABLE chronicle_audit_head DROP COLUMN derived_tid")
        .await;
    let err = kit.audit.seal().await.unwrap_err().to_string();
    assert!(
        err.contains("derived_tid") && err.contains("run `chronicle migrate`"),
        "{err}"
    );
}

/// One audited history, tampered with case after case (as a superuser
/// could, with the append-only triggers disabled) and restored in between.
/// Its six records are in one chain (one connection), `chain`.
struct Tamper {
    kit: Kit,
    chain: u16,
}

impl Tamper {
    async fn new() -> Tamper {
        let kit = Kit::single_connection(fresh_db().await);
        audited_history(&kit).await;
        let all = kit.audit.list(&AuditQuery::default()).await.unwrap();
        assert_eq!(all.len(), 6);
        let chain = all[0].chain;
        assert!(all.iter().all(|r| r.chain == chain));
        // Listed by id; the encrypt record, stored last by the sealer, is
        // sealed second, in its event's place.
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 3, 4, 5, 6, 2]
        );
        kit.exec(
            "CREATE TABLE audit_backup AS SELECT * FROM chronicle_audit_log;
             CREATE TABLE audit_head_backup AS SELECT * FROM chronicle_audit_head;",
        )
        .await;
        Tamper { kit, chain }
    }

    /// `sql` with `{c}` replaced by the chain.
    fn sql(&self, sql: &str) -> String {
        sql.replace("{c}", &self.chain.to_string())
    }

    /// Runs `sql` with the triggers disabled, verifies, restores. Every
    /// problem must be in the history's chain.
    async fn problems(&self, sql: &str) -> Vec<ChainProblem> {
        self.kit
            .exec(&format!(
                "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
                 ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
                 {};",
                self.sql(sql)
            ))
            .await;
        let report = self.kit.audit.verify().await.unwrap();
        assert!(
            report.problems.iter().all(|p| p.chain == self.chain),
            "{:?}",
            report.problems
        );
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
        report.chain_problems()
    }

    /// The chain's head.
    async fn head(&self) -> ChainHead {
        self.kit.audit.heads().await.unwrap()[&self.chain]
    }

    /// Inserts a record as row `seq` of the chain.
    async fn insert(&self, seq: i64, record: &chronicle_crypto::AuditRecord) {
        let client = self.kit.db.pool.get().await.unwrap();
        let e = &record.entry;
        let chain = self.chain as i16;
        let events = (!e.event_ids.is_empty()).then_some(&e.event_ids);
        let fields = (!e.fields.is_empty()).then_some(&e.fields);
        client
            .execute_typed(
                "INSERT INTO chronicle_audit_log (chain, seq, at, operation, outcome, subject,
                                                  key_id, kek_id, event_ids, fields, actor,
                                                  purpose, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                &[
                    (&chain, Type::INT2),
                    (&seq, Type::INT8),
                    (&e.at, Type::TIMESTAMPTZ),
                    (&e.operation.as_str(), Type::TEXT),
                    (&e.outcome.as_str(), Type::TEXT),
                    (&e.subject.as_ref().map(SubjectId::as_str), Type::TEXT),
                    (&e.key_id.map(|k| k.as_uuid()), Type::UUID),
                    (&e.kek_id.as_ref().map(|k| k.as_str()), Type::TEXT),
                    (&events, Type::UUID_ARRAY),
                    (&fields, Type::TEXT_ARRAY),
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
        "DELETE FROM chronicle_audit_log WHERE seq = 6",
        "TRUNCATE chronicle_audit_log",
        &t.sql("UPDATE chronicle_audit_head SET seq = 2 WHERE chain = {c}"),
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
        t.problems(
            "UPDATE chronicle_audit_log SET purpose = 'nothing to see' WHERE chain = {c} AND seq = 4"
        )
        .await,
        [ChainProblem::Edited { seq: 4 }]
    );
    assert_eq!(
        t.problems(
            "UPDATE chronicle_audit_log SET operation = 'bogus' WHERE chain = {c} AND seq = 2"
        )
        .await,
        [ChainProblem::Edited { seq: 2 }]
    );
    // An event dropped from a record's list.
    assert_eq!(
        t.problems(
            "UPDATE chronicle_audit_log SET fields = fields[1:1] WHERE chain = {c} AND seq = 3"
        )
        .await,
        [ChainProblem::Edited { seq: 3 }]
    );
    // Deleted, in the middle.
    assert_eq!(
        t.problems("DELETE FROM chronicle_audit_log WHERE chain = {c} AND seq IN (3, 4)")
            .await,
        [ChainProblem::Deleted {
            first_seq: 3,
            last_seq: 4
        }]
    );
    // Deleted from the end: only the head row tells.
    assert_eq!(
        t.problems("DELETE FROM chronicle_audit_log WHERE chain = {c} AND seq = 6")
            .await,
        [ChainProblem::Truncated {
            last_seq: 5,
            expected_seq: 6
        }]
    );
    // A whole chain's head row deleted: its rows are no longer anchored.
    assert_eq!(
        t.problems("DELETE FROM chronicle_audit_head WHERE chain = {c}; INSERT INTO chronicle_audit_head VALUES (0, decode(repeat('00', 32), 'hex'), {c})")
            .await,
        [ChainProblem::BeyondHead {
            first_seq: 1,
            last_seq: 6
        }]
    );

    // Inserted: a correctly hashed forgery after row 4, the rest renumbered
    // and the head moved along.
    let mut all = t.kit.audit.list(&AuditQuery::default()).await.unwrap();
    all.sort_by_key(|r| r.seq);
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
        .exec(&t.sql(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             UPDATE chronicle_audit_log SET seq = -seq WHERE chain = {c} AND seq >= 5;
             UPDATE chronicle_audit_log SET seq = 1 - seq WHERE chain = {c} AND seq < 0;
             UPDATE chronicle_audit_head SET seq = seq + 1 WHERE chain = {c};",
        ))
        .await;
    t.insert(5, &forged).await;
    assert_eq!(
        t.problems("SELECT 1").await,
        [ChainProblem::Inserted { seq: 5 }]
    );

    // Inserted after the head, without moving the anchor (INSERT is not
    // even refused by the triggers).
    let mut head = t.head().await;
    let forged = head.link(AuditEntry::new(
        AuditOperation::Rotate,
        AuditOutcome::Success,
        &AccessContext::new("mallory", "cover-up"),
    ));
    t.insert(7, &forged).await;
    assert_eq!(
        t.problems("SELECT 1").await,
        [ChainProblem::BeyondHead {
            first_seq: 7,
            last_seq: 7
        }]
    );
}

#[tokio::test]
async fn an_outside_anchor_catches_a_rewritten_or_cut_log() {
    let t = Tamper::new().await;
    let anchor = t.kit.audit.heads().await.unwrap();
    assert_eq!(anchor[&t.chain].seq, 6);
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
        .exec(&t.sql(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             DELETE FROM chronicle_audit_log WHERE chain = {c} AND seq > 4;
             UPDATE chronicle_audit_head SET (seq, hash) =
                 (SELECT seq, hash FROM chronicle_audit_log WHERE chain = {c} AND seq = 4)
              WHERE chain = {c};",
        ))
        .await;
    assert!(t.kit.audit.verify().await.unwrap().is_intact());
    let problems = t.kit.audit.verify_against(&anchor).await.unwrap().problems;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].chain, t.chain);
    assert_eq!(
        problems[0].problem,
        ChainProblem::Truncated {
            last_seq: 4,
            expected_seq: 6
        }
    );
    assert_eq!(t.problems("SELECT 1").await, []);

    // Rewrite row 3 and re-chain everything after it, head included.
    let mut all = t.kit.audit.list(&AuditQuery::default()).await.unwrap();
    all.sort_by_key(|r| r.seq);
    let mut head = ChainHead {
        seq: 2,
        hash: all[1].hash,
    };
    let mut forged = Vec::new();
    for (i, record) in all[2..].iter().enumerate() {
        let mut entry = record.entry.clone();
        if i == 0 {
            entry.actor = "someone-else".into();
        }
        forged.push(head.link(entry));
    }
    t.kit
        .exec(&t.sql(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             ALTER TABLE chronicle_audit_head DISABLE TRIGGER USER;
             DELETE FROM chronicle_audit_log WHERE chain = {c} AND seq >= 3;",
        ))
        .await;
    for record in &forged {
        t.insert(record.seq as i64, record).await;
    }
    let client = t.kit.db.pool.get().await.unwrap();
    client
        .execute_typed(
            "UPDATE chronicle_audit_head SET seq = $1, hash = $2 WHERE chain = $3",
            &[
                (&(head.seq as i64), Type::INT8),
                (&head.hash.as_bytes().as_slice(), Type::BYTEA),
                (&(t.chain as i16), Type::INT2),
            ],
        )
        .await
        .unwrap();
    assert!(t.kit.audit.verify().await.unwrap().is_intact());
    let problems = t.kit.audit.verify_against(&anchor).await.unwrap().problems;
    assert_eq!(
        problems
            .iter()
            .map(|p| (p.chain, p.problem.clone()))
            .collect::<Vec<_>>(),
        [(t.chain, ChainProblem::HeadMismatch { seq: 6 })]
    );
}

#[tokio::test]
async fn audit_rows_written_before_the_chains_still_verify() {
    use chronicle_postgres::migrate::MIGRATIONS;
    // The schema before the audit chains (migration 9), with audit rows in
    // the first format (one chain, one event and field per row), then
    // migration 9.
    let db = crate::support::empty_db().await;
    let client = db.pool.get().await.unwrap();
    let render = |sql: &str| {
        sql.replace("{{PRIMARY_KEY}}", "PRIMARY KEY (event_id)")
            .replace("{{PARTITION_CLAUSE}}", "")
            .replace("{{PARTITIONS}}", "")
    };
    let chains = MIGRATIONS
        .iter()
        .find(|m| m.name == "audit_chains")
        .unwrap();
    for m in MIGRATIONS.iter().filter(|m| m.version < chains.version) {
        client.batch_execute(&render(m.sql)).await.unwrap();
    }
    let ctx = AccessContext::new("support:alice", "ticket-1");
    let mut head = ChainHead::GENESIS;
    let event = Uuid::now_v7();
    let old: Vec<_> = [
        AuditEntry::new(AuditOperation::Encrypt, AuditOutcome::Success, &ctx)
            .with_subject(&SubjectId::new("user-1"))
            .with_key(DataKeyId::new())
            .with_field(event, "/email"),
        AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, &ctx)
            .with_subject(&SubjectId::new("user-1"))
            .with_key(DataKeyId::new())
            .with_kek(&"kek-1".into()),
    ]
    .into_iter()
    .map(|e| head.link(e))
    .collect();
    for r in &old {
        let e = &r.entry;
        client
            .execute_typed(
                "INSERT INTO chronicle_audit_log (seq, at, operation, outcome, subject, key_id,
                                                  kek_id, event_id, field, actor, purpose,
                                                  prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &[
                    (&(r.seq as i64), Type::INT8),
                    (&e.at, Type::TIMESTAMPTZ),
                    (&e.operation.as_str(), Type::TEXT),
                    (&e.outcome.as_str(), Type::TEXT),
                    (&e.subject.as_ref().map(SubjectId::as_str), Type::TEXT),
                    (&e.key_id.map(|k| k.as_uuid()), Type::UUID),
                    (&e.kek_id.as_ref().map(|k| k.as_str()), Type::TEXT),
                    (&e.event_id(), Type::UUID),
                    (&e.field(), Type::TEXT),
                    (&e.actor, Type::TEXT),
                    (&e.purpose, Type::TEXT),
                    (&r.prev_hash.as_bytes().as_slice(), Type::BYTEA),
                    (&r.hash.as_bytes().as_slice(), Type::BYTEA),
                ],
            )
            .await
            .unwrap();
    }
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
    // Then everything after it (migration 11 links new records after
    // commit, into chain 0).
    for m in MIGRATIONS.iter().filter(|m| m.version >= chains.version) {
        client.batch_execute(&render(m.sql)).await.unwrap();
    }

    let audit = PgAuditSink::new(db.pool.clone());
    let listed = audit.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(listed, old, "the same records, chain 0, ids = seqs");
    assert_eq!(listed[0].entry.event_ids, [event]);
    // New records chain on, in whichever chain; everything verifies.
    chronicle_crypto::AuditSink::append(
        &audit,
        vec![
            AuditEntry::new(AuditOperation::Shred, AuditOutcome::Success, &ctx)
                .with_subject(&SubjectId::new("user-1")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(audit.seal_all(SEAL_WAIT).await.unwrap().1, 0);
    let report = audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.checked, 3);
    let listed = audit.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(listed[2].id, 3);
}

/// Two processes over one database: `reader` caches the subject's key with a
/// long TTL and listens; `other` shreds and rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shred_elsewhere_reaches_a_listening_cache_at_once() {
    use chronicle_postgres::{KeyListenerState, PgKeyListener};
    let kit = Kit::new(fresh_db().await);
    let options = PgOptions::from_url(&kit.db.url).unwrap();
    let cached = |keyring: Arc<LocalKeyring>| {
        Arc::new(
            FieldEncryptorBuilder::new(
                EncryptionConfig::from_yaml(CONFIG).unwrap(),
                keyring,
                Arc::new(
                    PgDataKeyStore::new(options.pool().unwrap())
                        .statement_cache(options.statement_cache()),
                ),
                kit.audit.clone(),
            )
            .cache_ttl(std::time::Duration::from_secs(3600))
            .build(),
        )
    };
    let listening = cached(kit.keyring.clone());
    let deaf = cached(kit.keyring.clone());
    let listener = PgKeyListener::start(&options, listening.clone()).await;
    assert_eq!(listener.state(), KeyListenerState::Listening);
    let (reader, control) = (kit.store_with(listening), kit.store_with(deaf));

    let (user, other_user) = (Uuid::now_v7(), Uuid::now_v7());
    kit.register(user, "ada@example.com", "1 Main St").await;
    kit.register(other_user, "bob@example.com", "2 Side St")
        .await;
    for store in [&reader, &control] {
        let read = store.read_stream(user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], "ada@example.com");
        store.read_stream(other_user, 1, None).await.unwrap();
    }

    // Another process rotates one subject's key: the listening cache
    // forgets that subject's current key, so its next append uses the
    // new one.
    let rotated = kit
        .store
        .encryptor()
        .rotate_data_key(
            &AccessContext::new("ops", "rotation"),
            &SubjectId::from_aggregate(other_user),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let event = NewEvent::new(
            "UserRegistered",
            json!({ "email": "bob@new.example", "address": { "street": "3 New St" } }),
        );
        reader
            .append(other_user, "user", ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        let raw = kit.db.store.read_stream(other_user, 1, None).await.unwrap();
        if raw.last().unwrap().event_data["email"]["kid"] == rotated.to_string() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation was not heard"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Another process shreds the first subject.
    kit.store
        .encryptor()
        .shred(
            &AccessContext::new("dpo", "erasure"),
            &SubjectId::from_aggregate(user),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let read = reader.read_stream(user, 1, None).await.unwrap();
        if read[0].event_data["email"] == Redaction::Shredded.marker() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the shred was not heard: {}",
            read[0].event_data
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The other subject's keys stay cached and readable.
    let read = reader.read_stream(other_user, 1, None).await.unwrap();
    assert_eq!(read[0].event_data["email"], "bob@example.com");
    // Without the listener, the cache still holds the destroyed key until
    // its TTL: what the listener is for.
    let read = control.read_stream(user, 1, None).await.unwrap();
    assert_eq!(read[0].event_data["email"], "ada@example.com");
    drop(listener);
}

/// Through a transaction-mode pooler, LISTEN does not work: the listener
/// says so and stops, and reads go on (the cache TTL applies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_listener_degrades_behind_a_transaction_pooler() {
    use chronicle_postgres::{KeyListenerState, PgKeyListener};
    let kit = Kit::new(crate::support::fresh_db_via_pgbouncer().await);
    let options = PgOptions::from_url(&kit.db.url).unwrap();
    let listener = PgKeyListener::start(&options, kit.store.encryptor().clone()).await;
    match listener.state() {
        KeyListenerState::Unavailable { reason } => {
            assert!(reason.contains("pooler"), "{reason}")
        }
        other => panic!("expected the listener to give up, got {other:?}"),
    }
    assert!(!listener.is_listening());
    let user = Uuid::now_v7();
    kit.register(user, "ada@example.com", "1 Main St").await;
    let read = kit.store.read_stream(user, 1, None).await.unwrap();
    assert_eq!(read[0].event_data["email"], "ada@example.com");
}

/// A subject's first key is stored by the append that first uses it, in the
/// same statement: racing first writers each keep their key (one becomes
/// current), and a subject shredded in between fails the append whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_keys_travel_with_their_events() {
    use chronicle_crypto::AuditedAppender;
    let kit = Kit::new(fresh_db().await);
    let customer = Uuid::now_v7().to_string();
    // Two writers (two processes: empty caches) place orders for one new
    // customer at once; each makes a first key for the customer.
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let store = kit.store_with(kit.fresh_encryptor(kit.keyring.clone()));
            let customer = customer.clone();
            tokio::spawn(async move {
                store
                    .append(
                        Uuid::now_v7(),
                        "order",
                        ExpectedVersion::NoStream,
                        vec![NewEvent::new(
                            "OrderPlaced",
                            json!({ "customer_id": customer, "card": format!("4111-{i}") }),
                        )],
                    )
                    .await
                    .unwrap();
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let subject = SubjectId::new(customer.clone());
    let keys = kit.keys.keys(Some(&subject), None, 10).await.unwrap();
    assert!((1..=2).contains(&keys.len()), "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.current).count(), 1);
    let orders = kit
        .store
        .read_by_type("OrderPlaced", TimeRange::default(), 10)
        .await
        .unwrap();
    let mut cards: Vec<&str> = orders
        .iter()
        .map(|e| e.event_data["card"].as_str().unwrap())
        .collect();
    cards.sort();
    assert_eq!(cards, ["4111-0", "4111-1"]);
    let created = kit
        .audit
        .list(&AuditQuery {
            operation: Some(AuditOperation::CreateKey),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(created.len(), keys.len(), "one record per stored key");

    // A key and record for a subject shredded meanwhile: nothing is stored.
    kit.store
        .encryptor()
        .shred(&AccessContext::new("dpo", "erasure"), &subject)
        .await
        .unwrap();
    let before = kit.count("SELECT count(*) FROM events").await;
    kit.audit.seal_all(SEAL_WAIT).await.unwrap();
    let records = kit.audit.len().await.unwrap();
    let late = StoredDataKey {
        id: DataKeyId::new(),
        subject: subject.clone(),
        wrapped: WrappedKey {
            kek_id: "k1".into(),
            ciphertext: vec![1; 60],
        },
        created_at: Utc::now(),
    };
    let err = kit
        .db
        .store
        .append_audited(
            Uuid::now_v7(),
            "order",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "OrderPlaced",
                json!({ "customer_id": customer }),
            )],
            vec![late],
            vec![
                AuditEntry::new(
                    AuditOperation::Encrypt,
                    AuditOutcome::Success,
                    &AccessContext::new("late-writer", "test"),
                )
                .with_subject(&subject),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            CryptoError::in_store_error(&err),
            Some(CryptoError::SubjectShredded { subject: s }) if *s == subject
        ),
        "{err}"
    );
    assert_eq!(kit.count("SELECT count(*) FROM events").await, before);
    kit.audit.seal_all(SEAL_WAIT).await.unwrap();
    assert_eq!(kit.audit.len().await.unwrap(), records);

    // A conflicting append stores neither its key nor its records.
    let user = Uuid::now_v7();
    kit.register(user, "ada@example.com", "1 Main St").await;
    let other = kit.store_with(kit.fresh_encryptor(kit.keyring.clone()));
    let newcomer = Uuid::now_v7();
    let keys_before = kit.count("SELECT count(*) FROM chronicle_data_keys").await;
    kit.audit.seal_all(SEAL_WAIT).await.unwrap();
    let records = kit.audit.len().await.unwrap();
    let err = other
        .append(
            newcomer,
            "user",
            ExpectedVersion::Exact(3),
            vec![NewEvent::new(
                "UserRegistered",
                json!({ "email": "new@example.com" }),
            )],
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        kit.count("SELECT count(*) FROM chronicle_data_keys").await,
        keys_before
    );
    kit.audit.seal_all(SEAL_WAIT).await.unwrap();
    assert_eq!(kit.audit.len().await.unwrap(), records);
    assert!(kit.audit.verify().await.unwrap().is_intact());
}

/// Records are stored unlinked and sealed after commit: a record of a
/// transaction newer than an open one waits for it; sealing is the one
/// update the log takes, once, changing nothing else; a row planted
/// unlinked below the sealer's horizon is reported, not sealed.
#[tokio::test]
async fn records_are_sealed_after_commit_and_planted_rows_are_caught() {
    let kit = Kit::new(fresh_db().await);
    let ctx = AccessContext::new("ops", "test");
    let entry = || {
        AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, &ctx)
            .with_subject(&SubjectId::new("user-1"))
    };
    // An open writing transaction holds the horizon back.
    let holder = kit.db.pool.get().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    chronicle_crypto::AuditSink::append(&*kit.audit, vec![entry()])
        .await
        .unwrap();
    assert_eq!(kit.audit.seal().await.unwrap(), 0);
    let report = kit.audit.verify().await.unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!((report.checked, report.unsealed), (0, 1));
    let listed = kit.audit.list(&AuditQuery::default()).await.unwrap();
    assert!(!listed[0].sealed);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap(), (1, 0));
    let listed = kit.audit.list(&AuditQuery::default()).await.unwrap();
    assert!(listed[0].sealed);
    assert_eq!((listed[0].chain, listed[0].seq), (0, 1));

    // Sealing is the one update allowed: once, and with nothing else.
    let client = kit.db.pool.get().await.unwrap();
    for sql in [
        "UPDATE chronicle_audit_log SET hash = hash",
        "UPDATE chronicle_audit_log SET actor = 'mallory'",
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }
    chronicle_crypto::AuditSink::append(&*kit.audit, vec![entry()])
        .await
        .unwrap();
    let err = client
        .batch_execute(
            "UPDATE chronicle_audit_log
                SET chain = 0, seq = 2, prev_hash = decode(repeat('00', 32), 'hex'),
                    hash = decode(repeat('00', 32), 'hex'), actor = 'mallory'
              WHERE hash IS NULL",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    assert_eq!(kit.audit.seal_all(SEAL_WAIT).await.unwrap(), (1, 0));

    // A row planted unlinked, dated to a transaction long ended.
    let planted: i64 = client
        .query_one(
            "INSERT INTO chronicle_audit_log (transaction_id, at, operation, outcome, actor, purpose)
             VALUES ('3', now(), 'shred', 'success', 'mallory', 'cover-up') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kit.audit.seal().await.unwrap(),
        0,
        "planted rows are not sealed"
    );
    let report = kit.audit.verify().await.unwrap();
    assert_eq!(report.checked, 2);
    assert_eq!(
        report.chain_problems(),
        [ChainProblem::Backdated { id: planted as u64 }]
    );
    assert!(
        report.problems[0]
            .to_string()
            .contains("outside the audit sink")
    );
}

/// A read is acknowledged only once its audit record is flushed: in a
/// session with `synchronous_commit = off` the sink's statements raise it
/// for their own transaction, in both shapes (one record, several), and
/// the session keeps its setting. A trigger notes the setting each insert
/// of the log runs under; an insert outside the sink is the control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_commit_durably_in_a_session_that_does_not() {
    let db = fresh_db().await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE seen (n BIGSERIAL, setting TEXT NOT NULL);
             CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO seen (setting) VALUES (current_setting('synchronous_commit'));
                 RETURN NEW;
             END $$;
             CREATE TRIGGER note_setting AFTER INSERT ON chronicle_audit_log
                 FOR EACH ROW EXECUTE FUNCTION note_setting();",
        )
        .await
        .unwrap();
    let mut options = PgOptions::from_url(&db.url).unwrap();
    options.config_mut().options("-c synchronous_commit=off");
    options.max_connections(1);
    let pool = options.pool().unwrap();
    let ctx = AccessContext::new("reader", "test");
    let entry = |subject: &str| {
        AuditEntry::new(AuditOperation::Decrypt, AuditOutcome::Success, &ctx)
            .with_subject(&SubjectId::new(subject))
    };
    for cache in [true, false] {
        let audit = PgAuditSink::new(pool.clone()).statement_cache(cache);
        chronicle_crypto::AuditSink::append(&audit, vec![entry("a")])
            .await
            .unwrap();
        chronicle_crypto::AuditSink::append(&audit, vec![entry("b"), entry("c")])
            .await
            .unwrap();
    }
    let conn = pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO chronicle_audit_log (at, operation, outcome, actor, purpose)
         VALUES (now(), 'decrypt', 'success', 'control', 'test')",
        &[],
    )
    .await
    .unwrap();
    let seen: Vec<String> = conn
        .query("SELECT setting FROM seen ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seen, ["on", "on", "on", "on", "on", "on", "off"]);
    let session: String = conn
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(session, "off", "the session's own setting is untouched");
}
