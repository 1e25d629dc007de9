//! Field-level envelope encryption for Chronicle events, with key rotation,
//! crypto-shredding and a tamper-evident audit trail.
//!
//! Sensitive fields of an event (named per event type by JSON pointers in the
//! configuration) are encrypted in the writer, before the event reaches the
//! store, so their plaintext never reaches the database, a dead-letter queue
//! or a log. This crate is the database-free core: the PostgreSQL tables for
//! data keys and audit records implement its [`DataKeyStore`] and
//! [`AuditSink`] traits in `chronicle-postgres`.
//!
//! The types that matter:
//!
//! - [`FieldEncryptor`] (built by [`FieldEncryptorBuilder`]): encrypts
//!   [`NewEvent`](chronicle_core::NewEvent)s, decrypts
//!   [`EventEnvelope`](chronicle_core::EventEnvelope)s, rotates, re-wraps and
//!   shreds keys.
//! - [`EncryptionConfig`]: which fields of which event types, from YAML.
//! - [`KeyProvider`]: key-encryption keys ([`LocalKeyring`] for development,
//!   KMS adapters for production); [`SecretStore`] for secrets.
//! - [`DataKeyStore`]: wrapped data keys per subject.
//! - [`AuditSink`], [`AuditRecord`], [`verify_chain`]: the hash-chained audit
//!   trail; [`GroupCommitAuditSink`] merges concurrent readers' audit
//!   batches into one append.
//! - [`EncryptedStore`]: wraps any [`EventStore`](chronicle_core::EventStore)
//!   so appends encrypt before the event leaves the process and reads
//!   decrypt for an [`AccessContext`] (or redact, or return ciphertext:
//!   [`ReadMode`]).
//!
//! On PostgreSQL, `chronicle-postgres` provides `PgDataKeyStore` and
//! `PgAuditSink` (migrations 3 and 9: `chronicle_key_subjects`,
//! `chronicle_data_keys`, `chronicle_audit_log`, `chronicle_audit_head`);
//! the in-memory [`MemoryDataKeyStore`] and [`MemoryAuditSink`] serve tests.
//!
//! ```
//! use std::sync::Arc;
//! use chronicle_core::{EventEnvelope, NewEvent, Position};
//! use chronicle_crypto::{
//!     AccessContext, EncryptionConfig, FieldEncryptorBuilder, LocalKeyring, MemoryAuditSink,
//!     MemoryDataKeyStore, Redaction, SubjectId, verify_chain,
//! };
//! use serde_json::json;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let config = EncryptionConfig::from_yaml(r#"
//! encryption:
//!   events:
//!     UserRegistered:
//!       fields: ["/email", "/address/street"]
//! "#)?;
//! let audit = Arc::new(MemoryAuditSink::new());
//! let crypto = FieldEncryptorBuilder::new(
//!     config,
//!     Arc::new(LocalKeyring::generate()?),
//!     Arc::new(MemoryDataKeyStore::new()),
//!     audit.clone(),
//! )
//! .build();
//! let writer = AccessContext::new("signup-service", "registration");
//!
//! // Before appending: the configured fields become envelopes.
//! let user = uuid::Uuid::now_v7();
//! let mut event = NewEvent::new(
//!     "UserRegistered",
//!     json!({ "email": "ada@example.com", "address": { "street": "1 Main St", "city": "Oslo" } }),
//! );
//! crypto.encrypt(&writer, user, &mut event).await?;
//! assert_eq!(event.data["email"]["$enc"], "v1");
//! assert_eq!(event.data["address"]["city"], "Oslo");
//! assert_eq!(event.encrypted_fields, ["/email", "/address/street"]);
//! assert!(!event.data.to_string().contains("ada@example.com"));
//!
//! // After reading: transparent decryption for callers holding the keys.
//! let mut stored = EventEnvelope {
//!     event_id: event.event_id,
//!     aggregate_id: user,
//!     aggregate_type: "User".into(),
//!     event_type: event.event_type.clone(),
//!     event_data: event.data.clone(),
//!     metadata: event.metadata.clone(),
//!     version: 1,
//!     timestamp: chrono::Utc::now(),
//!     encrypted_fields: event.encrypted_fields.clone(),
//!     position: Position::new(1, 1),
//! };
//! let mut read = stored.clone();
//! crypto.decrypt(&AccessContext::new("support:alice", "ticket-4711"), &mut read).await?;
//! assert_eq!(read.event_data["email"], "ada@example.com");
//!
//! // Crypto-shredding: the subject's data keys are destroyed.
//! crypto.shred(&AccessContext::new("dpo", "erasure-request-17"), &SubjectId::from_aggregate(user)).await?;
//! crypto.decrypt(&AccessContext::new("support:alice", "ticket-4712"), &mut stored).await?;
//! assert_eq!(stored.event_data["email"], Redaction::Shredded.marker());
//!
//! // Every operation was audited, in a verifiable chain.
//! assert!(verify_chain(&audit.records()).is_intact());
//! # Ok::<(), chronicle_crypto::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Key hierarchy
//!
//! Two levels, as in every envelope-encryption scheme:
//!
//! - A **data key** (DEK, AES-256-GCM, 256 bits) per *data subject* encrypts
//!   field values. The subject defaults to the aggregate id, or is read from
//!   the event through a JSON pointer (`subject: /customer_id`: the user id
//!   inside an order event). A subject has one current key and any number of
//!   older ones. Data keys are stored only *wrapped*, in a [`DataKeyStore`],
//!   together with the id of the key that wrapped them ([`StoredDataKey`]).
//! - A **key-encryption key** (KEK) held by a [`KeyProvider`] wraps data keys.
//!   [`LocalKeyring`] wraps with AES-256-GCM, random 96-bit nonce, and the
//!   associated data `"chronicle/dek/v1" 0x00 || len‖kek_id || len‖subject ||
//!   data_key_id` ([`WrapContext::associated_data`]), so a wrapped key copied
//!   to another subject or id, or unwrapped with another KEK, fails with
//!   [`Error::UnwrapFailed`]. A KMS adapter passes the same context as its
//!   encryption context.
//!
//! Unwrapped data keys are [`DataKey`]s: heap-allocated, zeroized on drop,
//! never printed. [`FieldEncryptor`] keeps them (as ready AES key schedules)
//! in a bounded LRU cache with a time-to-live, so appends and reads do not
//! call the KMS per event.
//!
//! # Envelope format
//!
//! An encrypted field's value is replaced by
//!
//! ```json
//! {"$enc": "v1", "kid": "<data key id, a UUID>", "iv": "<12 bytes, base64>", "ct": "<ciphertext and 16-byte tag, base64>"}
//! ```
//!
//! The plaintext is the field's JSON text (any JSON type round-trips). The
//! associated data is `"chronicle/field/v1" 0x00 || event_id || aggregate_id
//! || kid || len‖pointer`: an envelope copied to another event, another
//! aggregate or another field, or with a flipped bit, fails with
//! [`Error::Tampered`], which names the event and field. The event type is
//! deliberately not bound, so upcasters may rename types; an upcaster that
//! *moves* an encrypted field must re-encrypt it. The event's
//! `encrypted_fields` lists the pointers of the envelopes; base64 is
//! standard with padding. Nonces are random (96 bits), which is safe for up
//! to 2³² fields per data key; per-subject keys stay far below that, and
//! rotation starts a fresh key.
//!
//! # Reading
//!
//! [`FieldEncryptor::decrypt_events`] replaces each envelope by its value and
//! clears `encrypted_fields`. A shredded subject's fields become
//! `{"$redacted":"shredded"}`; a reader the [`AccessPolicy`] refuses gets
//! `{"$redacted":"denied"}`; a reader holding no keys at all uses
//! [`redact_event`]. Never a panic; integrity failures are typed errors.
//!
//! # Rotation and shredding
//!
//! - [`FieldEncryptor::rotate_data_key`] gives a subject a new current key;
//!   older envelopes keep naming their own `kid` and stay readable.
//!   [`FieldEncryptor::reencrypt_events`] rewrites a subject's old envelopes
//!   under its newest key without releasing plaintext.
//! - KEK rotation: add a new current KEK (e.g. [`LocalKeyring::rotate`]), run
//!   [`FieldEncryptor::rewrap_all`] (resumable, page by page, idempotent), and
//!   then drop the old KEK. No event is rewritten.
//! - [`FieldEncryptor::shred`] destroys a subject's wrapped keys, leaving
//!   tombstones so readers can tell "shredded" from "unknown key", and refuses
//!   new data for the subject ([`Error::SubjectShredded`]). Other processes
//!   stop using cached keys within the cache TTL, or at once when told
//!   through [`FieldEncryptor::forget_subject`]. Copies of wrapped keys in
//!   database backups stay decryptable only as long as the KEK that wrapped
//!   them exists: rotate the KEK and drop the old one once backups expire.
//!
//! # Audit trail
//!
//! Every call collects one [`AuditEntry`] per operation, subject, key and
//! outcome (encrypt, decrypt, re-encrypt, create-key, rotate, rewrap,
//! shred; outcome success, denied, shredded or failed; subject, key id, the
//! event ids and field pointers covered, actor and purpose from the
//! caller's [`AccessContext`], time): a read of a user's stream is one
//! `decrypt` entry listing its events and fields. Failures (a tampered
//! ciphertext, an unknown key) get an entry naming the one event and field.
//! The batch goes to the [`AuditSink`] *before* the caller's events change:
//! if the sink fails, no plaintext is released. An append can instead store
//! its entries (and a new subject's first key) in its own transaction
//! ([`FieldEncryptor::encrypt_for_append`], [`AuditedAppender`],
//! [`EncryptedStore::audit_in_append`]).
//!
//! The sink chains entries into [`AuditRecord`]s: `hash = SHA-256(prev_hash
//! || canonical(entry))`, starting from 32 zero bytes, where the canonical
//! form is a compact JSON array in a fixed order with the time in
//! microseconds ([`AuditEntry::canonical_bytes`]). [`verify_chain`] finds
//! edited rows (contents do not match the hash), deleted rows (a link to a
//! missing hash across a gap in `seq`), inserted rows (a second row linking
//! to the same predecessor) and rewritten links, and names them
//! ([`ChainProblem`]). Rows cut from the end are only detectable against an
//! anchored head kept elsewhere ([`verify_chain_from`]).
#![deny(missing_docs)]

mod audit;
mod cache;
mod config;
mod encrypted_store;
mod encryptor;
mod envelope;
mod error;
mod group_commit;
mod keyring;
mod keys;
mod secrets;
mod store;

pub use audit::{
    AccessContext, AuditEntry, AuditOperation, AuditOutcome, AuditProblem, AuditRecord,
    AuditReport, AuditSink, ChainHash, ChainHead, ChainProblem, ChainReport, ChainSummary,
    MemoryAuditSink, verify_chain, verify_chain_from, verify_log,
};
pub use config::{EncryptionConfig, EventRule, FieldPointer};
pub use encrypted_store::{AuditedAppend, AuditedAppender, EncryptedStore, ReadMode};
pub use encryptor::{
    AccessPolicy, AllowAll, DecryptSummary, FieldAccess, FieldEncryptor, FieldEncryptorBuilder,
    PendingAudit, RewrapPage, RewrapProgress,
};
pub use envelope::{
    ENVELOPE_TAG, ENVELOPE_VERSION, REDACTED_TAG, Redaction, is_envelope, redact_event,
};
pub use error::{ConfigError, Error, Result};
pub use group_commit::GroupCommitAuditSink;
pub use keyring::LocalKeyring;
pub use keys::{
    DataKey, DataKeyId, KEY_LEN, KekId, KeyProvider, SubjectId, WrapContext, WrappedKey,
};
pub use secrets::{EnvSecrets, FileSecrets, SecretStore, SecretValue};
pub use store::{DataKeyStore, KeyLookup, MemoryDataKeyStore, StoredDataKey};
