//! `dead_letters:` in the deployment YAML: where the projections' dead
//! letters are kept.
//!
//! ```yaml
//! dead_letters:
//!   backend: nats            # postgres (default), nats, rabbitmq, sqs, kafka, pubsub
//!   url: nats://127.0.0.1:4222
//!   visibility_timeout: 30s
//! ```
//!
//! Every key is honoured or refused where it is written:
//!
//! - `backend`: `postgres` (the default: `projection_dead_letters`, in the
//!   step's transaction) or a broker. A broker's queue for projection `p`
//!   is named `p-dlq`.
//! - `url`: the broker's address. Required for `nats` (`nats://…`),
//!   `rabbitmq` (`amqp://…`) and `kafka` (`host:port,…`); optional for
//!   `sqs` and `pubsub` (another endpoint, such as a local server or the
//!   emulator). Refused for `postgres` (the event store's database).
//! - `region` (`sqs` only), `project` (`pubsub` only, required).
//! - `visibility_timeout`: how long a received dead letter stays in flight
//!   before another consumer gets it: JetStream's `ack_wait`, SQS's
//!   visibility timeout, Kafka's session timeout, Pub/Sub's ack deadline
//!   (10s to 600s). Refused for `rabbitmq` (a head moves on when its
//!   consumer's connection closes: set `heartbeat`) and `postgres`
//!   (receiving changes nothing there).
//! - `heartbeat` (`rabbitmq` only), `lanes` (`rabbitmq`: queues the groups
//!   are hashed onto), `partitions` (`kafka`).

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::ConfigError;

/// Where dead letters are kept, with the broker's settings as written.
/// Settings left out take the adapter's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterBackend {
    /// `projection_dead_letters` in the event store's database.
    #[default]
    Postgres,
    /// NATS JetStream (`chronicle-nats`).
    Nats {
        /// `nats://host:port`.
        url: String,
        /// JetStream's `ack_wait`.
        visibility_timeout: Option<Duration>,
    },
    /// RabbitMQ (`chronicle-rabbitmq`).
    RabbitMq {
        /// `amqp://user:password@host:port/vhost`.
        url: String,
        /// The connection heartbeat.
        heartbeat: Option<Duration>,
        /// The lane queues.
        lanes: Option<u16>,
    },
    /// An Amazon SQS FIFO queue (`chronicle-sqs`).
    Sqs {
        /// Another endpoint.
        url: Option<String>,
        /// The region.
        region: Option<String>,
        /// The queue's visibility timeout.
        visibility_timeout: Option<Duration>,
    },
    /// Kafka (`chronicle-kafka`).
    Kafka {
        /// The brokers, `host:port,…`.
        url: String,
        /// The topic's partitions.
        partitions: Option<i32>,
        /// The consumer's session timeout.
        visibility_timeout: Option<Duration>,
    },
    /// Google Cloud Pub/Sub (`chronicle-pubsub`).
    PubSub {
        /// The project.
        project: String,
        /// Another endpoint (the emulator).
        url: Option<String>,
        /// The subscription's ack deadline.
        visibility_timeout: Option<Duration>,
    },
}

impl DeadLetterBackend {
    /// The backend's name in the YAML.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadLetterBackend::Postgres => "postgres",
            DeadLetterBackend::Nats { .. } => "nats",
            DeadLetterBackend::RabbitMq { .. } => "rabbitmq",
            DeadLetterBackend::Sqs { .. } => "sqs",
            DeadLetterBackend::Kafka { .. } => "kafka",
            DeadLetterBackend::PubSub { .. } => "pubsub",
        }
    }

    /// The name of `projection`'s dead-letter queue on a broker.
    ///
    /// ```
    /// assert_eq!(chronicle_projections::DeadLetterBackend::queue_name("user-profile"), "user-profile-dlq");
    /// ```
    pub fn queue_name(projection: &str) -> String {
        format!("{projection}-dlq")
    }
}

/// `dead_letters:` as read: the backend and the line it was set on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterConfig {
    /// The backend.
    pub backend: DeadLetterBackend,
    /// The line of `backend:` (0 when the key is absent).
    pub line: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeadLetters {
    backend: Spanned<String>,
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    region: Option<Spanned<String>>,
    #[serde(default)]
    project: Option<Spanned<String>>,
    #[serde(default)]
    visibility_timeout: Option<Spanned<String>>,
    #[serde(default)]
    heartbeat: Option<Spanned<String>>,
    #[serde(default)]
    lanes: Option<Spanned<i64>>,
    #[serde(default)]
    partitions: Option<Spanned<i64>>,
}

type At<'a> = &'a dyn Fn(&Location, &str, String) -> ConfigError;

/// A broker block as written in YAML (`backend:`, `url:`, …, the keys of
/// `dead_letters:`), for other configurations that name a broker (the
/// event relay's `brokers:`). Read it with serde, then
/// [`BrokerBlock::resolve`] it with the key it was written under.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct BrokerBlock(RawDeadLetters);

impl BrokerBlock {
    /// Validates the block written under `prefix` (errors name
    /// `<prefix>.<key>` and its line through `at`); `whole` is where the
    /// block starts.
    pub fn resolve(
        self,
        prefix: &str,
        whole: &Location,
        at: &dyn Fn(&Location, &str, String) -> ConfigError,
    ) -> Result<DeadLetterConfig, ConfigError> {
        self.0.resolve_under(prefix, whole, at)
    }
}

impl RawDeadLetters {
    pub(crate) fn resolve(
        self,
        whole: &Location,
        at: At<'_>,
    ) -> Result<DeadLetterConfig, ConfigError> {
        self.resolve_under("dead_letters", whole, at)
    }

    fn resolve_under(
        self,
        prefix: &str,
        whole: &Location,
        at: At<'_>,
    ) -> Result<DeadLetterConfig, ConfigError> {
        let backend = self.backend.value.trim().to_owned();
        let key = |k: &str| format!("{prefix}.{k}");
        let at_key = |loc: &Location, k: &str, m: String| at(loc, &key(k), m);
        const BACKENDS: &str = "postgres, nats, rabbitmq, sqs, kafka or pubsub";
        if !["postgres", "nats", "rabbitmq", "sqs", "kafka", "pubsub"].contains(&backend.as_str()) {
            return Err(at(
                &self.backend.referenced,
                &key("backend"),
                format!("unknown backend `{backend}`; use {BACKENDS}"),
            ));
        }
        // Refuses `value` for this backend, saying why.
        let refuse = |loc: &Location, k: &str, why: &str| -> ConfigError {
            at(
                loc,
                &key(k),
                format!("does not apply to backend `{backend}`: {why}. Remove the key"),
            )
        };
        let duration = |v: &Spanned<String>, k: &str| {
            crate::config::parse_duration(&v.value).map_err(|e| at(&v.referenced, &key(k), e))
        };
        let text = |v: &Spanned<String>, k: &str| {
            let t = v.value.trim();
            if t.is_empty() {
                Err(at(&v.referenced, &key(k), "is empty".to_owned()))
            } else {
                Ok(t.to_owned())
            }
        };
        let required = |v: &Option<Spanned<String>>, k: &str, what: &str| match v {
            Some(v) => text(v, k),
            None => Err(at(
                whole,
                &key(k),
                format!("backend `{backend}` needs `{k}`: {what}"),
            )),
        };
        // Keys that only some backends take.
        if let Some(v) = &self.region
            && backend != "sqs"
        {
            return Err(refuse(&v.referenced, "region", "only SQS has regions here"));
        }
        if let Some(v) = &self.project
            && backend != "pubsub"
        {
            return Err(refuse(
                &v.referenced,
                "project",
                "only Pub/Sub has projects",
            ));
        }
        if let Some(v) = &self.heartbeat
            && backend != "rabbitmq"
        {
            return Err(refuse(
                &v.referenced,
                "heartbeat",
                "it is the AMQP connection heartbeat (rabbitmq only)",
            ));
        }
        if let Some(v) = &self.lanes
            && backend != "rabbitmq"
        {
            return Err(refuse(
                &v.referenced,
                "lanes",
                "lanes are RabbitMQ's queues the groups are hashed onto (kafka: `partitions`)",
            ));
        }
        if let Some(v) = &self.partitions
            && backend != "kafka"
        {
            return Err(refuse(
                &v.referenced,
                "partitions",
                "only Kafka topics have partitions",
            ));
        }
        if let Some(v) = &self.visibility_timeout {
            match backend.as_str() {
                "postgres" => {
                    return Err(refuse(
                        &v.referenced,
                        "visibility_timeout",
                        "receiving a PostgreSQL dead letter changes nothing, so there is \
                         nothing to time out",
                    ));
                }
                "rabbitmq" => {
                    return Err(refuse(
                        &v.referenced,
                        "visibility_timeout",
                        "RabbitMQ has no visibility timeout; a head moves on when its \
                         consumer's connection closes, so set `heartbeat`",
                    ));
                }
                _ => {}
            }
        }
        if let Some(v) = &self.url
            && backend == "postgres"
        {
            return Err(refuse(
                &v.referenced,
                "url",
                "PostgreSQL dead letters live in the event store's database (--database-url)",
            ));
        }
        let visibility = self
            .visibility_timeout
            .as_ref()
            .map(|v| duration(v, "visibility_timeout"))
            .transpose()?;
        let optional_url = self.url.as_ref().map(|v| text(v, "url")).transpose()?;
        let backend = match backend.as_str() {
            "postgres" => DeadLetterBackend::Postgres,
            "nats" => DeadLetterBackend::Nats {
                url: required(&self.url, "url", "the server, nats://host:port")?,
                visibility_timeout: visibility,
            },
            "rabbitmq" => DeadLetterBackend::RabbitMq {
                url: required(
                    &self.url,
                    "url",
                    "the broker, amqp://user:password@host:port/vhost",
                )?,
                heartbeat: self
                    .heartbeat
                    .as_ref()
                    .map(|v| duration(v, "heartbeat"))
                    .transpose()?,
                lanes: self
                    .lanes
                    .as_ref()
                    .map(|v| bounded(v, "lanes", 1, 1024, &at_key).map(|n| n as u16))
                    .transpose()?,
            },
            "sqs" => DeadLetterBackend::Sqs {
                url: optional_url,
                region: self
                    .region
                    .as_ref()
                    .map(|v| text(v, "region"))
                    .transpose()?,
                visibility_timeout: match visibility {
                    Some(d) if d > Duration::from_secs(12 * 3600) => {
                        let v = self.visibility_timeout.as_ref().expect("parsed above");
                        return Err(at(
                            &v.referenced,
                            &key("visibility_timeout"),
                            "is above SQS's limit of 12h".to_owned(),
                        ));
                    }
                    d => d,
                },
            },
            "kafka" => DeadLetterBackend::Kafka {
                url: required(&self.url, "url", "the brokers, host:port[,host:port…]")?,
                partitions: self
                    .partitions
                    .as_ref()
                    .map(|v| bounded(v, "partitions", 1, 10_000, &at_key).map(|n| n as i32))
                    .transpose()?,
                visibility_timeout: visibility,
            },
            _ => DeadLetterBackend::PubSub {
                project: required(&self.project, "project", "the Google Cloud project")?,
                url: optional_url,
                visibility_timeout: match visibility {
                    Some(d)
                        if !(Duration::from_secs(10)..=Duration::from_secs(600)).contains(&d) =>
                    {
                        let v = self.visibility_timeout.as_ref().expect("parsed above");
                        return Err(at(
                            &v.referenced,
                            &key("visibility_timeout"),
                            "must be between 10s and 600s (Pub/Sub's ack deadline)".to_owned(),
                        ));
                    }
                    d => d,
                },
            },
        };
        Ok(DeadLetterConfig {
            backend,
            line: self.backend.referenced.line(),
        })
    }
}

fn bounded(v: &Spanned<i64>, k: &str, min: i64, max: i64, at: At<'_>) -> Result<i64, ConfigError> {
    if (min..=max).contains(&v.value) {
        Ok(v.value)
    } else {
        Err(at(
            &v.referenced,
            k,
            format!("is {}; it must be between {min} and {max}", v.value),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::{DeadLetterBackend, DeploymentConfig};
    use std::time::Duration;

    const PROJECTIONS: &str = "projections:\n  p:\n    handler: p\n";

    fn load(dead_letters: &str) -> Result<DeadLetterBackend, (u64, String, String)> {
        let yaml = format!("{PROJECTIONS}dead_letters:\n{dead_letters}");
        DeploymentConfig::from_yaml("f.yaml", &yaml)
            .map(|c| c.dead_letters.backend)
            .map_err(|e| (e.line, e.key, e.message))
    }

    #[test]
    fn the_default_is_postgres() {
        let c = DeploymentConfig::from_yaml("f.yaml", PROJECTIONS).unwrap();
        assert_eq!(c.dead_letters.backend, DeadLetterBackend::Postgres);
        assert_eq!(
            load("  backend: postgres\n"),
            Ok(DeadLetterBackend::Postgres)
        );
    }

    #[test]
    fn every_backend_is_read() {
        assert_eq!(
            load("  backend: nats\n  url: nats://127.0.0.1:4222\n  visibility_timeout: 45s\n"),
            Ok(DeadLetterBackend::Nats {
                url: "nats://127.0.0.1:4222".into(),
                visibility_timeout: Some(Duration::from_secs(45)),
            })
        );
        assert_eq!(
            load("  backend: rabbitmq\n  url: amqp://h\n  heartbeat: 10s\n  lanes: 4\n"),
            Ok(DeadLetterBackend::RabbitMq {
                url: "amqp://h".into(),
                heartbeat: Some(Duration::from_secs(10)),
                lanes: Some(4),
            })
        );
        assert_eq!(
            load("  backend: sqs\n  region: eu-west-1\n"),
            Ok(DeadLetterBackend::Sqs {
                url: None,
                region: Some("eu-west-1".into()),
                visibility_timeout: None,
            })
        );
        assert_eq!(
            load("  backend: kafka\n  url: k:9092\n  partitions: 3\n"),
            Ok(DeadLetterBackend::Kafka {
                url: "k:9092".into(),
                partitions: Some(3),
                visibility_timeout: None,
            })
        );
        assert_eq!(
            load("  backend: pubsub\n  project: acme\n  url: http://127.0.0.1:8085\n"),
            Ok(DeadLetterBackend::PubSub {
                project: "acme".into(),
                url: Some("http://127.0.0.1:8085".into()),
                visibility_timeout: None,
            })
        );
    }

    #[test]
    fn keys_are_refused_where_they_are_written() {
        let (line, key, message) = load("  backend: postgres\n  url: x\n").unwrap_err();
        assert_eq!((line, key.as_str()), (6, "dead_letters.url"));
        assert!(message.contains("event store's database"), "{message}");
        let (line, key, message) =
            load("  backend: rabbitmq\n  url: amqp://h\n  visibility_timeout: 5s\n").unwrap_err();
        assert_eq!((line, key.as_str()), (7, "dead_letters.visibility_timeout"));
        assert!(message.contains("heartbeat"), "{message}");
        let (line, key, _) = load("  backend: nats\n  url: n\n  region: x\n").unwrap_err();
        assert_eq!((line, key.as_str()), (7, "dead_letters.region"));
        let (_, key, message) = load("  backend: nats\n").unwrap_err();
        assert_eq!(key, "dead_letters.url");
        assert!(message.contains("nats://"), "{message}");
        let (line, key, message) = load("  backend: redis\n").unwrap_err();
        assert_eq!((line, key.as_str()), (5, "dead_letters.backend"));
        assert!(message.contains("unknown backend `redis`"), "{message}");
        let (_, key, _) = load("  backend: kafka\n  url: k\n  partitions: 0\n").unwrap_err();
        assert_eq!(key, "dead_letters.partitions");
        let (_, key, _) =
            load("  backend: pubsub\n  project: p\n  visibility_timeout: 5s\n").unwrap_err();
        assert_eq!(key, "dead_letters.visibility_timeout");
        let (line, _, message) = load("  backend: nats\n  url: n\n  colour: red\n").unwrap_err();
        assert_eq!(line, 7);
        assert!(message.contains("colour"), "{message}");
    }
}
