//! Statements sent prepared and kept per connection, or unnamed.
//!
//! A prepared statement is parsed and planned once per connection; an
//! unnamed one on every call. Behind a pooler in transaction mode that
//! cannot keep prepared statements (PgBouncer before 1.21), only unnamed
//! statements work: [`Statements`] sends the same typed query either way,
//! as the store's `statement_cache` setting says.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, Row, RowStream};

use crate::Connection;

/// Typed queries on a [`Connection`], prepared and cached per connection
/// when `cache` is on, else sent unnamed.
///
/// ```no_run
/// # async fn demo(conn: &dyn chronicle_sql::Connection) -> Result<(), Box<dyn std::error::Error>> {
/// use chronicle_sql::Statements;
/// use tokio_postgres::types::Type;
///
/// let statements = Statements::new(true);
/// let row = statements
///     .query_one(conn, "SELECT count(*) FROM events WHERE aggregate_type = $1", &[(&"user", Type::TEXT)])
///     .await?;
/// let count: i64 = row.get(0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statements {
    cache: bool,
}

/// Typed parameters: each value with its PostgreSQL type.
pub type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

impl Statements {
    /// Prepared and cached when `cache`, else unnamed.
    pub fn new(cache: bool) -> Self {
        Statements { cache }
    }

    /// The one row of `sql`; an error when there is none or more.
    pub async fn query_one(
        &self,
        conn: &dyn Connection,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Row, Error> {
        if !self.cache {
            return conn.client().query_typed_one(sql, params).await;
        }
        let statement = conn.prepare_cached(sql, &types(params)).await?;
        conn.client().query_one(&statement, &values(params)).await
    }

    /// The row of `sql`, if any; an error when there are more.
    pub async fn query_opt(
        &self,
        conn: &dyn Connection,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, Error> {
        if !self.cache {
            return conn.client().query_typed_opt(sql, params).await;
        }
        let statement = conn.prepare_cached(sql, &types(params)).await?;
        conn.client().query_opt(&statement, &values(params)).await
    }

    /// The rows of `sql` as a stream, decoded as they arrive.
    pub async fn query_raw(
        &self,
        conn: &dyn Connection,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<RowStream, Error> {
        if !self.cache {
            return conn
                .client()
                .query_typed_raw(sql, params.iter().map(|(v, t)| (*v, t.clone())))
                .await;
        }
        let statement = conn.prepare_cached(sql, &types(params)).await?;
        conn.client().query_raw(&statement, values(params)).await
    }

    /// The number of rows `sql` changed.
    pub async fn execute(
        &self,
        conn: &dyn Connection,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<u64, Error> {
        if !self.cache {
            return conn.client().execute_typed(sql, params).await;
        }
        let statement = conn.prepare_cached(sql, &types(params)).await?;
        conn.client().execute(&statement, &values(params)).await
    }
}

fn types(params: &Params<'_>) -> Vec<Type> {
    params.iter().map(|(_, t)| t.clone()).collect()
}

fn values<'a>(params: &'a Params<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|(v, _)| *v).collect()
}
