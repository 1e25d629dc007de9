//! [`AggregateCache`]: aggregates' state and version kept in process
//! between commands, least recently used evicted first.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::{Aggregate, AggregateId};

/// Which aggregate an entry holds: its Rust type (two aggregate types may
/// share an id) and its id.
type Key = (TypeId, AggregateId);

struct Entry {
    state: Box<dyn Any + Send + Sync>,
    version: u32,
    /// When it was last put or taken: its place in [`Inner::order`].
    tick: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Entries by last use, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
}

/// The state and version of up to `capacity` aggregates, kept after a
/// successful append so that the next command on the same aggregate needs
/// no read ([`crate::Repository::cache`]).
///
/// An entry is *taken* (removed) while a command runs on it and put back
/// only when the command's append succeeded, so two commands in the same
/// process never decide on one entry, and a conflict leaves no entry
/// behind. An entry may still be stale when another process appended to
/// the aggregate; the append's expected version then conflicts and the
/// command is decided again on state read from the store. Clones share
/// the entries.
///
/// ```
/// use chronicle_core::AggregateCache;
///
/// let cache = AggregateCache::new(10_000);
/// assert_eq!(cache.capacity(), 10_000);
/// assert!(cache.is_empty());
/// ```
#[derive(Clone)]
pub struct AggregateCache {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl AggregateCache {
    /// An empty cache that keeps at most `capacity` aggregates (0 keeps
    /// none).
    pub fn new(capacity: usize) -> Self {
        AggregateCache {
            inner: Arc::new(Mutex::new(Inner::default())),
            capacity,
        }
    }

    /// The most aggregates it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many aggregates it holds now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry (after the store was changed behind the
    /// repository's back, e.g. restored from a backup).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.order.clear();
    }

    /// Drops the entry of aggregate `id` of type `A`, if any.
    pub fn invalidate<A: Aggregate + 'static>(&self, id: AggregateId) {
        self.take::<A>(id);
    }

    /// Removes and returns the entry of aggregate `id` of type `A`: its
    /// state and version.
    pub(crate) fn take<A: Aggregate + 'static>(&self, id: AggregateId) -> Option<(A, u32)> {
        let mut inner = self.lock();
        let entry = inner.entries.remove(&(TypeId::of::<A>(), id))?;
        inner.order.remove(&entry.tick);
        let state = entry
            .state
            .downcast::<A>()
            .expect("entries are keyed by their type");
        Some((*state, entry.version))
    }

    /// Keeps `state` at `version` for aggregate `id`, evicting the least
    /// recently used entry when full. An entry already there at a higher
    /// version (put by a command that ran on it concurrently and appended
    /// after this one) stays.
    pub(crate) fn put<A: Aggregate + 'static>(&self, id: AggregateId, state: A, version: u32) {
        if self.capacity == 0 {
            return;
        }
        let key = (TypeId::of::<A>(), id);
        let mut inner = self.lock();
        if let Some(old) = inner.entries.get(&key) {
            if old.version >= version {
                return;
            }
            let tick = old.tick;
            inner.order.remove(&tick);
            inner.entries.remove(&key);
        }
        while inner.entries.len() >= self.capacity {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.entries.remove(&oldest);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key);
        inner.entries.insert(
            key,
            Entry {
                state: Box::new(state),
                version,
                tick,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // An entry is replaced whole under the lock, so a panic elsewhere
        // cannot leave one half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DomainEvent;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    enum Ev {
        Set { to: i64 },
    }
    impl DomainEvent for Ev {}

    #[derive(Debug, Default, PartialEq)]
    struct Cell(i64);
    impl Aggregate for Cell {
        const TYPE: &'static str = "cell";
        type Event = Ev;
        type Command = i64;
        type Error = std::convert::Infallible;
        fn apply(&mut self, Ev::Set { to }: Ev) {
            self.0 = to;
        }
        fn handle(&self, to: i64) -> Result<Vec<Ev>, Self::Error> {
            Ok(vec![Ev::Set { to }])
        }
    }

    #[derive(Debug, Default, PartialEq)]
    struct Other(i64);
    impl Aggregate for Other {
        const TYPE: &'static str = "other";
        type Event = Ev;
        type Command = i64;
        type Error = std::convert::Infallible;
        fn apply(&mut self, Ev::Set { to }: Ev) {
            self.0 = to;
        }
        fn handle(&self, to: i64) -> Result<Vec<Ev>, Self::Error> {
            Ok(vec![Ev::Set { to }])
        }
    }

    fn id(n: u128) -> AggregateId {
        AggregateId::from_u128(n)
    }

    #[test]
    fn take_removes_the_entry() {
        let cache = AggregateCache::new(4);
        cache.put(id(1), Cell(7), 3);
        assert_eq!(cache.take::<Cell>(id(1)), Some((Cell(7), 3)));
        assert_eq!(cache.take::<Cell>(id(1)), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_first() {
        let cache = AggregateCache::new(2);
        cache.put(id(1), Cell(1), 1);
        cache.put(id(2), Cell(2), 1);
        // Using 1 (taken and put back a version later) makes 2 the oldest.
        let (state, v) = cache.take::<Cell>(id(1)).unwrap();
        cache.put(id(1), state, v + 1);
        cache.put(id(3), Cell(3), 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.take::<Cell>(id(2)), None, "2 was evicted");
        assert_eq!(cache.take::<Cell>(id(1)), Some((Cell(1), 2)));
        assert_eq!(cache.take::<Cell>(id(3)), Some((Cell(3), 1)));
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let cache = AggregateCache::new(2);
        cache.put(id(1), Cell(2), 2);
        cache.put(id(1), Cell(1), 1);
        assert_eq!(cache.take::<Cell>(id(1)), Some((Cell(2), 2)));
        cache.put(id(1), Cell(1), 1);
        cache.put(id(1), Cell(5), 5);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.take::<Cell>(id(1)), Some((Cell(5), 5)));
    }

    #[test]
    fn aggregate_types_sharing_an_id_are_kept_apart() {
        let cache = AggregateCache::new(4);
        cache.put(id(1), Cell(1), 1);
        cache.put(id(1), Other(2), 4);
        assert_eq!(cache.take::<Other>(id(1)), Some((Other(2), 4)));
        assert_eq!(cache.take::<Cell>(id(1)), Some((Cell(1), 1)));
    }

    #[test]
    fn capacity_zero_keeps_nothing_and_invalidate_and_clear_drop() {
        let none = AggregateCache::new(0);
        none.put(id(1), Cell(1), 1);
        assert!(none.is_empty());

        let cache = AggregateCache::new(4);
        cache.put(id(1), Cell(1), 1);
        cache.put(id(2), Cell(2), 1);
        cache.invalidate::<Cell>(id(1));
        assert_eq!(cache.take::<Cell>(id(1)), None);
        let shared = cache.clone();
        cache.clear();
        assert!(shared.is_empty(), "clones share the entries");
    }
}
