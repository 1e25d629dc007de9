//! The webhook alert sink against axum servers on loopback, over HTTP and
//! HTTPS.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use chronicle_core::{Alert, AlertSink};
use chronicle_projections::{RetryPolicy, WebhookAlertSink};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use uuid::Uuid;

fn alert() -> Alert {
    Alert::DeadLettered {
        projection: "user-profile".to_owned(),
        event_id: Uuid::now_v7(),
        aggregate_id: Uuid::now_v7(),
        version: 7,
        attempts: 4,
        error: "boom".to_owned(),
    }
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(10),
        ..RetryPolicy::default()
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    /// Path and query.
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// What the hook answers and what it received.
#[derive(Clone, Default)]
struct Hook {
    /// The i-th request gets `statuses[i]` (the last one repeats).
    statuses: Arc<Vec<u16>>,
    answered: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Request>>>,
}

impl Hook {
    fn new(statuses: Vec<u16>) -> Hook {
        Hook {
            statuses: Arc::new(statuses),
            ..Hook::default()
        }
    }

    fn received(&self) -> Vec<Request> {
        self.received.lock().unwrap().clone()
    }

    fn router(&self) -> Router {
        async fn post(
            State(hook): State<Hook>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            hook.received.lock().unwrap().push(Request {
                target: uri.path_and_query().map_or("/".into(), |p| p.to_string()),
                headers,
                body,
            });
            let i = hook.answered.fetch_add(1, Ordering::SeqCst);
            let status = hook.statuses[i.min(hook.statuses.len() - 1)];
            StatusCode::from_u16(status).unwrap()
        }
        Router::new().fallback(post).with_state(self.clone())
    }
}

/// An HTTP server on loopback answering the i-th request with
/// `statuses[i]` (the last one repeats).
async fn http_server(statuses: Vec<u16>) -> (u16, Hook) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hook = Hook::new(statuses);
    let router = hook.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (port, hook)
}

/// TLS over a TCP listener, for axum: connections whose handshake fails
/// (a client that does not trust the certificate) are dropped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[tokio::test]
async fn webhook_posts_json_and_retries_server_errors() {
    let (port, received) = http_server(vec![503, 500, 204]).await;
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/hooks/chronicle?team=ops"))
        .unwrap()
        .with_retry(fast_retries());
    let alert = alert();
    sink.alert(&alert).await.unwrap();
    let received = received.received();
    assert_eq!(
        received.len(),
        3,
        "two server errors retried, then delivered"
    );
    for request in &received {
        assert_eq!(request.target, "/hooks/chronicle?team=ops");
        assert_eq!(
            request.headers["host"],
            format!("127.0.0.1:{port}").as_str()
        );
        assert_eq!(request.headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(json, serde_json::to_value(&alert).unwrap());
        assert_eq!(json["kind"], "dead_lettered");
    }
}

#[tokio::test]
async fn webhook_gives_up_on_client_errors_and_after_its_retries() {
    let (port, received) = http_server(vec![400]).await;
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/"))
        .unwrap()
        .with_retry(fast_retries());
    let err = sink.alert(&alert()).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 400"), "{err}");
    assert_eq!(received.received().len(), 1, "a 400 is not retried");

    let (port, received) = http_server(vec![502]).await;
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/"))
        .unwrap()
        .with_retry(fast_retries());
    let err = sink.alert(&alert()).await.unwrap_err();
    assert!(err.to_string().contains("after 4 attempts"), "{err}");
    assert_eq!(received.received().len(), 4);

    // Nothing listening: connection refused, retried, then an error.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/"))
        .unwrap()
        .with_retry(fast_retries());
    assert!(sink.alert(&alert()).await.is_err());
}

#[tokio::test]
async fn webhook_over_https_verifies_the_server() {
    let dir = std::env::temp_dir().join(format!("chronicle-webhook-tls-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs_on_disk = chronicle_postgres::testing::make_test_certificates(&dir);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs_on_disk.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&certs_on_disk.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let listener = TlsListener {
        tcp: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    };
    let port = listener.tcp.local_addr().unwrap().port();
    let hook = Hook::new(vec![200]);
    let router = hook.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let ca = std::fs::read(&certs_on_disk.ca).unwrap();
    let url = format!("https://localhost:{port}/tls");
    let sink = WebhookAlertSink::new(&url)
        .unwrap()
        .with_root_certificates(&ca)
        .unwrap()
        .with_retry(fast_retries());
    sink.alert(&alert()).await.unwrap();
    let received = hook.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].target, "/tls");

    // Without the test CA the server is not trusted: nothing is delivered.
    let untrusting = WebhookAlertSink::new(&url)
        .unwrap()
        .with_retry(RetryPolicy::none());
    let err = untrusting.alert(&alert()).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(hook.received().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
