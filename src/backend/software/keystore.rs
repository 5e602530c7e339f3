//! [`Keystore`]: the keystore file (format, sealing, integrity) and the admin
//! operations the `xks-proxy keys` CLI runs on it.
//!
//! # File format (version 1)
//!
//! ```json
//! {
//!   "format": "xks-proxy software keystore",
//!   "format_version": 1,
//!   "created": "2025-01-01T12:00:00Z",
//!   "kdf_salt": "<base64, 32 random bytes>",
//!   "key_check": "<base64, HMAC-SHA256 of a constant under the check subkey>",
//!   "keys": [
//!     {
//!       "id": "payments-key",
//!       "enabled": true,
//!       "usages": ["ENCRYPT", "DECRYPT"],
//!       "created": "2025-01-01T12:00:00Z",
//!       "versions": [
//!         { "version": 1, "created": "2025-01-01T12:00:00Z",
//!           "sealed": "<base64: IV (12) || AES-256-GCM(key material) (32) || tag (16)>" }
//!       ]
//!     }
//!   ],
//!   "mac": "<base64, HMAC-SHA256 over everything above>"
//! }
//! ```
//!
//! # Cryptography
//!
//! - HKDF-SHA256 (salt = `kdf_salt`, input = the master key) derives three independent
//!   32-byte subkeys: *seal* (AES-256-GCM over key material), *mac* (HMAC-SHA256 over
//!   the file) and *check* (the key check value). One master key thus never serves two
//!   algorithms, and a fresh salt per file makes every file's subkeys unique.
//! - Each version's material is sealed with a random IV and AAD
//!   `"xks-proxy keystore v1 key material\0" || u64_be(len(id)) || id || u32_be(version)`,
//!   so a blob copied to another key or version does not open.
//! - `mac` covers the canonical (compact, fixed field order) JSON of every other field:
//!   ids, enabled flags, usages, versions, timestamps, salt and blobs. Editing any of
//!   them by hand makes `open` fail; nothing is ever loaded partially.
//! - `key_check` lets `open` tell "wrong master key" from "file modified" for the
//!   operator: it verifies with the right key whatever the rest of the file says.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::crypto::rand::{SecureRandom, SystemRandom};
use crate::crypto::{hkdf, hmac};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::atomic;
use super::error::KeystoreError;
use super::gcm::{self, IV_LEN, KEY_LEN};
use super::master_key::MasterKey;
use crate::backend::{KeyUsage, KeyVersion, TAG_LEN};
use crate::secret::SecretBytes;

/// The `format` field: says what the file is to anyone who opens it.
pub const FORMAT_NAME: &str = "xks-proxy software keystore";

/// The `format_version` this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// A keystore file larger than this is refused before parsing: a real one holds a
/// few hundred bytes per key version.
const MAX_FILE_LEN: u64 = 64 * 1024 * 1024;

const SALT_LEN: usize = 32;
const SUBKEY_LEN: usize = 32;
const SEALED_LEN: usize = IV_LEN + KEY_LEN + TAG_LEN;

// Domain-separation labels: every derived key and every MAC'd or sealed message says
// what it is, so no output of one step can be replayed as the input of another.
const HKDF_INFO_SEAL: &[u8] = b"xks-proxy keystore v1 seal";
const HKDF_INFO_MAC: &[u8] = b"xks-proxy keystore v1 mac";
const HKDF_INFO_CHECK: &[u8] = b"xks-proxy keystore v1 key check";
const KEY_CHECK_MESSAGE: &[u8] = b"xks-proxy keystore v1 key check value";
const MAC_DOMAIN: &[u8] = b"xks-proxy keystore v1 file mac\0";
const SEAL_AAD_DOMAIN: &[u8] = b"xks-proxy keystore v1 key material\0";

/// One key as the admin CLI lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub enabled: bool,
    /// Sorted, without duplicates.
    pub usages: Vec<KeyUsage>,
    pub created: OffsetDateTime,
    /// The version new encryptions use (the newest).
    pub current_version: KeyVersion,
    pub version_count: usize,
}

// ---------------------------------------------------------------------------------
// On-disk shape. Timestamps and usages stay strings here so that the MAC is computed
// over exactly what was parsed; the typed model below is built only after the MAC
// verifies.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    format: String,
    format_version: u32,
    created: String,
    kdf_salt: String,
    key_check: String,
    keys: Vec<FileKey>,
    mac: String,
}

/// Everything but `mac`, in file order: what the MAC covers.
#[derive(Serialize)]
struct MacBody<'a> {
    format: &'a str,
    format_version: u32,
    created: &'a str,
    kdf_salt: &'a str,
    key_check: &'a str,
    keys: &'a [FileKey],
}

impl<'a> MacBody<'a> {
    fn of(doc: &'a FileDoc) -> Self {
        Self {
            format: &doc.format,
            format_version: doc.format_version,
            created: &doc.created,
            kdf_salt: &doc.kdf_salt,
            key_check: &doc.key_check,
            keys: &doc.keys,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: String,
    enabled: bool,
    usages: Vec<String>,
    created: String,
    versions: Vec<FileVersion>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: KeyVersion,
    created: String,
    sealed: String,
}

// ---------------------------------------------------------------------------------
// In-memory model.

/// The subkeys HKDF derives from the master key for one file.
struct SubKeys {
    seal: SecretBytes,
    mac: SecretBytes,
    check: SecretBytes,
}

impl SubKeys {
    fn derive(master: &MasterKey, salt: &[u8]) -> Result<Self, KeystoreError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(master.expose());
        let expand = |info: &[u8]| -> Result<SecretBytes, KeystoreError> {
            let mut out = SecretBytes::new(vec![0u8; SUBKEY_LEN]);
            prk.expand(&[info], Len(SUBKEY_LEN))
                .and_then(|okm| okm.fill(out.expose_mut()))
                .map_err(|_| KeystoreError::Crypto)?;
            Ok(out)
        };
        Ok(Self {
            seal: expand(HKDF_INFO_SEAL)?,
            mac: expand(HKDF_INFO_MAC)?,
            check: expand(HKDF_INFO_CHECK)?,
        })
    }

    fn key_check(&self) -> hmac::Tag {
        hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, self.check.expose()),
            KEY_CHECK_MESSAGE,
        )
    }

    fn mac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.mac.expose())
    }
}

/// HKDF output length (ring wants a `KeyType`).
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// One key: its flags and every version of its material, unsealed.
pub(super) struct Key {
    pub(super) enabled: bool,
    /// Sorted, without duplicates.
    pub(super) usages: Vec<KeyUsage>,
    created: OffsetDateTime,
    /// Never empty; `versions[i].number == i + 1` (checked on open, kept by rotate).
    versions: Vec<Version>,
}

pub(super) struct Version {
    pub(super) number: KeyVersion,
    created: OffsetDateTime,
    /// The sealed blob as stored, so saving never needs to re-seal.
    sealed: Vec<u8>,
    /// The unsealed AES-256 key: the only long-lived copy, wiped on drop.
    pub(super) material: SecretBytes,
}

impl Key {
    pub(super) fn allows(&self, usage: KeyUsage) -> bool {
        self.usages.contains(&usage)
    }

    /// The newest version: the one encryptions use.
    pub(super) fn current(&self) -> Option<&Version> {
        self.versions.last()
    }

    pub(super) fn version(&self, number: KeyVersion) -> Option<&Version> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.versions.get(index).filter(|v| v.number == number)
    }

    fn info(&self, id: &str) -> KeyInfo {
        KeyInfo {
            id: id.to_owned(),
            enabled: self.enabled,
            usages: self.usages.clone(),
            created: self.created,
            current_version: self.current().map_or(0, |v| v.number),
            version_count: self.versions.len(),
        }
    }
}

/// The decrypted, in-memory keystore file, and the admin operations on it.
///
/// Mutations (`create_key`, `set_enabled`, `rotate`) save the file atomically before
/// returning, and leave memory unchanged if the save fails, so memory and disk never
/// disagree. Two admin handles on one file do not silently overwrite each other:
/// `save` refuses with [`KeystoreError::ChangedOnDisk`] if the file on disk is no
/// longer the one this handle last read or wrote.
pub struct Keystore {
    path: PathBuf,
    created: OffsetDateTime,
    salt: [u8; SALT_LEN],
    subkeys: SubKeys,
    keys: BTreeMap<String, Key>,
    /// The `mac` of the file as this handle last read or wrote it (the optimistic
    /// concurrency check in `save`). Behind a mutex because `save` takes `&self`.
    disk_mac: Mutex<Option<String>>,
    rng: SystemRandom,
}

impl fmt::Debug for Keystore {
    // Lists ids and flags only: no material, no subkeys, no sealed blobs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keystore")
            .field("path", &self.path)
            .field("format_version", &FORMAT_VERSION)
            .field("keys", &self.list())
            .finish_non_exhaustive()
    }
}

impl Keystore {
    /// Creates a new, empty keystore file at `path` (mode 0600). Refuses to overwrite
    /// an existing file.
    pub fn create(path: &Path, master: &MasterKey) -> Result<Self, KeystoreError> {
        if path.exists() {
            return Err(KeystoreError::AlreadyExists {
                path: path.to_owned(),
            });
        }
        let rng = SystemRandom::new();
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt).map_err(|_| KeystoreError::Random)?;
        let store = Self {
            path: path.to_owned(),
            created: now(),
            salt,
            subkeys: SubKeys::derive(master, &salt)?,
            keys: BTreeMap::new(),
            disk_mac: Mutex::new(None),
            rng,
        };
        store.write(atomic::Mode::CreateNew)?;
        Ok(store)
    }

    /// Opens and fully verifies the keystore at `path`: format, key check, MAC, and
    /// every sealed key. Any failure refuses the whole file.
    pub fn open(path: &Path, master: &MasterKey) -> Result<Self, KeystoreError> {
        let bytes = read_bounded(path)?;
        let malformed = |reason: String| KeystoreError::Malformed {
            path: path.to_owned(),
            reason,
        };

        // Format and version first, so a future file gets "unsupported version"
        // rather than a confusing "unknown field" from the strict parse below.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(malformed(format!(
                "the \"format\" field is not {FORMAT_NAME:?}"
            )));
        }
        match value.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(KeystoreError::UnsupportedFormat {
                    path: path.to_owned(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            None => return Err(malformed("no numeric \"format_version\" field".into())),
        }
        let doc: FileDoc = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;

        let salt: [u8; SALT_LEN] = decode_b64(&doc.kdf_salt)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed("\"kdf_salt\" is not base64 of 32 bytes".into()))?;
        let subkeys = SubKeys::derive(master, &salt)?;

        let check = decode_b64(&doc.key_check).unwrap_or_default();
        if hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, subkeys.check.expose()),
            KEY_CHECK_MESSAGE,
            &check,
        )
        .is_err()
        {
            return Err(KeystoreError::WrongMasterKey {
                path: path.to_owned(),
            });
        }

        let mac = decode_b64(&doc.mac).unwrap_or_default();
        let message = mac_message(&MacBody::of(&doc))?;
        if hmac::verify(&subkeys.mac_key(), &message, &mac).is_err() {
            return Err(KeystoreError::Tampered {
                path: path.to_owned(),
            });
        }

        // Authentic from here on; anything wrong now is a bug or a forged MAC, and
        // still refuses the whole file.
        let corrupt = |reason: String| KeystoreError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let created = parse_time(&doc.created)
            .ok_or_else(|| corrupt("the keystore's \"created\" is not RFC 3339".into()))?;
        let mut keys = BTreeMap::new();
        for file_key in &doc.keys {
            let key = unseal_key(file_key, &subkeys).map_err(&corrupt)?;
            if keys.insert(file_key.id.clone(), key).is_some() {
                return Err(corrupt(format!("key id {:?} appears twice", file_key.id)));
            }
        }

        Ok(Self {
            path: path.to_owned(),
            created,
            salt,
            subkeys,
            keys,
            disk_mac: Mutex::new(Some(doc.mac)),
            rng: SystemRandom::new(),
        })
    }

    /// Adds a key with fresh random material (version 1) and saves. `usages` may be
    /// empty (a key KMS will refuse, useful for testing); duplicates are ignored.
    pub fn create_key(&mut self, id: &str, usages: &[KeyUsage]) -> Result<KeyInfo, KeystoreError> {
        if !crate::key_id::is_valid(id) {
            return Err(KeystoreError::invalid_key_id(id));
        }
        if self.keys.contains_key(id) {
            return Err(KeystoreError::KeyExists { id: id.to_owned() });
        }
        let mut usages = usages.to_vec();
        usages.sort();
        usages.dedup();
        let created = now();
        let version = self.new_version(id, 1, created)?;
        self.keys.insert(
            id.to_owned(),
            Key {
                enabled: true,
                usages,
                created,
                versions: vec![version],
            },
        );
        if let Err(e) = self.save() {
            self.keys.remove(id);
            return Err(e);
        }
        self.key_info(id)
            .ok_or_else(|| KeystoreError::NoSuchKey { id: id.to_owned() })
    }

    /// Enables or disables a key and saves. Disabled keys refuse every operation
    /// (KMS sees `InvalidStateException`) but keep their material.
    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<(), KeystoreError> {
        let key = self
            .keys
            .get_mut(id)
            .ok_or_else(|| KeystoreError::NoSuchKey { id: id.to_owned() })?;
        let before = std::mem::replace(&mut key.enabled, enabled);
        if let Err(e) = self.save() {
            if let Some(key) = self.keys.get_mut(id) {
                key.enabled = before;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Adds a new version with fresh material and saves; returns its number. New
    /// encryptions use it; older versions still decrypt what they encrypted.
    pub fn rotate(&mut self, id: &str) -> Result<KeyVersion, KeystoreError> {
        let next = self
            .keys
            .get(id)
            .ok_or_else(|| KeystoreError::NoSuchKey { id: id.to_owned() })?
            .current()
            .map_or(Some(1), |v| v.number.checked_add(1))
            .ok_or_else(|| KeystoreError::TooManyVersions { id: id.to_owned() })?;
        let version = self.new_version(id, next, now())?;
        if let Some(key) = self.keys.get_mut(id) {
            key.versions.push(version);
        }
        if let Err(e) = self.save() {
            if let Some(key) = self.keys.get_mut(id) {
                key.versions.pop();
            }
            return Err(e);
        }
        Ok(next)
    }

    /// Every key, sorted by id.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys.iter().map(|(id, key)| key.info(id)).collect()
    }

    /// One key's summary, if it exists.
    pub fn key_info(&self, id: &str) -> Option<KeyInfo> {
        self.keys.get(id).map(|key| key.info(id))
    }

    /// The file this keystore lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the keystore file was created.
    pub fn created(&self) -> OffsetDateTime {
        self.created
    }

    /// Writes the keystore to its file atomically (temp file, fsync, rename, fsync
    /// directory; mode 0600). Refuses with [`KeystoreError::ChangedOnDisk`] if another
    /// handle changed the file since this one read or wrote it.
    pub fn save(&self) -> Result<(), KeystoreError> {
        let expected = self
            .disk_mac
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Best effort: a writer racing between this read and our rename can still
        // win, but the common case (two operators, minutes apart) is caught.
        if current_disk_mac(&self.path)? != expected {
            return Err(KeystoreError::ChangedOnDisk {
                path: self.path.clone(),
            });
        }
        self.write(atomic::Mode::Replace)
    }

    /// Looks a key up for the request path.
    pub(super) fn key(&self, id: &str) -> Option<&Key> {
        self.keys.get(id)
    }

    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    fn new_version(
        &self,
        id: &str,
        number: KeyVersion,
        created: OffsetDateTime,
    ) -> Result<Version, KeystoreError> {
        let material = gcm::random_key(&self.rng).map_err(|_| KeystoreError::Random)?;
        let out = gcm::seal(
            &self.subkeys.seal,
            &self.rng,
            material.expose(),
            &seal_aad(id, number),
        )
        .map_err(|_| KeystoreError::Crypto)?;
        let mut sealed = Vec::with_capacity(SEALED_LEN);
        sealed.extend_from_slice(&out.iv);
        sealed.extend_from_slice(&out.ciphertext);
        sealed.extend_from_slice(&out.tag);
        Ok(Version {
            number,
            created,
            sealed,
            material,
        })
    }

    fn to_doc(&self) -> Result<FileDoc, KeystoreError> {
        let time = |t: OffsetDateTime| format_time(t, &self.path);
        let mut keys = Vec::with_capacity(self.keys.len());
        for (id, key) in &self.keys {
            let mut versions = Vec::with_capacity(key.versions.len());
            for v in &key.versions {
                versions.push(FileVersion {
                    version: v.number,
                    created: time(v.created)?,
                    sealed: STANDARD.encode(&v.sealed),
                });
            }
            keys.push(FileKey {
                id: id.clone(),
                enabled: key.enabled,
                usages: key.usages.iter().map(|u| u.as_str().to_owned()).collect(),
                created: time(key.created)?,
                versions,
            });
        }
        let mut doc = FileDoc {
            format: FORMAT_NAME.to_owned(),
            format_version: FORMAT_VERSION,
            created: time(self.created)?,
            kdf_salt: STANDARD.encode(self.salt),
            key_check: STANDARD.encode(self.subkeys.key_check()),
            keys,
            mac: String::new(),
        };
        let tag = hmac::sign(&self.subkeys.mac_key(), &mac_message(&MacBody::of(&doc))?);
        doc.mac = STANDARD.encode(tag);
        Ok(doc)
    }

    fn write(&self, mode: atomic::Mode) -> Result<(), KeystoreError> {
        let doc = self.to_doc()?;
        let mut json = serde_json::to_vec_pretty(&doc).map_err(|e| KeystoreError::Io {
            action: "serialize",
            path: self.path.clone(),
            cause: io::Error::other(e),
        })?;
        json.push(b'\n');
        atomic::write(&self.path, &json, mode)?;
        *self.disk_mac.lock().unwrap_or_else(PoisonError::into_inner) = Some(doc.mac);
        Ok(())
    }
}

/// Turns one file key into the model, unsealing every version.
fn unseal_key(file_key: &FileKey, subkeys: &SubKeys) -> Result<Key, String> {
    let id = &file_key.id;
    if !crate::key_id::is_valid(id) {
        return Err(format!("invalid key id {id:?}"));
    }
    let mut usages = Vec::with_capacity(file_key.usages.len());
    for name in &file_key.usages {
        let usage = KeyUsage::parse(name)
            .filter(|u| u.as_str() == name)
            .ok_or_else(|| format!("key {id:?} has an unknown usage {name:?}"))?;
        usages.push(usage);
    }
    usages.sort();
    usages.dedup();
    if usages.len() != file_key.usages.len() {
        return Err(format!("key {id:?} lists a usage twice"));
    }
    let created = parse_time(&file_key.created)
        .ok_or_else(|| format!("key {id:?} has a \"created\" that is not RFC 3339"))?;
    if file_key.versions.is_empty() {
        return Err(format!("key {id:?} has no versions"));
    }
    let mut versions = Vec::with_capacity(file_key.versions.len());
    for (expected, fv) in (1..).zip(&file_key.versions) {
        if fv.version != expected {
            return Err(format!(
                "key {id:?}: versions must be numbered 1, 2, 3, ... in order"
            ));
        }
        let created = parse_time(&fv.created).ok_or_else(|| {
            format!("key {id:?} version {expected} has a \"created\" that is not RFC 3339")
        })?;
        let sealed = decode_b64(&fv.sealed)
            .filter(|s| s.len() == SEALED_LEN)
            .ok_or_else(|| {
                format!("key {id:?} version {expected}: sealed material is malformed")
            })?;
        let (iv, rest) = sealed.split_at(IV_LEN);
        let (ciphertext, tag) = rest.split_at(KEY_LEN);
        let material = gcm::open(&subkeys.seal, iv, ciphertext, tag, &seal_aad(id, expected))
            .ok()
            .filter(|m| m.len() == KEY_LEN)
            .ok_or_else(|| {
                format!(
                    "key {id:?} version {expected}: sealed material does not open (it belongs to another key or version)"
                )
            })?;
        versions.push(Version {
            number: expected,
            created,
            sealed,
            material,
        });
    }
    Ok(Key {
        enabled: file_key.enabled,
        usages,
        created,
        versions,
    })
}

/// The sealing AAD: binds a blob to its key id and version.
fn seal_aad(id: &str, version: KeyVersion) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SEAL_AAD_DOMAIN.len() + 8 + id.len() + 4);
    aad.extend_from_slice(SEAL_AAD_DOMAIN);
    // A length prefix, so no (id, version) pair encodes like another.
    aad.extend_from_slice(&(id.len() as u64).to_be_bytes());
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// What the file MAC signs: a domain label, then the canonical body JSON. serde_json
/// writes struct fields in declaration order with fixed escaping, so the same parsed
/// document always yields the same bytes, whatever whitespace the file had.
fn mac_message(body: &MacBody<'_>) -> Result<Vec<u8>, KeystoreError> {
    let mut message = MAC_DOMAIN.to_vec();
    serde_json::to_writer(&mut message, body).map_err(|_| KeystoreError::Crypto)?;
    Ok(message)
}

/// Reads the keystore, mapping "missing" to its own error and refusing huge files.
fn read_bounded(path: &Path) -> Result<Vec<u8>, KeystoreError> {
    use std::io::Read as _;
    let io_err = |action: &'static str| {
        move |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                KeystoreError::NotFound {
                    path: path.to_owned(),
                }
            } else {
                KeystoreError::Io {
                    action,
                    path: path.to_owned(),
                    cause: source,
                }
            }
        }
    };
    let file = std::fs::File::open(path).map_err(io_err("open"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read"))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(KeystoreError::Malformed {
            path: path.to_owned(),
            reason: format!("larger than {MAX_FILE_LEN} bytes"),
        });
    }
    Ok(bytes)
}

/// The `mac` field of the file on disk now (`None` if there is no file), for the
/// optimistic concurrency check in `save`.
fn current_disk_mac(path: &Path) -> Result<Option<String>, KeystoreError> {
    let bytes = match read_bounded(path) {
        Ok(bytes) => bytes,
        Err(KeystoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("mac")?.as_str().map(str::to_owned)))
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

/// Now, to the second: sub-second precision only adds noise to the file.
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

fn format_time(t: OffsetDateTime, path: &Path) -> Result<String, KeystoreError> {
    t.format(&Rfc3339).map_err(|_| KeystoreError::Corrupt {
        path: path.to_owned(),
        reason: "a timestamp is outside what RFC 3339 can express".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        (dir, path)
    }

    /// Rewrites the file through `edit` and re-signs it with the right MAC, so a test
    /// can reach the checks that sit behind the MAC.
    fn edit_and_resign(path: &Path, master: &MasterKey, edit: impl FnOnce(&mut FileDoc)) {
        let mut doc: FileDoc =
            serde_json::from_slice(&std::fs::read(path).expect("read")).expect("parse");
        edit(&mut doc);
        let salt = decode_b64(&doc.kdf_salt).expect("salt");
        let subkeys = SubKeys::derive(master, &salt).expect("derive");
        let tag = hmac::sign(
            &subkeys.mac_key(),
            &mac_message(&MacBody::of(&doc)).expect("msg"),
        );
        doc.mac = STANDARD.encode(tag);
        std::fs::write(path, serde_json::to_vec(&doc).expect("ser")).expect("write");
    }

    #[test]
    fn sealed_blob_is_bound_to_its_key_id_even_with_a_valid_mac() {
        let (_dir, path) = temp();
        let master = MasterKey::generate();
        let mut ks = Keystore::create(&path, &master).expect("create");
        ks.create_key("a", &[KeyUsage::Encrypt]).expect("a");
        ks.create_key("b", &[KeyUsage::Encrypt]).expect("b");
        edit_and_resign(&path, &master, |doc| {
            let a = doc.keys[0].versions[0].sealed.clone();
            doc.keys[0].versions[0].sealed = doc.keys[1].versions[0].sealed.clone();
            doc.keys[1].versions[0].sealed = a;
        });
        let err = Keystore::open(&path, &master).expect_err("swapped blobs must not open");
        assert!(matches!(err, KeystoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("does not open"), "{err}");
    }

    #[test]
    fn sealed_blob_is_bound_to_its_version() {
        let (_dir, path) = temp();
        let master = MasterKey::generate();
        let mut ks = Keystore::create(&path, &master).expect("create");
        ks.create_key("a", &[KeyUsage::Encrypt]).expect("a");
        ks.rotate("a").expect("rotate");
        edit_and_resign(&path, &master, |doc| {
            doc.keys[0].versions.swap(0, 1);
            doc.keys[0].versions[0].version = 1;
            doc.keys[0].versions[1].version = 2;
        });
        let err = Keystore::open(&path, &master).expect_err("swapped versions");
        assert!(matches!(err, KeystoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn version_numbering_and_usages_are_validated_behind_the_mac() {
        let (_dir, path) = temp();
        let master = MasterKey::generate();
        let mut ks = Keystore::create(&path, &master).expect("create");
        ks.create_key("a", &[KeyUsage::Encrypt]).expect("a");
        edit_and_resign(&path, &master, |doc| doc.keys[0].versions[0].version = 2);
        assert!(matches!(
            Keystore::open(&path, &master),
            Err(KeystoreError::Corrupt { .. })
        ));
        edit_and_resign(&path, &master, |doc| {
            doc.keys[0].versions[0].version = 1;
            doc.keys[0].usages = vec!["encrypt".into()];
        });
        assert!(matches!(
            Keystore::open(&path, &master),
            Err(KeystoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn material_is_redacted_from_debug() {
        let (_dir, path) = temp();
        let master = MasterKey::generate();
        let mut ks = Keystore::create(&path, &master).expect("create");
        ks.create_key("a", &[KeyUsage::Encrypt, KeyUsage::Decrypt])
            .expect("a");
        let material = ks
            .key("a")
            .and_then(Key::current)
            .expect("v1")
            .material
            .clone();
        let dbg = format!("{ks:?} {ks:#?}");
        assert!(!dbg.contains(&STANDARD.encode(material.expose())), "{dbg}");
        assert!(!dbg.contains(&hex::encode(material.expose())), "{dbg}");
        assert!(
            !dbg.contains(&hex::encode(ks.subkeys.seal.expose())),
            "{dbg}"
        );
        assert!(dbg.contains("\"a\""), "ids are listed: {dbg}");
    }

    #[test]
    fn version_lookup() {
        let (_dir, path) = temp();
        let master = MasterKey::generate();
        let mut ks = Keystore::create(&path, &master).expect("create");
        ks.create_key("a", &[]).expect("a");
        assert_eq!(ks.rotate("a").expect("rotate"), 2);
        let key = ks.key("a").expect("a");
        assert_eq!(key.current().map(|v| v.number), Some(2));
        assert!(key.version(0).is_none());
        assert_eq!(key.version(1).map(|v| v.number), Some(1));
        assert!(key.version(3).is_none());
        assert!(key.version(u32::MAX).is_none());
    }
}
