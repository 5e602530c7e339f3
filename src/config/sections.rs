//! Validation, one table at a time: each `Raw*` table of [`super::raw`] has a
//! `validate` that checks its rules and returns its typed form, errors naming the key.
//! [`RawConfig::validate`] calls them in file order and adds the rules that span
//! tables (keystores against backends, keys against keystores).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::*;

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

/// A backend name: a metric label and log field, so short and plain.
fn valid_backend_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// `[backend]` (named `default`) and every `[backends.NAME]`, validated, in name order.
pub(super) fn validate_backends(
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
pub(super) fn keystore_backend(
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
        RawBackend::Pkcs11(settings) => BackendConfig::Pkcs11(
            settings
                .validated(base)
                .map_err(|e| ConfigError::new(format!("{table}.{}", e.key), e.problem))?,
        ),
    })
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("'{s}' is not an IP:port address (e.g. 127.0.0.1:8443 or [::1]:8443)"),
        )
    })
}

/// What validation takes from the process environment rather than the file, read once
/// by the caller so that validating is a pure function of its inputs.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `XKS_PROXY_FLEET_SIZE`: Kubernetes sets the fleet size from the replica count.
    pub fleet_size: Option<String>,
}

impl Environment {
    /// The variables validation reads, from this process's environment.
    pub fn from_process() -> Self {
        Self {
            fleet_size: std::env::var("XKS_PROXY_FLEET_SIZE").ok(),
        }
    }
}

impl RawConfig {
    /// Checks every rule and reads every secret; the result is ready to run. Each table
    /// has its own validator below, in the order the file's tables are checked (which
    /// decides which error an operator sees first when several are wrong).
    pub fn validate(self, base: &Path, env: &Environment) -> Result<Config, ConfigError> {
        let mut watched_files = Vec::new();
        let server = self.server.validate(base, &mut watched_files)?;
        let admin_listen = self.admin.validate()?;
        let health = self.health.validate(env)?;
        let sigv4 = self.sigv4.validate()?;
        let logging = self.logging.validate()?;
        let limits = self.limits.validate()?;
        let backends = validate_backends(self.backend, self.backends, base, &mut watched_files)?;
        let keystores = validate_keystores(self.keystores, &backends, base, &mut watched_files)?;
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
            server,
            health,
            sigv4,
            logging,
            limits,
            backends,
            keystores,
        })
    }
}

impl RawServer {
    /// `[server]` and `[server.tls]`; the TLS and client-CA files join `watched`.
    fn validate(
        &self,
        base: &Path,
        watched: &mut Vec<PathBuf>,
    ) -> Result<ServerConfig, ConfigError> {
        let s = self;
        let listen = parse_addr("server.listen", &s.listen)?;
        let ping_listen = s
            .ping_listen
            .as_deref()
            .map(|p| parse_addr("server.ping_listen", p))
            .transpose()?;
        let (tls, client_auth) = match (&s.tls, s.insecure_plain_http) {
            (Some(t), false) => {
                let (tls, client_auth) = t.validate(base, watched)?;
                (Some(tls), client_auth)
            }
            (None, true) => (None, None),
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
        Ok(ServerConfig {
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
        })
    }
}

impl RawTls {
    /// `[server.tls]`: the certificate and key, and mTLS when `client_ca` is set.
    fn validate(
        &self,
        base: &Path,
        watched: &mut Vec<PathBuf>,
    ) -> Result<(TlsConfig, Option<ClientAuthConfig>), ConfigError> {
        let client_auth = match (&self.client_ca, &self.client_subjects) {
            (None, None) => None,
            (Some(ca), Some(subjects)) if !subjects.is_empty() => {
                if subjects.iter().any(|n| n.is_empty()) {
                    return Err(ConfigError::new(
                        "server.tls.client_subjects",
                        "names must not be empty",
                    ));
                }
                watched.push(base.join(ca));
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
        watched.push(base.join(&self.certificate));
        watched.push(base.join(&self.private_key));
        let tls = TlsConfig::Files {
            certificate: base.join(&self.certificate),
            private_key: base.join(&self.private_key),
        };
        Ok((tls, client_auth))
    }
}

impl RawAdmin {
    /// `[admin]`: off unless enabled or given a listen address; a bare port is loopback.
    fn validate(&self) -> Result<Option<SocketAddr>, ConfigError> {
        Ok(match (self.enabled, &self.listen) {
            (Some(false), _) | (None, None) => None,
            (_, None) => Some(parse_addr("admin.listen", DEFAULT_ADMIN_LISTEN)?),
            (_, Some(PortOrAddress::Port(port))) => Some(SocketAddr::from(([127, 0, 0, 1], *port))),
            (_, Some(PortOrAddress::Address(a))) => Some(match a.trim().parse::<u16>() {
                Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => parse_addr("admin.listen", a)?,
            }),
        })
    }
}

impl RawHealth {
    /// `[health]`; `XKS_PROXY_FLEET_SIZE` (from `env`) overrides `fleet_size`.
    fn validate(&self, env: &Environment) -> Result<HealthConfig, ConfigError> {
        use crate::api::health::{CHECK_BUDGET, MAX_AGE, MAX_CHECK_INTERVAL_SECS};
        let fleet_size = match &env.fleet_size {
            Some(v) => v.trim().parse::<u32>().map_err(|_| {
                ConfigError::new(
                    "health.fleet_size",
                    "environment variable XKS_PROXY_FLEET_SIZE is not a positive integer",
                )
            })?,
            None => self.fleet_size,
        };
        if fleet_size == 0 {
            return Err(ConfigError::new(
                "health.fleet_size",
                "must be greater than 0 (spec)",
            ));
        }
        if !(1..=MAX_CHECK_INTERVAL_SECS).contains(&self.check_interval_secs) {
            return Err(ConfigError::new(
                "health.check_interval_secs",
                format!(
                    "must be 1 to {MAX_CHECK_INTERVAL_SECS}: the spec allows a cached health result at most {} s old, and a check may take up to {} s",
                    MAX_AGE.as_secs(),
                    CHECK_BUDGET.as_secs()
                ),
            ));
        }
        if self.vendor.is_empty() || self.vendor.len() > 128 {
            return Err(ConfigError::new(
                "health.vendor",
                "must be 1 to 128 characters",
            ));
        }
        Ok(HealthConfig {
            fleet_size,
            vendor: self.vendor.clone(),
            check_interval: Duration::from_secs(self.check_interval_secs),
        })
    }
}

impl RawSigv4 {
    /// `[sigv4]`: the regions accepted and the clock skew allowed.
    fn validate(&self) -> Result<crate::sigv4::VerifyPolicy, ConfigError> {
        let mut sigv4 = crate::sigv4::VerifyPolicy::default();
        if let Some(regions) = &self.regions {
            if regions.is_empty() || regions.iter().any(|r| r.is_empty()) {
                return Err(ConfigError::new(
                    "sigv4.regions",
                    "must list at least one non-empty region, or be left out",
                ));
            }
            sigv4.allowed_regions = Some(regions.clone());
        }
        if let Some(skew) = self.max_clock_skew_secs {
            if !(1..=300).contains(&skew) {
                return Err(ConfigError::new(
                    "sigv4.max_clock_skew_secs",
                    "must be 1 to 300 (the spec requires rejecting requests more than 5 minutes off)",
                ));
            }
            sigv4.max_skew = Duration::from_secs(skew);
        }
        Ok(sigv4)
    }
}

impl RawLogging {
    /// `[logging]`: the format and a tracing filter that parses.
    fn validate(&self) -> Result<LoggingConfig, ConfigError> {
        let format = match self.format.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "logging.format",
                    format!("'{other}' is not one of: human, json"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(ConfigError::new(
                "logging.level",
                "is not a valid tracing filter",
            ));
        }
        Ok(LoggingConfig {
            format,
            level: self.level.clone(),
        })
    }
}

impl RawLimits {
    /// `[limits]`: the backend call boundary's deadline and queue.
    fn validate(&self) -> Result<crate::backend::CallLimits, ConfigError> {
        if !(1..=10_000).contains(&self.backend_deadline_ms) {
            return Err(ConfigError::new(
                "limits.backend_deadline_ms",
                "must be 1 to 10000",
            ));
        }
        Ok(crate::backend::CallLimits {
            concurrency: 64,
            max_waiting: self.backend_max_waiting,
            deadline: Duration::from_millis(self.backend_deadline_ms),
        })
    }
}

/// Every `[[keystores]]`, then the rules that span them: no key served by two tenants
/// by omission ([`check_key_ownership`]) and no backend that no keystore uses.
fn validate_keystores(
    raw: Vec<RawKeystore>,
    backends: &[BackendEntry],
    base: &Path,
    watched: &mut Vec<PathBuf>,
) -> Result<Vec<KeystoreConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::new(
            "keystores",
            "no [[keystores]]: configure at least one path prefix with credentials",
        ));
    }
    let mut keystores = Vec::with_capacity(raw.len());
    // Each keystore's (allowed_keys, shared_keys) as written, for the ownership rules.
    let mut assignments = Vec::with_capacity(raw.len());
    for (i, ks) in raw.into_iter().enumerate() {
        let (keystore, lists) = ks.validate(i, &keystores, backends, base, watched)?;
        keystores.push(keystore);
        assignments.push(lists);
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
    Ok(keystores)
}

impl RawKeystore {
    /// `keystores[i]`, given the ones before it (a path prefix is configured once).
    fn validate(
        self,
        i: usize,
        earlier: &[KeystoreConfig],
        backends: &[BackendEntry],
        base: &Path,
        watched: &mut Vec<PathBuf>,
    ) -> Result<(KeystoreConfig, KeyLists), ConfigError> {
        let key = format!("keystores[{i}]");
        let backend = keystore_backend(i, self.backend.as_deref(), backends)?;
        validate_path_prefix(&self.path_prefix)
            .map_err(|p| ConfigError::new(format!("{key}.path_prefix"), p))?;
        if earlier.iter().any(|k| k.path_prefix == self.path_prefix) {
            return Err(ConfigError::new(
                format!("{key}.path_prefix"),
                format!("'{}' is configured twice", self.path_prefix),
            ));
        }
        if self.credentials.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.credentials"),
                "at least one credential is required",
            ));
        }
        let mut credentials: Vec<CredentialConfig> = Vec::new();
        for (j, c) in self.credentials.into_iter().enumerate() {
            let ckey = format!("{key}.credentials[{j}]");
            // Only valid ids are in `credentials`, so a repeat is checked after the rule.
            if credentials
                .iter()
                .any(|x| x.access_key_id == c.access_key_id)
            {
                return Err(ConfigError::new(
                    format!("{ckey}.access_key_id"),
                    "appears twice in this keystore",
                ));
            }
            credentials.push(c.validate(&ckey, base, watched)?);
        }
        for (field, list) in [
            ("allowed_keys", &self.allowed_keys),
            ("shared_keys", &self.shared_keys),
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
        let quota = match (self.quota_rps, self.quota_burst) {
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
        let aws_sample_metadata = match &self.aws_sample_ciphertexts {
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
        let served = served_keys(self.allowed_keys.as_deref(), self.shared_keys.as_deref());
        let lists = KeyLists {
            allowed: self.allowed_keys,
            shared: self.shared_keys,
        };
        let keystore = KeystoreConfig {
            path_prefix: self.path_prefix,
            backend,
            credentials,
            allowed_keys: served,
            quota,
            aws_sample_metadata,
        };
        Ok((keystore, lists))
    }
}

impl RawCredential {
    /// One credential (`ckey` names it): KMS's access key id rule, then the secret, read
    /// from its file or variable (a file joins `watched`: it rotates with a reload).
    fn validate(
        self,
        ckey: &str,
        base: &Path,
        watched: &mut Vec<PathBuf>,
    ) -> Result<CredentialConfig, ConfigError> {
        if !valid_access_key_id(&self.access_key_id) {
            return Err(ConfigError::new(
                format!("{ckey}.access_key_id"),
                "must be 20-30 characters of A-Z and 2-7 (KMS's rule); `xks-proxy credentials new` makes one",
            ));
        }
        let source = SecretSource::from_pair(
            &format!("{ckey}.secret_env"),
            self.secret_env.as_ref(),
            self.secret_file.as_ref(),
            base,
        )?;
        let secret = source.read(&format!("{ckey}.secret"))?;
        if let SecretSource::File(f) = &source {
            watched.push(f.clone());
        }
        if !valid_secret(secret.expose()) {
            return Err(ConfigError::new(
                format!("{ckey}.secret"),
                "must be 43-64 characters of a-z A-Z 0-9 / + = (KMS's rule)",
            ));
        }
        Ok(CredentialConfig {
            access_key_id: self.access_key_id,
            secret,
            source,
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
pub(super) fn served_keys(
    allowed: Option<&[String]>,
    shared: Option<&[String]>,
) -> Option<Vec<String>> {
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
