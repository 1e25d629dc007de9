//! Positions in the global feed.

use std::fmt;
use std::str::FromStr;

/// A place in the global feed: the pair `(transaction_id, global_position)`.
///
/// The feed is ordered by this pair, and only rows of transactions older than
/// every transaction still in flight are handed out, so a reader that resumes
/// after a `Position` never skips an event of a transaction that committed
/// late. Its string form is an opaque, resumable checkpoint.
///
/// ```
/// use chronicle_core::Position;
///
/// let p = Position::new(812, 42);
/// let s = p.to_string();
/// assert_eq!(s.parse::<Position>().unwrap(), p);
/// assert!(Position::START < p);
/// ```
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    /// The id (`xid8`) of the transaction that wrote the event.
    pub transaction_id: u64,
    /// The event's `global_position`.
    pub global_position: i64,
}

impl Position {
    /// Before the first event: reading after `START` reads the whole feed.
    pub const START: Position = Position {
        transaction_id: 0,
        global_position: 0,
    };

    /// A position from its two parts.
    pub fn new(transaction_id: u64, global_position: i64) -> Self {
        Position {
            transaction_id,
            global_position,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.transaction_id, self.global_position)
    }
}

/// A checkpoint string that is not of the form `XID-POSITION`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a feed checkpoint: expected TRANSACTION-POSITION as printed by a read, e.g. 812-42 (0-0 is the start)"
)]
pub struct PositionParseError(pub String);

impl FromStr for Position {
    type Err = PositionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PositionParseError(s.to_owned());
        let (x, p) = s.split_once('-').ok_or_else(err)?;
        Ok(Position {
            transaction_id: x.parse().map_err(|_| err())?,
            global_position: p.parse().map_err(|_| err())?,
        })
    }
}
