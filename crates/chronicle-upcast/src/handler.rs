//! Lazy upcasting for projections: the chain applied before a handler.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{
    BoxError, EventEnvelope, Position, ProjectionHandler, ProjectionResult, Subscription,
};

use crate::UpcasterChain;

/// A [`ProjectionHandler`] that hands `inner` every event at the newest
/// version of its type, as [`UpcastingReader`](crate::UpcastingReader)
/// does for readers: a projection's runtime reads the feed itself, so this
/// is where lazy upcasting meets it.
///
/// Events already at their newest version are passed through without a
/// copy. An event the chain cannot upcast is a permanent failure
/// ([`ProjectionResult::Fail`], naming the event and the step): the
/// runtime parks it in the dead-letter queue with its aggregate's later
/// events, where `chronicle dlq retry` picks it up once the definitions are
/// fixed. Encrypted fields are not decrypted here (see
/// [`UpcasterChain::upcast_envelope`]).
///
/// ```
/// use async_trait::async_trait;
/// use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
/// use chronicle_upcast::{UpcastConfig, UpcasterChain, UpcastingHandler};
///
/// struct Titles;
///
/// #[async_trait]
/// impl ProjectionHandler<Vec<String>> for Titles {
///     fn name(&self) -> &str { "titles" }
///     async fn handle(&self, event: &EventEnvelope, titles: &mut Vec<String>) -> ProjectionResult {
///         // Written against version 2 only: `title`, never `name`.
///         titles.push(event.event_data["title"].as_str().unwrap_or_default().to_owned());
///         ProjectionResult::Done
///     }
/// }
///
/// let yaml = "upcasters:\n  - event_type: ItemAdded\n    from: 1\n    steps:\n      - rename: { from: /name, to: /title }\n";
/// let chain = UpcasterChain::builder()
///     .config(UpcastConfig::from_yaml("upcasters.yaml", yaml).unwrap())
///     .build()
///     .unwrap();
/// let handler = UpcastingHandler::new(Titles, chain);
/// assert_eq!(handler.name(), "titles");
/// ```
#[derive(Debug, Clone)]
pub struct UpcastingHandler<H> {
    inner: H,
    chain: Arc<UpcasterChain>,
    lazy_only: bool,
}

impl<H> UpcastingHandler<H> {
    /// Applies `chain` to every event before `inner` sees it.
    pub fn new(inner: H, chain: impl Into<Arc<UpcasterChain>>) -> Self {
        UpcastingHandler {
            inner,
            chain: chain.into(),
            lazy_only: false,
        }
    }

    /// When `yes`, upcasts only event types in [`Mode::Lazy`](crate::Mode::Lazy); default
    /// `false` (every event, which also covers events appended at an old
    /// version while an eager run is in progress).
    pub fn lazy_only(mut self, yes: bool) -> Self {
        self.lazy_only = yes;
        self
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.inner
    }

    /// `event` at its newest version, borrowed when it already is.
    fn upcast<'a>(&self, event: &'a EventEnvelope) -> Result<Cow<'a, EventEnvelope>, String> {
        if !self.chain.upcasts_on_read(event, self.lazy_only) {
            return Ok(Cow::Borrowed(event));
        }
        self.chain
            .upcast_envelope(event.clone())
            .map(Cow::Owned)
            .map_err(|e| format!("upcasting before the handler failed: {e}"))
    }
}

#[async_trait]
impl<C, H> ProjectionHandler<C> for UpcastingHandler<H>
where
    C: Send + ?Sized,
    H: ProjectionHandler<C>,
{
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The inner handler's subscription, with every older event type the
    /// chain renames into a subscribed one: the store keeps events under
    /// the name they were appended with.
    fn subscription(&self) -> Subscription {
        let inner = self.inner.subscription();
        if inner.event_types().is_empty() {
            return inner;
        }
        let stored: Vec<String> = inner
            .event_types()
            .iter()
            .flat_map(|t| self.chain.stored_types_of(t))
            .collect();
        inner.with_event_types(stored)
    }

    async fn handle(&self, event: &EventEnvelope, ctx: &mut C) -> ProjectionResult {
        match self.upcast(event) {
            Ok(event) => self.inner.handle(&event, ctx).await,
            Err(message) => ProjectionResult::Fail(message),
        }
    }

    /// Upcasts up to the first event the chain refuses, hands those to the
    /// inner handler's batch, then reports the refused one as failed.
    async fn handle_batch(&self, events: &[EventEnvelope], ctx: &mut C) -> Vec<ProjectionResult> {
        let mut upcast: Vec<Cow<'_, EventEnvelope>> = Vec::with_capacity(events.len());
        let mut refused = None;
        for event in events {
            match self.upcast(event) {
                Ok(e) => upcast.push(e),
                Err(message) => {
                    refused = Some(message);
                    break;
                }
            }
        }
        let prefix = upcast.len();
        let mut results = if upcast.iter().all(|e| matches!(e, Cow::Borrowed(_))) {
            self.inner.handle_batch(&events[..prefix], ctx).await
        } else {
            let owned: Vec<EventEnvelope> = upcast.into_iter().map(Cow::into_owned).collect();
            self.inner.handle_batch(&owned, ctx).await
        };
        if let Some(message) = refused {
            // Only after every earlier event was handled: a result for the
            // refused event must sit at its own index.
            if results.len() == prefix && results.iter().all(ProjectionResult::is_success) {
                results.push(ProjectionResult::Fail(message));
            }
        }
        results
    }

    async fn rebuild(&self, ctx: &mut C, from: Position) -> Result<(), BoxError> {
        self.inner.rebuild(ctx, from).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UpcastConfig;

    struct Subscribed(Subscription);

    #[async_trait]
    impl ProjectionHandler<()> for Subscribed {
        fn name(&self) -> &str {
            "subscribed"
        }

        fn subscription(&self) -> Subscription {
            self.0.clone()
        }

        async fn handle(&self, _: &EventEnvelope, _: &mut ()) -> ProjectionResult {
            ProjectionResult::Done
        }
    }

    fn chain() -> UpcasterChain {
        let yaml = "upcasters:\n  - event_type: UserSignedUp\n    from: 1\n    steps:\n      - rename_event: UserRegistered\n";
        UpcasterChain::builder()
            .config(UpcastConfig::from_yaml("upcasters.yaml", yaml).unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn a_subscription_also_reads_the_names_renamed_into_it() {
        let inner = Subscription::all()
            .with_event_types(["UserRegistered", "EmailChanged"])
            .with_aggregate_types(["user"]);
        let handler = UpcastingHandler::new(Subscribed(inner), chain());
        let widened = handler.subscription();
        assert_eq!(
            widened.event_types(),
            ["EmailChanged", "UserRegistered", "UserSignedUp"]
        );
        assert_eq!(widened.aggregate_types(), ["user"]);
    }

    #[test]
    fn a_subscription_without_event_types_is_kept() {
        let inner = Subscription::all().with_aggregate_types(["user"]);
        let handler = UpcastingHandler::new(Subscribed(inner.clone()), chain());
        assert_eq!(handler.subscription(), inner);
        let all = UpcastingHandler::new(Subscribed(Subscription::all()), chain());
        assert!(all.subscription().is_all());
    }
}
