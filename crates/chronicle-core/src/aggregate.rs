//! Aggregates: state folded from events, and commands that produce events.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::EventEnvelope;

/// A stored event that does not decode into the domain's event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode event of type `{event_type}`: {reason}")]
pub struct DecodeError {
    /// The stored event type.
    pub event_type: String,
    /// Why decoding failed.
    pub reason: String,
}

/// A domain event that maps to and from an event type and a JSON object.
///
/// The default methods follow serde's externally tagged enum form: the
/// variant name is the event type and the variant's fields are the data, so
/// an enum of struct variants needs nothing more than an empty impl.
///
/// ```
/// use chronicle_core::DomainEvent;
/// use serde::{Deserialize, Serialize};
/// use serde_json::json;
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// enum UserEvent {
///     Registered { email: String },
///     Renamed { name: String },
/// }
/// impl DomainEvent for UserEvent {}
///
/// let e = UserEvent::Renamed { name: "Ada".into() };
/// let (ty, data) = e.to_stored().unwrap();
/// assert_eq!(ty, "Renamed");
/// assert_eq!(data, json!({ "name": "Ada" }));
/// assert_eq!(UserEvent::from_stored(&ty, &data).unwrap(), e);
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// The event type and its data object.
    fn to_stored(&self) -> Result<(String, Value), DecodeError> {
        let fail = |reason: String| DecodeError {
            event_type: std::any::type_name::<Self>().to_owned(),
            reason,
        };
        match serde_json::to_value(self).map_err(|e| fail(e.to_string()))? {
            Value::Object(map) if map.len() == 1 => {
                let (ty, data) = map.into_iter().next().expect("one entry");
                match data {
                    Value::Object(_) => Ok((ty, data)),
                    other => Err(fail(format!(
                        "variant `{ty}` serializes to {other}, not to an object; use a struct variant"
                    ))),
                }
            }
            other => Err(fail(format!(
                "expected an externally tagged enum of struct variants, got {other}"
            ))),
        }
    }

    /// Rebuilds the event from a stored type and data object.
    fn from_stored(event_type: &str, data: &Value) -> Result<Self, DecodeError> {
        let mut map = serde_json::Map::with_capacity(1);
        map.insert(event_type.to_owned(), data.clone());
        serde_json::from_value(Value::Object(map)).map_err(|e| DecodeError {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// A consistency boundary: state folded from its events, and the decisions
/// it takes on commands.
///
/// ```
/// use chronicle_core::{Aggregate, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent { Added { by: i64 } }
/// impl DomainEvent for CounterEvent {}
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("counter must stay below 100")]
/// struct TooBig;
///
/// #[derive(Default)]
/// struct Counter { total: i64 }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Event = CounterEvent;
///     type Command = i64;
///     type Error = TooBig;
///
///     fn apply(&mut self, event: CounterEvent) {
///         let CounterEvent::Added { by } = event;
///         self.total += by;
///     }
///
///     fn handle(&self, by: i64) -> Result<Vec<CounterEvent>, TooBig> {
///         if self.total + by >= 100 { return Err(TooBig); }
///         Ok(vec![CounterEvent::Added { by }])
///     }
/// }
///
/// let mut c = Counter::default();
/// for e in c.handle(5).unwrap() { c.apply(e); }
/// assert_eq!(c.total, 5);
/// ```
pub trait Aggregate: Default + Send + Sync {
    /// The `aggregate_type` stored with its events (at most 50 characters).
    const TYPE: &'static str;
    /// The aggregate's events.
    type Event: DomainEvent + Send + Sync;
    /// The commands it handles.
    type Command: Send;
    /// The domain error a command can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Must not fail: the event happened.
    fn apply(&mut self, event: Self::Event);

    /// Decides which events a command produces, without changing state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds stored events into a fresh state; returns it with the version
    /// of the last event folded (0 when there were none).
    fn fold<'a>(
        events: impl IntoIterator<Item = &'a EventEnvelope>,
    ) -> Result<(Self, u32), DecodeError> {
        let mut state = Self::default();
        let mut version = 0;
        for stored in events {
            state.apply(Self::Event::from_stored(
                &stored.event_type,
                &stored.event_data,
            )?);
            version = stored.version;
        }
        Ok((state, version))
    }
}
