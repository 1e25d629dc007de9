//! The field envelope `{"$enc":"v1","kid":…,"iv":…,"ct":…}`, its associated
//! data, and redaction markers.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chronicle_core::EventEnvelope;
use rand::RngCore;
use serde_json::{Map, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::{DataKey, DataKeyId, SubjectId, push_len_prefixed};

/// The envelope format version written into `"$enc"`.
pub const ENVELOPE_VERSION: &str = "v1";

/// The key of the version tag that marks an envelope.
pub const ENVELOPE_TAG: &str = "$enc";

/// The key of the reason tag that marks a redacted value.
pub const REDACTED_TAG: &str = "$redacted";

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// An unwrapped data key, ready to encrypt: the AES key schedule is computed
/// once and cached with the key.
pub(crate) struct LiveKey {
    pub(crate) id: DataKeyId,
    pub(crate) subject: SubjectId,
    cipher: Aes256Gcm,
}

impl LiveKey {
    pub(crate) fn new(id: DataKeyId, subject: SubjectId, key: &DataKey) -> Self {
        LiveKey {
            id,
            subject,
            cipher: Aes256Gcm::new(key.expose_secret().into()),
        }
    }
}

/// The associated data of a field ciphertext:
/// `"chronicle/field/v1" 0x00 || event_id (16) || aggregate_id (16) ||
/// kid (16) || len32(pointer) || pointer`.
pub(crate) fn field_aad(
    event_id: Uuid,
    aggregate_id: Uuid,
    key_id: DataKeyId,
    pointer: &str,
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(19 + 48 + 4 + pointer.len());
    aad.extend_from_slice(b"chronicle/field/v1\0");
    aad.extend_from_slice(event_id.as_bytes());
    aad.extend_from_slice(aggregate_id.as_bytes());
    aad.extend_from_slice(key_id.as_uuid().as_bytes());
    push_len_prefixed(&mut aad, pointer.as_bytes());
    aad
}

/// Encrypts one field value (its JSON text) into an envelope.
pub(crate) fn seal(
    key: &LiveKey,
    event_id: Uuid,
    aggregate_id: Uuid,
    pointer: &str,
    value: &Value,
) -> Result<Value, aes_gcm::Error> {
    // Serializing a `Value` cannot fail (map keys are strings).
    let mut buffer = serde_json::to_vec(value).unwrap_or_default();
    buffer.reserve_exact(TAG_LEN);
    let mut iv = [0u8; IV_LEN];
    rand::rng().fill_bytes(&mut iv);
    let aad = field_aad(event_id, aggregate_id, key.id, pointer);
    // In place: the plaintext bytes are overwritten by the ciphertext.
    key.cipher
        .encrypt_in_place((&iv).into(), &aad, &mut buffer)?;
    let mut map = Map::new();
    map.insert(ENVELOPE_TAG.into(), Value::from(ENVELOPE_VERSION));
    map.insert("kid".into(), Value::from(key.id.to_string()));
    map.insert("iv".into(), Value::from(STANDARD.encode(iv)));
    map.insert("ct".into(), Value::from(STANDARD.encode(&buffer)));
    Ok(Value::Object(map))
}

/// A parsed envelope.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) kid: DataKeyId,
    iv: [u8; IV_LEN],
    ct: Vec<u8>,
}

/// Parses an envelope strictly: exactly the four keys, version `v1`, a UUID
/// `kid`, a 12-byte `iv` and a `ct` at least as long as the tag.
pub(crate) fn parse(value: &Value) -> Result<Envelope, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "expected an envelope object, found {}",
            kind(value)
        ));
    };
    match map.get(ENVELOPE_TAG) {
        Some(Value::String(v)) if v == ENVELOPE_VERSION => {}
        Some(Value::String(v)) => {
            return Err(format!(
                "unsupported envelope version {v:?} (this build reads {ENVELOPE_VERSION:?})"
            ));
        }
        _ => {
            return Err(format!(
                "missing \"{ENVELOPE_TAG}\": \"{ENVELOPE_VERSION}\""
            ));
        }
    }
    if map.len() != 4 {
        return Err("an envelope has exactly the keys $enc, kid, iv and ct".into());
    }
    let text = |name: &str| match map.get(name) {
        Some(Value::String(s)) => Ok(s.as_str()),
        _ => Err(format!("\"{name}\" must be a string")),
    };
    let kid = text("kid")?
        .parse::<DataKeyId>()
        .map_err(|_| "\"kid\" is not a UUID".to_owned())?;
    let iv_bytes = STANDARD
        .decode(text("iv")?)
        .map_err(|_| "\"iv\" is not standard base64".to_owned())?;
    let iv: [u8; IV_LEN] = iv_bytes
        .try_into()
        .map_err(|_| format!("\"iv\" must be {IV_LEN} bytes"))?;
    let ct = STANDARD
        .decode(text("ct")?)
        .map_err(|_| "\"ct\" is not standard base64".to_owned())?;
    if ct.len() < TAG_LEN {
        return Err(format!("\"ct\" is shorter than the {TAG_LEN}-byte tag"));
    }
    Ok(Envelope { kid, iv, ct })
}

/// Decrypts an envelope; `None` when authentication fails. The plaintext is
/// the field's JSON text, zeroized on drop.
pub(crate) fn open(
    key: &LiveKey,
    event_id: Uuid,
    aggregate_id: Uuid,
    pointer: &str,
    envelope: Envelope,
) -> Option<Zeroizing<Vec<u8>>> {
    let aad = field_aad(event_id, aggregate_id, envelope.kid, pointer);
    let mut buffer = Zeroizing::new(envelope.ct);
    key.cipher
        .decrypt_in_place((&envelope.iv).into(), &aad, &mut *buffer)
        .ok()?;
    Some(buffer)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object without \"$enc\"",
    }
}

/// Whether `value` looks like an encryption envelope (an object with
/// `"$enc"`).
pub fn is_envelope(value: &Value) -> bool {
    matches!(value, Value::Object(m) if m.contains_key(ENVELOPE_TAG))
}

/// Why a reader sees a redaction marker `{"$redacted": <reason>}` instead of
/// a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Redaction {
    /// The subject's data keys were destroyed: the value is gone for good.
    Shredded,
    /// The reader may not see the value (no keys, or the access policy said
    /// no).
    Denied,
}

impl Redaction {
    /// The reason as written in the marker: `shredded` or `denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            Redaction::Shredded => "shredded",
            Redaction::Denied => "denied",
        }
    }

    /// The marker value, e.g. `{"$redacted":"shredded"}`.
    pub fn marker(self) -> Value {
        let mut map = Map::new();
        map.insert(REDACTED_TAG.into(), Value::from(self.as_str()));
        Value::Object(map)
    }

    /// The reason of a marker value, if `value` is one.
    pub fn from_marker(value: &Value) -> Option<Self> {
        let Value::Object(map) = value else {
            return None;
        };
        if map.len() != 1 {
            return None;
        }
        match map.get(REDACTED_TAG)?.as_str()? {
            "shredded" => Some(Redaction::Shredded),
            "denied" => Some(Redaction::Denied),
            _ => None,
        }
    }
}

/// Replaces every envelope of a stored event by the [`Redaction::Denied`]
/// marker, without keys: for readers that must never see the data (a DLQ
/// viewer, a projection without clearance). Clears `encrypted_fields`;
/// returns how many values were redacted.
///
/// ```
/// use chronicle_crypto::{redact_event, Redaction};
/// # use chronicle_core::{EventEnvelope, Metadata, Position};
/// # use serde_json::json;
/// # let mut event = EventEnvelope {
/// #     event_id: uuid::Uuid::nil(), aggregate_id: uuid::Uuid::nil(),
/// #     aggregate_type: "User".into(), event_type: "UserRegistered".into(),
/// #     event_data: json!({"email": {"$enc": "v1", "kid": "k", "iv": "", "ct": ""}}),
/// #     metadata: Metadata::default(), version: 1, timestamp: chrono::Utc::now(),
/// #     encrypted_fields: vec!["/email".into()], position: Position::new(1, 1),
/// # };
/// assert_eq!(redact_event(&mut event), 1);
/// assert_eq!(event.event_data["email"], Redaction::Denied.marker());
/// assert!(event.encrypted_fields.is_empty());
/// ```
pub fn redact_event(event: &mut EventEnvelope) -> usize {
    let mut redacted = 0;
    for pointer in std::mem::take(&mut event.encrypted_fields) {
        if let Some(slot) = crate::config::lookup_mut(&mut event.event_data, &pointer)
            && is_envelope(slot)
        {
            *slot = Redaction::Denied.marker();
            redacted += 1;
        }
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> LiveKey {
        LiveKey::new(
            DataKeyId::new(),
            SubjectId::new("s"),
            &DataKey::generate().unwrap(),
        )
    }

    #[test]
    fn seal_open_and_strict_parse() {
        let k = key();
        let (e, a) = (Uuid::now_v7(), Uuid::now_v7());
        let value = json!({ "street": "1 Main St", "n": [1, 2] });
        let env = seal(&k, e, a, "/address", &value).unwrap();
        assert_eq!(env["$enc"], "v1");
        assert_eq!(env["kid"], k.id.to_string());
        let plain = open(&k, e, a, "/address", parse(&env).unwrap()).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&plain).unwrap(), value);
        assert!(open(&k, e, a, "/other", parse(&env).unwrap()).is_none());
        assert!(open(&k, a, e, "/address", parse(&env).unwrap()).is_none());

        let mut extra = env.clone();
        extra["x"] = json!(1);
        assert!(parse(&extra).unwrap_err().contains("exactly the keys"));
        let mut v2 = env.clone();
        v2["$enc"] = json!("v2");
        assert!(
            parse(&v2)
                .unwrap_err()
                .contains("unsupported envelope version")
        );
        let mut bad_iv = env.clone();
        bad_iv["iv"] = json!("AAAA");
        assert!(parse(&bad_iv).unwrap_err().contains("12 bytes"));
        assert!(parse(&json!("plain")).unwrap_err().contains("a string"));
    }

    #[test]
    fn markers_round_trip() {
        for r in [Redaction::Shredded, Redaction::Denied] {
            assert_eq!(Redaction::from_marker(&r.marker()), Some(r));
        }
        assert_eq!(
            Redaction::Shredded.marker(),
            json!({"$redacted": "shredded"})
        );
        assert_eq!(Redaction::from_marker(&json!({"$redacted": "x"})), None);
        assert!(is_envelope(&json!({"$enc": "v1"})));
        assert!(!is_envelope(&json!({"enc": "v1"})));
    }
}
