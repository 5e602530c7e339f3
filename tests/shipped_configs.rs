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
        // A software-only build (--no-default-features) has no PKCS#11 backend: it
        // must refuse the HSM profiles, naming the missing backend.
        let text = std::fs::read_to_string(&path).expect("read config");
        if !cfg!(feature = "pkcs11") && text.contains("kind = \"pkcs11\"") {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains("pkcs11"),
                "{}: a build without PKCS#11 must refuse it, naming pkcs11: {stderr}",
                path.display()
            );
            continue;
        }
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

#[test]
fn the_grafana_dashboard_uses_only_metrics_the_proxy_exports() {
    // The names `xks_proxy::telemetry` describes (tests/operating.rs checks each appears
    // on /metrics).
    const EXPORTED: &[&str] = &[
        "xks_requests_total",
        "xks_request_duration_seconds_bucket",
        "xks_backend_call_duration_seconds_bucket",
        "xks_backend_calls_in_flight",
        "xks_backend_calls_waiting",
        "xks_ekm_health_status",
        "xks_tls_certificate_days_to_expiry",
        "xks_credential_age_days",
    ];
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/grafana/xks-proxy-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("xks_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    EXPORTED.contains(&n),
                    "{n} is not a metric the proxy exports"
                );
                used.insert(n);
            }
        }
    }
    assert_eq!(
        used.len(),
        EXPORTED.len(),
        "every exported metric has a panel: {used:?}"
    );
}

#[test]
fn the_reference_configs_second_tenant_needs_both_tenants_to_name_their_keys() {
    // config/xks-proxy.toml ends with a commented second [[keystores]]: uncommented as
    // is, the config is refused (tenants are isolated by default, issue 10 §3) until
    // "/example" names its keys too, as the comment says.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/xks-proxy.toml")).expect("read");
    let (head, tail) = text
        .split_once("# A second tenant")
        .expect("the commented second tenant");
    let second: String = tail
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(second.contains("[[keystores]]"), "{second}");
    let tmp = tempfile::tempdir().expect("tmp");
    let check = |toml: &str| {
        let path = tmp.path().join("proxy.toml");
        std::fs::write(&path, toml).expect("write");
        Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
            .args(["config", "check", "--config"])
            .arg(&path)
            .env(
                "XKS_MASTER_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            )
            .env(
                "XKS_SECRET_EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242",
            )
            .env(
                "XKS_SECRET_OTHER",
                "otherOTHERotherOTHERotherOTHERotherOTHER4242",
            )
            .output()
            .expect("run")
    };
    let out = check(&format!("{head}{second}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused without assignment");
    assert!(err.contains("keystores[0].allowed_keys"), "{err}");
    assert!(err.contains("path_prefix = \"/example\""), "{err}");
    let assigned = head.replace(
        "# allowed_keys = [\"app-key-1\"]",
        "allowed_keys = [\"app-key-1\"]",
    );
    let out = check(&format!("{assigned}{second}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
