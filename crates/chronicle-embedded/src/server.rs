//! Initialising, configuring, starting, probing and stopping a cluster's
//! server with the installed PostgreSQL programs.

use std::env;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::binaries::Binaries;
use crate::error::{EmbeddedError, Result};
use crate::layout::{self, LOG_OLD, LOG_ROTATE_BYTES, Layout};
use crate::sys;

/// How long `pg_ctl start` may wait for the server (crash recovery of a
/// large development database can take a while).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `pg_ctl stop` may wait before the next, harsher mode.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable naming the user to run the server as when
/// this process runs as root.
pub const PG_USER_ENV: &str = "CHRONICLE_PG_USER";
/// The settings file this crate writes into the data directory at every
/// start, included from `postgresql.conf`.
pub(crate) const CONF: &str = "chronicle.conf";

/// Environment variables that would change what the programs do.
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGPORT",
    "PGHOST",
    "PGHOSTADDR",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGCTLTIMEOUT",
];

/// The unprivileged user the programs run as when this process is root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Who runs the server: this process's user; as root, the owner of the
/// existing cluster, else `$CHRONICLE_PG_USER` or `postgres`.
pub(crate) fn run_as_for(layout: &Layout) -> Result<Option<RunAs>> {
    let euid = sys::euid();
    let owner = fs::metadata(&layout.data).ok().map(|m| (m.uid(), m.gid()));
    if euid != 0 {
        if let Some((uid, _)) = owner
            && uid != euid
        {
            return Err(EmbeddedError::WrongOwner {
                path: layout.data.clone(),
                owner: sys::user_name(uid),
                you: sys::user_name(euid),
            });
        }
        return Ok(None);
    }
    if let Some((uid, gid)) = owner
        && uid != 0
    {
        return Ok(Some(RunAs {
            name: sys::user_name(uid),
            uid,
            gid,
        }));
    }
    default_run_as()
}

/// Who runs the server of a new cluster: nobody else (`None`) unless this
/// process is root; then `$CHRONICLE_PG_USER` or `postgres`.
pub(crate) fn default_run_as() -> Result<Option<RunAs>> {
    if sys::euid() != 0 {
        return Ok(None);
    }
    let name = env::var(PG_USER_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres".to_owned());
    let problem = match sys::user_by_name(&name) {
        Ok(Some(user)) if user.uid != 0 => {
            return Ok(Some(RunAs {
                name: user.name,
                uid: user.uid,
                gid: user.gid,
            }));
        }
        Ok(Some(_)) => "that user is root too".to_owned(),
        Ok(None) => "no such user exists".to_owned(),
        Err(e) => format!("looking it up failed ({e})"),
    };
    Err(EmbeddedError::NoServerUser {
        user: name,
        problem,
    })
}

/// A command for a PostgreSQL program, run as `run_as` when given (std
/// sets the ids and drops root's supplementary groups in the child).
pub(crate) fn command(program: impl AsRef<OsStr>, run_as: Option<&RunAs>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir("/").stdin(Stdio::null());
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    if let Some(user) = run_as {
        cmd.uid(user.uid)
            .gid(user.gid)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    cmd
}

/// Gives a file or folder to the server's user (when running as root).
pub(crate) fn give(path: &Path, run_as: Option<&RunAs>) -> Result<()> {
    if let Some(user) = run_as {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(|e| EmbeddedError::io("change the owner of", path, e))?;
    }
    Ok(())
}

/// Creates a folder only the server's user may enter.
fn private_dir(path: &Path, run_as: Option<&RunAs>) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(EmbeddedError::io("create the folder", path, e)),
    }
    give(path, run_as)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(|e| EmbeddedError::io("set permissions of", path, e))
}

/// As root: checks that the server's user can write to each path, and
/// names the first folder on the way that it cannot search.
pub(crate) fn check_access(run_as: Option<&RunAs>, paths: &[&Path]) -> Result<()> {
    let Some(user) = run_as else {
        return Ok(());
    };
    if user_can(user, "-w", paths) {
        return Ok(());
    }
    for path in paths {
        if user_can(user, "-w", &[path]) {
            continue;
        }
        let ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
        let blocked_by = ancestors
            .into_iter()
            .rev()
            .find(|a| !user_can(user, "-x", &[a]))
            .map(Path::to_path_buf);
        return Err(EmbeddedError::NotAccessible {
            user: user.name.clone(),
            path: path.to_path_buf(),
            need: if blocked_by.is_some() {
                "reach"
            } else {
                "write to"
            },
            blocked_by,
        });
    }
    Ok(())
}

fn user_can(user: &RunAs, test: &str, paths: &[&Path]) -> bool {
    command("/bin/sh", Some(user))
        .arg("-c")
        .arg(format!(r#"for p do test {test} "$p" || exit 1; done"#))
        .arg("sh")
        .args(paths)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a program to completion; a failure carries the end of its output.
fn run(
    cmd: &mut Command,
    program: &Path,
    action: &'static str,
    hint: &'static str,
) -> Result<Output> {
    let output = cmd.output().map_err(|e| EmbeddedError::Command {
        program: program.to_path_buf(),
        action,
        status: format!("it could not be run: {e}"),
        output: String::new(),
        hint,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(EmbeddedError::Command {
            program: program.to_path_buf(),
            action,
            status: output.status.to_string(),
            output: output_text(&output),
            hint,
        })
    }
}

/// The last lines a program printed, stdout then stderr.
fn output_text(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    last_lines(text.trim(), 30)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Creates the cluster with initdb, in a temporary folder renamed into
/// place on success.
pub(crate) fn init(
    layout: &Layout,
    bins: &Binaries,
    run_as: Option<&RunAs>,
    fast: bool,
) -> Result<()> {
    let tmp = &layout.init_tmp;
    if tmp.exists() {
        // Left by an initdb that was interrupted; we hold the lock.
        fs::remove_dir_all(tmp)
            .map_err(|e| EmbeddedError::io("remove the unfinished cluster", tmp, e))?;
    }
    private_dir(tmp, run_as)?;
    check_access(run_as, &[tmp])?;
    let initdb = bins.initdb();
    let mut cmd = command(&initdb, run_as);
    cmd.arg("-D").arg(tmp).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "--encoding=UTF8",
        "--locale=C",
    ]);
    if fast {
        cmd.arg("--no-sync");
    }
    let result = run(
        &mut cmd,
        &initdb,
        "create the cluster",
        "fix the cause shown above (free disk space, permissions) and try again",
    )
    .and_then(|_| {
        let conf = tmp.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| {
                writeln!(
                    f,
                    "\n# Added by chronicle-embedded.\ninclude_if_exists = '{CONF}'"
                )
            })
            .map_err(|e| EmbeddedError::io("write", &conf, e))
    })
    .and_then(|()| {
        fs::rename(tmp, &layout.data)
            .map_err(|e| EmbeddedError::io("move the new cluster to", &layout.data, e))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(tmp);
    }
    result
}

/// Makes the socket folder and the log file, and checks the server's user
/// can use them and the data directory.
pub(crate) fn prepare(layout: &Layout, run_as: Option<&RunAs>) -> Result<()> {
    let socket_dir = &layout.socket_dir;
    if layout.socket_dir_is_outside()
        && let Ok(md) = fs::symlink_metadata(socket_dir)
    {
        let server_uid = run_as.map_or_else(sys::euid, |u| u.uid);
        if md.file_type().is_symlink()
            || !md.is_dir()
            || (md.uid() != server_uid && md.uid() != sys::euid())
        {
            return Err(EmbeddedError::NotACluster {
                path: socket_dir.clone(),
                found: format!(
                    "it should be this cluster's socket folder, but it is not a folder owned by {}",
                    sys::user_name(server_uid)
                ),
            });
        }
    }
    private_dir(socket_dir, run_as)?;

    let log = &layout.log;
    if fs::metadata(log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let old = layout.root.join(LOG_OLD);
        fs::rename(log, &old).map_err(|e| EmbeddedError::io("rotate the log to", &old, e))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| EmbeddedError::io("create the log", log, e))?;
    give(log, run_as)?;
    fs::set_permissions(log, fs::Permissions::from_mode(0o600))
        .map_err(|e| EmbeddedError::io("set permissions of", log, e))?;
    check_access(run_as, &[&layout.data, socket_dir, log])
}

/// Writes [`CONF`]: Unix socket only, the port and socket folder, and with
/// `fast` the settings of a throwaway cluster (no fsync).
pub(crate) fn configure(layout: &Layout, run_as: Option<&RunAs>, fast: bool) -> Result<()> {
    let mut conf = String::from(
        "# Written by chronicle-embedded at every start: edits here are lost.\n\
         # Change settings with ALTER SYSTEM (postgresql.auto.conf) instead.\n",
    );
    let socket_dir = layout.socket_dir.to_string_lossy().replace('\'', "''");
    let _ = writeln!(conf, "listen_addresses = ''");
    let _ = writeln!(conf, "port = {}", layout.port);
    let _ = writeln!(conf, "unix_socket_directories = '{socket_dir}'");
    if fast {
        let _ = writeln!(conf, "# A throwaway cluster: speed over durability.");
        let _ = writeln!(conf, "fsync = off");
        let _ = writeln!(conf, "synchronous_commit = off");
        let _ = writeln!(conf, "full_page_writes = off");
    }
    let path = layout.data.join(CONF);
    fs::write(&path, conf).map_err(|e| EmbeddedError::io("write", &path, e))?;
    give(&path, run_as)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| EmbeddedError::io("set permissions of", &path, e))
}

/// Where a running server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub pid: u32,
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Endpoint {
    pub fn socket_path(&self) -> PathBuf {
        layout::socket_path(&self.socket_dir, self.port)
    }
}

/// What the server of a cluster is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// No server process.
    Stopped,
    /// `postmaster.pid` names a live process that is not this cluster's
    /// server (ids are reused, e.g. after a container restarts).
    Stale,
    /// Starting up, recovering or shutting down.
    Busy(Endpoint),
    /// Up and accepting connections.
    Accepting(Endpoint),
    /// The server process lives but nothing answers on its socket (e.g.
    /// the socket file was deleted from /tmp).
    Unresponsive(Endpoint),
}

impl State {
    pub fn pid(&self) -> Option<u32> {
        match self {
            State::Busy(e) | State::Accepting(e) | State::Unresponsive(e) => Some(e.pid),
            State::Stopped | State::Stale => None,
        }
    }
}

/// The interesting lines of `postmaster.pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PidFile {
    pub pid: u32,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    pub status: Option<String>,
}

pub(crate) fn parse_pid_file(text: &str) -> Option<PidFile> {
    // Line 1 pid, 2 data dir, 3 start time, 4 port, 5 first socket dir,
    // 6 listen address, 7 shared memory key, 8 status.
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    Some(PidFile {
        pid: lines.first()?.parse().ok()?,
        port: lines.get(3).and_then(|l| l.parse().ok()),
        socket_dir: lines.get(4).filter(|l| !l.is_empty()).map(PathBuf::from),
        status: lines
            .get(7)
            .filter(|l| !l.is_empty())
            .map(|l| (*l).to_owned()),
    })
}

/// Reads `postmaster.pid`, asks the process whether it lives and the socket
/// whether it accepts connections. The same check as `pg_ctl status`
/// (the pid file and `kill(pid, 0)`), plus the socket.
pub(crate) fn state(layout: &Layout) -> State {
    let Some(pid_file) = fs::read_to_string(layout.data.join("postmaster.pid"))
        .ok()
        .and_then(|t| parse_pid_file(&t))
    else {
        return State::Stopped;
    };
    if !sys::process_exists(pid_file.pid) {
        return State::Stopped;
    }
    if !is_postmaster_of(pid_file.pid, &layout.data) {
        return State::Stale;
    }
    let endpoint = Endpoint {
        pid: pid_file.pid,
        socket_dir: pid_file
            .socket_dir
            .unwrap_or_else(|| layout.socket_dir.clone()),
        port: pid_file.port.unwrap_or(layout.port),
    };
    match probe(&endpoint.socket_path()) {
        Probe::Accepting => State::Accepting(endpoint),
        Probe::Busy => State::Busy(endpoint),
        Probe::NoResponse if pid_file.status.as_deref() == Some("ready") => {
            State::Unresponsive(endpoint)
        }
        Probe::NoResponse => State::Busy(endpoint),
    }
}

/// Whether a live process is the server of the data directory, as far as
/// `/proc` tells: the postmaster works in its data directory; failing that
/// (another user's process, a sandbox), it is at least named `postgres`.
/// Where `/proc` tells nothing, assume it is.
fn is_postmaster_of(pid: u32, data: &Path) -> bool {
    if let Some(cwd) = sys::process_cwd(pid) {
        let data = fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
        return cwd == data;
    }
    sys::process_name(pid).is_none_or(|name| name == "postgres" || name == "postmaster")
}

/// What a server said to a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// It authenticated us, or refused us for a reason that needs a running
    /// server (no such role, too many connections...).
    Accepting,
    /// SQLSTATE 57P03: starting up, recovering or shutting down.
    Busy,
    /// Nothing listens, or it did not answer.
    NoResponse,
}

/// Connects to the socket and sends a protocol 3.0 startup message as
/// `postgres`, which tells a server that accepts connections from one that
/// is starting or stopping.
pub(crate) fn probe(socket: &Path) -> Probe {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return Probe::NoResponse;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for s in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut message = u32::try_from(body.len() + 4)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    message.extend(body);
    let mut header = [0u8; 5];
    if stream.write_all(&message).is_err() || stream.read_exact(&mut header).is_err() {
        return Probe::NoResponse;
    }
    match header[0] {
        b'R' => {
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]); // Terminate
            Probe::Accepting
        }
        b'E' => {
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let mut fields = vec![0; len.saturating_sub(4).min(16 * 1024)];
            if stream.read_exact(&mut fields).is_err() {
                return Probe::NoResponse;
            }
            // Fields: a type byte, then a NUL-terminated value; 'C' is the SQLSTATE.
            let busy = fields.split(|b| *b == 0).any(|field| field == b"C57P03");
            if busy { Probe::Busy } else { Probe::Accepting }
        }
        _ => Probe::NoResponse,
    }
}

/// How waiting for a server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    Accepting,
    Exited,
    TimedOut,
}

/// Waits until the server accepts connections, exits, or `timeout` passes.
pub(crate) fn wait_accepting(endpoint: &Endpoint, timeout: Duration) -> Waited {
    let deadline = Instant::now() + timeout;
    loop {
        if probe(&endpoint.socket_path()) == Probe::Accepting {
            return Waited::Accepting;
        }
        if !sys::process_exists(endpoint.pid) {
            return Waited::Exited;
        }
        if Instant::now() >= deadline {
            return Waited::TimedOut;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the server with `pg_ctl start -w` and waits until it accepts
/// connections.
pub(crate) fn start(layout: &Layout, bins: &Binaries, run_as: Option<&RunAs>) -> Result<Endpoint> {
    let pg_ctl = bins.pg_ctl();
    let output = command(&pg_ctl, run_as)
        .arg("start")
        .arg("-D")
        .arg(&layout.data)
        .arg("-l")
        .arg(&layout.log)
        .arg("-w")
        .arg("-t")
        .arg(START_TIMEOUT.as_secs().to_string())
        .output();
    match output {
        Err(e) => {
            return Err(start_failed(
                layout,
                format!("could not run {}: {e}", pg_ctl.display()),
            ));
        }
        Ok(o) if !o.status.success() => {
            return Err(start_failed(
                layout,
                format!("`pg_ctl start` failed ({}):\n{}", o.status, output_text(&o)),
            ));
        }
        Ok(_) => {}
    }
    let endpoint = match state(layout) {
        State::Accepting(endpoint) => return Ok(endpoint),
        State::Busy(endpoint) | State::Unresponsive(endpoint) => endpoint,
        State::Stopped | State::Stale => {
            return Err(start_failed(
                layout,
                "the server exited right after it started".to_owned(),
            ));
        }
    };
    match wait_accepting(&endpoint, Duration::from_secs(10)) {
        Waited::Accepting => Ok(endpoint),
        Waited::Exited => Err(start_failed(
            layout,
            "the server exited right after it started".to_owned(),
        )),
        Waited::TimedOut => Err(start_failed(
            layout,
            format!(
                "pg_ctl reported it started, but nothing accepts connections on {}",
                endpoint.socket_path().display()
            ),
        )),
    }
}

pub(crate) fn start_failed(layout: &Layout, reason: String) -> EmbeddedError {
    EmbeddedError::StartFailed {
        data_dir: layout.data.clone(),
        reason,
        log: layout.log.clone(),
        log_tail: log_tail(&layout.log, 25),
    }
}

/// How to stop a server (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopMode {
    /// Roll back open transactions, checkpoint, exit; then `Immediate` if
    /// that did not finish in time.
    Fast,
    /// Exit at once; the next start recovers from the WAL.
    Immediate,
}

/// Stops the server if it runs. Returns whether it was running.
pub(crate) fn stop(
    layout: &Layout,
    bins: &Binaries,
    run_as: Option<&RunAs>,
    mode: StopMode,
) -> Result<bool> {
    let state = state(layout);
    if state == State::Stale {
        remove_stale_pid_file(layout)?;
    }
    let Some(pid) = state.pid() else {
        return Ok(false);
    };
    let modes: &[&str] = match mode {
        StopMode::Fast => &["fast", "immediate"],
        StopMode::Immediate => &["immediate"],
    };
    let pg_ctl = bins.pg_ctl();
    let mut reason = String::new();
    for mode in modes {
        let output = command(&pg_ctl, run_as)
            .arg("stop")
            .arg("-D")
            .arg(&layout.data)
            .args(["-m", mode, "-w", "-t"])
            .arg(STOP_TIMEOUT.as_secs().to_string())
            .output();
        match output {
            Ok(o) if o.status.success() => return Ok(true),
            Ok(o) => {
                reason = format!(
                    "`pg_ctl stop -m {mode}` failed ({}): {}",
                    o.status,
                    output_text(&o)
                )
            }
            Err(e) => reason = format!("could not run {}: {e}", pg_ctl.display()),
        }
        if !sys::process_exists(pid) {
            return Ok(true);
        }
    }
    Err(EmbeddedError::StopFailed {
        data_dir: layout.data.clone(),
        pid,
        reason,
        log: layout.log.clone(),
    })
}

/// Removes a `postmaster.pid` whose process is not this cluster's server,
/// which would otherwise make the server refuse to start.
pub(crate) fn remove_stale_pid_file(layout: &Layout) -> Result<()> {
    let path = layout.data.join("postmaster.pid");
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(EmbeddedError::io("remove the stale", &path, e))
        }
        _ => Ok(()),
    }
}

/// The last `n` lines of the log.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let from = len.saturating_sub(32 * 1024);
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // Drop a line cut in the middle.
        let text = match (from > 0, text.find('\n')) {
            (true, Some(i)) => text[i + 1..].to_owned(),
            _ => text,
        };
        Ok(last_lines(text.trim_end(), n))
    };
    match read() {
        Ok(text) if !text.is_empty() => text,
        Ok(_) => "(the log is empty)".to_owned(),
        Err(e) => format!("(could not read the log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid_files() {
        let text =
            "4242\n/work/x/data\n1764230000\n41234\n/work/x/run\n\n  1234567   98304\nready   \n";
        assert_eq!(
            parse_pid_file(text),
            Some(PidFile {
                pid: 4242,
                port: Some(41234),
                socket_dir: Some(PathBuf::from("/work/x/run")),
                status: Some("ready".into()),
            })
        );
        // Written in stages while the server starts.
        let early = parse_pid_file("4242\n/work/x/data\n1764230000\n41234\n").unwrap();
        assert_eq!((early.socket_dir, early.status), (None, None));
        assert_eq!(parse_pid_file(""), None);
    }

    #[test]
    fn nothing_listening_is_no_response() {
        assert_eq!(
            probe(Path::new("/nonexistent/.s.PGSQL.1")),
            Probe::NoResponse
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("chronicle-log-test-{}", std::process::id()));
        let text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 2), "line 4998\nline 4999");
        fs::remove_file(&path).unwrap();
        assert!(log_tail(&path, 2).starts_with("(could not read the log"));
    }
}
