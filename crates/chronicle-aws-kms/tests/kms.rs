//! `AwsKmsKeys` against moto's KMS: wrapping, context binding, key state
//! errors, rotation between keys, the field encryptor end to end, and the
//! move from a local keyring to KMS.

use std::sync::Arc;

use chronicle_aws_kms::{KmsError, KmsErrorKind, is_kms_key_arn};
use chronicle_core::{EventEnvelope, NewEvent, Position};
use chronicle_crypto::{
    AccessContext, DataKey, DataKeyId, EncryptionConfig, Error, FieldEncryptor,
    FieldEncryptorBuilder, KekId, KeyProvider, LocalKeyring, MemoryAuditSink, MemoryDataKeyStore,
    SubjectId, WrapContext,
};
use serde_json::json;
use uuid::Uuid;

use crate::support;

fn context(subject: &SubjectId, data_key_id: DataKeyId) -> WrapContext<'_> {
    WrapContext {
        subject,
        data_key_id,
    }
}

fn kms_error(err: &Error) -> &KmsError {
    KmsError::in_crypto_error(err).unwrap_or_else(|| panic!("not a KMS error: {err:?}"))
}

#[tokio::test]
async fn wrap_and_unwrap_round_trip_under_an_alias() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    let alias = format!("alias/chronicle-{}", Uuid::now_v7().simple());
    admin
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&arn)
        .send()
        .await
        .expect("CreateAlias");

    let keys = support::provider(&alias).await;
    // The alias resolves to the key ARN, which is what gets stored.
    assert_eq!(keys.current_key_id(), KekId::new(arn.clone()));
    assert!(is_kms_key_arn(keys.current_key_id().as_str()));

    let subject = SubjectId::new("customer-1");
    let id = DataKeyId::new();

    // GenerateDataKey: KMS makes the key.
    let (key, wrapped) = keys
        .generate_data_key(&context(&subject, id))
        .await
        .unwrap();
    assert_eq!(wrapped.kek_id.as_str(), arn);
    assert!(
        !wrapped
            .ciphertext
            .windows(key.expose_secret().len())
            .any(|w| w == key.expose_secret()),
        "the wrapped key contains the plaintext key"
    );
    let back = keys.unwrap(&wrapped, &context(&subject, id)).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());

    // Encrypt: a key made elsewhere.
    let local = DataKey::generate().unwrap();
    let id2 = DataKeyId::new();
    let wrapped2 = keys.wrap(&local, &context(&subject, id2)).await.unwrap();
    assert_eq!(wrapped2.kek_id.as_str(), arn);
    let back2 = keys
        .unwrap(&wrapped2, &context(&subject, id2))
        .await
        .unwrap();
    assert_eq!(back2.expose_secret(), local.expose_secret());
}

#[tokio::test]
async fn a_wrapped_key_moved_to_another_subject_or_key_fails_clearly() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    let other_arn = support::create_key(&admin).await;
    let keys = support::provider(&arn).await;
    let alice = SubjectId::new("alice");
    let bob = SubjectId::new("bob");
    let id = DataKeyId::new();
    let (_, wrapped) = keys.generate_data_key(&context(&alice, id)).await.unwrap();

    // Another subject: the encryption context does not match.
    let err = keys.unwrap(&wrapped, &context(&bob, id)).await.unwrap_err();
    match &err {
        Error::UnwrapFailed {
            kek_id,
            data_key_id,
            subject,
        } => {
            assert_eq!(kek_id.as_str(), arn);
            assert_eq!(*data_key_id, id);
            assert_eq!(subject, &bob);
        }
        other => panic!("expected UnwrapFailed, got {other:?}"),
    }
    assert!(err.is_integrity_failure());
    assert!(err.to_string().contains("\"bob\""), "{err}");

    // Another data key id of the same subject.
    let err = keys
        .unwrap(&wrapped, &context(&alice, DataKeyId::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnwrapFailed { .. }), "{err:?}");

    // A flipped byte.
    let mut altered = wrapped.clone();
    let last = altered.ciphertext.len() - 1;
    altered.ciphertext[last] ^= 1;
    let err = keys
        .unwrap(&altered, &context(&alice, id))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnwrapFailed { .. }), "{err:?}");

    // Stored as wrapped by another key: KMS refuses to decrypt it with
    // that key (AWS says IncorrectKeyException, moto AccessDenied); either
    // way the error names the key that was tried.
    let mut relabelled = wrapped.clone();
    relabelled.kek_id = KekId::new(other_arn.clone());
    let err = keys
        .unwrap(&relabelled, &context(&alice, id))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&other_arn), "{err}");

    // The untouched key still unwraps.
    keys.unwrap(&wrapped, &context(&alice, id)).await.unwrap();
}

#[tokio::test]
async fn a_disabled_key_fails_clearly() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    let keys = support::provider(&arn).await;
    let spare = support::create_key(&admin).await;
    keys.check_current_key().await.unwrap();

    admin
        .disable_key()
        .key_id(support::key_id(&arn))
        .send()
        .await
        .unwrap();

    // A new provider refuses the key, naming it and the remedy.
    let err = support::builder(&arn).await.build().await.unwrap_err();
    let kms = kms_error(&err);
    assert_eq!(kms.kind(), KmsErrorKind::KeyDisabled);
    let text = err.to_string();
    assert!(text.contains(&arn), "{text}");
    assert!(text.contains("aws kms enable-key"), "{text}");

    // A running provider's check finds it disabled too.
    let err = keys.check_current_key().await.unwrap_err();
    assert_eq!(kms_error(&err).kind(), KmsErrorKind::KeyDisabled);

    // Switching to it is refused and leaves the current key as it was.
    keys.set_current_key(&spare).await.unwrap();
    let err = keys.set_current_key(&arn).await.unwrap_err();
    assert_eq!(kms_error(&err).kind(), KmsErrorKind::KeyDisabled);
    assert_eq!(keys.current_key_id().as_str(), spare);

    // Enabled again, it is usable again.
    admin
        .enable_key()
        .key_id(support::key_id(&arn))
        .send()
        .await
        .unwrap();
    assert_eq!(keys.set_current_key(&arn).await.unwrap().as_str(), arn);
}

#[tokio::test]
async fn a_key_pending_deletion_is_refused() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    admin
        .schedule_key_deletion()
        .key_id(support::key_id(&arn))
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let err = support::builder(&arn).await.build().await.unwrap_err();
    assert_eq!(kms_error(&err).kind(), KmsErrorKind::KeyUnusable);
    assert!(err.to_string().contains("cancel-key-deletion"), "{err}");
}

#[tokio::test]
async fn access_denied_and_unknown_keys_fail_clearly() {
    let admin = support::admin().await;
    // A key policy that denies DescribeKey to everyone.
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "deny-describe",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "kms:DescribeKey",
            "Resource": "*"
        }]
    })
    .to_string();
    let denied = support::create_key_with_policy(&admin, Some(&policy)).await;
    let err = support::builder(&denied).await.build().await.unwrap_err();
    let kms = kms_error(&err);
    assert_eq!(kms.kind(), KmsErrorKind::AccessDenied);
    assert_eq!(kms.code(), Some("AccessDeniedException"));
    let text = err.to_string();
    assert!(text.contains(&denied), "{text}");
    assert!(text.contains("kms:DescribeKey"), "{text}");

    // No such alias.
    let missing = format!("alias/missing-{}", Uuid::now_v7().simple());
    let err = support::builder(&missing).await.build().await.unwrap_err();
    assert_eq!(kms_error(&err).kind(), KmsErrorKind::KeyNotFound);
    assert!(err.to_string().contains(&missing), "{err}");

    // An empty key is refused before any call.
    let err = support::builder("  ").await.build().await.unwrap_err();
    assert!(matches!(err, Error::InvalidOperation { .. }), "{err:?}");

    // A wrapped key whose KEK id is not a KMS key ARN, without a legacy
    // provider: the KEK is unknown to this provider.
    let keys = support::provider(&support::create_key(&admin).await).await;
    let subject = SubjectId::new("s");
    let ring = LocalKeyring::generate().unwrap();
    let id = DataKeyId::new();
    let local = ring
        .wrap(&DataKey::generate().unwrap(), &context(&subject, id))
        .await
        .unwrap();
    let err = keys
        .unwrap(&local, &context(&subject, id))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownKek { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_clearly() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut builder = support::builder("alias/anything").await;
    builder
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .max_attempts(1);
    let err = builder.build().await.unwrap_err();
    assert_eq!(kms_error(&err).kind(), KmsErrorKind::Unreachable);
    assert!(err.to_string().contains("cannot reach AWS KMS"), "{err}");
}

fn config() -> EncryptionConfig {
    EncryptionConfig::from_yaml(
        r#"
encryption:
  events:
    UserRegistered:
      fields: ["/email", "/address/street"]
"#,
    )
    .unwrap()
}

fn encryptor(
    provider: Arc<dyn KeyProvider>,
    store: Arc<MemoryDataKeyStore>,
    audit: Arc<MemoryAuditSink>,
) -> FieldEncryptor {
    FieldEncryptorBuilder::new(config(), provider, store, audit).build()
}

fn registered(email: &str) -> NewEvent {
    NewEvent::new(
        "UserRegistered",
        json!({ "email": email, "address": { "street": "1 Main St", "city": "Oslo" } }),
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

/// Encrypts one `UserRegistered` per email, each for its own aggregate;
/// returns the events as stored.
async fn write_users(crypto: &FieldEncryptor, emails: &[String]) -> Vec<EventEnvelope> {
    let writer = AccessContext::new("signup-service", "registration");
    let mut out = Vec::new();
    for email in emails {
        let user = Uuid::now_v7();
        let mut event = registered(email);
        crypto.encrypt(&writer, user, &mut event).await.unwrap();
        assert!(!event.data.to_string().contains(email.as_str()));
        out.push(stored(user, &event));
    }
    out
}

/// Decrypts every event with `crypto` and checks the email came back.
async fn read_users(crypto: &FieldEncryptor, events: &[EventEnvelope], emails: &[String]) {
    let reader = AccessContext::new("support:alice", "ticket-1");
    for (event, email) in events.iter().zip(emails) {
        let mut read = event.clone();
        crypto.decrypt(&reader, &mut read).await.unwrap();
        assert_eq!(read.event_data["email"], email.as_str());
        assert_eq!(read.event_data["address"]["street"], "1 Main St");
        assert!(read.encrypted_fields.is_empty());
    }
}

fn emails(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i}@example.com")).collect()
}

#[tokio::test]
async fn field_encryptor_end_to_end_with_kms() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    let store = Arc::new(MemoryDataKeyStore::new());
    let audit = Arc::new(MemoryAuditSink::new());
    let writer = encryptor(
        Arc::new(support::provider(&arn).await),
        store.clone(),
        audit.clone(),
    );
    let emails = emails(3);
    let events = write_users(&writer, &emails).await;
    assert_eq!(events[0].event_data["email"]["$enc"], "v1");
    assert_eq!(events[0].event_data["address"]["city"], "Oslo");

    // One data key per subject, each wrapped by the KMS key.
    let keys = store.all();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k.wrapped.kek_id.as_str() == arn));

    // A second process (its own provider and an empty key cache) reads
    // them: every data key is unwrapped by KMS Decrypt.
    let reader = encryptor(
        Arc::new(support::provider(&arn).await),
        store.clone(),
        audit.clone(),
    );
    read_users(&reader, &events, &emails).await;

    // A flipped byte in a field's ciphertext is caught.
    let mut tampered = events[0].clone();
    let ct = tampered.event_data["email"]["ct"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = if ct.starts_with('A') { "B" } else { "A" };
    tampered.event_data["email"]["ct"] = json!(format!("{flipped}{}", &ct[1..]));
    let err = reader
        .decrypt(
            &AccessContext::new("support:alice", "ticket-2"),
            &mut tampered,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tampered { .. }), "{err:?}");
}

#[tokio::test]
async fn data_keys_wrapped_under_an_old_key_unwrap_after_rotation_and_rewrap() {
    let admin = support::admin().await;
    let key_a = support::create_key(&admin).await;
    let key_b = support::create_key(&admin).await;
    let store = Arc::new(MemoryDataKeyStore::new());
    let audit = Arc::new(MemoryAuditSink::new());
    let provider = Arc::new(support::provider(&key_a).await);
    let crypto = encryptor(provider.clone(), store.clone(), audit.clone());
    let old_emails = emails(2);
    let old_events = write_users(&crypto, &old_emails).await;

    // The current key becomes B: new data keys are wrapped by B ...
    assert_eq!(
        provider.set_current_key(&key_b).await.unwrap().as_str(),
        key_b
    );
    assert_eq!(provider.current_key_id().as_str(), key_b);
    let new_emails = vec!["new@example.com".to_owned()];
    let new_events = write_users(&crypto, &new_emails).await;
    let by_kek = |kek: &str| {
        store
            .all()
            .iter()
            .filter(|k| k.wrapped.kek_id.as_str() == kek)
            .count()
    };
    assert_eq!((by_kek(&key_a), by_kek(&key_b)), (2, 1));

    // ... and those wrapped by A still unwrap (a fresh reader: no cache).
    let fresh = encryptor(provider.clone(), store.clone(), audit.clone());
    read_users(&fresh, &old_events, &old_emails).await;
    read_users(&fresh, &new_events, &new_emails).await;

    // Re-wrapping moves every data key under B without touching events.
    let progress = crypto
        .rewrap_all(&AccessContext::new("ops", "kek-rotation"), 1, |_| {})
        .await
        .unwrap();
    assert_eq!(progress.rewrapped, 2);
    assert_eq!((by_kek(&key_a), by_kek(&key_b)), (0, 3));
    let fresh = encryptor(provider.clone(), store.clone(), audit.clone());
    read_users(&fresh, &old_events, &old_emails).await;
}

#[tokio::test]
async fn rewrap_from_a_local_keyring_to_kms() {
    let admin = support::admin().await;
    let arn = support::create_key(&admin).await;
    let store = Arc::new(MemoryDataKeyStore::new());
    let audit = Arc::new(MemoryAuditSink::new());

    // Before: data keys wrapped by a local keyring.
    let ring = Arc::new(LocalKeyring::generate().unwrap());
    let local = encryptor(ring.clone(), store.clone(), audit.clone());
    let emails = emails(3);
    let events = write_users(&local, &emails).await;
    assert!(
        store
            .all()
            .iter()
            .all(|k| k.wrapped.kek_id == ring.current_key_id())
    );

    // The KMS provider with the keyring as legacy provider reads them ...
    let mut builder = support::builder(&arn).await;
    builder.legacy_provider(ring.clone());
    let migrating = encryptor(
        Arc::new(builder.build().await.unwrap()),
        store.clone(),
        audit.clone(),
    );
    read_users(&migrating, &events, &emails).await;

    // ... and re-wraps every data key under KMS.
    let progress = migrating
        .rewrap_all(&AccessContext::new("ops", "move-to-kms"), 2, |_| {})
        .await
        .unwrap();
    assert_eq!(progress.rewrapped, 3);
    assert!(store.all().iter().all(|k| k.wrapped.kek_id.as_str() == arn));

    // After: KMS alone reads everything; the keyring is no longer needed.
    let kms_only = encryptor(
        Arc::new(support::provider(&arn).await),
        store.clone(),
        audit.clone(),
    );
    read_users(&kms_only, &events, &emails).await;
}
