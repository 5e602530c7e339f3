//! Shared harness for the KMS-emulator tests: the emulator in-process on 127.0.0.1:0,
//! a small JSON client for its API, and a tiny in-test XKS responder.
//!
//! Why an in-test XKS responder next to the real proxy: some proxy answers cannot be
//! produced by our software keystore — an all-UNAVAILABLE health report, an AES-128 or
//! encrypt-only external key, a wrong CDIV, a ciphertext of the wrong length, or an
//! answer that arrives too late. The responder is a real TLS + HTTP server on loopback
//! that checks every request's SigV4 signature like a proxy, then answers exactly the
//! canned response a test asks for (or real AES-GCM when asked to behave).
#![allow(dead_code)]

pub mod procs;
pub mod readme;
pub mod sdk;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use xks_proxy::kms::{self, Config, Listeners, XksClientConfig};
use xks_proxy::secret::SecretString;
use xks_proxy::sigv4::{Credential, CredentialSet, VerifyPolicy};

pub const XKS_HOST: &str = "xks.test.example";
pub const ENDPOINT: &str = "https://xks.test.example";
pub const AKID: &str = "AKIAXKSTESTCREDENTIAL2";
pub const SECRET: &str = "xksTestSecretAbcdefghijklmnopqrstuvwxyz0123456789+/=";
pub const AKID2: &str = "AKIAXKSROTATEDCREDENTIAL";
pub const SECRET2: &str = "RotatedSecret/AbcdefghijklmnopqrstuvwxyzABCDEF0123456";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// --- The emulator, in process ---------------------------------------------------------

/// A running emulator; stops when dropped.
pub struct Emu {
    pub url: String,
    pub emulator: kms::Emulator,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    client: reqwest::Client,
}

/// An emulator config that trusts the dev CA and dials `responder` for `XKS_HOST`.
pub fn config_for(proxy: SocketAddr) -> Config {
    Config {
        health_interval: Duration::ZERO,
        xks: XksClientConfig {
            ca_bundle: Some(repo().join("certs/ca.pem")),
            resolve: vec![(XKS_HOST.to_owned(), proxy)],
            ..XksClientConfig::default()
        },
        ..Config::default()
    }
}

impl Emu {
    pub async fn start(config: Config) -> Self {
        let emulator = kms::Emulator::new(config).expect("emulator starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let emu = emulator.clone();
        let task = tokio::spawn(async move {
            let listeners = Listeners {
                http: vec![listener],
                https: vec![],
            };
            kms::serve(emu, listeners, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Self {
            url,
            emulator,
            stop: Some(tx),
            task: Some(task),
            client: http_client(),
        }
    }

    /// Stops serving and waits until the emulator has shut down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Calls one KMS operation; returns status, headers and JSON body.
    pub async fn raw(&self, op: &str, body: &Value) -> (StatusCode, http::HeaderMap, Value) {
        let resp = self
            .client
            .post(&self.url)
            .header("x-amz-target", format!("TrentService.{op}"))
            .header("content-type", "application/x-amz-json-1.1")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDCALLER/20240101/us-east-1/kms/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=00",
            )
            .body(serde_json::to_vec(body).expect("json"))
            .send()
            .await
            .expect("emulator answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, json)
    }

    /// Calls an operation that must succeed.
    pub async fn ok(&self, op: &str, body: Value) -> Value {
        let (status, _, json) = self.raw(op, &body).await;
        assert_eq!(status, StatusCode::OK, "{op} failed: {json}");
        json
    }

    /// Calls an operation that must fail; returns (`__type`, message, status).
    pub async fn err(&self, op: &str, body: Value) -> (String, String, u16) {
        let (status, headers, json) = self.raw(op, &body).await;
        assert_ne!(
            status,
            StatusCode::OK,
            "{op} unexpectedly succeeded: {json}"
        );
        let ty = json["__type"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok()),
            Some(ty.as_str()),
            "x-amzn-ErrorType must match __type"
        );
        (
            ty,
            json["message"].as_str().unwrap_or_default().to_owned(),
            status.as_u16(),
        )
    }

    /// Creates a PUBLIC_ENDPOINT external key store; returns its ID.
    pub async fn create_store(&self, name: &str, path: &str) -> String {
        let r = self
            .ok(
                "CreateCustomKeyStore",
                json!({
                    "CustomKeyStoreName": name,
                    "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                    "XksProxyUriEndpoint": ENDPOINT,
                    "XksProxyUriPath": path,
                    "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                    "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
                }),
            )
            .await;
        r["CustomKeyStoreId"].as_str().expect("id").to_owned()
    }

    pub async fn store(&self, id: &str) -> Value {
        let r = self
            .ok("DescribeCustomKeyStores", json!({"CustomKeyStoreId": id}))
            .await;
        r["CustomKeyStores"][0].clone()
    }

    /// Polls until the store leaves CONNECTING (bounded: 30 s).
    pub async fn wait_connection(&self, id: &str) -> Value {
        let left = crate::harness::poll_async(Duration::from_secs(30), || async {
            let s = self.store(id).await;
            (s["ConnectionState"] != "CONNECTING").then_some(s)
        })
        .await;
        left.unwrap_or_else(|| panic!("store {id} stayed CONNECTING"))
    }

    /// Connects and waits for CONNECTED.
    pub async fn connect(&self, id: &str) {
        self.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": id}))
            .await;
        let s = self.wait_connection(id).await;
        assert_eq!(s["ConnectionState"], "CONNECTED", "{s}");
    }

    /// Creates an XKS-backed KMS key; returns its metadata.
    pub async fn create_xks_key(&self, store: &str, xks_key_id: &str) -> Value {
        let r = self
            .ok(
                "CreateKey",
                json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": xks_key_id}),
            )
            .await;
        r["KeyMetadata"].clone()
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A plain HTTP client that never goes through an HTTP(S)_PROXY from the environment.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

pub fn unb64(v: &Value) -> Vec<u8> {
    STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64")
}

// --- The in-test XKS responder --------------------------------------------------------

/// How the responder answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Real AES-GCM, correct answers.
    Good,
    /// `(status, errorName)` for every request.
    Error(u16, &'static str),
    /// A 200 with this body for every request.
    Raw(&'static str),
    /// Encrypt answers with a ciphertext one byte short.
    ShortCiphertext,
    /// Encrypt answers with a wrong CDIV.
    BadCdiv,
    /// Encrypt answers with 21 bytes of ciphertextMetadata (and a matching CDIV).
    LongMetadata,
    /// Decrypt answers with garbage of the right length (the inner layer fails).
    CorruptDecrypt,
}

/// One external key in the responder.
#[derive(Clone, Debug)]
pub struct ExtKey {
    pub spec: &'static str,
    pub usage: Vec<&'static str>,
    pub status: &'static str,
    pub material: [u8; 32],
}

impl ExtKey {
    pub fn aes256() -> Self {
        let mut material = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut material)
            .expect("rng");
        Self {
            spec: "AES_256",
            usage: vec!["ENCRYPT", "DECRYPT"],
            status: "ENABLED",
            material,
        }
    }
}

/// What the responder saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub host: String,
    pub signed_headers: String,
    pub body: Value,
}

pub struct ResponderState {
    pub mode: Mode,
    pub health_statuses: Vec<&'static str>,
    pub keys: HashMap<String, ExtKey>,
    pub prefix: String,
    pub delay: Duration,
    pub credentials: Vec<(String, String)>,
    pub seen: Vec<Seen>,
}

/// The responder: a TLS server on 127.0.0.1:0 with the dev certificate for
/// `xks.test.example`.
#[derive(Clone)]
pub struct Responder {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ResponderState>>,
}

impl Responder {
    pub async fn start(prefix: &str) -> Self {
        Self::start_with_tls(prefix, server_tls()).await
    }

    /// A responder that requires a client certificate issued by the dev CA (mTLS).
    pub async fn start_mtls(prefix: &str) -> Self {
        Self::start_with_tls(prefix, server_tls_mtls()).await
    }

    async fn start_with_tls(prefix: &str, tls: Arc<rustls::ServerConfig>) -> Self {
        let state = Arc::new(Mutex::new(ResponderState {
            mode: Mode::Good,
            health_statuses: vec!["ACTIVE"],
            keys: HashMap::from([("key-1".to_owned(), ExtKey::aes256())]),
            prefix: prefix.to_owned(),
            delay: Duration::ZERO,
            credentials: vec![(AKID.to_owned(), SECRET.to_owned())],
            seen: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let st = state.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(&st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn set<F: FnOnce(&mut ResponderState)>(&self, f: F) {
        f(&mut self.state.lock().expect("lock"));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").seen.clone()
    }

    pub fn clear_seen(&self) {
        self.state.lock().expect("lock").seen.clear();
    }
}

/// Like [`server_tls`], but every client must present a certificate from the dev CA.
pub fn server_tls_mtls() -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(repo().join("certs/ca.pem")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let chain = CertificateDer::pem_file_iter(repo().join("certs/server-ecdsa.pem"))
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(repo().join("certs/server-ecdsa.key")).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

pub fn server_tls() -> Arc<rustls::ServerConfig> {
    let chain = CertificateDer::pem_file_iter(repo().join("certs/server-ecdsa.pem"))
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(repo().join("certs/server-ecdsa.key")).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).expect("json"),
    )));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, name: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"errorName": name, "errorMessage": "canned by the test responder"}),
    )
}

/// The spec's AAD given to AES-GCM: u16 len ‖ aad ‖ u8 len ‖ metadata.
fn spec_aad(aad: &[u8], md: &[u8]) -> Vec<u8> {
    let mut out = (u16::try_from(aad.len()).expect("aad len"))
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(aad);
    out.push(u8::try_from(md.len()).expect("md len"));
    out.extend_from_slice(md);
    out
}

fn field(body: &Value, name: &str) -> Vec<u8> {
    body.get(name)
        .and_then(Value::as_str)
        .map(|s| STANDARD.decode(s).expect("base64 field"))
        .unwrap_or_default()
}

async fn answer(
    state: &Arc<Mutex<ResponderState>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let signed_headers = auth
        .split("SignedHeaders=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_owned();
    let (delay, creds) = {
        let mut st = state.lock().expect("lock");
        st.seen.push(Seen {
            path: parts.uri.path().to_owned(),
            host: parts
                .headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            signed_headers: signed_headers.clone(),
            body: json.clone(),
        });
        (st.delay, st.credentials.clone())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let set = CredentialSet::new(
        creds
            .iter()
            .map(|(a, s)| Credential::new(a.clone(), SecretString::from(s.as_str())))
            .collect(),
    )
    .expect("credentials");
    let policy = VerifyPolicy {
        service: "kms-xks-proxy".to_owned(),
        allowed_regions: None,
        max_skew: Duration::from_secs(300),
    };
    if xks_proxy::sigv4::verify(&parts, &bytes, &set, &policy, SystemTime::now()).is_err() {
        return error(401, "AuthenticationFailedException");
    }

    let st = state.lock().expect("lock");
    // Any path under the configured prefix (`<prefix>[/more]/kms/xks/v1`) is served.
    let path = parts.uri.path();
    let Some((tenant, rest)) = path.split_once("/kms/xks/v1") else {
        return error(404, "InvalidUriPathException");
    };
    if !tenant.starts_with(&st.prefix) {
        return error(404, "InvalidUriPathException");
    }
    match &st.mode {
        Mode::Error(status, name) => return error(*status, name),
        Mode::Raw(body) => {
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            r.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        _ => {}
    }
    if rest == "/health" {
        let details: Vec<Value> = st
            .health_statuses
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"id": format!("hsm-{i}"), "model": "test-hsm", "healthStatus": s}))
            .collect();
        return reply(
            200,
            json!({
                "xksProxyFleetSize": 1,
                "xksProxyVendor": "test",
                "xksProxyModel": "responder 1",
                "ekmVendor": "test",
                "ekmFleetDetails": details,
            }),
        );
    }
    let Some(rest) = rest.strip_prefix("/keys/") else {
        return error(404, "InvalidUriPathException");
    };
    let Some((key_id, op)) = rest.split_once('/') else {
        return error(404, "InvalidUriPathException");
    };
    let Some(key) = st.keys.get(key_id).cloned() else {
        return error(404, "KeyNotFoundException");
    };
    let gcm = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key.material).expect("key"),
    );
    match op {
        "metadata" => reply(
            200,
            json!({"keySpec": key.spec, "keyUsage": key.usage, "keyStatus": key.status}),
        ),
        "encrypt" => {
            if key.status != "ENABLED" {
                return error(400, "InvalidStateException");
            }
            let aad = field(&json, "additionalAuthenticatedData");
            let mut data = field(&json, "plaintext");
            let md: Vec<u8> = if matches!(st.mode, Mode::LongMetadata) {
                vec![b'm'; 21]
            } else {
                b"v1".to_vec()
            };
            let iv = [9u8; 12];
            let tag = gcm
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(iv),
                    ring::aead::Aad::from(spec_aad(&aad, &md)),
                    &mut data,
                )
                .expect("seal");
            let mut cdiv_input = aad.clone();
            for part in [&md[..], &iv[..], &data[..], tag.as_ref()] {
                cdiv_input.extend_from_slice(part);
            }
            let mut cdiv = ring::digest::digest(&ring::digest::SHA256, &cdiv_input)
                .as_ref()
                .to_vec();
            if matches!(st.mode, Mode::BadCdiv) {
                cdiv[0] ^= 1;
            }
            if matches!(st.mode, Mode::ShortCiphertext) {
                data.pop();
            }
            reply(
                200,
                json!({
                    "ciphertext": b64(&data),
                    "initializationVector": b64(&iv),
                    "authenticationTag": b64(tag.as_ref()),
                    "ciphertextMetadata": b64(&md),
                    "ciphertextDataIntegrityValue": b64(&cdiv),
                }),
            )
        }
        "decrypt" => {
            if key.status != "ENABLED" {
                return error(400, "InvalidStateException");
            }
            let aad = field(&json, "additionalAuthenticatedData");
            let md = field(&json, "ciphertextMetadata");
            let iv: [u8; 12] = field(&json, "initializationVector")
                .try_into()
                .expect("12-byte iv");
            let mut buf = field(&json, "ciphertext");
            let n = buf.len();
            buf.extend_from_slice(&field(&json, "authenticationTag"));
            let Ok(plain) = gcm.open_in_place(
                ring::aead::Nonce::assume_unique_for_key(iv),
                ring::aead::Aad::from(spec_aad(&aad, &md)),
                &mut buf,
            ) else {
                return error(400, "InvalidCiphertextException");
            };
            let mut plain = plain.to_vec();
            assert_eq!(plain.len(), n);
            if matches!(st.mode, Mode::CorruptDecrypt) {
                plain[0] ^= 0xff;
            }
            reply(200, json!({"plaintext": b64(&plain)}))
        }
        _ => error(404, "InvalidUriPathException"),
    }
}
