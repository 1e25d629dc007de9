//! The exclusive lock on a cluster folder, so that concurrent processes
//! never race to initialise, start, stop or wipe the same cluster.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{EmbeddedError, Result};
use crate::layout::{self, LOCK};

/// How long to wait for another process's lock: more than an initdb plus
/// a start that takes its whole timeout.
pub(crate) const LOCK_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(20);

/// Held while the lock is; released when dropped (or when the process
/// dies: it is an `flock`).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// Takes the lock of the cluster in `root`, waiting up to `timeout`. With
/// `create`, makes the folder first (and again if a reset removed it while
/// this process waited); without, returns `None` when there is no folder.
pub(crate) fn acquire(root: &Path, create: bool, timeout: Duration) -> Result<Option<DirLock>> {
    let path = root.join(LOCK);
    let started = Instant::now();
    loop {
        if create {
            layout::create_dirs(root)?;
        }
        let file = match open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(EmbeddedError::io("open the lock file", &path, e)),
        };
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if started.elapsed() < timeout => thread::sleep(POLL),
                Err(TryLockError::WouldBlock) => {
                    return Err(EmbeddedError::LockTimeout {
                        path,
                        waited: started.elapsed(),
                    });
                }
                Err(TryLockError::Error(e)) => return Err(EmbeddedError::io("lock", &path, e)),
            }
        }
        // A reset deletes the lock file while holding it; whoever waited on
        // the deleted file must lock the current one instead.
        if still_linked(&file, &path) {
            return Ok(Some(DirLock { _file: file }));
        }
    }
}

/// Takes the lock if it is free right now.
pub(crate) fn try_acquire(root: &Path) -> Option<DirLock> {
    let path = root.join(LOCK);
    let file = open(&path).ok()?;
    file.try_lock().ok()?;
    still_linked(&file, &path).then_some(DirLock { _file: file })
}

fn open(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        // flock works on a read-only descriptor too (a lock file made by root).
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => File::open(path),
        other => other,
    }
}

fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_other_holders_and_survives_deletion() {
        let dir = std::env::temp_dir().join(format!("chronicle-lock-test-{}", std::process::id()));
        let held = acquire(&dir, true, LOCK_TIMEOUT).unwrap().unwrap();
        assert!(try_acquire(&dir).is_none());
        let err = acquire(&dir, true, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("fuser -v"), "{err}");
        // Delete the lock file while held: a waiter gets the new file.
        fs::remove_file(dir.join(LOCK)).unwrap();
        let again = acquire(&dir, true, Duration::from_secs(1))
            .unwrap()
            .unwrap();
        drop(held);
        drop(again);
        assert!(try_acquire(&dir).is_some());
        fs::remove_dir_all(&dir).unwrap();
        assert!(acquire(&dir, false, LOCK_TIMEOUT).unwrap().is_none());
    }
}
