//! A moto server (moto's KMS-compatible server mode) on a free loopback
//! port, one per test process, and helpers to make KMS keys on it.
//!
//! The server runs under a small `sh` guard that reads its standard input:
//! when the test process exits, for whatever reason, the pipe closes and
//! the guard stops the server, so no server outlives its tests. The
//! interpreter is `python3`, or `$PYTHON` if set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chronicle_aws_kms::aws_config::{BehaviorVersion, Region, SdkConfig};
use chronicle_aws_kms::aws_sdk_kms::Client;
use chronicle_aws_kms::aws_sdk_kms::config::Credentials;
use chronicle_aws_kms::{AwsKmsKeys, AwsKmsKeysBuilder};

/// The region every test uses.
pub const REGION: &str = "us-east-1";

/// A running moto server.
pub struct Moto {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    // Held open for the life of the process: closing it stops the server.
    _guard: Mutex<(Child, ChildStdin)>,
}

static MOTO: OnceLock<Moto> = OnceLock::new();

const INSTALL_HINT: &str = "moto's server mode is needed for the AWS KMS tests and is not installed: \
run `pip install 'moto[server]'` (.ci/run installs it)";

/// The process's moto server, started on first use. Panics with what to do
/// if moto is not installed or the server does not come up.
pub fn moto() -> &'static Moto {
    MOTO.get_or_init(start)
}

fn start() -> Moto {
    let python = python();
    let check = Command::new(&python)
        .args(["-c", "import moto.server, flask, flask_cors"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; {INSTALL_HINT}"));
    if !check.status.success() {
        panic!(
            "{INSTALL_HINT}\n({python} says: {})",
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    let mut last_problem = String::new();
    // A free port can be taken between probing and binding: try a few.
    for attempt in 0..3 {
        let port = free_port();
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "chronicle-aws-kms-moto-{}-{attempt}.log",
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        // The guard: start the server in the background, wait for EOF on
        // standard input (the test process exiting), then stop it.
        let script = format!(
            "\"$0\" -m moto.server -H 127.0.0.1 -p {port} </dev/null & server=$!\n\
             cat >/dev/null\n\
             kill $server 2>/dev/null; wait $server 2>/dev/null\n"
        );
        let mut child = Command::new("sh")
            .args(["-c", &script, &python])
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("log file handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto with sh: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let endpoint = format!("http://127.0.0.1:{port}");
        match wait_until_answering(port, &mut child) {
            Ok(()) => {
                // Up: the server keeps writing to the open file, which
                // disappears with it.
                let _ = std::fs::remove_file(&log);
                return Moto {
                    endpoint,
                    _guard: Mutex::new((child, stdin)),
                };
            }
            Err(problem) => {
                drop(stdin);
                let _ = child.kill();
                let _ = child.wait();
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                last_problem = format!("{problem}; server output:\n{output}");
            }
        }
    }
    panic!("moto did not start: {last_problem}");
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until the server answers an HTTP request (it takes a second or two
/// to import), or its process ends, or a minute passes.
fn wait_until_answering(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited with {status}"));
        }
        if answers(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("no answer within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut status = String::new();
    let ok = BufReader::new(&mut stream).read_line(&mut status).is_ok();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    ok && status.starts_with("HTTP/")
}

/// AWS configuration for the moto server: fixed test credentials, the test
/// region, the server's endpoint.
pub async fn sdk_config() -> SdkConfig {
    let moto = moto();
    chronicle_aws_kms::aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "chronicle-aws-kms-tests",
        ))
        .endpoint_url(&moto.endpoint)
        .load()
        .await
}

/// A KMS client on the moto server, for setting keys up.
pub async fn admin() -> Client {
    Client::new(&sdk_config().await)
}

/// A new symmetric encryption key; returns its ARN.
pub async fn create_key(admin: &Client) -> String {
    create_key_with_policy(admin, None).await
}

/// A new symmetric encryption key with a key policy; returns its ARN.
pub async fn create_key_with_policy(admin: &Client, policy: Option<&str>) -> String {
    let out = admin
        .create_key()
        .description("chronicle-aws-kms test key")
        .set_policy(policy.map(str::to_owned))
        .send()
        .await
        .expect("CreateKey on moto");
    out.key_metadata()
        .and_then(|m| m.arn())
        .expect("a key ARN")
        .to_owned()
}

/// A provider builder for `key` on the moto server.
pub async fn builder(key: &str) -> AwsKmsKeysBuilder {
    let mut builder = AwsKmsKeys::builder(key);
    builder.sdk_config(sdk_config().await).max_attempts(2);
    builder
}

/// A provider for `key` on the moto server.
pub async fn provider(key: &str) -> AwsKmsKeys {
    builder(key)
        .await
        .build()
        .await
        .expect("a provider for the moto key")
}

/// The bare key id of a key ARN (moto's DisableKey, EnableKey and
/// ScheduleKeyDeletion take only that form; AWS takes both).
pub fn key_id(arn: &str) -> &str {
    arn.rsplit_once("key/").map_or(arn, |(_, id)| id)
}
