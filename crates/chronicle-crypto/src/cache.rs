//! A bounded in-memory cache of unwrapped data keys, so that encrypting or
//! decrypting an event does not call the key provider (a KMS) every time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::envelope::LiveKey;
use crate::keys::{DataKeyId, SubjectId};

/// What the cache knows about a key id.
#[derive(Clone)]
pub(crate) enum Cached {
    /// Unwrapped and ready.
    Live(Arc<LiveKey>),
    /// Shredded: permanent, so it never expires.
    Shredded(SubjectId),
}

struct Slot {
    value: Cached,
    loaded: Instant,
    used: u64,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<DataKeyId, Slot>,
    current: HashMap<SubjectId, DataKeyId>,
    tick: u64,
}

/// Least-recently-used eviction in batches of an eighth of the capacity,
/// and a time-to-live for live keys so that a rotation or shredding done by
/// another process is seen within `ttl`.
pub(crate) struct KeyCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl KeyCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        KeyCache {
            capacity,
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh(&self, slot: &Slot, now: Instant) -> bool {
        matches!(slot.value, Cached::Shredded(_)) || now.duration_since(slot.loaded) < self.ttl
    }

    pub(crate) fn get(&self, id: DataKeyId) -> Option<Cached> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if !self.fresh(inner.by_id.get(&id)?, now) {
            inner.by_id.remove(&id);
            return None;
        }
        let slot = inner.by_id.get_mut(&id)?;
        slot.used = tick;
        Some(slot.value.clone())
    }

    pub(crate) fn current(&self, subject: &SubjectId) -> Option<Arc<LiveKey>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let id = *inner.current.get(subject)?;
        let hit = match inner.by_id.get_mut(&id) {
            Some(slot) if self.fresh(slot, now) => {
                slot.used = tick;
                match &slot.value {
                    Cached::Live(key) => Some(Arc::clone(key)),
                    Cached::Shredded(_) => None,
                }
            }
            _ => None,
        };
        if hit.is_none() {
            inner.current.remove(subject);
        }
        hit
    }

    pub(crate) fn insert(&self, key: Arc<LiveKey>, current: bool) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if current {
            inner.current.insert(key.subject.clone(), key.id);
        }
        self.put(&mut inner, key.id, Cached::Live(key));
    }

    pub(crate) fn insert_shredded(&self, id: DataKeyId, subject: SubjectId) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        self.put(&mut inner, id, Cached::Shredded(subject));
    }

    /// Forgets the subject's live keys.
    pub(crate) fn forget(&self, subject: &SubjectId) {
        let mut inner = self.lock();
        Self::forget_locked(&mut inner, subject);
    }

    fn forget_locked(inner: &mut Inner, subject: &SubjectId) {
        inner.current.remove(subject);
        inner
            .by_id
            .retain(|_, slot| !matches!(&slot.value, Cached::Live(k) if &k.subject == subject));
    }

    /// Forgets every live key.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.current.clear();
        inner
            .by_id
            .retain(|_, slot| matches!(slot.value, Cached::Shredded(_)));
    }

    /// Forgets the subject's live keys and remembers `ids` as shredded.
    pub(crate) fn shred(&self, subject: &SubjectId, ids: &[DataKeyId]) {
        let mut inner = self.lock();
        Self::forget_locked(&mut inner, subject);
        if self.capacity > 0 {
            for id in ids {
                self.put(&mut inner, *id, Cached::Shredded(subject.clone()));
            }
        }
    }

    fn put(&self, inner: &mut Inner, id: DataKeyId, value: Cached) {
        if inner.by_id.len() >= self.capacity && !inner.by_id.contains_key(&id) {
            Self::evict(inner, (self.capacity / 8).max(1));
        }
        inner.tick += 1;
        let used = inner.tick;
        inner.by_id.insert(
            id,
            Slot {
                value,
                loaded: Instant::now(),
                used,
            },
        );
    }

    fn evict(inner: &mut Inner, count: usize) {
        let mut ages: Vec<(u64, DataKeyId)> =
            inner.by_id.iter().map(|(id, s)| (s.used, *id)).collect();
        let count = count.min(ages.len());
        ages.select_nth_unstable_by_key(count.saturating_sub(1), |(used, _)| *used);
        for (_, id) in &ages[..count] {
            inner.by_id.remove(id);
        }
        let Inner { by_id, current, .. } = inner;
        current.retain(|_, id| by_id.contains_key(id));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DataKey;

    fn live(subject: &str) -> Arc<LiveKey> {
        Arc::new(LiveKey::new(
            DataKeyId::new(),
            SubjectId::new(subject),
            &DataKey::generate().unwrap(),
        ))
    }

    #[test]
    fn bounded_and_least_recently_used_goes_first() {
        let cache = KeyCache::new(8, Duration::from_secs(60));
        let first = live("first");
        cache.insert(Arc::clone(&first), true);
        for i in 0..7 {
            cache.insert(live(&format!("s{i}")), true);
            // Keep `first` hot.
            assert!(cache.get(first.id).is_some());
        }
        assert_eq!(cache.len(), 8);
        for i in 0..20 {
            cache.insert(live(&format!("t{i}")), true);
            assert!(cache.get(first.id).is_some());
            assert!(cache.len() <= 8);
        }
        assert!(cache.current(&SubjectId::new("first")).is_some());
        assert!(cache.current(&SubjectId::new("s0")).is_none());
    }

    #[test]
    fn ttl_expires_live_keys_but_not_shredded_ones() {
        let cache = KeyCache::new(8, Duration::ZERO);
        let k = live("s");
        cache.insert(Arc::clone(&k), true);
        assert!(cache.get(k.id).is_none());
        assert!(cache.current(&k.subject).is_none());
        cache.insert_shredded(k.id, k.subject.clone());
        assert!(matches!(cache.get(k.id), Some(Cached::Shredded(_))));
    }

    #[test]
    fn shredding_forgets_live_keys() {
        let cache = KeyCache::new(8, Duration::from_secs(60));
        let k = live("s");
        let other = live("o");
        cache.insert(Arc::clone(&k), true);
        cache.insert(Arc::clone(&other), true);
        cache.forget(&other.subject);
        assert!(cache.get(other.id).is_none());
        cache.insert(Arc::clone(&other), true);
        cache.shred(&k.subject, &[k.id]);
        assert!(cache.current(&k.subject).is_none());
        assert!(matches!(cache.get(k.id), Some(Cached::Shredded(_))));
        assert!(matches!(cache.get(other.id), Some(Cached::Live(_))));
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let cache = KeyCache::new(0, Duration::from_secs(60));
        let k = live("s");
        cache.insert(Arc::clone(&k), true);
        assert!(cache.get(k.id).is_none());
    }
}
