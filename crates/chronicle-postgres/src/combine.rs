//! Write-combining of single-event appends ([`PgEventStore::combine_appends`]).
//!
//! Appends of one event (with an expected version or `Any`, unaudited) are
//! combined per store. An append that finds no queue and fewer than
//! [`PgEventStore::combined_batches_in_flight`] appends going alone goes
//! alone, at once, by the uncombined path (no timer waits for company, and
//! a lone caller pays nothing). Beyond that, appends queue, and a drain
//! task (at most `combined_batches_in_flight` at once) takes everything
//! queued as the next batch; a drain that finds one append sends it by the
//! one-statement path too. A batch is one
//! statement in one autocommit transaction ([`COMBINED_APPEND`]), so it
//! commits with one WAL flush and works behind any pooler.
//!
//! Each append keeps its own outcome. The statement inserts exactly the
//! rows whose expected version holds in its snapshot, with `ON CONFLICT DO
//! NOTHING`, and returns them; an append that did not go in (a conflict, a
//! repeat of stored ids, a duplicate id, an `Any` that lost a race) goes
//! the uncombined way by itself, through `chronicle_append`, which finds out
//! why, exactly as a lone append would. One caller's conflict never fails
//! another's event.
//!
//! A batch holds at most one append per aggregate: a later append to an
//! aggregate already in the batch waits for the next one, so appends to one
//! aggregate go in queue order and never need checking against each other
//! inside one statement. Rows are inserted in `aggregate_id` order, so two
//! batches in flight wait for each other's rows in one order (no deadlock).
//!
//! The feed-order rule of migration 6 (version n+1 is never inserted by a
//! transaction whose id was assigned before version n committed) holds: the
//! statement checks version n in its snapshot, taken before its first
//! insert assigns the transaction id.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chronicle_core::{AggregateId, Error as CoreError};
use futures_util::TryStreamExt;
use tokio::sync::oneshot;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::store::Prepared;
use crate::types::JsonbText;
use crate::{Error, PgEventStore};

/// The batch: `chronicle_append_combined` (migration 15) inserts the rows
/// whose expected version holds (`$7`; NULL for any: the aggregate's last
/// version), at that version + 1, in `aggregate_id` order, and returns the
/// rows that went in. A function, so that its plan is made once per
/// session: as a prepared statement, PostgreSQL re-planned it per batch.
const COMBINED_APPEND: &str =
    "SELECT aggregate_id, version FROM chronicle_append_combined($1, $2, $3, $4, $5, $6, $7, $8)";

/// The most appends one batch takes.
const MAX_BATCH: usize = 1000;

/// Batches in flight at once by default.
pub(crate) const DEFAULT_IN_FLIGHT: usize = 2;

/// How many appends went through the combiner, in how many batches
/// ([`PgEventStore::combine_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CombineStats {
    /// Appends sent in batches.
    pub appends: u64,
    /// Batches sent (statements).
    pub batches: u64,
}

/// One append of one event, checked and serialized.
pub(crate) struct Request {
    pub(crate) aggregate_id: AggregateId,
    pub(crate) aggregate_type: String,
    /// `None`: any version.
    pub(crate) expected: Option<i32>,
    pub(crate) prepared: Prepared,
    /// The event's encrypted field pointers.
    pub(crate) encrypted_fields: Vec<String>,
}

/// What became of a combined append.
pub(crate) enum Answer {
    /// Nothing to combine with: the caller appends by the uncombined path,
    /// holding the slot until it is done, so that appends arriving
    /// meanwhile queue for a batch.
    Alone(Request, AloneSlot),
    /// Stored at this version.
    Stored(u32),
    /// Not stored by the batch, and certainly not stored: the caller
    /// appends it the uncombined way, which finds out why.
    NotStored(Request),
    /// The batch's fate is unknown (its connection failed): every caller
    /// of the batch gets this.
    Failed(CoreError),
}

struct Pending {
    request: Request,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Drain tasks running.
    running: usize,
    /// Appends going alone ([`Answer::Alone`] with a slot).
    alone: usize,
}

/// A lone append in flight; dropping it counts it out.
pub(crate) struct AloneSlot(Arc<Combiner>);

impl Drop for AloneSlot {
    fn drop(&mut self) {
        self.0.lock().alone -= 1;
    }
}

/// A store's queue of single-event appends, shared by its clones.
pub(crate) struct Combiner {
    state: Mutex<State>,
    in_flight: usize,
    appends: AtomicU64,
    batches: AtomicU64,
}

impl Combiner {
    pub(crate) fn new(in_flight: usize) -> Self {
        Combiner {
            state: Mutex::new(State::default()),
            in_flight: in_flight.max(1),
            appends: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn stats(&self) -> CombineStats {
        CombineStats {
            appends: self.appends.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (every
        // change is one push or one drain).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With no queue and a lone slot free, hands `request` back to go
    /// alone; otherwise
    /// queues it and waits for its batch. With fewer batches in flight than
    /// allowed, a drain task starts at once.
    pub(crate) async fn submit(self: &Arc<Self>, store: &PgEventStore, request: Request) -> Answer {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = self.lock();
            if state.queue.is_empty() && state.alone < self.in_flight {
                state.alone += 1;
                return Answer::Alone(request, AloneSlot(Arc::clone(self)));
            }
            state.queue.push_back(Pending { request, reply });
            let start = state.running < self.in_flight;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(drain(store.clone(), Arc::clone(self)));
        }
        answer.await.unwrap_or_else(|_| {
            Answer::Failed(CoreError::Backend {
                message:
                    "the append's combined batch was abandoned (its task stopped: the runtime \
                          shut down, or it panicked); the event may or may not have been stored"
                        .into(),
                source: None,
            })
        })
    }

    /// The next batch: queued appends in order, at most one per aggregate
    /// (later ones to an aggregate wait, in order, for the next batch).
    fn take(&self, state: &mut State) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut aggregates = HashSet::new();
        let mut rest = VecDeque::new();
        while let Some(p) = state.queue.pop_front() {
            if batch.len() < MAX_BATCH && aggregates.insert(p.request.aggregate_id) {
                batch.push(p);
            } else {
                rest.push_back(p);
            }
        }
        state.queue = rest;
        batch
    }
}

/// Counts a drain task out however it ends; one that is dropped mid-batch
/// (its runtime shutting down) also fails the queue if no other drain task
/// is left to take it.
struct Running<'a> {
    combiner: &'a Combiner,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.combiner.lock();
        state.running -= 1;
        if state.running == 0 {
            state.queue.clear();
        }
    }
}

/// Sends batches until the queue is empty.
async fn drain(store: PgEventStore, combiner: Arc<Combiner>) {
    let mut running = Running {
        combiner: &combiner,
        done: false,
    };
    loop {
        let batch = {
            let mut state = combiner.lock();
            let batch = combiner.take(&mut state);
            if batch.is_empty() {
                state.running -= 1;
                running.done = true;
                return;
            }
            batch
        };
        combiner
            .appends
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        combiner.batches.fetch_add(1, Ordering::Relaxed);
        run_batch(&store, batch).await;
    }
}

/// Sends one batch and answers each of its callers.
async fn run_batch(store: &PgEventStore, mut batch: Vec<Pending>) {
    if let ([only], true) = (batch.as_slice(), store.caches_statements())
        && let Some(expected) = only.request.expected
    {
        // No company: the prepared single-event statement costs less than
        // the batch function for one row. The drain holds its slot
        // meanwhile, so appends arriving now queue for the next batch.
        let p = batch.pop().expect("one append");
        let answer = match store.fast_append_request(&p.request, expected).await {
            Ok(true) => Answer::Stored(u32::try_from(expected + 1).unwrap_or(0)),
            Ok(false) => Answer::NotStored(p.request),
            Err(e) => Answer::Failed(e.into()),
        };
        let _ = p.reply.send(answer);
        return;
    }
    let result = send(store, &batch).await;
    match result {
        Ok(rows) => {
            let stored: HashMap<Uuid, i32> = rows
                .iter()
                .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i32>(1)))
                .collect();
            for p in batch {
                let answer = match stored.get(&p.request.aggregate_id) {
                    Some(&v) => Answer::Stored(u32::try_from(v).unwrap_or(0)),
                    None => Answer::NotStored(p.request),
                };
                let _ = p.reply.send(answer);
            }
        }
        Err(e) if e.certainly_not_stored() => {
            // The statement failed as a whole and its transaction rolled
            // back: each append goes alone, and gets its own outcome.
            for p in batch {
                let _ = p.reply.send(Answer::NotStored(p.request));
            }
        }
        Err(e) => {
            let e = Arc::new(match e {
                Failure::NotSent(e) => e,
                Failure::Statement(e) => Error::from(e),
            });
            for p in batch {
                let _ = p.reply.send(Answer::Failed(CoreError::Backend {
                    message: format!(
                        "the connection failed during a combined append; the event may or may \
                         not have been stored (read the aggregate, or append again with the same \
                         event id): {e}"
                    ),
                    source: Some(Box::new(Shared(Arc::clone(&e)))),
                }));
            }
        }
    }
}

/// Why a batch failed.
enum Failure {
    /// No connection was had: nothing was sent.
    NotSent(Error),
    /// The statement failed.
    Statement(tokio_postgres::Error),
}

impl Failure {
    /// Whether the batch certainly stored nothing: nothing was sent, or the
    /// server answered the statement with an error (so its transaction
    /// rolled back); not when the connection broke or was terminated.
    fn certainly_not_stored(&self) -> bool {
        match self {
            Failure::NotSent(_) => true,
            Failure::Statement(e) => e.as_db_error().is_some_and(|db| {
                db.parsed_severity() == Some(tokio_postgres::error::Severity::Error)
                    && !db.code().code().starts_with("57")
            }),
        }
    }
}

/// The batch's statement, sent again unnamed when a pooler lost the
/// prepared one.
async fn send(store: &PgEventStore, batch: &[Pending]) -> Result<Vec<Row>, Failure> {
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut aggregates = Vec::with_capacity(n);
    let mut aggregate_types = Vec::with_capacity(n);
    let mut event_types = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut encrypted: Vec<Option<&JsonbText>> = Vec::with_capacity(n);
    for p in batch {
        let r = &p.request;
        ids.push(r.prepared.ids[0]);
        aggregates.push(r.aggregate_id);
        aggregate_types.push(r.aggregate_type.as_str());
        event_types.push(r.prepared.types[0].as_str());
        data.push(&r.prepared.data[0]);
        metadata.push(&r.prepared.metadata[0]);
        expected.push(r.expected);
        encrypted.push(r.prepared.encrypted[0].as_ref());
    }
    let params: [(&(dyn ToSql + Sync), Type); 8] = [
        (&ids, Type::UUID_ARRAY),
        (&aggregates, Type::UUID_ARRAY),
        (&aggregate_types, Type::TEXT_ARRAY),
        (&event_types, Type::TEXT_ARRAY),
        (&data, Type::JSONB_ARRAY),
        (&metadata, Type::JSONB_ARRAY),
        (&expected, Type::INT4_ARRAY),
        (&encrypted, Type::JSONB_ARRAY),
    ];
    loop {
        let client = store
            .pool()
            .get()
            .await
            .map_err(|e| Failure::NotSent(e.into()))?;
        let cached = store.caches_statements();
        let result = async {
            let rows = crate::Statements::new(cached)
                .query_raw(&client, COMBINED_APPEND, &params)
                .await?;
            rows.try_collect::<Vec<Row>>().await
        }
        .await;
        match result {
            Ok(rows) => return Ok(rows),
            // Not executed: send it again unnamed.
            Err(e) if cached && store.lost_prepared_statement(&e) => continue,
            Err(e) => {
                let failure = Failure::Statement(e);
                if !failure.certainly_not_stored() {
                    // The connection broke or was terminated: keep it out
                    // of the pool (it may not know yet that it is closed).
                    drop(deadpool_postgres::Object::take(client));
                }
                return Err(failure);
            }
        }
    }
}

/// A batch's error, shared by its callers.
#[derive(Debug)]
struct Shared(Arc<Error>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
