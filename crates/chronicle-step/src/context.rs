//! [`PgContext`]: what a handler gets to write its read model.

use std::sync::Arc;

use chronicle_sql::Connection;

use crate::Result;

/// The handler's context: a connection inside the step's transaction.
///
/// Everything a handler writes through [`PgContext::client`] commits in the
/// same transaction as the projection's checkpoint (exactly-once effect), or
/// not at all. Each event runs inside a savepoint, so a failed attempt's
/// writes are rolled back before the retry or the dead-lettering.
///
/// Use `query_typed`/`execute_typed` (unnamed statements) to stay safe behind
/// a transaction-mode pooler, and do not issue `BEGIN`, `COMMIT` or
/// `ROLLBACK` yourself.
pub struct PgContext {
    conn: Option<Box<dyn Connection>>,
    open: bool,
    projection: Arc<str>,
    partition: Option<u32>,
    worker: Arc<str>,
}

impl std::fmt::Debug for PgContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgContext")
            .field("projection", &self.projection)
            .field("partition", &self.partition)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl PgContext {
    /// Opens a transaction on `conn` for `projection` (a runtime's own
    /// work outside a step: a dead-letter replay, a rebuild).
    pub async fn begin(
        conn: Box<dyn Connection>,
        projection: Arc<str>,
        partition: Option<u32>,
        worker: Arc<str>,
    ) -> Result<Self> {
        let mut ctx = PgContext {
            conn: Some(conn),
            open: false,
            projection,
            partition,
            worker,
        };
        ctx.open = true;
        ctx.client().batch_execute("BEGIN").await?;
        Ok(ctx)
    }

    /// Takes `conn` for a transaction whose `BEGIN` the caller sends itself,
    /// pipelined with the transaction's first statement.
    pub(crate) fn deferred(
        conn: Box<dyn Connection>,
        projection: Arc<str>,
        partition: Option<u32>,
        worker: Arc<str>,
    ) -> Self {
        PgContext {
            conn: Some(conn),
            open: true,
            projection,
            partition,
            worker,
        }
    }

    /// The connection, for the runtime's cached statements.
    pub fn connection(&self) -> &dyn Connection {
        self.conn
            .as_deref()
            .expect("the connection is held until commit")
    }

    /// The connection, inside the step's transaction.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.connection().client()
    }

    /// The projection being run.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// The partition being processed (`None` outside a step, e.g. in the
    /// rebuild hook or a dead-letter retry of several partitions).
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// The worker running the step.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Says which partition the work is on (a replay that locked an
    /// aggregate's partition).
    pub fn set_partition(&mut self, partition: Option<u32>) {
        self.partition = partition;
    }

    /// Commits; the connection back, for more work or its pool.
    pub async fn commit(mut self) -> Result<Box<dyn Connection>> {
        self.client().batch_execute("COMMIT").await?;
        self.open = false;
        Ok(self
            .conn
            .take()
            .expect("the connection is held until commit"))
    }

    /// Rolls back; the connection back, unless the rollback failed (it is
    /// then discarded: it may still be inside the transaction).
    pub async fn rollback(mut self) -> Option<Box<dyn Connection>> {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.open = false;
            return self.conn.take();
        }
        None
    }

    /// Runs `sql` (no parameters) in the transaction.
    pub async fn exec(&self, sql: &str) -> Result<()> {
        Ok(self.client().batch_execute(sql).await?)
    }
}

impl Drop for PgContext {
    fn drop(&mut self) {
        if self.open {
            // Dropped mid-transaction (a cancelled task, a failed COMMIT):
            // never hand a connection with an open transaction on. Closing
            // it makes the server roll back.
            if let Some(conn) = self.conn.take() {
                conn.discard();
            }
        }
    }
}
