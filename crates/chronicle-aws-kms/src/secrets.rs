//! [`AwsSecretsManager`]: a [`SecretStore`] over AWS Secrets Manager
//! (feature `secrets-manager`).

use std::fmt;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use chronicle_crypto::{Error, Result, SecretStore, SecretValue};

/// Secrets from AWS Secrets Manager: the secret `name` is the Secrets
/// Manager secret `prefix + name`, read with `GetSecretValue` (its current
/// version, `AWSCURRENT`). A text secret (`SecretString`) comes back as its
/// UTF-8 bytes, a binary one (`SecretBinary`) as its bytes; a secret that
/// does not exist is `None`.
///
/// Names follow [`SecretStore`]'s rule (ASCII letters, digits, `_`, `-`,
/// `.`, not starting with `.`); the prefix may hold a path such as
/// `chronicle/prod/`. Throttling and transient failures are retried by the
/// SDK with exponential backoff; other failures are
/// [`Error::Secret`] naming the secret and what to do. Needs
/// `secretsmanager:GetSecretValue` on the secrets (and `kms:Decrypt` on
/// their KMS key if it is a customer-managed one).
///
/// ```no_run
/// use chronicle_aws_kms::AwsSecretsManager;
/// use chronicle_crypto::{LocalKeyring, SecretStore};
///
/// # async fn run() -> chronicle_crypto::Result<()> {
/// let config = chronicle_aws_kms::aws_config::load_from_env().await;
/// let secrets = AwsSecretsManager::new(&config).with_prefix("chronicle/prod/");
/// // The secret `chronicle/prod/keyring`:
/// let keyring = LocalKeyring::from_secret(&secrets, "keyring").await?;
/// let db_password = secrets.require("db-password").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AwsSecretsManager {
    client: Client,
    prefix: String,
}

impl fmt::Debug for AwsSecretsManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSecretsManager")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl AwsSecretsManager {
    /// Secrets read with the region, credentials and endpoint of `config`,
    /// without prefix.
    pub fn new(config: &SdkConfig) -> Self {
        AwsSecretsManager::from_client(Client::new(config))
    }

    /// Secrets read with a ready client, without prefix.
    ///
    /// ```no_run
    /// # async fn run() {
    /// use chronicle_aws_kms::{AwsSecretsManager, aws_config};
    ///
    /// let config = aws_config::load_from_env().await;
    /// let client = chronicle_aws_kms::aws_sdk_secretsmanager::Client::new(&config);
    /// let secrets = AwsSecretsManager::from_client(client);
    /// # }
    /// ```
    pub fn from_client(client: Client) -> Self {
        AwsSecretsManager {
            client,
            prefix: String::new(),
        }
    }

    /// Reads secret `name` from the Secrets Manager secret `prefix + name`.
    /// Default: no prefix.
    ///
    /// ```no_run
    /// # async fn run() {
    /// use chronicle_aws_kms::{AwsSecretsManager, aws_config};
    ///
    /// let secrets = AwsSecretsManager::new(&aws_config::load_from_env().await)
    ///     .with_prefix("chronicle/staging/");
    /// assert_eq!(secrets.secret_id("keyring"), "chronicle/staging/keyring");
    /// # }
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The Secrets Manager secret id that holds the secret `name`.
    pub fn secret_id(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The client in use.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[async_trait]
impl SecretStore for AwsSecretsManager {
    async fn get(&self, name: &str) -> Result<Option<SecretValue>> {
        validate_name(name)?;
        let id = self.secret_id(name);
        let out = match self.client.get_secret_value().secret_id(&id).send().await {
            Ok(out) => out,
            Err(SdkError::ServiceError(service))
                if service.err().code() == Some("ResourceNotFoundException") =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(Error::Secret {
                    name: name.to_owned(),
                    reason: failure_reason(&id, &e),
                });
            }
        };
        if let Some(text) = out.secret_string {
            return Ok(Some(SecretValue::new(text.into_bytes())));
        }
        if let Some(bytes) = out.secret_binary {
            return Ok(Some(SecretValue::new(bytes.into_inner())));
        }
        Err(Error::Secret {
            name: name.to_owned(),
            reason: format!("Secrets Manager secret {id} has neither a text nor a binary value"),
        })
    }
}

/// What went wrong reading secret `id`, and what to do, from the Secrets
/// Manager error code (never from message text).
fn failure_reason<E, R>(id: &str, err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let code = err.code();
    let advice = match code {
        Some("AccessDeniedException") => format!(
            "access denied: allow secretsmanager:GetSecretValue on secret {id} (and kms:Decrypt on its KMS key)"
        ),
        Some("DecryptionFailure") => format!(
            "Secrets Manager could not decrypt secret {id} with its KMS key: check that the key is enabled and that these credentials may use it"
        ),
        Some("InvalidRequestException") => format!(
            "secret {id} cannot be read now (is it scheduled for deletion? `aws secretsmanager restore-secret --secret-id {id}`)"
        ),
        Some(
            "UnrecognizedClientException" | "InvalidSignatureException" | "ExpiredTokenException",
        ) => format!(
            "the AWS credentials were rejected reading secret {id}: check AWS_PROFILE / AWS_ACCESS_KEY_ID and the session token's expiry"
        ),
        Some("ThrottlingException" | "InternalServiceError") => {
            format!("Secrets Manager kept failing on secret {id} after every retry: retry later")
        }
        _ => match err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
                "cannot reach AWS Secrets Manager for secret {id}: check the network, the region and any endpoint URL (AWS_ENDPOINT_URL)"
            ),
            _ => format!("reading secret {id} from AWS Secrets Manager failed"),
        },
    };
    let mut reason = advice;
    if let Some(code) = code {
        reason.push_str(&format!(" [{code}]"));
    }
    // The SDK's cause chain (connection, credentials); never the value.
    let mut next = std::error::Error::source(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        next = e.source();
    }
    reason
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Secret {
            name: name.to_owned(),
            reason: "secret names use ASCII letters, digits, '_', '-' and '.', and do not start with '.'".into(),
        })
    }
}
