//! What went wrong talking to AWS KMS, classified by the service's error
//! code (never by message text), with what to do about it.
//!
//! The provider returns [`chronicle_crypto::Error`]: a wrapped key that does
//! not authenticate is [`chronicle_crypto::Error::UnwrapFailed`], a key that
//! no longer exists on unwrap is [`chronicle_crypto::Error::UnknownKek`], and
//! everything else is [`chronicle_crypto::Error::Backend`] whose source is a
//! [`KmsError`] (get it back with [`KmsError::in_crypto_error`]).

use std::fmt;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

/// The kind of a KMS failure: what the caller can do about it differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KmsErrorKind {
    /// The credentials are not allowed to use the key
    /// (`AccessDeniedException`).
    AccessDenied,
    /// The key is disabled (`DisabledException`, or `KeyState` `Disabled`).
    KeyDisabled,
    /// The key exists but cannot be used now: pending deletion, pending
    /// import, or its custom key store is unavailable
    /// (`KMSInvalidStateException`, `KeyUnavailableException`).
    KeyUnusable,
    /// No such key, alias or ARN in this account and region
    /// (`NotFoundException`).
    KeyNotFound,
    /// The key is not a symmetric encryption key (`InvalidKeyUsageException`,
    /// or a `KeySpec`/`KeyUsage` other than `SYMMETRIC_DEFAULT` /
    /// `ENCRYPT_DECRYPT`).
    WrongKeyType,
    /// KMS kept throttling after every retry (`ThrottlingException`,
    /// `LimitExceededException`).
    Throttled,
    /// KMS failed on its side or timed out (`KMSInternalException`,
    /// `DependencyTimeoutException`, a 5xx, a timeout) after every retry.
    Unavailable,
    /// The credentials are missing, expired or invalid
    /// (`UnrecognizedClientException`, `InvalidSignatureException`,
    /// `ExpiredTokenException`, no credentials found).
    Credentials,
    /// KMS could not be reached at all (connection refused, DNS, TLS).
    Unreachable,
    /// Anything else: a malformed request or response.
    Other,
}

impl KmsErrorKind {
    /// The kind for a KMS error code (the `__type` of a KMS error response).
    pub fn from_code(code: &str) -> Self {
        match code {
            "AccessDeniedException" => KmsErrorKind::AccessDenied,
            "DisabledException" => KmsErrorKind::KeyDisabled,
            "KMSInvalidStateException" | "KeyUnavailableException" => KmsErrorKind::KeyUnusable,
            "NotFoundException" => KmsErrorKind::KeyNotFound,
            "InvalidKeyUsageException" | "UnsupportedOperationException" => {
                KmsErrorKind::WrongKeyType
            }
            "ThrottlingException"
            | "LimitExceededException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded" => KmsErrorKind::Throttled,
            "KMSInternalException"
            | "DependencyTimeoutException"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceUnavailableException" => KmsErrorKind::Unavailable,
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "InvalidClientTokenId"
            | "MissingAuthenticationToken"
            | "IncompleteSignature" => KmsErrorKind::Credentials,
            _ => KmsErrorKind::Other,
        }
    }

    /// What this kind of failure means, and what to do about it, for `key`
    /// and the KMS operation `operation` (e.g. `Decrypt`).
    pub fn advice(self, operation: &str, key: &str) -> String {
        match self {
            KmsErrorKind::AccessDenied if operation == "Decrypt" => format!(
                "access denied: allow kms:Decrypt on key {key} for these credentials in the key policy or an IAM policy, or the wrapped key was not encrypted under {key}"
            ),
            KmsErrorKind::AccessDenied => format!(
                "access denied: allow kms:{operation} on key {key} for these credentials in the key policy or an IAM policy"
            ),
            KmsErrorKind::KeyDisabled => format!(
                "key {key} is disabled: enable it (`aws kms enable-key --key-id {key}`), or make another key current; data keys wrapped under it cannot be unwrapped while it is disabled"
            ),
            KmsErrorKind::KeyUnusable => format!(
                "key {key} is not usable in its current state (pending deletion, pending import, or its key store is unavailable): cancel a scheduled deletion (`aws kms cancel-key-deletion --key-id {key}` and enable it) or restore its key store"
            ),
            KmsErrorKind::KeyNotFound => format!(
                "key {key} was not found: check the key id, alias or ARN, the account and the region of the KMS client"
            ),
            KmsErrorKind::WrongKeyType => format!(
                "key {key} cannot encrypt data keys: use a symmetric encryption key (KeySpec SYMMETRIC_DEFAULT, KeyUsage ENCRYPT_DECRYPT)"
            ),
            KmsErrorKind::Throttled => format!(
                "KMS throttled {operation} on key {key} after every retry: raise the KMS request quota, or let the field encryptor cache data keys longer (FieldEncryptorBuilder::cache_ttl)"
            ),
            KmsErrorKind::Unavailable => format!(
                "KMS failed or timed out on {operation} with key {key} after every retry: retry later"
            ),
            KmsErrorKind::Credentials => format!(
                "the AWS credentials were rejected or not found for {operation} on key {key}: check AWS_PROFILE / AWS_ACCESS_KEY_ID, the session token's expiry, and the region"
            ),
            KmsErrorKind::Unreachable => format!(
                "cannot reach AWS KMS for {operation} on key {key}: check the network, the region and any endpoint URL (AWS_ENDPOINT_URL)"
            ),
            KmsErrorKind::Other => format!("KMS {operation} with key {key} failed"),
        }
    }
}

/// A failed KMS call: which operation, on which key, what kind of failure,
/// the KMS error code if there was one, and the SDK error as source.
///
/// ```
/// use chronicle_aws_kms::{KmsError, KmsErrorKind};
///
/// let err = KmsError::new(KmsErrorKind::KeyDisabled, "Encrypt", "alias/chronicle", Some("DisabledException"), None);
/// assert!(err.to_string().contains("aws kms enable-key"));
/// ```
#[derive(Debug, thiserror::Error)]
pub struct KmsError {
    kind: KmsErrorKind,
    operation: &'static str,
    key: String,
    code: Option<String>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AWS KMS: ")?;
        f.write_str(&self.kind.advice(self.operation, &self.key))?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        if let Some(source) = &self.source
            && matches!(
                self.kind,
                KmsErrorKind::Other | KmsErrorKind::Unreachable | KmsErrorKind::Credentials
            )
        {
            // The SDK's own chain says which connection or credential step
            // failed; it never contains request bodies.
            let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
            let mut last = String::new();
            while let Some(e) = next {
                let text = e.to_string();
                if !text.is_empty() && !last.contains(&text) {
                    write!(f, ": {text}")?;
                }
                last = text;
                next = e.source();
            }
        }
        Ok(())
    }
}

impl KmsError {
    /// A KMS error of `kind` for `operation` on `key`.
    pub fn new(
        kind: KmsErrorKind,
        operation: &'static str,
        key: impl Into<String>,
        code: Option<&str>,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        KmsError {
            kind,
            operation,
            key: key.into(),
            code: code.map(str::to_owned),
            source,
        }
    }

    /// Classifies an SDK error of `operation` on `key`.
    pub fn from_sdk<E, R>(operation: &'static str, key: &str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let (kind, code) = match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().map(str::to_owned);
                let kind = code
                    .as_deref()
                    .map(KmsErrorKind::from_code)
                    .unwrap_or(KmsErrorKind::Other);
                (kind, code)
            }
            SdkError::TimeoutError(_) => (KmsErrorKind::Unavailable, None),
            SdkError::DispatchFailure(failure) if failure.is_timeout() => {
                (KmsErrorKind::Unavailable, None)
            }
            SdkError::DispatchFailure(failure) if failure.is_io() => {
                (KmsErrorKind::Unreachable, None)
            }
            // Resolving credentials fails before anything is sent, and the
            // SDK reports it as an "other" dispatch failure.
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_)
                if mentions_credentials(&err) =>
            {
                (KmsErrorKind::Credentials, None)
            }
            SdkError::DispatchFailure(_) => (KmsErrorKind::Unreachable, None),
            _ => (KmsErrorKind::Other, None),
        };
        KmsError {
            kind,
            operation,
            key: key.to_owned(),
            code,
            source: Some(Box::new(err)),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> KmsErrorKind {
        self.kind
    }

    /// The KMS operation that failed, e.g. `Decrypt`.
    pub fn operation(&self) -> &str {
        self.operation
    }

    /// The key the operation used (as configured or as stored).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The KMS error code, if KMS answered with one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The KMS error inside a crypto error, if it carries one.
    pub fn in_crypto_error(error: &chronicle_crypto::Error) -> Option<&KmsError> {
        match error {
            chronicle_crypto::Error::Backend {
                source: Some(source),
                ..
            } => source.downcast_ref::<KmsError>(),
            _ => None,
        }
    }
}

impl From<KmsError> for chronicle_crypto::Error {
    fn from(e: KmsError) -> Self {
        chronicle_crypto::Error::Backend {
            message: e.to_string(),
            source: Some(Box::new(e)),
        }
    }
}

/// Whether the SDK error chain is about resolving credentials (the SDK's
/// identity resolver reports that as a dispatch or construction failure
/// without a code, so this is the only way to tell).
fn mentions_credentials(err: &dyn std::error::Error) -> bool {
    let mut next: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if text.contains("credentials") || text.contains("identity") {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        for (code, kind) in [
            ("AccessDeniedException", KmsErrorKind::AccessDenied),
            ("DisabledException", KmsErrorKind::KeyDisabled),
            ("KMSInvalidStateException", KmsErrorKind::KeyUnusable),
            ("NotFoundException", KmsErrorKind::KeyNotFound),
            ("InvalidKeyUsageException", KmsErrorKind::WrongKeyType),
            ("ThrottlingException", KmsErrorKind::Throttled),
            ("LimitExceededException", KmsErrorKind::Throttled),
            ("KMSInternalException", KmsErrorKind::Unavailable),
            ("UnrecognizedClientException", KmsErrorKind::Credentials),
            ("ValidationException", KmsErrorKind::Other),
        ] {
            assert_eq!(KmsErrorKind::from_code(code), kind, "{code}");
        }
    }

    #[test]
    fn messages_name_the_key_and_the_remedy() {
        let key = "arn:aws:kms:eu-west-1:111122223333:key/1234";
        let denied = KmsError::new(
            KmsErrorKind::AccessDenied,
            "Decrypt",
            key,
            Some("AccessDeniedException"),
            None,
        );
        let text = denied.to_string();
        assert!(text.contains(key), "{text}");
        assert!(text.contains("kms:Decrypt"), "{text}");
        assert!(text.ends_with("[AccessDeniedException]"), "{text}");

        let disabled = KmsError::new(KmsErrorKind::KeyDisabled, "Encrypt", key, None, None);
        assert!(disabled.to_string().contains("enable-key --key-id"));

        let throttled = KmsError::new(KmsErrorKind::Throttled, "GenerateDataKey", key, None, None);
        assert!(throttled.to_string().contains("request quota"));

        let crypto: chronicle_crypto::Error = throttled.into();
        let back = KmsError::in_crypto_error(&crypto).expect("KMS error as source");
        assert_eq!(back.kind(), KmsErrorKind::Throttled);
        assert_eq!(back.operation(), "GenerateDataKey");
        assert_eq!(back.key(), key);
    }
}
