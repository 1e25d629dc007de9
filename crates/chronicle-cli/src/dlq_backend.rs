//! The broker behind `chronicle dlq` when the deployment YAML names one
//! (`dead_letters: { backend: … }`). Each broker client is compiled in
//! only with its cargo feature (`nats`, `rabbitmq`, `sqs`, `kafka`,
//! `pubsub`; `brokers` for all), so the default build stays lean; a
//! configuration naming a backend that is not compiled in is refused,
//! naming the feature.

use std::sync::Arc;

use anyhow::Result;
use chronicle_core::MessageQueue;
use chronicle_projections::DeadLetterBackend;

use crate::commands::UsageError;

/// The cargo feature that compiles `backend` in, and whether it is.
pub(crate) fn feature(backend: &DeadLetterBackend) -> (&'static str, bool) {
    match backend {
        DeadLetterBackend::Postgres => ("", true),
        DeadLetterBackend::Nats { .. } => ("nats", cfg!(feature = "nats")),
        DeadLetterBackend::RabbitMq { .. } => ("rabbitmq", cfg!(feature = "rabbitmq")),
        DeadLetterBackend::Sqs { .. } => ("sqs", cfg!(feature = "sqs")),
        DeadLetterBackend::Kafka { .. } => ("kafka", cfg!(feature = "kafka")),
        DeadLetterBackend::PubSub { .. } => ("pubsub", cfg!(feature = "pubsub")),
        _ => ("brokers", false),
    }
}

/// The dead-letter queue of `projection` on `backend` (`None` for
/// PostgreSQL). `origin` and `line` say where the backend was chosen.
// Without a broker feature, nothing names the queue.
#[cfg_attr(
    not(any(
        feature = "nats",
        feature = "rabbitmq",
        feature = "sqs",
        feature = "kafka",
        feature = "pubsub"
    )),
    allow(unused_variables)
)]
pub(crate) async fn open(
    backend: &DeadLetterBackend,
    projection: &str,
    origin: &str,
    line: u64,
) -> Result<Option<Arc<dyn MessageQueue>>> {
    open_named(
        backend,
        &DeadLetterBackend::queue_name(projection),
        origin,
        line,
        "dead_letters.backend",
    )
    .await
}

/// The queue `name` on `backend` (`None` for PostgreSQL); `key` is the
/// YAML key that chose the backend, for errors.
#[cfg_attr(
    not(any(
        feature = "nats",
        feature = "rabbitmq",
        feature = "sqs",
        feature = "kafka",
        feature = "pubsub"
    )),
    allow(unused_variables)
)]
pub(crate) async fn open_named(
    backend: &DeadLetterBackend,
    name: &str,
    origin: &str,
    line: u64,
    key: &str,
) -> Result<Option<Arc<dyn MessageQueue>>> {
    let not_compiled = || {
        let (feature, _) = feature(backend);
        UsageError(format!(
            "{origin}:{line}: {key}: `{}` is not compiled into this chronicle; \
             build it with the cargo feature `{feature}` (or `brokers` for every broker), e.g. \
             `cargo install --path crates/chronicle-cli --features {feature}`",
            backend.as_str()
        ))
    };
    if !feature(backend).1 {
        return Err(not_compiled().into());
    }
    Ok(match backend {
        DeadLetterBackend::Postgres => None,
        #[cfg(feature = "nats")]
        DeadLetterBackend::Nats {
            url,
            visibility_timeout,
        } => {
            let mut options = chronicle_nats::NatsOptions::new(url.clone());
            if let Some(t) = visibility_timeout {
                options.ack_wait(*t);
            }
            Some(Arc::new(
                chronicle_nats::NatsQueue::connect(&options, name).await?,
            ))
        }
        #[cfg(feature = "rabbitmq")]
        DeadLetterBackend::RabbitMq {
            url,
            heartbeat,
            lanes,
        } => {
            let mut options = chronicle_rabbitmq::RabbitOptions::new(url.clone());
            if let Some(h) = heartbeat {
                options.heartbeat(*h);
            }
            if let Some(l) = lanes {
                options.lanes(*l);
            }
            Some(Arc::new(
                chronicle_rabbitmq::RabbitQueue::connect(&options, name).await?,
            ))
        }
        #[cfg(feature = "sqs")]
        DeadLetterBackend::Sqs {
            url,
            region,
            visibility_timeout,
        } => {
            let mut options = chronicle_sqs::SqsOptions::new();
            if let Some(u) = url {
                options.endpoint_url(u.clone());
            }
            if let Some(r) = region {
                options.region(r.clone());
            }
            if let Some(t) = visibility_timeout {
                options.visibility_timeout(*t);
            }
            options.wait(std::time::Duration::ZERO);
            Some(Arc::new(
                chronicle_sqs::SqsQueue::connect(&options, name).await?,
            ))
        }
        #[cfg(feature = "kafka")]
        DeadLetterBackend::Kafka {
            url,
            partitions,
            visibility_timeout,
        } => {
            let mut options = chronicle_kafka::KafkaOptions::new(url.clone());
            if let Some(p) = partitions {
                options.partitions(*p);
            }
            if let Some(t) = visibility_timeout {
                options.session_timeout(*t);
            }
            Some(Arc::new(
                chronicle_kafka::KafkaQueue::connect(&options, name).await?,
            ))
        }
        #[cfg(feature = "pubsub")]
        DeadLetterBackend::PubSub {
            project,
            url,
            visibility_timeout,
        } => {
            let mut options = chronicle_pubsub::PubSubOptions::new(project.clone());
            if let Some(u) = url {
                options.endpoint(u.clone());
            }
            if let Some(t) = visibility_timeout {
                options.ack_deadline(*t);
            }
            if let Ok(token) = std::env::var("CHRONICLE_PUBSUB_ACCESS_TOKEN") {
                options.access_token(token);
            }
            Some(Arc::new(
                chronicle_pubsub::PubSubQueue::connect(&options, name).await?,
            ))
        }
        #[allow(unreachable_patterns)]
        _ => return Err(not_compiled().into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backend_that_is_not_compiled_in_names_its_feature() {
        let nats = DeadLetterBackend::Nats {
            url: "nats://127.0.0.1:1".into(),
            visibility_timeout: None,
        };
        let (name, compiled) = feature(&nats);
        assert_eq!(name, "nats");
        if !compiled {
            let Err(err) = open(&nats, "p", "f.yaml", 3).await else {
                panic!("a backend that is not compiled in was opened");
            };
            let message = format!("{err:#}");
            assert!(
                message.starts_with("f.yaml:3: dead_letters.backend"),
                "{message}"
            );
            assert!(message.contains("cargo feature `nats`"), "{message}");
        }
        assert!(
            open(&DeadLetterBackend::Postgres, "p", "f.yaml", 0)
                .await
                .unwrap()
                .is_none()
        );
    }
}
