//! The deployment configuration: the spec's YAML, validated, with errors
//! that name the line, column and key.
//!
//! ```yaml
//! projections:
//!   user-profile:
//!     handler: './src/projections/user-profile'
//!     provider: 'local'      # or 'cloudflare'
//!     config:
//!       timeout: '30s'
//!       concurrency: 10
//!       retries: 3
//!       batch_size: 500
//!     subscribe:             # optional: in place of the handler's own
//!       aggregate_types: [user]
//!       event_types: [UserRegistered, EmailChanged]
//! ```
//!
//! Every key is either honoured or refused where it is written:
//!
//! - `handler` names a handler registered in the binary
//!   ([`HandlerRegistry`]); a path is matched by its last segment, so the
//!   spec's `./src/projections/user-profile` finds `user-profile`.
//! - `provider` is `local` (the default: the workers run in this process)
//!   or `cloudflare` (a Worker on a cron trigger and a queue consumer,
//!   deployed by `chronicle deploy`). `lambda` and `vercel` are refused
//!   until their adapters exist ("provider `lambda` has no adapter in this
//!   build; use `local` or `cloudflare`").
//! - `config.concurrency` is the partition count (default 4), and on
//!   Cloudflare also the queue consumer's `max_concurrency` (at most 250);
//!   `config.timeout` bounds one handler call (default 30s), and on
//!   Cloudflare is the Worker's CPU limit (at most 30s: the limit of a
//!   Cron Trigger that fires more often than hourly);
//!   `config.retries` is the retries before dead-lettering (default 3);
//!   `config.batch_size` is the events per step (default 500).
//! - `config.lease` is how long a partition's lease lasts without renewal
//!   (default 30s): a worker that dies is taken over once it expires, at
//!   the other workers' next poll. `config.heartbeat` is how often a
//!   worker renews its leases (default and most: a third of the lease),
//!   `config.poll_interval` how often an idle partition looks for work
//!   (default 250ms). All three are for `local` only (a Cloudflare Worker
//!   runs its steps on its triggers with the default lease), and are
//!   refused for `cloudflare`. A shorter lease means a faster takeover
//!   and more renewals; see docs/operations.md.
//! - `config.memory` is refused for `local` (a local worker runs in this
//!   process); on Cloudflare every Worker has 128 MB, so `128MB` is
//!   accepted and any other size refused.
//! - `worker` (Cloudflare only) is the folder of the Worker's crate, the
//!   small crate that hands the handler to
//!   `chronicle_worker::projection_worker!`; `chronicle deploy` uploads its
//!   worker-build output (`<worker>/build`).
//! - `config.hyperdrive` (Cloudflare only) is the id of the Hyperdrive
//!   configuration the Worker reaches PostgreSQL through; without it the
//!   Worker gets the database URL as a secret.
//! - `subscribe` overrides the handler's
//!   [`ProjectionHandler::subscription`]: the events it lists are the ones
//!   the projection reads (either list may be left out; one of them is
//!   needed). Changing it later needs a rebuild.
//! - `dead_letters` (top level) chooses where dead letters are kept:
//!   PostgreSQL (the default) or a broker; see [`crate::DeadLetterBackend`]
//!   for its keys.
//!
//! Unknown keys are refused with a hint to check their spelling.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chronicle_core::{ProjectionHandler, Subscription};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::{PgContext, ProjectionOptions, RetryPolicy, RunnerOptions, SharedHandler};

/// A refused deployment configuration: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    /// The source (usually the file name).
    pub origin: String,
    /// The line (1-based; 0 when unknown).
    pub line: u64,
    /// The column (1-based; 0 when unknown).
    pub column: u64,
    /// The key, e.g. `projections.user-profile.config.concurrency`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Where a projection runs. [`Provider::Local`] and
/// [`Provider::Cloudflare`] have adapters in this build
/// ([`Provider::has_adapter`]); a configuration naming another one is
/// refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// In this process ([`crate::LocalAdapter`]).
    #[default]
    Local,
    /// Cloudflare Workers (`chronicle_cloudflare::CloudflareWorkerAdapter`).
    Cloudflare,
    /// AWS Lambda.
    Lambda,
    /// Vercel functions.
    Vercel,
}

impl Provider {
    const ALL: [(&'static str, Provider); 4] = [
        ("local", Provider::Local),
        ("cloudflare", Provider::Cloudflare),
        ("lambda", Provider::Lambda),
        ("vercel", Provider::Vercel),
    ];

    /// Whether this build can run a projection on this provider:
    /// [`Provider::Local`] and [`Provider::Cloudflare`].
    ///
    /// ```
    /// use chronicle_projections::Provider;
    ///
    /// assert!(Provider::Cloudflare.has_adapter());
    /// assert!(!Provider::Lambda.has_adapter());
    /// ```
    pub fn has_adapter(self) -> bool {
        matches!(self, Provider::Local | Provider::Cloudflare)
    }

    /// The provider's name in the configuration.
    pub fn as_str(self) -> &'static str {
        Provider::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("local", |(name, _)| name)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One projection's deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionConfig {
    /// The projection's name (its key under `projections`).
    pub name: String,
    /// The handler, as written.
    pub handler: String,
    /// Where it runs (default `local`).
    pub provider: Provider,
    /// How long one handler call may take (default 30 s).
    pub timeout: Duration,
    /// Partitions, the most workers in parallel (default 4).
    pub concurrency: u32,
    /// The worker's memory in MB, where the provider sizes it (`None`: the
    /// provider's default; Cloudflare's only size is 128).
    pub memory_mb: Option<u32>,
    /// The Hyperdrive configuration a Cloudflare Worker reaches PostgreSQL
    /// through (`None`: the database URL, as a secret).
    pub hyperdrive: Option<String>,
    /// The crate of a Cloudflare Worker that runs the handler, as written
    /// (relative to the file); `deploy` uploads its worker-build output,
    /// `<worker>/build`.
    pub worker: Option<String>,
    /// Retries before dead-lettering (default 3).
    pub retries: u32,
    /// Events per step (default 500).
    pub batch_size: u32,
    /// The events it consumes, in place of the handler's own (`None`: the
    /// handler's).
    pub subscription: Option<Subscription>,
    /// How long a partition lease lasts without renewal (default 30 s).
    pub lease: Duration,
    /// How often a worker renews the leases it holds (`None`: a third of
    /// `lease`; at most that).
    pub heartbeat: Option<Duration>,
    /// How often an idle partition polls for work (default 250 ms).
    pub poll_interval: Duration,
    /// The line where the projection is defined.
    pub line: u64,
    /// The line of `config.concurrency` (`None`: not set, so the default).
    pub concurrency_line: Option<u64>,
}

impl ProjectionConfig {
    /// The runtime options this deployment asks for.
    pub fn options(&self) -> ProjectionOptions {
        ProjectionOptions {
            partitions: self.concurrency,
            batch_size: self.batch_size,
            handler_timeout: self.timeout,
            retry: RetryPolicy {
                max_retries: self.retries,
                ..RetryPolicy::default()
            },
            subscription: self.subscription.clone(),
            lease_ttl: self.lease,
            ..ProjectionOptions::default()
        }
    }

    /// The runner options this deployment asks for (its heartbeat and poll
    /// intervals), over `base` for the rest.
    pub fn runner_options(&self, base: RunnerOptions) -> RunnerOptions {
        RunnerOptions {
            heartbeat_interval: self.heartbeat,
            poll_interval: self.poll_interval,
            ..base
        }
    }

    /// The name `handler` is looked up by: its last path segment, without
    /// an extension.
    pub fn handler_name(&self) -> &str {
        let last = self
            .handler
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(&self.handler);
        last.split_once('.').map_or(last, |(stem, _)| stem)
    }
}

/// The deployment configuration: every projection, by name, and where
/// their dead letters are kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentConfig {
    /// The projections, ordered by name.
    pub projections: BTreeMap<String, ProjectionConfig>,
    /// `dead_letters:` (default: PostgreSQL); see [`crate::DeadLetterBackend`].
    pub dead_letters: crate::DeadLetterConfig,
}

/// The handlers compiled into a binary, by name.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: BTreeMap<String, SharedHandler>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        HandlerRegistry::default()
    }

    /// Registers `handler` under its [`ProjectionHandler::name`].
    pub fn register(&mut self, handler: impl ProjectionHandler<PgContext> + 'static) -> &mut Self {
        self.handlers
            .insert(handler.name().to_owned(), Arc::new(handler));
        self
    }

    /// The handler registered as `name`.
    pub fn get(&self, name: &str) -> Option<SharedHandler> {
        self.handlers.get(name).cloned()
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    projections: Spanned<BTreeMap<String, Spanned<RawProjection>>>,
    #[serde(default)]
    dead_letters: Option<Spanned<crate::dlq_config::RawDeadLetters>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProjection {
    handler: Spanned<String>,
    #[serde(default)]
    provider: Option<Spanned<String>>,
    #[serde(default)]
    worker: Option<Spanned<String>>,
    #[serde(default)]
    config: Option<Spanned<RawSettings>>,
    #[serde(default)]
    subscribe: Option<Spanned<RawSubscription>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    #[serde(default)]
    event_types: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    aggregate_types: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    memory: Option<Spanned<Scalar>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    hyperdrive: Option<Spanned<String>>,
    #[serde(default)]
    retries: Option<Spanned<i64>>,
    #[serde(default)]
    batch_size: Option<Spanned<i64>>,
    #[serde(default)]
    lease: Option<Spanned<String>>,
    #[serde(default)]
    heartbeat: Option<Spanned<String>>,
    #[serde(default)]
    poll_interval: Option<Spanned<String>>,
}

/// A YAML scalar read as written (`128` or `'128MB'`), to be judged with
/// its line in hand.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(i64),
    Text(String),
}

impl DeploymentConfig {
    /// Reads and validates the YAML. `origin` names the source in errors
    /// (usually the file name).
    ///
    /// ```
    /// use chronicle_projections::DeploymentConfig;
    ///
    /// let yaml = "projections:\n  user-profile:\n    handler: './src/projections/user-profile'\n    provider: 'local'\n    config:\n      timeout: '30s'\n      concurrency: 10\n";
    /// let config = DeploymentConfig::from_yaml("chronicle.yaml", yaml).unwrap();
    /// let p = &config.projections["user-profile"];
    /// assert_eq!((p.concurrency, p.handler_name()), (10, "user-profile"));
    ///
    /// let err = DeploymentConfig::from_yaml("chronicle.yaml", &yaml.replace("10", "0")).unwrap_err();
    /// assert_eq!((err.line, err.key.as_str()), (7, "projections.user-profile.config.concurrency"));
    ///
    /// let err = DeploymentConfig::from_yaml("chronicle.yaml", &yaml.replace("'local'", "'lambda'")).unwrap_err();
    /// assert_eq!((err.line, err.key.as_str()), (4, "projections.user-profile.provider"));
    /// assert_eq!(err.message, "provider `lambda` has no adapter in this build; use `local` or `cloudflare`");
    ///
    /// let cloudflare = yaml.replace("'local'", "'cloudflare'").replace("30s", "45s");
    /// let err = DeploymentConfig::from_yaml("chronicle.yaml", &cloudflare).unwrap_err();
    /// assert_eq!((err.line, err.key.as_str()), (6, "projections.user-profile.config.timeout"));
    /// assert!(err.message.contains("30s"), "{}", err.message);
    /// ```
    pub fn from_yaml(origin: &str, yaml: &str) -> Result<Self, ConfigError> {
        let at = |loc: &Location, key: &str, message: String| ConfigError {
            origin: origin.to_owned(),
            line: loc.line(),
            column: loc.column(),
            key: key.to_owned(),
            message,
        };
        let raw: RawFile = parse_yaml(origin, yaml)?;
        let mut config = DeploymentConfig::default();
        if let Some(d) = raw.dead_letters {
            config.dead_letters = d.value.resolve(&d.referenced, &at)?;
        }
        if raw.projections.value.is_empty() {
            return Err(at(
                &raw.projections.referenced,
                "projections",
                "no projection is defined; add one under `projections:`".to_owned(),
            ));
        }
        for (name, spanned) in raw.projections.value {
            let key = |k: &str| format!("projections.{name}{k}");
            let p = spanned.value;
            if name.trim().is_empty() {
                return Err(at(
                    &spanned.referenced,
                    &key(""),
                    "the name is empty".to_owned(),
                ));
            }
            if p.handler.value.trim().is_empty() {
                return Err(at(
                    &p.handler.referenced,
                    &key(".handler"),
                    "is empty; name a handler registered in the binary".to_owned(),
                ));
            }
            let provider = match &p.provider {
                None => Provider::Local,
                Some(s) => Provider::ALL
                    .iter()
                    .find(|(n, _)| *n == s.value)
                    .map(|(_, p)| *p)
                    .ok_or_else(|| {
                        at(
                            &s.referenced,
                            &key(".provider"),
                            format!(
                                "unknown provider `{}`; use `local` or `cloudflare` (lambda and \
                                 vercel are known but have no adapter in this build)",
                                s.value
                            ),
                        )
                    })?,
            };
            if !provider.has_adapter() {
                let at_provider = p
                    .provider
                    .as_ref()
                    .map_or(&spanned.referenced, |s| &s.referenced);
                return Err(at(
                    at_provider,
                    &key(".provider"),
                    format!(
                        "provider `{provider}` has no adapter in this build; use `local` or `cloudflare`"
                    ),
                ));
            }
            let mut projection = ProjectionConfig {
                name: name.clone(),
                handler: p.handler.value.clone(),
                provider,
                timeout: Duration::from_secs(30),
                concurrency: 4,
                memory_mb: None,
                hyperdrive: None,
                worker: None,
                retries: 3,
                batch_size: 500,
                subscription: None,
                lease: LEASE,
                heartbeat: None,
                poll_interval: POLL_INTERVAL,
                line: spanned.referenced.line(),
                concurrency_line: None,
            };
            if let Some(worker) = p.worker {
                if provider != Provider::Cloudflare {
                    return Err(at(
                        &worker.referenced,
                        &key(".worker"),
                        format!(
                            "does not apply to provider `{provider}`: it names the crate of a \
                             Cloudflare Worker. Remove the key"
                        ),
                    ));
                }
                if worker.value.trim().is_empty() {
                    return Err(at(
                        &worker.referenced,
                        &key(".worker"),
                        "is empty; name the folder of the Worker's crate".to_owned(),
                    ));
                }
                projection.worker = Some(worker.value.trim().to_owned());
            }
            if let Some(subscribe) = p.subscribe {
                projection.subscription =
                    Some(subscription(subscribe, &|loc, k, m| at(loc, &key(k), m))?);
            }
            if let Some(settings) = p.config.map(|c| c.value) {
                let cloudflare = provider == Provider::Cloudflare;
                if let Some(m) = &settings.memory {
                    let k = key(".config.memory");
                    if !cloudflare {
                        return Err(at(
                            &m.referenced,
                            &k,
                            format!(
                                "does not apply to provider `{provider}`: a local worker runs in \
                                 this process and has its memory; `memory` sizes a serverless \
                                 worker (cloudflare, lambda, vercel). Remove the key"
                            ),
                        ));
                    }
                    let mb = match &m.value {
                        Scalar::Text(text) => parse_megabytes(text),
                        Scalar::Number(n) => Err(format!("`{n}` has no unit; write e.g. '128MB'")),
                    }
                    .map_err(|e| at(&m.referenced, &k, e))?;
                    if mb != CLOUDFLARE_MEMORY_MB {
                        return Err(at(
                            &m.referenced,
                            &k,
                            format!(
                                "is {mb}MB, but Cloudflare gives every Worker {CLOUDFLARE_MEMORY_MB}MB, \
                                 no more and no less; write '{CLOUDFLARE_MEMORY_MB}MB' or remove the key"
                            ),
                        ));
                    }
                    projection.memory_mb = Some(mb);
                }
                if let Some(h) = settings.hyperdrive {
                    let k = key(".config.hyperdrive");
                    if !cloudflare {
                        return Err(at(
                            &h.referenced,
                            &k,
                            format!(
                                "does not apply to provider `{provider}`: Hyperdrive is how a \
                                 Cloudflare Worker reaches PostgreSQL. Remove the key"
                            ),
                        ));
                    }
                    let id = h.value.trim();
                    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(at(
                            &h.referenced,
                            &k,
                            format!(
                                "`{id}` is not a Hyperdrive configuration id (32 hexadecimal \
                                 digits, as `wrangler hyperdrive list` shows)"
                            ),
                        ));
                    }
                    projection.hyperdrive = Some(id.to_ascii_lowercase());
                }
                if let Some(t) = settings.timeout {
                    let k = key(".config.timeout");
                    projection.timeout =
                        parse_duration(&t.value).map_err(|e| at(&t.referenced, &k, e))?;
                    if cloudflare && projection.timeout > CLOUDFLARE_CRON_CPU {
                        return Err(at(
                            &t.referenced,
                            &k,
                            format!(
                                "is {}, above Cloudflare's ceiling: a Worker on a Cron Trigger that \
                                 fires more often than hourly gets at most 30s of CPU time; write \
                                 '30s' or less",
                                t.value.trim()
                            ),
                        ));
                    }
                }
                let bounded = |v: &Spanned<i64>, k: &str, min: i64, max: i64| {
                    if (min..=max).contains(&v.value) {
                        Ok(v.value as u32)
                    } else {
                        Err(at(
                            &v.referenced,
                            &key(k),
                            format!("is {}; it must be between {min} and {max}", v.value),
                        ))
                    }
                };
                if let Some(c) = &settings.concurrency {
                    if cloudflare && c.value > i64::from(CLOUDFLARE_MAX_CONCURRENCY) {
                        return Err(at(
                            &c.referenced,
                            &key(".config.concurrency"),
                            format!(
                                "is {}, above Cloudflare's limit: a queue consumer runs at most \
                                 {CLOUDFLARE_MAX_CONCURRENCY} invocations at once (max_concurrency)",
                                c.value
                            ),
                        ));
                    }
                    projection.concurrency = bounded(c, ".config.concurrency", 1, 4096)?;
                    projection.concurrency_line = Some(c.referenced.line());
                }
                if let Some(r) = &settings.retries {
                    projection.retries = bounded(r, ".config.retries", 0, 100)?;
                }
                if let Some(b) = &settings.batch_size {
                    projection.batch_size = bounded(b, ".config.batch_size", 1, 100_000)?;
                }
                let lease_keys = [
                    ("lease", &settings.lease),
                    ("heartbeat", &settings.heartbeat),
                    ("poll_interval", &settings.poll_interval),
                ];
                for (name, value) in lease_keys {
                    let Some(v) = value else { continue };
                    let k = key(&format!(".config.{name}"));
                    if cloudflare {
                        return Err(at(
                            &v.referenced,
                            &k,
                            format!(
                                "does not apply to provider `{provider}`: a Cloudflare Worker steps \
                                 on its cron trigger and queue with the default lease (30s) and no \
                                 polling loop. Remove the key"
                            ),
                        ));
                    }
                    let d = parse_duration(&v.value).map_err(|e| at(&v.referenced, &k, e))?;
                    match name {
                        "lease" if d < Duration::from_secs(1) => {
                            return Err(at(
                                &v.referenced,
                                &k,
                                format!(
                                    "is {}; a lease must last at least 1s, or a slow step or \
                                     renewal lets it lapse",
                                    v.value.trim()
                                ),
                            ));
                        }
                        "lease" => projection.lease = d,
                        "heartbeat" => projection.heartbeat = Some(d),
                        _ => projection.poll_interval = d,
                    }
                }
                if let (Some(heartbeat), Some(h)) = (projection.heartbeat, &settings.heartbeat)
                    && heartbeat * 3 > projection.lease
                {
                    return Err(at(
                        &h.referenced,
                        &key(".config.heartbeat"),
                        format!(
                            "the heartbeat ({}) must be at most a third of the lease ({}), so \
                             that a late renewal does not let a live worker's lease lapse; \
                             shorten the heartbeat or lengthen the lease",
                            humantime::format_duration(heartbeat),
                            humantime::format_duration(projection.lease)
                        ),
                    ));
                }
            }
            config.projections.insert(name, projection);
        }
        Ok(config)
    }

    /// Pairs every projection with its registered handler. Fails naming the
    /// line of a projection whose handler is not registered, or whose
    /// handler runs under another name.
    pub fn resolve(
        &self,
        origin: &str,
        registry: &HandlerRegistry,
    ) -> Result<Vec<(ProjectionConfig, SharedHandler)>, ConfigError> {
        self.projections
            .values()
            .map(|p| {
                let err = |message: String| ConfigError {
                    origin: origin.to_owned(),
                    line: p.line,
                    column: 0,
                    key: format!("projections.{}.handler", p.name),
                    message,
                };
                let handler = registry
                    .get(&p.handler)
                    .or_else(|| registry.get(p.handler_name()))
                    .ok_or_else(|| {
                        let known: Vec<_> = registry.names().collect();
                        err(format!(
                            "no handler `{}` is registered in this binary (registered: {})",
                            p.handler_name(),
                            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                        ))
                    })?;
                if handler.name() != p.name {
                    return Err(err(format!(
                        "handler `{}` runs the projection `{}`; name the key `{}` or register a handler named `{}`",
                        p.handler_name(),
                        handler.name(),
                        handler.name(),
                        p.name
                    )));
                }
                Ok((p.clone(), handler))
            })
            .collect()
    }
}

/// A `subscribe:` block: at least one list, no empty list, every name one
/// an event can carry.
fn subscription(
    raw: Spanned<RawSubscription>,
    at: &dyn Fn(&Location, &str, String) -> ConfigError,
) -> Result<Subscription, ConfigError> {
    let RawSubscription {
        event_types,
        aggregate_types,
    } = raw.value;
    if event_types.is_none() && aggregate_types.is_none() {
        return Err(at(
            &raw.referenced,
            ".subscribe",
            "lists nothing; give event_types, aggregate_types or both (leave `subscribe` out to \
             take the handler's own subscription)"
                .to_owned(),
        ));
    }
    let mut subscription = Subscription::all();
    for (list, name, events) in [
        (event_types, "event_types", true),
        (aggregate_types, "aggregate_types", false),
    ] {
        let Some(list) = list else { continue };
        let k = format!(".subscribe.{name}");
        if list.value.is_empty() {
            return Err(at(
                &list.referenced,
                &k,
                "is empty, which would match no event; list at least one type or leave the key out"
                    .to_owned(),
            ));
        }
        let add = |s: Subscription| {
            let types = list.value.iter().cloned();
            if events {
                s.with_event_types(types)
            } else {
                s.with_aggregate_types(types)
            }
        };
        add(Subscription::all())
            .validate()
            .map_err(|e| at(&list.referenced, &k, e.to_string()))?;
        subscription = add(subscription);
    }
    Ok(subscription)
}

/// The memory of every Cloudflare Worker, in MB (fixed by the platform).
pub const CLOUDFLARE_MEMORY_MB: u32 = 128;

/// The CPU time of one invocation of a Worker whose Cron Trigger fires more
/// often than hourly (Workers Paid).
pub const CLOUDFLARE_CRON_CPU: Duration = Duration::from_secs(30);

/// The most concurrent invocations of a Cloudflare Queues consumer.
pub const CLOUDFLARE_MAX_CONCURRENCY: u32 = 250;

/// `128MB`, `128 MB`, `128MiB`, `1GB`: a size in megabytes (MB and MiB are
/// both taken as 2^20 bytes, as the providers' limits are).
fn parse_megabytes(s: &str) -> Result<u32, String> {
    let text = s.trim();
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = text.split_at(digits);
    let factor = match unit.trim().to_ascii_uppercase().as_str() {
        "MB" | "MIB" | "M" => 1,
        "GB" | "GIB" | "G" => 1024,
        _ => 0,
    };
    match number.parse::<u32>() {
        Ok(n) if factor > 0 && n > 0 => n
            .checked_mul(factor)
            .ok_or_else(|| format!("`{text}` is too large")),
        _ => Err(format!("`{text}` is not a size; write e.g. '128MB'")),
    }
}

/// `30s`, `500ms`, `2m`, `1m 30s` (humantime's syntax): more than zero,
/// at most an hour.
/// The default lease (`config.lease`), as [`ProjectionOptions::lease_ttl`].
const LEASE: Duration = Duration::from_secs(30);
/// The default poll interval (`config.poll_interval`), as
/// [`RunnerOptions::poll_interval`].
const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 30s, 500ms, 2m, 1m 30s"))?;
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(format!(
            "`{s}` is impossible; a duration here is more than 0 and at most 1h"
        ));
    }
    Ok(d)
}

/// Reads `yaml` as every Chronicle YAML file is read: strict booleans
/// (only `true` and `false`), unknown keys refused where the type says so,
/// and a syntax or shape error returned as a [`ConfigError`] at its line
/// with a hint.
///
/// ```
/// use chronicle_projections::parse_yaml;
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct File { name: String }
///
/// let file: File = parse_yaml("f.yaml", "name: relay\n").unwrap();
/// assert_eq!(file.name, "relay");
/// let err = parse_yaml::<File>("f.yaml", "nmae: relay\n").err().unwrap();
/// assert_eq!(err.line, 1);
/// assert!(err.message.contains("check the spelling"), "{}", err.message);
/// ```
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    origin: &str,
    yaml: &str,
) -> Result<T, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(yaml, options).map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        ConfigError {
            origin: origin.to_owned(),
            line: loc.line(),
            column: loc.column(),
            key: String::new(),
            message: hint(&e.to_string()),
        }
    })
}

fn hint(message: &str) -> String {
    let message = message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i]);
    if message.starts_with("unknown field") {
        format!("{message}; check the spelling of the key")
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's YAML, on the one provider this build runs.
    const SPEC: &str = "\
projections:
  user-profile:
    handler: './src/projections/user-profile'
    provider: 'local' # configurable
    config:
      timeout: '20s'
      concurrency: 10
      retries: 5
      batch_size: 200
";

    fn err(yaml: &str) -> ConfigError {
        DeploymentConfig::from_yaml("chronicle.yaml", yaml).unwrap_err()
    }

    fn load(yaml: &str) -> ProjectionConfig {
        let config = DeploymentConfig::from_yaml("chronicle.yaml", yaml).unwrap();
        config.projections.into_values().next().unwrap()
    }

    #[test]
    fn the_specs_yaml_loads() {
        let p = load(SPEC);
        assert_eq!(p.provider, Provider::Local);
        assert_eq!(p.handler_name(), "user-profile");
        assert_eq!((p.line, p.concurrency_line), (3, Some(7)));
    }

    #[test]
    fn defaults_apply() {
        let p = load("projections:\n  a:\n    handler: a\n");
        assert_eq!(
            (p.provider, p.concurrency, p.retries, p.batch_size),
            (Provider::Local, 4, 3, 500)
        );
        assert_eq!(
            (p.timeout, p.concurrency_line),
            (Duration::from_secs(30), None)
        );
        let o = p.options();
        let d = ProjectionOptions::default();
        assert_eq!(
            (
                o.partitions,
                o.batch_size,
                o.handler_timeout,
                o.retry.max_retries
            ),
            (
                d.partitions,
                d.batch_size,
                d.handler_timeout,
                d.retry.max_retries
            ),
            "an empty config changes nothing"
        );
    }

    // One test per key: honoured (it reaches the runtime's options) or
    // refused where it is written.

    #[test]
    fn keys_lease_heartbeat_and_poll_interval_are_honoured_and_checked() {
        let p = load("projections:\n  a:\n    handler: a\n");
        assert_eq!(
            (p.lease, p.heartbeat, p.poll_interval),
            (LEASE, None, POLL_INTERVAL)
        );
        let base = RunnerOptions::default();
        assert_eq!(
            p.options().lease_ttl,
            ProjectionOptions::default().lease_ttl
        );
        assert_eq!(
            p.runner_options(base.clone()).heartbeat_interval,
            base.heartbeat_interval
        );
        let p = load(
            "projections:\n  a:\n    handler: a\n    config:\n      lease: '6s'\n      \
             heartbeat: '2s'\n      poll_interval: '100ms'\n",
        );
        assert_eq!(p.options().lease_ttl, Duration::from_secs(6));
        let r = p.runner_options(RunnerOptions::default());
        assert_eq!(
            (r.heartbeat_interval, r.poll_interval),
            (Some(Duration::from_secs(2)), Duration::from_millis(100))
        );
        r.validate(p.options().lease_ttl).unwrap();

        // A lease alone: the heartbeat follows it (a third).
        let p = load("projections:\n  a:\n    handler: a\n    config:\n      lease: '3s'\n");
        assert_eq!((p.lease, p.heartbeat), (Duration::from_secs(3), None));
        let refused = [
            // Not well under the default lease (30s).
            (
                "      heartbeat: '15s'\n",
                5,
                "heartbeat",
                "at most a third",
            ),
            ("      lease: '500ms'\n", 5, "lease", "at least 1s"),
            (
                "      poll_interval: 'soon'\n",
                5,
                "poll_interval",
                "not a duration",
            ),
            (
                "      lease: '10s'\n      heartbeat: '4s'\n",
                6,
                "heartbeat",
                "at most a third",
            ),
        ];
        for (settings, line, name, says) in refused {
            let e = err(&format!(
                "projections:\n  a:\n    handler: a\n    config:\n{settings}"
            ));
            assert_eq!(
                (e.line, e.key.as_str()),
                (line, format!("projections.a.config.{name}").as_str()),
                "{e}"
            );
            assert!(e.message.contains(says), "{e}");
        }
        let e = err(&cloudflare("      lease: '10s'\n", "'20s'", 10));
        assert_eq!(e.key, "projections.user-profile.config.lease", "{e}");
        assert!(e.message.contains("does not apply"), "{e}");
    }

    #[test]
    fn key_handler_is_honoured() {
        assert_eq!(load(SPEC).handler, "./src/projections/user-profile");
        let e = err("projections:\n  a:\n    handler: ' '\n");
        assert_eq!(
            (e.line, e.key.as_str()),
            (3, "projections.a.handler"),
            "{e}"
        );
        let e = err("projections:\n  a:\n    provider: local\n");
        assert!(e.message.contains("handler"), "{e}");
    }

    #[test]
    fn key_provider_local_and_cloudflare_are_honoured_and_the_others_are_refused() {
        assert_eq!(
            load("projections:\n  a:\n    handler: a\n    provider: local\n").provider,
            Provider::Local
        );
        assert_eq!(
            load(&SPEC.replace("'local'", "'cloudflare'")).provider,
            Provider::Cloudflare
        );
        for name in ["lambda", "vercel"] {
            let e = err(&SPEC.replace("'local'", &format!("'{name}'")));
            assert_eq!(
                (e.line, e.key.as_str()),
                (4, "projections.user-profile.provider"),
                "{e}"
            );
            assert_eq!(
                e.message,
                format!(
                    "provider `{name}` has no adapter in this build; use `local` or `cloudflare`"
                )
            );
            assert!(e.to_string().starts_with("chronicle.yaml:4:"), "{e}");
        }
        let e = err(&SPEC.replace("'local'", "'azure'"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (4, "projections.user-profile.provider"),
            "{e}"
        );
        assert!(e.message.contains("unknown provider `azure`"), "{e}");
    }

    /// The spec's YAML on Cloudflare, with `extra` lines added under
    /// `config:` and `timeout` and `concurrency` as given.
    fn cloudflare(extra: &str, timeout: &str, concurrency: u32) -> String {
        SPEC.replace("'local'", "'cloudflare'")
            .replace("'20s'", timeout)
            .replace("concurrency: 10", &format!("concurrency: {concurrency}"))
            .replace("    config:\n", &format!("    config:\n{extra}"))
    }

    #[test]
    fn cloudflare_limits_are_mapped_or_refused_where_they_are_written() {
        let p = load(&cloudflare("      memory: '128MB'\n", "'30s'", 250));
        assert_eq!(
            (p.memory_mb, p.timeout, p.concurrency),
            (Some(128), Duration::from_secs(30), 250)
        );
        let refused = [
            (
                cloudflare("      memory: '256MB'\n", "'20s'", 10),
                6,
                "config.memory",
                "Cloudflare gives every Worker 128MB",
            ),
            (
                cloudflare("      memory: 128\n", "'20s'", 10),
                6,
                "config.memory",
                "has no unit",
            ),
            (
                cloudflare("", "'31s'", 10),
                6,
                "config.timeout",
                "at most 30s of CPU time",
            ),
            (
                cloudflare("", "'20s'", 251),
                7,
                "config.concurrency",
                "at most 250 invocations at once",
            ),
            (
                cloudflare("      hyperdrive: 'not-an-id'\n", "'20s'", 10),
                6,
                "config.hyperdrive",
                "32 hexadecimal digits",
            ),
            (
                SPEC.replace(
                    "    config:\n",
                    "    config:\n      hyperdrive: '0123456789abcdef0123456789abcdef'\n",
                ),
                6,
                "config.hyperdrive",
                "does not apply to provider `local`",
            ),
        ];
        for (yaml, line, k, message) in refused {
            let e = err(&yaml);
            assert_eq!(
                (e.line, e.key.as_str()),
                (line, format!("projections.user-profile.{k}").as_str()),
                "{e}"
            );
            assert!(e.message.contains(message), "{e}");
        }
        let e = err(&SPEC.replace("    config:\n", "    worker: ./w\n    config:\n"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "projections.user-profile.worker"),
            "{e}"
        );
        assert!(
            e.message.contains("does not apply to provider `local`"),
            "{e}"
        );
        let p = load(
            &cloudflare("", "'20s'", 10).replace("    config:\n", "    worker: ./w\n    config:\n"),
        );
        assert_eq!(p.worker.as_deref(), Some("./w"));
        let p = load(&cloudflare(
            "      hyperdrive: '0123456789ABCDEF0123456789abcdef'\n",
            "'20s'",
            10,
        ));
        assert_eq!(
            p.hyperdrive.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(parse_megabytes("1 GiB"), Ok(1024));
    }

    #[test]
    fn key_memory_is_refused_for_a_local_worker() {
        for value in ["'128MB'", "128", "'12 bananas'"] {
            let yaml = SPEC.replace(
                "      timeout:",
                &format!("      memory: {value}\n      timeout:"),
            );
            let e = err(&yaml);
            assert_eq!(
                (e.line, e.key.as_str()),
                (6, "projections.user-profile.config.memory"),
                "{e}"
            );
            assert!(
                e.message.contains("does not apply to provider `local`")
                    && e.message.contains("serverless"),
                "{e}"
            );
        }
    }

    #[test]
    fn key_timeout_is_honoured() {
        assert_eq!(
            load(SPEC).options().handler_timeout,
            Duration::from_secs(20)
        );
        let e = err(&SPEC.replace("'20s'", "'30 fortnights'"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (6, "projections.user-profile.config.timeout"),
            "{e}"
        );
        let e = err(&SPEC.replace("'20s'", "'0s'"));
        assert!(e.message.contains("impossible"), "{e}");
    }

    #[test]
    fn key_concurrency_is_honoured() {
        assert_eq!(load(SPEC).options().partitions, 10);
        let e = err(&SPEC.replace("concurrency: 10", "concurrency: 0"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (7, "projections.user-profile.config.concurrency"),
            "{e}"
        );
        let e = err(&SPEC.replace("concurrency: 10", "concurrency: lots"));
        assert_eq!(e.line, 7, "{e}");
    }

    #[test]
    fn key_retries_is_honoured() {
        assert_eq!(load(SPEC).options().retry.max_retries, 5);
        let e = err(&SPEC.replace("retries: 5", "retries: 101"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (8, "projections.user-profile.config.retries"),
            "{e}"
        );
    }

    #[test]
    fn key_batch_size_is_honoured() {
        assert_eq!(load(SPEC).options().batch_size, 200);
        let e = err(&SPEC.replace("batch_size: 200", "batch_size: 0"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (9, "projections.user-profile.config.batch_size"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_where_they_are_written() {
        let e = err(&SPEC.replace("timeout:", "timeuot:"));
        assert_eq!(e.line, 6, "{e}");
        assert!(
            e.message.contains("timeuot") && e.message.contains("spelling"),
            "{e}"
        );
        let e = err(&SPEC.replace("    config:", "    region: eu\n    config:"));
        assert_eq!(e.line, 5, "{e}");
        let e = err("projections: {}\n");
        assert_eq!(e.key, "projections", "{e}");
    }

    #[test]
    fn key_subscribe_is_honoured() {
        let yaml = "projections:\n  a:\n    handler: a\n    subscribe:\n      event_types: [B, A]\n      aggregate_types: [user]\n";
        let expected = Subscription::all()
            .with_event_types(["A", "B"])
            .with_aggregate_types(["user"]);
        let p = load(yaml);
        assert_eq!(p.subscription.as_ref(), Some(&expected));
        assert_eq!(p.options().subscription, Some(expected));
        let only = load(
            "projections:\n  a:\n    handler: a\n    subscribe: { aggregate_types: [order] }\n",
        );
        assert_eq!(
            only.subscription,
            Some(Subscription::all().with_aggregate_types(["order"]))
        );
        let none = load("projections:\n  a:\n    handler: a\n");
        assert_eq!(none.subscription, None, "the handler's own");
    }

    #[test]
    fn an_impossible_subscription_is_refused_where_it_is_written() {
        let base = "projections:\n  a:\n    handler: a\n    subscribe:\n";
        let e = err(&format!("{base}      event_types: []\n"));
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "projections.a.subscribe.event_types"),
            "{e}"
        );
        assert!(e.message.contains("match no event"), "{e}");
        let e = err(&format!(
            "{base}      aggregate_types: [\"{}\"]\n",
            "x".repeat(60)
        ));
        assert_eq!(e.key, "projections.a.subscribe.aggregate_types", "{e}");
        assert!(e.message.contains("50 characters"), "{e}");
        let e = err(&format!("{base}      types: [A]\n"));
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("types"), "{e}");
        let e = err("projections:\n  a:\n    handler: a\n    subscribe: {}\n");
        assert_eq!(e.key, "projections.a.subscribe", "{e}");
        assert!(e.message.contains("lists nothing"), "{e}");
    }

    struct Named(&'static str);

    #[async_trait::async_trait]
    impl ProjectionHandler<PgContext> for Named {
        fn name(&self) -> &str {
            self.0
        }

        async fn handle(
            &self,
            _: &chronicle_core::EventEnvelope,
            _: &mut PgContext,
        ) -> chronicle_core::ProjectionResult {
            chronicle_core::ProjectionResult::Done
        }
    }

    #[test]
    fn handlers_resolve_by_name_or_path() {
        let config = DeploymentConfig::from_yaml("chronicle.yaml", SPEC).unwrap();
        let mut registry = HandlerRegistry::new();
        let Err(e) = config.resolve("chronicle.yaml", &registry) else {
            panic!("resolved without a registered handler")
        };
        assert_eq!(
            (e.line, e.key.as_str()),
            (3, "projections.user-profile.handler"),
            "{e}"
        );
        assert!(e.message.contains("registered: none"), "{e}");
        registry.register(Named("user-profile"));
        let resolved = config.resolve("chronicle.yaml", &registry).unwrap();
        assert_eq!(resolved[0].1.name(), "user-profile");

        let renamed = DeploymentConfig::from_yaml(
            "x",
            "projections:\n  profiles:\n    handler: user-profile\n",
        )
        .unwrap();
        let Err(e) = renamed.resolve("x", &registry) else {
            panic!("resolved a handler under another projection's name")
        };
        assert!(
            e.message.contains("runs the projection `user-profile`"),
            "{e}"
        );
    }

    #[test]
    fn messages_read_well() {
        for yaml in [
            SPEC.replace("'local'", "'azure'"),
            SPEC.replace("timeout:", "timeuot:"),
            SPEC.replace("concurrency: 10", "concurrency: lots"),
        ] {
            let e = err(&yaml);
            assert!(
                !e.message.is_empty() && !e.message.contains(" at line "),
                "{e}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("30").is_err());
    }
}
