//! The config file as written: the serde types [`RawConfig`] and its tables, with
//! `deny_unknown_fields` and the defaults. Nothing here checks a value; the section
//! validators (`super::sections`) turn each table into its typed, validated form.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

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
