//! Errors of the projection runtime.

use uuid::Uuid;

/// A result whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong running a projection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A query failed.
    #[error("PostgreSQL error in projection runtime: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had (from a pool, or opened by a serverless
    /// invocation).
    #[error("cannot get a database connection: {0}")]
    Pool(String),
    /// The projection is registered with another partition count.
    #[error(
        "projection `{projection}` is registered with {registered} partitions, not {requested}; \
         its partition count is fixed once registered (a rebuild keeps it): ask for {registered}"
    )]
    PartitionMismatch {
        /// The projection.
        projection: String,
        /// The partition count in `projection_state`.
        registered: u32,
        /// The partition count asked for.
        requested: u32,
    },
    /// The projection's read model was built from other events than its
    /// handler (or deployment) now subscribes to.
    #[error(
        "projection `{projection}` was built from {stored}, but its handler now subscribes to \
         {requested}; the read model would miss or keep the events that differ. Rebuild it to \
         take the new subscription: chronicle projections rebuild {projection} (with the --config \
         that sets it, if one does; add --blue-green to keep serving the old model meanwhile)"
    )]
    SubscriptionChanged {
        /// The projection.
        projection: String,
        /// The subscription its read model was built with.
        stored: chronicle_core::Subscription,
        /// The subscription of the handler starting now.
        requested: chronicle_core::Subscription,
    },
    /// A setting is impossible.
    #[error("invalid projection option {option}: {reason}")]
    Config {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The projection has no `projection_state` rows.
    #[error("projection `{0}` is not registered; start it once (or call PgProjection::register)")]
    NotRegistered(String),
    /// The feed handed out an aggregate's events out of version order (an
    /// application appended inside an older transaction that had already
    /// written). The partition is marked failed and nothing of the batch
    /// was committed.
    #[error(
        "projection `{projection}` partition {partition}: aggregate {aggregate_id} version {version} \
         arrived before version {missing} was handled; the partition is stopped (status failed). \
         Append before any other write in a transaction, then resume the projection"
    )]
    OrderViolation {
        /// The projection.
        projection: String,
        /// The partition.
        partition: u32,
        /// The aggregate.
        aggregate_id: Uuid,
        /// The version that arrived.
        version: u32,
        /// The version that should have come first.
        missing: u32,
    },
    /// A handler failed during a rebuild, which stops the rebuild instead of
    /// dead-lettering. Nothing of the batch was committed.
    #[error(
        "rebuild of `{projection}` stopped at event {event_id} (partition {partition}): {reason}; \
         fix the handler and resume the projection"
    )]
    RebuildFailed {
        /// The projection.
        projection: String,
        /// The partition.
        partition: u32,
        /// The event that failed.
        event_id: Uuid,
        /// The handler's error.
        reason: String,
    },
    /// A blue/green rebuild stopped on a failing event before the swap; the
    /// live model and its checkpoints are as they were.
    #[error(
        "the blue/green rebuild of `{projection}` stopped at event {event_id}: {reason}; \
         the live model is unchanged: fix the handler and run the blue/green rebuild again"
    )]
    BlueGreenStopped {
        /// The projection.
        projection: String,
        /// The event that failed.
        event_id: Uuid,
        /// The handler's error.
        reason: String,
    },
    /// The handler's rebuild hook failed; nothing was reset.
    #[error("the rebuild hook of `{projection}` failed: {reason}")]
    RebuildHook {
        /// The projection.
        projection: String,
        /// The handler's error.
        reason: String,
    },
    /// The aggregate has nothing in the dead-letter queue.
    #[error("projection `{projection}` has no dead letters for aggregate {aggregate_id}")]
    NoDeadLetters {
        /// The projection.
        projection: String,
        /// The aggregate.
        aggregate_id: Uuid,
    },
    /// A dead letter refers to an event that is no longer stored.
    #[error("dead letter {event_id} refers to an event that is not in the events table")]
    EventMissing {
        /// The event id.
        event_id: Uuid,
    },
}

#[cfg(feature = "deadpool")]
impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::Postgres(e),
            other => Error::Pool(other.to_string()),
        }
    }
}

/// The database's own message with its SQLSTATE, when there is one, else
/// the error with its source.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            use std::error::Error as _;
            match e.source() {
                Some(src) => format!("{e}: {src}"),
                None => e.to_string(),
            }
        }
    }
}
