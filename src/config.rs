//! Configuration: TOML → [`RawConfig`] (serde, `deny_unknown_fields`) → [`RawConfig::validate`]
//! → typed [`Config`]. Every key has a doc line and a default where one is sane; a bad
//! config is refused before anything binds, with an error naming the key and the problem.
//!
//! Secrets (SigV4 secrets, the master key, HSM PINs) are never inline: the TOML names an
//! environment variable or a file, and validation reads them into zeroizing types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::SecretString;

/// A config that failed to load or validate: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// The spec's suffix after a path prefix.
pub const XKS_BASE: &str = "/kms/xks/v1";

// ---------------------------------------------------------------------------------------
// Raw (as written in TOML)
// ---------------------------------------------------------------------------------------

/// The file as written. Field docs are the reference for operators (see
/// `config/xks-proxy.toml` for the commented version).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub sigv4: RawSigv4,
    #[serde(default)]
    pub logging: RawLogging,
    #[serde(default)]
    pub limits: RawLimits,
    /// The key manager, named `default`. With `backends`, one more named key manager.
    pub backend: Option<RawBackend>,
    /// Named key managers (`[backends.hsm-a]`, ...), each shaped like `[backend]`; every
    /// `[[keystores]]` names the one it uses (`backend = "hsm-a"`).
    #[serde(default)]
    pub backends: BTreeMap<String, RawBackend>,
    /// The admin listener (Prometheus metrics). Off unless `[admin] listen` is set.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Secondary authorization (Cedar). Off unless `[policy] file` is set.
    pub policy: Option<RawPolicy>,
    /// Automatic reload when the config, secret or keystore files change.
    #[serde(default)]
    pub reload: RawReload,
    /// One entry per path prefix (logical keystore / tenant).
    #[serde(default)]
    pub keystores: Vec<RawKeystore>,
    /// The tamper-evident audit trail (one hash-chained record per authenticated XKS
    /// request). Off unless the table is present (and `enabled` is not false).
    pub audit: Option<RawAudit>,
}

/// `[audit]`: see `crate::audit` and the README's "Audit trail".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Write the audit trail (default true when the table is present).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of the `audit-*.jsonl` files (created if missing).
    pub directory: PathBuf,
    /// File holding the checkpoint key (HMAC-SHA256; at least 32 characters). Exactly
    /// one of this and `key_env`.
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the checkpoint key.
    pub key_env: Option<String>,
    /// Start a new file when the current one reaches this size. 0: never by size.
    #[serde(default = "default_audit_rotate_bytes")]
    pub rotate_bytes: u64,
    /// Start a new file when the current one is this old. 0: never by age.
    #[serde(default = "default_audit_rotate_interval")]
    pub rotate_interval_secs: u64,
    /// Records waiting for the writer; a request finding it full is refused (fail
    /// closed) or its record dropped and counted (continue).
    #[serde(default = "default_audit_queue")]
    pub queue_capacity: usize,
    /// "fail_closed" (default: 503 when a record cannot be queued or written) or
    /// "continue" (answer anyway; count the dropped record).
    #[serde(default = "default_audit_on_failure")]
    pub on_failure: String,
    /// "never", "interval" (default: at every checkpoint) or "every_record" (the answer
    /// waits until its record is written and synced).
    #[serde(default = "default_audit_fsync")]
    pub fsync: String,
    /// Seconds between signed checkpoints (only when records were written since).
    #[serde(default = "default_audit_checkpoint")]
    pub checkpoint_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address of the XKS listener, e.g. "0.0.0.0:443" or "127.0.0.1:8443". Port 0 picks one.
    pub listen: String,
    /// TLS certificate chain and key. Required unless `insecure_plain_http` is true.
    pub tls: Option<RawTls>,
    /// Serve plain HTTP instead of TLS. Only for a TLS-terminating load balancer in front.
    #[serde(default)]
    pub insecure_plain_http: bool,
    /// Optional extra plain-HTTP listener answering only `GET /ping` (load-balancer checks).
    pub ping_listen: Option<String>,
    /// Largest accepted request body. The spec's largest legal body is about 20 KiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Time allowed for a TLS handshake; for a new connection's first request to
    /// arrive; and, once a request's first byte has arrived, for its head to complete.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_ms: u64,
    /// Time allowed for a request's whole body to arrive, counted from its head. KMS
    /// sends about 1 KiB at once; a slow body holds nothing scarce, but no longer.
    #[serde(default = "default_body_timeout")]
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection that has carried an authenticated request and has none in
    /// flight is closed after this long idle. Connections that never authenticated a
    /// request get `header_read_timeout_ms` instead.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// Open connections above this are refused (closed right after accept).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one source (an IPv4 address, or an IPv6 /64) above this are
    /// refused, so one host cannot take every slot. Behind a load balancer that does not
    /// preserve client addresses, every connection comes from the balancer: raise it.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Open connections to the plain-HTTP `/ping` listener (and the admin listener)
    /// above this are refused.
    #[serde(default = "default_ping_max_connections")]
    pub ping_max_connections: usize,
    /// Requests being processed at once, all prefixes together; the excess gets 429
    /// ThrottlingException at once (load shedding) instead of queueing into KMS's timeout.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Refuse to start unless every cryptographic operation of the proxy runs on a FIPS
    /// 140-3 validated module: a build without the `fips` feature fails validation
    /// (`config check`, `serve` and a reload). README, "Compliance".
    #[serde(default)]
    pub require_fips: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Turns the admin listener on at [`DEFAULT_ADMIN_LISTEN`] (loopback) when `listen`
    /// is not given; `false` turns it off even if `listen` is set. Default: on only if
    /// `listen` is set.
    pub enabled: Option<bool>,
    /// Address of the admin listener serving `GET /metrics` (Prometheus text) and
    /// `GET /ping`: `"IP:port"`, or a bare port for loopback (`9464` or `"9464"` =
    /// 127.0.0.1:9464). Keep it on loopback or a private network.
    pub listen: Option<PortOrAddress>,
}

/// A listen setting written as a TOML integer (a port) or a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortOrAddress {
    Port(u16),
    Address(String),
}

/// Where the admin listener binds when it is enabled without an address: loopback, so
/// metrics are never exposed by accident. 9464 is Prometheus' customary exporter port.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// A Cedar policy file (see config/policies/). GetHealthStatus is always exempt.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    /// If set, check the config, secret, policy, TLS and keystore files this often and
    /// reload when one changed (as SIGHUP does). 0 or absent: reload on SIGHUP only.
    #[serde(default)]
    pub watch_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain (leaf first). ECDSA P-256 or RSA.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// mTLS: PEM bundle of CAs trusted to issue client certificates. When set, every
    /// client must present a certificate chaining to it, or the handshake is refused.
    pub client_ca: Option<PathBuf>,
    /// mTLS: names one of which the client certificate must carry (CN or DNS SAN), e.g.
    /// "cks.kms.us-east-1.amazonaws.com". Required when client_ca is set.
    pub client_subjects: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `xksProxyFleetSize`: how many proxy instances serve this endpoint.
    #[serde(default = "default_fleet_size")]
    pub fleet_size: u32,
    /// `xksProxyVendor`.
    #[serde(default = "default_vendor")]
    pub vendor: String,
    /// How often the backend's deep health check runs (the spec allows answers ≤ 60 s old).
    #[serde(default = "default_health_interval")]
    pub check_interval_secs: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            fleet_size: default_fleet_size(),
            vendor: default_vendor(),
            check_interval_secs: default_health_interval(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigv4 {
    /// If set, only these regions may appear in a request's credential scope.
    pub regions: Option<Vec<String>>,
    /// Largest accepted distance between X-Amz-Date and our clock (spec: 5 minutes).
    pub max_clock_skew_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// "human" or "json".
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter, e.g. "info" or "xks_proxy=debug,info". RUST_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// One backend call's deadline, queueing included (KMS allows 250 ms per request).
    #[serde(default = "default_deadline")]
    pub backend_deadline_ms: u64,
    /// Backend calls that may wait for a free session; more get ThrottlingException at once.
    #[serde(default = "default_max_waiting")]
    pub backend_max_waiting: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            backend_deadline_ms: default_deadline(),
            backend_max_waiting: default_max_waiting(),
        }
    }
}

/// Which key manager; `kind` selects the variant.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawBackend {
    /// The software keystore: AES-256 keys sealed under a master key in one file.
    Software {
        /// The keystore file (created by `xks-proxy keys create`).
        keystore: PathBuf,
        /// Environment variable holding the Base64 master key. Exactly one of this and
        /// `master_key_file`.
        master_key_env: Option<String>,
        /// File holding the master key (Base64 text or 32 raw bytes), mode 0600.
        master_key_file: Option<PathBuf>,
        /// Test/demo knob: add this much latency to every key operation.
        #[serde(default)]
        simulated_latency_ms: u64,
    },
    /// An HSM over PKCS#11.
    #[cfg(feature = "pkcs11")]
    Pkcs11(crate::backend::pkcs11::Pkcs11Settings),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeystore {
    /// The path prefix before `/kms/xks/v1`: "" (none) or "/name[/name...]".
    pub path_prefix: String,
    /// SigV4 credentials accepted for this prefix; two or more during a rotation.
    pub credentials: Vec<RawCredential>,
    /// The external key ids this keystore serves, and no other keystore may (others:
    /// 404). Absent with a single keystore: every key of the backend. With more than one
    /// keystore, each must name its keys here or in `shared_keys` (`[]` for none).
    pub allowed_keys: Option<Vec<String>>,
    /// External key ids this keystore serves together with other keystores: the explicit
    /// opt-in to sharing. Every keystore that serves a shared key lists it here.
    pub shared_keys: Option<Vec<String>>,
    /// Requests per second this prefix may send (token bucket); the excess gets 429
    /// ThrottlingException. Absent: unlimited. KMS's default quota is 1800.
    pub quota_rps: Option<u32>,
    /// Burst size of the bucket (default: one second's worth, `quota_rps`).
    pub quota_burst: Option<u32>,
    /// Migration from AWS's sample proxy (aws-samples/aws-kms-xks-proxy): Decrypt also
    /// opens the ciphertexts it made for this prefix. New encryptions always use this
    /// project's scheme. PKCS#11 backends only (the sample had no other).
    pub aws_sample_ciphertexts: Option<RawAwsSample>,
    /// The key manager this prefix uses: a `[backends.NAME]`, or `default` for
    /// `[backend]`. Absent: the only configured backend, else `default`.
    pub backend: Option<String>,
}

/// `[keystores.aws_sample_ciphertexts]`: what identifies the sample's ciphertexts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsSample {
    /// The sample's `[server] ciphertext_metadata_b64`, exactly as it was configured:
    /// the `ciphertextMetadata` every one of its ciphertexts carries. `""` if it was
    /// unset (its ciphertexts then carry none).
    pub ciphertext_metadata_b64: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// 20–30 characters of A–Z and 2–7 (KMS's rule).
    pub access_key_id: String,
    /// Environment variable holding the secret. Exactly one of this and `secret_file`.
    pub secret_env: Option<String>,
    /// File holding the secret (surrounding whitespace ignored).
    pub secret_file: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}
fn default_audit_rotate_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_audit_rotate_interval() -> u64 {
    86_400
}
fn default_audit_queue() -> usize {
    4096
}
fn default_audit_on_failure() -> String {
    "fail_closed".into()
}
fn default_audit_fsync() -> String {
    "interval".into()
}
fn default_audit_checkpoint() -> u64 {
    60
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    120_000
}
fn default_body_timeout() -> u64 {
    1_000
}
fn default_max_connections_per_source() -> usize {
    256
}
/// The default `server.http2_max_concurrent_streams`.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 64;
fn default_h2_streams() -> u32 {
    DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS
}
fn default_ping_max_connections() -> usize {
    64
}
fn default_grace() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_fleet_size() -> u32 {
    1
}
fn default_vendor() -> String {
    "xks-proxy (open source)".into()
}
fn default_health_interval() -> u64 {
    20
}
fn default_log_format() -> String {
    "human".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_deadline() -> u64 {
    crate::backend::CallLimits::DEFAULT_DEADLINE.as_millis() as u64
}
fn default_max_waiting() -> usize {
    crate::backend::CallLimits::DEFAULT_MAX_WAITING
}

// ---------------------------------------------------------------------------------------
// Typed (validated)
// ---------------------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub health: HealthConfig,
    pub sigv4: crate::sigv4::VerifyPolicy,
    pub logging: LoggingConfig,
    pub limits: crate::backend::CallLimits,
    /// Every key manager, in name order; each is used by at least one keystore.
    pub backends: Vec<BackendEntry>,
    pub keystores: Vec<KeystoreConfig>,
    pub admin_listen: Option<SocketAddr>,
    pub policy_file: Option<PathBuf>,
    pub reload_watch: Option<Duration>,
    /// Files whose change triggers a reload when watching (config, secrets, TLS, policy,
    /// keystore). The config file itself is added by [`Config::load`].
    pub watched_files: Vec<PathBuf>,
    /// The audit trail, when enabled (restart-only).
    pub audit: Option<AuditConfig>,
}

/// What the audit trail does when a record cannot be queued or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOnFailure {
    /// The request gets 503 and the reason is logged: no key use goes unrecorded.
    FailClosed,
    /// The request is answered; the lost record is counted (and noted in the chain).
    Continue,
}

/// When the audit writer calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFsync {
    Never,
    /// At each checkpoint, rotation and shutdown.
    Interval,
    /// After each batch of records, before their requests are answered.
    EveryRecord,
}

/// A validated `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub directory: PathBuf,
    /// The checkpoint HMAC key (redacted `Debug`, zeroized).
    pub key: SecretString,
    pub key_source: SecretSource,
    /// `None`: never by size.
    pub rotate_bytes: Option<u64>,
    /// `None`: never by age.
    pub rotate_interval: Option<Duration>,
    pub queue_capacity: usize,
    pub on_failure: AuditOnFailure,
    pub fsync: AuditFsync,
    pub checkpoint_interval: Duration,
}

/// The shortest audit key accepted: 32 characters (`openssl rand -base64 32` gives 44).
pub const MIN_AUDIT_KEY_LEN: usize = 32;

impl RawAudit {
    /// Checks `[audit]` and reads its key; `None` when disabled.
    pub fn validate(self, base: &Path) -> Result<Option<AuditConfig>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.directory.as_os_str().is_empty() {
            return Err(ConfigError::new("audit.directory", "must not be empty"));
        }
        let key_source = SecretSource::from_pair(
            "audit.key_file",
            self.key_env.as_ref(),
            self.key_file.as_ref(),
            base,
        )?;
        let key_name = match key_source {
            SecretSource::Env(_) => "audit.key_env",
            SecretSource::File(_) => "audit.key_file",
        };
        let key = key_source.read(key_name)?;
        if key.len() < MIN_AUDIT_KEY_LEN {
            return Err(ConfigError::new(
                key_name,
                format!(
                    "the key is shorter than {MIN_AUDIT_KEY_LEN} characters (make one with `openssl rand -base64 32`)"
                ),
            ));
        }
        if self.rotate_bytes != 0 && self.rotate_bytes < 4096 {
            return Err(ConfigError::new(
                "audit.rotate_bytes",
                "must be 0 (never by size) or at least 4096",
            ));
        }
        if !(1..=1_000_000).contains(&self.queue_capacity) {
            return Err(ConfigError::new(
                "audit.queue_capacity",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=86_400).contains(&self.checkpoint_interval_secs) {
            return Err(ConfigError::new(
                "audit.checkpoint_interval_secs",
                "must be between 1 and 86400",
            ));
        }
        let on_failure = match self.on_failure.as_str() {
            "fail_closed" => AuditOnFailure::FailClosed,
            "continue" => AuditOnFailure::Continue,
            other => {
                return Err(ConfigError::new(
                    "audit.on_failure",
                    format!("'{other}' is not one of fail_closed, continue"),
                ));
            }
        };
        let fsync = match self.fsync.as_str() {
            "never" => AuditFsync::Never,
            "interval" => AuditFsync::Interval,
            "every_record" => AuditFsync::EveryRecord,
            other => {
                return Err(ConfigError::new(
                    "audit.fsync",
                    format!("'{other}' is not one of never, interval, every_record"),
                ));
            }
        };
        Ok(Some(AuditConfig {
            directory: base.join(&self.directory),
            key,
            key_source,
            rotate_bytes: (self.rotate_bytes != 0).then_some(self.rotate_bytes),
            rotate_interval: (self.rotate_interval_secs != 0)
                .then(|| Duration::from_secs(self.rotate_interval_secs)),
            queue_capacity: self.queue_capacity,
            on_failure,
            fsync,
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs),
        }))
    }
}

/// mTLS: which client certificates may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    pub ca: PathBuf,
    pub subjects: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// None only when the operator asked for plain HTTP.
    pub tls: Option<TlsConfig>,
    /// mTLS, enforced inside the TLS handshake.
    pub client_auth: Option<ClientAuthConfig>,
    pub ping_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub http2_max_concurrent_streams: u32,
    pub ping_max_connections: usize,
    pub max_in_flight: usize,
    /// `require_fips`: checked again at start against the module's own state.
    pub require_fips: bool,
}

/// Where the TLS certificate and key come from.
#[derive(Debug, Clone)]
pub enum TlsConfig {
    Files {
        certificate: PathBuf,
        private_key: PathBuf,
    },
    /// PEM bytes compiled into the binary (the demo's dev certificate only).
    Embedded {
        certificate: &'static [u8],
        private_key: &'static [u8],
    },
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub fleet_size: u32,
    pub vendor: String,
    pub check_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    fn from_pair(
        key: &str,
        env: Option<&String>,
        file: Option<&PathBuf>,
        base: &Path,
    ) -> Result<Self, ConfigError> {
        match (env, file) {
            (Some(e), None) if !e.is_empty() => Ok(SecretSource::Env(e.clone())),
            (None, Some(f)) => Ok(SecretSource::File(base.join(f))),
            (Some(_), Some(_)) => Err(ConfigError::new(
                key,
                "give exactly one of *_env and *_file, not both",
            )),
            _ => Err(ConfigError::new(
                key,
                "missing: name an environment variable (*_env) or a file (*_file); secrets are never inline",
            )),
        }
    }

    /// Reads the secret, trimming surrounding whitespace. Errors name the variable or
    /// file, never the content.
    pub fn read(&self, key: &str) -> Result<SecretString, ConfigError> {
        let value = match self {
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                ConfigError::new(key, format!("environment variable {var} is not set"))
            })?,
            SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(key, format!("cannot read {}: {}", path.display(), e.kind()))
            })?,
        };
        let value = zeroize::Zeroizing::new(value);
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::new(key, "the secret is empty"));
        }
        Ok(SecretString::new(trimmed.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Software {
        keystore: PathBuf,
        master_key: SecretSource,
        simulated_latency: Duration,
    },
    #[cfg(feature = "pkcs11")]
    Pkcs11(crate::backend::pkcs11::Pkcs11Settings),
}

impl BackendConfig {
    /// The settings that make it a different key manager: everything except what a
    /// reload applies to the running one (the PKCS#11 disabled-key list and PIN
    /// sources; the software keystore's file contents are re-read, its path is not).
    /// A reload keeps a running backend whose identity is unchanged and opens a new one
    /// otherwise.
    pub fn identity(&self) -> BackendConfig {
        match self {
            BackendConfig::Software { .. } => self.clone(),
            #[cfg(feature = "pkcs11")]
            BackendConfig::Pkcs11(settings) => {
                let mut fixed = settings.clone();
                fixed.disabled_keys.clear();
                fixed.user_pin_env = None;
                fixed.user_pin_file = None;
                for t in &mut fixed.failover {
                    t.user_pin_env = None;
                    t.user_pin_file = None;
                }
                BackendConfig::Pkcs11(fixed)
            }
        }
    }

    /// `software` or `pkcs11`, for logs and operators.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Software { .. } => "software",
            #[cfg(feature = "pkcs11")]
            BackendConfig::Pkcs11(_) => "pkcs11",
        }
    }
}

/// The name `[backend]` goes by, and a keystore's backend when it names none.
pub const DEFAULT_BACKEND: &str = "default";

/// One named key manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendEntry {
    /// `default` for `[backend]`, else the `NAME` of `[backends.NAME]`.
    pub name: String,
    /// The config table it came from (`backend` or `backends.NAME`): how errors and
    /// `config check` name its settings.
    pub table: String,
    pub config: BackendConfig,
}

/// One path prefix: a logical keystore with its own credentials.
#[derive(Debug, Clone)]
pub struct KeystoreConfig {
    pub path_prefix: String,
    /// The name of the [`BackendEntry`] this prefix uses.
    pub backend: String,
    pub credentials: Vec<CredentialConfig>,
    /// Every external key id served under this prefix: `allowed_keys` and `shared_keys`
    /// together. `None` only for a single keystore that names no keys (it serves every
    /// key of the backend); validation guarantees no key is served by two prefixes
    /// unless each lists it under `shared_keys`.
    pub allowed_keys: Option<Vec<String>>,
    /// (requests per second, burst) when a quota is configured.
    pub quota: Option<(u32, u32)>,
    /// The `ciphertextMetadata` (decoded; empty when the sample had none) that marks a
    /// ciphertext made by AWS's sample proxy, when Decrypt should open those too.
    pub aws_sample_metadata: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub access_key_id: String,
    pub secret: SecretString,
    pub source: SecretSource,
}

impl Config {
    /// Loads and validates a config file. Relative paths inside it are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut config = Self::from_toml(&text, &base)?;
        config.watched_files.insert(0, path.to_path_buf());
        Ok(config)
    }

    /// What the key admin commands need of the file at `path`: the `[backend]` table,
    /// validated, and the keys each keystore serves. The whole file must still parse,
    /// but nothing else is validated and no SigV4 secret is read, so `keys create`
    /// works on a host (or in a shell) that does not hold KMS's credentials.
    pub fn load_admin(path: &Path) -> Result<AdminConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            ConfigError::new(
                "(syntax)",
                e.message().to_owned() + &span_hint(&text, e.span()),
            )
        })?;
        let backends = validate_backends(raw.backend, raw.backends, base, &mut Vec::new())?;
        let served = raw
            .keystores
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Ok((
                    keystore_backend(i, k.backend.as_deref(), &backends)?,
                    served_keys(k.allowed_keys.as_deref(), k.shared_keys.as_deref()),
                ))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(AdminConfig { backends, served })
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the key and line; it never contains secrets because
            // secrets are never inline.
            ConfigError::new(
                "(syntax)",
                e.message().to_owned() + &span_hint(text, e.span()),
            )
        })?;
        raw.validate(base)
    }
}

impl Config {
    /// The backend named `name`.
    pub fn backend(&self, name: &str) -> Option<&BackendEntry> {
        self.backends.iter().find(|b| b.name == name)
    }
}

/// See [`Config::load_admin`].
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub backends: Vec<BackendEntry>,
    /// Per `[[keystores]]`: the backend it uses and the keys it serves (`None`: every
    /// key of that backend).
    pub served: Vec<(String, Option<Vec<String>>)>,
}

impl AdminConfig {
    /// The backend a key command works on: the one named, or the only one.
    pub fn backend(&self, name: Option<&str>) -> Result<&BackendEntry, ConfigError> {
        let names = || {
            self.backends
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self.backends.iter().find(|b| b.name == n).ok_or_else(|| {
                ConfigError::new(
                    "--backend",
                    format!(
                        "'{n}' is not a configured backend (configured: {})",
                        names()
                    ),
                )
            }),
            None => match self.backends.as_slice() {
                [only] => Ok(only),
                _ => Err(ConfigError::new(
                    "--backend",
                    format!(
                        "the config has {} backends; say which with --backend NAME (configured: {})",
                        self.backends.len(),
                        names()
                    ),
                )),
            },
        }
    }
}

/// A backend name: a metric label and log field, so short and plain.
fn valid_backend_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// `[backend]` (named `default`) and every `[backends.NAME]`, validated, in name order.
fn validate_backends(
    single: Option<RawBackend>,
    named: BTreeMap<String, RawBackend>,
    base: &Path,
    watched_files: &mut Vec<PathBuf>,
) -> Result<Vec<BackendEntry>, ConfigError> {
    if single.is_some() && named.contains_key(DEFAULT_BACKEND) {
        return Err(ConfigError::new(
            format!("backends.{DEFAULT_BACKEND}"),
            "[backend] is already the backend named default: rename one of them",
        ));
    }
    if single.is_none() && named.is_empty() {
        return Err(ConfigError::new(
            "backend",
            "missing: configure the key manager in [backend] (or named [backends.NAME] tables)",
        ));
    }
    let mut entries = Vec::with_capacity(named.len() + 1);
    if let Some(raw) = single {
        let table = "backend".to_owned();
        let config = validate_backend(raw, &table, base, watched_files)?;
        entries.push(BackendEntry {
            name: DEFAULT_BACKEND.to_owned(),
            table,
            config,
        });
    }
    for (name, raw) in named {
        let table = format!("backends.{name}");
        if !valid_backend_name(&name) {
            return Err(ConfigError::new(
                table,
                "a backend name is 1-64 characters of a-z A-Z 0-9 _ -",
            ));
        }
        let config = validate_backend(raw, &table, base, watched_files)?;
        entries.push(BackendEntry {
            name,
            table,
            config,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// The backend `keystores[i]` uses: the one it names, else the only one, else
/// `default`.
fn keystore_backend(
    i: usize,
    named: Option<&str>,
    backends: &[BackendEntry],
) -> Result<String, ConfigError> {
    let names = || {
        backends
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (named, backends) {
        (Some(n), _) if backends.iter().any(|b| b.name == n) => Ok(n.to_owned()),
        (Some(n), _) => Err(ConfigError::new(
            format!("keystores[{i}].backend"),
            format!(
                "'{n}' is not a configured backend (configured: {})",
                names()
            ),
        )),
        (None, [only]) => Ok(only.name.clone()),
        (None, _) if backends.iter().any(|b| b.name == DEFAULT_BACKEND) => {
            Ok(DEFAULT_BACKEND.to_owned())
        }
        (None, _) => Err(ConfigError::new(
            format!("keystores[{i}].backend"),
            format!(
                "missing: with several backends and no [backend], each keystore names the one it uses (configured: {})",
                names()
            ),
        )),
    }
}

/// One backend table, validated; the files it names are added to `watched`. Its
/// secrets (the master key, the PIN) are read when the backend opens, not here.
/// `table` (`backend` or `backends.NAME`) prefixes the keys errors name.
fn validate_backend(
    raw: RawBackend,
    table: &str,
    base: &Path,
    watched_files: &mut Vec<PathBuf>,
) -> Result<BackendConfig, ConfigError> {
    Ok(match raw {
        RawBackend::Software {
            keystore,
            master_key_env,
            master_key_file,
            simulated_latency_ms,
        } => {
            watched_files.push(base.join(&keystore));
            if let Some(f) = &master_key_file {
                watched_files.push(base.join(f));
            }
            BackendConfig::Software {
                keystore: base.join(keystore),
                master_key: SecretSource::from_pair(
                    &format!("{table}.master_key_env"),
                    master_key_env.as_ref(),
                    master_key_file.as_ref(),
                    base,
                )?,
                simulated_latency: Duration::from_millis(simulated_latency_ms),
            }
        }
        #[cfg(feature = "pkcs11")]
        RawBackend::Pkcs11(mut settings) => {
            settings
                .validate(base)
                .map_err(|e| ConfigError::new(format!("{table}.{}", e.key), e.problem))?;
            settings.resolve_paths(base);
            BackendConfig::Pkcs11(settings)
        }
    })
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// The rules for a path prefix: "" or "/seg[/seg]" of `a-zA-Z0-9_-`, and the whole
/// `XksProxyUriPath` (`prefix + /kms/xks/v1`) at most 128 characters (spec).
pub fn validate_path_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        return Err("must be empty or start with '/' and not end with '/'".into());
    }
    if prefix.contains("//") {
        return Err("must not contain empty segments ('//')".into());
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'))
    {
        return Err("may contain only a-z A-Z 0-9 / _ -".into());
    }
    if prefix.len() + XKS_BASE.len() > 128 {
        return Err(format!(
            "with {XKS_BASE} it is {} characters; the spec allows 128",
            prefix.len() + XKS_BASE.len()
        ));
    }
    if prefix.ends_with(XKS_BASE) || prefix.contains("/kms/xks/") {
        return Err("is the part before /kms/xks/v1; do not include /kms/xks/v1 itself".into());
    }
    Ok(())
}

/// KMS's rule for an XKS access key id: 20–30 characters of `A-Z2-7`.
pub fn valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// KMS's rule for an XKS secret: 43–64 characters of `a-zA-Z0-9/+=`.
pub fn valid_secret(secret: &str) -> bool {
    (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'='))
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("'{s}' is not an IP:port address (e.g. 127.0.0.1:8443 or [::1]:8443)"),
        )
    })
}

impl RawConfig {
    /// Checks every rule and reads every secret; the result is ready to run.
    pub fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let s = &self.server;
        let listen = parse_addr("server.listen", &s.listen)?;
        let ping_listen = s
            .ping_listen
            .as_deref()
            .map(|p| parse_addr("server.ping_listen", p))
            .transpose()?;
        let mut watched_files = Vec::new();
        let mut client_auth = None;
        let tls = match (&s.tls, s.insecure_plain_http) {
            (Some(t), false) => {
                client_auth = match (&t.client_ca, &t.client_subjects) {
                    (None, None) => None,
                    (Some(ca), Some(subjects)) if !subjects.is_empty() => {
                        if subjects.iter().any(|n| n.is_empty()) {
                            return Err(ConfigError::new(
                                "server.tls.client_subjects",
                                "names must not be empty",
                            ));
                        }
                        watched_files.push(base.join(ca));
                        Some(ClientAuthConfig {
                            ca: base.join(ca),
                            subjects: subjects.clone(),
                        })
                    }
                    (Some(_), _) => {
                        return Err(ConfigError::new(
                            "server.tls.client_subjects",
                            "required with client_ca: the spec requires configuring the client certificate's subject name (KMS: cks.kms.<region>.amazonaws.com)",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(ConfigError::new(
                            "server.tls.client_ca",
                            "required with client_subjects: the CA bundle that issues client certificates",
                        ));
                    }
                };
                watched_files.push(base.join(&t.certificate));
                watched_files.push(base.join(&t.private_key));
                Some(TlsConfig::Files {
                    certificate: base.join(&t.certificate),
                    private_key: base.join(&t.private_key),
                })
            }
            (None, true) => None,
            (Some(_), true) => {
                return Err(ConfigError::new(
                    "server.insecure_plain_http",
                    "is true but [server.tls] is also set; choose one",
                ));
            }
            (None, false) => {
                return Err(ConfigError::new(
                    "server.tls",
                    "missing: KMS requires HTTPS (set insecure_plain_http = true only behind a TLS-terminating load balancer)",
                ));
            }
        };
        if s.max_body_bytes < 32 * 1024 {
            return Err(ConfigError::new(
                "server.max_body_bytes",
                "must be at least 32768: the spec's largest legal request is about 20 KiB",
            ));
        }
        for (key, v) in [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        for (key, v) in [
            ("server.max_connections", s.max_connections),
            (
                "server.max_connections_per_source",
                s.max_connections_per_source,
            ),
            ("server.ping_max_connections", s.ping_max_connections),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if s.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::new(
                "server.http2_max_concurrent_streams",
                "must be greater than 0",
            ));
        }
        if s.require_fips && !crate::crypto::FIPS {
            return Err(ConfigError::new(
                "server.require_fips",
                crate::crypto::FipsError::NotAFipsBuild.to_string(),
            ));
        }
        if s.max_in_flight == 0 {
            return Err(ConfigError::new(
                "server.max_in_flight",
                "must be greater than 0",
            ));
        }
        let admin_listen = match (self.admin.enabled, &self.admin.listen) {
            (Some(false), _) | (None, None) => None,
            (_, None) => Some(parse_addr("admin.listen", DEFAULT_ADMIN_LISTEN)?),
            (_, Some(PortOrAddress::Port(port))) => Some(SocketAddr::from(([127, 0, 0, 1], *port))),
            (_, Some(PortOrAddress::Address(a))) => Some(match a.trim().parse::<u16>() {
                Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => parse_addr("admin.listen", a)?,
            }),
        };

        let h = &self.health;
        // Kubernetes sets the fleet size from the replica count through the environment.
        let fleet_size = match std::env::var("XKS_PROXY_FLEET_SIZE") {
            Ok(v) => v.trim().parse::<u32>().map_err(|_| {
                ConfigError::new(
                    "health.fleet_size",
                    "environment variable XKS_PROXY_FLEET_SIZE is not a positive integer",
                )
            })?,
            Err(_) => h.fleet_size,
        };
        if fleet_size == 0 {
            return Err(ConfigError::new(
                "health.fleet_size",
                "must be greater than 0 (spec)",
            ));
        }
        {
            use crate::api::health::{CHECK_BUDGET, MAX_AGE, MAX_CHECK_INTERVAL_SECS};
            if !(1..=MAX_CHECK_INTERVAL_SECS).contains(&h.check_interval_secs) {
                return Err(ConfigError::new(
                    "health.check_interval_secs",
                    format!(
                        "must be 1 to {MAX_CHECK_INTERVAL_SECS}: the spec allows a cached health result at most {} s old, and a check may take up to {} s",
                        MAX_AGE.as_secs(),
                        CHECK_BUDGET.as_secs()
                    ),
                ));
            }
        }
        if h.vendor.is_empty() || h.vendor.len() > 128 {
            return Err(ConfigError::new(
                "health.vendor",
                "must be 1 to 128 characters",
            ));
        }

        let mut sigv4 = crate::sigv4::VerifyPolicy::default();
        if let Some(regions) = &self.sigv4.regions {
            if regions.is_empty() || regions.iter().any(|r| r.is_empty()) {
                return Err(ConfigError::new(
                    "sigv4.regions",
                    "must list at least one non-empty region, or be left out",
                ));
            }
            sigv4.allowed_regions = Some(regions.clone());
        }
        if let Some(skew) = self.sigv4.max_clock_skew_secs {
            if !(1..=300).contains(&skew) {
                return Err(ConfigError::new(
                    "sigv4.max_clock_skew_secs",
                    "must be 1 to 300 (the spec requires rejecting requests more than 5 minutes off)",
                ));
            }
            sigv4.max_skew = Duration::from_secs(skew);
        }

        let format = match self.logging.format.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "logging.format",
                    format!("'{other}' is not one of: human, json"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err(ConfigError::new(
                "logging.level",
                "is not a valid tracing filter",
            ));
        }

        let l = &self.limits;
        if !(1..=10_000).contains(&l.backend_deadline_ms) {
            return Err(ConfigError::new(
                "limits.backend_deadline_ms",
                "must be 1 to 10000",
            ));
        }

        let backends = validate_backends(self.backend, self.backends, base, &mut watched_files)?;

        if self.keystores.is_empty() {
            return Err(ConfigError::new(
                "keystores",
                "no [[keystores]]: configure at least one path prefix with credentials",
            ));
        }
        let mut keystores = Vec::with_capacity(self.keystores.len());
        // Each keystore's (allowed_keys, shared_keys) as written, for the ownership rules.
        let mut assignments = Vec::with_capacity(self.keystores.len());
        for (i, ks) in self.keystores.into_iter().enumerate() {
            let key = format!("keystores[{i}]");
            let backend = keystore_backend(i, ks.backend.as_deref(), &backends)?;
            validate_path_prefix(&ks.path_prefix)
                .map_err(|p| ConfigError::new(format!("{key}.path_prefix"), p))?;
            if keystores
                .iter()
                .any(|k: &KeystoreConfig| k.path_prefix == ks.path_prefix)
            {
                return Err(ConfigError::new(
                    format!("{key}.path_prefix"),
                    format!("'{}' is configured twice", ks.path_prefix),
                ));
            }
            if ks.credentials.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}.credentials"),
                    "at least one credential is required",
                ));
            }
            let mut credentials = Vec::new();
            for (j, c) in ks.credentials.into_iter().enumerate() {
                let ckey = format!("{key}.credentials[{j}]");
                if !valid_access_key_id(&c.access_key_id) {
                    return Err(ConfigError::new(
                        format!("{ckey}.access_key_id"),
                        "must be 20-30 characters of A-Z and 2-7 (KMS's rule); `xks-proxy credentials new` makes one",
                    ));
                }
                if credentials
                    .iter()
                    .any(|x: &CredentialConfig| x.access_key_id == c.access_key_id)
                {
                    return Err(ConfigError::new(
                        format!("{ckey}.access_key_id"),
                        "appears twice in this keystore",
                    ));
                }
                let source = SecretSource::from_pair(
                    &format!("{ckey}.secret_env"),
                    c.secret_env.as_ref(),
                    c.secret_file.as_ref(),
                    base,
                )?;
                let secret = source.read(&format!("{ckey}.secret"))?;
                if let SecretSource::File(f) = &source {
                    watched_files.push(f.clone());
                }
                if !valid_secret(secret.expose()) {
                    return Err(ConfigError::new(
                        format!("{ckey}.secret"),
                        "must be 43-64 characters of a-z A-Z 0-9 / + = (KMS's rule)",
                    ));
                }
                credentials.push(CredentialConfig {
                    access_key_id: c.access_key_id,
                    secret,
                    source,
                });
            }
            for (field, list) in [
                ("allowed_keys", &ks.allowed_keys),
                ("shared_keys", &ks.shared_keys),
            ] {
                if let Some(bad) = list.iter().flatten().find(|k| !crate::key_id::is_valid(k)) {
                    return Err(ConfigError::new(
                        format!("{key}.{field}"),
                        format!(
                            "'{bad}' is not a valid external key id ({})",
                            crate::key_id::RULE
                        ),
                    ));
                }
            }
            let quota = match (ks.quota_rps, ks.quota_burst) {
                (None, None) => None,
                (Some(0), _) => {
                    return Err(ConfigError::new(
                        format!("{key}.quota_rps"),
                        "must be greater than 0 (leave it out for no quota)",
                    ));
                }
                (Some(rps), burst) => Some((rps, burst.unwrap_or(rps).max(1))),
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        format!("{key}.quota_burst"),
                        "needs quota_rps",
                    ));
                }
            };
            let aws_sample_metadata = match &ks.aws_sample_ciphertexts {
                None => None,
                Some(sample) => Some(aws_sample_metadata(
                    &format!("{key}.aws_sample_ciphertexts.ciphertext_metadata_b64"),
                    &sample.ciphertext_metadata_b64,
                    backends
                        .iter()
                        .find(|b| b.name == backend)
                        .map(|b| &b.config),
                )?),
            };
            let served = served_keys(ks.allowed_keys.as_deref(), ks.shared_keys.as_deref());
            assignments.push(KeyLists {
                allowed: ks.allowed_keys,
                shared: ks.shared_keys,
            });
            keystores.push(KeystoreConfig {
                path_prefix: ks.path_prefix,
                backend,
                credentials,
                allowed_keys: served,
                quota,
                aws_sample_metadata,
            });
        }
        check_key_ownership(&keystores, &assignments)?;
        if let Some(unused) = backends
            .iter()
            .find(|b| !keystores.iter().any(|k| k.backend == b.name))
        {
            return Err(ConfigError::new(
                unused.table.clone(),
                format!(
                    "no [[keystores]] uses backend '{}': name it in a keystore (backend = \"{}\") or remove it; an unused key manager would still be opened and health-checked",
                    unused.name, unused.name
                ),
            ));
        }

        let policy_file = self.policy.map(|p| base.join(p.file));
        if let Some(p) = &policy_file {
            watched_files.push(p.clone());
        }
        let reload_watch = match self.reload.watch_interval_secs {
            0 => None,
            n => Some(Duration::from_secs(n)),
        };
        let audit = match self.audit {
            Some(a) => a.validate(base)?,
            None => None,
        };
        Ok(Config {
            audit,
            admin_listen,
            policy_file,
            reload_watch,
            watched_files,
            server: ServerConfig {
                listen,
                tls,
                client_auth,
                ping_listen,
                max_body_bytes: s.max_body_bytes,
                header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
                body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
                idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                shutdown_grace: Duration::from_millis(s.shutdown_grace_ms),
                max_connections: s.max_connections,
                max_connections_per_source: s.max_connections_per_source,
                http2_max_concurrent_streams: s.http2_max_concurrent_streams,
                ping_max_connections: s.ping_max_connections,
                max_in_flight: s.max_in_flight,
                require_fips: s.require_fips,
            },
            health: HealthConfig {
                fleet_size,
                vendor: h.vendor.clone(),
                check_interval: Duration::from_secs(h.check_interval_secs),
            },
            sigv4,
            logging: LoggingConfig {
                format,
                level: self.logging.level,
            },
            limits: crate::backend::CallLimits {
                concurrency: 64,
                max_waiting: l.backend_max_waiting,
                deadline: Duration::from_millis(l.backend_deadline_ms),
            },
            backends,
            keystores,
        })
    }
}

/// Validates `[keystores.aws_sample_ciphertexts]`: the sample's static metadata must be
/// Base64 of at most 20 bytes (the spec's limit, which the sample's length byte also
/// needs), must never look like this proxy's own metadata (so a ciphertext of ours can
/// never be opened the sample's way: no downgrade), and the backend must be PKCS#11.
fn aws_sample_metadata(
    key: &str,
    b64: &str,
    backend: Option<&BackendConfig>,
) -> Result<Vec<u8>, ConfigError> {
    use base64::Engine as _;
    if matches!(backend, Some(BackendConfig::Software { .. })) {
        return Err(ConfigError::new(
            key,
            "AWS's sample proxy only ran on PKCS#11: its ciphertexts need the same HSM keys (a PKCS#11 [backend])",
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| {
            ConfigError::new(
                key,
                "must be the sample's ciphertext_metadata_b64 (Base64) or \"\"",
            )
        })?;
    if bytes.len() > crate::api::aad::MAX_METADATA_LEN {
        return Err(ConfigError::new(key, "decodes to more than 20 bytes"));
    }
    if crate::api::aad::Metadata::decode(&bytes).is_some() {
        return Err(ConfigError::new(
            key,
            "decodes to bytes this proxy writes as its own ciphertextMetadata; the two could not be told apart",
        ));
    }
    Ok(bytes)
}

/// The keys a keystore serves: `allowed_keys` and `shared_keys` together, each once, in
/// the order written; `None` when it names neither (every key of the backend).
fn served_keys(allowed: Option<&[String]>, shared: Option<&[String]>) -> Option<Vec<String>> {
    if allowed.is_none() && shared.is_none() {
        return None;
    }
    let mut served: Vec<String> = Vec::new();
    for k in allowed.into_iter().chain(shared).flatten() {
        if !served.contains(k) {
            served.push(k.clone());
        }
    }
    Some(served)
}

/// One keystore's `allowed_keys` and `shared_keys`, as written.
struct KeyLists {
    allowed: Option<Vec<String>>,
    shared: Option<Vec<String>>,
}

/// Tenants are isolated by default (a path prefix is one logical keystore, spec "URIs"):
/// with more than one keystore on a backend each must name its keys, and a key named by
/// two keystores is refused unless every keystore naming it lists it under
/// `shared_keys`, so one tenant's credentials never reach another tenant's key by
/// omission. Key ids are per backend: the same id on two backends is two keys, so only
/// keystores on the same backend can collide; a keystore alone on its backend may name
/// no keys (it serves every key of that key manager, which no other tenant reaches).
fn check_key_ownership(
    keystores: &[KeystoreConfig],
    assignments: &[KeyLists],
) -> Result<(), ConfigError> {
    let name = |i: usize| {
        format!(
            "keystores[{i}] (path_prefix = \"{}\")",
            keystores[i].path_prefix
        )
    };
    let on_backend = |i: usize| {
        keystores
            .iter()
            .filter(|k| k.backend == keystores[i].backend)
            .count()
    };
    if let Some(i) = (0..keystores.len()).find(|&i| {
        on_backend(i) > 1 && assignments[i].allowed.is_none() && assignments[i].shared.is_none()
    }) {
        let backend = if keystores.len() == on_backend(i) {
            String::new()
        } else {
            format!(" on backend '{}'", keystores[i].backend)
        };
        return Err(ConfigError::new(
            format!("keystores[{i}].allowed_keys"),
            format!(
                "missing: {} names no keys; with {} keystores{backend} each must name the external keys it serves (tenants are isolated by default). \
                 Add allowed_keys = [\"<key id>\", ...] to it (allowed_keys = [] for none yet); \
                 a key that several keystores serve on purpose goes under shared_keys = [\"<key id>\"] in each of them instead",
                name(i),
                on_backend(i)
            ),
        ));
    }
    // (backend, key id) → (first keystore naming it, whether that one lists it as shared).
    let mut owner: std::collections::HashMap<(&str, &str), (usize, bool)> = Default::default();
    for (j, lists) in assignments.iter().enumerate() {
        let named = lists
            .allowed
            .iter()
            .flatten()
            .map(|k| (k, false))
            .chain(lists.shared.iter().flatten().map(|k| (k, true)));
        for (k, is_shared) in named {
            let field = if is_shared {
                "shared_keys"
            } else {
                "allowed_keys"
            };
            let backend = keystores[j].backend.as_str();
            match owner.get(&(backend, k.as_str())) {
                None => {
                    owner.insert((backend, k), (j, is_shared));
                }
                Some(&(i, was_shared)) if i == j => {
                    if was_shared != is_shared {
                        return Err(ConfigError::new(
                            format!("keystores[{j}].shared_keys"),
                            format!(
                                "'{k}' is in both allowed_keys and shared_keys; list it once: under shared_keys if other keystores serve it too, else under allowed_keys"
                            ),
                        ));
                    }
                }
                Some(&(i, was_shared)) if !(was_shared && is_shared) => {
                    return Err(ConfigError::new(
                        format!("keystores[{j}].{field}"),
                        format!(
                            "'{k}' is also served by {}: a key belongs to one keystore, so {} would reach another tenant's key. \
                             To share it on purpose, list it under shared_keys = [\"{k}\"] (not allowed_keys) in every keystore that serves it; \
                             otherwise remove it from all but one",
                            name(i),
                            name(j)
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Makes a fresh XKS credential in the format KMS accepts: a 20-character access key id
/// of `A-Z2-7` (100 bits) and a 44-character Base64 secret (256 bits of entropy).
pub fn generate_credential() -> (String, SecretString) {
    use crate::crypto::rand::{SecureRandom, SystemRandom};
    use base64::Engine as _;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let rng = SystemRandom::new();
    let mut id_bytes = [0u8; 20];
    let mut secret_bytes = zeroize::Zeroizing::new([0u8; 32]);
    // SystemRandom only fails if the OS RNG is unusable, in which case nothing secure
    // can be made: stopping is the only right answer.
    #[allow(clippy::expect_used)]
    {
        rng.fill(&mut id_bytes).expect("OS random number generator");
        rng.fill(&mut secret_bytes[..])
            .expect("OS random number generator");
    }
    // 256 is a multiple of 32, so `b % 32` is unbiased.
    let id: String = id_bytes
        .iter()
        .map(|b| ALPHABET[(b % 32) as usize] as char)
        .collect();
    let secret = base64::engine::general_purpose::STANDARD.encode(&secret_bytes[..]);
    (id, SecretString::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
[server.tls]
certificate = "certs/server-ecdsa.pem"
private_key = "certs/server-ecdsa.key"
[backend]
kind = "software"
keystore = "ks.json"
master_key_env = "XKS_TEST_MASTER_KEY_UNUSED"
[[keystores]]
path_prefix = "/a"
[[keystores.credentials]]
access_key_id = "AKIAIOSFODNN7EXAMPLE"
secret_file = "SECRETFILE"
"#;

    fn with_secret(text: &str, secret: &str) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), secret).expect("write");
        let text = text.replace("SECRETFILE", "secret");
        let r = Config::from_toml(&text, dir.path());
        (dir, r)
    }

    const GOOD_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242\n";

    /// Issue 14 §1: `[keystores.aws_sample_ciphertexts]` takes the sample's static
    /// metadata as it was configured, on a PKCS#11 backend only, and never a value that
    /// could be mistaken for this proxy's own metadata (no downgrade).
    #[cfg(feature = "pkcs11")]
    #[test]
    fn aws_sample_ciphertexts_takes_the_samples_metadata_on_pkcs11_only() {
        let pkcs11 = MINIMAL.replace(
            "kind = \"software\"\nkeystore = \"ks.json\"\nmaster_key_env = \"XKS_TEST_MASTER_KEY_UNUSED\"",
            "kind = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\nuser_pin_env = \"XKS_TEST_PIN_UNUSED\"",
        );
        assert_ne!(pkcs11, MINIMAL);
        let with = |base: &str, b64: &str| {
            let text = format!(
                "{base}[keystores.aws_sample_ciphertexts]\nciphertext_metadata_b64 = \"{b64}\"\n"
            );
            let (_d, r) = with_secret(&text, GOOD_SECRET);
            r
        };
        let cfg = with(&pkcs11, "djAuMC4x").expect("the sample's own example value");
        assert_eq!(
            cfg.keystores[0].aws_sample_metadata.as_deref(),
            Some(&b"v0.0.1"[..])
        );
        let cfg = with(&pkcs11, "").expect("unset in the sample: no metadata");
        assert_eq!(
            cfg.keystores[0].aws_sample_metadata.as_deref(),
            Some(&b""[..])
        );
        let (_d, cfg) = with_secret(&pkcs11, GOOD_SECRET);
        assert_eq!(cfg.expect("valid").keystores[0].aws_sample_metadata, None);
        let key = "keystores[0].aws_sample_ciphertexts.ciphertext_metadata_b64";
        for (base, b64, why) in [
            (MINIMAL, "djAuMC4x", "PKCS#11"),
            (pkcs11.as_str(), "not base64!", "Base64"),
            (pkcs11.as_str(), "AAECAwQFBgcICQoLDA0ODxAREhMU", "20 bytes"),
            // [1, 0, 0, 0, 0]: exactly what this proxy writes for key version 0.
            (pkcs11.as_str(), "AQAAAAA=", "its own"),
        ] {
            let e = with(base, b64).expect_err(why);
            assert_eq!(e.key, key);
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    /// Issue 16 §2: `[audit]` is off unless present, takes its key from a file or env
    /// var (never inline, at least 32 characters), and every bad value names its key.
    #[test]
    fn the_audit_section_is_validated_and_errors_name_the_key() {
        let audit = |section: &str, key: &str| {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("secret"), GOOD_SECRET).expect("write");
            std::fs::write(dir.path().join("audit.key"), key).expect("write");
            let text = format!(
                "{}\n[audit]\n{section}",
                MINIMAL.replace("SECRETFILE", "secret")
            );
            Config::from_toml(&text, dir.path()).map(|c| c.audit)
        };
        let good_key = "0123456789abcdef0123456789abcdef\n";
        let (_d, cfg) = with_secret(MINIMAL, GOOD_SECRET);
        assert!(cfg.expect("valid").audit.is_none());
        let on = audit("directory = \"audit\"\nkey_file = \"audit.key\"", good_key)
            .expect("valid")
            .expect("on");
        assert_eq!(on.on_failure, AuditOnFailure::FailClosed);
        assert_eq!(on.fsync, AuditFsync::Interval);
        assert_eq!(on.rotate_bytes, Some(64 * 1024 * 1024));
        assert_eq!(on.queue_capacity, 4096);
        assert!(on.directory.ends_with("audit") && on.directory.is_absolute());
        assert!(!format!("{on:?}").contains("0123456789abcdef"), "{on:?}");
        let off = audit("enabled = false\ndirectory = \"audit\"", good_key).expect("valid");
        assert!(off.is_none());
        let base = "directory = \"audit\"\nkey_file = \"audit.key\"\n";
        for (section, key, want_key, why) in [
            (
                "directory = \"audit\"",
                good_key,
                "audit.key_file",
                "secrets are never inline",
            ),
            (base, "short", "audit.key_file", "shorter than 32"),
            (
                &format!("{base}on_failure = \"maybe\""),
                good_key,
                "audit.on_failure",
                "fail_closed, continue",
            ),
            (
                &format!("{base}fsync = \"always\""),
                good_key,
                "audit.fsync",
                "every_record",
            ),
            (
                &format!("{base}rotate_bytes = 10"),
                good_key,
                "audit.rotate_bytes",
                "4096",
            ),
            (
                &format!("{base}queue_capacity = 0"),
                good_key,
                "audit.queue_capacity",
                "between",
            ),
            (
                &format!("{base}checkpoint_interval_secs = 0"),
                good_key,
                "audit.checkpoint_interval_secs",
                "between",
            ),
        ] {
            let e = audit(section, key).expect_err(why);
            assert_eq!(e.key, want_key, "{e}");
            assert!(e.to_string().contains(why), "{e}");
            assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
        }
        let e = audit(&format!("{base}fsink = \"never\""), good_key).expect_err("unknown key");
        assert!(e.to_string().contains("fsink"), "{e}");
    }

    #[test]
    fn minimal_config_validates_with_defaults() {
        let (dir, cfg) = with_secret(MINIMAL, GOOD_SECRET);
        let cfg = cfg.expect("valid");
        assert_eq!(cfg.keystores[0].path_prefix, "/a");
        assert_eq!(cfg.keystores[0].credentials[0].secret.expose().len(), 44);
        assert_eq!(cfg.server.max_body_bytes, 64 * 1024);
        assert_eq!(cfg.sigv4.max_skew, Duration::from_secs(300));
        match &cfg.server.tls {
            Some(TlsConfig::Files { certificate, .. }) => {
                assert_eq!(certificate, &dir.path().join("certs/server-ecdsa.pem"));
            }
            other => panic!("tls: {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (MINIMAL.replace("127.0.0.1:0", "nonsense"), "server.listen"),
            (MINIMAL.replace("AKIAIOSFODNN7EXAMPLE", "short"), "keystores[0].credentials[0].access_key_id"),
            (MINIMAL.replace("\"/a\"", "\"a/\""), "keystores[0].path_prefix"),
            (MINIMAL.replace("\"/a\"", "\"/a/kms/xks/v1\""), "keystores[0].path_prefix"),
            (MINIMAL.replace("kind = \"software\"", "kind = \"magic\""), "(syntax)"),
            (MINIMAL.replace("[server]", "[server]\nbogus = 1"), "(syntax)"),
            (MINIMAL.replace("secret_file = \"SECRETFILE\"", ""), "keystores[0].credentials[0].secret_env"),
            (
                MINIMAL.replace("[server.tls]\ncertificate = \"certs/server-ecdsa.pem\"\nprivate_key = \"certs/server-ecdsa.key\"", ""),
                "server.tls",
            ),
        ];
        for (text, key) in cases {
            let (_d, r) = with_secret(&text, GOOD_SECRET);
            let e = r.expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn the_admin_listener_is_off_by_default_and_loopback_when_turned_on() {
        // Issue 6: metrics "off by default, loopback by default when on".
        let admin = |section: &str| {
            let (_d, cfg) = with_secret(&format!("{MINIMAL}\n[admin]\n{section}"), GOOD_SECRET);
            cfg.expect("valid").admin_listen
        };
        let (_d, cfg) = with_secret(MINIMAL, GOOD_SECRET);
        assert_eq!(cfg.expect("valid").admin_listen, None);
        assert_eq!(admin(""), None);
        assert_eq!(
            admin("enabled = true").map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_ADMIN_LISTEN)
        );
        assert!(admin("enabled = true").is_some_and(|a| a.ip().is_loopback()));
        assert_eq!(
            admin("listen = \"9100\"").map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9100")
        );
        // A bare TOML integer, as the shipped configs' comments write it.
        assert_eq!(
            admin("listen = 9465").map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9465")
        );
        assert_eq!(
            admin("listen = \"[::1]:9100\"")
                .map(|a| a.to_string())
                .as_deref(),
            Some("[::1]:9100")
        );
        assert_eq!(admin("enabled = false\nlisten = \"127.0.0.1:9100\""), None);
        let (_d, r) = with_secret(
            &format!("{MINIMAL}\n[admin]\nlisten = \"nowhere\""),
            GOOD_SECRET,
        );
        assert_eq!(r.expect_err("bad address").key, "admin.listen");
    }

    #[test]
    fn the_health_interval_leaves_room_for_one_check_within_60_seconds() {
        // Spec: a cached health answer is at most 60 s old; one check may take 10 s.
        let (_d, ok) = with_secret(
            &format!("{MINIMAL}\n[health]\ncheck_interval_secs = 50"),
            GOOD_SECRET,
        );
        assert!(ok.is_ok());
        let (_d, r) = with_secret(
            &format!("{MINIMAL}\n[health]\ncheck_interval_secs = 51"),
            GOOD_SECRET,
        );
        assert_eq!(r.expect_err("too long").key, "health.check_interval_secs");
    }

    #[test]
    fn short_secret_is_refused_without_echoing_it() {
        let (_d, r) = with_secret(MINIMAL, "tooshortsecret");
        let e = r.expect_err("short secret");
        assert_eq!(e.key, "keystores[0].credentials[0].secret");
        assert!(!e.to_string().contains("tooshortsecret"));
    }

    #[test]
    fn two_credentials_per_prefix_for_rotation() {
        let text = MINIMAL.to_owned()
            + "[[keystores.credentials]]\naccess_key_id = \"BBBBBBBBBBBBBBBBBBBB\"\nsecret_file = \"secret\"\n";
        let (_d, r) = with_secret(&text, GOOD_SECRET);
        assert_eq!(r.expect("valid").keystores[0].credentials.len(), 2);
        let dup = MINIMAL.to_owned()
            + "[[keystores.credentials]]\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_file = \"secret\"\n";
        let (_d, r) = with_secret(&dup, GOOD_SECRET);
        assert!(r.expect_err("dup").problem.contains("twice"));
    }

    /// MINIMAL's keystore "/a" with `a_keys` added, plus a keystore "/b" with `b_keys`.
    fn two_tenants(a_keys: &str, b_keys: &str) -> String {
        MINIMAL.replace(
            "path_prefix = \"/a\"\n",
            &format!("path_prefix = \"/a\"\n{a_keys}\n"),
        ) + &format!(
            "[[keystores]]\npath_prefix = \"/b\"\n{b_keys}\n[[keystores.credentials]]\naccess_key_id = \"BBBBBBBBBBBBBBBBBBBB\"\nsecret_file = \"secret\"\n"
        )
    }

    #[test]
    fn a_single_keystore_without_allowed_keys_serves_every_key() {
        // Unchanged by tenant isolation: one keystore, no list = every key of the backend.
        let (_d, cfg) = with_secret(MINIMAL, GOOD_SECRET);
        assert_eq!(cfg.expect("valid").keystores[0].allowed_keys, None);
        let one = MINIMAL.replace(
            "path_prefix = \"/a\"\n",
            "path_prefix = \"/a\"\nallowed_keys = [\"k1\"]\n",
        );
        let (_d, cfg) = with_secret(&one, GOOD_SECRET);
        assert_eq!(
            cfg.expect("valid").keystores[0].allowed_keys,
            Some(vec!["k1".to_owned()])
        );
    }

    #[test]
    fn more_than_one_keystore_must_name_its_keys() {
        // Issue 10 §3: /b's credentials must not reach /a's keys because nobody said
        // which keys are whose.
        let (_d, r) = with_secret(&two_tenants("", ""), GOOD_SECRET);
        let e = r.expect_err("no assignment");
        assert_eq!(e.key, "keystores[0].allowed_keys", "{e}");
        for needle in [
            "keystores[0]",
            "path_prefix = \"/a\"",
            "allowed_keys = [\"",
            "shared_keys",
        ] {
            assert!(e.problem.contains(needle), "{needle} missing: {e}");
        }
        let (_d, r) = with_secret(&two_tenants("allowed_keys = [\"k1\"]", ""), GOOD_SECRET);
        let e = r.expect_err("/b names no keys");
        assert_eq!(e.key, "keystores[1].allowed_keys", "{e}");
        assert!(e.problem.contains("path_prefix = \"/b\""), "{e}");
        // An empty list is an explicit "no keys yet"; shared_keys alone is explicit too.
        let (_d, r) = with_secret(
            &two_tenants("allowed_keys = [\"k1\"]", "allowed_keys = []"),
            GOOD_SECRET,
        );
        let cfg = r.expect("explicit");
        assert_eq!(cfg.keystores[0].allowed_keys, Some(vec!["k1".to_owned()]));
        assert_eq!(cfg.keystores[1].allowed_keys, Some(vec![]));
        let (_d, r) = with_secret(
            &two_tenants("allowed_keys = []", "shared_keys = [\"k2\"]"),
            GOOD_SECRET,
        );
        assert_eq!(
            r.expect("explicit").keystores[1].allowed_keys,
            Some(vec!["k2".to_owned()])
        );
    }

    #[test]
    fn a_key_named_by_two_keystores_is_refused_unless_both_share_it() {
        let (_d, r) = with_secret(
            &two_tenants("allowed_keys = [\"k1\", \"k2\"]", "allowed_keys = [\"k2\"]"),
            GOOD_SECRET,
        );
        let e = r.expect_err("overlap");
        assert_eq!(e.key, "keystores[1].allowed_keys", "{e}");
        for needle in [
            "'k2'",
            "keystores[0] (path_prefix = \"/a\")",
            "shared_keys = [\"k2\"]",
        ] {
            assert!(e.problem.contains(needle), "{needle} missing: {e}");
        }
        // Sharing takes both sides: one keystore listing it as shared is not enough.
        let (_d, r) = with_secret(
            &two_tenants("allowed_keys = [\"k2\"]", "shared_keys = [\"k2\"]"),
            GOOD_SECRET,
        );
        assert_eq!(r.expect_err("one-sided").key, "keystores[1].shared_keys");
        // The opt-in: both list it under shared_keys; each serves its own keys too.
        let (_d, r) = with_secret(
            &two_tenants(
                "allowed_keys = [\"k1\"]\nshared_keys = [\"k2\"]",
                "shared_keys = [\"k2\"]\nallowed_keys = [\"k3\"]",
            ),
            GOOD_SECRET,
        );
        let cfg = r.expect("shared on purpose");
        assert_eq!(
            cfg.keystores[0].allowed_keys,
            Some(vec!["k1".to_owned(), "k2".to_owned()])
        );
        assert_eq!(
            cfg.keystores[1].allowed_keys,
            Some(vec!["k3".to_owned(), "k2".to_owned()])
        );
        // One keystore listing a key in both lists is ambiguous.
        let (_d, r) = with_secret(
            &two_tenants(
                "allowed_keys = [\"k1\"]\nshared_keys = [\"k1\"]",
                "allowed_keys = []",
            ),
            GOOD_SECRET,
        );
        assert_eq!(r.expect_err("both lists").key, "keystores[0].shared_keys");
        let (_d, r) = with_secret(
            &two_tenants("allowed_keys = []", "shared_keys = [\"bad id\"]"),
            GOOD_SECRET,
        );
        assert_eq!(r.expect_err("syntax").key, "keystores[1].shared_keys");
    }

    #[test]
    fn path_prefix_rules() {
        assert!(validate_path_prefix("").is_ok());
        assert!(validate_path_prefix("/tenant-a/x_1").is_ok());
        for bad in ["tenant", "/a/", "/a//b", "/a b", "/a.b", "/kms/xks/v1"] {
            assert!(validate_path_prefix(bad).is_err(), "{bad}");
        }
        // Spec: the whole XksProxyUriPath is at most 128 characters.
        let ok = format!("/{}", "a".repeat(128 - XKS_BASE.len() - 1));
        assert!(validate_path_prefix(&ok).is_ok());
        assert!(validate_path_prefix(&format!("{ok}b")).is_err());
    }

    #[test]
    fn generated_credentials_follow_kms_rules() {
        for _ in 0..50 {
            let (id, secret) = generate_credential();
            assert!(valid_access_key_id(&id), "{id}");
            assert!(valid_secret(secret.expose()));
        }
        assert_ne!(generate_credential().0, generate_credential().0);
    }

    /// MINIMAL with its `[backend]` replaced by `backends` (TOML tables) and `/a`
    /// naming `a_backend`, plus keystore `/b` with `b_extra` (its backend, its keys).
    fn named_backends(backends: &str, a_extra: &str, b_extra: &str) -> String {
        let text = two_tenants(a_extra, b_extra);
        let start = text.find("[backend]").expect("backend");
        let end = text.find("[[keystores]]").expect("keystores");
        format!("{}{backends}\n{}", &text[..start], &text[end..])
    }

    const SOFT: &str = "kind = \"software\"\nkeystore = \"ks.json\"\nmaster_key_env = \"XKS_TEST_MASTER_KEY_UNUSED\"\n";

    /// Issue 14 §3: named backends, each keystore naming the one it uses; key ids are
    /// per backend, so two keystores alone on their backends need no key lists and may
    /// name the same id; keystores sharing a backend keep the isolation rule.
    #[test]
    fn each_keystore_names_its_backend_and_key_ids_are_per_backend() {
        let two = format!("[backends.one]\n{SOFT}[backends.two]\n{SOFT}");
        let (_d, r) = with_secret(
            &named_backends(&two, "backend = \"one\"", "backend = \"two\""),
            GOOD_SECRET,
        );
        let cfg = r.expect("one keystore per backend: no key lists needed");
        let names: Vec<_> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(cfg.backends[1].table, "backends.two");
        assert_eq!(cfg.keystores[0].backend, "one");
        assert_eq!(cfg.keystores[1].backend, "two");
        assert_eq!(cfg.keystores[0].allowed_keys, None);
        // The same id on two backends is two keys: no conflict.
        let (_d, r) = with_secret(
            &named_backends(
                &two,
                "backend = \"one\"\nallowed_keys = [\"k\"]",
                "backend = \"two\"\nallowed_keys = [\"k\"]",
            ),
            GOOD_SECRET,
        );
        r.expect("k on one and k on two are different keys");
        // On one backend, the old rules: each names its keys, no id twice.
        let (_d, r) = with_secret(
            &named_backends(&two, "backend = \"one\"", "backend = \"one\""),
            GOOD_SECRET,
        );
        let e = r.expect_err("two keystores on one backend, no lists");
        assert_eq!(e.key, "keystores[0].allowed_keys", "{e}");
        let (_d, r) = with_secret(
            &named_backends(
                &format!("[backends.one]\n{SOFT}"),
                "backend = \"one\"\nallowed_keys = [\"k\"]",
                "backend = \"one\"\nallowed_keys = [\"k\"]",
            ),
            GOOD_SECRET,
        );
        assert!(r.expect_err("k twice").problem.contains("also served by"));
    }

    #[test]
    fn backend_names_and_references_are_checked() {
        let two = format!("[backends.one]\n{SOFT}[backends.two]\n{SOFT}");
        for (text, key, needle) in [
            (
                named_backends(&two, "backend = \"one\"", "backend = \"three\""),
                "keystores[1].backend",
                "'three' is not a configured backend (configured: one, two)",
            ),
            (
                named_backends(&two, "backend = \"one\"", ""),
                "keystores[1].backend",
                "each keystore names the one it uses",
            ),
            (
                named_backends(
                    &two,
                    "backend = \"one\"\nallowed_keys = []",
                    "backend = \"one\"\nallowed_keys = []",
                ),
                "backends.two",
                "no [[keystores]] uses backend 'two'",
            ),
            (
                named_backends(
                    &format!("[backends.\"a b\"]\n{SOFT}"),
                    "",
                    "allowed_keys = []",
                ),
                "backends.a b",
                "1-64 characters",
            ),
            (
                named_backends(
                    &format!("[backend]\n{SOFT}[backends.default]\n{SOFT}"),
                    "",
                    "",
                ),
                "backends.default",
                "[backend] is already the backend named default",
            ),
            (named_backends("", "", ""), "backend", "missing"),
        ] {
            let (_d, r) = with_secret(&text, GOOD_SECRET);
            let e = r.expect_err(needle);
            assert_eq!(e.key, key, "{e}");
            assert!(e.problem.contains(needle), "{needle}: {e}");
        }
        // [backend] beside named ones is `default`, and a keystore naming none uses it.
        let (_d, r) = with_secret(
            &named_backends(
                &format!("[backend]\n{SOFT}[backends.two]\n{SOFT}"),
                "",
                "backend = \"two\"",
            ),
            GOOD_SECRET,
        );
        let cfg = r.expect("default and two");
        assert_eq!(cfg.keystores[0].backend, DEFAULT_BACKEND);
        assert_eq!(
            cfg.backend(DEFAULT_BACKEND).expect("default").table,
            "backend"
        );
        // A backend's own errors name its table.
        let (_d, r) = with_secret(
            &named_backends(
                "[backends.one]\nkind = \"software\"\nkeystore = \"ks.json\"\n",
                "backend = \"one\"",
                "backend = \"one\"\nallowed_keys = []",
            ),
            GOOD_SECRET,
        );
        assert!(
            r.expect_err("no master key")
                .key
                .starts_with("backends.one.")
        );
    }
}
