//! [`LocalKeyring`]: key-encryption keys held in process, loaded from a file,
//! an environment variable or a [`SecretStore`]. For development and tests;
//! production deployments use a KMS-backed [`KeyProvider`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::keys::{DataKey, KEY_LEN, KekId, KeyProvider, WrapContext, WrappedKey};
use crate::secrets::SecretStore;
use crate::{Error, Result};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// The keyring document, as JSON or YAML:
/// `{"current": "kek-2", "keys": [{"id": "kek-1", "key_base64": "..."}, ...]}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    current: String,
    keys: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    key_base64: String,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.key_base64.zeroize();
    }
}

struct Kek {
    material: DataKey,
    cipher: Aes256Gcm,
}

impl Kek {
    fn new(material: DataKey) -> Self {
        let cipher = Aes256Gcm::new(material.expose_secret().into());
        Kek { material, cipher }
    }
}

struct Inner {
    current: KekId,
    keys: BTreeMap<KekId, Kek>,
}

/// A keyring of 256-bit key-encryption keys with ids, one of them current.
///
/// Wrapping uses AES-256-GCM under the current KEK with a random 96-bit
/// nonce; the associated data is [`WrapContext::associated_data`], which
/// binds the KEK id, the subject and the data key id. A wrapped key is
/// `nonce || ciphertext || tag` (60 bytes).
///
/// The keyring document (JSON or YAML) lists the keys and names the current
/// one:
///
/// ```yaml
/// current: kek-2
/// keys:
///   - id: kek-1
///     key_base64: "…32 bytes, standard base64…"
///   - id: kek-2
///     key_base64: "…"
/// ```
///
/// Rotation: [`LocalKeyring::rotate`] adds a fresh current key; after every
/// data key has been re-wrapped ([`crate::FieldEncryptor::rewrap_all`]) the old
/// key can be dropped with [`LocalKeyring::remove`].
///
/// ```
/// use chronicle_crypto::{KeyProvider, LocalKeyring};
///
/// let keyring = LocalKeyring::generate()?;
/// let first = keyring.current_key_id();
/// let second = keyring.rotate()?;
/// assert_ne!(first, second);
/// assert_eq!(keyring.current_key_id(), second);
///
/// let copy = LocalKeyring::parse(&keyring.to_json())?;
/// assert_eq!(copy.key_ids(), keyring.key_ids());
/// # Ok::<(), chronicle_crypto::Error>(())
/// ```
pub struct LocalKeyring {
    inner: RwLock<Inner>,
}

impl fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.read();
        f.debug_struct("LocalKeyring")
            .field("current", &inner.current)
            .field("keys", &inner.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl LocalKeyring {
    /// A new keyring with one freshly generated key, which is current.
    pub fn generate() -> Result<Self> {
        let id = generated_id();
        let mut keys = BTreeMap::new();
        keys.insert(id.clone(), Kek::new(DataKey::generate()?));
        Ok(LocalKeyring {
            inner: RwLock::new(Inner { current: id, keys }),
        })
    }

    /// A keyring holding one given key, which is current.
    pub fn with_key(id: impl Into<KekId>, key: DataKey) -> Result<Self> {
        let id = id.into();
        validate_id(id.as_str())?;
        let mut keys = BTreeMap::new();
        keys.insert(id.clone(), Kek::new(key));
        Ok(LocalKeyring {
            inner: RwLock::new(Inner { current: id, keys }),
        })
    }

    /// Parses a keyring document: JSON if it starts with `{`, YAML otherwise.
    pub fn parse(text: &str) -> Result<Self> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_yaml(text)
        }
    }

    /// Parses a JSON keyring document. Error messages give the location of
    /// a problem but never quote the document.
    pub fn from_json(text: &str) -> Result<Self> {
        let doc: Document = serde_json::from_str(text).map_err(|e| {
            Error::keyring(format!(
                "not a valid JSON keyring document (line {}, column {}); expected {}",
                e.line(),
                e.column(),
                EXPECTED_SHAPE
            ))
        })?;
        Self::from_document(&doc)
    }

    /// Parses a YAML keyring document. Error messages give the location of
    /// a problem but never quote the document.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let doc: Document = serde_saphyr::from_str(text).map_err(|e| {
            let at = e
                .without_snippet()
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            Error::keyring(format!(
                "not a valid YAML keyring document{at}; expected {EXPECTED_SHAPE}"
            ))
        })?;
        Self::from_document(&doc)
    }

    /// Reads a keyring file: JSON for `.json`, YAML for `.yaml`/`.yml`,
    /// otherwise by content.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading keyring {}", path.display()), e))?,
        );
        match extension(path).as_deref() {
            Some("json") => Self::from_json(&text),
            Some("yaml" | "yml") => Self::from_yaml(&text),
            _ => Self::parse(&text),
        }
    }

    /// Reads a keyring document (JSON or YAML) from an environment variable.
    pub fn from_env(var: &str) -> Result<Self> {
        let text =
            Zeroizing::new(std::env::var(var).map_err(|e| {
                Error::keyring(format!("environment variable {var} is unusable: {e}"))
            })?);
        Self::parse(&text)
    }

    /// Reads a keyring document (JSON or YAML) from a secret.
    pub async fn from_secret(store: &dyn SecretStore, name: &str) -> Result<Self> {
        let secret = store.require(name).await?;
        Self::parse(secret.expose_str().map_err(|_| Error::Secret {
            name: name.to_owned(),
            reason: "a keyring document must be UTF-8 text".into(),
        })?)
    }

    fn from_document(doc: &Document) -> Result<Self> {
        if doc.keys.is_empty() {
            return Err(Error::keyring("the keyring lists no keys"));
        }
        let mut keys = BTreeMap::new();
        for (i, entry) in doc.keys.iter().enumerate() {
            validate_id(&entry.id).map_err(|e| Error::keyring(format!("keys[{i}].id: {e}")))?;
            let bytes = Zeroizing::new(STANDARD.decode(entry.key_base64.trim()).map_err(|_| {
                Error::keyring(format!(
                    "keys[{i}] ({}): key_base64 is not valid standard base64",
                    entry.id
                ))
            })?);
            if bytes.len() != KEY_LEN {
                return Err(Error::keyring(format!(
                    "keys[{i}] ({}): a key must be {KEY_LEN} bytes (256 bits), this one is {}",
                    entry.id,
                    bytes.len()
                )));
            }
            let id = KekId::new(entry.id.clone());
            if keys
                .insert(id, Kek::new(DataKey::from_slice(&bytes)?))
                .is_some()
            {
                return Err(Error::keyring(format!(
                    "keys[{i}]: id {:?} appears more than once",
                    entry.id
                )));
            }
        }
        let current = KekId::new(doc.current.clone());
        if !keys.contains_key(&current) {
            return Err(Error::keyring(format!(
                "current key {:?} is not among the listed keys",
                doc.current
            )));
        }
        Ok(LocalKeyring {
            inner: RwLock::new(Inner { current, keys }),
        })
    }

    /// The keyring document as pretty JSON. Contains key material.
    pub fn to_json(&self) -> Zeroizing<String> {
        let doc = self.document();
        // A struct of strings always serializes.
        Zeroizing::new(serde_json::to_string_pretty(&doc).unwrap_or_default())
    }

    /// The keyring document as YAML. Contains key material.
    pub fn to_yaml(&self) -> Result<Zeroizing<String>> {
        let doc = self.document();
        serde_saphyr::to_string(&doc)
            .map(Zeroizing::new)
            .map_err(|e| Error::keyring(format!("cannot write YAML: {e}")))
    }

    /// Writes the keyring document to `path` (JSON for `.json`, YAML
    /// otherwise), atomically via a temporary file, readable only by the
    /// owner on Unix.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = match extension(path).as_deref() {
            Some("json") => self.to_json(),
            _ => self.to_yaml()?,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(ctx("removing stale"), e)),
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .map_err(|e| Error::io(ctx("creating"), e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(ctx("writing"), e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        })
    }

    fn document(&self) -> Document {
        let inner = self.read();
        Document {
            current: inner.current.as_str().to_owned(),
            keys: inner
                .keys
                .iter()
                .map(|(id, kek)| Entry {
                    id: id.as_str().to_owned(),
                    key_base64: STANDARD.encode(kek.material.expose_secret()),
                })
                .collect(),
        }
    }

    /// Adds a key (not current). Fails if the id is taken.
    pub fn add_key(&self, id: impl Into<KekId>, key: DataKey) -> Result<()> {
        let id = id.into();
        validate_id(id.as_str())?;
        let mut inner = self.write();
        if inner.keys.contains_key(&id) {
            return Err(Error::keyring(format!(
                "key id {id:?} is already in the keyring"
            )));
        }
        inner.keys.insert(id, Kek::new(key));
        Ok(())
    }

    /// Generates a new key and makes it current; returns its id. Existing
    /// keys stay, so data keys wrapped under them still unwrap.
    pub fn rotate(&self) -> Result<KekId> {
        let id = generated_id();
        let kek = Kek::new(DataKey::generate()?);
        let mut inner = self.write();
        inner.keys.insert(id.clone(), kek);
        inner.current = id.clone();
        Ok(id)
    }

    /// Makes an existing key current.
    pub fn set_current(&self, id: &KekId) -> Result<()> {
        let mut inner = self.write();
        if !inner.keys.contains_key(id) {
            return Err(Error::keyring(format!(
                "key id {id:?} is not in the keyring"
            )));
        }
        inner.current = id.clone();
        Ok(())
    }

    /// Removes a key that is not current. Data keys still wrapped under it
    /// can no longer be unwrapped: re-wrap them first.
    pub fn remove(&self, id: &KekId) -> Result<()> {
        let mut inner = self.write();
        if &inner.current == id {
            return Err(Error::keyring(format!(
                "key {id:?} is current; make another key current before removing it"
            )));
        }
        if inner.keys.remove(id).is_none() {
            return Err(Error::keyring(format!(
                "key id {id:?} is not in the keyring"
            )));
        }
        Ok(())
    }

    /// The ids of all keys, sorted.
    pub fn key_ids(&self) -> Vec<KekId> {
        self.read().keys.keys().cloned().collect()
    }

    /// Whether the keyring holds a key with this id.
    pub fn contains(&self, id: &KekId) -> bool {
        self.read().keys.contains_key(id)
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrap_now(&self, key: &DataKey, context: &WrapContext<'_>) -> Result<WrappedKey> {
        let inner = self.read();
        let kek = inner
            .keys
            .get(&inner.current)
            .ok_or_else(|| Error::UnknownKek {
                kek_id: inner.current.clone(),
            })?;
        let aad = context.associated_data(&inner.current);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        // Encrypted in place: the buffer holds ciphertext and tag afterwards.
        let mut sealed = Vec::with_capacity(KEY_LEN + TAG_LEN);
        sealed.extend_from_slice(key.expose_secret());
        kek.cipher
            .encrypt_in_place((&nonce).into(), &aad, &mut sealed)
            .map_err(|_| Error::InvalidOperation {
                reason: "AES-GCM refused to wrap the data key".into(),
            })?;
        let mut ciphertext = Vec::with_capacity(WRAPPED_LEN);
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey {
            kek_id: inner.current.clone(),
            ciphertext,
        })
    }

    fn unwrap_now(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey> {
        let inner = self.read();
        let kek = inner
            .keys
            .get(&wrapped.kek_id)
            .ok_or_else(|| Error::UnknownKek {
                kek_id: wrapped.kek_id.clone(),
            })?;
        let failed = || Error::UnwrapFailed {
            kek_id: wrapped.kek_id.clone(),
            data_key_id: context.data_key_id,
            subject: context.subject.clone(),
        };
        if wrapped.ciphertext.len() != WRAPPED_LEN {
            return Err(failed());
        }
        let (nonce, sealed) = wrapped.ciphertext.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| failed())?;
        let aad = context.associated_data(&wrapped.kek_id);
        let mut buffer = Zeroizing::new(sealed.to_vec());
        kek.cipher
            .decrypt_in_place(nonce.into(), &aad, &mut *buffer)
            .map_err(|_| failed())?;
        DataKey::from_slice(&buffer)
    }
}

#[async_trait]
impl KeyProvider for LocalKeyring {
    fn current_key_id(&self) -> KekId {
        self.read().current.clone()
    }

    async fn wrap(&self, key: &DataKey, context: &WrapContext<'_>) -> Result<WrappedKey> {
        self.wrap_now(key, context)
    }

    async fn unwrap(&self, wrapped: &WrappedKey, context: &WrapContext<'_>) -> Result<DataKey> {
        self.unwrap_now(wrapped, context)
    }
}

const EXPECTED_SHAPE: &str =
    r#"{"current": "<id>", "keys": [{"id": "<id>", "key_base64": "<32 bytes, standard base64>"}]}"#;

fn generated_id() -> KekId {
    KekId::new(format!("kek-{}", Uuid::now_v7().simple()))
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 {
        return Err(Error::keyring("a key id must be 1 to 200 characters"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::keyring(format!(
            "key id {id:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{DataKeyId, SubjectId};

    fn ctx(subject: &SubjectId) -> WrapContext<'_> {
        WrapContext {
            subject,
            data_key_id: DataKeyId::from_uuid(Uuid::nil()),
        }
    }

    #[tokio::test]
    async fn wrap_unwrap_round_trip_and_context_binding() {
        let ring = LocalKeyring::generate().unwrap();
        let alice = SubjectId::new("alice");
        let bob = SubjectId::new("bob");
        let dek = DataKey::generate().unwrap();
        let wrapped = ring.wrap(&dek, &ctx(&alice)).await.unwrap();
        assert_eq!(wrapped.kek_id, ring.current_key_id());
        assert_eq!(wrapped.ciphertext.len(), WRAPPED_LEN);
        let back = ring.unwrap(&wrapped, &ctx(&alice)).await.unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());

        // Another subject: fails authentication.
        let err = ring.unwrap(&wrapped, &ctx(&bob)).await.unwrap_err();
        assert!(matches!(err, Error::UnwrapFailed { .. }), "{err}");
    }

    #[tokio::test]
    async fn wrong_kek_with_same_id_fails_clearly() {
        let a = LocalKeyring::with_key("k1", DataKey::generate().unwrap()).unwrap();
        let b = LocalKeyring::with_key("k1", DataKey::generate().unwrap()).unwrap();
        let s = SubjectId::new("s");
        let wrapped = a
            .wrap(&DataKey::generate().unwrap(), &ctx(&s))
            .await
            .unwrap();
        let err = b.unwrap(&wrapped, &ctx(&s)).await.unwrap_err();
        assert!(matches!(err, Error::UnwrapFailed { .. }));
        let msg = err.to_string();
        assert!(msg.contains("wrong key-encryption key"), "{msg}");
        assert!(msg.contains("\"k1\""), "{msg}");

        let c = LocalKeyring::generate().unwrap();
        let err = c.unwrap(&wrapped, &ctx(&s)).await.unwrap_err();
        assert!(matches!(err, Error::UnknownKek { ref kek_id } if kek_id.as_str() == "k1"));
    }

    #[test]
    fn documents_round_trip_in_json_and_yaml() {
        let ring = LocalKeyring::generate().unwrap();
        ring.rotate().unwrap();
        let from_json = LocalKeyring::from_json(&ring.to_json()).unwrap();
        let from_yaml = LocalKeyring::from_yaml(&ring.to_yaml().unwrap()).unwrap();
        for copy in [from_json, from_yaml] {
            assert_eq!(copy.key_ids(), ring.key_ids());
            assert_eq!(copy.current_key_id(), ring.current_key_id());
        }
    }

    #[test]
    fn bad_documents_are_refused_without_echoing_keys() {
        let key = STANDARD.encode([1u8; 32]);
        let short = STANDARD.encode([1u8; 16]);
        let cases = [
            (r#"{"current":"a","keys":[]}"#.to_owned(), "lists no keys"),
            (
                format!(r#"{{"current":"b","keys":[{{"id":"a","key_base64":"{key}"}}]}}"#),
                "not among the listed keys",
            ),
            (
                format!(r#"{{"current":"a","keys":[{{"id":"a","key_base64":"{short}"}}]}}"#),
                "must be 32 bytes",
            ),
            (
                format!(
                    r#"{{"current":"a","keys":[{{"id":"a","key_base64":"{key}"}},{{"id":"a","key_base64":"{key}"}}]}}"#
                ),
                "more than once",
            ),
            (
                r#"{"current":"a","keys":[{"id":"a","key_base64":"!!"}]}"#.to_owned(),
                "not valid standard base64",
            ),
            (
                format!(r#"{{"current":"a","keys":[{{"id":"a","key":"{key}"}}]}}"#),
                "not a valid JSON keyring",
            ),
            (
                format!("current: a\nkeys:\n  - id: a\n    key_base64: [{key}]\n"),
                "not a valid YAML keyring",
            ),
        ];
        for (doc, expected) in cases {
            let err = LocalKeyring::parse(&doc).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} (wanted {expected})");
            assert!(!err.contains(&key), "error echoes key material: {err}");
        }
    }

    #[test]
    fn rotation_and_removal_rules() {
        let ring = LocalKeyring::generate().unwrap();
        let old = ring.current_key_id();
        let new = ring.rotate().unwrap();
        assert!(ring.remove(&new).is_err(), "current key cannot be removed");
        ring.remove(&old).unwrap();
        assert_eq!(ring.key_ids(), vec![new.clone()]);
        assert!(ring.set_current(&old).is_err());
        ring.add_key("manual", DataKey::generate().unwrap())
            .unwrap();
        assert!(
            ring.add_key("manual", DataKey::generate().unwrap())
                .is_err()
        );
        ring.set_current(&KekId::new("manual")).unwrap();
        assert_eq!(ring.current_key_id().as_str(), "manual");

        let known = LocalKeyring::with_key("k", DataKey::from_slice(&[9u8; 32]).unwrap()).unwrap();
        let debug = format!("{known:?}");
        assert!(debug.contains("\"k\""), "{debug}");
        assert!(!debug.contains(&STANDARD.encode([9u8; 32])), "{debug}");
    }

    #[test]
    fn file_and_env_loading() {
        let dir = std::env::temp_dir().join(format!("chronicle-crypto-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let ring = LocalKeyring::generate().unwrap();
        for name in ["ring.json", "ring.yaml"] {
            let path = dir.join(name);
            ring.write_file(&path).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            let back = LocalKeyring::from_file(&path).unwrap();
            assert_eq!(back.current_key_id(), ring.current_key_id());
        }
        std::fs::remove_dir_all(&dir).unwrap();

        let err = LocalKeyring::from_env("CHRONICLE_CRYPTO_TEST_SURELY_UNSET").unwrap_err();
        assert!(
            err.to_string()
                .contains("CHRONICLE_CRYPTO_TEST_SURELY_UNSET")
        );
    }
}
