//! The repository's snapshot path: load the newest snapshot and the events
//! after it, and store a new snapshot after a command without failing it.

use std::sync::Arc;

use crate::snapshot::{Snapshot, SnapshotLoad, SnapshotStore, SnapshotTask, Snapshotting};
use crate::{
    AggregateId, CommandError, DomainEvent, Error, EventStore, ExpectedVersion, Repository,
};

/// Runs snapshot writes off the command's path.
pub(crate) type Spawner = Arc<dyn Fn(SnapshotTask) + Send + Sync>;

/// An aggregate loaded through a snapshot, with what the policy needs.
struct Loaded<A> {
    state: A,
    version: u32,
    /// Events and bytes folded on top of the snapshot used (all of them
    /// without one).
    folded: u32,
    folded_bytes: u64,
}

impl<S: EventStore> Repository<S> {
    /// The upcaster chain's version stamped on snapshots and required of
    /// the snapshots loaded (default 0). Set it from the chain
    /// (`chronicle_upcast::UpcasterChain::snapshot_version`) so that a
    /// changed chain ignores, and replaces, the snapshots folded under the
    /// old one.
    pub fn upcaster_version(&mut self, version: u32) -> &mut Self {
        self.upcaster_version = version;
        self
    }

    /// How snapshot writes are run off the command's path (default: none,
    /// so [`Repository::execute_snapshotted`] writes the snapshot itself
    /// after the append, before it returns). With tokio:
    ///
    /// ```no_run
    /// # fn demo<S: chronicle_core::EventStore>(repo: &mut chronicle_core::Repository<S>) {
    /// # fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(_: F) {}
    /// // repo.spawn_snapshots(|task| { tokio::spawn(task); });
    /// repo.spawn_snapshots(|task| spawn(task));
    /// # }
    /// ```
    ///
    /// Either way a failed snapshot write never fails the command: the
    /// store reports it (`chronicle-postgres` logs a warning) and the next
    /// command that finds the snapshot due tries again.
    pub fn spawn_snapshots(
        &mut self,
        spawner: impl Fn(SnapshotTask) + Send + Sync + 'static,
    ) -> &mut Self {
        self.spawner = Some(Arc::new(spawner));
        self
    }
}

impl<S: SnapshotStore> Repository<S> {
    /// The aggregate's current state and version, from its newest usable
    /// snapshot and the events after it (one store call). A snapshot of
    /// another [`Snapshotting::SNAPSHOT_VERSION`] or upcaster version is
    /// ignored; one that no longer deserializes is ignored too, and the
    /// aggregate is folded from its first event. Loading never writes a
    /// snapshot.
    ///
    /// ```no_run
    /// # use chronicle_core::{Repository, SnapshotStore, Snapshotting};
    /// # async fn demo<S: SnapshotStore + Clone + 'static, A: Snapshotting + 'static>(
    /// #     repo: Repository<S>, id: uuid::Uuid, cmd: A::Command,
    /// # ) where A::Command: Clone {
    /// let version = repo.execute_snapshotted::<A>(id, cmd).await.unwrap();
    /// let (state, v) = repo.load_snapshotted::<A>(id).await.unwrap();
    /// assert_eq!(v, version);
    /// # }
    /// ```
    pub async fn load_snapshotted<A: Snapshotting>(
        &self,
        id: AggregateId,
    ) -> Result<(A, u32), Error> {
        let loaded = self.load_through_snapshot::<A>(id).await?;
        Ok((loaded.state, loaded.version))
    }

    async fn load_through_snapshot<A: Snapshotting>(
        &self,
        id: AggregateId,
    ) -> Result<Loaded<A>, Error> {
        let SnapshotLoad {
            snapshot,
            tail,
            tail_bytes,
        } = self
            .store
            .load_snapshot(id, A::TYPE, A::SNAPSHOT_VERSION, self.upcaster_version)
            .await?;
        let (mut state, mut version, tail, tail_bytes) = match snapshot {
            Some(s) => match serde_json::from_value::<A>(s.state) {
                Ok(state) => (state, s.version, tail, tail_bytes),
                // The state's shape changed without a new SNAPSHOT_VERSION:
                // fold from the start; the next due command replaces it.
                Err(_) => {
                    let all = self.store.read_stream(id, 1, None).await?;
                    let bytes = all.iter().map(data_bytes).sum();
                    (A::default(), 0, all, bytes)
                }
            },
            None => (A::default(), 0, tail, tail_bytes),
        };
        let folded = u32::try_from(tail.len()).unwrap_or(u32::MAX);
        for stored in tail {
            state.apply(A::Event::from_stored(
                &stored.event_type,
                &stored.event_data,
            )?);
            version = stored.version;
        }
        Ok(Loaded {
            state,
            version,
            folded,
            folded_bytes: tail_bytes,
        })
    }

    /// [`Repository::execute`] through snapshots: loads with
    /// [`Repository::load_snapshotted`], decides, appends, and on a
    /// conflict reloads and decides again. When the aggregate's
    /// [`Snapshotting::snapshot_policy`] finds a snapshot due after the
    /// append, the new state is serialized and stored by the spawner
    /// ([`Repository::spawn_snapshots`]) or, without one, here after the
    /// append; a failed snapshot write never fails the command.
    pub async fn execute_snapshotted<A: Snapshotting>(
        &self,
        id: AggregateId,
        command: A::Command,
    ) -> Result<u32, CommandError<A::Error>>
    where
        A::Command: Clone,
        S: Clone + 'static,
    {
        let mut attempt = 0;
        loop {
            let Loaded {
                mut state,
                version,
                folded,
                folded_bytes,
            } = self.load_through_snapshot::<A>(id).await?;
            let events = state
                .handle(command.clone())
                .map_err(CommandError::Domain)?;
            if events.is_empty() {
                return Ok(version);
            }
            let new_events = self.to_new_events::<A>(&events)?;
            let new_bytes: u64 = new_events.iter().map(|e| json_len(&e.data)).sum::<u64>();
            let count = u32::try_from(new_events.len()).unwrap_or(u32::MAX);
            let expected = ExpectedVersion::after(version);
            match self.store.append(id, A::TYPE, expected, new_events).await {
                Ok(outcome) => {
                    if outcome.appended
                        && A::snapshot_policy()
                            .is_due(folded.saturating_add(count), folded_bytes + new_bytes)
                    {
                        for event in events {
                            state.apply(event);
                        }
                        self.store_snapshot(id, &state, outcome.version).await;
                    }
                    return Ok(outcome.version);
                }
                Err(e) if e.is_conflict() && attempt < self.max_retries => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Folds the aggregate from its first event and stores a snapshot of
    /// it now, replacing any other; returns the snapshot's version (0, and
    /// nothing stored, for an aggregate without events). For tools that
    /// rebuild snapshots, e.g. after `chronicle snapshots drop`.
    pub async fn rebuild_snapshot<A: Snapshotting>(&self, id: AggregateId) -> Result<u32, Error> {
        let events = self.store.read_stream(id, 1, None).await?;
        let (state, version) = A::fold(&events)?;
        if version == 0 {
            return Ok(0);
        }
        let snapshot = self.snapshot_of(id, &state, version)?;
        self.store.save_snapshot(&snapshot).await?;
        Ok(version)
    }

    fn snapshot_of<A: Snapshotting>(
        &self,
        id: AggregateId,
        state: &A,
        version: u32,
    ) -> Result<Snapshot, Error> {
        let state = serde_json::to_value(state).map_err(|e| {
            Error::Decode(crate::DecodeError {
                event_type: format!("{} snapshot", A::TYPE),
                reason: format!("the state does not serialize: {e}"),
            })
        })?;
        Ok(Snapshot {
            aggregate_id: id,
            aggregate_type: A::TYPE.to_owned(),
            version,
            schema_version: A::SNAPSHOT_VERSION,
            upcaster_version: self.upcaster_version,
            state,
            created_at: None,
        })
    }

    /// Stores a snapshot on the spawner, or here; never fails.
    async fn store_snapshot<A: Snapshotting>(&self, id: AggregateId, state: &A, version: u32)
    where
        S: Clone + 'static,
    {
        // A state that does not serialize gets no snapshot; loads fold it.
        let Ok(snapshot) = self.snapshot_of(id, state, version) else {
            return;
        };
        match &self.spawner {
            Some(spawn) => {
                let store = self.store.clone();
                spawn(Box::pin(async move {
                    let _ = store.save_snapshot(&snapshot).await;
                }));
            }
            None => {
                let _ = self.store.save_snapshot(&snapshot).await;
            }
        }
    }
}

fn json_len(value: &serde_json::Value) -> u64 {
    serde_json::to_string(value).map_or(0, |s| s.len() as u64)
}

fn data_bytes(event: &crate::EventEnvelope) -> u64 {
    json_len(&event.event_data)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{
        Aggregate, AppendOutcome, EventAppender, EventEnvelope, EventReader, FeedBatch, Metadata,
        NewEvent, Position, SnapshotPolicy, TimeRange,
    };

    #[derive(Debug, Clone, Serialize, Deserialize)]
    enum Ev {
        Added { by: i64 },
    }
    impl DomainEvent for Ev {}

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Sum {
        total: i64,
        applied: u32,
    }

    impl Aggregate for Sum {
        const TYPE: &'static str = "sum";
        type Event = Ev;
        type Command = i64;
        type Error = Refused;
        fn apply(&mut self, Ev::Added { by }: Ev) {
            self.total += by;
            self.applied += 1;
        }
        fn handle(&self, by: i64) -> Result<Vec<Ev>, Refused> {
            Ok(vec![Ev::Added { by }])
        }
    }

    impl Snapshotting for Sum {
        const SNAPSHOT_VERSION: u32 = 3;
        fn snapshot_policy() -> SnapshotPolicy {
            SnapshotPolicy::EveryEvents(4)
        }
    }

    /// Events and snapshots in memory; counts snapshot writes and can fail
    /// them.
    #[derive(Default, Clone)]
    struct Mem {
        events: Arc<Mutex<Vec<EventEnvelope>>>,
        snapshot: Arc<Mutex<Option<Snapshot>>>,
        saves: Arc<Mutex<u32>>,
        fail_saves: bool,
    }

    #[async_trait]
    impl EventAppender for Mem {
        async fn append(
            &self,
            aggregate_id: AggregateId,
            aggregate_type: &str,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> crate::Result<AppendOutcome> {
            let mut stored = self.events.lock().unwrap();
            let actual = stored.len() as u32;
            if expected.as_option().is_some_and(|v| v != actual) {
                return Err(Error::Conflict {
                    aggregate_id,
                    expected,
                    actual,
                });
            }
            for e in events {
                let version = stored.len() as u32 + 1;
                stored.push(EventEnvelope {
                    event_id: e.event_id,
                    aggregate_id,
                    aggregate_type: aggregate_type.to_owned(),
                    event_type: e.event_type,
                    event_data: e.data,
                    metadata: Metadata::default(),
                    version,
                    timestamp: DateTime::<Utc>::UNIX_EPOCH,
                    encrypted_fields: Vec::new(),
                    position: Position::START,
                });
            }
            Ok(AppendOutcome {
                version: stored.len() as u32,
                appended: true,
            })
        }
    }

    /// What the test store answers for reads the snapshot tests never make.
    fn streams_only() -> Error {
        Error::Backend {
            message: "the test store reads whole streams only".into(),
            source: None,
        }
    }

    #[async_trait]
    impl EventReader for Mem {
        async fn read_stream(
            &self,
            _: AggregateId,
            from: u32,
            to: Option<u32>,
        ) -> crate::Result<Vec<EventEnvelope>> {
            let events = self.events.lock().unwrap();
            Ok(events
                .iter()
                .filter(|e| e.version >= from && to.is_none_or(|t| e.version <= t))
                .cloned()
                .collect())
        }
        async fn read_stream_as_of(
            &self,
            _: AggregateId,
            _: DateTime<Utc>,
        ) -> crate::Result<Vec<EventEnvelope>> {
            Err(streams_only())
        }
        async fn read_all(&self, _: Position, _: usize) -> crate::Result<FeedBatch> {
            Err(streams_only())
        }
        async fn read_by_type(
            &self,
            _: &str,
            _: TimeRange,
            _: usize,
        ) -> crate::Result<Vec<EventEnvelope>> {
            Err(streams_only())
        }
    }

    #[async_trait]
    impl SnapshotStore for Mem {
        async fn load_snapshot(
            &self,
            id: AggregateId,
            _: &str,
            schema_version: u32,
            upcaster_version: u32,
        ) -> crate::Result<SnapshotLoad> {
            let snapshot = self.snapshot.lock().unwrap().clone().filter(|s| {
                s.schema_version == schema_version && s.upcaster_version == upcaster_version
            });
            let after = snapshot.as_ref().map_or(0, |s| s.version);
            let tail = self.read_stream(id, after + 1, None).await?;
            let tail_bytes = tail.iter().map(data_bytes).sum();
            Ok(SnapshotLoad {
                snapshot,
                tail,
                tail_bytes,
            })
        }
        async fn save_snapshot(&self, snapshot: &Snapshot) -> crate::Result<()> {
            *self.saves.lock().unwrap() += 1;
            if self.fail_saves {
                return Err(Error::Backend {
                    message: "snapshot table is gone".into(),
                    source: None,
                });
            }
            *self.snapshot.lock().unwrap() = Some(snapshot.clone());
            Ok(())
        }
        async fn delete_snapshots(&self, _: AggregateId) -> crate::Result<u64> {
            Ok(u64::from(self.snapshot.lock().unwrap().take().is_some()))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn snapshots_are_stored_by_policy_and_loads_fold_only_the_tail() {
        block_on(async {
            let repo = Repository::new(Mem::default());
            let id = AggregateId::now_v7();
            for i in 1..=9 {
                repo.execute_snapshotted::<Sum>(id, i).await.unwrap();
            }
            // Due at 4 and 8 events.
            assert_eq!(*repo.store().saves.lock().unwrap(), 2);
            let snapshot = repo.store().snapshot.lock().unwrap().clone().unwrap();
            assert_eq!(snapshot.version, 8);
            assert_eq!(snapshot.schema_version, 3);
            assert_eq!(snapshot.state["total"], 36);
            let (sum, version) = repo.load_snapshotted::<Sum>(id).await.unwrap();
            assert_eq!((sum.total, version), (45, 9));
            // Only the tail was folded on top of the snapshot's 8.
            assert_eq!(sum.applied, 9);
            let (full, _) = repo.load::<Sum>(id).await.unwrap();
            assert_eq!(full.total, 45);
        });
    }

    #[test]
    fn snapshots_of_another_upcaster_version_are_ignored_and_replaced() {
        block_on(async {
            let mut repo = Repository::new(Mem::default());
            let id = AggregateId::now_v7();
            for i in 1..=4 {
                repo.execute_snapshotted::<Sum>(id, i).await.unwrap();
            }
            repo.upcaster_version(7);
            let (sum, version) = repo.load_snapshotted::<Sum>(id).await.unwrap();
            assert_eq!((sum.total, version), (10, 4));
            repo.execute_snapshotted::<Sum>(id, 5).await.unwrap();
            let snapshot = repo.store().snapshot.lock().unwrap().clone().unwrap();
            assert_eq!((snapshot.version, snapshot.upcaster_version), (5, 7));
        });
    }

    #[test]
    fn a_state_that_no_longer_deserializes_is_folded_from_the_start() {
        block_on(async {
            let repo = Repository::new(Mem::default());
            let id = AggregateId::now_v7();
            for i in 1..=5 {
                repo.execute_snapshotted::<Sum>(id, i).await.unwrap();
            }
            repo.store()
                .snapshot
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .state = serde_json::json!({ "other": "shape" });
            let (sum, version) = repo.load_snapshotted::<Sum>(id).await.unwrap();
            assert_eq!((sum.total, version, sum.applied), (15, 5, 5));
        });
    }

    #[test]
    fn a_failed_snapshot_write_does_not_fail_the_command() {
        block_on(async {
            let repo = Repository::new(Mem {
                fail_saves: true,
                ..Mem::default()
            });
            let id = AggregateId::now_v7();
            for i in 1..=4 {
                repo.execute_snapshotted::<Sum>(id, i).await.unwrap();
            }
            assert_eq!(*repo.store().saves.lock().unwrap(), 1);
            assert_eq!(repo.load_snapshotted::<Sum>(id).await.unwrap().1, 4);
        });
    }

    #[test]
    fn a_spawner_runs_the_write_off_the_command() {
        block_on(async {
            let tasks: Arc<Mutex<Vec<SnapshotTask>>> = Arc::default();
            let mut repo = Repository::new(Mem::default());
            let queue = tasks.clone();
            repo.spawn_snapshots(move |task| queue.lock().unwrap().push(task));
            let id = AggregateId::now_v7();
            for i in 1..=4 {
                repo.execute_snapshotted::<Sum>(id, i).await.unwrap();
            }
            assert_eq!(*repo.store().saves.lock().unwrap(), 0);
            let pending: Vec<_> = tasks.lock().unwrap().drain(..).collect();
            assert_eq!(pending.len(), 1);
            for task in pending {
                task.await;
            }
            assert_eq!(
                repo.store()
                    .snapshot
                    .lock()
                    .unwrap()
                    .as_ref()
                    .unwrap()
                    .version,
                4
            );
        });
    }
}
