//! Behaviour of [`FieldEncryptor`] end to end, with the in-memory store,
//! keyring and audit sink.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chronicle_core::{EventEnvelope, NewEvent, Position};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::audit::{AuditRecord, ChainProblem, MemoryAuditSink, verify_chain};
use crate::envelope::redact_event;
use crate::keyring::LocalKeyring;
use crate::keys::{DataKey, KekId, WrappedKey};
use crate::store::MemoryDataKeyStore;

const CONFIG: &str = r#"
encryption:
  events:
    UserRegistered:
      fields: ["/email", "/address/street", "/profile"]
    OrderPlaced:
      fields: ["/shipping_address"]
      subject: /customer_id
"#;

/// Counts unwrap calls, to show that the cache spares the KMS.
struct Counting {
    inner: Arc<LocalKeyring>,
    unwraps: AtomicUsize,
}

#[async_trait]
impl KeyProvider for Counting {
    fn current_key_id(&self) -> KekId {
        self.inner.current_key_id()
    }

    async fn wrap(&self, key: &DataKey, context: &WrapContext<'_>) -> Result<WrappedKey> {
        self.inner.wrap(key, context).await
    }

    async fn unwrap(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(wrapped, context).await
    }
}

struct Fixture {
    keyring: Arc<LocalKeyring>,
    store: Arc<MemoryDataKeyStore>,
    audit: Arc<MemoryAuditSink>,
    crypto: FieldEncryptor,
}

impl Fixture {
    fn new() -> Self {
        let keyring = Arc::new(LocalKeyring::generate().unwrap());
        let store = Arc::new(MemoryDataKeyStore::new());
        let audit = Arc::new(MemoryAuditSink::new());
        let crypto = FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(CONFIG).unwrap(),
            keyring.clone(),
            store.clone(),
            audit.clone(),
        )
        .build();
        Fixture {
            keyring,
            store,
            audit,
            crypto,
        }
    }

    /// Another process: same keyring, store and audit sink, its own cache.
    fn other_process(&self, provider: Arc<dyn KeyProvider>) -> FieldEncryptor {
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(CONFIG).unwrap(),
            provider,
            self.store.clone(),
            self.audit.clone(),
        )
        .build()
    }

    fn ops(&self) -> Vec<(AuditOperation, AuditOutcome)> {
        self.audit
            .records()
            .iter()
            .map(|r| (r.entry.operation, r.entry.outcome))
            .collect()
    }
}

fn writer() -> AccessContext {
    AccessContext::new("signup-service", "registration")
}

fn reader() -> AccessContext {
    AccessContext::new("support:alice", "ticket-4711")
}

fn user_registered() -> NewEvent {
    NewEvent::new(
        "UserRegistered",
        json!({
            "email": "ada@example.com",
            "address": { "street": "12 Lovelace Lane", "city": "London" },
            "profile": { "birth_year": 1815, "tags": ["analyst", "poet"] },
            "plan": "pro"
        }),
    )
}

fn stored(aggregate_id: Uuid, event: &NewEvent) -> EventEnvelope {
    EventEnvelope {
        event_id: event.event_id,
        aggregate_id,
        aggregate_type: "User".into(),
        event_type: event.event_type.clone(),
        event_data: event.data.clone(),
        metadata: event.metadata.clone(),
        version: 1,
        timestamp: chrono::Utc::now(),
        encrypted_fields: event.encrypted_fields.clone(),
        position: Position::new(1, 1),
    }
}

async fn encrypted(f: &Fixture, aggregate_id: Uuid, event: NewEvent) -> EventEnvelope {
    let mut event = event;
    f.crypto
        .encrypt(&writer(), aggregate_id, &mut event)
        .await
        .unwrap();
    stored(aggregate_id, &event)
}

fn flip_ct_byte(envelope: &mut Value) {
    let mut ct = STANDARD.decode(envelope["ct"].as_str().unwrap()).unwrap();
    ct[0] ^= 0x01;
    envelope["ct"] = json!(STANDARD.encode(ct));
}

#[tokio::test]
async fn round_trip_restores_every_configured_field() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let original = user_registered();
    let mut event = original.clone();
    let n = f.crypto.encrypt(&writer(), user, &mut event).await.unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        event.encrypted_fields,
        ["/email", "/address/street", "/profile"]
    );
    for pointer in ["/email", "/address/street", "/profile"] {
        let env = event.data.pointer(pointer).unwrap();
        assert_eq!(env["$enc"], "v1", "{pointer}");
        assert_eq!(env.as_object().unwrap().len(), 4);
    }
    assert_eq!(event.data["address"]["city"], "London");
    assert_eq!(event.data["plan"], "pro");

    let mut read = stored(user, &event);
    let summary = f.crypto.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(
        summary,
        DecryptSummary {
            decrypted: 3,
            redacted: 0
        }
    );
    assert_eq!(read.event_data, original.data);
    assert!(read.encrypted_fields.is_empty());
}

#[tokio::test]
async fn absent_fields_are_skipped_and_retries_do_not_double_encrypt() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let mut event = NewEvent::new("UserRegistered", json!({ "email": "x@example.com" }));
    assert_eq!(
        f.crypto.encrypt(&writer(), user, &mut event).await.unwrap(),
        1
    );
    assert_eq!(event.encrypted_fields, ["/email"]);
    let once = event.clone();
    assert_eq!(
        f.crypto.encrypt(&writer(), user, &mut event).await.unwrap(),
        0
    );
    assert_eq!(event, once);

    // Unconfigured types pass untouched, and cost no audit records.
    let before = f.audit.len();
    let mut other = NewEvent::new("UserRenamed", json!({ "email": "y@example.com" }));
    assert_eq!(
        f.crypto.encrypt(&writer(), user, &mut other).await.unwrap(),
        0
    );
    assert_eq!(other.data["email"], "y@example.com");
    assert_eq!(f.audit.len(), before);
}

#[tokio::test]
async fn plaintext_of_configured_fields_appears_nowhere() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;
    let secrets = [
        "ada@example.com",
        "12 Lovelace Lane",
        "1815",
        "analyst",
        "poet",
    ];
    let row = serde_json::to_string(&event).unwrap();
    let audit = serde_json::to_string(&f.audit.records()).unwrap();
    let keys = format!("{:?}", f.store.all());
    for secret in secrets {
        assert!(!row.contains(secret), "{secret} in the stored event: {row}");
        assert!(!audit.contains(secret), "{secret} in the audit trail");
        assert!(!keys.contains(secret), "{secret} in the key store");
        let b64 = STANDARD.encode(secret);
        assert!(
            !row.contains(&b64[..b64.len().min(12)]),
            "{secret} base64 in the row"
        );
    }
    assert!(row.contains("London"), "unconfigured fields stay readable");
}

#[tokio::test]
async fn a_flipped_byte_fails_clearly_and_changes_nothing() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let mut event = encrypted(&f, user, user_registered()).await;
    flip_ct_byte(&mut event.event_data["email"]);
    let before = event.clone();
    let err = f.crypto.decrypt(&reader(), &mut event).await.unwrap_err();
    assert!(
        matches!(&err, Error::Tampered { event_id, field, .. } if *event_id == event.event_id && field == "/email"),
        "{err:?}"
    );
    assert!(err.is_integrity_failure());
    let msg = err.to_string();
    assert!(
        msg.contains(&event.event_id.to_string()) && msg.contains("/email"),
        "{msg}"
    );
    assert_eq!(
        event, before,
        "nothing released, not even the untampered fields"
    );
    let last = f.audit.records().pop().unwrap();
    assert_eq!(
        (last.entry.operation, last.entry.outcome),
        (AuditOperation::Decrypt, AuditOutcome::Failed)
    );
    assert_eq!(last.entry.field(), Some("/email"));
    assert_eq!(last.entry.event_id(), Some(event.event_id));

    // A truncated ciphertext or a bad iv is malformed or tampered, never a panic.
    let mut event = encrypted(&f, user, user_registered()).await;
    event.event_data["email"]["iv"] = json!(STANDARD.encode([0u8; 12]));
    assert!(matches!(
        f.crypto.decrypt(&reader(), &mut event).await,
        Err(Error::Tampered { .. })
    ));
    let mut event = encrypted(&f, user, user_registered()).await;
    event.event_data["email"]["ct"] = json!("AAAA");
    assert!(matches!(
        f.crypto.decrypt(&reader(), &mut event).await,
        Err(Error::MalformedEnvelope { .. })
    ));
}

#[tokio::test]
async fn an_envelope_moved_to_another_event_or_field_fails() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let a = encrypted(&f, user, user_registered()).await;
    let mut b = encrypted(&f, user, user_registered()).await;
    // Same subject, same key: only the associated data tells them apart.
    assert_eq!(a.event_data["email"]["kid"], b.event_data["email"]["kid"]);

    b.event_data["email"] = a.event_data["email"].clone();
    let err = f.crypto.decrypt(&reader(), &mut b).await.unwrap_err();
    assert!(
        matches!(&err, Error::Tampered { event_id, field, .. } if *event_id == b.event_id && field == "/email"),
        "{err:?}"
    );

    let mut c = a.clone();
    c.event_data["address"]["street"] = a.event_data["email"].clone();
    let err = f.crypto.decrypt(&reader(), &mut c).await.unwrap_err();
    assert!(
        matches!(&err, Error::Tampered { field, .. } if field == "/address/street"),
        "{err:?}"
    );

    // The same event id under another aggregate fails too.
    let mut d = a.clone();
    d.aggregate_id = Uuid::now_v7();
    assert!(matches!(
        f.crypto.decrypt(&reader(), &mut d).await,
        Err(Error::Tampered { .. })
    ));
}

#[tokio::test]
async fn a_wrong_key_encryption_key_fails_clearly() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;
    let kek = f.keyring.current_key_id();

    // A keyring with the same id but other key material.
    let impostor =
        Arc::new(LocalKeyring::with_key(kek.clone(), DataKey::generate().unwrap()).unwrap());
    let mut read = event.clone();
    let err = f
        .other_process(impostor)
        .decrypt(&reader(), &mut read)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnwrapFailed { kek_id, .. } if *kek_id == kek),
        "{err:?}"
    );
    assert!(err.to_string().contains("wrong key-encryption key"));
    assert_eq!(read, event);

    // A keyring without the id.
    let stranger = Arc::new(LocalKeyring::generate().unwrap());
    let err = f
        .other_process(stranger)
        .decrypt(&reader(), &mut read)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownKek { kek_id } if *kek_id == kek),
        "{err:?}"
    );
}

#[tokio::test]
async fn data_key_rotation_keeps_old_events_readable() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let subject = SubjectId::from_aggregate(user);
    let old = encrypted(&f, user, user_registered()).await;
    let new_kid = f.crypto.rotate_data_key(&writer(), &subject).await.unwrap();
    let new = encrypted(&f, user, user_registered()).await;
    assert_ne!(
        old.event_data["email"]["kid"],
        new.event_data["email"]["kid"]
    );
    assert_eq!(new.event_data["email"]["kid"], new_kid.to_string());

    for event in [&old, &new] {
        // Also from a process that has nothing cached.
        for crypto in [&f.crypto, &f.other_process(f.keyring.clone())] {
            let mut read = event.clone();
            crypto.decrypt(&reader(), &mut read).await.unwrap();
            assert_eq!(read.event_data, user_registered().data);
        }
    }

    // Re-encryption moves the old event to the newest key, in place.
    let mut rewritten = old.clone();
    let n = f
        .crypto
        .reencrypt_events(&writer(), std::slice::from_mut(&mut rewritten))
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(rewritten.event_data["email"]["kid"], new_kid.to_string());
    assert_eq!(rewritten.encrypted_fields, old.encrypted_fields);
    assert!(!serde_json::to_string(&rewritten).unwrap().contains("ada@"));
    assert_eq!(
        f.crypto
            .reencrypt_events(&writer(), std::slice::from_mut(&mut rewritten))
            .await
            .unwrap(),
        0,
        "already under the newest key"
    );
    f.crypto.decrypt(&reader(), &mut rewritten).await.unwrap();
    assert_eq!(rewritten.event_data, user_registered().data);
    assert!(
        f.ops()
            .contains(&(AuditOperation::Rotate, AuditOutcome::Success))
    );
    assert!(
        f.ops()
            .contains(&(AuditOperation::Reencrypt, AuditOutcome::Success))
    );
}

#[tokio::test]
async fn kek_rewrap_keeps_everything_readable_and_frees_the_old_kek() {
    let f = Fixture::new();
    let mut events = Vec::new();
    for _ in 0..5 {
        let user = Uuid::now_v7();
        events.push(encrypted(&f, user, user_registered()).await);
    }
    let old_kek = f.keyring.current_key_id();
    let new_kek = f.keyring.rotate().unwrap();
    let before: Vec<Value> = events.iter().map(|e| e.event_data.clone()).collect();

    let mut pages = Vec::new();
    let total = f
        .crypto
        .rewrap_all(&AccessContext::new("ops", "kek-rotation"), 2, |p| {
            pages.push(*p)
        })
        .await
        .unwrap();
    assert_eq!((total.scanned, total.rewrapped), (5, 5));
    assert_eq!(pages.len(), 3, "pages of 2, 2 and 1");
    assert!(f.store.all().iter().all(|k| k.wrapped.kek_id == new_kek));
    let rerun = f.crypto.rewrap_all(&writer(), 10, |_| {}).await.unwrap();
    assert_eq!(rerun.rewrapped, 0, "idempotent");
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_data.clone())
            .collect::<Vec<_>>(),
        before,
        "no event was touched"
    );

    f.keyring.remove(&old_kek).unwrap();
    let fresh = f.other_process(f.keyring.clone());
    fresh.decrypt_events(&reader(), &mut events).await.unwrap();
    assert!(
        events
            .iter()
            .all(|e| e.event_data == user_registered().data)
    );
    let rewraps = f
        .audit
        .records()
        .iter()
        .filter(|r| r.entry.operation == AuditOperation::Rewrap)
        .count();
    assert_eq!(rewraps, 5);
}

#[tokio::test]
async fn shredding_redacts_one_subject_and_spares_the_others() {
    let f = Fixture::new();
    let (gone, kept) = (Uuid::now_v7(), Uuid::now_v7());
    let gone_event = encrypted(&f, gone, user_registered()).await;
    let kept_event = encrypted(&f, kept, user_registered()).await;
    // Cached in this process before the shred.
    f.crypto
        .decrypt(&reader(), &mut gone_event.clone())
        .await
        .unwrap();

    let destroyed = f
        .crypto
        .shred(
            &AccessContext::new("dpo", "erasure-17"),
            &SubjectId::from_aggregate(gone),
        )
        .await
        .unwrap();
    assert_eq!(destroyed.len(), 1);

    for crypto in [&f.crypto, &f.other_process(f.keyring.clone())] {
        let mut events = vec![gone_event.clone(), kept_event.clone()];
        let summary = crypto.decrypt_events(&reader(), &mut events).await.unwrap();
        assert_eq!(
            summary,
            DecryptSummary {
                decrypted: 3,
                redacted: 3
            }
        );
        let marker = json!({ "$redacted": "shredded" });
        assert_eq!(events[0].event_data["email"], marker);
        assert_eq!(events[0].event_data["address"]["street"], marker);
        assert_eq!(events[0].event_data["address"]["city"], "London");
        assert_eq!(events[1].event_data, user_registered().data);
    }

    let mut again = user_registered();
    let err = f
        .crypto
        .encrypt(&writer(), gone, &mut again)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SubjectShredded { .. }), "{err:?}");
    assert_eq!(again, user_registered().with_id(again.event_id));
    assert!(
        f.ops()
            .contains(&(AuditOperation::Shred, AuditOutcome::Success))
    );
    assert!(
        f.ops()
            .contains(&(AuditOperation::Decrypt, AuditOutcome::Shredded))
    );
}

#[tokio::test]
async fn subject_from_a_pointer_groups_events_across_aggregates() {
    let f = Fixture::new();
    let order = |customer: &str| {
        NewEvent::new(
            "OrderPlaced",
            json!({ "customer_id": customer, "shipping_address": "1 Main St", "total": 12 }),
        )
    };
    let a = encrypted(&f, Uuid::now_v7(), order("cust-1")).await;
    let b = encrypted(&f, Uuid::now_v7(), order("cust-1")).await;
    let c = encrypted(&f, Uuid::now_v7(), order("cust-2")).await;
    assert_eq!(
        a.event_data["shipping_address"]["kid"],
        b.event_data["shipping_address"]["kid"]
    );
    assert_ne!(
        a.event_data["shipping_address"]["kid"],
        c.event_data["shipping_address"]["kid"]
    );
    assert_eq!(
        f.crypto.subject_of(Uuid::nil(), &order("cust-9")).unwrap(),
        Some(SubjectId::new("cust-9"))
    );

    f.crypto
        .shred(&writer(), &SubjectId::new("cust-1"))
        .await
        .unwrap();
    let mut events = vec![a, b, c];
    f.crypto
        .decrypt_events(&reader(), &mut events)
        .await
        .unwrap();
    assert_eq!(
        events[0].event_data["shipping_address"],
        Redaction::Shredded.marker()
    );
    assert_eq!(
        events[1].event_data["shipping_address"],
        Redaction::Shredded.marker()
    );
    assert_eq!(events[2].event_data["shipping_address"], "1 Main St");

    let mut missing = NewEvent::new("OrderPlaced", json!({ "shipping_address": "x" }));
    let err = f
        .crypto
        .encrypt(&writer(), Uuid::now_v7(), &mut missing)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("subject field /customer_id is missing"),
        "{err}"
    );
    let mut wrong = NewEvent::new(
        "OrderPlaced",
        json!({ "customer_id": {}, "shipping_address": "x" }),
    );
    assert!(matches!(
        f.crypto
            .encrypt(&writer(), Uuid::now_v7(), &mut wrong)
            .await,
        Err(Error::InvalidEvent { .. })
    ));
    let mut not_object = NewEvent::new("OrderPlaced", json!(["x"]));
    assert!(matches!(
        f.crypto
            .encrypt(&writer(), Uuid::now_v7(), &mut not_object)
            .await,
        Err(Error::InvalidEvent { .. })
    ));
}

#[tokio::test]
async fn readers_without_access_get_a_marker_and_are_audited() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;
    let policy = |ctx: &AccessContext, access: &FieldAccess<'_>| {
        ctx.actor.starts_with("support:") || access.field != "/email"
    };
    let restricted = FieldEncryptorBuilder::new(
        EncryptionConfig::from_yaml(CONFIG).unwrap(),
        f.keyring.clone(),
        f.store.clone(),
        f.audit.clone(),
    )
    .access_policy(Arc::new(policy))
    .build();

    let mut read = event.clone();
    let summary = restricted
        .decrypt(
            &AccessContext::new("projection:marketing", "newsletter"),
            &mut read,
        )
        .await
        .unwrap();
    assert_eq!(summary.redacted, 1);
    assert_eq!(read.event_data["email"], json!({ "$redacted": "denied" }));
    assert_eq!(read.event_data["address"]["street"], "12 Lovelace Lane");
    let denied: Vec<AuditRecord> = f
        .audit
        .records()
        .into_iter()
        .filter(|r| r.entry.outcome == AuditOutcome::Denied)
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].entry.actor, "projection:marketing");
    assert_eq!(denied[0].entry.purpose, "newsletter");

    let mut read = event.clone();
    restricted.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(read.event_data["email"], "ada@example.com");

    // A reader with no keys at all.
    let mut read = event.clone();
    assert_eq!(redact_event(&mut read), 3);
    assert_eq!(read.event_data["email"], Redaction::Denied.marker());
}

#[tokio::test]
async fn nothing_is_released_when_the_audit_sink_fails() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;

    f.audit.set_failing(true);
    let mut read = event.clone();
    let err = f.crypto.decrypt(&reader(), &mut read).await.unwrap_err();
    assert!(matches!(err, Error::Audit { .. }), "{err:?}");
    assert_eq!(read, event, "still encrypted");

    let mut fresh = user_registered();
    let original = fresh.clone();
    let err = f
        .crypto
        .encrypt(&writer(), user, &mut fresh)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Audit { .. }));
    assert_eq!(
        fresh, original,
        "no ciphertext handed out without its record"
    );

    f.audit.set_failing(false);
    f.crypto.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(read.event_data, user_registered().data);
}

#[tokio::test]
async fn one_audit_record_per_operation_in_a_verifiable_chain() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let mut events = vec![user_registered(), user_registered()];
    f.crypto
        .encrypt_events(&writer(), user, &mut events)
        .await
        .unwrap();
    let mut stored: Vec<EventEnvelope> = events.iter().map(|e| stored(user, e)).collect();
    f.crypto
        .decrypt_events(&reader(), &mut stored)
        .await
        .unwrap();

    // One record per operation: the key, the encryption of both events,
    // their decryption; each lists the events and fields.
    assert_eq!(
        f.ops(),
        [
            (AuditOperation::CreateKey, AuditOutcome::Success),
            (AuditOperation::Encrypt, AuditOutcome::Success),
            (AuditOperation::Decrypt, AuditOutcome::Success),
        ]
    );

    let records = f.audit.records();
    let decrypts: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.entry.operation == AuditOperation::Decrypt)
        .collect();
    assert!(decrypts.iter().all(|r| r.entry.actor == "support:alice"
        && r.entry.purpose == "ticket-4711"
        && r.entry.subject == Some(SubjectId::from_aggregate(user))
        && r.entry.key_id.is_some()));
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    for r in &records[1..] {
        assert_eq!(r.entry.event_ids, ids);
        assert_eq!(r.entry.fields, ["/email", "/address/street", "/profile"]);
        assert_eq!(r.entry.event_id(), None);
    }
    assert!(verify_chain(&records).is_intact());

    let mut tampered = records.clone();
    tampered[2].entry.fields.pop();
    assert_eq!(
        verify_chain(&tampered).problems,
        vec![ChainProblem::Edited { seq: 3 }]
    );
}

#[tokio::test]
async fn unknown_keys_and_malformed_envelopes_are_typed_errors() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;

    let elsewhere = FieldEncryptorBuilder::new(
        EncryptionConfig::new(),
        f.keyring.clone(),
        Arc::new(MemoryDataKeyStore::new()),
        Arc::new(MemoryAuditSink::new()),
    )
    .build();
    let mut read = event.clone();
    let err = elsewhere.decrypt(&reader(), &mut read).await.unwrap_err();
    assert!(
        matches!(&err, Error::UnknownDataKey { field, .. } if field == "/email"),
        "{err:?}"
    );

    let mut plain = event.clone();
    plain.event_data["email"] = json!("ada@example.com");
    let err = f.crypto.decrypt(&reader(), &mut plain).await.unwrap_err();
    assert!(
        matches!(&err, Error::MalformedEnvelope { field, .. } if field == "/email"),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains("ada@"),
        "errors never quote plaintext: {err}"
    );

    let mut absent = event.clone();
    absent.event_data["address"]
        .as_object_mut()
        .unwrap()
        .remove("street");
    assert!(matches!(
        f.crypto.decrypt(&reader(), &mut absent).await,
        Err(Error::MalformedEnvelope { .. })
    ));
}

#[tokio::test]
async fn cached_keys_spare_the_key_provider() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let mut events: Vec<NewEvent> = (0..50).map(|_| user_registered()).collect();
    f.crypto
        .encrypt_events(&writer(), user, &mut events)
        .await
        .unwrap();
    let mut stored: Vec<EventEnvelope> = events.iter().map(|e| stored(user, e)).collect();

    let counting = Arc::new(Counting {
        inner: f.keyring.clone(),
        unwraps: AtomicUsize::new(0),
    });
    let reader_process = f.other_process(counting.clone());
    for chunk in stored.chunks_mut(10) {
        reader_process
            .decrypt_events(&reader(), chunk)
            .await
            .unwrap();
    }
    assert_eq!(
        counting.unwraps.load(Ordering::SeqCst),
        1,
        "one unwrap for 150 fields"
    );
    assert!(
        stored
            .iter()
            .all(|e| e.event_data == user_registered().data)
    );

    let uncached = FieldEncryptorBuilder::new(
        EncryptionConfig::from_yaml(CONFIG).unwrap(),
        counting.clone(),
        f.store.clone(),
        f.audit.clone(),
    )
    .cache_capacity(0)
    .build();
    let mut again: Vec<EventEnvelope> = events
        .iter()
        .take(2)
        .map(|e| self::stored(user, e))
        .collect();
    uncached
        .decrypt_events(&reader(), &mut again)
        .await
        .unwrap();
    // Without a cache, still one unwrap per key per call, not per field.
    assert_eq!(counting.unwraps.load(Ordering::SeqCst), 1 + 1);
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FieldEncryptor>();
    send_sync::<LocalKeyring>();
    send_sync::<MemoryDataKeyStore>();
    send_sync::<MemoryAuditSink>();
    send_sync::<Error>();
    send_sync::<Arc<dyn KeyProvider>>();
    send_sync::<Arc<dyn DataKeyStore>>();
    send_sync::<Arc<dyn AuditSink>>();
    send_sync::<Arc<dyn crate::SecretStore>>();

    fn send<T: Send>(_: &T) {}
    let f = Fixture::new();
    let mut event = user_registered();
    let mut envelopes: Vec<EventEnvelope> = Vec::new();
    send(&f.crypto.encrypt(&writer(), Uuid::nil(), &mut event));
    send(&f.crypto.decrypt_events(&reader(), &mut envelopes));
    send(&f.crypto.reencrypt_events(&reader(), &mut envelopes));
    send(&f.crypto.rewrap_all(&writer(), 10, |_| {}));
    send(&f.crypto.shred(&writer(), &SubjectId::new("s")));
}

#[tokio::test]
async fn another_process_sees_a_shred_once_told_or_after_the_ttl() {
    let f = Fixture::new();
    let user = Uuid::now_v7();
    let event = encrypted(&f, user, user_registered()).await;
    let other = f.other_process(f.keyring.clone());
    other.decrypt(&reader(), &mut event.clone()).await.unwrap();

    let subject = SubjectId::from_aggregate(user);
    f.crypto.shred(&writer(), &subject).await.unwrap();

    // Within the TTL the other process still holds the unwrapped key...
    let mut read = event.clone();
    other.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(read.event_data["email"], "ada@example.com");

    // ...until it is told.
    other.forget_subject(&subject);
    let mut read = event.clone();
    other.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(read.event_data["email"], Redaction::Shredded.marker());

    // With a zero TTL nothing outlives the store.
    let no_ttl = FieldEncryptorBuilder::new(
        EncryptionConfig::from_yaml(CONFIG).unwrap(),
        f.keyring.clone(),
        f.store.clone(),
        f.audit.clone(),
    )
    .cache_ttl(std::time::Duration::ZERO)
    .build();
    let second = Uuid::now_v7();
    let event = encrypted(&f, second, user_registered()).await;
    no_ttl.decrypt(&reader(), &mut event.clone()).await.unwrap();
    f.crypto
        .shred(&writer(), &SubjectId::from_aggregate(second))
        .await
        .unwrap();
    let mut read = event.clone();
    no_ttl.decrypt(&reader(), &mut read).await.unwrap();
    assert_eq!(read.event_data["email"], Redaction::Shredded.marker());
}
