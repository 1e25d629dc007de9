//! Errors of connecting, migrating and talking to PostgreSQL.

/// A result whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong setting up or using the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connection setting is wrong.
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// The database could not be reached (after retrying).
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    /// A query failed.
    #[error("PostgreSQL error: {}{}", describe(.0), schema_hint(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("cannot get a database connection from the pool: {0}")]
    Pool(String),
    /// The database was migrated by a newer binary.
    #[error(
        "the database schema is at version {database}, newer than this binary knows ({binary}); upgrade chronicle"
    )]
    SchemaTooNew {
        /// The version recorded in the database.
        database: i32,
        /// The newest version this binary knows.
        binary: i32,
    },
    /// The database lacks migrations this binary needs.
    #[error(
        "the database schema is at version {database}, this binary needs {binary}; run `chronicle migrate`"
    )]
    SchemaTooOld {
        /// The version recorded in the database.
        database: i32,
        /// The version this binary needs.
        binary: i32,
    },
    /// A recorded migration's text differs from this binary's copy.
    #[error(
        "migration {version} ({name}) recorded in the database differs from this binary's; the schema was changed by another build: do not edit applied migrations, add a new one"
    )]
    MigrationChanged {
        /// The migration's version.
        version: i32,
        /// The migration's name.
        name: &'static str,
    },
    /// A migration's SQL failed; nothing of the run was applied.
    #[error("migration {version} ({name}) failed, nothing was applied: {}", describe(.source))]
    Migration {
        /// The migration's version.
        version: i32,
        /// The migration's name.
        name: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] chronicle_core::Error),
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::Postgres(e),
            other => Error::Pool(other.to_string()),
        }
    }
}

impl From<Error> for chronicle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(inner) => inner,
            other => chronicle_core::Error::Backend {
                message: other.to_string(),
                source: Some(Box::new(other)),
            },
        }
    }
}

/// What to do when a query names a table, column or function the database
/// lacks: the binary is ahead of the schema (the sealer and the appends
/// use the newest migration's columns and statements). Empty otherwise.
fn schema_hint(e: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState as S;
    match e.code() {
        Some(c)
            if [
                S::UNDEFINED_TABLE,
                S::UNDEFINED_COLUMN,
                S::UNDEFINED_FUNCTION,
            ]
            .contains(c) =>
        {
            "; the database schema is probably older than this binary: run `chronicle migrate` \
             (or chronicle_postgres::migrate) against this database"
        }
        _ => "",
    }
}

/// The database's own message (with detail and hint) when there is one;
/// tokio-postgres's top-level text is only "db error".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            if let Some(h) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(h);
            }
            if is_lost_prepared_statement(e) {
                s.push_str(
                    "; the connection goes through a pooler in transaction mode that cannot keep \
                     prepared statements (PgBouncer before 1.21, or without max_prepared_statements): \
                     add statement_cache=off to the database URL",
                );
            }
            s
        }
        None => {
            use std::error::Error as _;
            match e.source() {
                Some(src) => format!("{e}: {src}"),
                None => e.to_string(),
            }
        }
    }
}

/// Whether `e` says a named prepared statement was lost or clashes: a
/// statement prepared on one server connection and bound on another, or
/// prepared again on a server connection that has one of that name (a
/// pooler in transaction mode between us and the server). The statement was
/// not executed.
pub(crate) fn is_lost_prepared_statement(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let Some(db) = e.as_db_error() else {
        return false;
    };
    let code = db.code();
    let lost = *code == SqlState::INVALID_SQL_STATEMENT_NAME
        || *code == SqlState::DUPLICATE_PSTATEMENT
        || (*code == SqlState::PROTOCOL_VIOLATION && db.message().starts_with("bind message"));
    lost && db.message().contains("prepared statement")
}
