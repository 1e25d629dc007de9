//! The upcaster trait and its Rust-function implementation.

use std::fmt;
use std::sync::Arc;

use crate::{UpcastEvent, UpcastFailure};

/// Turns events of one type at schema version `n` into version `n + 1`,
/// possibly under a new event type name.
///
/// An upcaster changes only [`UpcastEvent::event_type`],
/// [`UpcastEvent::data`] and [`UpcastEvent::encrypted_fields`]; the chain
/// sets the schema version to `n + 1` afterwards and checks that the
/// event's identity did not change and that the event type is
/// [`Upcaster::target_event_type`]. The same upcaster serves both modes:
/// applied on read (lazy) and in the store rewrite (eager), so it must be a
/// pure function of the event.
///
/// Write one as a Rust function with [`FnUpcaster`], or as declarative YAML
/// steps with [`DeclarativeUpcaster`](crate::DeclarativeUpcaster).
pub trait Upcaster: Send + Sync + fmt::Debug {
    /// The event type this upcaster reads.
    fn event_type(&self) -> &str;

    /// The schema version this upcaster reads; it produces the next one.
    fn source_version(&self) -> u32;

    /// The event type this upcaster produces; the input type unless it
    /// renames the event.
    fn target_event_type(&self) -> &str {
        self.event_type()
    }

    /// Transforms `event` in place from [`Upcaster::source_version`] to the
    /// next version.
    fn upcast(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure>;
}

/// A shared upcaster is one too, so a list of `Arc<dyn Upcaster>` can be
/// handed to [`UpcasterChainBuilder::upcaster`](crate::UpcasterChainBuilder::upcaster).
impl<U: Upcaster + ?Sized> Upcaster for Arc<U> {
    fn event_type(&self) -> &str {
        (**self).event_type()
    }

    fn source_version(&self) -> u32 {
        (**self).source_version()
    }

    fn target_event_type(&self) -> &str {
        (**self).target_event_type()
    }

    fn upcast(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        (**self).upcast(event)
    }
}

type UpcastFn = dyn Fn(&mut UpcastEvent) -> Result<(), UpcastFailure> + Send + Sync;

/// An upcaster written as a Rust function or closure.
///
/// ```
/// use chronicle_upcast::{FnUpcaster, Upcaster, UpcastFailure};
///
/// let split_name = FnUpcaster::new("UserRegistered", 1, |event| {
///     let name = event.data["name"].as_str().ok_or(UpcastFailure::new("no name").at("/name"))?;
///     let (first, last) = name.split_once(' ').unwrap_or((name, ""));
///     let (first, last) = (first.to_owned(), last.to_owned());
///     event.data["first_name"] = first.into();
///     event.data["last_name"] = last.into();
///     Ok(())
/// });
/// assert_eq!(split_name.source_version(), 1);
/// ```
pub struct FnUpcaster {
    event_type: String,
    target_event_type: String,
    from_version: u32,
    f: Box<UpcastFn>,
}

impl FnUpcaster {
    /// An upcaster of `event_type` from `from_version` to the next version
    /// that keeps the event type.
    pub fn new<F>(event_type: impl Into<String>, from_version: u32, f: F) -> Self
    where
        F: Fn(&mut UpcastEvent) -> Result<(), UpcastFailure> + Send + Sync + 'static,
    {
        let event_type = event_type.into();
        FnUpcaster {
            target_event_type: event_type.clone(),
            event_type,
            from_version,
            f: Box::new(f),
        }
    }

    /// Declares that the function renames the event to `target`. The
    /// function must then set [`UpcastEvent::event_type`] to it; the chain
    /// checks.
    pub fn renaming_to(mut self, target: impl Into<String>) -> Self {
        self.target_event_type = target.into();
        self
    }
}

impl fmt::Debug for FnUpcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnUpcaster")
            .field("event_type", &self.event_type)
            .field("target_event_type", &self.target_event_type)
            .field("from_version", &self.from_version)
            .finish_non_exhaustive()
    }
}

impl Upcaster for FnUpcaster {
    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn source_version(&self) -> u32 {
        self.from_version
    }

    fn target_event_type(&self) -> &str {
        &self.target_event_type
    }

    fn upcast(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        (self.f)(event)
    }
}
