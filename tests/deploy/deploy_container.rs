//! The container image's parts that can run without a container engine (none runs
//! here): the softhsm-demo image's entrypoint, run on this host exactly as the image
//! runs it (same script, same config template), with its paths pointed into a temp dir.
//! It must initialise a SoftHSM token, create the demo key, pick credentials, serve
//! Encrypt/Decrypt and /ping, stop cleanly on SIGTERM, and reuse all of it on restart.
//! (The Dockerfile itself is linted in deploy_lint.rs with hadolint.)
//! The demo serves from a SoftHSM token: it needs the (default) `pkcs11` feature.
#![cfg(feature = "pkcs11")]

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::*;

const HOST: &str = "localhost";

struct Demo {
    proc: Guard,
    akid: String,
    secret: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn start_demo(dir: &Path, port: u16, ping: u16) -> Demo {
    let certs = repo().join("certs");
    let mut child = Command::new("bash")
        .arg(deploy().join("container/softhsm-demo-entrypoint.sh"))
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .env("XKS_DEMO_STATE_DIR", dir.join("state"))
        .env(
            "XKS_DEMO_TEMPLATE",
            deploy().join("container/softhsm-demo.toml"),
        )
        .env("XKS_DEMO_TLS_CERT", certs.join("server-ecdsa.pem"))
        .env("XKS_DEMO_TLS_KEY", certs.join("server-ecdsa.key"))
        .env("XKS_DEMO_LISTEN", format!("127.0.0.1:{port}"))
        .env("XKS_DEMO_PING", format!("127.0.0.1:{ping}"))
        .env("XKS_PROXY_BIN", env!("CARGO_BIN_EXE_xks-proxy"))
        .env_remove("XKS_HSM_PIN")
        .env_remove("XKS_SECRET")
        .env_remove("XKS_ACCESS_KEY_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the entrypoint");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("lock").push(l);
        }
    });
    let mut proc = Guard(child);
    let addr = format!("127.0.0.1:{ping}");
    wait_for(Duration::from_secs(60), "the demo's /ping", || {
        if let Ok(Some(s)) = proc.0.try_wait() {
            panic!(
                "entrypoint exited: {s}\n{}",
                lines.lock().expect("lock").join("\n")
            );
        }
        (http_get(&addr, "/ping").map(|r| r.0) == Some(200)).then_some(())
    });
    let field = |name: &str| -> String {
        let all = lines.lock().expect("lock");
        all.iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("banner lacks {name}:\n{}", all.join("\n")))
    };
    let akid = field("AccessKeyId");
    let secret = field("RawSecretAccessKey");
    Demo {
        proc,
        akid,
        secret,
        stderr: lines,
    }
}

async fn encrypt_decrypt(port: u16, akid: &str, secret: &str) {
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let meta = |op: &str| {
        json!({"kmsRequestId": format!("demo-{op}"), "kmsOperation": op,
               "awsPrincipalArn": "arn:aws:iam::111122223333:role/demo",
               "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/demo"})
    };
    let base = "/demo/kms/xks/v1/keys/demo-key-1";
    let (status, enc) = signed_post(
        addr,
        HOST,
        &format!("{base}/encrypt"),
        &json!({"requestMetadata": meta("Encrypt"), "plaintext": "aGVsbG8gZGVtbw==",
                "encryptionAlgorithm": "AES_GCM"}),
        akid,
        secret,
    )
    .await;
    assert_eq!(status, 200, "{enc}");
    let mut dec = json!({"requestMetadata": meta("Decrypt"), "encryptionAlgorithm": "AES_GCM"});
    for f in [
        "ciphertext",
        "initializationVector",
        "authenticationTag",
        "ciphertextMetadata",
    ] {
        if !enc[f].is_null() {
            dec[f] = enc[f].clone();
        }
    }
    let (status, out) =
        signed_post(addr, HOST, &format!("{base}/decrypt"), &dec, akid, secret).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["plaintext"], "aGVsbG8gZGVtbw==");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softhsm_demo_entrypoint_serves_and_keeps_its_token() {
    require_tool("softhsm2-util");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("tokens")).expect("tokens");
    std::fs::write(
        dir.join("softhsm2.conf"),
        // The image's softhsm2.conf with the token directory moved here.
        std::fs::read_to_string(deploy().join("container/softhsm2.conf"))
            .expect("softhsm2.conf")
            .replace(
                "/var/lib/softhsm/tokens",
                &dir.join("tokens").display().to_string(),
            ),
    )
    .expect("conf");
    let (port, ping) = (free_port("127.0.0.1"), free_port("127.0.0.1"));

    let mut first = start_demo(dir, port, ping);
    assert_eq!(first.akid.len(), 20, "{}", first.akid);
    assert!(
        first
            .akid
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
    );
    assert!((43..=64).contains(&first.secret.len()), "secret length");
    encrypt_decrypt(port, &first.akid, &first.secret).await;
    // The entrypoint execs the proxy: SIGTERM reaches it, it drains and exits 0.
    first.proc.signal("-TERM");
    let status = tokio::task::block_in_place(|| first.proc.wait_exit(Duration::from_secs(20)))
        .expect("demo stops on SIGTERM");
    assert!(status.success(), "{status}");
    let log = first.stderr.lock().expect("lock").join("\n");
    assert!(
        log.contains("initialising token xks-demo") && log.contains("created key demo-key-1"),
        "{log}"
    );

    // Restart: same token, key and credentials; nothing re-created.
    let mut second = start_demo(dir, port, ping);
    assert_eq!(second.akid, first.akid);
    assert_eq!(second.secret, first.secret);
    encrypt_decrypt(port, &second.akid, &second.secret).await;
    second.proc.signal("-TERM");
    let status = tokio::task::block_in_place(|| second.proc.wait_exit(Duration::from_secs(20)))
        .expect("demo stops on SIGTERM");
    assert!(status.success(), "{status}");
    let log = second.stderr.lock().expect("lock").join("\n");
    assert!(
        !log.contains("initialising token") && !log.contains("created key"),
        "{log}"
    );
}
