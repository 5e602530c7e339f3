//! Issue 11 §5, "Logs never carry secrets, on every path": the real `xks-proxy serve`
//! binary as a child process, its real stderr captured byte for byte, at TRACE level
//! (`RUST_LOG=trace`: hyper, h2 and rustls included, the last through the `log`
//! bridge), in the human and the JSON format. It is driven through the success paths
//! (Encrypt/Decrypt with AAD over HTTP/1.1 and HTTP/2) and the error paths (wrong
//! SigV4 secret, bad Base64 in plaintext and ciphertext, a plaintext of the wrong JSON
//! type, a tampered tag, a disabled key, a policy deny, a backend deadline), then
//! stopped with SIGTERM (it drains and exits 0) and everything it wrote is searched for
//! the plaintexts, the decrypted output, the SigV4 secrets and the master key, in every
//! encoding a careless log line could use. The expected lines are asserted to be there
//! too, so the test cannot pass by logging nothing.
//!
//! Not covered: a panic caught at the backend boundary (`backend::Handle`). No backend
//! reachable from the binary's config can be made to panic from outside; only the
//! unit test in `src/backend/mod.rs` (a test-only backend) exercises it.

use crate::common;
use crate::harness;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};

/// Permits the test's account; `forbid-intruder-ops` forbids one kmsOperation.
const POLICY: &str = r#"
@id("permit-account-111122223333")
permit(principal in Xks::Account::"111122223333", action, resource);

@id("forbid-intruder-ops")
forbid(principal, action, resource)
when { context.kmsOperation == "ReEncrypt" };
"#;

/// A plaintext sent as a JSON number: it must reach neither the log nor the 400's
/// errorMessage (serde's own "invalid type" text would quote it).
const NUMBER_CANARY: u64 = 987_654_321_012_345;

const MARKER: &str = "listening on https://";

/// Where one of the child's output streams is collected.
type Sink = Arc<Mutex<Vec<u8>>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Human,
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Human => "human",
            Format::Json => "json",
        }
    }
}

/// `xks-proxy serve` as a child process: stdout and stderr kept as raw bytes (never
/// lossily split into lines, so nothing can slip past as invalid UTF-8); killed when
/// dropped.
struct ProxyChild {
    child: Child,
    addr: std::net::SocketAddr,
    stderr: Sink,
    stdout: Sink,
    readers: Vec<JoinHandle<()>>,
}

impl ProxyChild {
    fn spawn(config: &Path) -> ProxyChild {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xks-proxy"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "trace")
            .env_remove("XKS_PROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn xks-proxy");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<std::net::SocketAddr>();
        let mut readers = Vec::new();
        let streams: Vec<(Box<dyn Read + Send>, Sink)> = vec![
            (
                Box::new(child.stdout.take().expect("stdout")),
                stdout.clone(),
            ),
            (
                Box::new(child.stderr.take().expect("stderr")),
                stderr.clone(),
            ),
        ];
        for (mut stream, sink) in streams {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut sent = false;
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut all = sink.lock().expect("lock");
                    all.extend_from_slice(&buf[..n]);
                    if !sent && let Some(addr) = listening_addr(&all) {
                        sent = true;
                        let _ = tx.send(addr);
                    }
                }
            }));
        }
        drop(tx);
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no {MARKER:?} line within 60 s; stderr:\n{}",
                    String::from_utf8_lossy(&stderr.lock().expect("lock"))
                );
            }
        };
        ProxyChild {
            child,
            addr,
            stderr,
            stdout,
            readers,
        }
    }

    fn client(&self, http2: bool, cred: &Cred) -> Client {
        Client::new(self.addr, http2, cred.clone())
    }

    fn url(&self, key: &str, op: &str) -> String {
        format!(
            "https://localhost:{}{PREFIX}/kms/xks/v1/keys/{key}/{op}",
            self.addr.port()
        )
    }

    fn health_url(&self) -> String {
        format!(
            "https://localhost:{}{PREFIX}/kms/xks/v1/health",
            self.addr.port()
        )
    }

    /// SIGTERM, then waits (bounded) for the exit and for both pipes to reach EOF.
    /// Returns the exit status and everything written to stderr and stdout.
    fn terminate(&mut self) -> (ExitStatus, Vec<u8>, Vec<u8>) {
        assert!(
            harness::signal(self.child.id(), "-TERM"),
            "kill -TERM failed"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = harness::wait_exit(&mut self.child, Duration::from_secs(30))
            .expect("the proxy did not exit within 30 s of SIGTERM");
        // The child is gone: its pipes are closed, so the readers finish promptly.
        for r in self.readers.drain(..) {
            while !r.is_finished() {
                assert!(Instant::now() < deadline, "stderr/stdout not at EOF");
                std::thread::sleep(Duration::from_millis(10));
            }
            r.join().expect("reader");
        }
        let err = self.stderr.lock().expect("lock").clone();
        let out = self.stdout.lock().expect("lock").clone();
        (status, err, out)
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in "... listening on https://ADDR ..." (human or JSON line).
fn listening_addr(bytes: &[u8]) -> Option<std::net::SocketAddr> {
    let text = String::from_utf8_lossy(bytes);
    let pos = text.find(MARKER)?;
    let addr: String = text[pos + MARKER.len()..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '/')
        .collect();
    addr.parse().ok()
}

/// Writes the proxy's config: the shared test config plus the log format, TRACE level,
/// the policy, and `extra` (more tables).
fn setup(format: Format, opts: &Options, extra: &str) -> (tempfile::TempDir, Vec<Cred>) {
    let (dir, text, creds) = prepare(opts);
    std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("policy");
    let text = format!(
        "{text}\n[logging]\nformat = \"{}\"\nlevel = \"trace\"\n\n[policy]\nfile = \"policy.cedar\"\n{extra}",
        format.name()
    );
    std::fs::write(dir.path().join("proxy.toml"), text).expect("config");
    (dir, creds)
}

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

/// Every encoding of `bytes` a log line could plausibly use: raw (as text when it is
/// text), standard and URL-safe Base64, hex, and the `Debug` of a byte slice
/// (`[80, 76, ...]`, its first 12 bytes).
fn encodings(what: &str, bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let dbg = format!("{:?}", &bytes[..bytes.len().min(12)]);
    vec![
        (format!("{what} (raw)"), bytes.to_vec()),
        (format!("{what} (Base64)"), b64(bytes).into_bytes()),
        (
            format!("{what} (Base64, no padding)"),
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(bytes)
                .into_bytes(),
        ),
        (
            format!("{what} (URL-safe Base64)"),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(bytes)
                .into_bytes(),
        ),
        (format!("{what} (hex)"), hex(bytes, false).into_bytes()),
        (format!("{what} (HEX)"), hex(bytes, true).into_bytes()),
        (
            format!("{what} (Debug bytes)"),
            dbg.trim_end_matches(']').as_bytes().to_vec(),
        ),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// One request line ("xks request"): its status, outcome and auth_failure.
#[derive(Debug)]
struct RequestLine {
    status: u16,
    outcome: String,
    auth_failure: Option<String>,
}

/// A human-format field value after `name=` (quotes removed).
fn human_field(line: &str, name: &str) -> Option<String> {
    let pos = line.find(&format!(" {name}="))?;
    let rest = &line[pos + name.len() + 2..];
    let value = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next().unwrap_or("")
    } else {
        rest.split(' ').next().unwrap_or("")
    };
    Some(value.to_owned())
}

fn request_lines(format: Format, logs: &str) -> Vec<RequestLine> {
    let mut out = Vec::new();
    for line in logs.lines() {
        match format {
            Format::Json => {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                assert!(v.is_object(), "not a JSON object: {line}");
                if v["message"] == "xks request" {
                    out.push(RequestLine {
                        status: v["status"].as_u64().expect("status") as u16,
                        outcome: v["outcome"].as_str().expect("outcome").to_owned(),
                        auth_failure: v["auth_failure"].as_str().map(str::to_owned),
                    });
                }
            }
            Format::Human => {
                if line.contains("xks_proxy::request") && line.contains("xks request") {
                    out.push(RequestLine {
                        status: human_field(line, "status")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("no status: {line}")),
                        outcome: human_field(line, "outcome")
                            .unwrap_or_else(|| panic!("no outcome: {line}")),
                        auth_failure: human_field(line, "auth_failure"),
                    });
                }
            }
        }
    }
    out
}

/// Asserts `reply` has `status` and `error`, and that its body echoes no canary.
fn expect(reply: &Reply, status: u16, error: &str, token: &str, what: &str) {
    assert_eq!(
        (reply.status, reply.error_name()),
        (status, error),
        "{what}: {:?}",
        reply.body
    );
    assert!(
        !reply.body.to_string().contains(token),
        "{what}: the error response echoes the input: {}",
        reply.body
    );
}

/// The requests that go through the main proxy (latency 0). Returns the plaintexts
/// and decrypted outputs it saw.
async fn exercise(p: &ProxyChild, creds: &[Cred], token: &str) -> Vec<Vec<u8>> {
    let aad = b"aad-context-not-secret";
    let mut seen = Vec::new();
    let wrong = Cred {
        akid: creds[0].akid.clone(),
        secret: creds[1].secret.clone(),
    };
    for h2 in [false, true] {
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let c = p.client(h2, &creds[0]);
        let plaintext = format!("PLAINTEXT-CANARY-{token}-h2-{h2}").into_bytes();
        // Success: Encrypt and Decrypt with AAD.
        let enc = c
            .post(&p.url(KEY, "encrypt"), &encrypt_body(&plaintext, Some(aad)))
            .await;
        assert_eq!(enc.status, 200, "{:?}", enc.body);
        assert_eq!(enc.version, want);
        let dec = c
            .post(&p.url(KEY, "decrypt"), &decrypt_body(&enc.body, Some(aad)))
            .await;
        assert_eq!(dec.status, 200, "{:?}", dec.body);
        assert_eq!(dec.version, want);
        let decrypted = unb64(&dec.body["plaintext"]);
        assert_eq!(decrypted, plaintext);
        seen.push(plaintext.clone());
        seen.push(decrypted);
        assert_eq!(c.post(&p.health_url(), &health_body()).await.status, 200);
        let md = json!({"requestMetadata": metadata("DescribeKey")});
        let r = c.post(&p.url(KEY, "metadata"), &md).await;
        assert_eq!(r.status, 200, "{:?}", r.body);

        // 401: the right access key id, another credential's secret.
        let bad = c.with_cred(wrong.clone());
        let r = bad
            .post(&p.url(KEY, "encrypt"), &encrypt_body(&plaintext, Some(aad)))
            .await;
        expect(
            &r,
            401,
            "AuthenticationFailedException",
            token,
            "wrong secret",
        );

        // 401: an access key id nobody configured, with a configured secret.
        let stranger = c.with_cred(Cred {
            akid: "AKIDNOBODYCONFIGURED".into(),
            secret: creds[0].secret.clone(),
        });
        let r = stranger
            .post(&p.url(KEY, "encrypt"), &encrypt_body(&plaintext, Some(aad)))
            .await;
        expect(
            &r,
            401,
            "AuthenticationFailedException",
            token,
            "unknown access key id",
        );

        // 400: a body cut short right after the plaintext (not JSON at all).
        let full = encrypt_body(&plaintext, Some(aad)).to_string();
        let cut = full.find(&b64(&plaintext)).expect("plaintext in body") + 8;
        let r = c
            .post_raw(
                &p.url(KEY, "encrypt"),
                bytes::Bytes::from(full[..cut].to_owned()),
                |_| {},
            )
            .await;
        expect(&r, 400, "ValidationException", token, "truncated body");

        // 400: a plaintext that is a JSON number. serde names the value it refused
        // ("invalid type: integer `N`, ..."); neither the log nor the errorMessage
        // may carry it.
        let mut body = encrypt_body(&plaintext, Some(aad));
        body["plaintext"] = json!(NUMBER_CANARY);
        let r = c.post(&p.url(KEY, "encrypt"), &body).await;
        assert!(
            !r.body.to_string().contains(&NUMBER_CANARY.to_string()),
            "the 400 echoes the refused value: {:?}",
            r.body
        );
        expect(
            &r,
            400,
            "ValidationException",
            token,
            "plaintext as a number",
        );

        // 501: a plaintext over the proxy's 8192-byte limit.
        let big: Vec<u8> = plaintext.iter().copied().cycle().take(9000).collect();
        let r = c
            .post(&p.url(KEY, "encrypt"), &encrypt_body(&big, Some(aad)))
            .await;
        expect(
            &r,
            501,
            "UnsupportedOperationException",
            token,
            "oversized plaintext",
        );

        // 400: plaintext that is not Base64 (the canary itself, with '-' in it).
        let mut body = encrypt_body(&plaintext, Some(aad));
        body["plaintext"] = json!(format!("BAD-B64-PLAINTEXT-{token}!"));
        let r = c.post(&p.url(KEY, "encrypt"), &body).await;
        expect(
            &r,
            400,
            "ValidationException",
            token,
            "bad Base64 plaintext",
        );

        // 400: plaintext of the wrong JSON type (an array holding the canary).
        let mut body = encrypt_body(&plaintext, None);
        body["plaintext"] = json!([String::from_utf8(plaintext.clone()).expect("utf8")]);
        let r = c.post(&p.url(KEY, "encrypt"), &body).await;
        expect(
            &r,
            400,
            "ValidationException",
            token,
            "plaintext as an array",
        );

        // 400: ciphertext that is not Base64.
        let mut body = decrypt_body(&enc.body, Some(aad));
        body["ciphertext"] = json!(format!("BAD-B64-CIPHERTEXT-{token}!"));
        let r = c.post(&p.url(KEY, "decrypt"), &body).await;
        expect(
            &r,
            400,
            "ValidationException",
            token,
            "bad Base64 ciphertext",
        );

        // 400 from the backend: a tampered tag fails authentication.
        let mut body = decrypt_body(&enc.body, Some(aad));
        let mut tag = unb64(&enc.body["authenticationTag"]);
        tag[0] ^= 0x01;
        body["authenticationTag"] = json!(b64(&tag));
        let r = c.post(&p.url(KEY, "decrypt"), &body).await;
        expect(&r, 400, "InvalidCiphertextException", token, "tampered tag");

        // 400 from the backend: a disabled key.
        let r = c
            .post(
                &p.url(KEY_DISABLED, "encrypt"),
                &encrypt_body(&plaintext, Some(aad)),
            )
            .await;
        expect(&r, 400, "InvalidStateException", token, "disabled key");

        // 403: no permit matched (another account) and an explicit forbid.
        let mut body = encrypt_body(&plaintext, Some(aad));
        body["requestMetadata"]["awsPrincipalArn"] = json!("arn:aws:iam::444455556666:role/x");
        let r = c.post(&p.url(KEY, "encrypt"), &body).await;
        expect(&r, 403, "AccessDeniedException", token, "no permit");
        let mut body = decrypt_body(&enc.body, Some(aad));
        body["requestMetadata"]["kmsOperation"] = json!("ReEncrypt");
        let r = c.post(&p.url(KEY, "decrypt"), &body).await;
        expect(&r, 403, "AccessDeniedException", token, "forbid");
    }
    seen
}

/// Asserts that none of `forbidden` occurs in `bytes`.
fn assert_clean(bytes: &[u8], forbidden: &[(String, Vec<u8>)], stream: &str) {
    let leaks: Vec<&str> = forbidden
        .iter()
        .filter(|(_, needle)| contains(bytes, needle))
        .map(|(what, _)| what.as_str())
        .collect();
    assert!(leaks.is_empty(), "found in the proxy's {stream}: {leaks:?}");
}

/// The canaries of one proxy: its secrets and master key, plus `secrets`.
fn canaries(
    dir: &Path,
    creds: &[Cred],
    token: &str,
    secrets: &[Vec<u8>],
) -> Vec<(String, Vec<u8>)> {
    let mut f = vec![
        ("canary token".to_owned(), token.as_bytes().to_vec()),
        (
            "plaintext sent as a number".to_owned(),
            NUMBER_CANARY.to_string().into_bytes(),
        ),
    ];
    for (i, s) in secrets.iter().enumerate() {
        f.extend(encodings(&format!("plaintext/decrypted output {i}"), s));
    }
    for (i, c) in creds.iter().enumerate() {
        let s = c.secret.expose().as_bytes();
        f.extend(encodings(&format!("SigV4 secret {i}"), s));
        f.push((
            format!("SigV4 secret {i} (AWS4 key)"),
            format!("AWS4{}", c.secret.expose()).into_bytes(),
        ));
    }
    let master = std::fs::read_to_string(dir.join("master.key")).expect("master");
    let master = master.trim();
    f.push(("master key (file)".into(), master.as_bytes().to_vec()));
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(master)
        .expect("master key is Base64");
    assert_eq!(decoded.len(), 32);
    f.extend(encodings("master key (decoded)", &decoded));
    f
}

fn check_logs(
    format: Format,
    stderr: &[u8],
    stdout: &[u8],
    forbidden: &[(String, Vec<u8>)],
) -> (String, Vec<RequestLine>) {
    assert_clean(stderr, forbidden, "stderr");
    assert_clean(stdout, forbidden, "stdout");
    let logs = String::from_utf8(stderr.to_vec()).expect("the log is UTF-8");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal"
    );
    let lines = request_lines(format, &logs);
    (logs, lines)
}

async fn run(format: Format) {
    let token = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let started = Instant::now();

    // The main proxy: every path but the deadline.
    let (dir, creds) = setup(
        format,
        &Options {
            extra_server: "shutdown_grace_ms = 5000\n".into(),
            ..Options::default()
        },
        "",
    );
    let mut p = ProxyChild::spawn(&dir.path().join("proxy.toml"));
    let secrets = exercise(&p, &creds, &token).await;
    let (status, stderr, stdout) = tokio::task::block_in_place(|| p.terminate());
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let forbidden = canaries(dir.path(), &creds, &token, &secrets);
    let (logs, lines) = check_logs(format, &stderr, &stdout, &forbidden);

    // It logged, at TRACE, from every layer: not a test that passes by logging nothing.
    assert!(
        logs.len() > 20_000,
        "TRACE logging captured little ({} bytes)",
        logs.len()
    );
    for (what, needle) in [
        ("h2 (HTTP/2 at TRACE)", "h2::"),
        ("rustls (through the log bridge)", "rustls::"),
        ("the listening line", MARKER),
        ("the drain", "draining in-flight requests"),
        ("the policy load", "secondary authorization policy loaded"),
        (
            "the policy deny",
            "secondary authorization denied the request",
        ),
        ("the deciding forbid", "forbid-intruder-ops"),
        ("a default deny", "no permit matched"),
    ] {
        assert!(logs.contains(needle), "{format:?}: no {what} in the log");
    }
    if format == Format::Human {
        assert!(logs.contains("TRACE"), "no TRACE line");
    } else {
        assert!(logs.contains("\"level\":\"TRACE\""), "no TRACE line");
    }
    // One request line per request, with the expected outcomes (2 rounds).
    for (status, outcome, n) in [
        (200, "ok", 8),
        (401, "AuthenticationFailedException", 4),
        (400, "ValidationException", 10),
        (501, "UnsupportedOperationException", 2),
        (400, "InvalidCiphertextException", 2),
        (400, "InvalidStateException", 2),
        (403, "AccessDeniedException", 4),
    ] {
        let got = lines
            .iter()
            .filter(|l| l.status == status && l.outcome == outcome)
            .count();
        assert_eq!(
            got, n,
            "{format:?}: request lines with status {status} {outcome}: {lines:?}"
        );
    }
    assert_eq!(lines.len(), 32, "{lines:?}");
    assert!(
        lines
            .iter()
            .filter(|l| l.status == 401)
            .all(|l| l.auth_failure.is_some()),
        "a 401 line says which check failed: {lines:?}"
    );

    // The backend deadline: a slow key manager, a short deadline → 503.
    let (slow_dir, slow_creds) = setup(
        format,
        &Options {
            simulated_latency_ms: 400,
            extra_server: "shutdown_grace_ms = 5000\n".into(),
            ..Options::default()
        },
        "\n[limits]\nbackend_deadline_ms = 50\n",
    );
    let mut slow = ProxyChild::spawn(&slow_dir.path().join("proxy.toml"));
    let slow_plaintext = format!("SLOW-PLAINTEXT-CANARY-{token}").into_bytes();
    for h2 in [false, true] {
        let c = slow.client(h2, &slow_creds[0]);
        let r = c
            .post(
                &slow.url(KEY, "encrypt"),
                &encrypt_body(&slow_plaintext, Some(b"aad")),
            )
            .await;
        expect(
            &r,
            503,
            "DependencyTimeoutException",
            &token,
            "backend deadline",
        );
    }
    let (status, stderr, stdout) = tokio::task::block_in_place(|| slow.terminate());
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let forbidden = canaries(slow_dir.path(), &slow_creds, &token, &[slow_plaintext]);
    let (_, lines) = check_logs(format, &stderr, &stdout, &forbidden);
    let timeouts = lines
        .iter()
        .filter(|l| l.status == 503 && l.outcome == "DependencyTimeoutException")
        .count();
    assert_eq!(timeouts, 2, "{lines:?}");
    eprintln!(
        "{format:?}: {} bytes of log checked in {:?}",
        logs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_human_trace_logs_carry_no_secret_on_any_path() {
    run(Format::Human).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_json_trace_logs_carry_no_secret_on_any_path() {
    run(Format::Json).await;
}
