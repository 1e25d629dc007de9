//! Declarative upcasters: steps written in YAML (or built in Rust) instead
//! of code. The format is documented at the crate root.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::pointer::{self, Found, Inserted};
use crate::{
    ConfigError, Error, JsonPointer, Mode, Result, SourceLocation, UpcastEvent, UpcastFailure,
    Upcaster, is_encrypted, is_redacted,
};

/// The longest event type the events table holds (`VARCHAR(100)`).
const MAX_EVENT_TYPE_LEN: usize = 100;

/// One declarative transformation of an event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Step {
    /// Renames a field within its object.
    Rename {
        /// The field's old place.
        from: JsonPointer,
        /// Its new place, in the same object.
        to: JsonPointer,
    },
    /// Moves a field into or out of a nested object.
    Move {
        /// The field's old place.
        from: JsonPointer,
        /// Its new place.
        to: JsonPointer,
    },
    /// Adds a field with a default value unless it is already there.
    Add {
        /// Where.
        path: JsonPointer,
        /// The value for events that lack the field.
        value: Value,
    },
    /// Removes a field.
    Remove {
        /// Which.
        path: JsonPointer,
    },
    /// Replaces scalar values by a table, e.g. `M` to `male`.
    Map {
        /// The field whose value is mapped.
        path: JsonPointer,
        /// Old value (as JSON text for numbers and booleans) to new value.
        values: BTreeMap<String, Value>,
        /// The value for anything not in `values`; `None` keeps it.
        otherwise: Option<Value>,
    },
    /// Changes the event type.
    RenameEvent {
        /// The new event type.
        to: String,
    },
}

impl Step {
    /// Checks the step on its own, before any event: the problem and what
    /// to do, or nothing.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Step::Rename { from, to } => {
                if from == to {
                    return Err(format!("renames {from} to itself; remove the step"));
                }
                if from.parent_tokens() != to.parent_tokens() {
                    return Err(format!(
                        "rename keeps a field in its object, but {from} and {to} are in different objects; use `move` to change nesting"
                    ));
                }
                Ok(())
            }
            Step::Move { from, to } => {
                if from == to {
                    return Err(format!("moves {from} onto itself; remove the step"));
                }
                if from.contains(to.as_str()) {
                    return Err(format!("cannot move {from} into itself ({to})"));
                }
                Ok(())
            }
            Step::RenameEvent { to } => check_event_type(to),
            Step::Add { .. } | Step::Remove { .. } | Step::Map { .. } => Ok(()),
        }
    }

    /// Applies the step to an event.
    pub fn apply(&self, event: &mut UpcastEvent) -> Result<(), UpcastFailure> {
        match self {
            Step::Rename { from, to } | Step::Move { from, to } => move_field(event, from, to),
            Step::Add { path, value } => {
                match pointer::insert(&mut event.data, path, value.clone())
                    .map_err(|f| f.at_default(path))?
                {
                    Inserted::Done | Inserted::Exists | Inserted::Redacted => Ok(()),
                }
            }
            Step::Remove { path } => {
                pointer::take(&mut event.data, path).map_err(|f| f.at_default(path))?;
                event.encrypted_fields.retain(|p| !path.contains(p));
                Ok(())
            }
            Step::Map {
                path,
                values,
                otherwise,
            } => {
                let Found::Value(value) =
                    pointer::get_mut(&mut event.data, path).map_err(|f| f.at_default(path))?
                else {
                    return Ok(());
                };
                if is_redacted(value) {
                    return Ok(());
                }
                if is_encrypted(value) {
                    return Err(pointer::encrypted_failure(path.as_str()));
                }
                let key = match &*value {
                    Value::String(s) => Some(s.clone()),
                    Value::Null | Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
                    Value::Array(_) | Value::Object(_) => None,
                };
                if let Some(new) = key.and_then(|k| values.get(&k)) {
                    *value = new.clone();
                } else if let Some(other) = otherwise {
                    *value = other.clone();
                }
                Ok(())
            }
            Step::RenameEvent { to } => {
                event.event_type.clone_from(to);
                Ok(())
            }
        }
    }
}

impl UpcastFailure {
    /// Names `path` unless a more precise pointer is named already.
    fn at_default(self, path: &JsonPointer) -> Self {
        if self.pointer.is_some() {
            self
        } else {
            self.at(path.as_str())
        }
    }
}

fn check_event_type(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("the event type is empty; name the new event type".to_owned());
    }
    if name.len() > MAX_EVENT_TYPE_LEN {
        return Err(format!(
            "the event type is {} bytes long; the events table holds at most {MAX_EVENT_TYPE_LEN}",
            name.len()
        ));
    }
    Ok(())
}

/// Moves the value at `from` to `to` and the encrypted-field pointers with
/// it.
fn move_field(
    event: &mut UpcastEvent,
    from: &JsonPointer,
    to: &JsonPointer,
) -> Result<(), UpcastFailure> {
    // Refuse to overwrite before taking anything out.
    match pointer::get_mut(&mut event.data, to).map_err(|f| f.at_default(to))? {
        Found::Value(_) => {
            return Err(UpcastFailure::new(format!(
                "cannot move {from} here: a value is already there; remove it first or choose another name"
            ))
            .at(to.as_str()));
        }
        Found::Redacted => {
            if matches!(
                pointer::get_mut(&mut event.data, from).map_err(|f| f.at_default(from))?,
                Found::Value(_)
            ) {
                return Err(UpcastFailure::new(format!(
                    "cannot move {from} here: the target lies inside a redacted value"
                ))
                .at(to.as_str()));
            }
            return Ok(());
        }
        Found::Absent => {}
    }
    let Some(value) = pointer::take(&mut event.data, from).map_err(|f| f.at_default(from))? else {
        return Ok(());
    };
    if pointer::insert(&mut event.data, to, value).map_err(|f| f.at_default(to))? != Inserted::Done
    {
        // The target was checked to be free and outside redacted values.
        return Err(UpcastFailure::new(format!("could not move {from} here")).at(to.as_str()));
    }
    let list = &mut event.encrypted_fields;
    // A value leaving an encrypted (here decrypted) object stays encrypted.
    let leaves_encrypted = list
        .iter()
        .any(|p| p.as_str() != from.as_str() && contains(p, from.as_str()));
    for p in list.iter_mut() {
        if from.contains(p) {
            *p = format!("{to}{}", &p[from.as_str().len()..]);
        }
    }
    if leaves_encrypted && !list.iter().any(|p| contains(p, to.as_str())) {
        list.push(to.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    list.retain(|p| seen.insert(p.clone()));
    Ok(())
}

/// Whether pointer `inner` is `outer` or lies inside it.
fn contains(outer: &str, inner: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Rename { from, to } => write!(f, "rename {from} to {to}"),
            Step::Move { from, to } => write!(f, "move {from} to {to}"),
            Step::Add { path, value } => write!(f, "add {path} (default {value})"),
            Step::Remove { path } => write!(f, "remove {path}"),
            Step::Map { path, .. } => write!(f, "map values of {path}"),
            Step::RenameEvent { to } => write!(f, "rename event to {to}"),
        }
    }
}

/// An upcaster made of [`Step`]s, from YAML or built in Rust.
///
/// ```
/// use chronicle_upcast::{DeclarativeUpcaster, Step, Upcaster};
///
/// let u = DeclarativeUpcaster::new(
///     "UserRegistered",
///     1,
///     vec![
///         Step::Rename { from: "/name".parse()?, to: "/full_name".parse()? },
///         Step::RenameEvent { to: "UserSignedUp".into() },
///     ],
/// )?;
/// assert_eq!(u.target_event_type(), "UserSignedUp");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DeclarativeUpcaster {
    event_type: String,
    from_version: u32,
    target_event_type: String,
    steps: Vec<Step>,
    schema: Option<Value>,
    location: Option<SourceLocation>,
}

impl DeclarativeUpcaster {
    /// An upcaster of `event_type` from `from_version` made of `steps`.
    /// Fails with [`Error::Config`] when a step is unusable, the version is
    /// 0 or the event is renamed twice.
    pub fn new(event_type: impl Into<String>, from_version: u32, steps: Vec<Step>) -> Result<Self> {
        let event_type = event_type.into();
        check_event_type(&event_type).map_err(|m| ConfigError::new(m).key("event_type"))?;
        check_from(from_version).map_err(|m| ConfigError::new(m).key("from"))?;
        let mut target = None;
        for (i, step) in steps.iter().enumerate() {
            step.check()
                .map_err(|m| ConfigError::new(m).key(format!("steps[{i}]")))?;
            if let Step::RenameEvent { to } = step {
                if target.is_some() {
                    return Err(ConfigError::new(
                        "the event is renamed twice in one upcaster; keep one rename_event",
                    )
                    .key(format!("steps[{i}]"))
                    .into());
                }
                target = Some(to.clone());
            }
        }
        Ok(DeclarativeUpcaster {
            target_event_type: target.unwrap_or_else(|| event_type.clone()),
            event_type,
            from_version,
            steps,
            schema: None,
            location: None,
        })
    }

    /// Sets the JSON Schema of the version this upcaster produces.
    pub fn with_schema(mut self, schema: Value) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The JSON Schema of the version this upcaster produces, if given.
    pub fn schema(&self) -> Option<&Value> {
        self.schema.as_ref()
    }

    /// Where the upcaster was defined, when it came from YAML.
    pub fn location(&self) -> Option<&SourceLocation> {
        self.location.as_ref()
    }
}

fn check_from(from: u32) -> Result<(), String> {
    match from {
        0 => Err("schema versions start at 1; an upcaster from v1 turns v1 into v2".to_owned()),
        u32::MAX => Err("no version follows this one".to_owned()),
        _ => Ok(()),
    }
}

impl Upcaster for DeclarativeUpcaster {
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
        for (i, step) in self.steps.iter().enumerate() {
            step.apply(event)
                .map_err(|f| f.in_step(format!("step {} ({step})", i + 1)))?;
        }
        Ok(())
    }
}

/// The contents of an upcaster YAML file: upcasters with their schemas, and
/// modes. Register it with
/// [`UpcasterChainBuilder::config`](crate::UpcasterChainBuilder::config);
/// chain-wide checks (duplicates, gaps) run when the chain is built.
///
/// ```
/// use chronicle_upcast::UpcastConfig;
///
/// let err = UpcastConfig::from_yaml("up.yaml", "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - renam: { from: /a, to: /b }\n")
///     .unwrap_err();
/// assert!(err.to_string().starts_with("up.yaml:5:"), "{err}");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpcastConfig {
    /// The upcasters, in file order.
    pub upcasters: Vec<DeclarativeUpcaster>,
    /// Modes set per event type, with where they were set.
    pub modes: Vec<(String, Mode, Option<SourceLocation>)>,
    /// The mode of event types not listed, when set.
    pub default_mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    default_mode: Option<Mode>,
    #[serde(default)]
    modes: Option<Spanned<BTreeMap<String, Mode>>>,
    #[serde(default)]
    upcasters: Vec<Spanned<RawUpcaster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpcaster {
    event_type: Spanned<String>,
    from: Spanned<u32>,
    steps: Vec<Spanned<RawStep>>,
    #[serde(default)]
    schema: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawStep {
    Rename(RawFromTo),
    Move(RawFromTo),
    Add(RawAdd),
    Remove(Spanned<String>),
    Map(RawMap),
    RenameEvent(Spanned<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFromTo {
    from: Spanned<String>,
    to: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdd {
    path: Spanned<String>,
    #[serde(deserialize_with = "present")]
    default: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    path: Spanned<String>,
    values: BTreeMap<String, Value>,
    #[serde(default, deserialize_with = "present_opt")]
    otherwise: Option<Value>,
}

/// A value that must be written, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Value::deserialize(d)
}

/// `Some` whenever the key is written, `null` included.
fn present_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn location(origin: &str, l: &serde_saphyr::Location) -> Option<SourceLocation> {
    (*l != serde_saphyr::Location::UNKNOWN)
        .then(|| SourceLocation::new(origin, l.line(), l.column()))
}

impl UpcastConfig {
    /// Reads upcasters from YAML. `origin` names the source in errors
    /// (usually the file name). Fails with [`Error::Config`] naming the
    /// line, column and key of the first problem.
    pub fn from_yaml(origin: &str, yaml: &str) -> Result<Self> {
        let mut options = serde_saphyr::Options::default();
        // YAML 1.2: `yes`, `no`, `on` and `off` are strings (think `{ N: no }`).
        options.strict_booleans = true;
        options.with_snippet = false;
        let raw: RawConfig = serde_saphyr::from_str_with_options(yaml, options).map_err(|e| {
            let loc = e.location().and_then(|l| location(origin, &l));
            ConfigError::new(yaml_hint(&e.to_string())).at(loc)
        })?;
        let mut config = UpcastConfig {
            default_mode: raw.default_mode,
            ..UpcastConfig::default()
        };
        if let Some(modes) = raw.modes {
            let loc = location(origin, &modes.referenced);
            for (event_type, mode) in modes.value {
                config.modes.push((event_type, mode, loc.clone()));
            }
        }
        for (i, up) in raw.upcasters.into_iter().enumerate() {
            let at = location(origin, &up.referenced);
            let up = up.value;
            let key = format!("upcasters[{i}]");
            let err = |span: &serde_saphyr::Location, k: &str, m: String| -> Error {
                ConfigError::new(m)
                    .at(location(origin, span).or_else(|| at.clone()))
                    .key(format!("{key}.{k}"))
                    .into()
            };
            check_event_type(&up.event_type.value)
                .map_err(|m| err(&up.event_type.referenced, "event_type", m))?;
            check_from(up.from.value).map_err(|m| err(&up.from.referenced, "from", m))?;
            let mut steps = Vec::with_capacity(up.steps.len());
            let mut renamed_at: Option<usize> = None;
            for (j, step) in up.steps.into_iter().enumerate() {
                let sk = format!("steps[{j}]");
                let ptr = |s: &Spanned<String>, name: &str| {
                    JsonPointer::parse(&s.value)
                        .map_err(|e| err(&s.referenced, &format!("{sk}.{name}"), e.to_string()))
                };
                let (built, name) = match step.value {
                    RawStep::Rename(ft) => (
                        Step::Rename {
                            from: ptr(&ft.from, "rename.from")?,
                            to: ptr(&ft.to, "rename.to")?,
                        },
                        "rename",
                    ),
                    RawStep::Move(ft) => (
                        Step::Move {
                            from: ptr(&ft.from, "move.from")?,
                            to: ptr(&ft.to, "move.to")?,
                        },
                        "move",
                    ),
                    RawStep::Add(a) => (
                        Step::Add {
                            path: ptr(&a.path, "add.path")?,
                            value: a.default,
                        },
                        "add",
                    ),
                    RawStep::Remove(p) => (
                        Step::Remove {
                            path: ptr(&p, "remove")?,
                        },
                        "remove",
                    ),
                    RawStep::Map(m) => (
                        Step::Map {
                            path: ptr(&m.path, "map.path")?,
                            values: m.values,
                            otherwise: m.otherwise,
                        },
                        "map",
                    ),
                    RawStep::RenameEvent(to) => {
                        if let Some(first) = renamed_at {
                            return Err(err(
                                &to.referenced,
                                &format!("{sk}.rename_event"),
                                format!(
                                    "the event is already renamed by steps[{first}]; keep one rename_event per upcaster"
                                ),
                            ));
                        }
                        renamed_at = Some(j);
                        (Step::RenameEvent { to: to.value }, "rename_event")
                    }
                };
                built
                    .check()
                    .map_err(|m| err(&step.referenced, &format!("{sk}.{name}"), m))?;
                steps.push(built);
            }
            let mut upcaster = DeclarativeUpcaster::new(up.event_type.value, up.from.value, steps)?;
            upcaster.schema = up.schema;
            upcaster.location = at;
            config.upcasters.push(upcaster);
        }
        Ok(config)
    }
}

/// Drops the location the parser appends (the error carries it already)
/// and adds what to do where the message only says what is wrong.
fn yaml_hint(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(i)
            if message[i + 9..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == ' ' || "column".contains(c)) =>
        {
            &message[..i]
        }
        _ => message,
    };
    if message.starts_with("unknown variant") {
        format!("{message}; use one of those")
    } else if message.starts_with("unknown field") {
        format!("{message}; check the spelling of the key")
    } else if message.contains("u32") {
        format!("{message}; schema versions are whole numbers from 1")
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventIdentity;
    use serde_json::json;
    use uuid::Uuid;

    fn event(data: Value) -> UpcastEvent {
        let id = EventIdentity {
            event_id: Uuid::from_u128(7),
            aggregate_id: Uuid::from_u128(8),
            aggregate_type: "User".into(),
            version: 1,
            position: None,
        };
        UpcastEvent::new(id, "UserRegistered", data)
    }

    fn p(s: &str) -> JsonPointer {
        s.parse().unwrap()
    }

    fn apply(step: Step, data: Value) -> Result<UpcastEvent, UpcastFailure> {
        let mut e = event(data);
        step.apply(&mut e)?;
        Ok(e)
    }

    #[test]
    fn rename_moves_the_value_and_skips_absent_fields() {
        let step = Step::Rename {
            from: p("/name"),
            to: p("/full_name"),
        };
        let e = apply(step.clone(), json!({ "name": "Ada", "age": 36 })).unwrap();
        assert_eq!(e.data, json!({ "full_name": "Ada", "age": 36 }));
        let e = apply(step.clone(), json!({ "age": 36 })).unwrap();
        assert_eq!(e.data, json!({ "age": 36 }));
        let err = apply(step, json!({ "name": "Ada", "full_name": "X" })).unwrap_err();
        assert_eq!(err.pointer.as_deref(), Some("/full_name"));
        assert!(err.message.contains("already there"), "{err}");
    }

    #[test]
    fn rename_across_objects_is_refused() {
        let step = Step::Rename {
            from: p("/street"),
            to: p("/address/street"),
        };
        assert!(step.check().unwrap_err().contains("use `move`"));
    }

    #[test]
    fn add_sets_a_default_and_keeps_existing_values() {
        let step = Step::Add {
            path: p("/country"),
            value: json!("unknown"),
        };
        assert_eq!(
            apply(step.clone(), json!({})).unwrap().data,
            json!({ "country": "unknown" })
        );
        assert_eq!(
            apply(step, json!({ "country": "NL" })).unwrap().data,
            json!({ "country": "NL" })
        );
        let nested = Step::Add {
            path: p("/prefs/theme"),
            value: Value::Null,
        };
        assert_eq!(
            apply(nested, json!({})).unwrap().data,
            json!({ "prefs": { "theme": null } })
        );
    }

    #[test]
    fn remove_drops_the_field_if_present() {
        let step = Step::Remove {
            path: p("/legacy_flag"),
        };
        assert_eq!(
            apply(step.clone(), json!({ "legacy_flag": true, "a": 1 }))
                .unwrap()
                .data,
            json!({ "a": 1 })
        );
        assert_eq!(
            apply(step, json!({ "a": 1 })).unwrap().data,
            json!({ "a": 1 })
        );
    }

    #[test]
    fn move_into_and_out_of_nested_objects() {
        let into = Step::Move {
            from: p("/street"),
            to: p("/address/street"),
        };
        let e = apply(
            into,
            json!({ "street": "Main St", "address": { "city": "Delft" } }),
        )
        .unwrap();
        assert_eq!(
            e.data,
            json!({ "address": { "street": "Main St", "city": "Delft" } })
        );
        let out = Step::Move {
            from: p("/address/city"),
            to: p("/city"),
        };
        let e = apply(out, e.data).unwrap();
        assert_eq!(
            e.data,
            json!({ "address": { "street": "Main St" }, "city": "Delft" })
        );
        let created = Step::Move {
            from: p("/zip"),
            to: p("/address/postal/code"),
        };
        let e = apply(created, json!({ "zip": "2611" })).unwrap();
        assert_eq!(
            e.data,
            json!({ "address": { "postal": { "code": "2611" } } })
        );
        let into_self = Step::Move {
            from: p("/a"),
            to: p("/a/b"),
        };
        assert!(into_self.check().is_err());
    }

    #[test]
    fn map_replaces_listed_values() {
        let step = Step::Map {
            path: p("/gender"),
            values: [
                ("M".to_owned(), json!("male")),
                ("F".to_owned(), json!("female")),
            ]
            .into(),
            otherwise: None,
        };
        assert_eq!(
            apply(step.clone(), json!({ "gender": "F" })).unwrap().data,
            json!({ "gender": "female" })
        );
        assert_eq!(
            apply(step.clone(), json!({ "gender": "X" })).unwrap().data,
            json!({ "gender": "X" })
        );
        assert_eq!(apply(step, json!({})).unwrap().data, json!({}));
        let numeric = Step::Map {
            path: p("/status"),
            values: [("1".to_owned(), json!("active"))].into(),
            otherwise: Some(json!("unknown")),
        };
        assert_eq!(
            apply(numeric.clone(), json!({ "status": 1 })).unwrap().data,
            json!({ "status": "active" })
        );
        assert_eq!(
            apply(numeric, json!({ "status": 9 })).unwrap().data,
            json!({ "status": "unknown" })
        );
    }

    #[test]
    fn rename_event_changes_the_type() {
        let e = apply(
            Step::RenameEvent {
                to: "UserSignedUp".into(),
            },
            json!({}),
        )
        .unwrap();
        assert_eq!(e.event_type, "UserSignedUp");
        assert!(Step::RenameEvent { to: " ".into() }.check().is_err());
        assert!(
            Step::RenameEvent {
                to: "x".repeat(101)
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn encrypted_envelopes_are_carried_and_pointers_follow() {
        let envelope = json!({ "$enc": "v1", "kid": "k1", "ct": "AAAA" });
        let mut e =
            event(json!({ "email": envelope.clone(), "contact": { "phone": envelope.clone() } }))
                .with_encrypted_fields(["/email", "/contact/phone"]);
        Step::Rename {
            from: p("/email"),
            to: p("/email_address"),
        }
        .apply(&mut e)
        .unwrap();
        Step::Move {
            from: p("/contact"),
            to: p("/profile/contact"),
        }
        .apply(&mut e)
        .unwrap();
        assert_eq!(e.data["email_address"], envelope);
        assert_eq!(e.data["profile"]["contact"]["phone"], envelope);
        assert_eq!(
            e.encrypted_fields,
            ["/email_address", "/profile/contact/phone"]
        );
        Step::Remove {
            path: p("/profile"),
        }
        .apply(&mut e)
        .unwrap();
        assert_eq!(e.encrypted_fields, ["/email_address"]);
    }

    #[test]
    fn steps_that_need_plaintext_refuse_envelopes() {
        let mut e = event(json!({ "gender": { "$enc": "v1", "ct": "x" } }))
            .with_encrypted_fields(["/gender"]);
        let map = Step::Map {
            path: p("/gender"),
            values: [("M".to_owned(), json!("male"))].into(),
            otherwise: None,
        };
        let err = map.apply(&mut e).unwrap_err();
        assert_eq!(err.pointer.as_deref(), Some("/gender"));
        assert!(err.message.contains("decrypt"), "{err}");
        let into = Step::Move {
            from: p("/gender/ct"),
            to: p("/ct"),
        };
        assert!(into.apply(&mut e).unwrap_err().message.contains("decrypt"));
    }

    #[test]
    fn a_field_moved_out_of_a_decrypted_object_stays_encrypted() {
        let mut e = event(json!({ "pii": { "email": "a@b", "name": "Ada" } }))
            .with_encrypted_fields(["/pii"]);
        Step::Move {
            from: p("/pii/email"),
            to: p("/email"),
        }
        .apply(&mut e)
        .unwrap();
        assert_eq!(e.encrypted_fields, ["/pii", "/email"]);
    }

    #[test]
    fn redaction_markers_are_carried_unchanged() {
        let marker = json!({ "$redacted": "subject shredded 2026-01-01" });
        let mut e = event(json!({ "gender": marker.clone(), "address": marker.clone() }));
        Step::Map {
            path: p("/gender"),
            values: [("M".to_owned(), json!("male"))].into(),
            otherwise: Some(json!("other")),
        }
        .apply(&mut e)
        .unwrap();
        Step::Move {
            from: p("/address/street"),
            to: p("/street"),
        }
        .apply(&mut e)
        .unwrap();
        Step::Add {
            path: p("/address/zip"),
            value: json!("0000"),
        }
        .apply(&mut e)
        .unwrap();
        Step::Rename {
            from: p("/address"),
            to: p("/home"),
        }
        .apply(&mut e)
        .unwrap();
        assert_eq!(e.data, json!({ "gender": marker.clone(), "home": marker }));
    }

    const YAML: &str = r#"
default_mode: eager
modes:
  UserSignedUp: lazy
upcasters:
  - event_type: UserRegistered
    from: 1
    steps:
      - rename: { from: /name, to: /full_name }
      - add: { path: /country, default: "unknown" }
      - remove: /legacy_flag
      - move: { from: /street, to: /address/street }
      - map: { path: /gender, values: { M: male, F: female } }
      - rename_event: UserSignedUp
    schema:
      type: object
      required: [full_name]
"#;

    #[test]
    fn reads_the_documented_yaml() {
        let config = UpcastConfig::from_yaml("up.yaml", YAML).unwrap();
        assert_eq!(config.default_mode, Some(Mode::Eager));
        assert_eq!(config.modes.len(), 1);
        assert_eq!(config.modes[0].0, "UserSignedUp");
        assert_eq!(config.modes[0].1, Mode::Lazy);
        let up = &config.upcasters[0];
        assert_eq!(up.event_type(), "UserRegistered");
        assert_eq!(up.target_event_type(), "UserSignedUp");
        assert_eq!(up.steps().len(), 6);
        assert_eq!(up.schema().unwrap()["required"], json!(["full_name"]));
        let loc = up.location().unwrap();
        assert_eq!((loc.origin.as_str(), loc.line), ("up.yaml", 6));

        let mut e = event(json!({
            "name": "Ada", "legacy_flag": true, "street": "Main St", "gender": "F"
        }));
        up.upcast(&mut e).unwrap();
        assert_eq!(e.event_type, "UserSignedUp");
        assert_eq!(
            e.data,
            json!({
                "full_name": "Ada", "country": "unknown",
                "address": { "street": "Main St" }, "gender": "female"
            })
        );
    }

    fn config_err(yaml: &str) -> ConfigError {
        match UpcastConfig::from_yaml("up.yaml", yaml).unwrap_err() {
            Error::Config(c) => c,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn unknown_step_kind_names_the_line() {
        let e = config_err(
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - renam: { from: /a, to: /b }\n",
        );
        let loc = e.location.clone().expect("a location");
        assert_eq!(loc.line, 5, "{e}");
        assert_eq!(
            e.to_string(),
            "up.yaml:5:9: unknown variant `renam`, expected one of rename, move, add, remove, map, rename_event; use one of those"
        );
    }

    #[test]
    fn invalid_pointer_names_line_and_key() {
        let e = config_err(
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - remove: /ok\n      - move: { from: street, to: /address/street }\n",
        );
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(6), "{e}");
        assert_eq!(
            e.to_string(),
            "up.yaml:6:23: upcasters[0].steps[1].move.from: `street` is not a JSON pointer: pointers start with `/`, e.g. `/street`"
        );
    }

    #[test]
    fn unknown_keys_and_bad_versions_are_refused() {
        let e = config_err("upcasters:\n  - event_type: A\n    form: 1\n    steps: []\n");
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(3), "{e}");
        assert!(e.to_string().contains("form"), "{e}");

        let e = config_err("upcasters:\n  - event_type: A\n    from: 0\n    steps: []\n");
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(3), "{e}");
        assert_eq!(e.key.as_deref(), Some("upcasters[0].from"));

        let e = config_err(
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - rename_event: B\n      - rename_event: C\n",
        );
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(6), "{e}");

        let e = config_err(
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - rename: { from: /a, to: /b/c }\n",
        );
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(5), "{e}");
        assert!(e.message.contains("use `move`"), "{e}");

        let e = config_err("default_mode: sometimes\n");
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(1), "{e}");
        assert_eq!(
            e.message,
            "unknown variant `sometimes`, expected one of eager, lazy; use one of those"
        );

        let e = config_err("upcasters:\n  - event_type: A\n    from: -1\n    steps: []\n");
        assert_eq!(
            e.location.as_ref().map(|l| (l.line, l.column)),
            Some((3, 11)),
            "{e}"
        );
        assert!(e.message.ends_with("whole numbers from 1"), "{e}");

        let e = config_err(
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - add: { path: /a }\n",
        );
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(5), "{e}");
        assert!(e.message.contains("missing field `default`"), "{e}");
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let c = UpcastConfig::from_yaml(
            "up.yaml",
            "upcasters:\n  - event_type: A\n    from: 1\n    steps:\n      - map: { path: /ok, values: { Y: yes, N: no, 1: true } }\n",
        )
        .unwrap();
        let Step::Map { values, .. } = &c.upcasters[0].steps()[0] else {
            panic!("a map step")
        };
        assert_eq!(values["N"], json!("no"));
        assert_eq!(values["Y"], json!("yes"));
        assert_eq!(values["1"], json!(true));
    }

    #[test]
    fn yaml_syntax_errors_have_locations() {
        let e = config_err("upcasters:\n  - event_type: A\n    from: [1\n");
        assert!(e.location.is_some(), "{e}");
    }
}
