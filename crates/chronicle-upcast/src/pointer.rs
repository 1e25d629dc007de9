//! JSON pointers (RFC 6901) into event data, and the field moves the
//! declarative steps are made of.
//!
//! Encrypted envelopes (`{"$enc": ...}`) and redaction markers
//! (`{"$redacted": ...}`) are opaque: they are moved, kept or removed as a
//! whole, never looked into.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::UpcastFailure;

/// The key that marks an encrypted envelope, `{"$enc": "v1", ...}`.
pub const ENCRYPTED_KEY: &str = "$enc";
/// The key that marks a redacted value, `{"$redacted": ...}`: the data of
/// a shredded subject, carried over unchanged.
pub const REDACTED_KEY: &str = "$redacted";

/// Whether `value` is an encrypted envelope (an object with a `$enc` key).
///
/// ```
/// use chronicle_upcast::is_encrypted;
/// use serde_json::json;
///
/// assert!(is_encrypted(&json!({ "$enc": "v1", "ct": "..." })));
/// assert!(!is_encrypted(&json!("plain")));
/// ```
pub fn is_encrypted(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.contains_key(ENCRYPTED_KEY))
}

/// Whether `value` is a redaction marker (an object with a `$redacted`
/// key).
pub fn is_redacted(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.contains_key(REDACTED_KEY))
}

/// Whether `value` is opaque to the declarative steps: encrypted or
/// redacted.
pub(crate) fn is_opaque(value: &Value) -> bool {
    is_encrypted(value) || is_redacted(value)
}

/// A JSON pointer that names a field inside an event's data, e.g.
/// `/address/street`. `~1` stands for `/` and `~0` for `~` inside a key,
/// as in RFC 6901. The whole document (`""`), empty keys and a trailing
/// `/` are refused: they are almost always typos in a migration.
///
/// ```
/// use chronicle_upcast::JsonPointer;
///
/// let p: JsonPointer = "/address/street".parse().unwrap();
/// assert_eq!(p.tokens(), ["address", "street"]);
/// assert!("name".parse::<JsonPointer>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

/// A string that is not a usable [`JsonPointer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{pointer}` is not a JSON pointer: {reason}")]
pub struct PointerError {
    /// The refused text.
    pub pointer: String,
    /// Why, and what to write instead.
    pub reason: String,
}

impl JsonPointer {
    /// Parses a pointer such as `/address/street`.
    pub fn parse(text: &str) -> Result<Self, PointerError> {
        let err = |reason: &str| PointerError {
            pointer: text.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(rest) = text.strip_prefix('/') else {
            return Err(if text.is_empty() {
                err("the whole event cannot be renamed, moved or removed; name a field, e.g. /name")
            } else {
                err(&format!("pointers start with `/`, e.g. `/{text}`"))
            });
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            if raw.is_empty() {
                return Err(err(
                    "it has an empty segment (`//` or a trailing `/`); remove it",
                ));
            }
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(err("`~` must be followed by 0 (for `~`) or 1 (for `/`)"));
                        }
                    }
                } else {
                    token.push(c);
                }
            }
            tokens.push(token);
        }
        Ok(JsonPointer {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The unescaped keys, outermost first.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The keys of the containing object (all but the last).
    pub fn parent_tokens(&self) -> &[String] {
        &self.tokens[..self.tokens.len() - 1]
    }

    /// Whether `pointer` is this pointer or lies inside it.
    pub fn contains(&self, pointer: &str) -> bool {
        pointer == self.text
            || pointer
                .strip_prefix(self.text.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for JsonPointer {
    type Err = PointerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JsonPointer::parse(s)
    }
}

/// Escapes one key for use in a pointer.
pub(crate) fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The pointer text of the first `n` tokens.
fn prefix(tokens: &[String], n: usize) -> String {
    tokens[..n]
        .iter()
        .map(|t| format!("/{}", escape(t)))
        .collect()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Where a walk into the data ended.
pub(crate) enum Slot<'a> {
    /// The container was reached.
    Found(&'a mut Value),
    /// A key on the way does not exist.
    Absent,
    /// A redaction marker is on the way: the subject was shredded.
    Redacted,
}

/// Walks `tokens` from `data`. With `create`, missing keys are added as
/// empty objects. Fails when the way passes through an encrypted envelope
/// or a value that is not an object or array.
fn walk<'a>(
    data: &'a mut Value,
    tokens: &[String],
    create: bool,
) -> Result<Slot<'a>, UpcastFailure> {
    let mut cur = data;
    for (i, token) in tokens.iter().enumerate() {
        if is_redacted(cur) {
            return Ok(Slot::Redacted);
        }
        if is_encrypted(cur) {
            return Err(encrypted_failure(&prefix(tokens, i)));
        }
        cur = match cur {
            Value::Object(map) => {
                if create && !map.contains_key(token) {
                    map.insert(token.clone(), Value::Object(Map::new()));
                }
                match map.get_mut(token) {
                    Some(v) => v,
                    None => return Ok(Slot::Absent),
                }
            }
            Value::Array(items) => match token.parse::<usize>().ok().and_then(|i| items.get_mut(i))
            {
                Some(v) => v,
                None => return Ok(Slot::Absent),
            },
            other => return Err(not_container(&prefix(tokens, i), other)),
        };
    }
    if is_redacted(cur) {
        return Ok(Slot::Redacted);
    }
    if is_encrypted(cur) {
        return Err(encrypted_failure(&prefix(tokens, tokens.len())));
    }
    Ok(Slot::Found(cur))
}

fn not_container(at: &str, value: &Value) -> UpcastFailure {
    let what = if at.is_empty() {
        "the event data".to_owned()
    } else {
        at.to_owned()
    };
    UpcastFailure::new(format!(
        "{what} is {} {}, not an object; the step expects another shape of data",
        if matches!(value, Value::Array(_) | Value::Object(_)) {
            "an"
        } else {
            "a"
        },
        kind(value)
    ))
}

pub(crate) fn encrypted_failure(at: &str) -> UpcastFailure {
    UpcastFailure::new(
        "this value is encrypted and the step needs to look into it; decrypt before upcasting and re-encrypt after (the eager runner does)",
    )
    .at(if at.is_empty() { "/" } else { at })
}

/// What a lookup found at a pointer.
pub(crate) enum Found<'a> {
    /// A value (possibly itself an opaque envelope or marker).
    Value(&'a mut Value),
    /// Nothing there.
    Absent,
    /// Inside a redacted value.
    Redacted,
}

/// Looks up the value at `ptr`, mutably.
pub(crate) fn get_mut<'a>(
    data: &'a mut Value,
    ptr: &JsonPointer,
) -> Result<Found<'a>, UpcastFailure> {
    let (last, _) = ptr.tokens().split_last().expect("pointers have a token");
    match walk(data, ptr.parent_tokens(), false)? {
        Slot::Absent => Ok(Found::Absent),
        Slot::Redacted => Ok(Found::Redacted),
        Slot::Found(container) => Ok(match container {
            Value::Object(map) => map.get_mut(last).map_or(Found::Absent, Found::Value),
            Value::Array(items) => last
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get_mut(i))
                .map_or(Found::Absent, Found::Value),
            other => {
                return Err(not_container(
                    &prefix(ptr.tokens(), ptr.tokens().len() - 1),
                    other,
                ));
            }
        }),
    }
}

/// Removes and returns the value at `ptr`; `None` when it is absent or
/// inside a redacted value.
pub(crate) fn take(data: &mut Value, ptr: &JsonPointer) -> Result<Option<Value>, UpcastFailure> {
    let (last, _) = ptr.tokens().split_last().expect("pointers have a token");
    match walk(data, ptr.parent_tokens(), false)? {
        Slot::Absent | Slot::Redacted => Ok(None),
        Slot::Found(container) => match container {
            Value::Object(map) => Ok(map.remove(last)),
            Value::Array(items) => Ok(match last.parse::<usize>() {
                Ok(i) if i < items.len() => Some(items.remove(i)),
                _ => None,
            }),
            other => Err(not_container(
                &prefix(ptr.tokens(), ptr.tokens().len() - 1),
                other,
            )),
        },
    }
}

/// What an insert did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The value is now at the pointer.
    Done,
    /// A value was there already; nothing changed.
    Exists,
    /// The pointer lies inside a redacted value; nothing changed.
    Redacted,
}

/// Puts `value` at `ptr` unless something is there, creating missing
/// objects on the way. In an array, an index inserts before that element
/// and `-` appends.
pub(crate) fn insert(
    data: &mut Value,
    ptr: &JsonPointer,
    value: Value,
) -> Result<Inserted, UpcastFailure> {
    let (last, _) = ptr.tokens().split_last().expect("pointers have a token");
    match walk(data, ptr.parent_tokens(), true)? {
        // Missing object keys are created; only an array index can be missing.
        Slot::Absent => Err(UpcastFailure::new(
            "an array on the way has no element at that index; missing objects are created, missing array elements are not",
        )
        .at(ptr.as_str())),
        Slot::Redacted => Ok(Inserted::Redacted),
        Slot::Found(container) => match container {
            Value::Object(map) => {
                if map.contains_key(last) {
                    return Ok(Inserted::Exists);
                }
                map.insert(last.clone(), value);
                Ok(Inserted::Done)
            }
            Value::Array(items) => {
                let at = if last == "-" {
                    items.len()
                } else {
                    match last.parse::<usize>() {
                        Ok(i) if i <= items.len() => i,
                        _ => {
                            return Err(UpcastFailure::new(format!(
                                "the array has {} elements; use an index up to that or `-` to append",
                                items.len()
                            ))
                            .at(ptr.as_str()));
                        }
                    }
                };
                items.insert(at, value);
                Ok(Inserted::Done)
            }
            other => Err(not_container(&prefix(ptr.tokens(), ptr.tokens().len() - 1), other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> JsonPointer {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_unescapes() {
        assert_eq!(p("/a~1b/c~0d").tokens(), ["a/b", "c~d"]);
        assert_eq!(escape("a/b~"), "a~1b~0");
    }

    #[test]
    fn refuses_typos() {
        for bad in ["", "name", "/a//b", "/a/", "/a~2"] {
            let e = JsonPointer::parse(bad).unwrap_err();
            assert_eq!(e.pointer, bad);
        }
        assert!(
            JsonPointer::parse("name")
                .unwrap_err()
                .reason
                .contains("`/name`")
        );
    }

    #[test]
    fn contains_is_segment_aware() {
        let a = p("/address");
        assert!(a.contains("/address"));
        assert!(a.contains("/address/street"));
        assert!(!a.contains("/addressee"));
    }

    #[test]
    fn take_and_insert() {
        let mut d = json!({ "a": { "b": 1 }, "list": [1, 2] });
        assert_eq!(take(&mut d, &p("/a/b")).unwrap(), Some(json!(1)));
        assert_eq!(take(&mut d, &p("/a/b")).unwrap(), None);
        assert_eq!(take(&mut d, &p("/missing/x")).unwrap(), None);
        assert_eq!(
            insert(&mut d, &p("/x/y"), json!(2)).unwrap(),
            Inserted::Done
        );
        assert_eq!(
            insert(&mut d, &p("/x/y"), json!(3)).unwrap(),
            Inserted::Exists
        );
        assert_eq!(
            insert(&mut d, &p("/list/-"), json!(3)).unwrap(),
            Inserted::Done
        );
        assert_eq!(d, json!({ "a": {}, "x": { "y": 2 }, "list": [1, 2, 3] }));
        let e = insert(&mut d, &p("/x/y/z"), json!(1)).unwrap_err();
        assert!(e.message.contains("/x/y is a number"), "{e}");
    }

    #[test]
    fn opaque_values_are_not_entered() {
        let mut d = json!({ "secret": { "$enc": "v1", "ct": "x" }, "gone": { "$redacted": true } });
        let e = take(&mut d, &p("/secret/ct")).unwrap_err();
        assert_eq!(e.pointer.as_deref(), Some("/secret"));
        assert_eq!(take(&mut d, &p("/gone/street")).unwrap(), None);
        assert_eq!(
            insert(&mut d, &p("/gone/street"), json!(1)).unwrap(),
            Inserted::Redacted
        );
        assert_eq!(
            take(&mut d, &p("/secret")).unwrap(),
            Some(json!({ "$enc": "v1", "ct": "x" }))
        );
    }
}
