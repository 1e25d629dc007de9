//! Run with: `cargo run -p user-profile`
//!
//! Registers a user, changes their email, and prints the profile now and as
//! of version 1; then runs the `user-profile` projection until the user's
//! row in its read model is current, prints the row and stops the
//! projection. On the embedded PostgreSQL default (or `DATABASE_URL`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use chronicle_core::Repository;
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{MigrateOptions, PgEventStore, PgOptions, PgPool, migrate};
use chronicle_projections::{PgProjection, ProjectionOptions, Runner, RunnerOptions};
use tokio_postgres::types::Type;
use user_profile::projection::{READ_MODEL_DDL, READ_MODEL_SCHEMA, UserProfileProjection};
use user_profile::{ProfileCommand, UserProfile};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => EmbeddedPostgres::start(EmbeddedPostgres::default_dir())?.url(),
    };
    let pool = PgOptions::from_url(&url)?.connect().await?;
    migrate(&pool, MigrateOptions::default()).await?;
    let repo = Repository::new(PgEventStore::new(pool.clone()));

    let user = Uuid::now_v7();
    repo.execute::<UserProfile>(
        user,
        ProfileCommand::Register {
            email: "ada@example.com".into(),
            name: "Ada".into(),
        },
    )
    .await?;
    let version = repo
        .execute::<UserProfile>(
            user,
            ProfileCommand::ChangeEmail {
                email: "ada@lovelace.dev".into(),
            },
        )
        .await?;
    let (now, _) = repo.load::<UserProfile>(user).await?;
    let (then, _) = repo.load_at_version::<UserProfile>(user, 1).await?;
    println!("user {user} at version {version}: {now:?}");
    println!("as of version 1: {then:?}");

    let row = project(&pool, user, version).await?;
    println!("its row in user_profile.user_profiles: {row}");
    Ok(())
}

/// Creates the read model, runs the projection until `user`'s row is at
/// `version`, stops it (the runner releases its partitions) and returns
/// the row.
async fn project(pool: &PgPool, user: Uuid, version: u32) -> anyhow::Result<String> {
    pool.get()
        .await?
        .batch_execute(&format!(
            "BEGIN; CREATE SCHEMA IF NOT EXISTS {READ_MODEL_SCHEMA};
             SET LOCAL search_path = {READ_MODEL_SCHEMA}; {READ_MODEL_DDL}; COMMIT"
        ))
        .await?;
    // A projection's partition count is fixed once it has run; 2 is the
    // count `chronicle demo` runs it with on the same embedded database.
    let options = ProjectionOptions {
        partitions: 2,
        ..ProjectionOptions::default()
    };
    let projection = PgProjection::new(pool.clone(), UserProfileProjection::default(), options)?
        .with_read_model_schema(READ_MODEL_SCHEMA)?;
    let runner = Runner::start(Arc::new(projection), RunnerOptions::default()).await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let row = pool
            .get()
            .await?
            .query_typed_opt(
                "SELECT email, name, closed FROM user_profile.user_profiles
                 WHERE user_id = $1 AND version = $2",
                &[(&user, Type::UUID), (&(version as i32), Type::INT4)],
            )
            .await?;
        if let Some(row) = row {
            let (email, name, closed): (String, String, bool) =
                (row.get(0), row.get(1), row.get(2));
            break format!("email {email}, name {name}, closed {closed}, version {version}");
        }
        ensure!(
            Instant::now() < deadline,
            "the projection did not reach version {version} of user {user} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    runner.stop().await;
    Ok(row)
}
