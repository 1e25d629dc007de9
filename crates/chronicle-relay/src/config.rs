//! The relay's YAML: where events go.
//!
//! ```yaml
//! relay:
//!   name: relay                 # the projection's name (checkpoints, leases, dead letters)
//!   partitions: 4               # aggregate-hash partitions, the most relays in parallel
//!   batch_size: 500             # events per step (and per publish)
//!   retries: 10                 # runtime retries of a failed publish before dead-lettering
//!   publish_timeout: 20s        # how long one publish keeps retrying a broker that is down
//!   brokers:
//!     events:                   # a name the routes refer to
//!       backend: nats           # nats, rabbitmq, sqs, kafka, pubsub (the keys of `dead_letters:`)
//!       url: nats://127.0.0.1:4222
//!   routes:                     # first match wins; an event no route matches is not published
//!     - event_types: [OrderPlaced, OrderShipped]   # optional; absent: any type
//!       aggregate_types: [order]                    # optional; absent: any aggregate type
//!       broker: events
//!       destination: orders     # the topic / subject / queue (its MessageQueue name)
//!       headers:                # attribute name: metadata key (absent keys are left out)
//!         tenant: tenant
//!         correlation: correlation_id
//!       decrypt: false          # true: encrypted fields go decrypted (audited)
//! ```
//!
//! Every key is honoured or refused at its line: unknown keys, a route
//! naming an unknown broker, an empty list, a broker block with a key its
//! backend does not take (as in `dead_letters:`), a `postgres` backend (the
//! relay publishes to brokers; the store is already in PostgreSQL), and
//! numbers out of range.

use std::collections::BTreeMap;
use std::time::Duration;

use chronicle_projections::{BrokerBlock, ConfigError, DeadLetterBackend};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::Route;

/// The relay's configuration, validated ([`RelayConfig::from_yaml`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// The relay projection's name (default `relay`): the key of its
    /// checkpoints, leases and dead letters.
    pub name: String,
    /// Partitions (default 4).
    pub partitions: u32,
    /// Events per step (default 500).
    pub batch_size: u32,
    /// Runtime retries of an event whose publish failed before it is
    /// dead-lettered (default 10, backoff from 100 ms doubling to 10 s).
    pub retries: u32,
    /// How long one publish retries a broker that refuses or is away
    /// before the attempt counts as failed (default 20 s).
    pub publish_timeout: Duration,
    /// The brokers by name, with the line each was declared on.
    pub brokers: BTreeMap<String, (DeadLetterBackend, u64)>,
    /// The routes, in order.
    pub routes: Vec<Route>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            name: "relay".to_owned(),
            partitions: 4,
            batch_size: 500,
            retries: 10,
            publish_timeout: Duration::from_secs(20),
            brokers: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    relay: Spanned<RawRelay>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    partitions: Option<Spanned<i64>>,
    #[serde(default)]
    batch_size: Option<Spanned<i64>>,
    #[serde(default)]
    retries: Option<Spanned<i64>>,
    #[serde(default)]
    publish_timeout: Option<Spanned<String>>,
    brokers: Spanned<BTreeMap<String, Spanned<BrokerBlock>>>,
    routes: Spanned<Vec<Spanned<RawRoute>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    event_types: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    aggregate_types: Option<Spanned<Vec<String>>>,
    broker: Spanned<String>,
    destination: Spanned<String>,
    #[serde(default)]
    headers: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    decrypt: Option<Spanned<bool>>,
}

impl RelayConfig {
    /// Reads and validates the YAML; `origin` names the source in errors.
    ///
    /// ```
    /// use chronicle_relay::RelayConfig;
    ///
    /// let yaml = "relay:
    ///   brokers:
    ///     events: { backend: nats, url: 'nats://127.0.0.1:4222' }
    ///   routes:
    ///     - event_types: [OrderPlaced]
    ///       broker: events
    ///       destination: orders
    ///       headers: { tenant: tenant }
    /// ";
    /// let config = RelayConfig::from_yaml("relay.yaml", yaml).unwrap();
    /// assert_eq!(config.name, "relay");
    /// assert_eq!(config.routes[0].destination, "orders");
    /// assert!(config.routes[0].matches("OrderPlaced", "order"));
    ///
    /// let err = RelayConfig::from_yaml("relay.yaml", &yaml.replace("broker: events", "broker: other"))
    ///     .unwrap_err();
    /// assert_eq!((err.line, err.key.as_str()), (6, "relay.routes[0].broker"));
    /// ```
    pub fn from_yaml(origin: &str, yaml: &str) -> Result<Self, ConfigError> {
        let at = |loc: &Location, key: &str, message: String| ConfigError {
            origin: origin.to_owned(),
            line: loc.line(),
            column: loc.column(),
            key: key.to_owned(),
            message,
        };
        let raw: RawFile = chronicle_projections::parse_yaml(origin, yaml)?;
        let r = raw.relay.value;
        let mut config = RelayConfig::default();
        if let Some(n) = &r.name {
            let name = n.value.trim();
            if name.is_empty() {
                return Err(at(&n.referenced, "relay.name", "is empty".to_owned()));
            }
            config.name = name.to_owned();
        }
        let number = |v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64| match v {
            None => Ok(None),
            Some(v) if (min..=max).contains(&v.value) => Ok(Some(v.value as u32)),
            Some(v) => Err(at(
                &v.referenced,
                key,
                format!("is {}; it must be between {min} and {max}", v.value),
            )),
        };
        if let Some(n) = number(&r.partitions, "relay.partitions", 1, 1024)? {
            config.partitions = n;
        }
        if let Some(n) = number(&r.batch_size, "relay.batch_size", 1, 50_000)? {
            config.batch_size = n;
        }
        if let Some(n) = number(&r.retries, "relay.retries", 0, 1000)? {
            config.retries = n;
        }
        if let Some(t) = &r.publish_timeout {
            let s = t.value.trim();
            config.publish_timeout = humantime::parse_duration(s)
                .ok()
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(600))
                .ok_or_else(|| {
                    at(
                        &t.referenced,
                        "relay.publish_timeout",
                        format!("`{s}` is not a duration between 1ms and 10m (e.g. 20s)"),
                    )
                })?;
        }
        if r.brokers.value.is_empty() {
            return Err(at(
                &r.brokers.referenced,
                "relay.brokers",
                "no broker is declared; add one (backend: nats, rabbitmq, sqs, kafka or pubsub)"
                    .to_owned(),
            ));
        }
        for (name, block) in r.brokers.value {
            let prefix = format!("relay.brokers.{name}");
            let resolved = block.value.resolve(&prefix, &block.referenced, &at)?;
            if resolved.backend == DeadLetterBackend::Postgres {
                return Err(at(
                    &block.referenced,
                    &format!("{prefix}.backend"),
                    "the relay publishes to a broker (nats, rabbitmq, sqs, kafka or pubsub); \
                     the events are already in PostgreSQL"
                        .to_owned(),
                ));
            }
            config
                .brokers
                .insert(name, (resolved.backend, resolved.line));
        }
        if r.routes.value.is_empty() {
            return Err(at(
                &r.routes.referenced,
                "relay.routes",
                "no route is declared; add one (broker, destination)".to_owned(),
            ));
        }
        for (i, spanned) in r.routes.value.into_iter().enumerate() {
            let key = |k: &str| format!("relay.routes[{i}].{k}");
            let raw = spanned.value;
            let list = |v: &Option<Spanned<Vec<String>>>, k: &str| match v {
                None => Ok(Vec::new()),
                Some(v) if v.value.is_empty() || v.value.iter().any(|s| s.trim().is_empty()) => {
                    Err(at(
                        &v.referenced,
                        &key(k),
                        "is empty or holds an empty name; leave the key out to match any"
                            .to_owned(),
                    ))
                }
                Some(v) => Ok(v.value.clone()),
            };
            let event_types = list(&raw.event_types, "event_types")?;
            let aggregate_types = list(&raw.aggregate_types, "aggregate_types")?;
            let broker = raw.broker.value.trim().to_owned();
            if !config.brokers.contains_key(&broker) {
                let known: Vec<&str> = config.brokers.keys().map(String::as_str).collect();
                return Err(at(
                    &raw.broker.referenced,
                    &key("broker"),
                    format!(
                        "no broker `{broker}` under relay.brokers; declared: {}",
                        known.join(", ")
                    ),
                ));
            }
            let destination = raw.destination.value.trim().to_owned();
            if destination.is_empty() {
                return Err(at(
                    &raw.destination.referenced,
                    &key("destination"),
                    "is empty; name the topic, subject or queue".to_owned(),
                ));
            }
            let mut headers = BTreeMap::new();
            if let Some(h) = &raw.headers {
                for (attribute, metadata_key) in &h.value {
                    if attribute.trim().is_empty() || metadata_key.trim().is_empty() {
                        return Err(at(
                            &h.referenced,
                            &key("headers"),
                            "a header needs a name and a metadata key".to_owned(),
                        ));
                    }
                    if attribute.starts_with(crate::ATTRIBUTE_PREFIX) {
                        return Err(at(
                            &h.referenced,
                            &key("headers"),
                            format!(
                                "`{attribute}`: names starting with `{}` are the relay's own",
                                crate::ATTRIBUTE_PREFIX
                            ),
                        ));
                    }
                    headers.insert(attribute.clone(), metadata_key.clone());
                }
            }
            config.routes.push(Route {
                event_types,
                aggregate_types,
                broker,
                destination,
                headers,
                decrypt: raw.decrypt.as_ref().is_some_and(|d| d.value),
                line: spanned.referenced.line(),
            });
        }
        Ok(config)
    }

    /// Every `(broker, destination)` the routes publish to, once each.
    pub fn destinations(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for r in &self.routes {
            let d = (r.broker.clone(), r.destination.clone());
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// The projection options the relay runs with: these partitions,
    /// batch size and retries, and a handler timeout above the publish
    /// timeout.
    pub fn projection_options(&self) -> chronicle_projections::ProjectionOptions {
        let defaults = chronicle_projections::ProjectionOptions::default();
        chronicle_projections::ProjectionOptions {
            partitions: self.partitions,
            batch_size: self.batch_size,
            retry: chronicle_projections::RetryPolicy {
                max_retries: self.retries,
                ..chronicle_projections::RetryPolicy::default()
            },
            handler_timeout: self.publish_timeout + Duration::from_secs(10),
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "relay:
  brokers:
    events:
      backend: nats
      url: nats://127.0.0.1:4222
  routes:
    - broker: events
      destination: all
";

    fn err(yaml: &str) -> (u64, String, String) {
        let e = RelayConfig::from_yaml("r.yaml", yaml).unwrap_err();
        (e.line, e.key, e.message)
    }

    #[test]
    fn every_key_is_read() {
        let yaml = "relay:
  name: orders-relay
  partitions: 2
  batch_size: 100
  retries: 5
  publish_timeout: 3s
  brokers:
    events: { backend: rabbitmq, url: 'amqp://h', lanes: 4 }
  routes:
    - event_types: [A, B]
      aggregate_types: [order]
      broker: events
      destination: orders
      headers: { tenant: tenant }
      decrypt: true
    - broker: events
      destination: rest
";
        let c = RelayConfig::from_yaml("r.yaml", yaml).unwrap();
        assert_eq!(c.name, "orders-relay");
        assert_eq!((c.partitions, c.batch_size, c.retries), (2, 100, 5));
        assert_eq!(c.publish_timeout, Duration::from_secs(3));
        assert!(matches!(
            c.brokers["events"].0,
            DeadLetterBackend::RabbitMq { lanes: Some(4), .. }
        ));
        let r = &c.routes[0];
        assert_eq!((r.event_types.len(), r.decrypt, r.line), (2, true, 10));
        assert_eq!(r.headers["tenant"], "tenant");
        assert!(!c.routes[1].decrypt);
        assert_eq!(
            c.destinations(),
            [
                ("events".to_owned(), "orders".to_owned()),
                ("events".to_owned(), "rest".to_owned())
            ]
        );
        let o = c.projection_options();
        assert_eq!((o.partitions, o.retry.max_retries), (2, 5));
        assert!(o.handler_timeout > c.publish_timeout);
    }

    #[test]
    fn keys_are_refused_at_their_line() {
        let (line, key, message) = err(&BASE.replace("destination: all", "destination: ''"));
        assert_eq!((line, key.as_str()), (8, "relay.routes[0].destination"));
        assert!(message.contains("empty"), "{message}");
        let (line, key, _) = err(&BASE.replace("backend: nats", "backend: postgres\n      x: 1"));
        assert_eq!(line, 5, "{key}");
        let (line, key, message) = err(&BASE.replace(
            "backend: nats\n      url: nats://127.0.0.1:4222",
            "backend: postgres",
        ));
        assert_eq!((line, key.as_str()), (4, "relay.brokers.events.backend"));
        assert!(message.contains("already in PostgreSQL"), "{message}");
        let (line, key, message) = err(&BASE.replace("      url: nats://127.0.0.1:4222\n", ""));
        assert_eq!(key, "relay.brokers.events.url", "{line} {message}");
        let (line, key, _) = err(&BASE.replace("url: nats", "region: x\n      url: nats"));
        assert_eq!((line, key.as_str()), (5, "relay.brokers.events.region"));
        let (line, key, _) = err(&BASE.replace("  routes:", "  partitions: 0\n  routes:"));
        assert_eq!((line, key.as_str()), (6, "relay.partitions"));
        let (line, _, message) =
            err(&BASE.replace("destination: all", "destination: all\n      colour: red"));
        assert_eq!(line, 9);
        assert!(message.contains("colour"), "{message}");
        let (line, key, _) = err(&BASE.replace("- broker", "- event_types: []\n      broker"));
        assert_eq!((line, key.as_str()), (7, "relay.routes[0].event_types"));
        let (_, key, message) = err(&BASE.replace(
            "destination: all",
            "destination: all\n      headers: { chronicle-x: y }",
        ));
        assert_eq!(key, "relay.routes[0].headers");
        assert!(message.contains("chronicle-"), "{message}");
        let (line, key, _) =
            err(&BASE.replace("destination: all", "destination: all\n      decrypt: yes"));
        assert!(
            line >= 8 && key.is_empty() || key.ends_with("decrypt"),
            "{line} {key}"
        );
        let (_, key, _) = err("relay:\n  brokers: {}\n  routes: []\n");
        assert_eq!(key, "relay.brokers");
    }
}
