//! SoftHSMv2 for the tests, in one place: where its PKCS#11 module is, and making a
//! token. The runner's environment (`SOFTHSM2_CONF`, `XKS_TEST_PKCS11_MODULE`) comes
//! from `tests/softhsm/setup.sh`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// SoftHSM's PKCS#11 module: `XKS_TEST_PKCS11_MODULE` (setup.sh exports it), else the
/// first of the distributions' install paths that exists.
pub fn module() -> Option<PathBuf> {
    if let Some(m) = std::env::var_os("XKS_TEST_PKCS11_MODULE") {
        return Some(PathBuf::from(m));
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// `softhsm2-util --init-token --free` with the conf of this process's environment, or
/// `conf`. SoftHSM sees only the tokens that exist when a process initialises it, so a
/// test makes its tokens before anything in its process opens the module.
pub fn init_token(label: &str, so_pin: &str, user_pin: &str, conf: Option<&Path>) {
    let mut cmd = Command::new("softhsm2-util");
    cmd.args([
        "--init-token",
        "--free",
        "--label",
        label,
        "--so-pin",
        so_pin,
        "--pin",
        user_pin,
    ]);
    if let Some(conf) = conf {
        cmd.env("SOFTHSM2_CONF", conf);
    }
    let out = cmd
        .output()
        .expect("run softhsm2-util (apt-get install softhsm2)");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token {label} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
