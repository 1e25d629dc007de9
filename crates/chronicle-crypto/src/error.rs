//! The errors of the crypto layer.
//!
//! No message ever contains plaintext of a sensitive field or key material:
//! errors name the event, the field (a JSON pointer) and key ids only.

use uuid::Uuid;

use crate::keys::{DataKeyId, KekId, SubjectId};

/// A result whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A refused encryption configuration: where in the document and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid encryption config at {at}: {reason}")]
pub struct ConfigError {
    /// Where the problem is, e.g. `encryption.events.UserRegistered.fields[1]`
    /// or `line 4, column 7`.
    pub at: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

impl ConfigError {
    /// A configuration error at `at`.
    pub fn new(at: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            at: at.into(),
            reason: reason.into(),
        }
    }
}

/// What can go wrong encrypting, decrypting or managing keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The field-encryption configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A keyring document or keyring operation was refused. The reason never
    /// quotes key material.
    #[error("keyring: {reason}")]
    Keyring {
        /// What is wrong and what to do about it.
        reason: String,
    },

    /// A data key is wrapped under a key-encryption key the provider does
    /// not have.
    #[error(
        "key-encryption key {kek_id:?} is not available in the key provider; restore it, or re-wrap every data key before removing a key-encryption key"
    )]
    UnknownKek {
        /// The missing key-encryption key.
        kek_id: KekId,
    },

    /// Unwrapping a data key failed authentication.
    #[error(
        "data key {data_key_id} of subject {subject:?} could not be unwrapped with key-encryption key {kek_id:?}: wrong key-encryption key, or the wrapped key was altered"
    )]
    UnwrapFailed {
        /// The key-encryption key that was tried.
        kek_id: KekId,
        /// The data key being unwrapped.
        data_key_id: DataKeyId,
        /// The subject the data key belongs to.
        subject: SubjectId,
    },

    /// An envelope names a data key the store has never seen (neither live
    /// nor shredded).
    #[error(
        "field {field} of event {event_id} was encrypted under data key {key_id}, which the data-key store does not know; is this the right key store?"
    )]
    UnknownDataKey {
        /// The event.
        event_id: Uuid,
        /// The field's JSON pointer.
        field: String,
        /// The data key named by the envelope.
        key_id: DataKeyId,
    },

    /// A ciphertext failed authentication.
    #[error(
        "field {field} of event {event_id} failed authentication under data key {key_id}: the ciphertext was altered, moved from another event or field, or encrypted under another key"
    )]
    Tampered {
        /// The event.
        event_id: Uuid,
        /// The field's JSON pointer.
        field: String,
        /// The data key named by the envelope.
        key_id: DataKeyId,
    },

    /// A value listed in `encrypted_fields` is not a well-formed envelope.
    #[error("field {field} of event {event_id} is not a valid encryption envelope: {reason}")]
    MalformedEnvelope {
        /// The event.
        event_id: Uuid,
        /// The field's JSON pointer.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The event cannot be encrypted as configured (its data is not an
    /// object, its subject pointer is missing, ...).
    #[error("event {event_id} ({event_type}): {reason}")]
    InvalidEvent {
        /// The event.
        event_id: Uuid,
        /// The event's type.
        event_type: String,
        /// What is wrong and what to do about it.
        reason: String,
    },

    /// The subject was shredded: no new data keys can be made for it, so no
    /// new data can be encrypted for it.
    #[error(
        "subject {subject:?} has been shredded; refusing to encrypt new data for it (use a new subject id)"
    )]
    SubjectShredded {
        /// The shredded subject.
        subject: SubjectId,
    },

    /// A request that cannot be carried out as asked.
    #[error("{reason}")]
    InvalidOperation {
        /// What was refused and why.
        reason: String,
    },

    /// A secret could not be read.
    #[error("secret {name:?}: {reason}")]
    Secret {
        /// The secret's name.
        name: String,
        /// What went wrong (never the secret's value).
        reason: String,
    },

    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The audit sink did not store the batch. No plaintext was released and
    /// no ciphertext was handed out for the operation.
    #[error("audit log unavailable, operation withheld: {message}")]
    Audit {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Random(String),

    /// A backend failed: the data-key store, a KMS, a secret manager.
    #[error("{message}")]
    Backend {
        /// What failed, with a hint of what to do.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A backend error with a message and its cause.
    pub fn backend(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An audit-sink error with a message and its cause.
    pub fn audit(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Audit {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn keyring(reason: impl Into<String>) -> Self {
        Error::Keyring {
            reason: reason.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this error means a ciphertext or wrapped key failed
    /// authentication (tampering, a moved envelope, or a wrong key).
    pub fn is_integrity_failure(&self) -> bool {
        matches!(self, Error::Tampered { .. } | Error::UnwrapFailed { .. })
    }

    /// The crypto error inside a store error, if it is one: what an
    /// [`crate::EncryptedStore`] returned as [`chronicle_core::Error`].
    pub fn in_store_error(error: &chronicle_core::Error) -> Option<&Error> {
        match error {
            chronicle_core::Error::Backend {
                source: Some(source),
                ..
            } => source.downcast_ref::<Error>(),
            _ => None,
        }
    }
}

/// Crypto errors as store errors: an event that cannot be encrypted as
/// configured is [`chronicle_core::Error::Invalid`], everything else
/// [`chronicle_core::Error::Backend`] with the same message and the crypto
/// error as its source ([`Error::in_store_error`] gets it back).
impl From<Error> for chronicle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidEvent {
                event_id,
                event_type,
                reason,
            } => {
                chronicle_core::Validation::new(format!("event {event_id} ({event_type})"), reason)
                    .into()
            }
            other => chronicle_core::Error::Backend {
                message: other.to_string(),
                source: Some(Box::new(other)),
            },
        }
    }
}
