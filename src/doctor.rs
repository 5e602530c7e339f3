//! `xks-proxy doctor`: checks a configuration end to end, the way KMS will exercise it,
//! and prints a report an operator can act on. Exit code 0 only if nothing failed.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::{HealthState, KeySpec, KeyStatus, KeyUsage};
use crate::config::BackendEntry;
use crate::config::{Config, TlsConfig, XKS_BASE};
use crate::server::tls;

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Default)]
struct Report {
    lines: Vec<(Level, String)>,
}

impl Report {
    fn add(&mut self, level: Level, msg: impl Into<String>) {
        self.lines.push((level, msg.into()));
    }
    fn pass(&mut self, msg: impl Into<String>) {
        self.add(Level::Pass, msg);
    }
    fn warn(&mut self, msg: impl Into<String>) {
        self.add(Level::Warn, msg);
    }
    fn fail(&mut self, msg: impl Into<String>) {
        self.add(Level::Fail, msg);
    }
    fn failed(&self) -> bool {
        self.lines.iter().any(|(l, _)| *l == Level::Fail)
    }
    fn render(&self) -> String {
        let mut out = String::new();
        for (level, msg) in &self.lines {
            let tag = match level {
                Level::Pass => "PASS",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "[{tag}] {msg}");
        }
        let (p, w, f) = self
            .lines
            .iter()
            .fold((0, 0, 0), |(p, w, f), (l, _)| match l {
                Level::Pass => (p + 1, w, f),
                Level::Warn => (p, w + 1, f),
                Level::Fail => (p, w, f + 1),
            });
        let _ = writeln!(out, "\n{p} passed, {w} warnings, {f} failed");
        out
    }
}

/// How KMS reaches the proxy (KMS's XksProxyConnectivity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Connectivity {
    /// PUBLIC_ENDPOINT: over the internet, to the endpoint's public DNS name.
    PublicEndpoint,
    /// VPC_ENDPOINT_SERVICE: through a VPC endpoint service, to its private DNS name.
    VpcEndpointService,
}

/// How KMS will reach the proxy: what the TLS checks check against.
#[derive(Debug, Clone, Copy)]
pub struct Kms<'a> {
    /// The DNS name KMS uses (XksProxyUriEndpoint's host); `None`: name checks skipped.
    pub endpoint: Option<&'a str>,
    pub connectivity: Connectivity,
    /// The roots that KMS trusts: `None` for real KMS (Mozilla's public roots), or a PEM
    /// bundle for a KMS stand-in with a private CA (the emulator's `--xks-ca-bundle`).
    pub ca_bundle: Option<&'a Path>,
}

/// Runs every check and prints the report.
pub fn run(config_path: &Path, kms: &Kms<'_>) -> ExitCode {
    let report = check(config_path, kms);
    print!("{}", report.render());
    if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn check(config_path: &Path, kms: &Kms<'_>) -> Report {
    let mut r = Report::default();
    let cfg = match Config::load(config_path) {
        Ok(c) => {
            // Only what this step proved: the key manager's own secrets (master key,
            // PIN) are checked, and reported once, by the backend line below.
            r.pass(format!(
                "config {} is valid and its SigV4 secrets are readable",
                config_path.display()
            ));
            c
        }
        Err(e) => {
            r.fail(format!("config: {e}"));
            return r;
        }
    };
    check_clock(&mut r);
    if let Some(path) = &cfg.policy_file {
        match crate::policy::Policy::from_file(path) {
            Ok(p) => r.pass(format!(
                "policy {}: loads and validates ({} policies: {})",
                path.display(),
                p.policy_ids().len(),
                p.policy_ids().join(", ")
            )),
            Err(e) => r.fail(format!("policy: {e}")),
        }
    }
    for ks in &cfg.keystores {
        let keys = match &ks.allowed_keys {
            None => "every key of the backend".to_owned(),
            Some(k) => format!("{} assigned key(s)", k.len()),
        };
        r.pass(format!(
            "path prefix '{}': XksProxyUriPath {}{XKS_BASE} ({} characters, spec limit 128), {} credential(s), serves {keys}",
            ks.path_prefix,
            ks.path_prefix,
            ks.path_prefix.len() + XKS_BASE.len(),
            ks.credentials.len()
        ));
    }
    check_secret_files(&mut r, &cfg);
    check_tls(&mut r, &cfg, kms);
    check_backend(&mut r, &cfg, config_path);
    r
}

/// Every file the config names that holds a secret: what it is, and where.
fn secret_files(cfg: &Config) -> Vec<(String, std::path::PathBuf)> {
    use crate::config::{BackendConfig, SecretSource};
    let mut files = Vec::new();
    for ks in &cfg.keystores {
        for c in &ks.credentials {
            if let SecretSource::File(f) = &c.source {
                files.push((
                    format!("SigV4 secret of {} ('{}')", c.access_key_id, ks.path_prefix),
                    f.clone(),
                ));
            }
        }
    }
    for b in &cfg.backends {
        let of = if cfg.backends.len() == 1 {
            String::new()
        } else {
            format!(" of backend '{}'", b.name)
        };
        match &b.config {
            BackendConfig::Software {
                master_key: SecretSource::File(f),
                ..
            } => files.push((format!("software keystore master key{of}"), f.clone())),
            BackendConfig::Software { .. } => {}
            #[cfg(feature = "pkcs11")]
            BackendConfig::Pkcs11(s) => {
                if let Some(f) = &s.user_pin_file {
                    files.push((format!("PKCS#11 user PIN{of}"), f.clone()));
                }
                for (i, t) in s.failover.iter().enumerate() {
                    if let Some(f) = &t.user_pin_file {
                        files.push((format!("PKCS#11 user PIN of failover[{i}]{of}"), f.clone()));
                    }
                }
            }
        }
    }
    files
}

/// Secret files readable by anyone but their owner: `serve` warns about them in its
/// log; the report says it too, where an operator reads it before going live.
fn check_secret_files(r: &mut Report, cfg: &Config) {
    use std::os::unix::fs::PermissionsExt as _;
    let files = secret_files(cfg);
    let mut shared = 0;
    for (what, path) in &files {
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                shared += 1;
                r.warn(format!(
                    "secret file {} ({what}) is readable by group or others (mode {mode:03o}): chmod 600 it",
                    path.display()
                ));
            }
        }
    }
    if shared == 0 && !files.is_empty() {
        r.pass(format!(
            "secret files: {} named, none readable by group or others",
            files.len()
        ));
    }
}

fn check_clock(r: &mut Report) {
    // Without network access the best evidence is: not before this build, and (when
    // systemd is there) NTP says it is synchronised. SigV4 fails beyond 5 minutes skew.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    const BUILD_YEAR_FLOOR: Duration = Duration::from_secs(1_767_225_600); // 2026-01-01
    if now < BUILD_YEAR_FLOOR {
        r.fail(
            "system clock is before 2026: SigV4 requests from KMS will all fail (5-minute window)",
        );
        return;
    }
    match std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .output()
    {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "yes" => {
            r.pass("clock: NTP synchronised");
        }
        Ok(o) if o.status.success() => r.warn(
            "clock: NTP not synchronised (timedatectl); SigV4 rejects requests more than 5 minutes off",
        ),
        _ => r.warn("clock: cannot tell whether NTP is synchronised (no timedatectl); keep it synced: SigV4 allows 5 minutes"),
    }
}

fn check_tls(r: &mut Report, cfg: &Config, kms: &Kms<'_>) {
    let endpoint = kms.endpoint;
    let Some(t) = &cfg.server.tls else {
        r.warn(
            "TLS is off (insecure_plain_http): only correct behind a TLS-terminating load balancer",
        );
        return;
    };
    let (certs, _key) = match tls::load_identity(t) {
        Ok(x) => x,
        Err(e) => {
            r.fail(format!("TLS: {e}"));
            return;
        }
    };
    match tls::server_config(t, cfg.server.client_auth.as_ref()) {
        Ok(_) => r.pass(format!(
            "TLS: certificate chain ({} certificate(s)) and private key load and match",
            certs.len()
        )),
        Err(e) => r.fail(format!("TLS: {e}")),
    }
    match tls::days_to_expiry(t) {
        Ok(d) if d < 0 => r.fail(format!("TLS: the certificate expired {} day(s) ago", -d)),
        Ok(d) if d < 30 => r.warn(format!(
            "TLS: the certificate expires in {d} day(s); renew it"
        )),
        Ok(d) => r.pass(format!("TLS: the certificate is valid for {d} more day(s)")),
        Err(e) => r.fail(format!("TLS: {e}")),
    }
    if let Some(leaf) = certs.first() {
        match tls::certificate_names(leaf) {
            Ok(names) => match endpoint {
                Some(host) => {
                    let host = host.trim_start_matches("https://").to_ascii_lowercase();
                    if names.iter().any(|n| name_matches(n, &host)) {
                        r.pass(format!("TLS: the certificate names {host}"));
                        check_chain(r, &certs, &host, kms);
                    } else {
                        r.fail(format!(
                            "TLS: the certificate does not name {host} (it names: {})",
                            names.join(", ")
                        ));
                    }
                }
                None => r.warn(format!(
                    "TLS: names in the certificate: {} (pass --endpoint HOST to check KMS's name)",
                    names.join(", ")
                )),
            },
            Err(e) => r.fail(format!("TLS: cannot parse the leaf certificate: {e}")),
        }
        if certs.len() == 1 {
            r.warn(
                "TLS: the chain has only the leaf; public CAs need their intermediate(s) sent too",
            );
        }
    }
    if matches!(t, TlsConfig::Embedded { .. }) {
        r.warn("TLS: the embedded dev certificate is in use: never in production");
    }
    match &cfg.server.client_auth {
        Some(a) if a.ca.exists() => r.pass(format!(
            "mTLS: client CA {} present; required subjects: {}",
            a.ca.display(),
            a.subjects.join(", ")
        )),
        Some(a) => r.fail(format!("mTLS: client CA {} is missing", a.ca.display())),
        None => r.warn("mTLS: off (the spec recommends it: client_ca + client_subjects)"),
    }
}

/// KMS connects only to a proxy whose certificate chains to a public CA it trusts,
/// for either connectivity option (the troubleshooting table sends
/// XKS_PROXY_INVALID_TLS_CONFIGURATION here). Checked the way a TLS client checks it:
/// the chain as served, against Mozilla's public roots (not this host's store), for
/// the endpoint's name, now.
fn check_chain(
    r: &mut Report,
    certs: &[rustls_pki_types::CertificateDer<'static>],
    host: &str,
    kms: &Kms<'_>,
) {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls_pki_types::pem::PemObject as _;
    let Some((leaf, intermediates)) = certs.split_first() else {
        return;
    };
    let (roots, trusted) = match kms.ca_bundle {
        None => (
            rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            "a public root CA".to_owned(),
        ),
        Some(bundle) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(bundle)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>());
            match certs {
                Ok(certs) => {
                    roots.add_parsable_certificates(certs);
                }
                Err(e) => {
                    r.fail(format!(
                        "TLS: cannot read --kms-ca-bundle {}: {e}",
                        bundle.display()
                    ));
                    return;
                }
            }
            (roots, format!("a root in {}", bundle.display()))
        }
    };
    let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(tls::provider()),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            r.fail(format!("TLS: cannot build the chain check: {e}"));
            return;
        }
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(host.to_owned()) else {
        r.fail(format!("TLS: {host} is not a DNS name KMS can use"));
        return;
    };
    let what_kms_needs = match kms.connectivity {
        Connectivity::PublicEndpoint => {
            "with a public endpoint, KMS connects only to a certificate issued by a public CA it trusts, sent with its intermediates"
        }
        Connectivity::VpcEndpointService => {
            "with a VPC endpoint service too, KMS requires a certificate issued by a public CA it trusts (with its intermediates) that names the endpoint service's private DNS name"
        }
    };
    match verifier.verify_server_cert(
        leaf,
        intermediates,
        &name,
        &[],
        rustls_pki_types::UnixTime::now(),
    ) {
        Ok(_) => r.pass(format!(
            "TLS: the chain as served reaches {trusted} for {host}"
        )),
        Err(e) => r.fail(format!(
            "TLS: the chain as served does not reach {trusted} ({e}); {what_kms_needs} (issuer of the leaf: {})",
            tls::certificate_issuer(leaf).unwrap_or_else(|_| "unreadable".into())
        )),
    }
}

/// DNS name matching with one leading wildcard label, as public CAs issue them.
fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// What a DEGRADED or UNAVAILABLE PKCS#11 backend line adds. The deep check needs this
/// proxy's own key on each token; an HSM whose keys were all made elsewhere (AWS's
/// sample proxy) has none yet, and reports so for that alone.
#[cfg(feature = "pkcs11")]
fn health_hint(cfg: &Config, entry: &BackendEntry, config_path: &Path) -> String {
    let which = if cfg.backends.len() == 1 {
        String::new()
    } else {
        format!(" --backend {}", entry.name)
    };
    match &entry.config {
        crate::config::BackendConfig::Pkcs11(settings) => format!(
            ": its deep check round-trips with the health-check key {:?}; if this HSM's keys were made by something else (e.g. AWS's sample proxy) it has none yet: `xks-proxy keys create-health-check-key --config {}{which}`; otherwise the token is unreachable or refused the login (serve's log names the PKCS#11 code)",
            settings.health_check_key_label.as_deref().unwrap_or("-"),
            config_path.display()
        ),
        crate::config::BackendConfig::Software { .. } => String::new(),
    }
}

#[cfg(not(feature = "pkcs11"))]
fn health_hint(_: &Config, _: &BackendEntry, _: &Path) -> String {
    String::new()
}

/// Opens each backend, runs its deep check, and checks the keys of the prefixes that
/// use it.
fn check_backend(r: &mut Report, cfg: &Config, config_path: &Path) {
    for entry in &cfg.backends {
        let label = if cfg.backends.len() == 1 {
            "backend".to_owned()
        } else {
            format!("backend '{}'", entry.name)
        };
        let backend = match crate::backend::open(&entry.config) {
            Ok(b) => {
                r.pass(format!("{label}: opened"));
                b
            }
            Err(e) => {
                r.fail(format!("{label}: {e}"));
                continue;
            }
        };
        let hint = health_hint(cfg, entry, config_path);
        for e in &backend.health() {
            match e.state {
                HealthState::Active => r.pass(format!(
                    "{label}: {} ({}) passed a real AES-GCM round trip",
                    e.id, e.model
                )),
                HealthState::Degraded => {
                    r.warn(format!("{label}: {} ({}) is DEGRADED{hint}", e.id, e.model))
                }
                HealthState::Unavailable => r.fail(format!(
                    "{label}: {} ({}) is UNAVAILABLE{hint}",
                    e.id, e.model
                )),
            }
        }
        check_keys(r, cfg, entry, &*backend);
    }
}

/// The keys each prefix on `entry` names: present, AES_256, ENCRYPT+DECRYPT, enabled.
fn check_keys(
    r: &mut Report,
    cfg: &Config,
    entry: &BackendEntry,
    backend: &dyn crate::backend::CryptoBackend,
) {
    for ks in cfg.keystores.iter().filter(|k| k.backend == entry.name) {
        let Some(keys) = &ks.allowed_keys else {
            r.warn(format!(
                "prefix '{}': no allowed_keys list, so no key can be checked here (every key in the backend is served)",
                ks.path_prefix
            ));
            continue;
        };
        if keys.is_empty() {
            r.warn(format!(
                "prefix '{}': no keys assigned (allowed_keys = []), so KMS can create no key in this store yet",
                ks.path_prefix
            ));
        }
        for key in keys {
            match backend.key_metadata(key) {
                Ok(md) => {
                    let mut problems = Vec::new();
                    if md.spec != (KeySpec::Aes { bits: 256 }) {
                        problems.push(format!("spec is {:?}, KMS needs AES_256", md.spec));
                    }
                    for u in [KeyUsage::Encrypt, KeyUsage::Decrypt] {
                        if !md.usages.contains(&u) {
                            problems.push(format!("lacks {}", u.as_str()));
                        }
                    }
                    if md.status != KeyStatus::Enabled {
                        problems.push("is DISABLED".into());
                    }
                    if problems.is_empty() {
                        r.pass(format!(
                            "key '{key}' (prefix '{}'): AES_256, ENCRYPT+DECRYPT, ENABLED",
                            ks.path_prefix
                        ));
                    } else {
                        r.fail(format!(
                            "key '{key}' (prefix '{}'): {}",
                            ks.path_prefix,
                            problems.join("; ")
                        ));
                    }
                }
                Err(e) => r.fail(format!("key '{key}' (prefix '{}'): {e}", ks.path_prefix)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_match_one_label() {
        assert!(name_matches("xks.example.com", "xks.example.com"));
        assert!(name_matches("*.example.com", "xks.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("xks.example.com", "other.example.com"));
    }

    #[test]
    fn a_report_with_a_failure_fails() {
        let mut r = Report::default();
        r.pass("a");
        r.warn("b");
        assert!(!r.failed());
        r.fail("c");
        assert!(r.failed());
        assert!(r.render().contains("1 passed, 1 warnings, 1 failed"));
    }
}
