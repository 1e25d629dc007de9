//! [`FieldEncryptor`]: encrypts configured fields of new events, decrypts
//! stored ones, and carries out rotation, re-wrapping and shredding, writing
//! an audit entry for each operation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chronicle_core::{AggregateId, EventEnvelope, NewEvent};
use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;
use zeroize::Zeroize;

use crate::audit::{AccessContext, AuditEntry, AuditOperation, AuditOutcome, AuditSink};
use crate::cache::{Cached, KeyCache};
use crate::config::{EncryptionConfig, EventRule, FieldPointer};
use crate::envelope::{self, LiveKey, Redaction, is_envelope};
use crate::keys::{DataKeyId, KeyProvider, SubjectId, WrapContext};
use crate::store::{DataKeyStore, KeyLookup, StoredDataKey};
use crate::{Error, Result};

/// What a reader asks to see: one field of one event.
#[derive(Debug, Clone, Copy)]
pub struct FieldAccess<'a> {
    /// The event.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: &'a str,
    /// The field's JSON pointer.
    pub field: &'a str,
    /// Whose data it is.
    pub subject: &'a SubjectId,
}

/// Decides whether a reader may see a field in plaintext. A refused reader
/// gets the [`Redaction::Denied`] marker, and the refusal is audited.
///
/// Closures `Fn(&AccessContext, &FieldAccess) -> bool` are policies:
///
/// ```
/// use chronicle_crypto::{AccessContext, AccessPolicy, FieldAccess};
///
/// let support_only = |ctx: &AccessContext, _: &FieldAccess<'_>| ctx.actor.starts_with("support:");
/// # fn takes(_: &dyn AccessPolicy) {}
/// takes(&support_only);
/// ```
pub trait AccessPolicy: Send + Sync {
    /// Whether `context` may read `access` in plaintext.
    fn allows(&self, context: &AccessContext, access: &FieldAccess<'_>) -> bool;
}

/// The policy that allows every reader holding the keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl AccessPolicy for AllowAll {
    fn allows(&self, _: &AccessContext, _: &FieldAccess<'_>) -> bool {
        true
    }
}

impl<F> AccessPolicy for F
where
    F: Fn(&AccessContext, &FieldAccess<'_>) -> bool + Send + Sync,
{
    fn allows(&self, context: &AccessContext, access: &FieldAccess<'_>) -> bool {
        self(context, access)
    }
}

/// Counts of a decryption call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecryptSummary {
    /// Fields replaced by their plaintext.
    pub decrypted: usize,
    /// Fields replaced by (or already holding) a redaction marker.
    pub redacted: usize,
}

/// One page of a re-wrap run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapPage {
    /// Keys examined.
    pub scanned: usize,
    /// Keys re-wrapped under the current KEK (the others already were).
    pub rewrapped: usize,
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<DataKeyId>,
}

/// Totals of a re-wrap run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapProgress {
    /// Keys examined.
    pub scanned: u64,
    /// Keys re-wrapped.
    pub rewrapped: u64,
    /// The cursor to resume after, if the run stops here.
    pub resume_after: Option<DataKeyId>,
}

/// Builds a [`FieldEncryptor`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use chronicle_crypto::{EncryptionConfig, FieldEncryptorBuilder, LocalKeyring, MemoryAuditSink, MemoryDataKeyStore};
///
/// let encryptor = FieldEncryptorBuilder::new(
///     EncryptionConfig::new(),
///     Arc::new(LocalKeyring::generate()?),
///     Arc::new(MemoryDataKeyStore::new()),
///     Arc::new(MemoryAuditSink::new()),
/// )
/// .cache_capacity(1_000)
/// .cache_ttl(Duration::from_secs(60))
/// .build();
/// # Ok::<(), chronicle_crypto::Error>(())
/// ```
pub struct FieldEncryptorBuilder {
    config: EncryptionConfig,
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn DataKeyStore>,
    audit: Arc<dyn AuditSink>,
    policy: Arc<dyn AccessPolicy>,
    cache_capacity: usize,
    cache_ttl: Duration,
}

impl FieldEncryptorBuilder {
    /// A builder from the configuration, the KEK provider, the data-key
    /// store and the audit sink.
    pub fn new(
        config: EncryptionConfig,
        provider: Arc<dyn KeyProvider>,
        store: Arc<dyn DataKeyStore>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        FieldEncryptorBuilder {
            config,
            provider,
            store,
            audit,
            policy: Arc::new(AllowAll),
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(300),
        }
    }

    /// Who may read plaintext. Default: [`AllowAll`].
    pub fn access_policy(&mut self, policy: Arc<dyn AccessPolicy>) -> &mut Self {
        self.policy = policy;
        self
    }

    /// How many unwrapped data keys to keep in memory. `0` disables the
    /// cache (every field then calls the store and the key provider).
    /// Default: 10 000.
    pub fn cache_capacity(&mut self, capacity: usize) -> &mut Self {
        self.cache_capacity = capacity;
        self
    }

    /// How long an unwrapped key stays cached: the longest time in which this
    /// process may still use a key after another process rotated or
    /// shredded it. (Shredding through this encryptor takes effect at
    /// once.) Default: 5 minutes.
    pub fn cache_ttl(&mut self, ttl: Duration) -> &mut Self {
        self.cache_ttl = ttl;
        self
    }

    /// The encryptor.
    pub fn build(&self) -> FieldEncryptor {
        FieldEncryptor {
            config: self.config.clone(),
            provider: Arc::clone(&self.provider),
            store: Arc::clone(&self.store),
            audit: Arc::clone(&self.audit),
            policy: Arc::clone(&self.policy),
            cache: KeyCache::new(self.cache_capacity, self.cache_ttl),
        }
    }
}

/// Encrypts and decrypts the configured fields of events, and manages data
/// keys: rotation, re-wrapping under a new KEK, re-encryption, shredding.
///
/// Every call collects one audit entry per operation, subject, key and
/// outcome (listing the events and fields covered) and hands them to the
/// [`AuditSink`] in one batch *before* it changes the caller's events: if
/// the sink fails, the call fails and the events are left exactly as they
/// were, so no plaintext is released (and no ciphertext handed out) without
/// its audit record. ([`FieldEncryptor::encrypt_for_append`] hands an
/// append's entries to the caller, to store with the events.)
///
/// Share one encryptor per process (`Arc<FieldEncryptor>`): it caches
/// unwrapped data keys.
pub struct FieldEncryptor {
    config: EncryptionConfig,
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn DataKeyStore>,
    audit: Arc<dyn AuditSink>,
    policy: Arc<dyn AccessPolicy>,
    cache: KeyCache,
}

enum Resolved {
    Key(KeyRef),
    Shredded(SubjectId),
    Missing,
}

/// A usable data key: already unwrapped (cached), or still wrapped.
enum KeyRef {
    Live(Arc<LiveKey>),
    Stored(StoredDataKey),
}

impl KeyRef {
    fn subject(&self) -> &SubjectId {
        match self {
            KeyRef::Live(k) => &k.subject,
            KeyRef::Stored(row) => &row.subject,
        }
    }
}

impl FieldEncryptor {
    /// The configuration in use.
    pub fn config(&self) -> &EncryptionConfig {
        &self.config
    }

    /// The subject of an event about to be appended to `aggregate_id`, if
    /// its type has encrypted fields.
    pub fn subject_of(
        &self,
        aggregate_id: AggregateId,
        event: &NewEvent,
    ) -> Result<Option<SubjectId>> {
        match self.config.rule(&event.event_type) {
            Some(rule) => subject_for(rule, aggregate_id, event).map(Some),
            None => Ok(None),
        }
    }

    /// Encrypts the configured fields of one event; see
    /// [`FieldEncryptor::encrypt_events`].
    pub async fn encrypt(
        &self,
        context: &AccessContext,
        aggregate_id: AggregateId,
        event: &mut NewEvent,
    ) -> Result<usize> {
        self.encrypt_events(context, aggregate_id, std::slice::from_mut(event))
            .await
    }

    /// Encrypts the configured fields of events about to be appended to
    /// `aggregate_id`: each present field's value becomes an envelope and its
    /// pointer is added to `encrypted_fields`. Absent fields are skipped, and
    /// so are fields already encrypted (a retried append). The subject's
    /// current data key is made on first use. Returns how many fields were
    /// encrypted.
    ///
    /// The audit entries (one `encrypt` per subject and key, listing the
    /// events and fields; `create-key` for a subject's first key) are
    /// written through the [`AuditSink`] before the events are changed. To
    /// store them in the append's own transaction instead, use
    /// [`FieldEncryptor::encrypt_for_append`].
    ///
    /// On error nothing is changed.
    pub async fn encrypt_events(
        &self,
        context: &AccessContext,
        aggregate_id: AggregateId,
        events: &mut [NewEvent],
    ) -> Result<usize> {
        let (sealed, audit) = self.seal_all(context, aggregate_id, events, None).await?;
        if audit.is_empty() {
            return Ok(0);
        }
        self.write_audit(audit).await?;
        Ok(apply_sealed(events, sealed))
    }

    /// Encrypts like [`FieldEncryptor::encrypt_events`], but neither
    /// writes the audit entries nor stores the data keys it makes (a
    /// subject's first key): it hands both to the caller, who must store
    /// them in the same transaction as the events (see
    /// [`crate::AuditedAppender`]), so that an event is stored with its
    /// `encrypt` record and its key, or nothing is. After a successful
    /// append, pass the [`PendingAudit`] to [`FieldEncryptor::appended`] so
    /// that the new keys are cached; otherwise drop it.
    ///
    /// On error nothing is changed.
    pub async fn encrypt_for_append(
        &self,
        context: &AccessContext,
        aggregate_id: AggregateId,
        events: &mut [NewEvent],
    ) -> Result<PendingAudit> {
        let mut new_keys = Vec::new();
        let (sealed, entries) = self
            .seal_all(context, aggregate_id, events, Some(&mut new_keys))
            .await?;
        let fields = apply_sealed(events, sealed);
        let (keys, live) = new_keys.into_iter().unzip();
        Ok(PendingAudit {
            fields,
            entries,
            keys,
            live,
        })
    }

    /// Caches the data keys of `pending` once they are stored with its
    /// events, so that reads of those events find them without a lookup;
    /// those in `current` (the ones that became their subjects' current
    /// key) as current, so the subject's next encryption needs no lookup
    /// either. When two writers make a subject's first key at once, both
    /// keys are stored but only one becomes current: the other is cached
    /// for reads only, and its writer looks the current key up next time
    /// rather than keep using a key that lost.
    pub fn appended(&self, pending: PendingAudit, current: &[DataKeyId]) {
        for key in pending.live {
            let is_current = current.contains(&key.id);
            self.cache.insert(key, is_current);
        }
    }

    /// Seals every configured field of `events`, without changing them:
    /// the envelopes to put in place, and the audit entries.
    async fn seal_all<'c>(
        &'c self,
        context: &AccessContext,
        aggregate_id: AggregateId,
        events: &[NewEvent],
        mut deferred: Option<&mut Vec<(StoredDataKey, Arc<LiveKey>)>>,
    ) -> Result<(Vec<Sealed<'c>>, Vec<AuditEntry>)> {
        let mut sealed: Vec<Sealed<'c>> = Vec::new();
        let mut audit: Vec<AuditEntry> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let Some(rule) = self.config.rule(&event.event_type) else {
                continue;
            };
            if !event.data.is_object() {
                return Err(invalid_event(
                    event.event_id,
                    &event.event_type,
                    "event data must be a JSON object for its fields to be encrypted".into(),
                ));
            }
            let subject = subject_for(rule, aggregate_id, event)?;
            let mut key: Option<(Arc<LiveKey>, usize)> = None;
            for field in rule.fields() {
                let Some(value) = field.get(&event.data) else {
                    continue;
                };
                if is_envelope(value) && event.encrypted_fields.iter().any(|f| f == field.as_str())
                {
                    continue;
                }
                let (key, entry) = match &key {
                    Some((k, e)) => (Arc::clone(k), *e),
                    None => {
                        let k = self
                            .current_key(context, &subject, &mut audit, deferred.as_deref_mut())
                            .await?;
                        let e = match audit.iter().position(|a| {
                            a.operation == AuditOperation::Encrypt && a.key_id == Some(k.id)
                        }) {
                            Some(e) => e,
                            None => {
                                audit.push(
                                    AuditEntry::new(
                                        AuditOperation::Encrypt,
                                        AuditOutcome::Success,
                                        context,
                                    )
                                    .with_subject(&k.subject)
                                    .with_key(k.id),
                                );
                                audit.len() - 1
                            }
                        };
                        key = Some((Arc::clone(&k), e));
                        (k, e)
                    }
                };
                let envelope =
                    envelope::seal(&key, event.event_id, aggregate_id, field.as_str(), value)
                        .map_err(|_| {
                            invalid_event(
                                event.event_id,
                                &event.event_type,
                                format!("field {field} is too large to encrypt"),
                            )
                        })?;
                audit[entry].add(event.event_id, field.as_str());
                sealed.push((i, field, envelope));
            }
        }
        Ok((sealed, audit))
    }

    /// Decrypts one stored event; see [`FieldEncryptor::decrypt_events`].
    pub async fn decrypt(
        &self,
        context: &AccessContext,
        event: &mut EventEnvelope,
    ) -> Result<DecryptSummary> {
        self.decrypt_events(context, std::slice::from_mut(event))
            .await
    }

    /// Decrypts stored events in place: every envelope listed in
    /// `encrypted_fields` is replaced by its plaintext value, or by a
    /// redaction marker if the subject was shredded
    /// ([`Redaction::Shredded`]) or the [`AccessPolicy`] refuses the reader
    /// ([`Redaction::Denied`]); `encrypted_fields` is then cleared.
    ///
    /// Fails, naming the event and field, on a tampered or moved ciphertext,
    /// a wrong key ([`Error::Tampered`]), an unknown key, or a malformed
    /// envelope; failures are audited too. On error, or if the audit sink
    /// fails, nothing is changed.
    pub async fn decrypt_events(
        &self,
        context: &AccessContext,
        events: &mut [EventEnvelope],
    ) -> Result<DecryptSummary> {
        let mut opened: Vec<(usize, usize, Value)> = Vec::new();
        let mut audit = Vec::new();
        let mut summary = DecryptSummary::default();
        let collected = self
            .collect_decrypted(context, events, &mut opened, &mut audit, &mut summary)
            .await;
        let written = match collected {
            Ok(()) if audit.is_empty() => Ok(()),
            Ok(()) => self.write_audit(audit).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            opened.into_iter().for_each(|(_, _, v)| scrub(v));
            return Err(e);
        }
        for (i, f, value) in opened {
            let event = &mut events[i];
            if let Some(slot) =
                crate::config::lookup_mut(&mut event.event_data, &event.encrypted_fields[f])
            {
                *slot = value;
            }
        }
        for event in events.iter_mut() {
            event.encrypted_fields.clear();
        }
        Ok(summary)
    }

    async fn collect_decrypted(
        &self,
        context: &AccessContext,
        events: &[EventEnvelope],
        opened: &mut Vec<(usize, usize, Value)>,
        audit: &mut Vec<AuditEntry>,
        summary: &mut DecryptSummary,
    ) -> Result<()> {
        // Parse every envelope first, so that each key is looked up once.
        let mut sealed: Vec<(usize, usize, envelope::Envelope)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            for (f, field) in event.encrypted_fields.iter().enumerate() {
                let Some(value) = crate::config::lookup(&event.event_data, field) else {
                    return Err(malformed(
                        event.event_id,
                        field,
                        "listed in encrypted_fields but absent from the event data".into(),
                    ));
                };
                if Redaction::from_marker(value).is_some() {
                    summary.redacted += 1;
                    continue;
                }
                let parsed = envelope::parse(value)
                    .map_err(|reason| malformed(event.event_id, field, reason))?;
                sealed.push((i, f, parsed));
            }
        }
        if sealed.is_empty() {
            return Ok(());
        }
        let mut keys = self
            .resolve_many(sealed.iter().map(|(_, _, e)| e.kid))
            .await?;
        // One entry per outcome and key (so per subject), listing events
        // and fields.
        let mut groups: HashMap<(AuditOutcome, DataKeyId), usize> = HashMap::new();
        let mut group = |outcome: AuditOutcome, subject: &SubjectId, kid: DataKeyId| {
            *groups.entry((outcome, kid)).or_insert_with(|| {
                audit.push(
                    AuditEntry::new(AuditOperation::Decrypt, outcome, context)
                        .with_subject(subject)
                        .with_key(kid),
                );
                audit.len() - 1
            })
        };
        // (entry, event, field) of every field handled.
        let mut success: Vec<(usize, usize, usize)> = Vec::new();
        for (i, f, parsed) in sealed {
            let event = &events[i];
            let field = &event.encrypted_fields[f];
            let kid = parsed.kid;
            let failure = |outcome| {
                AuditEntry::new(AuditOperation::Decrypt, outcome, context)
                    .with_key(kid)
                    .with_field(event.event_id, field)
            };
            let slot = keys.get_mut(&kid);
            let subject = match slot.as_deref() {
                None | Some(Resolved::Missing) => {
                    self.audit_failure(failure(AuditOutcome::Failed)).await;
                    return Err(Error::UnknownDataKey {
                        event_id: event.event_id,
                        field: field.clone(),
                        key_id: kid,
                    });
                }
                Some(Resolved::Shredded(subject)) => {
                    let g = group(AuditOutcome::Shredded, subject, kid);
                    success.push((g, i, f));
                    opened.push((i, f, Redaction::Shredded.marker()));
                    summary.redacted += 1;
                    continue;
                }
                Some(Resolved::Key(key)) => key.subject().clone(),
            };
            let Some(slot) = slot else {
                unreachable!("a missing key was handled above")
            };
            let access = FieldAccess {
                event_id: event.event_id,
                event_type: &event.event_type,
                field,
                subject: &subject,
            };
            if !self.policy.allows(context, &access) {
                let g = group(AuditOutcome::Denied, &subject, kid);
                success.push((g, i, f));
                opened.push((i, f, Redaction::Denied.marker()));
                summary.redacted += 1;
                continue;
            }
            let key = match slot {
                Resolved::Key(KeyRef::Live(k)) => Arc::clone(k),
                Resolved::Key(KeyRef::Stored(row)) => {
                    let k = self.unwrap_row(row).await?;
                    self.cache.insert(Arc::clone(&k), false);
                    *slot = Resolved::Key(KeyRef::Live(Arc::clone(&k)));
                    k
                }
                Resolved::Missing | Resolved::Shredded(_) => unreachable!("handled above"),
            };
            let Some(plain) =
                envelope::open(&key, event.event_id, event.aggregate_id, field, parsed)
            else {
                self.audit_failure(failure(AuditOutcome::Failed).with_subject(&subject))
                    .await;
                return Err(Error::Tampered {
                    event_id: event.event_id,
                    field: field.clone(),
                    key_id: kid,
                });
            };
            let value: Value = serde_json::from_slice(&plain).map_err(|_| {
                malformed(
                    event.event_id,
                    field,
                    "the decrypted value is not JSON".into(),
                )
            })?;
            let g = group(AuditOutcome::Success, &subject, kid);
            success.push((g, i, f));
            opened.push((i, f, value));
            summary.decrypted += 1;
        }
        // Fill in the entries' events and fields, in order.
        for (g, i, f) in success {
            let event = &events[i];
            audit[g].add(event.event_id, &event.encrypted_fields[f]);
        }
        Ok(())
    }

    /// Re-encrypts fields of stored events under their subject's current
    /// data key (after [`FieldEncryptor::rotate_data_key`]), in place,
    /// without releasing plaintext. Fields already under the current key and
    /// fields of shredded subjects are left alone; `encrypted_fields` stays
    /// as it is. Returns how many fields were re-encrypted; the caller then
    /// writes the events back.
    ///
    /// On error nothing is changed.
    pub async fn reencrypt_events(
        &self,
        context: &AccessContext,
        events: &mut [EventEnvelope],
    ) -> Result<usize> {
        let mut resealed: Vec<(usize, usize, Value)> = Vec::new();
        let mut audit = Vec::new();
        for (i, event) in events.iter().enumerate() {
            for (f, field) in event.encrypted_fields.iter().enumerate() {
                let Some(value) = crate::config::lookup(&event.event_data, field) else {
                    return Err(malformed(
                        event.event_id,
                        field,
                        "listed in encrypted_fields but absent from the event data".into(),
                    ));
                };
                if Redaction::from_marker(value).is_some() {
                    continue;
                }
                let parsed = envelope::parse(value)
                    .map_err(|reason| malformed(event.event_id, field, reason))?;
                let kid = parsed.kid;
                let old = match self.resolve(kid).await? {
                    Resolved::Shredded(_) => continue,
                    Resolved::Missing => {
                        return Err(Error::UnknownDataKey {
                            event_id: event.event_id,
                            field: field.clone(),
                            key_id: kid,
                        });
                    }
                    Resolved::Key(key) => self.load(key).await?,
                };
                let current = self
                    .current_key(context, &old.subject, &mut audit, None)
                    .await?;
                if current.id == old.id {
                    continue;
                }
                let Some(plain) =
                    envelope::open(&old, event.event_id, event.aggregate_id, field, parsed)
                else {
                    self.audit_failure(
                        AuditEntry::new(AuditOperation::Reencrypt, AuditOutcome::Failed, context)
                            .with_subject(&old.subject)
                            .with_key(kid)
                            .with_field(event.event_id, field),
                    )
                    .await;
                    return Err(Error::Tampered {
                        event_id: event.event_id,
                        field: field.clone(),
                        key_id: kid,
                    });
                };
                let value: Value = serde_json::from_slice(&plain).map_err(|_| {
                    malformed(
                        event.event_id,
                        field,
                        "the decrypted value is not JSON".into(),
                    )
                })?;
                let sealed =
                    envelope::seal(&current, event.event_id, event.aggregate_id, field, &value);
                scrub(value);
                let sealed = sealed.map_err(|_| {
                    invalid_event(
                        event.event_id,
                        &event.event_type,
                        format!("field {field} is too large to encrypt"),
                    )
                })?;
                let entry = match audit.iter().position(|a| {
                    a.operation == AuditOperation::Reencrypt && a.key_id == Some(current.id)
                }) {
                    Some(e) => e,
                    None => {
                        audit.push(
                            AuditEntry::new(
                                AuditOperation::Reencrypt,
                                AuditOutcome::Success,
                                context,
                            )
                            .with_subject(&current.subject)
                            .with_key(current.id),
                        );
                        audit.len() - 1
                    }
                };
                audit[entry].add(event.event_id, field);
                resealed.push((i, f, sealed));
            }
        }
        if audit.is_empty() {
            return Ok(0);
        }
        self.write_audit(audit).await?;
        let count = resealed.len();
        for (i, f, value) in resealed {
            let event = &mut events[i];
            if let Some(slot) =
                crate::config::lookup_mut(&mut event.event_data, &event.encrypted_fields[f])
            {
                *slot = value;
            }
        }
        Ok(count)
    }

    /// Gives the subject a new current data key: new fields are encrypted
    /// under it, fields under older keys stay readable. Returns the new
    /// key's id.
    pub async fn rotate_data_key(
        &self,
        context: &AccessContext,
        subject: &SubjectId,
    ) -> Result<DataKeyId> {
        let id = DataKeyId::new();
        let wrap_context = WrapContext {
            subject,
            data_key_id: id,
        };
        let (key, wrapped) = self.provider.generate_data_key(&wrap_context).await?;
        let kek_id = wrapped.kek_id.clone();
        let row = StoredDataKey {
            id,
            subject: subject.clone(),
            wrapped,
            created_at: Utc::now(),
        };
        match self.store.insert_current(row).await? {
            KeyLookup::Found(_) => {}
            KeyLookup::Shredded { .. } => {
                return Err(Error::SubjectShredded {
                    subject: subject.clone(),
                });
            }
            KeyLookup::Missing => {
                return Err(Error::Backend {
                    message: format!("the data-key store did not keep the new key {id}"),
                    source: None,
                });
            }
        }
        self.cache
            .insert(Arc::new(LiveKey::new(id, subject.clone(), &key)), true);
        self.write_audit(vec![
            AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, context)
                .with_subject(subject)
                .with_key(id)
                .with_kek(&kek_id),
        ])
        .await?;
        Ok(id)
    }

    /// Re-wraps up to `limit` data keys after `after` under the key
    /// provider's current KEK, without touching any event. Keys already
    /// under the current KEK are skipped, so a run can be repeated or
    /// resumed from any cursor.
    pub async fn rewrap_page(
        &self,
        context: &AccessContext,
        after: Option<DataKeyId>,
        limit: usize,
    ) -> Result<RewrapPage> {
        let limit = limit.max(1);
        let target = self.provider.current_key_id();
        let rows = self.store.list(after, limit).await?;
        let mut audit = Vec::new();
        for row in &rows {
            if row.wrapped.kek_id == target {
                continue;
            }
            let wrap_context = WrapContext {
                subject: &row.subject,
                data_key_id: row.id,
            };
            let key = self.provider.unwrap(&row.wrapped, &wrap_context).await?;
            let rewrapped = self.provider.wrap(&key, &wrap_context).await?;
            let kek_id = rewrapped.kek_id.clone();
            if self
                .store
                .replace_wrapped(row.id, &row.wrapped.kek_id, rewrapped)
                .await?
            {
                audit.push(
                    AuditEntry::new(AuditOperation::Rewrap, AuditOutcome::Success, context)
                        .with_subject(&row.subject)
                        .with_key(row.id)
                        .with_kek(&kek_id),
                );
            }
        }
        let rewrapped = audit.len();
        if !audit.is_empty() {
            self.write_audit(audit).await?;
        }
        Ok(RewrapPage {
            scanned: rows.len(),
            rewrapped,
            next: if rows.len() == limit {
                rows.last().map(|r| r.id)
            } else {
                None
            },
        })
    }

    /// Re-wraps every data key under the current KEK, `batch_size` keys per
    /// page, calling `progress` after each page. Afterwards the old KEKs
    /// can be removed from the key provider.
    pub async fn rewrap_all<F>(
        &self,
        context: &AccessContext,
        batch_size: usize,
        mut progress: F,
    ) -> Result<RewrapProgress>
    where
        F: FnMut(&RewrapProgress) + Send,
    {
        let mut total = RewrapProgress::default();
        loop {
            let page = self
                .rewrap_page(context, total.resume_after, batch_size)
                .await?;
            total.scanned += page.scanned as u64;
            total.rewrapped += page.rewrapped as u64;
            if page.next.is_some() {
                total.resume_after = page.next;
            }
            progress(&total);
            if page.next.is_none() {
                return Ok(total);
            }
        }
    }

    /// Destroys every data key of the subject: its fields become
    /// permanently unreadable (readers get [`Redaction::Shredded`]), and no
    /// new data can be encrypted for it. Events stay intact and replayable.
    /// Returns the destroyed key ids.
    pub async fn shred(
        &self,
        context: &AccessContext,
        subject: &SubjectId,
    ) -> Result<Vec<DataKeyId>> {
        let ids = self.store.shred(subject).await?;
        self.cache.shred(subject, &ids);
        let entry = || {
            AuditEntry::new(AuditOperation::Shred, AuditOutcome::Success, context)
                .with_subject(subject)
        };
        let entries = if ids.is_empty() {
            vec![entry()]
        } else {
            ids.iter().map(|id| entry().with_key(*id)).collect()
        };
        self.write_audit(entries).await?;
        Ok(ids)
    }

    /// Drops this process's cached keys of `subject`, so that the next use
    /// reads the store: call it when another process announces a rotation
    /// or a shred of the subject (e.g. over `LISTEN`/`NOTIFY`), to close
    /// the window left by the cache TTL.
    pub fn forget_subject(&self, subject: &SubjectId) {
        self.cache.forget(subject);
    }

    /// Drops every cached live key (shredded tombstones stay, they are
    /// permanent): for when announcements of other processes' rotations
    /// and shreds may have been missed, e.g. after a lost `LISTEN`
    /// connection.
    pub fn forget_all_keys(&self) {
        self.cache.clear();
    }

    /// The subject's current key: cached, stored, or made now. With
    /// `deferred`, a new key is not stored but handed back there, to be
    /// stored with the events it encrypts (and cached once it is).
    async fn current_key(
        &self,
        context: &AccessContext,
        subject: &SubjectId,
        audit: &mut Vec<AuditEntry>,
        deferred: Option<&mut Vec<(StoredDataKey, Arc<LiveKey>)>>,
    ) -> Result<Arc<LiveKey>> {
        if let Some(key) = self.cache.current(subject) {
            return Ok(key);
        }
        if let Some((_, key)) = deferred
            .as_deref()
            .and_then(|d| d.iter().find(|(row, _)| &row.subject == subject))
        {
            return Ok(Arc::clone(key));
        }
        let key = match self.store.current(subject).await? {
            KeyLookup::Found(row) => self.unwrap_row(&row).await?,
            KeyLookup::Shredded { .. } => {
                return Err(Error::SubjectShredded {
                    subject: subject.clone(),
                });
            }
            KeyLookup::Missing => {
                let id = DataKeyId::new();
                let wrap_context = WrapContext {
                    subject,
                    data_key_id: id,
                };
                let (key, wrapped) = self.provider.generate_data_key(&wrap_context).await?;
                let kek_id = wrapped.kek_id.clone();
                let row = StoredDataKey {
                    id,
                    subject: subject.clone(),
                    wrapped,
                    created_at: Utc::now(),
                };
                let created =
                    AuditEntry::new(AuditOperation::CreateKey, AuditOutcome::Success, context)
                        .with_subject(subject)
                        .with_key(id)
                        .with_kek(&kek_id);
                if let Some(deferred) = deferred {
                    let live = Arc::new(LiveKey::new(id, subject.clone(), &key));
                    audit.push(created);
                    deferred.push((row, Arc::clone(&live)));
                    return Ok(live);
                }
                match self.store.insert_first(row).await? {
                    KeyLookup::Found(winner) if winner.id == id => {
                        audit.push(created);
                        Arc::new(LiveKey::new(id, subject.clone(), &key))
                    }
                    KeyLookup::Found(winner) => self.unwrap_row(&winner).await?,
                    KeyLookup::Shredded { .. } => {
                        return Err(Error::SubjectShredded {
                            subject: subject.clone(),
                        });
                    }
                    KeyLookup::Missing => {
                        return Err(Error::Backend {
                            message: format!(
                                "the data-key store did not keep the first key of subject {subject}"
                            ),
                            source: None,
                        });
                    }
                }
            }
        };
        self.cache.insert(Arc::clone(&key), true);
        Ok(key)
    }

    async fn resolve(&self, id: DataKeyId) -> Result<Resolved> {
        match self.cache.get(id) {
            Some(Cached::Live(key)) => return Ok(Resolved::Key(KeyRef::Live(key))),
            Some(Cached::Shredded(subject)) => return Ok(Resolved::Shredded(subject)),
            None => {}
        }
        Ok(match self.store.get(id).await? {
            KeyLookup::Found(row) => Resolved::Key(KeyRef::Stored(row)),
            KeyLookup::Shredded { subject } => {
                self.cache.insert_shredded(id, subject.clone());
                Resolved::Shredded(subject)
            }
            KeyLookup::Missing => Resolved::Missing,
        })
    }

    /// Resolves each distinct key id once: from the cache, and the rest
    /// with one lookup in the data-key store.
    async fn resolve_many(
        &self,
        ids: impl Iterator<Item = DataKeyId>,
    ) -> Result<HashMap<DataKeyId, Resolved>> {
        let mut resolved: HashMap<DataKeyId, Resolved> = HashMap::new();
        let mut missing: Vec<DataKeyId> = Vec::new();
        for id in ids {
            if resolved.contains_key(&id) {
                continue;
            }
            let slot = match self.cache.get(id) {
                Some(Cached::Live(key)) => Resolved::Key(KeyRef::Live(key)),
                Some(Cached::Shredded(subject)) => Resolved::Shredded(subject),
                None => {
                    missing.push(id);
                    Resolved::Missing
                }
            };
            resolved.insert(id, slot);
        }
        if !missing.is_empty() {
            for (id, lookup) in self.store.get_many(&missing).await? {
                let slot = match lookup {
                    KeyLookup::Found(row) => Resolved::Key(KeyRef::Stored(row)),
                    KeyLookup::Shredded { subject } => {
                        self.cache.insert_shredded(id, subject.clone());
                        Resolved::Shredded(subject)
                    }
                    KeyLookup::Missing => Resolved::Missing,
                };
                resolved.insert(id, slot);
            }
        }
        Ok(resolved)
    }

    /// Unwraps a stored key (and caches it) unless it already is.
    async fn load(&self, key: KeyRef) -> Result<Arc<LiveKey>> {
        match key {
            KeyRef::Live(k) => Ok(k),
            KeyRef::Stored(row) => {
                let k = self.unwrap_row(&row).await?;
                self.cache.insert(Arc::clone(&k), false);
                Ok(k)
            }
        }
    }

    async fn unwrap_row(&self, row: &StoredDataKey) -> Result<Arc<LiveKey>> {
        let key = self
            .provider
            .unwrap(
                &row.wrapped,
                &WrapContext {
                    subject: &row.subject,
                    data_key_id: row.id,
                },
            )
            .await?;
        Ok(Arc::new(LiveKey::new(row.id, row.subject.clone(), &key)))
    }

    async fn write_audit(&self, entries: Vec<AuditEntry>) -> Result<()> {
        self.audit.append(entries).await.map_err(|e| match e {
            Error::Audit { .. } => e,
            other => Error::Audit {
                message: other.to_string(),
                source: Some(Box::new(other)),
            },
        })
    }

    /// Records a failed operation. Best effort: the caller is about to
    /// return the failure itself.
    async fn audit_failure(&self, entry: AuditEntry) {
        let _ = self.audit.append(vec![entry]).await;
    }
}

/// An envelope to put in place: (event index, field, envelope).
type Sealed<'c> = (usize, &'c FieldPointer, Value);

/// Replaces the sealed fields' values by their envelopes and lists them in
/// `encrypted_fields`; returns how many.
fn apply_sealed(events: &mut [NewEvent], sealed: Vec<Sealed<'_>>) -> usize {
    let count = sealed.len();
    for (i, field, envelope) in sealed {
        let event = &mut events[i];
        if let Some(slot) = field.get_mut(&mut event.data) {
            scrub(std::mem::replace(slot, envelope));
        }
        if !event.encrypted_fields.iter().any(|f| f == field.as_str()) {
            event.encrypted_fields.push(field.as_str().to_owned());
        }
    }
    count
}

/// The audit entries of an encryption whose events are about to be
/// appended ([`FieldEncryptor::encrypt_for_append`]): to be stored in the
/// same transaction as the events.
#[must_use = "the audit entries and new keys must be stored with the events"]
pub struct PendingAudit {
    fields: usize,
    entries: Vec<AuditEntry>,
    keys: Vec<StoredDataKey>,
    live: Vec<Arc<LiveKey>>,
}

impl std::fmt::Debug for PendingAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAudit")
            .field("fields", &self.fields)
            .field("entries", &self.entries)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl PendingAudit {
    /// How many fields were encrypted.
    pub fn fields(&self) -> usize {
        self.fields
    }

    /// Whether there is nothing to audit (no field was encrypted).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[AuditEntry] {
        &self.entries
    }

    /// Takes the entries, to store (they are then gone from `self`).
    pub fn take_entries(&mut self) -> Vec<AuditEntry> {
        std::mem::take(&mut self.entries)
    }

    /// The data keys made for subjects that had none: wrapped, not yet
    /// stored. The appender stores them with the events (each becomes its
    /// subject's current key unless another writer's first key got there
    /// first, in which case it is kept as one more key of the subject).
    pub fn new_keys(&self) -> &[StoredDataKey] {
        &self.keys
    }
}

fn subject_for(rule: &EventRule, aggregate_id: AggregateId, event: &NewEvent) -> Result<SubjectId> {
    let Some(pointer) = rule.subject() else {
        return Ok(SubjectId::from_aggregate(aggregate_id));
    };
    match pointer.get(&event.data) {
        Some(Value::String(s)) if !s.is_empty() => Ok(SubjectId::new(s.clone())),
        Some(Value::Number(n)) => Ok(SubjectId::new(n.to_string())),
        Some(_) => Err(invalid_event(
            event.event_id,
            &event.event_type,
            format!("the subject field {pointer} must be a non-empty string or a number"),
        )),
        None => Err(invalid_event(
            event.event_id,
            &event.event_type,
            format!("the subject field {pointer} is missing; it names whose data the event holds"),
        )),
    }
}

fn invalid_event(event_id: Uuid, event_type: &str, reason: String) -> Error {
    Error::InvalidEvent {
        event_id,
        event_type: event_type.to_owned(),
        reason,
    }
}

fn malformed(event_id: Uuid, field: &str, reason: String) -> Error {
    Error::MalformedEnvelope {
        event_id,
        field: field.to_owned(),
        reason,
    }
}

/// Overwrites the strings of a value that held plaintext before dropping it.
fn scrub(value: Value) {
    match value {
        Value::String(mut s) => s.zeroize(),
        Value::Array(items) => items.into_iter().for_each(scrub),
        Value::Object(map) => map.into_iter().for_each(|(mut k, v)| {
            k.zeroize();
            scrub(v);
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests;
