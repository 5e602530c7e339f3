//! Issue 17 §1: every setting is classified once. The compiler checks that [`split`]
//! names every field (exhaustive destructuring); these tests check that each field
//! lands on the side its row says, by editing one line of a config that writes every
//! setting out and comparing the two splits.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;
use crate::config::{Config, Environment, RawConfig};

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242";

/// Every restart-only setting written out, so that each row below edits one line.
const BASE: &str = r#"
[server]
listen = "127.0.0.1:8443"
ping_listen = "127.0.0.1:8080"
max_body_bytes = 65536
header_read_timeout_ms = 5000
body_read_timeout_ms = 5000
idle_timeout_ms = 60000
shutdown_grace_ms = 10000
max_connections = 1000
max_connections_per_source = 100
http2_max_concurrent_streams = 64
ping_max_connections = 64
max_in_flight = 256
require_fips = false
[server.tls]
certificate = "cert.pem"
private_key = "key.pem"
[admin]
listen = "127.0.0.1:9464"
[health]
fleet_size = 1
vendor = "Example"
check_interval_secs = 10
[sigv4]
max_clock_skew_secs = 300
[logging]
format = "human"
level = "info"
[limits]
backend_deadline_ms = 200
backend_max_waiting = 256
[reload]
watch_interval_secs = 0
[backend]
kind = "software"
keystore = "ks.json"
master_key_file = "master.key"
simulated_latency_ms = 0
[[keystores]]
path_prefix = "/a"
[[keystores.credentials]]
access_key_id = "AKIAIOSFODNN7EXAMPLE"
secret_file = "secret"
"#;

const AUDIT: &str = "\n[audit]\ndirectory = \"audit\"\nkey_file = \"audit.key\"\n";

fn dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("secret"), SECRET).expect("write");
    std::fs::write(dir.path().join("audit.key"), SECRET).expect("write");
    dir
}

fn load(text: &str, dir: &Path) -> Result<Config, crate::config::ConfigError> {
    let raw: RawConfig = toml::from_str(text).expect("parses");
    raw.validate(dir, &Environment::default())
}

/// `BASE` with `from` replaced by `to` (which must occur exactly once).
fn edited(base: &str, from: &str, to: &str) -> String {
    assert_eq!(base.matches(from).count(), 1, "row edits one line: {from}");
    base.replace(from, to)
}

/// The restart-only keys `text` changes against `base`.
fn restart_keys(base: &str, text: &str, dir: &Path) -> Vec<&'static str> {
    let (a, b) = (
        load(base, dir).expect("base"),
        load(text, dir).expect("row"),
    );
    split(&a)
        .0
        .differences(&split(&b).0)
        .iter()
        .map(|d| d.key)
        .collect()
}

/// Each row: (line as in BASE, the edited line, the one key a reload must warn about).
const RESTART_ROWS: &[(&str, &str, &str)] = &[
    (
        "listen = \"127.0.0.1:8443\"",
        "listen = \"127.0.0.1:8444\"",
        "server.listen",
    ),
    (
        "ping_listen = \"127.0.0.1:8080\"",
        "ping_listen = \"127.0.0.1:8081\"",
        "server.ping_listen",
    ),
    (
        "listen = \"127.0.0.1:9464\"",
        "listen = \"127.0.0.1:9465\"",
        "admin.listen",
    ),
    (
        "max_body_bytes = 65536",
        "max_body_bytes = 131072",
        "server.max_body_bytes",
    ),
    (
        "header_read_timeout_ms = 5000",
        "header_read_timeout_ms = 6000",
        "server.header_read_timeout_ms",
    ),
    (
        "body_read_timeout_ms = 5000",
        "body_read_timeout_ms = 6000",
        "server.body_read_timeout_ms",
    ),
    (
        "idle_timeout_ms = 60000",
        "idle_timeout_ms = 30000",
        "server.idle_timeout_ms",
    ),
    (
        "shutdown_grace_ms = 10000",
        "shutdown_grace_ms = 2000",
        "server.shutdown_grace_ms",
    ),
    (
        "max_connections = 1000",
        "max_connections = 2000",
        "server.max_connections",
    ),
    (
        "max_connections_per_source = 100",
        "max_connections_per_source = 50",
        "server.max_connections_per_source",
    ),
    (
        "http2_max_concurrent_streams = 64",
        "http2_max_concurrent_streams = 32",
        "server.http2_max_concurrent_streams",
    ),
    (
        "ping_max_connections = 64",
        "ping_max_connections = 32",
        "server.ping_max_connections",
    ),
    (
        "max_in_flight = 256",
        "max_in_flight = 128",
        "server.max_in_flight",
    ),
    ("fleet_size = 1", "fleet_size = 3", "health"),
    ("vendor = \"Example\"", "vendor = \"Other\"", "health"),
    (
        "check_interval_secs = 10",
        "check_interval_secs = 20",
        "health",
    ),
    (
        "max_clock_skew_secs = 300",
        "max_clock_skew_secs = 60",
        "sigv4",
    ),
    ("[sigv4]", "[sigv4]\nregions = [\"eu-west-1\"]", "sigv4"),
    ("format = \"human\"", "format = \"json\"", "logging.format"),
    ("level = \"info\"", "level = \"debug\"", "logging.level"),
    (
        "backend_deadline_ms = 200",
        "backend_deadline_ms = 150",
        "limits",
    ),
    (
        "backend_max_waiting = 256",
        "backend_max_waiting = 64",
        "limits",
    ),
    (
        "watch_interval_secs = 0",
        "watch_interval_secs = 5",
        "reload.watch_interval_secs",
    ),
    (
        "[server.tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n",
        "insecure_plain_http = true\n",
        "server.tls",
    ),
];

/// Issue 17 §1: a change to a restart-only setting is named by exactly its key (a
/// copy-paste such as comparing `listen` with `ping_listen` fails its row), and every
/// key [`RestartOnly`] can name has a row.
#[test]
fn every_restart_only_setting_is_named_by_its_own_row() {
    let d = dir();
    let mut covered = BTreeSet::new();
    for (from, to, key) in RESTART_ROWS {
        let text = edited(BASE, from, to);
        assert_eq!(
            restart_keys(BASE, &text, d.path()),
            [*key],
            "row {from} -> {to}"
        );
        covered.insert(*key);
    }
    // [audit]: turning it on, and changing any of its settings, needs a restart.
    let with_audit = format!("{BASE}{AUDIT}");
    assert_eq!(restart_keys(BASE, &with_audit, d.path()), ["audit"]);
    let faster = format!("{with_audit}checkpoint_interval_secs = 5\n");
    assert_eq!(restart_keys(&with_audit, &faster, d.path()), ["audit"]);
    covered.insert("audit");
    // require_fips: a build without FIPS refuses the config outright (issue 16), so a
    // reload never gets as far as comparing it; a FIPS build warns.
    let fips = edited(BASE, "require_fips = false", "require_fips = true");
    if crate::crypto::FIPS {
        assert_eq!(restart_keys(BASE, &fips, d.path()), ["server.require_fips"]);
    } else {
        let e = load(&fips, d.path()).expect_err("refused without FIPS");
        assert_eq!(e.key, "server.require_fips");
    }
    covered.insert("server.require_fips");
    let all: BTreeSet<_> = RestartOnly::KEYS.iter().copied().collect();
    assert_eq!(
        covered, all,
        "a restart-only key without a row, or a row without a key"
    );
}

/// The other side: what a reload applies changes no restart-only setting (so it draws
/// no warning), and it does reach the reloadable projection or the backend's parts.
#[test]
fn what_a_reload_applies_draws_no_restart_warning() {
    let d = dir();
    let base = load(BASE, d.path()).expect("base");
    let live_rows: &[(&str, &str)] = &[
        ("path_prefix = \"/a\"", "path_prefix = \"/b\""),
        (
            "path_prefix = \"/a\"",
            "path_prefix = \"/a\"\nquota_rps = 5",
        ),
        (
            "path_prefix = \"/a\"",
            "path_prefix = \"/a\"\nallowed_keys = [\"k1\"]",
        ),
        ("certificate = \"cert.pem\"", "certificate = \"cert2.pem\""),
        ("private_key = \"key.pem\"", "private_key = \"key2.pem\""),
        ("[admin]", "[policy]\nfile = \"p.cedar\"\n[admin]"),
    ];
    for (from, to) in live_rows {
        let text = edited(BASE, from, to);
        let new = load(&text, d.path()).expect("row");
        assert!(
            split(&base).0.differences(&split(&new).0).is_empty(),
            "{to}"
        );
        let (a, b) = (split(&base).1, split(&new).1);
        assert_ne!(
            format!("{a:?}"),
            format!("{b:?}"),
            "{to} reaches the reload"
        );
    }
    // The backend: a new keystore file or master key is another key manager.
    for (from, to) in [
        ("keystore = \"ks.json\"", "keystore = \"other.json\""),
        (
            "master_key_file = \"master.key\"",
            "master_key_file = \"other.key\"",
        ),
        ("simulated_latency_ms = 0", "simulated_latency_ms = 5"),
    ] {
        let new = load(&edited(BASE, from, to), d.path()).expect("row");
        let identity = |c: &Config| split_backend(&c.backends[0].config).0;
        assert_ne!(
            identity(&base),
            identity(&new),
            "{to} re-points the backend"
        );
        assert!(split(&base).0.differences(&split(&new).0).is_empty());
    }
}

#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;

    const PKCS11: &str = r#"[backend]
kind = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "a"
user_pin_file = "pin"
pool_size = 8
call_deadline_ms = 200
health_check_key_label = "xks-health-check"
key_id_attribute = "label"
iv_policy = "proxy_random"
disabled_keys = []
recovery_backoff_max_ms = 2000
key_attributes_refresh_secs = 60
[[backend.failover]]
token_label = "b"
"#;

    fn base() -> String {
        let software = BASE.split("[backend]").next().expect("head").to_owned();
        let keystores = BASE.split("[[keystores]]").nth(1).expect("keystores");
        format!("{software}{PKCS11}[[keystores]]{keystores}")
    }

    /// Issue 17 §1: of the PKCS#11 settings, the PIN sources and the disabled-key list
    /// are applied by the running backend (same identity); every other setting makes
    /// another key manager, which a reload opens anew. One row per setting.
    #[test]
    fn each_pkcs11_setting_is_identity_or_live() {
        let d = dir();
        let base = base();
        let parts = |text: &str| {
            let c = load(text, d.path()).expect("valid");
            split_backend(&c.backends[0].config)
        };
        let (identity, live) = parts(&base);
        let live_rows = [
            ("user_pin_file = \"pin\"", "user_pin_file = \"pin2\""),
            ("user_pin_file = \"pin\"", "user_pin_env = \"PIN\""),
            ("disabled_keys = []", "disabled_keys = [\"k1\"]"),
            (
                "token_label = \"b\"",
                "token_label = \"b\"\nuser_pin_env = \"PIN_B\"",
            ),
        ];
        for (from, to) in live_rows {
            let (i, l) = parts(&edited(&base, from, to));
            assert_eq!(i, identity, "{to} keeps the key manager");
            assert_ne!(l, live, "{to} reaches the running backend");
        }
        let identity_rows = [
            (
                "module = \"/usr/lib/softhsm/libsofthsm2.so\"",
                "module = \"/opt/other.so\"",
            ),
            ("token_label = \"a\"", "token_label = \"c\""),
            ("token_label = \"a\"", "token_serial = \"1234\""),
            ("pool_size = 8", "pool_size = 4"),
            ("call_deadline_ms = 200", "call_deadline_ms = 150"),
            (
                "health_check_key_label = \"xks-health-check\"",
                "health_check_key_label = \"hc\"",
            ),
            ("key_id_attribute = \"label\"", "key_id_attribute = \"id\""),
            (
                "iv_policy = \"proxy_random\"",
                "iv_policy = \"hsm_generated\"",
            ),
            (
                "recovery_backoff_max_ms = 2000",
                "recovery_backoff_max_ms = 1000",
            ),
            (
                "key_attributes_refresh_secs = 60",
                "key_attributes_refresh_secs = 30",
            ),
            ("token_label = \"b\"", "token_label = \"d\""),
            (
                "token_label = \"b\"",
                "token_label = \"b\"\nmodule = \"/opt/other.so\"",
            ),
        ];
        for (from, to) in identity_rows {
            let (i, _) = parts(&edited(&base, from, to));
            assert_ne!(i, identity, "{to} is another key manager");
        }
    }

    /// `config check` names PIN settings under the backend's table once
    /// (`backend.user_pin_file`, not `backend.backend.user_pin_file`), and a PIN file
    /// rotates with a reload while a variable needs a restart.
    #[test]
    fn pin_secrets_are_named_by_their_table_and_rotate_from_files() {
        let d = dir();
        let text = edited(
            &base(),
            "token_label = \"b\"",
            "token_label = \"b\"\nuser_pin_env = \"PIN_B\"",
        );
        let config = load(&text, d.path()).expect("valid");
        let pins: Vec<_> = secret_uses(&config)
            .into_iter()
            .filter(|s| s.setting.contains("pin"))
            .map(|s| (s.setting, s.rotates_on_reload))
            .collect();
        assert_eq!(
            pins,
            [
                ("backend.user_pin_file".to_owned(), true),
                ("backend.failover[0].user_pin_env".to_owned(), false),
            ]
        );
    }
}

/// Which secrets rotate with a reload follows from the classes: a file on the
/// reloadable side (SigV4 secrets, the TLS key) rotates; the audit key and the
/// software master key are read once at start; a variable never rotates.
#[test]
fn a_secret_rotates_when_it_is_a_file_on_the_reloadable_side() {
    let d = dir();
    let text = format!("{BASE}{AUDIT}");
    let config = load(&text, d.path()).expect("valid");
    let uses: Vec<_> = secret_uses(&config)
        .into_iter()
        .map(|s| (s.setting, s.rotates_on_reload))
        .collect();
    assert_eq!(
        uses,
        [
            (
                "keystores[\"/a\"].credentials[AKIAIOSFODNN7EXAMPLE]".to_owned(),
                true
            ),
            ("server.tls.private_key".to_owned(), true),
            ("audit.key_file".to_owned(), false),
            ("backend.master_key_file".to_owned(), false),
        ]
    );
    // A variable cannot change under a running process, whichever side it is on.
    let env = SecretSource::Env("XKS_SECRET".into());
    assert!(!SecretUse::new("x".into(), &env, true).rotates_on_reload);
}
