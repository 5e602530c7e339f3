//! Operating the proxy safely: credential rotation and reload without dropping a
//! connection, mTLS enforced in the handshake, quotas and load shedding, metrics, key
//! rotation, and the operator CLI. All against the real server.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use xks_proxy::config::Config;

fn write_config(p: &TestProxy, text: &str) -> std::path::PathBuf {
    let path = p.dir.path().join("proxy.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn original_config(p: &TestProxy) -> String {
    std::fs::read_to_string(p.dir.path().join("proxy.toml")).expect("config")
}

/// The config with only credential `keep` (0 or 1) listed.
fn config_with_only(p: &TestProxy, keep: usize) -> String {
    let text = original_config(p);
    let other = 1 - keep;
    let block = format!(
        "[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret{other}\"\n",
        p.creds[other].akid
    );
    assert!(text.contains(&block));
    text.replace(&block, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_rotation_procedure_with_requests_flowing_loses_nothing() {
    // Spec: add new set on proxy → switch KMS → remove old; no restart, no dropped
    // connection. Start with only credential 0 live.
    let p = TestProxy::start(Options::default()).await;
    let full = original_config(&p);
    let path = write_config(&p, &config_with_only(&p, 0));
    let reloader = p.running.reloader();
    reloader
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    let old = p.client(false);
    let new = old.with_cred(p.creds[1].clone());
    assert_eq!(
        new.post(&health_url(&p), &health_body()).await.status,
        401,
        "new not live yet"
    );

    let current = Arc::new(AtomicUsize::new(0)); // which credential clients use
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (old, new) = (old.clone(), new.clone());
        let (current, failures, done) = (current.clone(), failures.clone(), done.clone());
        let stop = stop.clone();
        let url = key_url(&p, KEY, "encrypt");
        workers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Acquire) && n < 50_000 {
                let c = if current.load(Ordering::Acquire) == 0 {
                    &old
                } else {
                    &new
                };
                let r = c
                    .post(&url, &encrypt_body(format!("w{w}-{n}").as_bytes(), None))
                    .await;
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    // Each step happens with requests flowing: wait (bounded) for 20 more requests
    // to complete, rather than for a fixed time a slow machine may spend on a few.
    let flowing = |what: &'static str| {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::Acquire) + 20;
            let until = Instant::now() + Duration::from_secs(60);
            while done.load(Ordering::Acquire) < target {
                assert!(Instant::now() < until, "requests stopped flowing {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    flowing("with only the old set").await;
    // 1. add the new set (both live)
    std::fs::write(&path, &full).expect("write");
    reloader
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    flowing("with both sets").await;
    // 2. KMS switches (UpdateCustomKeyStore)
    current.store(1, Ordering::Release);
    flowing("after the switch").await;
    // 3. remove the old set
    std::fs::write(&path, config_with_only(&p, 1)).expect("write");
    reloader
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    flowing("with only the new set").await;
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(done.load(Ordering::Relaxed) >= 80, "requests kept flowing");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "zero failed requests during rotation"
    );
    assert_eq!(
        old.post(&health_url(&p), &health_body()).await.status,
        401,
        "old set removed"
    );
    assert_eq!(new.post(&health_url(&p), &health_body()).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_validation_changes_nothing() {
    let p = TestProxy::start(Options::default()).await;
    let good = original_config(&p);
    let bad = good.replace("path_prefix = \"/tenant-a\"", "path_prefix = \"bad/\"");
    let path = write_config(&p, &bad);
    assert!(Config::load(&path).is_err(), "the operator sees the error");
    // The TLS files are fine but the policy file does not exist: reload refuses whole.
    let text = good + "\n[policy]\nfile = \"missing.cedar\"\n";
    std::fs::write(&path, text).expect("write");
    let cfg = Config::load(&path).expect("syntactically fine");
    assert!(p.running.reloader().reload(&cfg).await.is_err());
    assert_eq!(
        p.client(false)
            .post(&health_url(&p), &health_body())
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_backend_refuses_changes_nothing_else_either() {
    // "A reload that fails keeps the old config": all or nothing, the backend included.
    // The keystore file is unreadable at reload time while the new config would also
    // remove credential 0: the reload fails and credential 0 stays live.
    let p = TestProxy::start(Options::default()).await;
    let keystore = match &p.config.backends[0].config {
        xks_proxy::config::BackendConfig::Software { keystore, .. } => keystore.clone(),
        #[allow(unreachable_patterns)]
        other => panic!("software backend expected, got {other:?}"),
    };
    let saved = std::fs::read(&keystore).expect("keystore");
    std::fs::write(&keystore, b"{ not a keystore").expect("corrupt");
    let path = write_config(&p, &config_with_only(&p, 1));
    let result = p
        .running
        .reloader()
        .reload(&Config::load(&path).expect("valid config"))
        .await;
    std::fs::write(&keystore, &saved).expect("restore");
    let err = result.expect_err("the backend refused");
    assert!(err.to_string().contains("backend"), "{err}");
    let old = p.client(false);
    assert_eq!(
        old.post(&health_url(&p), &health_body()).await.status,
        200,
        "credential 0 still live"
    );
    let r = old
        .post(
            &key_url(&p, KEY, "encrypt"),
            &encrypt_body(b"still served", None),
        )
        .await;
    assert_eq!(r.status, 200, "the old keys still serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_allow_lists_and_quotas_to_the_running_proxy() {
    // Issue 6: a reload re-reads "key allow-lists ... quotas".
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let url = key_url(&p, KEY, "encrypt");
    for _ in 0..5 {
        assert_eq!(c.post(&url, &encrypt_body(b"x", None)).await.status, 200);
    }
    let prefix_line = format!("path_prefix = \"{PREFIX}\"\n");
    let text = original_config(&p);
    assert!(text.contains(&prefix_line));
    // Allow only another key, and one request per second with no burst beyond it.
    let limited = text.replace(
        &prefix_line,
        &format!(
            "{prefix_line}allowed_keys = [\"{KEY_ENCRYPT_ONLY}\"]\nquota_rps = 1\nquota_burst = 1\n"
        ),
    );
    let path = write_config(&p, &limited);
    p.running
        .reloader()
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    let r = c.post(&url, &encrypt_body(b"x", None)).await;
    assert_eq!(
        (r.status, r.error_name()),
        (404, "KeyNotFoundException"),
        "{KEY} is off the allow-list now"
    );
    let allowed = key_url(&p, KEY_ENCRYPT_ONLY, "encrypt");
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(c.post(&allowed, &encrypt_body(b"x", None)).await.status);
        }
        v
    };
    assert!(
        statuses.contains(&429),
        "quota of 1/s applies: {statuses:?}"
    );
    // And back: the original config lifts both.
    let path = write_config(&p, &text);
    p.running
        .reloader()
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    for _ in 0..5 {
        assert_eq!(c.post(&url, &encrypt_body(b"x", None)).await.status, 200);
    }
}

fn mtls_extra() -> String {
    format!(
        "client_ca = \"{}\"\nclient_subjects = [\"cks.kms.us-east-1.amazonaws.com\"]\n",
        repo().join("certs/ca.pem").display()
    )
}

/// The TLS section with mTLS lines appended: `prepare` puts [server.tls] last in
/// [server], so we patch the text and start from it.
async fn start_with_mtls() -> TestProxy {
    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replace("\n[backend]", &format!("{}\n[backend]", mtls_extra()));
    std::fs::write(dir.path().join("proxy.toml"), &text).expect("write");
    let p = TestProxy::start_with(dir, &text, creds).await;
    assert!(p.config.server.client_auth.is_some());
    p
}

fn client_with_cert(p: &TestProxy, name: Option<&str>) -> Client {
    let ca = reqwest::Certificate::from_pem(&ca_pem()).expect("ca");
    let mut b = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", p.addr())
        .http1_only()
        .timeout(Duration::from_secs(5));
    if let Some(name) = name {
        let mut pem = std::fs::read(repo().join(format!("certs/{name}.pem"))).expect("cert");
        pem.extend(std::fs::read(repo().join(format!("certs/{name}.key"))).expect("key"));
        b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    Client {
        http: b.build().expect("client"),
        cred: p.creds[0].clone(),
        region: REGION.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_is_enforced_inside_the_handshake() {
    // Spec: the handshake MUST be refused for any other subject or chain.
    let p = start_with_mtls().await;
    let ok = client_with_cert(&p, Some("kms-client"));
    assert_eq!(ok.post(&health_url(&p), &health_body()).await.status, 200);
    for name in [
        None,
        Some("wrong-name-client"),
        Some("expired-client"),
        Some("self-signed-client"),
    ] {
        let c = client_with_cert(&p, name);
        let body = serde_json::to_vec(&health_body()).expect("json");
        let result = c.http.post(health_url(&p)).body(body).send().await;
        assert!(
            result.is_err(),
            "{name:?}: no HTTP exchange may happen, got {:?}",
            result.map(|r| r.status())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_reloads_for_new_connections() {
    let p = TestProxy::start(Options::default()).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let peer_key_is_rsa = || async {
        let connector = tokio_rustls::TlsConnector::from(rustls_client(None));
        let tcp = tokio::net::TcpStream::connect(p.addr()).await.expect("tcp");
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .expect("handshake");
        let cert = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
        let (_, x) = x509_parser::parse_x509_certificate(&cert).expect("x509");
        x.public_key().algorithm.algorithm.to_id_string() == "1.2.840.113549.1.1.1"
    };
    assert!(!peer_key_is_rsa().await);
    let text = original_config(&p).replace("server-ecdsa", "server-rsa");
    let path = write_config(&p, &text);
    p.running
        .reloader()
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    assert!(
        peer_key_is_rsa().await,
        "new handshakes use the reloaded certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_in_flight_limit_sheds_load_with_429() {
    // The key manager takes 1 s (the request deadline raised to 5 s, so none times
    // out): the two admitted requests are still in flight while the other six arrive,
    // however slowly the eight are scheduled.
    let (dir, text, creds) = prepare(&Options {
        extra_server: "max_in_flight = 2\n".into(),
        simulated_latency_ms: 1000,
        ..Options::default()
    });
    let text = text + "\n[limits]\nbackend_deadline_ms = 5000\n";
    let p = TestProxy::start_with(dir, &text, creds).await;
    let c = p.client(true);
    let url = key_url(&p, KEY, "encrypt");
    let mut body = encrypt_body(b"x", None);
    body.as_object_mut()
        .expect("obj")
        .remove("ciphertextDataIntegrityValueAlgorithm");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            tokio::spawn(async move { c.post(&url, &body).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.expect("task");
        statuses.push(r.status);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "over the limit is shed: {statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "within the limit is served: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_admin_listener() {
    let p = TestProxy::start(Options {
        extra_server: String::new(),
        ..Options::default()
    })
    .await;
    // The admin listener is off by default.
    assert!(p.running.admin_addr.is_none());
    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replacen(
        "[server]\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[server]\n",
        1,
    );
    let p2 = TestProxy::start_with(dir, &text, creds).await;
    let admin = p2.running.admin_addr.expect("admin listener");
    assert!(admin.ip().is_loopback());
    let c = p2.client(false);
    assert_eq!(
        c.post(&key_url(&p2, KEY, "encrypt"), &encrypt_body(b"m", None))
            .await
            .status,
        200
    );
    assert_eq!(
        c.post(&key_url(&p2, "nope", "encrypt"), &encrypt_body(b"m", None))
            .await
            .status,
        404
    );
    let text = scrape_metrics(admin).await;
    for needle in [
        "xks_requests_total{",
        "outcome=\"ok\"",
        "outcome=\"KeyNotFoundException\"",
        "xks_request_duration_seconds_bucket{",
        "le=\"0.25\"",
        "xks_backend_call_duration_seconds",
        "xks_backend_calls_in_flight",
        "xks_ekm_health_status{",
        "xks_tls_certificate_days_to_expiry",
        "xks_credential_age_days{",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_keeps_old_ciphertexts_and_binds_the_version() {
    use xks_proxy::backend::software::{Keystore, MasterKey};
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let old = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"before", None))
        .await;
    assert_eq!(unb64(&old.body["ciphertextMetadata"]), vec![1, 0, 0, 0, 1]);
    let master = MasterKey::from_file(&p.dir.path().join("master.key")).expect("master");
    let mut ks = Keystore::open(&p.dir.path().join("keystore.json"), &master).expect("open");
    assert_eq!(ks.rotate(KEY).expect("rotate"), 2);
    ks.save().expect("save");
    let path = p.dir.path().join("proxy.toml");
    p.running
        .reloader()
        .reload(&Config::load(&path).expect("config"))
        .await
        .expect("reload");
    let new = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"after", None))
        .await;
    assert_eq!(
        unb64(&new.body["ciphertextMetadata"]),
        vec![1, 0, 0, 0, 2],
        "new encryptions use v2"
    );
    for (enc, pt) in [(&old, &b"before"[..]), (&new, &b"after"[..])] {
        let d = c
            .post(&key_url(&p, KEY, "decrypt"), &decrypt_body(&enc.body, None))
            .await;
        assert_eq!(unb64(&d.body["plaintext"]), pt);
    }
    // A tampered version byte: v2's ciphertext claimed as v1 fails authentication.
    let mut body = decrypt_body(&new.body, None);
    body["ciphertextMetadata"] = json!(b64(&[1, 0, 0, 0, 1]));
    let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidCiphertextException")
    );
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
}

#[test]
fn credentials_new_makes_what_kms_accepts() {
    let out = bin()
        .args(["credentials", "new", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let akid = v["AccessKeyId"].as_str().expect("akid");
    let secret = v["RawSecretAccessKey"].as_str().expect("secret");
    assert!(xks_proxy::config::valid_access_key_id(akid), "{akid}");
    assert!(xks_proxy::config::valid_secret(secret));
}

#[test]
fn kms_config_prints_the_console_import_file() {
    let (dir, _text, creds) = prepare(&Options::default());
    let out = bin()
        .args(["kms-config", "--prefix", PREFIX, "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["XksProxyUriPath"], format!("{PREFIX}/kms/xks/v1"));
    assert_eq!(
        v["XksProxyAuthenticationCredential"]["AccessKeyId"],
        creds[1].akid.as_str()
    );
    assert_eq!(
        v["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        creds[1].secret.expose()
    );
    let out = bin()
        .args(["kms-config", "--prefix", "/nope", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
}

#[test]
fn doctor_passes_a_good_config_and_fails_a_bad_key() {
    let (dir, text, _) = prepare(&Options {
        allowed_keys: Some(vec![KEY.into()]),
        ..Options::default()
    });
    let cfg = dir.path().join("proxy.toml");
    let out = bin()
        .args(["doctor", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    for needle in [
        "[PASS] config",
        "certificate chain",
        "round trip",
        "key 'key-1'",
    ] {
        assert!(report.contains(needle), "{needle} missing:\n{report}");
    }
    // Issue 12: asked about the name KMS will use, doctor also checks what KMS checks:
    // the dev certificate names localhost but chains to no public CA, a FAIL (with the
    // issuer and what KMS requires), for either connectivity option.
    for (connectivity, says) in [
        ("public-endpoint", "with a public endpoint"),
        ("vpc-endpoint-service", "with a VPC endpoint service too"),
    ] {
        let out = bin()
            .args([
                "doctor",
                "--endpoint",
                "localhost",
                "--connectivity",
                connectivity,
            ])
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run");
        let report = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{report}");
        assert!(
            report.contains("[PASS] TLS: the certificate names localhost"),
            "{report}"
        );
        let fails: Vec<&str> = report.lines().filter(|l| l.starts_with("[FAIL]")).collect();
        assert_eq!(fails.len(), 1, "{report}");
        assert!(
            fails[0].contains("does not reach a public root CA"),
            "{report}"
        );
        assert!(fails[0].contains("xks-proxy dev CA"), "{report}");
        assert!(fails[0].contains(says), "{report}");
    }
    // Against a KMS stand-in that trusts the dev CA (the emulator's --xks-ca-bundle),
    // the same chain passes: the check is the chain, not a blanket refusal.
    let out = bin()
        .args(["doctor", "--endpoint", "localhost", "--kms-ca-bundle"])
        .arg(repo().join("certs/ca.pem"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("[PASS] TLS: the chain as served reaches a root in"),
        "{report}"
    );
    // A disabled / encrypt-only key on the allow-list, and a wrong endpoint name, fail.
    let bad = text.replace(
        &format!("allowed_keys = [\"{KEY}\"]"),
        &format!("allowed_keys = [\"{KEY_DISABLED}\", \"{KEY_ENCRYPT_ONLY}\"]"),
    );
    std::fs::write(&cfg, bad).expect("write");
    let out = bin()
        .args(["doctor", "--endpoint", "xks.other.example", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("is DISABLED"), "{report}");
    assert!(report.contains("lacks DECRYPT"), "{report}");
    assert!(
        report.contains("does not name xks.other.example"),
        "{report}"
    );
}

/// Issue 12: `doctor` warned about a world-readable master key only in serve's log;
/// SigV4 secret files and PIN files are secrets too. Each file others can read is named
/// in the report; once they are 0600, one line says so.
#[test]
fn doctor_names_every_secret_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, _text, _) = prepare(&Options::default());
    let cfg = dir.path().join("proxy.toml");
    let chmod = |name: &str, mode: u32| {
        std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(mode))
            .expect("chmod")
    };
    for f in ["secret0", "secret1", "master.key"] {
        chmod(f, 0o600);
    }
    chmod("secret1", 0o644);
    chmod("master.key", 0o640);
    let doctor = || {
        let out = bin()
            .args(["doctor", "--config"])
            .arg(&cfg)
            .output()
            .expect("run");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let report = doctor();
    let warned: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("[WARN] secret file"))
        .collect();
    assert_eq!(warned.len(), 2, "{report}");
    assert!(
        warned
            .iter()
            .any(|l| l.contains("secret1") && l.contains("mode 644")),
        "{report}"
    );
    assert!(
        warned
            .iter()
            .any(|l| l.contains("master.key") && l.contains("master key")),
        "{report}"
    );
    chmod("secret1", 0o600);
    chmod("master.key", 0o600);
    let report = doctor();
    assert!(
        report.contains("[PASS] secret files: 3 named, none readable by group or others"),
        "{report}"
    );
}
