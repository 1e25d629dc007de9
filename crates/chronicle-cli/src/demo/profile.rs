//! The demo's user profiles: the aggregate `chronicle demo` drives through
//! a repository, and `user-profile`, the projection the stock `chronicle`
//! binary carries.
//!
//! `examples/user-profile` writes the same domain out in full as a crate to
//! copy; this is the CLI's own compact version, so that the product does not
//! depend on an example. The two agree on what `chronicle deploy` relies on
//! when it registers the projection with this handler and uploads the
//! example's Worker to run it: the projection's name and subscription, and
//! its read model's schema and table (a test below compares them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use chronicle_core::{
    Aggregate, DomainEvent, EventEnvelope, ProjectionHandler, ProjectionResult, Subscription,
};
use chronicle_projections::PgContext;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;

/// The projection's name.
pub(crate) const PROJECTION: &str = "user-profile";

/// The read model's schema: the handler writes unqualified names, the
/// runtime puts this schema first on the search path, and readers query
/// `user_profile.user_profiles`; a blue/green rebuild swaps it whole.
pub(crate) const READ_MODEL_SCHEMA: &str = "user_profile";

/// The read model's table (unqualified: created in [`READ_MODEL_SCHEMA`]).
pub(crate) const READ_MODEL_DDL: &str = "CREATE TABLE IF NOT EXISTS user_profiles \
    (user_id UUID PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL, \
    closed BOOLEAN NOT NULL DEFAULT false, version INTEGER NOT NULL)";

/// What happens to a profile, stored as `{"email": …, "name": …}` objects
/// under the variant's name as event type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Event {
    UserRegistered { email: String, name: String },
    EmailChanged { email: String },
    NameChanged { name: String },
    AccountClosed {},
}

impl DomainEvent for Event {}

/// Every [`Event`] type: what `user-profile` subscribes to.
const EVENT_TYPES: [&str; 4] = [
    "UserRegistered",
    "EmailChanged",
    "NameChanged",
    "AccountClosed",
];

/// What the demo asks of a profile.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    Register { email: String, name: String },
    ChangeEmail { email: String },
    Rename { name: String },
}

/// Why a [`Command`] was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(&'static str);

/// A user's profile (aggregate type `user`), folded from its events.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Profile {
    registered: bool,
    email: String,
    name: String,
    closed: bool,
}

impl Aggregate for Profile {
    const TYPE: &'static str = "user";
    type Event = Event;
    type Command = Command;
    type Error = Refused;

    fn apply(&mut self, event: Event) {
        match event {
            Event::UserRegistered { email, name } => {
                (self.registered, self.email, self.name) = (true, email, name);
            }
            Event::EmailChanged { email } => self.email = email,
            Event::NameChanged { name } => self.name = name,
            Event::AccountClosed {} => self.closed = true,
        }
    }

    fn handle(&self, command: Command) -> Result<Vec<Event>, Refused> {
        match command {
            Command::Register { .. } if self.registered => {
                Err(Refused("this user is already registered"))
            }
            Command::Register { email, name } => Ok(vec![Event::UserRegistered { email, name }]),
            _ if !self.registered || self.closed => Err(Refused("no open account; register first")),
            Command::ChangeEmail { email } => Ok(vec![Event::EmailChanged { email }]),
            Command::Rename { name } => Ok(vec![Event::NameChanged { name }]),
        }
    }
}

/// `user-profile`: one row per user in `user_profile.user_profiles`.
///
/// An event type it does not know is skipped. An event of a known type
/// that does not decode (say a `NameChanged` whose name is not a string)
/// fails permanently and goes to the dead-letter queue, with that user's
/// later events parked behind it, until [`ProfileProjection::lenient`]
/// stands in for the fixed handler an operator deploys before `dlq retry`.
/// Clones share that switch.
#[derive(Debug, Default, Clone)]
pub(crate) struct ProfileProjection {
    lenient: Arc<AtomicBool>,
}

impl ProfileProjection {
    /// From now on, events that do not decode are skipped instead of
    /// failing, in this value and all its clones.
    pub(crate) fn lenient(&self) {
        self.lenient.store(true, Ordering::SeqCst);
    }
}

/// A registration writes the whole row ($4 is false)...
const REGISTER: &str = "INSERT INTO user_profiles (user_id, email, name, closed, version)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO UPDATE
    SET email = excluded.email, name = excluded.name, version = excluded.version";
/// ...any other event the fields it carries (NULL: unchanged).
const CHANGE: &str = "UPDATE user_profiles SET email = coalesce($2, email),
    name = coalesce($3, name), closed = closed OR $4, version = $5 WHERE user_id = $1";

#[async_trait]
impl ProjectionHandler<PgContext> for ProfileProjection {
    fn name(&self) -> &str {
        PROJECTION
    }

    fn subscription(&self) -> Subscription {
        Subscription::all()
            .with_aggregate_types([Profile::TYPE])
            .with_event_types(EVENT_TYPES)
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut PgContext) -> ProjectionResult {
        if !EVENT_TYPES.contains(&event.event_type.as_str()) {
            return ProjectionResult::Skipped;
        }
        let decoded = match Event::from_stored(&event.event_type, &event.event_data) {
            Ok(decoded) => decoded,
            Err(_) if self.lenient.load(Ordering::SeqCst) => return ProjectionResult::Skipped,
            Err(e) => return ProjectionResult::fail(e),
        };
        let (sql, email, name, closed) = match &decoded {
            Event::UserRegistered { email, name } => (REGISTER, Some(email), Some(name), false),
            Event::EmailChanged { email } => (CHANGE, Some(email), None, false),
            Event::NameChanged { name } => (CHANGE, None, Some(name), false),
            Event::AccountClosed {} => (CHANGE, None, None, true),
        };
        let version = event.version as i32;
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 5] = [
            (&event.aggregate_id, Type::UUID),
            (&email, Type::TEXT),
            (&name, Type::TEXT),
            (&closed, Type::BOOL),
            (&version, Type::INT4),
        ];
        match ctx.client().execute_typed(sql, &params).await {
            Ok(_) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(chronicle_projections::describe(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use user_profile::projection as example;

    use super::*;

    /// `chronicle deploy` registers `user-profile` with this handler and
    /// creates its read model, then uploads the example's Worker, which
    /// runs the example's handler: the two must agree.
    #[test]
    fn the_stock_projection_agrees_with_the_example_whose_worker_deploy_uploads() {
        let ours = ProfileProjection::default();
        let theirs = example::UserProfileProjection::default();
        assert_eq!(ours.name(), theirs.name());
        assert_eq!(ours.subscription(), theirs.subscription());
        assert_eq!(READ_MODEL_SCHEMA, example::READ_MODEL_SCHEMA);
        let tokens = |sql: &str| sql.split_whitespace().collect::<String>();
        assert_eq!(tokens(READ_MODEL_DDL), tokens(example::READ_MODEL_DDL));
    }

    #[test]
    fn commands_before_registration_or_after_closing_are_refused() {
        let rename = || Command::Rename { name: "B".into() };
        assert!(Profile::default().handle(rename()).is_err());
        let mut profile = Profile::default();
        for event in [
            Event::UserRegistered {
                email: "a@example.com".into(),
                name: "A".into(),
            },
            Event::AccountClosed {},
        ] {
            profile.apply(event);
        }
        assert!(profile.handle(rename()).is_err());
    }
}
