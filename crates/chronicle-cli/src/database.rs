//! Which database a command talks to: `--database-url`, or the embedded
//! default cluster.

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
}

impl Database {
    /// `url` if given, else the embedded default cluster (started if it is
    /// not running).
    pub fn resolve(url: Option<&str>) -> Result<Database> {
        match url {
            Some(url) => Ok(Database {
                url: url.to_owned(),
                embedded: false,
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

    /// A connected pool.
    pub async fn pool(&self) -> Result<PgPool> {
        let options = PgOptions::from_url(&self.url)?;
        Ok(options.connect().await?)
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
        Ok(PgOptions::from_url(&self.url)?.statement_cache())
    }
}
