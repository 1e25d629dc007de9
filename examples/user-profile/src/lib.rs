//! The user-profile domain: a `UserProfile` aggregate with its commands and
//! events, and the [`projection`] that keeps its read model: a crate to copy
//! and start from. The example binary runs both; the `user-profile-worker`
//! example runs the projection as a Cloudflare Worker.
//!
//! Run with: `cargo run -p user-profile` (uses the embedded PostgreSQL
//! default, or `DATABASE_URL`).
//!
//! ```
//! use chronicle_core::Aggregate;
//! use user_profile::{ProfileCommand, UserProfile};
//!
//! let profile = UserProfile::default();
//! let events = profile
//!     .handle(ProfileCommand::Register { email: "ada@example.com".into(), name: "Ada".into() })
//!     .unwrap();
//! assert_eq!(events.len(), 1);
//! ```
#![deny(missing_docs)]

pub mod projection;

use chronicle_core::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What happens to a user profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProfileEvent {
    /// The user signed up.
    UserRegistered {
        /// Their email address (PII).
        email: String,
        /// Their display name.
        name: String,
    },
    /// The user changed their email address.
    EmailChanged {
        /// The new address (PII).
        email: String,
    },
    /// The user changed their display name.
    NameChanged {
        /// The new name.
        name: String,
    },
    /// The user closed their account.
    AccountClosed {},
}

impl DomainEvent for ProfileEvent {}

impl ProfileEvent {
    /// The stored event type of every variant: what the profile
    /// projection subscribes to.
    pub const TYPES: [&'static str; 4] = [
        "UserRegistered",
        "EmailChanged",
        "NameChanged",
        "AccountClosed",
    ];
}

/// What a user can ask of their profile.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileCommand {
    /// Sign up.
    Register {
        /// Email address.
        email: String,
        /// Display name.
        name: String,
    },
    /// Change the email address.
    ChangeEmail {
        /// The new address.
        email: String,
    },
    /// Change the display name.
    Rename {
        /// The new name.
        name: String,
    },
    /// Close the account.
    Close,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Register on a profile that exists.
    #[error("this user is already registered")]
    AlreadyRegistered,
    /// Any command before Register.
    #[error("no such user; register first")]
    NotRegistered,
    /// Any command after Close.
    #[error("the account is closed")]
    Closed,
    /// An email address without `@`.
    #[error("`{0}` is not an email address")]
    InvalidEmail(String),
}

/// A user's profile, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UserProfile {
    /// Whether the user registered.
    pub registered: bool,
    /// Current email address.
    pub email: String,
    /// Current display name.
    pub name: String,
    /// Whether the account is closed.
    pub closed: bool,
}

impl Aggregate for UserProfile {
    const TYPE: &'static str = "user";
    type Event = ProfileEvent;
    type Command = ProfileCommand;
    type Error = ProfileError;

    fn apply(&mut self, event: ProfileEvent) {
        match event {
            ProfileEvent::UserRegistered { email, name } => {
                self.registered = true;
                self.email = email;
                self.name = name;
            }
            ProfileEvent::EmailChanged { email } => self.email = email,
            ProfileEvent::NameChanged { name } => self.name = name,
            ProfileEvent::AccountClosed {} => self.closed = true,
        }
    }

    fn handle(&self, command: ProfileCommand) -> Result<Vec<ProfileEvent>, ProfileError> {
        let check_email = |email: &str| {
            if email.contains('@') {
                Ok(())
            } else {
                Err(ProfileError::InvalidEmail(email.to_owned()))
            }
        };
        match command {
            ProfileCommand::Register { email, name } => {
                if self.registered {
                    return Err(ProfileError::AlreadyRegistered);
                }
                check_email(&email)?;
                Ok(vec![ProfileEvent::UserRegistered { email, name }])
            }
            _ if !self.registered => Err(ProfileError::NotRegistered),
            _ if self.closed => Err(ProfileError::Closed),
            ProfileCommand::ChangeEmail { email } => {
                check_email(&email)?;
                if email == self.email {
                    return Ok(vec![]);
                }
                Ok(vec![ProfileEvent::EmailChanged { email }])
            }
            ProfileCommand::Rename { name } => Ok(vec![ProfileEvent::NameChanged { name }]),
            ProfileCommand::Close => Ok(vec![ProfileEvent::AccountClosed {}]),
        }
    }
}

#[cfg(test)]
mod tests {
    use chronicle_core::testing::AggregateTest;

    use super::*;

    fn registered() -> ProfileEvent {
        ProfileEvent::UserRegistered {
            email: "ada@example.com".into(),
            name: "Ada".into(),
        }
    }

    #[test]
    fn register_then_rename() {
        AggregateTest::<UserProfile>::given(vec![registered()])
            .when(ProfileCommand::Rename {
                name: "Ada L.".into(),
            })
            .then_expect_events(vec![ProfileEvent::NameChanged {
                name: "Ada L.".into(),
            }]);
    }

    #[test]
    fn cannot_register_twice() {
        AggregateTest::<UserProfile>::given(vec![registered()])
            .when(ProfileCommand::Register {
                email: "b@example.com".into(),
                name: "B".into(),
            })
            .then_expect_error(ProfileError::AlreadyRegistered);
    }

    #[test]
    fn closed_accounts_refuse_changes() {
        AggregateTest::<UserProfile>::given(vec![registered(), ProfileEvent::AccountClosed {}])
            .when(ProfileCommand::ChangeEmail {
                email: "c@example.com".into(),
            })
            .then_expect_error(ProfileError::Closed);
    }

    #[test]
    fn bad_email_is_refused() {
        AggregateTest::<UserProfile>::given_no_previous_events()
            .when(ProfileCommand::Register {
                email: "nope".into(),
                name: "N".into(),
            })
            .then_expect_error(ProfileError::InvalidEmail("nope".into()));
    }

    #[test]
    fn same_email_is_a_no_op() {
        AggregateTest::<UserProfile>::given(vec![registered()])
            .when(ProfileCommand::ChangeEmail {
                email: "ada@example.com".into(),
            })
            .then_expect_events(vec![]);
    }
}
