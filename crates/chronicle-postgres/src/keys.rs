//! [`PgDataKeyStore`]: wrapped data keys in `chronicle_data_keys`, one lock
//! row per subject in `chronicle_key_subjects`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_crypto::{
    DataKeyId, DataKeyStore, FieldEncryptor, KekId, KeyLookup, StoredDataKey, SubjectId, WrappedKey,
};
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, Row};
use uuid::Uuid;

use crate::connect::Tls;
use crate::{Error, PgOptions, PgPool};

/// The columns [`lookup`] decodes, in order.
const KEY_COLUMNS: &str = "key_id, subject, wrapped_key, kek_id, created_at";

/// The first key of the subjects' two-key advisory locks (`"cryp"`); the
/// second is `hashtext(subject)`. Two-key advisory locks never collide
/// with the one-key locks of appends and migrations.
const SUBJECT_LOCK_CLASS: i32 = 0x6372_7970;

/// A [`DataKeyStore`] on PostgreSQL (migrations 3 and 9).
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
/// The current-key lookup, made before a subject's first key on every
/// writer, is prepared once per connection; every other query is a typed,
/// unnamed statement. Behind a pooler that cannot keep prepared statements
/// (PgBouncer before 1.21 in transaction mode) turn the cache off
/// ([`PgDataKeyStore::statement_cache`], as the URL's `statement_cache=off`
/// says for [`crate::PgEventStore`]).
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
    statement_cache: bool,
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
    shredded: bool,
}

impl PgDataKeyStore {
    /// A store over `pool`. The schema must be migrated ([`crate::migrate()`]).
    pub fn new(pool: PgPool) -> Self {
        PgDataKeyStore {
            pool,
            statement_cache: true,
        }
    }

    /// The same store, preparing its current-key lookup (`true`, the
    /// default) or sending it unnamed (`false`: behind PgBouncer before
    /// 1.21 in transaction mode; [`crate::PgOptions::statement_cache`]
    /// reads the URL's setting).
    ///
    /// ```no_run
    /// # fn demo(pool: chronicle_postgres::PgPool) -> Result<(), chronicle_postgres::Error> {
    /// use chronicle_postgres::{PgDataKeyStore, PgOptions};
    ///
    /// let options = PgOptions::from_url("postgres://app@pooler:6432/app?statement_cache=off")?;
    /// let keys = PgDataKeyStore::new(pool).statement_cache(options.statement_cache());
    /// # let _ = keys; Ok(()) }
    /// ```
    pub fn statement_cache(self, on: bool) -> Self {
        PgDataKeyStore {
            statement_cache: on,
            ..self
        }
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
                "SELECT shredded_at IS NOT NULL FROM chronicle_key_subjects \
                  WHERE subject = $1 FOR UPDATE",
                &[(&subject.as_str(), Type::TEXT)],
            )
            .await
            .map_err(|e| backend("lock the data subject", e))?;
        Ok(SubjectRow {
            shredded: row.get(0),
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
        let row = crate::Statements::new(self.statement_cache)
            .query_opt(
                &client,
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

    async fn get_many(
        &self,
        ids: &[DataKeyId],
    ) -> chronicle_crypto::Result<Vec<(DataKeyId, KeyLookup)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let wanted: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let rows = client
            .query_typed(
                &format!("SELECT {KEY_COLUMNS} FROM chronicle_data_keys WHERE key_id = ANY($1)"),
                &[(&wanted, Type::UUID_ARRAY)],
            )
            .await
            .map_err(|e| backend("read data keys", e))?;
        let mut found: Vec<(DataKeyId, KeyLookup)> = rows
            .iter()
            .map(|row| (DataKeyId::from_uuid(row.get(0)), lookup(row)))
            .collect();
        for id in ids {
            if !found.iter().any(|(f, _)| f == id) {
                found.push((*id, KeyLookup::Missing));
            }
        }
        Ok(found)
    }

    /// One round trip: `chronicle_insert_first_key` (migration 9) locks the
    /// subject and stores the key unless it has one or is shredded.
    async fn insert_first(&self, key: StoredDataKey) -> chronicle_crypto::Result<KeyLookup> {
        let client = self.client().await?;
        let id = key.id.as_uuid();
        let row = client
            .query_typed_one(
                "SELECT state, key_id, wrapped_key, kek_id, created_at \
                   FROM chronicle_insert_first_key($1, $2, $3, $4, $5)",
                &[
                    (&key.subject.as_str(), Type::TEXT),
                    (&id, Type::UUID),
                    (&key.wrapped.ciphertext, Type::BYTEA),
                    (&key.wrapped.kek_id.as_str(), Type::TEXT),
                    (&key.created_at, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(|e| backend("store the data key", e))?;
        let state: i32 = row.get(0);
        Ok(match state {
            0 => KeyLookup::Found(key),
            2 => KeyLookup::Shredded {
                subject: key.subject,
            },
            // Another writer made the first key: use theirs.
            _ => match (
                row.get::<_, Option<Uuid>>(1),
                row.get::<_, Option<Vec<u8>>>(2),
                row.get::<_, Option<String>>(3),
            ) {
                (Some(id), Some(ciphertext), Some(kek_id)) => KeyLookup::Found(StoredDataKey {
                    id: DataKeyId::from_uuid(id),
                    subject: key.subject,
                    wrapped: WrappedKey {
                        kek_id: KekId::new(kek_id),
                        ciphertext,
                    },
                    created_at: row.get(4),
                }),
                _ => KeyLookup::Shredded {
                    subject: key.subject,
                },
            },
        })
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
        let destroyed: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        crate::snapshots::delete_for_shred(&*tx, subject.as_str(), &destroyed)
            .await
            .map_err(|e| backend("delete the snapshots holding the subject's fields", e))?;
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

/// The channel on which `chronicle_key_subjects`' trigger (migration 9)
/// announces rotations and shreds: `{"op": "rotate" | "shred", "subject":
/// "..."}`.
pub const KEYS_CHANNEL: &str = "chronicle_keys";

/// How long [`PgKeyListener::start`] waits for its probe notification.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a [`PgKeyListener`] hears other processes' rotations and shreds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyListenerState {
    /// Connecting for the first time.
    Starting,
    /// `LISTEN` works: a probe sent from another connection came back.
    Listening,
    /// The connection was lost and is being reopened; cached keys were
    /// dropped, since announcements may have been missed.
    Reconnecting,
    /// Announcements do not arrive (typically a transaction-mode pooler,
    /// which does not carry `LISTEN`): the listener stopped, and this
    /// process relies on the key cache's time-to-live.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Listens for other processes' rotations and shreds (`NOTIFY
/// chronicle_keys`, sent by a trigger at their commit) and drops this
/// process's cached keys of that subject at once
/// ([`FieldEncryptor::forget_subject`]), instead of after the cache's
/// time-to-live.
///
/// It uses one dedicated connection (not from a pool) and checks that it
/// works: after `LISTEN`, it sends a probe notification from a second
/// connection and waits up to two seconds for it. Behind a transaction-mode
/// pooler (PgBouncer), where `LISTEN` does not work, the probe does not come
/// back: the state becomes [`KeyListenerState::Unavailable`], a warning is
/// logged, and the cache TTL remains the bound (give the listener a direct
/// URL to do better). A lost connection is reopened with backoff; meanwhile,
/// and whenever it reconnects, the whole cache is dropped
/// ([`FieldEncryptor::forget_all_keys`]), since announcements may have been
/// missed.
///
/// Dropping the listener stops it.
///
/// ```no_run
/// # async fn demo(options: chronicle_postgres::PgOptions, crypto: std::sync::Arc<chronicle_crypto::FieldEncryptor>) {
/// use chronicle_postgres::PgKeyListener;
///
/// let listener = PgKeyListener::start(&options, crypto).await;
/// if !listener.is_listening() {
///     eprintln!("key announcements unavailable: {:?}", listener.state());
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct PgKeyListener {
    state: watch::Receiver<KeyListenerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgKeyListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgKeyListener {
    /// Starts listening for `encryptor`'s cache, and returns once the
    /// listener knows whether announcements arrive (within about two
    /// seconds). Never fails: see [`PgKeyListener::state`].
    pub async fn start(options: &PgOptions, encryptor: Arc<FieldEncryptor>) -> PgKeyListener {
        let (tx, mut state) = watch::channel(KeyListenerState::Starting);
        let task = match options.tls() {
            Ok(tls) => tokio::spawn(listen_for_keys(
                options.config().clone(),
                tls,
                encryptor,
                tx,
            )),
            Err(e) => {
                let _ = tx.send(KeyListenerState::Unavailable {
                    reason: e.to_string(),
                });
                tokio::spawn(async {})
            }
        };
        let _ = state.wait_for(|s| *s != KeyListenerState::Starting).await;
        PgKeyListener { state, task }
    }

    /// Where the listener stands.
    pub fn state(&self) -> KeyListenerState {
        self.state.borrow().clone()
    }

    /// Whether announcements arrive now.
    pub fn is_listening(&self) -> bool {
        *self.state.borrow() == KeyListenerState::Listening
    }
}

/// One connection outside any pool, its asynchronous messages forwarded.
async fn open(
    config: &Config,
    tls: &Tls,
) -> Result<(Client, mpsc::UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
    fn forward<S, T>(
        mut connection: tokio_postgres::Connection<S, T>,
    ) -> mpsc::UnboundedReceiver<AsyncMessage>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
                if tx.send(message).is_err() {
                    return;
                }
            }
        });
        rx
    }
    Ok(match tls {
        Tls::None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            (client, forward(connection))
        }
        Tls::Rustls(make) => {
            let (client, connection) = config.connect(make.clone()).await?;
            (client, forward(connection))
        }
    })
}

/// An announcement's payload.
#[derive(serde::Deserialize)]
struct Announcement {
    op: String,
    #[serde(default)]
    subject: Option<String>,
}

async fn listen_for_keys(
    config: Config,
    tls: Tls,
    encryptor: Arc<FieldEncryptor>,
    state: watch::Sender<KeyListenerState>,
) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    loop {
        match listen_session(&config, &tls, &encryptor, &state).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(SessionEnd::Unavailable(reason)) => {
                tracing::warn!(%reason, "key announcements (LISTEN chronicle_keys) unavailable; cached data keys expire after the cache TTL");
                let _ = state.send(KeyListenerState::Unavailable { reason });
                return;
            }
            Err(SessionEnd::Failed(e)) => {
                if first {
                    let reason = format!(
                        "cannot listen ({}); behind a transaction-mode pooler, LISTEN does not work: give the listener a direct database URL",
                        crate::error::describe(&e)
                    );
                    tracing::warn!(%reason, "key announcements unavailable; cached data keys expire after the cache TTL");
                    let _ = state.send(KeyListenerState::Unavailable { reason });
                    return;
                }
                tracing::warn!(error = %crate::error::describe(&e), retry_in = ?delay, "key announcement connection lost; reconnecting");
            }
        }
        first = false;
        // Announcements sent while away are lost: start from scratch.
        encryptor.forget_all_keys();
        let _ = state.send(KeyListenerState::Reconnecting);
        tokio::time::sleep(crate::backoff::jitter(delay)).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

enum SessionEnd {
    /// The probe did not come back.
    Unavailable(String),
    /// Connecting or listening failed.
    Failed(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for SessionEnd {
    fn from(e: tokio_postgres::Error) -> Self {
        SessionEnd::Failed(e)
    }
}

/// One listening connection: `LISTEN`, the probe, then announcements until
/// the connection closes (`Ok`).
async fn listen_session(
    config: &Config,
    tls: &Tls,
    encryptor: &FieldEncryptor,
    state: &watch::Sender<KeyListenerState>,
) -> Result<(), SessionEnd> {
    let (client, mut messages) = open(config, tls).await?;
    client
        .batch_execute(&format!("LISTEN {KEYS_CHANNEL}"))
        .await?;
    // The probe comes from another connection: a pooler may route a
    // connection's own NOTIFY back to it while never delivering others'.
    let probe = format!(r#"{{"op":"probe","id":"{}"}}"#, Uuid::new_v4());
    {
        let (sender, _) = open(config, tls).await?;
        sender
            .execute_typed(
                "SELECT pg_notify($1, $2)",
                &[(&KEYS_CHANNEL, Type::TEXT), (&probe.as_str(), Type::TEXT)],
            )
            .await?;
    }
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, messages.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) if n.payload() == probe => break,
            Ok(Some(AsyncMessage::Notification(n))) => announce(encryptor, n.payload()),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(_) => {
                return Err(SessionEnd::Unavailable(format!(
                    "a probe notification did not come back within {} s: the connection is probably behind a transaction-mode pooler; give the listener a direct database URL",
                    PROBE_TIMEOUT.as_secs()
                )));
            }
        }
    }
    let _ = state.send(KeyListenerState::Listening);
    while let Some(message) = messages.recv().await {
        if let AsyncMessage::Notification(n) = message {
            announce(encryptor, n.payload());
        }
    }
    drop(client);
    Ok(())
}

/// Acts on one announcement: the subject's cached keys are dropped.
fn announce(encryptor: &FieldEncryptor, payload: &str) {
    match serde_json::from_str::<Announcement>(payload) {
        Ok(Announcement {
            op,
            subject: Some(subject),
        }) if op == "shred" || op == "rotate" => {
            tracing::debug!(%op, %subject, "key announcement");
            encryptor.forget_subject(&SubjectId::new(subject));
        }
        Ok(_) => {}
        Err(_) => {
            // Not ours to understand: be safe.
            encryptor.forget_all_keys();
        }
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
        send_sync::<super::PgKeyListener>();
        send_sync::<super::KeyListenerState>();
    }
}
