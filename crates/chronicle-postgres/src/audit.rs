//! [`PgAuditSink`]: the hash-chained audit log in `chronicle_audit_log`,
//! anchored by the one-row `chronicle_audit_head`.

use std::str::FromStr;

use async_trait::async_trait;
use chronicle_core::TimeRange;
use chronicle_crypto::{
    AuditEntry, AuditOperation, AuditOutcome, AuditRecord, AuditSink, ChainHash, ChainHead,
    ChainProblem, ChainReport, DataKeyId, KekId, SubjectId, verify_chain_from,
};
use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, IsolationLevel, Row};
use uuid::Uuid;

use crate::{Error, PgPool};

/// The columns [`record`] decodes, in order.
const RECORD_COLUMNS: &str = "seq, at, operation, outcome, subject, key_id, kek_id, event_id, \
                              field, actor, purpose, prev_hash, hash";

/// The first key of the audit log's two-key advisory lock (`"aud1"`).
const AUDIT_LOCK_CLASS: i32 = 0x6175_6431;

/// How many rows [`PgAuditSink::verify`] reads per page.
pub const DEFAULT_VERIFY_PAGE: usize = 10_000;

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
    /// Only records about this event. Default: any.
    pub event_id: Option<Uuid>,
    /// Only this actor's records. Default: any.
    pub actor: Option<String>,
    /// Only records whose time is in `[from, to)`. Default: all time.
    pub range: TimeRange,
    /// Only records after this `seq` (to page on). Default: from the first.
    pub after_seq: u64,
    /// At most this many records, oldest first. Default: 1 000.
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
            after_seq: 0,
            limit: 1_000,
        }
    }
}

/// An [`AuditSink`] on PostgreSQL (migration 4), and the reader and verifier
/// of what it stored.
///
/// [`AuditSink::append`] links the batch after the chain's head in one
/// transaction: it takes the log's advisory transaction lock (waiting for it
/// assigns no transaction id, so a queue of appends does not hold back the
/// event feed), locks `chronicle_audit_head` (`FOR UPDATE`), chains the
/// entries (`hash = SHA-256(prev_hash || canonical(entry))`), inserts them
/// with one multi-row `INSERT` and moves the head, then commits. It returns
/// only after the commit, so a caller never releases plaintext whose audit
/// record could still be lost. Triggers refuse `UPDATE`, `DELETE` and
/// `TRUNCATE` of the log; [`PgAuditSink::verify`] detects what someone who
/// disabled them did.
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
        PgAuditSink { pool }
    }

    async fn client(&self) -> chronicle_crypto::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| failed("connect", Error::from(e)))
    }

    /// The chain's head as anchored in `chronicle_audit_head`.
    pub async fn head(&self) -> chronicle_crypto::Result<ChainHead> {
        let client = self.client().await?;
        read_head(&**client, false).await
    }

    /// The records matching `query`, in `seq` order.
    pub async fn list(&self, query: &AuditQuery) -> chronicle_crypto::Result<Vec<AuditRecord>> {
        let client = self.client().await?;
        let subject = query.subject.as_ref().map(SubjectId::as_str);
        let operation = query.operation.map(AuditOperation::as_str);
        let outcome = query.outcome.map(AuditOutcome::as_str);
        let after = i64::try_from(query.after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM chronicle_audit_log \
                      WHERE seq > $1 \
                        AND ($2::text IS NULL OR subject = $2) \
                        AND ($3::text IS NULL OR operation = $3) \
                        AND ($4::text IS NULL OR outcome = $4) \
                        AND ($5::uuid IS NULL OR event_id = $5) \
                        AND ($6::text IS NULL OR actor = $6) \
                        AND at >= coalesce($7, '-infinity'::timestamptz) \
                        AND at < coalesce($8, 'infinity'::timestamptz) \
                      ORDER BY seq LIMIT $9"
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

    /// Verifies the whole chain in the table against the anchored head, in
    /// pages of [`DEFAULT_VERIFY_PAGE`] rows; see [`PgAuditSink::verify_paged`].
    pub async fn verify(&self) -> chronicle_crypto::Result<ChainReport> {
        self.verify_paged(DEFAULT_VERIFY_PAGE).await
    }

    /// Verifies the whole chain in the table, reading `page_size` rows at a
    /// time inside one read-only repeatable-read transaction (a consistent
    /// snapshot of the log and its head).
    ///
    /// Reports edited rows, deleted rows (a gap), inserted rows, rewritten
    /// links, rows cut from the end (the head row says more), rows added
    /// after the head, and rows that cannot even be decoded (reported as
    /// edited). A problem that straddles two pages is always reported, but
    /// may be named differently than within one page (e.g. an inserted row
    /// as a broken link); use a larger page to tell them apart.
    pub async fn verify_paged(&self, page_size: usize) -> chronicle_crypto::Result<ChainReport> {
        self.verify_inner(page_size, None).await
    }

    /// Like [`PgAuditSink::verify`], and also against `anchor`: a head
    /// recorded earlier *outside* the database (read with
    /// [`PgAuditSink::head`] and kept in a write-once store, a ticket, a
    /// signed log). The head row in the database is only as trustworthy
    /// as the database: someone able to rewrite the log can rewrite it too,
    /// recomputing every hash. Against an outside anchor, a log rewritten
    /// at or before the anchored row reports [`ChainProblem::HeadMismatch`],
    /// and one cut back before it [`ChainProblem::Truncated`].
    pub async fn verify_against(
        &self,
        anchor: &ChainHead,
    ) -> chronicle_crypto::Result<ChainReport> {
        self.verify_inner(DEFAULT_VERIFY_PAGE, Some(anchor)).await
    }

    async fn verify_inner(
        &self,
        page_size: usize,
        outside: Option<&ChainHead>,
    ) -> chronicle_crypto::Result<ChainReport> {
        let page_size = page_size.max(2);
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| failed("begin a read-only transaction", e))?;
        let anchor = read_head(&*tx, false).await?;
        let mut report = ChainReport {
            checked: 0,
            head: ChainHead::GENESIS,
            problems: Vec::new(),
        };
        let mut pending = read_page(&*tx, 0, page_size).await?;
        loop {
            let next = match pending.records.last() {
                Some(last) if pending.records.len() == page_size => {
                    read_page(&*tx, last.seq, page_size).await?
                }
                _ => Page::default(),
            };
            let is_last = next.records.is_empty();
            let page =
                verify_chain_from(&report.head, &pending.records, is_last.then_some(&anchor));
            report.checked += page.checked;
            report.head = page.head;
            report.problems.extend(page.problems);
            for seq in pending.undecodable {
                if !report.problems.contains(&ChainProblem::Edited { seq }) {
                    report.problems.push(ChainProblem::Edited { seq });
                }
            }
            if is_last {
                break;
            }
            pending = next;
        }
        if let Some(outside) = outside.filter(|a| a.seq > 0) {
            let seq = i64::try_from(outside.seq).unwrap_or(i64::MAX);
            let row = tx
                .query_typed_opt(
                    "SELECT hash FROM chronicle_audit_log WHERE seq = $1",
                    &[(&seq, Type::INT8)],
                )
                .await
                .map_err(|e| failed("read the anchored row", e))?;
            let problem = match row.map(|r| r.get::<_, Vec<u8>>(0)) {
                None if report.head.seq < outside.seq => Some(ChainProblem::Truncated {
                    last_seq: report.head.seq,
                    expected_seq: outside.seq,
                }),
                Some(hash) if hash.as_slice() == outside.hash.as_bytes() => None,
                _ => Some(ChainProblem::HeadMismatch { seq: outside.seq }),
            };
            if let Some(problem) = problem
                && !report.problems.contains(&problem)
            {
                report.problems.push(problem);
            }
        }
        tx.commit()
            .await
            .map_err(|e| failed("end the read-only transaction", e))?;
        Ok(report)
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
    after: u64,
    limit: usize,
) -> chronicle_crypto::Result<Page> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query_typed(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM chronicle_audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
            ),
            &[(&after, Type::INT8), (&limit, Type::INT8)],
        )
        .await
        .map_err(|e| failed("read records", e))?;
    let mut page = Page::default();
    for row in &rows {
        match record(row) {
            Ok(r) => page.records.push(r),
            Err(_) => {
                let seq = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
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
    let context = chronicle_crypto::AccessContext::new("", "");
    AuditRecord {
        seq,
        entry: AuditEntry::new(AuditOperation::Encrypt, AuditOutcome::Failed, &context),
        prev_hash: hash_at(11),
        hash: hash_at(12),
    }
}

async fn read_head(client: &impl GenericClient, lock: bool) -> chronicle_crypto::Result<ChainHead> {
    // Locking: the advisory lock is taken while the rows are scanned, the
    // row lock on top of that (which assigns the transaction id, and
    // re-reads the row if a concurrent append moved it meanwhile).
    let row = if lock {
        client
            .query_typed_opt(
                "SELECT h.seq, h.hash FROM chronicle_audit_head h, pg_advisory_xact_lock($1, 0)
                  WHERE h.id FOR UPDATE OF h",
                &[(&AUDIT_LOCK_CLASS, Type::INT4)],
            )
            .await
    } else {
        client
            .query_typed_opt("SELECT seq, hash FROM chronicle_audit_head WHERE id", &[])
            .await
    };
    let row = row.map_err(|e| failed("read the chain head", e))?;
    let Some(row) = row else {
        return Err(chronicle_crypto::Error::Backend {
            message: "audit log: the head row of chronicle_audit_head is missing; the audit log was tampered with or the schema is incomplete".into(),
            source: None,
        });
    };
    let seq: i64 = row.get(0);
    let hash: Vec<u8> = row.get(1);
    let hash =
        <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| chronicle_crypto::Error::Backend {
            message: "audit log: the head hash is not 32 bytes".into(),
            source: None,
        })?;
    Ok(ChainHead {
        seq: u64::try_from(seq).unwrap_or(0),
        hash: ChainHash::from_bytes(hash),
    })
}

/// Decodes a row selected with [`RECORD_COLUMNS`].
fn record(row: &Row) -> Result<AuditRecord, String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let seq: i64 = row.try_get(0).map_err(text)?;
    let operation: String = row.try_get(2).map_err(text)?;
    let outcome: String = row.try_get(3).map_err(text)?;
    let subject: Option<String> = row.try_get(4).map_err(text)?;
    let key_id: Option<Uuid> = row.try_get(5).map_err(text)?;
    let kek_id: Option<String> = row.try_get(6).map_err(text)?;
    let hash = |i: usize| -> Result<ChainHash, String> {
        let bytes: Vec<u8> = row.try_get(i).map_err(text)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(ChainHash::from_bytes)
            .map_err(|_| format!("column {i} is not a 32-byte hash"))
    };
    Ok(AuditRecord {
        seq: u64::try_from(seq).map_err(|_| "negative seq".to_owned())?,
        entry: AuditEntry {
            at: row.try_get::<_, DateTime<Utc>>(1).map_err(text)?,
            operation: AuditOperation::from_str(&operation).map_err(|e| e.to_string())?,
            outcome: AuditOutcome::from_str(&outcome).map_err(|e| e.to_string())?,
            subject: subject.map(SubjectId::new),
            key_id: key_id.map(DataKeyId::from_uuid),
            kek_id: kek_id.map(KekId::new),
            event_id: row.try_get(7).map_err(text)?,
            field: row.try_get(8).map_err(text)?,
            actor: row.try_get(9).map_err(text)?,
            purpose: row.try_get(10).map_err(text)?,
        },
        prev_hash: hash(11)?,
        hash: hash(12)?,
    })
}

#[async_trait]
impl AuditSink for PgAuditSink {
    async fn append(&self, entries: Vec<AuditEntry>) -> chronicle_crypto::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| failed("begin a transaction", e))?;
        // The advisory lock first: waiting for it assigns no transaction
        // id, so queued appends do not hold back the global event feed.
        let mut head = read_head(&*tx, true).await?;
        let records: Vec<AuditRecord> = entries.into_iter().map(|e| head.link(e)).collect();

        let n = records.len();
        let mut seq = Vec::with_capacity(n);
        let mut at = Vec::with_capacity(n);
        let mut operation = Vec::with_capacity(n);
        let mut outcome = Vec::with_capacity(n);
        let mut subject = Vec::with_capacity(n);
        let mut key_id = Vec::with_capacity(n);
        let mut kek_id = Vec::with_capacity(n);
        let mut event_id = Vec::with_capacity(n);
        let mut field = Vec::with_capacity(n);
        let mut actor = Vec::with_capacity(n);
        let mut purpose = Vec::with_capacity(n);
        let mut prev_hash = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        for r in &records {
            let e = &r.entry;
            seq.push(i64::try_from(r.seq).unwrap_or(i64::MAX));
            at.push(e.at);
            operation.push(e.operation.as_str());
            outcome.push(e.outcome.as_str());
            subject.push(e.subject.as_ref().map(SubjectId::as_str));
            key_id.push(e.key_id.map(|k| k.as_uuid()));
            kek_id.push(e.kek_id.as_ref().map(KekId::as_str));
            event_id.push(e.event_id);
            field.push(e.field.as_deref());
            actor.push(e.actor.as_str());
            purpose.push(e.purpose.as_str());
            prev_hash.push(r.prev_hash.as_bytes().as_slice());
            hash.push(r.hash.as_bytes().as_slice());
        }
        let head_seq = i64::try_from(head.seq).unwrap_or(i64::MAX);
        let head_hash = head.hash.as_bytes().as_slice();
        tx.execute_typed(
            "WITH inserted AS (
                 INSERT INTO chronicle_audit_log (seq, at, operation, outcome, subject, key_id,
                                                  kek_id, event_id, field, actor, purpose,
                                                  prev_hash, hash)
                 SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::text[], $4::text[],
                                      $5::text[], $6::uuid[], $7::text[], $8::uuid[], $9::text[],
                                      $10::text[], $11::text[], $12::bytea[], $13::bytea[])
             )
             UPDATE chronicle_audit_head SET seq = $14, hash = $15 WHERE id",
            &[
                (&seq, Type::INT8_ARRAY),
                (&at, Type::TIMESTAMPTZ_ARRAY),
                (&operation, Type::TEXT_ARRAY),
                (&outcome, Type::TEXT_ARRAY),
                (&subject, Type::TEXT_ARRAY),
                (&key_id, Type::UUID_ARRAY),
                (&kek_id, Type::TEXT_ARRAY),
                (&event_id, Type::UUID_ARRAY),
                (&field, Type::TEXT_ARRAY),
                (&actor, Type::TEXT_ARRAY),
                (&purpose, Type::TEXT_ARRAY),
                (&prev_hash, Type::BYTEA_ARRAY),
                (&hash, Type::BYTEA_ARRAY),
                (&head_seq, Type::INT8),
                (&head_hash, Type::BYTEA),
            ],
        )
        .await
        .map_err(|e| failed("append records", e))?;
        tx.commit().await.map_err(|e| failed("commit records", e))?;
        Ok(())
    }
}
