//! What a reload changes: every setting of a validated [`Config`] classified once, by
//! type. [`split`] takes a config apart with exhaustive destructuring (no `..`), so a
//! new field in [`Config`], [`ServerConfig`], [`AuditConfig`] or the PKCS#11 settings
//! does not compile until it is put on one side:
//!
//! - [`RestartOnly`]: read once when the process starts (listeners, connection limits,
//!   the SigV4 policy, health, logging, the audit writer, ...). A reload compares the
//!   running values with the file's and warns, naming each key that differs
//!   ([`RestartOnly::differences`]); the running value stays.
//! - [`Reloadable`]: what a reload applies (tenants and their credentials, the policy,
//!   the TLS certificate and client CA, the backends). The reloader reads only this
//!   projection, so it cannot apply a restart-only value by mistake.
//! - Per backend, [`split_backend`]: the [`BackendIdentity`] (a different identity is
//!   a different key manager, opened anew) and the [`BackendLive`] part a running
//!   backend applies to itself (its PIN sources and disabled-key list).
//!
//! [`secret_uses`] answers "does this secret rotate with a reload?" from the same
//! classes: a secret rotates when it is read from a file and sits on the reloadable
//! side. `server::reload` applies what this module describes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    AuditConfig, AuditFsync, AuditOnFailure, BackendConfig, BackendEntry, ClientAuthConfig, Config,
    HealthConfig, KeystoreConfig, LogFormat, LoggingConfig, SecretSource, ServerConfig, TlsConfig,
};

/// Declares [`RestartOnly`] from one list of `field: type => "config key"`, so that the
/// struct, its comparison and the keys it can name cannot drift apart.
macro_rules! restart_only {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty => $key:literal ),* $(,)?) => {
        /// The settings only a restart applies, as the process runs with them.
        #[derive(Debug, Clone, PartialEq)]
        pub struct RestartOnly {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl RestartOnly {
            /// Every config key a difference can name, in declaration order.
            pub const KEYS: &'static [&'static str] = &[$($key),*];

            /// The restart-only settings `new` would change, each named by its key.
            pub fn differences(&self, new: &Self) -> Vec<Difference> {
                let mut out = Vec::new();
                $(
                    if self.$field != new.$field {
                        out.push(Difference {
                            key: $key,
                            running: format!("{:?}", self.$field),
                            config: format!("{:?}", new.$field),
                        });
                    }
                )*
                out
            }
        }
    };
}

restart_only! {
    listen: SocketAddr => "server.listen",
    ping_listen: Option<SocketAddr> => "server.ping_listen",
    admin_listen: Option<SocketAddr> => "admin.listen",
    /// TLS on or off (`insecure_plain_http`): the accept loop is built for one of them.
    tls_on: bool => "server.tls",
    max_body_bytes: usize => "server.max_body_bytes",
    header_read_timeout: Duration => "server.header_read_timeout_ms",
    body_read_timeout: Duration => "server.body_read_timeout_ms",
    idle_timeout: Duration => "server.idle_timeout_ms",
    shutdown_grace: Duration => "server.shutdown_grace_ms",
    max_connections: usize => "server.max_connections",
    max_connections_per_source: usize => "server.max_connections_per_source",
    http2_max_concurrent_streams: u32 => "server.http2_max_concurrent_streams",
    ping_max_connections: usize => "server.ping_max_connections",
    max_in_flight: usize => "server.max_in_flight",
    require_fips: bool => "server.require_fips",
    health: HealthConfig => "health",
    sigv4: crate::sigv4::VerifyPolicy => "sigv4",
    /// The log subscriber is installed once per process.
    log_level: String => "logging.level",
    log_format: LogFormat => "logging.format",
    /// Also what a backend a reload opens is started with.
    limits: crate::backend::CallLimits => "limits",
    reload_watch: Option<Duration> => "reload.watch_interval_secs",
    /// The writer thread, its files and its key are set up once.
    audit: Option<AuditFixed> => "audit",
}

/// One restart-only setting a reload found changed: what runs and what the file says
/// (`Debug` of the values; none of them holds a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: &'static str,
    pub running: String,
    pub config: String,
}

/// `[audit]` without its key's bytes: the key's source is compared, its value is never
/// held here (a changed key in the same file is read at the next start).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditFixed {
    pub directory: PathBuf,
    pub key_source: SecretSource,
    pub rotate_bytes: Option<u64>,
    pub rotate_interval: Option<Duration>,
    pub queue_capacity: usize,
    pub on_failure: AuditOnFailure,
    pub fsync: AuditFsync,
    pub checkpoint_interval: Duration,
}

/// What a reload applies, borrowed from the new config.
#[derive(Debug, Clone, Copy)]
pub struct Reloadable<'c> {
    pub keystores: &'c [KeystoreConfig],
    pub policy_file: Option<&'c Path>,
    /// The certificate and key (when TLS is on) and the mTLS client CA and subjects.
    pub tls: Option<(&'c TlsConfig, Option<&'c ClientAuthConfig>)>,
    pub backends: &'c [BackendEntry],
    /// The files whose change triggers a reload when watching.
    pub watched_files: &'c [PathBuf],
}

/// Takes `c` apart into what only a restart applies and what a reload applies.
pub fn split(c: &Config) -> (RestartOnly, Reloadable<'_>) {
    let Config {
        server,
        health,
        sigv4,
        logging,
        limits,
        backends,
        keystores,
        admin_listen,
        policy_file,
        reload_watch,
        watched_files,
        audit,
    } = c;
    let LoggingConfig {
        level: _,
        format: _,
    } = logging;
    let ServerConfig {
        listen,
        tls,
        client_auth,
        ping_listen,
        max_body_bytes,
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
        shutdown_grace,
        max_connections,
        max_connections_per_source,
        http2_max_concurrent_streams,
        ping_max_connections,
        max_in_flight,
        require_fips,
    } = server;
    let fixed = RestartOnly {
        listen: *listen,
        ping_listen: *ping_listen,
        admin_listen: *admin_listen,
        tls_on: tls.is_some(),
        max_body_bytes: *max_body_bytes,
        header_read_timeout: *header_read_timeout,
        body_read_timeout: *body_read_timeout,
        idle_timeout: *idle_timeout,
        shutdown_grace: *shutdown_grace,
        max_connections: *max_connections,
        max_connections_per_source: *max_connections_per_source,
        http2_max_concurrent_streams: *http2_max_concurrent_streams,
        ping_max_connections: *ping_max_connections,
        max_in_flight: *max_in_flight,
        require_fips: *require_fips,
        health: health.clone(),
        sigv4: sigv4.clone(),
        log_level: logging.level.clone(),
        log_format: logging.format,
        limits: *limits,
        reload_watch: *reload_watch,
        audit: audit.as_ref().map(AuditFixed::of),
    };
    let live = Reloadable {
        keystores,
        policy_file: policy_file.as_deref(),
        tls: tls.as_ref().map(|t| (t, client_auth.as_ref())),
        backends,
        watched_files,
    };
    (fixed, live)
}

impl AuditFixed {
    fn of(a: &AuditConfig) -> Self {
        let AuditConfig {
            directory,
            key: _, // the bytes are never compared or held: see the type's doc
            key_source,
            rotate_bytes,
            rotate_interval,
            queue_capacity,
            on_failure,
            fsync,
            checkpoint_interval,
        } = a;
        Self {
            directory: directory.clone(),
            key_source: key_source.clone(),
            rotate_bytes: *rotate_bytes,
            rotate_interval: *rotate_interval,
            queue_capacity: *queue_capacity,
            on_failure: *on_failure,
            fsync: *fsync,
            checkpoint_interval: *checkpoint_interval,
        }
    }
}

/// The settings that make a backend a different key manager: everything but its
/// [`BackendLive`] part. A reload keeps a running backend whose identity is unchanged
/// (it applies the live part itself) and opens a new one otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendIdentity(BackendConfig);

/// What a running backend applies to itself on a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendLive {
    /// The keystore file is re-read (its path and master key are the identity).
    Software,
    /// The PIN sources, primary first then each failover token's (`None`: the
    /// primary's), and the key ids reported DISABLED.
    #[cfg(feature = "pkcs11")]
    Pkcs11 {
        pins: Vec<(Option<String>, Option<PathBuf>)>,
        disabled_keys: Vec<String>,
    },
}

/// Takes one backend's settings apart into its identity and its live part.
pub fn split_backend(c: &BackendConfig) -> (BackendIdentity, BackendLive) {
    match c {
        BackendConfig::Software {
            keystore: _,
            master_key: _,
            simulated_latency: _,
        } => (BackendIdentity(c.clone()), BackendLive::Software),
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => {
            let (fixed, live) = split_pkcs11(settings);
            (BackendIdentity(BackendConfig::Pkcs11(fixed)), live)
        }
    }
}

#[cfg(feature = "pkcs11")]
fn split_pkcs11(
    s: &crate::backend::pkcs11::Pkcs11Settings,
) -> (crate::backend::pkcs11::Pkcs11Settings, BackendLive) {
    use crate::backend::pkcs11::{Pkcs11Settings, TokenSettings};
    let Pkcs11Settings {
        module,
        token_label,
        token_serial,
        user_pin_env,
        user_pin_file,
        pool_size,
        call_deadline_ms,
        health_check_key_label,
        key_id_attribute,
        iv_policy,
        disabled_keys,
        failover,
        recovery_backoff_max_ms,
        key_attributes_refresh_secs,
    } = s;
    let mut pins = vec![(user_pin_env.clone(), user_pin_file.clone())];
    let failover = failover
        .iter()
        .map(|t| {
            let TokenSettings {
                module,
                token_label,
                token_serial,
                user_pin_env,
                user_pin_file,
            } = t;
            pins.push((user_pin_env.clone(), user_pin_file.clone()));
            TokenSettings {
                module: module.clone(),
                token_label: token_label.clone(),
                token_serial: token_serial.clone(),
                user_pin_env: None,
                user_pin_file: None,
            }
        })
        .collect();
    let fixed = Pkcs11Settings {
        module: module.clone(),
        token_label: token_label.clone(),
        token_serial: token_serial.clone(),
        user_pin_env: None,
        user_pin_file: None,
        pool_size: *pool_size,
        call_deadline_ms: *call_deadline_ms,
        health_check_key_label: health_check_key_label.clone(),
        key_id_attribute: *key_id_attribute,
        iv_policy: *iv_policy,
        disabled_keys: Vec::new(),
        failover,
        recovery_backoff_max_ms: *recovery_backoff_max_ms,
        key_attributes_refresh_secs: *key_attributes_refresh_secs,
    };
    let live = BackendLive::Pkcs11 {
        pins,
        disabled_keys: disabled_keys.clone(),
    };
    (fixed, live)
}

/// A secret the config names: the setting, where its value comes from, and whether a
/// reload (SIGHUP, `systemctl reload`, the file watch) picks up a new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUse {
    pub setting: String,
    /// `file PATH` or `env VAR`.
    pub source: String,
    pub rotates_on_reload: bool,
}

impl SecretUse {
    /// A secret read from `source` for `setting`; `reloadable` says which side of
    /// [`split`] holds it. Only a file on the reloadable side rotates: an environment
    /// variable cannot change under a running process.
    fn new(setting: String, source: &SecretSource, reloadable: bool) -> Self {
        let (source, is_file) = match source {
            SecretSource::File(f) => (format!("file {}", f.display()), true),
            SecretSource::Env(v) => (format!("env {v}"), false),
        };
        Self {
            setting,
            source,
            rotates_on_reload: is_file && reloadable,
        }
    }
}

/// Every secret `config` names, for `config check` and the README's rotation rule.
pub fn secret_uses(config: &Config) -> Vec<SecretUse> {
    let (fixed, live) = split(config);
    let mut out = Vec::new();
    for k in live.keystores {
        for c in &k.credentials {
            let setting = format!(
                "keystores[{:?}].credentials[{}]",
                k.path_prefix, c.access_key_id
            );
            out.push(SecretUse::new(setting, &c.source, true));
        }
    }
    if let Some((TlsConfig::Files { private_key, .. }, _)) = live.tls {
        let source = SecretSource::File(private_key.clone());
        out.push(SecretUse::new(
            "server.tls.private_key".into(),
            &source,
            true,
        ));
    }
    if let Some(audit) = &fixed.audit {
        let field = match audit.key_source {
            SecretSource::File(_) => "audit.key_file",
            SecretSource::Env(_) => "audit.key_env",
        };
        out.push(SecretUse::new(field.into(), &audit.key_source, false));
    }
    for b in live.backends {
        out.extend(backend_secrets(b));
    }
    out
}

/// A backend's secrets: the software master key is part of its identity (read once at
/// start); PKCS#11 PINs are its live part (a PIN file is re-read at every reload).
fn backend_secrets(b: &BackendEntry) -> Vec<SecretUse> {
    match &b.config {
        BackendConfig::Software { master_key, .. } => {
            let field = match master_key {
                SecretSource::File(_) => "master_key_file",
                SecretSource::Env(_) => "master_key_env",
            };
            vec![SecretUse::new(
                format!("{}.{field}", b.table),
                master_key,
                false,
            )]
        }
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => settings
            .pin_sources()
            .into_iter()
            .map(|(field, source)| SecretUse::new(format!("{}.{field}", b.table), &source, true))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
