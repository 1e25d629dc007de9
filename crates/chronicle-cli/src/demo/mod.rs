//! `chronicle demo`: a guided walkthrough on the embedded default, on the
//! user profiles of [`profile`].

pub(crate) mod profile;

use anyhow::Result;
use chronicle_core::{
    Aggregate, Error, EventAppender, EventReader, ExpectedVersion, NewEvent, Position, Repository,
};
use std::sync::Arc;

use chronicle_postgres::{MigrateOptions, PgEventStore, migrate};
use chronicle_projections::{PgProjection, ProjectionOptions, RetryPolicy, Runner, RunnerOptions};
use serde_json::json;
use uuid::Uuid;

use profile::{Command, PROJECTION, Profile, ProfileProjection, READ_MODEL_DDL, READ_MODEL_SCHEMA};

use crate::Database;
use crate::output::{OutputFormat, outln, write_events, write_record};

fn step(n: u32, title: &str) -> crate::output::Result {
    outln!("\n== {n}. {title}")
}

/// Prints commands to try next, one a line under `Try:` (a test runs each).
pub(crate) fn print_try(commands: &[String]) -> crate::output::Result {
    outln!("Try:")?;
    for command in commands {
        outln!("  {command}")?;
    }
    Ok(())
}

/// Runs the walkthrough, waiting `connect_timeout` (`--connect-timeout`)
/// for the database.
pub async fn run(
    database_url: Option<&str>,
    connect_timeout: Option<std::time::Duration>,
) -> Result<()> {
    let mut db = Database::resolve(database_url)?;
    db.connect_timeout = connect_timeout;
    outln!(
        "Chronicle demo on {}",
        if db.embedded {
            "the embedded PostgreSQL (./.chronicle/postgres; `chronicle dev stop` stops it)"
        } else {
            "DATABASE_URL"
        }
    )?;
    let pool = db.pool().await?;

    step(1, "Migrate the schema (versioned, idempotent)")?;
    let report = migrate(&pool, MigrateOptions::default()).await?;
    outln!(
        "schema at version {}, applied now: {:?}",
        report.version,
        report.applied
    )?;
    let mut store = PgEventStore::new(pool);
    store.statement_cache(db.statement_cache()?);
    let repo = Repository::new(store.clone());

    step(
        2,
        "A user registers and edits their profile (aggregate + repository)",
    )?;
    let user = Uuid::now_v7();
    repo.execute::<Profile>(
        user,
        Command::Register {
            email: "ada@example.com".into(),
            name: "Ada".into(),
        },
    )
    .await?;
    repo.execute::<Profile>(
        user,
        Command::ChangeEmail {
            email: "ada@lovelace.dev".into(),
        },
    )
    .await?;
    let version = repo
        .execute::<Profile>(
            user,
            Command::Rename {
                name: "Ada Lovelace".into(),
            },
        )
        .await?;
    outln!("user {user} is at version {version}; its stream:")?;
    write_events(
        &store.read_stream(user, 1, None).await?,
        OutputFormat::Table,
    )?;

    step(
        3,
        "Two writers decide on version 3 at once: optimistic concurrency",
    )?;
    let a = store.append(
        user,
        Profile::TYPE,
        ExpectedVersion::Exact(3),
        vec![NewEvent::new("NameChanged", json!({ "name": "A. L." }))],
    );
    let b = store.append(
        user,
        Profile::TYPE,
        ExpectedVersion::Exact(3),
        vec![NewEvent::new("NameChanged", json!({ "name": "Countess" }))],
    );
    let (a, b) = tokio::join!(a, b);
    for (who, result) in [("writer A", a), ("writer B", b)] {
        match result {
            Ok(out) => outln!("{who}: appended, aggregate now at version {}", out.version)?,
            Err(Error::Conflict {
                expected, actual, ..
            }) => outln!(
                "{who}: conflict (expected {expected}, actual {actual}) -> reload, decide again, retry (CLI exit code 3)"
            )?,
            Err(e) => return Err(e.into()),
        }
    }

    step(4, "A retried append with the same event id is idempotent")?;
    let event = NewEvent::new("NameChanged", json!({ "name": "Ada" }));
    let first = store
        .append(
            user,
            Profile::TYPE,
            ExpectedVersion::Any,
            vec![event.clone()],
        )
        .await?;
    let retry = store
        .append(user, Profile::TYPE, ExpectedVersion::Any, vec![event])
        .await?;
    outln!(
        "first: version {} appended={}; retry: version {} appended={} (nothing written twice)",
        first.version,
        first.appended,
        retry.version,
        retry.appended
    )?;

    step(5, "Time travel: the profile as of version 1, and now")?;
    let (then, _) = repo.load_at_version::<Profile>(user, 1).await?;
    let (now, v) = repo.load::<Profile>(user).await?;
    write_record(
        &json!({ "as of version 1": then, format!("now (version {v})"): now }),
        OutputFormat::Table,
    )?;

    step(
        6,
        "Bad input is refused with the field named, and nothing is stored",
    )?;
    let bad = store
        .append(
            user,
            Profile::TYPE,
            ExpectedVersion::Any,
            vec![NewEvent::new("Oops", json!(["not", "an", "object"]))],
        )
        .await;
    if let Err(e) = bad {
        outln!("refused: {e}")?;
    }

    step(7, "The global feed: gap-safe order, resumable checkpoint")?;
    let mut after = Position::START;
    let mut total = 0;
    loop {
        let batch = store.read_all(after, 500).await?;
        if batch.events.is_empty() {
            break;
        }
        total += batch.events.len();
        after = batch.next;
    }
    outln!(
        "{total} events in the feed; resume after checkpoint {after} (`chronicle read all --after {after}`)"
    )?;

    step(8, "Status")?;
    let status = store.status().await?;
    let mut value = serde_json::to_value(&status)?;
    if let Some(head) = status.head {
        value["head"] = json!(head.to_string());
    }
    write_record(&value, OutputFormat::Table)?;
    projections(&store, user).await?;
    crate::upcast::demo(&store, 13).await?;
    crate::keys::demo(&store, 14).await?;
    outln!("")?;
    print_try(&[
        format!("chronicle read stream {user}"),
        format!("chronicle state {user} --as-of 1"),
        "chronicle read all --limit 5".to_owned(),
        "chronicle status".to_owned(),
        "chronicle projections run user-profile".to_owned(),
        "chronicle projections status".to_owned(),
        "chronicle dlq list user-profile".to_owned(),
    ])?;
    Ok(())
}

/// Waits until the projection has no lag and `check` holds, up to 30 s.
async fn settle(
    projection: &PgProjection,
    pool: &chronicle_postgres::PgPool,
    check: &str,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let health = projection.health().await?;
        let ok: bool = pool.get().await?.query_typed_one(check, &[]).await?.get(0);
        if health.lag_events == 0 && ok {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the projection did not catch up within 30 s (lag {} events)",
            health.lag_events
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn print_read_model(pool: &chronicle_postgres::PgPool) -> Result<()> {
    let rows = pool
        .get()
        .await?
        .query_typed(
            "SELECT user_id::text, email, name, closed, version FROM user_profile.user_profiles ORDER BY user_id DESC LIMIT 5",
            &[],
        )
        .await?;
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["user_id", "email", "name", "closed", "version"]);
    for r in &rows {
        table.add_row(vec![
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, bool>(3).to_string(),
            r.get::<_, i32>(4).to_string(),
        ]);
    }
    outln!("{table}")?;
    Ok(())
}

/// Steps 9 to 12: the user-profile read model catches up, a malformed event
/// is dead-lettered with the user's later events parked behind it, a retry
/// after the fix delivers them in order, and a blue/green rebuild swaps in a
/// rebuilt model.
async fn projections(store: &PgEventStore, user: Uuid) -> Result<()> {
    let pool = store.pool().clone();
    pool.get()
        .await?
        .batch_execute(&format!(
            "BEGIN; CREATE SCHEMA IF NOT EXISTS {READ_MODEL_SCHEMA};
             SET LOCAL search_path = {READ_MODEL_SCHEMA}, public; {READ_MODEL_DDL}; COMMIT"
        ))
        .await?;

    step(
        9,
        "The user-profile projection catches up (2 partitions; writes and checkpoint in one transaction)",
    )?;
    let handler = ProfileProjection::default();
    let fix = handler.clone();
    let options = ProjectionOptions {
        partitions: 2,
        retry: RetryPolicy::none(),
        statement_cache: store.caches_statements(),
        ..ProjectionOptions::default()
    };
    let projection = Arc::new(
        PgProjection::new(pool.clone(), handler, options)?
            .with_read_model_schema(READ_MODEL_SCHEMA)?,
    );
    let runner = Runner::start(projection.clone(), RunnerOptions::default()).await?;
    let repo = Repository::new(store.clone());
    for i in 0..20 {
        repo.execute::<Profile>(
            Uuid::now_v7(),
            Command::Register {
                email: format!("user{i}@example.com"),
                name: format!("User {i}"),
            },
        )
        .await?;
    }
    settle(
        &projection,
        &pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM user_profile.user_profiles WHERE user_id = '{user}')"
        ),
    )
    .await?;
    let health = projection.health().await?;
    outln!(
        "caught up: lag {} events / {:.1} s over {} partitions; the newest rows:",
        health.lag_events,
        health.lag_seconds,
        health.partitions.len()
    )?;
    print_read_model(&pool).await?;

    step(
        10,
        "A malformed event is dead-lettered; that user's later events wait behind it, others flow on",
    )?;
    let poison = NewEvent::new("NameChanged", json!({ "name": 42 }));
    store
        .append(user, Profile::TYPE, ExpectedVersion::Any, vec![poison])
        .await?;
    let later = NewEvent::new("EmailChanged", json!({ "email": "ada@analytical.engine" }));
    store
        .append(user, Profile::TYPE, ExpectedVersion::Any, vec![later])
        .await?;
    let newcomer = Uuid::now_v7();
    repo.execute::<Profile>(
        newcomer,
        Command::Register {
            email: "grace@example.com".into(),
            name: "Grace".into(),
        },
    )
    .await?;
    // Each partition's lag is as of its last step, so wait for what this
    // step shows: Grace in the read model, and the poison event and the one
    // parked behind it in the queue.
    settle(
        &projection,
        &pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM user_profile.user_profiles WHERE user_id = '{newcomer}')
                AND (SELECT count(*) FROM projection_dead_letters
                      WHERE projection = '{PROJECTION}' AND aggregate_id = '{user}') = 2"
        ),
    )
    .await?;
    for l in chronicle_projections::dlq::list(&pool, PROJECTION, Some(user)).await? {
        outln!(
            "  dead-letter queue: v{} {} {:?}: {}",
            l.version,
            l.event_type,
            l.state,
            l.error
                .as_deref()
                .unwrap_or("parked behind the failed event")
        )?;
    }
    outln!("Grace registered after the poison event and is already in the read model.")?;

    step(
        11,
        "Deploy the fix, retry the dead letter: the parked events are delivered in order",
    )?;
    fix.lenient();
    let report = projection.dlq_retry(user).await?;
    outln!(
        "delivered {} event(s), {} left in the queue",
        report.delivered.len(),
        report.remaining
    )?;
    let email: String = pool
        .get()
        .await?
        .query_typed_one(
            "SELECT email FROM user_profile.user_profiles WHERE user_id = $1",
            &[(&user, tokio_postgres::types::Type::UUID)],
        )
        .await?
        .get(0);
    outln!(
        "user {user} now reads {email} in the read model (`chronicle projections status` shows the partitions)"
    )?;

    step(
        12,
        "Blue/green rebuild: a new model is built beside the live one, then swapped in at once",
    )?;
    let report = projection
        .rebuild_blue_green(Position::START, READ_MODEL_DDL, |_| {})
        .await?;
    let rows: i64 = pool
        .get()
        .await?
        .query_typed_one("SELECT count(*) FROM user_profile.user_profiles", &[])
        .await?
        .get(0);
    outln!(
        "replayed {} events into {READ_MODEL_SCHEMA}__next while the live model kept serving, then swapped it in \
         ({:.2} s); readers of {READ_MODEL_SCHEMA}.user_profiles now see the rebuilt model: {rows} users \
         (`chronicle projections rebuild user-profile --blue-green`)",
        report.replayed,
        report.elapsed.as_secs_f64()
    )?;
    runner.stop().await;
    Ok(())
}
