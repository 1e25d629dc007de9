//! [`CryptoFieldCipher`]: the eager runner's [`FieldCipher`] on
//! `chronicle-crypto` (feature `crypto`).
//!
//! Dependencies point down: this crate uses `chronicle-crypto`'s public
//! API ([`FieldEncryptor`], [`DataKeyStore`], [`AuditSink`]); that crate
//! knows nothing of upcasting.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, NewEvent, Position};
use chronicle_crypto::{
    AccessContext, AuditSink, DataKeyId, DataKeyStore, EncryptionConfig, EventRule, FieldEncryptor,
    FieldEncryptorBuilder, KeyLookup, KeyProvider, Redaction, SubjectId, is_envelope,
};
use serde_json::Value;
use uuid::Uuid;

use crate::{FieldCipher, UpcastEvent, UpcastFailure, is_redacted};

/// The event type of the rules this cipher encrypts with; never stored.
const WRITER_TYPE: &str = "chronicle-upcast";

/// A field added for the length of one `encrypt` call, so the rule's
/// subject pointer names the subject the event's fields belonged to before
/// the chain ran (not whatever the data says now). Never stored.
const SUBJECT_FIELD: &str = "__chronicle_upcast_subject";

/// Events between `decrypt` and `encrypt` kept at most: a runner has one
/// in flight at a time, so only many runners sharing one cipher come near.
const MAX_PENDING: usize = 10_000;

/// Decrypts encrypted fields before the chain and re-encrypts them after
/// it, under the subject's current data key, with `chronicle-crypto`.
///
/// For each event with encrypted fields, [`FieldCipher::decrypt`]:
///
/// - finds the subject the fields belong to from their envelopes' key ids
///   (the [`DataKeyStore`]; one subject per event, as the encryptor writes
///   them);
/// - decrypts every envelope listed in `encrypted_fields` with a
///   [`FieldEncryptor`] (audited: one `decrypt` entry per field, with this
///   cipher's [`AccessContext`]);
/// - leaves redaction markers as they are, and turns the envelopes of a
///   shredded subject into the `{"$redacted":"shredded"}` marker: their
///   keys are gone, so the value is too; declarative steps carry markers
///   over unchanged (a `map` on one does nothing).
///
/// The chain then sees plaintext and keeps `encrypted_fields` in step with
/// its renames and moves. [`FieldCipher::encrypt`] seals every listed
/// pointer that holds a value (not a marker) under the subject's *current*
/// data key, bound to the pointer it now has (audited: one `encrypt` entry
/// per field). Redaction markers are written back as they are, so a
/// shredded subject stays shredded and nothing new is encrypted for it.
///
/// No plaintext reaches the store: the backup holds the original
/// envelopes, the rewritten event new ones. The runner's own errors name
/// events and pointers, never values.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool, chain: chronicle_upcast::UpcasterChain,
/// #               keyring: std::sync::Arc<chronicle_crypto::LocalKeyring>) -> Result<(), chronicle_upcast::RunError> {
/// use std::sync::Arc;
/// use chronicle_crypto::AccessContext;
/// use chronicle_postgres::{PgAuditSink, PgDataKeyStore};
/// use chronicle_upcast::{CryptoFieldCipher, DEFAULT_BATCH_SIZE, PgUpcaster};
///
/// let cipher = CryptoFieldCipher::new(
///     keyring,
///     Arc::new(PgDataKeyStore::new(pool.clone())),
///     Arc::new(PgAuditSink::new(pool.clone())),
///     AccessContext::new("chronicle-upcast", "schema migration UserRegistered v1 -> v2"),
/// );
/// let mut upcaster = PgUpcaster::new(pool, chain);
/// upcaster.cipher(Arc::new(cipher));
/// upcaster.run(DEFAULT_BATCH_SIZE, |_| {}).await?;
/// # Ok(()) }
/// ```
pub struct CryptoFieldCipher {
    provider: Arc<dyn KeyProvider>,
    keys: Arc<dyn DataKeyStore>,
    audit: Arc<dyn AuditSink>,
    context: AccessContext,
    reader: FieldEncryptor,
    /// One encryptor per set of pointers to seal (usually one per
    /// migration), so its data-key cache serves the whole run.
    writers: Mutex<HashMap<Vec<String>, Arc<FieldEncryptor>>>,
    /// Key id -> subject; never changes once a key exists.
    subjects: Mutex<HashMap<DataKeyId, SubjectId>>,
    /// Event -> subject, from `decrypt` to `encrypt`.
    pending: Mutex<HashMap<Uuid, SubjectId>>,
}

impl fmt::Debug for CryptoFieldCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CryptoFieldCipher")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl CryptoFieldCipher {
    /// A cipher over the key-encryption keys of `provider`, the data keys
    /// in `keys`, auditing to `audit` as `context` (the actor and purpose
    /// every audit entry of the run carries).
    pub fn new(
        provider: Arc<dyn KeyProvider>,
        keys: Arc<dyn DataKeyStore>,
        audit: Arc<dyn AuditSink>,
        context: AccessContext,
    ) -> Self {
        let reader = FieldEncryptorBuilder::new(
            EncryptionConfig::new(),
            provider.clone(),
            keys.clone(),
            audit.clone(),
        )
        .build();
        CryptoFieldCipher {
            provider,
            keys,
            audit,
            context,
            reader,
            writers: Mutex::default(),
            subjects: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// The subject owning data key `kid`.
    async fn subject_of_key(
        &self,
        kid: DataKeyId,
        pointer: &str,
    ) -> Result<SubjectId, UpcastFailure> {
        if let Some(s) = lock(&self.subjects).get(&kid) {
            return Ok(s.clone());
        }
        let subject = match self.keys.get(kid).await {
            Ok(KeyLookup::Found(key)) => key.subject,
            Ok(KeyLookup::Shredded { subject }) => subject,
            Ok(KeyLookup::Missing) => {
                return Err(UpcastFailure::new(format!(
                    "its envelope names data key {kid}, which the data-key store does not have; \
                     restore the key or check that the runner uses the right key store"
                ))
                .at(pointer));
            }
            Err(e) => {
                return Err(
                    UpcastFailure::new(format!("cannot look up data key {kid}: {e}")).at(pointer),
                );
            }
        };
        lock(&self.subjects).insert(kid, subject.clone());
        Ok(subject)
    }

    /// The encryptor sealing exactly `pointers`, with the subject read from
    /// [`SUBJECT_FIELD`].
    fn writer(&self, pointers: &[String]) -> Result<Arc<FieldEncryptor>, UpcastFailure> {
        if let Some(w) = lock(&self.writers).get(pointers) {
            return Ok(w.clone());
        }
        let rule = EventRule::new(pointers)
            .and_then(|r| r.with_subject(&format!("/{SUBJECT_FIELD}")))
            .map_err(|e| {
                UpcastFailure::new(format!(
                    "the encrypted fields after upcasting cannot be encrypted together: {e}"
                ))
            })?;
        let config = EncryptionConfig::new()
            .with_event(WRITER_TYPE, rule)
            .map_err(|e| UpcastFailure::new(e.to_string()))?;
        let writer = Arc::new(
            FieldEncryptorBuilder::new(
                config,
                self.provider.clone(),
                self.keys.clone(),
                self.audit.clone(),
            )
            .build(),
        );
        lock(&self.writers).insert(pointers.to_vec(), writer.clone());
        Ok(writer)
    }
}

#[async_trait]
impl FieldCipher for CryptoFieldCipher {
    async fn decrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        if event.encrypted_fields.is_empty() {
            return Ok(());
        }
        let mut subject: Option<SubjectId> = None;
        for pointer in &event.encrypted_fields {
            let Some(value) = event.data.pointer(pointer) else {
                return Err(UpcastFailure::new(
                    "listed in encrypted_fields but absent from the event data",
                )
                .at(pointer.as_str()));
            };
            if is_redacted(value) {
                continue;
            }
            if !is_envelope(value) {
                return Err(UpcastFailure::new(
                    "listed in encrypted_fields but holds neither an envelope nor a redaction marker",
                )
                .at(pointer.as_str()));
            }
            let kid: DataKeyId = value
                .get("kid")
                .and_then(Value::as_str)
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| {
                    UpcastFailure::new("the envelope has no valid `kid`").at(pointer.as_str())
                })?;
            let owner = self.subject_of_key(kid, pointer).await?;
            match &subject {
                Some(s) if *s != owner => {
                    return Err(UpcastFailure::new(format!(
                        "the event's encrypted fields belong to two subjects ({s} and {owner}); \
                         this cipher re-encrypts one subject per event"
                    ))
                    .at(pointer.as_str()));
                }
                Some(_) => {}
                None => subject = Some(owner),
            }
        }
        let identity = event.identity().clone();
        let mut stored = EventEnvelope {
            event_id: identity.event_id,
            aggregate_id: identity.aggregate_id,
            aggregate_type: identity.aggregate_type,
            event_type: event.event_type.clone(),
            event_data: event.data.take(),
            metadata: event.metadata().clone(),
            version: identity.version,
            timestamp: Default::default(),
            encrypted_fields: event.encrypted_fields.clone(),
            position: identity.position.unwrap_or(Position::START),
        };
        let decrypted = self.reader.decrypt(&self.context, &mut stored).await;
        event.data = stored.event_data;
        if let Err(e) = decrypted {
            return Err(UpcastFailure::new(format!("cannot decrypt: {e}")));
        }
        let denied = Redaction::Denied.marker();
        if let Some(p) = event
            .encrypted_fields
            .iter()
            .find(|p| event.data.pointer(p) == Some(&denied))
        {
            // Never write "denied" over data: the runner needs access.
            return Err(UpcastFailure::new(
                "the access policy refused the runner the plaintext; \
                 upcasting would overwrite the field with a redaction marker",
            )
            .at(p.as_str()));
        }
        if let Some(subject) = subject {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                pending.clear();
            }
            pending.insert(event.event_id(), subject);
        }
        Ok(())
    }

    async fn encrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        let subject = lock(&self.pending).remove(&event.event_id());
        let pointers: Vec<String> = event
            .encrypted_fields
            .iter()
            .filter(|p| {
                event
                    .data
                    .pointer(p)
                    .is_some_and(|v| !is_redacted(v) && !is_envelope(v))
            })
            .cloned()
            .collect();
        if pointers.is_empty() {
            return Ok(());
        }
        let subject =
            subject.unwrap_or_else(|| SubjectId::from_aggregate(event.identity().aggregate_id));
        let Value::Object(map) = &mut event.data else {
            return Err(UpcastFailure::new(
                "event data must be a JSON object for its fields to be encrypted",
            ));
        };
        if map.contains_key(SUBJECT_FIELD) {
            return Err(UpcastFailure::new(format!(
                "the event data has a field named {SUBJECT_FIELD}, which the cipher reserves"
            )));
        }
        map.insert(SUBJECT_FIELD.into(), Value::String(subject.to_string()));
        let writer = self.writer(&pointers)?;
        let mut sealing = NewEvent {
            event_id: event.event_id(),
            event_type: WRITER_TYPE.into(),
            data: event.data.take(),
            metadata: Default::default(),
            encrypted_fields: Vec::new(),
        };
        let sealed = writer
            .encrypt(&self.context, event.identity().aggregate_id, &mut sealing)
            .await;
        if let Value::Object(map) = &mut sealing.data {
            map.remove(SUBJECT_FIELD);
        }
        event.data = sealing.data;
        match sealed {
            Ok(n) if n == pointers.len() => Ok(()),
            Ok(n) => Err(UpcastFailure::new(format!(
                "{n} of {} encrypted fields were sealed",
                pointers.len()
            ))),
            Err(e) => Err(UpcastFailure::new(format!("cannot re-encrypt: {e}"))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventIdentity, UpcastConfig, UpcasterChain};
    use chronicle_crypto::{LocalKeyring, MemoryAuditSink, MemoryDataKeyStore};
    use serde_json::json;

    fn parts() -> (
        Arc<LocalKeyring>,
        Arc<MemoryDataKeyStore>,
        Arc<MemoryAuditSink>,
    ) {
        (
            Arc::new(LocalKeyring::generate().unwrap()),
            Arc::new(MemoryDataKeyStore::new()),
            Arc::new(MemoryAuditSink::new()),
        )
    }

    #[tokio::test]
    async fn decrypts_upcasts_and_reencrypts_at_the_new_pointer() {
        let (kek, keys, audit) = parts();
        let writer = FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(
                "encryption:\n  events:\n    UserRegistered:\n      fields: [\"/email\"]\n",
            )
            .unwrap(),
            kek.clone(),
            keys.clone(),
            audit.clone(),
        )
        .build();
        let ctx = AccessContext::new("app", "signup");
        let user = Uuid::now_v7();
        let mut new = NewEvent::new(
            "UserRegistered",
            json!({ "email": "ada@example.com", "name": "Ada" }),
        );
        writer.encrypt(&ctx, user, &mut new).await.unwrap();
        let identity = EventIdentity {
            event_id: new.event_id,
            aggregate_id: user,
            aggregate_type: "User".into(),
            version: 1,
            position: None,
        };
        let stored = UpcastEvent::new(identity, "UserRegistered", new.data.clone())
            .with_encrypted_fields(new.encrypted_fields.clone());

        let chain = UpcasterChain::builder()
            .config(
                UpcastConfig::from_yaml(
                    "t.yaml",
                    "upcasters:\n  - event_type: UserRegistered\n    from: 1\n    steps:\n      - move: { from: /email, to: /contact/email }\n",
                )
                .unwrap(),
            )
            .build()
            .unwrap();
        let cipher = CryptoFieldCipher::new(
            kek.clone(),
            keys.clone(),
            audit.clone(),
            AccessContext::new("chronicle-upcast", "test"),
        );
        let mut event = stored.clone();
        cipher.decrypt(&mut event).await.unwrap();
        assert_eq!(event.data["email"], "ada@example.com");
        let mut after = chain.upcast_validated(event).unwrap();
        assert_eq!(after.encrypted_fields, ["/contact/email"]);
        cipher.encrypt(&mut after).await.unwrap();
        assert!(
            is_envelope(&after.data["contact"]["email"]),
            "{}",
            after.data
        );
        assert!(!after.data.to_string().contains("ada@"));
        assert!(after.data.get(SUBJECT_FIELD).is_none());

        // Readable at its new place, by anyone holding the keys.
        let mut read = EventEnvelope {
            event_id: after.event_id(),
            aggregate_id: user,
            aggregate_type: "User".into(),
            event_type: after.event_type.clone(),
            event_data: after.data.clone(),
            metadata: after.metadata().clone(),
            version: 1,
            timestamp: Default::default(),
            encrypted_fields: after.encrypted_fields.clone(),
            position: Position::START,
        };
        writer.decrypt(&ctx, &mut read).await.unwrap();
        assert_eq!(read.event_data["contact"]["email"], "ada@example.com");

        // Shredded: the marker is carried over, nothing is encrypted.
        writer
            .shred(&ctx, &SubjectId::from_aggregate(user))
            .await
            .unwrap();
        let cipher = CryptoFieldCipher::new(
            kek,
            keys,
            audit,
            AccessContext::new("chronicle-upcast", "test"),
        );
        let mut event = stored;
        cipher.decrypt(&mut event).await.unwrap();
        assert_eq!(event.data["email"], Redaction::Shredded.marker());
        let mut after = chain.upcast_validated(event).unwrap();
        cipher.encrypt(&mut after).await.unwrap();
        assert_eq!(
            after.data,
            json!({ "name": "Ada", "contact": { "email": { "$redacted": "shredded" } } })
        );
    }
}
