//! A route (which events go where) and the message an event becomes.

use std::collections::BTreeMap;

use chronicle_core::{EventEnvelope, Message};
use serde_json::Value;

/// The prefix of the attributes the relay sets itself.
pub const ATTRIBUTE_PREFIX: &str = "chronicle-";
/// Attribute: the event type.
pub const EVENT_TYPE_ATTRIBUTE: &str = "chronicle-event-type";
/// Attribute: the aggregate type.
pub const AGGREGATE_TYPE_ATTRIBUTE: &str = "chronicle-aggregate-type";
/// Attribute: the event's schema version (its metadata's).
pub const SCHEMA_VERSION_ATTRIBUTE: &str = "chronicle-schema-version";

/// One route of the relay: the events it matches and where they go.
///
/// ```
/// use chronicle_relay::Route;
///
/// let route = Route::new("events", "orders").event_types(["OrderPlaced"]);
/// assert!(route.matches("OrderPlaced", "order"));
/// assert!(!route.matches("UserRegistered", "user"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Event types it matches (empty: any).
    pub event_types: Vec<String>,
    /// Aggregate types it matches (empty: any).
    pub aggregate_types: Vec<String>,
    /// The broker's name in the configuration.
    pub broker: String,
    /// The destination on that broker (the `MessageQueue`'s name: a topic,
    /// subject or queue).
    pub destination: String,
    /// Attributes set from metadata: attribute name → metadata key
    /// (`correlation_id`, `actor`, or any extra key). A key the event's
    /// metadata lacks is left out; a value that is not a string goes as
    /// its JSON text.
    pub headers: BTreeMap<String, String>,
    /// Whether encrypted fields are decrypted (audited) before publishing;
    /// otherwise they go as the stored envelopes.
    pub decrypt: bool,
    /// The line it was declared on (0 when built in code).
    pub line: u64,
}

impl Route {
    /// A route of every event to `destination` on `broker`.
    pub fn new(broker: impl Into<String>, destination: impl Into<String>) -> Self {
        Route {
            event_types: Vec::new(),
            aggregate_types: Vec::new(),
            broker: broker.into(),
            destination: destination.into(),
            headers: BTreeMap::new(),
            decrypt: false,
            line: 0,
        }
    }

    /// Matches only these event types.
    pub fn event_types<S: Into<String>>(mut self, types: impl IntoIterator<Item = S>) -> Self {
        self.event_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Matches only these aggregate types.
    pub fn aggregate_types<S: Into<String>>(mut self, types: impl IntoIterator<Item = S>) -> Self {
        self.aggregate_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Sets attribute `attribute` from metadata key `metadata_key`.
    pub fn header(mut self, attribute: impl Into<String>, metadata_key: impl Into<String>) -> Self {
        self.headers.insert(attribute.into(), metadata_key.into());
        self
    }

    /// Publishes encrypted fields decrypted (audited).
    pub fn decrypted(mut self) -> Self {
        self.decrypt = true;
        self
    }

    /// Whether an event of `event_type` on an aggregate of
    /// `aggregate_type` takes this route.
    pub fn matches(&self, event_type: &str, aggregate_type: &str) -> bool {
        (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
            && (self.aggregate_types.is_empty()
                || self.aggregate_types.iter().any(|t| t == aggregate_type))
    }

    /// The message `event` becomes on this route: id = event id, group =
    /// aggregate id, payload = the envelope as JSON (type, data, metadata,
    /// version, position, timestamp, encrypted fields), attributes = event
    /// type, aggregate type, schema version and the route's headers.
    ///
    /// ```
    /// use chronicle_core::{EventEnvelope, Metadata, Position};
    /// use chronicle_relay::{Route, decode_event};
    /// use serde_json::json;
    ///
    /// let mut metadata = Metadata::default();
    /// metadata.extra.insert("tenant".into(), json!("acme"));
    /// let event = EventEnvelope {
    ///     event_id: uuid::Uuid::now_v7(),
    ///     aggregate_id: uuid::Uuid::now_v7(),
    ///     aggregate_type: "order".into(),
    ///     event_type: "OrderPlaced".into(),
    ///     event_data: json!({ "total": 5 }),
    ///     metadata,
    ///     version: 1,
    ///     timestamp: chrono::Utc::now(),
    ///     encrypted_fields: vec![],
    ///     position: Position::new(7, 1),
    /// };
    /// let m = Route::new("events", "orders").header("tenant", "tenant").message(&event);
    /// assert_eq!(m.id, event.event_id.to_string());
    /// assert_eq!(m.group, event.aggregate_id.to_string());
    /// assert_eq!(m.attributes["tenant"], "acme");
    /// assert_eq!(m.attributes["chronicle-event-type"], "OrderPlaced");
    /// assert_eq!(decode_event(&m).unwrap(), event);
    /// ```
    pub fn message(&self, event: &EventEnvelope) -> Message {
        let payload = serde_json::to_value(event).unwrap_or(Value::Null);
        let mut m = Message::new(
            event.event_id.to_string(),
            event.aggregate_id.to_string(),
            payload,
        )
        .with_attribute(EVENT_TYPE_ATTRIBUTE, event.event_type.as_str())
        .with_attribute(AGGREGATE_TYPE_ATTRIBUTE, event.aggregate_type.as_str())
        .with_attribute(
            SCHEMA_VERSION_ATTRIBUTE,
            event.metadata.schema_version.to_string(),
        );
        if !self.headers.is_empty() {
            let metadata = serde_json::to_value(&event.metadata).unwrap_or(Value::Null);
            for (attribute, key) in &self.headers {
                match metadata.get(key) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => {
                        m.attributes.insert(attribute.clone(), s.clone());
                    }
                    Some(other) => {
                        m.attributes.insert(attribute.clone(), other.to_string());
                    }
                }
            }
        }
        m
    }
}

/// The event a relayed message carries ([`Route::message`]'s inverse);
/// an error when the payload is not an event, or its id or group do not
/// agree with it.
pub fn decode_event(message: &Message) -> Result<EventEnvelope, String> {
    let event: EventEnvelope = serde_json::from_value(message.payload.clone())
        .map_err(|e| format!("message `{}` does not carry an event: {e}", message.id))?;
    if event.event_id.to_string() != message.id {
        return Err(format!(
            "message `{}` carries event {}: the ids disagree",
            message.id, event.event_id
        ));
    }
    if event.aggregate_id.to_string() != message.group {
        return Err(format!(
            "message `{}` is in group `{}` but its event is of aggregate {}",
            message.id, message.group, event.aggregate_id
        ));
    }
    Ok(event)
}
