//! Events before and after they are stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{AggregateId, Position};

/// Event metadata: who caused the event and why, and the schema version of
/// its data. Stored in the `metadata` JSONB column; fields other than the
/// named ones are kept in [`Metadata::extra`].
///
/// ```
/// use chronicle_core::Metadata;
/// use uuid::Uuid;
///
/// let m = Metadata::default()
///     .with_correlation_id(Uuid::nil())
///     .with_actor("alice");
/// let json = serde_json::to_value(&m).unwrap();
/// assert_eq!(json["actor"], "alice");
/// assert_eq!(json["schema_version"], 1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    /// Ties together every event caused by one request or workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Who or what caused the event (a user id, a service name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Version of the event's data schema; absent in stored JSON means 1.
    pub schema_version: u32,
    /// Any other metadata fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Hand-written rather than derived: `#[serde(flatten)]` buffers every
/// field through an intermediate tree, and metadata is decoded for every
/// event read.
impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;

        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Metadata;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metadata object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Metadata, A::Error> {
                let mut m = Metadata::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "correlation_id" => m.correlation_id = map.next_value()?,
                        "causation_id" => m.causation_id = map.next_value()?,
                        "actor" => m.actor = map.next_value()?,
                        "schema_version" => m.schema_version = map.next_value()?,
                        _ => {
                            let value: Value = map.next_value()?;
                            m.extra.insert(key.into_owned(), value);
                        }
                    }
                }
                Ok(m)
            }
        }

        deserializer.deserialize_map(Fields)
    }
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            correlation_id: None,
            causation_id: None,
            actor: None,
            schema_version: 1,
            extra: Map::new(),
        }
    }
}

impl Metadata {
    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the schema version of the event's data.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Reads metadata from the stored JSON; `null` or a missing column gives
    /// the default, unknown fields land in `extra`.
    ///
    /// ```
    /// use chronicle_core::Metadata;
    /// use serde_json::json;
    ///
    /// let m = Metadata::from_json(Some(json!({ "actor": "svc", "tenant": "t1" })));
    /// assert_eq!(m.actor.as_deref(), Some("svc"));
    /// assert_eq!(m.extra["tenant"], "t1");
    /// // A named field of the wrong type: everything is kept, as extra fields.
    /// let odd = Metadata::from_json(Some(json!({ "schema_version": "two" })));
    /// assert_eq!(odd.schema_version, 1);
    /// assert_eq!(odd.extra["schema_version"], "two");
    /// ```
    pub fn from_json(value: Option<Value>) -> Self {
        match value {
            Some(value @ Value::Object(_)) => match Metadata::deserialize(&value) {
                Ok(metadata) => metadata,
                // Named fields of the wrong type: keep everything as extra.
                Err(_) => Metadata {
                    extra: match value {
                        Value::Object(map) => map,
                        _ => Map::new(),
                    },
                    ..Metadata::default()
                },
            },
            _ => Metadata::default(),
        }
    }

    /// The metadata as the JSON object stored in the `metadata` column.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("metadata is always serializable")
    }
}

/// An event to append: its type, its data (a JSON object) and its metadata.
///
/// The event id defaults to a fresh UUIDv7, which sorts by creation time.
/// Appending the same event ids again is idempotent.
///
/// ```
/// use chronicle_core::NewEvent;
/// use serde_json::json;
///
/// let e = NewEvent::new("EmailChanged", json!({ "email": "new@example.com" }));
/// assert_eq!(e.event_id.get_version_num(), 7);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The event type, at most 100 characters.
    pub event_type: String,
    /// The event's data; must be a JSON object.
    pub data: Value,
    /// The event's metadata.
    pub metadata: Metadata,
    /// JSON pointers of fields in `data` that hold ciphertext envelopes.
    pub encrypted_fields: Vec<String>,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id and default metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            data,
            metadata: Metadata::default(),
            encrypted_fields: Vec::new(),
        }
    }

    /// Sets the event id (for idempotent retries of the same append).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A stored event, as read back: the spec's columns plus its feed position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The aggregate the event belongs to.
    pub aggregate_id: AggregateId,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The event's type.
    pub event_type: String,
    /// The event's data (a JSON object).
    pub event_data: Value,
    /// The event's metadata.
    pub metadata: Metadata,
    /// The event's version within its aggregate, from 1.
    pub version: u32,
    /// When the event was stored.
    pub timestamp: DateTime<Utc>,
    /// JSON pointers of encrypted fields in `event_data`.
    pub encrypted_fields: Vec<String>,
    /// Where the event stands in the global feed.
    pub position: Position,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_round_trips_named_and_extra_fields() {
        let id = Uuid::now_v7();
        let stored = json!({
            "correlation_id": id, "actor": null, "schema_version": 3,
            "tenant": "t1", "trace": { "span": 7 }
        });
        let m: Metadata = serde_json::from_value(stored).unwrap();
        assert_eq!(m.correlation_id, Some(id));
        assert_eq!(m.actor, None);
        assert_eq!(m.schema_version, 3);
        assert_eq!(m.extra["trace"]["span"], 7);
        let back: Metadata = serde_json::from_value(m.to_json()).unwrap();
        assert_eq!(back, m);
        let empty: Metadata = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Metadata::default());
        assert!(serde_json::from_str::<Metadata>("[1]").is_err());
    }
}
