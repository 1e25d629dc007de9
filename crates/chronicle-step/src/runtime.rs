//! What the step needs from the runtime it runs in.

use std::future::Future;
use std::time::Duration;

use chronicle_sql::Connection;
use futures_util::future::BoxFuture;

use crate::Result;

/// Timers and randomness, from whatever runs the step: tokio in a native
/// process, the JavaScript host in a Worker. The step has no runtime of
/// its own.
///
/// ```
/// use std::time::Duration;
/// use chronicle_step::Runtime;
///
/// /// A runtime whose timers fire at once (for a test of logic, not time).
/// struct Instant;
///
/// impl Runtime for Instant {
///     fn sleep(&self, _: Duration) -> impl std::future::Future<Output = ()> {
///         std::future::ready(())
///     }
///
///     fn random(&self) -> f64 {
///         0.5
///     }
/// }
/// assert_eq!(Instant.random(), 0.5);
/// ```
pub trait Runtime: Sync {
    /// Completes after `duration`. A handler call that outlasts its timeout
    /// loses the race against this; a retry waits on it.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()>;

    /// A random number in `[0, 1]`, for the retries' jitter.
    fn random(&self) -> f64;
}

/// Where the step gets its connection, and gives it back.
///
/// A pool lends a connection per step; a serverless invocation owns one
/// and lends it again and again ([`OneConnection`]).
pub trait ConnectionSource: Send + Sync {
    /// A connection for one transaction.
    fn acquire(&self) -> BoxFuture<'_, Result<Box<dyn Connection>>>;

    /// Takes back a connection [`ConnectionSource::acquire`] lent, after its
    /// transaction ended. The default drops it (a pooled connection goes
    /// back to its pool).
    fn give_back(&self, conn: Box<dyn Connection>) {
        drop(conn);
    }
}

/// One connection, lent to one transaction at a time: what a serverless
/// invocation that opened a connection hands the step.
///
/// ```no_run
/// # async fn demo(client: tokio_postgres::Client) {
/// use chronicle_sql::SingleConnection;
/// use chronicle_step::OneConnection;
///
/// let source = OneConnection::new(SingleConnection::new(client));
/// // ... steps borrow it in turn ...
/// let client = source.into_inner();
/// # }
/// ```
pub struct OneConnection {
    slot: std::sync::Mutex<Option<Box<dyn Connection>>>,
}

impl OneConnection {
    /// Lends `conn`.
    pub fn new(conn: impl Connection + 'static) -> Self {
        OneConnection {
            slot: std::sync::Mutex::new(Some(Box::new(conn))),
        }
    }

    /// The connection, if no transaction holds it (and it was not
    /// discarded mid-transaction).
    pub fn into_inner(self) -> Option<Box<dyn Connection>> {
        self.slot.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for OneConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneConnection").finish_non_exhaustive()
    }
}

impl ConnectionSource for OneConnection {
    fn acquire(&self) -> BoxFuture<'_, Result<Box<dyn Connection>>> {
        let conn = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        Box::pin(async move {
            conn.ok_or_else(|| {
                crate::Error::Pool(
                    "the invocation's one connection is in use or was closed after a failure"
                        .to_owned(),
                )
            })
        })
    }

    fn give_back(&self, conn: Box<dyn Connection>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
    }
}
