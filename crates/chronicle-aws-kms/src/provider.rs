//! [`AwsKmsKeys`]: a [`KeyProvider`] whose key-encryption keys live in AWS
//! KMS.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
use chronicle_crypto::{
    DataKey, Error, KEY_LEN, KekId, KeyProvider, Result, WrapContext, WrappedKey,
};
use zeroize::Zeroizing;

use crate::error::{KmsError, KmsErrorKind};

/// Encryption-context key whose value names the scheme:
/// [`CONTEXT_PURPOSE_VALUE`].
pub const CONTEXT_PURPOSE: &str = "chronicle:purpose";
/// The value of [`CONTEXT_PURPOSE`]: a Chronicle data key, format 1.
pub const CONTEXT_PURPOSE_VALUE: &str = "data-key/v1";
/// Encryption-context key whose value is the data key's subject.
pub const CONTEXT_SUBJECT: &str = "chronicle:subject";
/// Encryption-context key whose value is the data key's id (a UUID).
pub const CONTEXT_DATA_KEY_ID: &str = "chronicle:data-key-id";

/// The default number of attempts per KMS call (first try included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// The KMS encryption context for a wrapped data key: the purpose, the
/// subject and the data key id. KMS authenticates it with the ciphertext,
/// so a wrapped key presented for another subject or another data key id
/// fails to decrypt. It is not secret: CloudTrail logs it with every call
/// (subject ids appear there, field values never do).
///
/// The key-encryption key itself needs no entry: a KMS ciphertext names
/// its key, and [`AwsKmsKeys`] passes the stored key ARN to `Decrypt`.
///
/// ```
/// use chronicle_aws_kms::{CONTEXT_SUBJECT, encryption_context};
/// use chronicle_crypto::{DataKeyId, SubjectId, WrapContext};
///
/// let subject = SubjectId::new("customer-42");
/// let context = encryption_context(&WrapContext { subject: &subject, data_key_id: DataKeyId::new() });
/// assert_eq!(context[CONTEXT_SUBJECT], "customer-42");
/// assert_eq!(context.len(), 3);
/// ```
pub fn encryption_context(context: &WrapContext<'_>) -> HashMap<String, String> {
    HashMap::from([
        (CONTEXT_PURPOSE.to_owned(), CONTEXT_PURPOSE_VALUE.to_owned()),
        (
            CONTEXT_SUBJECT.to_owned(),
            context.subject.as_str().to_owned(),
        ),
        (
            CONTEXT_DATA_KEY_ID.to_owned(),
            context.data_key_id.to_string(),
        ),
    ])
}

/// Whether `kek_id` is a KMS key ARN
/// (`arn:<partition>:kms:<region>:<account>:key/<id>`), the form in which
/// [`AwsKmsKeys`] stores the key that wrapped a data key.
///
/// ```
/// use chronicle_aws_kms::is_kms_key_arn;
///
/// assert!(is_kms_key_arn("arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"));
/// assert!(!is_kms_key_arn("arn:aws:kms:eu-west-1:111122223333:alias/chronicle"));
/// assert!(!is_kms_key_arn("kek-0192f3"));
/// ```
pub fn is_kms_key_arn(kek_id: &str) -> bool {
    let parts: Vec<&str> = kek_id.split(':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[2] == "kms"
        && parts[5].len() > "key/".len()
        && parts[5].starts_with("key/")
}

/// Builds an [`AwsKmsKeys`].
///
/// ```no_run
/// use std::sync::Arc;
/// use chronicle_aws_kms::AwsKmsKeysBuilder;
/// use chronicle_crypto::LocalKeyring;
///
/// # async fn run() -> chronicle_crypto::Result<()> {
/// let old = Arc::new(LocalKeyring::from_file("keyring.yaml")?);
/// let keys = AwsKmsKeysBuilder::new("alias/chronicle-kek")
///     .endpoint_url("http://127.0.0.1:5000")
///     .max_attempts(8)
///     .legacy_provider(old)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AwsKmsKeysBuilder {
    key: String,
    sdk_config: Option<SdkConfig>,
    client: Option<Client>,
    endpoint_url: Option<String>,
    max_attempts: u32,
    legacy: Option<Arc<dyn KeyProvider>>,
}

impl fmt::Debug for AwsKmsKeysBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKeysBuilder")
            .field("key", &self.key)
            .field("endpoint_url", &self.endpoint_url)
            .field("max_attempts", &self.max_attempts)
            .field("client", &self.client.is_some())
            .field("legacy_provider", &self.legacy.is_some())
            .finish_non_exhaustive()
    }
}

impl AwsKmsKeysBuilder {
    /// A builder for the KMS key `key`: a key id, a key ARN, an alias name
    /// (`alias/…`) or an alias ARN. [`AwsKmsKeysBuilder::build`] resolves it
    /// to the key ARN, which becomes the [`KekId`] stored with every data
    /// key wrapped from then on.
    pub fn new(key: impl Into<String>) -> Self {
        AwsKmsKeysBuilder {
            key: key.into(),
            sdk_config: None,
            client: None,
            endpoint_url: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            legacy: None,
        }
    }

    /// The AWS configuration (region, credentials, timeouts). Default: loaded
    /// from the environment as the AWS CLI does (`AWS_REGION`,
    /// `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, instance and
    /// container roles, web identity).
    pub fn sdk_config(&mut self, config: SdkConfig) -> &mut Self {
        self.sdk_config = Some(config);
        self
    }

    /// A ready KMS client, used as it is: [`AwsKmsKeysBuilder::sdk_config`],
    /// [`AwsKmsKeysBuilder::endpoint_url`] and
    /// [`AwsKmsKeysBuilder::max_attempts`] are then ignored. Default: none,
    /// a client is made from the configuration.
    pub fn client(&mut self, client: Client) -> &mut Self {
        self.client = Some(client);
        self
    }

    /// The KMS endpoint, e.g. a VPC endpoint or a local KMS-compatible
    /// server (`http://127.0.0.1:5000`). Default: the configuration's
    /// endpoint (`AWS_ENDPOINT_URL`), else the regional AWS endpoint.
    pub fn endpoint_url(&mut self, url: impl Into<String>) -> &mut Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Attempts per KMS call, the first included. Throttling
    /// (`ThrottlingException`), KMS internal errors, 5xx responses,
    /// timeouts and connection errors are retried with exponential backoff
    /// and jitter (the SDK's standard retry mode). Default:
    /// [`DEFAULT_MAX_ATTEMPTS`] (5).
    pub fn max_attempts(&mut self, attempts: u32) -> &mut Self {
        self.max_attempts = attempts;
        self
    }

    /// A provider for data keys wrapped *outside* KMS, e.g. the
    /// [`LocalKeyring`](chronicle_crypto::LocalKeyring) used before moving
    /// to KMS: [`KeyProvider::unwrap`] hands it every wrapped key whose KEK
    /// id is not a KMS key ARN; wrapping always uses KMS. Run
    /// [`FieldEncryptor::rewrap_all`](chronicle_crypto::FieldEncryptor::rewrap_all)
    /// with the resulting provider to move every data key under KMS, then
    /// drop the old keys. Default: none (such keys fail with
    /// [`Error::UnknownKek`]).
    pub fn legacy_provider(&mut self, provider: Arc<dyn KeyProvider>) -> &mut Self {
        self.legacy = Some(provider);
        self
    }

    /// Connects, resolves the key to its ARN with `DescribeKey` and checks
    /// that it is an enabled symmetric encryption key.
    ///
    /// Fails with [`Error::InvalidOperation`] for an empty key or no
    /// region, and with [`Error::Backend`] carrying a [`KmsError`] if KMS
    /// is unreachable, refuses the credentials, does not know the key, or
    /// the key is disabled, pending deletion or of the wrong type.
    pub async fn build(&self) -> Result<AwsKmsKeys> {
        let key = self.key.trim();
        if key.is_empty() {
            return Err(Error::InvalidOperation {
                reason: "no AWS KMS key given: pass a key id, key ARN, alias name (alias/…) or alias ARN".into(),
            });
        }
        if self.max_attempts == 0 {
            return Err(Error::InvalidOperation {
                reason: "max_attempts for AWS KMS calls must be at least 1".into(),
            });
        }
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let sdk = match &self.sdk_config {
                    Some(config) => config.clone(),
                    None => aws_config::defaults(BehaviorVersion::latest()).load().await,
                };
                if sdk.region().is_none() {
                    return Err(Error::InvalidOperation {
                        reason: format!(
                            "no AWS region for KMS key {key}: set AWS_REGION (or a profile's region), or use a key ARN's region in the SDK configuration"
                        ),
                    });
                }
                let mut config = aws_sdk_kms::config::Builder::from(&sdk)
                    .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts));
                if let Some(url) = &self.endpoint_url {
                    config = config.endpoint_url(url);
                }
                Client::from_conf(config.build())
            }
        };
        let arn = resolve_key(&client, key).await?;
        Ok(AwsKmsKeys {
            client,
            current: RwLock::new(arn),
            legacy: self.legacy.clone(),
        })
    }
}

/// Key-encryption keys in AWS KMS: data keys are made with
/// `GenerateDataKey` (AES-256), wrapped with `Encrypt` and unwrapped with
/// `Decrypt`, each with the [`encryption_context`] of the data key's subject
/// and id, so a wrapped key moved to another subject or key id fails with
/// [`Error::UnwrapFailed`].
///
/// The [`KekId`] stored with a wrapped key is the KMS key ARN, and
/// `Decrypt` is called with it: data keys wrapped under an earlier current
/// key keep unwrapping as long as the credentials may use that key. KMS's
/// own automatic key rotation keeps the ARN and needs nothing here; to move
/// to another key, [`AwsKmsKeys::set_current_key`] and then
/// [`FieldEncryptor::rewrap_all`](chronicle_crypto::FieldEncryptor::rewrap_all).
///
/// Permissions needed on the key: `kms:DescribeKey`, `kms:GenerateDataKey`,
/// `kms:Encrypt`, `kms:Decrypt`. Keep the field encryptor's data-key cache
/// on: with it, KMS is called once per data key and cache lifetime, not per
/// event.
///
/// Plaintext data keys returned by KMS are copied into a [`DataKey`] and
/// the copy the provider holds is zeroized; the SDK's own response buffers
/// are not under its control.
///
/// ```no_run
/// use std::sync::Arc;
/// use chronicle_aws_kms::AwsKmsKeys;
/// use chronicle_crypto::{
///     EncryptionConfig, FieldEncryptorBuilder, KeyProvider, MemoryAuditSink, MemoryDataKeyStore,
/// };
///
/// # async fn run() -> chronicle_crypto::Result<()> {
/// let keys = AwsKmsKeys::builder("alias/chronicle-kek").build().await?;
/// println!("wrapping under {}", keys.current_key_id());
/// let encryptor = FieldEncryptorBuilder::new(
///     EncryptionConfig::from_yaml("encryption:\n  events:\n    UserRegistered:\n      fields: [/email]\n")?,
///     Arc::new(keys),
///     Arc::new(MemoryDataKeyStore::new()),
///     Arc::new(MemoryAuditSink::new()),
/// )
/// .build();
/// # Ok(()) }
/// ```
pub struct AwsKmsKeys {
    client: Client,
    current: RwLock<KekId>,
    legacy: Option<Arc<dyn KeyProvider>>,
}

impl fmt::Debug for AwsKmsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKeys")
            .field("current", &self.current_key_id())
            .field("legacy_provider", &self.legacy.is_some())
            .finish_non_exhaustive()
    }
}

impl AwsKmsKeys {
    /// A builder for the KMS key `key` (key id, key ARN, alias name or alias
    /// ARN); see [`AwsKmsKeysBuilder`].
    ///
    /// ```no_run
    /// # async fn run() -> chronicle_crypto::Result<()> {
    /// let keys = chronicle_aws_kms::AwsKmsKeys::builder("alias/chronicle-kek").build().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(key: impl Into<String>) -> AwsKmsKeysBuilder {
        AwsKmsKeysBuilder::new(key)
    }

    /// The KMS client in use.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Makes another KMS key current: resolves `key` (key id, ARN, alias
    /// name or alias ARN) to its ARN, checks that it is an enabled
    /// symmetric encryption key, and wraps every new data key under it from
    /// now on. Returns the ARN. Data keys wrapped under the previous key
    /// still unwrap; re-wrap them with
    /// [`FieldEncryptor::rewrap_all`](chronicle_crypto::FieldEncryptor::rewrap_all).
    ///
    /// ```no_run
    /// # async fn run(keys: chronicle_aws_kms::AwsKmsKeys) -> chronicle_crypto::Result<()> {
    /// let arn = keys.set_current_key("alias/chronicle-kek-2026").await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_current_key(&self, key: &str) -> Result<KekId> {
        let arn = resolve_key(&self.client, key.trim()).await?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = arn.clone();
        Ok(arn)
    }

    /// Checks with `DescribeKey` that the current key still exists and is
    /// enabled, e.g. at start-up or in a health check; returns its ARN.
    ///
    /// ```no_run
    /// # async fn run(keys: chronicle_aws_kms::AwsKmsKeys) -> chronicle_crypto::Result<()> {
    /// keys.check_current_key().await?;
    /// # Ok(()) }
    /// ```
    pub async fn check_current_key(&self) -> Result<KekId> {
        let current = self.current_key_id();
        resolve_key(&self.client, current.as_str()).await
    }

    async fn decrypt(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey> {
        let kek = wrapped.kek_id.as_str();
        let failed = || Error::UnwrapFailed {
            kek_id: wrapped.kek_id.clone(),
            data_key_id: context.data_key_id,
            subject: context.subject.clone(),
        };
        let mut out = match self
            .client
            .decrypt()
            .key_id(kek)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(service))
                if matches!(
                    service.err().code(),
                    Some("InvalidCiphertextException" | "IncorrectKeyException")
                ) =>
            {
                return Err(failed());
            }
            Err(SdkError::ServiceError(service))
                if service.err().code() == Some("NotFoundException") =>
            {
                return Err(Error::UnknownKek {
                    kek_id: wrapped.kek_id.clone(),
                });
            }
            Err(e) => return Err(KmsError::from_sdk("Decrypt", kek, e).into()),
        };
        if out.key_id.as_deref().is_some_and(|id| id != kek) {
            return Err(failed());
        }
        let plaintext = Zeroizing::new(
            out.plaintext
                .take()
                .map(Blob::into_inner)
                .unwrap_or_default(),
        );
        if plaintext.len() != KEY_LEN {
            return Err(failed());
        }
        DataKey::from_slice(&plaintext)
    }
}

#[async_trait]
impl KeyProvider for AwsKmsKeys {
    fn current_key_id(&self) -> KekId {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn wrap(&self, key: &DataKey, context: &WrapContext<'_>) -> Result<WrappedKey> {
        let kek = self.current_key_id();
        let out = self
            .client
            .encrypt()
            .key_id(kek.as_str())
            .plaintext(Blob::new(key.expose_secret().to_vec()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("Encrypt", kek.as_str(), e))?;
        let ciphertext = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| malformed("Encrypt", &kek, "no CiphertextBlob"))?;
        Ok(WrappedKey {
            kek_id: out.key_id.map(KekId::new).unwrap_or(kek),
            ciphertext,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey> {
        if is_kms_key_arn(wrapped.kek_id.as_str()) {
            return self.decrypt(wrapped, context).await;
        }
        match &self.legacy {
            Some(legacy) => legacy.unwrap(wrapped, context).await,
            None => Err(Error::UnknownKek {
                kek_id: wrapped.kek_id.clone(),
            }),
        }
    }

    async fn generate_data_key(&self, context: &WrapContext<'_>) -> Result<(DataKey, WrappedKey)> {
        let kek = self.current_key_id();
        let mut out = self
            .client
            .generate_data_key()
            .key_id(kek.as_str())
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("GenerateDataKey", kek.as_str(), e))?;
        let plaintext = Zeroizing::new(
            out.plaintext
                .take()
                .map(Blob::into_inner)
                .unwrap_or_default(),
        );
        if plaintext.len() != KEY_LEN {
            return Err(malformed(
                "GenerateDataKey",
                &kek,
                &format!(
                    "a plaintext data key of {} bytes, expected {KEY_LEN}",
                    plaintext.len()
                ),
            ));
        }
        let key = DataKey::from_slice(&plaintext)?;
        let ciphertext = out
            .ciphertext_blob
            .take()
            .map(Blob::into_inner)
            .ok_or_else(|| malformed("GenerateDataKey", &kek, "no CiphertextBlob"))?;
        let wrapped = WrappedKey {
            kek_id: out.key_id.take().map(KekId::new).unwrap_or(kek),
            ciphertext,
        };
        Ok((key, wrapped))
    }
}

/// `DescribeKey`: the key's ARN, if it is an enabled symmetric encryption
/// key.
async fn resolve_key(client: &Client, key: &str) -> Result<KekId> {
    if key.is_empty() {
        return Err(Error::InvalidOperation {
            reason:
                "no AWS KMS key given: pass a key id, key ARN, alias name (alias/…) or alias ARN"
                    .into(),
        });
    }
    let out = client
        .describe_key()
        .key_id(key)
        .send()
        .await
        .map_err(|e| KmsError::from_sdk("DescribeKey", key, e))?;
    let meta = out
        .key_metadata
        .ok_or_else(|| malformed("DescribeKey", &KekId::new(key), "no KeyMetadata"))?;
    let arn = meta
        .arn()
        .ok_or_else(|| malformed("DescribeKey", &KekId::new(key), "no key ARN"))?
        .to_owned();
    let named = if arn == key {
        arn.clone()
    } else {
        format!("{key} ({arn})")
    };
    let refuse = |kind: KmsErrorKind, what: String| -> Error {
        KmsError::new(
            kind,
            "DescribeKey",
            named.clone(),
            Some(what.as_str()),
            None,
        )
        .into()
    };
    match meta.key_state() {
        Some(KeyState::Enabled) => {}
        Some(KeyState::Disabled) => {
            return Err(refuse(
                KmsErrorKind::KeyDisabled,
                "KeyState=Disabled".into(),
            ));
        }
        Some(state) => {
            return Err(refuse(
                KmsErrorKind::KeyUnusable,
                format!("KeyState={}", state.as_str()),
            ));
        }
        None if !meta.enabled() => {
            return Err(refuse(KmsErrorKind::KeyDisabled, "Enabled=false".into()));
        }
        None => {}
    }
    if let Some(usage) = meta.key_usage()
        && *usage != KeyUsageType::EncryptDecrypt
    {
        return Err(refuse(
            KmsErrorKind::WrongKeyType,
            format!("KeyUsage={}", usage.as_str()),
        ));
    }
    if let Some(spec) = meta.key_spec()
        && *spec != KeySpec::SymmetricDefault
    {
        return Err(refuse(
            KmsErrorKind::WrongKeyType,
            format!("KeySpec={}", spec.as_str()),
        ));
    }
    Ok(KekId::new(arn))
}

fn malformed(operation: &'static str, key: &KekId, what: &str) -> Error {
    Error::Backend {
        message: format!(
            "AWS KMS {operation} with key {key} returned {what}; is the endpoint a KMS-compatible service?"
        ),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chronicle_crypto::{DataKeyId, SubjectId};

    #[test]
    fn context_binds_subject_and_data_key_id() {
        let a = SubjectId::new("a");
        let b = SubjectId::new("b");
        let id = DataKeyId::new();
        let base = encryption_context(&WrapContext {
            subject: &a,
            data_key_id: id,
        });
        assert_eq!(base[CONTEXT_PURPOSE], CONTEXT_PURPOSE_VALUE);
        assert_eq!(base[CONTEXT_DATA_KEY_ID], id.to_string());
        assert_ne!(
            base,
            encryption_context(&WrapContext {
                subject: &b,
                data_key_id: id
            })
        );
        assert_ne!(
            base,
            encryption_context(&WrapContext {
                subject: &a,
                data_key_id: DataKeyId::new()
            })
        );
    }

    #[test]
    fn key_arns_are_recognized() {
        assert!(is_kms_key_arn(
            "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/mrk-1234"
        ));
        for not in [
            "arn:aws:kms:eu-west-1:111122223333:key/",
            "arn:aws:s3:::bucket",
            "alias/chronicle",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "",
        ] {
            assert!(!is_kms_key_arn(not), "{not:?}");
        }
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AwsKmsKeys>();
        check::<AwsKmsKeysBuilder>();
        check::<KmsError>();
    }
}
