//! Which events a projection consumes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The events a projection consumes: by event type, by aggregate type, or
/// both. An empty list places no condition, so [`Subscription::all`]
/// (both empty) takes every event of the store.
///
/// A runtime filters by it where the events are stored (the PostgreSQL
/// runtime in the step's SQL), so events outside it are neither sent nor
/// decoded, while the projection's checkpoint still moves past them. The
/// lists are kept sorted and free of duplicates, so two subscriptions that
/// take the same events compare equal whatever order they were written in.
///
/// ```
/// use chronicle_core::Subscription;
///
/// let profile = Subscription::all()
///     .with_aggregate_types(["user"])
///     .with_event_types(["UserRegistered", "EmailChanged"]);
/// assert!(profile.matches("EmailChanged", "user"));
/// assert!(!profile.matches("EmailChanged", "customer"));
/// assert!(!profile.matches("CustomerRegistered", "user"));
/// assert_eq!(
///     profile.to_string(),
///     "event types EmailChanged, UserRegistered of aggregate type user"
/// );
/// assert!(Subscription::all().matches("Anything", "any"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Lists", deny_unknown_fields)]
pub struct Subscription {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    aggregate_types: Vec<String>,
}

/// The serialized form, canonicalized on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lists {
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    aggregate_types: Vec<String>,
}

impl From<Lists> for Subscription {
    fn from(lists: Lists) -> Self {
        Subscription::all()
            .with_event_types(lists.event_types)
            .with_aggregate_types(lists.aggregate_types)
    }
}

/// A subscription that cannot be stored: an empty or over-long type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subscription: {0}")]
pub struct SubscriptionError(String);

/// The longest event type the store keeps (`VARCHAR(100)`).
const EVENT_TYPE_MAX: usize = 100;
/// The longest aggregate type the store keeps (`VARCHAR(50)`).
const AGGREGATE_TYPE_MAX: usize = 50;

impl Subscription {
    /// Every event of the store: what a projection consumes unless it says
    /// otherwise.
    pub fn all() -> Self {
        Subscription::default()
    }

    /// Also requires one of `types` as the event type (added to any types
    /// given before).
    pub fn with_event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types.extend(types.into_iter().map(Into::into));
        canonical(&mut self.event_types);
        self
    }

    /// Also requires one of `types` as the aggregate type (added to any
    /// types given before).
    pub fn with_aggregate_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.aggregate_types
            .extend(types.into_iter().map(Into::into));
        canonical(&mut self.aggregate_types);
        self
    }

    /// The event types taken, sorted; empty: any.
    pub fn event_types(&self) -> &[String] {
        &self.event_types
    }

    /// The aggregate types taken, sorted; empty: any.
    pub fn aggregate_types(&self) -> &[String] {
        &self.aggregate_types
    }

    /// Whether every event is taken.
    pub fn is_all(&self) -> bool {
        self.event_types.is_empty() && self.aggregate_types.is_empty()
    }

    /// Whether an event of `event_type` on an aggregate of `aggregate_type`
    /// is taken.
    pub fn matches(&self, event_type: &str, aggregate_type: &str) -> bool {
        let has = |list: &[String], name: &str| {
            list.is_empty() || list.binary_search_by(|t| t.as_str().cmp(name)).is_ok()
        };
        has(&self.event_types, event_type) && has(&self.aggregate_types, aggregate_type)
    }

    /// Checks that every name could be stored: not empty, at most 100
    /// characters for event types and 50 for aggregate types (the spec's
    /// column widths). A name that no event can carry would match nothing,
    /// silently.
    pub fn validate(&self) -> Result<(), SubscriptionError> {
        let check = |list: &[String], what: &str, max: usize| {
            for name in list {
                if name.trim().is_empty() {
                    return Err(SubscriptionError(format!(
                        "an empty {what} matches no event; remove it"
                    )));
                }
                if name.chars().count() > max {
                    return Err(SubscriptionError(format!(
                        "the {what} `{name}` is longer than {max} characters, so no stored event has it"
                    )));
                }
            }
            Ok(())
        };
        check(&self.event_types, "event type", EVENT_TYPE_MAX)?;
        check(&self.aggregate_types, "aggregate type", AGGREGATE_TYPE_MAX)
    }
}

fn canonical(list: &mut Vec<String>) {
    list.sort_unstable();
    list.dedup();
}

impl fmt::Display for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match (&self.event_types[..], &self.aggregate_types[..]) {
            ([], []) => f.write_str("every event"),
            (events, []) => write!(
                f,
                "event type{} {}",
                plural(events.len()),
                events.join(", ")
            ),
            ([], aggregates) => write!(
                f,
                "every event of aggregate type{} {}",
                plural(aggregates.len()),
                aggregates.join(", ")
            ),
            (events, aggregates) => write!(
                f,
                "event type{} {} of aggregate type{} {}",
                plural(events.len()),
                events.join(", "),
                plural(aggregates.len()),
                aggregates.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let a = Subscription::all().with_event_types(["B", "A", "B"]);
        let b = Subscription::all()
            .with_event_types(["A"])
            .with_event_types(["B"]);
        assert_eq!(a, b);
        assert_eq!(a.event_types(), ["A", "B"]);
    }

    #[test]
    fn serializes_only_what_it_restricts_and_reads_back_canonical() {
        assert_eq!(serde_json::to_string(&Subscription::all()).unwrap(), "{}");
        let s = Subscription::all().with_aggregate_types(["user"]);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"aggregate_types":["user"]}"#
        );
        let read: Subscription = serde_json::from_str(r#"{"event_types":["Z","A","Z"]}"#).unwrap();
        assert_eq!(read.event_types(), ["A", "Z"]);
        assert!(serde_json::from_str::<Subscription>(r#"{"types":["A"]}"#).is_err());
    }

    #[test]
    fn names_no_event_can_carry_are_refused() {
        assert!(
            Subscription::all()
                .with_event_types([""])
                .validate()
                .is_err()
        );
        let long = "x".repeat(51);
        let err = Subscription::all()
            .with_aggregate_types([long.as_str()])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("50 characters"), "{err}");
        assert!(
            Subscription::all()
                .with_event_types([long.as_str()])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn describes_itself() {
        assert_eq!(Subscription::all().to_string(), "every event");
        assert_eq!(
            Subscription::all()
                .with_aggregate_types(["order", "user"])
                .to_string(),
            "every event of aggregate types order, user"
        );
    }
}
