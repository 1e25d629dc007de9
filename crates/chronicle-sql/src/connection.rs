//! [`Connection`]: a client and its prepared-statement cache.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Error, Statement};

/// One PostgreSQL connection: its client, and statements prepared on it
/// once and kept.
///
/// A native runtime hands out pooled connections (deadpool's, feature
/// `deadpool`), whose cache outlives one unit of work; a serverless
/// invocation owns one connection for its length ([`SingleConnection`]).
pub trait Connection: Send + Sync {
    /// The client.
    fn client(&self) -> &Client;

    /// `sql` with parameters of `types`, prepared on this connection the
    /// first time and taken from its cache after that.
    fn prepare_cached<'a>(
        &'a self,
        sql: &'a str,
        types: &'a [Type],
    ) -> BoxFuture<'a, Result<Statement, Error>>;

    /// Gives the connection up when it may be inside a transaction (a unit
    /// of work dropped midway): it must not be used again. The default
    /// drops it, which closes an owned client; a pooled one is detached
    /// from its pool and closed, so that the server rolls back.
    fn discard(self: Box<Self>) {}
}

impl std::fmt::Debug for dyn Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

#[cfg(feature = "deadpool")]
impl Connection for deadpool_postgres::Object {
    fn client(&self) -> &Client {
        self
    }

    fn prepare_cached<'a>(
        &'a self,
        sql: &'a str,
        types: &'a [Type],
    ) -> BoxFuture<'a, Result<Statement, Error>> {
        Box::pin(self.prepare_typed_cached(sql, types))
    }

    fn discard(self: Box<Self>) {
        drop(deadpool_postgres::Object::take(*self));
    }
}

/// A client owned by one unit of work (a serverless invocation), with a
/// statement cache of its own for as long as it lives.
///
/// ```no_run
/// # async fn demo(client: tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
/// use chronicle_sql::{Connection, SingleConnection};
/// use tokio_postgres::types::Type;
///
/// let conn = SingleConnection::new(client);
/// // Parsed and planned on the server once; the second call is the cache's.
/// let statement = conn.prepare_cached("SELECT $1::int8", &[Type::INT8]).await?;
/// let again = conn.prepare_cached("SELECT $1::int8", &[Type::INT8]).await?;
/// let row = conn.client().query_one(&again, &[&7i64]).await?;
/// assert_eq!(row.get::<_, i64>(0), 7);
/// # drop(statement);
/// # Ok(()) }
/// ```
pub struct SingleConnection {
    client: Client,
    cache: Mutex<HashMap<(String, Vec<Type>), Statement>>,
}

impl SingleConnection {
    /// Wraps `client`.
    pub fn new(client: Client) -> Self {
        SingleConnection {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The client back (its cached statements are closed with it or stay
    /// prepared on it).
    pub fn into_inner(self) -> Client {
        self.client
    }
}

impl std::fmt::Debug for SingleConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleConnection").finish_non_exhaustive()
    }
}

impl Connection for SingleConnection {
    fn client(&self) -> &Client {
        &self.client
    }

    fn prepare_cached<'a>(
        &'a self,
        sql: &'a str,
        types: &'a [Type],
    ) -> BoxFuture<'a, Result<Statement, Error>> {
        Box::pin(async move {
            let key = (sql.to_owned(), types.to_vec());
            if let Some(statement) = self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                return Ok(statement.clone());
            }
            let statement = self.client.prepare_typed(sql, types).await?;
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, statement.clone());
            Ok(statement)
        })
    }
}
