//! The command path of `chronicle bench append`: [`Repository::execute`]
//! (load, decide, append), with and without its aggregate cache, against
//! the same commands written by hand (a prepared `SELECT` of the stream and
//! a prepared `INSERT`).

use std::time::Instant;

use anyhow::Result;
use chronicle_core::{Aggregate, DomainEvent, Repository};
use chronicle_postgres::{PgEventStore, PgPool};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::types::{Json, Type};
use uuid::Uuid;

use crate::bench::{Case, Side, rows_added};

/// Commands per aggregate before a task moves to a fresh one: every
/// command loads a stream of 0 to 19 events.
pub(crate) const COMMANDS_PER_AGGREGATE: usize = 20;

/// The benchmark's one event, as large as the append cases' events.
#[derive(Debug, Serialize, Deserialize)]
enum TallyEvent {
    Counted {
        n: u64,
        email: String,
        name: String,
        tags: Vec<String>,
    },
}

impl DomainEvent for TallyEvent {}

/// Refused: the tally would pass [`Tally::LIMIT`].
#[derive(Debug, thiserror::Error)]
#[error("the tally may not pass {}", Tally::LIMIT)]
pub(crate) struct TooMany;

/// An aggregate whose decision depends on its state: each command adds one
/// count, refused past a limit the benchmark never reaches.
#[derive(Debug, Default)]
struct Tally {
    count: u64,
}

impl Tally {
    const LIMIT: u64 = 1_000_000;
}

impl Aggregate for Tally {
    const TYPE: &'static str = "bench";
    type Event = TallyEvent;
    type Command = u64;
    type Error = TooMany;

    fn apply(&mut self, TallyEvent::Counted { .. }: TallyEvent) {
        self.count += 1;
    }

    fn handle(&self, n: u64) -> Result<Vec<TallyEvent>, TooMany> {
        if self.count >= Self::LIMIT {
            return Err(TooMany);
        }
        Ok(vec![TallyEvent::Counted {
            n,
            email: "someone@example.com".into(),
            name: "A. Person".into(),
            tags: vec!["a".into(), "b".into()],
        }])
    }
}

/// The command cases: `commands` commands over `tasks` tasks, through the
/// repository (with an aggregate cache of `cache` entries, or none) and by
/// hand, best of two alternating runs each.
pub(crate) async fn command_case(
    pool: &PgPool,
    tasks: usize,
    commands: usize,
    cache: usize,
) -> Result<Case> {
    let mut repo = Repository::new(PgEventStore::new(pool.clone()));
    if cache > 0 {
        repo.cache(cache);
    }
    // Warm both sides' sessions: statements prepared on every connection.
    executes(&repo, tasks, tasks * 8).await?;
    by_hand(pool, tasks, tasks * 8).await?;
    let (mut ours, mut theirs) = (Side::default(), Side::default());
    for round in 0..2 {
        if round == 1 {
            theirs = theirs.best(rows_added(pool, by_hand(pool, tasks, commands)).await?);
        }
        ours = ours.best(rows_added(pool, executes(&repo, tasks, commands)).await?);
        if round == 0 {
            theirs = theirs.best(rows_added(pool, by_hand(pool, tasks, commands)).await?);
        }
    }
    let name = if cache > 0 {
        format!(
            "execute a command (load + decide + append), {tasks} tasks, aggregate cache \
             (vs hand-written prepared SELECT + INSERT)"
        )
    } else {
        format!(
            "execute a command (load + decide + append), {tasks} tasks \
             (vs hand-written prepared SELECT + INSERT)"
        )
    };
    Case::new(name, ours, theirs, None)
}

/// How many of `calls` the task `w` of `tasks` runs.
fn share(calls: usize, tasks: usize, w: usize) -> usize {
    calls / tasks + usize::from(w < calls % tasks)
}

/// `calls` commands through `repo`, spread over `tasks` tasks, each on
/// its own aggregates. Returns commands (one event each) per second.
async fn executes(repo: &Repository<PgEventStore>, tasks: usize, calls: usize) -> Result<f64> {
    let started = Instant::now();
    let handles: Vec<JoinHandle<Result<()>>> = (0..tasks)
        .map(|w| {
            let repo = repo.clone();
            let mine = share(calls, tasks, w);
            tokio::spawn(async move {
                let mut id = Uuid::now_v7();
                for i in 0..mine {
                    if i > 0 && i % COMMANDS_PER_AGGREGATE == 0 {
                        id = Uuid::now_v7();
                    }
                    repo.execute::<Tally>(id, i as u64).await?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}

/// The same commands by hand, the fastest natural way: on one connection
/// per task, a prepared `SELECT` of the columns the fold needs (type,
/// data, version), its rows folded into the state; the same decision; a
/// prepared `INSERT … VALUES` of the event at the next version, which the
/// unique `(aggregate_id, version)` guards.
async fn by_hand(pool: &PgPool, tasks: usize, calls: usize) -> Result<f64> {
    const LOAD: &str = "SELECT event_type, event_data, version FROM events WHERE aggregate_id = $1 ORDER BY version";
    const INSERT: &str = "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, \
                          event_data, metadata, version) VALUES ($1, $2, 'bench', $3, $4, $5, $6)";
    let started = Instant::now();
    let handles: Vec<JoinHandle<Result<()>>> = (0..tasks)
        .map(|w| {
            let pool = pool.clone();
            let mine = share(calls, tasks, w);
            tokio::spawn(async move {
                let client = pool.get().await?;
                let load = client.prepare_typed_cached(LOAD, &[Type::UUID]).await?;
                let insert = client
                    .prepare_typed_cached(
                        INSERT,
                        &[
                            Type::UUID,
                            Type::UUID,
                            Type::TEXT,
                            Type::JSONB,
                            Type::JSONB,
                            Type::INT4,
                        ],
                    )
                    .await?;
                let meta = json!({ "schema_version": 1 });
                let mut id = Uuid::now_v7();
                for i in 0..mine {
                    if i > 0 && i % COMMANDS_PER_AGGREGATE == 0 {
                        id = Uuid::now_v7();
                    }
                    let mut state = Tally::default();
                    let mut version = 0i32;
                    for row in client.query(&load, &[&id]).await? {
                        let ty: &str = row.try_get(0)?;
                        let Json(data): Json<serde_json::Value> = row.try_get(1)?;
                        state.apply(TallyEvent::from_stored(ty, &data)?);
                        version = row.try_get(2)?;
                    }
                    for event in state.handle(i as u64)? {
                        let (ty, data) = event.to_stored()?;
                        version += 1;
                        client
                            .execute(
                                &insert,
                                &[&Uuid::now_v7(), &id, &ty, &data, &meta, &version],
                            )
                            .await?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}
