//! [`PgReencryptor`]: rewrites a subject's stored fields under its newest
//! data key, in place, without releasing plaintext.

use std::sync::Arc;

use chronicle_crypto::{AccessContext, FieldEncryptor, SubjectId};
use serde_json::Value;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::keys::PgDataKeyStore;
use crate::{Error, PgPool};
use chronicle_sql::{EVENT_COLUMNS as COLUMNS, decode_event};

/// How far a re-encryption run got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReencryptProgress {
    /// Events examined that hold fields under an older key of the subject.
    pub scanned: u64,
    /// Events rewritten.
    pub rewritten: u64,
    /// Fields re-encrypted.
    pub fields: u64,
    /// Events skipped because they changed while being re-encrypted (run
    /// again to pick them up).
    pub skipped: u64,
    /// The `global_position` to resume after, if the run stops here.
    pub resume_after: Option<i64>,
}

/// The optional re-encryption job: after
/// [`FieldEncryptor::rotate_data_key`], rewrites every stored field of a
/// subject that is still under one of its older data keys so that it is
/// under the newest one: afterwards the older keys protect no stored field
/// (for when an older key is suspected exposed, or a policy limits how long
/// a key may protect data).
///
/// Events are found by the `kid` of their envelopes, in `global_position`
/// order, `batch_size` at a time; each batch is re-encrypted by the
/// [`FieldEncryptor`] (plaintext never leaves it; every field is audited as
/// `reencrypt`) and written back with one `UPDATE` that only touches rows
/// whose data is unchanged since they were read. Event ids, versions,
/// positions and `encrypted_fields` stay as they are, so the feed does not
/// replay them. Resumable from [`ReencryptProgress::resume_after`], and
/// idempotent.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool, encryptor: std::sync::Arc<chronicle_crypto::FieldEncryptor>) -> chronicle_crypto::Result<()> {
/// use chronicle_crypto::{AccessContext, SubjectId};
/// use chronicle_postgres::PgReencryptor;
///
/// let ctx = AccessContext::new("ops", "key-exposure-42");
/// let subject = SubjectId::new("0190f3c2-0000-7000-8000-000000000000");
/// encryptor.rotate_data_key(&ctx, &subject).await?;
/// let done = PgReencryptor::new(pool, encryptor)
///     .reencrypt_subject(&ctx, &subject, None, 500, |p| eprintln!("{} events", p.rewritten))
///     .await?;
/// # let _ = done; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgReencryptor {
    pool: PgPool,
    keys: PgDataKeyStore,
    encryptor: Arc<FieldEncryptor>,
}

impl std::fmt::Debug for PgReencryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReencryptor").finish_non_exhaustive()
    }
}

fn failed(what: &str, e: impl Into<Error>) -> chronicle_crypto::Error {
    let e = e.into();
    chronicle_crypto::Error::backend(format!("re-encryption: cannot {what}: {e}"), e)
}

impl PgReencryptor {
    /// A job over the events and data keys in `pool`, with `encryptor`
    /// (whose data-key store must be these tables).
    pub fn new(pool: PgPool, encryptor: Arc<FieldEncryptor>) -> Self {
        PgReencryptor {
            keys: PgDataKeyStore::new(pool.clone()),
            pool,
            encryptor,
        }
    }

    /// Re-encrypts the subject's fields that are under an older key, after
    /// `resume_after` (a `global_position`; `None`: from the start),
    /// `batch_size` events at a time, calling `progress` after each batch.
    pub async fn reencrypt_subject<F>(
        &self,
        context: &AccessContext,
        subject: &SubjectId,
        resume_after: Option<i64>,
        batch_size: usize,
        mut progress: F,
    ) -> chronicle_crypto::Result<ReencryptProgress>
    where
        F: FnMut(&ReencryptProgress) + Send,
    {
        let batch_size = batch_size.max(1);
        let mut total = ReencryptProgress {
            resume_after,
            ..ReencryptProgress::default()
        };
        // The subject's live keys other than the current one.
        let mut old_keys: Vec<String> = Vec::new();
        let mut after = None;
        loop {
            let page = self.keys.keys(Some(subject), after, 1_000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            old_keys.extend(
                page.iter()
                    .filter(|k| !k.current && k.shredded_at.is_none())
                    .map(|k| k.id.to_string()),
            );
        }
        if old_keys.is_empty() {
            progress(&total);
            return Ok(total);
        }
        let limit = i64::try_from(batch_size).unwrap_or(i64::MAX);
        loop {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| failed("connect", Error::from(e)))?;
            let cursor = total.resume_after.unwrap_or(0);
            let rows = client
                .query_typed(
                    &format!(
                        "SELECT {COLUMNS} FROM events e
                          WHERE e.global_position > $1
                            AND e.encrypted_fields IS NOT NULL
                            AND EXISTS (SELECT 1 FROM unnest($2::text[]) AS k(kid)
                                         WHERE jsonb_path_exists(e.event_data, '$.** ? (@.kid == $kid)',
                                                                 jsonb_build_object('kid', k.kid)))
                          ORDER BY e.global_position LIMIT $3"
                    ),
                    &[
                        (&cursor, Type::INT8),
                        (&old_keys, Type::TEXT_ARRAY),
                        (&limit, Type::INT8),
                    ],
                )
                .await
                .map_err(|e| failed("read events", e))?;
            drop(client);
            let mut events = rows
                .iter()
                .map(decode_event)
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(|e| failed("decode events", e))?;
            let Some(last) = events.last() else {
                progress(&total);
                return Ok(total);
            };
            let next = last.position.global_position;
            let original: Vec<Value> = events.iter().map(|e| e.event_data.clone()).collect();
            let fields = self
                .encryptor
                .reencrypt_events(context, &mut events)
                .await?;
            let mut ids: Vec<Uuid> = Vec::new();
            let mut aggregates: Vec<Uuid> = Vec::new();
            let mut before: Vec<&Value> = Vec::new();
            let mut after_data: Vec<&Value> = Vec::new();
            for (event, old) in events.iter().zip(&original) {
                if &event.event_data != old {
                    ids.push(event.event_id);
                    aggregates.push(event.aggregate_id);
                    before.push(old);
                    after_data.push(&event.event_data);
                }
            }
            let written = if ids.is_empty() {
                0
            } else {
                let client = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| failed("connect", Error::from(e)))?;
                client
                    .execute_typed(
                        "UPDATE events e SET event_data = u.new_data
                           FROM unnest($1::uuid[], $2::uuid[], $3::jsonb[], $4::jsonb[])
                                AS u(event_id, aggregate_id, old_data, new_data)
                          WHERE e.event_id = u.event_id AND e.aggregate_id = u.aggregate_id
                            AND e.event_data = u.old_data",
                        &[
                            (&ids, Type::UUID_ARRAY),
                            (&aggregates, Type::UUID_ARRAY),
                            (&before, Type::JSONB_ARRAY),
                            (&after_data, Type::JSONB_ARRAY),
                        ],
                    )
                    .await
                    .map_err(|e| failed("write re-encrypted events", e))?
            };
            total.scanned += events.len() as u64;
            total.rewritten += written;
            total.fields += fields as u64;
            total.skipped += ids.len() as u64 - written;
            total.resume_after = Some(next);
            progress(&total);
        }
    }
}
