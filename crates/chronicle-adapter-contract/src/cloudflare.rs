//! A local Cloudflare for the tests: the user-profile Worker built by
//! worker-build, and `tools/cloudflare-local`'s server, which speaks the
//! Cloudflare API v4 calls a deploy makes (validating them against the
//! documented shapes) and runs what is uploaded in Miniflare (workerd),
//! firing its cron trigger and feeding its queue consumer.
//!
//! The tools are installed by `.ci/run`; a missing one fails with the
//! command that installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tools/cloudflare-local`: Miniflare, wrangler and the local server.
pub fn tools_dir() -> PathBuf {
    workspace().join("tools/cloudflare-local")
}

/// Which build of the user-profile Worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The example's handler.
    Default,
    /// The fixed handler (the crate's feature `lenient`).
    Lenient,
}

/// Builds `examples/user-profile-worker` (once per process and variant)
/// with worker-build, wasm-bindgen and esbuild from this machine; returns
/// the output folder (`index.js`, `index_bg.wasm`).
pub fn build_worker(variant: Variant) -> PathBuf {
    static BUILT: Mutex<Vec<(Variant, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, dir)) = built.iter().find(|(v, _)| *v == variant) {
        return dir.clone();
    }
    let wasm_bindgen = std::env::var_os("WASM_BINDGEN_BIN")
        .map(PathBuf::from)
        .or_else(|| which("wasm-bindgen"))
        .expect(
            "wasm-bindgen is not installed: cargo install wasm-bindgen-cli --version <the \
             wasm-bindgen version in Cargo.lock> (or set WASM_BINDGEN_BIN)",
        );
    let worker_build = which("worker-build")
        .expect("worker-build is not installed: cargo install worker-build --version 0.8.7");
    let esbuild = tools_dir().join("node_modules/@esbuild/linux-x64/bin/esbuild");
    assert!(
        esbuild.exists(),
        "the local Cloudflare's npm packages are missing: (cd {} && npm ci)",
        tools_dir().display()
    );
    let crate_dir = workspace().join("examples/user-profile-worker");
    let out_dir = match variant {
        Variant::Default => "build",
        Variant::Lenient => "build-lenient",
    };
    let mut cmd = Command::new(worker_build);
    cmd.args(["--release", "--out-dir", out_dir, "."]);
    if variant == Variant::Lenient {
        cmd.args(["--features", "lenient"]);
    }
    let out = cmd
        .current_dir(&crate_dir)
        .env("WASM_BINDGEN_BIN", wasm_bindgen)
        .env("ESBUILD_BIN", esbuild)
        .output()
        .expect("run worker-build");
    assert!(
        out.status.success(),
        "worker-build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = crate_dir.join(out_dir);
    assert!(
        dir.join("index_bg.wasm").exists(),
        "no wasm in {}",
        dir.display()
    );
    built.push((variant, dir.clone()));
    dir
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
        .map(|dir| dir.join(tool))
        .find(|p| p.exists())
}

/// A running `local-cloudflare.mjs`, stopped when dropped.
pub struct LocalCloudflare {
    child: tokio::process::Child,
    /// What `CLOUDFLARE_API_BASE_URL` is set to for it.
    pub base_url: String,
    /// The API token it requires.
    pub token: String,
    /// The account id the tests use.
    pub account: String,
    origin: String,
    _state: tempfile::TempDir,
}

impl LocalCloudflare {
    /// Starts the server; deployed Workers' crons fire every
    /// `cron_interval`.
    pub async fn start(cron_interval: Duration) -> Self {
        let state = tempfile::tempdir().expect("a temporary folder");
        let token = format!("token-{}", uuid::Uuid::new_v4().simple());
        let mut child = tokio::process::Command::new("node")
            .arg(tools_dir().join("local-cloudflare.mjs"))
            .current_dir(tools_dir())
            .env("PORT", "0")
            .env("STATE_DIR", state.path())
            .env("API_TOKEN", &token)
            .env("CRON_INTERVAL_MS", cron_interval.as_millis().to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed (the local Cloudflare runs on it)");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the local Cloudflare started within 30 s")
            .expect("its stdout reads")
            .expect("it printed its address");
        let ready: Value = serde_json::from_str(&first).expect("its first line is JSON");
        let base_url = ready["base_url"].as_str().expect("a base_url").to_owned();
        let origin = base_url.trim_end_matches("/client/v4").to_owned();
        LocalCloudflare {
            child,
            base_url,
            token,
            account: "0123456789abcdef0123456789abcdef".to_owned(),
            origin,
            _state: state,
        }
    }

    /// Every API request so far, as the server recorded it.
    pub async fn requests(&self) -> Value {
        self.local("GET", "/__local/requests").await
    }

    /// Forgets the recorded requests.
    pub async fn clear_requests(&self) {
        self.local("DELETE", "/__local/requests").await;
    }

    /// What the server knows of the script `name` (deployed, invocation
    /// counts, logs).
    pub async fn script(&self, name: &str) -> Value {
        self.local("GET", &format!("/__local/scripts/{name}")).await
    }

    async fn local(&self, method: &str, path: &str) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let response = reqwest::Client::new()
            .request(method, format!("{}{path}", self.origin))
            .send()
            .await
            .expect("the local Cloudflare answers");
        let text = response.text().await.expect("a body");
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    /// Stops the server (and every Worker it runs).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
