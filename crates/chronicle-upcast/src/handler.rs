//! Lazy upcasting for projections: the chain applied before a handler.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use chronicle_core::{BoxError, EventEnvelope, Position, ProjectionHandler, ProjectionResult};

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
