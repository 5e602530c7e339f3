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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

impl KeySpec {
    /// The spec's `keySpec` string (`AES_256`, or the backend's own name).
    pub fn name(&self) -> String {
        match self {
            KeySpec::Aes { bits } => format!("AES_{bits}"),
            KeySpec::Other(name) => name.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Enabled,
    Disabled,
}

impl KeyStatus {
    /// The spec's `keyStatus` string.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Enabled => "ENABLED",
            KeyStatus::Disabled => "DISABLED",
        }
    }
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
    pub const ALL: [HealthState; 3] = [
        HealthState::Active,
        HealthState::Degraded,
        HealthState::Unavailable,
    ];

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

    /// Phase 1 of a reload (SIGHUP, the file watch): reads and checks everything this
    /// backend applies to itself — its key file and, with `config`, the live part of
    /// its new settings ([`crate::config::reload::split_backend`]: PKCS#11 PINs and
    /// disabled keys) — and changes nothing. Blocking: the reloader calls it on a call
    /// thread for each backend that stays, and commits them all
    /// ([`CryptoBackend::commit_reload`]) only once every backend and the tenants are
    /// ready, so a reload is all or nothing across backends. On error the backend
    /// serves exactly as before.
    fn prepare_reload(
        &self,
        config: Option<&crate::config::BackendConfig>,
    ) -> Result<PreparedReload, BackendError> {
        let _ = config;
        Ok(PreparedReload::Nothing)
    }

    /// Phase 2: applies what [`CryptoBackend::prepare_reload`] checked. Cannot fail, does
    /// no I/O and does not block (a pointer swap, a lock held for a moment): it runs on
    /// an async thread. A `prepared` value of another backend's kind applies nothing.
    fn commit_reload(&self, prepared: PreparedReload) {
        let _ = prepared;
    }

    /// Both phases at once, for one backend on its own (tools, tests): re-reads its
    /// keys. On error the old state stays in force.
    fn reload(&self) -> Result<(), BackendError> {
        self.prepare_reload(None).map(|p| self.commit_reload(p))
    }

    /// Both phases at once with the live part of `config` (e.g. the PKCS#11
    /// `disabled_keys` list). Module, token and pool changes make another backend.
    fn reconfigure(&self, config: &crate::config::BackendConfig) -> Result<(), BackendError> {
        self.prepare_reload(Some(config))
            .map(|p| self.commit_reload(p))
    }

    /// How many calls the backend can serve at once (its session-pool size).
    fn concurrency(&self) -> usize {
        64
    }
}

/// A backend's reload, read and checked, waiting to be applied
/// ([`CryptoBackend::prepare_reload`]); dropping it applies nothing.
#[derive(Debug)]
#[must_use = "a prepared reload does nothing until it is committed"]
pub enum PreparedReload {
    /// Nothing to apply.
    Nothing,
    /// A software keystore file, re-read and verified.
    Software(software::PreparedKeystore),
    /// New PINs and a checked disabled-key list.
    #[cfg(feature = "pkcs11")]
    Pkcs11(pkcs11::PreparedSettings),
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

impl CallLimits {
    /// `limits.backend_deadline_ms`'s default: under KMS's 250 ms, with room for the
    /// network and the rest of the request.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(200);
    /// `limits.backend_max_waiting`'s default.
    pub const DEFAULT_MAX_WAITING: usize = 256;
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_waiting: Self::DEFAULT_MAX_WAITING,
            deadline: Self::DEFAULT_DEADLINE,
        }
    }
}

/// The only place async code calls a [`CryptoBackend`]: a permit from a semaphore sized
/// to the backend's concurrency, a bounded wait queue, the backend's own call threads,
/// and a deadline.
///
/// Why dedicated call threads rather than `tokio::task::spawn_blocking`: every call
/// through tokio's blocking pool takes its shared mutex and condvar and may wake any of
/// its idle threads; on the SoftHSM proxy that hand-off cost ~25–30 µs of CPU per
/// Encrypt. `concurrency` named threads (one per HSM session) fed by one bounded MPMC
/// channel served 26–40% more Encrypts per second on the same core (A/B in
/// benches/README.md, "Where the time goes").
///
/// Cloning is cheap; all clones share the same permits and threads. The threads end
/// when the last clone is dropped (after finishing the call they are in).
#[derive(Clone)]
pub struct Handle {
    /// The backend's name in the config (`default` for `[backend]`): the `backend`
    /// label of its metrics.
    name: Arc<str>,
    backend: Arc<dyn CryptoBackend>,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    limits: CallLimits,
    /// `None` for a backend that never blocks (called inline).
    calls: Option<crossbeam_channel::Sender<Job>>,
    /// What requests last saw of the key manager, so health follows it at once.
    availability: Arc<Availability>,
    /// How long one call has recently taken in the key manager (an exponentially
    /// weighted mean, ns; 0 until a call has returned): the wait queue's admission
    /// estimate. Calls that never return (a hung HSM) do not move it.
    service_ns: Arc<AtomicU64>,
}

/// Weight of the newest call in [`Handle`]'s service-time mean: 1/8, so one odd call
/// moves it little and a change of pace shows within a few dozen calls.
const SERVICE_EWMA_SHIFT: u32 = 3;

fn note_service_time(mean: &AtomicU64, took: Duration) {
    let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
    // Racing updates may drop a sample: harmless for an estimate.
    let old = mean.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - (old >> SERVICE_EWMA_SHIFT) + (sample >> SERVICE_EWMA_SHIFT)
    };
    mean.store(new.max(1), Ordering::Relaxed);
}

/// Whether the last request that learned anything found the key manager answering,
/// and a wake-up for whoever watches changes (the health monitor).
#[derive(Debug)]
struct Availability {
    up: std::sync::atomic::AtomicBool,
    changed: tokio::sync::Notify,
}

impl BackendError {
    /// What this outcome says about the key manager itself: `Some(true)` it answered
    /// (a key or ciphertext problem is an answer), `Some(false)` it is gone, `None`
    /// no news (slow, busy, or a failure without a better name).
    pub fn says_available(&self) -> Option<bool> {
        match self {
            BackendError::KeyNotFound
            | BackendError::KeyDisabled
            | BackendError::UsageNotAllowed(_)
            | BackendError::InvalidCiphertext => Some(true),
            BackendError::Unavailable(_) => Some(false),
            BackendError::Timeout | BackendError::Busy | BackendError::Failed(_) => None,
        }
    }
}

/// One backend call, boxed for a call thread. It owns its semaphore permit and the
/// sender of its result.
type Job = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("limits", &self.limits)
            .field("available", &self.permits.available_permits())
            .field("call_threads", &self.calls.is_some())
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
    /// A handle on `backend`, named `name` in metrics; for a backend that may block,
    /// starts its `limits.concurrency` call threads (named `xks-backend-N`).
    pub fn new(
        name: &str,
        backend: Arc<dyn CryptoBackend>,
        limits: CallLimits,
    ) -> std::io::Result<Self> {
        let concurrency = limits.concurrency.max(1);
        let calls = if backend.may_block() {
            // Capacity = permits: a job is only sent while holding a permit, and a
            // job gives its permit back only after it has left the channel, so a send
            // never finds the channel full.
            let (tx, rx) = crossbeam_channel::bounded::<Job>(concurrency);
            for n in 0..concurrency {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("xks-backend-{n}"))
                    .spawn(move || {
                        // Ends when every sender (every Handle clone) is gone.
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })?;
            }
            Some(tx)
        } else {
            None
        };
        Ok(Self {
            name: Arc::from(name),
            permits: Arc::new(Semaphore::new(concurrency)),
            waiting: Arc::new(AtomicUsize::new(0)),
            backend,
            limits,
            calls,
            availability: Arc::new(Availability {
                up: std::sync::atomic::AtomicBool::new(true),
                changed: tokio::sync::Notify::new(),
            }),
            service_ns: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Resolves when a request has found the key manager gone after it answered, or
    /// answering after it was gone. The health monitor re-checks at once instead of at
    /// its next interval, so GetHealthStatus and `/ping` follow what requests see.
    pub async fn availability_changed(&self) {
        self.availability.changed.notified().await;
    }

    /// Notes what a request's outcome says about the key manager.
    fn observe<T>(&self, result: &Result<T, BackendError>) {
        let up = match result {
            Ok(_) => Some(true),
            Err(e) => e.says_available(),
        };
        // A plain load first: every request passes here, and a write to the shared
        // flag on each would bounce its cache line between cores for no news.
        if let Some(up) = up
            && self.availability.up.load(Ordering::Relaxed) != up
            && self.availability.up.swap(up, Ordering::AcqRel) != up
        {
            self.availability.changed.notify_one();
        }
    }

    /// Runs `f` against the backend within the limits.
    ///
    /// On `Timeout` the blocking call (if started) keeps its permit until it returns,
    /// so a hung HSM can never tie up more than `concurrency` threads; a call whose
    /// caller has already timed out or gone away is not started at all.
    pub async fn call<T, F>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CryptoBackend) -> Result<T, BackendError> + Send + 'static,
    {
        let result = self.call_within(self.limits.deadline, f).await;
        self.observe(&result);
        result
    }

    /// Applies a prepared reload ([`CryptoBackend::commit_reload`]) on the calling
    /// thread: it cannot fail and does not block, so it needs no call thread.
    pub fn commit_reload(&self, prepared: PreparedReload) {
        self.backend.commit_reload(prepared);
    }

    /// [`Handle::call`] with its own budget instead of the request deadline: for work
    /// that is not a KMS request (the deep health check, a reload), which may take one
    /// round trip per token but must still end.
    pub async fn call_within<T, F>(&self, budget: Duration, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CryptoBackend) -> Result<T, BackendError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let result = self.call_inner(budget, f).await;
        metrics::histogram!("xks_backend_call_duration_seconds", "backend" => Arc::clone(&self.name))
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn call_inner<T, F>(&self, budget: Duration, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn CryptoBackend) -> Result<T, BackendError> + Send + 'static,
    {
        let Some(calls) = &self.calls else {
            return f(&*self.backend);
        };
        let deadline = tokio::time::Instant::now() + budget;
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
                if ahead >= self.limits.max_waiting || self.would_miss(ahead, budget) {
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
        let name = Arc::clone(&self.name);
        let service_ns = Arc::clone(&self.service_ns);
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let std_deadline = deadline.into_std();
        let job: Job = Box::new(move || {
            // The caller stops listening at its deadline (or when its request is
            // dropped): an HSM call nobody waits for is only load on a struggling HSM.
            let started = std::time::Instant::now();
            if result_tx.is_closed() || started >= std_deadline {
                metrics::counter!("xks_backend_calls_skipped_total", "backend" => name)
                    .increment(1);
                return;
            }
            // A panicking backend fails this call, not the thread that serves the next.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&*backend)))
                .unwrap_or_else(|_| Err(BackendError::Failed("backend call panicked".into())));
            note_service_time(&service_ns, started.elapsed());
            // The permit goes back before the answer, so a caller that makes its next
            // call the moment it has this one's answer finds the slot free (and is not
            // queued, or refused as if the key manager were still busy).
            drop(permit);
            let _ = result_tx.send(result);
        });
        if calls.try_send(job).is_err() {
            // Only when the call threads are gone (they never exit while a Handle
            // lives, and panics are caught) — or a bug in the capacity reasoning.
            return Err(BackendError::Failed(
                "backend call threads unavailable".into(),
            ));
        }
        match tokio::time::timeout_at(deadline, result_rx).await {
            Ok(Ok(result)) => result,
            // The job dropped its sender unsent: it found its deadline already passed.
            Ok(Err(_dropped)) => Err(BackendError::Timeout),
            Err(_elapsed) => Err(BackendError::Timeout),
        }
    }

    /// Whether a call with `ahead` calls queued before it would, at the recent pace,
    /// wait too long for its turn: longer than half of what its budget leaves after its
    /// own call. Such a call is refused at once (429, KMS retries later) instead of
    /// being queued to time out (503 after the whole budget). Under overload the excess
    /// is then answered in microseconds, the queue stays short enough that what it
    /// admits finishes well within the budget (the other half is the margin for a slow
    /// call or a busy runtime), and the key manager stays busy with calls whose callers
    /// still wait. Before any call has returned there is no pace yet: queue as usual.
    ///
    /// Measured (benches/overload.sh, 10x overload): without this rule the queue filled
    /// with calls that started just before their deadline and every request failed.
    fn would_miss(&self, ahead: usize, budget: Duration) -> bool {
        let service = u128::from(self.service_ns.load(Ordering::Relaxed));
        if service == 0 {
            return false;
        }
        // The `concurrency` calls in the key manager finish, on average, one every
        // service/concurrency; this call's turn comes after `ahead + 1` of them.
        let slots = self.limits.concurrency.max(1) as u128;
        let wait = service * (ahead as u128 + 1) / slots;
        let slack = budget.as_nanos().saturating_sub(service);
        wait > slack / 2
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

    /// The backend's name in the config.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The backend itself, for what is not a request (`ekm_vendor`, `concurrency`).
    pub fn backend(&self) -> &Arc<dyn CryptoBackend> {
        &self.backend
    }
}

/// Why a backend could not be opened at startup. The message already carries the inner
/// error, so it is not also a `source()`: error chains (`anyhow`'s `{:#}`) would print
/// it twice.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Config(crate::config::ConfigError),
    #[error("software keystore: {0}")]
    Software(software::KeystoreError),
    #[cfg(feature = "pkcs11")]
    #[error("PKCS#11: {0}")]
    Pkcs11(pkcs11::Pkcs11Error),
}

impl From<crate::config::ConfigError> for OpenError {
    fn from(e: crate::config::ConfigError) -> Self {
        OpenError::Config(e)
    }
}

impl From<software::KeystoreError> for OpenError {
    fn from(e: software::KeystoreError) -> Self {
        OpenError::Software(e)
    }
}

#[cfg(feature = "pkcs11")]
impl From<pkcs11::Pkcs11Error> for OpenError {
    fn from(e: pkcs11::Pkcs11Error) -> Self {
        OpenError::Pkcs11(e)
    }
}

/// Backends opened by name, ready to be put in service (`server::start`).
pub type Opened = std::collections::BTreeMap<String, Arc<dyn CryptoBackend>>;

/// A backend of the config that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("backend '{name}' ([{table}]): {error}")]
pub struct NamedOpenError {
    pub name: String,
    pub table: String,
    // Not a `source()`: `OpenError`'s message already carries its cause.
    pub error: OpenError,
}

/// Opens every backend of the config, in name order; the first that fails stops it.
pub fn open_all(backends: &[crate::config::BackendEntry]) -> Result<Opened, NamedOpenError> {
    backends
        .iter()
        .map(|b| {
            open(&b.config)
                .map(|opened| (b.name.clone(), opened))
                .map_err(|error| NamedOpenError {
                    name: b.name.clone(),
                    table: b.table.clone(),
                    error,
                })
        })
        .collect()
}

/// Opens one configured backend.
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

/// What [`open`] would find wrong, short of opening HSM sessions: the software
/// keystore is opened (master key and file) and dropped; for PKCS#11, the module file
/// and every PIN source are checked, and no module is loaded. `config check` and
/// `doctor` run it, so their OK means `serve` gets as far as the key manager.
pub fn preflight(config: &crate::config::BackendConfig) -> Result<(), OpenError> {
    use crate::config::BackendConfig;
    match config {
        BackendConfig::Software { .. } => open(config).map(drop),
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => Ok(pkcs11::Pkcs11Backend::preflight(settings)?),
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

#[cfg(test)]
mod tests {
    //! The `Handle` boundary's promises (architecture: "async code reaches blocking
    //! PKCS#11 through exactly one bounded, deadline-aware boundary"), checked with a
    //! backend whose speed the test controls. Real backends are tested through it in
    //! tests/backend_pkcs11.rs and the server tests.
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A key manager that takes `delay` per call and records how many calls overlap.
    #[derive(Debug, Default)]
    struct Paced {
        delay: Duration,
        blocks: bool,
        panic_next: AtomicBool,
        running: AtomicUsize,
        max_running: AtomicUsize,
        started: AtomicUsize,
    }

    impl Paced {
        fn blocking(delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                delay,
                blocks: true,
                ..Self::default()
            })
        }
    }

    impl CryptoBackend for Paced {
        fn key_metadata(&self, _key: &str) -> Result<KeyMetadata, BackendError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.running.fetch_sub(1, Ordering::SeqCst);
            if self.panic_next.swap(false, Ordering::SeqCst) {
                panic!("backend bug");
            }
            Ok(KeyMetadata {
                spec: KeySpec::Aes { bits: 256 },
                usages: vec![KeyUsage::Encrypt],
                status: KeyStatus::Enabled,
            })
        }
        fn encrypt(
            &self,
            _: &str,
            _: &[u8],
            _: &dyn Fn(KeyVersion) -> Vec<u8>,
        ) -> Result<Sealed, BackendError> {
            Err(BackendError::KeyNotFound)
        }
        fn decrypt(&self, _: &str, _: Opening<'_>) -> Result<SecretBytes, BackendError> {
            Err(BackendError::KeyNotFound)
        }
        fn health(&self) -> Vec<EkmHealth> {
            Vec::new()
        }
        fn ekm_vendor(&self) -> String {
            "test".into()
        }
        fn may_block(&self) -> bool {
            self.blocks
        }
    }

    fn limits(concurrency: usize, max_waiting: usize, deadline_ms: u64) -> CallLimits {
        CallLimits {
            concurrency,
            max_waiting,
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    /// The thread a metadata call ran on.
    async fn call_thread(h: &Handle) -> Result<String, BackendError> {
        h.call(|b| {
            b.key_metadata("k")?;
            Ok(std::thread::current().name().unwrap_or("").to_owned())
        })
        .await
    }

    /// Health follows the backend: a request that finds the key manager gone after it
    /// answered (or back after it was gone) wakes the watcher; outcomes that say
    /// nothing new do not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_of_availability_seen_by_a_request_wakes_the_watcher() {
        let h = Handle::new("test", Paced::blocking(Duration::ZERO), limits(1, 1, 1000))
            .expect("threads");
        let woke = |h: &Handle| {
            let h = h.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(200), h.availability_changed())
                    .await
                    .is_ok()
            }
        };
        // Up, and still up (a key problem is an answer): no news.
        let _ = h.call(|b| b.key_metadata("k")).await;
        let _ = h
            .call(|_| -> Result<(), _> { Err(BackendError::KeyNotFound) })
            .await;
        assert!(!woke(&h).await);
        // Gone: news, once.
        let gone =
            || -> Result<(), _> { Err(BackendError::Unavailable("CKR_DEVICE_REMOVED".into())) };
        let _ = h.call(move |_| gone()).await;
        assert!(woke(&h).await);
        let _ = h.call(move |_| gone()).await;
        let _ = h
            .call(|_| -> Result<(), _> { Err(BackendError::Timeout) })
            .await;
        assert!(!woke(&h).await);
        // Back: news again.
        let _ = h.call(|b| b.key_metadata("k")).await;
        assert!(woke(&h).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_backends_run_on_the_call_threads_and_others_inline() {
        let h = Handle::new("test", Paced::blocking(Duration::ZERO), limits(2, 4, 1000))
            .expect("threads");
        let name = call_thread(&h).await.expect("call");
        assert!(name.starts_with("xks-backend-"), "ran on {name:?}");

        let inline =
            Handle::new("test", Arc::new(Paced::default()), limits(2, 4, 1000)).expect("inline");
        let here = std::thread::current().name().unwrap_or("").to_owned();
        assert_eq!(call_thread(&inline).await.expect("call"), here);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_slower_than_the_deadline_is_timeout_and_keeps_its_permit_until_it_returns() {
        let backend = Paced::blocking(Duration::from_millis(300));
        let h = Handle::new("test", backend.clone(), limits(1, 4, 50)).expect("threads");
        assert_eq!(call_thread(&h).await, Err(BackendError::Timeout));
        // The HSM is still busy with it: the one permit is taken, so a hung HSM cannot
        // make the proxy pile up more calls than it has sessions.
        assert_eq!(h.in_flight(), 1);
        assert_eq!(call_thread(&h).await, Err(BackendError::Timeout));
        assert_eq!(
            backend.started.load(Ordering::SeqCst),
            1,
            "second call never started"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(h.in_flight(), 0, "permit returned when the slow call ended");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_beyond_concurrency_plus_the_wait_queue_are_refused_busy_at_once() {
        let backend = Paced::blocking(Duration::from_millis(200));
        let h = Handle::new("test", backend.clone(), limits(2, 3, 1000)).expect("threads");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let h = h.clone();
            calls.spawn(async move { call_thread(&h).await });
        }
        let (mut ok, mut busy) = (0, 0);
        while let Some(r) = calls.join_next().await {
            match r.expect("task") {
                Ok(_) => ok += 1,
                Err(BackendError::Busy) => busy += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        // 2 run, 3 wait (and run within the 1 s deadline), 3 are refused.
        assert_eq!((ok, busy), (5, 3));
        assert!(backend.max_running.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_calls_are_known_to_be_slow_a_call_that_could_not_finish_in_time_is_refused_at_once()
     {
        // 300 ms a call, one session, a 500 ms budget (slack for a loaded machine): a
        // call queued behind a running one would need about 600 ms.
        let backend = Paced::blocking(Duration::from_millis(300));
        let h = Handle::new("test", backend.clone(), limits(1, 8, 500)).expect("threads");
        assert!(
            call_thread(&h).await.is_ok(),
            "the first call sets the pace"
        );
        let running = {
            let h = h.clone();
            tokio::spawn(async move { call_thread(&h).await })
        };
        for _ in 0..1000 {
            if h.in_flight() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(h.in_flight(), 1, "the second call is in the backend");
        // Busy (429, at once), not Timeout (503 after the whole budget).
        assert_eq!(call_thread(&h).await, Err(BackendError::Busy));
        assert!(running.await.expect("task").is_ok());
        assert_eq!(
            backend.started.load(Ordering::SeqCst),
            2,
            "the refused call never reached the backend"
        );
        // With a budget the queue fits in, the same call waits its turn.
        let patient = Handle::new("test", backend.clone(), limits(1, 8, 3000)).expect("threads");
        assert!(call_thread(&patient).await.is_ok());
        let first = {
            let h = patient.clone();
            tokio::spawn(async move { call_thread(&h).await })
        };
        for _ in 0..1000 {
            if patient.in_flight() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(call_thread(&patient).await.is_ok(), "queued and served");
        assert!(first.await.expect("task").is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_backend_fails_one_call_and_the_thread_serves_the_next() {
        let backend = Paced::blocking(Duration::ZERO);
        // A generous deadline: the panic hook may print a backtrace (RUST_BACKTRACE),
        // which took over a second on a loaded machine and made the call a Timeout.
        let h = Handle::new("test", backend.clone(), limits(1, 4, 10_000)).expect("threads");
        backend.panic_next.store(true, Ordering::SeqCst);
        assert_eq!(
            call_thread(&h).await,
            Err(BackendError::Failed("backend call panicked".into()))
        );
        assert!(
            call_thread(&h).await.is_ok(),
            "the only call thread survived"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_calls_in_the_backend_than_its_concurrency() {
        let backend = Paced::blocking(Duration::from_millis(5));
        let h = Handle::new("test", backend.clone(), limits(3, 64, 5000)).expect("threads");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let h = h.clone();
            calls.spawn(async move { call_thread(&h).await });
        }
        while let Some(r) = calls.join_next().await {
            assert!(r.expect("task").is_ok());
        }
        assert_eq!(backend.started.load(Ordering::SeqCst), 40);
        assert_eq!(backend.max_running.load(Ordering::SeqCst), 3);
    }
}
