//! [`DataKeyStore`]: where wrapped data keys live. The PostgreSQL table
//! belongs to `chronicle-postgres`; [`MemoryDataKeyStore`] serves tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::Result;
use crate::keys::{DataKeyId, KekId, SubjectId, WrappedKey};

/// A data key as persisted: wrapped, never in plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDataKey {
    /// The key's id (the envelopes' `kid`).
    pub id: DataKeyId,
    /// The subject it belongs to.
    pub subject: SubjectId,
    /// The key wrapped under a KEK.
    pub wrapped: WrappedKey,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// The answer to a key lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    /// The key exists.
    Found(StoredDataKey),
    /// The key, or the subject's keys, were destroyed by shredding. Stores
    /// keep a tombstone (key id → subject, no key material) so that readers
    /// can tell "shredded" from "unknown".
    Shredded {
        /// The shredded subject.
        subject: SubjectId,
    },
    /// No such key (for [`DataKeyStore::current`]: the subject has none yet).
    Missing,
}

/// Persistence of wrapped data keys.
///
/// Each subject has zero or more keys, one of which is current (the newest
/// one inserted); new fields are encrypted under the current key, older keys
/// stay for reading. Shredding a subject destroys all its keys and leaves
/// tombstones. Implementations must make every method atomic.
#[async_trait]
pub trait DataKeyStore: Send + Sync {
    /// The subject's current key, [`KeyLookup::Shredded`], or
    /// [`KeyLookup::Missing`] if it has none yet.
    async fn current(&self, subject: &SubjectId) -> Result<KeyLookup>;

    /// The key with this id, its tombstone, or [`KeyLookup::Missing`].
    async fn get(&self, id: DataKeyId) -> Result<KeyLookup>;

    /// [`DataKeyStore::get`] for several ids at once, one answer per id in
    /// any order. Readers call it once per batch of events with the ids
    /// their cache lacks; the default asks [`DataKeyStore::get`] for each,
    /// stores with round trips answer in one.
    async fn get_many(&self, ids: &[DataKeyId]) -> Result<Vec<(DataKeyId, KeyLookup)>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.push((*id, self.get(*id).await?));
        }
        Ok(found)
    }

    /// Stores `key` as its subject's first key, unless the subject already
    /// has a current key or is shredded. Returns the subject's current key
    /// afterwards (another writer's key if it won a race), or
    /// [`KeyLookup::Shredded`].
    async fn insert_first(&self, key: StoredDataKey) -> Result<KeyLookup>;

    /// Stores `key` as its subject's new current key (rotation); earlier
    /// keys stay readable. Returns [`KeyLookup::Found`] with the key, or
    /// [`KeyLookup::Shredded`] (and stores nothing).
    async fn insert_current(&self, key: StoredDataKey) -> Result<KeyLookup>;

    /// Replaces the wrapped form of key `id` (re-wrapping under a new KEK),
    /// only if it is still wrapped under `expected_kek`. Returns whether it
    /// was replaced.
    async fn replace_wrapped(
        &self,
        id: DataKeyId,
        expected_kek: &KekId,
        wrapped: WrappedKey,
    ) -> Result<bool>;

    /// Up to `limit` live keys with ids greater than `after`, in id order:
    /// a resumable scan for re-wrapping and listing.
    async fn list(&self, after: Option<DataKeyId>, limit: usize) -> Result<Vec<StoredDataKey>>;

    /// Destroys every key of the subject, leaving tombstones, and refuses
    /// new keys for it from then on. Returns the ids destroyed (empty if it
    /// had none or was already shredded).
    async fn shred(&self, subject: &SubjectId) -> Result<Vec<DataKeyId>>;
}

#[derive(Default)]
struct MemoryInner {
    keys: BTreeMap<DataKeyId, StoredDataKey>,
    current: HashMap<SubjectId, DataKeyId>,
    tombstones: HashMap<DataKeyId, SubjectId>,
    shredded: HashSet<SubjectId>,
}

/// A [`DataKeyStore`] in memory, for tests and examples.
#[derive(Default)]
pub struct MemoryDataKeyStore {
    inner: Mutex<MemoryInner>,
}

impl MemoryDataKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryDataKeyStore::default()
    }

    /// Every live key, in id order.
    pub fn all(&self) -> Vec<StoredDataKey> {
        self.lock().keys.values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemoryInner {
    fn current(&self, subject: &SubjectId) -> KeyLookup {
        if self.shredded.contains(subject) {
            return KeyLookup::Shredded {
                subject: subject.clone(),
            };
        }
        match self.current.get(subject).and_then(|id| self.keys.get(id)) {
            Some(key) => KeyLookup::Found(key.clone()),
            None => KeyLookup::Missing,
        }
    }
}

#[async_trait]
impl DataKeyStore for MemoryDataKeyStore {
    async fn current(&self, subject: &SubjectId) -> Result<KeyLookup> {
        Ok(self.lock().current(subject))
    }

    async fn get(&self, id: DataKeyId) -> Result<KeyLookup> {
        let inner = self.lock();
        Ok(match (inner.keys.get(&id), inner.tombstones.get(&id)) {
            (Some(key), _) => KeyLookup::Found(key.clone()),
            (None, Some(subject)) => KeyLookup::Shredded {
                subject: subject.clone(),
            },
            (None, None) => KeyLookup::Missing,
        })
    }

    async fn insert_first(&self, key: StoredDataKey) -> Result<KeyLookup> {
        let mut inner = self.lock();
        match inner.current(&key.subject) {
            KeyLookup::Missing => {
                inner.current.insert(key.subject.clone(), key.id);
                inner.keys.insert(key.id, key.clone());
                Ok(KeyLookup::Found(key))
            }
            other => Ok(other),
        }
    }

    async fn insert_current(&self, key: StoredDataKey) -> Result<KeyLookup> {
        let mut inner = self.lock();
        if inner.shredded.contains(&key.subject) {
            return Ok(KeyLookup::Shredded {
                subject: key.subject,
            });
        }
        inner.current.insert(key.subject.clone(), key.id);
        inner.keys.insert(key.id, key.clone());
        Ok(KeyLookup::Found(key))
    }

    async fn replace_wrapped(
        &self,
        id: DataKeyId,
        expected_kek: &KekId,
        wrapped: WrappedKey,
    ) -> Result<bool> {
        let mut inner = self.lock();
        match inner.keys.get_mut(&id) {
            Some(key) if &key.wrapped.kek_id == expected_kek => {
                key.wrapped = wrapped;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(&self, after: Option<DataKeyId>, limit: usize) -> Result<Vec<StoredDataKey>> {
        let inner = self.lock();
        let lower = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        Ok(inner
            .keys
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, k)| k.clone())
            .collect())
    }

    async fn shred(&self, subject: &SubjectId) -> Result<Vec<DataKeyId>> {
        let mut inner = self.lock();
        let ids: Vec<DataKeyId> = inner
            .keys
            .values()
            .filter(|k| &k.subject == subject)
            .map(|k| k.id)
            .collect();
        for id in &ids {
            inner.keys.remove(id);
            inner.tombstones.insert(*id, subject.clone());
        }
        inner.current.remove(subject);
        inner.shredded.insert(subject.clone());
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: &str, kek: &str) -> StoredDataKey {
        StoredDataKey {
            id: DataKeyId::new(),
            subject: SubjectId::new(subject),
            wrapped: WrappedKey {
                kek_id: KekId::new(kek),
                ciphertext: vec![1, 2, 3],
            },
            created_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn first_insert_wins_and_rotation_replaces_current() {
        let store = MemoryDataKeyStore::new();
        let s = SubjectId::new("s");
        assert_eq!(store.current(&s).await.unwrap(), KeyLookup::Missing);
        let a = key("s", "k");
        let b = key("s", "k");
        assert_eq!(
            store.insert_first(a.clone()).await.unwrap(),
            KeyLookup::Found(a.clone())
        );
        assert_eq!(
            store.insert_first(b.clone()).await.unwrap(),
            KeyLookup::Found(a.clone())
        );
        store.insert_current(b.clone()).await.unwrap();
        assert_eq!(
            store.current(&s).await.unwrap(),
            KeyLookup::Found(b.clone())
        );
        assert_eq!(store.get(a.id).await.unwrap(), KeyLookup::Found(a.clone()));

        let page = store.list(None, 1).await.unwrap();
        assert_eq!(page, vec![a.clone()]);
        let page = store.list(Some(a.id), 10).await.unwrap();
        assert_eq!(page, vec![b.clone()]);

        assert!(
            !store
                .replace_wrapped(a.id, &KekId::new("other"), b.wrapped.clone())
                .await
                .unwrap()
        );
        assert!(
            store
                .replace_wrapped(a.id, &KekId::new("k"), b.wrapped.clone())
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn shredding_leaves_tombstones_and_refuses_new_keys() {
        let store = MemoryDataKeyStore::new();
        let a = key("s", "k");
        store.insert_first(a.clone()).await.unwrap();
        let other = key("t", "k");
        store.insert_first(other.clone()).await.unwrap();
        let s = SubjectId::new("s");
        assert_eq!(store.shred(&s).await.unwrap(), vec![a.id]);
        let shredded = KeyLookup::Shredded { subject: s.clone() };
        assert_eq!(store.get(a.id).await.unwrap(), shredded);
        assert_eq!(store.current(&s).await.unwrap(), shredded);
        assert_eq!(store.insert_first(key("s", "k")).await.unwrap(), shredded);
        assert_eq!(store.insert_current(key("s", "k")).await.unwrap(), shredded);
        assert_eq!(store.all(), vec![other]);
        assert_eq!(
            store.get(DataKeyId::new()).await.unwrap(),
            KeyLookup::Missing
        );
    }
}
