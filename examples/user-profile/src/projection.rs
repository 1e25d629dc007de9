//! The `user-profile` read model: one row per user in
//! `user_profile.user_profiles`, kept by a projection whose writes commit
//! with its checkpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use chronicle_core::{
    Aggregate, DomainEvent, EventEnvelope, ProjectionHandler, ProjectionResult, Subscription,
};
use chronicle_step::PgContext;
use tokio_postgres::types::Type;

use crate::{ProfileEvent, UserProfile};

/// The read model's own schema: the handler writes unqualified names, the
/// runtime puts this schema first on the search path, and readers query
/// `user_profile.user_profiles`; a blue/green rebuild swaps it whole.
pub const READ_MODEL_SCHEMA: &str = "user_profile";

/// The read model's table (unqualified: created in [`READ_MODEL_SCHEMA`]).
pub const READ_MODEL_DDL: &str = "CREATE TABLE IF NOT EXISTS user_profiles (
    user_id UUID PRIMARY KEY,
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    closed BOOLEAN NOT NULL DEFAULT false,
    version INTEGER NOT NULL
)";

/// Projects [`ProfileEvent`]s into `user_profiles`.
///
/// It subscribes to the profile's event types on `user` aggregates, so the
/// runtime reads nothing else of the store. An event type it does not know
/// (a newer producer's, or one a deployment's `subscribe:` adds) is
/// skipped; [`UserProfileProjection::strict`] makes it a permanent failure
/// instead, for a model that must not miss anything.
///
/// Events of a known type that do not decode (a producer bug, say a
/// `NameChanged` whose name is not a string) fail permanently and go to the
/// dead-letter queue, with that user's later events parked behind them,
/// unless the projection is [`UserProfileProjection::lenient`], which
/// stands in for the fixed handler an operator deploys before `dlq retry`.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use chronicle_projections::{PgProjection, ProjectionOptions};
/// use user_profile::projection::{READ_MODEL_DDL, READ_MODEL_SCHEMA, UserProfileProjection};
///
/// pool.get().await?.batch_execute(&format!(
///     "BEGIN; CREATE SCHEMA IF NOT EXISTS {READ_MODEL_SCHEMA};
///      SET LOCAL search_path = {READ_MODEL_SCHEMA}; {READ_MODEL_DDL}; COMMIT"
/// )).await?;
/// let projection = PgProjection::new(pool, UserProfileProjection::default(), ProjectionOptions::default())?
///     .with_read_model_schema(READ_MODEL_SCHEMA)?;
/// projection.register().await?;
/// # Ok(()) }
/// ```
///
/// Clones share the switch, so a caller can keep one to flip after handing
/// the other to the runtime.
#[derive(Debug, Default, Clone)]
pub struct UserProfileProjection {
    lenient: Arc<AtomicBool>,
    strict: bool,
}

impl UserProfileProjection {
    /// A projection that dead-letters an event of a type it does not know
    /// instead of skipping it.
    ///
    /// ```
    /// use user_profile::projection::UserProfileProjection;
    ///
    /// let strict = UserProfileProjection::strict();
    /// // `handle` needs a database transaction; what it would decide is
    /// // visible without one:
    /// assert!(strict.refuses_unknown_types());
    /// assert!(!UserProfileProjection::default().refuses_unknown_types());
    /// ```
    pub fn strict() -> Self {
        UserProfileProjection {
            strict: true,
            ..UserProfileProjection::default()
        }
    }

    /// Whether an unknown event type is a failure ([`Self::strict`]) rather
    /// than skipped.
    pub fn refuses_unknown_types(&self) -> bool {
        self.strict
    }

    /// From now on, events that do not decode are skipped instead of
    /// failing (the "fixed" handler), in this value and all its clones.
    pub fn lenient(&self) {
        self.lenient.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl ProjectionHandler<PgContext> for UserProfileProjection {
    fn name(&self) -> &str {
        "user-profile"
    }

    fn subscription(&self) -> Subscription {
        Subscription::all()
            .with_aggregate_types([UserProfile::TYPE])
            .with_event_types(ProfileEvent::TYPES)
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        if !ProfileEvent::TYPES.contains(&event.event_type.as_str()) {
            return if self.strict {
                ProjectionResult::fail(format!(
                    "the user-profile projection does not know the event type `{}`",
                    event.event_type
                ))
            } else {
                ProjectionResult::Skipped
            };
        }
        let decoded = match ProfileEvent::from_stored(&event.event_type, &event.event_data) {
            Ok(e) => e,
            Err(_) if self.lenient.load(Ordering::SeqCst) => return ProjectionResult::Skipped,
            Err(e) => return ProjectionResult::fail(e),
        };
        let id = event.aggregate_id;
        let version = event.version as i32;
        let (sql, text): (&str, Option<&str>) = match &decoded {
            ProfileEvent::UserRegistered { email, name } => {
                let result = ctx
                    .client()
                    .execute_typed(
                        "INSERT INTO user_profiles (user_id, email, name, version) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name,
                         version = excluded.version",
                        &[(&id, Type::UUID), (email, Type::TEXT), (name, Type::TEXT), (&version, Type::INT4)],
                    )
                    .await;
                return match result {
                    Ok(_) => ProjectionResult::Done,
                    Err(e) => ProjectionResult::retry(chronicle_step::describe(&e)),
                };
            }
            ProfileEvent::EmailChanged { email } => (
                "UPDATE user_profiles SET email = $2, version = $3 WHERE user_id = $1",
                Some(email),
            ),
            ProfileEvent::NameChanged { name } => (
                "UPDATE user_profiles SET name = $2, version = $3 WHERE user_id = $1",
                Some(name),
            ),
            ProfileEvent::AccountClosed {} => (
                "UPDATE user_profiles SET closed = true, version = $3 WHERE user_id = $1 AND $2::text IS NULL",
                None,
            ),
        };
        match ctx
            .client()
            .execute_typed(
                sql,
                &[
                    (&id, Type::UUID),
                    (&text, Type::TEXT),
                    (&version, Type::INT4),
                ],
            )
            .await
        {
            Ok(_) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(chronicle_step::describe(&e)),
        }
    }
}
