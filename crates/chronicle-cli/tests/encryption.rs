//! Field encryption end to end, through the binary: after `chronicle demo`
//! and a failing projection that dead-letters encrypted events, no table
//! (events, keys, audit log, read models, the projections' dead-letter
//! queue) holds the plaintext of any configured field; then `chronicle keys`
//! and `chronicle audit`, their exit codes and JSON.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use chronicle_core::{
    EventAppender, EventEnvelope, ExpectedVersion, NewEvent, ProjectionHandler, ProjectionResult,
};
use chronicle_crypto::{
    AccessContext, EncryptionConfig, FieldEncryptorBuilder, KeyProvider, LocalKeyring,
};
use chronicle_postgres::{PgAuditSink, PgDataKeyStore, PgEventStore, PgOptions, PgPool};
use chronicle_projections::{PgContext, PgProjection, ProjectionOptions, RetryPolicy};
use serde_json::{Value, json};
use tokio_postgres::types::Type;
use uuid::Uuid;

mod support;

use support::{fresh_database, ok};

fn psql(url: &str, sql: &str) {
    support::psql_value(url, sql);
}

/// `chronicle args` on `url` with `home` as CHRONICLE_HOME (its dev keyring).
fn chronicle(url: &str, home: &Path, args: &[&str]) -> Output {
    let mut cmd = support::command(Some(url), args);
    cmd.env("CHRONICLE_HOME", home);
    support::run(cmd, None)
}

/// The JSON objects among `text`'s lines (the demo prints prose too).
fn json_objects(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// Appends Ada's `CustomerRegistered` (email and phone encrypted) as an
/// application would, with the keyring at `keyring_path`; returns the pool
/// and her aggregate id.
async fn append_ada(url: &str, keyring_path: &Path) -> (PgPool, Uuid) {
    let pool = PgOptions::from_url(url).unwrap().connect().await.unwrap();
    let crypto = Arc::new(
        FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(
                "encryption:\n  events:\n    CustomerRegistered:\n      fields: [/email, /phone]\n",
            )
            .unwrap(),
            Arc::new(LocalKeyring::from_file(keyring_path).unwrap()),
            Arc::new(PgDataKeyStore::new(pool.clone())),
            Arc::new(PgAuditSink::new(pool.clone())),
        )
        .build(),
    );
    let store =
        PgEventStore::new(pool.clone()).encrypted(crypto, AccessContext::new("app", "signup"));
    let ada = Uuid::now_v7();
    store
        .append(
            ada,
            "customer",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "CustomerRegistered",
                json!({ "name": "Ada Lovelace", "email": "ada@secret.example", "phone": "+44 20 7946 0000" }),
            )],
        )
        .await
        .unwrap();
    (pool, ada)
}

/// A careless projection: it fails on every customer event with the event
/// data in its error message, as delivered (ciphertext, not plaintext).
struct Careless;

#[async_trait::async_trait]
impl ProjectionHandler<PgContext> for Careless {
    fn name(&self) -> &str {
        "careless"
    }

    async fn handle(&self, event: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        if event.event_type.starts_with("Customer") {
            ProjectionResult::fail(format!("cannot handle {}", event.event_data))
        } else {
            ProjectionResult::Skipped
        }
    }
}

/// How many rows of each table (all schemas) contain `needle`.
async fn tables_containing(pool: &PgPool, needle: &str) -> Vec<(String, i64)> {
    let client = pool.get().await.unwrap();
    let tables = client
        .query_typed(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)
               FROM information_schema.tables
              WHERE table_type = 'BASE TABLE'
                AND table_schema NOT IN ('pg_catalog', 'information_schema')
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut found = Vec::new();
    for t in tables {
        let table: String = t.get(0);
        let n: i64 = client
            .query_typed_one(
                &format!("SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0"),
                &[(&needle, Type::TEXT)],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            found.push((table, n));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_anywhere_after_the_demo_and_keys_and_audit_commands() {
    let url = fresh_database();
    let home = tempfile::tempdir().unwrap();
    let demo = ok(&chronicle(&url, home.path(), &["demo"]));
    assert!(demo.contains("Crypto-shredding"), "{demo}");
    assert!(demo.contains("\"$redacted\":\"shredded\""), "{demo}");
    let keyring_path = home.path().join("keyring.yaml");
    assert!(keyring_path.exists(), "the demo made a development keyring");

    // Another customer, not shredded, written as an application would,
    // with the development keyring.
    let (pool, ada) = append_ada(&url, &keyring_path).await;

    // A projection that fails on them: the encrypted events are
    // dead-lettered (and the customers' later events parked).
    let projection = PgProjection::new(
        pool.clone(),
        Careless,
        ProjectionOptions {
            partitions: 1,
            retry: RetryPolicy::none(),
            ..ProjectionOptions::default()
        },
    )
    .unwrap();
    projection.register().await.unwrap();
    for _ in 0..200 {
        let step = projection.step(0, "test").await.unwrap();
        if step.claimed && step.handled == 0 && step.dead_lettered == 0 && step.parked == 0 {
            break;
        }
    }
    let letters = chronicle_projections::dlq::list(&pool, "careless", None)
        .await
        .unwrap();
    let customers: Vec<_> = letters
        .iter()
        .filter(|l| l.event_type.starts_with("Customer"))
        .collect();
    assert!(
        customers.len() >= 3,
        "the demo's two customer events and Ada's are in the dead-letter queue: {letters:?}"
    );
    assert!(
        customers
            .iter()
            .filter_map(|l| l.error.as_deref())
            .any(|e| e.contains("$enc")),
        "the careless handler's error quotes ciphertext"
    );

    // No plaintext of any configured field, anywhere.
    for secret in [
        "grace@navy.example",
        "+1 555 0100",
        "grace.hopper@navy.example",
        "ada@secret.example",
        "+44 20 7946 0000",
    ] {
        assert_eq!(
            tables_containing(&pool, secret).await,
            vec![],
            "plaintext {secret:?} found in the database"
        );
    }
    // The scan does see what is not encrypted, in the events and in the
    // dead-letter queue's error text.
    let visible = tables_containing(&pool, "Ada Lovelace").await;
    assert!(
        visible.iter().any(|(t, _)| t == "public.events")
            && visible
                .iter()
                .any(|(t, _)| t == "public.projection_dead_letters"),
        "{visible:?}"
    );

    // chronicle keys: list, rotate, rotate-kek (a keyring is required
    // against a DATABASE_URL), shred.
    let home = home.path();
    let subject = ada.to_string();
    let keys = json_objects(&ok(&chronicle(
        &url,
        home,
        &["keys", "list", "--subject", &subject, "--output", "json"],
    )));
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["current"], true);
    let all = json_objects(&ok(&chronicle(
        &url,
        home,
        &["keys", "list", "--output", "json"],
    )));
    assert!(
        all.iter().filter(|k| !k["shredded_at"].is_null()).count() >= 2,
        "the demo's shredded keys are listed: {all:?}"
    );

    let rotate = chronicle(&url, home, &["keys", "rotate", &subject]);
    assert_eq!(code(&rotate), Some(2), "no keyring named: usage error");
    assert!(String::from_utf8_lossy(&rotate.stderr).contains("--keyring"));
    let keyring = keyring_path.to_str().unwrap();
    let rotated = json_objects(&ok(&chronicle(
        &url,
        home,
        &[
            "keys",
            "--keyring",
            keyring,
            "rotate",
            &subject,
            "--reencrypt",
            "--output",
            "json",
        ],
    )));
    assert_eq!(rotated[0]["subject"], subject);
    assert_eq!(rotated[0]["events_rewritten"], 1);
    let unknown = chronicle(
        &url,
        home,
        &["keys", "--keyring", keyring, "rotate", "no-such-subject"],
    );
    assert_eq!(code(&unknown), Some(4), "an unknown subject exits 4");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-subject"));

    let kek = json_objects(&ok(&chronicle(
        &url,
        home,
        &[
            "keys",
            "rotate-kek",
            "--keyring",
            keyring,
            "--output",
            "json",
        ],
    )));
    assert!(
        kek[0]["rewrapped"].as_u64().unwrap() >= 2,
        "Ada's two keys at least"
    );
    assert_eq!(kek[0]["still_under_other_keks"], json!([]));
    assert_ne!(kek[0]["kek_id"], kek[0]["previous_kek_id"]);
    let ring = LocalKeyring::from_file(&keyring_path).unwrap();
    assert_eq!(
        ring.current_key_id().as_str(),
        kek[0]["kek_id"].as_str().unwrap(),
        "the new key-encryption key was saved to the keyring file"
    );
    let resumed = json_objects(&ok(&chronicle(
        &url,
        home,
        &[
            "keys",
            "rotate-kek",
            "--resume",
            "--keyring",
            keyring,
            "--output",
            "json",
        ],
    )));
    assert_eq!(resumed[0]["rewrapped"], 0, "nothing left to re-wrap");

    let unconfirmed = chronicle(&url, home, &["keys", "shred", &subject]);
    assert_eq!(
        code(&unconfirmed),
        Some(2),
        "shredding needs --yes without a terminal"
    );
    let shredded = json_objects(&ok(&chronicle(
        &url,
        home,
        &["keys", "shred", &subject, "--yes", "--output", "json"],
    )));
    assert_eq!(shredded[0]["keys_destroyed"].as_array().unwrap().len(), 2);
    assert_eq!(
        code(&chronicle(
            &url,
            home,
            &["keys", "shred", "no-such-subject", "--yes"]
        )),
        Some(4)
    );

    // chronicle audit: list with filters, verify, anchor, tampering.
    let records = json_objects(&ok(&chronicle(
        &url,
        home,
        &["audit", "list", "--subject", &subject, "--output", "json"],
    )));
    let ops: Vec<&str> = records
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    for op in [
        "create-key",
        "encrypt",
        "rotate",
        "reencrypt",
        "rewrap",
        "shred",
    ] {
        assert!(ops.contains(&op), "{op} in {ops:?}");
    }
    let encrypt = records
        .iter()
        .find(|r| r["operation"] == "encrypt")
        .unwrap();
    assert_eq!(encrypt["fields"], json!(["/email", "/phone"]));
    assert_eq!(encrypt["actor"], "app");
    let shreds = json_objects(&ok(&chronicle(
        &url,
        home,
        &["audit", "list", "--operation", "shred", "--output", "json"],
    )));
    assert!(shreds.iter().all(|r| r["operation"] == "shred") && shreds.len() >= 4);
    let bogus = chronicle(&url, home, &["audit", "list", "--operation", "bogus"]);
    assert_eq!(code(&bogus), Some(2));

    let anchor = home.join("anchor.json");
    let verified = json_objects(&ok(&chronicle(
        &url,
        home,
        &[
            "audit",
            "verify",
            "--save-anchor",
            anchor.to_str().unwrap(),
            "--output",
            "json",
        ],
    )));
    assert_eq!(verified[0]["intact"], true);
    assert!(verified[0]["rows_checked"].as_u64().unwrap() >= 10);
    ok(&chronicle(
        &url,
        home,
        &["audit", "verify", "--anchor", anchor.to_str().unwrap()],
    ));

    let first = records[0]["id"].as_u64().unwrap();
    psql(
        &url,
        &format!(
            "ALTER TABLE chronicle_audit_log DISABLE TRIGGER USER;
             UPDATE chronicle_audit_log SET actor = 'someone-else' WHERE id = {first};
             ALTER TABLE chronicle_audit_log ENABLE TRIGGER USER;"
        ),
    );
    let tampered = chronicle(&url, home, &["audit", "verify", "--output", "json"]);
    assert_eq!(code(&tampered), Some(1), "a tampered log fails verify");
    let report = json_objects(&String::from_utf8_lossy(&tampered.stdout));
    assert_eq!(report[0]["intact"], false);
    // Named as `audit list` shows the row: chain:seq, and its id.
    let row = format!(
        "row {}:{} (id {first}) was edited",
        records[0]["chain"], records[0]["seq"]
    );
    assert!(
        report[0]["problems"][0].as_str().unwrap().contains(&row),
        "{row}: {report:?}"
    );
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("not intact"));
}

/// An eager upcast of encrypted fields through the binary: `upcast run`
/// refuses without the keyring and re-encrypts with it; `upcast verify`
/// with the keyring compares plaintext and finds the run clean, without it
/// says to pass --keyring; the rollback restores the originals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upcast_run_and_verify_encrypted_fields_with_the_keyring() {
    let url = fresh_database();
    let home = tempfile::tempdir().unwrap();
    ok(&chronicle(&url, home.path(), &["demo"]));
    let keyring_path = home.path().join("keyring.yaml");

    // A customer whose fields are readable (the demo's was shredded).
    append_ada(&url, &keyring_path).await;

    let config = home.path().join("upcasters.yaml");
    std::fs::write(
        &config,
        "upcasters:\n  - event_type: CustomerRegistered\n    from: 1\n    steps:\n      - move: { from: /email, to: /contact/email }\n",
    )
    .unwrap();
    let (config, keyring) = (config.to_str().unwrap(), keyring_path.to_str().unwrap());
    let home = home.path();

    let refused = chronicle(&url, home, &["upcast", "run", "--config", config]);
    assert_ne!(code(&refused), Some(0));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--keyring"));

    ok(&chronicle(
        &url,
        home,
        &["upcast", "run", "--config", config, "--keyring", keyring],
    ));
    let reports = json_objects(&ok(&chronicle(
        &url,
        home,
        &[
            "upcast",
            "verify",
            "--config",
            config,
            "--keyring",
            keyring,
            "--output",
            "json",
        ],
    )));
    let ours: Vec<&Value> = reports
        .iter()
        .filter(|r| r["encrypted"].as_u64() > Some(0))
        .collect();
    assert_eq!(ours.len(), 1, "{reports:?}");
    assert_eq!(ours[0]["ok"], true, "{reports:?}");
    assert_eq!(ours[0]["compared_plaintext"], true);
    assert_eq!(
        ours[0]["encrypted"], 2,
        "Ada's event and the demo's shredded one"
    );
    assert!(
        !ok(&chronicle(
            &url,
            home,
            &["read", "type", "CustomerRegistered", "--output", "json"],
        ))
        .contains("ada@secret.example"),
        "the store holds no plaintext after the run"
    );

    let without = chronicle(
        &url,
        home,
        &["upcast", "verify", "--config", config, "--output", "json"],
    );
    assert_eq!(code(&without), Some(1));
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("verify with --keyring PATH"), "{stderr}");

    ok(&chronicle(&url, home, &["upcast", "rollback", "--all"]));
    let after = json_objects(&ok(&chronicle(
        &url,
        home,
        &["upcast", "verify", "--config", config, "--output", "json"],
    )));
    assert!(after.iter().all(|r| r["ok"] == true), "{after:?}");
}

/// `chronicle bench crypto`, small, with `--profile`: every case runs, its
/// JSON has the append benchmark's shape with positive rates and the same
/// rows on both sides, and the run's audit log verifies (the benchmark
/// fails otherwise).
#[test]
fn the_crypto_benchmark_runs_every_case_and_prints_json() {
    let url = fresh_database();
    let home = tempfile::tempdir().unwrap();
    let out = ok(&chronicle(
        &url,
        home.path(),
        &[
            "--output",
            "json",
            "bench",
            "crypto",
            "--events",
            "500",
            "--read-passes",
            "1",
            "--synchronous-commit",
            "false",
            "--payload-bytes",
            "100",
            "--profile",
        ],
    ));
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(report["benchmark"], "crypto");
    let cases = report["cases"].as_array().expect("cases");
    let names: Vec<&str> = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    for prefix in [
        "append 1 event",
        "floor: read 20-event streams as raw SQL",
        "read 20-event streams + decrypt + audit, 4 readers",
        "read 20-event streams + decrypt + audit, 16 readers",
        "read 1,000 events by type",
        "profile: read + ciphertext through the wrapper",
        "profile: read + decrypt + audit, group commit, 4 in flight",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(prefix)),
            "no case {prefix:?} in {names:?}"
        );
    }
    for case in cases {
        for field in ["events_per_sec", "raw_events_per_sec", "ratio"] {
            let value = case[field].as_f64().unwrap_or(0.0);
            assert!(value > 0.0 && value.is_finite(), "{field} of {case}");
        }
        // Both sides touched the same rows (the run fails otherwise).
        let (rows, raw_rows) = (case["rows"].as_u64(), case["raw_rows"].as_u64());
        assert!(rows.is_some_and(|r| r > 0), "no rows in {case}");
        assert_eq!(rows, raw_rows, "{case}");
    }
    // The scratch schema is gone: nothing of the run stays behind.
    assert_eq!(
        support::psql_value(
            &url,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'chronicle_bench%'"
        ),
        "0"
    );
    // Too few events for the bulk reads: refused up front, with the fix.
    let few = chronicle(&url, home.path(), &["bench", "crypto", "--events", "100"]);
    assert_eq!(code(&few), Some(1));
    let stderr = String::from_utf8_lossy(&few.stderr);
    assert!(stderr.contains("--events 500 or more"), "{stderr}");
}
