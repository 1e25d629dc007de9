//! Load an aggregate, handle a command, save with the expected version.

use chrono::{DateTime, Utc};

use crate::{
    Aggregate, AggregateCache, AggregateId, DomainEvent, Error, EventStore, ExpectedVersion,
    Metadata, NewEvent,
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
/// With [`Repository::cache`], a service that owns its aggregates keeps
/// their state in process: a command on a cached aggregate decides on the
/// kept state and appends, one round trip instead of a read and an append.
///
/// ```no_run
/// # use chronicle_core::{Aggregate, EventStore, Repository};
/// # async fn demo<S: EventStore, A: Aggregate + 'static>(store: S, id: uuid::Uuid, cmd: A::Command)
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
    pub(crate) cache: Option<AggregateCache>,
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
            .field("cache", &self.cache)
            .field("upcaster_version", &self.upcaster_version)
            .field("spawns_snapshots", &self.spawner.is_some())
            .finish()
    }
}

impl<S: EventStore> Repository<S> {
    /// `events` as the store takes them, with this repository's
    /// metadata.
    pub(crate) fn to_new_events<A: Aggregate>(
        &self,
        events: &[A::Event],
    ) -> Result<Vec<NewEvent>, Error> {
        events
            .iter()
            .map(|e| {
                let (ty, data) = e.to_stored()?;
                Ok(NewEvent::new(ty, data).with_metadata(self.metadata.clone()))
            })
            .collect::<Result<Vec<_>, crate::DecodeError>>()
            .map_err(Error::from)
    }

    /// A repository over `store` that retries a conflicting command 5 times.
    pub fn new(store: S) -> Self {
        Repository {
            store,
            max_retries: 5,
            metadata: Metadata::default(),
            cache: None,
            upcaster_version: 0,
            spawner: None,
        }
    }

    /// Keeps the state and version of up to `capacity` aggregates in
    /// process between commands, least recently used evicted first
    /// (default: none, every command reads its aggregate's events).
    ///
    /// [`Repository::execute`] keeps an aggregate's state after an append
    /// of its that succeeded, and decides the next command on it without
    /// reading the store. A command whose append conflicts (another
    /// process, or a repository without this cache, appended in between)
    /// drops the entry and is decided again on the events read from the
    /// store, so a stale entry costs a retry, never a wrong decision that
    /// gets stored. The kept state is the one a fresh load would give: the
    /// appended events are applied as they read back from their stored
    /// form. Clones of this repository share the cache; calling this again
    /// starts a new, empty one. Clear it ([`AggregateCache::clear`]) when
    /// stored events change without an append, e.g. after a subject's key
    /// is shredded.
    ///
    /// ```no_run
    /// # use chronicle_core::{Aggregate, EventStore, Repository};
    /// # async fn demo<S: EventStore, A: Aggregate + 'static>(store: S, id: uuid::Uuid, cmd: A::Command)
    /// # where A::Command: Clone {
    /// let mut repo = Repository::new(store);
    /// repo.cache(10_000);
    /// repo.execute::<A>(id, cmd.clone()).await.unwrap(); // reads, decides, appends
    /// repo.execute::<A>(id, cmd).await.unwrap(); // decides on the kept state, appends
    /// # }
    /// ```
    pub fn cache(&mut self, capacity: usize) -> &mut Self {
        self.cache = (capacity > 0).then(|| AggregateCache::new(capacity));
        self
    }

    /// The in-process aggregate cache, when [`Repository::cache`] set one.
    pub fn aggregate_cache(&self) -> Option<&AggregateCache> {
        self.cache.as_ref()
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

    /// Loads the aggregate (or takes it from the cache), handles `command`,
    /// appends the resulting events with the loaded version as expected
    /// version, and on a conflict reloads from the store and decides again.
    /// Returns the version after the append.
    pub async fn execute<A: Aggregate + 'static>(
        &self,
        id: AggregateId,
        command: A::Command,
    ) -> Result<u32, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut attempt = 0;
        let mut from_cache = self.cache.is_some();
        loop {
            // Taken out of the cache: a concurrent command on the same
            // aggregate in this process reads the store instead.
            let cached = match &self.cache {
                Some(cache) if from_cache => cache.take::<A>(id),
                _ => None,
            };
            let hit = cached.is_some();
            from_cache = false;
            let (mut state, version) = match cached {
                Some(kept) => kept,
                None => self.load::<A>(id).await?,
            };
            let events = match state.handle(command.clone()) {
                // A refusal, or nothing to do, is answered on the store's
                // state: a kept one may be behind another process's appends.
                Err(_) if hit => continue,
                Ok(events) if hit && events.is_empty() => continue,
                Ok(events) => events,
                Err(e) => {
                    self.keep(id, state, version);
                    return Err(CommandError::Domain(e));
                }
            };
            if events.is_empty() {
                self.keep(id, state, version);
                return Ok(version);
            }
            let new_events = self.to_new_events::<A>(&events)?;
            // What a later load would fold: the events as they read back.
            let replay = match &self.cache {
                Some(_) => new_events
                    .iter()
                    .map(|e| A::Event::from_stored(&e.event_type, &e.data))
                    .collect::<Result<Vec<_>, _>>()
                    .ok(),
                None => None,
            };
            let count = new_events.len() as u32;
            let expected = ExpectedVersion::after(version);
            match self.store.append(id, A::TYPE, expected, new_events).await {
                Ok(outcome) => {
                    // Kept only when exactly these events went in on top
                    // of the state decided on.
                    if let Some(replay) = replay
                        && outcome.appended
                        && outcome.version == version + count
                    {
                        for event in replay {
                            state.apply(event);
                        }
                        self.keep(id, state, outcome.version);
                    }
                    return Ok(outcome.version);
                }
                Err(e) if e.is_conflict() && attempt < self.max_retries => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Puts `state` at `version` back into the cache, if there is one.
    fn keep<A: Aggregate + 'static>(&self, id: AggregateId, state: A, version: u32) {
        if let Some(cache) = &self.cache
            && version > 0
        {
            cache.put(id, state, version);
        }
    }
}
