//! Shared helpers of the deploy tests (`tests/deploy/deploy_*.rs`): where the repository and the
//! linters are, running a command with a deadline, and child processes that die with
//! the test.
//!
//! The linters live in `target/deploy-venv` (made by `tests/deploy/install-tools.sh`
//! from `tests/deploy/requirements.txt`). A missing linter FAILS the test that needs it,
//! with the command that installs it: a deploy file that was never checked must not
//! look checked.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::harness;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn deploy() -> PathBuf {
    repo().join("deploy")
}

pub const INSTALL_HINT: &str = "run tests/deploy/install-tools.sh (./tests/run-all.sh does), \
     or set XKS_DEPLOY_TOOLS to a directory holding the tool";

/// Directories searched for a tool, in order: `$XKS_DEPLOY_TOOLS`, the deploy venv,
/// then `$PATH`.
fn tool_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("XKS_DEPLOY_TOOLS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(repo().join("target/deploy-venv/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    tool_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool's path, or a test failure naming how to install it.
pub fn require_tool(name: &str) -> PathBuf {
    match find_tool(name) {
        Some(p) => p,
        None => {
            panic!("`{name}` is not installed, so this deploy check cannot run: {INSTALL_HINT}")
        }
    }
}

/// Runs `cmd` to completion, killing it after `limit`; returns its output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{desc}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{desc} did not finish within {limit:?}");
        }
    }
}

/// Runs `cmd` and fails the test, showing its output, unless it exits 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// YAML (one or more documents) to JSON values, with the deploy venv's PyYAML (the
/// crate has no YAML parser, and Cargo.toml is not ours to change).
pub fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    let python = require_tool("python");
    let out = run_ok(
        Command::new(python)
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
                 docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                 print(json.dumps(docs))",
            )
            .arg(path),
        Duration::from_secs(60),
    );
    serde_json::from_str(&out).expect("JSON from PyYAML")
}

/// A child process killed (SIGKILL) when dropped, unless it already exited.
pub struct Guard(pub Child);

impl Guard {
    pub fn signal(&self, sig: &str) {
        let _ = harness::signal(self.0.id(), sig);
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        harness::wait_exit(&mut self.0, limit)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub use crate::harness::free_port;

/// Polls `f` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    harness::poll(limit, f)
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// One plain-HTTP GET (HTTP/1.0, no keep-alive): status code and body, or None if the
/// connection fails.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return Some((status, body.to_owned()));
    }
    // HAProxy answers chunked even to HTTP/1.0: size line, data, CRLF, ..., 0.
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return Some((status, out));
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// A POST signed like KMS signs (SigV4, service kms-xks-proxy, us-east-1), over TLS
/// trusting the dev CA, to `https://{host}{path}` dialled at `addr`, on a fresh
/// connection. Returns the status and the JSON body (Null if not JSON).
pub async fn signed_post(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    body: &serde_json::Value,
    akid: &str,
    secret: &str,
) -> (u16, serde_json::Value) {
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(repo().join("certs/ca.pem")).expect("dev CA"),
    )
    .expect("CA");
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve(host, addr)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut req = http::Request::post(format!("https://{host}:{}{path}", addr.port()))
        .header("content-type", "application/json")
        .body(bytes::Bytes::from(serde_json::to_vec(body).expect("json")))
        .expect("request");
    xks_proxy::sigv4::sign_request(
        &mut req,
        akid,
        &xks_proxy::secret::SecretString::new(secret.to_owned()),
        "us-east-1",
        "kms-xks-proxy",
        std::time::SystemTime::now(),
    )
    .expect("sign");
    let resp = http
        .execute(reqwest::Request::try_from(req.map(reqwest::Body::from)).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("POST https://{host}{path} via {addr}: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}
