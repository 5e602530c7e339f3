//! Every config file we ship parses and validates (`xks-proxy config check`), so the
//! documentation cannot drift from the code.

use std::process::Command;

#[test]
fn every_shipped_config_passes_config_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    let tmp = tempfile::tempdir().expect("tmp");
    let pin = tmp.path().join("pin");
    std::fs::write(&pin, "1234").expect("pin");
    for entry in std::fs::read_dir(&dir).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
            .args(["config", "check", "--config"])
            .arg(&path)
            // The secrets the shipped files name, as an operator would provide them.
            .env(
                "XKS_MASTER_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            )
            .env(
                "XKS_SECRET_EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242",
            )
            .env("XKS_HSM_PIN", "1234")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{} fails config check: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 1, "no config files found in {}", dir.display());
}
