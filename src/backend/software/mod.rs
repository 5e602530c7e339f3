//! The software keystore backend: AES-256-GCM ([`crate::crypto`]) with keys sealed at rest under
//! a master key, held unsealed only in zeroizing memory.
//!
//! # Layout
//!
//! - [`SoftwareBackend`] (this file): the [`CryptoBackend`] over an in-memory keystore
//!   snapshot that `reload` swaps atomically, plus the health check.
//! - `keystore.rs`: [`Keystore`], the file format (sealing, MAC, format version) and
//!   the admin operations behind `xks-proxy keys create|list|disable|enable|rotate`.
//! - `master_key.rs`: [`MasterKey`] and where it comes from (env var or file).
//! - `error.rs`: [`KeystoreError`], for operators (never on the wire).
//! - `gcm.rs`: AES-256-GCM over raw key bytes; `atomic.rs`: crash-safe file writes.
//!
//! The proxy only ever reads the keystore; the CLI writes it. After a CLI change,
//! [`SoftwareBackend::reload`] (SIGHUP, file watch) makes the running proxy see it.

mod atomic;
mod error;
mod gcm;
mod keystore;
mod master_key;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::crypto::rand::SystemRandom;
use arc_swap::ArcSwap;

pub use error::KeystoreError;
pub use keystore::{FORMAT_NAME, FORMAT_VERSION, KeyInfo, Keystore};
pub use master_key::{MASTER_KEY_LEN, MasterKey};

use crate::backend::{
    BackendError, CryptoBackend, EkmHealth, HealthState, KeyMetadata, KeySpec, KeyStatus, KeyUsage,
    KeyVersion, Opening, Sealed,
};
use crate::secret::SecretBytes;

/// The `ekmVendor` string of GetHealthStatus.
pub const EKM_VENDOR: &str = "xks-proxy software keystore";

/// What the health check encrypts. Fixed and public: it is a probe, not a secret.
const HEALTH_PROBE: &[u8] = b"xks-proxy software keystore health probe";
const HEALTH_AAD: &[u8] = b"xks-proxy health";

/// A keystore file read and verified by a reload's first phase, not yet in service.
pub struct PreparedKeystore(Keystore);

impl std::fmt::Debug for PreparedKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedKeystore")
            .field("keys", &self.0.len())
            .finish_non_exhaustive()
    }
}

/// The software keystore as a [`CryptoBackend`].
///
/// Never blocks (all work is in-memory AES-GCM) unless simulated latency is set.
pub struct SoftwareBackend {
    path: PathBuf,
    /// The keystore file name: the `id` of the single `ekmFleetDetails` entry.
    name: String,
    /// Kept so `reload` can re-open the file; zeroized when the backend drops.
    master: MasterKey,
    /// The current snapshot. Requests load it lock-free; `reload` swaps in a fully
    /// verified new one, so a request sees the old keystore or the new, never a mix.
    keystore: ArcSwap<Keystore>,
    /// Whether the last `reload` failed (we then keep serving the older snapshot and
    /// report DEGRADED so the operator notices their change did not take effect).
    reload_failed: AtomicBool,
    /// The health check's own key: random, generated at open, held only in memory,
    /// never written to the keystore and never a customer key. The spec asks for a
    /// dedicated test key so a health probe can never touch (or be confused with)
    /// a key behind a KMS key; an ephemeral one also needs no operator setup.
    health_key: SecretBytes,
    rng: SystemRandom,
    /// Test/demo knob: sleep this long in every key operation.
    latency: Duration,
}

impl fmt::Debug for SoftwareBackend {
    // The snapshot's Debug lists ids and flags only; the master key and the health
    // key print as "[redacted 32 bytes]".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareBackend")
            .field("path", &self.path)
            .field("keystore", &*self.keystore.load())
            .field("master", &self.master)
            .field("health_key", &self.health_key)
            .field("reload_failed", &self.reload_failed.load(Ordering::Relaxed))
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl SoftwareBackend {
    /// Opens and fully verifies the keystore at `path` (see [`Keystore::open`]).
    pub fn open(path: &Path, master: MasterKey) -> Result<Self, KeystoreError> {
        let keystore = Keystore::open(path, &master)?;
        let rng = SystemRandom::new();
        let health_key = gcm::random_key(&rng).map_err(|_| KeystoreError::Random)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            path: path.to_owned(),
            name,
            master,
            keystore: ArcSwap::from_pointee(keystore),
            reload_failed: AtomicBool::new(false),
            health_key,
            rng,
            latency: Duration::ZERO,
        })
    }

    /// Re-reads the keystore file (after `keys disable`, `keys rotate`, ...). The new
    /// file is verified completely before it replaces the old state; on any error the
    /// old state stays in service and health reports DEGRADED until a reload succeeds.
    pub fn reload(&self) -> Result<(), KeystoreError> {
        let prepared = self.read_keystore()?;
        self.apply(prepared);
        Ok(())
    }

    /// Phase 1: the keystore file, read and verified; nothing changes. A file that
    /// cannot be read marks the backend DEGRADED (the file on disk is what the operator
    /// must fix) while it keeps serving the keys it has.
    fn read_keystore(&self) -> Result<PreparedKeystore, KeystoreError> {
        match Keystore::open(&self.path, &self.master) {
            Ok(keystore) => Ok(PreparedKeystore(keystore)),
            Err(e) => {
                self.reload_failed.store(true, Ordering::Release);
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "software keystore reload failed; still serving the previously loaded keys"
                );
                Err(e)
            }
        }
    }

    /// Phase 2: swaps the verified keystore in.
    fn apply(&self, PreparedKeystore(keystore): PreparedKeystore) {
        let keys = keystore.len();
        self.keystore.store(Arc::new(keystore));
        self.reload_failed.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), keys, "software keystore reloaded");
    }

    /// Test/demo knob: sleep this long in every encrypt/decrypt/metadata call
    /// (simulates a slow key manager). Non-zero makes [`CryptoBackend::may_block`]
    /// true, so calls go through `Handle`'s call threads like a real HSM's.
    pub fn with_simulated_latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// The keystore file this backend serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys currently loaded (what a fresh `reload` last verified).
    pub fn list(&self) -> Vec<KeyInfo> {
        self.keystore.load().list()
    }

    fn simulate_latency(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }

    /// A real AES-GCM round trip on the health key: proves the RNG and the cipher
    /// work in this process right now.
    fn health_round_trip(&self) -> bool {
        // A slow key manager is slow for its health check too (the knob simulates one).
        self.simulate_latency();
        let Ok(out) = gcm::seal(&self.health_key, &self.rng, HEALTH_PROBE, HEALTH_AAD) else {
            return false;
        };
        gcm::open(
            &self.health_key,
            &out.iv,
            &out.ciphertext,
            &out.tag,
            HEALTH_AAD,
        )
        .is_ok_and(|pt| pt.expose() == HEALTH_PROBE)
    }
}

/// The checks every operation makes, in KMS's order: the key exists, is enabled,
/// and allows `usage`.
fn usable<'k>(
    keystore: &'k Keystore,
    id: &str,
    usage: KeyUsage,
) -> Result<&'k keystore::Key, BackendError> {
    let key = keystore.key(id).ok_or(BackendError::KeyNotFound)?;
    if !key.enabled {
        return Err(BackendError::KeyDisabled);
    }
    if !key.allows(usage) {
        return Err(BackendError::UsageNotAllowed(usage));
    }
    Ok(key)
}

impl CryptoBackend for SoftwareBackend {
    fn prepare_reload(
        &self,
        _config: Option<&crate::config::BackendConfig>,
    ) -> Result<super::PreparedReload, BackendError> {
        // The reason goes to the log (it names the file, never key material).
        self.read_keystore()
            .map(super::PreparedReload::Software)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn commit_reload(&self, prepared: super::PreparedReload) {
        match prepared {
            super::PreparedReload::Software(keystore) => self.apply(keystore),
            super::PreparedReload::Nothing => {}
            #[cfg(feature = "pkcs11")]
            super::PreparedReload::Pkcs11(_) => {
                debug_assert!(false, "a PKCS#11 reload committed to a software backend");
            }
        }
    }

    fn key_metadata(&self, key: &str) -> Result<KeyMetadata, BackendError> {
        self.simulate_latency();
        let keystore = self.keystore.load();
        let key = keystore.key(key).ok_or(BackendError::KeyNotFound)?;
        Ok(KeyMetadata {
            spec: KeySpec::Aes { bits: 256 },
            usages: key.usages.clone(),
            status: if key.enabled {
                KeyStatus::Enabled
            } else {
                KeyStatus::Disabled
            },
        })
    }

    fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        aad: &dyn Fn(KeyVersion) -> Vec<u8>,
    ) -> Result<Sealed, BackendError> {
        self.simulate_latency();
        let keystore = self.keystore.load();
        let version = usable(&keystore, key, KeyUsage::Encrypt)?
            .current()
            .ok_or_else(|| BackendError::Failed("the key has no versions".into()))?;
        let aad = aad(version.number);
        let out = gcm::seal(&version.material, &self.rng, plaintext, &aad)
            .map_err(|_| BackendError::Failed("AES-GCM encryption failed".into()))?;
        Ok(Sealed {
            iv: out.iv.to_vec(),
            ciphertext: out.ciphertext,
            tag: out.tag,
            key_version: version.number,
        })
    }

    fn decrypt(&self, key: &str, opening: Opening<'_>) -> Result<SecretBytes, BackendError> {
        self.simulate_latency();
        let keystore = self.keystore.load();
        // An unknown version is a property of the ciphertext (its metadata names a
        // version this key never had), so it is InvalidCiphertext, like a bad tag.
        let version = usable(&keystore, key, KeyUsage::Decrypt)?
            .version(opening.key_version)
            .ok_or(BackendError::InvalidCiphertext)?;
        // gcm::open refuses any IV but 12 bytes (we never make 16-byte ones) and any
        // tag but 16, the same way it refuses a failed authentication.
        gcm::open(
            &version.material,
            opening.iv,
            opening.ciphertext,
            opening.tag,
            opening.aad,
        )
        .map_err(|_| BackendError::InvalidCiphertext)
    }

    fn health(&self) -> Vec<EkmHealth> {
        // "Loaded" holds by construction (open fails without a verified keystore and
        // reload never unloads one); what can go wrong is a reload that failed, so
        // the running state no longer matches the file.
        let state = if !self.health_round_trip() {
            HealthState::Unavailable
        } else if self.reload_failed.load(Ordering::Acquire) {
            HealthState::Degraded
        } else {
            HealthState::Active
        };
        vec![EkmHealth {
            id: self.name.clone(),
            model: format!(
                "software keystore (xks-proxy {})",
                env!("CARGO_PKG_VERSION")
            ),
            state,
        }]
    }

    fn ekm_vendor(&self) -> String {
        EKM_VENDOR.to_owned()
    }

    fn may_block(&self) -> bool {
        !self.latency.is_zero()
    }
}
