//! Neon-ready connections: TLS by `sslmode`, a pool, and connection retries.
//!
//! Settings come from a libpq-style URL or key/value string. `sslmode`
//! follows libpq: `disable`, `prefer` (TLS when offered, unverified),
//! `require` (TLS, unverified unless `sslrootcert` is given), `verify-ca`
//! (chain checked), `verify-full` (chain and host name checked). Roots come
//! from `sslrootcert` or, without it, from the system store.
//!
//! Connecting retries with exponential backoff and jitter while the server
//! is unreachable or starting up (a Neon compute waking from scale-to-zero),
//! up to [`PgOptions::connect_timeout`]: 30 s by default, or the URL's
//! `connect_timeout` (seconds, as libpq reads it). A Neon compute scaled to
//! zero usually wakes within a few seconds; give short-lived clients
//! `connect_timeout=15` or more in the URL to cover a cold start.
//! Checkouts from the pool do not ping.
//! Appends keep prepared statements on their connections unless the URL says
//! `statement_cache=off`; with it off, every statement is sent unnamed, so
//! the store works behind any pooler in transaction mode (PgBouncer before
//! 1.21 included). Neon's pooler and PgBouncer 1.21+ with
//! `max_prepared_statements` keep prepared statements themselves.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Connect, Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime,
};
use futures_util::future::BoxFuture;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Error, Result};

/// A pool of PostgreSQL connections.
pub type PgPool = Pool;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, without verification (libpq's default).
    Prefer,
    /// TLS always; the certificate is verified only when `sslrootcert` is set.
    Require,
    /// TLS, the certificate chain verified, not the host name.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Connection settings: where, how securely, how many, how patiently.
///
/// ```
/// use chronicle_postgres::{PgOptions, SslMode};
///
/// let mut options = PgOptions::from_url(
///     "postgres://app@db.example.com/app?sslmode=verify-full",
/// ).unwrap();
/// options.max_connections(32);
/// assert_eq!(options.ssl_mode(), SslMode::VerifyFull);
/// ```
#[derive(Debug, Clone)]
pub struct PgOptions {
    config: Config,
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
    statement_cache: bool,
    max_connections: usize,
    connect_timeout: Duration,
    connect_timeout_in_url: Option<Duration>,
    retry_warnings: bool,
}

impl PgOptions {
    /// Parses a `postgres://` URL or a libpq key/value string.
    pub fn from_url(url: &str) -> Result<Self> {
        let (rest, own) = split_own_params(url)?;
        let OwnParams {
            ssl_mode,
            ssl_root_cert,
            statement_cache,
        } = own;
        let mut config = Config::from_str(&rest).map_err(|e| {
            Error::Config(format!(
                "cannot parse the database URL ({e}); expected e.g. postgres://user:password@host:5432/dbname?sslmode=require"
            ))
        })?;
        // As libpq: sslmode does not apply to Unix-domain sockets.
        let unix_only = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        let ssl_mode = if unix_only {
            SslMode::Disable
        } else {
            ssl_mode
        };
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let connect_timeout_in_url = config.get_connect_timeout().copied();
        if config.get_application_name().is_none() {
            config.application_name("chronicle");
        }
        Ok(PgOptions {
            config,
            ssl_mode,
            ssl_root_cert,
            statement_cache,
            max_connections: 16,
            connect_timeout: connect_timeout_in_url.unwrap_or(Duration::from_secs(30)),
            connect_timeout_in_url,
            retry_warnings: true,
        })
    }

    /// The TLS mode in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Whether the store may keep prepared statements on its connections:
    /// the URL's `statement_cache=on|off`, on by default. Set it off behind
    /// a pooler in transaction mode that cannot keep prepared statements
    /// (PgBouncer before 1.21, or later without `max_prepared_statements`);
    /// then every statement is sent unnamed. Neon's pooler keeps them.
    ///
    /// ```
    /// use chronicle_postgres::PgOptions;
    ///
    /// let options = PgOptions::from_url("postgres://app@pooler:6432/app?statement_cache=off").unwrap();
    /// assert!(!options.statement_cache());
    /// ```
    pub fn statement_cache(&self) -> bool {
        self.statement_cache
    }

    /// The parsed tokio-postgres configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The parsed configuration, to change (e.g. the database name).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The pool's size (default 16).
    pub fn max_connections(&mut self, n: usize) -> &mut Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long to keep retrying while the database is unreachable or
    /// starting: the URL's `connect_timeout` (seconds) when it has one, else
    /// 30 s. A Neon compute scaled to zero usually wakes within a few
    /// seconds. One attempt waits at most 10 s of it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chronicle_postgres::PgOptions;
    ///
    /// let mut options = PgOptions::from_url("postgres://app@db/app?connect_timeout=15").unwrap();
    /// assert_eq!(options.get_connect_timeout(), Duration::from_secs(15));
    /// options.connect_timeout(Duration::from_secs(3));
    /// assert_eq!(options.get_connect_timeout(), Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = timeout;
        self
    }

    /// The time connecting may take ([`PgOptions::connect_timeout`]).
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The URL's own `connect_timeout`, if it has one.
    pub fn connect_timeout_in_url(&self) -> Option<Duration> {
        self.connect_timeout_in_url
    }

    /// Whether each retry of a connection is logged as a warning (default
    /// on, for long-running workers); off, retries are logged at `debug`
    /// and only the final error speaks (for interactive commands).
    pub fn retry_warnings(&mut self, on: bool) -> &mut Self {
        self.retry_warnings = on;
        self
    }

    /// Where connections go, for messages: `host:port` of each host.
    pub fn address(&self) -> String {
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match h {
                    tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                    tokio_postgres::config::Host::Unix(dir) => {
                        format!("{}/.s.PGSQL.{port}", dir.display())
                    }
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Builds the pool; connections are opened on first use.
    pub fn pool(&self) -> Result<PgPool> {
        let connector = RetryingConnect {
            tls: self.tls()?,
            deadline: self.connect_timeout,
            warn: self.retry_warnings,
        };
        self.pool_with(connector)
    }

    /// Builds the pool over a connector of your own (e.g. one that wraps
    /// the socket to count protocol round trips).
    pub fn pool_with(&self, connect: impl Connect + 'static) -> Result<PgPool> {
        let manager = Manager::from_connect(
            self.config.clone(),
            connect,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.max_connections)
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// Builds the pool and opens one connection, waiting (with retries) for
    /// the database to accept it.
    pub async fn connect(&self) -> Result<PgPool> {
        let pool = self.pool()?;
        let started = Instant::now();
        drop(pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => Error::Connect(format!(
                "{} (at {}, gave up after {:.1} s); check that the server runs and listens on \
                 that host and port, the host, port and credentials in the URL, firewalls, and \
                 sslmode; a database waking from scale-to-zero may need a longer connect_timeout \
                 (seconds) in the URL",
                crate::error::describe(&e),
                self.address(),
                started.elapsed().as_secs_f64()
            )),
            other => Error::Pool(other.to_string()),
        })?);
        Ok(pool)
    }

    pub(crate) fn tls(&self) -> Result<Tls> {
        if self.ssl_mode == SslMode::Disable {
            return Ok(Tls::None);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?;
        let verify = match (self.ssl_mode, &self.ssl_root_cert) {
            (SslMode::Prefer | SslMode::Require, None) => None,
            (SslMode::VerifyFull, _) => Some(true),
            _ => Some(false),
        };
        let config = match verify {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                .with_no_client_auth(),
            Some(check_host) => {
                let roots = Arc::new(self.roots()?);
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| Error::Config(format!("TLS root certificates: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(WebPki { inner, check_host }))
                    .with_no_client_auth()
            }
        };
        Ok(Tls::Rustls(MakeRustlsConnect::new(config)))
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.ssl_root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| {
                        Error::Config(format!(
                            "cannot read sslrootcert {}: {e}; point it at a PEM file of CA certificates",
                            path.display()
                        ))
                    })?;
                roots.add_parsable_certificates(certs);
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        if roots.is_empty() {
            return Err(Error::Config(
                "no trusted root certificates: install ca-certificates or set sslrootcert".into(),
            ));
        }
        Ok(roots)
    }
}

/// The settings chronicle reads itself, taken out of the URL before
/// tokio-postgres parses the rest: `sslmode` and `sslrootcert`
/// (tokio-postgres knows neither verify mode nor root files) and
/// `statement_cache`.
struct OwnParams {
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
    statement_cache: bool,
}

fn split_own_params(url: &str) -> Result<(String, OwnParams)> {
    let mut own = OwnParams {
        ssl_mode: SslMode::Prefer,
        ssl_root_cert: None,
        statement_cache: true,
    };
    let mut take = |key: &str, value: &str, decode: bool| -> Result<bool> {
        match key {
            "sslmode" => own.ssl_mode = value.parse()?,
            "sslrootcert" => {
                own.ssl_root_cert = Some(PathBuf::from(if decode {
                    percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .into_owned()
                } else {
                    value.to_owned()
                }))
            }
            "statement_cache" => {
                own.statement_cache = match value {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    other => {
                        return Err(Error::Config(format!(
                            "statement_cache `{other}` is not on or off; use off behind a pooler in transaction mode that cannot keep prepared statements"
                        )));
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let taken = match pair.split_once('=') {
                        Some((k, v)) => take(k, v, true)?,
                        None => false,
                    };
                    if !taken {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            let taken = match token.split_once('=') {
                Some((k, v)) => take(k, v, false)?,
                None => false,
            };
            if !taken {
                kept.push(token);
            }
        }
        kept.join(" ")
    };
    Ok((rest, own))
}

pub(crate) enum Tls {
    None,
    Rustls(MakeRustlsConnect),
}

/// Opens connections, retrying with exponential backoff and jitter while
/// the server is unreachable or starting.
struct RetryingConnect {
    tls: Tls,
    deadline: Duration,
    warn: bool,
}

impl Connect for RetryingConnect {
    fn connect(
        &self,
        config: &Config,
    ) -> BoxFuture<'_, std::result::Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let mut config = config.clone();
        Box::pin(async move {
            let started = Instant::now();
            let mut delay = Duration::from_millis(100);
            loop {
                // One attempt waits at most 10 s, and never past the deadline.
                let left = self.deadline.saturating_sub(started.elapsed());
                config.connect_timeout(
                    left.clamp(Duration::from_millis(100), Duration::from_secs(10)),
                );
                let attempt = match &self.tls {
                    Tls::None => config
                        .connect(NoTls)
                        .await
                        .map(|(c, conn)| (c, spawn(conn))),
                    Tls::Rustls(tls) => config
                        .connect(tls.clone())
                        .await
                        .map(|(c, conn)| (c, spawn(conn))),
                };
                match attempt {
                    Ok(ok) => return Ok(ok),
                    Err(e) if is_transient(&e) && started.elapsed() + delay < self.deadline => {
                        if self.warn {
                            tracing::warn!(error = %crate::error::describe(&e), retry_in = ?delay, "database not reachable yet, retrying");
                        } else {
                            tracing::debug!(error = %crate::error::describe(&e), retry_in = ?delay, "database not reachable yet, retrying");
                        }
                        tokio::time::sleep(crate::backoff::jitter(delay)).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

/// Connections of this process's pools whose tasks have not ended yet.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Counts an open connection until dropped.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a connection whose client is gone may take to finish what it
/// was sent and say goodbye before it is cut.
const LINGER: Duration = Duration::from_secs(1);

/// The connection task, cut after [`LINGER`] if it has not ended when
/// this is dropped.
struct Linger(Option<JoinHandle<()>>);

impl Drop for Linger {
    fn drop(&mut self) {
        let Some(mut task) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if tokio::time::timeout(LINGER, &mut task).await.is_err() {
                        task.abort();
                    }
                });
            }
            Err(_) => task.abort(),
        }
    }
}

/// Runs a connection's I/O in a task of its own. The pool aborts the
/// handle it is given when it drops the client, which would cut the
/// socket before the client says goodbye (the server then logs
/// "connection reset by peer" or "unexpected EOF"); so it gets the handle
/// of a watcher instead, and the connection task ends by itself once its
/// client is dropped, after sending PostgreSQL's Terminate message (or is
/// cut [`LINGER`] after the watcher is aborted).
fn spawn<F>(connection: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>
        + Send
        + 'static,
{
    let open = OpenConnection::new();
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
        drop(open);
    });
    tokio::spawn(async move {
        let mut linger = Linger(Some(task));
        if let Some(task) = linger.0.as_mut() {
            let _ = task.await;
        }
        linger.0 = None;
    })
}

/// Waits, at most `within`, until every connection this process's pools
/// opened has closed (its client dropped and its Terminate message sent);
/// returns whether they all did. Call it after dropping the pools and
/// before the tokio runtime shuts down, so the server sees every session
/// end cleanly rather than its socket cut.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) {
/// use std::time::Duration;
///
/// drop(pool);
/// chronicle_postgres::connections_closed(Duration::from_secs(2)).await;
/// # }
/// ```
pub async fn connections_closed(within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while OPEN_CONNECTIONS.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Whether a failed connection attempt is worth retrying: the server is
/// unreachable, starting, shutting down or out of connection slots. Bad
/// credentials, a missing database or a TLS failure are not.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || matches!(code, "57P03" | "53300" | "57P01");
    }
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotFound
                    | TimedOut
                    | UnexpectedEof
                    | BrokenPipe
                    | AddrNotAvailable
            );
        }
        source = s.source();
    }
    // A timeout or closed connection without an io error underneath.
    e.is_closed() || e.to_string().contains("timeout")
}

/// `sslmode=prefer|require` without a root file: encrypt, do not verify
/// (libpq's behaviour), but still check the handshake signatures.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` and `verify-full`: the WebPKI verifier, with the host name
/// check waived for `verify-ca`.
#[derive(Debug)]
struct WebPki {
    inner: Arc<WebPkiServerVerifier>,
    check_host: bool,
}

impl ServerCertVerifier for WebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error as E};
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(E::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_params_are_taken_out_of_urls() {
        let (rest, own) = split_own_params(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x&statement_cache=off",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/db?application_name=x");
        assert_eq!(own.ssl_mode, SslMode::VerifyFull);
        assert_eq!(own.ssl_root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert!(!own.statement_cache);

        let (rest, own) =
            split_own_params("host=h user=u sslmode=require statement_cache=on").unwrap();
        assert_eq!(rest, "host=h user=u");
        assert_eq!(own.ssl_mode, SslMode::Require);
        assert!(own.statement_cache);

        let (_, own) = split_own_params("postgres://u@h/db").unwrap();
        assert_eq!(own.ssl_mode, SslMode::Prefer);
        assert!(own.statement_cache, "on unless the URL says off");

        let err = PgOptions::from_url("postgres://u@h/db?statement_cache=maybe").unwrap_err();
        assert!(err.to_string().contains("statement_cache `maybe`"), "{err}");

        let unix = PgOptions::from_url("postgresql://u@/db?host=/tmp/s&sslmode=require").unwrap();
        assert_eq!(
            unix.ssl_mode(),
            SslMode::Disable,
            "sslmode does not apply to Unix sockets"
        );
    }

    #[test]
    fn unknown_sslmode_is_refused_by_name() {
        let err = PgOptions::from_url("postgres://u@h/db?sslmode=maybe").unwrap_err();
        assert!(err.to_string().contains("sslmode `maybe`"), "{err}");
    }
}
