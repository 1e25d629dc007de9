//! A private PostgreSQL cluster for development and tests, run from the
//! server binaries installed on the machine, reachable on a Unix socket only.
//!
//! With no `DATABASE_URL`, the `chronicle` CLI, the examples and the test
//! suites use this crate instead of asking for a server:
//!
//! - [`EmbeddedPostgres::start`] starts the cluster kept in a folder (by
//!   default [`EmbeddedPostgres::default_dir`], `./.chronicle/postgres`),
//!   creating it with `initdb` on first use, or joins its server if it
//!   already runs. Data persists there between invocations, and
//!   concurrent invocations share one server.
//! - [`EmbeddedPostgres::stop`], [`EmbeddedPostgres::reset`],
//!   [`EmbeddedPostgres::status`] back `chronicle dev stop|reset|status`.
//! - [`EmbeddedPostgres::throwaway`] gives a test run its own fresh
//!   cluster (no fsync), deleted when dropped, so tests never touch the
//!   user's data.
//! - [`EmbeddedError`] says what went wrong and what to do.
//!
//! ```no_run
//! use chronicle_embedded::EmbeddedPostgres;
//!
//! # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
//! let pg = EmbeddedPostgres::start(EmbeddedPostgres::default_dir())?;
//! // e.g. postgresql:///postgres?host=/app/.chronicle/postgres/run&port=41234&user=postgres&sslmode=disable
//! println!("{}", pg.url());
//! # Ok(()) }
//! ```
//!
//! # Environment
//!
//! - `CHRONICLE_HOME`: the cluster folder used by
//!   [`EmbeddedPostgres::default_dir`].
//! - `CHRONICLE_PG_BIN`: the folder holding `initdb`, `pg_ctl` and
//!   `postgres`. Without it: `pg_config --bindir`, then `initdb` on `PATH`,
//!   then the highest version under `/usr/lib/postgresql/*/bin` (and the
//!   Red Hat and Homebrew equivalents). An existing cluster is started with
//!   binaries of the major version that created it.
//! - `CHRONICLE_PG_USER`: the user to run the server as when this process
//!   runs as root (default `postgres`).
//!
//! # The cluster folder
//!
//! `data/` (the PostgreSQL data directory), `run/` (the socket), `postgres.log`,
//! `server.info` (where the server listens, for people and tools), `.lock`.
//! The server listens on no TCP address. When the socket path would exceed
//! the kernel's limit (107 bytes on Linux) the socket goes to
//! `/tmp/chronicle-<hash of the folder path>` instead. The port is derived
//! from the folder path too (20000–59999); it only names the socket file.
//!
//! # Running as root
//!
//! `initdb` and `postgres` refuse to run as root. As root, the programs
//! run as the owner of an existing cluster, else as `postgres` (or
//! `CHRONICLE_PG_USER`), and the folders the server writes to are given to
//! that user. Every folder above the cluster must be searchable by it: a
//! cluster under `/root` is refused with an error that names the folder
//! in the way.
#![deny(missing_docs)]

mod binaries;
mod error;
mod layout;
mod lock;
mod server;
mod sys;
mod throwaway;

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use binaries::PG_BIN_ENV;
pub use error::{EmbeddedError, Result};
pub use server::PG_USER_ENV;

use layout::Layout;
use lock::LOCK_TIMEOUT;
use server::{Endpoint, State, StopMode, Waited};
use throwaway::Throwaway;

/// The environment variable naming the cluster folder of
/// [`EmbeddedPostgres::default_dir`].
pub const HOME_ENV: &str = "CHRONICLE_HOME";

/// A running private PostgreSQL server, and where to reach it.
///
/// A value from [`EmbeddedPostgres::start`] leaves the server running when
/// dropped (the next invocation joins it); one from
/// [`EmbeddedPostgres::throwaway`] stops it and deletes its files.
///
/// ```no_run
/// use chronicle_embedded::EmbeddedPostgres;
///
/// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
/// let pg = EmbeddedPostgres::start("/tmp/my-app-db")?;
/// let status = std::process::Command::new("psql")
///     .arg(pg.url())
///     .args(["-c", "select 1"])
///     .status();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EmbeddedPostgres {
    cluster_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    pid: u32,
    throwaway: Option<Throwaway>,
}

/// What [`EmbeddedPostgres::status`] found in a cluster folder.
///
/// ```no_run
/// use chronicle_embedded::EmbeddedPostgres;
///
/// let status = EmbeddedPostgres::status(EmbeddedPostgres::default_dir());
/// match (&status.pg_version, &status.url) {
///     (None, _) => println!("no cluster yet"),
///     (Some(v), None) => println!("PostgreSQL {v} cluster, stopped"),
///     (Some(v), Some(url)) => println!("PostgreSQL {v} cluster, running: {url}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// The cluster folder, made absolute.
    pub cluster_dir: PathBuf,
    /// The major version that created the cluster; `None` before the first
    /// start.
    pub pg_version: Option<String>,
    /// The server's process id, while a server process runs (even one that
    /// is starting or stopping).
    pub pid: Option<u32>,
    /// The connection URL, while the server accepts connections.
    pub url: Option<String>,
}

impl EmbeddedPostgres {
    /// Starts the cluster whose files live in `dir`, creating it with
    /// `initdb` on first use, or joins its server if one already runs.
    /// Waits until the server accepts connections (up to two minutes).
    ///
    /// Concurrent calls, from threads or processes, share one server: an
    /// exclusive lock on `dir/.lock` covers initialisation and start.
    /// Dropping the value leaves the server running; [`EmbeddedPostgres::stop`]
    /// stops it.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = EmbeddedPostgres::start(EmbeddedPostgres::default_dir())?;
    /// assert_eq!(pg.url(), pg.url_for("postgres"));
    /// # Ok(()) }
    /// ```
    pub fn start(dir: impl AsRef<Path>) -> Result<EmbeddedPostgres> {
        layout::create_dirs(&layout::resolve(dir.as_ref())?)?;
        let layout = Layout::new(layout::resolve(dir.as_ref())?);
        // A running server needs neither the lock nor the binaries.
        if let State::Accepting(endpoint) = server::state(&layout) {
            return Ok(Self::new(&layout, endpoint, None));
        }
        let _lock = lock::acquire(&layout.root, true, LOCK_TIMEOUT)?;
        let (endpoint, _, _) = start_locked(&layout, false)?;
        Ok(Self::new(&layout, endpoint, None))
    }

    /// A fresh cluster in a new folder under the temporary folder
    /// (`std::env::temp_dir()`, so `TMPDIR` moves it), tuned for speed
    /// over durability (`fsync`, `synchronous_commit` and
    /// `full_page_writes` off). Dropping the value stops the server and
    /// deletes the folder; so does a watchdog process if this process dies
    /// first. It also sweeps away throwaway clusters left by processes that
    /// died before either could run.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = EmbeddedPostgres::throwaway()?;
    /// let url = pg.url();
    /// // ... run tests against `url` ...
    /// drop(pg); // the server stops and its files are deleted
    /// # Ok(()) }
    /// ```
    pub fn throwaway() -> Result<EmbeddedPostgres> {
        let parent = layout::resolve(&env::temp_dir())?;
        throwaway::sweep(&parent);
        let run_as = server::default_run_as()?;
        let (root, owner) = throwaway::create_dir(&parent, run_as.as_ref())?;
        let layout = Layout::new(root);
        // The lock is released once the server runs, so that the owner may
        // still `stop` or `reset` the folder; sweepers go by the owner lock.
        let started = lock::acquire(&layout.root, false, LOCK_TIMEOUT).and_then(|_lock| {
            let (endpoint, bins, run_as) = start_locked(&layout, true)?;
            let bins = match bins {
                Some(bins) => bins,
                None => binaries::find(layout.pg_version().as_deref(), &layout.data)?,
            };
            Ok((endpoint, bins, run_as))
        });
        match started {
            Ok((endpoint, bins, run_as)) => {
                let watchdog = throwaway::spawn_watchdog(&layout, &bins, run_as.as_ref());
                let guard = Throwaway {
                    layout: layout.clone(),
                    bins,
                    run_as,
                    watchdog,
                    _owner_lock: owner,
                };
                Ok(Self::new(&layout, endpoint, Some(guard)))
            }
            Err(e) => {
                throwaway::remove(&layout, None);
                Err(e)
            }
        }
    }

    /// The URL of the `postgres` database, for tokio-postgres, libpq
    /// (`psql`) or sqlx: `postgresql:///postgres?host=<socket dir>&port=<port>&user=postgres&sslmode=disable`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// assert!(pg.url().starts_with("postgresql:///postgres?host=/"));
    /// # Ok(()) }
    /// ```
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database of the same server (percent-encoded).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// assert!(pg.url_for("app_test").starts_with("postgresql:///app_test?"));
    /// # Ok(()) }
    /// ```
    pub fn url_for(&self, database: &str) -> String {
        layout::url(&self.socket_dir, self.port, database)
    }

    /// The PostgreSQL data directory (`PGDATA`, `<cluster folder>/data`), as
    /// `pg_ctl -D` wants it.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// assert!(pg.data_dir().join("PG_VERSION").exists());
    /// # Ok(()) }
    /// ```
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The cluster folder given to [`EmbeddedPostgres::start`], made
    /// absolute: what [`EmbeddedPostgres::stop`] and
    /// [`EmbeddedPostgres::reset`] take.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::start(".chronicle/postgres")?;
    /// assert!(pg.cluster_dir().is_absolute());
    /// # Ok(()) }
    /// ```
    pub fn cluster_dir(&self) -> &Path {
        &self.cluster_dir
    }

    /// The folder holding the server's socket (`host` for clients).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// let socket = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    /// assert!(socket.exists());
    /// # Ok(()) }
    /// ```
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's port; with a Unix socket it only names the socket file.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// assert!(pg.port() >= 20000);
    /// # Ok(()) }
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether this is a [`EmbeddedPostgres::throwaway`] cluster, deleted
    /// when the value is dropped.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// assert!(chronicle_embedded::EmbeddedPostgres::throwaway()?.is_throwaway());
    /// # Ok(()) }
    /// ```
    pub fn is_throwaway(&self) -> bool {
        self.throwaway.is_some()
    }

    /// The process id of the server (the postmaster) when it was started or
    /// joined.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// let pg = chronicle_embedded::EmbeddedPostgres::throwaway()?;
    /// println!("server process {}", pg.pid());
    /// # Ok(()) }
    /// ```
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops the server of the cluster in `dir` if it runs (`pg_ctl stop -m
    /// fast`: open transactions roll back; `-m immediate` if that takes over
    /// a minute). Returns whether it was running.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// if EmbeddedPostgres::stop(EmbeddedPostgres::default_dir())? {
    ///     println!("stopped");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stop(dir: impl AsRef<Path>) -> Result<bool> {
        let layout = Layout::new(layout::resolve(dir.as_ref())?);
        if !layout.data.exists() {
            return Ok(false);
        }
        let Some(_lock) = lock::acquire(&layout.root, false, LOCK_TIMEOUT)? else {
            return Ok(false);
        };
        stop_locked(&layout)
    }

    /// Stops the server of the cluster in `dir` and deletes the cluster's
    /// files, and the folder itself unless it holds other files. A folder
    /// that holds other files but none of a cluster is refused
    /// ([`EmbeddedError::NotACluster`]), so a wrong path deletes nothing.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// # fn main() -> Result<(), chronicle_embedded::EmbeddedError> {
    /// EmbeddedPostgres::reset(EmbeddedPostgres::default_dir())?;
    /// assert!(!EmbeddedPostgres::is_running(EmbeddedPostgres::default_dir()));
    /// # Ok(()) }
    /// ```
    pub fn reset(dir: impl AsRef<Path>) -> Result<()> {
        let root = layout::resolve(dir.as_ref())?;
        let entries = match fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(EmbeddedError::io("read the folder", &root, e)),
        };
        let names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        let ours = |n: &OsString| layout::KNOWN.iter().any(|k| n == k);
        if !names.is_empty() && !names.iter().any(ours) {
            let mut found: Vec<String> = names
                .iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            found.sort();
            found.truncate(5);
            return Err(EmbeddedError::NotACluster {
                path: root,
                found: format!("it holds {} and no cluster files", found.join(", ")),
            });
        }
        let layout = Layout::new(root);
        let Some(lock) = lock::acquire(&layout.root, false, LOCK_TIMEOUT)? else {
            return Ok(());
        };
        if layout.data.exists() {
            stop_locked(&layout)?;
        }
        let recorded = layout::recorded_socket_dir(&layout);
        let mut socket_dirs = vec![];
        if layout.socket_dir_is_outside() {
            socket_dirs.push(layout.socket_dir.clone());
        }
        socket_dirs.extend(recorded.filter(|d| {
            d.to_str()
                .is_some_and(|s| s.starts_with("/tmp/chronicle-") && !s.contains(".."))
        }));
        for dir in socket_dirs {
            remove_path(&dir)?;
        }
        for name in layout::KNOWN.iter().filter(|n| **n != layout::LOCK) {
            remove_path(&layout.root.join(name))?;
        }
        remove_path(&layout.lock)?;
        drop(lock);
        // Stays if the user keeps other files there.
        let _ = fs::remove_dir(&layout.root);
        Ok(())
    }

    /// Whether a server runs for the cluster in `dir` and accepts
    /// connections.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// if !EmbeddedPostgres::is_running(EmbeddedPostgres::default_dir()) {
    ///     println!("the development database is stopped");
    /// }
    /// ```
    pub fn is_running(dir: impl AsRef<Path>) -> bool {
        layout::resolve(dir.as_ref())
            .is_ok_and(|root| matches!(server::state(&Layout::new(root)), State::Accepting(_)))
    }

    /// What is in the cluster folder `dir`, and whether its server runs.
    ///
    /// ```no_run
    /// use chronicle_embedded::EmbeddedPostgres;
    ///
    /// let status = EmbeddedPostgres::status(EmbeddedPostgres::default_dir());
    /// println!("{:?} {:?}", status.pg_version, status.url);
    /// ```
    pub fn status(dir: impl AsRef<Path>) -> ClusterStatus {
        let root = layout::resolve(dir.as_ref()).unwrap_or_else(|_| dir.as_ref().to_path_buf());
        let layout = Layout::new(root);
        let state = server::state(&layout);
        ClusterStatus {
            pg_version: layout.pg_version(),
            pid: state.pid(),
            url: match state {
                State::Accepting(e) => Some(layout::url(&e.socket_dir, e.port, "postgres")),
                _ => None,
            },
            cluster_dir: layout.root,
        }
    }

    /// The default cluster folder: `$CHRONICLE_HOME` if set, else
    /// `.chronicle/postgres` in the current folder (made absolute).
    ///
    /// ```
    /// let dir = chronicle_embedded::EmbeddedPostgres::default_dir();
    /// if std::env::var_os("CHRONICLE_HOME").is_none() {
    ///     assert!(dir.ends_with(".chronicle/postgres"));
    /// }
    /// ```
    pub fn default_dir() -> PathBuf {
        match env::var_os(HOME_ENV) {
            Some(home) if !home.is_empty() => PathBuf::from(home),
            _ => {
                let relative = Path::new(".chronicle").join("postgres");
                env::current_dir().map_or(relative.clone(), |cwd| cwd.join(relative))
            }
        }
    }

    fn new(layout: &Layout, endpoint: Endpoint, throwaway: Option<Throwaway>) -> Self {
        EmbeddedPostgres {
            cluster_dir: layout.root.clone(),
            data_dir: layout.data.clone(),
            socket_dir: endpoint.socket_dir,
            port: endpoint.port,
            pid: endpoint.pid,
            throwaway,
        }
    }
}

/// Starts (or joins) the server of a cluster whose lock this process holds.
/// Returns where it listens, the binaries used (none when it joined a
/// running server), and the user the server runs as.
fn start_locked(
    layout: &Layout,
    fast: bool,
) -> Result<(Endpoint, Option<binaries::Binaries>, Option<server::RunAs>)> {
    let mut state = server::state(layout);
    if let State::Busy(endpoint) = &state {
        match server::wait_accepting(endpoint, server::START_TIMEOUT) {
            Waited::Accepting => {}
            // It was shutting down: start it again.
            Waited::Exited => {}
            Waited::TimedOut => {
                return Err(server::start_failed(
                    layout,
                    format!(
                        "its server (process {}) has been starting or stopping for over {} s; it may be recovering \
                         after a crash: wait and try again",
                        endpoint.pid,
                        server::START_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        state = server::state(layout);
    }
    let run_as = server::run_as_for(layout)?;
    if let State::Accepting(endpoint) = state {
        return Ok((endpoint, None, run_as));
    }
    let version = layout.pg_version();
    let bins = binaries::find(version.as_deref(), &layout.data)?;
    match state {
        State::Busy(_) | State::Unresponsive(_) => {
            server::stop(layout, &bins, run_as.as_ref(), StopMode::Fast)?;
        }
        State::Stale => server::remove_stale_pid_file(layout)?,
        State::Stopped | State::Accepting(_) => {}
    }
    if version.is_none() {
        if layout.data.exists() && fs::remove_dir(&layout.data).is_err() {
            return Err(EmbeddedError::NotACluster {
                path: layout.data.clone(),
                found: "it is not empty but has no PG_VERSION file".to_owned(),
            });
        }
        server::init(layout, &bins, run_as.as_ref(), fast)?;
    }
    server::prepare(layout, run_as.as_ref())?;
    server::configure(layout, run_as.as_ref(), fast)?;
    let endpoint = server::start(layout, &bins, run_as.as_ref())?;
    let record = format!(
        "# Where the PostgreSQL server of this Chronicle cluster listens; written at each start.\n\
         url={}\nsocket_dir={}\nport={}\npid={}\npg_version={}\npg_bin={}\n",
        layout::url(&endpoint.socket_dir, endpoint.port, "postgres"),
        endpoint.socket_dir.display(),
        endpoint.port,
        endpoint.pid,
        layout.pg_version().unwrap_or_default(),
        bins.dir.display(),
    );
    layout::write_atomic(&layout.record, &record)?;
    Ok((endpoint, Some(bins), run_as))
}

/// Stops the server of a cluster whose lock this process holds.
fn stop_locked(layout: &Layout) -> Result<bool> {
    match server::state(layout) {
        State::Stopped => return Ok(false),
        State::Stale => {
            server::remove_stale_pid_file(layout)?;
            return Ok(false);
        }
        State::Busy(_) | State::Accepting(_) | State::Unresponsive(_) => {}
    }
    let run_as = server::run_as_for(layout)?;
    let bins = binaries::find(layout.pg_version().as_deref(), &layout.data)?;
    server::stop(layout, &bins, run_as.as_ref(), StopMode::Fast)
}

fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(EmbeddedError::io("delete", path, e)),
        _ => Ok(()),
    }
}
