//! Settings of the PKCS#11 backend: the `[backend]` table with `kind = "pkcs11"`
//! (everything but `kind` deserialises into [`Pkcs11Settings`]), their defaults, their
//! validation (each error names the offending key), and resolving the user PIN from an
//! environment variable or a file into a [`SecretString`]. PINs are never inline in the
//! TOML.
//!
//! See `config/softhsm.toml`, `config/cloudhsm.toml`, `config/luna.toml` and
//! `config/nshield.toml` for commented profiles.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::errors::Pkcs11Error;
use crate::secret::SecretString;

/// Most tokens GetHealthStatus can list (`ekmFleetDetails` holds 1 to 10 entries).
pub const MAX_TOKENS: usize = 10;

/// How the external key id names a key on the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyIdAttribute {
    /// `CKA_LABEL` equals the key id (UTF-8). The default.
    #[default]
    Label,
    /// `CKA_ID` equals the key id's bytes (the id as text, not hex).
    Id,
}

/// Who chooses the AES-GCM IV on Encrypt. HSM vendors differ, and some refuse a
/// caller-chosen IV in FIPS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IvPolicy {
    /// The proxy draws 12 random bytes (`crate::crypto::rand::SystemRandom`) and passes them in
    /// `CK_GCM_PARAMS.pIv`. SoftHSM and most HSMs outside FIPS-strict modes. Default.
    #[default]
    ProxyRandom,
    /// The HSM generates the IV (Luna with the "no external IV" FIPS policy). The proxy
    /// passes a 12-byte zeroed `pIv` buffer and takes the IV the HSM wrote into it, or,
    /// if the HSM instead appended 12 IV bytes to the output (ciphertext ‖ tag ‖ IV, as
    /// AWS's sample proxy observed on Luna), takes it from there. An IV still all-zero
    /// after the call is refused: it would mean the HSM used our zero buffer.
    HsmGenerated,
    /// The HSM ignores the IV given and writes its own into the buffer, which must be
    /// passed zero-filled (AWS CloudHSM). The IV is read back from `pIv`; an IV still
    /// all-zero after the call is refused.
    ZeroFilledReturned,
}

/// An additional token (failover) holding the same keys as the primary one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The module to load; defaults to the primary's `module`.
    #[serde(default)]
    pub module: Option<PathBuf>,
    #[serde(default)]
    pub token_label: Option<String>,
    #[serde(default)]
    pub token_serial: Option<String>,
    /// PIN source; with neither `user_pin_env` nor `user_pin_file` the primary's PIN is used.
    #[serde(default)]
    pub user_pin_env: Option<String>,
    #[serde(default)]
    pub user_pin_file: Option<PathBuf>,
}

/// The PKCS#11 backend's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// Absolute path of the vendor's PKCS#11 library (`.so`).
    pub module: PathBuf,
    /// The token, by label. Exactly one of `token_label` / `token_serial`.
    #[serde(default)]
    pub token_label: Option<String>,
    /// The token, by serial number.
    #[serde(default)]
    pub token_serial: Option<String>,
    /// Name of the environment variable holding the user PIN. Exactly one of
    /// `user_pin_env` / `user_pin_file`.
    #[serde(default)]
    pub user_pin_env: Option<String>,
    /// File holding the user PIN (one line; a trailing newline is ignored).
    #[serde(default)]
    pub user_pin_file: Option<PathBuf>,
    /// Logged-in sessions per token; also the backend's concurrency. Default 8.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Budget of one call in ms (waiting for a session included). Default 200, under
    /// KMS's 250 ms timeout.
    #[serde(default = "default_call_deadline_ms")]
    pub call_deadline_ms: u64,
    /// Label of the dedicated AES-256 key the deep health check round-trips with (never
    /// a customer key; requests naming it are refused). Default `xks-health-check`.
    #[serde(default = "default_health_check_key_label")]
    pub health_check_key_label: Option<String>,
    /// How a key id names a key: `label` (default) or `id`.
    #[serde(default)]
    pub key_id_attribute: KeyIdAttribute,
    /// `proxy_random` (default), `hsm_generated` or `zero_filled_returned`.
    #[serde(default)]
    pub iv_policy: IvPolicy,
    /// Key ids reported DISABLED and refused for Encrypt/Decrypt.
    #[serde(default)]
    pub disabled_keys: Vec<String>,
    /// Additional tokens (or modules) holding the same keys; requests go to the first
    /// healthy token in order (primary first).
    #[serde(default)]
    pub failover: Vec<TokenSettings>,
    /// Longest pause between recovery attempts of a lost token, in ms. Default 2000, so a
    /// returning token serves again within ~2 s.
    #[serde(default = "default_recovery_backoff_max_ms")]
    pub recovery_backoff_max_ms: u64,
    /// How long cached key attributes (usages, end date) are trusted before being
    /// re-read by handle (never by search), in seconds. Default 60.
    #[serde(default = "default_key_attributes_refresh_secs")]
    pub key_attributes_refresh_secs: u64,
}

fn default_pool_size() -> usize {
    8
}
fn default_call_deadline_ms() -> u64 {
    200
}
fn default_health_check_key_label() -> Option<String> {
    Some("xks-health-check".into())
}
fn default_recovery_backoff_max_ms() -> u64 {
    2000
}
fn default_key_attributes_refresh_secs() -> u64 {
    60
}

/// A settings problem: which key (as written under `[backend]`, e.g. `pool_size`,
/// `failover[1].token_label`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PKCS#11 setting `{key}`: {problem}")]
pub struct SettingsError {
    pub key: String,
    pub problem: String,
}

impl From<Pkcs11Error> for SettingsError {
    fn from(e: Pkcs11Error) -> Self {
        match e {
            Pkcs11Error::InvalidSetting { key, reason } => SettingsError {
                key,
                problem: reason,
            },
            other => SettingsError {
                key: String::new(),
                problem: other.to_string(),
            },
        }
    }
}

/// A token selector after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    Label(String),
    Serial(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Label(l) => write!(f, "label \"{l}\""),
            Selector::Serial(s) => write!(f, "serial \"{s}\""),
        }
    }
}

/// Where a PIN comes from, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PinSource {
    Env(String),
    File(PathBuf),
}

/// One token to open, primary or failover, with everything resolved but the PIN.
#[derive(Debug, Clone)]
pub(crate) struct TokenPlan {
    /// The settings key prefix naming this token in messages (`""` or `failover[i].`).
    pub key_prefix: String,
    pub module: PathBuf,
    pub selector: Selector,
    pub pin: PinSource,
}

impl Pkcs11Settings {
    /// Settings with every default, for `module`; set the token and PIN fields before use.
    pub fn new(module: impl Into<PathBuf>) -> Self {
        Self {
            module: module.into(),
            token_label: None,
            token_serial: None,
            user_pin_env: None,
            user_pin_file: None,
            pool_size: default_pool_size(),
            call_deadline_ms: default_call_deadline_ms(),
            health_check_key_label: default_health_check_key_label(),
            key_id_attribute: KeyIdAttribute::default(),
            iv_policy: IvPolicy::default(),
            disabled_keys: Vec::new(),
            failover: Vec::new(),
            recovery_backoff_max_ms: default_recovery_backoff_max_ms(),
            key_attributes_refresh_secs: default_key_attributes_refresh_secs(),
        }
    }

    /// The settings as the backend opens them: relative paths (`module`,
    /// `user_pin_file`, and the same in `failover`) resolved against `base`, the config
    /// file's directory, so a relative module path never reaches dlopen's library
    /// search; then every rule checked without touching the file system or the HSM (the
    /// error names the offending key). Value in, value out: the config never holds a
    /// half-resolved copy. The validated form of the tokens themselves is the
    /// [`TokenPlan`] list `open` derives from the result.
    pub fn validated(mut self, base: &Path) -> Result<Self, SettingsError> {
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.module);
        if let Some(p) = &mut self.user_pin_file {
            fix(p);
        }
        for t in &mut self.failover {
            if let Some(p) = &mut t.module {
                fix(p);
            }
            if let Some(p) = &mut t.user_pin_file {
                fix(p);
            }
        }
        self.plan().map_err(SettingsError::from)?;
        Ok(self)
    }

    /// The budget of one call (see `call_deadline_ms`).
    pub fn call_deadline(&self) -> Duration {
        Duration::from_millis(self.call_deadline_ms)
    }

    /// Each token's PIN setting (as written under the backend's table, e.g.
    /// `user_pin_file`, `failover[0].user_pin_env`) and where it comes from, for
    /// `config check`'s list of secrets. Settings that do not plan (an error `plan`
    /// reports) list nothing.
    pub fn pin_sources(&self) -> Vec<(String, crate::config::SecretSource)> {
        use crate::config::SecretSource;
        self.plan()
            .unwrap_or_default()
            .into_iter()
            .map(|p| match p.pin {
                PinSource::File(f) => (
                    format!("{}user_pin_file", p.key_prefix),
                    SecretSource::File(f),
                ),
                PinSource::Env(v) => (
                    format!("{}user_pin_env", p.key_prefix),
                    SecretSource::Env(v),
                ),
            })
            .collect()
    }

    /// Validates and resolves the tokens to open, primary first.
    pub(crate) fn plan(&self) -> Result<Vec<TokenPlan>, Pkcs11Error> {
        check_module("module", &self.module)?;
        let selector = token_selector("", &self.token_label, &self.token_serial)?;
        let pin = match (&self.user_pin_env, &self.user_pin_file) {
            (Some(_), Some(_)) => {
                return Err(Pkcs11Error::setting(
                    "user_pin_env",
                    "set exactly one of `user_pin_env` and `user_pin_file`, not both",
                ));
            }
            (None, None) => {
                return Err(Pkcs11Error::setting(
                    "user_pin_env",
                    "set exactly one of `user_pin_env` and `user_pin_file` (PINs are never inline)",
                ));
            }
            (Some(var), None) => PinSource::Env(check_env_name("user_pin_env", var)?),
            (None, Some(path)) => PinSource::File(check_pin_file("user_pin_file", path)?),
        };
        if self.pool_size == 0 || self.pool_size > 256 {
            return Err(Pkcs11Error::setting(
                "pool_size",
                format!("must be 1 to 256, got {}", self.pool_size),
            ));
        }
        if self.call_deadline_ms == 0 || self.call_deadline_ms > 10_000 {
            return Err(Pkcs11Error::setting(
                "call_deadline_ms",
                format!(
                    "must be 1 to 10000 ms (KMS times out at 250 ms), got {}",
                    self.call_deadline_ms
                ),
            ));
        }
        if let Some(label) = &self.health_check_key_label {
            crate::key_id::check(label).map_err(|reason| {
                Pkcs11Error::setting("health_check_key_label", reason.to_string())
            })?;
        }
        if !(100..=60_000).contains(&self.recovery_backoff_max_ms) {
            return Err(Pkcs11Error::setting(
                "recovery_backoff_max_ms",
                format!(
                    "must be 100 to 60000 ms, got {}",
                    self.recovery_backoff_max_ms
                ),
            ));
        }
        if self.key_attributes_refresh_secs > 86_400 {
            return Err(Pkcs11Error::setting(
                "key_attributes_refresh_secs",
                format!(
                    "must be at most 86400, got {}",
                    self.key_attributes_refresh_secs
                ),
            ));
        }
        for (i, id) in self.disabled_keys.iter().enumerate() {
            crate::key_id::check(id).map_err(|reason| {
                Pkcs11Error::setting(format!("disabled_keys[{i}]"), reason.to_string())
            })?;
        }
        if 1 + self.failover.len() > MAX_TOKENS {
            return Err(Pkcs11Error::setting(
                "failover",
                format!(
                    "at most {} failover tokens (health lists at most {MAX_TOKENS} tokens), got {}",
                    MAX_TOKENS - 1,
                    self.failover.len()
                ),
            ));
        }

        let mut plans = vec![TokenPlan {
            key_prefix: String::new(),
            module: self.module.clone(),
            selector,
            pin: pin.clone(),
        }];
        for (i, t) in self.failover.iter().enumerate() {
            let plan = t.plan(i, &self.module, &pin)?;
            if plans
                .iter()
                .any(|p| p.module == plan.module && p.selector == plan.selector)
            {
                return Err(Pkcs11Error::setting(
                    format!("{}token_label", plan.key_prefix),
                    format!("{} in this module is already configured", plan.selector),
                ));
            }
            plans.push(plan);
        }
        Ok(plans)
    }
}

impl TokenSettings {
    /// `failover[i]` as a token to open: the primary's module and PIN unless it names
    /// its own.
    fn plan(
        &self,
        i: usize,
        primary_module: &Path,
        primary_pin: &PinSource,
    ) -> Result<TokenPlan, Pkcs11Error> {
        let prefix = format!("failover[{i}].");
        let module = match &self.module {
            Some(m) => {
                check_module(&format!("{prefix}module"), m)?;
                m.clone()
            }
            None => primary_module.to_path_buf(),
        };
        let selector = token_selector(&prefix, &self.token_label, &self.token_serial)?;
        let pin = match (&self.user_pin_env, &self.user_pin_file) {
            (Some(_), Some(_)) => {
                return Err(Pkcs11Error::setting(
                    format!("{prefix}user_pin_env"),
                    "set at most one of `user_pin_env` and `user_pin_file`",
                ));
            }
            (None, None) => primary_pin.clone(),
            (Some(var), None) => {
                PinSource::Env(check_env_name(&format!("{prefix}user_pin_env"), var)?)
            }
            (None, Some(path)) => {
                PinSource::File(check_pin_file(&format!("{prefix}user_pin_file"), path)?)
            }
        };
        Ok(TokenPlan {
            key_prefix: prefix,
            module,
            selector,
            pin,
        })
    }
}

impl PinSource {
    /// Reads the PIN. Errors name the setting and the variable/file, never the value.
    pub(crate) fn resolve(&self, key_prefix: &str) -> Result<SecretString, Pkcs11Error> {
        let pin = match self {
            PinSource::Env(var) => {
                let key = format!("{key_prefix}user_pin_env");
                match std::env::var(var) {
                    Ok(v) => SecretString::new(v),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(Pkcs11Error::PinSource {
                            key,
                            reason: format!("environment variable {var} is not set"),
                        });
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(Pkcs11Error::PinSource {
                            key,
                            reason: format!("environment variable {var} is not UTF-8"),
                        });
                    }
                }
            }
            PinSource::File(path) => {
                let key = format!("{key_prefix}user_pin_file");
                warn_if_readable_by_others(path);
                let text = std::fs::read_to_string(path).map_err(|e| Pkcs11Error::PinSource {
                    key: key.clone(),
                    reason: format!("{}: {}", path.display(), e.kind()),
                })?;
                let mut text = zeroize::Zeroizing::new(text);
                // One line; tolerate the trailing newline editors add, nothing else.
                while text.ends_with('\n') || text.ends_with('\r') {
                    text.pop();
                }
                SecretString::new(std::mem::take(&mut *text))
            }
        };
        if pin.is_empty() {
            return Err(Pkcs11Error::PinSource {
                key: format!("{key_prefix}user_pin"),
                reason: "the PIN is empty".into(),
            });
        }
        Ok(pin)
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "the PKCS#11 PIN file is accessible to group/others; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn check_module(key: &str, path: &Path) -> Result<(), Pkcs11Error> {
    if path.as_os_str().is_empty() {
        return Err(Pkcs11Error::setting(key, "must name the PKCS#11 library"));
    }
    // A bare name would make dlopen search LD_LIBRARY_PATH etc.: refuse, so the
    // operator decides exactly which code runs with the PIN.
    if !path.is_absolute() {
        return Err(Pkcs11Error::setting(
            key,
            format!("must be an absolute path, got {}", path.display()),
        ));
    }
    Ok(())
}

fn token_selector(
    prefix: &str,
    label: &Option<String>,
    serial: &Option<String>,
) -> Result<Selector, Pkcs11Error> {
    match (label, serial) {
        (Some(_), Some(_)) => Err(Pkcs11Error::setting(
            format!("{prefix}token_label"),
            "set exactly one of `token_label` and `token_serial`, not both",
        )),
        (None, None) => Err(Pkcs11Error::setting(
            format!("{prefix}token_label"),
            "set exactly one of `token_label` and `token_serial` (the backend never picks \"the first slot\")",
        )),
        (Some(l), None) => {
            if l.trim().is_empty() || l.len() > 32 {
                return Err(Pkcs11Error::setting(
                    format!("{prefix}token_label"),
                    "must be 1 to 32 bytes (the PKCS#11 label field)",
                ));
            }
            Ok(Selector::Label(l.trim_end().to_owned()))
        }
        (None, Some(s)) => {
            if s.trim().is_empty() || s.len() > 16 {
                return Err(Pkcs11Error::setting(
                    format!("{prefix}token_serial"),
                    "must be 1 to 16 bytes (the PKCS#11 serial number field)",
                ));
            }
            Ok(Selector::Serial(s.trim_end().to_owned()))
        }
    }
}

fn check_env_name(key: &str, var: &str) -> Result<String, Pkcs11Error> {
    if var.is_empty() || var.contains('=') || var.contains('\0') {
        return Err(Pkcs11Error::setting(
            key,
            "must be an environment variable name",
        ));
    }
    Ok(var.to_owned())
}

fn check_pin_file(key: &str, path: &Path) -> Result<PathBuf, Pkcs11Error> {
    if path.as_os_str().is_empty() {
        return Err(Pkcs11Error::setting(key, "must be a file path"));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Pkcs11Settings, String> {
        toml::from_str::<Pkcs11Settings>(toml_text).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "xks"
        user_pin_env = "XKS_PIN"
    "#;

    #[test]
    fn minimal_settings_take_the_defaults() {
        let s = parse(MINIMAL)
            .expect("parses")
            .validated(Path::new("/etc/xks"))
            .expect("valid");
        assert_eq!(s.pool_size, 8);
        assert_eq!(s.call_deadline_ms, 200);
        assert_eq!(
            s.health_check_key_label.as_deref(),
            Some("xks-health-check")
        );
        assert_eq!(s.key_id_attribute, KeyIdAttribute::Label);
        assert_eq!(s.iv_policy, IvPolicy::ProxyRandom);
        assert!(s.disabled_keys.is_empty() && s.failover.is_empty());
        assert_eq!(s.recovery_backoff_max_ms, 2000);
        assert_eq!(s.key_attributes_refresh_secs, 60);
        let mut built = Pkcs11Settings::new("/usr/lib/softhsm/libsofthsm2.so");
        built.token_label = Some("xks".into());
        built.user_pin_env = Some("XKS_PIN".into());
        assert_eq!(built, s);
    }

    #[test]
    fn every_key_parses() {
        let s = parse(
            r#"
            module = "/opt/luna/libCryptoki2_64.so"
            token_serial = "1234567"
            user_pin_file = "/run/secrets/pin"
            pool_size = 16
            call_deadline_ms = 150
            health_check_key_label = "hc"
            key_id_attribute = "id"
            iv_policy = "hsm_generated"
            disabled_keys = ["old-key"]
            recovery_backoff_max_ms = 1000
            key_attributes_refresh_secs = 5
            [[failover]]
            token_label = "backup"
            [[failover]]
            module = "/opt/other/lib.so"
            token_serial = "99"
            user_pin_env = "OTHER_PIN"
        "#,
        )
        .expect("parses");
        let plans = s.plan().expect("valid");
        assert_eq!(plans.len(), 3);
        assert_eq!(plans[1].pin, PinSource::File("/run/secrets/pin".into()));
        assert_eq!(
            plans[1].module,
            PathBuf::from("/opt/luna/libCryptoki2_64.so")
        );
        assert_eq!(plans[2].pin, PinSource::Env("OTHER_PIN".into()));
        assert_eq!(s.iv_policy, IvPolicy::HsmGenerated);
        assert_eq!(
            parse(&format!("{MINIMAL}\niv_policy = \"zero_filled_returned\""))
                .expect("parses")
                .iv_policy,
            IvPolicy::ZeroFilledReturned
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse(&format!("{MINIMAL}\nuser_pin = \"1234\"")).expect_err("must fail");
        assert!(err.contains("user_pin"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[[failover]]\nlabel = \"x\"")).expect_err("must fail");
        assert!(err.contains("label"), "{err}");
    }

    fn invalid(edit: impl FnOnce(&mut Pkcs11Settings)) -> String {
        let mut s = parse(MINIMAL).expect("parses");
        edit(&mut s);
        match s.plan() {
            Err(Pkcs11Error::InvalidSetting { key, .. }) => key,
            other => panic!("expected InvalidSetting, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_key() {
        assert_eq!(
            invalid(|s| s.token_serial = Some("1".into())),
            "token_label"
        );
        assert_eq!(invalid(|s| s.token_label = None), "token_label");
        assert_eq!(
            invalid(|s| s.user_pin_file = Some("/p".into())),
            "user_pin_env"
        );
        assert_eq!(invalid(|s| s.user_pin_env = None), "user_pin_env");
        assert_eq!(invalid(|s| s.module = "libsofthsm2.so".into()), "module");
        assert_eq!(invalid(|s| s.pool_size = 0), "pool_size");
        assert_eq!(invalid(|s| s.call_deadline_ms = 0), "call_deadline_ms");
        assert_eq!(
            invalid(|s| s.health_check_key_label = Some(String::new())),
            "health_check_key_label"
        );
        assert_eq!(
            invalid(|s| s.disabled_keys = vec!["ok".into(), "bad key".into()]),
            "disabled_keys[1]"
        );
        assert_eq!(
            invalid(|s| s.recovery_backoff_max_ms = 10),
            "recovery_backoff_max_ms"
        );
        assert_eq!(
            invalid(|s| s.token_label = Some("x".repeat(33))),
            "token_label"
        );
        let backup = TokenSettings {
            module: None,
            token_label: Some("b".into()),
            token_serial: None,
            user_pin_env: None,
            user_pin_file: None,
        };
        assert_eq!(
            invalid(|s| s.failover = vec![backup.clone(); 10]),
            "failover"
        );
        assert_eq!(
            invalid(|s| s.failover = vec![TokenSettings {
                token_label: None,
                ..backup.clone()
            }]),
            "failover[0].token_label"
        );
        assert_eq!(
            invalid(|s| s.failover = vec![TokenSettings {
                token_label: Some("xks".into()),
                ..backup.clone()
            }]),
            "failover[0].token_label"
        );
        assert_eq!(
            invalid(|s| s.failover = vec![
                backup.clone(),
                TokenSettings {
                    module: Some("rel.so".into()),
                    ..backup.clone()
                }
            ]),
            "failover[1].module"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let mut s = parse(MINIMAL).expect("parses");
        s.module = "lib/softhsm2.so".into();
        s.user_pin_env = None;
        s.user_pin_file = Some("pin.txt".into());
        s.failover = vec![TokenSettings {
            module: Some("other.so".into()),
            token_label: Some("b".into()),
            token_serial: None,
            user_pin_env: None,
            user_pin_file: Some("/abs/pin".into()),
        }];
        let err = s.plan().expect_err("must fail");
        assert!(matches!(err, Pkcs11Error::InvalidSetting { ref key, .. } if key == "module"));
        let s = s
            .validated(Path::new("/etc/xks"))
            .expect("valid once resolved");
        assert_eq!(s.module, PathBuf::from("/etc/xks/lib/softhsm2.so"));
        assert_eq!(s.user_pin_file, Some(PathBuf::from("/etc/xks/pin.txt")));
        assert_eq!(
            s.failover[0].module,
            Some(PathBuf::from("/etc/xks/other.so"))
        );
        assert_eq!(s.failover[0].user_pin_file, Some(PathBuf::from("/abs/pin")));
        let mut bad = parse(MINIMAL).expect("parses");
        bad.pool_size = 0;
        let e = bad.validated(Path::new("/")).expect_err("must fail");
        assert_eq!(e.key, "pool_size");
        assert!(e.to_string().contains("pool_size"), "{e}");
    }

    #[test]
    fn pin_file_is_read_without_its_newline_and_never_echoed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, "98765\n").expect("write");
        let pin = PinSource::File(path.clone()).resolve("").expect("reads");
        assert_eq!(pin.expose(), "98765");
        std::fs::write(&path, "\n").expect("write");
        let err = PinSource::File(path)
            .resolve("")
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("empty"), "{err}");
        let missing = PinSource::File(dir.path().join("nope")).resolve("failover[0].");
        let err = missing.expect_err("must fail").to_string();
        assert!(err.contains("failover[0].user_pin_file"), "{err}");
        let err = PinSource::Env("XKS_TEST_SURELY_UNSET_PIN_VAR".into())
            .resolve("")
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("XKS_TEST_SURELY_UNSET_PIN_VAR"), "{err}");
    }
}
