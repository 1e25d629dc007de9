//! `AwsSecretsManager` against moto's Secrets Manager: text and binary
//! secrets, prefixes, missing secrets, and a keyring read from a secret.

use chronicle_aws_kms::AwsSecretsManager;
use chronicle_aws_kms::aws_sdk_secretsmanager::Client;
use chronicle_aws_kms::aws_sdk_secretsmanager::primitives::Blob;
use chronicle_crypto::{Error, KeyProvider, LocalKeyring, SecretStore};
use uuid::Uuid;

use crate::support;

#[tokio::test]
async fn reads_text_and_binary_secrets_under_a_prefix() {
    let config = support::sdk_config().await;
    let admin = Client::new(&config);
    let prefix = format!("chronicle-{}/", Uuid::now_v7().simple());
    admin
        .create_secret()
        .name(format!("{prefix}db-password"))
        .secret_string("hunter2")
        .send()
        .await
        .expect("CreateSecret (text)");
    admin
        .create_secret()
        .name(format!("{prefix}hmac.key"))
        .secret_binary(Blob::new(vec![0u8, 1, 2, 255]))
        .send()
        .await
        .expect("CreateSecret (binary)");

    let secrets = AwsSecretsManager::new(&config).with_prefix(&prefix);
    assert_eq!(
        secrets.secret_id("db-password"),
        format!("{prefix}db-password")
    );
    let text = secrets.require("db-password").await.unwrap();
    assert_eq!(text.expose(), b"hunter2");
    assert_eq!(format!("{text:?}"), "SecretValue([redacted])");
    let binary = secrets.require("hmac.key").await.unwrap();
    assert_eq!(binary.expose(), [0u8, 1, 2, 255]);

    // Without the prefix the names do not exist.
    let unprefixed = AwsSecretsManager::new(&config);
    assert!(unprefixed.get("db-password").await.unwrap().is_none());

    // A missing secret is None, and `require` names it.
    assert!(secrets.get("missing").await.unwrap().is_none());
    let err = secrets.require("missing").await.unwrap_err();
    assert!(
        matches!(&err, Error::Secret { name, .. } if name == "missing"),
        "{err:?}"
    );
    assert!(err.to_string().contains("not set"), "{err}");

    // Names outside the SecretStore rule are refused before any call.
    for bad in ["", ".hidden", "a/b", "../x"] {
        let err = secrets.get(bad).await.unwrap_err();
        assert!(
            err.to_string().contains("secret names use"),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test]
async fn a_keyring_document_is_read_from_a_secret() {
    let config = support::sdk_config().await;
    let admin = Client::new(&config);
    let ring = LocalKeyring::generate().unwrap();
    let name = format!("keyring-{}", Uuid::now_v7().simple());
    admin
        .create_secret()
        .name(&name)
        .secret_string(ring.to_json().as_str())
        .send()
        .await
        .expect("CreateSecret (keyring)");

    let secrets = AwsSecretsManager::new(&config);
    let loaded = LocalKeyring::from_secret(&secrets, &name).await.unwrap();
    assert_eq!(loaded.key_ids(), ring.key_ids());
    assert_eq!(loaded.current_key_id(), ring.current_key_id());
}
