//! Test harness: one PostgreSQL cluster per test process, a fresh
//! database per test (enabled by the `testing` feature).
//!
//! With `CHRONICLE_TEST_DATABASE_URL` (or `DATABASE_URL`) set, tests use that
//! server; otherwise a throwaway embedded cluster is started once per process
//! and stopped when the process exits. Each test gets a new database cloned
//! from a migrated template, so tests never see each other's events.
//! [`fresh_db_via_pgbouncer`] routes the connections through a PgBouncer in
//! transaction-pooling mode started for this process.
//!
//! ```no_run
//! # async fn demo() {
//! use chronicle_postgres::testing::fresh_db;
//!
//! let db = fresh_db().await;
//! // db.store, db.pool and db.url point at a database of this test's own.
//! # }
//! ```
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

use crate::{MigrateOptions, PgEventStore, PgOptions, PgPool, migrate};
use chronicle_embedded::EmbeddedPostgres;

struct Cluster {
    admin_url: String,
    template: String,
    embedded: Option<EmbeddedPostgres>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static PGBOUNCER: OnceLock<Result<u16, String>> = OnceLock::new();
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

extern "C" fn stop_at_exit() {
    if let Ok(mut children) = CHILDREN.lock() {
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("chronicle-pgbouncer-{}", std::process::id())),
        );
    }
    if let Some(cluster) = CLUSTER.get() {
        match &cluster.embedded {
            Some(pg) => {
                let _ = EmbeddedPostgres::reset(pg.cluster_dir());
            }
            None => {
                let url = cluster.admin_url.clone();
                let prefix = format!("chronicle_test_{}_", std::process::id());
                let _ = std::thread::spawn(move || {
                    runtime().block_on(async move {
                        let pool = pool_for(&url, None);
                        let Ok(client) = pool.get().await else { return };
                        let Ok(rows) = client
                            .query(
                                "SELECT datname FROM pg_database WHERE datname LIKE $1 || '%'",
                                &[&prefix],
                            )
                            .await
                        else {
                            return;
                        };
                        for row in rows {
                            let name: String = row.get(0);
                            let _ = client
                                .batch_execute(&format!(
                                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                                ))
                                .await;
                        }
                    })
                })
                .join();
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn pool_for(url: &str, database: Option<&str>) -> PgPool {
    let mut options = PgOptions::from_url(url).expect("test database URL parses");
    if let Some(db) = database {
        options.config_mut().dbname(db);
    }
    options.max_connections(40);
    options.pool().expect("pool builds")
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        std::thread::spawn(|| {
            let (admin_url, embedded) = match std::env::var("CHRONICLE_TEST_DATABASE_URL")
                .or_else(|_| std::env::var("DATABASE_URL"))
            {
                Ok(url) => (url, None),
                Err(_) => {
                    let pg = EmbeddedPostgres::throwaway().expect("start a throwaway PostgreSQL");
                    (pg.url(), Some(pg))
                }
            };
            // SAFETY: registers a plain `extern "C"` function with no arguments.
            unsafe { libc::atexit(stop_at_exit) };
            let template = format!("chronicle_test_{}_template", std::process::id());
            runtime().block_on(async {
                let admin = pool_for(&admin_url, None);
                let client = admin.get().await.expect("connect to the test server");
                client
                    .batch_execute(&format!("CREATE DATABASE \"{template}\""))
                    .await
                    .expect("create the template database");
                drop(client);
                let pool = pool_for(&admin_url, Some(&template));
                migrate(&pool, MigrateOptions::default())
                    .await
                    .expect("migrate the template");
                pool.close();
            });
            Cluster {
                admin_url,
                template,
                embedded,
            }
        })
        .join()
        .expect("test cluster setup")
    })
}

/// A fresh, migrated database of its own.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// A pool on it.
    pub pool: PgPool,
    /// The store on it.
    pub store: PgEventStore,
    /// A URL for it (for the CLI).
    pub url: String,
}

impl TestDb {
    /// A URL for this database over TCP on loopback, for clients that
    /// speak only TCP (a Worker in workerd): a port forwarding to the
    /// throwaway cluster's Unix socket, for as long as the test process
    /// runs. The password is a placeholder (the cluster trusts local
    /// connections; some clients need one).
    pub async fn tcp_url(&self) -> String {
        let config: tokio_postgres::Config = self.url.parse().expect("the test URL parses");
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let socket = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Unix(dir)), Some(port)) => {
                dir.join(format!(".s.PGSQL.{port}"))
            }
            // Already on TCP (DATABASE_URL): use it as it is.
            _ => return self.url.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("a bound port").port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                });
            }
        });
        format!("postgresql://{user}:unused@127.0.0.1:{port}/{}", self.name)
    }

    /// A store over another pool on this database, with the statement
    /// cache as the URL says (off through PgBouncer).
    pub fn store_on(&self, pool: PgPool) -> PgEventStore {
        store_on(&self.url, pool)
    }
}

async fn create_database(template: Option<&str>) -> String {
    let c = cluster();
    let name = format!(
        "chronicle_test_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let admin = pool_for(&c.admin_url, None);
    let client = admin.get().await.expect("connect to the test server");
    let sql = match template {
        Some(t) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\" STRATEGY FILE_COPY"),
        None => format!("CREATE DATABASE \"{name}\""),
    };
    client
        .batch_execute(&sql)
        .await
        .expect("create test database");
    admin.close();
    name
}

fn url_for(database: &str) -> String {
    let c = cluster();
    let mut config: tokio_postgres::Config = c.admin_url.parse().expect("admin URL parses");
    config.dbname(database);
    to_url(&config, None)
}

fn to_url(config: &tokio_postgres::Config, via: Option<u16>) -> String {
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    if let Some(port) = via {
        // PgBouncer 1.18 (Debian 12's) cannot keep prepared statements in
        // transaction mode.
        return format!(
            "postgresql://{user}@127.0.0.1:{port}/{db}?sslmode=disable&statement_cache=off"
        );
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Unix(dir)) => format!(
            "postgresql://{user}@/{db}?host={}&port={port}",
            dir.display()
        ),
        Some(tokio_postgres::config::Host::Tcp(h)) => {
            let password = config
                .get_password()
                .map(|p| format!(":{}", String::from_utf8_lossy(p)))
                .unwrap_or_default();
            format!("postgresql://{user}{password}@{h}:{port}/{db}")
        }
        None => format!("postgresql://{user}@localhost:{port}/{db}"),
    }
}

/// A fresh database with the schema migrated.
pub async fn fresh_db() -> TestDb {
    let name = create_database(Some(&cluster().template)).await;
    let url = url_for(&name);
    open(name, url)
}

/// A fresh database with no schema at all.
pub async fn empty_db() -> TestDb {
    let name = create_database(None).await;
    let url = url_for(&name);
    open(name, url)
}

/// A fresh migrated database, reached through PgBouncer in transaction
/// pooling mode.
pub async fn fresh_db_via_pgbouncer() -> TestDb {
    let name = create_database(Some(&cluster().template)).await;
    let port = pgbouncer_port();
    let config: tokio_postgres::Config = cluster().admin_url.parse().expect("admin URL parses");
    let mut config = config.clone();
    config.dbname(&name);
    let url = to_url(&config, Some(port));
    open(name, url)
}

fn open(name: String, url: String) -> TestDb {
    let pool = pool_for(&url, None);
    let store = store_on(&url, pool.clone());
    TestDb {
        name,
        pool,
        store,
        url,
    }
}

/// A store over `pool` with the statement cache as `url` says.
fn store_on(url: &str, pool: PgPool) -> PgEventStore {
    let mut store = PgEventStore::new(pool);
    store.statement_cache(
        PgOptions::from_url(url)
            .expect("test database URL parses")
            .statement_cache(),
    );
    store
}

fn pgbouncer_port() -> u16 {
    PGBOUNCER
        .get_or_init(start_pgbouncer)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn start_pgbouncer() -> Result<u16, String> {
    let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("pgbouncer is not installed: apt-get install pgbouncer (the .ci/run script does)")?;
    let config: tokio_postgres::Config = cluster().admin_url.parse().map_err(|e| format!("{e}"))?;
    let (host, port) = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Unix(dir)) => (
            dir.display().to_string(),
            config.get_ports().first().copied().unwrap_or(5432),
        ),
        Some(tokio_postgres::config::Host::Tcp(h)) => (
            h.clone(),
            config.get_ports().first().copied().unwrap_or(5432),
        ),
        None => ("127.0.0.1".to_owned(), 5432),
    };
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let listen_port = listen.local_addr().map_err(|e| e.to_string())?.port();
    drop(listen);
    let dir = std::env::temp_dir().join(format!("chronicle-pgbouncer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n"))
        .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen_port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = transaction\nmax_client_conn = 1000\n\
             default_pool_size = 20\nignore_startup_parameters = extra_float_digits,options\nlogfile = {}\n",
            dir.join("userlist.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut command = Command::new(&binary);
    if as_root {
        // pgbouncer refuses to run as root; -u drops to the postgres user.
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres")
            .arg(&dir)
            .status();
        command.args(["-u", "postgres"]);
    }
    let child = command
        .arg(dir.join("pgbouncer.ini"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start pgbouncer: {e}"))?;
    CHILDREN.lock().expect("children lock").push(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_ok() {
            return Ok(listen_port);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(format!(
        "pgbouncer did not start listening on 127.0.0.1:{listen_port}; see {}",
        dir.join("pgbouncer.log").display()
    ))
}

/// Every event id stored in the database, for "nothing was stored" checks.
pub async fn event_count(db: &TestDb) -> i64 {
    let client = db.pool.get().await.expect("connect");
    client
        .query_typed_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count events")
        .get(0)
}

/// Reads the whole feed until `expected` events have arrived. Open
/// transactions of other tests on the cluster hold the feed's horizon back
/// for a moment (xids are cluster-wide), so this waits, up to 30 s, then
/// checks nothing more follows.
pub async fn read_feed(
    store: &PgEventStore,
    expected: usize,
) -> Vec<chronicle_core::EventEnvelope> {
    use chronicle_core::{EventReader, Position};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut after = Position::START;
    let mut events = Vec::new();
    while events.len() < expected {
        let batch = store.read_all(after, 1000).await.expect("read the feed");
        if batch.events.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the feed stalled at {after} with {} of {expected} events",
                events.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        after = batch.next;
        events.extend(batch.events);
    }
    let rest = store.read_all(after, 1000).await.expect("read the feed");
    assert!(
        rest.events.is_empty(),
        "more events than expected: {}",
        events.len() + rest.events.len()
    );
    events
}

/// Paths of the files [`make_test_certificates`] writes.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    /// The certificate authority (PEM), for `sslrootcert` or a client's roots.
    pub ca: PathBuf,
    /// The server certificate for `localhost` and `127.0.0.1` (PEM), signed by the CA.
    pub cert: PathBuf,
    /// The server's private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// Makes a certificate authority and a server certificate for `localhost`
/// and `127.0.0.1` signed by it, in `dir`, with the `openssl` command (the
/// CI script installs it). For tests of TLS against local servers.
pub fn make_test_certificates(dir: &std::path::Path) -> TestCertificates {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write the certificate extensions");
    let subject_ca = "/CN=chronicle test CA";
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", subject_ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("restrict the key's permissions");
    }
    TestCertificates {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    }
}
