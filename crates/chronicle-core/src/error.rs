//! The errors of the store traits.

use uuid::Uuid;

/// A result whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A refused input: which field was wrong and why, phrased for the person who
/// sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Validation {
    /// The offending field, e.g. `aggregate_type` or `events[2].event_data`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

impl Validation {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Validation {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What can go wrong reading or appending events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The aggregate's version was not the one the writer expected. Reload
    /// the aggregate, decide again, and retry.
    #[error(
        "concurrency conflict on aggregate {aggregate_id}: expected version {expected}, actual version is {actual}; reload and retry"
    )]
    Conflict {
        /// The aggregate appended to.
        aggregate_id: Uuid,
        /// What the writer expected.
        expected: crate::ExpectedVersion,
        /// The aggregate's version when the append was tried (0: no events).
        actual: u32,
    },
    /// The input was refused before anything was stored.
    #[error(transparent)]
    Invalid(#[from] Validation),
    /// The event ids were already stored, but not as this exact append
    /// (another aggregate, or only some of them).
    #[error(
        "event id {event_id} is already stored with different content or in another aggregate; use fresh event ids for new events"
    )]
    DuplicateEventId {
        /// The first event id that clashed.
        event_id: Uuid,
    },
    /// Nothing exists at the requested place.
    #[error("{0} not found")]
    NotFound(String),
    /// A stored event could not be decoded into a domain event.
    #[error(transparent)]
    Decode(#[from] crate::DecodeError),
    /// The store's backend failed (connection, SQL, I/O).
    #[error("{message}")]
    Backend {
        /// What failed, with a hint of what to do.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A backend error with a message and its cause.
    pub fn backend(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}
