//! [`PgEventStore`]: appends and reads on the `events` table.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::TryStreamExt;

use async_trait::async_trait;
use chronicle_core::{
    AggregateId, AppendOutcome, Error as CoreError, EventAppender, EventEnvelope, EventReader,
    ExpectedVersion, FeedBatch, NewEvent, Position, TimeRange, Validation,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use chronicle_crypto::{AuditedAppend, DataKeyId};

use crate::combine::{Answer, CombineStats, Combiner, DEFAULT_IN_FLIGHT, Request};
use crate::types::JsonbText;
use crate::{Error, PgPool};
use chronicle_sql::{EVENT_COLUMNS, Xid8, decode_event};

/// Raised by `chronicle_append` when only part of a batch could be
/// inserted; the statement is aborted, so nothing of the batch is kept.
pub(crate) const PARTIAL_APPEND: &str = "CH409";

/// One event at version `$7 + 1` when version `$7` is stored (or `$7` is
/// 0), the text shared by [`FAST_APPEND_ONE`] and
/// [`FAST_FIRST_KEY_APPEND_ONE`].
macro_rules! insert_one_event {
    () => {
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
         event_data, metadata, version, encrypted_fields) \
         SELECT $1, $2, $3, $4, $5, $6, $7 + 1, $8 \
          WHERE $7 = 0 OR EXISTS (SELECT 1 FROM events e WHERE e.aggregate_id = $2 AND e.version = $7) \
         ON CONFLICT DO NOTHING"
    };
}

/// The common append as one prepared statement. It inserts nothing when
/// the expected version is not the aggregate's current one, or the version
/// or the id is taken; the store then asks `chronicle_append`, which finds
/// out why. The migration 10 notes explain why the `EXISTS` keeps the
/// feed's per-aggregate order.
const FAST_APPEND_ONE: &str = insert_one_event!();

/// A subject's first append: [`FAST_APPEND_ONE`], and only if the event
/// went in, the subject's row, its first data key (`$19` .. `$23`) and the
/// key's `create-key` record (`$9` .. `$18`, stored unsealed: migration 11;
/// empty event ids and fields stored as NULL, as `chronicle_audit_append`
/// stores them), all stored or none. (Its `encrypt` record is derived from
/// the event by the sealer: migration 12.)
/// When the subject has a row already (its key made by another writer, or
/// shredded) the insert fails with a unique violation, and
/// `chronicle_append_audited` handles the append.
const FAST_FIRST_KEY_APPEND_ONE: &str = concat!(
    "WITH stored AS (",
    insert_one_event!(),
    " RETURNING 1), \
     subject AS (INSERT INTO chronicle_key_subjects (subject, current_key_id) \
     SELECT $19, $20 FROM stored RETURNING 1), \
     data_key AS (INSERT INTO chronicle_data_keys (key_id, subject, wrapped_key, kek_id, created_at) \
     SELECT $20, $19, $21, $22, $23 FROM subject RETURNING 1) \
     INSERT INTO chronicle_audit_log (at, operation, outcome, subject, key_id, kek_id, event_ids, \
     fields, actor, purpose) \
     SELECT $9, $10, $11, $12, $13, $14, nullif($15, '{}'), nullif($16, '{}'), $17, $18 FROM data_key"
);

/// A batch at versions `$7 + 1 ..`, as [`FAST_APPEND_ONE`]; without
/// `ON CONFLICT`, so that a batch that collides with stored rows fails as a
/// whole (a unique violation) instead of going in in part.
const FAST_APPEND_MANY: &str = "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
     event_data, metadata, version, encrypted_fields) \
     SELECT t.id, $2, $3, t.ty, t.d, t.m, $7 + t.n::INTEGER, \
            CASE WHEN t.enc IS NULL THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(t.enc)) END \
       FROM unnest($1::UUID[], $4::TEXT[], $5::JSONB[], $6::JSONB[], $8::JSONB[]) \
            WITH ORDINALITY AS t(id, ty, d, m, enc, n) \
      WHERE $7 = 0 OR EXISTS (SELECT 1 FROM events e WHERE e.aggregate_id = $2 AND e.version = $7)";

/// The default per-event limit on serialized data plus metadata: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// The event store on PostgreSQL.
///
/// One append is one round trip. With an expected version it is one
/// prepared `INSERT` that stores the batch only when that version is the
/// aggregate's last; with `UNIQUE(aggregate_id, version)` arbitrating
/// concurrent writers. Only when it stores nothing (a conflict, or the same
/// events appended again) does a second call, of the `chronicle_append`
/// function, find out why. Without the statement cache
/// ([`PgEventStore::statement_cache`], for poolers that cannot keep
/// prepared statements) every append is that function call. Reads of the
/// global feed follow `(transaction_id, global_position)` below the
/// snapshot's xmin, so they never skip a late-committing transaction.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use chronicle_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, Position};
/// use chronicle_postgres::{PgEventStore, PgOptions};
/// use serde_json::json;
///
/// let pool = PgOptions::from_url("postgres://localhost/app")?.connect().await?;
/// let store = PgEventStore::new(pool);
/// let user = uuid::Uuid::now_v7();
/// store
///     .append(user, "user", ExpectedVersion::NoStream, vec![
///         NewEvent::new("UserRegistered", json!({ "email": "ada@example.com" })),
///     ])
///     .await?;
/// let batch = store.read_all(Position::START, 100).await?;
/// println!("{} events, resume after {}", batch.events.len(), batch.next);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
    max_payload_bytes: usize,
    /// Shared by the store's clones, so that a pooler found losing
    /// prepared statements turns them off for all of them at once.
    statement_cache: Arc<AtomicBool>,
    /// The queue of single-event appends, shared by the store's clones;
    /// `None` when combining is off.
    combiner: Option<Arc<Combiner>>,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore")
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("statement_cache", &self.caches_statements())
            .field(
                "combined_batches_in_flight",
                &self.combiner.as_ref().map(|c| c.in_flight()),
            )
            .finish_non_exhaustive()
    }
}

/// One event's columns, checked and serialized, ready to bind.
pub(crate) struct Prepared {
    pub(crate) ids: Vec<Uuid>,
    pub(crate) types: Vec<String>,
    pub(crate) data: Vec<JsonbText>,
    pub(crate) metadata: Vec<JsonbText>,
    pub(crate) encrypted: Vec<Option<JsonbText>>,
}

impl PgEventStore {
    /// A store over `pool`. The schema must be migrated
    /// ([`crate::migrate()`]).
    pub fn new(pool: PgPool) -> Self {
        PgEventStore {
            pool,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            statement_cache: Arc::new(AtomicBool::new(true)),
            combiner: Some(Arc::new(Combiner::new(DEFAULT_IN_FLIGHT))),
        }
    }

    /// Whether concurrent single-event appends are combined (default on;
    /// `docs/benchmarks.md` has the figures).
    ///
    /// With it on, appends of one event (with an expected version, or
    /// `Any`) made by many tasks at once share round trips: while a batch
    /// is in flight, the next appends queue, and go together as one
    /// multi-row statement in one transaction (one commit, one WAL flush).
    /// Each keeps its own expected-version check and its own outcome: its
    /// version, or its own conflict, repeat or duplicate-id error (found,
    /// for an append that did not go in, by the uncombined path, so one
    /// append's conflict never fails another's). An append made alone is
    /// sent at once, by the one-statement path; nothing waits for company. Durability is unchanged
    /// (`synchronous_commit` is not touched). If a batch's connection
    /// fails, every append of that batch gets an error (none is
    /// acknowledged), and the batch's transaction is either whole or
    /// absent. Appends of several events, and audited (encrypted) appends,
    /// are never combined. Batches are single statements in autocommit, so
    /// they work behind poolers in transaction mode and with the statement
    /// cache off.
    ///
    /// Turning it off gives the store (and clones made after) the plain
    /// one-statement-per-append path; turning it on gives them a new queue.
    ///
    /// ```
    /// # fn demo(pool: chronicle_postgres::PgPool) {
    /// let mut store = chronicle_postgres::PgEventStore::new(pool);
    /// assert!(store.combine_stats().is_some()); // on by default
    /// store.combine_appends(false);
    /// assert!(store.combine_stats().is_none());
    /// # }
    /// ```
    pub fn combine_appends(&mut self, on: bool) -> &mut Self {
        self.combiner = on.then(|| Arc::new(Combiner::new(DEFAULT_IN_FLIGHT)));
        self
    }

    /// How many combined batches may be in flight at once, each on a
    /// connection of its own (default 2; at least 1). More lets batches
    /// overlap on the server; fewer makes each batch larger. Turns
    /// combining on, with a new queue.
    ///
    /// ```
    /// # fn demo(pool: chronicle_postgres::PgPool) {
    /// let mut store = chronicle_postgres::PgEventStore::new(pool);
    /// store.combined_batches_in_flight(4);
    /// # }
    /// ```
    pub fn combined_batches_in_flight(&mut self, batches: usize) -> &mut Self {
        self.combiner = Some(Arc::new(Combiner::new(batches)));
        self
    }

    /// How many appends were combined, in how many batches, since combining
    /// was turned on (shared by the store's clones); `None` when it is off.
    ///
    /// ```no_run
    /// # fn demo(store: chronicle_postgres::PgEventStore) {
    /// if let Some(stats) = store.combine_stats() {
    ///     println!("{:.1} appends per batch", stats.appends as f64 / stats.batches.max(1) as f64);
    /// }
    /// # }
    /// ```
    pub fn combine_stats(&self) -> Option<CombineStats> {
        self.combiner.as_ref().map(|c| c.stats())
    }

    /// Whether appends use prepared statements kept per connection (default
    /// on). Turn it off behind a pooler in transaction mode that cannot keep
    /// them (PgBouncer before 1.21, or later without
    /// `max_prepared_statements`): then every statement is sent unnamed.
    /// [`crate::PgOptions::statement_cache`] reads the setting from the URL.
    ///
    /// ```
    /// # fn demo(pool: chronicle_postgres::PgPool) {
    /// let mut store = chronicle_postgres::PgEventStore::new(pool);
    /// store.statement_cache(false); // behind PgBouncer 1.18 in transaction mode
    /// # }
    /// ```
    ///
    /// With it on, the store notices when a pooler loses its prepared
    /// statements (`prepared statement "s0" already exists`, SQLSTATE
    /// 42P05, or `... does not exist`, 26000): it logs one warning, turns the
    /// cache off for itself and its clones, and sends the failed statement
    /// again unnamed (it was not executed).
    pub fn statement_cache(&mut self, on: bool) -> &mut Self {
        self.statement_cache = Arc::new(AtomicBool::new(on));
        self
    }

    /// Whether appends use prepared statements ([`PgEventStore::statement_cache`]);
    /// false after a pooler was found losing them.
    pub fn caches_statements(&self) -> bool {
        self.statement_cache.load(Ordering::Relaxed)
    }

    /// Whether `e` says the statement cache does not work on this pool (a
    /// pooler in transaction mode moved us to a server connection with
    /// other prepared statements); if so, turns it off for this store and
    /// its clones, saying so once. The statement was not executed, so the
    /// caller may send it again unnamed.
    pub(crate) fn lost_prepared_statement(&self, e: &tokio_postgres::Error) -> bool {
        if !crate::error::is_lost_prepared_statement(e) {
            return false;
        }
        if self
            .statement_cache
            .compare_exchange(true, false, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                error = %crate::error::describe(e),
                "a pooler in transaction mode loses prepared statements on this connection \
                 (PgBouncer before 1.21, or without max_prepared_statements): sending unnamed \
                 statements from now on; add statement_cache=off to the database URL to start so"
            );
        }
        true
    }

    /// A data-key store on this store's pool, preparing statements as this
    /// store does ([`crate::PgDataKeyStore::statement_cache`]).
    ///
    /// ```no_run
    /// # fn demo(store: chronicle_postgres::PgEventStore) {
    /// let keys = store.data_key_store();
    /// let audit = store.audit_sink();
    /// # let _ = (keys, audit); }
    /// ```
    pub fn data_key_store(&self) -> crate::PgDataKeyStore {
        crate::PgDataKeyStore::new(self.pool.clone()).statement_cache(self.caches_statements())
    }

    /// An audit sink on this store's pool, preparing statements as this
    /// store does ([`crate::PgAuditSink::statement_cache`]).
    pub fn audit_sink(&self) -> crate::PgAuditSink {
        crate::PgAuditSink::new(self.pool.clone()).statement_cache(self.caches_statements())
    }

    /// The largest serialized `event_data` plus `metadata` of one event,
    /// in bytes (default [`DEFAULT_MAX_PAYLOAD_BYTES`], 1 MiB). Larger
    /// events are refused before anything is sent.
    pub fn max_payload_bytes(&mut self, bytes: usize) -> &mut Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn prepare(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Prepared, Validation> {
        if aggregate_id.is_nil() {
            return Err(Validation::new(
                "aggregate_id",
                "is the nil UUID; give the aggregate a real id (e.g. a UUIDv7)",
            ));
        }
        check_name("aggregate_type", aggregate_type, 50)?;
        if events.is_empty() {
            return Err(Validation::new(
                "events",
                "nothing to append; pass at least one event",
            ));
        }
        let last = u64::from(expected.as_option().unwrap_or(0)) + events.len() as u64;
        if last > i32::MAX as u64 {
            return Err(Validation::new(
                "expected_version",
                format!(
                    "the aggregate's versions would pass {}, the largest a version can be",
                    i32::MAX
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(events.len());
        let mut prepared = Prepared {
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            data: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
            encrypted: Vec::with_capacity(events.len()),
        };
        for (i, e) in events.iter().enumerate() {
            let field = |name: &str| format!("events[{i}].{name}");
            if e.event_id.is_nil() {
                return Err(Validation::new(
                    field("event_id"),
                    "is the nil UUID; leave the default (a fresh UUIDv7) or pass a real id",
                ));
            }
            if !seen.insert(e.event_id) {
                return Err(Validation::new(
                    field("event_id"),
                    format!(
                        "{} appears twice in the batch; every event needs its own id",
                        e.event_id
                    ),
                ));
            }
            check_name(&field("event_type"), &e.event_type, 100)?;
            if !e.data.is_object() {
                return Err(Validation::new(
                    field("event_data"),
                    format!("must be a JSON object, got {}", json_kind(&e.data)),
                ));
            }
            if e.metadata.schema_version == 0 {
                return Err(Validation::new(
                    field("metadata.schema_version"),
                    "must be 1 or more (absent means 1)",
                ));
            }
            for pointer in &e.encrypted_fields {
                if !pointer.starts_with('/') {
                    return Err(Validation::new(
                        field("encrypted_fields"),
                        format!("`{pointer}` is not a JSON pointer; pointers start with `/`"),
                    ));
                }
            }
            let data = serde_json::to_string(&e.data).expect("a Value always serializes");
            let metadata = serde_json::to_string(&e.metadata).expect("metadata always serializes");
            let size = data.len() + metadata.len();
            if size > self.max_payload_bytes {
                return Err(Validation::new(
                    field("event_data"),
                    format!(
                        "data and metadata are {size} bytes, over the limit of {} bytes; store large blobs elsewhere and reference them, or raise the limit (PgEventStore::max_payload_bytes)",
                        self.max_payload_bytes
                    ),
                ));
            }
            check_json(&field("event_data"), &e.data)?;
            let metadata_value =
                serde_json::to_value(&e.metadata).expect("metadata always serializes");
            check_json(&field("metadata"), &metadata_value)?;
            prepared.ids.push(e.event_id);
            prepared.types.push(e.event_type.clone());
            prepared.data.push(JsonbText(data));
            prepared.metadata.push(JsonbText(metadata));
            prepared.encrypted.push(if e.encrypted_fields.is_empty() {
                None
            } else {
                Some(JsonbText(
                    serde_json::to_string(&e.encrypted_fields).expect("strings serialize"),
                ))
            });
        }
        Ok(prepared)
    }

    /// The prepared fast path of an append with an expected version: true
    /// when every event went in; false when nothing did and
    /// `chronicle_append` must find out why.
    async fn fast_append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: i32,
        p: &Prepared,
        events: &[NewEvent],
    ) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let statements = crate::Statements::new(true);
        if let [event] = events {
            let encrypted = (!event.encrypted_fields.is_empty()).then_some(&event.encrypted_fields);
            let params = one_event(&aggregate_id, &aggregate_type, &expected, p, &encrypted);
            return match statements.execute(&client, FAST_APPEND_ONE, &params).await {
                Ok(rows) => Ok(rows == 1),
                // Not executed: the unnamed path below sends it again.
                Err(e) if self.lost_prepared_statement(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        let result = statements
            .execute(
                &client,
                FAST_APPEND_MANY,
                &[
                    (&p.ids, Type::UUID_ARRAY),
                    (&aggregate_id, Type::UUID),
                    (&aggregate_type, Type::TEXT),
                    (&p.types, Type::TEXT_ARRAY),
                    (&p.data, Type::JSONB_ARRAY),
                    (&p.metadata, Type::JSONB_ARRAY),
                    (&expected, Type::INT4),
                    (&p.encrypted, Type::JSONB_ARRAY),
                ],
            )
            .await;
        match result {
            Ok(rows) => Ok(rows == events.len() as u64),
            // Some version or id is taken: nothing of the batch was kept.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
            Err(e) if self.lost_prepared_statement(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// [`FAST_APPEND_ONE`] for a combined append that a drain took alone
    /// (at `expected`): true when it went in, false when
    /// `chronicle_append` must find out why not.
    pub(crate) async fn fast_append_request(
        &self,
        r: &Request,
        expected: i32,
    ) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let encrypted = (!r.encrypted_fields.is_empty()).then_some(&r.encrypted_fields);
        let aggregate_type = r.aggregate_type.as_str();
        let params = one_event(
            &r.aggregate_id,
            &aggregate_type,
            &expected,
            &r.prepared,
            &encrypted,
        );
        match crate::Statements::new(true)
            .execute(&client, FAST_APPEND_ONE, &params)
            .await
        {
            Ok(rows) => Ok(rows == 1),
            Err(e) if self.lost_prepared_statement(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// [`FAST_FIRST_KEY_APPEND_ONE`] with one event (`event`:
    /// [`one_event`]'s parameters) and its key and record (`rest`): true
    /// when all of it was stored; false when nothing was and
    /// `chronicle_append_audited` must handle the append (a conflict, a
    /// repeat, or a subject that has a row already: shredded, or its key
    /// made by another writer).
    async fn fast_first_key_append(
        &self,
        event: &[(&(dyn ToSql + Sync), Type)],
        rest: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<bool, Error> {
        let mut params = event.to_vec();
        params.extend(rest.iter().map(|(v, t)| (*v, t.clone())));
        let client = self.pool.get().await?;
        match crate::Statements::new(true)
            .execute(&client, FAST_FIRST_KEY_APPEND_ONE, &params)
            .await
        {
            Ok(rows) => Ok(rows == 1),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
            Err(e) if self.lost_prepared_statement(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The aggregate's current version (0: no events).
    pub(crate) async fn current_version(&self, aggregate_id: AggregateId) -> Result<u32, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_typed_one(
                "SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = $1",
                &[(&aggregate_id, Type::UUID)],
            )
            .await?;
        Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
    }

    /// Which of `ids` are already stored (for the error of a partial
    /// duplicate).
    pub(crate) async fn first_stored(&self, ids: &[Uuid]) -> Result<Option<Uuid>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_typed_opt(
                "SELECT event_id FROM events WHERE event_id = ANY($1) LIMIT 1",
                &[(&ids, Type::UUID_ARRAY)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Runs a read and decodes rows as they stream in, so decoding on the
    /// client overlaps the server producing the rest. The statement is
    /// prepared once per connection and kept, as appends' are (unnamed
    /// when the statement cache is off): a stream load is one Bind and
    /// Execute, not a Parse and plan each time.
    async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<EventEnvelope>, Error> {
        let (client, rows) = loop {
            let client = self.pool.get().await?;
            let cached = self.caches_statements();
            match crate::Statements::new(cached)
                .query_raw(&client, sql, params)
                .await
            {
                Ok(rows) => break (client, rows),
                // Not executed: send it again unnamed.
                Err(e) if cached && self.lost_prepared_statement(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        futures_util::pin_mut!(rows);
        let mut events = Vec::new();
        while let Some(row) = rows.try_next().await? {
            events.push(decode_event(&row)?);
        }
        drop(client);
        Ok(events)
    }
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), Validation> {
    if value.trim().is_empty() {
        return Err(Validation::new(field, "is empty; give it a name"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(Validation::new(
            field,
            format!("is {chars} characters long, the column holds at most {max}"),
        ));
    }
    if value.contains('\0') {
        return Err(Validation::new(
            field,
            "contains a NUL character, which PostgreSQL text cannot store",
        ));
    }
    Ok(())
}

/// How deep JSON may nest, counting every object and array: the deepest
/// that readers can decode again (serde_json stops at 128 levels).
pub const MAX_JSON_DEPTH: usize = 127;

/// Refuses what PostgreSQL's `jsonb` cannot store, or what could not be
/// read back, naming where it is: a NUL character in a decoded string or
/// key (`jsonb` rejects `\u0000`; a backslash followed by `u0000` in the
/// text is fine and passes), or nesting deeper than [`MAX_JSON_DEPTH`].
/// Numbers need no check: every number a [`Value`] holds (an `i64`, a
/// `u64` or a finite `f64`) fits `jsonb`'s `numeric`.
fn check_json(field: &str, value: &Value) -> Result<(), Validation> {
    fn walk(value: &Value, path: &mut String, depth: usize) -> Result<(), (String, String)> {
        let nul = |path: &str, what: &str| {
            (
                path.to_owned(),
                format!(
                    "{what} contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot \
                     store; remove it or encode the value (e.g. base64)"
                ),
            )
        };
        match value {
            Value::String(s) if s.contains('\0') => Err(nul(path, "the string")),
            Value::Array(_) | Value::Object(_) if depth >= MAX_JSON_DEPTH => Err((
                path.to_owned(),
                format!(
                    "nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays, more than \
                     can be read back; flatten the structure"
                ),
            )),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&i.to_string());
                    walk(item, path, depth + 1)?;
                    path.truncate(len);
                }
                Ok(())
            }
            Value::Object(map) => {
                for (key, item) in map {
                    let len = path.len();
                    path.push('/');
                    // JSON pointer escaping (RFC 6901).
                    path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                    if key.contains('\0') {
                        return Err(nul(path, "the key"));
                    }
                    walk(item, path, depth + 1)?;
                    path.truncate(len);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let mut path = String::new();
    walk(value, &mut path, 0).map_err(|(pointer, reason)| {
        let at = if pointer.is_empty() { "/" } else { &pointer };
        Validation::new(field, format!("at {at}: {reason}"))
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An append that made no key current.
fn stored(outcome: AppendOutcome) -> AuditedAppend {
    AuditedAppend {
        outcome,
        current_keys: Vec::new(),
    }
}

/// The eight parameters of [`FAST_APPEND_ONE`] (the first eight of
/// [`FAST_FIRST_KEY_APPEND_ONE`]), typed.
fn one_event<'a>(
    aggregate_id: &'a AggregateId,
    aggregate_type: &'a &str,
    expected: &'a i32,
    p: &'a Prepared,
    encrypted: &'a Option<&Vec<String>>,
) -> [(&'a (dyn ToSql + Sync), Type); 8] {
    [
        (&p.ids[0], Type::UUID),
        (aggregate_id, Type::UUID),
        (aggregate_type, Type::TEXT),
        (&p.types[0], Type::TEXT),
        (&p.data[0], Type::JSONB),
        (&p.metadata[0], Type::JSONB),
        (expected, Type::INT4),
        (encrypted, Type::TEXT_ARRAY),
    ]
}

#[async_trait]
impl EventAppender for PgEventStore {
    #[tracing::instrument(level = "debug", skip(self, events), fields(events = events.len()))]
    async fn append(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> chronicle_core::Result<AppendOutcome> {
        self.append_with(aggregate_id, aggregate_type, expected, events, None)
            .await
            .map(|stored| stored.outcome)
    }
}

impl PgEventStore {
    /// The append; with `audit`, through `chronicle_append_audited`, which
    /// stores the audit records in the same statement when the events are
    /// stored (crate::audit).
    pub(crate) async fn append_with(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        audit: Option<&crate::audit::AppendAudit>,
    ) -> chronicle_core::Result<AuditedAppend> {
        let mut p = self.prepare(aggregate_id, aggregate_type, expected, &events)?;
        // The prepared fast path, unless a combined batch tried it already.
        let mut fast = self.caches_statements();
        let mut _alone = None;
        if let (Some(combiner), None, [event]) = (&self.combiner, audit, events.as_slice()) {
            let request = Request {
                aggregate_id,
                aggregate_type: aggregate_type.to_owned(),
                expected: expected.as_option().map(|v| v as i32),
                prepared: p,
                encrypted_fields: event.encrypted_fields.clone(),
            };
            match combiner.submit(self, request).await {
                Answer::Stored(version) => {
                    return Ok(stored(AppendOutcome {
                        version,
                        appended: true,
                    }));
                }
                Answer::Alone(request, slot) => {
                    p = request.prepared;
                    _alone = Some(slot);
                }
                Answer::NotStored(request) => {
                    p = request.prepared;
                    fast = false;
                }
                Answer::Failed(e) => return Err(e),
            }
        }
        // A subject's first event, its key and the key's record: one
        // prepared statement stores all, or nothing.
        if let (true, Some(audit), Some(v), [event]) = (
            self.caches_statements(),
            audit,
            expected.as_option(),
            events.as_slice(),
        ) && let (Some(params), Some(key)) = (audit.first_key(), audit.only_key())
        {
            let v = v as i32;
            let encrypted = (!event.encrypted_fields.is_empty()).then_some(&event.encrypted_fields);
            let head = one_event(&aggregate_id, &aggregate_type, &v, &p, &encrypted);
            if self.fast_first_key_append(&head, &params).await? {
                return Ok(AuditedAppend {
                    outcome: AppendOutcome {
                        version: (v as u32) + 1,
                        appended: true,
                    },
                    current_keys: vec![DataKeyId::from_uuid(key)],
                });
            }
        }
        if let (true, None, Some(v)) = (fast, audit, expected.as_option()) {
            let v = v as i32;
            if self
                .fast_append(aggregate_id, aggregate_type, v, &p, &events)
                .await?
            {
                return Ok(stored(AppendOutcome {
                    version: (v as u32) + events.len() as u32,
                    appended: true,
                }));
            }
        }
        let expected_param: Option<i32> = expected.as_option().map(|v| v as i32);
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&aggregate_id, Type::UUID),
            (&aggregate_type, Type::TEXT),
            (&expected_param, Type::INT4),
            (&p.ids, Type::UUID_ARRAY),
            (&p.types, Type::TEXT_ARRAY),
            (&p.data, Type::JSONB_ARRAY),
            (&p.metadata, Type::JSONB_ARRAY),
            (&p.encrypted, Type::JSONB_ARRAY),
        ];
        let sql = match audit {
            None => "SELECT status, version FROM chronicle_append($1, $2, $3, $4, $5, $6, $7, $8)",
            Some(audit) => {
                params.extend(audit.params());
                "SELECT status, version, current_keys FROM chronicle_append_audited($1, $2, $3, $4, $5, $6, $7, $8, \
                 $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)"
            }
        };
        let mut attempts = 0;
        let row = loop {
            let client = self.pool.get().await.map_err(Error::from)?;
            let cached = self.caches_statements();
            let result = crate::Statements::new(cached)
                .query_one(&client, sql, &params)
                .await;
            drop(client);
            match result {
                Ok(row) => break row,
                // Not executed: send it again unnamed.
                Err(e) if cached && self.lost_prepared_statement(&e) => continue,
                // Only part of the batch could be inserted, so none of it was
                // kept: some of its ids exist, or a concurrent writer took
                // some of its versions.
                Err(e)
                    if e.code().is_some_and(|c| {
                        c.code() == PARTIAL_APPEND || *c == SqlState::UNIQUE_VIOLATION
                    }) =>
                {
                    if let Some(event_id) = self.first_stored(&p.ids).await? {
                        return Err(CoreError::DuplicateEventId { event_id });
                    }
                    if expected == ExpectedVersion::Any && attempts < 10 {
                        attempts += 1;
                        continue;
                    }
                    return Err(CoreError::Conflict {
                        aggregate_id,
                        expected,
                        actual: self.current_version(aggregate_id).await?,
                    });
                }
                Err(e) => return Err(Error::from(e).into()),
            }
        };
        let (status, version): (i32, i32) = (row.get(0), row.get(1));
        let version = u32::try_from(version).unwrap_or(0);
        let current_keys: Vec<Uuid> = match audit {
            Some(_) => row.get::<_, Option<Vec<Uuid>>>(2).unwrap_or_default(),
            None => Vec::new(),
        };
        match status {
            0 => Ok(AuditedAppend {
                outcome: AppendOutcome {
                    version,
                    appended: true,
                },
                current_keys: current_keys.into_iter().map(DataKeyId::from_uuid).collect(),
            }),
            1 => Ok(stored(AppendOutcome {
                version,
                appended: false,
            })),
            2 => Err(CoreError::Conflict {
                aggregate_id,
                expected,
                actual: version,
            }),
            _ => Err(CoreError::DuplicateEventId { event_id: p.ids[0] }),
        }
    }
}

#[async_trait]
impl EventReader for PgEventStore {
    async fn read_stream(
        &self,
        aggregate_id: AggregateId,
        from: u32,
        to: Option<u32>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let from = i32::try_from(from).unwrap_or(i32::MAX);
        let to = to.map_or(i32::MAX, |t| i32::try_from(t).unwrap_or(i32::MAX));
        Ok(self
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 AND version BETWEEN $2 AND $3 ORDER BY version"
                ),
                &[(&aggregate_id, Type::UUID), (&from, Type::INT4), (&to, Type::INT4)],
            )
            .await?)
    }

    async fn read_stream_as_of(
        &self,
        aggregate_id: AggregateId,
        at: DateTime<Utc>,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        Ok(self
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 AND timestamp <= $2 ORDER BY version"
                ),
                &[(&aggregate_id, Type::UUID), (&at, Type::TIMESTAMPTZ)],
            )
            .await?)
    }

    async fn read_all(&self, after: Position, limit: usize) -> chronicle_core::Result<FeedBatch> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let events = self
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                      WHERE (transaction_id, global_position) > ($1, $2) \
                        AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                      ORDER BY transaction_id, global_position LIMIT $3"
                ),
                &[
                    (&Xid8(after.transaction_id), Type::XID8),
                    (&after.global_position, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        let next = events.last().map_or(after, |e| e.position);
        Ok(FeedBatch { events, next })
    }

    async fn read_by_type(
        &self,
        event_type: &str,
        range: TimeRange,
        limit: usize,
    ) -> chronicle_core::Result<Vec<EventEnvelope>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                      WHERE event_type = $1 \
                        AND timestamp >= coalesce($2, '-infinity'::timestamptz) \
                        AND timestamp < coalesce($3, 'infinity'::timestamptz) \
                      ORDER BY timestamp, global_position LIMIT $4"
                ),
                &[
                    (&event_type, Type::TEXT),
                    (&range.from, Type::TIMESTAMPTZ),
                    (&range.to, Type::TIMESTAMPTZ),
                    (&limit, Type::INT8),
                ],
            )
            .await?)
    }
}
