//! Integration tests: real clusters, real server processes, `psql` as the
//! client. They pass as root (the server then runs as `postgres`) and as
//! a normal user, and leave nothing behind.

use std::env;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{self, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use chronicle_embedded::{EmbeddedError, EmbeddedPostgres};

const HELPER_ENV: &str = "CHRONICLE_EMBEDDED_TEST_HELPER";

/// A folder for one test; its cluster is reset and the folder removed at
/// the end, even when the test fails.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = env::temp_dir().join(format!(
            "chronicle-embedded-test-{}-{n}-{name}",
            process::id()
        ));
        fs::create_dir_all(&path).unwrap();
        // Reachable by the server's user when running as root, whatever the umask.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        TestDir(path)
    }

    fn cluster(&self) -> PathBuf {
        self.0.join("cluster")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = EmbeddedPostgres::reset(self.cluster());
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs SQL with psql against a libpq URL; returns the unaligned output.
fn psql(url: &str, sql: &str) -> String {
    psql_with(&[url], sql)
}

fn psql_with(connection: &[&str], sql: &str) -> String {
    let output = Command::new("psql")
        .args(connection)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql is installed");
    assert!(
        output.status.success(),
        "psql {connection:?} -c {sql:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn process_alive(pid: u32) -> bool {
    // A zombie has given up everything but its entry.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

fn process_uid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").unwrap().uid() == 0
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

/// A child process running one of the `helper_*` tests below; killed when
/// dropped, so that a failing test leaves none behind (declare it after the
/// [`TestDir`] it uses, so that it goes first).
struct Helper(process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn helper(name: &str, arg: &str) -> Helper {
    let child = Command::new(env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Helper(child)
}

/// What a helper prints after `prefix`, on the first line that has it.
/// The rest of its output is drained, so that it never writes to a closed
/// pipe.
fn helper_line(child: &mut Helper, prefix: &str) -> String {
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    // libtest prints `test <name> ... ` before the test's own output.
    let found = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_owned()));
    thread::spawn(move || lines.for_each(drop));
    found.unwrap_or_else(|| panic!("the helper printed no {prefix:?} line"))
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<EmbeddedPostgres>();
    check::<EmbeddedError>();
    check::<chronicle_embedded::ClusterStatus>();
}

#[test]
fn data_persists_across_stop_and_start() {
    let dir = TestDir::new("persist");
    let pg = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert!(!pg.is_throwaway());
    assert_eq!(pg.cluster_dir(), fs::canonicalize(dir.cluster()).unwrap());
    assert_eq!(pg.data_dir(), pg.cluster_dir().join("data"));
    assert_eq!(pg.socket_dir(), pg.cluster_dir().join("run"));
    assert_eq!(psql(&pg.url(), "select 1"), "1");
    let port = pg.port().to_string();
    let host = pg.socket_dir().to_str().unwrap();
    assert_eq!(
        psql_with(
            &["-h", host, "-p", &port, "-U", "postgres", "-d", "postgres"],
            "select 2"
        ),
        "2"
    );
    assert_eq!(
        psql(&pg.url(), "show fsync"),
        "on",
        "a persistent cluster keeps fsync"
    );
    assert_eq!(psql(&pg.url(), "show listen_addresses"), "");
    psql(
        &pg.url(),
        "create table kept (v text); insert into kept values ('still here')",
    );

    // The server runs unprivileged when this process is root.
    let server_uid = process_uid(pg.pid());
    if running_as_root() {
        assert_ne!(server_uid, 0, "the server must not run as root");
        assert_eq!(fs::metadata(pg.data_dir()).unwrap().uid(), server_uid);
    }

    assert!(EmbeddedPostgres::is_running(dir.cluster()));
    let status = EmbeddedPostgres::status(dir.cluster());
    assert_eq!(status.pid, Some(pg.pid()));
    assert_eq!(status.url, Some(pg.url()));
    assert_eq!(
        status.pg_version.as_deref(),
        Some(
            fs::read_to_string(pg.data_dir().join("PG_VERSION"))
                .unwrap()
                .trim()
        )
    );
    let record = fs::read_to_string(pg.cluster_dir().join("server.info")).unwrap();
    assert!(record.contains(&format!("url={}", pg.url())), "{record}");

    // Starting again joins the running server.
    let joined = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert_eq!((joined.pid(), joined.url()), (pg.pid(), pg.url()));

    assert!(EmbeddedPostgres::stop(dir.cluster()).unwrap());
    assert!(!EmbeddedPostgres::is_running(dir.cluster()));
    assert!(
        !EmbeddedPostgres::stop(dir.cluster()).unwrap(),
        "already stopped"
    );
    eventually("the server process ends", || !process_alive(pg.pid()));
    let status = EmbeddedPostgres::status(dir.cluster());
    assert_eq!((status.pid, status.url), (None, None));

    let again = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert_ne!(again.pid(), pg.pid());
    assert_eq!(again.url(), pg.url(), "same socket and port");
    assert_eq!(psql(&again.url(), "select v from kept"), "still here");

    EmbeddedPostgres::reset(dir.cluster()).unwrap();
    assert!(!dir.cluster().exists());
    assert!(!EmbeddedPostgres::is_running(dir.cluster()));
    eventually("the server process ends", || !process_alive(again.pid()));
    // Nothing there: reset and stop are no-ops.
    EmbeddedPostgres::reset(dir.cluster()).unwrap();
    assert!(!EmbeddedPostgres::stop(dir.cluster()).unwrap());
}

#[test]
#[ignore = "helper process for concurrent_starts_share_one_server"]
fn helper_start() {
    let Some(dir) = env::var_os(HELPER_ENV) else {
        return;
    };
    let pg = EmbeddedPostgres::start(PathBuf::from(dir)).unwrap();
    println!("PID {}", pg.pid());
}

#[test]
fn concurrent_starts_share_one_server() {
    let dir = TestDir::new("concurrent");
    let cluster = dir.cluster();
    let mut processes: Vec<_> = (0..3)
        .map(|_| helper("helper_start", cluster.to_str().unwrap()))
        .collect();
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (barrier, cluster) = (barrier.clone(), cluster.clone());
            thread::spawn(move || {
                barrier.wait();
                EmbeddedPostgres::start(cluster)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut pids = Vec::new();
    for child in &mut processes {
        pids.push(helper_line(child, "PID ").parse::<u32>().unwrap());
        assert!(child.0.wait().unwrap().success());
    }
    for result in results {
        pids.push(result.unwrap().pid());
    }
    let log = fs::read_to_string(cluster.join("postgres.log")).unwrap();
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "one server for all: {pids:?}\n{log}"
    );
    assert_eq!(
        log.matches("database system is ready to accept connections")
            .count(),
        1,
        "started once:\n{log}"
    );
}

#[test]
fn throwaway_is_fast_and_deleted_on_drop() {
    let pg = EmbeddedPostgres::throwaway().unwrap();
    assert!(pg.is_throwaway());
    let dir = pg.cluster_dir().to_path_buf();
    let pid = pg.pid();
    assert!(
        dir.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("chronicle-throwaway-")
    );
    assert_eq!(psql(&pg.url(), "show fsync"), "off");
    assert_eq!(psql(&pg.url(), "show synchronous_commit"), "off");
    assert_eq!(
        psql(&pg.url_for("template1"), "select current_database()"),
        "template1"
    );
    if running_as_root() {
        assert_ne!(process_uid(pid), 0);
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(
            !groups.split_whitespace().any(|g| g == "0"),
            "root's groups are dropped: {groups}"
        );
    }
    drop(pg);
    assert!(!dir.exists(), "the folder is deleted");
    eventually("the server process ends", || !process_alive(pid));
}

#[test]
#[ignore = "helper process for a_killed_owner_is_cleaned_up_by_the_watchdog"]
fn helper_hold_throwaway() {
    if env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let pg = EmbeddedPostgres::throwaway().unwrap();
    println!("CLUSTER {} {}", pg.pid(), pg.cluster_dir().display());
    thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_owner_is_cleaned_up_by_the_watchdog() {
    let mut child = helper("helper_hold_throwaway", "1");
    let line = helper_line(&mut child, "CLUSTER ");
    let (pid, dir) = line.split_once(' ').unwrap();
    let (pid, dir): (u32, &Path) = (pid.parse().unwrap(), Path::new(dir));
    assert!(dir.exists() && process_alive(pid));
    child.0.kill().unwrap(); // SIGKILL: no destructor runs
    child.0.wait().unwrap();
    eventually("the watchdog deletes the folder", || !dir.exists());
    eventually("the server process ends", || !process_alive(pid));
}

#[test]
fn a_long_cluster_path_gets_a_short_socket_folder() {
    let dir = TestDir::new("long");
    let cluster = dir.0.join("a".repeat(60)).join("b".repeat(60));
    let pg = EmbeddedPostgres::start(&cluster).unwrap();
    let socket_dir = pg.socket_dir().to_path_buf();
    assert!(
        socket_dir.starts_with("/tmp")
            && socket_dir
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("chronicle-")
    );
    assert_eq!(psql(&pg.url(), "select 1"), "1");
    EmbeddedPostgres::reset(&cluster).unwrap();
    assert!(!cluster.exists());
    assert!(!socket_dir.exists(), "reset removes the socket folder too");
}

#[test]
fn a_folder_the_server_user_cannot_reach_is_refused_clearly() {
    if !running_as_root() {
        return; // the check only applies when the server runs as another user
    }
    let dir = TestDir::new("private");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o700)).unwrap();
    let err = EmbeddedPostgres::start(dir.cluster()).unwrap_err();
    assert!(
        matches!(err, EmbeddedError::NotAccessible { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("chmod o+x {}", dir.0.display())),
        "{text}"
    );
    assert!(text.contains("CHRONICLE_HOME"), "{text}");
}

#[test]
fn reset_refuses_a_folder_that_is_not_a_cluster() {
    let dir = TestDir::new("not-a-cluster");
    fs::write(dir.0.join("precious.txt"), "keep me").unwrap();
    let err = EmbeddedPostgres::reset(&dir.0).unwrap_err();
    assert!(matches!(err, EmbeddedError::NotACluster { .. }), "{err:?}");
    assert!(err.to_string().contains("precious.txt"), "{err}");
    assert!(dir.0.join("precious.txt").exists());
    assert!(!EmbeddedPostgres::is_running(&dir.0));
    assert!(!EmbeddedPostgres::stop(&dir.0).unwrap());
}

#[test]
fn reset_keeps_other_files_in_the_cluster_folder() {
    let dir = TestDir::new("shared-folder");
    let pg = EmbeddedPostgres::start(dir.cluster()).unwrap();
    fs::write(dir.cluster().join("notes.txt"), "mine").unwrap();
    EmbeddedPostgres::reset(dir.cluster()).unwrap();
    eventually("the server process ends", || !process_alive(pg.pid()));
    let left: Vec<_> = fs::read_dir(dir.cluster())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"]);
}

#[test]
fn the_owner_may_reset_its_throwaway_cluster() {
    // What a test harness does from an `atexit` hook when its cluster
    // lives in a `static` that is never dropped.
    let pg = EmbeddedPostgres::throwaway().unwrap();
    let dir = pg.cluster_dir().to_path_buf();
    EmbeddedPostgres::reset(&dir).unwrap();
    assert!(!dir.exists());
    eventually("the server process ends", || !process_alive(pg.pid()));
    drop(pg); // nothing left to do, and no error
}

#[test]
fn recovers_from_a_crash_and_from_a_stale_pid_file() {
    let dir = TestDir::new("crash");
    let pg = EmbeddedPostgres::start(dir.cluster()).unwrap();
    psql(
        &pg.url(),
        "create table kept (v int); insert into kept values (42)",
    );

    // The server is killed (OOM killer, power cut): the next start recovers.
    Command::new("kill")
        .args(["-KILL", &pg.pid().to_string()])
        .status()
        .unwrap();
    eventually("the server process ends", || !process_alive(pg.pid()));
    assert!(!EmbeddedPostgres::is_running(dir.cluster()));
    let recovered = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert_eq!(psql(&recovered.url(), "select v from kept"), "42");
    assert!(EmbeddedPostgres::stop(dir.cluster()).unwrap());

    // After a reboot, postmaster.pid may name a live process that is not a
    // server at all (process ids get reused): here, process 1.
    let pid_file = recovered.data_dir().join("postmaster.pid");
    fs::write(
        &pid_file,
        format!(
            "1\n{}\n0\n{}\n",
            recovered.data_dir().display(),
            recovered.port()
        ),
    )
    .unwrap();
    assert!(!EmbeddedPostgres::is_running(dir.cluster()));
    let restarted = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert_eq!(psql(&restarted.url(), "select v from kept"), "42");
}

#[test]
fn a_server_whose_socket_was_deleted_is_restarted() {
    // What a /tmp cleaner does to a server that runs for weeks.
    let dir = TestDir::new("socket-gone");
    let pg = EmbeddedPostgres::start(dir.cluster()).unwrap();
    fs::remove_file(pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()))).unwrap();
    assert!(!EmbeddedPostgres::is_running(dir.cluster()));
    assert_eq!(EmbeddedPostgres::status(dir.cluster()).pid, Some(pg.pid()));
    let restarted = EmbeddedPostgres::start(dir.cluster()).unwrap();
    assert_ne!(restarted.pid(), pg.pid());
    assert_eq!(psql(&restarted.url(), "select 1"), "1");
    eventually("the old server process ends", || !process_alive(pg.pid()));
}
