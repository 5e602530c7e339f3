//! The real server over TLS on a real SoftHSMv2 token (issue: PKCS#11 backend): the four
//! APIs, keys with partial usages, keys that are not AES-256, and 64 concurrent clients
//! with `/ping` answered from the health cache while the HSM is saturated.
//!
//! Runner contract (tests/run-all.sh): `SOFTHSM2_CONF` exported by tests/softhsm/setup.sh.
#![cfg(feature = "pkcs11")]

mod common;
mod harness;
mod kms_support;
mod softhsm;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use xks_proxy::backend::KeyUsage;
use xks_proxy::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings, TestKey, TestKeyKind};

const USER_PIN: &str = "13579";

/// `prepare`'s config text with its `[backend]` table replaced by a PKCS#11 one for the
/// token `label` (PIN in the file `pin` beside the config).
fn with_pkcs11_backend(text: &str, label: &str) -> String {
    let backend = format!(
        "[backend]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\nuser_pin_file = \"pin\"\n",
        module().display()
    );
    let start = text.find("[backend]").expect("backend");
    let end = text[start..].find("\n\n").map(|e| start + e).expect("end");
    format!("{}{}{}", &text[..start], backend, &text[end..])
}

fn module() -> PathBuf {
    softhsm::module().expect("libsofthsm2.so (apt-get install softhsm2; tests/run-all.sh does it)")
}

/// This file's tokens, all made before anything in the process initialises SoftHSM (it
/// only sees tokens that exist at C_Initialize).
fn tokens() -> &'static std::sync::Mutex<Vec<String>> {
    static TOKENS: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    TOKENS.get_or_init(|| {
        assert!(
            std::env::var_os("SOFTHSM2_CONF").is_some(),
            "SOFTHSM2_CONF is not set: run eval \"$(tests/softhsm/setup.sh \"$PWD/target/softhsm\")\" first (tests/run-all.sh does)"
        );
        let labels: Vec<String> = (0..4).map(|i| format!("srv-{}-{i}", std::process::id())).collect();
        for label in &labels {
            softhsm::init_token(label, "97531", USER_PIN, None);
        }
        std::sync::Mutex::new(labels)
    })
}

/// A fresh token with the fixture keys, and the `[backend]` TOML that serves it.
fn token_with_keys(dir: &std::path::Path) -> String {
    let label = tokens()
        .lock()
        .expect("lock")
        .pop()
        .expect("one token per test");
    let pin = dir.join("pin");
    std::fs::write(&pin, USER_PIN).expect("pin");
    let mut s = Pkcs11Settings::new(module());
    s.token_label = Some(label.clone());
    s.user_pin_file = Some(pin.clone());
    {
        let b = Pkcs11Backend::open(&s).expect("open token");
        b.create_health_check_key().expect("health key");
        b.create_key(KEY, &[KeyUsage::Encrypt, KeyUsage::Decrypt])
            .expect("key");
        b.create_key(KEY_ENCRYPT_ONLY, &[KeyUsage::Encrypt])
            .expect("key");
        b.create_key(KEY_DECRYPT_ONLY, &[KeyUsage::Decrypt])
            .expect("key");
        b.create_key("key-neither", &[KeyUsage::Wrap]).expect("key");
        for (id, kind) in [
            ("key-aes128", TestKeyKind::Aes { bytes: 16 }),
            ("key-generic", TestKeyKind::GenericSecret { bytes: 32 }),
        ] {
            b.create_test_key(&TestKey {
                id,
                kind,
                usages: &[KeyUsage::Encrypt, KeyUsage::Decrypt],
                end_date: None,
                material: None,
                private: true,
            })
            .expect("test key");
        }
    }
    format!(
        "[backend]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\nuser_pin_file = \"{}\"\npool_size = 8\n",
        module().display(),
        pin.display()
    )
}

async fn start_on_softhsm() -> TestProxy {
    let (dir, text, creds) = prepare(&Options::default());
    let backend = token_with_keys(dir.path());
    let start = text.find("[backend]").expect("backend");
    let end = text[start..].find("\n\n").map(|e| start + e).expect("end");
    let text = format!("{}{}{}", &text[..start], backend, &text[end..]);
    std::fs::write(dir.path().join("proxy.toml"), &text).expect("config");
    TestProxy::start_with(dir, &text, creds).await
}

fn metadata_body() -> serde_json::Value {
    json!({"requestMetadata": {"kmsRequestId": "m", "kmsOperation": "CreateKey", "awsPrincipalArn": PRINCIPAL}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_apis_and_key_rules_on_softhsm() {
    let p = start_on_softhsm().await;
    let c = p.client(true);
    // GetHealthStatus: one ACTIVE entry per token, from C_GetTokenInfo.
    let h = c.post(&health_url(&p), &health_body()).await;
    assert_eq!(h.status, 200, "{:?}", h.body);
    assert_eq!(
        h.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE",
        "{:?}",
        h.body
    );
    assert!(
        h.body["ekmFleetDetails"][0]["model"]
            .as_str()
            .expect("model")
            .to_lowercase()
            .contains("softhsm"),
        "{:?}",
        h.body
    );
    // GetKeyMetadata reports what each key really is.
    for (key, spec, usage) in [
        (KEY, "AES_256", json!(["ENCRYPT", "DECRYPT"])),
        (KEY_ENCRYPT_ONLY, "AES_256", json!(["ENCRYPT"])),
        (KEY_DECRYPT_ONLY, "AES_256", json!(["DECRYPT"])),
        ("key-aes128", "AES_128", json!(["ENCRYPT", "DECRYPT"])),
    ] {
        let r = c
            .post(&key_url(&p, key, "metadata"), &metadata_body())
            .await;
        assert_eq!(r.status, 200, "{key}: {:?}", r.body);
        assert_eq!(r.body["keySpec"], spec, "{key}");
        assert_eq!(r.body["keyUsage"], usage, "{key}");
        assert_eq!(r.body["keyStatus"], "ENABLED");
    }
    let r = c
        .post(&key_url(&p, "key-generic", "metadata"), &metadata_body())
        .await;
    assert_ne!(
        r.body["keySpec"], "AES_256",
        "a non-AES key must not claim AES_256: {:?}",
        r.body
    );
    // Encrypt (with CDIV and its self-check) and Decrypt, spec size edges included.
    for (pt_len, aad_len) in [(32usize, 100usize), (4300, 8192)] {
        let pt = vec![7u8; pt_len];
        let aad = vec![9u8; aad_len];
        let enc = c
            .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(&pt, Some(&aad)))
            .await;
        assert_eq!(enc.status, 200, "{:?}", enc.body);
        assert_eq!(unb64(&enc.body["initializationVector"]).len(), 12);
        let dec = c
            .post(
                &key_url(&p, KEY, "decrypt"),
                &decrypt_body(&enc.body, Some(&aad)),
            )
            .await;
        assert_eq!(unb64(&dec.body["plaintext"]), pt);
        let dec = c
            .post(
                &key_url(&p, KEY, "decrypt"),
                &decrypt_body(&enc.body, Some(b"other")),
            )
            .await;
        assert_eq!(
            (dec.status, dec.error_name()),
            (400, "InvalidCiphertextException")
        );
    }
    // Partial usages behave as the spec says. A CDIV needs the decrypt self-check
    // first (spec Appendix C order of work), which a key without CKA_DECRYPT cannot
    // do: 400 InvalidKeyUsageException, as AWS's conformance client expects. Without
    // a CDIV it encrypts.
    let r = c
        .post(
            &key_url(&p, KEY_ENCRYPT_ONLY, "encrypt"),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException"),
        "{:?}",
        r.body
    );
    let no_cdiv = encrypt_body_without_cdiv(b"x");
    let enc = c
        .post(&key_url(&p, KEY_ENCRYPT_ONLY, "encrypt"), &no_cdiv)
        .await;
    assert_eq!(enc.status, 200, "{:?}", enc.body);
    let r = c
        .post(
            &key_url(&p, KEY_ENCRYPT_ONLY, "decrypt"),
            &decrypt_body(&enc.body, None),
        )
        .await;
    assert_eq!(r.error_name(), "InvalidKeyUsageException");
    let r = c
        .post(
            &key_url(&p, KEY_DECRYPT_ONLY, "encrypt"),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!(r.error_name(), "InvalidKeyUsageException");
    for op in ["encrypt", "decrypt"] {
        let body = if op == "encrypt" {
            encrypt_body(b"x", None)
        } else {
            decrypt_body(&enc.body, None)
        };
        let r = c.post(&key_url(&p, "key-neither", op), &body).await;
        assert_eq!(r.error_name(), "InvalidKeyUsageException", "{op}");
    }
    // Unknown key, and the reserved health-check key, are not found.
    for key in ["no-such-key", "xks-health-check"] {
        let r = c
            .post(&key_url(&p, key, "encrypt"), &encrypt_body(b"x", None))
            .await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "KeyNotFoundException"),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_zero_wrong_results_and_ping_answers_from_cache() {
    let p = start_on_softhsm().await;
    let stop = Instant::now() + Duration::from_secs(3);
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..64u32 {
        let c = p.client(i % 2 == 0);
        let ok = Arc::clone(&ok);
        let (enc_url, dec_url) = (key_url(&p, KEY, "encrypt"), key_url(&p, KEY, "decrypt"));
        clients.push(tokio::spawn(async move {
            let mut n = 0u32;
            // At least two round trips each (progress is behaviour, not a rate), then
            // until the 3 s of load are over.
            while n < 2 || (Instant::now() < stop && n < 2_000) {
                let pt = format!("client {i} request {n}").into_bytes();
                let enc = c.post(&enc_url, &encrypt_body(&pt, Some(b"ctx"))).await;
                assert_eq!(enc.status, 200, "{:?}", enc.body);
                let dec = c
                    .post(&dec_url, &decrypt_body(&enc.body, Some(b"ctx")))
                    .await;
                assert_eq!(unb64(&dec.body["plaintext"]), pt, "a wrong result");
                ok.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    // Meanwhile, /ping on its own connection, from when the HSM is busy (an event: the
    // clients have completed 64 round trips) until the clients are done; every ping
    // below starts while they run.
    let pinger = p.client(false);
    let mut ping = Vec::new();
    let busy_by = Instant::now() + Duration::from_secs(60);
    while ok.load(Ordering::Relaxed) < 64 {
        assert!(Instant::now() < busy_by, "the clients never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while clients.iter().any(|c| !c.is_finished()) {
        let t = Instant::now();
        // Bounded, so a hung /ping fails the test instead of stalling it.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            pinger.http.get(p.url("/ping")).send(),
        )
        .await
        .expect("/ping answers while the HSM is saturated")
        .expect("ping");
        assert_eq!(r.status().as_u16(), 200);
        ping.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in clients {
        c.await.expect("client");
    }
    ping.sort();
    let n = ok.load(Ordering::Relaxed);
    // Figures only (a shared 2-core machine running a debug build proves nothing about
    // speed): /ping reads the cached deep-check result, never the HSM.
    println!(
        "64 clients: {n} encrypt+decrypt pairs; /ping under that load p50 {:?} max {:?} ({} samples)",
        ping.get(ping.len() / 2),
        ping.last(),
        ping.len()
    );
    assert!(n >= 128, "every client made progress");
    assert!(
        !ping.is_empty(),
        "/ping answered 200 while the clients were running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_pkcs11_disabled_key_list() {
    // Operating: a reload applies the config's disabled-key list to a running proxy.
    let p = start_on_softhsm().await;
    let c = p.client(false);
    assert_eq!(
        c.post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
            .await
            .status,
        200
    );
    let path = p.dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text.replace(
        "pool_size = 8\n",
        &format!("pool_size = 8\ndisabled_keys = [\"{KEY}\"]\n"),
    );
    std::fs::write(&path, text).expect("write");
    let cfg = xks_proxy::config::Config::load(&path).expect("config");
    p.running.reloader().reload(&cfg).await.expect("reload");
    let r = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    assert_eq!((r.status, r.error_name()), (400, "InvalidStateException"));
    let r = c
        .post(&key_url(&p, KEY, "metadata"), &metadata_body())
        .await;
    assert_eq!(r.body["keyStatus"], "DISABLED");
}

/// Issue 12: `disabled_keys = ["my-kye-2"]` (a typo) passed a reload while the intended
/// key stayed ENABLED. An entry that names no key on the token is now an error: the
/// reload is refused as a whole (the running list stays), and a start with it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_list_naming_no_key_is_refused_at_reload_and_at_start() {
    let p = start_on_softhsm().await;
    let c = p.client(false);
    let path = p.dir.path().join("proxy.toml");
    let good = std::fs::read_to_string(&path).expect("config");
    let with_list = |list: &str| {
        good.replace(
            "pool_size = 8\n",
            &format!("pool_size = 8\ndisabled_keys = {list}\n"),
        )
    };
    // The running list disables KEY_ENCRYPT_ONLY.
    std::fs::write(&path, with_list(&format!("[\"{KEY_ENCRYPT_ONLY}\"]"))).expect("write");
    let cfg = xks_proxy::config::Config::load(&path).expect("config");
    p.running.reloader().reload(&cfg).await.expect("reload");
    // A typo beside a real key: refused, naming the entry; nothing of it applies.
    std::fs::write(&path, with_list(&format!("[\"{KEY}\", \"my-kye-2\"]"))).expect("write");
    let cfg = xks_proxy::config::Config::load(&path).expect("config parses");
    let err = p
        .running
        .reloader()
        .reload(&cfg)
        .await
        .expect_err("a list naming no key must not reload")
        .to_string();
    assert!(
        err.contains("'my-kye-2'") && err.contains("disabled_keys"),
        "{err}"
    );
    let status = |key: &'static str| {
        let c = &c;
        let p = &p;
        async move {
            c.post(&key_url(p, key, "metadata"), &metadata_body())
                .await
                .body["keyStatus"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        }
    };
    assert_eq!(
        status(KEY).await,
        "ENABLED",
        "the refused list did not apply"
    );
    assert_eq!(
        status(KEY_ENCRYPT_ONLY).await,
        "DISABLED",
        "the running list stays"
    );
    // The same list at start: serve refuses to start, naming the entry.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("'my-kye-2'"), "{stderr}");
}

// ---------------------------------------------------------------------------------
// Issue 3: "if the token disappears the backend reports UNAVAILABLE in health and
// /ping, ... and recovers without a restart", seen from outside a running server.

/// A SoftHSM token directory of its own under `dir` (tests/softhsm/setup.sh, the one
/// token helper) holding one token `label` with [`USER_PIN`]: its directory and the
/// `SOFTHSM2_CONF` a child process must be given.
fn token_dir_of_its_own(dir: &std::path::Path, label: &str) -> (PathBuf, PathBuf) {
    let hsm = dir.join("hsm");
    let out = std::process::Command::new("bash")
        .arg(repo().join("tests/softhsm/setup.sh"))
        .arg(&hsm)
        .args([label, "12345678", USER_PIN])
        .output()
        .expect("setup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = hsm.join("softhsm2.conf");
    (hsm, conf)
}

/// `xks-proxy keys create KEY <args>` for `config`, on the SoftHSM token directory of
/// `conf`.
fn keys_create(config: &std::path::Path, conf: &std::path::Path, args: &[&str]) {
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .args(["keys", "create", KEY])
        .args(args)
        .arg("--config")
        .arg(config)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .expect("keys create");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `xks-proxy serve --config <config>` as a child on the SoftHSM token directory of
/// `conf` (INFO logs), and a client signing with `cred`.
fn serve_child(
    config: &std::path::Path,
    conf: &std::path::Path,
    cred: &Cred,
) -> (kms_support::procs::Proc, Client) {
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"));
    serve
        .args(["serve", "--config"])
        .arg(config)
        .env("SOFTHSM2_CONF", conf)
        .env("RUST_LOG", "info");
    let proxy = kms_support::procs::Proc::spawn(serve, "listening on https://");
    let client = Client::new(proxy.addr, false, cred.clone());
    (proxy, client)
}

/// A child `xks-proxy serve` on a SoftHSM token directory of its own (its own
/// `SOFTHSM2_CONF`), so that a test can move, lock or re-PIN the token without
/// disturbing the other tests of this process. `extra` is appended to the config; the
/// scheduled deep health check is 50 s away, so within a test's bounded waits only the
/// event path can change the health state.
struct OwnToken {
    dir: tempfile::TempDir,
    hsm: PathBuf,
    conf: PathBuf,
    label: String,
    proxy: kms_support::procs::Proc,
    client: Client,
}

impl OwnToken {
    fn serve(label: &str, extra: &str) -> OwnToken {
        let (dir, text, creds) = prepare(&Options::default());
        let (hsm, conf) = token_dir_of_its_own(dir.path(), label);
        std::fs::write(dir.path().join("pin"), USER_PIN).expect("pin");
        let text =
            with_pkcs11_backend(&text, label) + "\n[health]\ncheck_interval_secs = 50\n" + extra;
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, &text).expect("config");
        keys_create(&config, &conf, &[]);
        let (proxy, client) = serve_child(&config, &conf, &creds[0]);
        OwnToken {
            dir,
            hsm,
            conf,
            label: label.to_owned(),
            proxy,
            client,
        }
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "https://localhost:{}{PREFIX}/kms/xks/v1/{tail}",
            self.proxy.addr.port()
        )
    }

    async fn encrypt(&self, plaintext: &[u8]) -> Reply {
        let url = self.url(&format!("keys/{KEY}/encrypt"));
        self.client.post(&url, &encrypt_body(plaintext, None)).await
    }

    /// GET /ping's status, or None if the server did not answer.
    async fn ping(&self) -> Option<u16> {
        let url = format!("https://localhost:{}/ping", self.proxy.addr.port());
        self.client
            .http
            .get(url)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Polls /ping until it answers `want` or `bound` passes; returns the last answer.
    async fn ping_until(&self, want: u16, bound: Duration) -> Option<u16> {
        let until = Instant::now() + bound;
        loop {
            let got = self.ping().await;
            if got == Some(want) || Instant::now() > until {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Encrypts until one succeeds or `bound` passes; returns the last status.
    async fn encrypt_until_ok(&self, bound: Duration) -> u16 {
        let until = Instant::now() + bound;
        loop {
            let got = self.encrypt(b"probe").await.status;
            if got == 200 || Instant::now() > until {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GetHealthStatus's `healthStatus` per fleet entry.
    async fn health_states(&self) -> Vec<String> {
        let r = self.client.post(&self.url("health"), &health_body()).await;
        assert_eq!(r.status, 200, "GetHealthStatus answers: {:?}", r.body);
        r.body["ekmFleetDetails"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["healthStatus"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (at most `bound`) for the proxy's output to contain `needle`.
    async fn log_shows(&self, needle: &str, bound: Duration) -> bool {
        let until = Instant::now() + bound;
        while !self.proxy.output().contains(needle) {
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    fn is_running(&mut self) -> bool {
        self.proxy.child.try_wait().expect("wait").is_none()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_token_vanishes_answers_unavailable_and_recovers_in_place() {
    let mut t = OwnToken::serve("fault-srv", "");
    // Up: first deep check done (bounded wait).
    assert_eq!(t.ping_until(200, Duration::from_secs(30)).await, Some(200));
    assert_eq!(t.encrypt(b"before").await.status, 200);

    // Health follows the backend (issue 11 §3): the scheduled deep check is 50 s away,
    // and every wait below is bounded well inside that, so only the event path (a
    // request that finds the token gone, or back) can turn /ping and GetHealthStatus.
    let event_bound = Duration::from_secs(20);
    let started = Instant::now();

    // The token directory goes away under the running server.
    let tokens = t.hsm.join("tokens");
    let away = t.hsm.join("tokens-away");
    std::fs::rename(&tokens, &away).expect("move the token directory away");
    let r = t.encrypt(b"during").await;
    assert_eq!(r.status, 500, "a named error, not a hang: {:?}", r.body);
    assert!(
        r.body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("CKR_")),
        "the PKCS#11 code is named: {:?}",
        r.body
    );
    assert_eq!(
        t.ping_until(503, event_bound).await,
        Some(503),
        "/ping turns 503"
    );
    assert_eq!(t.health_states().await, vec!["UNAVAILABLE".to_owned()]);

    // Back: the same process recovers (issue: within ~5 s; measured and printed, the
    // bound is only there so a recovery that never comes fails instead of hanging).
    std::fs::rename(&away, &tokens).expect("move it back");
    let back = Instant::now();
    assert_eq!(
        t.encrypt_until_ok(Duration::from_secs(30)).await,
        200,
        "Encrypt succeeds again after the token returns"
    );
    println!(
        "Encrypt succeeded again {:?} after the token returned",
        back.elapsed()
    );
    assert_eq!(
        t.ping_until(200, event_bound).await,
        Some(200),
        "/ping healthy again"
    );
    assert_eq!(t.health_states().await, vec!["ACTIVE".to_owned()]);
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "the scheduled check (50 s) could have done it; the test proves nothing"
    );
    assert!(t.is_running(), "same process, no restart");
}

/// Issue 11 §3, "the PIN changed under the proxy": the operator changes the user PIN
/// on the HSM (here with OpenSC's pkcs11-tool, not our code) and the HSM then drops
/// its sessions (the token directory away and back). The proxy's next login is
/// refused: a clear UNAVAILABLE state naming CKR_PIN_INCORRECT, one refused login and
/// no automatic retry (each would count towards locking the token), no crash. The
/// operator writes the new PIN to the PIN file and sends SIGHUP: serving again, in the
/// same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_changed_under_the_proxy_is_a_clear_unavailable_state_until_a_reload_brings_it() {
    const NEW_PIN: &str = "86420";
    let mut t = OwnToken::serve("pin-srv", "");
    assert_eq!(t.ping_until(200, Duration::from_secs(30)).await, Some(200));
    assert_eq!(t.encrypt(b"before").await.status, 200);

    let changed = std::process::Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module())
        .args(["--token-label", &t.label, "--login", "--pin", USER_PIN])
        .args(["--change-pin", "--new-pin", NEW_PIN])
        .env("SOFTHSM2_CONF", &t.conf)
        .output()
        .expect("pkcs11-tool (apt-get install opensc; tests/run-all.sh does it)");
    assert!(
        changed.status.success(),
        "pkcs11-tool --change-pin: {}",
        String::from_utf8_lossy(&changed.stderr)
    );

    // The HSM restarts: every session is gone, the proxy must log in again.
    let tokens = t.hsm.join("tokens");
    let away = t.hsm.join("tokens-away");
    std::fs::rename(&tokens, &away).expect("move the token directory away");
    assert_ne!(t.encrypt(b"during").await.status, 200);
    std::fs::rename(&away, &tokens).expect("move it back");

    let refused = "PKCS#11 login refused; not retrying";
    assert!(
        t.log_shows(refused, Duration::from_secs(30)).await,
        "{}",
        t.proxy.output()
    );
    // Requests keep failing with the reason named, and do not make it log in again.
    for _ in 0..5 {
        let r = t.encrypt(b"refused").await;
        assert_ne!(r.status, 200, "{:?}", r.body);
        assert!(
            r.body["errorMessage"]
                .as_str()
                .is_some_and(|m| m.contains("CKR_PIN_INCORRECT")),
            "the refusal is named: {:?}",
            r.body
        );
    }
    assert_eq!(t.ping_until(503, Duration::from_secs(20)).await, Some(503));
    assert_eq!(t.health_states().await, vec!["UNAVAILABLE".to_owned()]);

    // A reload with the same (refused) PIN spends no login attempt.
    t.proxy.hup();
    assert!(
        t.log_shows("reloaded PIN is the same one", Duration::from_secs(30))
            .await,
        "{}",
        t.proxy.output()
    );
    assert_eq!(
        t.proxy.output().matches(refused).count(),
        1,
        "{}",
        t.proxy.output()
    );
    assert!(t.is_running(), "no crash");

    // The operator fixes the PIN source and reloads: serving again, same process.
    std::fs::write(t.dir.path().join("pin"), NEW_PIN).expect("pin");
    t.proxy.hup();
    assert_eq!(
        t.encrypt_until_ok(Duration::from_secs(30)).await,
        200,
        "{}",
        t.proxy.output()
    );
    assert_eq!(t.ping_until(200, Duration::from_secs(20)).await, Some(200));
    assert_eq!(t.health_states().await, vec!["ACTIVE".to_owned()]);
    assert_eq!(t.proxy.output().matches(refused).count(), 1);
    assert!(t.is_running(), "same process, no restart");
    let log = t.proxy.output();
    assert!(!log.contains(USER_PIN) && !log.contains(NEW_PIN), "{log}");
}

/// Holds exclusive POSIX (fcntl) locks on every file of a SoftHSM token directory:
/// SoftHSM takes such locks to read its object files, so its calls block until the
/// locks go — an HSM that is up but far slower than the deadline. Released on drop.
struct LockedToken(std::process::Child);

impl LockedToken {
    fn hold(dir: &std::path::Path) -> LockedToken {
        use std::io::BufRead as _;
        let script = r#"
import fcntl, os, sys
fds = []
for root, _, files in os.walk(sys.argv[1]):
    for f in sorted(files):
        fd = os.open(os.path.join(root, f), os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        fds.append(fd)
print("locked", len(fds), flush=True)
sys.stdin.read()
"#;
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert!(line.starts_with("locked "), "{line:?}");
        LockedToken(child)
    }
}

impl Drop for LockedToken {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// One gauge from the proxy's `/metrics`, summed over its label sets (this file's
/// proxies have one backend, so one set).
async fn metric(client: &Client, admin: std::net::SocketAddr, name: &str) -> f64 {
    let text = client
        .http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(['{', ' ']))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "{name} not in:\n{text}");
    values.iter().sum()
}

/// Issue 11 §3, "backend slower than the deadline": with the token blocked, every
/// request is answered (503 DependencyTimeoutException at the deadline, or 429 at once
/// when the bounded wait queue is full), never more calls stuck in the HSM than its
/// sessions, none left waiting; the moment the token is fast again, requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_the_deadline_times_out_without_pile_up_and_recovers() {
    // The [backend] table's pool_size (default 8) is the number of sessions, so of
    // calls that can be in the HSM at once.
    let mut t = OwnToken::serve(
        "slow-srv",
        "\n[limits]\nbackend_deadline_ms = 200\nbackend_max_waiting = 4\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let admin: std::net::SocketAddr = {
        let marker = "metrics listening on http://";
        assert!(t.log_shows(marker, Duration::from_secs(30)).await);
        let log = t.proxy.output();
        let at = log.find(marker).expect("admin address logged");
        log[at + marker.len()..]
            .split('/')
            .next()
            .expect("addr")
            .parse()
            .expect("addr")
    };
    assert_eq!(t.ping_until(200, Duration::from_secs(30)).await, Some(200));
    assert_eq!(t.encrypt(b"before").await.status, 200);

    let lock = LockedToken::hold(&t.hsm.join("tokens"));
    let started = Instant::now();
    let r = t.encrypt(b"blocked").await;
    let first = started.elapsed();
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.error_name(), "DependencyTimeoutException", "{:?}", r.body);
    println!("first request with the token blocked answered in {first:?}");

    // A burst while blocked: every request answered, each a timeout or a throttle.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..40 {
        let client = t.client.clone();
        let url = t.url(&format!("keys/{KEY}/encrypt"));
        burst.spawn(async move {
            client
                .post(&url, &encrypt_body(format!("burst {i}").as_bytes(), None))
                .await
        });
    }
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    while let Some(r) = burst.join_next().await {
        let r = r.expect("task");
        assert!(
            (r.status == 503 && r.error_name() == "DependencyTimeoutException")
                || (r.status == 429 && r.error_name() == "ThrottlingException"),
            "{} {:?}",
            r.status,
            r.body
        );
        *answers
            .entry(format!("{} {}", r.status, r.error_name()))
            .or_default() += 1;
    }
    println!("burst of 40 with the token blocked: {answers:?}");
    // No pile-up: the calls stuck in the HSM are at most its sessions, and nothing is
    // left queued behind them once their requests have been answered.
    let stuck = metric(&t.client, admin, "xks_backend_calls_in_flight").await;
    let waiting = metric(&t.client, admin, "xks_backend_calls_waiting").await;
    println!("then: {stuck} calls stuck in the HSM (8 sessions), {waiting} queued");
    assert!((1.0..=8.0).contains(&stuck), "calls in the HSM: {stuck}");
    assert_eq!(waiting, 0.0, "calls still queued");
    assert!(t.is_running());

    // Fast again: the stuck calls finish and requests succeed at once.
    drop(lock);
    let back = Instant::now();
    assert_eq!(t.encrypt_until_ok(Duration::from_secs(30)).await, 200);
    println!(
        "Encrypt succeeded {:?} after the token was fast again",
        back.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(30);
    while metric(&t.client, admin, "xks_backend_calls_in_flight").await != 0.0
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&t.client, admin, "xks_backend_calls_in_flight").await,
        0.0
    );
    assert!(t.is_running(), "same process");
}

/// Issue 12: a start that cannot open its token says why exactly once and exits: no
/// "will keep trying" before an exit, no second line repeating the PIN's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_cannot_open_its_token_says_why_once() {
    let (dir, text, _creds) = prepare(&Options::default());
    let (_hsm, conf) = token_dir_of_its_own(dir.path(), "start-srv");
    let config = dir.path().join("proxy.toml");
    let serve = |label: &str, pin: &str| {
        std::fs::write(dir.path().join("pin"), pin).expect("pin");
        std::fs::write(&config, with_pkcs11_backend(&text, label)).expect("config");
        std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("serve")
    };
    let wrong_pin = serve("start-srv", "24680");
    let err = String::from_utf8_lossy(&wrong_pin.stderr);
    assert!(!wrong_pin.status.success(), "{err}");
    assert_eq!(err.matches("CKR_PIN_INCORRECT").count(), 1, "{err}");
    let absent = serve("no-such-token", USER_PIN);
    let err = String::from_utf8_lossy(&absent.stderr);
    assert!(!absent.status.success(), "{err}");
    assert_eq!(err.matches("no-such-token").count(), 1, "{err}");
    assert!(!err.contains("keep trying"), "{err}");
}

/// Issue 11 §3: the module's C_Initialize failing at start-up (here: SoftHSM with a
/// config file that does not exist) is a clear error naming the call and its code, said
/// once, and a non-zero exit — not a hang and not a proxy serving without a key manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_cannot_initialise_stops_the_start_with_a_clear_error() {
    let (dir, text, _creds) = prepare(&Options::default());
    std::fs::write(dir.path().join("pin"), USER_PIN).expect("pin");
    let text = with_pkcs11_backend(&text, "any");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, &text).expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("SOFTHSM2_CONF", dir.path().join("no-such-softhsm2.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = child.try_wait().expect("wait") {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the proxy kept running without a usable PKCS#11 module");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success(), "{err}");
    assert_eq!(err.matches("C_Initialize failed: CKR_").count(), 1, "{err}");
}

// ---------------------------------------------------------------------------------
// Issue 14 §2: "`xks-proxy config import-aws-sample` ... Test it on every settings file
// the sample ships ... The result passes `config check`."

/// Every settings file AWS's sample ships (../shared/vectors/aws-sample/settings/,
/// unmodified copies) converts into a config that passes `config check`, with every
/// secret in an owner-only file, after the one command the importer names for the
/// health-check key. Stand-ins, as for our own shipped configs: the HSM libraries they
/// name become this machine's SoftHSM (a token of the test's own, found the way the
/// sample found it: the first token), and the placeholder PIN becomes that token's.
#[test]
fn every_settings_file_the_aws_sample_ships_imports_and_passes_config_check() {
    let settings = repo()
        .parent()
        .expect("repo parent")
        .join("shared/vectors/aws-sample/settings");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&settings)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (../shared must be beside the repo)",
                settings.display()
            )
        })
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let module = module();
    let run = |args: &[&std::ffi::OsStr], conf: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
            .args(args)
            .env("SOFTHSM2_CONF", conf)
            .output()
            .expect("run")
    };
    let mut imported = 0;
    for file in &files {
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let dir = tempfile::tempdir().expect("tempdir");
        let (_hsm, conf) = token_dir_of_its_own(dir.path(), "sample-hsm");
        // The sample's layout: its install directory with configuration/ and tls/.
        let root = dir.path().join("sample");
        std::fs::create_dir_all(root.join("configuration")).expect("mkdir");
        std::fs::create_dir_all(root.join("tls")).expect("mkdir");
        let certs = repo().join("certs");
        for (from, to) in [
            ("server-ecdsa.pem", "server_cert.pem"),
            ("server-ecdsa.key", "server_key.pem"),
            ("ca.pem", "client_ca.pem"),
        ] {
            std::fs::copy(certs.join(from), root.join("tls").join(to)).expect("copy");
        }
        let text: String = std::fs::read_to_string(file)
            .expect("read")
            .lines()
            .map(|line| {
                let key = line.split('=').next().unwrap_or("").trim();
                match key {
                    "PKCS11_HSM_MODULE" => format!("{key} = \"{}\"", module.display()),
                    "PKCS11_LOGGER_LIBRARY_PATH" if !line.contains("\"\"") => {
                        format!("{key} = \"{}\"", module.display())
                    }
                    "user_pin" => format!("user_pin = \"{USER_PIN}\""),
                    _ => line.to_owned(),
                }
            })
            .map(|l| l + "\n")
            .collect();
        let sample = root.join("configuration/settings.toml");
        std::fs::write(&sample, text).expect("write");
        let out_dir = dir.path().join("imported");
        let out = run(
            &[
                "config".as_ref(),
                "import-aws-sample".as_ref(),
                sample.as_os_str(),
                "--out".as_ref(),
                out_dir.as_os_str(),
            ],
            &conf,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if name == "bootstrap.toml" {
            // It only names the settings file: refused, saying so.
            assert!(!out.status.success(), "{name}");
            assert!(stderr.contains("bootstrap.toml"), "{name}: {stderr}");
            continue;
        }
        assert!(out.status.success(), "{name}: {stderr}");
        // What cannot be carried is said, and the health-check key's fix named.
        assert!(
            stderr.contains("keys create-health-check-key"),
            "{name}: {stderr}"
        );
        let config = out_dir.join("xks-proxy.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        assert!(
            text.contains("[keystores.aws_sample_ciphertexts]"),
            "{name}:\n{text}"
        );
        assert!(
            text.contains("token_label = \"sample-hsm\""),
            "{name}:\n{text}"
        );
        assert!(
            !text.contains(USER_PIN),
            "{name}: the PIN is inline:\n{text}"
        );
        for f in std::fs::read_dir(out_dir.join("secrets")).expect("secrets") {
            let f = f.expect("entry").path();
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&f).expect("meta").permissions(),
            );
            assert_eq!(mode & 0o077, 0, "{}: {mode:o}", f.display());
        }
        // doctor says the same before the fix, naming the one command.
        let doctor = run(
            &["doctor".as_ref(), "--config".as_ref(), config.as_os_str()],
            &conf,
        );
        let report = String::from_utf8_lossy(&doctor.stdout).into_owned();
        assert!(!doctor.status.success(), "{name}: {report}");
        assert!(
            report.contains("keys create-health-check-key"),
            "{name}: {report}"
        );
        let made = run(
            &[
                "keys".as_ref(),
                "create-health-check-key".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            &conf,
        );
        assert!(
            made.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let check = run(
            &[
                "config".as_ref(),
                "check".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            &conf,
        );
        assert!(
            check.status.success(),
            "{name}: config check: {}\n{text}",
            String::from_utf8_lossy(&check.stderr)
        );
        imported += 1;
    }
    assert_eq!(imported, files.len() - 1);
}

/// A proxy serving three tenants from three key managers in one process (issue 14 §3):
/// `/a` on SoftHSM token A, `/b` on token B, `/c` on a software keystore. Both tokens
/// live in one token directory of this test's own (its own `SOFTHSM2_CONF`, so moving
/// token A away disturbs no other test).
struct ThreeTenants {
    dir: tempfile::TempDir,
    /// Token A's own directory inside the token directory.
    token_a: PathBuf,
    proxy: kms_support::procs::Proc,
    client: Client,
    admin: std::net::SocketAddr,
}

/// The three-tenant config; `extra` is appended (more backends and keystores).
fn three_tenant_config(creds: &[Cred], extra: &str) -> String {
    let certs = repo().join("certs");
    let module = module();
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[server.tls]
certificate = "{cert}"
private_key = "{key}"
[admin]
listen = "127.0.0.1:0"
[health]
check_interval_secs = 50

[backends.hsm-a]
kind = "pkcs11"
module = "{module}"
token_label = "three-a"
user_pin_file = "pin"

[backends.hsm-b]
kind = "pkcs11"
module = "{module}"
token_label = "three-b"
user_pin_file = "pin"

[backends.soft]
kind = "software"
keystore = "keystore.json"
master_key_file = "master.key"
"#,
        cert = certs.join("server-ecdsa.pem").display(),
        key = certs.join("server-ecdsa.key").display(),
        module = module.display(),
    );
    for (prefix, backend) in [("/a", "hsm-a"), ("/b", "hsm-b"), ("/c", "soft")] {
        // Each keystore alone on its backend: no key list needed, and the same key id
        // on each backend is three different keys.
        text += &format!(
            "\n[[keystores]]\npath_prefix = \"{prefix}\"\nbackend = \"{backend}\"\n[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret0\"\n",
            creds[0].akid
        );
    }
    text + extra
}

impl ThreeTenants {
    fn serve() -> ThreeTenants {
        let (dir, _, creds) = prepare(&Options::default());
        let (hsm, conf) = token_dir_of_its_own(dir.path(), "three-a");
        let tokens = hsm.join("tokens");
        let before: Vec<_> = std::fs::read_dir(&tokens)
            .expect("tokens")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(before.len(), 1, "token A alone so far");
        let out = std::process::Command::new("bash")
            .arg(repo().join("tests/softhsm/setup.sh"))
            .arg(&hsm)
            .args(["three-b", "12345678", USER_PIN])
            .output()
            .expect("setup.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(dir.path().join("pin"), USER_PIN).expect("pin");
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, three_tenant_config(&creds, "")).expect("config");
        // The same key id on both tokens, made with the operator's command and its
        // --backend choice.
        for backend in ["hsm-a", "hsm-b"] {
            keys_create(&config, &conf, &["--backend", backend]);
        }
        let (proxy, client) = serve_child(&config, &conf, &creds[0]);
        let admin = wait_for_log_addr(&proxy, "metrics listening on http://");
        ThreeTenants {
            dir,
            token_a: before[0].clone(),
            proxy,
            client,
            admin,
        }
    }

    fn url(&self, prefix: &str, tail: &str) -> String {
        format!(
            "https://localhost:{}{prefix}/kms/xks/v1/{tail}",
            self.proxy.addr.port()
        )
    }

    async fn encrypt(&self, prefix: &str) -> Reply {
        let url = self.url(prefix, &format!("keys/{KEY}/encrypt"));
        self.client
            .post(&url, &encrypt_body(b"tenant data", None))
            .await
    }

    /// GetHealthStatus under `prefix`: (ekm id, healthStatus) per fleet entry.
    async fn health(&self, prefix: &str) -> Vec<(String, String)> {
        let r = self
            .client
            .post(&self.url(prefix, "health"), &health_body())
            .await;
        assert_eq!(r.status, 200, "GetHealthStatus answers: {:?}", r.body);
        r.body["ekmFleetDetails"]
            .as_array()
            .expect("fleet")
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or("").to_owned(),
                    e["healthStatus"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Polls GetHealthStatus under `prefix` until every entry reads `want`.
    async fn health_until(&self, prefix: &str, want: &str, bound: Duration) -> bool {
        let until = Instant::now() + bound;
        loop {
            if self.health(prefix).await.iter().all(|(_, s)| s == want) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.client
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Rewrites the config and sends SIGHUP; returns once the proxy logged the outcome
    /// (`configuration reloaded` or `reload refused`) one more time than before.
    async fn reload(&self, text: &str) -> bool {
        std::fs::write(self.dir.path().join("proxy.toml"), text).expect("config");
        let count = |o: &str| {
            o.matches("configuration reloaded").count() + o.matches("reload refused").count()
        };
        let seen = count(&self.proxy.output());
        self.proxy.hup();
        let until = Instant::now() + Duration::from_secs(30);
        while count(&self.proxy.output()) == seen {
            assert!(
                Instant::now() < until,
                "no reload outcome logged:\n{}",
                self.proxy.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let output = self.proxy.output();
        let last_ok = output.rfind("configuration reloaded");
        let last_failed = output.rfind("reload refused");
        last_ok > last_failed
    }
}

/// The address a child logged after `marker` (e.g. its metrics listener).
fn wait_for_log_addr(proxy: &kms_support::procs::Proc, marker: &str) -> std::net::SocketAddr {
    let out = harness::poll(Duration::from_secs(30), || {
        let out = proxy.output();
        out.find(marker)
            .map(|at| out[at + marker.len()..].to_owned())
    })
    .unwrap_or_else(|| panic!("{marker} not logged:\n{}", proxy.output()));
    let end = out.find('/').expect("address ends with a path");
    out[..end].parse().expect("socket address")
}

/// One series' value from Prometheus text: `name{labels…}` with every given label.
fn labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Issue 14 §3, "a backend per path prefix": three tenants on three key managers in
/// one process. Each prefix's GetHealthStatus reports its own key manager only; key ids
/// are per backend (the same id on two tokens is two keys); when token A dies, tenant A
/// is UNAVAILABLE while B and C stay ACTIVE and answering, and `/ping` stays up; metrics
/// and log lines carry the backend name; A recovers in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tenants_on_three_backends_one_token_dies_and_the_others_serve_on() {
    let t = ThreeTenants::serve();
    for prefix in ["/a", "/b", "/c"] {
        assert!(
            t.health_until(prefix, "ACTIVE", Duration::from_secs(30))
                .await,
            "{prefix} starts ACTIVE: {:?}",
            t.health(prefix).await
        );
        let r = t.encrypt(prefix).await;
        assert_eq!(r.status, 200, "{prefix}: {:?}", r.body);
    }
    // Each prefix's fleet is its own key manager: token A's label, token B's, the file.
    let ids = |h: Vec<(String, String)>| h.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let (a, b, c) = (
        t.health("/a").await,
        t.health("/b").await,
        t.health("/c").await,
    );
    assert!(
        ids(a.clone()).iter().all(|id| id.contains("three-a")),
        "{a:?}"
    );
    assert!(
        ids(b.clone()).iter().all(|id| id.contains("three-b")),
        "{b:?}"
    );
    assert!(
        ids(c.clone()).iter().all(|id| id.contains("keystore")),
        "{c:?}"
    );

    // Key ids are per backend: key-1 under /a and key-1 under /b are different keys,
    // so a ciphertext of A's does not open under B.
    let sealed = t.encrypt("/a").await;
    assert_eq!(sealed.status, 200);
    let url = t.url("/b", &format!("keys/{KEY}/decrypt"));
    let r = t.client.post(&url, &decrypt_body(&sealed.body, None)).await;
    assert_eq!(r.error_name(), "InvalidCiphertextException", "{:?}", r.body);
    let url = t.url("/a", &format!("keys/{KEY}/decrypt"));
    let r = t.client.post(&url, &decrypt_body(&sealed.body, None)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Token A goes away under the running proxy.
    let away = t.dir.path().join("token-a-away");
    std::fs::rename(&t.token_a, &away).expect("move token A away");
    let r = t.encrypt("/a").await;
    assert_ne!(r.status, 200, "tenant A fails: {:?}", r.body);
    assert!(
        t.health_until("/a", "UNAVAILABLE", Duration::from_secs(20))
            .await,
        "/a turns UNAVAILABLE: {:?}",
        t.health("/a").await
    );
    // B and C: ACTIVE and answering, while A's recovery keeps trying.
    for _ in 0..10 {
        for prefix in ["/b", "/c"] {
            let r = t.encrypt(prefix).await;
            assert_eq!(r.status, 200, "{prefix} serves on: {:?}", r.body);
            assert!(
                t.health(prefix).await.iter().all(|(_, s)| s == "ACTIVE"),
                "{prefix}: {:?}",
                t.health(prefix).await
            );
        }
    }
    let ping = t
        .client
        .http
        .get(format!("https://localhost:{}/ping", t.proxy.addr.port()))
        .send()
        .await
        .expect("ping");
    assert_eq!(ping.status(), 200, "/ping: some tenants are served");
    let m = t.metrics().await;
    let status = |backend: &str, state: &str| {
        labelled(
            &m,
            "xks_ekm_health_status",
            &[("backend", backend), ("status", state)],
        )
    };
    assert_eq!(status("hsm-a", "UNAVAILABLE"), Some(1.0), "{m}");
    assert_eq!(status("hsm-b", "ACTIVE"), Some(1.0), "{m}");
    assert_eq!(status("soft", "ACTIVE"), Some(1.0), "{m}");
    assert!(
        labelled(
            &m,
            "xks_backend_call_duration_seconds_count",
            &[("backend", "hsm-b")]
        )
        .is_some_and(|n| n >= 10.0),
        "{m}"
    );
    let log = t.proxy.output();
    assert!(
        log.lines()
            .any(|l| l.contains("prefix=\"/b\" backend=\"hsm-b\" operation=\"Encrypt\"")),
        "the request log line names the backend: {log}"
    );

    // Token A returns: tenant A serves again, same process.
    std::fs::rename(&away, &t.token_a).expect("move token A back");
    let until = Instant::now() + Duration::from_secs(30);
    while t.encrypt("/a").await.status != 200 {
        assert!(
            Instant::now() < until,
            "A never recovered:\n{}",
            t.proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t.health_until("/a", "ACTIVE", Duration::from_secs(20))
            .await
    );
}

/// Issue 17 §1: a reload is all or nothing across backends. hsm-a's new disabled-key
/// list is valid and the software keystore of `soft` is unreadable: the reload is
/// refused, and hsm-a must not have applied its part (before the reload became
/// two-phase, each backend that stays committed in turn, and hsm-a — first by name —
/// disabled the key although the reload as a whole failed). With the keystore back,
/// the same file applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_one_backend_refuses_applies_nothing_to_the_others() {
    let t = ThreeTenants::serve();
    assert_eq!(t.encrypt("/a").await.status, 200);
    let creds = [Cred {
        akid: t.client.cred.akid.clone(),
        secret: t.client.cred.secret.clone(),
    }];
    let text = three_tenant_config(&creds, "");
    let pin_line = "user_pin_file = \"pin\"\n";
    let at = text.find(pin_line).expect("hsm-a's PIN line") + pin_line.len();
    let disabling = format!(
        "{}disabled_keys = [\"{KEY}\"]\n{}",
        &text[..at],
        &text[at..]
    );
    assert!(
        disabling.find("disabled_keys") < disabling.find("[backends.hsm-b]"),
        "the list is hsm-a's"
    );
    let keystore = t.dir.path().join("keystore.json");
    let saved = std::fs::read(&keystore).expect("keystore");
    std::fs::write(&keystore, b"{ not a keystore").expect("corrupt");
    let applied = t.reload(&disabling).await;
    std::fs::write(&keystore, &saved).expect("restore");
    assert!(
        !applied,
        "soft cannot read its keystore: the reload is refused"
    );
    assert!(
        t.proxy
            .output()
            .contains("backend 'soft' refused the reload"),
        "{}",
        t.proxy.output()
    );
    let r = t.encrypt("/a").await;
    assert_eq!(
        r.status, 200,
        "hsm-a applied nothing of a refused reload: {:?}",
        r.body
    );
    assert_eq!(
        t.encrypt("/c").await.status,
        200,
        "soft serves its old keys"
    );
    // The same file, now that every backend can read its part: it applies.
    assert!(t.reload(&disabling).await, "{}", t.proxy.output());
    let r = t.encrypt("/a").await;
    assert_eq!((r.status, r.error_name()), (400, "InvalidStateException"));
    assert_eq!(
        t.encrypt("/b").await.status,
        200,
        "hsm-b's key is another key"
    );
}

/// Issue 14 §3, reload: backends are added, removed and re-pointed without a restart,
/// all or nothing; a backend whose module cannot be loaded fails the reload and
/// nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_removes_and_repoints_backends_all_or_nothing() {
    let t = ThreeTenants::serve();
    for prefix in ["/a", "/b", "/c"] {
        assert_eq!(t.encrypt(prefix).await.status, 200, "{prefix}");
    }
    let creds = [Cred {
        akid: t.client.cred.akid.clone(),
        secret: t.client.cred.secret.clone(),
    }];
    // A second software keystore, with key-1 of its own.
    let dir2 = t.dir.path().join("second");
    std::fs::create_dir(&dir2).expect("dir");
    write_keystore(&dir2);
    let soft2 = format!(
        "\n[backends.soft2]\nkind = \"software\"\nkeystore = \"second/keystore.json\"\nmaster_key_file = \"second/master.key\"\n\
         [[keystores]]\npath_prefix = \"/d\"\nbackend = \"soft2\"\n[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret0\"\n",
        creds[0].akid
    );
    // Add soft2 (for /d) and remove hsm-b (with /b).
    let without_b = |text: String| {
        let start = text.find("[backends.hsm-b]").expect("hsm-b");
        let end = text[start..].find("\n\n").map(|e| start + e).expect("end");
        let text = format!("{}{}", &text[..start], &text[end..]);
        let ks = text
            .find("\n[[keystores]]\npath_prefix = \"/b\"")
            .expect("/b");
        let ks_end = text[ks + 1..]
            .find("\n[[keystores]]")
            .map(|e| ks + 1 + e)
            .expect("next");
        format!("{}{}", &text[..ks], &text[ks_end..])
    };
    let added = without_b(three_tenant_config(&creds, &soft2));
    assert!(
        t.reload(&added).await,
        "reload refused:\n{}",
        t.proxy.output()
    );
    let r = t.encrypt("/d").await;
    assert_eq!(r.status, 200, "the new backend serves: {:?}", r.body);
    assert_eq!(
        t.encrypt("/b").await.status,
        404,
        "the removed prefix is gone"
    );
    for prefix in ["/a", "/c"] {
        assert_eq!(t.encrypt(prefix).await.status, 200, "{prefix} untouched");
    }
    assert!(
        t.proxy.output().contains("backend added"),
        "{}",
        t.proxy.output()
    );
    let m = t.metrics().await;
    assert_eq!(
        labelled(
            &m,
            "xks_ekm_health_status",
            &[("backend", "hsm-b"), ("status", "ACTIVE")]
        ),
        Some(0.0),
        "a removed backend's health series cannot hold an alert: {m}"
    );

    // A backend whose module cannot be loaded: the reload fails, nothing changes.
    let not_a_module = t.dir.path().join("not-a-module.so");
    std::fs::write(&not_a_module, b"not a shared library").expect("write");
    let broken = added.clone()
        + &format!(
            "\n[backends.broken]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"x\"\nuser_pin_file = \"pin\"\n\
             [[keystores]]\npath_prefix = \"/e\"\nbackend = \"broken\"\n[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret0\"\n",
            not_a_module.display(),
            creds[0].akid
        );
    // Also drop /d in the same file: if anything were applied, /d would go.
    let broken = broken.replace("path_prefix = \"/d\"", "path_prefix = \"/d2\"");
    assert!(
        !t.reload(&broken).await,
        "a backend that cannot load fails the reload"
    );
    assert!(
        t.proxy.output().contains("cannot open backend 'broken'"),
        "{}",
        t.proxy.output()
    );
    assert_eq!(
        t.encrypt("/d").await.status,
        200,
        "nothing changed: /d still served"
    );
    assert_eq!(t.encrypt("/e").await.status, 404, "nothing changed: no /e");
    let m = t.metrics().await;
    assert_eq!(
        labelled(&m, "xks_reloads_total", &[("outcome", "failed")]),
        Some(1.0),
        "{m}"
    );

    // Re-point soft2 at another keystore file: a new key manager, new key material.
    let sealed = t.encrypt("/d").await;
    let dir3 = t.dir.path().join("third");
    std::fs::create_dir(&dir3).expect("dir");
    write_keystore(&dir3);
    let repointed = added.replace("second/", "third/");
    assert!(t.reload(&repointed).await, "{}", t.proxy.output());
    assert!(
        t.proxy.output().contains("backend re-pointed"),
        "{}",
        t.proxy.output()
    );
    let url = t.url("/d", &format!("keys/{KEY}/decrypt"));
    let r = t.client.post(&url, &decrypt_body(&sealed.body, None)).await;
    assert_eq!(
        r.error_name(),
        "InvalidCiphertextException",
        "/d now uses the third keystore's key-1: {:?}",
        r.body
    );
    assert_eq!(t.encrypt("/d").await.status, 200);
}
