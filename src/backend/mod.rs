//! Crypto backends: the [`CryptoBackend`] trait every key manager implements, and
//! [`Handle`], the one boundary through which async code reaches a backend.
//!
//! Backends know nothing of HTTP, Base64, the spec's AAD layout or CDIV: those are spec
//! rules and live in `api`, so every backend behaves identically on the wire. A backend
//! only does AES-256-GCM with the key it is named, the AAD it is handed and the IV it
//! chooses (or the HSM chooses), and reports key metadata and its own health.

#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod software;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::secret::SecretBytes;

/// A version of a key's material. Backends without versioning (most HSMs) use 0.
/// The version travels in `ciphertextMetadata` (see `api::aad`) so rotation never
/// strands old ciphertexts.
pub type KeyVersion = u32;

/// AES-GCM authentication tag length: the spec fixes it at 16 bytes.
pub const TAG_LEN: usize = 16;

/// What a key may be used for; the spec's `keyUsage` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyUsage {
    Encrypt,
    Decrypt,
    Wrap,
    Unwrap,
    Sign,
    Verify,
    Derive,
}

impl KeyUsage {
    pub const ALL: [KeyUsage; 7] = [
        KeyUsage::Encrypt,
        KeyUsage::Decrypt,
        KeyUsage::Wrap,
        KeyUsage::Unwrap,
        KeyUsage::Sign,
        KeyUsage::Verify,
        KeyUsage::Derive,
    ];

    /// The spec's upper-case name (`ENCRYPT`, `DECRYPT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyUsage::Encrypt => "ENCRYPT",
            KeyUsage::Decrypt => "DECRYPT",
            KeyUsage::Wrap => "WRAP",
            KeyUsage::Unwrap => "UNWRAP",
            KeyUsage::Sign => "SIGN",
            KeyUsage::Verify => "VERIFY",
            KeyUsage::Derive => "DERIVE",
        }
    }

    /// Parses a spec name, case-insensitively (operators type `encrypt,decrypt`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// What kind of key a backend holds. Only `Aes { bits: 256 }` is usable by KMS; the
/// others are reported truthfully so that KMS refuses them (never claim AES_256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    Aes {
        bits: u32,
    },
    /// Anything else, named by the backend (e.g. `RSA_2048`, `GENERIC_SECRET`).
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Enabled,
    Disabled,
}

/// Metadata of one key, as GetKeyMetadata reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    pub spec: KeySpec,
    pub usages: Vec<KeyUsage>,
    pub status: KeyStatus,
}

/// The output of an AES-GCM encryption, tag already split from the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// 12 bytes from every backend we ship; the spec also allows 16.
    pub iv: Vec<u8>,
    /// Same length as the plaintext (GCM is a stream mode).
    pub ciphertext: Vec<u8>,
    pub tag: [u8; TAG_LEN],
    /// The key version that sealed it; `api` records it in `ciphertextMetadata`.
    pub key_version: KeyVersion,
}

/// The inputs of an AES-GCM decryption.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    pub key_version: KeyVersion,
    pub iv: &'a [u8],
    pub ciphertext: &'a [u8],
    pub tag: &'a [u8],
    pub aad: &'a [u8],
}

/// Health of one key-manager instance (one `ekmFleetDetails` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Active,
    Degraded,
    Unavailable,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Active => "ACTIVE",
            HealthState::Degraded => "DEGRADED",
            HealthState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// One key-manager instance's deep-check result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkmHealth {
    /// Identifies the instance to an operator (token label/serial, keystore file name).
    pub id: String,
    /// Product and version of the instance.
    pub model: String,
    pub state: HealthState,
}

/// Why a backend call failed. Messages are fixed or name only non-secret facts (a
/// PKCS#11 return-code name, a key id): they may reach an operator's log and the
/// wire's `errorMessage`, so never key material, plaintext, PINs or paths to secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("no such key in the key manager")]
    KeyNotFound,
    #[error("the key is disabled in the key manager")]
    KeyDisabled,
    #[error("the key does not allow {}", .0.as_str())]
    UsageNotAllowed(KeyUsage),
    /// Tag mismatch, wrong IV length, unknown key version: anything that means "this
    /// ciphertext does not open under this key and AAD".
    #[error("ciphertext, IV, tag, AAD or metadata do not authenticate under this key")]
    InvalidCiphertext,
    #[error("the key manager did not answer within the deadline")]
    Timeout,
    #[error("every key manager session is busy")]
    Busy,
    /// The key manager is gone (token removed, device error); recovery is under way.
    #[error("the key manager is unavailable: {0}")]
    Unavailable(String),
    /// The key manager failed in a way that has no better name.
    #[error("the key manager failed: {0}")]
    Failed(String),
}

/// A key manager doing AES-256-GCM.
///
/// Contract:
/// - Every method is **synchronous and may block** (PKCS#11 is a blocking C API).
///   Async code never calls these directly: it goes through [`Handle`], which bounds
///   concurrency and applies the deadline. A backend that never blocks says so with
///   [`CryptoBackend::may_block`] returning `false`, and `Handle` then calls it inline.
/// - Implementations are `Send + Sync` and safe to call from many threads at once.
/// - `encrypt` chooses the IV (or lets the HSM choose it), checks the key is enabled and
///   allows ENCRYPT, and asks `aad` for the AAD *for the key version it will use*,
///   so the version can be bound into the AAD by the caller.
/// - `decrypt` checks the key is enabled and allows DECRYPT; any authentication
///   failure is [`BackendError::InvalidCiphertext`].
/// - `health` runs a real round trip on a dedicated health-check key (never a
///   customer key) and returns one entry per key-manager instance (1 to 10).
pub trait CryptoBackend: Send + Sync + 'static {
    /// Metadata of `key`, or `KeyNotFound`.
    fn key_metadata(&self, key: &str) -> Result<KeyMetadata, BackendError>;

    /// Encrypts `plaintext` under the current version of `key`.
    fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        aad: &dyn Fn(KeyVersion) -> Vec<u8>,
    ) -> Result<Sealed, BackendError>;

    /// Decrypts under `key` at `opening.key_version`.
    fn decrypt(&self, key: &str, opening: Opening<'_>) -> Result<SecretBytes, BackendError>;

    /// The deep health check (see the trait doc).
    fn health(&self) -> Vec<EkmHealth>;

    /// The `ekmVendor` string of GetHealthStatus.
    fn ekm_vendor(&self) -> String;

    /// Whether calls may block the calling thread (true for HSMs).
    fn may_block(&self) -> bool {
        true
    }

    /// Re-reads keys and their state (SIGHUP). On error the old state stays in force.
    fn reload(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Applies the reloadable parts of a new backend config (e.g. the PKCS#11
    /// `disabled_keys` list). Module, token and pool changes need a restart.
    fn reconfigure(&self, config: &crate::config::BackendConfig) -> Result<(), BackendError> {
        let _ = config;
        Ok(())
    }

    /// How many calls the backend can serve at once (its session-pool size).
    fn concurrency(&self) -> usize {
        64
    }
}

/// Bounds on how async code uses a blocking backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls in flight at once (normally the backend's session-pool size).
    pub concurrency: usize,
    /// Calls that may wait for a free slot; one more is refused at once with
    /// `Busy` (ThrottlingException) instead of queueing towards KMS's 250 ms timeout.
    pub max_waiting: usize,
    /// How long one call may take, waiting included, before it is
    /// `Timeout` (DependencyTimeoutException). Under KMS's 250 ms budget.
    pub deadline: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_waiting: 256,
            deadline: Duration::from_millis(200),
        }
    }
}

/// The only place async code calls a [`CryptoBackend`]: a permit from a semaphore sized
/// to the backend's concurrency, a bounded wait queue, `spawn_blocking`, and a deadline.
///
/// Cloning is cheap; all clones share the same permits.
#[derive(Clone)]
pub struct Handle {
    backend: Arc<dyn CryptoBackend>,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    limits: CallLimits,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("limits", &self.limits)
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// Decrements the waiting count however the wait ends (success, timeout, cancel).
struct WaitGuard(Arc<AtomicUsize>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handle {
    pub fn new(backend: Arc<dyn CryptoBackend>, limits: CallLimits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            backend,
            limits,
        }
    }

    /// Runs `f` against the backend within the limits.
    ///
    /// On `Timeout` the blocking call (if started) keeps its permit until it returns,
    /// so a hung HSM can never cause more than `concurrency` threads to pile up.
    pub async fn call<T, F>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CryptoBackend) -> Result<T, BackendError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let result = self.call_inner(f).await;
        metrics::histogram!("xks_backend_call_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn call_inner<T, F>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CryptoBackend) -> Result<T, BackendError> + Send + 'static,
    {
        if !self.backend.may_block() {
            return f(&*self.backend);
        }
        let deadline = tokio::time::Instant::now() + self.limits.deadline;
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(BackendError::Busy);
                }
                let _guard = WaitGuard(Arc::clone(&self.waiting));
                match tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_closed)) => {
                        return Err(BackendError::Failed("backend call gate closed".into()));
                    }
                    Err(_elapsed) => return Err(BackendError::Timeout),
                }
            }
        };
        let backend = Arc::clone(&self.backend);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&*backend)
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(BackendError::Failed(if join.is_panic() {
                "backend call panicked".into()
            } else {
                "backend call cancelled".into()
            })),
            Err(_elapsed) => Err(BackendError::Timeout),
        }
    }

    /// Calls waiting for a permit right now (for metrics and tests).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Calls in flight right now.
    pub fn in_flight(&self) -> usize {
        self.limits.concurrency.max(1) - self.permits.available_permits()
    }

    pub fn limits(&self) -> CallLimits {
        self.limits
    }
}

/// Why a backend could not be opened at startup.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("software keystore: {0}")]
    Software(#[from] software::KeystoreError),
    #[cfg(feature = "pkcs11")]
    #[error("PKCS#11: {0}")]
    Pkcs11(#[from] pkcs11::Pkcs11Error),
}

/// Opens the configured backend.
pub fn open(config: &crate::config::BackendConfig) -> Result<Arc<dyn CryptoBackend>, OpenError> {
    use crate::config::BackendConfig;
    match config {
        BackendConfig::Software {
            keystore,
            master_key,
            simulated_latency,
        } => {
            let master = master_key_from(master_key)?;
            let backend = software::SoftwareBackend::open(keystore, master)?
                .with_simulated_latency(*simulated_latency);
            Ok(Arc::new(backend))
        }
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => Ok(Arc::new(pkcs11::Pkcs11Backend::open(settings)?)),
    }
}

/// Reads the software keystore's master key from where the config says it is.
pub fn master_key_from(
    source: &crate::config::SecretSource,
) -> Result<software::MasterKey, software::KeystoreError> {
    match source {
        crate::config::SecretSource::Env(var) => software::MasterKey::from_env(var),
        crate::config::SecretSource::File(path) => software::MasterKey::from_file(path),
    }
}
