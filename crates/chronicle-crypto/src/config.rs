//! Which fields of which event types are encrypted: [`EncryptionConfig`],
//! read from the `encryption` section of a YAML configuration file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use crate::error::ConfigError;
use crate::{Error, Result};

/// A validated JSON pointer (RFC 6901) naming a field inside event data,
/// e.g. `/email` or `/address/street` (`~1` escapes `/`, `~0` escapes `~`).
///
/// Refused: the empty pointer (the whole document), pointers not starting
/// with `/`, a `~` not followed by `0` or `1`, empty reference tokens
/// (`/a//b`, usually a typo) and the `-` token (a nonexistent array element).
///
/// ```
/// use chronicle_crypto::FieldPointer;
/// use serde_json::json;
///
/// let p: FieldPointer = "/address/street".parse()?;
/// let data = json!({ "address": { "street": "1 Main St" } });
/// assert_eq!(p.get(&data), Some(&json!("1 Main St")));
/// assert!("address/street".parse::<FieldPointer>().is_err());
/// # Ok::<(), chronicle_crypto::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPointer(String);

impl FieldPointer {
    /// Parses and validates a pointer.
    pub fn parse(pointer: &str) -> std::result::Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::new(format!("{pointer:?}"), reason);
        if pointer.is_empty() {
            return Err(bad(
                "the empty JSON pointer names the whole event; name a field such as \"/email\""
                    .into(),
            ));
        }
        if !pointer.starts_with('/') {
            return Err(bad(format!(
                "a JSON pointer starts with '/'; did you mean \"/{pointer}\"?"
            )));
        }
        for token in pointer[1..].split('/') {
            if token.is_empty() {
                return Err(bad(
                    "empty reference token (two '/' in a row or a trailing '/')".into(),
                ));
            }
            if token == "-" {
                return Err(bad(
                    "the '-' token names the element after the end of an array, which never exists"
                        .into(),
                ));
            }
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                    return Err(bad(
                        "'~' must be followed by '0' (for '~') or '1' (for '/')".into(),
                    ));
                }
            }
        }
        Ok(FieldPointer(pointer.to_owned()))
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The reference tokens, unescaped.
    pub fn tokens(&self) -> impl Iterator<Item = Cow<'_, str>> {
        pointer_tokens(&self.0).into_iter().flatten()
    }

    /// The value it names in `data`, if present.
    pub fn get<'v>(&self, data: &'v Value) -> Option<&'v Value> {
        lookup(data, &self.0)
    }

    /// The value it names in `data`, mutably, if present.
    pub fn get_mut<'v>(&self, data: &'v mut Value) -> Option<&'v mut Value> {
        lookup_mut(data, &self.0)
    }

    /// Whether `other` names this field or something inside it.
    pub fn contains(&self, other: &FieldPointer) -> bool {
        other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for FieldPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for FieldPointer {
    type Err = ConfigError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        FieldPointer::parse(s)
    }
}

/// The encryption rule of one event type: its sensitive fields and whose
/// data they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRule {
    fields: Vec<FieldPointer>,
    subject: Option<FieldPointer>,
}

impl EventRule {
    /// A rule encrypting `fields`, with the aggregate as subject.
    ///
    /// Refuses an empty list, invalid pointers, duplicates and overlapping
    /// pointers (`/address` together with `/address/street`).
    pub fn new<I, S>(fields: I) -> std::result::Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let raw: Vec<String> = fields.into_iter().map(|s| s.as_ref().to_owned()).collect();
        Self::validate("fields", &raw, None)
    }

    /// Takes the subject from a field of the event (a string or number, e.g.
    /// the user id inside an order event) instead of the aggregate id. The
    /// subject field must not be encrypted itself.
    pub fn with_subject(self, pointer: &str) -> std::result::Result<Self, ConfigError> {
        let fields: Vec<String> = self.fields.iter().map(|f| f.0.clone()).collect();
        Self::validate("fields", &fields, Some(pointer))
    }

    fn validate(
        at: &str,
        fields: &[String],
        subject: Option<&str>,
    ) -> std::result::Result<Self, ConfigError> {
        if fields.is_empty() {
            return Err(ConfigError::new(
                at,
                "no fields listed; name at least one JSON pointer or remove the event type",
            ));
        }
        let mut parsed: Vec<FieldPointer> = Vec::with_capacity(fields.len());
        for (i, raw) in fields.iter().enumerate() {
            let here = format!("{at}[{i}]");
            let pointer =
                FieldPointer::parse(raw).map_err(|e| ConfigError::new(&here, e.reason))?;
            if let Some(prev) = parsed
                .iter()
                .find(|p| p.contains(&pointer) || pointer.contains(p))
            {
                let reason = if *prev == pointer {
                    format!("{pointer} is listed twice")
                } else {
                    format!(
                        "{pointer} overlaps {prev}; list either the outer field or the inner ones"
                    )
                };
                return Err(ConfigError::new(here, reason));
            }
            parsed.push(pointer);
        }
        let subject = match subject {
            None => None,
            Some(raw) => {
                let pointer = FieldPointer::parse(raw)
                    .map_err(|e| ConfigError::new(at.replace("fields", "subject"), e.reason))?;
                if let Some(f) = parsed
                    .iter()
                    .find(|f| f.contains(&pointer) || pointer.contains(f))
                {
                    return Err(ConfigError::new(
                        at.replace("fields", "subject"),
                        format!(
                            "the subject {pointer} overlaps the encrypted field {f}; the subject must stay readable to find its keys"
                        ),
                    ));
                }
                Some(pointer)
            }
        };
        Ok(EventRule {
            fields: parsed,
            subject,
        })
    }

    /// The encrypted fields.
    pub fn fields(&self) -> &[FieldPointer] {
        &self.fields
    }

    /// The subject pointer; `None` means the aggregate id.
    pub fn subject(&self) -> Option<&FieldPointer> {
        self.subject.as_ref()
    }
}

/// The field-encryption configuration: per event type, an [`EventRule`].
///
/// In YAML, under the `encryption` key of the configuration file (other
/// top-level keys are ignored, unknown keys inside `encryption` are errors):
///
/// ```
/// use chronicle_crypto::EncryptionConfig;
///
/// let config = EncryptionConfig::from_yaml(r#"
/// encryption:
///   events:
///     UserRegistered:
///       fields: ["/email", "/address/street"]
///     OrderPlaced:
///       fields: ["/shipping_address"]
///       subject: /customer_id
/// "#)?;
/// let rule = config.rule("OrderPlaced").unwrap();
/// assert_eq!(rule.subject().unwrap().as_str(), "/customer_id");
/// assert!(config.rule("UserDeleted").is_none());
/// # Ok::<(), chronicle_crypto::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionConfig {
    events: HashMap<String, EventRule>,
}

#[derive(Deserialize)]
struct RawFile {
    encryption: Option<RawEncryption>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    #[serde(default)]
    events: BTreeMap<String, RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    fields: Vec<String>,
    #[serde(default)]
    subject: Option<String>,
}

impl EncryptionConfig {
    /// An empty configuration: nothing is encrypted.
    pub fn new() -> Self {
        EncryptionConfig::default()
    }

    /// Reads the `encryption` section of a YAML configuration document.
    pub fn from_yaml(yaml: &str) -> std::result::Result<Self, ConfigError> {
        let file: RawFile = serde_saphyr::from_str(yaml).map_err(|e| {
            let rendered = e.to_string();
            match e.without_snippet().location() {
                Some(l) => {
                    let prefix = format!("error: line {} column {}: ", l.line(), l.column());
                    let reason = rendered.strip_prefix(&prefix).unwrap_or(&rendered);
                    ConfigError::new(format!("line {}, column {}", l.line(), l.column()), reason)
                }
                None => ConfigError::new("the document", rendered),
            }
        })?;
        let Some(section) = file.encryption else {
            return Err(ConfigError::new(
                "the document",
                "no `encryption` section; expected `encryption: { events: { <EventType>: { fields: [...] } } }`",
            ));
        };
        let mut config = EncryptionConfig::new();
        for (event_type, raw) in section.events {
            let at = format!("encryption.events.{event_type}.fields");
            let rule = EventRule::validate(&at, &raw.fields, raw.subject.as_deref())?;
            config.insert(event_type, rule)?;
        }
        Ok(config)
    }

    /// Reads the `encryption` section of a YAML configuration file.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        EncryptionConfig::from_yaml(&text).map_err(|mut e| {
            e.at = format!("{}: {}", path.display(), e.at);
            Error::Config(e)
        })
    }

    /// Adds (or replaces) the rule of an event type.
    pub fn insert(
        &mut self,
        event_type: impl Into<String>,
        rule: EventRule,
    ) -> std::result::Result<(), ConfigError> {
        let event_type = event_type.into();
        if event_type.is_empty() || event_type.chars().count() > 100 {
            return Err(ConfigError::new(
                format!("encryption.events.{event_type:?}"),
                "an event type is 1 to 100 characters",
            ));
        }
        self.events.insert(event_type, rule);
        Ok(())
    }

    /// Adds the rule of an event type, builder style.
    pub fn with_event(
        mut self,
        event_type: impl Into<String>,
        rule: EventRule,
    ) -> std::result::Result<Self, ConfigError> {
        self.insert(event_type, rule)?;
        Ok(self)
    }

    /// The rule of an event type, if it has encrypted fields.
    pub fn rule(&self, event_type: &str) -> Option<&EventRule> {
        self.events.get(event_type)
    }

    /// The configured event types, sorted.
    pub fn event_types(&self) -> Vec<&str> {
        let mut types: Vec<&str> = self.events.keys().map(String::as_str).collect();
        types.sort_unstable();
        types
    }

    /// Whether nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_follow_rfc_6901() {
        let p = FieldPointer::parse("/a~1b/c~0d/0").unwrap();
        assert_eq!(p.tokens().collect::<Vec<_>>(), ["a/b", "c~d", "0"]);
        let data = json!({ "a/b": { "c~d": ["x"] } });
        assert_eq!(p.get(&data), Some(&json!("x")));
        for bad in ["", "email", "/a//b", "/a/", "/a~2", "/a~", "/list/-"] {
            assert!(FieldPointer::parse(bad).is_err(), "{bad:?} accepted");
        }
        let outer = FieldPointer::parse("/address").unwrap();
        assert!(outer.contains(&FieldPointer::parse("/address/street").unwrap()));
        assert!(!outer.contains(&FieldPointer::parse("/addresses").unwrap()));
    }

    fn err(yaml: &str) -> String {
        EncryptionConfig::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn config_errors_say_where_and_why() {
        let e = err(
            "encryption:\n  events:\n    UserRegistered:\n      fields: [\"/email\", \"address\"]\n",
        );
        assert!(
            e.contains("encryption.events.UserRegistered.fields[1]"),
            "{e}"
        );
        assert!(e.contains("did you mean \"/address\""), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      fields: [\"/x~2\"]\n");
        assert!(e.contains("'~' must be followed"), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      fields: []\n");
        assert!(e.contains("no fields listed"), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      fields: [\"/a\", \"/a/b\"]\n");
        assert!(e.contains("overlaps"), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      fields: [\"/a\", \"/a\"]\n");
        assert!(e.contains("listed twice"), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      fields: [\"/a\"]\n      subject: /a\n");
        assert!(e.contains("encryption.events.A.subject"), "{e}");
        assert!(e.contains("must stay readable"), "{e}");

        let e =
            err("encryption:\n  events:\n    A:\n      fields: [\"/a\"]\n      subject: user_id\n");
        assert!(e.contains("encryption.events.A.subject"), "{e}");

        let e = err("encryption:\n  events:\n    A:\n      feilds: [\"/a\"]\n");
        assert!(e.contains("feilds"), "{e}");
        assert!(e.contains("line"), "{e}");

        let e = err("projections: {}\n");
        assert!(e.contains("no `encryption` section"), "{e}");

        let e = err("encryption: [unclosed\n");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn valid_config_and_other_sections() {
        let config = EncryptionConfig::from_yaml(
            "projections:\n  p: {}\nencryption:\n  events:\n    UserRegistered:\n      fields: [\"/email\", \"/address/street\"]\n      subject: /user_id\n",
        )
        .unwrap();
        let rule = config.rule("UserRegistered").unwrap();
        let fields: Vec<&str> = rule.fields().iter().map(FieldPointer::as_str).collect();
        assert_eq!(fields, ["/email", "/address/street"]);
        assert_eq!(rule.subject().unwrap().as_str(), "/user_id");
        assert_eq!(config.event_types(), ["UserRegistered"]);

        let built = EncryptionConfig::new()
            .with_event(
                "UserRegistered",
                EventRule::new(["/email", "/address/street"])
                    .unwrap()
                    .with_subject("/user_id")
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(built, config);
        assert!(
            EncryptionConfig::new()
                .with_event("", rule.clone())
                .is_err()
        );
    }
}

/// The value `pointer` (RFC 6901) names in `data`, as
/// [`Value::pointer`], without allocating for tokens that need no
/// unescaping (every read looks up each encrypted field twice).
pub(crate) fn lookup<'v>(data: &'v Value, pointer: &str) -> Option<&'v Value> {
    let rest = pointer_tokens(pointer)?;
    let mut target = data;
    for token in rest {
        target = match target {
            Value::Object(map) => map.get(token.as_ref())?,
            Value::Array(list) => list.get(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some(target)
}

/// [`lookup`], mutably.
pub(crate) fn lookup_mut<'v>(data: &'v mut Value, pointer: &str) -> Option<&'v mut Value> {
    let rest = pointer_tokens(pointer)?;
    let mut target = data;
    for token in rest {
        target = match target {
            Value::Object(map) => map.get_mut(token.as_ref())?,
            Value::Array(list) => list.get_mut(array_index(&token)?)?,
            _ => return None,
        };
    }
    Some(target)
}

/// The unescaped tokens of `pointer` (none for `""`, the whole document);
/// `None` when it does not start with `/`.
fn pointer_tokens(pointer: &str) -> Option<impl Iterator<Item = Cow<'_, str>>> {
    let tokens = match pointer {
        "" => None,
        p => Some(p.strip_prefix('/')?.split('/')),
    };
    Some(tokens.into_iter().flatten().map(|t| {
        if t.contains('~') {
            Cow::Owned(t.replace("~1", "/").replace("~0", "~"))
        } else {
            Cow::Borrowed(t)
        }
    }))
}

/// An array index token as RFC 6901 allows it: digits, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

#[cfg(test)]
mod lookup_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lookups_agree_with_serde_json() {
        let mut data = json!({
            "a": { "b/c": [10, { "d~e": 1 }], "": 2 },
            "01": 3,
            "list": [0, 1],
        });
        for pointer in [
            "",
            "/a",
            "/a/b~1c",
            "/a/b~1c/1/d~0e",
            "/a/",
            "/01",
            "/list/1",
            "/list/01",
            "/list/+1",
            "/list/2",
            "/nope",
            "a",
            "/a/b~1c/x",
        ] {
            assert_eq!(lookup(&data, pointer), data.pointer(pointer), "{pointer:?}");
            let expected = data.clone().pointer_mut(pointer).map(|v| v.clone());
            assert_eq!(
                lookup_mut(&mut data, pointer).map(|v| v.clone()),
                expected,
                "{pointer:?}"
            );
        }
    }
}
