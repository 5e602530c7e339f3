//! Issue 16 §2, the audit trail, end to end: records of real requests (and of nothing
//! else, and never a plaintext, AAD or secret), `audit verify` / `audit show` on them,
//! a `kill -9` of a child `xks-proxy serve` while requests are in flight, and a full
//! disk (a file size limit on the child, `prlimit --fsize`) under both `on_failure`
//! choices.
//!
//! Waits are for events (a result, a log line, the child's exit), each bounded.

use crate::common;
use crate::harness;
use crate::kms_support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use bytes::Bytes;
use common::{Client, Cred, TestProxy};
use kms_support::procs::{Backend, Proc, ProxySetup, proxy_bin};
use serde_json::{Value, json};
use xks_proxy::secret::SecretString;

const AUDIT_KEY: &str = "test-audit-key-0123456789abcdefghijklmnop";
const BOUND: Duration = Duration::from_secs(60);

fn audit_section(extra: &str) -> String {
    format!("\n[audit]\ndirectory = \"audit\"\nkey_file = \"audit.key\"\n{extra}\n")
}

fn key() -> xks_proxy::audit::SealKey {
    xks_proxy::audit::SealKey::new(AUDIT_KEY.as_bytes())
}

fn trail(dir: &Path) -> Vec<PathBuf> {
    xks_proxy::audit::audit_files(&dir.join("audit")).expect("audit dir")
}

fn all_text(dir: &Path) -> String {
    trail(dir)
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read"))
        .collect()
}

/// `xks-proxy audit ARGS...`: exit code and stdout.
fn audit_cli(args: &[&str], dir: &Path) -> (i32, String) {
    let out = Command::new(proxy_bin())
        .arg("audit")
        .args(args)
        .arg(dir.join("audit"))
        .output()
        .expect("xks-proxy audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn request_records(dir: &Path) -> Vec<Value> {
    all_text(dir)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authenticated_request_is_recorded_without_plaintext_and_the_trail_verifies() {
    let opts = common::Options::default();
    let (dir, text, creds) = common::prepare(&opts);
    std::fs::write(dir.path().join("audit.key"), AUDIT_KEY).expect("key");
    let text = text + &audit_section("fsync = \"every_record\"");
    let p = TestProxy::start_with(dir, &text, creds).await;
    let client = p.client(false);

    let plaintext = b"audit-canary-plaintext-7d1f0c";
    let aad = b"audit-canary-aad-52b9e4";
    let mut enc_body = common::encrypt_body(plaintext, Some(aad));
    enc_body["requestMetadata"]["awsSourceVpc"] = json!("vpc-0a1b2c3d");
    enc_body["requestMetadata"]["awsSourceVpce"] = json!("vpce-0e1f2a3b");
    let enc = client
        .post(&common::key_url(&p, common::KEY, "encrypt"), &enc_body)
        .await;
    assert_eq!(enc.status, 200, "{:?}", enc.body);
    let dec_body = common::decrypt_body(&enc.body, Some(aad));
    let dec = client
        .post(&common::key_url(&p, common::KEY, "decrypt"), &dec_body)
        .await;
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    let disabled_body = common::encrypt_body(b"x", None);
    let disabled = client
        .post(
            &common::key_url(&p, common::KEY_DISABLED, "encrypt"),
            &disabled_body,
        )
        .await;
    assert_eq!(disabled.error_name(), "InvalidStateException");
    // A stranger (wrong secret) is refused and leaves no record.
    let stranger = client.with_cred(Cred {
        akid: p.creds[0].akid.clone(),
        secret: SecretString::from("not-the-secret-not-the-secret-not-the-secret"),
    });
    let refused = stranger
        .post(&common::health_url(&p), &common::health_body())
        .await;
    assert_eq!(refused.status, 401);

    let TestProxy {
        running,
        dir,
        creds,
        ..
    } = p;
    running.shutdown();
    tokio::time::timeout(BOUND, running.wait())
        .await
        .expect("stopped");

    let records = request_records(dir.path());
    assert_eq!(records.len(), 3, "{records:?}");
    let id = |b: &Value| {
        b["requestMetadata"]["kmsRequestId"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    let (e, d, x) = (&records[0], &records[1], &records[2]);
    assert_eq!(e["kmsRequestId"], id(&enc_body));
    assert_eq!(e["xksOperation"], "Encrypt");
    assert_eq!(e["kmsOperation"], "Encrypt");
    assert_eq!(e["principal"], common::PRINCIPAL);
    assert_eq!(e["sourceVpc"], "vpc-0a1b2c3d");
    assert_eq!(e["sourceVpce"], "vpce-0e1f2a3b");
    assert_eq!(e["prefix"], common::PREFIX);
    assert_eq!(e["keyId"], common::KEY);
    assert_eq!(e["keyVersion"], 1);
    assert_eq!(e["backend"], "default");
    assert_eq!(
        (e["outcome"].as_str(), e["status"].as_u64()),
        (Some("ok"), Some(200))
    );
    assert!(e["latencyUs"].as_u64().is_some());
    assert_eq!(d["kmsRequestId"], id(&dec_body));
    assert_eq!(d["xksOperation"], "Decrypt");
    assert_eq!(d["keyVersion"], 1);
    assert_eq!(d["sourceVpc"], Value::Null);
    assert_eq!(x["outcome"], "error");
    assert_eq!(x["errorName"], "InvalidStateException");
    assert_eq!(x["status"], 400);

    // Never a plaintext, an AAD, a ciphertext or a secret, in any encoding.
    let everything = all_text(dir.path());
    for needle in [
        String::from_utf8_lossy(plaintext).into_owned(),
        common::b64(plaintext),
        String::from_utf8_lossy(aad).into_owned(),
        common::b64(aad),
        enc.body["ciphertext"].as_str().expect("ct").to_owned(),
        creds[0].secret.expose().to_owned(),
        AUDIT_KEY.to_owned(),
    ] {
        assert!(
            !everything.contains(&needle),
            "{needle} reached the audit trail"
        );
    }

    let key_file = dir.path().join("audit.key");
    let key_arg = key_file.to_str().expect("utf8");
    let (code, out) = audit_cli(&["verify", "--key-file", key_arg], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: ends with a final checkpoint"), "{out}");
    let (code, out) = audit_cli(&["show", "--request-id", &id(&dec_body)], dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(r#""xksOperation":"Decrypt""#), "{out}");
    let (_, out) = audit_cli(&["show", "--key", common::KEY_DISABLED], dir.path());
    assert_eq!(out.lines().count(), 1, "{out}");
}

/// A signed Encrypt that reports a transport error instead of panicking (the child is
/// killed under it).
async fn try_encrypt(client: &Client, url: &str, id: &str) -> Result<(u16, Value), String> {
    let mut body = common::encrypt_body(b"kill-9 plaintext", None);
    body["requestMetadata"]["kmsRequestId"] = json!(id);
    let mut req = http::Request::post(url)
        .body(Bytes::from(serde_json::to_vec(&body).expect("json")))
        .expect("request");
    common::sign_like_kms(
        &mut req,
        &client.cred.akid,
        &client.cred.secret,
        &client.region,
    );
    let req = reqwest::Request::try_from(req.map(reqwest::Body::from)).expect("request");
    let resp = client.http.execute(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

const PREFIX: &str = "/audited";
const KEY: &str = "audit-key-1";

/// A child proxy's setup with `[audit]` (and `extra_top` before `[server]`).
fn child_setup(audit_extra: &str, extra_top: &str) -> ProxySetup {
    let setup = ProxySetup::new(Backend::Software, PREFIX, 0);
    setup.create_key(KEY, "encrypt,decrypt");
    std::fs::write(setup.dir.path().join("audit.key"), AUDIT_KEY).expect("key");
    let text = std::fs::read_to_string(setup.config()).expect("config");
    let text = text.replacen("[server]\n", &format!("{extra_top}[server]\n"), 1)
        + &audit_section(audit_extra);
    std::fs::write(setup.config(), text).expect("config");
    setup
}

fn child_client(proc: &Proc) -> Client {
    Client::new(
        proc.addr,
        false,
        Cred {
            akid: kms_support::AKID.into(),
            secret: SecretString::from(kms_support::SECRET),
        },
    )
}

fn encrypt_url(proc: &Proc) -> String {
    format!(
        "https://localhost:{}{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt",
        proc.addr.port()
    )
}

/// `xks-proxy serve` of `setup` under a file size limit of `fsize` bytes.
fn start_limited(setup: &ProxySetup, fsize: u64) -> Proc {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--fsize={fsize}"))
        .arg("--")
        .arg(proxy_bin())
        .args(["serve", "--config"])
        .arg(setup.config())
        .env("RUST_LOG", "info")
        .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Proc::spawn(cmd, "listening on https://")
}

fn wait_exit(proc: &mut Proc) -> ExitStatus {
    harness::wait_exit(&mut proc.child, BOUND).expect("the child did not exit")
}

fn terminate(proc: &mut Proc) -> ExitStatus {
    assert!(harness::signal(proc.pid(), "-TERM"));
    wait_exit(proc)
}

/// Waits (bounded) until the child's output has a line containing `what`.
fn wait_for_output(proc: &Proc, what: &str) -> String {
    harness::poll(BOUND, || {
        let out = proc.output();
        out.lines().find(|l| l.contains(what)).map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no {what:?} in:\n{}", proc.output()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_write_leaves_a_chain_that_verifies_to_the_last_complete_record() {
    // every_record: a 200 is only sent once its record is written, so every answered
    // request must be in the trail after the kill.
    let setup = child_setup("fsync = \"every_record\"", "");
    let mut proc = setup.start();
    let client = child_client(&proc);
    let url = encrypt_url(&proc);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, url, tx, stop) = (client.clone(), url.clone(), tx.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let id = format!("kill9-{w}-{i}");
                let result = try_encrypt(&client, &url, &id).await;
                let broken = result.is_err();
                if tx.send((id, result)).is_err() || broken {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut answered = Vec::new();
    while answered.len() < 60 {
        let (id, result) = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("a result")
            .expect("workers running");
        if let Ok((200, _)) = result {
            answered.push(id);
        }
    }
    // SIGKILL with requests in flight: no final checkpoint, maybe half a line.
    proc.child.kill().expect("kill -9");
    wait_exit(&mut proc);
    stop.store(true, std::sync::atomic::Ordering::Release);
    while let Ok(Some((id, result))) = tokio::time::timeout(BOUND, rx.recv()).await {
        if let Ok((200, _)) = result {
            answered.push(id);
        }
    }
    for w in workers {
        w.await.expect("worker");
    }

    let dir = setup.dir.path();
    let report = xks_proxy::audit::verify(&trail(dir), Some(&key()));
    assert!(report.problem.is_none(), "{report}");
    assert_eq!(
        report.exit_code(),
        3,
        "no final checkpoint after kill -9: {report}"
    );
    let recorded: std::collections::HashSet<String> = request_records(dir)
        .iter()
        .filter_map(|r| r["kmsRequestId"].as_str().map(str::to_owned))
        .collect();
    for id in &answered {
        assert!(
            recorded.contains(id),
            "{id} was answered 200 but is not in the trail"
        );
    }
    assert!(report.requests >= answered.len() as u64);

    // The next start resumes the chain, says the stop was unclean, and a clean stop
    // seals everything.
    let mut proc = setup.start();
    let (status, _) = try_encrypt(&child_client(&proc), &encrypt_url(&proc), "after-restart")
        .await
        .expect("answer");
    assert_eq!(status, 200);
    assert!(terminate(&mut proc).success());
    let key_file = dir.join("audit.key");
    let (code, out) = audit_cli(
        &["verify", "--key-file", key_file.to_str().expect("utf8")],
        dir,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("resumed_after_unclean_stop"), "{out}");
}

/// `config check` knows the audit key as a secret (restart to change it) and refuses a
/// directory that cannot be one, naming the key.
#[test]
fn config_check_lists_the_audit_key_and_checks_the_directory() {
    let setup = child_setup("", "");
    let check = || {
        Command::new(proxy_bin())
            .args(["config", "check", "--config"])
            .arg(setup.config())
            .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("config check")
    };
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("audit.key_file"), "{text}");
    assert!(!text.contains(AUDIT_KEY), "{text}");
    std::fs::write(setup.dir.path().join("audit"), "not a directory").expect("write");
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("audit.directory") && err.contains("not a directory"),
        "{err}"
    );
}

/// A record line is ~600 bytes: a file stops growing after about a dozen.
const FSIZE: u64 = 8 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_with_503_and_the_reason_logged() {
    let setup = child_setup(
        "fsync = \"every_record\"\non_failure = \"fail_closed\"\nrotate_bytes = 0",
        "",
    );
    let mut proc = start_limited(&setup, FSIZE);
    let client = child_client(&proc);
    let url = encrypt_url(&proc);
    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let id = format!("full-{i}");
        let (status, body) = try_encrypt(&client, &url, &id).await.expect("answer");
        match status {
            200 => answered.push(id),
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let body = refused.expect("a 503 once the file size limit was reached");
    assert_eq!(body["errorName"], "DependencyTimeoutException", "{body}");
    assert!(!answered.is_empty());
    // The reason, in the operator's log: the writer's error and the request's line.
    let line = wait_for_output(&proc, "audit trail write failed");
    assert!(
        line.contains("File too large") || line.contains("FileTooLarge"),
        "{line}"
    );
    let line = wait_for_output(&proc, "audit_failure");
    assert!(line.contains("writer_failed"), "{line}");
    // The writer retries with a new file: requests are served (and recorded) again.
    wait_for_output(&proc, "audit trail writing again");
    let (status, body) = try_encrypt(&client, &url, "after-retry")
        .await
        .expect("answer");
    assert_eq!(status, 200, "{body}");
    answered.push("after-retry".into());
    terminate(&mut proc);
    let dir = setup.dir.path();
    let report = xks_proxy::audit::verify(&trail(dir), Some(&key()));
    assert!(report.problem.is_none(), "{report}");
    assert!(
        report
            .notices
            .iter()
            .any(|n| n.contains("recovered_after_write_error")),
        "{report}"
    );
    let text = all_text(dir);
    for id in &answered {
        assert!(
            text.contains(&format!("\"kmsRequestId\":\"{id}\"")),
            "{id} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_with_continue_answers_200_and_counts_dropped_records() {
    let setup = child_setup(
        "on_failure = \"continue\"\nrotate_bytes = 0",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n",
    );
    let mut proc = start_limited(&setup, FSIZE);
    let line = wait_for_output(&proc, "metrics listening on http://");
    let admin: String = line
        .split("metrics listening on http://")
        .nth(1)
        .expect("addr")
        .chars()
        .take_while(|c| *c != '/')
        .collect();
    let client = child_client(&proc);
    let url = encrypt_url(&proc);
    for i in 0..60 {
        let (status, body) = try_encrypt(&client, &url, &format!("cont-{i}"))
            .await
            .expect("answer");
        assert_eq!(status, 200, "continue never refuses: {body}");
    }
    // The writer's failure is counted once it has happened (it writes behind the
    // answers): wait for its log line, then read the counters.
    wait_for_output(&proc, "audit trail write failed");
    let metrics = common::scrape_metrics(&admin).await;
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert!(sum("xks_audit_records_dropped_total") >= 1.0, "{metrics}");
    assert!(sum("xks_audit_write_errors_total") >= 1.0, "{metrics}");
    assert!(sum("xks_audit_records_written_total") >= 1.0, "{metrics}");
    assert_eq!(sum("xks_audit_requests_refused_total"), 0.0, "{metrics}");
    terminate(&mut proc);
}
