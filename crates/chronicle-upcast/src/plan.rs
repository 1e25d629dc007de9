//! Helpers for planning and verifying an eager run without a database:
//! a field-level diff of an event before and after, for `chronicle upcast
//! plan`, and a stable checksum of an event row, for `chronicle upcast
//! verify`.

use std::fmt;
use std::str::FromStr;

use chronicle_core::EventEnvelope;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::UpcastEvent;
use crate::pointer::{escape, is_encrypted, is_opaque, is_redacted};

/// One difference between an event before and after upcasting. Pointers
/// are JSON pointers into the event data.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Change {
    /// The event type changed.
    EventType {
        /// Before.
        old: String,
        /// After.
        new: String,
    },
    /// The schema version changed.
    SchemaVersion {
        /// Before.
        old: u32,
        /// After.
        new: u32,
    },
    /// A field appeared.
    Added {
        /// Where.
        pointer: String,
        /// Its value.
        value: Value,
    },
    /// A field disappeared.
    Removed {
        /// Where it was.
        pointer: String,
        /// Its value.
        value: Value,
    },
    /// A field's value changed.
    Changed {
        /// Where.
        pointer: String,
        /// Before.
        old: Value,
        /// After.
        new: Value,
    },
    /// A value went from one place to another, unchanged.
    Moved {
        /// Where it was.
        from: String,
        /// Where it is.
        to: String,
        /// The value.
        value: Value,
    },
    /// The list of encrypted field pointers changed.
    EncryptedFields {
        /// Before.
        old: Vec<String>,
        /// After.
        new: Vec<String>,
    },
}

/// The differences between two versions of one event, for `chronicle
/// upcast plan`. Serialises for `--output json`; displays as compact
/// lines, with encrypted and redacted values shown as `<encrypted>` and
/// `<redacted>` and long values shortened.
///
/// ```
/// use chronicle_upcast::{EventDiff, EventIdentity, UpcastEvent};
/// use serde_json::json;
/// use uuid::Uuid;
///
/// let id = EventIdentity {
///     event_id: Uuid::nil(),
///     aggregate_id: Uuid::nil(),
///     aggregate_type: "User".into(),
///     version: 1,
///     position: None,
/// };
/// let before = UpcastEvent::new(id, "UserRegistered", json!({ "name": "Ada", "gender": "F" }));
/// let mut after = before.clone();
/// after.data = json!({ "full_name": "Ada", "gender": "female" });
/// let diff = EventDiff::between(&before, &after).to_string();
/// assert_eq!(
///     diff.lines().collect::<Vec<_>>(),
///     [
///         "event 00000000-0000-0000-0000-000000000000: UserRegistered v1 -> UserRegistered v1",
///         r#"  ~ /gender: "F" -> "female""#,
///         r#"  > /name -> /full_name: "Ada""#,
///     ]
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDiff {
    /// The event.
    pub event_id: Uuid,
    /// Its type before.
    pub from_event_type: String,
    /// Its schema version before.
    pub from_version: u32,
    /// Its type after.
    pub to_event_type: String,
    /// Its schema version after.
    pub to_version: u32,
    /// The differences, event type and version first, then data in pointer
    /// order.
    pub changes: Vec<Change>,
}

impl EventDiff {
    /// The differences from `before` to `after`.
    pub fn between(before: &UpcastEvent, after: &UpcastEvent) -> Self {
        let mut changes = Vec::new();
        if before.event_type != after.event_type {
            changes.push(Change::EventType {
                old: before.event_type.clone(),
                new: after.event_type.clone(),
            });
        }
        if before.schema_version() != after.schema_version() {
            changes.push(Change::SchemaVersion {
                old: before.schema_version(),
                new: after.schema_version(),
            });
        }
        changes.extend(diff(&before.data, &after.data));
        if before.encrypted_fields != after.encrypted_fields {
            changes.push(Change::EncryptedFields {
                old: before.encrypted_fields.clone(),
                new: after.encrypted_fields.clone(),
            });
        }
        EventDiff {
            event_id: before.event_id(),
            from_event_type: before.event_type.clone(),
            from_version: before.schema_version(),
            to_event_type: after.event_type.clone(),
            to_version: after.schema_version(),
            changes,
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The field-level differences between two JSON documents: objects are
/// compared key by key (a new or dropped object is listed leaf by leaf),
/// arrays and opaque values (encrypted, redacted) as a whole. A value that
/// was removed in one place and added, equal and unambiguous, in another
/// is reported as moved.
///
/// ```
/// use chronicle_upcast::{diff, Change};
/// use serde_json::json;
///
/// let changes = diff(&json!({ "street": "Main" }), &json!({ "address": { "street": "Main" } }));
/// assert_eq!(
///     changes,
///     [Change::Moved { from: "/street".into(), to: "/address/street".into(), value: json!("Main") }]
/// );
/// ```
pub fn diff(before: &Value, after: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk(String::new(), before, after, &mut out);
    pair_moves(out)
}

fn walk(path: String, a: &Value, b: &Value, out: &mut Vec<Change>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if !is_opaque(a) && !is_opaque(b) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}/{}", escape(k));
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => walk(p, va, vb, out),
                    (Some(va), None) => leaves(p, va, out, &|pointer, value| Change::Removed {
                        pointer,
                        value,
                    }),
                    (None, Some(vb)) => leaves(p, vb, out, &|pointer, value| Change::Added {
                        pointer,
                        value,
                    }),
                    (None, None) => {}
                }
            }
        }
        _ => out.push(Change::Changed {
            pointer: path,
            old: a.clone(),
            new: b.clone(),
        }),
    }
}

fn leaves(path: String, v: &Value, out: &mut Vec<Change>, make: &dyn Fn(String, Value) -> Change) {
    match v {
        Value::Object(m) if !m.is_empty() && !is_opaque(v) => {
            for (k, child) in m {
                leaves(format!("{path}/{}", escape(k)), child, out, make);
            }
        }
        _ => out.push(make(path, v.clone())),
    }
}

/// Turns a removal and an addition of the same value into a move, when no
/// other removal or addition has that value.
fn pair_moves(changes: Vec<Change>) -> Vec<Change> {
    let count = |want_removed: bool, value: &Value| {
        changes
            .iter()
            .filter(|c| match c {
                Change::Removed { value: v, .. } => want_removed && v == value,
                Change::Added { value: v, .. } => !want_removed && v == value,
                _ => false,
            })
            .count()
    };
    let mut moved_to = Vec::new();
    let mut result = Vec::with_capacity(changes.len());
    for c in &changes {
        if let Change::Removed { pointer, value } = c
            && count(true, value) == 1
            && count(false, value) == 1
        {
            let to = changes
                .iter()
                .find_map(|a| match a {
                    Change::Added { pointer, value: v } if v == value => Some(pointer.clone()),
                    _ => None,
                })
                .expect("counted one");
            moved_to.push(to.clone());
            result.push(Change::Moved {
                from: pointer.clone(),
                to,
                value: value.clone(),
            });
        } else {
            result.push(c.clone());
        }
    }
    result.retain(|c| !matches!(c, Change::Added { pointer, .. } if moved_to.contains(pointer)));
    result
}

/// The longest value shown in a diff line before it is shortened.
const SHOW_MAX: usize = 60;

fn show(v: &Value) -> String {
    if is_encrypted(v) {
        return "<encrypted>".to_owned();
    }
    if is_redacted(v) {
        return "<redacted>".to_owned();
    }
    let s = v.to_string();
    if s.chars().count() <= SHOW_MAX {
        s
    } else {
        let cut: String = s.chars().take(SHOW_MAX - 1).collect();
        format!("{cut}…")
    }
}

fn show_pointer(p: &str) -> &str {
    if p.is_empty() { "(data)" } else { p }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::EventType { old, new } => write!(f, "event_type: {old} -> {new}"),
            Change::SchemaVersion { old, new } => write!(f, "schema_version: {old} -> {new}"),
            Change::Added { pointer, value } => {
                write!(f, "+ {}: {}", show_pointer(pointer), show(value))
            }
            Change::Removed { pointer, value } => {
                write!(f, "- {}: {}", show_pointer(pointer), show(value))
            }
            Change::Changed { pointer, old, new } => {
                write!(
                    f,
                    "~ {}: {} -> {}",
                    show_pointer(pointer),
                    show(old),
                    show(new)
                )
            }
            Change::Moved { from, to, value } => write!(f, "> {from} -> {to}: {}", show(value)),
            Change::EncryptedFields { old, new } => {
                write!(f, "encrypted_fields: {old:?} -> {new:?}")
            }
        }
    }
}

impl fmt::Display for EventDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "event {}: {} v{} -> {} v{}",
            self.event_id,
            self.from_event_type,
            self.from_version,
            self.to_event_type,
            self.to_version
        )?;
        for c in &self.changes {
            if matches!(c, Change::EventType { .. } | Change::SchemaVersion { .. }) {
                continue;
            }
            writeln!(f, "  {c}")?;
        }
        Ok(())
    }
}

/// The canonical JSON text of `value`: object keys sorted by code point at
/// every level, no whitespace, serde_json's escaping and number format.
/// Equal JSON values give equal text whatever their key order.
///
/// ```
/// use chronicle_upcast::canonical_json;
/// use serde_json::json;
///
/// assert_eq!(canonical_json(&json!({ "b": 1, "a": [ { "d": 2, "c": 3 } ] })), r#"{"a":[{"c":3,"d":2}],"b":1}"#);
/// ```
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A SHA-256 checksum of an event row over its [`canonical_json`], for
/// comparing the store with its backup (`chronicle upcast verify`).
/// Displays and parses as 64 lowercase hex digits.
///
/// Numbers are compared as serde_json reads them: a JSONB `1.10` and `1.1`
/// give the same checksum.
///
/// ```
/// use chronicle_upcast::Checksum;
/// use serde_json::json;
///
/// let a = Checksum::of(&json!({ "event_id": "e1", "event_data": { "x": 1, "y": 2 } }));
/// let b = Checksum::of(&json!({ "event_data": { "y": 2, "x": 1 }, "event_id": "e1" }));
/// assert_eq!(a, b);
/// assert_eq!(a.to_string().parse::<Checksum>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Checksum([u8; 32]);

impl Checksum {
    /// The checksum of any JSON value.
    pub fn of(value: &Value) -> Self {
        let digest = Sha256::digest(canonical_json(value).as_bytes());
        let mut bytes = [0; 32];
        bytes.copy_from_slice(&digest);
        Checksum(bytes)
    }

    /// The checksum of a stored event: all its columns (identity, type,
    /// data, metadata, version, timestamp, encrypted fields, position) as
    /// `EventEnvelope` serialises them. Metadata is in its decoded form, so
    /// compare rows decoded the same way.
    pub fn of_envelope(envelope: &EventEnvelope) -> Self {
        Checksum::of(&serde_json::to_value(envelope).expect("envelopes serialise"))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({self})")
    }
}

/// Text that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a checksum: expected 64 hex digits as printed by `chronicle upcast verify`")]
pub struct ChecksumParseError(pub String);

impl FromStr for Checksum {
    type Err = ChecksumParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ChecksumParseError(s.to_owned());
        if s.len() != 64 || !s.is_ascii() {
            return Err(err());
        }
        let mut bytes = [0; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Checksum(bytes))
    }
}

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventIdentity;
    use chronicle_core::{Metadata, Position};
    use serde_json::json;

    fn event(event_type: &str, version: u32, data: Value) -> UpcastEvent {
        let id = EventIdentity {
            event_id: Uuid::from_u128(42),
            aggregate_id: Uuid::from_u128(1),
            aggregate_type: "User".into(),
            version: 1,
            position: None,
        };
        UpcastEvent::new(id, event_type, data).with_schema_version(version)
    }

    #[test]
    fn diff_lists_every_kind_of_change() {
        let envelope = json!({ "$enc": "v1", "ct": "QUJD" });
        let before = event(
            "UserRegistered",
            1,
            json!({ "name": "Ada", "gender": "F", "legacy_flag": true, "street": "Main St", "tags": [1], "email": envelope }),
        )
        .with_encrypted_fields(["/email"]);
        let after = event(
            "UserSignedUp",
            2,
            json!({ "name": "Ada", "gender": "female", "country": "unknown", "address": { "street": "Main St" }, "tags": [1, 2], "contact": { "email": envelope } }),
        )
        .with_encrypted_fields(["/contact/email"]);
        let d = EventDiff::between(&before, &after);
        assert_eq!(
            d.to_string(),
            "event 00000000-0000-0000-0000-00000000002a: UserRegistered v1 -> UserSignedUp v2\n  \
             + /country: \"unknown\"\n  \
             > /email -> /contact/email: <encrypted>\n  \
             ~ /gender: \"F\" -> \"female\"\n  \
             - /legacy_flag: true\n  \
             > /street -> /address/street: \"Main St\"\n  \
             ~ /tags: [1] -> [1,2]\n  \
             encrypted_fields: [\"/email\"] -> [\"/contact/email\"]\n"
        );
        assert_eq!(
            d.changes[0],
            Change::EventType {
                old: "UserRegistered".into(),
                new: "UserSignedUp".into()
            }
        );
        assert_eq!(d.changes[1], Change::SchemaVersion { old: 1, new: 2 });
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["changes"][2]["op"], "added");
        assert_eq!(json["changes"][2]["pointer"], "/country");
        assert!(EventDiff::between(&before, &before).is_empty());
    }

    #[test]
    fn ambiguous_moves_stay_removals_and_additions() {
        let changes = diff(
            &json!({ "a": true, "b": true }),
            &json!({ "c": true, "d": true }),
        );
        assert_eq!(changes.len(), 4);
        assert!(changes.iter().all(|c| !matches!(c, Change::Moved { .. })));
    }

    #[test]
    fn long_values_are_shortened() {
        let long = "x".repeat(200);
        let changes = diff(&json!({}), &json!({ "note": long }));
        let line = changes[0].to_string();
        assert!(line.chars().count() < 80, "{line}");
        assert!(line.ends_with('…'));
        let redacted = diff(
            &json!({ "a": 1 }),
            &json!({ "a": { "$redacted": "2026-01-01" } }),
        );
        assert_eq!(redacted[0].to_string(), "~ /a: 1 -> <redacted>");
    }

    #[test]
    fn checksum_ignores_key_order_and_sees_every_change() {
        let a: Value =
            serde_json::from_str(r#"{"b":{"y":[1,{"q":1,"p":2}],"x":"é\n"},"a":1.5}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":1.5,"b":{"x":"é\n","y":[1,{"p":2,"q":1}]}}"#).unwrap();
        assert_eq!(Checksum::of(&a), Checksum::of(&b));
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let c: Value =
            serde_json::from_str(r#"{"a":1.5,"b":{"x":"é\n","y":[{"p":2,"q":1},1]}}"#).unwrap();
        assert_ne!(Checksum::of(&a), Checksum::of(&c), "array order matters");
        // A known digest, so the format never drifts unnoticed.
        assert_eq!(
            Checksum::of(&json!({})).to_string(),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn envelope_checksums_cover_every_column() {
        let env = EventEnvelope {
            event_id: Uuid::from_u128(1),
            aggregate_id: Uuid::from_u128(2),
            aggregate_type: "User".into(),
            event_type: "UserRegistered".into(),
            event_data: json!({ "b": 1, "a": 2 }),
            metadata: Metadata::default(),
            version: 1,
            timestamp: Default::default(),
            encrypted_fields: vec![],
            position: Position::new(1, 1),
        };
        let base = Checksum::of_envelope(&env);
        let mut moved = env.clone();
        moved.position = Position::new(1, 2);
        assert_ne!(Checksum::of_envelope(&moved), base);
        let mut upcast = env.clone();
        upcast.metadata.schema_version = 2;
        assert_ne!(Checksum::of_envelope(&upcast), base);
        assert!("zz".parse::<Checksum>().is_err());
        assert!("é".repeat(32).parse::<Checksum>().is_err());
    }
}
