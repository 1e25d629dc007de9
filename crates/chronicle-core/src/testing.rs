//! A given/when/then harness for aggregates, with no database.
//!
//! ```
//! use chronicle_core::testing::AggregateTest;
//! use chronicle_core::{Aggregate, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum E { Opened {}, Closed {} }
//! impl DomainEvent for E {}
//!
//! #[derive(Debug, thiserror::Error, PartialEq)]
//! #[error("already closed")]
//! struct AlreadyClosed;
//!
//! #[derive(Default)]
//! struct Door { closed: bool }
//! impl Aggregate for Door {
//!     const TYPE: &'static str = "door";
//!     type Event = E;
//!     type Command = ();
//!     type Error = AlreadyClosed;
//!     fn apply(&mut self, e: E) { self.closed = matches!(e, E::Closed {}); }
//!     fn handle(&self, _: ()) -> Result<Vec<E>, AlreadyClosed> {
//!         if self.closed { Err(AlreadyClosed) } else { Ok(vec![E::Closed {}]) }
//!     }
//! }
//!
//! AggregateTest::<Door>::given(vec![E::Opened {}]).when(()).then_expect_events(vec![E::Closed {}]);
//! AggregateTest::<Door>::given(vec![E::Closed {}]).when(()).then_expect_error(AlreadyClosed);
//! ```

use std::fmt::Debug;

use crate::Aggregate;

/// Given past events, when a command is handled, then expect events or an
/// error. Panics with a readable message when the expectation fails.
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

/// The outcome of [`AggregateTest::when`], to be checked.
pub struct AggregateResult<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts from the state folded from `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for e in events {
            state.apply(e);
        }
        AggregateTest { state }
    }

    /// Starts from a fresh aggregate.
    pub fn given_no_previous_events() -> Self {
        Self::given(Vec::new())
    }

    /// Handles `command` against the given state.
    pub fn when(self, command: A::Command) -> AggregateResult<A> {
        AggregateResult {
            result: self.state.handle(command),
        }
    }
}

impl<A: Aggregate> AggregateResult<A>
where
    A::Event: Debug + PartialEq,
    A::Error: Debug,
{
    /// Asserts the command produced exactly these events.
    pub fn then_expect_events(self, expected: Vec<A::Event>) {
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the command produced other events"),
            Err(e) => panic!("expected events {expected:?}, the command failed with {e:?}"),
        }
    }

    /// Asserts the command failed with this error.
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, the command produced {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command failed with another error"),
        }
    }

    /// The raw outcome, for assertions of your own.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}
