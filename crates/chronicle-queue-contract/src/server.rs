//! A broker started for a test process: a program on a free loopback port,
//! under a small `sh` guard that stops it when the test process exits
//! (the guard reads its standard input; the pipe closes with the process,
//! whatever ends it), so no server outlives its tests.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A running server. Dropping it (or the process ending) stops it.
#[derive(Debug)]
pub struct Server {
    /// The loopback port it listens on.
    pub port: u16,
    _guard: Mutex<(Child, ChildStdin)>,
}

/// A free loopback port (free a moment ago).
///
/// ```
/// assert!(chronicle_queue_contract::server::free_port() > 0);
/// ```
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Where `program` is: itself when it has a `/` or is on `PATH`, else
/// `None`.
pub fn find_program(program: &str) -> Option<String> {
    if program.contains('/') {
        return std::path::Path::new(program)
            .is_file()
            .then(|| program.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

impl Server {
    /// Starts `argv(port)` on a free port and waits (up to `ready_within`)
    /// until the port accepts connections. `label` names it in errors; its
    /// output goes to `log_dir/<label>-<pid>-<attempt>.log`, kept when it
    /// fails to start. Tries three ports (one can be taken between probing
    /// and binding).
    pub fn start(
        label: &str,
        log_dir: &std::path::Path,
        ready_within: Duration,
        argv: impl Fn(u16) -> Vec<String>,
    ) -> Result<Server, String> {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let args = argv(port);
            let log = log_dir.join(format!("{label}-{}-{attempt}.log", std::process::id()));
            let file = std::fs::File::create(&log)
                .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
            // The guard: the server in the background, then wait for EOF
            // on standard input, then stop it (and its children).
            let script = "\"$@\" </dev/null & server=$!\n\
                          cat >/dev/null\n\
                          pkill -P $server 2>/dev/null; kill $server 2>/dev/null; wait $server 2>/dev/null\n";
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg("guard")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(file.try_clone().map_err(|e| e.to_string())?)
                .stderr(file)
                .spawn()
                .map_err(|e| format!("cannot start {label} with sh: {e}"))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let deadline = Instant::now() + ready_within;
            let problem = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break format!("the guard exited with {status}");
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Server {
                        port,
                        _guard: Mutex::new((child, stdin)),
                    });
                }
                if Instant::now() > deadline {
                    break format!("port {port} not open within {ready_within:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            last = format!(
                "{label} ({}) did not start: {problem}; its output:\n{output}",
                args.join(" ")
            );
        }
        Err(last)
    }
}
