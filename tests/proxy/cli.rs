//! The `xks-proxy` binary as an operator uses it: help, config errors before binding,
//! the demo quick start (its printed curl lines must work), key commands, signals.

use crate::common;
use crate::harness;
use crate::kms_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kms_support::procs::Proc;
use kms_support::readme;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
}

fn signal(child: &Child, sig: &str) {
    assert!(harness::signal(child.id(), sig));
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    harness::wait_exit(child, within).expect("process did not exit in time")
}

#[test]
fn help_documents_the_subcommands() {
    let out = bin().arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "demo", "config", "keys"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let out = bin().args(["keys", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "create",
        "list",
        "enable",
        "disable",
        "rotate",
        "generate-master-key",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from keys --help");
    }
}

#[test]
fn a_bad_config_exits_non_zero_before_binding_and_names_the_key() {
    let (dir, text, _) = prepare(&Options::default());
    // Hold a port, then point a broken config at it: if serve bound before validating,
    // it would fail differently (address in use) or succeed.
    let bad = text.replace("path_prefix = \"/tenant-a\"", "path_prefix = \"tenant-a/\"");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).expect("write");
    let out = bin()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keystores[0].path_prefix"), "{err}");
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_demo_quick_start_prints_curl_lines_that_work() {
    let curl_ok = Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(curl_ok, "curl is required (the test command installs it)");
    let mut child = bin()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in lines.by_ref() {
        let line = line.expect("line");
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Stop with Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    for needle in [
        "base URL",
        "path prefix",
        "access key id",
        "secret",
        "curl --aws-sigv4 \"aws:amz:us-east-1:kms-xks-proxy\"",
    ] {
        assert!(banner.contains(needle), "banner lacks {needle}:\n{banner}");
    }
    // Each printed curl command, run as printed (continuations joined), must succeed.
    let commands: Vec<String> = banner
        .split("\n\n")
        .filter_map(|block| {
            block
                .find("  curl ")
                .map(|i| block[i..].replace("\\\n", " "))
        })
        .collect();
    assert_eq!(commands.len(), 2, "{banner}");
    let dir = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("dev CA"))
        .map(|s| {
            std::path::PathBuf::from(s.trim())
                .parent()
                .expect("dir")
                .to_path_buf()
        })
        .expect("dev CA line");
    for (cmd, expect) in commands
        .iter()
        .zip(["ekmFleetDetails", "ciphertextDataIntegrityValue"])
    {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{cmd} -sS --fail-with-body"))
            .output()
            .expect("bash");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(expect),
            "{cmd}\n=> {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    assert!(!dir.exists(), "the demo removes its temp dir on exit");
}

#[test]
fn keys_commands_manage_the_software_keystore() {
    let out = bin()
        .args(["keys", "generate-master-key"])
        .output()
        .expect("run");
    let master = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(master.trim().len(), 44, "Base64 of 32 bytes");
    let (dir, _text, _) = prepare(&Options::default());
    let cfg = dir.path().join("proxy.toml");
    let run = |args: &[&str]| {
        let out = bin()
            .args(["keys"])
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&["create", "--label", "new-key", "--usage", "encrypt,decrypt"]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["create", "--label", "new-key"]);
    assert!(!ok, "duplicate ids are refused: {text}");
    let (ok, text) = run(&["create", "--label", "bad id!"]);
    assert!(!ok, "{text}");
    let (ok, text) = run(&["disable", "--label", "new-key"]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["list"]);
    assert!(
        ok && text.contains("new-key") && text.contains("DISABLED"),
        "{text}"
    );
    let (ok, text) = run(&["enable", "--label", "new-key"]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["rotate", "--label", "new-key"]);
    assert!(ok && text.contains("version 2"), "{text}");
    // Issue 6 spells it `keys rotate <id>`: the id may also come positionally.
    let (ok, text) = run(&["rotate", "new-key"]);
    assert!(ok && text.contains("version 3"), "{text}");
    let (ok, text) = run(&["rotate"]);
    assert!(!ok, "a key id is required: {text}");
    // A wrong master key is a clear error, and the file is untouched.
    let before = std::fs::read(dir.path().join("keystore.json")).expect("read");
    std::fs::write(dir.path().join("master.key"), master.trim()).expect("write");
    let (ok, text) = run(&["create", "--label", "other"]);
    assert!(!ok, "{text}");
    assert!(text.to_lowercase().contains("master key"), "{text}");
    assert_eq!(
        before,
        std::fs::read(dir.path().join("keystore.json")).expect("read")
    );
}

/// Starts `xks-proxy serve` (killed when dropped), with the address it announced.
fn serve(config: &std::path::Path) -> Proc {
    let mut cmd = bin();
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info");
    Proc::spawn(cmd, "listening on https://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup_and_exits_0_on_sigterm() {
    let (dir, _text, creds) = prepare(&Options::default());
    let mut proxy = serve(&dir.path().join("proxy.toml"));
    let addr = proxy.addr;
    let c = Client::new(addr, false, creds[0].clone());
    let url = format!(
        "https://localhost:{}{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt",
        addr.port()
    );
    assert_eq!(c.post(&url, &encrypt_body(b"x", None)).await.status, 200);
    // Disable the key with the CLI, SIGHUP, and the running proxy refuses it.
    let out = bin()
        .args(["keys", "disable", "--label", KEY, "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("disable");
    assert!(out.status.success());
    // The same reload brings a log level a running process cannot change (issue 12:
    // "make the level reloadable or warn that it is not"): it says so, naming it.
    let config = dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text + "\n[logging]\nlevel = \"debug\"\n").expect("write");
    signal(&proxy.child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.post(&url, &encrypt_body(b"x", None)).await;
        if r.error_name() == "InvalidStateException" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Logged as the reload ends, and read from the pipe by another thread: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let warned = loop {
        let log = proxy.output();
        if let Some(l) = log.lines().find(|l| l.contains("needs a restart")) {
            break l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no needs-a-restart warning:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        warned.contains("logging.level") && warned.contains("WARN"),
        "{warned}"
    );
    signal(&proxy.child, "-TERM");
    let status =
        tokio::task::block_in_place(|| wait_exit(&mut proxy.child, Duration::from_secs(15)));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_file_watch_a_changed_config_or_secret_file_reloads_without_a_signal() {
    // Issue 6: "SIGHUP (and, if configured, a change of the config or credential
    // files) reloads ...". No signal is sent here.
    let (dir, text, creds) = prepare(&Options::default());
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("{text}\n[reload]\nwatch_interval_secs = 1\n"),
    )
    .expect("write");
    let mut proxy = serve(&config);
    let addr = proxy.addr;
    let health = format!(
        "https://localhost:{}{PREFIX}/kms/xks/v1/health",
        addr.port()
    );
    let c0 = Client::new(addr, false, creds[0].clone());
    let c1 = Client::new(addr, false, creds[1].clone());
    assert_eq!(c0.post(&health, &health_body()).await.status, 200);
    assert_eq!(c1.post(&health, &health_body()).await.status, 200);
    let wait_for = |c: Client, want: u16, what: &'static str| {
        let health = health.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = c.post(&health, &health_body()).await.status;
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "{what}: still {got}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // 1. The config file changes: credential 0 is removed.
    let block = format!(
        "[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret0\"\n",
        creds[0].akid
    );
    let current = std::fs::read_to_string(&config).expect("read");
    assert!(current.contains(&block));
    std::fs::write(&config, current.replace(&block, "")).expect("write");
    wait_for(c0, 401, "removed credential still accepted").await;
    assert_eq!(c1.post(&health, &health_body()).await.status, 200);

    // 2. Only a secret file changes: credential 1 gets a new secret.
    let (_, new_secret) = xks_proxy::config::generate_credential();
    std::fs::write(dir.path().join("secret1"), new_secret.expose()).expect("write");
    let c1_new = Client::new(
        addr,
        false,
        Cred {
            akid: creds[1].akid.clone(),
            secret: new_secret,
        },
    );
    wait_for(c1_new, 200, "new secret not picked up").await;
    assert_eq!(
        c1.post(&health, &health_body()).await.status,
        401,
        "old secret gone"
    );

    // 3. The config arrives before its new secret file (Kubernetes adds a new key's
    // link after the `..data` swap): that reload is refused; the file's arrival, in a
    // directory being watched, must bring the next one — nothing else changes after it.
    let (akid2, secret2) = xks_proxy::config::generate_credential();
    let current = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        current.replacen(
            "[[keystores.credentials]]",
            &format!(
                "[[keystores.credentials]]\naccess_key_id = \"{akid2}\"\nsecret_file = \"secret2\"\n\n[[keystores.credentials]]"
            ),
            1,
        ),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.output().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refused reload:\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(dir.path().join("secret2"), secret2.expose()).expect("write");
    let c2 = Client::new(
        addr,
        false,
        Cred {
            akid: akid2,
            secret: secret2,
        },
    );
    wait_for(
        c2,
        200,
        "a secret file that arrived after its config is never read",
    )
    .await;

    signal(&proxy.child, "-TERM");
    let status =
        tokio::task::block_in_place(|| wait_exit(&mut proxy.child, Duration::from_secs(15)));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_request() {
    let (dir, text, creds) = prepare(&Options::default());
    let text = text + "\n[logging]\nformat = \"json\"\n";
    std::fs::write(dir.path().join("proxy.toml"), text).expect("write");
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let msg = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a log line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("every line is JSON");
        let m = v["message"].as_str().expect("message").to_owned();
        if m.contains("listening on https://") {
            break m;
        }
    };
    let addr: std::net::SocketAddr = msg
        .split("https://")
        .nth(1)
        .expect("addr")
        .parse()
        .expect("addr");
    let c = Client::new(addr, false, creds[0].clone());
    let url = format!(
        "https://localhost:{}{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt",
        addr.port()
    );
    let mut body = encrypt_body(b"x", None);
    body["requestMetadata"]["kmsRequestId"] = serde_json::json!("json-log-test-1");
    assert_eq!(c.post(&url, &body).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("request line");
        if l.contains("json-log-test-1") {
            break l;
        }
        assert!(Instant::now() < deadline);
    };
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["kms_request_id"], "json-log-test-1");
    assert_eq!(v["kms_operation"], "Encrypt");
    assert_eq!(v["principal"], PRINCIPAL);
    assert_eq!(v["prefix"], PREFIX);
    assert_eq!(v["key_id"], KEY);
    assert_eq!(v["outcome"], "ok");
    assert!(v["elapsed_us"].as_u64().is_some());
    signal(&child, "-TERM");
    let status = tokio::task::block_in_place(|| wait_exit(&mut child, Duration::from_secs(15)));
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_tenants_that_name_no_keys_is_refused_and_changes_nothing() {
    // Issue 10 §3: with two keystores each must name its keys. A SIGHUP with a config
    // that adds /b without assignment (and drops credential 0) changes nothing.
    let (dir, text, creds) = prepare(&Options::default());
    let config = dir.path().join("proxy.toml");
    let mut proxy = serve(&config);
    let port = proxy.addr.port();
    let url =
        |prefix: &str, tail: &str| format!("https://localhost:{port}{prefix}/kms/xks/v1/{tail}");
    let encrypt = url(PREFIX, &format!("keys/{KEY}/encrypt"));
    let c0 = Client::new(proxy.addr, false, creds[0].clone());
    let c1 = Client::new(proxy.addr, false, creds[1].clone());
    assert_eq!(
        c0.post(&encrypt, &encrypt_body(b"x", None)).await.status,
        200
    );

    let (b_akid, b_secret) = xks_proxy::config::generate_credential();
    std::fs::write(dir.path().join("secret-b"), b_secret.expose()).expect("write");
    let as_b = c0.with_cred(Cred {
        akid: b_akid.clone(),
        secret: b_secret,
    });
    let cred0 = format!(
        "[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret0\"\n",
        creds[0].akid
    );
    assert!(text.contains(&cred0));
    let bad = text.replace(&cred0, "")
        + &format!(
            "\n[[keystores]]\npath_prefix = \"/b\"\n[[keystores.credentials]]\naccess_key_id = \"{b_akid}\"\nsecret_file = \"secret-b\"\n"
        );
    std::fs::write(&config, &bad).expect("write");
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needle in [
        "keystores[0].allowed_keys",
        "path_prefix = \"/tenant-a\"",
        "allowed_keys = [\"",
        "shared_keys",
    ] {
        assert!(err.contains(needle), "{needle} missing: {err}");
    }

    proxy.hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.output().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.output().contains("keystores[0].allowed_keys"),
        "{}",
        proxy.output()
    );
    assert_eq!(
        c0.post(&encrypt, &encrypt_body(b"x", None)).await.status,
        200,
        "credential 0 is still live"
    );
    let r = as_b.post(&url("/b", "health"), &health_body()).await;
    assert_eq!(
        (r.status, r.error_name()),
        (404, "InvalidUriPathException"),
        "/b was not added"
    );

    // The same change with each keystore naming its keys is applied.
    let good = bad
        .replace(
            &format!("path_prefix = \"{PREFIX}\"\n"),
            &format!("path_prefix = \"{PREFIX}\"\nallowed_keys = [\"{KEY}\"]\n"),
        )
        .replace(
            "path_prefix = \"/b\"\n",
            &format!("path_prefix = \"/b\"\nallowed_keys = [\"{KEY_ENCRYPT_ONLY}\"]\n"),
        );
    std::fs::write(&config, &good).expect("write");
    proxy.hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while as_b.post(&url("/b", "health"), &health_body()).await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = as_b
        .post(
            &url("/b", &format!("keys/{KEY}/encrypt")),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!((r.status, r.error_name()), (404, "KeyNotFoundException"));
    assert_eq!(
        c1.post(&encrypt, &encrypt_body(b"x", None)).await.status,
        200
    );
    assert_eq!(
        c0.post(&encrypt, &encrypt_body(b"x", None)).await.status,
        401
    );
    signal(&proxy.child, "-TERM");
    let status =
        tokio::task::block_in_place(|| wait_exit(&mut proxy.child, Duration::from_secs(15)));
    assert!(status.success(), "{status}");
}

#[test]
fn keys_create_notes_a_key_no_keystore_serves() {
    let (dir, _text, _) = prepare(&Options {
        allowed_keys: Some(vec![KEY.into()]),
        ..Options::default()
    });
    let out = bin()
        .args(["keys", "create", "--label", "unassigned", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no [[keystores]] serves unassigned"), "{err}");
    assert!(err.contains("allowed_keys"), "{err}");
    // A single keystore without a list serves every key: nothing to note.
    let (dir, _text, _) = prepare(&Options::default());
    let out = bin()
        .args(["keys", "create", "--label", "served", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("no [[keystores]]"));
}

/// Issue 12, "checks that tell the truth": `config check` printed OK while `serve`
/// then failed. For each of those configs, both now fail, and `config check` names the
/// config key (the systemd unit runs it as ExecStartPre).
#[test]
fn config_check_fails_wherever_serve_would_and_names_the_key() {
    let (dir, text, _) = prepare(&Options::default());
    let cases = [
        (
            "master key env var unset",
            text.replace(
                "master_key_file = \"master.key\"",
                "master_key_env = \"XKS_TEST_MASTER_KEY_NEVER_SET\"",
            ),
            "backend.master_key_env",
        ),
        (
            "certificate file missing",
            text.replace("server-ecdsa.pem", "no-such-cert.pem"),
            "server.tls.certificate",
        ),
        (
            "certificate and key do not match",
            text.replace("server-ecdsa.key", "server-rsa.key"),
            "server.tls",
        ),
        (
            "keystore directory missing",
            text.replace(
                "keystore = \"keystore.json\"",
                "keystore = \"gone/keystore.json\"",
            ),
            "backend.keystore",
        ),
    ];
    for (what, bad, key) in cases {
        assert_ne!(bad, text, "{what}: the replacement applied");
        let path = dir.path().join("case.toml");
        std::fs::write(&path, &bad).expect("write");
        let check = bin()
            .args(["config", "check", "--config"])
            .arg(&path)
            .env_remove("XKS_TEST_MASTER_KEY_NEVER_SET")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{what}: {err}");
        assert!(
            !String::from_utf8_lossy(&check.stdout).contains("OK"),
            "{what}"
        );
        // And serve agrees: it fails too (before binding anything).
        let serve = bin()
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("XKS_TEST_MASTER_KEY_NEVER_SET")
            .output()
            .expect("run");
        assert!(!serve.status.success(), "{what}: serve started");
    }
}

/// Issue 12: key admin commands read only the `[backend]` table; a SigV4 secret that
/// is not available in the operator's shell must not stop `keys create` / `keys list`.
#[test]
fn key_admin_commands_need_no_sigv4_secret() {
    let (dir, text, _) = prepare(&Options::default());
    let text = text.replace(
        "secret_file = \"secret0\"",
        "secret_env = \"XKS_TEST_SIGV4_SECRET_NEVER_SET\"",
    );
    let path = dir.path().join("admin.toml");
    std::fs::write(&path, &text).expect("write");
    let check = bin()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(check.status.code(), Some(2), "serving needs the secret");
    for args in [
        &["keys", "create", "admin-made"][..],
        &["keys", "list"][..],
        &["keys", "disable", "admin-made"][..],
    ] {
        let out = bin()
            .args(args)
            .arg("--config")
            .arg(&path)
            .env_remove("XKS_TEST_SIGV4_SECRET_NEVER_SET")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args[1] == "list" {
            assert!(String::from_utf8_lossy(&out.stdout).contains("admin-made"));
        }
    }
}

/// Issue 12: the key commands that exist only for the software keystore say so in
/// their help, and on a PKCS#11 config they fail with what to do instead (the
/// troubleshooting table's fix per backend), without touching the token.
#[cfg(feature = "pkcs11")]
#[test]
fn software_only_key_commands_say_what_to_do_on_pkcs11() {
    for cmd in ["rotate", "enable", "disable"] {
        let help = bin().args(["keys", cmd, "--help"]).output().expect("run");
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("software keystore"), "{cmd}: {help}");
        assert!(
            !help.contains("CKA_LABEL"),
            "{cmd} does not act on PKCS#11: {help}"
        );
    }
    let config = repo().join("config/softhsm.toml");
    for (cmd, says) in [
        ("rotate", "create a new key"),
        ("enable", "remove \"app-key-1\" from backend.disabled_keys"),
        ("disable", "add \"app-key-1\" to backend.disabled_keys"),
    ] {
        let out = bin()
            .args(["keys", cmd, "--config"])
            .arg(&config)
            .arg("app-key-1")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains(says), "{cmd}: {err}");
    }
    // The troubleshooting table gives the fix per backend too.
    let runbook = std::fs::read_to_string(repo().join("deploy/README.md")).expect("runbook");
    let row = runbook
        .lines()
        .find(|l| l.starts_with("| `XksKeyInvalidConfigurationException`"))
        .expect("troubleshooting row");
    assert!(
        row.contains("keys enable") && row.contains("backend.disabled_keys"),
        "{row}"
    );
}

/// Issue 12: README "Running it for real", pasted as written into a scratch directory
/// holding only `server.pem` and `server.key`, makes a keystore, a key and a
/// credential, passes `config check` (which says which secrets rotate with a reload),
/// prints the KMS import file, and serves requests signed with that file's credential.
/// The one substitution: the listen address becomes loopback with a free port (tests
/// never bind a public interface).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_running_it_for_real_block_works_as_written() {
    let block = readme::sh_block("## Running it for real", 0);
    assert!(
        block
            .trim_end()
            .ends_with("xks-proxy serve --config proxy.toml")
    );
    let script = readme::substitute(
        &block,
        "listen = \"0.0.0.0:8443\"",
        "listen = \"127.0.0.1:0\"",
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let certs = repo().join("certs");
    std::fs::copy(
        certs.join("server-ecdsa.pem"),
        dir.path().join("server.pem"),
    )
    .expect("cert");
    std::fs::copy(
        certs.join("server-ecdsa.key"),
        dir.path().join("server.key"),
    )
    .expect("key");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .parent()
        .expect("bin dir");
    let mut cmd = readme::bash(&script, dir.path(), &[bin_dir.to_path_buf()]);
    cmd.env("RUST_LOG", "info");
    let proxy = Proc::spawn(cmd, "listening on https://");
    let _group = readme::Group(proxy.pid());

    // config check said OK and which secrets rotate with a reload.
    let log = proxy.output();
    assert!(log.contains("proxy.toml: OK"), "{log}");
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} line in:\n{log}"))
            .to_owned()
    };
    assert!(
        line("kms.secret").contains("rotates with a reload"),
        "{log}"
    );
    assert!(
        line("backend.master_key_file").contains("needs a restart"),
        "{log}"
    );
    assert!(
        line("server.tls.private_key").contains("rotates with a reload"),
        "{log}"
    );
    // Secrets were made owner-only.
    for f in ["master.key", "kms.secret", "kms-import.json"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(f))
                .expect(f)
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }

    // The import file's credential is what KMS would sign with; the key is served.
    let import: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("kms-import.json")).expect("kms-import.json"),
    )
    .expect("json");
    assert_eq!(import["XksProxyUriPath"], "/example/kms/xks/v1");
    let cred = Cred {
        akid: import["XksProxyAuthenticationCredential"]["AccessKeyId"]
            .as_str()
            .expect("akid")
            .to_owned(),
        secret: xks_proxy::secret::SecretString::new(
            import["XksProxyAuthenticationCredential"]["RawSecretAccessKey"]
                .as_str()
                .expect("secret")
                .to_owned(),
        ),
    };
    let c = Client::new(proxy.addr, false, cred);
    let url = format!(
        "https://localhost:{}/example/kms/xks/v1/keys/app-key-1/encrypt",
        proxy.addr.port()
    );
    let r = c
        .post(&url, &encrypt_body(b"running it for real", None))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Issue 12: every option the operator CLI takes appears in the README's "Operator CLI"
/// table (`--kms-ca-bundle` was missing), so the table is the whole interface.
#[test]
fn the_readme_cli_table_names_every_option() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let table = &readme[readme.find("### Operator CLI").expect("section")..];
    let table = &table[..table[4..].find("\n#").map_or(table.len(), |i| i + 4)];
    let commands: &[&[&str]] = &[
        &["serve"],
        &["demo"],
        &["config", "check"],
        &["doctor"],
        &["credentials", "new"],
        &["kms-config"],
        &["keys", "create"],
        &["keys", "list"],
        &["keys", "enable"],
        &["keys", "disable"],
        &["keys", "rotate"],
        &["keys", "generate-master-key"],
        &["keys", "create-health-check-key"],
        &["config", "import-aws-sample"],
        &["audit", "verify"],
        &["audit", "show"],
    ];
    let mut missing = Vec::new();
    for args in commands {
        let out = bin().args(*args).arg("--help").output().expect("help");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{args:?} --help");
        for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
            let Some(name) = word.strip_prefix("--") else {
                continue;
            };
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if name.is_empty() || name == "help" || name == "version" {
                continue;
            }
            if !table.contains(&format!("--{name}")) {
                missing.push(format!("{} --{name}", args.join(" ")));
            }
        }
    }
    missing.dedup();
    assert!(
        missing.is_empty(),
        "not in the README's Operator CLI table: {missing:?}"
    );
}
