//! [`Relay`]: the projection handler that publishes events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, Message, MessageQueue, ProjectionHandler, ProjectionResult};
use chronicle_crypto::{AccessContext, FieldEncryptor};

use crate::Route;

/// A route with the queue it publishes to.
struct Target {
    route: Route,
    queue: Arc<dyn MessageQueue>,
}

/// The relay: a [`ProjectionHandler`] that publishes each event to the
/// queue of the first route that matches it, and returns only once the
/// broker has acknowledged the publish. Run it as any projection
/// (`chronicle_projections::PgProjection` and `Runner`): the runtime
/// commits the checkpoint after the handler returns, so an event is
/// published at least once, in each aggregate's version order, and an
/// event no route matches is skipped (not published; the checkpoint moves
/// past it).
///
/// A batch from the runtime's fast path goes out as one publish per
/// destination. A failed publish is retried within the call, with backoff,
/// for up to the publish timeout (a broker restarting or a connection
/// being re-established), then reported as a retryable failure; the
/// runtime retries it with its own backoff and, when its retries run out,
/// dead-letters the event and parks its aggregate's later events behind it
/// (replayed in order by `chronicle dlq retry`).
///
/// Encrypted fields go as the stored envelopes, unless the route says
/// `decrypt`: then the relay decrypts with its [`FieldEncryptor`] for the
/// access context `relay:<name>` (purpose `event streaming`), and every
/// decryption is in the audit trail.
///
/// ```
/// use std::sync::Arc;
/// use chronicle_core::{MemoryQueue, MessageQueue};
/// use chronicle_relay::{Relay, Route};
///
/// let orders: Arc<dyn MessageQueue> = Arc::new(MemoryQueue::new("orders"));
/// let relay = Relay::builder("relay")
///     .route(Route::new("memory", "orders").aggregate_types(["order"]), orders)
///     .build()
///     .unwrap();
/// assert_eq!(relay.routes().count(), 1);
/// ```
pub struct Relay {
    name: String,
    targets: Vec<Target>,
    crypto: Option<(Arc<FieldEncryptor>, AccessContext)>,
    publish_timeout: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.name)
            .field(
                "routes",
                &self.targets.iter().map(|t| &t.route).collect::<Vec<_>>(),
            )
            .field("decrypts", &self.crypto.is_some())
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

/// Builds a [`Relay`] ([`Relay::builder`]).
pub struct RelayBuilder {
    name: String,
    targets: Vec<Target>,
    crypto: Option<Arc<FieldEncryptor>>,
    publish_timeout: Duration,
}

impl RelayBuilder {
    /// Adds a route (routes are tried in the order they are added) and the
    /// queue it publishes to.
    pub fn route(mut self, route: Route, queue: Arc<dyn MessageQueue>) -> Self {
        self.targets.push(Target { route, queue });
        self
    }

    /// The encryptor routes with `decrypt` read through (default: none; a
    /// route with `decrypt` is then refused by [`RelayBuilder::build`]).
    pub fn encryptor(mut self, crypto: Arc<FieldEncryptor>) -> Self {
        self.crypto = Some(crypto);
        self
    }

    /// How long one publish retries a broker that is away before the
    /// attempt fails (default 20 s). Keep it below the projection's
    /// handler timeout.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The relay; refused when a route asks for decryption without an
    /// encryptor, or there is no route.
    pub fn build(self) -> Result<Relay, crate::Error> {
        if self.targets.is_empty() {
            return Err(crate::Error::Config("the relay has no route".to_owned()));
        }
        if self.crypto.is_none()
            && let Some(t) = self.targets.iter().find(|t| t.route.decrypt)
        {
            return Err(crate::Error::Config(format!(
                "the route to `{}` (line {}) asks for decryption, and the relay has no \
                 encryptor (configure encryption, or remove `decrypt: true`)",
                t.route.destination, t.route.line
            )));
        }
        let context = AccessContext::new(format!("relay:{}", self.name), "event streaming");
        Ok(Relay {
            name: self.name,
            targets: self.targets,
            crypto: self.crypto.map(|c| (c, context)),
            publish_timeout: self.publish_timeout,
        })
    }
}

impl Relay {
    /// A builder for the relay projection `name` (its checkpoints' key).
    pub fn builder(name: impl Into<String>) -> RelayBuilder {
        RelayBuilder {
            name: name.into(),
            targets: Vec::new(),
            crypto: None,
            publish_timeout: Duration::from_secs(20),
        }
    }

    /// The routes, in order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.targets.iter().map(|t| &t.route)
    }

    /// The index of the route `event` takes.
    fn route_of(&self, event: &EventEnvelope) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| t.route.matches(&event.event_type, &event.aggregate_type))
    }

    /// The messages of `events` on route `i`, decrypted if it says so.
    async fn messages(&self, i: usize, events: &[&EventEnvelope]) -> Result<Vec<Message>, String> {
        let route = &self.targets[i].route;
        if route.decrypt && events.iter().any(|e| !e.encrypted_fields.is_empty()) {
            let (crypto, context) = self.crypto.as_ref().expect("checked by build");
            let mut owned: Vec<EventEnvelope> = events.iter().map(|e| (*e).clone()).collect();
            crypto
                .decrypt_events(context, &mut owned)
                .await
                .map_err(|e| format!("decrypting for route `{}`: {e}", route.destination))?;
            return Ok(owned.iter().map(|e| route.message(e)).collect());
        }
        Ok(events.iter().map(|e| route.message(e)).collect())
    }

    /// Publishes on route `i`, retrying for up to the publish timeout.
    async fn publish(&self, i: usize, messages: &[Message]) -> Result<(), String> {
        let queue = &self.targets[i].queue;
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match queue.publish(messages).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let error = format!("publishing to `{}`: {e}", queue.name());
                    if started.elapsed() + delay >= self.publish_timeout {
                        return Err(error);
                    }
                    tracing::warn!(relay = %self.name, error = %error, "publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[async_trait]
impl<C: Send + ?Sized> ProjectionHandler<C> for Relay {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, event: &EventEnvelope, _: &mut C) -> ProjectionResult {
        let Some(i) = self.route_of(event) else {
            return ProjectionResult::Skipped;
        };
        let messages = match self.messages(i, &[event]).await {
            Ok(m) => m,
            Err(e) => return ProjectionResult::retry(e),
        };
        match self.publish(i, &messages).await {
            Ok(()) => ProjectionResult::Done,
            Err(e) => ProjectionResult::retry(e),
        }
    }

    async fn handle_batch(&self, events: &[EventEnvelope], _: &mut C) -> Vec<ProjectionResult> {
        // Split by route, keeping feed order within each.
        let mut routes: Vec<Option<usize>> = Vec::with_capacity(events.len());
        let mut by_route: Vec<Vec<&EventEnvelope>> = vec![Vec::new(); self.targets.len()];
        for e in events {
            let r = self.route_of(e);
            if let Some(i) = r {
                by_route[i].push(e);
            }
            routes.push(r);
        }
        // One publish per destination, concurrently.
        let publishes = by_route.iter().enumerate().map(|(i, evs)| async move {
            if evs.is_empty() {
                return Ok(());
            }
            let messages = self.messages(i, evs).await?;
            self.publish(i, &messages).await
        });
        let outcomes = futures_util::future::join_all(publishes).await;
        let mut results = Vec::with_capacity(events.len());
        for r in routes {
            match r {
                None => results.push(ProjectionResult::Skipped),
                Some(i) => match &outcomes[i] {
                    Ok(()) => results.push(ProjectionResult::Done),
                    Err(e) => {
                        // The runtime takes the batch back and goes event
                        // by event from here.
                        results.push(ProjectionResult::retry(e));
                        break;
                    }
                },
            }
        }
        results
    }
}
