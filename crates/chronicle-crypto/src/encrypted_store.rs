//! [`EncryptedStore`]: any [`EventStore`] with field encryption on append
//! and decryption (or redaction) on read.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    AggregateId, AppendOutcome, EventAppender, EventEnvelope, EventReader, EventStore,
    ExpectedVersion, FeedBatch, NewEvent, Position, TimeRange,
};
use chrono::{DateTime, Utc};

use crate::DataKeyId;
use crate::audit::{AccessContext, AuditEntry};
use crate::encryptor::FieldEncryptor;
use crate::envelope::redact_event;
use crate::store::StoredDataKey;

/// What reads through an [`EncryptedStore`] return in place of encrypted
/// fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadMode {
    /// Plaintext for this reader, through [`FieldEncryptor::decrypt_events`]:
    /// every field is audited; a shredded subject's fields become
    /// `{"$redacted":"shredded"}`, fields the access policy refuses
    /// `{"$redacted":"denied"}`; a tampered ciphertext fails the read.
    Decrypt(AccessContext),
    /// Every envelope replaced by `{"$redacted":"denied"}`, without keys and
    /// without audit records ([`redact_event`]): for readers that must never
    /// see the data.
    Redact,
    /// The envelopes as stored, `encrypted_fields` kept: for copying events
    /// elsewhere (a backup, a re-encryption job) without decrypting them.
    Ciphertext,
}

/// What an [`AuditedAppender`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedAppend {
    /// The append's outcome.
    pub outcome: AppendOutcome,
    /// The new keys that became their subjects' current key (a key made
    /// while another writer made the subject's first key may not).
    pub current_keys: Vec<DataKeyId>,
}

/// An event store that can append events, the data keys they were
/// encrypted under and their audit entries in one transaction: all are
/// stored, or none. `chronicle-postgres` implements it for `PgEventStore`
/// (keys into `chronicle_data_keys`, records into `chronicle_audit_log`, in
/// the append's own statement).
///
/// [`EncryptedStore::audit_in_append`] uses it: an encrypted append then
/// costs no separate audit transaction, a subject's first event no separate
/// key transaction, and a failed append (a conflict) leaves neither an
/// `encrypt` record nor an unused key behind.
#[async_trait]
pub trait AuditedAppender: Send + Sync {
    /// Appends like [`EventAppender::append`]; if (and only if) the events
    /// are newly stored, stores `new_keys` (each becomes its subject's
    /// current key unless the subject has one; a shredded subject fails the
    /// whole append with [`crate::Error::SubjectShredded`]) and `audit` in
    /// the same transaction. An idempotent repeat of an earlier append
    /// stores neither.
    async fn append_audited(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        new_keys: Vec<StoredDataKey>,
        audit: Vec<AuditEntry>,
    ) -> chronicle_core::Result<AuditedAppend>;
}

/// An event store that encrypts the configured fields of every appended
/// event *before* handing it to the inner store, so their plaintext never
/// reaches the database, and that decrypts (or redacts) them on read.
///
/// It implements [`EventAppender`] and [`EventReader`] itself, so anything
/// that takes an [`EventStore`] (a `Repository`, a projection) works on it
/// unchanged. Who acts is fixed per value: [`EncryptedStore::with_context`]
/// makes a cheap copy for another actor or purpose, and
/// [`EncryptedStore::reading`] one that redacts or returns ciphertext.
/// Appends are audited under the writer's context, decrypting reads under
/// the reader's.
///
/// Errors of the crypto layer come out as [`chronicle_core::Error::Backend`]
/// (or [`chronicle_core::Error::Invalid`] for an event that cannot be
/// encrypted as configured) with the crypto error as their source;
/// [`crate::Error::in_store_error`] finds it. Conflicts and other store
/// errors pass through unchanged.
///
/// ```no_run
/// # async fn demo(
/// #     events: std::sync::Arc<dyn chronicle_core::EventStore>,
/// #     crypto: std::sync::Arc<chronicle_crypto::FieldEncryptor>,
/// # ) -> chronicle_core::Result<()> {
/// use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent};
/// use chronicle_crypto::{AccessContext, EncryptedStore, ReadMode};
/// use serde_json::json;
///
/// let store = EncryptedStore::new(events, crypto, AccessContext::new("signup-service", "registration"));
/// let user = uuid::Uuid::now_v7();
/// store
///     .append(user, "user", ExpectedVersion::NoStream, vec![
///         NewEvent::new("UserRegistered", json!({ "email": "ada@example.com" })),
///     ])
///     .await?;
///
/// // Support sees plaintext, audited under its own name and purpose.
/// let support = store.with_context(AccessContext::new("support:alice", "ticket-4711"));
/// let read = support.read_stream(user, 1, None).await?;
/// assert_eq!(read[0].event_data["email"], "ada@example.com");
///
/// // A dashboard never does.
/// let dashboard = store.reading(ReadMode::Redact);
/// let read = dashboard.read_stream(user, 1, None).await?;
/// assert_eq!(read[0].event_data["email"]["$redacted"], "denied");
/// # Ok(()) }
/// ```
pub struct EncryptedStore<S: ?Sized> {
    inner: Arc<S>,
    encryptor: Arc<FieldEncryptor>,
    writer: AccessContext,
    reads: ReadMode,
    /// The inner store, when appends store their audit entries themselves.
    audited: Option<Arc<dyn AuditedAppender>>,
}

impl<S: ?Sized> Clone for EncryptedStore<S> {
    fn clone(&self) -> Self {
        EncryptedStore {
            inner: Arc::clone(&self.inner),
            encryptor: Arc::clone(&self.encryptor),
            writer: self.writer.clone(),
            reads: self.reads.clone(),
            audited: self.audited.clone(),
        }
    }
}

impl<S: ?Sized> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedStore")
            .field("writer", &self.writer)
            .field("reads", &self.reads)
            .field("audit_in_append", &self.audited.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: EventStore + ?Sized> EncryptedStore<S> {
    /// Wraps `inner`: appends encrypt under `context`, reads decrypt for
    /// `context` ([`ReadMode::Decrypt`]).
    pub fn new(inner: Arc<S>, encryptor: Arc<FieldEncryptor>, context: AccessContext) -> Self {
        EncryptedStore {
            inner,
            encryptor,
            reads: ReadMode::Decrypt(context.clone()),
            writer: context,
            audited: None,
        }
    }

    /// The same store, storing each append's `encrypt` audit entries in the
    /// append's own transaction ([`AuditedAppender`]) instead of through
    /// the encryptor's sink beforehand. Use it when the inner store writes
    /// to the audit log the encryptor's sink reads from (on PostgreSQL:
    /// `PgEventStore` with `PgAuditSink` on the same database).
    pub fn audit_in_append(self) -> Self
    where
        S: AuditedAppender + Sized + 'static,
    {
        let audited: Arc<dyn AuditedAppender> = self.inner.clone();
        EncryptedStore {
            audited: Some(audited),
            ..self
        }
    }

    /// Whether appends store their audit entries in their own transaction.
    pub fn audits_in_append(&self) -> bool {
        self.audited.is_some()
    }

    /// The same store acting for `context`, both appending and decrypting.
    pub fn with_context(&self, context: AccessContext) -> Self {
        EncryptedStore {
            reads: ReadMode::Decrypt(context.clone()),
            writer: context,
            ..self.clone()
        }
    }

    /// The same store, reading as `mode` (appends are unchanged).
    pub fn reading(&self, mode: ReadMode) -> Self {
        EncryptedStore {
            reads: mode,
            ..self.clone()
        }
    }

    /// The store underneath: reading from it directly returns ciphertext.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The encryptor (for rotation, re-wrapping and shredding).
    pub fn encryptor(&self) -> &Arc<FieldEncryptor> {
        &self.encryptor
    }

    /// The context appends are audited under.
    pub fn context(&self) -> &AccessContext {
        &self.writer
    }

    /// How reads treat encrypted fields.
    pub fn read_mode(&self) -> &ReadMode {
        &self.reads
    }

    async fn open(&self, events: &mut [EventEnvelope]) -> chronicle_core::Result<()> {
        match &self.reads {
            ReadMode::Decrypt(context) => {
                self.encryptor.decrypt_events(context, events).await?;
            }
            ReadMode::Redact => {
                for event in events.iter_mut() {
                    redact_event(event);
                }
            }
            ReadMode::Ciphertext => {}
        }
        Ok(())
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventAppender for EncryptedStore<S> {
    async fn append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> chronicle_core::Result<AppendOutcome> {
        let Some(audited) = &self.audited else {
            self.encryptor
                .encrypt_events(&self.writer, aggregate_id, &mut events)
                .await?;
            return self
                .inner
                .append(aggregate_id, aggregate_type, expected, events)
                .await;
        };
        let mut pending = self
            .encryptor
            .encrypt_for_append(&self.writer, aggregate_id, &mut events)
            .await?;
        if pending.is_empty() {
            return self
                .inner
                .append(aggregate_id, aggregate_type, expected, events)
                .await;
        }
        let stored = audited
            .append_audited(
                aggregate_id,
                aggregate_type,
                expected,
                events,
                pending.new_keys().to_vec(),
                pending.take_entries(),
            )
            .await?;
        if stored.outcome.appended {
            self.encryptor.appended(pending, &stored.current_keys);
        }
        Ok(stored.outcome)
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventReader for EncryptedStore<S> {
    async fn read_stream(
        &self,
        aggregate_id: AggregateId,
        from: u32,
        to: Option<u32>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let mut events = self.inner.read_stream(aggregate_id, from, to).await?;
        self.open(&mut events).await?;
        Ok(events)
    }

    async fn read_stream_as_of(
        &self,
        aggregate_id: AggregateId,
        at: DateTime<Utc>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let mut events = self.inner.read_stream_as_of(aggregate_id, at).await?;
        self.open(&mut events).await?;
        Ok(events)
    }

    async fn read_all(&self, after: Position, limit: usize) -> chronicle_core::Result<FeedBatch> {
        let mut batch = self.inner.read_all(after, limit).await?;
        self.open(&mut batch.events).await?;
        Ok(batch)
    }

    async fn read_by_type(
        &self,
        event_type: &str,
        range: TimeRange,
        limit: usize,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let mut events = self.inner.read_by_type(event_type, range, limit).await?;
        self.open(&mut events).await?;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chronicle_core::Validation;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::{
        EncryptionConfig, Error, FieldEncryptorBuilder, LocalKeyring, MemoryAuditSink,
        MemoryDataKeyStore, Redaction, SubjectId,
    };

    /// Just enough of an event store to test the wrapper.
    #[derive(Default)]
    struct VecStore(Mutex<Vec<EventEnvelope>>);

    #[async_trait]
    impl EventAppender for VecStore {
        async fn append(
            &self,
            aggregate_id: AggregateId,
            aggregate_type: &str,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> chronicle_core::Result<AppendOutcome> {
            let mut all = self.0.lock().unwrap();
            let actual = all
                .iter()
                .filter(|e| e.aggregate_id == aggregate_id)
                .count() as u32;
            if expected.as_option().is_some_and(|v| v != actual) {
                return Err(chronicle_core::Error::Conflict {
                    aggregate_id,
                    expected,
                    actual,
                });
            }
            if events.iter().any(|e| !e.data.is_object()) {
                return Err(Validation::new("event_data", "must be an object").into());
            }
            let mut version = actual;
            for e in events {
                version += 1;
                let n = all.len() as i64 + 1;
                all.push(EventEnvelope {
                    event_id: e.event_id,
                    aggregate_id,
                    aggregate_type: aggregate_type.into(),
                    event_type: e.event_type,
                    event_data: e.data,
                    metadata: e.metadata,
                    version,
                    timestamp: Utc::now(),
                    encrypted_fields: e.encrypted_fields,
                    position: Position::new(1, n),
                });
            }
            Ok(AppendOutcome {
                version,
                appended: true,
            })
        }
    }

    #[async_trait]
    impl EventReader for VecStore {
        async fn read_stream(
            &self,
            aggregate_id: AggregateId,
            from: u32,
            to: Option<u32>,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.aggregate_id == aggregate_id)
                .filter(|e| e.version >= from && to.is_none_or(|t| e.version <= t))
                .cloned()
                .collect())
        }

        async fn read_stream_as_of(
            &self,
            aggregate_id: AggregateId,
            _at: DateTime<Utc>,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            self.read_stream(aggregate_id, 1, None).await
        }

        async fn read_all(
            &self,
            after: Position,
            limit: usize,
        ) -> chronicle_core::Result<FeedBatch> {
            let events: Vec<_> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.position > after)
                .take(limit)
                .cloned()
                .collect();
            let next = events.last().map_or(after, |e| e.position);
            Ok(FeedBatch { events, next })
        }

        async fn read_by_type(
            &self,
            event_type: &str,
            _range: TimeRange,
            limit: usize,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.event_type == event_type)
                .take(limit)
                .cloned()
                .collect())
        }
    }

    fn setup() -> (EncryptedStore<VecStore>, Arc<MemoryAuditSink>) {
        let config = EncryptionConfig::from_yaml(
            "encryption:\n  events:\n    UserRegistered:\n      fields: [/email]\n",
        )
        .unwrap();
        let audit = Arc::new(MemoryAuditSink::new());
        let crypto = FieldEncryptorBuilder::new(
            config,
            Arc::new(LocalKeyring::generate().unwrap()),
            Arc::new(MemoryDataKeyStore::new()),
            audit.clone(),
        )
        .build();
        let store = EncryptedStore::new(
            Arc::new(VecStore::default()),
            Arc::new(crypto),
            AccessContext::new("writer", "test"),
        );
        (store, audit)
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<EncryptedStore<VecStore>>();
        send_sync::<EncryptedStore<dyn EventStore>>();
        send_sync::<ReadMode>();
        send_sync::<FieldEncryptor>();
        send_sync::<Error>();
    }

    fn registered() -> NewEvent {
        NewEvent::new(
            "UserRegistered",
            json!({ "email": "ada@example.com", "name": "Ada" }),
        )
    }

    #[tokio::test]
    async fn appends_encrypt_and_reads_follow_the_mode() {
        let (store, audit) = setup();
        let user = Uuid::now_v7();
        store
            .append(user, "user", ExpectedVersion::NoStream, vec![registered()])
            .await
            .unwrap();
        let raw = store.inner().read_stream(user, 1, None).await.unwrap();
        assert_eq!(raw[0].event_data["email"]["$enc"], "v1");
        assert!(!raw[0].event_data.to_string().contains("ada@example.com"));
        assert_eq!(raw[0].event_data["name"], "Ada");

        let read = store.read_stream(user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], "ada@example.com");
        assert!(read[0].encrypted_fields.is_empty());

        let feed = store.read_all(Position::START, 10).await.unwrap();
        assert_eq!(feed.events[0].event_data["email"], "ada@example.com");

        let redacted = store.reading(ReadMode::Redact);
        let read = redacted.read_stream(user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], Redaction::Denied.marker());

        let cipher = store.reading(ReadMode::Ciphertext);
        let read = cipher
            .read_by_type("UserRegistered", TimeRange::default(), 10)
            .await
            .unwrap();
        assert_eq!(read, raw);

        // create-key + encrypt, then two audited decrypts; redaction and
        // ciphertext reads are not decryptions.
        let records = audit.records();
        let ops: Vec<_> = records.iter().map(|r| r.entry.operation.as_str()).collect();
        assert_eq!(ops, ["create-key", "encrypt", "decrypt", "decrypt"]);
        let support = store.with_context(AccessContext::new("support:alice", "ticket-1"));
        support.read_stream(user, 1, None).await.unwrap();
        assert_eq!(audit.records().last().unwrap().entry.actor, "support:alice");
    }

    /// A [`VecStore`] that stores keys and records with its events, as
    /// `PgEventStore` does in one transaction.
    struct Transactional {
        events: VecStore,
        keys: Arc<MemoryDataKeyStore>,
        audit: Arc<MemoryAuditSink>,
    }

    #[async_trait]
    impl AuditedAppender for Transactional {
        async fn append_audited(
            &self,
            aggregate_id: AggregateId,
            aggregate_type: &str,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
            new_keys: Vec<StoredDataKey>,
            audit: Vec<AuditEntry>,
        ) -> chronicle_core::Result<AuditedAppend> {
            let outcome = self
                .events
                .append(aggregate_id, aggregate_type, expected, events)
                .await?;
            let mut current_keys = Vec::new();
            for key in new_keys {
                let id = key.id;
                if let crate::KeyLookup::Found(current) =
                    crate::DataKeyStore::insert_first(&*self.keys, key).await?
                    && current.id == id
                {
                    current_keys.push(id);
                }
            }
            crate::AuditSink::append(&*self.audit, audit).await?;
            Ok(AuditedAppend {
                outcome,
                current_keys,
            })
        }
    }

    #[async_trait]
    impl EventAppender for Transactional {
        async fn append(
            &self,
            aggregate_id: AggregateId,
            aggregate_type: &str,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> chronicle_core::Result<AppendOutcome> {
            self.events
                .append(aggregate_id, aggregate_type, expected, events)
                .await
        }
    }

    #[async_trait]
    impl EventReader for Transactional {
        async fn read_stream(
            &self,
            aggregate_id: AggregateId,
            from: u32,
            to: Option<u32>,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            self.events.read_stream(aggregate_id, from, to).await
        }

        async fn read_stream_as_of(
            &self,
            aggregate_id: AggregateId,
            at: DateTime<Utc>,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            self.events.read_stream_as_of(aggregate_id, at).await
        }

        async fn read_all(
            &self,
            after: Position,
            limit: usize,
        ) -> chronicle_core::Result<FeedBatch> {
            self.events.read_all(after, limit).await
        }

        async fn read_by_type(
            &self,
            event_type: &str,
            range: TimeRange,
            limit: usize,
        ) -> chronicle_core::Result<Vec<EventEnvelope>> {
            self.events.read_by_type(event_type, range, limit).await
        }
    }

    #[tokio::test]
    async fn audit_in_append_stores_keys_and_records_only_with_the_events() {
        let keys = Arc::new(MemoryDataKeyStore::new());
        let audit = Arc::new(MemoryAuditSink::new());
        let crypto = FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(
                "encryption:\n  events:\n    UserRegistered:\n      fields: [/email]\n",
            )
            .unwrap(),
            Arc::new(LocalKeyring::generate().unwrap()),
            keys.clone(),
            audit.clone(),
        )
        .build();
        let inner = Arc::new(Transactional {
            events: VecStore::default(),
            keys: keys.clone(),
            audit: audit.clone(),
        });
        let store = EncryptedStore::new(
            inner,
            Arc::new(crypto),
            AccessContext::new("writer", "test"),
        )
        .audit_in_append();
        assert!(store.audits_in_append());
        let user = Uuid::now_v7();

        // A conflict: no key, no record.
        let err = store
            .append(user, "user", ExpectedVersion::Exact(4), vec![registered()])
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert!(keys.all().is_empty());
        assert!(audit.is_empty());

        // Stored: the key and both records came with the event.
        store
            .append(user, "user", ExpectedVersion::NoStream, vec![registered()])
            .await
            .unwrap();
        assert_eq!(keys.all().len(), 1);
        let ops: Vec<_> = audit
            .records()
            .iter()
            .map(|r| r.entry.operation.as_str())
            .collect();
        assert_eq!(ops, ["create-key", "encrypt"]);
        // The next append uses the cached key: no second key.
        store
            .append(user, "user", ExpectedVersion::Exact(1), vec![registered()])
            .await
            .unwrap();
        assert_eq!(keys.all().len(), 1);
        let read = store.read_stream(user, 1, None).await.unwrap();
        assert!(
            read.iter()
                .all(|e| e.event_data["email"] == "ada@example.com")
        );
    }

    #[tokio::test]
    async fn crypto_errors_surface_typed_and_store_errors_pass_through() {
        let (store, audit) = setup();
        let user = Uuid::now_v7();
        store
            .append(user, "user", ExpectedVersion::NoStream, vec![registered()])
            .await
            .unwrap();
        let err = store
            .append(user, "user", ExpectedVersion::NoStream, vec![registered()])
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err}");

        store
            .encryptor()
            .shred(
                &AccessContext::new("dpo", "erasure"),
                &SubjectId::from_aggregate(user),
            )
            .await
            .unwrap();
        let read = store.read_stream(user, 1, None).await.unwrap();
        assert_eq!(read[0].event_data["email"], Redaction::Shredded.marker());
        let err = store
            .append(user, "user", ExpectedVersion::Any, vec![registered()])
            .await
            .unwrap_err();
        assert!(
            matches!(
                Error::in_store_error(&err),
                Some(Error::SubjectShredded { .. })
            ),
            "{err}"
        );

        audit.set_failing(true);
        let err = store.read_stream(user, 1, None).await.unwrap_err();
        assert!(
            matches!(Error::in_store_error(&err), Some(Error::Audit { .. })),
            "{err}"
        );
        let err = store
            .append(
                Uuid::now_v7(),
                "user",
                ExpectedVersion::NoStream,
                vec![registered()],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("audit log unavailable"), "{err}");
    }
}
