//! Expected versions for optimistic concurrency.

use std::fmt;
use std::str::FromStr;

/// What the writer expects the aggregate's current version to be.
///
/// Versions start at 1 for an aggregate's first event and are contiguous.
///
/// ```
/// use chronicle_core::ExpectedVersion;
///
/// assert_eq!("any".parse::<ExpectedVersion>().unwrap(), ExpectedVersion::Any);
/// assert_eq!("no-stream".parse::<ExpectedVersion>().unwrap(), ExpectedVersion::NoStream);
/// assert_eq!("7".parse::<ExpectedVersion>().unwrap(), ExpectedVersion::Exact(7));
/// assert!(ExpectedVersion::Exact(7).accepts(7));
/// assert!(!ExpectedVersion::NoStream.accepts(3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// The aggregate must have no events yet.
    NoStream,
    /// The aggregate's last event must have exactly this version.
    /// `Exact(0)` means the same as [`ExpectedVersion::NoStream`].
    Exact(u32),
    /// Append whatever the current version is (no concurrency check).
    Any,
}

impl ExpectedVersion {
    /// What a writer that read a stream up to `version` expects: no
    /// stream at 0, else exactly `version`.
    ///
    /// ```
    /// use chronicle_core::ExpectedVersion;
    ///
    /// assert_eq!(ExpectedVersion::after(0), ExpectedVersion::NoStream);
    /// assert_eq!(ExpectedVersion::after(3), ExpectedVersion::Exact(3));
    /// ```
    pub fn after(version: u32) -> Self {
        if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    }

    /// Whether an aggregate whose last version is `actual` (0 when it has no
    /// events) satisfies this expectation.
    pub fn accepts(self, actual: u32) -> bool {
        match self {
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(n) => actual == n,
            ExpectedVersion::Any => true,
        }
    }

    /// The version as the store encodes it: `None` for any, `Some(0)` for no
    /// stream, `Some(n)` for exact.
    pub fn as_option(self) -> Option<u32> {
        match self {
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(n) => Some(n),
            ExpectedVersion::Any => None,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::NoStream => f.write_str("no-stream"),
            ExpectedVersion::Exact(n) => write!(f, "{n}"),
            ExpectedVersion::Any => f.write_str("any"),
        }
    }
}

impl FromStr for ExpectedVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(ExpectedVersion::Any),
            "no-stream" | "none" => Ok(ExpectedVersion::NoStream),
            n => n.parse::<u32>().map(ExpectedVersion::Exact).map_err(|_| {
                format!("expected version `{s}` is not a number, `any` or `no-stream`")
            }),
        }
    }
}
