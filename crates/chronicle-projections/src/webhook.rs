//! [`WebhookAlertSink`]: alerts as JSON POSTs over reqwest (rustls), retried
//! with backoff.

use std::time::Duration;

use async_trait::async_trait;
use chronicle_core::{Alert, AlertSink, BoxError};
use reqwest::{Certificate, Client, StatusCode, Url};

use crate::{Error, Result, RetryPolicy};

/// Posts each alert as JSON (the [`Alert`]'s serde form, e.g.
/// `{"kind":"dead_lettered","projection":…}`) to an `http://` or `https://`
/// URL, through a [`reqwest`] client on rustls. Connection failures,
/// timeouts and `5xx`/`429` answers are retried with the [`RetryPolicy`];
/// other answers outside `2xx` fail at once.
///
/// ```
/// use chronicle_projections::WebhookAlertSink;
///
/// let sink = WebhookAlertSink::new("https://hooks.example.com/chronicle?team=ops").unwrap();
/// assert!(WebhookAlertSink::new("ftp://example.com").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct WebhookAlertSink {
    url: Url,
    client: Client,
    retry: RetryPolicy,
    timeout: Duration,
}

/// Why one delivery attempt failed.
enum Attempt {
    Retryable(String),
    Permanent(String),
}

fn config_error(option: &'static str, reason: String) -> Error {
    Error::Config { option, reason }
}

/// The client every sink starts with: HTTP/1, no proxy from the
/// environment (an alert goes where its URL says), the platform's roots
/// unless `roots` replaces them.
fn client(roots: Option<Vec<Certificate>>) -> Result<Client> {
    let builder = Client::builder()
        .user_agent(concat!("chronicle-projections/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .http1_only();
    let builder = match roots {
        Some(roots) => builder.tls_certs_only(roots),
        None => builder,
    };
    builder
        .build()
        .map_err(|e| config_error("webhook tls", format!("{e:#}")))
}

impl WebhookAlertSink {
    /// A sink posting to `url`, with the default retry policy (3 retries
    /// from 100 ms) and a 10 s timeout per attempt. `https` verifies the
    /// server against the platform's root certificates.
    pub fn new(url: &str) -> Result<Self> {
        let bad = |reason: &str| {
            config_error(
                "webhook url",
                format!("`{url}` {reason}; expected e.g. https://hooks.example.com/path"),
            )
        };
        let parsed = Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("is not an http:// or https:// URL"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("has credentials in it, which are not supported"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        Ok(WebhookAlertSink {
            url: parsed,
            client: client(None)?,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Trusts only the certificate authorities in `pem` (instead of the
    /// platform's) for an `https` URL.
    pub fn with_root_certificates(mut self, pem: &[u8]) -> Result<Self> {
        let roots = Certificate::from_pem_bundle(pem).map_err(|e| {
            config_error("webhook root certificates", format!("cannot read PEM: {e}"))
        })?;
        if roots.is_empty() {
            return Err(config_error(
                "webhook root certificates",
                "no certificate in the PEM".to_owned(),
            ));
        }
        self.client = client(Some(roots))?;
        Ok(self)
    }

    /// Sets the retry policy (default: [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the timeout of one attempt, from connecting to the end of the
    /// answer (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn attempt(&self, body: &[u8]) -> Attempt {
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .timeout(self.timeout)
            .send()
            .await;
        let status = match sent {
            Ok(answer) => answer.status(),
            Err(e) if e.is_timeout() => {
                return Attempt::Retryable(format!("no answer within {:?}", self.timeout));
            }
            // The chain holds the cause: refused, reset, a certificate
            // that is not trusted.
            Err(e) => return Attempt::Retryable(chain(&e)),
        };
        if status.is_success() {
            Attempt::Permanent(String::new())
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Retryable(format!("the webhook answered HTTP {}", status.as_u16()))
        } else {
            Attempt::Permanent(format!("the webhook answered HTTP {}", status.as_u16()))
        }
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
                    "webhook {} failed after {attempt} attempts: {error}",
                    self.url
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
    fn urls_keep_their_path_and_query() {
        for (url, expected) in [
            (
                "https://hooks.example.com/a/b?c=d",
                "https://hooks.example.com/a/b?c=d",
            ),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
            ("http://[::1]:9000?x=1", "http://[::1]:9000/?x=1"),
            ("https://[::1]/hook", "https://[::1]/hook"),
        ] {
            assert_eq!(WebhookAlertSink::new(url).unwrap().url.as_str(), expected);
        }
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
            assert!(WebhookAlertSink::new(url).is_err(), "{url}");
        }
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        let sink = WebhookAlertSink::new("https://localhost/").unwrap();
        let e = sink.with_root_certificates(b"not a pem").unwrap_err();
        assert!(e.to_string().contains("root certificates"), "{e}");
    }
}
