//! Shared test harness: a real proxy on 127.0.0.1:0 with TLS and a software keystore in
//! a temp dir, and a client that signs every request like KMS (aws-sigv4).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use xks_proxy::backend::KeyUsage;
use xks_proxy::backend::software::{Keystore, MasterKey};
use xks_proxy::config::Config;
use xks_proxy::secret::SecretString;
use xks_proxy::server::Running;

pub const REGION: &str = "us-east-1";
pub const SERVICE: &str = "kms-xks-proxy";
pub const PREFIX: &str = "/tenant-a";
pub const PRINCIPAL: &str = "arn:aws:iam::111122223333:role/app";
pub const KEY_ARN: &str =
    "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn ca_pem() -> Vec<u8> {
    std::fs::read(repo().join("certs/ca.pem")).expect("dev CA")
}

/// A credential in the proxy's config for `PREFIX`.
#[derive(Clone, Debug)]
pub struct Cred {
    pub akid: String,
    pub secret: SecretString,
}

/// Knobs for one test proxy.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub extra_server: String,
    pub extra_keystores: String,
    pub allowed_keys: Option<Vec<String>>,
    pub simulated_latency_ms: u64,
    pub rsa: bool,
    pub ping_listener: bool,
}

/// A running proxy and everything a test needs to talk to it.
pub struct TestProxy {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub creds: Vec<Cred>,
    pub config: Config,
}

/// Keys every test proxy has.
pub const KEY: &str = "key-1";
pub const KEY_ENCRYPT_ONLY: &str = "key-enc-only";
pub const KEY_DECRYPT_ONLY: &str = "key-dec-only";
pub const KEY_DISABLED: &str = "key-disabled";

pub fn write_keystore(dir: &Path) -> MasterKey {
    let master = MasterKey::generate();
    std::fs::write(dir.join("master.key"), master.to_base64().expose()).expect("master");
    let mut ks = Keystore::create(&dir.join("keystore.json"), &master).expect("keystore");
    ks.create_key(KEY, &[KeyUsage::Encrypt, KeyUsage::Decrypt])
        .expect("key");
    ks.create_key(KEY_ENCRYPT_ONLY, &[KeyUsage::Encrypt])
        .expect("key");
    ks.create_key(KEY_DECRYPT_ONLY, &[KeyUsage::Decrypt])
        .expect("key");
    ks.create_key(KEY_DISABLED, &[KeyUsage::Encrypt, KeyUsage::Decrypt])
        .expect("key");
    ks.set_enabled(KEY_DISABLED, false).expect("disable");
    ks.save().expect("save");
    master
}

/// Writes a config + keystore into a temp dir and returns (dir, config text, creds).
pub fn prepare(opts: &Options) -> (tempfile::TempDir, String, Vec<Cred>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_keystore(dir.path());
    let creds: Vec<Cred> = (0..2)
        .map(|_| {
            let (akid, secret) = xks_proxy::config::generate_credential();
            Cred { akid, secret }
        })
        .collect();
    let mut cred_toml = String::new();
    for (i, c) in creds.iter().enumerate() {
        std::fs::write(dir.path().join(format!("secret{i}")), c.secret.expose()).expect("secret");
        cred_toml += &format!(
            "[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret{i}\"\n",
            c.akid
        );
    }
    let certs = repo().join("certs");
    let (cert, key) = if opts.rsa {
        ("server-rsa.pem", "server-rsa.key")
    } else {
        ("server-ecdsa.pem", "server-ecdsa.key")
    };
    let allowed = opts
        .allowed_keys
        .as_ref()
        .map(|k| {
            format!(
                "allowed_keys = {}\n",
                serde_json::to_string(k).expect("json")
            )
        })
        .unwrap_or_default();
    let ping = if opts.ping_listener {
        "ping_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
{ping}{extra_server}
[server.tls]
certificate = "{cert}"
private_key = "{key}"

[backend]
kind = "software"
keystore = "keystore.json"
master_key_file = "master.key"
simulated_latency_ms = {lat}

[[keystores]]
path_prefix = "{PREFIX}"
{allowed}{cred_toml}
{extra_keystores}
"#,
        extra_server = opts.extra_server,
        cert = certs.join(cert).display(),
        key = certs.join(key).display(),
        lat = opts.simulated_latency_ms,
        extra_keystores = opts.extra_keystores,
    );
    std::fs::write(dir.path().join("proxy.toml"), &text).expect("config");
    (dir, text, creds)
}

impl TestProxy {
    pub async fn start(opts: Options) -> TestProxy {
        let (dir, text, creds) = prepare(&opts);
        Self::start_with(dir, &text, creds).await
    }

    /// Starts a proxy from config text (typically `prepare`'s, edited by the test).
    pub async fn start_with(dir: tempfile::TempDir, text: &str, creds: Vec<Cred>) -> TestProxy {
        let config = Config::from_toml(text, dir.path()).expect("valid config");
        let backends = xks_proxy::backend::open_all(&config.backends).expect("backends");
        let running = xks_proxy::server::start(&config, backends)
            .await
            .expect("start");
        TestProxy {
            running,
            dir,
            creds,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.local_addr
    }

    /// `https://localhost:PORT` (the dev certificate names localhost).
    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.addr().port())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    pub fn client(&self, http2: bool) -> Client {
        Client::new(self.addr(), http2, self.creds[0].clone())
    }
}

/// A KMS-like client: every request freshly signed with aws-sigv4.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub cred: Cred,
    pub region: String,
}

/// A response: status, parsed JSON body (or Null) and the HTTP version used.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub version: http::Version,
}

impl Reply {
    pub fn error_name(&self) -> &str {
        self.body["errorName"].as_str().unwrap_or("")
    }
}

impl Client {
    pub fn new(addr: SocketAddr, http2: bool, cred: Cred) -> Client {
        let ca = reqwest::Certificate::from_pem(&ca_pem()).expect("ca");
        let mut b = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", addr)
            .timeout(std::time::Duration::from_secs(10));
        b = if http2 { b } else { b.http1_only() };
        Client {
            http: b.build().expect("client"),
            cred,
            region: REGION.into(),
        }
    }

    pub fn with_cred(&self, cred: Cred) -> Client {
        Client {
            cred,
            ..self.clone()
        }
    }

    /// Signs and sends a POST like KMS.
    pub async fn post(&self, url: &str, body: &Value) -> Reply {
        self.post_raw(
            url,
            Bytes::from(serde_json::to_vec(body).expect("json")),
            |_| {},
        )
        .await
    }

    /// Signs, lets `tamper` modify the signed request, then sends it.
    pub async fn post_raw(
        &self,
        url: &str,
        body: Bytes,
        tamper: impl FnOnce(&mut http::Request<Bytes>),
    ) -> Reply {
        let mut req = http::Request::post(url).body(body).expect("request");
        sign_like_kms(&mut req, &self.cred.akid, &self.cred.secret, &self.region);
        tamper(&mut req);
        self.send(req).await
    }

    pub async fn send(&self, req: http::Request<Bytes>) -> Reply {
        let req =
            reqwest::Request::try_from(req.map(reqwest::Body::from)).expect("reqwest request");
        let resp = self.http.execute(req).await.expect("send");
        let status = resp.status().as_u16();
        let version = resp.version();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            version,
        }
    }
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64")
}

pub fn metadata(op: &str) -> Value {
    json!({
        "kmsRequestId": format!("req-{}", uuid::Uuid::new_v4()),
        "kmsOperation": op,
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
    })
}

pub fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>) -> Value {
    let mut v = json!({
        "requestMetadata": metadata("Encrypt"),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    if let Some(a) = aad {
        v["additionalAuthenticatedData"] = json!(b64(a));
    }
    v
}

/// An Encrypt body without `ciphertextDataIntegrityValueAlgorithm` (no CDIV asked).
pub fn encrypt_body_without_cdiv(plaintext: &[u8]) -> Value {
    let mut v = encrypt_body(plaintext, None);
    v.as_object_mut()
        .expect("object")
        .remove("ciphertextDataIntegrityValueAlgorithm");
    v
}

/// The decrypt body for an encrypt response (and the AAD used).
pub fn decrypt_body(enc: &Value, aad: Option<&[u8]>) -> Value {
    let mut v = json!({
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(md) = enc.get("ciphertextMetadata") {
        v["ciphertextMetadata"] = md.clone();
    }
    if let Some(a) = aad {
        v["additionalAuthenticatedData"] = json!(b64(a));
    }
    v
}

pub fn key_url(proxy: &TestProxy, key: &str, op: &str) -> String {
    proxy.url(&format!("{PREFIX}/kms/xks/v1/keys/{key}/{op}"))
}

pub fn health_url(proxy: &TestProxy) -> String {
    proxy.url(&format!("{PREFIX}/kms/xks/v1/health"))
}

pub fn health_body() -> Value {
    json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}})
}

/// A rustls client config trusting the dev CA (for raw TLS tests).
pub fn rustls_client(
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca_pem()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(s) = suites {
        provider.cipher_suites = s;
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

use rustls_pki_types::pem::PemObject as _;

/// A `tracing` writer that keeps everything written, for tests that read the logs.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

/// The admin listener's `/metrics` text (Prometheus exposition format).
pub async fn scrape_metrics(admin: impl std::fmt::Display) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
}

/// Signs `req` as KMS does (SigV4, service `kms-xks-proxy`, now), then sets the JSON
/// content type (KMS does not sign it).
pub fn sign_like_kms(
    req: &mut http::Request<Bytes>,
    akid: &str,
    secret: &SecretString,
    region: &str,
) {
    xks_proxy::sigv4::sign_request(req, akid, secret, region, SERVICE, SystemTime::now())
        .expect("sign");
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
}

/// A signed Encrypt of `plaintext` under [`KEY`], for tests that drive the connection
/// themselves: the HTTP/2 form (absolute URI) or the HTTP/1.1 form (path and Host).
pub fn signed_encrypt(p: &TestProxy, plaintext: &[u8], h2: bool) -> http::Request<Bytes> {
    let authority = format!("localhost:{}", p.addr().port());
    let path = format!("{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt");
    let body = Bytes::from(serde_json::to_vec(&encrypt_body(plaintext, None)).expect("json"));
    let mut req = if h2 {
        http::Request::post(format!("https://{authority}{path}"))
    } else {
        http::Request::post(path).header(http::header::HOST, &authority)
    }
    .body(body)
    .expect("request");
    sign_like_kms(&mut req, &p.creds[0].akid, &p.creds[0].secret, REGION);
    req
}

/// A TCP connection to `addr` from `source` (any 127/8 address works on loopback).
pub async fn tcp_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// A TLS connection to the proxy offering `alpn`, optionally with a client certificate,
/// for tests that speak HTTP on it themselves.
pub async fn raw_tls(
    addr: SocketAddr,
    source: IpAddr,
    alpn: &[u8],
    client_cert: Option<(&str, &str)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca_pem()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(repo().join(cert))
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert");
            let key =
                rustls_pki_types::PrivateKeyDer::from_pem_file(repo().join(key)).expect("key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client auth")
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tcp_from(source, addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}
