//! [`GroupCommitAuditSink`]: concurrent callers' audit batches merged into
//! one append of the sink underneath.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::audit::{AuditEntry, AuditSink};
use crate::{Error, Result};

#[derive(Default)]
struct Queue {
    /// Entries waiting for the next flush.
    entries: Vec<AuditEntry>,
    /// Callers whose entries are in `entries`.
    waiting: usize,
    /// The generation `entries` will be flushed as.
    generation: u64,
    /// Appends of the sink underneath in progress.
    in_flight: usize,
    /// Outcomes of flushed generations that callers have yet to collect:
    /// (callers left, outcome).
    done: HashMap<u64, (usize, std::result::Result<(), String>)>,
}

/// Outcomes older than this many generations are dropped (their callers
/// were cancelled before collecting them).
const KEEP_OUTCOMES: u64 = 1024;

/// An [`AuditSink`] that merges the batches of concurrent callers into one
/// append of the sink underneath (group commit), so that many concurrent
/// decrypting reads share a few database transactions instead of one each.
///
/// Up to `max_in_flight` appends of the sink underneath run at once (1 by
/// default; [`GroupCommitAuditSink::with_max_in_flight`]). While they run,
/// new batches queue up; the next caller to find a free slot appends
/// everything queued, in arrival order, as one batch. Every caller's
/// [`AuditSink::append`] returns only after the append that holds its
/// entries has returned, with its outcome: a read is never acknowledged
/// before its audit records are stored, and if the append fails, every
/// caller in it fails (and releases no plaintext). If the task doing an
/// append is cancelled, the other callers of that batch get
/// [`Error::Audit`] rather than waiting forever.
///
/// With one append at a time, a batch waits for the one before it, and
/// batches grow with the wait. Where every append waits for a disk flush
/// (the PostgreSQL sink's commits do), that is the better trade: with 16
/// readers, ~6 records share each commit. A few in flight suit a sink whose
/// appends are cheap and run well side by side.
///
/// ```
/// use std::sync::Arc;
/// use chronicle_crypto::{
///     AccessContext, AuditEntry, AuditOperation, AuditOutcome, AuditSink, GroupCommitAuditSink,
///     MemoryAuditSink,
/// };
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let memory = Arc::new(MemoryAuditSink::new());
/// let sink = GroupCommitAuditSink::new(memory.clone());
/// let ctx = AccessContext::new("reader", "test");
/// sink.append(vec![AuditEntry::new(AuditOperation::Decrypt, AuditOutcome::Success, &ctx)])
///     .await?;
/// assert_eq!(memory.len(), 1);
/// # Ok::<(), chronicle_crypto::Error>(())
/// # }).unwrap();
/// ```
pub struct GroupCommitAuditSink<S: ?Sized> {
    inner: Arc<S>,
    queue: Mutex<Queue>,
    max_in_flight: usize,
    /// Bumped whenever an append of the sink underneath ends.
    flushed: watch::Sender<u64>,
}

impl<S: ?Sized> fmt::Debug for GroupCommitAuditSink<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommitAuditSink")
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<S: AuditSink + ?Sized> GroupCommitAuditSink<S> {
    /// Merges concurrent appends to `inner`, one append of it at a time.
    pub fn new(inner: Arc<S>) -> Self {
        Self::with_max_in_flight(inner, 1)
    }

    /// Merges concurrent appends to `inner`, with up to `max_in_flight`
    /// appends of it at once (at least 1).
    pub fn with_max_in_flight(inner: Arc<S>, max_in_flight: usize) -> Self {
        GroupCommitAuditSink {
            inner,
            queue: Mutex::new(Queue::default()),
            max_in_flight: max_in_flight.max(1),
            flushed: watch::channel(0).0,
        }
    }

    /// The sink underneath.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Collects a finished generation's outcome for one of its callers.
fn collect(queue: &mut Queue, generation: u64) -> Option<Result<()>> {
    let (left, outcome) = queue.done.get_mut(&generation)?;
    let outcome = outcome.clone();
    *left -= 1;
    if *left == 0 {
        queue.done.remove(&generation);
    }
    Some(outcome.map_err(|message| Error::Audit {
        message: format!("the grouped audit append failed: {message}"),
        source: None,
    }))
}

/// Ends an append of the sink underneath: records its outcome for the
/// other callers of its batch, frees the slot and wakes the waiters, also
/// when the appending task is cancelled.
struct Flush<'a, S: ?Sized> {
    sink: &'a GroupCommitAuditSink<S>,
    generation: u64,
    others: usize,
    outcome: Option<std::result::Result<(), String>>,
}

impl<S: ?Sized> Drop for Flush<'_, S> {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or_else(|| {
            Err("the append holding these records was cancelled; they may not be stored: treat the read as failed and retry it".into())
        });
        {
            let mut queue = self
                .sink
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.in_flight -= 1;
            if self.others > 0 {
                queue.done.insert(self.generation, (self.others, outcome));
                let oldest = self.generation.saturating_sub(KEEP_OUTCOMES);
                queue.done.retain(|g, _| *g >= oldest);
            }
        }
        self.sink.flushed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[async_trait]
impl<S: AuditSink + ?Sized> AuditSink for GroupCommitAuditSink<S> {
    async fn append(&self, entries: Vec<AuditEntry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut flushed = self.flushed.subscribe();
        let generation = {
            let mut queue = self.lock();
            queue.entries.extend(entries);
            queue.waiting += 1;
            queue.generation
        };
        loop {
            let taken = {
                let mut queue = self.lock();
                if let Some(outcome) = collect(&mut queue, generation) {
                    return outcome;
                }
                if queue.generation == generation && queue.in_flight < self.max_in_flight {
                    let batch = std::mem::take(&mut queue.entries);
                    let others = std::mem::take(&mut queue.waiting) - 1;
                    queue.generation += 1;
                    queue.in_flight += 1;
                    Some((batch, others))
                } else if queue.generation > generation + KEEP_OUTCOMES {
                    return Err(Error::Audit {
                        message: "the grouped audit append holding these records ended long ago and its outcome is gone; they may not be stored: treat the read as failed and retry it".into(),
                        source: None,
                    });
                } else {
                    None
                }
            };
            let Some((batch, others)) = taken else {
                // Wait for an append to end: ours, or a free slot.
                if flushed.changed().await.is_err() {
                    return Err(Error::Audit {
                        message: "the grouped audit sink is gone (its store was shut down); retry the read with a store that is running".into(),
                        source: None,
                    });
                }
                continue;
            };
            let mut flush = Flush {
                sink: self,
                generation,
                others,
                outcome: None,
            };
            let result = self.inner.append(batch).await;
            flush.outcome = Some(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            drop(flush);
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::audit::{AccessContext, AuditOperation, AuditOutcome, verify_chain};
    use crate::{MemoryAuditSink, SubjectId};

    /// A memory sink that takes its time and counts its appends.
    struct Slow {
        memory: MemoryAuditSink,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl AuditSink for Slow {
        async fn append(&self, entries: Vec<AuditEntry>) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.memory.append(entries).await
        }
    }

    fn entry(i: usize) -> AuditEntry {
        AuditEntry::new(
            AuditOperation::Decrypt,
            AuditOutcome::Success,
            &AccessContext::new("reader", "test"),
        )
        .with_subject(&SubjectId::new(format!("s{i}")))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_batches_share_appends_and_all_are_stored() {
        let slow = Arc::new(Slow {
            memory: MemoryAuditSink::new(),
            calls: AtomicUsize::new(0),
        });
        let sink = Arc::new(GroupCommitAuditSink::new(slow.clone()));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move { sink.append(vec![entry(i), entry(i)]).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let records = slow.memory.records();
        assert_eq!(records.len(), 40);
        assert!(verify_chain(&records).is_intact());
        // Each caller's entries stay together.
        for pair in records.chunks(2) {
            assert_eq!(pair[0].entry.subject, pair[1].entry.subject);
        }
        let calls = slow.calls.load(Ordering::SeqCst);
        assert!(calls < 20, "{calls} appends for 20 callers");
        assert!(sink.lock().done.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_appends_in_flight_merge_and_overlap() {
        /// Counts the most appends running at once.
        struct Overlapping {
            memory: MemoryAuditSink,
            running: AtomicUsize,
            most: AtomicUsize,
        }

        #[async_trait]
        impl AuditSink for Overlapping {
            async fn append(&self, entries: Vec<AuditEntry>) -> Result<()> {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                self.memory.append(entries).await
            }
        }

        let sink_under = Arc::new(Overlapping {
            memory: MemoryAuditSink::new(),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let sink = Arc::new(GroupCommitAuditSink::with_max_in_flight(
            sink_under.clone(),
            3,
        ));
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i % 7)).await;
                    sink.append(vec![entry(i as usize)]).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let records = sink_under.memory.records();
        assert_eq!(records.len(), 30);
        assert!(verify_chain(&records).is_intact());
        let most = sink_under.most.load(Ordering::SeqCst);
        assert!((2..=3).contains(&most), "{most} appends at once");
        assert!(sink.lock().done.is_empty());
        assert_eq!(sink.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_append_fails_every_caller_in_it() {
        let memory = Arc::new(MemoryAuditSink::new());
        let sink = Arc::new(GroupCommitAuditSink::new(memory.clone()));
        memory.set_failing(true);
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move { sink.append(vec![entry(i)]).await })
            })
            .collect();
        for t in tasks {
            let err = t.await.unwrap().unwrap_err();
            assert!(matches!(err, Error::Audit { .. }), "{err}");
        }
        memory.set_failing(false);
        sink.append(vec![entry(0)]).await.unwrap();
        assert_eq!(memory.len(), 1);
        assert!(sink.append(Vec::new()).await.is_ok());
    }

    #[tokio::test]
    async fn a_cancelled_append_does_not_strand_the_others() {
        let slow = Arc::new(Slow {
            memory: MemoryAuditSink::new(),
            calls: AtomicUsize::new(0),
        });
        let sink = Arc::new(GroupCommitAuditSink::new(slow.clone()));
        // The first caller starts an append and is cancelled mid-way, while
        // a second one queued behind it.
        let first = {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move { sink.append(vec![entry(1)]).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move { sink.append(vec![entry(2)]).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        first.abort();
        // The second caller's entries were queued after the first flush
        // started, so it flushes them itself.
        second.await.unwrap().unwrap();
        assert_eq!(slow.memory.len(), 1);
        sink.append(vec![entry(3)]).await.unwrap();
        assert_eq!(slow.memory.len(), 2);
    }
}
