//! Moving from AWS's sample XKS proxy (aws-samples/aws-kms-xks-proxy, `xks-axum`): its
//! `settings.toml` read into this project's config, with every secret moved out to a
//! file and everything that cannot be carried over said plainly.
//!
//! Pure: [`import`] reads the sample's text and returns the config text, the secret
//! files to write and the warnings; the CLI (`xks-proxy config import-aws-sample`)
//! writes them. The one outside fact it may need — which token the sample used, since
//! its settings name only a module and it takes the first token the module shows — is
//! asked of the caller ([`Import::token_label`] or a discovery function).
//!
//! What the sample's settings mean was read from its source (`settings.rs`,
//! `handlers/mod.rs`) and the settings files it ships (copies in
//! `../shared/vectors/aws-sample/settings/`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::secret::SecretString;

/// The result of an import: the config file's text, the secret files it names
/// (relative to the config's directory), and what the operator must know.
#[derive(Debug)]
pub struct Imported {
    pub config: String,
    /// (path relative to the config's directory, content): each written mode 0600.
    pub secret_files: Vec<(PathBuf, SecretString)>,
    /// What could not be carried over, or was changed, and what to do instead.
    pub warnings: Vec<String>,
    /// Credentials made anew because the sample's were empty: KMS must be given them.
    pub new_credentials: Vec<(String, String)>,
}

/// How to import.
#[derive(Debug, Default)]
pub struct Import {
    /// The token's label, when known; otherwise `discover_token` is asked.
    pub token_label: Option<String>,
    /// Where the sample ran: its relative paths (`tls/server_cert.pem`) are resolved
    /// against this directory (default: the settings file's directory's parent, since
    /// the sample keeps its settings in `configuration/`).
    pub sample_root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0} is not a TOML file the sample could read: {1}")]
    Syntax(String, String),
    #[error("`{key}`: {reason}")]
    Setting { key: String, reason: String },
    #[error(
        "the sample's settings name no token, and the first token of {module} could not be read ({reason}); give it with --token-label"
    )]
    Token { module: String, reason: String },
}

fn setting(key: &str, reason: impl Into<String>) -> ImportError {
    ImportError::Setting {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A TOML basic string, quoted and escaped.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn q_path(p: &Path) -> String {
    q(&p.display().to_string())
}

fn table<'a>(root: &'a toml::Table, key: &str) -> Option<&'a toml::Table> {
    root.get(key).and_then(toml::Value::as_table)
}

fn string<'a>(t: Option<&'a toml::Table>, key: &str) -> Option<&'a str> {
    t.and_then(|t| t.get(key)).and_then(toml::Value::as_str)
}

fn boolean(t: Option<&toml::Table>, key: &str) -> Option<bool> {
    t.and_then(|t| t.get(key)).and_then(toml::Value::as_bool)
}

fn integer(t: Option<&toml::Table>, key: &str) -> Option<i64> {
    t.and_then(|t| t.get(key)).and_then(toml::Value::as_integer)
}

/// Reads the sample's settings (`text`, from `path`) into this project's config.
/// `discover_token(module)` returns the label of the first token the module shows, as
/// the sample would have used it; it is called only when `how.token_label` is `None`.
///
/// One section of the sample's settings after another, in the order the config is
/// written: the order of the output, the warnings and the first error is the order of
/// the calls below.
pub fn import(
    path: &Path,
    text: &str,
    how: &Import,
    discover_token: impl FnOnce(&Path) -> Result<String, String>,
) -> Result<Imported, ImportError> {
    let root = parse_settings(path, text)?;
    let sample_root = sample_root(path, how);
    let mut out = Imported {
        config: String::new(),
        secret_files: Vec::new(),
        warnings: Vec::new(),
        new_credentials: Vec::new(),
    };
    let _ = writeln!(
        out.config,
        "# Imported from AWS's sample proxy settings {} by `xks-proxy config import-aws-sample`.\n\
         # Reference for every key: config/xks-proxy.toml in this project.",
        path.display()
    );
    server_and_tls(&root, &sample_root, &mut out)?;
    sigv4_logging_and_unsupported(&root, &mut out);
    backend(&root, how, discover_token, &mut out)?;
    keystores(&root, &mut out)?;
    limits(&root, &mut out);
    Ok(out)
}

/// The sample's settings as a TOML table; its bootstrap file (which only names the
/// settings file) is refused with what to import instead.
fn parse_settings(path: &Path, text: &str) -> Result<toml::Table, ImportError> {
    let root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ImportError::Syntax(path.display().to_string(), e.to_string())
    })?;
    if root.contains_key("XKS_PROXY_SETTINGS_TOML") && !root.contains_key("server") {
        return Err(setting(
            "XKS_PROXY_SETTINGS_TOML",
            "this is the sample's bootstrap.toml, which only names the settings file: import that file instead",
        ));
    }
    Ok(root)
}

/// Where the sample ran, absolute: the new config lives elsewhere, and resolves
/// relative paths against its own directory.
fn sample_root(path: &Path, how: &Import) -> PathBuf {
    let sample_root = how.sample_root.clone().unwrap_or_else(|| {
        path.parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    std::path::absolute(&sample_root).unwrap_or(sample_root)
}

/// A path from the sample's settings, as the sample (running in `sample_root`) read it.
fn resolve(sample_root: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        sample_root.join(p)
    }
}

/// `[server]` and `[security]`/`[tls]` → `[server]` and `[server.tls]`: the listeners,
/// and TLS/mTLS or the plain-HTTP opt-out.
fn server_and_tls(
    root: &toml::Table,
    sample_root: &Path,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let server = table(root, "server");
    let security = table(root, "security");
    let tls = table(root, "tls");
    let ip = string(server, "ip").unwrap_or("0.0.0.0");
    let port = integer(server, "port").ok_or_else(|| setting("server.port", "missing"))?;
    let _ = writeln!(
        out.config,
        "\n[server]\nlisten = {}",
        q(&format!("{ip}:{port}"))
    );
    if let Some(ping) = integer(server, "port_http_ping")
        && ping != port
    {
        let _ = writeln!(out.config, "ping_listen = {}", q(&format!("{ip}:{ping}")));
    }
    let tls_on = boolean(security, "is_tls_enabled").unwrap_or(false);
    if !tls_on {
        let _ = writeln!(out.config, "insecure_plain_http = true");
        out.warnings.push(
            "security.is_tls_enabled = false: carried over as server.insecure_plain_http = true, which is only safe behind a load balancer that terminates TLS on a private network".to_owned(),
        );
    }
    if boolean(security, "is_sigv4_auth_enabled") == Some(false) {
        out.warnings.push(
            "security.is_sigv4_auth_enabled = false cannot be carried over: this proxy always verifies KMS's SigV4 signature (the credentials below are required)".to_owned(),
        );
    }
    if tls_on {
        let cert =
            string(tls, "tls_cert_pem").ok_or_else(|| setting("tls.tls_cert_pem", "missing"))?;
        let key =
            string(tls, "tls_key_pem").ok_or_else(|| setting("tls.tls_key_pem", "missing"))?;
        let _ = writeln!(
            out.config,
            "\n[server.tls]\ncertificate = {}\nprivate_key = {}",
            q_path(&resolve(sample_root, cert)),
            q_path(&resolve(sample_root, key))
        );
        if boolean(security, "is_mtls_enabled") == Some(true) {
            let ca = string(tls, "mtls_client_ca_pem")
                .ok_or_else(|| setting("tls.mtls_client_ca_pem", "missing"))?;
            let name = string(tls, "mtls_client_dns_name")
                .ok_or_else(|| setting("tls.mtls_client_dns_name", "missing"))?;
            let _ = writeln!(
                out.config,
                "client_ca = {}\nclient_subjects = [{}]",
                q_path(&resolve(sample_root, ca)),
                q(name)
            );
        }
    } else if boolean(security, "is_mtls_enabled") == Some(true) {
        out.warnings.push(
            "security.is_mtls_enabled = true without TLS cannot be carried over: mTLS needs [server.tls]".to_owned(),
        );
    }
    Ok(())
}

/// The region → `[sigv4]`, the log level → `[logging]`, and the sample's settings that
/// have no counterpart here (its service name, file logging, Oso secondary auth, TCP
/// keepalive), each with what to do instead.
fn sigv4_logging_and_unsupported(root: &toml::Table, out: &mut Imported) {
    let server = table(root, "server");
    let security = table(root, "security");
    if let Some(region) = string(server, "region") {
        let _ = writeln!(out.config, "\n[sigv4]\nregions = [{}]", q(region));
    }
    if let Some(service) = string(server, "service")
        && service != "kms-xks-proxy"
    {
        out.warnings.push(format!(
            "server.service = {service:?} is not carried over: KMS signs for kms-xks-proxy, which is the only service this proxy accepts"
        ));
    }
    if let Some(level) = string(table(root, "tracing"), "level") {
        let level = level.to_ascii_lowercase();
        let _ = writeln!(out.config, "\n[logging]\nlevel = {}", q(&level));
        if level == "debug" || level == "trace" {
            out.warnings.push(format!(
                "tracing.level = {level:?} carried over; info is the level for production"
            ));
        }
    }
    if boolean(table(root, "tracing"), "is_file_writer_enabled") == Some(true) {
        out.warnings.push(
            "tracing.is_file_writer_enabled: this proxy logs to stderr only (journald, the container runtime); rotate there".to_owned(),
        );
    }
    if security.and_then(|s| s.get("secondary_auth")).is_some() {
        out.warnings.push(
            "security.secondary_auth (Oso, its .polar file) cannot be carried over: write the same rules as a Cedar policy ([policy] file; examples in config/policies/)".to_owned(),
        );
    }
    if table(server.unwrap_or(&toml::Table::new()), "tcp_keepalive").is_some() {
        out.warnings.push(
            "server.tcp_keepalive is not carried over: idle connections are bounded by [server] idle_timeout_ms and header_read_timeout_ms instead".to_owned(),
        );
    }
}

/// `[pkcs11]` and `[hsm_capabilities]` → `[backend]`: the module, the token the sample
/// used, its PIN (to a secret file), the IV policy and the pool size.
fn backend(
    root: &toml::Table,
    how: &Import,
    discover_token: impl FnOnce(&Path) -> Result<String, String>,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let pkcs11 = table(root, "pkcs11").ok_or_else(|| setting("pkcs11", "missing"))?;
    let module = hsm_module(root, pkcs11, out)?;
    let token = match &how.token_label {
        Some(l) => l.clone(),
        None => discover_token(&module).map_err(|reason| ImportError::Token {
            module: module.display().to_string(),
            reason,
        })?,
    };
    let pin =
        string(Some(pkcs11), "user_pin").ok_or_else(|| setting("pkcs11.user_pin", "missing"))?;
    out.secret_files.push((
        PathBuf::from("secrets/hsm-pin"),
        SecretString::new(pin.to_owned()),
    ));
    let _ = writeln!(
        out.config,
        "\n[backend]\nkind = \"pkcs11\"\nmodule = {}\n# The sample used the first token the module showed; this is its label.\ntoken_label = {}\nuser_pin_file = \"secrets/hsm-pin\"\niv_policy = {}",
        q_path(&module),
        q(&token),
        q(iv_policy(table(root, "hsm_capabilities")))
    );
    if let Some(n) = integer(Some(pkcs11), "session_pool_max_size").filter(|n| *n > 0) {
        let _ = writeln!(out.config, "pool_size = {n}");
    }
    for ignored in [
        "session_pool_timeout_milli",
        "context_read_timeout_milli",
        "session_eager_close",
    ] {
        if pkcs11.contains_key(ignored) {
            out.warnings.push(format!(
                "pkcs11.{ignored} has no counterpart: key-manager calls are bounded by [backend] call_deadline_ms and a bounded wait queue"
            ));
        }
    }
    out.warnings.push(format!(
        "the token holds the sample's keys but not this proxy's health-check key: run `xks-proxy keys create-health-check-key --config FILE` once (it makes `xks-health-check`, an AES-256 key used only by the deep health check), or the health check reports UNAVAILABLE and KMS will not connect (token {token:?})"
    ));
    Ok(())
}

/// The HSM's PKCS#11 library. With the pkcs11-logger wrapper, the HSM's own library is
/// the logger's target, and that is the one used.
fn hsm_module(
    root: &toml::Table,
    pkcs11: &toml::Table,
    out: &mut Imported,
) -> Result<PathBuf, ImportError> {
    let logger = table(root, "pkcs11_logger");
    let mut module = string(Some(pkcs11), "PKCS11_HSM_MODULE")
        .ok_or_else(|| setting("pkcs11.PKCS11_HSM_MODULE", "missing"))?
        .to_owned();
    if let Some(real) = string(logger, "PKCS11_LOGGER_LIBRARY_PATH").filter(|p| !p.is_empty())
        && module.contains("pkcs11-logger")
    {
        out.warnings.push(format!(
            "pkcs11.PKCS11_HSM_MODULE is the pkcs11-logger wrapper: the HSM's library {real} is used directly"
        ));
        module = real.to_owned();
    }
    Ok(PathBuf::from(module))
}

/// The IV policy matching what the sample was told the HSM can do.
fn iv_policy(caps: Option<&toml::Table>) -> &'static str {
    match (
        boolean(caps, "can_generate_iv").unwrap_or(false),
        boolean(caps, "is_zero_iv_required").unwrap_or(false),
    ) {
        (false, _) => "proxy_random",
        (true, false) => "hsm_generated",
        (true, true) => "zero_filled_returned",
    }
}

/// One of the sample's `[[external_key_stores]]`, read.
struct SampleStore {
    /// Its position, for the messages.
    index: usize,
    prefix: String,
    access_key_id: String,
    secret: String,
    keys: Vec<String>,
}

/// `[[external_key_stores]]` → `[[keystores]]`: each store's prefix, keys (own and
/// shared), credential (kept, or made anew when the sample's is not valid) and the
/// sample's ciphertext metadata, so its ciphertexts keep decrypting.
fn keystores(root: &toml::Table, out: &mut Imported) -> Result<(), ImportError> {
    let (stores, served) = read_stores(root)?;
    let metadata = string(table(root, "server"), "ciphertext_metadata_b64").unwrap_or("");
    for store in stores {
        let SampleStore {
            index: i,
            prefix,
            access_key_id: akid,
            secret,
            keys,
        } = store;
        let (own, shared): (Vec<_>, Vec<_>) = keys.into_iter().partition(|k| served[k] == 1);
        let (akid, secret) = if crate::config::valid_access_key_id(&akid)
            && crate::config::valid_secret(&secret)
        {
            (akid, SecretString::new(secret))
        } else {
            let (new_akid, new_secret) = crate::config::generate_credential();
            out.warnings.push(format!(
                "external_key_stores[{i}] ({prefix:?}) had no valid SigV4 credential: a new one was made ({new_akid}); give it to KMS with `xks-proxy kms-config --config FILE --prefix {prefix:?}` (UpdateCustomKeyStore)"
            ));
            out.new_credentials.push((prefix.clone(), new_akid.clone()));
            (new_akid, new_secret)
        };
        let secret_path = PathBuf::from(format!("secrets/sigv4-{akid}"));
        let _ = writeln!(
            out.config,
            "\n[[keystores]]\npath_prefix = {}\nallowed_keys = [{}]\nshared_keys = [{}]\n[[keystores.credentials]]\naccess_key_id = {}\nsecret_file = {}\n# Ciphertexts the sample made keep decrypting; new ones use this proxy's scheme.\n[keystores.aws_sample_ciphertexts]\nciphertext_metadata_b64 = {}",
            q(&prefix),
            own.iter().map(|k| q(k)).collect::<Vec<_>>().join(", "),
            shared.iter().map(|k| q(k)).collect::<Vec<_>>().join(", "),
            q(&akid),
            q_path(&secret_path),
            q(metadata)
        );
        out.secret_files.push((secret_path, secret));
    }
    Ok(())
}

/// The sample's stores, and how many of them serve each key: a key served by several
/// stores must be listed as shared by each (this project refuses to let two prefixes
/// serve a key silently).
fn read_stores(
    root: &toml::Table,
) -> Result<(Vec<SampleStore>, BTreeMap<String, usize>), ImportError> {
    let stores = root
        .get("external_key_stores")
        .and_then(toml::Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| setting("external_key_stores", "no [[external_key_stores]]"))?;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut parsed = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        let key = |k: &str| format!("external_key_stores[{i}].{k}");
        let s = store
            .as_table()
            .ok_or_else(|| setting(&format!("external_key_stores[{i}]"), "not a table"))?;
        let text = |k: &str| s.get(k).and_then(toml::Value::as_str).unwrap_or("");
        let keys: Vec<String> = s
            .get("xks_key_id_set")
            .and_then(toml::Value::as_array)
            .ok_or_else(|| setting(&key("xks_key_id_set"), "missing"))?
            .iter()
            .map(|k| {
                k.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| setting(&key("xks_key_id_set"), "must be strings"))
            })
            .collect::<Result<_, _>>()?;
        for k in &keys {
            *served.entry(k.clone()).or_default() += 1;
        }
        parsed.push(SampleStore {
            index: i,
            prefix: text("uri_path_prefix").to_owned(),
            access_key_id: text("sigv4_access_key_id").to_owned(),
            secret: text("sigv4_secret_access_key").to_owned(),
            keys,
        });
    }
    Ok((parsed, served))
}

/// `[limits]`: a limit above this proxy's cannot be carried over; a warning says so
/// (not an error: the proxy still accepts everything the spec requires).
fn limits(root: &toml::Table, out: &mut Imported) {
    if let Some(l) = table(root, "limits") {
        for (k, max) in [
            ("max_plaintext_in_base64", 8192),
            ("max_aad_in_base64", 16384),
        ] {
            if integer(Some(l), k).is_some_and(|v| v > max) {
                out.warnings.push(format!(
                    "limits.{k} above {max} is not carried over: this proxy accepts plaintext up to 8192 bytes and AAD up to 16384 bytes (the spec requires 4300 and 8192)"
                ));
            }
        }
    }
}

/// The label of the first initialised token `module` shows — the token the sample used,
/// since it takes the first slot with a token. A one-shot read for the importer; the
/// backend itself never picks "the first slot".
#[cfg(feature = "pkcs11")]
pub fn first_token_label(module: &Path) -> Result<String, String> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let ctx = Pkcs11::new(module).map_err(|e| e.to_string())?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| format!("C_Initialize: {e}"))?;
    let label = ctx
        .get_slots_with_token()
        .map_err(|e| format!("C_GetSlotList: {e}"))?
        .into_iter()
        .filter_map(|slot| ctx.get_token_info(slot).ok())
        .find(cryptoki::slot::TokenInfo::token_initialized)
        .map(|info| info.label().trim_end().to_owned())
        .ok_or_else(|| "it shows no initialised token".to_owned());
    let _ = ctx.finalize();
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[server]
ip = "0.0.0.0"
port = 443
port_http_ping = 80
region = "us-east-2"
service = "kms-xks-proxy"
ciphertext_metadata_b64 = "djAuMC4x"
[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = false
[tls]
tls_cert_pem = "tls/server_cert.pem"
tls_key_pem = "/etc/tls/server_key.pem"
[[external_key_stores]]
uri_path_prefix = ""
sigv4_access_key_id = ""
sigv4_secret_access_key = ""
xks_key_id_set = ["foo", "cat"]
[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
sigv4_secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"
xks_key_id_set = ["foo", "bar"]
[pkcs11]
session_pool_max_size = 30
user_pin = "xks_proxy:1234567"
PKCS11_HSM_MODULE = "/local/pkcs11-logger/pkcs11-logger-x64.so"
[pkcs11_logger]
PKCS11_LOGGER_LIBRARY_PATH = "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"
[hsm_capabilities]
can_generate_iv = true
is_zero_iv_required = true
"#;

    #[test]
    fn the_samples_settings_become_ours_with_every_secret_in_a_file() {
        let path = Path::new("/opt/xks/configuration/settings.toml");
        let mut asked = None;
        let got = import(path, SAMPLE, &Import::default(), |m| {
            asked = Some(m.to_path_buf());
            Ok("hsm1".to_owned())
        })
        .expect("imports");
        // The logger wrapper is skipped: the token is looked up in the HSM's library.
        assert_eq!(
            asked.as_deref(),
            Some(Path::new("/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"))
        );
        let c = &got.config;
        for line in [
            "listen = \"0.0.0.0:443\"",
            "ping_listen = \"0.0.0.0:80\"",
            "certificate = \"/opt/xks/tls/server_cert.pem\"",
            "private_key = \"/etc/tls/server_key.pem\"",
            "regions = [\"us-east-2\"]",
            "module = \"/opt/cloudhsm/lib/libcloudhsm_pkcs11.so\"",
            "token_label = \"hsm1\"",
            "user_pin_file = \"secrets/hsm-pin\"",
            "iv_policy = \"zero_filled_returned\"",
            "pool_size = 30",
            // foo is served by both stores: shared by each; the others are their own.
            "allowed_keys = [\"cat\"]",
            "allowed_keys = [\"bar\"]",
            "shared_keys = [\"foo\"]",
            "access_key_id = \"BETWEEN2TENAND3TENCHARACTERS\"",
            "ciphertext_metadata_b64 = \"djAuMC4x\"",
        ] {
            assert!(c.contains(line), "{line} missing from:\n{c}");
        }
        // No secret is inline: PIN and SigV4 secrets are files only.
        assert!(
            !c.contains("1234567") && !c.contains("PleaseReplaceThis"),
            "{c}"
        );
        let files: Vec<_> = got
            .secret_files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert!(files.contains(&"secrets/hsm-pin".to_owned()));
        assert!(files.contains(&"secrets/sigv4-BETWEEN2TENAND3TENCHARACTERS".to_owned()));
        // The empty credential of the first store was replaced, and that is said.
        assert_eq!(got.new_credentials.len(), 1);
        assert_eq!(got.new_credentials[0].0, "");
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("no valid SigV4 credential"))
        );
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("keys create-health-check-key"))
        );
        // Debug never shows a secret.
        assert!(!format!("{got:?}").contains("1234567"));
    }

    #[test]
    fn what_cannot_be_carried_is_said() {
        let text = SAMPLE
            .replace("is_tls_enabled = true", "is_tls_enabled = false")
            .replace("[security]\n", "[security]\nsecondary_auth = \"Oso\"\n");
        let got = import(
            Path::new("settings.toml"),
            &text,
            &Import::default(),
            |_| Ok("t".to_owned()),
        )
        .expect("imports");
        assert!(got.config.contains("insecure_plain_http = true"));
        assert!(!got.config.contains("[server.tls]"));
        for needle in ["insecure_plain_http", "Cedar policy"] {
            assert!(
                got.warnings.iter().any(|w| w.contains(needle)),
                "{needle}: {:?}",
                got.warnings
            );
        }
    }

    #[test]
    fn a_token_that_cannot_be_found_names_the_module_and_the_way_out() {
        let e = import(Path::new("s.toml"), SAMPLE, &Import::default(), |_| {
            Err("no token".to_owned())
        })
        .expect_err("no token");
        let text = e.to_string();
        assert!(
            text.contains("libcloudhsm_pkcs11.so") && text.contains("--token-label"),
            "{text}"
        );
        let e = import(
            Path::new("bootstrap.toml"),
            "XKS_PROXY_SETTINGS_TOML = \"x\"",
            &Import::default(),
            |_| Ok("t".to_owned()),
        )
        .expect_err("bootstrap");
        assert!(e.to_string().contains("bootstrap.toml"));
    }
}
