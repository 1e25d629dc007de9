//! The webhook alert sink against local HTTP and HTTPS servers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chronicle_core::{Alert, AlertSink};
use chronicle_projections::{RetryPolicy, WebhookAlertSink};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
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

/// Requests received: (head, body).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Reads one request, records it, and answers with `status`.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    status: u16,
    received: &Received,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let (head, body) = loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the request was complete");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            break (head, buf[end + 4..end + 4 + length].to_vec());
        }
    };
    received.lock().unwrap().push((head, body));
    let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(answer.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
}

/// An HTTP server answering the i-th request with `statuses[i]` (the last
/// one repeats).
async fn http_server(statuses: Vec<u16>) -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Received::default();
    let log = received.clone();
    tokio::spawn(async move {
        for i in 0.. {
            let (stream, _) = listener.accept().await.unwrap();
            let status = statuses[i.min(statuses.len() - 1)];
            serve_one(stream, status, &log).await;
        }
    });
    (port, received)
}

#[tokio::test]
async fn webhook_posts_json_and_retries_server_errors() {
    let (port, received) = http_server(vec![503, 500, 204]).await;
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/hooks/chronicle?team=ops"))
        .unwrap()
        .with_retry(fast_retries());
    let alert = alert();
    sink.alert(&alert).await.unwrap();
    let received = received.lock().unwrap();
    assert_eq!(
        received.len(),
        3,
        "two server errors retried, then delivered"
    );
    for (head, body) in received.iter() {
        assert!(
            head.starts_with("POST /hooks/chronicle?team=ops HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("Host: 127.0.0.1:{port}")), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
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
    assert_eq!(received.lock().unwrap().len(), 1, "a 400 is not retried");

    let (port, received) = http_server(vec![502]).await;
    let sink = WebhookAlertSink::new(&format!("http://127.0.0.1:{port}/"))
        .unwrap()
        .with_retry(fast_retries());
    let err = sink.alert(&alert()).await.unwrap_err();
    assert!(err.to_string().contains("after 4 attempts"), "{err}");
    assert_eq!(received.lock().unwrap().len(), 4);

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
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Received::default();
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            // A client that does not trust the CA aborts the handshake.
            if let Ok(tls) = acceptor.accept(tcp).await {
                serve_one(tls, 200, &log).await;
            }
        }
    });
    let ca = std::fs::read(&certs_on_disk.ca).unwrap();
    let url = format!("https://localhost:{port}/tls");
    let sink = WebhookAlertSink::new(&url)
        .unwrap()
        .with_root_certificates(&ca)
        .unwrap()
        .with_retry(fast_retries());
    sink.alert(&alert()).await.unwrap();
    assert_eq!(received.lock().unwrap().len(), 1);
    assert!(
        received.lock().unwrap()[0]
            .0
            .starts_with("POST /tls HTTP/1.1")
    );

    // Without the test CA the server is not trusted: nothing is delivered.
    let untrusting = WebhookAlertSink::new(&url)
        .unwrap()
        .with_retry(RetryPolicy::none());
    let err = untrusting.alert(&alert()).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(received.lock().unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
