//! Run with: `cargo run -p user-profile`
//!
//! Registers a user, changes their email, and prints the profile now and as
//! of version 1, on the embedded PostgreSQL default (or `DATABASE_URL`).

use chronicle_core::Repository;
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{MigrateOptions, PgEventStore, PgOptions, migrate};
use user_profile::{ProfileCommand, UserProfile};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => EmbeddedPostgres::start(EmbeddedPostgres::default_dir())?.url(),
    };
    let pool = PgOptions::from_url(&url)?.connect().await?;
    migrate(&pool, MigrateOptions::default()).await?;
    let repo = Repository::new(PgEventStore::new(pool));

    let user = uuid::Uuid::now_v7();
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
    Ok(())
}
