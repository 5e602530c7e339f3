//! Configuration: TOML → [`RawConfig`] (serde, `deny_unknown_fields`) → [`RawConfig::validate`]
//! → typed [`Config`]. Every key has a doc line and a default where one is sane; a bad
//! config is refused before anything binds, with an error naming the key and the problem.
//!
//! Secrets (SigV4 secrets, the master key, HSM PINs) are never inline: the TOML names an
//! environment variable or a file, and validation reads them into zeroizing types.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::SecretString;

pub mod raw;
pub mod reload;
mod sections;

pub use raw::{DEFAULT_ADMIN_LISTEN, DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS, RawConfig};
pub use sections::Environment;
use sections::{keystore_backend, served_keys, validate_backends};

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

#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
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
        raw.validate(base, &Environment::from_process())
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
    /// Whether some keystore on `backend` serves `key` (one with no key list serves
    /// every key of its backend). A new key no tenant serves is unusable until the
    /// operator assigns it; `keys create` says so.
    pub fn serves(&self, backend: &str, key: &str) -> bool {
        self.served
            .iter()
            .filter(|(b, _)| b == backend)
            .any(|(_, keys)| {
                keys.as_ref()
                    .is_none_or(|keys| keys.iter().any(|k| k == key))
            })
    }

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

    /// Kubernetes sets the fleet size from the replica count (`XKS_PROXY_FLEET_SIZE`,
    /// deploy/kubernetes): it overrides `health.fleet_size`, and a value that is not a
    /// positive integer is refused naming the variable. Validation takes the
    /// environment as an argument, so this needs no process-wide `set_var`.
    #[test]
    fn the_fleet_size_from_the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), GOOD_SECRET).expect("write");
        let text = MINIMAL.replace("SECRETFILE", "secret");
        let with = |fleet: Option<&str>| {
            let raw: RawConfig = toml::from_str(&text).expect("parses");
            let env = Environment {
                fleet_size: fleet.map(str::to_owned),
            };
            raw.validate(dir.path(), &env)
        };
        assert_eq!(with(None).expect("valid").health.fleet_size, 1);
        assert_eq!(with(Some(" 3 ")).expect("valid").health.fleet_size, 3);
        for bad in ["three", "-1", ""] {
            let e = with(Some(bad)).expect_err("refused");
            assert_eq!(e.key, "health.fleet_size");
            assert!(e.problem.contains("XKS_PROXY_FLEET_SIZE"), "{e}");
        }
        let e = with(Some("0")).expect_err("refused");
        assert_eq!(e.key, "health.fleet_size");
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
