//! The errors of the launcher.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A result whose error defaults to [`EmbeddedError`].
pub type Result<T, E = EmbeddedError> = std::result::Result<T, E>;

/// What can go wrong starting, stopping or wiping an embedded cluster.
///
/// Every message says what went wrong and what to do about it, so a command
/// line tool can print it as it is (`{:#}` or `{}`).
///
/// ```no_run
/// use chronicle_embedded::{EmbeddedError, EmbeddedPostgres};
///
/// match EmbeddedPostgres::start(EmbeddedPostgres::default_dir()) {
///     Ok(pg) => println!("{}", pg.url()),
///     Err(e @ EmbeddedError::BinariesNotFound { .. }) => eprintln!("{e}"), // says what to install
///     Err(e) => eprintln!("error: {e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// No folder with `initdb`, `pg_ctl` and `postgres` was found.
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; looked at {searched}. \
         Install the PostgreSQL server (e.g. `apt-get install postgresql`, `dnf install postgresql-server` \
         or `brew install postgresql`), or set CHRONICLE_PG_BIN to the folder that holds initdb and pg_ctl, \
         or set DATABASE_URL to use an existing PostgreSQL server instead"
    )]
    BinariesNotFound {
        /// The places looked at, for the message.
        searched: String,
    },
    /// `CHRONICLE_PG_BIN` is set but the folder lacks a server binary.
    #[error(
        "CHRONICLE_PG_BIN is {path}, but that folder has no executable `{missing}`; point it at the `bin` \
         folder of a PostgreSQL server installation (e.g. /usr/lib/postgresql/16/bin) or unset it"
    )]
    BadPgBin {
        /// The value of `CHRONICLE_PG_BIN`.
        path: PathBuf,
        /// The first binary that is missing.
        missing: &'static str,
    },
    /// The cluster was created by another major version than the binaries found.
    #[error(
        "the cluster in {data_dir} was created by PostgreSQL {cluster_version}, but the server binaries found \
         are PostgreSQL {found_version} (in {bin_dir}); install PostgreSQL {cluster_version} (or set \
         CHRONICLE_PG_BIN to its bin folder), or wipe the cluster with `chronicle dev reset` (deletes its data)"
    )]
    VersionMismatch {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// The major version in the cluster's `PG_VERSION` file.
        cluster_version: String,
        /// The major version of the binaries found.
        found_version: String,
        /// Where those binaries are.
        bin_dir: PathBuf,
    },
    /// Running as root, and the unprivileged user to run the server as does not exist.
    #[error(
        "this process runs as root and PostgreSQL refuses to run as root, so the server must run as user \
         `{user}`, but {problem}; create it (e.g. `useradd --system --user-group --create-home postgres`), \
         set CHRONICLE_PG_USER to another unprivileged user, or run as a normal user"
    )]
    NoServerUser {
        /// The user name looked up (`postgres` or `CHRONICLE_PG_USER`).
        user: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Running as root, and the server's user cannot reach or write a folder it needs.
    #[error(
        "this process runs as root and PostgreSQL refuses to run as root, so the server runs as user `{user}`, \
         but `{user}` cannot {need} {path}{}; put the cluster where `{user}` can reach it (e.g. set \
         CHRONICLE_HOME=/var/tmp/chronicle/postgres, or TMPDIR for test clusters), grant access{}, or run as \
         a normal user",
        blocked_by.as_deref().map(|b| format!(" ({} is not searchable by `{user}`)", b.display())).unwrap_or_default(),
        blocked_by.as_deref().map(|b| format!(" (`chmod o+x {}`)", b.display())).unwrap_or_default()
    )]
    NotAccessible {
        /// The user the server runs as.
        user: String,
        /// The folder or file it needs.
        path: PathBuf,
        /// `reach` or `write to`.
        need: &'static str,
        /// The first folder on the way that it may not search, when found.
        blocked_by: Option<PathBuf>,
    },
    /// The cluster belongs to another user than the one running this process.
    #[error(
        "the cluster in {path} belongs to {owner}, so {you} cannot run its server; run as {owner}, or use another \
         folder (set CHRONICLE_HOME)"
    )]
    WrongOwner {
        /// The cluster's data directory.
        path: PathBuf,
        /// Its owner.
        owner: String,
        /// The user running this process.
        you: String,
    },
    /// A folder holds something other than a Chronicle cluster; it is left untouched.
    #[error(
        "{path} does not look like a Chronicle PostgreSQL cluster ({found}), so it is left untouched; use \
         another folder (set CHRONICLE_HOME), or move its contents away"
    )]
    NotACluster {
        /// The folder.
        path: PathBuf,
        /// What was found there.
        found: String,
    },
    /// A file-system operation failed.
    #[error(
        "could not {action} {path}: {source}; check that the folder exists and that you may write to it"
    )]
    Io {
        /// What was being done, e.g. `create the folder`.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL program could not be run or failed.
    #[error("{program} failed to {action} ({status}):\n{output}\n{hint}")]
    Command {
        /// The program, e.g. `/usr/lib/postgresql/15/bin/initdb`.
        program: PathBuf,
        /// What it was asked to do.
        action: &'static str,
        /// Its exit status, or why it did not run.
        status: String,
        /// The end of what it printed.
        output: String,
        /// What to do.
        hint: &'static str,
    },
    /// The server did not start or did not accept connections in time.
    #[error(
        "the PostgreSQL server for {data_dir} did not start: {reason}\n--- last lines of {log} ---\n{log_tail}\n---\n\
         fix the cause shown above and try again; if the cluster is damaged beyond repair, `chronicle dev reset` \
         wipes it (deletes its data)"
    )]
    StartFailed {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// What went wrong.
        reason: String,
        /// The server's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// The server did not stop.
    #[error(
        "the PostgreSQL server for {data_dir} (process {pid}) did not stop: {reason}; look at {log}, or end the \
         process by hand (`kill -QUIT {pid}`)"
    )]
    StopFailed {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// The postmaster's process id.
        pid: u32,
        /// What went wrong.
        reason: String,
        /// The server's log file.
        log: PathBuf,
    },
    /// Another process held the cluster's lock for too long.
    #[error(
        "waited {waited:?} for the lock {path}, held by another process (probably starting or stopping the same \
         cluster); if that process is stuck, end it (`fuser -v {path}` names it) and try again"
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long this process waited.
        waited: Duration,
    },
}

impl EmbeddedError {
    pub(crate) fn io(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        EmbeddedError::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
