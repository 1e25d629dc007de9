//! [`SecretStore`]: secrets by name, from the environment ([`EnvSecrets`]) or
//! from files ([`FileSecrets`], e.g. Docker and Kubernetes `/run/secrets`).
//! Cloud secret managers implement the same trait.

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// A secret's value. Zeroized on drop; `Debug` never shows it.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// A secret from its bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretValue(Zeroizing::new(bytes))
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 text.
    pub fn expose_str(&self) -> std::result::Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.0)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

/// Reads secrets by name.
///
/// Names are made of ASCII letters, digits, `_`, `-` and `.`, and do not
/// start with `.`; implementations map them to their own naming.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The secret called `name`, or `None` if it is not set.
    async fn get(&self, name: &str) -> Result<Option<SecretValue>>;

    /// The secret called `name`; an error naming it if it is not set.
    async fn require(&self, name: &str) -> Result<SecretValue> {
        self.get(name).await?.ok_or_else(|| Error::Secret {
            name: name.to_owned(),
            reason: "not set".into(),
        })
    }
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

/// Secrets from environment variables: the name upper-cased, `-` and `.`
/// turned into `_`, after an optional prefix. With prefix `CHRONICLE_`, the
/// secret `keyring` is the variable `CHRONICLE_KEYRING`.
///
/// ```
/// use chronicle_crypto::EnvSecrets;
///
/// let secrets = EnvSecrets::with_prefix("CHRONICLE_");
/// assert_eq!(secrets.variable("audit-hmac.key"), "CHRONICLE_AUDIT_HMAC_KEY");
/// ```
#[derive(Debug, Clone, Default)]
pub struct EnvSecrets {
    prefix: String,
}

impl EnvSecrets {
    /// Secrets from variables named after the secret, without prefix.
    pub fn new() -> Self {
        EnvSecrets::default()
    }

    /// Secrets from variables named `prefix` + the secret's name.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        EnvSecrets {
            prefix: prefix.into(),
        }
    }

    /// The environment variable that holds the secret `name`.
    pub fn variable(&self, name: &str) -> String {
        let mut var = self.prefix.clone();
        var.extend(name.chars().map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        }));
        var
    }
}

#[async_trait]
impl SecretStore for EnvSecrets {
    async fn get(&self, name: &str) -> Result<Option<SecretValue>> {
        validate_name(name)?;
        Ok(std::env::var_os(self.variable(name)).map(|v| SecretValue::new(v.into_encoded_bytes())))
    }
}

/// Secrets from files in a directory, one file per secret named after it
/// (the layout of Docker and Kubernetes secret mounts). One trailing newline
/// is removed.
#[derive(Debug, Clone)]
pub struct FileSecrets {
    dir: PathBuf,
}

impl FileSecrets {
    /// Secrets from files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSecrets { dir: dir.into() }
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl SecretStore for FileSecrets {
    async fn get(&self, name: &str) -> Result<Option<SecretValue>> {
        validate_name(name)?;
        let path = self.dir.join(name);
        // Secret files are small; a blocking read is cheaper than a hop to
        // a blocking thread pool.
        match std::fs::read(&path) {
            Ok(mut bytes) => {
                if bytes.ends_with(b"\r\n") {
                    bytes.truncate(bytes.len() - 2);
                } else if bytes.ends_with(b"\n") {
                    bytes.truncate(bytes.len() - 1);
                }
                Ok(Some(SecretValue::new(bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Secret {
                name: name.to_owned(),
                reason: format!("cannot read {}: {e}", path.display()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_secrets_read_trim_and_refuse_traversal() {
        let dir = std::env::temp_dir().join(format!("chronicle-secrets-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("db-password"), b"hunter2\n").unwrap();
        let secrets = FileSecrets::new(&dir);
        let value = secrets.require("db-password").await.unwrap();
        assert_eq!(value.expose(), b"hunter2");
        assert_eq!(format!("{value:?}"), "SecretValue([redacted])");
        assert!(secrets.get("missing").await.unwrap().is_none());
        let err = secrets.require("missing").await.unwrap_err();
        assert!(err.to_string().contains("not set"));
        for bad in ["../etc/passwd", ".hidden", "", "a/b"] {
            assert!(secrets.get(bad).await.is_err(), "{bad:?} accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn env_secrets_map_names() {
        let secrets = EnvSecrets::with_prefix("CHRONICLE_CRYPTO_TEST_");
        assert_eq!(secrets.variable("a-b.c"), "CHRONICLE_CRYPTO_TEST_A_B_C");
        // PATH is set in every test environment.
        let path = EnvSecrets::new().get("path").await.unwrap();
        assert!(path.is_some());
        assert!(secrets.get("surely-unset").await.unwrap().is_none());
    }
}
