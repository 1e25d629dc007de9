//! The errors of upcasting: configuration, transformation and validation.

use std::fmt;

use uuid::Uuid;

/// A result whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a definition came from: a YAML file position, or the Rust source
/// line that registered an upcaster. Lines and columns count from 1.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceLocation {
    /// The file or source name, e.g. `upcasters.yaml` or `src/main.rs`.
    pub origin: String,
    /// The line, from 1.
    pub line: u64,
    /// The column, from 1.
    pub column: u64,
}

impl SourceLocation {
    /// A location in `origin` at `line`:`column`.
    pub fn new(origin: impl Into<String>, line: u64, column: u64) -> Self {
        SourceLocation {
            origin: origin.into(),
            line,
            column,
        }
    }

    /// The Rust source location of the caller of a `#[track_caller]`
    /// function.
    #[track_caller]
    pub(crate) fn caller() -> Self {
        let l = std::panic::Location::caller();
        SourceLocation::new(l.file(), u64::from(l.line()), u64::from(l.column()))
    }
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin, self.line, self.column)
    }
}

/// A refused upcaster definition: where it is, which key, what is wrong and
/// what to do about it.
///
/// Displayed as `origin:line:column: key: message`, the form editors and
/// terminals turn into a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the offending definition is, when known.
    pub location: Option<SourceLocation>,
    /// The offending key, e.g. `upcasters[0].steps[2].move.to`.
    pub key: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl ConfigError {
    /// A configuration error with a message and no location.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            location: None,
            key: None,
            message: message.into(),
        }
    }

    /// Sets the location.
    pub fn at(mut self, location: Option<SourceLocation>) -> Self {
        self.location = location;
        self
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why an upcaster could not transform an event, as reported by the
/// upcaster itself. The chain wraps it in [`Error::Upcast`] with the event
/// id and the versions involved.
///
/// ```
/// use chronicle_upcast::UpcastFailure;
///
/// let f = UpcastFailure::new("total is negative").at("/total");
/// assert_eq!(f.to_string(), "/total: total is negative");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct UpcastFailure {
    /// The step that failed, for declarative upcasters, e.g.
    /// `step 2 (move /street to /address/street)`.
    pub step: Option<String>,
    /// The field concerned, as a JSON pointer into the event data.
    pub pointer: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl UpcastFailure {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        UpcastFailure {
            step: None,
            pointer: None,
            message: message.into(),
        }
    }

    /// Names the field concerned.
    pub fn at(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into());
        self
    }

    /// Names the step that failed.
    pub fn in_step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }
}

impl fmt::Display for UpcastFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(step) = &self.step {
            write!(f, "{step}: ")?;
        }
        if let Some(pointer) = &self.pointer {
            write!(f, "{pointer}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl From<String> for UpcastFailure {
    fn from(message: String) -> Self {
        UpcastFailure::new(message)
    }
}

impl From<&str> for UpcastFailure {
    fn from(message: &str) -> Self {
        UpcastFailure::new(message)
    }
}

/// One way a transformed event does not match the JSON Schema of its
/// version. Instance values are masked so that event data (often personal
/// data) never lands in logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaIssue {
    /// Where in the event data, as a JSON pointer (`""` is the whole object).
    pub pointer: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for SchemaIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pointer = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{pointer}: {}", self.message)
    }
}

/// Schema issues joined for display.
fn join_issues(list: &[SchemaIssue]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What can go wrong defining, applying or validating upcasters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A definition was refused (YAML syntax, unknown step, invalid
    /// pointer, duplicate or missing link in a chain, invalid JSON Schema).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An upcaster failed on an event.
    #[error(
        "upcasting event {event_id} from {event_type} v{from_version} to v{to_version} failed: {failure}; fix the upcaster or the event, nothing was written"
    )]
    Upcast {
        /// The event being upcast.
        event_id: Uuid,
        /// Its event type before the failing upcaster.
        event_type: String,
        /// Its schema version before the failing upcaster.
        from_version: u32,
        /// The version the upcaster was to produce.
        to_version: u32,
        /// What the upcaster reported.
        #[source]
        failure: UpcastFailure,
    },
    /// An upcaster produced another event type than it declared, so chains
    /// computed ahead of time (latest versions, plans) would be wrong.
    #[error(
        "upcaster {event_type} v{from_version} turned event {event_id} into {actual}, but declares {declared} as its output; make target_event_type() return what upcast() produces"
    )]
    UndeclaredRename {
        /// The event being upcast.
        event_id: Uuid,
        /// The upcaster's input event type.
        event_type: String,
        /// The upcaster's input schema version.
        from_version: u32,
        /// The event type the upcaster declares.
        declared: String,
        /// The event type it produced.
        actual: String,
    },
    /// A field that identifies an event or fixes its place changed: the
    /// event id, aggregate id or type, version, or feed position.
    #[error(
        "event {event_id}: {field} changed from {before} to {after}; upcasters may change only the event type, data and encrypted_fields"
    )]
    IdentityChanged {
        /// The event (its original id).
        event_id: Uuid,
        /// The field that changed, e.g. `aggregate_id`.
        field: &'static str,
        /// Its original value.
        before: String,
        /// Its value after the transformation.
        after: String,
    },
    /// A transformed event does not match the JSON Schema of its type and
    /// version.
    #[error(
        "event {event_id} ({event_type} v{schema_version}) does not match the JSON Schema of that version: {}; fix the upcaster or the schema, nothing was written",
        join_issues(.issues)
    )]
    SchemaViolation {
        /// The offending event.
        event_id: Uuid,
        /// Its event type after upcasting.
        event_type: String,
        /// Its schema version after upcasting.
        schema_version: u32,
        /// Every mismatch found.
        issues: Vec<SchemaIssue>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_error_displays_location_key_and_message() {
        let e = ConfigError::new("unknown step kind `renam`")
            .at(Some(SourceLocation::new("up.yaml", 4, 9)))
            .key("upcasters[0].steps[1]");
        assert_eq!(
            e.to_string(),
            "up.yaml:4:9: upcasters[0].steps[1]: unknown step kind `renam`"
        );
    }

    #[test]
    fn schema_violation_names_event_and_issues() {
        let e = Error::SchemaViolation {
            event_id: Uuid::nil(),
            event_type: "UserSignedUp".into(),
            schema_version: 2,
            issues: vec![SchemaIssue {
                pointer: "/country".into(),
                message: "value is not of type \"string\"".into(),
            }],
        };
        let s = e.to_string();
        assert!(s.contains("00000000-0000-0000-0000-000000000000"), "{s}");
        assert!(s.contains("UserSignedUp v2"), "{s}");
        assert!(s.contains("/country: value is not of type"), "{s}");
    }
}
