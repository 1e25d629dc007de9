//! Load an aggregate, handle a command, save with the expected version.

use chrono::{DateTime, Utc};

use crate::{
    Aggregate, AggregateId, DomainEvent, Error, EventStore, ExpectedVersion, Metadata, NewEvent,
};

/// Why a command did not produce stored events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command.
    #[error("command refused: {0}")]
    Domain(#[source] E),
    /// The store failed, or the conflict persisted after every retry.
    #[error(transparent)]
    Store(#[from] Error),
}

/// Loads aggregates from an [`EventStore`] and runs commands against them,
/// retrying on concurrency conflicts.
///
/// ```no_run
/// # use chronicle_core::{Aggregate, EventStore, Repository};
/// # async fn demo<S: EventStore, A: Aggregate>(store: S, id: uuid::Uuid, cmd: A::Command)
/// # where A::Command: Clone {
/// let repo = Repository::new(store);
/// let version = repo.execute::<A>(id, cmd).await.unwrap();
/// let (state, v) = repo.load::<A>(id).await.unwrap();
/// assert_eq!(v, version);
/// # }
/// ```
#[derive(Clone)]
pub struct Repository<S> {
    pub(crate) store: S,
    pub(crate) max_retries: u32,
    pub(crate) metadata: Metadata,
    /// Snapshots: the upcaster chain's version and the spawner of writes
    /// (crate::snapshot_repository).
    pub(crate) upcaster_version: u32,
    pub(crate) spawner: Option<crate::snapshot_repository::Spawner>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Repository<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("store", &self.store)
            .field("max_retries", &self.max_retries)
            .field("metadata", &self.metadata)
            .field("upcaster_version", &self.upcaster_version)
            .field("spawns_snapshots", &self.spawner.is_some())
            .finish()
    }
}

impl<S: EventStore> Repository<S> {
    /// A repository over `store` that retries a conflicting command 5 times.
    pub fn new(store: S) -> Self {
        Repository {
            store,
            max_retries: 5,
            metadata: Metadata::default(),
            upcaster_version: 0,
            spawner: None,
        }
    }

    /// How many times a command is retried after a conflict (default 5).
    pub fn max_retries(&mut self, retries: u32) -> &mut Self {
        self.max_retries = retries;
        self
    }

    /// Metadata stamped on every event this repository appends (default:
    /// empty, schema version 1).
    pub fn metadata(&mut self, metadata: Metadata) -> &mut Self {
        self.metadata = metadata;
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The aggregate's current state and version (0 if it has no events).
    pub async fn load<A: Aggregate>(&self, id: AggregateId) -> Result<(A, u32), Error> {
        let events = self.store.read_stream(id, 1, None).await?;
        Ok(A::fold(&events)?)
    }

    /// The aggregate's state as of `version` (its first `version` events).
    pub async fn load_at_version<A: Aggregate>(
        &self,
        id: AggregateId,
        version: u32,
    ) -> Result<(A, u32), Error> {
        let events = self.store.read_stream(id, 1, Some(version)).await?;
        Ok(A::fold(&events)?)
    }

    /// The aggregate's state as of a point in time.
    pub async fn load_at_time<A: Aggregate>(
        &self,
        id: AggregateId,
        at: DateTime<Utc>,
    ) -> Result<(A, u32), Error> {
        let events = self.store.read_stream_as_of(id, at).await?;
        Ok(A::fold(&events)?)
    }

    /// Loads the aggregate, handles `command`, appends the resulting events
    /// with the loaded version as expected version, and on a conflict
    /// reloads and decides again. Returns the version after the append.
    pub async fn execute<A: Aggregate>(
        &self,
        id: AggregateId,
        command: A::Command,
    ) -> Result<u32, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut attempt = 0;
        loop {
            let (state, version) = self.load::<A>(id).await?;
            let events = state
                .handle(command.clone())
                .map_err(CommandError::Domain)?;
            if events.is_empty() {
                return Ok(version);
            }
            let new_events = events
                .iter()
                .map(|e| {
                    let (ty, data) = e.to_stored()?;
                    Ok(NewEvent::new(ty, data).with_metadata(self.metadata.clone()))
                })
                .collect::<Result<Vec<_>, crate::DecodeError>>()
                .map_err(Error::from)?;
            let expected = if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self.store.append(id, A::TYPE, expected, new_events).await {
                Ok(outcome) => return Ok(outcome.version),
                Err(e) if e.is_conflict() && attempt < self.max_retries => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
