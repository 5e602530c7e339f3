//! The config loader: TOML text → validated `Config` (`Config::from_toml`).
//!
//! Relative paths resolve against a private temp dir that holds a secret, a PIN and a
//! master key; the environment variables the shipped configs name (`config/*.toml`,
//! the seeds) hold known secrets. Inputs naming a `*_file` that could leave the temp dir
//! (absolute, `..`) are skipped, so the target never reads files outside it.
//!
//! Checked: validation is deterministic (two loads agree), and neither an error
//! message nor the `Debug` form of a loaded config ever contains a secret's value.
#![no_main]

use std::path::{Component, Path};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use xks_proxy::config::Config;

/// Valid for `valid_secret` (43-64 of a-zA-Z0-9/+=), and recognisable.
const SECRET: &str = "FuzzSecretValueFuzzSecretValueFuzzSecretVal1";
const OTHER_SECRET: &str = "FuzzOtherSecretFuzzOtherSecretFuzzOtherSecr2";
const PIN: &str = "FuzzPin123456";
/// 32 zero bytes, Base64.
const MASTER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SECRETS: &[&str] = &[SECRET, OTHER_SECRET, PIN];

static BASE: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in [
        ("secret", SECRET),
        ("other-secret", OTHER_SECRET),
        ("hsm-pin", PIN),
        ("master.key", MASTER_KEY),
    ] {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    for (var, value) in [
        ("XKS_SECRET_EXAMPLE", SECRET),
        ("XKS_SECRET_OTHER", OTHER_SECRET),
        ("XKS_HSM_PIN", PIN),
        ("XKS_HSM_PIN_DR", PIN),
        ("XKS_HSM_PIN_2", PIN),
        ("XKS_MASTER_KEY", MASTER_KEY),
    ] {
        // SAFETY: runs once, on libFuzzer's only thread that runs Rust code, before
        // anything in this process reads the environment concurrently.
        unsafe { std::env::set_var(var, value) };
    }
    // SAFETY: as above. Its own range check is the config's, not the TOML's.
    unsafe { std::env::remove_var("XKS_PROXY_FLEET_SIZE") };
    dir
});

/// False if any `*_file` value could name a file outside the base directory.
fn stays_inside(value: &toml::Value, key: &str) -> bool {
    match value {
        toml::Value::String(s) if key.ends_with("file") => {
            let path = Path::new(s);
            path.components().next().is_some()
                && path.components().all(|c| matches!(c, Component::Normal(_)))
        }
        toml::Value::Table(t) => t.iter().all(|(k, v)| stays_inside(v, k)),
        toml::Value::Array(a) => a.iter().all(|v| stays_inside(v, key)),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Text that is not TOML fails before any file is named, so it always runs.
    if let Ok(table) = text.parse::<toml::Table>()
        && !table.iter().all(|(k, v)| stays_inside(v, k))
    {
        return;
    }
    let base = BASE.path();
    let first = Config::from_toml(text, base);
    let again = Config::from_toml(text, base);
    let shown = match (&first, &again) {
        (Ok(a), Ok(b)) => {
            let shown = format!("{a:?}");
            assert_eq!(shown, format!("{b:?}"), "two loads of one text differ");
            shown
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "two loads fail differently");
            a.to_string()
        }
        _ => panic!("one load succeeded and the other failed"),
    };
    for secret in SECRETS {
        // A secret typed into the TOML itself may be quoted back by a syntax error.
        if !text.contains(secret) {
            assert!(!shown.contains(secret), "a secret leaked: {shown}");
        }
    }
});
