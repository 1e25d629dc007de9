//! `chronicle demo`: a guided walkthrough on the embedded default.

use anyhow::Result;
use chronicle_core::{
    Aggregate, Error, EventAppender, EventReader, ExpectedVersion, NewEvent, Position, Repository,
};
use chronicle_postgres::{MigrateOptions, PgEventStore, migrate};
use serde_json::json;
use user_profile::{ProfileCommand, UserProfile};
use uuid::Uuid;

use crate::Database;
use crate::output::{OutputFormat, print_events, print_record};

fn step(n: u32, title: &str) {
    println!("\n== {n}. {title}");
}

/// Runs the walkthrough.
pub async fn run(database_url: Option<&str>) -> Result<()> {
    let db = Database::resolve(database_url)?;
    println!(
        "Chronicle demo on {}",
        if db.embedded {
            "the embedded PostgreSQL (./.chronicle/postgres; `chronicle dev stop` stops it)"
        } else {
            "DATABASE_URL"
        }
    );
    let pool = db.pool().await?;

    step(1, "Migrate the schema (versioned, idempotent)");
    let report = migrate(&pool, MigrateOptions::default()).await?;
    println!(
        "schema at version {}, applied now: {:?}",
        report.version, report.applied
    );
    let store = PgEventStore::new(pool);
    let repo = Repository::new(store.clone());

    step(
        2,
        "A user registers and edits their profile (aggregate + repository)",
    );
    let user = Uuid::now_v7();
    repo.execute::<UserProfile>(
        user,
        ProfileCommand::Register {
            email: "ada@example.com".into(),
            name: "Ada".into(),
        },
    )
    .await?;
    repo.execute::<UserProfile>(
        user,
        ProfileCommand::ChangeEmail {
            email: "ada@lovelace.dev".into(),
        },
    )
    .await?;
    let version = repo
        .execute::<UserProfile>(
            user,
            ProfileCommand::Rename {
                name: "Ada Lovelace".into(),
            },
        )
        .await?;
    println!("user {user} is at version {version}; its stream:");
    print_events(
        &store.read_stream(user, 1, None).await?,
        OutputFormat::Table,
    );

    step(
        3,
        "Two writers decide on version 3 at once: optimistic concurrency",
    );
    let a = store.append(
        user,
        UserProfile::TYPE,
        ExpectedVersion::Exact(3),
        vec![NewEvent::new("NameChanged", json!({ "name": "A. L." }))],
    );
    let b = store.append(
        user,
        UserProfile::TYPE,
        ExpectedVersion::Exact(3),
        vec![NewEvent::new("NameChanged", json!({ "name": "Countess" }))],
    );
    let (a, b) = tokio::join!(a, b);
    for (who, result) in [("writer A", a), ("writer B", b)] {
        match result {
            Ok(out) => println!("{who}: appended, aggregate now at version {}", out.version),
            Err(Error::Conflict {
                expected, actual, ..
            }) => println!(
                "{who}: conflict (expected {expected}, actual {actual}) -> reload, decide again, retry (CLI exit code 3)"
            ),
            Err(e) => return Err(e.into()),
        }
    }

    step(4, "A retried append with the same event id is idempotent");
    let event = NewEvent::new("NameChanged", json!({ "name": "Ada" }));
    let first = store
        .append(
            user,
            UserProfile::TYPE,
            ExpectedVersion::Any,
            vec![event.clone()],
        )
        .await?;
    let retry = store
        .append(user, UserProfile::TYPE, ExpectedVersion::Any, vec![event])
        .await?;
    println!(
        "first: version {} appended={}; retry: version {} appended={} (nothing written twice)",
        first.version, first.appended, retry.version, retry.appended
    );

    step(5, "Time travel: the profile as of version 1, and now");
    let (then, _) = repo.load_at_version::<UserProfile>(user, 1).await?;
    let (now, v) = repo.load::<UserProfile>(user).await?;
    print_record(
        &json!({ "as of version 1": then, format!("now (version {v})"): now }),
        OutputFormat::Table,
    );

    step(
        6,
        "Bad input is refused with the field named, and nothing is stored",
    );
    let bad = store
        .append(
            user,
            UserProfile::TYPE,
            ExpectedVersion::Any,
            vec![NewEvent::new("Oops", json!(["not", "an", "object"]))],
        )
        .await;
    if let Err(e) = bad {
        println!("refused: {e}");
    }

    step(7, "The global feed: gap-safe order, resumable checkpoint");
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
    println!(
        "{total} events in the feed; resume after checkpoint {after} (`chronicle read all --after {after}`)"
    );

    step(8, "Status");
    let status = store.status().await?;
    let mut value = serde_json::to_value(&status)?;
    if let Some(head) = status.head {
        value["head"] = json!(head.to_string());
    }
    print_record(&value, OutputFormat::Table);
    println!(
        "\nTry: chronicle read stream {user}    chronicle state {user} --as-of 1    chronicle status"
    );
    Ok(())
}
