//! Event schema evolution for Chronicle: upcasters, and the chains that
//! bring any stored event to the newest version of its type.
//!
//! Every event carries a `schema_version` in its metadata (absent means 1).
//! An [`Upcaster`] turns one event type from version `n` into `n + 1`,
//! possibly renaming it; it is written once, as a Rust function
//! ([`FnUpcaster`]) or as declarative YAML steps ([`DeclarativeUpcaster`],
//! read with [`UpcastConfig::from_yaml`]). An [`UpcasterChain`], built and
//! checked by [`UpcasterChainBuilder`], links them `n -> n+1 -> ...` and
//! serves both modes ([`Mode`]) from the same definition: lazy (applied on
//! read) and eager (the store rewritten by `chronicle upcast run`). Applying
//! the chain to an event at its newest version changes nothing, so both
//! modes give the same events.
//!
//! For the eager run this crate also validates transformed events (a JSON
//! Schema per version, and identity fields that never change), and offers
//! the database-free parts of planning and verifying: [`EventDiff`] for
//! `chronicle upcast plan` and [`Checksum`] for `chronicle upcast verify`.
//! Without features it does no I/O. [`UpcastingReader`] applies the chain
//! on read over any `EventReader` (lazy mode); with the `postgres` feature,
//! `PgUpcaster` rewrites a PostgreSQL store eagerly, with a backup table,
//! resumable batches, verification and rollback.
//!
//! ```
//! use chronicle_upcast::{EventDiff, EventIdentity, UpcastConfig, UpcastEvent, UpcasterChain};
//! use serde_json::json;
//! use uuid::Uuid;
//!
//! let yaml = r#"
//! upcasters:
//!   - event_type: UserRegistered
//!     from: 1
//!     steps:
//!       - rename: { from: /name, to: /full_name }
//!       - add: { path: /country, default: "unknown" }
//!       - map: { path: /gender, values: { M: male, F: female } }
//!       - rename_event: UserSignedUp
//!     schema:
//!       type: object
//!       required: [full_name, country]
//! "#;
//! let chain = UpcasterChain::builder()
//!     .config(UpcastConfig::from_yaml("upcasters.yaml", yaml)?)
//!     .build()?;
//!
//! let identity = EventIdentity {
//!     event_id: Uuid::nil(),
//!     aggregate_id: Uuid::nil(),
//!     aggregate_type: "User".into(),
//!     version: 1,
//!     position: None,
//! };
//! let stored = UpcastEvent::new(identity, "UserRegistered", json!({ "name": "Ada", "gender": "F" }));
//! let newest = chain.upcast_validated(stored.clone())?;
//! assert_eq!((newest.event_type.as_str(), newest.schema_version()), ("UserSignedUp", 2));
//! assert_eq!(newest.data, json!({ "full_name": "Ada", "country": "unknown", "gender": "female" }));
//!
//! // What `chronicle upcast plan` shows for this event.
//! let plan = EventDiff::between(&stored, &newest).to_string();
//! assert!(plan.contains("> /name -> /full_name: \"Ada\""));
//! # Ok::<(), chronicle_upcast::Error>(())
//! ```
//!
//! # Declarative upcasters in YAML
//!
//! [`UpcastConfig::from_yaml`] reads this format:
//!
//! ```yaml
//! default_mode: eager          # eager (the default) or lazy
//! modes:                       # per event type; applies to its whole rename chain
//!   OrderPlaced: lazy
//! upcasters:
//!   - event_type: UserRegistered
//!     from: 1                  # reads v1, writes v2
//!     steps:
//!       - rename: { from: /name, to: /full_name }         # same object
//!       - add: { path: /country, default: "unknown" }     # kept if present
//!       - remove: /legacy_flag
//!       - move: { from: /street, to: /address/street }    # across objects
//!       - map: { path: /gender, values: { M: male, F: female } }
//!       - map: { path: /status, values: { 1: active }, otherwise: inactive }
//!       - rename_event: UserSignedUp
//!     schema:                  # optional JSON Schema of UserSignedUp v2
//!       type: object
//!       required: [full_name, country]
//! ```
//!
//! Step semantics, chosen so that old events with optional fields migrate
//! cleanly and nothing is overwritten silently:
//!
//! - `rename` and `move` do nothing when the source is absent and fail when
//!   the target exists; missing objects on the way to the target are
//!   created. `rename` must keep the field in the same object (use `move`
//!   to change nesting).
//! - `add` keeps a value that is already there.
//! - `remove` does nothing when the field is absent.
//! - `map` replaces a scalar found in `values` (numbers and booleans match
//!   by their JSON text, e.g. `1` or `true`); other values are kept, or
//!   replaced by `otherwise` when it is given.
//! - `rename_event` changes the event type (at most once per upcaster).
//!
//! `steps: []` only raises the version. Errors name the file, line, column
//! and, where known, the key, and say what to do:
//!
//! ```text
//! up.yaml:6:23: upcasters[0].steps[1].move.from: `street` is not a JSON pointer: pointers start with `/`, e.g. `/street`
//! ```
//!
//! Chain-wide mistakes (two upcasters from one version, a missing version,
//! a rename the new type cannot continue from) are refused by
//! [`UpcasterChainBuilder::build`], naming the lines involved.
//!
//! # Encrypted fields
//!
//! Events may hold encrypted envelopes (`{"$enc": "v1", ...}`) at the
//! pointers listed in `encrypted_fields`, and redaction markers
//! (`{"$redacted": ...}`) where a subject was shredded. Declarative steps
//! carry both over verbatim and keep `encrypted_fields` in step with
//! renames, moves and removals (a field moved out of an encrypted object
//! is listed too, so it stays encrypted); a step that needs the plaintext
//! (`map`, a pointer through an envelope) fails and says so. Inside a
//! redacted value there is nothing to move: such steps do nothing.
//!
//! `chronicle-crypto` binds each ciphertext to its event, aggregate and
//! pointer (AEAD associated data), so an envelope moved to another pointer
//! no longer decrypts there. Decrypt before upcasting and re-encrypt after,
//! in both modes:
//!
//! - the eager runner, per event: decrypt the listed fields,
//!   [`UpcasterChain::upcast_validated`], re-encrypt the fields listed
//!   afterwards under the subject's current key (audited),
//!   [`UpcastEvent::write_to`];
//! - a lazy reader: decrypt (or redact, for a shredded subject), then
//!   [`UpcasterChain::upcast_envelope`].
//!
//! Envelopes of a shredded subject cannot be decrypted; carried over
//! verbatim they stay undecryptable, which is what shredding means.
//!
//! # Features
//!
//! - `json-schema` (default): JSON Schema validation, with the `jsonschema`
//!   crate without its network and file resolvers.
//! - `postgres`: `PgUpcaster`, the eager runner on `chronicle-postgres`
//!   (tables from its migration 5).
//! - `crypto`: `CryptoFieldCipher`, the runner's [`FieldCipher`] on
//!   `chronicle-crypto` (implies `postgres`).
//! - `full`: everything.
#![deny(missing_docs)]

mod chain;
#[cfg(feature = "crypto")]
mod crypto;
mod declarative;
mod error;
mod event;
mod handler;
mod plan;
mod pointer;
#[cfg(feature = "postgres")]
mod postgres;
mod reader;
mod schema;
mod upcaster;

pub use chain::{Latest, Migration, Mode, UpcasterChain, UpcasterChainBuilder};
#[cfg(feature = "crypto")]
pub use crypto::CryptoFieldCipher;
pub use declarative::{DeclarativeUpcaster, Step, UpcastConfig};
pub use error::{ConfigError, Error, Result, SchemaIssue, SourceLocation, UpcastFailure};
pub use event::{EventIdentity, UpcastEvent, check_identity};
pub use handler::UpcastingHandler;
pub use plan::{Change, Checksum, ChecksumParseError, EventDiff, canonical_json, diff};
pub use pointer::{
    ENCRYPTED_KEY, JsonPointer, PointerError, REDACTED_KEY, is_encrypted, is_redacted,
};
#[cfg(feature = "postgres")]
pub use postgres::{
    DEFAULT_BATCH_SIZE, DEFAULT_LEASE_TTL, FieldCipher, LeaseInfo, PgUpcaster, PlanEntry, Progress,
    RunError, RunInfo, RunReport, RunStatus, Sample, VerifyReport,
};
pub use reader::UpcastingReader;
pub use upcaster::{FnUpcaster, Upcaster};

#[cfg(test)]
mod send_sync {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<UpcasterChain>();
        assert_send_sync::<UpcasterChainBuilder>();
        assert_send_sync::<UpcastEvent>();
        assert_send_sync::<Error>();
        assert_send_sync::<DeclarativeUpcaster>();
        assert_send_sync::<FnUpcaster>();
    }
}
