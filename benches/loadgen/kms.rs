//! A small client for the KMS JSON API (awsJson1.1: `POST /`, `X-Amz-Target:
//! TrentService.<Op>`), as `kms-emulator` serves it on plain HTTP: every call signed
//! with SigV4 for service `kms` like an SDK signs it, errors read the way the SDKs read
//! them (`__type` without its namespace, `message`).

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::Value;
use xks_proxy::secret::SecretString;

/// The caller's credential. The emulator checks signatures only when told to
/// (`--verify-client-sigv4`); it always reads the access key id (the caller).
const CALLER_AKID: &str = "AKIAXKSBENCHSOAKCALLER";
const CALLER_SECRET: &str = "xks-bench-soak-caller-secret-not-a-real-one";

/// Why a KMS call gave no result.
#[derive(Debug, Clone)]
pub enum CallError {
    /// KMS answered with an error.
    Service {
        /// The exception name (`KMSInvalidStateException`).
        code: String,
        message: String,
        status: u16,
    },
    /// No answer: connection refused or broken, client timeout, unreadable body.
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Service {
                code,
                message,
                status,
            } => write!(f, "{code} (HTTP {status}): {message}"),
            CallError::Transport(why) => write!(f, "no answer from KMS: {why}"),
        }
    }
}

/// One KMS endpoint; cheap to share (the HTTP pool is inside).
#[derive(Debug)]
pub struct KmsClient {
    http: reqwest::Client,
    url: String,
    region: String,
    secret: SecretString,
}

impl KmsClient {
    /// `url` like `http://127.0.0.1:4599`; up to `connections` kept-alive connections.
    pub fn new(url: &str, region: &str, timeout: Duration, connections: usize) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(connections)
            .timeout(timeout)
            .build()
            .context("building the KMS HTTP client")?;
        Ok(Self {
            http,
            url: format!("{}/", url.trim_end_matches('/')),
            region: region.to_owned(),
            secret: SecretString::new(CALLER_SECRET.to_owned()),
        })
    }

    /// Calls `op` with `body`; the JSON answer, or why there is none.
    pub async fn call(&self, op: &str, body: &Value) -> Result<Value, CallError> {
        let payload = serde_json::to_vec(body).map_err(|e| CallError::Transport(e.to_string()))?;
        let mut req = http::Request::post(&self.url)
            .header("x-amz-target", format!("TrentService.{op}"))
            .header(http::header::CONTENT_TYPE, "application/x-amz-json-1.1")
            .body(Bytes::from(payload))
            .map_err(|e| CallError::Transport(e.to_string()))?;
        xks_proxy::sigv4::sign_request(
            &mut req,
            CALLER_AKID,
            &self.secret,
            &self.region,
            "kms",
            SystemTime::now(),
        )
        .map_err(|e| CallError::Transport(format!("signing: {e}")))?;
        let req = reqwest::Request::try_from(req.map(reqwest::Body::from))
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| CallError::Transport(transport_label(&e)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(transport_label(&e)))?;
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        // botocore: the part after the last '#', before any ':'.
        let code = json["__type"]
            .as_str()
            .map(|t| {
                let t = t.rsplit('#').next().unwrap_or(t);
                t.split(':').next().unwrap_or(t).to_owned()
            })
            .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        let message = json["message"]
            .as_str()
            .or_else(|| json["Message"].as_str())
            .unwrap_or_default()
            .to_owned();
        Err(CallError::Service {
            code,
            message,
            status: status.as_u16(),
        })
    }
}

/// A short, stable label for a transport failure (the report counts by it).
fn transport_label(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "client timeout".into()
    } else if e.is_connect() {
        "connect failed".into()
    } else if e.is_body() || e.is_decode() {
        "body unreadable".into()
    } else {
        "connection broken".into()
    }
}
