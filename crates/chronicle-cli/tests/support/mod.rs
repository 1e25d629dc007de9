//! What every CLI test binary needs: a throwaway cluster, a fresh database
//! on it per test, and the `chronicle` binary run against it.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use chronicle_embedded::EmbeddedPostgres;
use serde_json::Value;

/// One throwaway cluster for this test binary; each test uses a database
/// of its own on it.
pub fn server() -> &'static EmbeddedPostgres {
    static PG: OnceLock<EmbeddedPostgres> = OnceLock::new();
    PG.get_or_init(|| EmbeddedPostgres::throwaway().expect("start a throwaway PostgreSQL"))
}

/// A new, empty database on [`server`]; its URL.
pub fn fresh_database() -> String {
    let name = format!("cli_{}", uuid::Uuid::new_v4().simple());
    psql_value(&server().url(), &format!("CREATE DATABASE {name}"));
    server().url_for(&name)
}

/// Runs `sql` with psql (stopping at the first error) and returns its
/// unaligned, trimmed output.
pub fn psql_value(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .expect("psql is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The `chronicle` binary with `args`, on `url` (none: the embedded
/// default), with no setting inherited from the environment that would
/// change what it does, and piped standard streams.
pub fn command(url: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chronicle"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("CHRONICLE_UPCASTERS")
        .env_remove("CHRONICLE_KEYRING")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    cmd
}

/// Runs `cmd` to the end, writing `stdin` (if any) to it first.
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    let mut child = cmd.spawn().expect("run chronicle");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("chronicle finishes")
}

/// `chronicle args` on `url`, fed `stdin`.
pub fn chronicle(url: Option<&str>, args: &[&str], stdin: Option<&str>) -> Output {
    run(command(url, args), stdin)
}

/// The standard error of a run that must have failed with `code`.
pub fn fails(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The standard output of a run that must have succeeded.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every non-empty line of `text` as JSON (each must be).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}
