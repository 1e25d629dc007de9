//! TLS by `sslmode`, against a local server with a self-signed certificate
//! authority made for the test.

use std::path::PathBuf;
use std::process::Command;

use chronicle_postgres::{PgOptions, SslMode};

/// A PostgreSQL server on 127.0.0.1 with `ssl = on`, stopped on drop.
struct TlsServer {
    dir: PathBuf,
    pg_ctl: PathBuf,
    port: u16,
    as_root: bool,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.run(
            Command::new(&self.pg_ctl)
                .args(["-D"])
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "stop"]),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsServer {
    fn run(&self, command: &mut Command) -> std::process::Output {
        let output = if self.as_root {
            let mut wrapped = Command::new("runuser");
            wrapped
                .args(["-u", "postgres", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            wrapped.output()
        } else {
            command.output()
        };
        output.expect("run a PostgreSQL tool")
    }

    fn start() -> TlsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> TlsServer {
        let bin = server_bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "chronicle-tls-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let server = TlsServer {
            dir: dir.clone(),
            pg_ctl: bin.join("pg_ctl"),
            port,
            as_root,
        };
        let certs = chronicle_postgres::testing::make_test_certificates(&dir);
        if as_root {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres:"])
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let out = server.run(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync"]),
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off",
            dir.display(),
            certs.cert.display(),
            certs.key.display()
        );
        let out = server.run(
            Command::new(&server.pg_ctl)
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-w", "-l"])
                .arg(dir.join("log"))
                .args(["-o", &options, "start"]),
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        server
    }

    fn url(&self, params: &str) -> String {
        format!(
            "postgresql://postgres@localhost:{}/postgres?{params}",
            self.port
        )
    }
}

fn server_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().expect(
        "PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)",
    )
}

async fn uses_tls(url: &str) -> Result<bool, chronicle_postgres::Error> {
    let mut options = PgOptions::from_url(url)?;
    options.connect_timeout(std::time::Duration::from_secs(3));
    let pool = options.connect().await?;
    let client = pool.get().await?;
    let row = client
        .query_typed_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_is_honoured_against_a_self_signed_server() {
    let server = TlsServer::start();
    let ca = server.dir.join("ca.crt");

    assert!(
        !uses_tls(&server.url("sslmode=disable")).await.unwrap(),
        "disable: plain"
    );
    assert!(
        uses_tls(&server.url("sslmode=prefer")).await.unwrap(),
        "prefer: TLS when offered"
    );
    assert!(
        uses_tls(&server.url("sslmode=require")).await.unwrap(),
        "require: TLS, unverified"
    );
    let with_root = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    assert!(
        uses_tls(&server.url(&with_root)).await.unwrap(),
        "verify-full with the CA"
    );
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={}", ca.display());
    assert!(
        uses_tls(&server.url(&verify_ca)).await.unwrap(),
        "verify-ca with the CA"
    );

    // verify-full without the CA (not in the system store): refused at once,
    // not retried for the whole timeout.
    let started = std::time::Instant::now();
    let err = uses_tls(&server.url("sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "a TLS failure is not retried"
    );
    assert!(
        err.to_string().to_lowercase().contains("certificate") || err.to_string().contains("TLS"),
        "{err}"
    );
    assert_eq!(
        PgOptions::from_url(&server.url(&with_root))
            .unwrap()
            .ssl_mode(),
        SslMode::VerifyFull
    );
}

/// A database that is not up yet (a Neon compute waking from scale-to-zero)
/// is waited for: connecting retries with backoff until it accepts.
#[tokio::test]
async fn connecting_waits_for_a_server_that_starts_late() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://postgres@localhost:{port}/postgres?sslmode=require");
    let connecting = tokio::spawn(async move {
        let mut options = PgOptions::from_url(&url).unwrap();
        options.connect_timeout(std::time::Duration::from_secs(60));
        let started = std::time::Instant::now();
        let pool = options.connect().await?;
        let client = pool.get().await?;
        let one: i32 = client.query_typed_one("SELECT 1", &[]).await?.get(0);
        Ok::<_, chronicle_postgres::Error>((one, started.elapsed()))
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "nothing listens yet, so the connect is still retrying"
    );
    let _server = tokio::task::spawn_blocking(move || TlsServer::start_on(port))
        .await
        .unwrap();
    let (one, waited) = connecting
        .await
        .unwrap()
        .expect("connected once the server came up");
    assert_eq!(one, 1);
    assert!(waited >= std::time::Duration::from_millis(1500));

    // Refused for good reasons is not retried: a wrong database fails at once.
    let started = std::time::Instant::now();
    let err = PgOptions::from_url(&format!(
        "postgresql://postgres@localhost:{port}/no_such_db?sslmode=require"
    ))
    .unwrap()
    .connect()
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{err}"
    );
    assert!(err.to_string().contains("no_such_db"), "{err}");
}
