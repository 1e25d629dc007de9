//! [`WebhookAlertSink`]: alerts as JSON POSTs, retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{Alert, AlertSink, BoxError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Error, Result, RetryPolicy};

/// Posts each alert as JSON (the [`Alert`]'s serde form, e.g.
/// `{"kind":"dead_lettered","projection":…}`) to an `http://` or `https://`
/// URL. Connection failures, timeouts and `5xx`/`429` answers are retried
/// with the [`RetryPolicy`]; other answers outside `2xx` fail at once.
///
/// ```
/// use chronicle_projections::WebhookAlertSink;
///
/// let sink = WebhookAlertSink::new("https://hooks.example.com/chronicle?team=ops").unwrap();
/// assert!(WebhookAlertSink::new("ftp://example.com").is_err());
/// ```
#[derive(Clone)]
pub struct WebhookAlertSink {
    url: HttpUrl,
    retry: RetryPolicy,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for WebhookAlertSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAlertSink")
            .field("url", &self.url)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    https: bool,
    host: String,
    port: u16,
    /// Path and query, from the first `/`.
    target: String,
}

impl HttpUrl {
    fn parse(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Config {
            option: "webhook url",
            reason: format!("`{url}` {reason}; expected e.g. https://hooks.example.com/path"),
        };
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("is not an http:// or https:// URL"));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(bad("has credentials in it, which are not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // An IPv6 literal: [::1] or [::1]:8080.
            let (host, rest) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed `[`"))?;
            match rest.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| bad("has an invalid port"))?),
                None if rest.is_empty() => (host, default_port),
                None => return Err(bad("has text after the IPv6 address")),
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad("has an invalid port"))?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(HttpUrl {
            https,
            host: host.to_owned(),
            port,
            target,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

/// Why one delivery attempt failed.
enum Attempt {
    Retryable(String),
    Permanent(String),
}

impl WebhookAlertSink {
    /// A sink posting to `url`, with the default retry policy (3 retries
    /// from 100 ms) and a 10 s timeout per attempt. `https` verifies the
    /// server against the system's root certificates.
    pub fn new(url: &str) -> Result<Self> {
        let url = HttpUrl::parse(url)?;
        let tls = if url.https {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Some(tls_config(roots)?)
        } else {
            None
        };
        Ok(WebhookAlertSink {
            url,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
            tls,
        })
    }

    /// Trusts only the certificate authorities in `pem` (instead of the
    /// system's) for an `https` URL.
    pub fn with_root_certificates(mut self, pem: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            option: "webhook root certificates",
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| bad(format!("cannot read PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in the PEM".to_owned()));
        }
        self.tls = Some(tls_config(roots)?);
        Ok(self)
    }

    /// Sets the retry policy (default: [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the timeout of one attempt (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn attempt(&self, body: &[u8]) -> Attempt {
        match tokio::time::timeout(self.timeout, self.post(body)).await {
            Err(_) => Attempt::Retryable(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Attempt::Retryable(e.to_string()),
            Ok(Ok(status)) if (200..300).contains(&status) => Attempt::Permanent(String::new()),
            Ok(Ok(status)) if status >= 500 || status == 429 => {
                Attempt::Retryable(format!("the webhook answered HTTP {status}"))
            }
            Ok(Ok(status)) => Attempt::Permanent(format!("the webhook answered HTTP {status}")),
        }
    }

    /// One POST; returns the HTTP status.
    async fn post(&self, body: &[u8]) -> std::io::Result<u16> {
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port)).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some(config) if self.url.https => {
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                self.exchange(stream, body).await
            }
            _ => self.exchange(tcp, body).await,
        }
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        body: &[u8],
    ) -> std::io::Result<u16> {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nUser-Agent: chronicle-projections\r\nConnection: close\r\n\r\n",
            self.url.target,
            self.url.host_header(),
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        // Only the status line matters.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let status = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "not an HTTP answer: {:?}",
                        line.lines().next().unwrap_or("")
                    ),
                )
            })?;
        Ok(status)
    }
}

fn tls_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config {
        option: "webhook tls",
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[async_trait]
impl AlertSink for WebhookAlertSink {
    async fn alert(&self, alert: &Alert) -> Result<(), BoxError> {
        let body = serde_json::to_vec(alert)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.attempt(&body).await {
                Attempt::Permanent(e) if e.is_empty() => return Ok(()),
                Attempt::Permanent(e) => return Err(e.into()),
                Attempt::Retryable(e) => e,
            };
            if attempt > self.retry.max_retries {
                return Err(format!(
                    "webhook {}://{}{} failed after {attempt} attempts: {error}",
                    if self.url.https { "https" } else { "http" },
                    self.url.host_header(),
                    self.url.target
                )
                .into());
            }
            tokio::time::sleep(self.retry.delay_with(attempt, rand::random())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults() {
        let u = HttpUrl::parse("https://hooks.example.com/a/b?c=d").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.target.as_str()),
            (true, "hooks.example.com", 443, "/a/b?c=d")
        );
        assert_eq!(u.host_header(), "hooks.example.com");
        let u = HttpUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8080, "/"));
        assert_eq!(u.host_header(), "127.0.0.1:8080");
        let u = HttpUrl::parse("http://[::1]:9000?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 9000, "/?x=1")
        );
        assert_eq!(u.host_header(), "[::1]:9000");
        let u = HttpUrl::parse("https://[::1]/hook").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 443, "/hook")
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "ftp://x",
            "hooks.example.com",
            "http://",
            "http://host:port/",
            "https://user:pw@host/",
            "http://[::1/",
            "http://[::1]x/",
        ] {
            assert!(HttpUrl::parse(url).is_err(), "{url}");
        }
    }
}
