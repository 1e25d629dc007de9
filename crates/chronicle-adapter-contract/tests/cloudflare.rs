//! The adapter contract against [`CloudflareWorkerAdapter`], on a local
//! Cloudflare: the API v4 server in `tools/cloudflare-local` validates
//! every call the adapter makes and runs the uploaded Worker in Miniflare
//! (workerd), which reaches the test database over TCP. Also: the
//! adapter's requests match what `wrangler deploy` sends for the same
//! Worker, field by field.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_adapter_contract::cloudflare::{LocalCloudflare, Variant, build_worker};
use chronicle_adapter_contract::{Subject, run};
use chronicle_cloudflare::{CloudflareApi, CloudflareWorkerAdapter, WorkerPlan};
use chronicle_core::ProjectionAdapter;
use chronicle_crypto::FileSecrets;
use chronicle_postgres::PgPool;
use chronicle_postgres::testing::fresh_db;
use chronicle_projections::{DeploymentConfig, PgContext};
use serde_json::Value;

/// The deployment file's entry for the Worker.
const YAML: &str = "\
projections:
  user-profile:
    handler: user-profile
    provider: cloudflare
    config:
      memory: '128MB'
      timeout: '10s'
      concurrency: 2
";

struct Cloudflare {
    local: LocalCloudflare,
    pool: PgPool,
    secrets: tempfile::TempDir,
}

impl Cloudflare {
    fn adapter_for(&self, bundle: &Path) -> CloudflareWorkerAdapter {
        let config = DeploymentConfig::from_yaml("chronicle.yaml", YAML).unwrap();
        let plan = WorkerPlan::new(&config.projections["user-profile"], bundle).unwrap();
        let api = CloudflareApi::new(
            &self.local.account,
            &self.local.token,
            Some(&self.local.base_url),
        )
        .unwrap();
        CloudflareWorkerAdapter::new(
            api,
            self.pool.clone(),
            Arc::new(FileSecrets::new(self.secrets.path())),
        )
        .with_plan(plan)
    }
}

#[async_trait]
impl Subject for Cloudflare {
    fn provider(&self) -> &'static str {
        "cloudflare"
    }

    async fn adapter(&self, fixed: bool) -> Arc<dyn ProjectionAdapter<PgContext>> {
        let variant = if fixed {
            Variant::Lenient
        } else {
            Variant::Default
        };
        let bundle = tokio::task::spawn_blocking(move || build_worker(variant))
            .await
            .unwrap();
        Arc::new(self.adapter_for(&bundle))
    }
}

async fn cloudflare(db: &chronicle_postgres::testing::TestDb) -> Cloudflare {
    let local = LocalCloudflare::start(Duration::from_millis(300)).await;
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(
        secrets.path().join("cloudflare-database-url"),
        db.tcp_url().await,
    )
    .unwrap();
    Cloudflare {
        local,
        pool: db.pool.clone(),
        secrets,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudflare_adapter_passes_the_contract() {
    let db = fresh_db().await;
    let subject = cloudflare(&db).await;
    run(&subject, &db).await;
    let script = subject.local.script("chronicle-user-profile").await;
    assert_eq!(script["deployed"], false, "undeployed: {script}");
    subject.local.stop().await;
}

/// The request `method path` in a recorded log; fails naming what the
/// log holds.
fn find<'a>(log: &'a [Value], method: &str, path: &str) -> &'a Value {
    log.iter()
        .find(|r| r["method"] == method && r["path"] == path)
        .unwrap_or_else(|| {
            let seen: Vec<String> = log
                .iter()
                .map(|r| format!("{} {}", r["method"], r["path"]))
                .collect();
            panic!("no {method} {path} among {seen:#?}")
        })
}

/// The multipart parts of an upload without the metadata, as (name,
/// filename, content type).
fn modules(upload: &Value) -> Vec<(String, String, String)> {
    let mut parts: Vec<_> = upload["parts"]
        .as_array()
        .expect("a multipart upload")
        .iter()
        .filter(|p| p["name"] != "metadata")
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                p["filename"].as_str().unwrap_or("").to_owned(),
                p["content_type"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    parts.sort();
    parts
}

fn metadata(upload: &Value) -> Value {
    upload["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metadata")
        .expect("a metadata part")["json"]
        .clone()
}

/// Every binding as (type, name, value), sorted.
fn bindings(metadata: &Value) -> Vec<(String, String, String)> {
    let mut b: Vec<_> = metadata["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap_or("").to_owned(),
                b["name"].as_str().unwrap_or("").to_owned(),
                b["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    b.sort();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapters_deploy_requests_match_what_wrangler_sends() {
    let db = fresh_db().await;
    let bundle = tokio::task::spawn_blocking(|| build_worker(Variant::Default))
        .await
        .unwrap();
    let config = DeploymentConfig::from_yaml("chronicle.yaml", YAML).unwrap();
    let plan = WorkerPlan::new(&config.projections["user-profile"], &bundle).unwrap();

    // wrangler deploys the plan's Worker (a wrangler.toml written from it)
    // to one local Cloudflare, the adapter to another: both a first deploy.
    let theirs = LocalCloudflare::start(Duration::from_secs(3600)).await;
    let out = tokio::process::Command::new("node")
        .arg(chronicle_adapter_contract::cloudflare::tools_dir().join("record-wrangler.mjs"))
        .env("PLAN", serde_json::to_string(&plan).unwrap())
        .env("BASE_URL", &theirs.base_url)
        .env("ACCOUNT_ID", &theirs.account)
        .env("API_TOKEN", &theirs.token)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrangler deploy failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrangler: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let wrangler = wrangler["requests"].as_array().unwrap().clone();
    theirs.stop().await;

    let subject = cloudflare(&db).await;
    subject.local.clear_requests().await;
    subject
        .adapter_for(&bundle)
        .apply(&plan)
        .await
        .expect("the adapter deploys");
    let ours = subject.local.requests().await.as_array().unwrap().clone();

    let account = &subject.local.account;
    let script = format!("/accounts/{account}/workers/scripts/{}", plan.script);
    // The upload: same method and path, the same modules with the same
    // names, file names and content types, the same metadata keys and
    // values, the same bindings but the database secret, which wrangler
    // leaves to `wrangler secret put`.
    let (w, o) = (find(&wrangler, "PUT", &script), find(&ours, "PUT", &script));
    assert_eq!(modules(o), modules(w));
    assert_eq!(modules(o).len(), 2, "index.js and the wasm module: {o}");
    let (wm, om) = (metadata(w), metadata(o));
    let keys = |m: &Value| {
        let mut k: Vec<String> = m.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&om), keys(&wm));
    for key in [
        "main_module",
        "compatibility_date",
        "compatibility_flags",
        "limits",
    ] {
        assert_eq!(om[key], wm[key], "metadata.{key}");
    }
    let mut expected = bindings(&wm);
    expected.push((
        "secret_text".to_owned(),
        "DATABASE_URL".to_owned(),
        String::new(),
    ));
    let ours_bindings: Vec<_> = bindings(&om)
        .into_iter()
        .map(|(t, n, v)| {
            if t == "secret_text" {
                (t, n, String::new())
            } else {
                (t, n, v)
            }
        })
        .collect();
    expected.sort();
    assert_eq!(ours_bindings, expected);
    // The cron trigger.
    let schedules = format!("{script}/schedules");
    assert_eq!(
        find(&ours, "PUT", &schedules)["json"],
        find(&wrangler, "PUT", &schedules)["json"]
    );
    // The consumer: the same body on the same queue's path (queue ids
    // differ between the two servers).
    let consumer = |log: &[Value]| -> Value {
        log.iter()
            .find(|r| {
                r["method"] == "POST"
                    && r["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/consumers"))
            })
            .unwrap_or_else(|| panic!("no consumer created"))["json"]
            .clone()
    };
    assert_eq!(consumer(&ours), consumer(&wrangler));
    // What wrangler does besides: reads of the deployment state, and the
    // workers.dev subdomain (turned off; a projection Worker serves no
    // HTTP). Nothing else.
    // Queue ids differ between the two servers: compare the paths with
    // the id taken out, and the script's path named SCRIPT.
    let call = |r: &Value| {
        let path = r["path"].as_str().unwrap().replace(&script, "SCRIPT");
        let path = match path.split_once("/queues/") {
            Some((head, tail)) => {
                let rest = tail.split_once('/').map_or("", |(_, rest)| rest);
                format!("{head}/queues/ID/{rest}")
            }
            None => path,
        };
        format!("{} {path}", r["method"].as_str().unwrap())
    };
    let ours_calls: std::collections::BTreeSet<String> = ours.iter().map(call).collect();
    let only_wrangler: std::collections::BTreeSet<String> = wrangler
        .iter()
        .map(call)
        .filter(|c| !ours_calls.contains(c))
        .collect();
    let documented: std::collections::BTreeSet<String> = [
        "GET SCRIPT/deployments",
        "GET SCRIPT/settings",
        "GET SCRIPT/subdomain",
        "POST SCRIPT/subdomain",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert!(
        only_wrangler.is_subset(&documented),
        "wrangler calls the adapter does not make: {only_wrangler:#?}"
    );
    subject.local.stop().await;
}
