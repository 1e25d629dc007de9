//! The audit trail: one [`AuditEntry`] per operation (per call, subject and
//! key, listing the events and fields concerned), chained into
//! [`AuditRecord`]s by SHA-256 so that [`verify_chain`] detects edited,
//! deleted and inserted rows. A log may hold several independent chains
//! (stripes, so that concurrent writers do not queue for one head);
//! [`verify_log`] checks each.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::keys::{DataKeyId, KekId, SubjectId};
use crate::{Error, Result};

/// Who asks, and why. Every audit entry carries both.
///
/// ```
/// use chronicle_crypto::AccessContext;
///
/// let ctx = AccessContext::new("support:alice", "ticket-4711");
/// assert_eq!(ctx.actor, "support:alice");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccessContext {
    /// The user or service acting.
    pub actor: String,
    /// The declared purpose (a ticket, a job name, "projection:user-profile").
    pub purpose: String,
}

impl AccessContext {
    /// A context for `actor` acting for `purpose`.
    pub fn new(actor: impl Into<String>, purpose: impl Into<String>) -> Self {
        AccessContext {
            actor: actor.into(),
            purpose: purpose.into(),
        }
    }
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AuditOperation {
    /// A field was encrypted.
    Encrypt,
    /// A field was decrypted (or redacted: see the outcome).
    Decrypt,
    /// A field was re-encrypted under its subject's newest data key.
    Reencrypt,
    /// A subject's first data key was made.
    CreateKey,
    /// A subject got a new current data key.
    Rotate,
    /// A data key was re-wrapped under a new key-encryption key.
    Rewrap,
    /// A subject's data keys were destroyed.
    Shred,
}

impl AuditOperation {
    /// The operation's name: `encrypt`, `decrypt`, `reencrypt`,
    /// `create-key`, `rotate`, `rewrap` or `shred`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOperation::Encrypt => "encrypt",
            AuditOperation::Decrypt => "decrypt",
            AuditOperation::Reencrypt => "reencrypt",
            AuditOperation::CreateKey => "create-key",
            AuditOperation::Rotate => "rotate",
            AuditOperation::Rewrap => "rewrap",
            AuditOperation::Shred => "shred",
        }
    }
}

impl fmt::Display for AuditOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditOperation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "encrypt" => AuditOperation::Encrypt,
            "decrypt" => AuditOperation::Decrypt,
            "reencrypt" => AuditOperation::Reencrypt,
            "create-key" => AuditOperation::CreateKey,
            "rotate" => AuditOperation::Rotate,
            "rewrap" => AuditOperation::Rewrap,
            "shred" => AuditOperation::Shred,
            other => {
                return Err(Error::InvalidOperation {
                    reason: format!("unknown audit operation {other:?}"),
                });
            }
        })
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AuditOutcome {
    /// Done.
    Success,
    /// Refused by the access policy; the reader got a redaction marker.
    Denied,
    /// The subject was shredded; the reader got a redaction marker.
    Shredded,
    /// Failed (authentication failure, unknown key); the caller got an error.
    Failed,
}

impl AuditOutcome {
    /// The outcome's name: `success`, `denied`, `shredded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Shredded => "shredded",
            AuditOutcome::Failed => "failed",
        }
    }
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditOutcome {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "success" => AuditOutcome::Success,
            "denied" => AuditOutcome::Denied,
            "shredded" => AuditOutcome::Shredded,
            "failed" => AuditOutcome::Failed,
            other => {
                return Err(Error::InvalidOperation {
                    reason: format!("unknown audit outcome {other:?}"),
                });
            }
        })
    }
}

/// One audited operation, before it is chained.
///
/// One entry covers one call's work on one subject under one key with one
/// outcome: an append of three events of a user is one `encrypt` entry
/// listing the three event ids and the encrypted fields; a read of a
/// user's stream is one `decrypt` entry listing the events read and the
/// fields released. Failures (a tampered ciphertext, an unknown key) get an
/// entry of their own naming the one event and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, truncated to microseconds (the precision of PostgreSQL's
    /// `timestamptz`, so a stored row hashes the same as the original).
    pub at: DateTime<Utc>,
    /// What was done.
    pub operation: AuditOperation,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// Whose data (absent when unknown, e.g. an unknown key id).
    pub subject: Option<SubjectId>,
    /// The data key used, made or destroyed.
    pub key_id: Option<DataKeyId>,
    /// The key-encryption key involved (rotate, rewrap, create-key).
    pub kek_id: Option<KekId>,
    /// The events whose fields were processed, in the order processed
    /// (empty for key operations).
    #[serde(default)]
    pub event_ids: Vec<Uuid>,
    /// The fields' JSON pointers (each once, in first-seen order; the
    /// union over `event_ids`).
    #[serde(default)]
    pub fields: Vec<String>,
    /// The actor, from the caller's [`AccessContext`].
    pub actor: String,
    /// The purpose, from the caller's [`AccessContext`].
    pub purpose: String,
}

impl AuditEntry {
    /// An entry stamped now, for `context`, with no subject, key or field.
    pub fn new(operation: AuditOperation, outcome: AuditOutcome, context: &AccessContext) -> Self {
        AuditEntry {
            at: Utc::now().trunc_subsecs(6),
            operation,
            outcome,
            subject: None,
            key_id: None,
            kek_id: None,
            event_ids: Vec::new(),
            fields: Vec::new(),
            actor: context.actor.clone(),
            purpose: context.purpose.clone(),
        }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: &SubjectId) -> Self {
        self.subject = Some(subject.clone());
        self
    }

    /// Sets the data key.
    pub fn with_key(mut self, key_id: DataKeyId) -> Self {
        self.key_id = Some(key_id);
        self
    }

    /// Sets the key-encryption key.
    pub fn with_kek(mut self, kek_id: &KekId) -> Self {
        self.kek_id = Some(kek_id.clone());
        self
    }

    /// Sets one event and one field.
    pub fn with_field(mut self, event_id: Uuid, field: &str) -> Self {
        self.event_ids = vec![event_id];
        self.fields = vec![field.to_owned()];
        self
    }

    /// Adds an event (unless it is the last one added) and a field (unless
    /// listed already).
    pub fn add(&mut self, event_id: Uuid, field: &str) {
        if self.event_ids.last() != Some(&event_id) {
            self.event_ids.push(event_id);
        }
        if !self.fields.iter().any(|f| f == field) {
            self.fields.push(field.to_owned());
        }
    }

    /// The event, if the entry covers exactly one.
    pub fn event_id(&self) -> Option<Uuid> {
        match self.event_ids.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The field, if the entry covers exactly one.
    pub fn field(&self) -> Option<&str> {
        match self.fields.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The canonical serialisation hashed into the chain, a compact JSON
    /// array with absent values as `null` and ids in their string forms:
    ///
    /// - at most one event and one field (every entry of the first
    ///   format): `["chronicle-audit/v1", at (microseconds since the
    ///   epoch), operation, outcome, subject, key_id, kek_id, event_id,
    ///   field, actor, purpose]`;
    /// - otherwise `["chronicle-audit/v2", at, operation, outcome, subject,
    ///   key_id, kek_id, [event_id, …], [field, …], actor, purpose]`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let head = (
            self.at.timestamp_micros(),
            self.operation.as_str(),
            self.outcome.as_str(),
            self.subject.as_ref().map(SubjectId::as_str),
            self.key_id.map(|k| k.to_string()),
            self.kek_id.as_ref().map(KekId::as_str),
        );
        // Strings, integers, nulls and arrays of them always serialize.
        if self.event_ids.len() <= 1 && self.fields.len() <= 1 {
            serde_json::to_vec(&(
                "chronicle-audit/v1",
                head.0,
                head.1,
                head.2,
                head.3,
                head.4,
                head.5,
                self.event_ids.first().map(|e| e.to_string()),
                self.fields.first().map(String::as_str),
                self.actor.as_str(),
                self.purpose.as_str(),
            ))
            .unwrap_or_default()
        } else {
            let events: Vec<String> = self.event_ids.iter().map(Uuid::to_string).collect();
            serde_json::to_vec(&(
                "chronicle-audit/v2",
                head.0,
                head.1,
                head.2,
                head.3,
                head.4,
                head.5,
                events,
                &self.fields,
                self.actor.as_str(),
                self.purpose.as_str(),
            ))
            .unwrap_or_default()
        }
    }
}

/// A SHA-256 chain hash, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash([u8; 32]);

impl ChainHash {
    /// The all-zero hash that the first record follows.
    pub const ZERO: ChainHash = ChainHash([0; 32]);

    /// A hash from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChainHash(bytes)
    }

    /// The hash's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

impl FromStr for ChainHash {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidOperation {
            reason: format!("{s:?} is not a chain hash (64 hex digits)"),
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ChainHash(out))
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A chained audit row: `hash = SHA-256(prev_hash || entry.canonical_bytes())`.
///
/// `id` orders the rows of the whole log (for listing and paging); `chain`
/// and `seq` place the row in its chain, for gap detection. None of them
/// is hashed: the order within a chain is fixed by the `prev_hash` links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The row's number in the whole log: unique and increasing, not
    /// gapless (equal to `seq` in a single-chain log).
    #[serde(default)]
    pub id: u64,
    /// The chain the row belongs to (0 in a single-chain log).
    #[serde(default)]
    pub chain: u16,
    /// Position in its chain, from 1, without gaps.
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The previous record's hash ([`ChainHash::ZERO`] for the first).
    pub prev_hash: ChainHash,
    /// This record's hash.
    pub hash: ChainHash,
    /// Whether the record is linked into its chain. A log that links
    /// records after they commit (the PostgreSQL sink) lists records not
    /// linked yet with `sealed: false`, `chain` and `seq` 0 and zero
    /// hashes.
    #[serde(default = "linked")]
    pub sealed: bool,
}

fn linked() -> bool {
    true
}

impl AuditRecord {
    /// The hash of `entry` following `prev_hash`.
    pub fn compute_hash(prev_hash: &ChainHash, entry: &AuditEntry) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(prev_hash.0);
        hasher.update(entry.canonical_bytes());
        ChainHash(hasher.finalize().into())
    }

    /// Whether the stored hash matches the record's contents.
    pub fn is_self_consistent(&self) -> bool {
        self.hash == AuditRecord::compute_hash(&self.prev_hash, &self.entry)
    }
}

/// The end of a chain: the last record's number and hash. Sinks keep it to
/// link the next batch; keeping a copy elsewhere (an anchor) lets
/// [`verify_chain_from`] detect rows deleted from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The last record's `seq` (0 for an empty chain).
    pub seq: u64,
    /// The last record's hash ([`ChainHash::ZERO`] for an empty chain).
    pub hash: ChainHash,
}

impl ChainHead {
    /// The head of an empty chain.
    pub const GENESIS: ChainHead = ChainHead {
        seq: 0,
        hash: ChainHash::ZERO,
    };

    /// Chains `entry` after this head and advances the head to it.
    ///
    /// ```
    /// use chronicle_crypto::{AccessContext, AuditEntry, AuditOperation, AuditOutcome, ChainHead, verify_chain};
    ///
    /// let ctx = AccessContext::new("ops", "test");
    /// let mut head = ChainHead::GENESIS;
    /// let records: Vec<_> = (0..3)
    ///     .map(|_| head.link(AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, &ctx)))
    ///     .collect();
    /// assert_eq!(head.seq, 3);
    /// assert!(verify_chain(&records).is_intact());
    /// ```
    pub fn link(&mut self, entry: AuditEntry) -> AuditRecord {
        let hash = AuditRecord::compute_hash(&self.hash, &entry);
        let record = AuditRecord {
            id: self.seq + 1,
            chain: 0,
            seq: self.seq + 1,
            entry,
            prev_hash: self.hash,
            hash,
            sealed: true,
        };
        *self = ChainHead {
            seq: record.seq,
            hash,
        };
        record
    }
}

/// A break in the audit chain, naming the rows concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainProblem {
    /// The row's contents no longer match its hash.
    Edited {
        /// The row.
        seq: u64,
    },
    /// Rows are missing between two rows.
    Deleted {
        /// The first missing number.
        first_seq: u64,
        /// The last missing number.
        last_seq: u64,
    },
    /// The row is not part of the chain: it links to an earlier row that
    /// another row already follows.
    Inserted {
        /// The row.
        seq: u64,
    },
    /// The row does not follow its predecessor: the predecessor was
    /// rewritten with a recomputed hash, or rows were deleted and the rest
    /// renumbered.
    BrokenLink {
        /// The row.
        seq: u64,
        /// The row before it.
        after_seq: u64,
    },
    /// A row not linked into any chain that no writer can have left
    /// unlinked: its transaction is older than the sealer's horizon (every
    /// transaction below it had ended when the sealer passed). It was
    /// inserted outside the audit sink.
    Backdated {
        /// The row's id ([`AuditRecord::id`]; it has no `seq`).
        id: u64,
    },
    /// The chain ends before the expected head: rows were deleted from the
    /// end.
    Truncated {
        /// The last row found.
        last_seq: u64,
        /// The expected last row.
        expected_seq: u64,
    },
    /// The row at the expected head's number does not have the expected
    /// hash: the chain was rewritten from there or before.
    HeadMismatch {
        /// The row.
        seq: u64,
    },
    /// Rows follow the expected head: they were added without moving the
    /// anchor, i.e. not by the audit sink.
    BeyondHead {
        /// The first row after the head.
        first_seq: u64,
        /// The last row.
        last_seq: u64,
    },
}

impl ChainProblem {
    fn seq(&self) -> u64 {
        match *self {
            ChainProblem::Edited { seq }
            | ChainProblem::Inserted { seq }
            | ChainProblem::BrokenLink { seq, .. }
            | ChainProblem::HeadMismatch { seq } => seq,
            ChainProblem::Deleted { first_seq, .. }
            | ChainProblem::BeyondHead { first_seq, .. } => first_seq,
            ChainProblem::Truncated { last_seq, .. } => last_seq,
            ChainProblem::Backdated { .. } => 0,
        }
    }
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f, None, None)
    }
}

impl ChainProblem {
    /// Writes the problem, naming rows `chain:seq` when `chain` is given
    /// (as `audit list` shows them) and the row concerned's `id` after it.
    fn describe(
        &self,
        f: &mut fmt::Formatter<'_>,
        chain: Option<u16>,
        id: Option<u64>,
    ) -> fmt::Result {
        let row = |seq: &u64| match chain {
            Some(chain) => format!("{chain}:{seq}"),
            None => seq.to_string(),
        };
        let this = |seq: &u64| match id {
            Some(id) => format!("{} (id {id})", row(seq)),
            None => row(seq),
        };
        match self {
            ChainProblem::Edited { seq } => {
                write!(
                    f,
                    "row {} was edited: its contents do not match its hash",
                    this(seq)
                )
            }
            ChainProblem::Deleted {
                first_seq,
                last_seq,
            } if first_seq == last_seq => write!(f, "row {} was deleted", row(first_seq)),
            ChainProblem::Deleted {
                first_seq,
                last_seq,
            } => write!(
                f,
                "rows {} to {} were deleted",
                row(first_seq),
                row(last_seq)
            ),
            ChainProblem::Inserted { seq } => {
                write!(
                    f,
                    "row {} was inserted: it is not part of the chain",
                    this(seq)
                )
            }
            ChainProblem::Backdated { id } => write!(
                f,
                "row id {id} is not linked into the chain and is older than the sealer's horizon: it was inserted outside the audit sink"
            ),
            ChainProblem::BrokenLink { seq, after_seq } => write!(
                f,
                "row {} does not follow row {}: row {} was rewritten with a recomputed hash, or rows were deleted and the rest renumbered",
                this(seq),
                row(after_seq),
                row(after_seq)
            ),
            ChainProblem::Truncated {
                last_seq,
                expected_seq,
            } => write!(
                f,
                "the chain ends at row {} but the anchor says {}: rows were deleted from the end",
                this(last_seq),
                row(expected_seq)
            ),
            ChainProblem::HeadMismatch { seq } => write!(
                f,
                "row {} does not have the anchored hash: the chain was rewritten up to there",
                this(seq)
            ),
            ChainProblem::BeyondHead {
                first_seq,
                last_seq,
            } => write!(
                f,
                "rows {} to {} come after the anchored head: they were added outside the audit sink",
                this(first_seq),
                row(last_seq)
            ),
        }
    }

    /// The `seq` of the row the problem is about, when that row exists
    /// (not for deleted rows, nor for a backdated row, which has none).
    pub fn row_seq(&self) -> Option<u64> {
        match self {
            ChainProblem::Deleted { .. } | ChainProblem::Backdated { .. } => None,
            _ => Some(self.seq()),
        }
    }
}

/// The result of verifying a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows examined.
    pub checked: usize,
    /// The head after the last row that belongs to the chain.
    pub head: ChainHead,
    /// Everything wrong, in row order; empty if the chain is intact.
    pub problems: Vec<ChainProblem>,
}

impl ChainReport {
    /// Whether no problem was found.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies a whole chain, from the first record, in `seq` order.
///
/// Detects edited rows (contents changed), deleted rows (a link to a hash
/// not present, with a gap in `seq`), inserted rows (a second row linking to
/// the same predecessor) and rewritten rows (a link that does not match).
/// Rows deleted from the end leave no trace inside the chain: compare with
/// an anchored head using [`verify_chain_from`].
pub fn verify_chain(records: &[AuditRecord]) -> ChainReport {
    verify_chain_from(&ChainHead::GENESIS, records, None)
}

/// Verifies records that follow `start` (e.g. a page of the audit table,
/// starting after a head verified earlier), optionally against an anchored
/// `expected_head` kept outside the table.
///
/// When a row and its successor both link to the same earlier row and no
/// later row decides which branch continues the chain, the later row is
/// reported as inserted.
pub fn verify_chain_from(
    start: &ChainHead,
    records: &[AuditRecord],
    expected_head: Option<&ChainHead>,
) -> ChainReport {
    let mut found: Vec<(usize, ChainProblem)> = Vec::new();
    let mut inserted = vec![false; records.len()];
    // Hash → index of the row that has it (`None`: the start).
    let mut seen: HashMap<ChainHash, Option<usize>> = HashMap::with_capacity(records.len() + 1);
    seen.insert(start.hash, None);
    let mut prev = *start;

    for (i, r) in records.iter().enumerate() {
        if !r.is_self_consistent() {
            found.push((i, ChainProblem::Edited { seq: r.seq }));
        }
        if r.prev_hash != prev.hash {
            if let Some(&j) = seen.get(&r.prev_hash) {
                // A fork: `r` and the row after `j` both follow row `j`.
                let next_follows_prev = records
                    .get(i + 1)
                    .is_none_or(|next| next.prev_hash == prev.hash);
                if next_follows_prev {
                    // `r` is a branch off the chain; the chain continues
                    // from `prev`.
                    inserted[i] = true;
                    continue;
                }
                // The chain continues from `r`; the rows between are
                // not part of it.
                for flag in &mut inserted[j.map_or(0, |j| j + 1)..i] {
                    *flag = true;
                }
            } else if r.seq > prev.seq + 1 {
                found.push((
                    i,
                    ChainProblem::Deleted {
                        first_seq: prev.seq + 1,
                        last_seq: r.seq - 1,
                    },
                ));
            } else {
                found.push((
                    i,
                    ChainProblem::BrokenLink {
                        seq: r.seq,
                        after_seq: prev.seq,
                    },
                ));
            }
        }
        seen.insert(r.hash, Some(i));
        prev = ChainHead {
            seq: r.seq,
            hash: r.hash,
        };
    }

    let mut problems: Vec<(usize, ChainProblem)> = found
        .into_iter()
        .filter(|(i, _)| !inserted[*i])
        .chain(
            inserted
                .iter()
                .enumerate()
                .filter(|(_, flag)| **flag)
                .map(|(i, _)| {
                    (
                        i,
                        ChainProblem::Inserted {
                            seq: records[i].seq,
                        },
                    )
                }),
        )
        .collect();
    problems.sort_by_key(|(i, p)| (*i, p.seq()));
    let mut problems: Vec<ChainProblem> = problems.into_iter().map(|(_, p)| p).collect();

    if let Some(anchor) = expected_head {
        if prev.seq < anchor.seq {
            problems.push(ChainProblem::Truncated {
                last_seq: prev.seq,
                expected_seq: anchor.seq,
            });
        } else if let Some(r) = records
            .iter()
            .zip(&inserted)
            .find(|(r, ins)| !**ins && r.seq == anchor.seq)
            .map(|(r, _)| r)
        {
            if r.hash != anchor.hash {
                problems.push(ChainProblem::HeadMismatch { seq: anchor.seq });
            }
        } else if anchor.seq > start.seq {
            problems.push(ChainProblem::HeadMismatch { seq: anchor.seq });
        }
        if prev.seq > anchor.seq {
            problems.push(ChainProblem::BeyondHead {
                first_seq: anchor.seq + 1,
                last_seq: prev.seq,
            });
        }
    }

    ChainReport {
        checked: records.len(),
        head: prev,
        problems,
    }
}

/// A problem in one chain of an audit log. It displays rows as `audit
/// list` shows them, `chain:seq`, with the id of the row concerned:
///
/// ```
/// use chronicle_crypto::{AuditProblem, ChainProblem};
///
/// let problem = AuditProblem { chain: 2, problem: ChainProblem::Edited { seq: 7 }, id: Some(41) };
/// assert_eq!(problem.to_string(), "row 2:7 (id 41) was edited: its contents do not match its hash");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditProblem {
    /// The chain.
    pub chain: u16,
    /// What is wrong, with rows numbered by their `seq` in that chain.
    pub problem: ChainProblem,
    /// The id of the row concerned ([`ChainProblem::row_seq`]), when it
    /// exists and was looked up.
    pub id: Option<u64>,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.problem.describe(f, Some(self.chain), self.id)
    }
}

/// One chain of a verified log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSummary {
    /// The chain.
    pub chain: u16,
    /// Rows examined.
    pub rows: usize,
    /// The head after the last row that belongs to the chain.
    pub head: ChainHead,
}

/// The result of verifying a whole audit log, chain by chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Rows examined, over all chains.
    pub checked: usize,
    /// Every chain, in chain order.
    pub chains: Vec<ChainSummary>,
    /// Everything wrong, by chain and row; empty if the log is intact.
    pub problems: Vec<AuditProblem>,
    /// Records stored but not linked into a chain yet, so not covered by
    /// this verification: those of transactions newer than the oldest one
    /// still open when the log was sealed (on PostgreSQL this also counts
    /// encrypted events whose `encrypt` records are still to be derived).
    pub unsealed: u64,
}

impl AuditReport {
    /// Whether no problem was found.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// The chains' heads as verified: keep them outside the database as an
    /// anchor, and pass them to a later verification to detect rows cut
    /// from the end or rewritten.
    pub fn heads(&self) -> BTreeMap<u16, ChainHead> {
        self.chains.iter().map(|c| (c.chain, c.head)).collect()
    }

    /// The problems without their chains (for a single-chain log).
    pub fn chain_problems(&self) -> Vec<ChainProblem> {
        self.problems.iter().map(|p| p.problem.clone()).collect()
    }

    /// Adds one chain's verification.
    pub fn push_chain(&mut self, chain: u16, report: ChainReport) {
        self.checked += report.checked;
        self.chains.push(ChainSummary {
            chain,
            rows: report.checked,
            head: report.head,
        });
        self.problems
            .extend(report.problems.into_iter().map(|problem| AuditProblem {
                chain,
                problem,
                id: None,
            }));
    }
}

/// Verifies a log of one or more chains: each chain's records (grouped by
/// [`AuditRecord::chain`], in `seq` order) from its first row, against
/// `anchors` when given (the heads of every chain, kept elsewhere: a chain
/// missing from the records but anchored was cut, records of a chain that
/// is not anchored were added).
///
/// ```
/// use chronicle_crypto::{AccessContext, AuditEntry, AuditOperation, AuditOutcome, ChainHead, verify_log};
///
/// let ctx = AccessContext::new("ops", "test");
/// let mut heads = [ChainHead::GENESIS, ChainHead::GENESIS];
/// let mut records = Vec::new();
/// for i in 0..6u16 {
///     let chain = i % 2;
///     let mut r = heads[chain as usize]
///         .link(AuditEntry::new(AuditOperation::Rotate, AuditOutcome::Success, &ctx));
///     r.chain = chain;
///     records.push(r);
/// }
/// let report = verify_log(&records, None);
/// assert!(report.is_intact());
/// assert_eq!(report.chains.len(), 2);
/// records.remove(2); // the second row of chain 0
/// assert_eq!(verify_log(&records, None).problems[0].to_string(), "row 0:2 was deleted");
/// ```
pub fn verify_log(
    records: &[AuditRecord],
    anchors: Option<&BTreeMap<u16, ChainHead>>,
) -> AuditReport {
    let mut chains: BTreeMap<u16, Vec<AuditRecord>> = BTreeMap::new();
    for r in records {
        chains.entry(r.chain).or_default().push(r.clone());
    }
    if let Some(anchors) = anchors {
        for chain in anchors.keys() {
            chains.entry(*chain).or_default();
        }
    }
    let mut report = AuditReport {
        checked: 0,
        chains: Vec::new(),
        problems: Vec::new(),
        unsealed: 0,
    };
    for (chain, mut rows) in chains {
        rows.sort_by_key(|r| (r.seq, r.id));
        let anchor = anchors.map(|a| a.get(&chain).copied().unwrap_or(ChainHead::GENESIS));
        let verified = verify_chain_from(&ChainHead::GENESIS, &rows, anchor.as_ref());
        report.push_chain(chain, verified);
    }
    report
}

/// Where audit entries go. Implementations chain each batch after their
/// current head (see [`ChainHead::link`]) and store it atomically; the
/// PostgreSQL sink does so in one transaction holding the head's row lock.
///
/// `append` must return only once the batch is durable: callers release
/// plaintext after it returns, and never if it fails.
#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Appends `entries`, in order, as one batch.
    async fn append(&self, entries: Vec<AuditEntry>) -> Result<()>;
}

struct MemoryAudit {
    head: ChainHead,
    records: Vec<AuditRecord>,
}

/// An [`AuditSink`] in memory, for tests and examples. It can be told to
/// fail, to test that nothing is released without an audit record.
pub struct MemoryAuditSink {
    inner: Mutex<MemoryAudit>,
    failing: AtomicBool,
}

impl Default for MemoryAuditSink {
    fn default() -> Self {
        MemoryAuditSink {
            inner: Mutex::new(MemoryAudit {
                head: ChainHead::GENESIS,
                records: Vec::new(),
            }),
            failing: AtomicBool::new(false),
        }
    }
}

impl MemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        MemoryAuditSink::default()
    }

    /// Every record so far.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.lock().records.clone()
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    /// The chain's head.
    pub fn head(&self) -> ChainHead {
        self.lock().head
    }

    /// Makes every following `append` fail (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, MemoryAudit> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl AuditSink for MemoryAuditSink {
    async fn append(&self, entries: Vec<AuditEntry>) -> Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::Audit {
                message: "the memory audit sink was set to fail".into(),
                source: None,
            });
        }
        let mut inner = self.lock();
        let MemoryAudit { head, records } = &mut *inner;
        records.extend(entries.into_iter().map(|e| head.link(e)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<AuditRecord> {
        let ctx = AccessContext::new("tester", "audit-test");
        let mut head = ChainHead::GENESIS;
        (0..n)
            .map(|i| {
                head.link(
                    AuditEntry::new(AuditOperation::Decrypt, AuditOutcome::Success, &ctx)
                        .with_subject(&SubjectId::new(format!("s{i}")))
                        .with_key(DataKeyId::new())
                        .with_field(Uuid::now_v7(), "/email"),
                )
            })
            .collect()
    }

    fn forge(after: &AuditRecord, seq: u64) -> AuditRecord {
        let ctx = AccessContext::new("mallory", "cover-up");
        let mut head = ChainHead {
            seq: after.seq,
            hash: after.hash,
        };
        let mut r = head.link(AuditEntry::new(
            AuditOperation::Shred,
            AuditOutcome::Success,
            &ctx,
        ));
        r.seq = seq;
        r
    }

    #[test]
    fn intact_chain_verifies() {
        let records = chain(5);
        let report = verify_chain(&records);
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.head.seq, 5);
        assert_eq!(report.head.hash, records[4].hash);
        assert!(verify_chain(&[]).is_intact());
    }

    #[test]
    fn edited_row_is_named() {
        let mut records = chain(5);
        records[2].entry.actor = "someone-else".into();
        let report = verify_chain(&records);
        assert_eq!(report.problems, vec![ChainProblem::Edited { seq: 3 }]);
        assert!(report.problems[0].to_string().contains("row 3 was edited"));
    }

    #[test]
    fn edited_and_rehashed_row_breaks_the_next_link() {
        let mut records = chain(5);
        records[2].entry.purpose = "nothing to see".into();
        records[2].hash = AuditRecord::compute_hash(&records[2].prev_hash, &records[2].entry);
        let report = verify_chain(&records);
        assert_eq!(
            report.problems,
            vec![ChainProblem::BrokenLink {
                seq: 4,
                after_seq: 3
            }]
        );
    }

    #[test]
    fn deleted_rows_are_named() {
        let mut records = chain(6);
        records.remove(2);
        assert_eq!(
            verify_chain(&records).problems,
            vec![ChainProblem::Deleted {
                first_seq: 3,
                last_seq: 3
            }]
        );
        records.remove(0);
        assert_eq!(
            verify_chain(&records).problems,
            vec![
                ChainProblem::Deleted {
                    first_seq: 1,
                    last_seq: 1
                },
                ChainProblem::Deleted {
                    first_seq: 3,
                    last_seq: 3
                }
            ]
        );
    }

    #[test]
    fn inserted_rows_are_named() {
        // A forged, correctly hashed row after row 2, later rows renumbered.
        let mut records = chain(5);
        let forged = forge(&records[1], 3);
        records.insert(2, forged);
        for (i, r) in records.iter_mut().enumerate().skip(3) {
            r.seq = i as u64 + 1;
        }
        assert_eq!(
            verify_chain(&records).problems,
            vec![ChainProblem::Inserted { seq: 3 }]
        );

        // The same without renumbering (a duplicate number), sorted after
        // the original.
        let mut records = chain(5);
        let forged = forge(&records[1], 2);
        records.insert(2, forged);
        assert_eq!(
            verify_chain(&records).problems,
            vec![ChainProblem::Inserted { seq: 2 }]
        );

        // A copy of an existing row.
        let mut records = chain(4);
        let copy = records[1].clone();
        records.insert(2, copy);
        assert_eq!(
            verify_chain(&records).problems,
            vec![ChainProblem::Inserted { seq: 2 }]
        );

        // A row with a made-up hash and link.
        let mut records = chain(4);
        let mut junk = forge(&records[1], 3);
        junk.prev_hash = ChainHash::from_bytes([7; 32]);
        records.insert(2, junk);
        let report = verify_chain(&records);
        assert_eq!(report.problems, vec![ChainProblem::Inserted { seq: 3 }]);
    }

    #[test]
    fn truncation_needs_an_anchor() {
        let mut records = chain(5);
        let anchor = ChainHead {
            seq: 5,
            hash: records[4].hash,
        };
        assert!(verify_chain_from(&ChainHead::GENESIS, &records, Some(&anchor)).is_intact());
        let forged = forge(&records[4], 6);
        records.push(forged);
        assert_eq!(
            verify_chain_from(&ChainHead::GENESIS, &records, Some(&anchor)).problems,
            vec![ChainProblem::BeyondHead {
                first_seq: 6,
                last_seq: 6
            }]
        );
        records.truncate(3);
        assert!(verify_chain(&records).is_intact());
        assert_eq!(
            verify_chain_from(&ChainHead::GENESIS, &records, Some(&anchor)).problems,
            vec![ChainProblem::Truncated {
                last_seq: 3,
                expected_seq: 5
            }]
        );
    }

    #[test]
    fn pages_verify_from_a_known_head() {
        let records = chain(6);
        let start = ChainHead {
            seq: 3,
            hash: records[2].hash,
        };
        assert!(verify_chain_from(&start, &records[3..], None).is_intact());
        let wrong = ChainHead {
            seq: 3,
            hash: records[1].hash,
        };
        assert!(!verify_chain_from(&wrong, &records[3..], None).is_intact());
    }

    #[test]
    fn canonical_form_is_stable_and_hashes_round_trip() {
        let records = chain(1);
        let r = &records[0];
        let text = String::from_utf8(r.entry.canonical_bytes()).unwrap();
        assert!(text.starts_with("[\"chronicle-audit/v1\","), "{text}");
        assert!(text.contains("\"decrypt\",\"success\""), "{text}");
        assert_eq!(r.hash.to_string().parse::<ChainHash>().unwrap(), r.hash);
        let json = serde_json::to_string(r).unwrap();
        let back: AuditRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, r);
        assert!(back.is_self_consistent());
        for op in [
            "encrypt",
            "decrypt",
            "reencrypt",
            "create-key",
            "rotate",
            "rewrap",
            "shred",
        ] {
            assert_eq!(op.parse::<AuditOperation>().unwrap().as_str(), op);
        }
    }
}
