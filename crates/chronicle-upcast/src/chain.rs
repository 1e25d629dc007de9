//! Chains of upcasters: from any stored version to the newest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chronicle_core::EventEnvelope;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema::CompiledSchema;
use crate::{
    ConfigError, Error, Result, SourceLocation, UpcastConfig, UpcastEvent, Upcaster, check_identity,
};

/// How events of a type reach their newest version.
///
/// Both modes use the same upcasters and give the same events. The mode
/// tells the eager runner (`chronicle upcast run`) which event types to
/// rewrite in the store, and a reader whether old versions are expected on
/// read. Readers apply the chain in both modes: for an event already at
/// its newest version that is one map lookup, and it serves events appended
/// at an old version while an eager run is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The store is rewritten to the newest version (the spec's initial
    /// strategy); reads should find events already upcast.
    #[default]
    Eager,
    /// Events stay as written and are upcast on every read.
    Lazy,
}

/// The newest version an event type reaches, possibly under a new name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Latest {
    /// The event type at the end of the chain.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: u32,
}

/// One upcaster of a chain, for plans and status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The event type it reads.
    pub event_type: String,
    /// The version it reads.
    pub from_version: u32,
    /// The event type it writes.
    pub target_event_type: String,
    /// Where its chain ends.
    pub latest: Latest,
    /// The mode of its event type.
    pub mode: Mode,
    /// Where it was defined.
    pub location: Option<SourceLocation>,
}

#[derive(Debug, Clone)]
struct Entry {
    upcaster: Arc<dyn Upcaster>,
    location: Option<SourceLocation>,
}

impl Entry {
    fn describe(&self) -> String {
        match &self.location {
            Some(l) => format!("at {l}"),
            None => "registered in code".to_owned(),
        }
    }
}

/// Builds an [`UpcasterChain`], checking that every event version has one
/// way forward.
///
/// ```
/// use chronicle_upcast::{FnUpcaster, Mode, UpcastConfig, UpcasterChainBuilder};
///
/// let yaml = "upcasters:\n  - event_type: UserRegistered\n    from: 1\n    steps:\n      - rename: { from: /name, to: /full_name }\n";
/// let chain = UpcasterChainBuilder::new()
///     .config(UpcastConfig::from_yaml("upcasters.yaml", yaml)?)
///     .upcaster(FnUpcaster::new("UserRegistered", 2, |e| {
///         e.data["verified"] = false.into();
///         Ok(())
///     }))
///     .mode("UserRegistered", Mode::Lazy)
///     .build()?;
/// assert_eq!(chain.latest_version("UserRegistered"), Some(3));
/// # Ok::<(), chronicle_upcast::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct UpcasterChainBuilder {
    entries: Vec<Entry>,
    schemas: Vec<(String, u32, Value, Option<SourceLocation>)>,
    modes: Vec<(String, Mode, Option<SourceLocation>)>,
    default_mode: Option<Mode>,
}

impl UpcasterChainBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an upcaster. Errors about it name the line of this call.
    #[track_caller]
    pub fn upcaster(&mut self, upcaster: impl Upcaster + 'static) -> &mut Self {
        self.entries.push(Entry {
            upcaster: Arc::new(upcaster),
            location: Some(SourceLocation::caller()),
        });
        self
    }

    /// Adds the upcasters, schemas and modes of a YAML file. Errors about
    /// them name their lines in the file.
    pub fn config(&mut self, config: UpcastConfig) -> &mut Self {
        for u in config.upcasters {
            let location = u.location().cloned();
            if let Some(schema) = u.schema() {
                self.schemas.push((
                    u.target_event_type().to_owned(),
                    u.source_version() + 1,
                    schema.clone(),
                    location.clone(),
                ));
            }
            self.entries.push(Entry {
                upcaster: Arc::new(u),
                location,
            });
        }
        self.modes.extend(config.modes);
        if config.default_mode.is_some() {
            self.default_mode = config.default_mode;
        }
        self
    }

    /// Sets the JSON Schema that events of `event_type` at `version` must
    /// match after upcasting. No schema by default.
    #[track_caller]
    pub fn schema(
        &mut self,
        event_type: impl Into<String>,
        version: u32,
        schema: Value,
    ) -> &mut Self {
        self.schemas.push((
            event_type.into(),
            version,
            schema,
            Some(SourceLocation::caller()),
        ));
        self
    }

    /// Sets the mode of `event_type` and of every type in its rename chain.
    /// By default the default mode.
    #[track_caller]
    pub fn mode(&mut self, event_type: impl Into<String>, mode: Mode) -> &mut Self {
        self.modes
            .push((event_type.into(), mode, Some(SourceLocation::caller())));
        self
    }

    /// Sets the mode of event types without one. [`Mode::Eager`] by default.
    pub fn default_mode(&mut self, mode: Mode) -> &mut Self {
        self.default_mode = Some(mode);
        self
    }

    /// Checks the definitions and builds the chain. Fails with
    /// [`Error::Config`] on two upcasters for one version, a missing
    /// version, an upcaster after a type was renamed away, a rename into a
    /// version its new type cannot continue from, an invalid schema, or a
    /// mode for an event type no upcaster knows.
    pub fn build(&self) -> Result<UpcasterChain> {
        let mut by_type: HashMap<String, BTreeMap<u32, Entry>> = HashMap::new();
        for entry in &self.entries {
            let u = &entry.upcaster;
            let from = u.source_version();
            if from == 0 || from == u32::MAX {
                return Err(config(
                    entry,
                    format!(
                        "{} v{from}: schema versions run from 1, and every upcaster needs a next version",
                        u.event_type()
                    ),
                ));
            }
            let versions = by_type.entry(u.event_type().to_owned()).or_default();
            if let Some(first) = versions.get(&from) {
                return Err(config(
                    entry,
                    format!(
                        "{} v{from} already has an upcaster ({}); an event version is upcast only one way: remove one, or make this one start from the next version",
                        u.event_type(),
                        first.describe()
                    ),
                ));
            }
            versions.insert(from, entry.clone());
        }

        // Per type: versions without gaps, a rename only as the last link.
        for (event_type, versions) in &by_type {
            let mut expected = None;
            for (&from, entry) in versions {
                if let Some(next) = expected
                    && from != next
                {
                    return Err(config(
                        entry,
                        format!(
                            "{event_type} has an upcaster from v{from} but none from v{next}; events at v{next} would stop there. Add an upcaster from v{next} or renumber"
                        ),
                    ));
                }
                expected = Some(from + 1);
            }
            let last = *versions.keys().next_back().expect("non-empty");
            for (&from, entry) in versions {
                let target = entry.upcaster.target_event_type();
                if target != event_type && from != last {
                    return Err(config(
                        entry,
                        format!(
                            "{event_type} v{from} is renamed to {target}, so no {event_type} event reaches v{}; yet an upcaster of {event_type} starts from v{}. Rename in the last upcaster, or let {target} continue the chain",
                            from + 1,
                            from + 1
                        ),
                    ));
                }
            }
        }

        // Renames must enter a version their new type can continue from.
        let mut entries_into: HashMap<&str, Vec<(u32, &Entry)>> = HashMap::new();
        for versions in by_type.values() {
            for (&from, entry) in versions {
                let u = &entry.upcaster;
                if u.target_event_type() != u.event_type() {
                    entries_into
                        .entry(u.target_event_type())
                        .or_default()
                        .push((from + 1, entry));
                }
            }
        }
        for (target, arrivals) in &entries_into {
            for &(at, entry) in arrivals {
                let source = entry.upcaster.event_type();
                let ok = match by_type.get(*target) {
                    Some(versions) => {
                        let first = *versions.keys().next().expect("non-empty");
                        let last = *versions.keys().next_back().expect("non-empty");
                        let renamed_away = versions[&last].upcaster.target_event_type() != *target;
                        first <= at && (at <= last || (at == last + 1 && !renamed_away))
                    }
                    None => arrivals.iter().all(|&(other, _)| other == at),
                };
                if !ok {
                    return Err(config(
                        entry,
                        format!(
                            "{source} v{} becomes {target} v{at}, but the upcasters of {target} do not continue from v{at} (its known versions: {}); add an upcaster of {target} from v{at} or rename at another version",
                            at - 1,
                            known_versions(target, by_type.get(*target), arrivals)
                        ),
                    ));
                }
            }
        }

        // Where each type ends.
        let mut types: BTreeSet<&str> = by_type.keys().map(String::as_str).collect();
        types.extend(entries_into.keys().copied());
        let mut latest = HashMap::new();
        for &t in &types {
            let start = match by_type.get(t) {
                Some(versions) => *versions.keys().next().expect("non-empty"),
                None => entries_into[t][0].0,
            };
            let (mut cur_type, mut cur_version) = (t.to_owned(), start);
            while let Some(entry) = by_type.get(&cur_type).and_then(|v| v.get(&cur_version)) {
                cur_type = entry.upcaster.target_event_type().to_owned();
                cur_version += 1;
            }
            latest.insert(
                t.to_owned(),
                Latest {
                    event_type: cur_type,
                    schema_version: cur_version,
                },
            );
        }

        // Modes apply to the whole family of types ending in one type.
        let mut family_modes: HashMap<String, (Mode, String, Option<SourceLocation>)> =
            HashMap::new();
        for (event_type, mode, location) in &self.modes {
            let Some(end) = latest.get(event_type) else {
                let known: Vec<&str> = types.iter().copied().collect();
                return Err(ConfigError::new(format!(
                    "no upcaster reads or writes {event_type}, so its mode means nothing; check the spelling (known event types: {})",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ))
                .at(location.clone())
                .key(format!("modes.{event_type}"))
                .into());
            };
            match family_modes.get(&end.event_type) {
                Some((other, set_for, _)) if other != mode => {
                    return Err(ConfigError::new(format!(
                        "{event_type} is set {} but {set_for}, in the same rename chain ending in {}, is set {}; a chain has one mode",
                        mode_name(*mode),
                        end.event_type,
                        mode_name(*other)
                    ))
                    .at(location.clone())
                    .key(format!("modes.{event_type}"))
                    .into());
                }
                _ => {
                    family_modes.insert(
                        end.event_type.clone(),
                        (*mode, event_type.clone(), location.clone()),
                    );
                }
            }
        }

        let mut schemas = HashMap::new();
        for (event_type, version, schema, location) in &self.schemas {
            let key = (event_type.clone(), *version);
            if schemas.contains_key(&key) {
                return Err(ConfigError::new(format!(
                    "{event_type} v{version} already has a JSON Schema; keep one"
                ))
                .at(location.clone())
                .key("schema")
                .into());
            }
            let compiled = CompiledSchema::compile(schema).map_err(|m| {
                ConfigError::new(format!("{event_type} v{version}: {m}"))
                    .at(location.clone())
                    .key("schema")
            })?;
            schemas.insert(key, compiled);
        }

        Ok(UpcasterChain {
            upcasters: by_type
                .into_iter()
                .map(|(t, versions)| (t, versions.into_iter().collect()))
                .collect(),
            latest,
            modes: family_modes
                .into_iter()
                .map(|(end, (mode, _, _))| (end, mode))
                .collect(),
            default_mode: self.default_mode.unwrap_or_default(),
            schemas,
        })
    }
}

fn config(entry: &Entry, message: String) -> Error {
    ConfigError::new(message).at(entry.location.clone()).into()
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Eager => "eager",
        Mode::Lazy => "lazy",
    }
}

fn known_versions(
    target: &str,
    versions: Option<&BTreeMap<u32, Entry>>,
    arrivals: &[(u32, &Entry)],
) -> String {
    match versions {
        Some(v) => {
            let first = v.keys().next().expect("non-empty");
            let last = v.keys().next_back().expect("non-empty");
            format!("{target} upcasters from v{first} to v{last}")
        }
        None => {
            let at: BTreeSet<u32> = arrivals.iter().map(|&(a, _)| a).collect();
            let at: Vec<String> = at.iter().map(|a| format!("v{a}")).collect();
            format!("renames arrive at {}", at.join(" and "))
        }
    }
}

/// Upcasters by event type and version: brings any stored event to the
/// newest version of its type, following renames.
///
/// Built with [`UpcasterChainBuilder`]; cheap to share (`Arc` it).
///
/// ```
/// use chronicle_upcast::{EventIdentity, FnUpcaster, UpcastEvent, UpcasterChainBuilder};
/// use serde_json::json;
/// use uuid::Uuid;
///
/// let chain = UpcasterChainBuilder::new()
///     .upcaster(FnUpcaster::new("Deposited", 1, |e| {
///         let cents = e.data["amount"].as_f64().unwrap_or(0.0) * 100.0;
///         e.data["amount_cents"] = (cents as i64).into();
///         Ok(())
///     }))
///     .build()?;
/// let identity = EventIdentity {
///     event_id: Uuid::nil(),
///     aggregate_id: Uuid::nil(),
///     aggregate_type: "Account".into(),
///     version: 1,
///     position: None,
/// };
/// let old = UpcastEvent::new(identity, "Deposited", json!({ "amount": 2.5 }));
/// let new = chain.upcast(old)?;
/// assert_eq!(new.schema_version(), 2);
/// assert_eq!(new.data["amount_cents"], 250);
/// // Already newest: nothing changes.
/// assert_eq!(chain.upcast(new.clone())?, new);
/// # Ok::<(), chronicle_upcast::Error>(())
/// ```
#[derive(Debug)]
pub struct UpcasterChain {
    upcasters: HashMap<String, HashMap<u32, Entry>>,
    latest: HashMap<String, Latest>,
    modes: HashMap<String, Mode>,
    default_mode: Mode,
    schemas: HashMap<(String, u32), CompiledSchema>,
}

impl UpcasterChain {
    /// A builder.
    pub fn builder() -> UpcasterChainBuilder {
        UpcasterChainBuilder::new()
    }

    fn next(&self, event_type: &str, version: u32) -> Option<&Entry> {
        self.upcasters.get(event_type)?.get(&version)
    }

    /// Whether an event of this type and version has an upcaster to apply.
    pub fn needs_upcast(&self, event_type: &str, version: u32) -> bool {
        self.next(event_type, version).is_some()
    }

    /// Where the chain of `event_type` ends; `None` when no upcaster reads
    /// or writes that type (any version of it is current).
    pub fn latest(&self, event_type: &str) -> Option<&Latest> {
        self.latest.get(event_type)
    }

    /// The event types stored events may carry that reach `event_type` at
    /// the end of the chain: `event_type` itself and every older name a
    /// `rename_event` step turns into it, sorted. What a projection that
    /// subscribes to `event_type` after upcasting must read from the store.
    ///
    /// ```
    /// use chronicle_upcast::{UpcastConfig, UpcasterChain};
    ///
    /// let yaml = "upcasters:\n  - event_type: UserSignedUp\n    from: 1\n    steps:\n      - rename_event: UserRegistered\n";
    /// let chain = UpcasterChain::builder()
    ///     .config(UpcastConfig::from_yaml("upcasters.yaml", yaml).unwrap())
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(chain.stored_types_of("UserRegistered"), ["UserRegistered", "UserSignedUp"]);
    /// assert_eq!(chain.stored_types_of("Other"), ["Other"]);
    /// ```
    pub fn stored_types_of(&self, event_type: &str) -> Vec<String> {
        let mut types: Vec<String> = self
            .latest
            .iter()
            .filter(|(_, latest)| latest.event_type == event_type)
            .map(|(stored, _)| stored.clone())
            .chain(std::iter::once(event_type.to_owned()))
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    }

    /// The newest schema version `event_type` reaches (under its final
    /// name, see [`UpcasterChain::latest`]); `None` when no upcaster knows
    /// the type.
    pub fn latest_version(&self, event_type: &str) -> Option<u32> {
        self.latest(event_type).map(|l| l.schema_version)
    }

    /// A version of the chain for aggregate snapshots
    /// (`chronicle_core::Repository::upcaster_version`): a stable hash of
    /// every upcaster's event type, version and target type. Adding,
    /// removing or retargeting an upcaster changes it, so snapshots folded
    /// under another chain are ignored and replaced; 0 for an empty chain.
    ///
    /// ```
    /// use chronicle_upcast::UpcasterChain;
    ///
    /// assert_eq!(UpcasterChain::builder().build().unwrap().snapshot_version(), 0);
    /// ```
    pub fn snapshot_version(&self) -> u32 {
        let migrations = self.migrations();
        if migrations.is_empty() {
            return 0;
        }
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut hash: u32 = 0x811c_9dc5;
        for m in &migrations {
            let from = m.from_version.to_string();
            for part in [
                m.event_type.as_str(),
                from.as_str(),
                m.target_event_type.as_str(),
            ] {
                for byte in part.bytes().chain([0]) {
                    hash ^= u32::from(byte);
                    hash = hash.wrapping_mul(0x0100_0193);
                }
            }
        }
        hash.max(1)
    }

    /// The mode of `event_type`: the one set for any type of its rename
    /// chain, else the default.
    pub fn mode(&self, event_type: &str) -> Mode {
        self.latest
            .get(event_type)
            .and_then(|l| self.modes.get(&l.event_type))
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// Every upcaster, sorted by event type and version: what `chronicle
    /// upcast plan` lists and the eager runner selects events by.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut list: Vec<Migration> = self
            .upcasters
            .iter()
            .flat_map(|(t, versions)| {
                versions.iter().map(move |(&from, entry)| Migration {
                    event_type: t.clone(),
                    from_version: from,
                    target_event_type: entry.upcaster.target_event_type().to_owned(),
                    latest: self.latest[t].clone(),
                    mode: self.mode(t),
                    location: entry.location.clone(),
                })
            })
            .collect();
        list.sort_by(|a, b| {
            (a.event_type.as_str(), a.from_version).cmp(&(b.event_type.as_str(), b.from_version))
        });
        list
    }

    /// Brings `event` to the newest version of its type. An event with no
    /// upcaster for its type and version (already newest, or a type the
    /// chain does not know) comes back unchanged, so applying the chain
    /// again, or to an eagerly rewritten event, is a no-op.
    ///
    /// After each upcaster the schema version is set to the next one and
    /// the event's identity and declared type are checked. JSON Schemas are
    /// not checked; see [`UpcasterChain::upcast_validated`].
    pub fn upcast(&self, event: UpcastEvent) -> Result<UpcastEvent> {
        self.run(event, false)
    }

    /// Like [`UpcasterChain::upcast`], and also checks each version reached
    /// against its JSON Schema, if one is given. This is what the eager
    /// runner uses: a failure names the event and leaves nothing written.
    pub fn upcast_validated(&self, event: UpcastEvent) -> Result<UpcastEvent> {
        self.run(event, true)
    }

    fn run(&self, mut event: UpcastEvent, validate: bool) -> Result<UpcastEvent> {
        let identity = event.identity().clone();
        while let Some(entry) = self.next(&event.event_type, event.schema_version()) {
            let u = &entry.upcaster;
            let from = event.schema_version();
            u.upcast(&mut event).map_err(|failure| Error::Upcast {
                event_id: identity.event_id,
                event_type: u.event_type().to_owned(),
                from_version: from,
                to_version: from + 1,
                failure,
            })?;
            check_identity(&identity, event.identity())?;
            if event.event_type != u.target_event_type() {
                return Err(Error::UndeclaredRename {
                    event_id: identity.event_id,
                    event_type: u.event_type().to_owned(),
                    from_version: from,
                    declared: u.target_event_type().to_owned(),
                    actual: event.event_type,
                });
            }
            event.set_schema_version(from + 1);
            if validate {
                self.check_schema(&event)?;
            }
        }
        Ok(event)
    }

    /// Whether lazy upcasting changes `envelope`: it is below the newest
    /// version of its type, and with `lazy_only` its type is in
    /// [`Mode::Lazy`]. What [`UpcastingReader`](crate::UpcastingReader) and
    /// [`UpcastingHandler`](crate::UpcastingHandler) ask before copying.
    pub fn upcasts_on_read(&self, envelope: &EventEnvelope, lazy_only: bool) -> bool {
        (!lazy_only || self.mode(&envelope.event_type) == Mode::Lazy)
            && self.needs_upcast(&envelope.event_type, envelope.metadata.schema_version)
    }

    /// Upcasts a stored event for a reader; identity and timestamp stay.
    /// Use it in both modes (see [`Mode`]), after decrypting the event's
    /// encrypted fields: a ciphertext moved to another pointer no longer
    /// decrypts.
    pub fn upcast_envelope(&self, mut envelope: EventEnvelope) -> Result<EventEnvelope> {
        if !self.needs_upcast(&envelope.event_type, envelope.metadata.schema_version) {
            return Ok(envelope);
        }
        let event = self.upcast(UpcastEvent::from_envelope(&envelope))?;
        event.write_to(&mut envelope)?;
        Ok(envelope)
    }

    /// Checks `event` against the JSON Schema of its type and version, if
    /// one is given. Values inside encrypted envelopes and redaction
    /// markers are not checked: validate the decrypted event.
    pub fn check_schema(&self, event: &UpcastEvent) -> Result<()> {
        let key = (event.event_type.clone(), event.schema_version());
        let Some(schema) = self.schemas.get(&key) else {
            return Ok(());
        };
        let issues = schema.issues(&event.data);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaViolation {
                event_id: event.event_id(),
                event_type: event.event_type.clone(),
                schema_version: event.schema_version(),
                issues,
            })
        }
    }

    /// Validates a transformed event against its original: the identity is
    /// unchanged and the data matches the JSON Schema of its new version.
    pub fn validate(&self, before: &UpcastEvent, after: &UpcastEvent) -> Result<()> {
        check_identity(before.identity(), after.identity())?;
        self.check_schema(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventIdentity, FnUpcaster, UpcastFailure};
    use chronicle_core::{Metadata, Position};
    use serde_json::json;
    use uuid::Uuid;

    const YAML: &str = r#"
upcasters:
  - event_type: UserRegistered
    from: 1
    steps:
      - rename: { from: /name, to: /full_name }
      - map: { path: /gender, values: { M: male, F: female } }
      - rename_event: UserSignedUp
    schema:
      type: object
      required: [full_name]
      properties:
        full_name: { type: string }
  - event_type: UserSignedUp
    from: 2
    steps:
      - add: { path: /country, default: unknown }
      - move: { from: /street, to: /address/street }
    schema:
      type: object
      required: [full_name, country]
      properties:
        country: { type: string }
"#;

    fn identity(n: u128) -> EventIdentity {
        EventIdentity {
            event_id: Uuid::from_u128(n),
            aggregate_id: Uuid::from_u128(1000 + n),
            aggregate_type: "User".into(),
            version: 1,
            position: Some(Position::new(5, n as i64)),
        }
    }

    fn v1(n: u128, data: Value) -> UpcastEvent {
        UpcastEvent::new(identity(n), "UserRegistered", data)
    }

    fn chain() -> UpcasterChain {
        UpcasterChainBuilder::new()
            .config(UpcastConfig::from_yaml("up.yaml", YAML).unwrap())
            .build()
            .unwrap()
    }

    fn build_err(b: &UpcasterChainBuilder) -> ConfigError {
        match b.build().unwrap_err() {
            Error::Config(c) => c,
            other => panic!("expected a config error, got {other}"),
        }
    }

    fn noop(event_type: &str, from: u32) -> FnUpcaster {
        FnUpcaster::new(event_type, from, |_| Ok(()))
    }

    #[test]
    fn multi_step_chain_with_a_rename_mid_chain() {
        let chain = chain();
        let e = chain
            .upcast_validated(v1(
                1,
                json!({ "name": "Ada", "gender": "F", "street": "Main St" }),
            ))
            .unwrap();
        assert_eq!(e.event_type, "UserSignedUp");
        assert_eq!(e.schema_version(), 3);
        assert_eq!(
            e.data,
            json!({ "full_name": "Ada", "gender": "female", "country": "unknown", "address": { "street": "Main St" } })
        );
        assert_eq!(e.identity(), &identity(1));

        // From the middle of the chain.
        let mid = UpcastEvent::new(identity(2), "UserSignedUp", json!({ "full_name": "Bo" }))
            .with_schema_version(2);
        let e = chain.upcast(mid).unwrap();
        assert_eq!(e.schema_version(), 3);
        assert_eq!(e.data["country"], "unknown");

        let latest = chain.latest("UserRegistered").unwrap();
        assert_eq!(
            (latest.event_type.as_str(), latest.schema_version),
            ("UserSignedUp", 3)
        );
        assert_eq!(chain.latest_version("UserSignedUp"), Some(3));
        assert_eq!(chain.latest_version("Unrelated"), None);
        assert!(chain.needs_upcast("UserRegistered", 1));
        assert!(!chain.needs_upcast("UserSignedUp", 3));
        let m = chain.migrations();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].event_type.as_str(), m[0].from_version),
            ("UserRegistered", 1)
        );
        assert_eq!(m[0].location.as_ref().unwrap().line, 3);
    }

    #[test]
    fn lazy_and_eager_give_the_same_events() {
        let chain = chain();
        let events = [
            v1(
                1,
                json!({ "name": "Ada", "gender": "F", "street": "Main St" }),
            ),
            v1(2, json!({ "name": "Bo", "gender": "X" })),
            v1(3, json!({ "name": "Cy", "country": "NL" })),
        ];
        for original in events {
            // Eager: rewritten once in the store, then read through the chain.
            let stored = chain.upcast_validated(original.clone()).unwrap();
            let eager_read = chain.upcast(stored.clone()).unwrap();
            // Lazy: the original stays in the store and is upcast on read.
            let lazy_read = chain.upcast(original).unwrap();
            assert_eq!(
                eager_read, stored,
                "applying at the newest version is a no-op"
            );
            assert_eq!(eager_read, lazy_read);
            assert_eq!(chain.upcast(lazy_read.clone()).unwrap(), lazy_read);
        }
    }

    #[test]
    fn envelopes_upcast_on_read_keep_identity_and_timestamp() {
        let chain = chain();
        let env = EventEnvelope {
            event_id: Uuid::from_u128(9),
            aggregate_id: Uuid::from_u128(10),
            aggregate_type: "User".into(),
            event_type: "UserRegistered".into(),
            event_data: json!({ "name": "Ada" }),
            metadata: Metadata::default().with_actor("signup"),
            version: 4,
            timestamp: Default::default(),
            encrypted_fields: vec![],
            position: Position::new(1, 2),
        };
        let read = chain.upcast_envelope(env.clone()).unwrap();
        assert_eq!(read.event_type, "UserSignedUp");
        assert_eq!(read.metadata.schema_version, 3);
        assert_eq!(read.metadata.actor.as_deref(), Some("signup"));
        assert_eq!(
            (read.event_id, read.version, read.position),
            (env.event_id, 4, env.position)
        );
        assert_eq!(chain.upcast_envelope(read.clone()).unwrap(), read);
    }

    #[test]
    fn modes_apply_per_rename_chain() {
        let mut b = UpcasterChainBuilder::new();
        b.config(UpcastConfig::from_yaml("up.yaml", YAML).unwrap())
            .upcaster(noop("OrderPlaced", 1))
            .mode("UserRegistered", Mode::Lazy);
        let chain = b.build().unwrap();
        assert_eq!(chain.mode("UserRegistered"), Mode::Lazy);
        assert_eq!(chain.mode("UserSignedUp"), Mode::Lazy);
        assert_eq!(chain.mode("OrderPlaced"), Mode::Eager);
        assert_eq!(chain.mode("Unknown"), Mode::Eager);

        b.mode("UserSignedUp", Mode::Eager);
        let e = build_err(&b);
        assert!(e.message.contains("one mode"), "{e}");

        let mut typo = UpcasterChainBuilder::new();
        typo.upcaster(noop("OrderPlaced", 1))
            .mode("OrderPlacd", Mode::Lazy);
        let e = build_err(&typo);
        assert!(e.message.contains("OrderPlaced"), "{e}");
        assert!(
            e.location.as_ref().unwrap().origin.ends_with("chain.rs"),
            "{e}"
        );
    }

    #[test]
    fn duplicates_are_refused_with_both_locations() {
        let yaml = "upcasters:\n  - event_type: UserRegistered\n    from: 1\n    steps: []\n  - event_type: UserRegistered\n    from: 1\n    steps:\n      - remove: /x\n";
        let mut b = UpcasterChainBuilder::new();
        b.config(UpcastConfig::from_yaml("up.yaml", yaml).unwrap());
        let e = build_err(&b);
        assert_eq!(e.location.as_ref().unwrap().line, 5, "{e}");
        assert!(
            e.message
                .contains("UserRegistered v1 already has an upcaster (at up.yaml:2:"),
            "{e}"
        );
    }

    #[test]
    fn yaml_gaps_name_the_line() {
        let yaml = "upcasters:\n  - event_type: A\n    from: 1\n    steps: []\n  - event_type: A\n    from: 3\n    steps: []\n";
        let mut b = UpcasterChainBuilder::new();
        b.config(UpcastConfig::from_yaml("up.yaml", yaml).unwrap());
        assert_eq!(
            build_err(&b).to_string(),
            "up.yaml:5:5: A has an upcaster from v3 but none from v2; events at v2 would stop there. Add an upcaster from v2 or renumber"
        );
    }

    #[test]
    fn gaps_are_refused() {
        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1)).upcaster(noop("A", 3));
        let e = build_err(&b);
        assert!(e.message.contains("none from v2"), "{e}");

        let mut zero = UpcasterChainBuilder::new();
        zero.upcaster(noop("A", 0));
        assert!(build_err(&zero).message.contains("from 1"));
    }

    #[test]
    fn renames_must_be_last_and_land_where_the_chain_continues() {
        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1).renaming_to("B"))
            .upcaster(noop("A", 2));
        assert!(
            build_err(&b)
                .message
                .contains("Rename in the last upcaster")
        );

        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1).renaming_to("B"))
            .upcaster(noop("B", 3));
        let e = build_err(&b);
        assert!(e.message.contains("A v1 becomes B v2"), "{e}");

        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1).renaming_to("C"))
            .upcaster(noop("B", 2).renaming_to("C"));
        assert!(
            build_err(&b)
                .message
                .contains("renames arrive at v2 and v3")
        );

        // Two types merging into one at versions it continues from is fine.
        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1).renaming_to("C"))
            .upcaster(noop("B", 2).renaming_to("C"))
            .upcaster(noop("C", 2));
        let chain = b.build().unwrap();
        assert_eq!(chain.latest("A"), chain.latest("B"));
        assert_eq!(chain.latest_version("C"), Some(3));
    }

    #[test]
    fn rust_upcasters_are_checked_at_run_time() {
        let chain = UpcasterChainBuilder::new()
            .upcaster(FnUpcaster::new("A", 1, |e| {
                e.event_type = "B".into();
                Ok(())
            }))
            .build()
            .unwrap();
        let err = chain
            .upcast(UpcastEvent::new(identity(1), "A", json!({})))
            .unwrap_err();
        assert!(matches!(err, Error::UndeclaredRename { .. }), "{err}");

        let chain = UpcasterChainBuilder::new()
            .upcaster(FnUpcaster::new("A", 1, |e| {
                let mut other = identity(2);
                other.event_id = e.event_id();
                *e = UpcastEvent::new(other, "A", json!({}));
                Ok(())
            }))
            .build()
            .unwrap();
        let err = chain
            .upcast(UpcastEvent::new(identity(1), "A", json!({})))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::IdentityChanged {
                    field: "aggregate_id",
                    ..
                }
            ),
            "{err}"
        );

        let chain = UpcasterChainBuilder::new()
            .upcaster(FnUpcaster::new("A", 1, |_| {
                Err(UpcastFailure::new("negative total").at("/total"))
            }))
            .build()
            .unwrap();
        let err = chain
            .upcast(UpcastEvent::new(identity(3), "A", json!({ "total": -1 })))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&Uuid::from_u128(3).to_string()), "{err}");
        assert!(err.contains("A v1 to v2"), "{err}");
        assert!(err.contains("/total: negative total"), "{err}");
    }

    #[test]
    fn declarative_step_failures_name_event_and_step() {
        let err = chain()
            .upcast(v1(4, json!({ "name": "Ada", "full_name": "Ada L" })))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&Uuid::from_u128(4).to_string()), "{err}");
        assert!(
            err.contains("step 1 (rename /name to /full_name): /full_name: cannot move /name here"),
            "{err}"
        );
    }

    #[cfg(feature = "json-schema")]
    #[test]
    fn schema_violations_name_the_event() {
        let chain = chain();
        let err = chain
            .upcast_validated(v1(5, json!({ "gender": "M" })))
            .unwrap_err();
        match &err {
            Error::SchemaViolation {
                event_id,
                event_type,
                schema_version,
                issues,
            } => {
                assert_eq!(*event_id, Uuid::from_u128(5));
                assert_eq!((event_type.as_str(), *schema_version), ("UserSignedUp", 2));
                assert!(issues[0].message.contains("full_name"), "{err}");
            }
            other => panic!("expected a schema violation, got {other}"),
        }
        // Without validation the same event goes through.
        assert!(chain.upcast(v1(5, json!({ "gender": "M" }))).is_ok());

        let bad = UpcastEvent::new(
            identity(6),
            "UserSignedUp",
            json!({ "full_name": "X", "country": 7 }),
        )
        .with_schema_version(3);
        let err = chain.validate(&bad.clone(), &bad).unwrap_err().to_string();
        assert!(err.contains("/country"), "{err}");
        assert!(err.contains(&Uuid::from_u128(6).to_string()), "{err}");
    }

    #[cfg(feature = "json-schema")]
    #[test]
    fn invalid_schemas_are_config_errors() {
        let mut b = UpcasterChainBuilder::new();
        b.upcaster(noop("A", 1))
            .schema("A", 2, json!({ "type": "strin" }));
        let e = build_err(&b);
        assert!(e.message.contains("invalid JSON Schema"), "{e}");
        assert!(e.location.is_some());
    }

    #[test]
    fn validate_catches_identity_changes() {
        let chain = chain();
        let before = v1(1, json!({}));
        let mut other = identity(1);
        other.version = 2;
        let after = UpcastEvent::new(other, "UserRegistered", json!({}));
        let err = chain.validate(&before, &after).unwrap_err();
        assert!(
            matches!(
                err,
                Error::IdentityChanged {
                    field: "version",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn encrypted_fields_survive_the_chain() {
        let chain = chain();
        let envelope = json!({ "$enc": "v1", "kid": "user-1/3", "ct": "b64" });
        let e = v1(7, json!({ "name": "Ada", "street": envelope.clone() }))
            .with_encrypted_fields(["/street"]);
        let out = chain.upcast(e).unwrap();
        assert_eq!(out.data["address"]["street"], envelope);
        assert_eq!(out.encrypted_fields, ["/address/street"]);
    }
}
