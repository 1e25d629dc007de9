//! Key identities, data keys, and the [`KeyProvider`] trait for
//! key-encryption keys.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{Error, Result};

/// Length in bytes of every AES-256 key in this crate.
pub const KEY_LEN: usize = 32;

/// The id of a key-encryption key (KEK): a keyring entry id, a KMS key id or
/// ARN. Stored next to every wrapped data key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KekId(String);

impl KekId {
    /// A KEK id from its string form.
    pub fn new(id: impl Into<String>) -> Self {
        KekId(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for KekId {
    fn from(s: &str) -> Self {
        KekId(s.to_owned())
    }
}

impl From<String> for KekId {
    fn from(s: String) -> Self {
        KekId(s)
    }
}

/// The id of a data key (DEK), written as `kid` into every envelope. A
/// UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DataKeyId(Uuid);

impl DataKeyId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        DataKeyId(Uuid::now_v7())
    }

    /// The id for a stored UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        DataKeyId(id)
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for DataKeyId {
    fn default() -> Self {
        DataKeyId::new()
    }
}

impl fmt::Display for DataKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for DataKeyId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Uuid::parse_str(s).map(DataKeyId)
    }
}

/// A data subject: the person or entity whose data keys are separate, and
/// whose data is destroyed together by shredding. Defaults to the aggregate
/// id; configurable per event type as a JSON pointer into the event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SubjectId(String);

impl SubjectId {
    /// A subject from its string form.
    pub fn new(id: impl Into<String>) -> Self {
        SubjectId(id.into())
    }

    /// The default subject of an aggregate's events: the aggregate id.
    pub fn from_aggregate(aggregate_id: Uuid) -> Self {
        SubjectId(aggregate_id.to_string())
    }

    /// The subject as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SubjectId {
    fn from(s: &str) -> Self {
        SubjectId(s.to_owned())
    }
}

/// A plaintext 256-bit key: a data key, or a KEK in a local keyring. The
/// bytes live on the heap and are zeroized when the value is dropped; `Debug`
/// never shows them, and there is no `Clone`.
pub struct DataKey(Box<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self> {
        let mut key = DataKey(Box::new([0u8; KEY_LEN]));
        rand::rngs::OsRng
            .try_fill_bytes(&mut key.0[..])
            .map_err(|e| Error::Random(e.to_string()))?;
        Ok(key)
    }

    /// A key from raw bytes; fails unless there are exactly 32.
    ///
    /// The caller remains responsible for zeroizing its own copy.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEY_LEN {
            return Err(Error::InvalidOperation {
                reason: format!(
                    "a key must be {KEY_LEN} bytes (256 bits), got {}",
                    bytes.len()
                ),
            });
        }
        let mut key = DataKey(Box::new([0u8; KEY_LEN]));
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    /// The key's bytes. Handle with care: do not log or copy them.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for DataKey {}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

/// A data key encrypted ("wrapped") under a key-encryption key, as stored
/// by a [`crate::DataKeyStore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The KEK that wrapped it.
    pub kek_id: KekId,
    /// The provider-specific ciphertext. For [`crate::LocalKeyring`]: the
    /// 12-byte nonce followed by the AES-256-GCM ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// What a wrapped data key is bound to. Providers authenticate it with the
/// wrapped key (as associated data, or as a KMS encryption context), so a
/// wrapped key copied to another subject or key id fails to unwrap.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    /// The subject the data key belongs to.
    pub subject: &'a SubjectId,
    /// The data key's id.
    pub data_key_id: DataKeyId,
}

impl WrapContext<'_> {
    /// The canonical associated data for wrapping under `kek_id`:
    /// `"chronicle/dek/v1" 0x00 || len32(kek_id) || kek_id || len32(subject)
    /// || subject || data_key_id (16 bytes)`, lengths big-endian.
    pub fn associated_data(&self, kek_id: &KekId) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + kek_id.as_str().len() + self.subject.as_str().len());
        aad.extend_from_slice(b"chronicle/dek/v1\0");
        push_len_prefixed(&mut aad, kek_id.as_str().as_bytes());
        push_len_prefixed(&mut aad, self.subject.as_str().as_bytes());
        aad.extend_from_slice(self.data_key_id.as_uuid().as_bytes());
        aad
    }
}

pub(crate) fn push_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Key-encryption keys: wraps and unwraps data keys. Implemented by
/// [`crate::LocalKeyring`] for development; cloud KMS adapters implement it
/// with their encrypt/decrypt calls and the [`WrapContext`] as encryption
/// context.
///
/// Object safe: use it as `Arc<dyn KeyProvider>`.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// The KEK that [`KeyProvider::wrap`] uses now.
    fn current_key_id(&self) -> KekId;

    /// Wraps `key` under the current KEK, bound to `context`.
    async fn wrap(&self, key: &DataKey, context: &WrapContext<'_>) -> Result<WrappedKey>;

    /// Unwraps a data key; fails with [`Error::UnknownKek`] if the KEK is not
    /// available and [`Error::UnwrapFailed`] if authentication fails (wrong
    /// KEK, altered ciphertext, or another context).
    async fn unwrap(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey>;

    /// A fresh data key and its wrapped form. The default generates locally
    /// and calls [`KeyProvider::wrap`]; a KMS may use its own
    /// generate-data-key call.
    async fn generate_data_key(&self, context: &WrapContext<'_>) -> Result<(DataKey, WrappedKey)> {
        let key = DataKey::generate()?;
        let wrapped = self.wrap(&key, context).await?;
        Ok((key, wrapped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_key_debug_hides_bytes() {
        let key = DataKey::from_slice(&[7u8; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "DataKey([redacted])");
        assert!(DataKey::from_slice(&[0u8; 31]).is_err());
    }

    #[test]
    fn generated_keys_differ() {
        let a = DataKey::generate().unwrap();
        let b = DataKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn wrap_context_binds_every_part() {
        let s1 = SubjectId::new("a");
        let s2 = SubjectId::new("b");
        let id = DataKeyId::new();
        let kek = KekId::new("k1");
        let base = WrapContext {
            subject: &s1,
            data_key_id: id,
        }
        .associated_data(&kek);
        let other_subject = WrapContext {
            subject: &s2,
            data_key_id: id,
        }
        .associated_data(&kek);
        let other_id = WrapContext {
            subject: &s1,
            data_key_id: DataKeyId::new(),
        }
        .associated_data(&kek);
        let other_kek = WrapContext {
            subject: &s1,
            data_key_id: id,
        }
        .associated_data(&KekId::new("k2"));
        assert_ne!(base, other_subject);
        assert_ne!(base, other_id);
        assert_ne!(base, other_kek);
    }
}
