//! The event as upcasters see it.

use chronicle_core::{AggregateId, EventEnvelope, Metadata, Position};
use serde_json::Value;
use uuid::Uuid;

use crate::{Error, Result};

/// The fields that identify a stored event and fix its place. Upcasting
/// never changes them; the chain and [`check_identity`] enforce it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventIdentity {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The aggregate the event belongs to.
    pub aggregate_id: AggregateId,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The event's version within its aggregate.
    pub version: u32,
    /// The event's place in the global feed; `None` for an event not read
    /// from a store (a test fixture, a backup row without it).
    pub position: Option<Position>,
}

impl EventIdentity {
    /// The identity of a stored event.
    pub fn of(envelope: &EventEnvelope) -> Self {
        EventIdentity {
            event_id: envelope.event_id,
            aggregate_id: envelope.aggregate_id,
            aggregate_type: envelope.aggregate_type.clone(),
            version: envelope.version,
            position: Some(envelope.position),
        }
    }
}

/// Fails with [`Error::IdentityChanged`] naming the first field of
/// `after` that differs from `before`.
///
/// ```
/// use chronicle_upcast::{check_identity, EventIdentity};
/// use uuid::Uuid;
///
/// let before = EventIdentity {
///     event_id: Uuid::nil(),
///     aggregate_id: Uuid::nil(),
///     aggregate_type: "User".into(),
///     version: 3,
///     position: None,
/// };
/// let after = EventIdentity { version: 4, ..before.clone() };
/// let err = check_identity(&before, &after).unwrap_err();
/// assert!(err.to_string().contains("version changed from 3 to 4"));
/// ```
pub fn check_identity(before: &EventIdentity, after: &EventIdentity) -> Result<()> {
    let changed = |field: &'static str, b: String, a: String| {
        Err(Error::IdentityChanged {
            event_id: before.event_id,
            field,
            before: b,
            after: a,
        })
    };
    let show = |p: Option<Position>| p.map_or_else(|| "none".to_owned(), |p| p.to_string());
    if before.event_id != after.event_id {
        return changed(
            "event_id",
            before.event_id.to_string(),
            after.event_id.to_string(),
        );
    }
    if before.aggregate_id != after.aggregate_id {
        return changed(
            "aggregate_id",
            before.aggregate_id.to_string(),
            after.aggregate_id.to_string(),
        );
    }
    if before.aggregate_type != after.aggregate_type {
        return changed(
            "aggregate_type",
            before.aggregate_type.clone(),
            after.aggregate_type.clone(),
        );
    }
    if before.version != after.version {
        return changed(
            "version",
            before.version.to_string(),
            after.version.to_string(),
        );
    }
    if before.position != after.position {
        return changed("position", show(before.position), show(after.position));
    }
    Ok(())
}

/// An event on its way through upcasters: what they may change (event type,
/// data, encrypted field pointers) and what they may only read (identity,
/// metadata, schema version).
///
/// The chain sets the schema version after each upcaster; an upcaster that
/// replaces the whole value with another identity is caught by the chain.
///
/// Encrypted fields: `encrypted_fields` lists JSON pointers of `data` that
/// hold ciphertext envelopes (`{"$enc": "v1", ...}`). Declarative steps
/// carry envelopes and redaction markers (`{"$redacted": ...}`) over
/// verbatim and keep the pointer list in step with renames, moves and
/// removals. Ciphertexts are bound to their pointer, so decrypt those
/// pointers before upcasting and re-encrypt the pointers listed afterwards
/// (see the crate docs); that is what the eager runner does, under the
/// subject's current key.
///
/// ```
/// use chronicle_upcast::{EventIdentity, UpcastEvent};
/// use serde_json::json;
/// use uuid::Uuid;
///
/// let identity = EventIdentity {
///     event_id: Uuid::nil(),
///     aggregate_id: Uuid::nil(),
///     aggregate_type: "User".into(),
///     version: 1,
///     position: None,
/// };
/// let e = UpcastEvent::new(identity, "UserRegistered", json!({ "name": "Ada" }))
///     .with_encrypted_fields(["/email"]);
/// assert_eq!(e.schema_version(), 1);
/// assert_eq!(e.encrypted_fields, ["/email"]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct UpcastEvent {
    /// The event type; an upcaster may rename it.
    pub event_type: String,
    /// The event data (a JSON object).
    pub data: Value,
    /// JSON pointers of encrypted fields in `data`.
    pub encrypted_fields: Vec<String>,
    metadata: Metadata,
    identity: EventIdentity,
}

impl UpcastEvent {
    /// An event with default metadata (schema version 1).
    pub fn new(identity: EventIdentity, event_type: impl Into<String>, data: Value) -> Self {
        UpcastEvent {
            event_type: event_type.into(),
            data,
            encrypted_fields: Vec::new(),
            metadata: Metadata::default(),
            identity,
        }
    }

    /// The upcastable part of a stored event.
    pub fn from_envelope(envelope: &EventEnvelope) -> Self {
        UpcastEvent {
            event_type: envelope.event_type.clone(),
            data: envelope.event_data.clone(),
            encrypted_fields: envelope.encrypted_fields.clone(),
            metadata: envelope.metadata.clone(),
            identity: EventIdentity::of(envelope),
        }
    }

    /// Sets the metadata, including the schema version it carries.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.metadata.schema_version = version;
        self
    }

    /// Sets the pointers of encrypted fields.
    pub fn with_encrypted_fields<S: Into<String>>(
        mut self,
        pointers: impl IntoIterator<Item = S>,
    ) -> Self {
        self.encrypted_fields = pointers.into_iter().map(Into::into).collect();
        self
    }

    /// The event's identity, which upcasting never changes.
    pub fn identity(&self) -> &EventIdentity {
        &self.identity
    }

    /// The event's id.
    pub fn event_id(&self) -> Uuid {
        self.identity.event_id
    }

    /// The schema version of the data.
    pub fn schema_version(&self) -> u32 {
        self.metadata.schema_version
    }

    /// The event's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub(crate) fn set_schema_version(&mut self, version: u32) {
        self.metadata.schema_version = version;
    }

    /// Writes the event type, data, metadata (with the new schema version)
    /// and encrypted fields into the stored event they came from; its
    /// identity and timestamp stay. Fails with [`Error::IdentityChanged`]
    /// when `envelope` is not that event.
    pub fn write_to(self, envelope: &mut EventEnvelope) -> Result<()> {
        check_identity(&EventIdentity::of(envelope), &self.identity)?;
        envelope.event_type = self.event_type;
        envelope.event_data = self.data;
        envelope.metadata = self.metadata;
        envelope.encrypted_fields = self.encrypted_fields;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn envelope() -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::from_u128(1),
            aggregate_id: Uuid::from_u128(2),
            aggregate_type: "User".into(),
            event_type: "UserRegistered".into(),
            event_data: json!({ "name": "Ada" }),
            metadata: Metadata::default().with_actor("test"),
            version: 1,
            timestamp: Default::default(),
            encrypted_fields: vec![],
            position: Position::new(10, 20),
        }
    }

    #[test]
    fn round_trips_through_an_envelope() {
        let mut env = envelope();
        let mut e = UpcastEvent::from_envelope(&env);
        e.data = json!({ "full_name": "Ada" });
        e.set_schema_version(2);
        e.write_to(&mut env).unwrap();
        assert_eq!(env.event_data, json!({ "full_name": "Ada" }));
        assert_eq!(env.metadata.schema_version, 2);
        assert_eq!(env.metadata.actor.as_deref(), Some("test"));
        assert_eq!(env.position, Position::new(10, 20));
    }

    #[test]
    fn refuses_to_write_into_another_event() {
        let e = UpcastEvent::from_envelope(&envelope());
        let mut other = envelope();
        other.position = Position::new(10, 21);
        let err = e.write_to(&mut other).unwrap_err();
        assert!(
            matches!(
                err,
                Error::IdentityChanged {
                    field: "position",
                    ..
                }
            ),
            "{err}"
        );
    }
}
