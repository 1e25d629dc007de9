//! Which database a command talks to: `--database-url`, or the embedded
//! default cluster.

use std::time::Duration;

use anyhow::{Context, Result};
use chronicle_embedded::EmbeddedPostgres;
use chronicle_postgres::{PgEventStore, PgOptions, PgPool, ensure_schema};

/// A resolved database: its URL and, lazily, a pool.
#[derive(Debug, Clone)]
pub struct Database {
    /// The URL connected to.
    pub url: String,
    /// Whether it is the embedded default cluster.
    pub embedded: bool,
    /// `--connect-timeout`: how long connecting may take (default: the
    /// URL's `connect_timeout`, else 5 s for a command, or 30 s
    /// for a [`Database::worker`]).
    pub connect_timeout: Option<Duration>,
    /// Whether a long-running worker uses it (`projections run`): then
    /// connecting keeps retrying for 30 s by default, warning each time.
    pub worker: bool,
}

/// How long an interactive command waits for the database by default.
pub const INTERACTIVE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Database {
    /// `url` if given, else the embedded default cluster (started if it is
    /// not running).
    pub fn resolve(url: Option<&str>) -> Result<Database> {
        match url {
            Some(url) => Ok(Database {
                url: url.to_owned(),
                embedded: false,
                connect_timeout: None,
                worker: false,
            }),
            None => {
                let dir = EmbeddedPostgres::default_dir();
                let pg = EmbeddedPostgres::start(&dir).with_context(|| {
                    format!(
                        "no DATABASE_URL given, and the embedded PostgreSQL in {} could not start",
                        dir.display()
                    )
                })?;
                Ok(Database {
                    url: pg.url(),
                    embedded: true,
                    connect_timeout: None,
                    worker: false,
                })
            }
        }
    }

    /// Where the database is, for logs: hosts, ports and database name,
    /// never the user or password.
    pub fn describe(&self) -> String {
        let Ok(options) = PgOptions::from_url(&self.url) else {
            return "an unparsable URL".to_owned();
        };
        let config = options.config();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        format!(
            "{}{} port {} database {}",
            if self.embedded {
                "the embedded cluster at "
            } else {
                ""
            },
            hosts.join(","),
            ports.join(","),
            config.get_dbname().unwrap_or("(default)")
        )
    }

    /// The connection settings: the URL's, with the connect timeout this
    /// command waits ([`Database::connect_timeout`]). Interactive commands
    /// log retries at `debug` and fail with one line; workers warn on each.
    pub fn options(&self) -> Result<PgOptions> {
        let mut options = PgOptions::from_url(&self.url)?;
        match (self.connect_timeout, options.connect_timeout_in_url()) {
            (Some(timeout), _) => {
                options.connect_timeout(timeout);
            }
            (None, Some(_)) => {}
            (None, None) if self.worker => {}
            (None, None) => {
                options.connect_timeout(INTERACTIVE_CONNECT_TIMEOUT);
            }
        }
        options.retry_warnings(self.worker);
        Ok(options)
    }

    /// A connected pool.
    pub async fn pool(&self) -> Result<PgPool> {
        Ok(self.options()?.connect().await?)
    }

    /// A store on a schema at this binary's version.
    pub async fn store(&self) -> Result<PgEventStore> {
        let pool = self.pool().await?;
        let client = pool.get().await.map_err(chronicle_postgres::Error::from)?;
        ensure_schema(&**client).await?;
        drop(client);
        let mut store = PgEventStore::new(pool);
        store.statement_cache(self.statement_cache()?);
        Ok(store)
    }

    /// Whether connections may keep prepared statements: the URL's
    /// `statement_cache`, on unless it says off.
    pub fn statement_cache(&self) -> Result<bool> {
        Ok(self.options()?.statement_cache())
    }
}
