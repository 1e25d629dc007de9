//! The eager runner on PostgreSQL: plan, run, verify and roll back.
//!
//! Tables (migration 5 of `chronicle-postgres`): `chronicle_upcast_runs`,
//! one row per run of one migration key (event type + the schema version
//! it reads), with its status, cursor and counts; and
//! `chronicle_upcast_backup`, the original of every event a run rewrote.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, Metadata, Position};
use chronicle_postgres::PgPool;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::{Checksum, EventDiff, Migration, Mode, UpcastEvent, UpcastFailure, UpcasterChain};

/// The batch size [`PgUpcaster::run`] callers usually want.
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// How long a runner's lease on a migration key lasts without renewal
/// (every batch renews it); see [`PgUpcaster::lease_ttl`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// The schema version the runner reads, exactly as the index
/// `idx_events_upcast` (migration 5) is defined.
const VERSION_EXPR: &str = "coalesce((metadata ->> 'schema_version')::int, 1)";

const EVENT_COLUMNS: &str = "event_id, aggregate_id, aggregate_type, event_type, event_data, \
     metadata, version, timestamp, encrypted_fields, transaction_id::text, global_position";

const RUN_COLUMNS: &str = "run_id, event_type, from_version, to_event_type, to_version, status, \
     cursor_position, events_upcast, batches, started_at, finished_at, error, failed_event_id";

/// Errors of the eager runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Upcasting or validating one event failed. The batch holding it was
    /// rolled back (nothing of it was written) and the run marked failed;
    /// fix the upcaster, schema or event and run again to resume.
    #[error(
        "upcast run {run_id} stopped at event {event_id}: {source}; run again to resume once fixed"
    )]
    Event {
        /// The run, now `failed`.
        run_id: Uuid,
        /// The offending event.
        event_id: Uuid,
        /// What the chain reported.
        #[source]
        source: Box<crate::Error>,
    },
    /// [`PgUpcaster::check`] (or [`PgUpcaster::verify`], on a backup row)
    /// found an event the chain cannot upcast or validate; nothing was
    /// written.
    #[error("event {event_id} would stop an upcast run: {source}; nothing was written")]
    Invalid {
        /// The offending event.
        event_id: Uuid,
        /// What the chain reported.
        #[source]
        source: Box<crate::Error>,
    },
    /// The [`FieldCipher`] failed for one event; handled like
    /// [`RunError::Event`].
    #[error(
        "upcast run {run_id} stopped at event {event_id}: its encrypted fields could not be processed: {failure}"
    )]
    Cipher {
        /// The run, now `failed`.
        run_id: Uuid,
        /// The offending event.
        event_id: Uuid,
        /// What the cipher reported.
        #[source]
        failure: UpcastFailure,
    },
    /// [`PgUpcaster::verify`] could not decrypt an event's fields (in the
    /// backup or the store) to compare them as plaintext.
    #[error(
        "cannot verify upcast run {run_id}: the encrypted fields of event {event_id} could not be decrypted: {failure}"
    )]
    VerifyCipher {
        /// The run.
        run_id: Uuid,
        /// The event.
        event_id: Uuid,
        /// What the cipher reported.
        #[source]
        failure: UpcastFailure,
    },
    /// No run has this id.
    #[error("upcast run {0} not found; list runs with `chronicle upcast status`")]
    RunNotFound(Uuid),
    /// The run is not in a status that allows the operation.
    #[error("upcast run {run_id} is {status}: {hint}")]
    WrongStatus {
        /// The run.
        run_id: Uuid,
        /// Its status.
        status: RunStatus,
        /// What to do.
        hint: &'static str,
    },
    /// A later run rewrote some of this run's events again; rolling this
    /// one back first would lose that run's backup.
    #[error(
        "cannot roll back upcast run {run_id}: the later run {later_run} rewrote some of its events; roll that one back first"
    )]
    RollbackBlocked {
        /// The run asked for.
        run_id: Uuid,
        /// The later run.
        later_run: Uuid,
    },
    /// The store did not hold what the run expected (rows missing or
    /// changed underneath it); the transaction was rolled back.
    #[error("upcast run {run_id}: {message}; nothing was written")]
    Inconsistent {
        /// The run.
        run_id: Uuid,
        /// What differed.
        message: String,
    },
    /// A stored row could not be read.
    #[error("cannot read event {event_id}: {message}")]
    Decode {
        /// The event.
        event_id: Uuid,
        /// What was wrong.
        message: String,
    },
    /// Another runner holds the lease on this migration key: two runners
    /// never rewrite the same key at once.
    #[error(
        "upcast of {event_type} v{from_version} is already being run by {owner} (runner {owner_id}) \
         since {acquired_at}; its lease lasts until {expires_at} unless renewed. Wait for it to \
         finish (`chronicle upcast status` shows its progress); if that process died, run again \
         once the lease has expired and this run resumes where it stopped"
    )]
    LeaseHeld {
        /// The event type of the key.
        event_type: String,
        /// The schema version of the key.
        from_version: u32,
        /// Who holds it (host, process id, label).
        owner: String,
        /// The holder's runner id.
        owner_id: Uuid,
        /// When the holder took it.
        acquired_at: DateTime<Utc>,
        /// When it expires unless renewed.
        expires_at: DateTime<Utc>,
    },
    /// This runner's lease expired and another runner took the key over
    /// (a batch took longer than the lease's time-to-live). The batch in
    /// flight was rolled back.
    #[error(
        "upcast run {run_id} ({event_type} v{from_version}) lost its lease to another runner; \
         nothing of the batch in flight was written. Run again to resume (use a longer lease or \
         smaller batches if batches take longer than the lease)"
    )]
    LeaseLost {
        /// The run.
        run_id: Uuid,
        /// The event type of the key.
        event_type: String,
        /// The schema version of the key.
        from_version: u32,
    },
    /// Connecting to or talking to PostgreSQL failed.
    #[error(transparent)]
    Postgres(#[from] chronicle_postgres::Error),
}

impl From<tokio_postgres::Error> for RunError {
    fn from(e: tokio_postgres::Error) -> Self {
        RunError::Postgres(chronicle_postgres::Error::Postgres(e))
    }
}

impl From<deadpool_postgres::PoolError> for RunError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RunError::Postgres(e.into())
    }
}

impl RunError {
    /// The event that stopped the run, when one did.
    pub fn event_id(&self) -> Option<Uuid> {
        match self {
            RunError::Event { event_id, .. }
            | RunError::Invalid { event_id, .. }
            | RunError::Cipher { event_id, .. } => Some(*event_id),
            _ => None,
        }
    }
}

/// Decrypts and re-encrypts the encrypted fields of events around the
/// chain: the extension point for `chronicle-crypto`.
///
/// Ciphertexts are bound to their event and pointer, so an eager run with
/// encrypted events calls [`FieldCipher::decrypt`] before the chain and
/// [`FieldCipher::encrypt`] after it (under the subject's current key,
/// audited), for every event with encrypted fields. Without a cipher the
/// runner upcasts envelopes as they are: declarative steps carry them over
/// verbatim, and steps that need the plaintext fail naming the event.
#[async_trait]
pub trait FieldCipher: Send + Sync {
    /// Replaces the envelopes at `event.encrypted_fields` by their
    /// plaintext (or leaves redaction markers of a shredded subject as
    /// they are).
    async fn decrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure>;

    /// Encrypts the plaintext at `event.encrypted_fields` again.
    async fn encrypt(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure>;
}

/// The status of an eager run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunStatus {
    /// In progress, or interrupted (a crash, Ctrl-C): `run` resumes it.
    Running,
    /// Every matching event was rewritten.
    Completed,
    /// Stopped at an event that failed; `run` resumes it.
    Failed,
    /// Its events were restored from the backup.
    RolledBack,
}

impl RunStatus {
    /// The name stored in `chronicle_upcast_runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "rolled_back" => RunStatus::RolledBack,
            other => return Err(format!("unknown upcast run status `{other}`")),
        })
    }
}

/// One row of `chronicle_upcast_runs`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunInfo {
    /// The run's id.
    pub run_id: Uuid,
    /// The event type it reads.
    pub event_type: String,
    /// The schema version it reads.
    pub from_version: u32,
    /// The event type it writes (the end of the chain).
    pub to_event_type: String,
    /// The schema version it writes.
    pub to_version: u32,
    /// Its status.
    pub status: RunStatus,
    /// The global position of the last event it rewrote (0: none yet).
    pub cursor: i64,
    /// How many events it rewrote.
    pub events_upcast: u64,
    /// How many batches it committed.
    pub batches: u64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it completed or was rolled back.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
    /// The event it failed at.
    pub failed_event_id: Option<Uuid>,
}

impl RunInfo {
    fn from_row(row: &Row) -> Result<Self, RunError> {
        let run_id: Uuid = row.try_get(0)?;
        let status: String = row.try_get(5)?;
        Ok(RunInfo {
            run_id,
            event_type: row.try_get(1)?,
            from_version: to_u32(row.try_get::<_, i32>(2)?),
            to_event_type: row.try_get(3)?,
            to_version: to_u32(row.try_get::<_, i32>(4)?),
            status: status
                .parse()
                .map_err(|message| RunError::Inconsistent { run_id, message })?,
            cursor: row.try_get(6)?,
            events_upcast: to_u64(row.try_get::<_, i64>(7)?),
            batches: to_u64(row.try_get::<_, i64>(8)?),
            started_at: row.try_get(9)?,
            finished_at: row.try_get(10)?,
            error: row.try_get(11)?,
            failed_event_id: row.try_get(12)?,
        })
    }
}

/// One row of `chronicle_upcast_leases`: a runner working on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The event type of the key.
    pub event_type: String,
    /// The schema version of the key.
    pub from_version: u32,
    /// The holder's runner id ([`PgUpcaster::owner_id`]).
    pub owner_id: Uuid,
    /// Who holds it (host, process id, label).
    pub owner: String,
    /// The run it works on, once its first batch committed.
    pub run_id: Option<Uuid>,
    /// When it was taken.
    pub acquired_at: DateTime<Utc>,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl LeaseInfo {
    fn from_row(row: &Row) -> Result<Self, RunError> {
        Ok(LeaseInfo {
            event_type: row.try_get(0)?,
            from_version: to_u32(row.try_get::<_, i32>(1)?),
            owner_id: row.try_get(2)?,
            owner: row.try_get(3)?,
            run_id: row.try_get(4)?,
            acquired_at: row.try_get(5)?,
            expires_at: row.try_get(6)?,
        })
    }
}

const LEASE_COLUMNS: &str =
    "event_type, from_version, owner_id, owner, run_id, acquired_at, expires_at";

/// What [`PgUpcaster::plan`] shows for one migration.
#[derive(Debug)]
#[non_exhaustive]
pub struct PlanEntry {
    /// The migration.
    pub migration: Migration,
    /// How many stored events it would touch now.
    pub events: u64,
    /// How many of them hold encrypted fields: a run needs a
    /// [`FieldCipher`] for them when the chain moves or renames those
    /// fields (an envelope is bound to its pointer).
    pub encrypted: u64,
    /// The first of them, before and after the whole chain.
    pub sample: Option<Sample>,
}

/// One event before and after the chain, for a plan.
#[derive(Debug)]
#[non_exhaustive]
pub struct Sample {
    /// As stored.
    pub before: UpcastEvent,
    /// After the chain and its validation; an error is what `run` would
    /// stop at.
    pub after: Result<UpcastEvent, crate::Error>,
}

impl Sample {
    /// The difference, when the chain succeeded.
    pub fn diff(&self) -> Option<EventDiff> {
        self.after
            .as_ref()
            .ok()
            .map(|after| EventDiff::between(&self.before, after))
    }
}

/// Where a run is, after each committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The run.
    pub run_id: Uuid,
    /// The event type it reads.
    pub event_type: String,
    /// The schema version it reads.
    pub from_version: u32,
    /// Events rewritten by this run so far (including earlier attempts).
    pub done: u64,
    /// Matching events left when this call started on the key, minus those
    /// done since; events appended meanwhile are not counted.
    pub remaining: u64,
    /// The global position of the last event rewritten.
    pub cursor: i64,
}

/// What [`PgUpcaster::run`] did.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RunReport {
    /// The runs it completed, in order, as they ended.
    pub runs: Vec<RunInfo>,
}

impl RunReport {
    /// Events rewritten by these runs in total (including earlier,
    /// resumed attempts).
    pub fn events_upcast(&self) -> u64 {
        self.runs.iter().map(|r| r.events_upcast).sum()
    }
}

/// What [`PgUpcaster::verify`] found for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The run.
    pub run_id: Uuid,
    /// Its status.
    pub status: RunStatus,
    /// Rows in the backup for it.
    pub backup_count: u64,
    /// Of those events, how many are still in the store.
    pub current_count: u64,
    /// The checksum of the backup rows: what a rollback restores.
    pub backup_checksum: Checksum,
    /// What the store should hold: the backup upcast by the chain, or the
    /// backup itself once rolled back.
    pub expected_checksum: Checksum,
    /// What the store holds for those events.
    pub current_checksum: Checksum,
    /// Events whose current content differs from the expected, up to 10.
    pub mismatches: Vec<Uuid>,
    /// Of the backed-up events, how many hold encrypted fields.
    pub encrypted: u64,
    /// Whether those were compared as plaintext (the upcaster has a
    /// [`FieldCipher`] and the run is not rolled back); otherwise as stored.
    pub compared_plaintext: bool,
}

impl VerifyReport {
    /// Whether counts and checksums agree.
    pub fn is_ok(&self) -> bool {
        self.backup_count == self.current_count
            && self.expected_checksum == self.current_checksum
            && self.mismatches.is_empty()
    }
}

/// The eager upcaster over a PostgreSQL store: rewrites events in place to
/// the newest version of their type, in batches, with a backup, resumably
/// and reversibly.
///
/// - [`PgUpcaster::plan`]: per migration, how many events match and a
///   sample diff; writes nothing.
/// - [`PgUpcaster::check`]: upcasts and validates every matching event
///   without writing, so a bad event is found before any batch commits.
/// - [`PgUpcaster::run`]: rewrites every event of every eager migration.
///   Each batch is one transaction: read the next matching rows after the
///   run's cursor, copy them to `chronicle_upcast_backup`,
///   upcast and validate them ([`UpcasterChain::upcast_validated`]),
///   update them, move the cursor. A failing event aborts its batch
///   (nothing of it is written), marks the run failed and is named in
///   [`RunError::Event`]; calling `run` again resumes from the cursor, as
///   it does after a crash. A key is done when nothing matches any more,
///   so events appended at the old version meanwhile are caught by the
///   same run (or, if committed after it, by the next).
/// - [`PgUpcaster::verify`]: counts and checksums of the backup against
///   the store.
/// - [`PgUpcaster::rollback`]: restores a run's originals byte for byte in
///   one transaction.
///
/// Event types in [`Mode::Lazy`] are left to
/// [`UpcastingReader`](crate::UpcastingReader). Every statement is an
/// unnamed `query_typed`, so this works behind PgBouncer.
///
/// **One runner per key.** `run` and `rollback` take a lease on each
/// migration key they work on (a row in `chronicle_upcast_leases`, not a
/// session lock, so it holds behind a transaction-pooling PgBouncer).
/// Every batch renews it in its own transaction and commits only while
/// this runner still owns it; a second runner gets
/// [`RunError::LeaseHeld`] naming the holder. The lease is released when
/// the key is done or the run stops with an error; after a dropped future
/// (Ctrl-C) call [`PgUpcaster::release_leases`], and a process that died
/// leaves a lease that expires after [`PgUpcaster::lease_ttl`]. Clones of
/// a `PgUpcaster` are the same runner ([`PgUpcaster::owner_id`]).
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool, chain: chronicle_upcast::UpcasterChain) -> Result<(), chronicle_upcast::RunError> {
/// use chronicle_upcast::{DEFAULT_BATCH_SIZE, PgUpcaster};
///
/// let upcaster = PgUpcaster::new(pool, chain);
/// for entry in upcaster.plan().await? {
///     println!("{} v{}: {} events", entry.migration.event_type, entry.migration.from_version, entry.events);
///     if let Some(diff) = entry.sample.as_ref().and_then(|s| s.diff()) {
///         println!("{diff}");
///     }
/// }
/// let report = upcaster
///     .run(DEFAULT_BATCH_SIZE, |p| println!("{} v{}: {} done", p.event_type, p.from_version, p.done))
///     .await?;
/// for run in &report.runs {
///     assert!(upcaster.verify(run.run_id).await?.is_ok());
/// }
/// // Changed our mind:
/// for run in report.runs.iter().rev() {
///     upcaster.rollback(run.run_id).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgUpcaster {
    pool: PgPool,
    chain: Arc<UpcasterChain>,
    cipher: Option<Arc<dyn FieldCipher>>,
    owner_id: Uuid,
    owner: String,
    lease_ttl: Duration,
}

impl fmt::Debug for PgUpcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUpcaster")
            .field("chain", &self.chain)
            .field("cipher", &self.cipher.is_some())
            .field("owner_id", &self.owner_id)
            .field("owner", &self.owner)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// One stored event as the runner reads it.
struct Stored {
    envelope: EventEnvelope,
    encrypted_null: bool,
}

/// A batch's writes, column by column.
#[derive(Default)]
struct Rewrites {
    ids: Vec<Uuid>,
    types: Vec<String>,
    data: Vec<Value>,
    versions: Vec<i32>,
    encrypted: Vec<Option<Value>>,
    xmins: Vec<String>,
}

impl PgUpcaster {
    /// A runner of `chain` over the store behind `pool` (migrated to
    /// schema version 5 or later).
    pub fn new(pool: PgPool, chain: impl Into<Arc<UpcasterChain>>) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        PgUpcaster {
            pool,
            chain: chain.into(),
            cipher: None,
            owner_id: Uuid::now_v7(),
            owner: format!("{host} pid {}", std::process::id()),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// Names this runner in leases and [`RunError::LeaseHeld`] (default:
    /// host name and process id).
    pub fn owner(&mut self, label: impl Into<String>) -> &mut Self {
        self.owner = label.into();
        self
    }

    /// How long a lease lasts without renewal (default
    /// [`DEFAULT_LEASE_TTL`]). Every batch renews it, so keep it well above
    /// the time one batch takes; a runner that died blocks its keys this
    /// long.
    pub fn lease_ttl(&mut self, ttl: Duration) -> &mut Self {
        self.lease_ttl = ttl;
        self
    }

    /// This runner's id in `chronicle_upcast_leases`.
    pub fn owner_id(&self) -> Uuid {
        self.owner_id
    }

    /// The leases held now (by any runner), expired ones included.
    pub async fn leases(&self) -> Result<Vec<LeaseInfo>, RunError> {
        let client = self.pool.get().await?;
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {LEASE_COLUMNS} FROM chronicle_upcast_leases \
                      WHERE expires_at > clock_timestamp() ORDER BY event_type, from_version"
                ),
                &[],
            )
            .await?;
        rows.iter().map(LeaseInfo::from_row).collect()
    }

    /// Gives up every lease this runner holds, so another run can start at
    /// once: call it after dropping a [`PgUpcaster::run`] future (Ctrl-C).
    /// Returns how many were released.
    pub async fn release_leases(&self) -> Result<u64, RunError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute_typed(
                "DELETE FROM chronicle_upcast_leases WHERE owner_id = $1",
                &[(&self.owner_id, Type::UUID)],
            )
            .await?)
    }

    /// Takes the lease on a key (free, expired or already ours), in the
    /// transaction or session of `client`, or says who holds it.
    async fn acquire_lease<C: tokio_postgres::GenericClient + Sync>(
        &self,
        client: &C,
        event_type: &str,
        from: i32,
    ) -> Result<(), RunError> {
        let ttl = self.lease_ttl.as_secs_f64();
        for _ in 0..3 {
            let got = client
                .query_typed_opt(
                    "INSERT INTO chronicle_upcast_leases AS l \
                            (event_type, from_version, owner_id, owner, expires_at) \
                     VALUES ($1, $2, $3, $4, clock_timestamp() + $5 * interval '1 second') \
                     ON CONFLICT (event_type, from_version) DO UPDATE \
                        SET owner_id = excluded.owner_id, owner = excluded.owner, \
                            run_id = CASE WHEN l.owner_id = excluded.owner_id THEN l.run_id END, \
                            acquired_at = clock_timestamp(), expires_at = excluded.expires_at \
                      WHERE l.owner_id = excluded.owner_id OR l.expires_at < clock_timestamp() \
                     RETURNING owner_id",
                    &[
                        (&event_type, Type::TEXT),
                        (&from, Type::INT4),
                        (&self.owner_id, Type::UUID),
                        (&self.owner, Type::TEXT),
                        (&ttl, Type::FLOAT8),
                    ],
                )
                .await?;
            if got.is_some() {
                return Ok(());
            }
            let holder = client
                .query_typed_opt(
                    &format!(
                        "SELECT {LEASE_COLUMNS} FROM chronicle_upcast_leases \
                          WHERE event_type = $1 AND from_version = $2"
                    ),
                    &[(&event_type, Type::TEXT), (&from, Type::INT4)],
                )
                .await?;
            // Released between the two statements: try again.
            if let Some(row) = holder {
                let lease = LeaseInfo::from_row(&row)?;
                return Err(RunError::LeaseHeld {
                    event_type: lease.event_type,
                    from_version: lease.from_version,
                    owner: lease.owner,
                    owner_id: lease.owner_id,
                    acquired_at: lease.acquired_at,
                    expires_at: lease.expires_at,
                });
            }
        }
        Err(RunError::Inconsistent {
            run_id: Uuid::nil(),
            message: format!("the lease on {event_type} v{from} kept changing hands; try again"),
        })
    }

    /// Gives up the lease on one key, if this runner holds it.
    async fn release_lease(&self, event_type: &str, from: i32) -> Result<(), RunError> {
        let client = self.pool.get().await?;
        client
            .execute_typed(
                "DELETE FROM chronicle_upcast_leases \
                  WHERE event_type = $1 AND from_version = $2 AND owner_id = $3",
                &[
                    (&event_type, Type::TEXT),
                    (&from, Type::INT4),
                    (&self.owner_id, Type::UUID),
                ],
            )
            .await?;
        Ok(())
    }

    /// Decrypts and re-encrypts encrypted fields around the chain. Default:
    /// none (envelopes are upcast as stored).
    pub fn cipher(&mut self, cipher: Arc<dyn FieldCipher>) -> &mut Self {
        self.cipher = Some(cipher);
        self
    }

    /// The chain.
    pub fn chain(&self) -> &UpcasterChain {
        &self.chain
    }

    /// Per migration of the chain: how many stored events it touches and
    /// the first of them before and after. Writes nothing.
    pub async fn plan(&self) -> Result<Vec<PlanEntry>, RunError> {
        let client = self.pool.get().await?;
        let mut entries = Vec::new();
        for migration in self.chain.migrations() {
            let from = to_i32(migration.from_version);
            let counts = client
                .query_typed_one(
                    &format!(
                        "SELECT count(*), \
                                count(*) FILTER (WHERE cardinality(encrypted_fields) > 0) \
                           FROM events WHERE event_type = $1 AND {VERSION_EXPR} = $2"
                    ),
                    &[(&migration.event_type, Type::TEXT), (&from, Type::INT4)],
                )
                .await?;
            let (count, encrypted): (i64, i64) = (counts.try_get(0)?, counts.try_get(1)?);
            let rows = client
                .query_typed(
                    &select_sql(false),
                    &[
                        (&migration.event_type, Type::TEXT),
                        (&from, Type::INT4),
                        (&0_i64, Type::INT8),
                        (&1_i64, Type::INT8),
                    ],
                )
                .await?;
            let sample = match rows.first() {
                Some(row) => {
                    let stored = decode(row)?;
                    let before = UpcastEvent::from_envelope(&stored.envelope)
                        .with_schema_version(migration.from_version);
                    let after = self.chain.upcast_validated(before.clone());
                    Some(Sample { before, after })
                }
                None => None,
            };
            entries.push(PlanEntry {
                migration,
                events: to_u64(count),
                encrypted: to_u64(encrypted),
                sample,
            });
        }
        Ok(entries)
    }

    /// Upcasts and validates every event an eager [`PgUpcaster::run`]
    /// would rewrite, `batch_size` at a time, without writing or locking
    /// anything; returns how many were checked. Run it first to learn of a
    /// failing event before any batch is committed. Events with encrypted
    /// fields are checked as stored (the cipher is not called).
    pub async fn check(&self, batch_size: usize) -> Result<u64, RunError> {
        let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
        let client = self.pool.get().await?;
        let mut checked = 0;
        for migration in self.chain.migrations() {
            if migration.mode == Mode::Lazy {
                continue;
            }
            let from = to_i32(migration.from_version);
            let mut cursor = 0_i64;
            loop {
                let rows = client
                    .query_typed(
                        &select_sql(false),
                        &[
                            (&migration.event_type, Type::TEXT),
                            (&from, Type::INT4),
                            (&cursor, Type::INT8),
                            (&limit, Type::INT8),
                        ],
                    )
                    .await?;
                let Some(last) = rows.last() else { break };
                cursor = last.try_get(10)?;
                for row in &rows {
                    let stored = decode(row)?;
                    let event = UpcastEvent::from_envelope(&stored.envelope)
                        .with_schema_version(migration.from_version);
                    self.chain
                        .upcast_validated(event)
                        .map_err(|source| RunError::Invalid {
                            event_id: stored.envelope.event_id,
                            source: Box::new(source),
                        })?;
                    checked += 1;
                }
            }
        }
        Ok(checked)
    }

    /// Rewrites every event of every eager migration to the newest version
    /// of its type, `batch_size` events per transaction, calling
    /// `progress` after each committed batch. Resumes unfinished runs.
    ///
    /// Dropping the returned future (Ctrl-C) rolls back the batch in
    /// flight; the run stays `running` and the next call resumes it.
    pub async fn run<F>(&self, batch_size: usize, mut progress: F) -> Result<RunReport, RunError>
    where
        F: FnMut(&Progress) + Send,
    {
        let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
        let mut report = RunReport::default();
        for migration in self.chain.migrations() {
            if migration.mode == Mode::Lazy {
                continue;
            }
            if let Some(info) = self.run_key(&migration, limit, &mut progress).await? {
                report.runs.push(info);
            }
        }
        Ok(report)
    }

    /// Every run, newest first.
    pub async fn runs(&self) -> Result<Vec<RunInfo>, RunError> {
        let client = self.pool.get().await?;
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM chronicle_upcast_runs ORDER BY started_at DESC, run_id"
                ),
                &[],
            )
            .await?;
        rows.iter().map(RunInfo::from_row).collect()
    }

    /// One run.
    pub async fn run_info(&self, run_id: Uuid) -> Result<RunInfo, RunError> {
        let client = self.pool.get().await?;
        let row = client
            .query_typed_opt(
                &format!("SELECT {RUN_COLUMNS} FROM chronicle_upcast_runs WHERE run_id = $1"),
                &[(&run_id, Type::UUID)],
            )
            .await?
            .ok_or(RunError::RunNotFound(run_id))?;
        RunInfo::from_row(&row)
    }

    async fn run_key<F>(
        &self,
        migration: &Migration,
        limit: i64,
        progress: &mut F,
    ) -> Result<Option<RunInfo>, RunError>
    where
        F: FnMut(&Progress) + Send,
    {
        let from = to_i32(migration.from_version);
        let client = self.pool.get().await?;
        self.acquire_lease(&**client, &migration.event_type, from)
            .await?;
        drop(client);
        let result = self.run_leased(migration, limit, progress).await;
        // Errors of the release itself matter less than the run's outcome;
        // an unreleased lease expires.
        let _ = self.release_lease(&migration.event_type, from).await;
        result
    }

    /// [`PgUpcaster::run_key`] once the lease is held.
    async fn run_leased<F>(
        &self,
        migration: &Migration,
        limit: i64,
        progress: &mut F,
    ) -> Result<Option<RunInfo>, RunError>
    where
        F: FnMut(&Progress) + Send,
    {
        let from = to_i32(migration.from_version);
        let client = self.pool.get().await?;
        let open = client
            .query_typed_opt(
                &format!(
                    "UPDATE chronicle_upcast_runs SET status = 'running', error = NULL, \
                            failed_event_id = NULL, updated_at = now() \
                      WHERE event_type = $1 AND from_version = $2 \
                        AND status IN ('running', 'failed') \
                  RETURNING {RUN_COLUMNS}"
                ),
                &[(&migration.event_type, Type::TEXT), (&from, Type::INT4)],
            )
            .await?;
        let matching: i64 = client
            .query_typed_one(
                &format!(
                    "SELECT count(*) FROM events WHERE event_type = $1 AND {VERSION_EXPR} = $2"
                ),
                &[(&migration.event_type, Type::TEXT), (&from, Type::INT4)],
            )
            .await?
            .try_get(0)?;
        let mut info = match open {
            Some(row) => RunInfo::from_row(&row)?,
            None if matching == 0 => return Ok(None),
            None => {
                let row = client
                    .query_typed_one(
                        &format!(
                            "INSERT INTO chronicle_upcast_runs \
                                    (run_id, event_type, from_version, to_event_type, to_version) \
                             VALUES ($1, $2, $3, $4, $5) RETURNING {RUN_COLUMNS}"
                        ),
                        &[
                            (&Uuid::now_v7(), Type::UUID),
                            (&migration.event_type, Type::TEXT),
                            (&from, Type::INT4),
                            (&migration.latest.event_type, Type::TEXT),
                            (&to_i32(migration.latest.schema_version), Type::INT4),
                        ],
                    )
                    .await?;
                RunInfo::from_row(&row)?
            }
        };
        drop(client);
        let mut remaining = to_u64(matching);
        let mut cursor = info.cursor;
        loop {
            let done = match self.batch(&info, cursor, limit).await {
                Ok(done) => done,
                // The run is another runner's now: leave its status alone.
                Err(e @ RunError::LeaseLost { .. }) => return Err(e),
                Err(e) => {
                    self.mark_failed(info.run_id, &e).await;
                    return Err(e);
                }
            };
            match done {
                Some((n, last)) => {
                    info.events_upcast += n;
                    info.batches += 1;
                    info.cursor = last;
                    cursor = last;
                    remaining = remaining.saturating_sub(n);
                    progress(&Progress {
                        run_id: info.run_id,
                        event_type: info.event_type.clone(),
                        from_version: info.from_version,
                        done: info.events_upcast,
                        remaining,
                        cursor,
                    });
                }
                // Events committed behind the cursor (a writer's position
                // was taken before ours but committed after): sweep again
                // from the start, until nothing matches.
                None if cursor > 0 => cursor = 0,
                None => break,
            }
        }
        let client = self.pool.get().await?;
        let row = client
            .query_typed_opt(
                &format!(
                    "UPDATE chronicle_upcast_runs SET status = 'completed', finished_at = now(), \
                            updated_at = now() \
                      WHERE run_id = $1 AND EXISTS ( \
                            SELECT FROM chronicle_upcast_leases \
                             WHERE event_type = $2 AND from_version = $3 AND owner_id = $4) \
                  RETURNING {RUN_COLUMNS}"
                ),
                &[
                    (&info.run_id, Type::UUID),
                    (&migration.event_type, Type::TEXT),
                    (&from, Type::INT4),
                    (&self.owner_id, Type::UUID),
                ],
            )
            .await?
            .ok_or_else(|| RunError::LeaseLost {
                run_id: info.run_id,
                event_type: migration.event_type.clone(),
                from_version: migration.from_version,
            })?;
        Ok(Some(RunInfo::from_row(&row)?))
    }

    /// One batch in one transaction: `None` when nothing matched after
    /// `cursor`, else how many events were rewritten and the last position.
    async fn batch(
        &self,
        run: &RunInfo,
        cursor: i64,
        limit: i64,
    ) -> Result<Option<(u64, i64)>, RunError> {
        let run_id = run.run_id;
        let from = to_i32(run.from_version);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query_typed(
                &select_sql(true),
                &[
                    (&run.event_type, Type::TEXT),
                    (&from, Type::INT4),
                    (&cursor, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        let Some(last) = rows.last() else {
            tx.rollback().await?;
            return Ok(None);
        };
        let last: i64 = last.try_get(10)?;
        let mut w = Rewrites::default();
        for row in &rows {
            let stored = decode(row)?;
            let event_id = stored.envelope.event_id;
            let mut event =
                UpcastEvent::from_envelope(&stored.envelope).with_schema_version(run.from_version);
            let encrypted = !event.encrypted_fields.is_empty();
            if let (Some(cipher), true) = (&self.cipher, encrypted) {
                cipher
                    .decrypt(&mut event)
                    .await
                    .map_err(|failure| RunError::Cipher {
                        run_id,
                        event_id,
                        failure,
                    })?;
            }
            let mut after =
                self.chain
                    .upcast_validated(event)
                    .map_err(|source| RunError::Event {
                        run_id,
                        event_id,
                        source: Box::new(source),
                    })?;
            if let (Some(cipher), true) = (&self.cipher, !after.encrypted_fields.is_empty()) {
                cipher
                    .encrypt(&mut after)
                    .await
                    .map_err(|failure| RunError::Cipher {
                        run_id,
                        event_id,
                        failure,
                    })?;
            }
            // The identity invariants, once more against the row as read:
            // the UPDATE below touches none of these columns.
            crate::check_identity(
                &crate::EventIdentity::of(&stored.envelope),
                after.identity(),
            )
            .map_err(|source| RunError::Event {
                run_id,
                event_id,
                source: Box::new(source),
            })?;
            w.ids.push(event_id);
            w.types.push(after.event_type.clone());
            w.versions.push(to_i32(after.schema_version()));
            w.encrypted.push(encrypted_column(
                stored.encrypted_null,
                &after.encrypted_fields,
            ));
            w.data.push(after.data);
            w.xmins.push(row.try_get(11)?);
        }
        let n = w.ids.len();
        // Backup and rewrite in one statement (one snapshot: the backup
        // copies the rows as they were), each only for rows still at the
        // version read (same xmin): a row changed meanwhile (the
        // re-encryption job) makes the counts differ and the batch roll
        // back, so nothing is overwritten unseen. No row locks are taken
        // up front; the lease keeps other runners off the key.
        let counts = tx
            .query_typed_one(
                "WITH u AS ( \
                     SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int[], \
                                          $5::jsonb[], $6::text[]) \
                         AS u(event_id, event_type, event_data, schema_version, encrypted, xmin)), \
                 backup AS ( \
                     INSERT INTO chronicle_upcast_backup \
                            (run_id, event_id, aggregate_id, version, global_position, \
                             event_type, event_data, metadata, encrypted_fields) \
                     SELECT $7, e.event_id, e.aggregate_id, e.version, e.global_position, \
                            e.event_type, e.event_data, e.metadata, e.encrypted_fields \
                       FROM events e JOIN u ON e.event_id = u.event_id AND e.xmin::text = u.xmin \
                     RETURNING 1), \
                 rewritten AS ( \
                     UPDATE events e \
                        SET event_type = u.event_type, \
                            event_data = u.event_data, \
                            metadata = jsonb_set(coalesce(e.metadata, '{}'::jsonb), \
                                                 '{schema_version}', to_jsonb(u.schema_version)), \
                            encrypted_fields = CASE WHEN u.encrypted IS NULL THEN NULL \
                                ELSE ARRAY(SELECT jsonb_array_elements_text(u.encrypted)) END \
                       FROM u \
                      WHERE e.event_id = u.event_id AND e.xmin::text = u.xmin \
                     RETURNING 1) \
                 SELECT (SELECT count(*) FROM backup), (SELECT count(*) FROM rewritten)",
                &[
                    (&w.ids, Type::UUID_ARRAY),
                    (&w.types, Type::TEXT_ARRAY),
                    (&w.data, Type::JSONB_ARRAY),
                    (&w.versions, Type::INT4_ARRAY),
                    (&w.encrypted, Type::JSONB_ARRAY),
                    (&w.xmins, Type::TEXT_ARRAY),
                    (&run_id, Type::UUID),
                ],
            )
            .await?;
        let (backed_up, updated): (i64, i64) = (counts.try_get(0)?, counts.try_get(1)?);
        if backed_up != n as i64 || updated != n as i64 {
            return Err(RunError::Inconsistent {
                run_id,
                message: format!(
                    "read {n} events but backed up {backed_up} and rewrote {updated}: some \
                     changed meanwhile; run again to resume"
                ),
            });
        }
        // Snapshots folded from the old form of these events are stale:
        // delete them with the rewrite (chronicle_postgres's migration 14).
        tx.execute_typed(
            "DELETE FROM snapshots WHERE aggregate_id IN \
                 (SELECT aggregate_id FROM events WHERE event_id = ANY($1))",
            &[(&w.ids, Type::UUID_ARRAY)],
        )
        .await?;
        // Renew the lease and move the cursor, only while both are ours.
        let ttl = self.lease_ttl.as_secs_f64();
        let fenced = tx
            .query_typed_one(
                "WITH lease AS ( \
                     UPDATE chronicle_upcast_leases \
                        SET expires_at = clock_timestamp() + $6 * interval '1 second', run_id = $1 \
                      WHERE event_type = $4 AND from_version = $5 AND owner_id = $7 \
                     RETURNING 1), \
                 moved AS ( \
                     UPDATE chronicle_upcast_runs \
                        SET cursor_position = $2, events_upcast = events_upcast + $3, \
                            batches = batches + 1, updated_at = now() \
                      WHERE run_id = $1 AND status = 'running' AND EXISTS (SELECT FROM lease) \
                     RETURNING 1) \
                 SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM moved)",
                &[
                    (&run_id, Type::UUID),
                    (&last, Type::INT8),
                    (&(n as i64), Type::INT8),
                    (&run.event_type, Type::TEXT),
                    (&from, Type::INT4),
                    (&ttl, Type::FLOAT8),
                    (&self.owner_id, Type::UUID),
                ],
            )
            .await?;
        let (leased, moved): (i64, i64) = (fenced.try_get(0)?, fenced.try_get(1)?);
        if leased != 1 {
            return Err(RunError::LeaseLost {
                run_id,
                event_type: run.event_type.clone(),
                from_version: run.from_version,
            });
        }
        if moved != 1 {
            return Err(RunError::Inconsistent {
                run_id,
                message: "the run is no longer running (rolled back or changed by another process)"
                    .into(),
            });
        }
        tx.commit().await?;
        Ok(Some((n as u64, last)))
    }

    /// Records why a run stopped; best effort (the error being reported
    /// matters more than a failure to record it).
    async fn mark_failed(&self, run_id: Uuid, error: &RunError) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let message = error.to_string();
        let event_id = error.event_id();
        let _ = client
            .execute_typed(
                "UPDATE chronicle_upcast_runs \
                    SET status = 'failed', error = $2, failed_event_id = $3, updated_at = now() \
                  WHERE run_id = $1 AND status = 'running'",
                &[
                    (&run_id, Type::UUID),
                    (&message, Type::TEXT),
                    (&event_id, Type::UUID),
                ],
            )
            .await;
    }

    /// Compares a run's backup with the store: counts, and checksums of
    /// what the store should hold (the backup upcast by the chain, or the
    /// backup itself after a rollback) and what it holds.
    ///
    /// Events with encrypted fields are compared as plaintext when this
    /// upcaster has a [`FieldCipher`]: the backup is decrypted and upcast,
    /// the store's event decrypted (both audited), because re-encryption
    /// gives fresh nonces and so never the same ciphertext twice. Without
    /// a cipher they are compared as stored, which holds only for runs
    /// that moved envelopes without re-encrypting them; a run made with a
    /// cipher then shows its re-encrypted events as mismatches and
    /// [`VerifyReport::encrypted`] says how many there are.
    pub async fn verify(&self, run_id: Uuid) -> Result<VerifyReport, RunError> {
        let info = self.run_info(run_id).await?;
        let client = self.pool.get().await?;
        let rows = client
            .query_typed(
                "SELECT b.event_id, b.event_type, b.event_data, b.metadata, b.encrypted_fields, \
                        b.aggregate_id, b.version, e.aggregate_type, \
                        e.event_id IS NOT NULL, e.event_type, e.event_data, e.metadata, \
                        e.encrypted_fields \
                   FROM chronicle_upcast_backup b \
                   LEFT JOIN events e ON e.event_id = b.event_id \
                  WHERE b.run_id = $1 \
                  ORDER BY b.global_position, b.event_id",
                &[(&run_id, Type::UUID)],
            )
            .await?;
        let mut backup = Vec::with_capacity(rows.len());
        let mut expected = Vec::with_capacity(rows.len());
        let mut current = Vec::with_capacity(rows.len());
        let mut mismatches = Vec::new();
        let mut current_count = 0;
        let mut encrypted = 0;
        for row in &rows {
            let event_id: Uuid = row.try_get(0)?;
            let backup_fields: Option<Vec<String>> = row.try_get(4)?;
            let original = content(
                event_id,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                backup_fields.clone(),
            );
            let present: bool = row.try_get(8)?;
            let current_fields: Option<Vec<String>> = row.try_get(12)?;
            let is_encrypted = [&backup_fields, &current_fields]
                .iter()
                .any(|f| f.as_ref().is_some_and(|f| !f.is_empty()));
            encrypted += u64::from(is_encrypted);
            // A rollback restored the envelopes themselves: compare them
            // as stored. Otherwise decrypt when the run re-encrypted.
            let cipher = match (&self.cipher, is_encrypted) {
                (Some(c), true) if info.status != RunStatus::RolledBack => Some(c.as_ref()),
                _ => None,
            };
            let now = if present {
                current_count += 1;
                let now = content(
                    event_id,
                    row.try_get(9)?,
                    row.try_get(10)?,
                    row.try_get(11)?,
                    current_fields,
                );
                match cipher {
                    Some(cipher) => decrypted_content(run_id, row, now, cipher).await?,
                    None => now,
                }
            } else {
                Value::Null
            };
            let want = if info.status == RunStatus::RolledBack {
                original.clone()
            } else {
                self.expected_after(run_id, row, info.from_version, cipher)
                    .await?
            };
            if want != now && mismatches.len() < 10 {
                mismatches.push(event_id);
            }
            backup.push(original);
            expected.push(want);
            current.push(now);
        }
        Ok(VerifyReport {
            run_id,
            status: info.status,
            backup_count: rows.len() as u64,
            current_count,
            backup_checksum: Checksum::of(&Value::Array(backup)),
            expected_checksum: Checksum::of(&Value::Array(expected)),
            current_checksum: Checksum::of(&Value::Array(current)),
            mismatches,
            encrypted,
            compared_plaintext: self.cipher.is_some() && info.status != RunStatus::RolledBack,
        })
    }

    /// A backup row (verify's columns) upcast as the runner would write it;
    /// with a cipher, decrypted first and left as plaintext.
    async fn expected_after(
        &self,
        run_id: Uuid,
        row: &Row,
        from_version: u32,
        cipher: Option<&dyn FieldCipher>,
    ) -> Result<Value, RunError> {
        let event_id: Uuid = row.try_get(0)?;
        let metadata: Option<Value> = row.try_get(3)?;
        let encrypted: Option<Vec<String>> = row.try_get(4)?;
        let envelope = verify_envelope(row, BACKUP_COLUMNS)?;
        let mut event = UpcastEvent::from_envelope(&envelope).with_schema_version(from_version);
        if let Some(cipher) = cipher {
            verify_decrypt(cipher, run_id, &mut event).await?;
        }
        let after = self
            .chain
            .upcast_validated(event)
            .map_err(|source| RunError::Invalid {
                event_id,
                source: Box::new(source),
            })?;
        let mut meta = match metadata {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        meta.insert("schema_version".into(), json!(after.schema_version()));
        let enc = encrypted_column(encrypted.is_none(), &after.encrypted_fields)
            .map(|v| serde_json::from_value(v).unwrap_or_default());
        Ok(content(
            event_id,
            after.event_type,
            after.data,
            Some(Value::Object(meta)),
            enc,
        ))
    }

    /// Restores a run's originals from the backup, byte for byte, in one
    /// transaction, and marks the run rolled back. Refused when a later,
    /// not rolled back run rewrote some of the same events.
    pub async fn rollback(&self, run_id: Uuid) -> Result<RunInfo, RunError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_typed_opt(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM chronicle_upcast_runs WHERE run_id = $1 FOR UPDATE"
                ),
                &[(&run_id, Type::UUID)],
            )
            .await?
            .ok_or(RunError::RunNotFound(run_id))?;
        let info = RunInfo::from_row(&row)?;
        if info.status == RunStatus::RolledBack {
            return Err(RunError::WrongStatus {
                run_id,
                status: info.status,
                hint: "it was already rolled back",
            });
        }
        // No runner may be rewriting this key meanwhile; the lease is taken
        // and given up inside this transaction.
        let from = to_i32(info.from_version);
        self.acquire_lease(&*tx, &info.event_type, from).await?;
        let later = tx
            .query_typed_opt(
                "SELECT b2.run_id FROM chronicle_upcast_backup b \
                   JOIN chronicle_upcast_backup b2 ON b2.event_id = b.event_id AND b2.run_id <> b.run_id \
                   JOIN chronicle_upcast_runs r2 ON r2.run_id = b2.run_id \
                  WHERE b.run_id = $1 AND r2.status <> 'rolled_back' AND b2.backed_up_at >= b.backed_up_at \
                  LIMIT 1",
                &[(&run_id, Type::UUID)],
            )
            .await?;
        if let Some(later) = later {
            return Err(RunError::RollbackBlocked {
                run_id,
                later_run: later.try_get(0)?,
            });
        }
        let backed_up: i64 = tx
            .query_typed_one(
                "SELECT count(*) FROM chronicle_upcast_backup WHERE run_id = $1",
                &[(&run_id, Type::UUID)],
            )
            .await?
            .try_get(0)?;
        let restored = tx
            .execute_typed(
                "UPDATE events e \
                    SET event_type = b.event_type, event_data = b.event_data, \
                        metadata = b.metadata, encrypted_fields = b.encrypted_fields \
                   FROM chronicle_upcast_backup b \
                  WHERE b.run_id = $1 AND e.event_id = b.event_id",
                &[(&run_id, Type::UUID)],
            )
            .await?;
        if restored != to_u64(backed_up) {
            return Err(RunError::Inconsistent {
                run_id,
                message: format!(
                    "the backup holds {backed_up} events but {restored} are in the store"
                ),
            });
        }
        // Snapshots folded from the upcast form are stale once restored.
        tx.execute_typed(
            "DELETE FROM snapshots WHERE aggregate_id IN \
                 (SELECT aggregate_id FROM chronicle_upcast_backup WHERE run_id = $1)",
            &[(&run_id, Type::UUID)],
        )
        .await?;
        let row = tx
            .query_typed_one(
                &format!(
                    "UPDATE chronicle_upcast_runs SET status = 'rolled_back', finished_at = now(), \
                            updated_at = now() \
                      WHERE run_id = $1 RETURNING {RUN_COLUMNS}"
                ),
                &[(&run_id, Type::UUID)],
            )
            .await?;
        let info = RunInfo::from_row(&row)?;
        tx.execute_typed(
            "DELETE FROM chronicle_upcast_leases \
              WHERE event_type = $1 AND from_version = $2 AND owner_id = $3",
            &[
                (&info.event_type, Type::TEXT),
                (&from, Type::INT4),
                (&self.owner_id, Type::UUID),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(info)
    }
}

/// The next matching events after a cursor. `with_xmin` adds each row
/// version's `xmin` (column 11): the runner reads without row locks and
/// writes only rows still at the version it read.
fn select_sql(with_xmin: bool) -> String {
    format!(
        "SELECT {EVENT_COLUMNS}{} FROM events \
          WHERE event_type = $1 AND {VERSION_EXPR} = $2 AND global_position > $3 \
          ORDER BY global_position LIMIT $4",
        if with_xmin { ", xmin::text" } else { "" }
    )
}

fn decode(row: &Row) -> Result<Stored, RunError> {
    let event_id: Uuid = row.try_get(0)?;
    let metadata: Option<Value> = row.try_get(5)?;
    let encrypted: Option<Vec<String>> = row.try_get(8)?;
    let transaction_id: String = row.try_get(9)?;
    let transaction_id = transaction_id.parse().map_err(|_| RunError::Decode {
        event_id,
        message: format!("transaction_id `{transaction_id}` is not a number"),
    })?;
    let timestamp: Option<DateTime<Utc>> = row.try_get(7)?;
    Ok(Stored {
        envelope: EventEnvelope {
            event_id,
            aggregate_id: row.try_get(1)?,
            aggregate_type: row.try_get(2)?,
            event_type: row.try_get(3)?,
            event_data: row.try_get(4)?,
            metadata: Metadata::from_json(metadata),
            version: to_u32(row.try_get::<_, i32>(6)?),
            timestamp: timestamp.unwrap_or_default(),
            encrypted_fields: encrypted.clone().unwrap_or_default(),
            position: Position::new(transaction_id, row.try_get(10)?),
        },
        encrypted_null: encrypted.is_none(),
    })
}

/// The `encrypted_fields` column to write: NULL stays NULL while there are
/// none, so untouched events are restored and compared exactly.
fn encrypted_column(was_null: bool, fields: &[String]) -> Option<Value> {
    if was_null && fields.is_empty() {
        None
    } else {
        Some(json!(fields))
    }
}

/// Where verify's row holds the backup's and the store's event type, data,
/// metadata and encrypted fields (in that order).
const BACKUP_COLUMNS: usize = 1;
const STORE_COLUMNS: usize = 9;

/// One side of a verify row as an envelope.
fn verify_envelope(row: &Row, side: usize) -> Result<EventEnvelope, RunError> {
    Ok(EventEnvelope {
        event_id: row.try_get(0)?,
        aggregate_id: row.try_get(5)?,
        aggregate_type: row.try_get::<_, Option<String>>(7)?.unwrap_or_default(),
        event_type: row.try_get(side)?,
        event_data: row.try_get(side + 1)?,
        metadata: Metadata::from_json(row.try_get(side + 2)?),
        version: to_u32(row.try_get::<_, i32>(6)?),
        timestamp: DateTime::<Utc>::default(),
        encrypted_fields: row
            .try_get::<_, Option<Vec<String>>>(side + 3)?
            .unwrap_or_default(),
        position: Position::default(),
    })
}

/// Decrypts `event`'s fields for verify's plaintext comparison.
async fn verify_decrypt(
    cipher: &dyn FieldCipher,
    run_id: Uuid,
    event: &mut UpcastEvent,
) -> Result<(), RunError> {
    cipher
        .decrypt(event)
        .await
        .map_err(|failure| RunError::VerifyCipher {
            run_id,
            event_id: event.event_id(),
            failure,
        })
}

/// `content` of the store's event with its encrypted fields decrypted.
async fn decrypted_content(
    run_id: Uuid,
    row: &Row,
    stored: Value,
    cipher: &dyn FieldCipher,
) -> Result<Value, RunError> {
    let Value::Object(mut stored) = stored else {
        return Ok(stored);
    };
    let mut event = UpcastEvent::from_envelope(&verify_envelope(row, STORE_COLUMNS)?);
    verify_decrypt(cipher, run_id, &mut event).await?;
    stored.insert("event_data".into(), event.data);
    Ok(Value::Object(stored))
}

/// What verify compares for one event.
fn content(
    event_id: Uuid,
    event_type: String,
    data: Value,
    metadata: Option<Value>,
    encrypted: Option<Vec<String>>,
) -> Value {
    json!({
        "event_id": event_id,
        "event_type": event_type,
        "event_data": data,
        "metadata": metadata,
        "encrypted_fields": encrypted,
    })
}

fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn to_u32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::RolledBack,
        ] {
            assert_eq!(s.as_str().parse::<RunStatus>(), Ok(s));
        }
        assert!("paused".parse::<RunStatus>().is_err());
    }

    #[test]
    fn null_encrypted_fields_stay_null() {
        assert_eq!(encrypted_column(true, &[]), None);
        assert_eq!(encrypted_column(false, &[]), Some(json!([])));
        assert_eq!(
            encrypted_column(true, &["/a".to_owned()]),
            Some(json!(["/a"]))
        );
    }

    #[test]
    fn runner_and_errors_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PgUpcaster>();
        check::<RunError>();
        check::<VerifyReport>();
    }
}
