//! [`PgAuditSink`]: the hash-chained audit log in `chronicle_audit_log`,
//! records linked after commit by a sealer, chains anchored by
//! `chronicle_audit_head` (one row per chain); and the audited append of
//! [`PgEventStore`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{AggregateId, ExpectedVersion, NewEvent, TimeRange};
use chronicle_crypto::{
    AccessContext, AuditEntry, AuditOperation, AuditOutcome, AuditRecord, AuditReport, AuditSink,
    AuditedAppend, AuditedAppender, ChainHash, ChainHead, ChainProblem, ChainReport, DataKeyId,
    EncryptedStore, FieldEncryptor, KekId, StoredDataKey, SubjectId, verify_chain_from,
};
use chrono::{DateTime, Utc};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, IsolationLevel, Row};
use uuid::Uuid;

use crate::{Error, PgEventStore, PgPool};
use chronicle_sql::Xid8;

/// The columns [`record`] decodes, in order.
const RECORD_COLUMNS: &str = "id, chain, seq, at, operation, outcome, subject, key_id, kek_id, \
                              event_ids, fields, actor, purpose, prev_hash, hash";

/// How many columns [`RECORD_COLUMNS`] has.
const RECORD_COLUMN_COUNT: usize = 15;

/// Records sealed per transaction.
const SEAL_BATCH: usize = 5_000;

/// The sealer's advisory lock ("aud2").
const SEAL_LOCK: i64 = 1_635_083_314;

/// Column positions in [`RECORD_COLUMNS`].
const PREV_HASH: usize = 13;
const HASH: usize = 14;

/// How many rows [`PgAuditSink::verify`] reads per page.
pub const DEFAULT_VERIFY_PAGE: usize = 10_000;

/// The number of chains of the log (migration 9).
pub const AUDIT_CHAINS: u16 = 16;

/// Which audit records to list: every filter set must match.
///
/// ```
/// use chronicle_crypto::{AuditOperation, SubjectId};
/// use chronicle_postgres::AuditQuery;
///
/// let query = AuditQuery {
///     subject: Some(SubjectId::new("user-17")),
///     operation: Some(AuditOperation::Decrypt),
///     ..AuditQuery::default()
/// };
/// assert_eq!(query.limit, 1_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only this subject's records. Default: any.
    pub subject: Option<SubjectId>,
    /// Only this operation. Default: any.
    pub operation: Option<AuditOperation>,
    /// Only this outcome. Default: any.
    pub outcome: Option<AuditOutcome>,
    /// Only records covering this event. Default: any.
    pub event_id: Option<Uuid>,
    /// Only this actor's records. Default: any.
    pub actor: Option<String>,
    /// Only records whose time is in `[from, to)`. Default: all time.
    pub range: TimeRange,
    /// Only records after this [`AuditRecord::id`] (to page on). Default:
    /// from the first.
    pub after_id: u64,
    /// At most this many records, oldest (lowest id) first. Default: 1 000.
    pub limit: usize,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            subject: None,
            operation: None,
            outcome: None,
            event_id: None,
            actor: None,
            range: TimeRange::default(),
            after_id: 0,
            limit: 1_000,
        }
    }
}

/// An [`AuditSink`] on PostgreSQL (migrations 3, 9 and 11), and the
/// reader, sealer and verifier of what it stored.
///
/// [`AuditSink::append`] is one statement in its own transaction (an
/// `INSERT` for one record, `chronicle_audit_append` for several; prepared
/// unless [`PgAuditSink::statement_cache`] is off), committed durably even
/// in a session with `synchronous_commit = off`: it stores the records
/// unlinked (no lock, no head row)
/// and returns only after the commit, so a caller never releases plaintext
/// whose audit record could still be lost. An audited append stores its
/// records in the append's own statement. [`PgAuditSink::seal`] links
/// committed records into the hash chain (`hash = SHA-256(prev_hash ||
/// canonical(entry))`) in the order of their writers' transactions, after
/// they commit; run it in the background with
/// [`PgAuditSink::spawn_sealer`] (verification and listing seal first). A
/// record is tamper-evident once sealed. Records written before migration
/// 11 were linked by their writers into one of [`AUDIT_CHAINS`] chains and
/// verify as before; new ones go to chain 0. Wrap the sink in a
/// [`chronicle_crypto::GroupCommitAuditSink`] to merge concurrent readers'
/// batches into one statement.
///
/// Triggers refuse `UPDATE` (but sealing), `DELETE` and `TRUNCATE` of the log;
/// [`PgAuditSink::verify`] detects what someone who disabled them did.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_crypto::Result<()> {
/// use chronicle_crypto::AuditOperation;
/// use chronicle_postgres::{AuditQuery, PgAuditSink};
///
/// let audit = PgAuditSink::new(pool);
/// let shreds = audit
///     .list(&AuditQuery { operation: Some(AuditOperation::Shred), ..AuditQuery::default() })
///     .await?;
/// let report = audit.verify().await?;
/// for problem in &report.problems {
///     eprintln!("audit log: {problem}");
/// }
/// # let _ = shreds; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgAuditSink {
    pool: PgPool,
    statement_cache: bool,
}

impl std::fmt::Debug for PgAuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAuditSink").finish_non_exhaustive()
    }
}

fn failed(what: &str, e: impl Into<Error>) -> chronicle_crypto::Error {
    let e = e.into();
    chronicle_crypto::Error::audit(format!("audit log: cannot {what}: {e}"), e)
}

impl PgAuditSink {
    /// A sink over `pool`. The schema must be migrated ([`crate::migrate()`]).
    pub fn new(pool: PgPool) -> Self {
        PgAuditSink {
            pool,
            statement_cache: true,
        }
    }

    /// The same sink, preparing its append (`true`, the default: each
    /// decrypting read's record is one such append, and sent unnamed it
    /// is parsed and planned every time) or sending it unnamed (`false`:
    /// behind PgBouncer before 1.21 in transaction mode;
    /// [`crate::PgOptions::statement_cache`] reads the URL's setting).
    ///
    /// ```no_run
    /// # fn demo(pool: chronicle_postgres::PgPool) -> Result<(), chronicle_postgres::Error> {
    /// use chronicle_postgres::{PgAuditSink, PgOptions};
    ///
    /// let options = PgOptions::from_url("postgres://app@pooler:6432/app?statement_cache=off")?;
    /// let audit = PgAuditSink::new(pool).statement_cache(options.statement_cache());
    /// # let _ = audit; Ok(()) }
    /// ```
    pub fn statement_cache(self, on: bool) -> Self {
        PgAuditSink {
            statement_cache: on,
            ..self
        }
    }

    async fn client(&self) -> chronicle_crypto::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| failed("connect", Error::from(e)))
    }

    /// Links every committed record not yet in a chain into chain 0, in
    /// the order of their writers' transactions, and moves its head;
    /// returns how many were linked.
    ///
    /// Writers store records unlinked, in their own transactions (one
    /// statement, no lock, no head row), so sealing is what makes a record
    /// tamper-evident. Only records below the snapshot's xmin are sealed:
    /// every transaction below it has ended, so no record can still appear
    /// there, and the head remembers that horizon (an unlinked record found
    /// below it later was planted, and [`PgAuditSink::verify`] reports it).
    /// One sealer runs at a time (an advisory lock; others wait for it).
    /// Run it in the background ([`PgAuditSink::spawn_sealer`]); `verify`
    /// and `list` seal first.
    pub async fn seal(&self) -> chronicle_crypto::Result<u64> {
        let mut total = 0;
        loop {
            let (sealed, more) = self.seal_batch(SEAL_BATCH).await?;
            total += sealed;
            if sealed < SEAL_BATCH as u64 && !more {
                return Ok(total);
            }
        }
    }

    /// Seals until every committed record is linked, waiting up to `wait`
    /// for the transactions that hold the horizon back (any open writing
    /// transaction in the cluster does, as it holds back the event feed);
    /// returns how many were linked and how many are still unlinked
    /// (records, and encrypted events whose records are still to be
    /// derived).
    pub async fn seal_all(
        &self,
        wait: std::time::Duration,
    ) -> chronicle_crypto::Result<(u64, u64)> {
        let deadline = std::time::Instant::now() + wait;
        let mut sealed = 0;
        loop {
            sealed += self.seal().await?;
            let client = self.client().await?;
            // Records not sealed yet, and committed encrypted events whose
            // records are still to be derived (beyond the horizon).
            let left: i64 = client
                .query_typed_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM chronicle_audit_log WHERE hash IS NULL) + ({UNDERIVED})"
                    ),
                    &[],
                )
                .await
                .map_err(|e| failed("count the unsealed records", e))?
                .get(0);
            if left == 0 || std::time::Instant::now() >= deadline {
                return Ok((sealed, u64::try_from(left).unwrap_or(0)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Seals every `every` until the task is aborted; a failed round is
    /// logged and retried at the next.
    pub fn spawn_sealer(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let sink = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = sink.seal().await {
                    tracing::warn!(error = %e, "sealing the audit log failed; retrying");
                }
            }
        })
    }

    /// One sealing round: derives the `encrypt` records of the events
    /// written since the last round, then links up to `limit` records.
    /// Returns how many were linked, and whether events were left for the
    /// next round.
    async fn seal_batch(&self, limit: usize) -> chronicle_crypto::Result<(u64, bool)> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| failed("begin sealing", e))?;
        // Without JIT: the derivation's estimate of a backlog crosses
        // jit_above_cost, and compiling costs ~12 ms a round for queries
        // that run in tens of milliseconds.
        tx.execute_typed(
            "SELECT pg_advisory_xact_lock($1), set_config('jit', 'off', true)",
            &[(&SEAL_LOCK, Type::INT8)],
        )
        .await
        .map_err(|e| failed("take the sealer's lock", e))?;
        // The advisory lock keeps other sealers off the head, and nothing
        // else moves it since migration 11: reading it without a row lock
        // takes no transaction id, so a round with nothing to seal writes
        // nothing (the background sealer and every list and verify run one).
        let head = tx
            .query_typed_opt(
                "SELECT seq, hash, sealed_below, pg_snapshot_xmin(pg_current_snapshot()),
                        derived_tid, derived_pos,
                        (SELECT coalesce(max(l.seq), 0) FROM chronicle_audit_log l WHERE l.chain = 0)
                   FROM chronicle_audit_head WHERE chain = 0",
                &[],
            )
            .await
            .map_err(|e| failed("read chain 0's head", e))?;
        // Without its head nothing can be linked; verification reports it.
        let Some(head) = head else {
            return Ok((0, false));
        };
        let mut seq = u64::try_from(head.get::<_, i64>(0)).unwrap_or(0);
        let mut hash = <[u8; 32]>::try_from(head.get::<_, Vec<u8>>(1).as_slice())
            .map(ChainHash::from_bytes)
            .map_err(|_| chronicle_crypto::Error::Backend {
                message: "audit log: the head hash of chain 0 is not 32 bytes, so nothing can be \
                          sealed; the head row was changed outside the audit sink: run \
                          chronicle audit verify, and restore the head from a backup or an anchor"
                    .into(),
                source: None,
            })?;
        // A head that is not the chain's last row was changed outside the
        // sealer (verify reports how): linking more records after it would
        // only extend the damage, and deriving would store records again.
        let last: i64 = head.get(6);
        if last != head.get::<_, i64>(0) {
            tracing::warn!(
                head = head.get::<_, i64>(0),
                last,
                "audit log: chain 0's head is not its last row, so nothing is sealed; run chronicle audit verify"
            );
            return Ok((0, false));
        }
        let below: Xid8 = head.get(2);
        let derived = derive_encrypt_records(&tx, (head.get(4), head.get(5)), head.get(3)).await?;
        let horizon = derived.seal_below;
        let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = tx
            .query_typed(
                &format!(
                    "SELECT {RECORD_COLUMNS}, transaction_id FROM chronicle_audit_log \
                      WHERE hash IS NULL AND transaction_id >= $1 AND transaction_id < $2 \
                      ORDER BY transaction_id, id LIMIT $3"
                ),
                &[
                    (&below, Type::XID8),
                    (&horizon, Type::XID8),
                    (&limit_param, Type::INT8),
                ],
            )
            .await
            .map_err(|e| failed("read the records to seal", e))?;
        let n = rows.len();
        // A batch cut short seals below its last transaction, and derived
        // records up to it; the others are stored unsealed, to be sealed
        // in their place next round.
        let cut: Option<Xid8> = match rows.last() {
            Some(last) if n == limit => Some(last.get(RECORD_COLUMN_COUNT)),
            _ => None,
        };
        let (derived_now, derived_later): (Vec<_>, Vec<_>) = derived
            .records
            .into_iter()
            .partition(|(tid, _)| *tid < horizon && cut.is_none_or(|c| *tid <= c));
        store_derived(
            &tx,
            derived_later
                .into_iter()
                .map(|(tid, entry)| (tid, entry, None))
                .collect(),
        )
        .await?;
        if n == 0 && derived_now.is_empty() {
            // Nothing to link: the head's horizon stays where the last seal
            // that linked something left it. A row planted with a
            // transaction id between that horizon and this one looks like a
            // late writer's and will be sealed; one planted below it is
            // reported by verify. Only a moved derivation cursor is
            // written, so a round over an idle store writes nothing.
            if derived.scanned > 0 {
                tx.commit()
                    .await
                    .map_err(|e| failed("commit the derivation cursor", e))?;
            }
            return Ok((0, derived.more));
        }
        let (mut ids, mut seqs, mut prevs, mut hashes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut sealed_derived = Vec::with_capacity(derived_now.len());
        // Stored records and derived ones in transaction order (stored
        // first within a transaction), each linked to the one before.
        let mut stored = rows.iter().peekable();
        let mut fresh = derived_now.into_iter().peekable();
        loop {
            let take_stored = match (stored.peek(), fresh.peek()) {
                (Some(row), Some((tid, _))) => row.get::<_, Xid8>(RECORD_COLUMN_COUNT) <= *tid,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_stored {
                let Some(row) = stored.next() else { break };
                let id: i64 = row.get(0);
                let entry = entry(row).map_err(|reason| chronicle_crypto::Error::Backend {
                    message: format!(
                        "audit log: row id {id} cannot be read ({reason}), so it is not sealed; run chronicle audit verify"
                    ),
                    source: None,
                })?;
                let next = AuditRecord::compute_hash(&hash, &entry);
                seq += 1;
                ids.push(id);
                seqs.push(i64::try_from(seq).unwrap_or(i64::MAX));
                prevs.push(hash.as_bytes().to_vec());
                hashes.push(next.as_bytes().to_vec());
                hash = next;
            } else {
                let Some((tid, entry)) = fresh.next() else {
                    break;
                };
                let next = AuditRecord::compute_hash(&hash, &entry);
                seq += 1;
                let link = (i64::try_from(seq).unwrap_or(i64::MAX), hash, next);
                sealed_derived.push((tid, entry, Some(link)));
                hash = next;
            }
        }
        let linked = n + sealed_derived.len();
        store_derived(&tx, sealed_derived).await?;
        let updated = if ids.is_empty() {
            0
        } else {
            tx.execute_typed(
                "UPDATE chronicle_audit_log l
                    SET chain = 0, seq = u.seq, prev_hash = u.prev, hash = u.hash
                   FROM unnest($1::int8[], $2::int8[], $3::bytea[], $4::bytea[]) AS u(id, seq, prev, hash)
                  WHERE l.id = u.id AND l.hash IS NULL",
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&seqs, Type::INT8_ARRAY),
                    (&prevs, Type::BYTEA_ARRAY),
                    (&hashes, Type::BYTEA_ARRAY),
                ],
            )
            .await
            .map_err(|e| failed("seal records", e))?
        };
        if updated != n as u64 {
            return Err(chronicle_crypto::Error::Backend {
                message: format!(
                    "audit log: {updated} of {n} records could be sealed; something else changed the log while the sealer held it: run chronicle audit verify"
                ),
                source: None,
            });
        }
        // Everything below the horizon is sealed now, unless the batch was
        // cut short: then everything below its last transaction is.
        let sealed_below = cut.unwrap_or(horizon);
        let last_seq = i64::try_from(seq).unwrap_or(i64::MAX);
        tx.execute_typed(
            "UPDATE chronicle_audit_head SET seq = $1, hash = $2, sealed_below = greatest(sealed_below, $3)
              WHERE chain = 0",
            &[
                (&last_seq, Type::INT8),
                (&hash.as_bytes().as_slice(), Type::BYTEA),
                (&sealed_below, Type::XID8),
            ],
        )
        .await
        .map_err(|e| failed("move chain 0's head", e))?;
        tx.commit()
            .await
            .map_err(|e| failed("commit the seal", e))?;
        Ok((linked as u64, derived.more))
    }

    /// Every chain's head as anchored in `chronicle_audit_head`: what to
    /// keep outside the database for [`PgAuditSink::verify_against`].
    pub async fn heads(&self) -> chronicle_crypto::Result<BTreeMap<u16, ChainHead>> {
        let client = self.client().await?;
        read_heads(&**client).await
    }

    /// The number of sealed records in the log (the sum of the chains'
    /// heads).
    pub async fn len(&self) -> chronicle_crypto::Result<u64> {
        Ok(self.heads().await?.values().map(|h| h.seq).sum())
    }

    /// Whether the log has no record.
    pub async fn is_empty(&self) -> chronicle_crypto::Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// The records matching `query`, in `id` order, after sealing what can
    /// be sealed ([`PgAuditSink::seal`]); records of transactions newer than
    /// the oldest open one come unsealed ([`AuditRecord::sealed`]).
    pub async fn list(&self, query: &AuditQuery) -> chronicle_crypto::Result<Vec<AuditRecord>> {
        self.seal().await?;
        let client = self.client().await?;
        let subject = query.subject.as_ref().map(SubjectId::as_str);
        let operation = query.operation.map(AuditOperation::as_str);
        let outcome = query.outcome.map(AuditOutcome::as_str);
        let after = i64::try_from(query.after_id).unwrap_or(i64::MAX);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM chronicle_audit_log \
                      WHERE id > $1 \
                        AND ($2::text IS NULL OR subject = $2) \
                        AND ($3::text IS NULL OR operation = $3) \
                        AND ($4::text IS NULL OR outcome = $4) \
                        AND ($5::uuid IS NULL OR event_ids @> ARRAY[$5::uuid]) \
                        AND ($6::text IS NULL OR actor = $6) \
                        AND at >= coalesce($7, '-infinity'::timestamptz) \
                        AND at < coalesce($8, 'infinity'::timestamptz) \
                      ORDER BY id LIMIT $9"
                ),
                &[
                    (&after, Type::INT8),
                    (&subject, Type::TEXT),
                    (&operation, Type::TEXT),
                    (&outcome, Type::TEXT),
                    (&query.event_id, Type::UUID),
                    (&query.actor, Type::TEXT),
                    (&query.range.from, Type::TIMESTAMPTZ),
                    (&query.range.to, Type::TIMESTAMPTZ),
                    (&limit, Type::INT8),
                ],
            )
            .await
            .map_err(|e| failed("list records", e))?;
        rows.iter()
            .map(|row| {
                record(row).map_err(|reason| chronicle_crypto::Error::Backend {
                    message: format!(
                        "audit log: row {} cannot be read ({reason}); run chronicle audit verify",
                        row.get::<_, i64>(0)
                    ),
                    source: None,
                })
            })
            .collect()
    }

    /// Verifies every chain in the table against its anchored head, in
    /// pages of [`DEFAULT_VERIFY_PAGE`] rows; see [`PgAuditSink::verify_paged`].
    pub async fn verify(&self) -> chronicle_crypto::Result<AuditReport> {
        self.verify_paged(DEFAULT_VERIFY_PAGE).await
    }

    /// Verifies every chain in the table, reading `page_size` rows at a
    /// time inside one read-only repeatable-read transaction (a consistent
    /// snapshot of the log and its heads).
    ///
    /// Reports, per chain: edited rows, deleted rows (a gap), inserted rows,
    /// rewritten links, rows cut from the end (the head row says more),
    /// rows added after the head, and rows that cannot even be decoded
    /// (reported as edited); rows of a chain without a head row are
    /// reported as added after the head. A problem that straddles two pages
    /// is always reported, but may be named differently than within one
    /// page (e.g. an inserted row as a broken link); use a larger page to
    /// tell them apart.
    pub async fn verify_paged(&self, page_size: usize) -> chronicle_crypto::Result<AuditReport> {
        self.verify_inner(page_size, None).await
    }

    /// Like [`PgAuditSink::verify`], and also against `anchors`: heads
    /// recorded earlier *outside* the database (read with
    /// [`PgAuditSink::heads`], or [`AuditReport::heads`], and kept in a
    /// write-once store, a ticket, a signed log). The head rows in the
    /// database are only as trustworthy as the database: someone able to
    /// rewrite the log can rewrite them too, recomputing every hash.
    /// Against an outside anchor, a chain rewritten at or before the
    /// anchored row reports [`ChainProblem::HeadMismatch`], and one cut back
    /// before it [`ChainProblem::Truncated`].
    pub async fn verify_against(
        &self,
        anchors: &BTreeMap<u16, ChainHead>,
    ) -> chronicle_crypto::Result<AuditReport> {
        self.verify_inner(DEFAULT_VERIFY_PAGE, Some(anchors)).await
    }

    async fn verify_inner(
        &self,
        page_size: usize,
        outside: Option<&BTreeMap<u16, ChainHead>>,
    ) -> chronicle_crypto::Result<AuditReport> {
        let page_size = page_size.max(2);
        self.seal().await?;
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| failed("begin a read-only transaction", e))?;
        let mut heads = read_heads(&*tx).await?;
        // Chains that have rows but no head: verified against an empty one.
        let stored = tx
            .query_typed(
                "SELECT DISTINCT chain FROM chronicle_audit_log WHERE chain IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| failed("list the chains", e))?;
        for row in &stored {
            let chain = u16::try_from(row.get::<_, i16>(0)).unwrap_or(u16::MAX);
            heads.entry(chain).or_insert(ChainHead::GENESIS);
        }
        let mut report = AuditReport {
            checked: 0,
            chains: Vec::new(),
            problems: Vec::new(),
            unsealed: 0,
        };
        for (chain, anchor) in heads {
            let verified = verify_chain_paged(&*tx, chain, page_size, &anchor).await?;
            report.push_chain(chain, verified);
        }
        // Unsealed rows: in flight, or planted below the sealer's horizon
        // (the first thousand of those named).
        let unsealed = tx
            .query_typed_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE l.transaction_id >= h.sealed_below) + ({UNDERIVED}),
                            (array_agg(l.id ORDER BY l.id)
                               FILTER (WHERE l.transaction_id < h.sealed_below))[1:1000]
                       FROM chronicle_audit_head h
                       LEFT JOIN chronicle_audit_log l ON l.hash IS NULL
                      WHERE h.chain = 0"
                ),
                &[],
            )
            .await
            .map_err(|e| failed("count the unsealed records", e))?;
        report.unsealed = u64::try_from(unsealed.get::<_, i64>(0)).unwrap_or(0);
        let planted: Option<Vec<i64>> = unsealed.get(1);
        for id in planted.unwrap_or_default() {
            report.problems.push(chronicle_crypto::AuditProblem {
                chain: 0,
                problem: ChainProblem::Backdated {
                    id: u64::try_from(id).unwrap_or(0),
                },
                id: u64::try_from(id).ok(),
            });
        }
        if let Some(outside) = outside {
            for (chain, anchor) in outside.iter().filter(|(_, a)| a.seq > 0) {
                let seq = i64::try_from(anchor.seq).unwrap_or(i64::MAX);
                let chain_param = i16::try_from(*chain).unwrap_or(i16::MAX);
                let row = tx
                    .query_typed_opt(
                        "SELECT hash FROM chronicle_audit_log WHERE chain = $1 AND seq = $2",
                        &[(&chain_param, Type::INT2), (&seq, Type::INT8)],
                    )
                    .await
                    .map_err(|e| failed("read the anchored row", e))?;
                let last = report
                    .chains
                    .iter()
                    .find(|c| c.chain == *chain)
                    .map_or(0, |c| c.head.seq);
                let problem = match row.map(|r| r.get::<_, Vec<u8>>(0)) {
                    None if last < anchor.seq => Some(ChainProblem::Truncated {
                        last_seq: last,
                        expected_seq: anchor.seq,
                    }),
                    Some(hash) if hash.as_slice() == anchor.hash.as_bytes() => None,
                    _ => Some(ChainProblem::HeadMismatch { seq: anchor.seq }),
                };
                if let Some(problem) = problem {
                    let problem = chronicle_crypto::AuditProblem {
                        chain: *chain,
                        problem,
                        id: None,
                    };
                    if !report.problems.contains(&problem) {
                        report.problems.push(problem);
                    }
                }
            }
        }
        // Name each row found wrong by its id too, as `audit list` shows
        // it (a row inserted with a taken number: the later one).
        let (chains, seqs): (Vec<i16>, Vec<i64>) = report
            .problems
            .iter()
            .filter(|p| p.id.is_none())
            .filter_map(|p| {
                Some((
                    i16::try_from(p.chain).ok()?,
                    i64::try_from(p.problem.row_seq()?).ok()?,
                ))
            })
            .unzip();
        if !chains.is_empty() {
            let ids = tx
                .query_typed(
                    "SELECT l.chain, l.seq, max(l.id)
                       FROM chronicle_audit_log l
                       JOIN unnest($1::int2[], $2::int8[]) AS p(chain, seq)
                         ON l.chain = p.chain AND l.seq = p.seq
                      GROUP BY l.chain, l.seq",
                    &[(&chains, Type::INT2_ARRAY), (&seqs, Type::INT8_ARRAY)],
                )
                .await
                .map_err(|e| failed("look up the ids of the rows found wrong", e))?;
            for row in ids {
                let chain = u16::try_from(row.get::<_, i16>(0)).unwrap_or(u16::MAX);
                let seq = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                let id = u64::try_from(row.get::<_, i64>(2)).ok();
                for p in report.problems.iter_mut() {
                    if p.chain == chain && p.id.is_none() && p.problem.row_seq() == Some(seq) {
                        p.id = id;
                    }
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| failed("end the read-only transaction", e))?;
        Ok(report)
    }
}

/// Verifies one chain, page by page, against its head row.
async fn verify_chain_paged(
    client: &impl GenericClient,
    chain: u16,
    page_size: usize,
    anchor: &ChainHead,
) -> chronicle_crypto::Result<ChainReport> {
    let mut report = ChainReport {
        checked: 0,
        head: ChainHead::GENESIS,
        problems: Vec::new(),
    };
    let mut pending = read_page(client, chain, 0, page_size).await?;
    loop {
        let next = match pending.records.last() {
            Some(last) if pending.records.len() == page_size => {
                read_page(client, chain, last.seq, page_size).await?
            }
            _ => Page::default(),
        };
        let is_last = next.records.is_empty();
        let page = verify_chain_from(&report.head, &pending.records, is_last.then_some(anchor));
        report.checked += page.checked;
        report.head = page.head;
        report.problems.extend(page.problems);
        for seq in pending.undecodable {
            if !report.problems.contains(&ChainProblem::Edited { seq }) {
                report.problems.push(ChainProblem::Edited { seq });
            }
        }
        if is_last {
            return Ok(report);
        }
        pending = next;
    }
}

#[derive(Default)]
struct Page {
    records: Vec<AuditRecord>,
    /// Rows whose columns could not be decoded, stood in for by records
    /// carrying their stored links.
    undecodable: Vec<u64>,
}

async fn read_page(
    client: &impl GenericClient,
    chain: u16,
    after: u64,
    limit: usize,
) -> chronicle_crypto::Result<Page> {
    let chain = i16::try_from(chain).unwrap_or(i16::MAX);
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query_typed(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM chronicle_audit_log \
                  WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ),
            &[
                (&chain, Type::INT2),
                (&after, Type::INT8),
                (&limit, Type::INT8),
            ],
        )
        .await
        .map_err(|e| failed("read records", e))?;
    let mut page = Page::default();
    for row in &rows {
        match record(row) {
            Ok(r) => page.records.push(r),
            Err(_) => {
                let seq = row
                    .try_get::<_, i64>(2)
                    .ok()
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0);
                page.undecodable.push(seq);
                page.records.push(stand_in(row, seq));
            }
        }
    }
    Ok(page)
}

/// A record for a row that cannot be decoded: its links as stored (so the
/// rest of the chain still verifies), its contents a placeholder.
fn stand_in(row: &Row, seq: u64) -> AuditRecord {
    let hash_at = |i: usize| {
        row.try_get::<_, Option<Vec<u8>>>(i)
            .ok()
            .flatten()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map_or(ChainHash::ZERO, ChainHash::from_bytes)
    };
    let context = AccessContext::new("", "");
    AuditRecord {
        id: row
            .try_get::<_, i64>(0)
            .ok()
            .and_then(|i| u64::try_from(i).ok())
            .unwrap_or(0),
        chain: row
            .try_get::<_, i16>(1)
            .ok()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(0),
        seq,
        entry: AuditEntry::new(AuditOperation::Encrypt, AuditOutcome::Failed, &context),
        prev_hash: hash_at(PREV_HASH),
        hash: hash_at(HASH),
        sealed: true,
    }
}

async fn read_heads(
    client: &impl GenericClient,
) -> chronicle_crypto::Result<BTreeMap<u16, ChainHead>> {
    let rows = client
        .query_typed(
            "SELECT chain, seq, hash FROM chronicle_audit_head ORDER BY chain",
            &[],
        )
        .await
        .map_err(|e| failed("read the chain heads", e))?;
    let mut heads = BTreeMap::new();
    for row in &rows {
        let chain: i16 = row.get(0);
        let seq: i64 = row.get(1);
        let hash: Vec<u8> = row.get(2);
        let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| {
            chronicle_crypto::Error::Backend {
                message: format!("audit log: the head hash of chain {chain} is not 32 bytes"),
                source: None,
            }
        })?;
        heads.insert(
            u16::try_from(chain).unwrap_or(u16::MAX),
            ChainHead {
                seq: u64::try_from(seq).unwrap_or(0),
                hash: ChainHash::from_bytes(hash),
            },
        );
    }
    if heads.len() < usize::from(AUDIT_CHAINS) {
        return Err(chronicle_crypto::Error::Backend {
            message: format!(
                "audit log: chronicle_audit_head has {} of its {AUDIT_CHAINS} rows; the audit log was tampered with or the schema is incomplete: run `chronicle migrate`, and if it is up to date, `chronicle audit verify` to see what changed",
                heads.len()
            ),
            source: None,
        });
    }
    Ok(heads)
}

/// Decodes a row selected with [`RECORD_COLUMNS`]; a row not sealed yet
/// has no chain columns ([`AuditRecord::sealed`] false).
fn record(row: &Row) -> Result<AuditRecord, String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let id: i64 = row.try_get(0).map_err(text)?;
    let chain: Option<i16> = row.try_get(1).map_err(text)?;
    let seq: Option<i64> = row.try_get(2).map_err(text)?;
    let hash = |i: usize| -> Result<Option<ChainHash>, String> {
        let Some(bytes) = row.try_get::<_, Option<Vec<u8>>>(i).map_err(text)? else {
            return Ok(None);
        };
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(|b| Some(ChainHash::from_bytes(b)))
            .map_err(|_| format!("column {i} is not a 32-byte hash"))
    };
    let (prev_hash, hash) = (hash(PREV_HASH)?, hash(HASH)?);
    let sealed = hash.is_some();
    if sealed != (chain.is_some() && seq.is_some() && prev_hash.is_some()) {
        return Err("its chain columns are set in part".into());
    }
    Ok(AuditRecord {
        id: u64::try_from(id).map_err(|_| "negative id".to_owned())?,
        chain: u16::try_from(chain.unwrap_or(0)).map_err(|_| "negative chain".to_owned())?,
        seq: u64::try_from(seq.unwrap_or(0)).map_err(|_| "negative seq".to_owned())?,
        entry: entry(row)?,
        prev_hash: prev_hash.unwrap_or(ChainHash::ZERO),
        hash: hash.unwrap_or(ChainHash::ZERO),
        sealed,
    })
}

/// The entry of a row selected with [`RECORD_COLUMNS`].
fn entry(row: &Row) -> Result<AuditEntry, String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let operation: String = row.try_get(4).map_err(text)?;
    let outcome: String = row.try_get(5).map_err(text)?;
    let subject: Option<String> = row.try_get(6).map_err(text)?;
    let key_id: Option<Uuid> = row.try_get(7).map_err(text)?;
    let kek_id: Option<String> = row.try_get(8).map_err(text)?;
    let event_ids: Option<Vec<Uuid>> = row.try_get(9).map_err(text)?;
    let fields: Option<Vec<String>> = row.try_get(10).map_err(text)?;
    Ok(AuditEntry {
        at: row.try_get::<_, DateTime<Utc>>(3).map_err(text)?,
        operation: AuditOperation::from_str(&operation).map_err(|e| e.to_string())?,
        outcome: AuditOutcome::from_str(&outcome).map_err(|e| e.to_string())?,
        subject: subject.map(SubjectId::new),
        key_id: key_id.map(DataKeyId::from_uuid),
        kek_id: kek_id.map(KekId::new),
        event_ids: event_ids.unwrap_or_default(),
        fields: fields.unwrap_or_default(),
        actor: row.try_get(11).map_err(text)?,
        purpose: row.try_get(12).map_err(text)?,
    })
}

/// How many stored encrypted events the sealer has not derived records
/// from yet (those of transactions beyond its last horizon).
const UNDERIVED: &str = "SELECT count(*) FROM chronicle_audit_head dh \
     JOIN events de ON (de.transaction_id, de.global_position) > (dh.derived_tid, dh.derived_pos) \
     WHERE dh.chain = 0 AND de.metadata ? '$encrypted_by' AND cardinality(de.encrypted_fields) > 0";

/// Events read per sealing round to derive `encrypt` records from.
const DERIVE_BATCH: i64 = 20_000;

/// What [`derive_encrypt_records`] did.
struct Derived {
    /// Events read.
    scanned: usize,
    /// Seal only below this transaction: the horizon, or the last
    /// transaction read when events were left for the next round.
    seal_below: Xid8,
    /// Whether events were left for the next round.
    more: bool,
    /// The records derived, with their events' transaction, in that order;
    /// not stored yet.
    records: Vec<(Xid8, AuditEntry)>,
}

/// Reads the events after `cursor` (feed order) and below `horizon`, and
/// derives one `encrypt` record per transaction, key and writer context of
/// those marked with [`ENCRYPTED_BY`]: what the writer used to store itself
/// (migration 12). The sealer stores them, sealed where it can. Moves the
/// head's cursor past the events read. Runs in the sealer's transaction,
/// under its lock.
async fn derive_encrypt_records(
    tx: &tokio_postgres::Transaction<'_>,
    cursor: (Xid8, i64),
    horizon: Xid8,
) -> chronicle_crypto::Result<Derived> {
    // One row for the last event read (kind 0), then one per encrypted
    // field of the marked events (kind 1), in feed order. A pointer
    // without escapes is split inline; chronicle_pointer_path unescapes.
    // Only marked events keep their data in the scan (most events of a
    // store are not encrypted, and carrying every event's data spilled
    // the scan to disk).
    let rows = tx
        .query_typed(
            "WITH scanned AS (
                 SELECT transaction_id, global_position, event_id, \"timestamp\",
                        CASE WHEN metadata ? '$encrypted_by' THEN event_data END AS event_data,
                        encrypted_fields, metadata -> '$encrypted_by' AS mark
                   FROM events
                  WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3
                  ORDER BY transaction_id, global_position
                  LIMIT $4)
             SELECT 0 AS kind, transaction_id, global_position, (SELECT count(*) FROM scanned),
                    NULL::uuid, NULL::timestamptz, NULL::text, NULL::text, NULL::text, NULL::text, 0::int8
               FROM (SELECT transaction_id, global_position FROM scanned
                      ORDER BY transaction_id DESC, global_position DESC LIMIT 1) AS last
             UNION ALL
             SELECT 1, s.transaction_id, s.global_position, 0, s.event_id, s.\"timestamp\", f.field,
                    s.event_data #> CASE WHEN strpos(f.field, '~') = 0
                                         THEN string_to_array(substr(f.field, 2), '/')
                                         ELSE chronicle_pointer_path(f.field) END ->> 'kid',
                    s.mark ->> 'actor', s.mark ->> 'purpose', f.n
               FROM scanned s CROSS JOIN LATERAL unnest(s.encrypted_fields) WITH ORDINALITY AS f(field, n)
              WHERE s.mark IS NOT NULL
             ORDER BY 1, 2, 3, 11",
            &[
                (&cursor.0, Type::XID8),
                (&cursor.1, Type::INT8),
                (&horizon, Type::XID8),
                (&DERIVE_BATCH, Type::INT8),
            ],
        )
        .await
        .map_err(|e| failed("read the encrypted events to record", e))?;
    let Some(last) = rows.first() else {
        return Ok(Derived {
            scanned: 0,
            seal_below: horizon,
            more: false,
            records: Vec::new(),
        });
    };
    let last_tid: Xid8 = last.get(1);
    let last_pos: i64 = last.get(2);
    let scanned = usize::try_from(last.get::<_, i64>(3)).unwrap_or(0);
    let more = scanned as i64 >= DERIVE_BATCH;

    // Group as the writer did: one entry per transaction (append), key and
    // context, events and fields in first-seen order.
    let mut entries: Vec<AuditEntry> = Vec::new();
    let mut tids: Vec<Xid8> = Vec::new();
    let mut groups: std::collections::HashMap<(Xid8, Option<Uuid>, String, String), usize> =
        std::collections::HashMap::new();
    for row in &rows[1..] {
        let tid: Xid8 = row.get(1);
        let event_id: Uuid = row.get(4);
        let at: DateTime<Utc> = row.get(5);
        let field: String = row.get(6);
        let kid = row
            .get::<_, Option<&str>>(7)
            .and_then(|k| Uuid::parse_str(k).ok());
        let actor: String = row.get::<_, Option<String>>(8).unwrap_or_default();
        let purpose: String = row.get::<_, Option<String>>(9).unwrap_or_default();
        let slot = *groups
            .entry((tid, kid, actor.clone(), purpose.clone()))
            .or_insert_with(|| {
                let mut entry = AuditEntry::new(
                    AuditOperation::Encrypt,
                    AuditOutcome::Success,
                    &AccessContext::new(actor, purpose),
                );
                entry.at = at;
                entry.key_id = kid.map(DataKeyId::from_uuid);
                entries.push(entry);
                tids.push(tid);
                entries.len() - 1
            });
        entries[slot].add(event_id, &field);
    }
    if !entries.is_empty() {
        // The subjects, from the keys' rows (a shredded key's row stays).
        let kids: Vec<Uuid> = entries
            .iter()
            .filter_map(|e| e.key_id.map(|k| k.as_uuid()))
            .collect();
        let subjects: std::collections::HashMap<Uuid, String> = tx
            .query_typed(
                "SELECT key_id, subject FROM chronicle_data_keys WHERE key_id = ANY($1)",
                &[(&kids, Type::UUID_ARRAY)],
            )
            .await
            .map_err(|e| failed("read the subjects of the encrypted events' keys", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for entry in &mut entries {
            entry.subject = entry
                .key_id
                .and_then(|k| subjects.get(&k.as_uuid()))
                .map(|s| SubjectId::new(s.as_str()));
        }
    }
    tx.execute_typed(
        "UPDATE chronicle_audit_head SET derived_tid = $1, derived_pos = $2 WHERE chain = 0",
        &[(&last_tid, Type::XID8), (&last_pos, Type::INT8)],
    )
    .await
    .map_err(|e| failed("move the derivation cursor", e))?;
    Ok(Derived {
        scanned,
        // Events of the last transaction read may follow in the next
        // round, and their records must not fall below the seal.
        seal_below: if more { last_tid.min(horizon) } else { horizon },
        more,
        records: tids.into_iter().zip(entries).collect(),
    })
}

/// A record's place in chain 0: its `seq`, `prev_hash` and `hash`.
type Link = (i64, ChainHash, ChainHash);

/// Stores derived records with their events' transaction ids: sealed
/// (`chain` 0 and the [`Link`] given) or, with `None`, unsealed.
async fn store_derived(
    tx: &tokio_postgres::Transaction<'_>,
    records: Vec<(Xid8, AuditEntry, Option<Link>)>,
) -> chronicle_crypto::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    // A record's events and fields go as one JSON array each: slicing one
    // flat array parameter per row made the insert quadratic.
    let mut c = DerivedColumns::default();
    for (tid, e, link) in records {
        c.tid.push(tid);
        c.at.push(e.at);
        c.subject.push(e.subject.map(|s| s.as_str().to_owned()));
        c.key_id.push(e.key_id.map(|k| k.as_uuid()));
        c.event_ids.push(serde_json::json!(e.event_ids));
        c.fields.push(serde_json::json!(e.fields));
        c.actor.push(e.actor);
        c.purpose.push(e.purpose);
        c.chain.push(link.map(|_| 0i16));
        c.seq.push(link.map(|(seq, _, _)| seq));
        c.prev
            .push(link.map(|(_, prev, _)| prev.as_bytes().to_vec()));
        c.hash
            .push(link.map(|(_, _, hash)| hash.as_bytes().to_vec()));
    }
    tx.execute_typed(
        "INSERT INTO chronicle_audit_log (transaction_id, at, operation, outcome, subject, key_id,
                                          event_ids, fields, actor, purpose,
                                          chain, seq, prev_hash, hash)
         SELECT u.tid, u.at, 'encrypt', 'success', u.su, u.k,
                ARRAY(SELECT jsonb_array_elements_text(u.ev)::uuid),
                ARRAY(SELECT jsonb_array_elements_text(u.fi)),
                u.ac, u.pu, u.ch, u.sq, u.pv, u.hs
           FROM unnest($1::xid8[], $2::timestamptz[], $3::text[], $4::uuid[], $5::jsonb[],
                       $6::jsonb[], $7::text[], $8::text[], $9::int2[], $10::int8[],
                       $11::bytea[], $12::bytea[])
                WITH ORDINALITY AS u(tid, at, su, k, ev, fi, ac, pu, ch, sq, pv, hs, n)
          ORDER BY u.n",
        &[
            (&c.tid, Type::XID8_ARRAY),
            (&c.at, Type::TIMESTAMPTZ_ARRAY),
            (&c.subject, Type::TEXT_ARRAY),
            (&c.key_id, Type::UUID_ARRAY),
            (&c.event_ids, Type::JSONB_ARRAY),
            (&c.fields, Type::JSONB_ARRAY),
            (&c.actor, Type::TEXT_ARRAY),
            (&c.purpose, Type::TEXT_ARRAY),
            (&c.chain, Type::INT2_ARRAY),
            (&c.seq, Type::INT8_ARRAY),
            (&c.prev, Type::BYTEA_ARRAY),
            (&c.hash, Type::BYTEA_ARRAY),
        ],
    )
    .await
    .map_err(|e| failed("store the encrypted events' records", e))?;
    Ok(())
}

/// Derived `encrypt` records as the array parameters of their insert.
#[derive(Default)]
struct DerivedColumns {
    tid: Vec<Xid8>,
    at: Vec<DateTime<Utc>>,
    subject: Vec<Option<String>>,
    key_id: Vec<Option<Uuid>>,
    event_ids: Vec<serde_json::Value>,
    fields: Vec<serde_json::Value>,
    actor: Vec<String>,
    purpose: Vec<String>,
    chain: Vec<Option<i16>>,
    seq: Vec<Option<i64>>,
    prev: Vec<Option<Vec<u8>>>,
    hash: Vec<Option<Vec<u8>>>,
}

/// A batch of audit entries as the array parameters of
/// `chronicle_audit_append` (and the audit half of
/// `chronicle_append_audited`), in that order.
pub(crate) struct AuditColumns {
    at: Vec<DateTime<Utc>>,
    operation: Vec<&'static str>,
    outcome: Vec<&'static str>,
    subject: Vec<Option<String>>,
    key_id: Vec<Option<Uuid>>,
    kek_id: Vec<Option<String>>,
    event_counts: Vec<i32>,
    event_ids: Vec<Uuid>,
    field_counts: Vec<i32>,
    fields: Vec<String>,
    actor: Vec<String>,
    purpose: Vec<String>,
}

impl AuditColumns {
    pub(crate) fn new(entries: Vec<AuditEntry>) -> Self {
        let n = entries.len();
        let mut c = AuditColumns {
            at: Vec::with_capacity(n),
            operation: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            subject: Vec::with_capacity(n),
            key_id: Vec::with_capacity(n),
            kek_id: Vec::with_capacity(n),
            event_counts: Vec::with_capacity(n),
            event_ids: Vec::new(),
            field_counts: Vec::with_capacity(n),
            fields: Vec::new(),
            actor: Vec::with_capacity(n),
            purpose: Vec::with_capacity(n),
        };
        for e in entries {
            c.at.push(e.at);
            c.operation.push(e.operation.as_str());
            c.outcome.push(e.outcome.as_str());
            c.subject.push(e.subject.map(|s| s.as_str().to_owned()));
            c.key_id.push(e.key_id.map(|k| k.as_uuid()));
            c.kek_id.push(e.kek_id.map(|k| k.as_str().to_owned()));
            c.event_counts
                .push(i32::try_from(e.event_ids.len()).unwrap_or(i32::MAX));
            c.event_ids.extend(e.event_ids);
            c.field_counts
                .push(i32::try_from(e.fields.len()).unwrap_or(i32::MAX));
            c.fields.extend(e.fields);
            c.actor.push(e.actor);
            c.purpose.push(e.purpose);
        }
        c
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// The columns of its record when it holds exactly one, typed: at,
    /// operation, outcome, subject, key id, KEK id, event ids, fields,
    /// actor, purpose (what a one-record `INSERT` binds).
    pub(crate) fn single(&self) -> Option<[(&(dyn ToSql + Sync), Type); 10]> {
        if self.at.len() != 1 {
            return None;
        }
        Some([
            (&self.at[0], Type::TIMESTAMPTZ),
            (&self.operation[0], Type::TEXT),
            (&self.outcome[0], Type::TEXT),
            (&self.subject[0], Type::TEXT),
            (&self.key_id[0], Type::UUID),
            (&self.kek_id[0], Type::TEXT),
            (&self.event_ids, Type::UUID_ARRAY),
            (&self.fields, Type::TEXT_ARRAY),
            (&self.actor[0], Type::TEXT),
            (&self.purpose[0], Type::TEXT),
        ])
    }

    /// The twelve parameters of `chronicle_audit_append`, typed.
    pub(crate) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 12] {
        [
            (&self.at, Type::TIMESTAMPTZ_ARRAY),
            (&self.operation, Type::TEXT_ARRAY),
            (&self.outcome, Type::TEXT_ARRAY),
            (&self.subject, Type::TEXT_ARRAY),
            (&self.key_id, Type::UUID_ARRAY),
            (&self.kek_id, Type::TEXT_ARRAY),
            (&self.event_counts, Type::INT4_ARRAY),
            (&self.event_ids, Type::UUID_ARRAY),
            (&self.field_counts, Type::INT4_ARRAY),
            (&self.fields, Type::TEXT_ARRAY),
            (&self.actor, Type::TEXT_ARRAY),
            (&self.purpose, Type::TEXT_ARRAY),
        ]
    }
}

/// The keys and audit entries of an audited append, as the parameters that
/// follow `chronicle_append`'s in `chronicle_append_audited`.
pub(crate) struct AppendAudit {
    subject: Vec<String>,
    key_id: Vec<Uuid>,
    wrapped: Vec<Vec<u8>>,
    kek_id: Vec<String>,
    created_at: Vec<DateTime<Utc>>,
    audit: AuditColumns,
}

impl AppendAudit {
    fn new(keys: Vec<StoredDataKey>, audit: Vec<AuditEntry>) -> Self {
        let n = keys.len();
        let mut a = AppendAudit {
            subject: Vec::with_capacity(n),
            key_id: Vec::with_capacity(n),
            wrapped: Vec::with_capacity(n),
            kek_id: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            audit: AuditColumns::new(audit),
        };
        for k in keys {
            a.subject.push(k.subject.as_str().to_owned());
            a.key_id.push(k.id.as_uuid());
            a.wrapped.push(k.wrapped.ciphertext);
            a.kek_id.push(k.wrapped.kek_id.as_str().to_owned());
            a.created_at.push(k.created_at);
        }
        a
    }

    /// The columns of its one record and then of its one key, when it
    /// stores exactly one of each (a subject's first append, with its
    /// `create-key` record): what [`PgEventStore`]'s prepared first-key
    /// append binds after the event's.
    pub(crate) fn first_key(&self) -> Option<Vec<(&(dyn ToSql + Sync), Type)>> {
        if self.subject.len() != 1 {
            return None;
        }
        let mut params = self.audit.single()?.to_vec();
        params.extend([
            (&self.subject[0] as &(dyn ToSql + Sync), Type::TEXT),
            (&self.key_id[0], Type::UUID),
            (&self.wrapped[0], Type::BYTEA),
            (&self.kek_id[0], Type::TEXT),
            (&self.created_at[0], Type::TIMESTAMPTZ),
        ]);
        Some(params)
    }

    /// The one key's id, when it stores exactly one.
    pub(crate) fn only_key(&self) -> Option<Uuid> {
        match self.key_id.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The seventeen parameters, typed.
    pub(crate) fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&self.subject, Type::TEXT_ARRAY),
            (&self.key_id, Type::UUID_ARRAY),
            (&self.wrapped, Type::BYTEA_ARRAY),
            (&self.kek_id, Type::TEXT_ARRAY),
            (&self.created_at, Type::TIMESTAMPTZ_ARRAY),
        ];
        params.extend(self.audit.params());
        params
    }
}

/// The subject named by a CH410 ("subject shredded") from
/// `chronicle_append_audited`.
fn shredded_subject(e: &chronicle_core::Error) -> Option<SubjectId> {
    let chronicle_core::Error::Backend {
        source: Some(source),
        ..
    } = e
    else {
        return None;
    };
    let Some(Error::Postgres(pg)) = source.downcast_ref::<Error>() else {
        return None;
    };
    let db = pg.as_db_error()?;
    (db.code().code() == "CH410").then(|| SubjectId::new(db.detail().unwrap_or_default()))
}

/// A one-row subquery that raises its transaction's `synchronous_commit`
/// from `off` to `on`: a record appended through the sink (a decrypting
/// read's above all) is flushed before the read is acknowledged, whatever
/// the session trades away for its appends. Other settings (`local`,
/// `remote_write`, `remote_apply`) already flush, and are kept.
macro_rules! durable {
    () => {
        "(SELECT CASE WHEN current_setting('synchronous_commit') = 'off' \
                      THEN set_config('synchronous_commit', 'on', true) END) AS durable"
    };
}

#[async_trait]
impl AuditSink for PgAuditSink {
    async fn append(&self, entries: Vec<AuditEntry>) -> chronicle_crypto::Result<()> {
        let columns = AuditColumns::new(entries);
        if columns.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let statements = crate::Statements::new(self.statement_cache);
        if let Some(record) = columns.single() {
            // One record (a lone decrypting read's, a key operation's): a
            // plain insert.
            statements
                .execute(
                    &client,
                    concat!(
                        "INSERT INTO chronicle_audit_log (at, operation, outcome, subject, key_id, \
                           kek_id, event_ids, fields, actor, purpose) \
                         SELECT $1, $2, $3, $4, $5, $6, nullif($7, '{}'), nullif($8, '{}'), $9, $10 \
                           FROM ",
                        durable!()
                    ),
                    &record,
                )
                .await
                .map_err(|e| failed("append a record", e))?;
            return Ok(());
        }
        statements
            .query_one(
                &client,
                concat!(
                    "SELECT chronicle_audit_append(\
                       $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) FROM ",
                    durable!()
                ),
                &columns.params(),
            )
            .await
            .map_err(|e| failed("append records", e))?;
        Ok(())
    }
}

/// The metadata key under which an encrypted append stores its writer's
/// actor and purpose, from which the sealer derives its `encrypt` record
/// (migration 12).
pub const ENCRYPTED_BY: &str = "$encrypted_by";

/// Moves each successful `encrypt` entry into the metadata of the events it
/// covers (`"$encrypted_by": {"actor", "purpose"}`): the sealer derives the
/// record from the stored events (migration 12), so the append stores one
/// row instead of two. Returns the entries still to be stored.
fn mark_encrypted(events: &mut [NewEvent], audit: Vec<AuditEntry>) -> Vec<AuditEntry> {
    let mut kept = Vec::with_capacity(audit.len());
    for entry in audit {
        if entry.operation != AuditOperation::Encrypt || entry.outcome != AuditOutcome::Success {
            kept.push(entry);
            continue;
        }
        let mark = serde_json::json!({ "actor": entry.actor, "purpose": entry.purpose });
        for event in events
            .iter_mut()
            .filter(|e| entry.event_ids.contains(&e.event_id))
        {
            event
                .metadata
                .extra
                .insert(ENCRYPTED_BY.into(), mark.clone());
        }
    }
    kept
}

/// Appends with their new data keys and audit records in the same
/// statement: the events, their subjects' first keys and their
/// `create-key` records commit together (`chronicle_append_audited`), or
/// nothing does, in one round trip. `encrypt` records are not stored as
/// rows: the events carry their writer's actor and purpose in their
/// metadata (the `$encrypted_by` key) and the sealer derives the records from
/// them ([`PgAuditSink::seal`]), so an append for a subject that has its
/// key is the plain one-statement append.
#[async_trait]
impl AuditedAppender for PgEventStore {
    async fn append_audited(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
        new_keys: Vec<StoredDataKey>,
        audit: Vec<AuditEntry>,
    ) -> chronicle_core::Result<AuditedAppend> {
        let audit = mark_encrypted(&mut events, audit);
        if new_keys.is_empty() && audit.is_empty() {
            return self
                .append_with(aggregate_id, aggregate_type, expected, events, None)
                .await;
        }
        let extra = AppendAudit::new(new_keys, audit);
        self.append_with(aggregate_id, aggregate_type, expected, events, Some(&extra))
            .await
            .map_err(|e| match shredded_subject(&e) {
                Some(subject) => chronicle_crypto::Error::SubjectShredded { subject }.into(),
                None => e,
            })
    }
}

impl PgEventStore {
    /// This store with field encryption: appends encrypt under `context`
    /// and store their `encrypt` records in their own statement
    /// ([`EncryptedStore::audit_in_append`]); reads decrypt for `context`.
    /// The encryptor's audit sink should be a [`PgAuditSink`] (or a group
    /// commit over one) on the same database, with a sealer running
    /// ([`PgAuditSink::spawn_sealer`]) so that the records become
    /// tamper-evident soon after they commit.
    ///
    /// ```no_run
    /// # async fn demo(pool: chronicle_postgres::PgPool, crypto: std::sync::Arc<chronicle_crypto::FieldEncryptor>) {
    /// use chronicle_crypto::AccessContext;
    /// use chronicle_postgres::PgEventStore;
    ///
    /// let store = PgEventStore::new(pool).encrypted(crypto, AccessContext::new("signup-service", "registration"));
    /// assert!(store.audits_in_append());
    /// # }
    /// ```
    pub fn encrypted(
        self,
        encryptor: Arc<FieldEncryptor>,
        context: AccessContext,
    ) -> EncryptedStore<PgEventStore> {
        EncryptedStore::new(Arc::new(self), encryptor, context).audit_in_append()
    }
}
