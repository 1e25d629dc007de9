//! Throwaway clusters for tests. Each lives in a fresh folder under the
//! temporary folder and is removed three ways: when its value is dropped;
//! by a watchdog process when the owning process dies without dropping it
//! (a test binary that keeps it in a `static`, or one that is killed); and,
//! should even that fail, by the next [`crate::EmbeddedPostgres::throwaway`]
//! on the machine, which sweeps folders whose owner is dead.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{self, Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::binaries::{self, Binaries};
use crate::error::{EmbeddedError, Result};
use crate::layout::Layout;
use crate::lock;
use crate::server::{self, RunAs, StopMode};
use crate::sys;

/// The name of every throwaway cluster folder starts with this.
pub(crate) const PREFIX: &str = "chronicle-throwaway-";
/// Holds `<pid> <start time in ticks, or ->` of the owning process, for
/// people; the owner holds a shared `flock` on it for the cluster's life,
/// which is what sweepers check (it works across PID namespaces and is
/// immune to process-id reuse, and the kernel drops it when the owner dies).
pub(crate) const OWNER: &str = "owner";
/// An unlocked folder this new may be in the middle of being created.
const YOUNG: Duration = Duration::from_secs(60);

/// What a throwaway [`crate::EmbeddedPostgres`] owns.
#[derive(Debug)]
pub(crate) struct Throwaway {
    pub layout: Layout,
    pub bins: Binaries,
    pub run_as: Option<RunAs>,
    pub watchdog: Option<Child>,
    /// The owner file, share-locked while this value lives.
    pub _owner_lock: File,
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // End of input: the watchdog stops the server and deletes the folder.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        // Whatever the watchdog could not do.
        remove(&self.layout, Some((&self.bins, self.run_as.as_ref())));
    }
}

/// Creates a fresh folder `<parent>/chronicle-throwaway-<pid>-<n>`, takes
/// the owner lock, and gives the folder to the server's user.
pub(crate) fn create_dir(parent: &Path, run_as: Option<&RunAs>) -> Result<(PathBuf, File)> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let pid = process::id();
    loop {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{PREFIX}{pid}-{n}"));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(EmbeddedError::io("create the folder", &path, e)),
        }
        let owner = write_owner(&path, pid, sys::process_start_ticks(pid))?;
        server::give(&path, run_as)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .map_err(|e| EmbeddedError::io("set permissions of", &path, e))?;
        return Ok((path, owner));
    }
}

/// Writes the owner file and takes the owner lock on it.
pub(crate) fn write_owner(dir: &Path, pid: u32, start: Option<u64>) -> Result<File> {
    let start = start.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let path = dir.join(OWNER);
    let write = || -> io::Result<File> {
        let mut file = File::create(&path)?;
        file.lock_shared()?;
        writeln!(file, "{pid} {start}")?;
        Ok(file)
    };
    write().map_err(|e| EmbeddedError::io("write", &path, e))
}

/// Whether the process that created a throwaway folder may still run: it
/// holds the owner lock, or the folder is too new to tell.
fn owner_alive(dir: &Path, metadata: &fs::Metadata) -> bool {
    let young = |m: &fs::Metadata| {
        let age = m.modified().ok().and_then(|t| t.elapsed().ok());
        age.is_none_or(|age| age < YOUNG)
    };
    let Ok(file) = File::open(dir.join(OWNER)) else {
        return young(metadata);
    };
    match file.try_lock() {
        Ok(()) => file.metadata().is_ok_and(|m| young(&m)),
        Err(_) => true,
    }
}

/// Stops the servers of, and deletes, throwaway folders in `parent` whose
/// owner has died. Best effort: what cannot be removed stays.
pub(crate) fn sweep(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let euid = sys::euid();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(metadata) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !metadata.is_dir()
            || (euid != 0 && metadata.uid() != euid)
            || owner_alive(&path, &metadata)
        {
            continue;
        }
        // Not while a start or reset holds the folder.
        let Some(lock) = lock::try_acquire(&path) else {
            continue;
        };
        remove(&Layout::new(path), None);
        drop(lock);
    }
}

/// Stops the server at once (if it runs) and deletes the folder and the
/// socket folder under /tmp, if it has one.
pub(crate) fn remove(layout: &Layout, known: Option<(&Binaries, Option<&RunAs>)>) {
    if server::state(layout).pid().is_some() {
        match known {
            Some((bins, run_as)) => {
                let _ = server::stop(layout, bins, run_as, StopMode::Immediate);
            }
            None => {
                if let (Ok(bins), Ok(run_as)) = (
                    binaries::find(layout.pg_version().as_deref(), &layout.data),
                    server::run_as_for(layout),
                ) {
                    let _ = server::stop(layout, &bins, run_as.as_ref(), StopMode::Immediate);
                }
            }
        }
    }
    if layout.socket_dir_is_outside() {
        let _ = fs::remove_dir_all(&layout.socket_dir);
    }
    let _ = fs::remove_dir_all(&layout.root);
}

/// Starts a process that waits for this one to close its input (on drop,
/// or when this process dies, however it dies), then stops the server and
/// deletes the cluster. It runs in its own process group, so the Ctrl-C
/// that ends a test run does not end it too.
pub(crate) fn spawn_watchdog(
    layout: &Layout,
    bins: &Binaries,
    run_as: Option<&RunAs>,
) -> Option<Child> {
    const SCRIPT: &str = r#"cat >/dev/null 2>&1
"$1" stop -D "$2" -m immediate -w -t 30 >/dev/null 2>&1
rm -rf "$3"
if [ -n "$4" ]; then rm -rf "$4"; fi
"#;
    let outside = if layout.socket_dir_is_outside() {
        layout.socket_dir.as_os_str()
    } else {
        OsStr::new("")
    };
    server::command("/bin/sh", run_as)
        .arg("-c")
        .arg(SCRIPT)
        .arg("chronicle-throwaway-watchdog")
        .arg(bins.pg_ctl())
        .arg(&layout.data)
        .arg(&layout.root)
        .arg(outside)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedPostgres;

    /// A cluster whose creator died without cleaning up is swept by the
    /// next throwaway.
    #[test]
    fn sweeps_clusters_of_dead_owners() {
        let parent = fs::canonicalize(std::env::temp_dir()).unwrap();
        let mut child = process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();

        let dir = parent.join(format!("{PREFIX}sweep-test-{}", process::id()));
        let pg = EmbeddedPostgres::start(&dir).unwrap();
        let server_pid = pg.pid();
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        // Its owner died: nobody holds the owner lock.
        let dead = write_owner(&dir, dead_pid, None).unwrap();
        dead.set_modified(an_hour_ago).unwrap();
        drop(dead);
        // A live owner's folder is left alone, however old.
        let live = parent.join(format!("{PREFIX}live-test-{}", process::id()));
        fs::create_dir(&live).unwrap();
        let owner = write_owner(&live, process::id(), None).unwrap();
        owner.set_modified(an_hour_ago).unwrap();

        let fresh = EmbeddedPostgres::throwaway().unwrap();
        assert!(!dir.exists(), "the dead owner's cluster is swept");
        assert!(live.exists(), "the live owner's folder stays");
        assert!(
            wait_until(|| !sys::process_exists(server_pid)),
            "its server is stopped"
        );
        drop(fresh);
        drop(owner);
        fs::remove_dir_all(&live).unwrap();
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        (0..200).any(|_| {
            f() || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        })
    }
}
