//! [`PgDataKeyStore`]: wrapped data keys in `chronicle_data_keys`, one lock
//! row per subject in `chronicle_key_subjects`.

use async_trait::async_trait;
use chronicle_crypto::{
    DataKeyId, DataKeyStore, KekId, KeyLookup, StoredDataKey, SubjectId, WrappedKey,
};
use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::{Error, PgPool};

/// The columns [`lookup`] decodes, in order.
const KEY_COLUMNS: &str = "key_id, subject, wrapped_key, kek_id, created_at";

/// The first key of the subjects' two-key advisory locks (`"cryp"`); the
/// second is `hashtext(subject)`. Two-key advisory locks never collide
/// with the one-key locks of appends and migrations.
const SUBJECT_LOCK_CLASS: i32 = 0x6372_7970;

/// A [`DataKeyStore`] on PostgreSQL (migration 4).
///
/// - `chronicle_key_subjects` has one row per subject: its current key and
///   its shredding tombstone. Every operation that changes a subject's keys
///   locks that row first (`FOR UPDATE`), so two writers racing to make a
///   subject's first key agree on one, and a shred cannot interleave with a
///   rotation.
/// - `chronicle_data_keys` holds the keys, wrapped, with the id of the KEK
///   that wrapped them. Shredding deletes the key material (sets it to
///   `NULL`) and keeps the row as a tombstone.
///
/// Like any `UPDATE`, shredding leaves the old row version in the table
/// until `VACUUM` reclaims it, and in WAL and backups until they expire.
/// Those copies are wrapped: they stay useless once the KEK that wrapped
/// them is gone, so after a shred, rotate the KEK
/// ([`chronicle_crypto::FieldEncryptor::rewrap_all`]) and retire the old
/// one when backups taken before have expired.
///
/// Every query is a typed, unnamed statement: it works through PgBouncer in
/// transaction mode.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_crypto::Result<()> {
/// use std::sync::Arc;
/// use chronicle_crypto::{EncryptionConfig, FieldEncryptorBuilder, LocalKeyring};
/// use chronicle_postgres::{PgAuditSink, PgDataKeyStore};
///
/// let encryptor = FieldEncryptorBuilder::new(
///     EncryptionConfig::from_yaml("encryption:\n  events:\n    UserRegistered:\n      fields: [/email]\n")?,
///     Arc::new(LocalKeyring::from_env("CHRONICLE_KEYRING")?),
///     Arc::new(PgDataKeyStore::new(pool.clone())),
///     Arc::new(PgAuditSink::new(pool)),
/// )
/// .build();
/// # let _ = encryptor; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgDataKeyStore {
    pool: PgPool,
}

impl std::fmt::Debug for PgDataKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDataKeyStore").finish_non_exhaustive()
    }
}

/// One data key as listed by [`PgDataKeyStore::keys`]: its bookkeeping,
/// never its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyInfo {
    /// The key's id (the envelopes' `kid`).
    pub id: DataKeyId,
    /// Whose key it is.
    pub subject: SubjectId,
    /// The KEK it is wrapped under (`None` once shredded).
    pub kek_id: Option<KekId>,
    /// Whether new fields of the subject are encrypted under it.
    pub current: bool,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was last re-wrapped under another KEK.
    pub rewrapped_at: Option<DateTime<Utc>>,
    /// When it was destroyed (shredding).
    pub shredded_at: Option<DateTime<Utc>>,
}

/// A subject's row, locked.
struct SubjectRow {
    current: Option<Uuid>,
    shredded: bool,
}

impl PgDataKeyStore {
    /// A store over `pool`. The schema must be migrated ([`crate::migrate()`]).
    pub fn new(pool: PgPool) -> Self {
        PgDataKeyStore { pool }
    }

    /// How many live (not shredded) data keys are wrapped under each KEK,
    /// by KEK id: what is left to re-wrap before an old KEK can go.
    pub async fn count_by_kek(&self) -> chronicle_crypto::Result<Vec<(KekId, u64)>> {
        let client = self.client().await?;
        let rows = client
            .query_typed(
                "SELECT kek_id, count(*) FROM chronicle_data_keys \
                  WHERE kek_id IS NOT NULL GROUP BY kek_id ORDER BY kek_id",
                &[],
            )
            .await
            .map_err(|e| backend("count data keys by key-encryption key", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                let n: i64 = r.get(1);
                (KekId::new(id), u64::try_from(n).unwrap_or(0))
            })
            .collect())
    }

    /// Up to `limit` keys, live and shredded, with ids after `after`, in id
    /// (creation) order; only `subject`'s when given. For listings: no key
    /// material is read.
    pub async fn keys(
        &self,
        subject: Option<&SubjectId>,
        after: Option<DataKeyId>,
        limit: usize,
    ) -> chronicle_crypto::Result<Vec<DataKeyInfo>> {
        let client = self.client().await?;
        let subject = subject.map(SubjectId::as_str);
        let after = after.map(|a| a.as_uuid());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query_typed(
                "SELECT k.key_id, k.subject, k.kek_id, s.current_key_id IS NOT DISTINCT FROM k.key_id,
                        k.created_at, k.rewrapped_at, k.shredded_at
                   FROM chronicle_data_keys k
                   JOIN chronicle_key_subjects s ON s.subject = k.subject
                  WHERE ($1::text IS NULL OR k.subject = $1)
                    AND ($2::uuid IS NULL OR k.key_id > $2)
                  ORDER BY k.key_id LIMIT $3",
                &[(&subject, Type::TEXT), (&after, Type::UUID), (&limit, Type::INT8)],
            )
            .await
            .map_err(|e| backend("list data keys", e))?;
        Ok(rows
            .iter()
            .map(|r| DataKeyInfo {
                id: DataKeyId::from_uuid(r.get(0)),
                subject: SubjectId::new(r.get::<_, String>(1)),
                kek_id: r.get::<_, Option<String>>(2).map(KekId::new),
                current: r.get(3),
                created_at: r.get(4),
                rewrapped_at: r.get(5),
                shredded_at: r.get(6),
            })
            .collect())
    }

    async fn client(&self) -> chronicle_crypto::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| backend("connect to the data-key store", Error::from(e)))
    }

    /// Makes sure the subject's row exists and locks it for the rest of the
    /// transaction.
    ///
    /// The subject's advisory transaction lock comes first: waiting on it
    /// does not assign a transaction id, so writers queued behind one
    /// another do not hold back the global event feed (which only hands
    /// out events below the oldest running transaction id).
    async fn lock_subject(
        tx: &impl GenericClient,
        subject: &SubjectId,
    ) -> chronicle_crypto::Result<SubjectRow> {
        tx.execute_typed(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[
                (&SUBJECT_LOCK_CLASS, Type::INT4),
                (&subject.as_str(), Type::TEXT),
            ],
        )
        .await
        .map_err(|e| backend("lock the data subject", e))?;
        tx.execute_typed(
            "INSERT INTO chronicle_key_subjects (subject) VALUES ($1) ON CONFLICT (subject) DO NOTHING",
            &[(&subject.as_str(), Type::TEXT)],
        )
        .await
        .map_err(|e| backend("record the data subject", e))?;
        let row = tx
            .query_typed_one(
                "SELECT current_key_id, shredded_at IS NOT NULL FROM chronicle_key_subjects \
                  WHERE subject = $1 FOR UPDATE",
                &[(&subject.as_str(), Type::TEXT)],
            )
            .await
            .map_err(|e| backend("lock the data subject", e))?;
        Ok(SubjectRow {
            current: row.get(0),
            shredded: row.get(1),
        })
    }

    async fn insert_key(
        tx: &impl GenericClient,
        key: &StoredDataKey,
    ) -> chronicle_crypto::Result<()> {
        let id = key.id.as_uuid();
        tx.execute_typed(
            "INSERT INTO chronicle_data_keys (key_id, subject, wrapped_key, kek_id, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                (&id, Type::UUID),
                (&key.subject.as_str(), Type::TEXT),
                (&key.wrapped.ciphertext, Type::BYTEA),
                (&key.wrapped.kek_id.as_str(), Type::TEXT),
                (&key.created_at, Type::TIMESTAMPTZ),
            ],
        )
        .await
        .map_err(|e| backend("store the data key", e))?;
        tx.execute_typed(
            "UPDATE chronicle_key_subjects SET current_key_id = $2 WHERE subject = $1",
            &[(&key.subject.as_str(), Type::TEXT), (&id, Type::UUID)],
        )
        .await
        .map_err(|e| backend("make the data key current", e))?;
        Ok(())
    }

    async fn key_by_id(
        client: &impl GenericClient,
        id: Uuid,
    ) -> chronicle_crypto::Result<KeyLookup> {
        let row = client
            .query_typed_opt(
                &format!("SELECT {KEY_COLUMNS} FROM chronicle_data_keys WHERE key_id = $1"),
                &[(&id, Type::UUID)],
            )
            .await
            .map_err(|e| backend("read a data key", e))?;
        Ok(match row {
            None => KeyLookup::Missing,
            Some(row) => lookup(&row),
        })
    }
}

/// Decodes a row selected with [`KEY_COLUMNS`]: a key, or its tombstone.
fn lookup(row: &Row) -> KeyLookup {
    let subject = SubjectId::new(row.get::<_, String>(1));
    let wrapped: Option<Vec<u8>> = row.get(2);
    let kek: Option<String> = row.get(3);
    match (wrapped, kek) {
        (Some(ciphertext), Some(kek_id)) => KeyLookup::Found(StoredDataKey {
            id: DataKeyId::from_uuid(row.get(0)),
            subject,
            wrapped: WrappedKey {
                kek_id: KekId::new(kek_id),
                ciphertext,
            },
            created_at: row.get::<_, DateTime<Utc>>(4),
        }),
        _ => KeyLookup::Shredded { subject },
    }
}

fn backend(what: &str, e: impl Into<Error>) -> chronicle_crypto::Error {
    let e = e.into();
    chronicle_crypto::Error::backend(format!("data-key store: cannot {what}: {e}"), e)
}

#[async_trait]
impl DataKeyStore for PgDataKeyStore {
    async fn current(&self, subject: &SubjectId) -> chronicle_crypto::Result<KeyLookup> {
        let client = self.client().await?;
        let row = client
            .query_typed_opt(
                "SELECT s.shredded_at IS NOT NULL, k.key_id, k.subject, k.wrapped_key, k.kek_id, k.created_at \
                   FROM chronicle_key_subjects s \
                   LEFT JOIN chronicle_data_keys k ON k.key_id = s.current_key_id \
                  WHERE s.subject = $1",
                &[(&subject.as_str(), Type::TEXT)],
            )
            .await
            .map_err(|e| backend("read the subject's current data key", e))?;
        let Some(row) = row else {
            return Ok(KeyLookup::Missing);
        };
        if row.get::<_, bool>(0) {
            return Ok(KeyLookup::Shredded {
                subject: subject.clone(),
            });
        }
        let key_id: Option<Uuid> = row.get(1);
        if key_id.is_none() {
            return Ok(KeyLookup::Missing);
        }
        let wrapped: Option<Vec<u8>> = row.get(3);
        let kek: Option<String> = row.get(4);
        Ok(match (key_id, wrapped, kek) {
            (Some(id), Some(ciphertext), Some(kek_id)) => KeyLookup::Found(StoredDataKey {
                id: DataKeyId::from_uuid(id),
                subject: subject.clone(),
                wrapped: WrappedKey {
                    kek_id: KekId::new(kek_id),
                    ciphertext,
                },
                created_at: row.get(5),
            }),
            _ => KeyLookup::Shredded {
                subject: subject.clone(),
            },
        })
    }

    async fn get(&self, id: DataKeyId) -> chronicle_crypto::Result<KeyLookup> {
        let client = self.client().await?;
        Self::key_by_id(&**client, id.as_uuid()).await
    }

    async fn insert_first(&self, key: StoredDataKey) -> chronicle_crypto::Result<KeyLookup> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| backend("begin a transaction", e))?;
        let subject = Self::lock_subject(&*tx, &key.subject).await?;
        let result = if subject.shredded {
            KeyLookup::Shredded {
                subject: key.subject.clone(),
            }
        } else if let Some(current) = subject.current {
            // Another writer made the first key: use theirs.
            Self::key_by_id(&*tx, current).await?
        } else {
            Self::insert_key(&*tx, &key).await?;
            KeyLookup::Found(key)
        };
        tx.commit()
            .await
            .map_err(|e| backend("commit the data key", e))?;
        Ok(result)
    }

    async fn insert_current(&self, key: StoredDataKey) -> chronicle_crypto::Result<KeyLookup> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| backend("begin a transaction", e))?;
        let subject = Self::lock_subject(&*tx, &key.subject).await?;
        if subject.shredded {
            // Dropping the transaction rolls it back.
            return Ok(KeyLookup::Shredded {
                subject: key.subject,
            });
        }
        Self::insert_key(&*tx, &key).await?;
        tx.commit()
            .await
            .map_err(|e| backend("commit the data key", e))?;
        Ok(KeyLookup::Found(key))
    }

    async fn replace_wrapped(
        &self,
        id: DataKeyId,
        expected_kek: &KekId,
        wrapped: WrappedKey,
    ) -> chronicle_crypto::Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute_typed(
                "UPDATE chronicle_data_keys \
                    SET wrapped_key = $3, kek_id = $4, rewrapped_at = now() \
                  WHERE key_id = $1 AND kek_id = $2 AND shredded_at IS NULL",
                &[
                    (&id.as_uuid(), Type::UUID),
                    (&expected_kek.as_str(), Type::TEXT),
                    (&wrapped.ciphertext, Type::BYTEA),
                    (&wrapped.kek_id.as_str(), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| backend("replace a wrapped data key", e))?;
        Ok(n == 1)
    }

    async fn list(
        &self,
        after: Option<DataKeyId>,
        limit: usize,
    ) -> chronicle_crypto::Result<Vec<StoredDataKey>> {
        let client = self.client().await?;
        let after = after.map(|a| a.as_uuid());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM chronicle_data_keys \
                      WHERE ($1::uuid IS NULL OR key_id > $1) AND shredded_at IS NULL \
                      ORDER BY key_id LIMIT $2"
                ),
                &[(&after, Type::UUID), (&limit, Type::INT8)],
            )
            .await
            .map_err(|e| backend("list data keys", e))?;
        Ok(rows
            .iter()
            .filter_map(|row| match lookup(row) {
                KeyLookup::Found(key) => Some(key),
                _ => None,
            })
            .collect())
    }

    async fn shred(&self, subject: &SubjectId) -> chronicle_crypto::Result<Vec<DataKeyId>> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| backend("begin a transaction", e))?;
        Self::lock_subject(&*tx, subject).await?;
        let rows = tx
            .query_typed(
                "UPDATE chronicle_data_keys \
                    SET wrapped_key = NULL, kek_id = NULL, shredded_at = now() \
                  WHERE subject = $1 AND shredded_at IS NULL \
                  RETURNING key_id",
                &[(&subject.as_str(), Type::TEXT)],
            )
            .await
            .map_err(|e| backend("destroy the subject's data keys", e))?;
        tx.execute_typed(
            "UPDATE chronicle_key_subjects \
                SET current_key_id = NULL, shredded_at = coalesce(shredded_at, now()) \
              WHERE subject = $1",
            &[(&subject.as_str(), Type::TEXT)],
        )
        .await
        .map_err(|e| backend("record the subject's tombstone", e))?;
        tx.commit()
            .await
            .map_err(|e| backend("commit the shredding", e))?;
        let mut ids: Vec<DataKeyId> = rows
            .iter()
            .map(|r| DataKeyId::from_uuid(r.get(0)))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn public_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::PgDataKeyStore>();
        send_sync::<super::DataKeyInfo>();
        send_sync::<crate::PgAuditSink>();
        send_sync::<crate::AuditQuery>();
        send_sync::<crate::PgReencryptor>();
    }
}
