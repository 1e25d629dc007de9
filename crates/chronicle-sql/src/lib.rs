//! PostgreSQL wire types, event row decoding and statement sending, shared
//! by the store (`chronicle-postgres`) and the portable projection step
//! (`chronicle-step`). It has no runtime of its own: no pool, no timers,
//! no sockets, so it builds for `wasm32-unknown-unknown` as well as
//! natively.
//!
//! - [`Xid8`]: a transaction id as PostgreSQL's `xid8`, the feed's order.
//! - [`decode_event`] with [`EVENT_COLUMNS`]: a row of `events` as an
//!   [`chronicle_core::EventEnvelope`].
//! - [`Connection`]: one client with its prepared-statement cache: a
//!   deadpool connection (feature `deadpool`) or a [`SingleConnection`]
//!   owned by a serverless invocation.
//! - [`Statements`]: the same typed query sent prepared and cached, or
//!   unnamed (behind a pooler that cannot keep prepared statements).
//!
//! ```
//! use chronicle_sql::{EVENT_COLUMNS, Xid8, is_plain_identifier};
//!
//! assert!(Xid8(7) < Xid8(8));
//! assert!(EVENT_COLUMNS.starts_with("event_id"));
//! assert!(is_plain_identifier("user_profile", 63));
//! ```
#![deny(missing_docs)]

mod connection;
mod row;
mod statements;
mod types;

pub use connection::{Connection, SingleConnection};
pub use row::{EVENT_COLUMNS, decode_event};
pub use statements::{Params, Statements};
pub use types::Xid8;

/// Whether `name` is a plain identifier of at most `max_len` bytes:
/// lowercase ASCII letters, digits and `_`, not starting with a digit.
/// Such a name can go into SQL text (a schema, a channel) unquoted.
///
/// ```
/// use chronicle_sql::is_plain_identifier;
/// assert!(is_plain_identifier("user_profile", 63));
/// assert!(!is_plain_identifier("User-Profile", 63));
/// assert!(!is_plain_identifier("x'; DROP TABLE events;--", 63));
/// ```
pub fn is_plain_identifier(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
