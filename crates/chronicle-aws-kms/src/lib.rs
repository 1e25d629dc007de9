//! AWS KMS key-encryption keys for Chronicle's field-level encryption.
//!
//! [`AwsKmsKeys`] implements [`chronicle_crypto::KeyProvider`]: the data
//! keys that encrypt event fields are made by KMS `GenerateDataKey`
//! (AES-256), wrapped with `Encrypt` and unwrapped with `Decrypt`, never
//! leaving KMS unwrapped except into the field encryptor's memory. Every
//! call carries an [`encryption_context`] binding the data key's subject and
//! id, so a wrapped key copied to another subject fails to unwrap
//! ([`chronicle_crypto::Error::UnwrapFailed`]). The
//! [`KekId`](chronicle_crypto::KekId) stored with a
//! wrapped key is the KMS key ARN; [`AwsKmsKeys::set_current_key`] moves new
//! wrapping to another key while keys wrapped under the old one still
//! unwrap.
//!
//! The types that matter:
//!
//! - [`AwsKmsKeys`] and its [`AwsKmsKeysBuilder`]: the provider.
//! - [`KmsError`] and [`KmsErrorKind`]: why a KMS call failed (access
//!   denied, key disabled, not found, throttled after retries, …), carried
//!   as the source of [`chronicle_crypto::Error::Backend`], with a message
//!   naming the key and what to do.
//! - [`encryption_context`]: what is bound to every wrapped key.
//! - `AwsSecretsManager` (feature `secrets-manager`): a
//!   [`chronicle_crypto::SecretStore`] over AWS Secrets Manager, e.g. for
//!   a keyring document or database passwords.
//!
//! Throttling, KMS internal errors, timeouts and connection errors are
//! retried with exponential backoff and jitter
//! ([`AwsKmsKeysBuilder::max_attempts`]). The SDK's HTTPS client uses
//! rustls. The crate re-exports [`aws_config`] and [`aws_sdk_kms`] so
//! callers configure the exact versions it was built with.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chronicle_aws_kms::AwsKmsKeys;
//! use chronicle_crypto::{
//!     AccessContext, EncryptionConfig, FieldEncryptorBuilder, KeyProvider, MemoryAuditSink,
//!     MemoryDataKeyStore,
//! };
//!
//! # async fn run() -> chronicle_crypto::Result<()> {
//! // Region and credentials from the environment, as the AWS CLI does;
//! // the alias resolves to the key ARN.
//! let keys = AwsKmsKeys::builder("alias/chronicle-kek").build().await?;
//! let kek = keys.current_key_id(); // arn:aws:kms:…:key/…
//!
//! let crypto = FieldEncryptorBuilder::new(
//!     EncryptionConfig::from_yaml("encryption:\n  events:\n    UserRegistered:\n      fields: [/email]\n")?,
//!     Arc::new(keys),
//!     Arc::new(MemoryDataKeyStore::new()),
//!     Arc::new(MemoryAuditSink::new()),
//! )
//! .build();
//! let mut event = chronicle_core::NewEvent::new(
//!     "UserRegistered",
//!     serde_json::json!({ "email": "ada@example.com" }),
//! );
//! crypto
//!     .encrypt(&AccessContext::new("signup", "registration"), uuid::Uuid::now_v7(), &mut event)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Moving from a local keyring to KMS
//!
//! Build the provider with the old keyring as
//! [`AwsKmsKeysBuilder::legacy_provider`]: keys wrapped by it still unwrap,
//! new ones are wrapped by KMS, and
//! [`FieldEncryptor::rewrap_all`](chronicle_crypto::FieldEncryptor::rewrap_all)
//! re-wraps every old data key under the KMS key without rewriting events.
//!
//! # Testing
//!
//! The integration tests run against moto's KMS-compatible server on
//! loopback (`pip install 'moto[server]'`), which they start themselves.
#![deny(missing_docs)]

mod error;
mod provider;
#[cfg(feature = "secrets-manager")]
mod secrets;

pub use aws_config;
pub use aws_sdk_kms;
#[cfg(feature = "secrets-manager")]
pub use aws_sdk_secretsmanager;
pub use error::{KmsError, KmsErrorKind};
pub use provider::{
    AwsKmsKeys, AwsKmsKeysBuilder, CONTEXT_DATA_KEY_ID, CONTEXT_PURPOSE, CONTEXT_PURPOSE_VALUE,
    CONTEXT_SUBJECT, DEFAULT_MAX_ATTEMPTS, encryption_context, is_kms_key_arn,
};
#[cfg(feature = "secrets-manager")]
pub use secrets::AwsSecretsManager;
