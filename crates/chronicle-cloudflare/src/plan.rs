//! What `deploy` will do for one projection: the Worker's modules,
//! bindings, limits and triggers, its queues and consumer, and how each
//! key of the deployment file maps to Cloudflare. Printed by
//! `chronicle deploy --dry-run`; carried out by the adapter.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chronicle_projections::{CLOUDFLARE_MEMORY_MB, ProjectionConfig, Provider};
use serde::Serialize;
use serde_json::{Value, json};

use crate::api::{ConsumerSettings, Module};
use crate::error::{Error, Result};

/// The compatibility date the Worker is deployed with (the workers-rs and
/// workerd releases the Worker runtime is built and tested against).
pub const COMPATIBILITY_DATE: &str = "2026-04-26";

/// The cron trigger: every minute, the safety net under the queue wakes.
pub const CRON: &str = "* * * * *";

/// The secret with the database URL a Worker without Hyperdrive gets.
pub const DATABASE_URL_SECRET: &str = "cloudflare-database-url";

/// How the Worker reaches PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Database {
    /// Through the Hyperdrive configuration with this id, bound as `DB`.
    Hyperdrive {
        /// The configuration's id.
        id: String,
    },
    /// Directly, to the URL in the secret [`DATABASE_URL_SECRET`], bound as
    /// the secret `DATABASE_URL`.
    Secret,
}

/// A module of the bundle, as planned (its bytes are read at upload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedModule {
    /// Its name in the upload.
    pub name: String,
    /// Its content type.
    pub content_type: &'static str,
    /// Its size in bytes.
    pub size: u64,
}

/// How one key of the deployment file maps to Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitMapping {
    /// The key, e.g. `config.timeout`.
    pub key: &'static str,
    /// Its value (or the default's).
    pub value: String,
    /// What it becomes on Cloudflare.
    pub cloudflare: String,
}

/// Everything `deploy` sets up for one projection on Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerPlan {
    /// The projection.
    pub projection: String,
    /// The Worker's name: `chronicle-<projection>`.
    pub script: String,
    /// The worker-build output folder uploaded.
    pub bundle: PathBuf,
    /// The modules uploaded.
    pub modules: Vec<PlannedModule>,
    /// The entry module.
    pub main_module: String,
    /// The compatibility date.
    pub compatibility_date: String,
    /// The cron triggers.
    pub crons: Vec<String>,
    /// The Worker's CPU limit per invocation, in milliseconds.
    pub cpu_ms: u64,
    /// The plain-text variables (the projection's options, the budget,
    /// the lease owner).
    pub vars: BTreeMap<String, String>,
    /// How it reaches PostgreSQL.
    pub database: Database,
    /// The queue whose messages wake it for a partition.
    pub wake_queue: String,
    /// Where wake messages go after their retries.
    pub dead_letter_queue: String,
    /// The consumer's settings.
    pub consumer: ConsumerSettings,
    /// How each key of the deployment file maps.
    pub limits: Vec<LimitMapping>,
}

/// The Worker's name for `projection`.
///
/// ```
/// assert_eq!(chronicle_cloudflare::script_name("user-profile").unwrap(), "chronicle-user-profile");
/// assert!(chronicle_cloudflare::script_name("User Profile").is_err());
/// ```
pub fn script_name(projection: &str) -> Result<String> {
    let script = format!("chronicle-{projection}");
    // Worker and queue names: lower-case letters, digits and dashes, at
    // most 63 characters (the dead-letter queue adds 9 to the script's).
    let ok = projection
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !projection.is_empty()
        && script.len() + "-wake-dlq".len() <= 63;
    if ok {
        Ok(script)
    } else {
        Err(Error::Invalid(format!(
            "projection `{projection}` cannot name a Cloudflare Worker: use lower-case letters, \
             digits and dashes, at most {} characters",
            63 - "chronicle--wake-dlq".len()
        )))
    }
}

/// The wake queue's and its dead-letter queue's names for `script`.
pub(crate) fn queue_names(script: &str) -> (String, String) {
    (format!("{script}-wake"), format!("{script}-wake-dlq"))
}

/// The lease owner a deployed Worker writes into `projection_state`.
pub(crate) fn worker_id(script: &str) -> String {
    format!("cloudflare/{script}")
}

impl WorkerPlan {
    /// The plan for `config` (a `provider: cloudflare` projection) with
    /// the worker-build output in `bundle` (`index.js` and its WebAssembly
    /// module).
    pub fn new(config: &ProjectionConfig, bundle: &Path) -> Result<Self> {
        if config.provider != Provider::Cloudflare {
            return Err(Error::Invalid(format!(
                "projection `{}` has provider `{}`; the Cloudflare adapter deploys `provider: cloudflare`",
                config.name, config.provider
            )));
        }
        let script = script_name(&config.name)?;
        let (wake_queue, dead_letter_queue) = queue_names(&script);
        let modules = read_bundle(bundle)?;
        let options = config.options();
        let cpu_ms = config.timeout.as_millis() as u64;
        // Wall time is at least CPU time: starting no step after four
        // fifths of the CPU limit keeps the last one inside it.
        let budget = Duration::from_millis(cpu_ms * 4 / 5);
        let mut vars: BTreeMap<String, String> = chronicle_step_vars(&options);
        vars.insert(
            chronicle_projections::vars::BUDGET_MS.to_owned(),
            budget.as_millis().to_string(),
        );
        vars.insert(
            chronicle_projections::vars::WORKER_ID.to_owned(),
            worker_id(&script),
        );
        let consumer = ConsumerSettings {
            batch_size: 10,
            max_retries: 3,
            max_wait_time_ms: 1000,
            max_concurrency: config.concurrency,
            retry_delay: 5,
        };
        let limits = vec![
            LimitMapping {
                key: "config.memory",
                value: config
                    .memory_mb
                    .map_or("(not set)".to_owned(), |mb| format!("{mb}MB")),
                cloudflare: format!("{CLOUDFLARE_MEMORY_MB} MB, every Worker's fixed memory"),
            },
            LimitMapping {
                key: "config.timeout",
                value: humanize(config.timeout),
                cloudflare: format!(
                    "limits.cpu_ms = {cpu_ms}; each handler call at most {}; no step starts after {} of an invocation",
                    humanize(config.timeout),
                    humanize(budget)
                ),
            },
            LimitMapping {
                key: "config.concurrency",
                value: config.concurrency.to_string(),
                cloudflare: format!(
                    "{} partitions; queue consumer max_concurrency = {}",
                    config.concurrency, config.concurrency
                ),
            },
            LimitMapping {
                key: "config.retries",
                value: config.retries.to_string(),
                cloudflare: format!(
                    "{} retries with exponential backoff inside the Worker, then the dead-letter table",
                    config.retries
                ),
            },
            LimitMapping {
                key: "config.batch_size",
                value: config.batch_size.to_string(),
                cloudflare: format!("{} events per step", config.batch_size),
            },
        ];
        Ok(WorkerPlan {
            projection: config.name.clone(),
            script,
            bundle: bundle.to_path_buf(),
            modules,
            main_module: "index.js".to_owned(),
            compatibility_date: COMPATIBILITY_DATE.to_owned(),
            crons: vec![CRON.to_owned()],
            cpu_ms,
            vars,
            database: match &config.hyperdrive {
                Some(id) => Database::Hyperdrive { id: id.clone() },
                None => Database::Secret,
            },
            wake_queue,
            dead_letter_queue,
            consumer,
            limits,
        })
    }

    /// The upload's `metadata` part; `database_url` is the secret's value
    /// when the Worker reaches PostgreSQL without Hyperdrive.
    pub fn metadata(&self, database_url: Option<&str>) -> Value {
        let mut bindings: Vec<Value> = self
            .vars
            .iter()
            .map(|(name, text)| json!({ "type": "plain_text", "name": name, "text": text }))
            .collect();
        match (&self.database, database_url) {
            (Database::Hyperdrive { id }, _) => {
                bindings.push(json!({ "type": "hyperdrive", "name": "DB", "id": id }));
            }
            (Database::Secret, Some(url)) => {
                bindings
                    .push(json!({ "type": "secret_text", "name": "DATABASE_URL", "text": url }));
            }
            (Database::Secret, None) => {}
        }
        json!({
            "main_module": self.main_module,
            "compatibility_date": self.compatibility_date,
            "compatibility_flags": [],
            "bindings": bindings,
            "limits": { "cpu_ms": self.cpu_ms },
        })
    }

    /// The modules with their bytes.
    pub fn read_modules(&self) -> Result<Vec<Module>> {
        self.modules
            .iter()
            .map(|m| {
                let path = self.bundle.join(&m.name);
                let bytes = std::fs::read(&path).map_err(|e| Error::Bundle {
                    path: path.clone(),
                    reason: format!("cannot be read: {e}"),
                })?;
                Ok(Module {
                    name: m.name.clone(),
                    content_type: m.content_type,
                    bytes,
                })
            })
            .collect()
    }
}

fn chronicle_step_vars(
    options: &chronicle_projections::ProjectionOptions,
) -> BTreeMap<String, String> {
    chronicle_projections::vars::to_vars(options)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// The modules of a worker-build output folder: `index.js` (the entry,
/// an ES module) and the WebAssembly and JavaScript modules beside it.
fn read_bundle(bundle: &Path) -> Result<Vec<PlannedModule>> {
    let hint = "build the Worker with `worker-build --release` in its crate (the output is its `build` folder)";
    let entries = std::fs::read_dir(bundle).map_err(|e| Error::Bundle {
        path: bundle.to_path_buf(),
        reason: format!("cannot be read ({e}); {hint}"),
    })?;
    let mut modules = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::Bundle {
            path: bundle.to_path_buf(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let content_type = match Path::new(&name).extension().and_then(|e| e.to_str()) {
            Some("js" | "mjs") => "application/javascript+module",
            Some("wasm") => "application/wasm",
            _ => continue,
        };
        let meta = entry.metadata().map_err(|e| Error::Bundle {
            path: entry.path(),
            reason: e.to_string(),
        })?;
        if meta.is_file() {
            modules.push(PlannedModule {
                name,
                content_type,
                size: meta.len(),
            });
        }
    }
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    if !modules.iter().any(|m| m.name == "index.js") {
        return Err(Error::Bundle {
            path: bundle.to_path_buf(),
            reason: format!("has no index.js; {hint}"),
        });
    }
    if !modules.iter().any(|m| m.content_type == "application/wasm") {
        return Err(Error::Bundle {
            path: bundle.to_path_buf(),
            reason: format!("has no WebAssembly module; {hint}"),
        });
    }
    Ok(modules)
}

fn humanize(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl fmt::Display for WorkerPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "projection {} -> Cloudflare Worker `{}`",
            self.projection, self.script
        )?;
        writeln!(f, "  upload ({}):", self.bundle.display())?;
        for m in &self.modules {
            let main = if m.name == self.main_module {
                ", main module"
            } else {
                ""
            };
            writeln!(
                f,
                "    {} ({}, {} bytes{main})",
                m.name, m.content_type, m.size
            )?;
        }
        writeln!(f, "  compatibility date: {}", self.compatibility_date)?;
        writeln!(f, "  cron trigger: {}", self.crons.join(", "))?;
        writeln!(
            f,
            "  queue consumer: {} (batch {}, max_concurrency {}, {} retries, dead-letter queue {})",
            self.wake_queue,
            self.consumer.batch_size,
            self.consumer.max_concurrency,
            self.consumer.max_retries,
            self.dead_letter_queue
        )?;
        match &self.database {
            Database::Hyperdrive { id } => writeln!(f, "  database: Hyperdrive {id}, bound as DB")?,
            Database::Secret => writeln!(
                f,
                "  database: the secret `{DATABASE_URL_SECRET}`, bound as the secret DATABASE_URL"
            )?,
        }
        writeln!(f, "  variables:")?;
        for (k, v) in &self.vars {
            writeln!(f, "    {k} = {v}")?;
        }
        writeln!(f, "  limits:")?;
        for l in &self.limits {
            writeln!(f, "    {} = {}: {}", l.key, l.value, l.cloudflare)?;
        }
        Ok(())
    }
}
