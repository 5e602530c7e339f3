//! Calls an XKS proxy exactly as AWS KMS does: SigV4-signed HTTPS POSTs (service
//! `kms-xks-proxy`, signed headers `host;x-amz-date`) carrying `requestMetadata`, a
//! 250 ms budget per attempt with one retry on a network timeout, TLS ≥ 1.2 with the
//! spec's cipher suites, an optional client certificate, and a strict check of every
//! answer (sizes, lengths, CDIV). Anything off becomes an [`XksFailure`], and the
//! tables at the bottom map each failure to what KMS reports for that operation.
//!
//! `--xks-resolve HOST=IP:PORT` (test-only) dials `IP:PORT` for `HOST` while SNI,
//! certificate checks, `Host` and the SigV4 host stay `HOST`: reqwest's DNS override
//! uses the override's port when the URL has none, and the URL never has one because
//! the endpoint pattern forbids it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;

use super::error::{Exception, KmsError};
use super::store::ConnectionErrorCode;
use crate::api::wire::{
    Base64Bytes, Base64Secret, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse,
    ErrorResponse, HealthRequest, HealthResponse, MetadataRequest, MetadataResponse,
    RequestMetadata,
};
use crate::secret::{SecretBytes, SecretString};
use crate::sigv4;

/// The SigV4 service name KMS signs proxy calls with.
pub const XKS_SERVICE: &str = "kms-xks-proxy";
/// KMS's per-attempt timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// Proxy answers are small; anything larger is not a valid answer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How the emulator reaches proxies.
#[derive(Debug, Clone)]
pub struct XksClientConfig {
    /// Per attempt, covering TCP + TLS + request + response. KMS uses 250 ms.
    pub timeout: Duration,
    /// PEM roots trusted for proxy certificates. `None`: the system bundle if one is
    /// found, else nothing (every handshake fails, as with an untrusted CA).
    pub ca_bundle: Option<PathBuf>,
    /// PEM certificate chain and key presented to proxies that ask for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Test-only DNS overrides: endpoint host → address actually dialled.
    pub resolve: Vec<(String, SocketAddr)>,
    /// Keep-alive pooling (KMS-like); `false` makes every call a cold connection.
    pub pool: bool,
    /// Ask for (and check) the CDIV on every Encrypt.
    pub cdiv: bool,
    /// Injected as `kmsViaService` on Encrypt/Decrypt, to exercise proxy policies.
    pub via_service: Option<String>,
}

impl Default for XksClientConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            ca_bundle: None,
            client_cert: None,
            resolve: Vec::new(),
            pool: true,
            cdiv: true,
            via_service: None,
        }
    }
}

/// Why the client could not be built (bad files or TLS material).
#[derive(Debug, thiserror::Error)]
pub enum XksClientError {
    #[error("cannot read the XKS CA bundle {path}: {reason}")]
    CaBundle { path: String, reason: String },
    #[error("cannot read the XKS client certificate or key: {0}")]
    ClientCert(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("HTTP client: {0}")]
    Http(String),
}

/// Where and as whom to call one proxy: a snapshot of a store's settings.
#[derive(Debug, Clone)]
pub struct XksTarget {
    pub endpoint: String,
    pub path: String,
    pub access_key_id: String,
    pub secret: SecretString,
}

/// The proxy's outer layer, as carried in the emulator's ciphertext blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    /// Empty when the proxy sent no `ciphertextMetadata`.
    pub metadata: Vec<u8>,
}

/// Every way a proxy call can fail, in KMS's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XksFailure {
    /// The proxy answered with one of the spec's error names.
    Proxy(ProxyError),
    /// DNS or TCP connect failed.
    Unreachable,
    /// TLS handshake failed (untrusted or wrong-name certificate, mTLS refusal, …).
    Tls,
    /// No answer within the timeout, twice.
    TimedOut,
    /// Any other network or I/O failure mid-request.
    Network,
    /// The answer was not a valid spec response; the reason is for logs only.
    Malformed(&'static str),
    /// GetHealthStatus: every external key manager is UNAVAILABLE.
    AllUnavailable,
    /// The emulator could not build or sign the request.
    Internal,
}

/// The spec's 12 `errorName`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    Validation,
    InvalidState,
    InvalidCiphertext,
    InvalidKeyUsage,
    AuthenticationFailed,
    AccessDenied,
    KeyNotFound,
    InvalidUriPath,
    Throttling,
    UnsupportedOperation,
    DependencyTimeout,
    Internal,
}

impl ProxyError {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "ValidationException" => Self::Validation,
            "InvalidStateException" => Self::InvalidState,
            "InvalidCiphertextException" => Self::InvalidCiphertext,
            "InvalidKeyUsageException" => Self::InvalidKeyUsage,
            "AuthenticationFailedException" => Self::AuthenticationFailed,
            "AccessDeniedException" => Self::AccessDenied,
            "KeyNotFoundException" => Self::KeyNotFound,
            "InvalidUriPathException" => Self::InvalidUriPath,
            "ThrottlingException" => Self::Throttling,
            "UnsupportedOperationException" => Self::UnsupportedOperation,
            "DependencyTimeoutException" => Self::DependencyTimeout,
            "InternalException" => Self::Internal,
            _ => return None,
        })
    }
}

/// Calls proxies. Cheap to clone; one connection pool shared by every store (pools
/// are per host, so stores with different endpoints never share connections).
#[derive(Debug, Clone)]
pub struct XksClient {
    http: reqwest::Client,
    region: String,
    cdiv: bool,
    via_service: Option<String>,
}

impl XksClient {
    pub fn new(config: &XksClientConfig, region: &str) -> Result<Self, XksClientError> {
        let tls = tls_config(config)?;
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .http1_only()
            .tcp_nodelay(true)
            // A proxy is dialled directly, never through HTTP(S)_PROXY from the
            // environment (loopback tests must stay on loopback).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if !config.pool {
            builder = builder.pool_max_idle_per_host(0);
        }
        for (host, addr) in &config.resolve {
            builder = builder.resolve(host, *addr);
        }
        let http = builder
            .build()
            .map_err(|e| XksClientError::Http(e.to_string()))?;
        Ok(Self {
            http,
            region: region.to_owned(),
            cdiv: config.cdiv,
            via_service: config.via_service.clone(),
        })
    }

    /// GetHealthStatus. All-UNAVAILABLE fleets are a failure ([`XksFailure::AllUnavailable`]).
    pub async fn health(
        &self,
        target: &XksTarget,
        metadata: RequestMetadata,
    ) -> Result<HealthResponse, XksFailure> {
        let body = to_json(&HealthRequest {
            request_metadata: metadata,
        })?;
        let resp: HealthResponse = self.call(target, "/health", body).await?;
        check_health(&resp)?;
        Ok(resp)
    }

    /// GetKeyMetadata. The caller judges the values (KMS's CreateKey rules).
    pub async fn key_metadata(
        &self,
        target: &XksTarget,
        xks_key_id: &str,
        metadata: RequestMetadata,
    ) -> Result<MetadataResponse, XksFailure> {
        let body = to_json(&MetadataRequest {
            request_metadata: metadata,
        })?;
        let resp: MetadataResponse = self
            .call(target, &format!("/keys/{xks_key_id}/metadata"), body)
            .await?;
        if resp.key_usage.len() > 10 {
            return Err(XksFailure::Malformed("keyUsage has more than 10 entries"));
        }
        Ok(resp)
    }

    /// Encrypt `plaintext` (the emulator's inner layer) under the external key,
    /// asking for a CDIV and checking the answer like KMS.
    pub async fn encrypt(
        &self,
        target: &XksTarget,
        xks_key_id: &str,
        mut metadata: RequestMetadata,
        plaintext: &SecretBytes,
        aad: &[u8],
    ) -> Result<Sealed, XksFailure> {
        metadata.kms_via_service = self.via_service.clone();
        let req = EncryptRequest {
            request_metadata: metadata,
            plaintext: Base64Secret(plaintext.clone()),
            encryption_algorithm: "AES_GCM".to_owned(),
            additional_authenticated_data: Some(Base64Bytes(aad.to_vec())),
            ciphertext_data_integrity_value_algorithm: self.cdiv.then(|| "SHA_256".to_owned()),
        };
        // The "plaintext" sent is the emulator's inner layer, already encrypted under
        // the key's own material: the caller's plaintext never leaves the emulator.
        let body = to_json(&req)?;
        let resp: EncryptResponse = self
            .call(target, &format!("/keys/{xks_key_id}/encrypt"), body)
            .await?;
        check_encrypt(&resp, plaintext.len(), aad, self.cdiv)?;
        Ok(Sealed {
            ciphertext: resp.ciphertext.0,
            iv: resp.initialization_vector.0,
            tag: resp.authentication_tag.0,
            metadata: resp.ciphertext_metadata.map(|m| m.0).unwrap_or_default(),
        })
    }

    /// Decrypt the proxy's outer layer; the result is the emulator's inner layer.
    pub async fn decrypt(
        &self,
        target: &XksTarget,
        xks_key_id: &str,
        mut metadata: RequestMetadata,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<SecretBytes, XksFailure> {
        metadata.kms_via_service = self.via_service.clone();
        let req = DecryptRequest {
            request_metadata: metadata,
            ciphertext: Base64Bytes(sealed.ciphertext.clone()),
            encryption_algorithm: "AES_GCM".to_owned(),
            initialization_vector: Base64Bytes(sealed.iv.clone()),
            authentication_tag: Base64Bytes(sealed.tag.clone()),
            additional_authenticated_data: Some(Base64Bytes(aad.to_vec())),
            ciphertext_metadata: (!sealed.metadata.is_empty())
                .then(|| Base64Bytes(sealed.metadata.clone())),
        };
        let body = to_json(&req)?;
        let resp: DecryptResponse = self
            .call(target, &format!("/keys/{xks_key_id}/decrypt"), body)
            .await?;
        if resp.plaintext.0.len() != sealed.ciphertext.len() {
            return Err(XksFailure::Malformed(
                "decrypt plaintext length differs from the ciphertext length",
            ));
        }
        Ok(resp.plaintext.0)
    }

    /// One signed POST, retried once on a network timeout; returns the decoded 200
    /// body or the failure.
    async fn call<T: DeserializeOwned>(
        &self,
        target: &XksTarget,
        suffix: &str,
        body: Vec<u8>,
    ) -> Result<T, XksFailure> {
        let Some(host) = target.endpoint.strip_prefix("https://") else {
            return Err(XksFailure::Internal);
        };
        let uri = format!("{}{}{}", target.endpoint, target.path, suffix);
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(&uri)
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .map_err(|_| XksFailure::Internal)?;
        sigv4::sign_request(
            &mut req,
            &target.access_key_id,
            &target.secret,
            &self.region,
            XKS_SERVICE,
            SystemTime::now(),
        )
        .map_err(|e| {
            tracing::error!(error = %e, "cannot sign the proxy request");
            XksFailure::Internal
        })?;

        let mut attempt = 0;
        let (status, bytes) = loop {
            attempt += 1;
            let request = reqwest::Request::try_from(req.clone()).map_err(|e| {
                tracing::error!(error = %e, "cannot build the proxy request");
                XksFailure::Internal
            })?;
            match self.send(request).await {
                Ok(answer) => break answer,
                // KMS retries a network timeout once, and nothing else.
                Err(XksFailure::TimedOut) if attempt == 1 => {
                    tracing::debug!(%uri, "proxy call timed out; retrying once");
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        if status == http::StatusCode::OK {
            return serde_json::from_slice(&bytes)
                .map_err(|_| XksFailure::Malformed("200 body is not the operation's JSON shape"));
        }
        let err: ErrorResponse = serde_json::from_slice(&bytes)
            .map_err(|_| XksFailure::Malformed("error answer without a JSON error body"))?;
        // KMS logs the proxy's errorMessage but never passes it on to its caller.
        let message: String = err
            .error_message
            .as_deref()
            .unwrap_or("")
            .chars()
            .filter(|c| (' '..='~').contains(c))
            .take(512)
            .collect();
        tracing::info!(
            %uri,
            status = status.as_u16(),
            // The proxy's words: `Debug`-formatted, so escaped in both log formats.
            error_name = ?err.error_name.chars().take(64).collect::<String>(),
            error_message = ?message,
            "proxy returned an error"
        );
        ProxyError::parse(&err.error_name)
            .map(|e| Err(XksFailure::Proxy(e)))
            .unwrap_or(Err(XksFailure::Malformed("unknown errorName")))
    }

    async fn send(
        &self,
        request: reqwest::Request,
    ) -> Result<(http::StatusCode, Bytes), XksFailure> {
        let mut resp = self.http.execute(request).await.map_err(|e| classify(&e))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&e))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(XksFailure::Malformed("response body too large"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, Bytes::from(body)))
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, XksFailure> {
    serde_json::to_vec(v).map_err(|_| XksFailure::Internal)
}

/// Sorts a transport error into KMS's categories by looking down its source chain.
fn classify(e: &reqwest::Error) -> XksFailure {
    if e.is_timeout() {
        return XksFailure::TimedOut;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return XksFailure::Tls;
        }
        source = match err.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::TimedOut => return XksFailure::TimedOut,
            // `io::Error::source` skips the error it wraps (hyper-util wraps
            // tokio-rustls's io::Error in another one), so step into it explicitly.
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => None,
            },
            None => err.source(),
        };
    }
    if e.is_connect() {
        XksFailure::Unreachable
    } else {
        XksFailure::Network
    }
}

fn check_health(resp: &HealthResponse) -> Result<(), XksFailure> {
    if resp.xks_proxy_fleet_size == 0 {
        return Err(XksFailure::Malformed("xksProxyFleetSize must be > 0"));
    }
    if resp.xks_proxy_vendor.is_empty()
        || resp.xks_proxy_model.is_empty()
        || resp.ekm_vendor.is_empty()
    {
        return Err(XksFailure::Malformed(
            "health vendor/model fields must be present",
        ));
    }
    if !(1..=10).contains(&resp.ekm_fleet_details.len()) {
        return Err(XksFailure::Malformed(
            "ekmFleetDetails must have 1-10 entries",
        ));
    }
    let mut serving = false;
    for d in &resp.ekm_fleet_details {
        match d.health_status.as_str() {
            // DEGRADED still serves requests.
            "ACTIVE" | "DEGRADED" => serving = true,
            "UNAVAILABLE" => {}
            _ => return Err(XksFailure::Malformed("unknown healthStatus")),
        }
    }
    if serving {
        Ok(())
    } else {
        Err(XksFailure::AllUnavailable)
    }
}

// The spec's CDIV is one pure function, shared with the proxy side (`api::aad`), so
// what KMS checks and what the proxy computes cannot drift apart.
pub use crate::api::aad::cdiv;

fn check_encrypt(
    resp: &EncryptResponse,
    plaintext_len: usize,
    aad: &[u8],
    cdiv_requested: bool,
) -> Result<(), XksFailure> {
    if resp.ciphertext.0.len() != plaintext_len {
        return Err(XksFailure::Malformed(
            "ciphertext length differs from the plaintext length",
        ));
    }
    if !matches!(resp.initialization_vector.0.len(), 12 | 16) {
        return Err(XksFailure::Malformed(
            "initializationVector must be 12 or 16 bytes",
        ));
    }
    if resp.authentication_tag.0.len() != 16 {
        return Err(XksFailure::Malformed("authenticationTag must be 16 bytes"));
    }
    let metadata = resp
        .ciphertext_metadata
        .as_ref()
        .map(|m| m.0.as_slice())
        .unwrap_or_default();
    if metadata.len() > 20 {
        return Err(XksFailure::Malformed(
            "ciphertextMetadata longer than 20 bytes",
        ));
    }
    if cdiv_requested {
        let Some(got) = &resp.ciphertext_data_integrity_value else {
            return Err(XksFailure::Malformed("CDIV requested but missing"));
        };
        let want = cdiv(
            aad,
            metadata,
            &resp.initialization_vector.0,
            &resp.ciphertext.0,
            &resp.authentication_tag.0,
        );
        // The CDIV is an integrity check, not a secret: a plain comparison is fine.
        if got.0 != want {
            return Err(XksFailure::Malformed("CDIV mismatch"));
        }
    }
    Ok(())
}

fn tls_config(config: &XksClientConfig) -> Result<rustls::ClientConfig, XksClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let bundle = config.ca_bundle.clone().or_else(system_bundle);
    if let Some(path) = &bundle {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| XksClientError::CaBundle {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(XksClientError::CaBundle {
                path: path.display().to_string(),
                reason: "no usable certificate in the file".to_owned(),
            });
        }
    } else {
        tracing::warn!("no XKS CA bundle: every proxy TLS handshake will fail");
    }
    // The spec's four suites: what a proxy must offer at least one of.
    let base = crate::crypto::tls::default_provider();
    let wanted = [
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ];
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: base
            .cipher_suites
            .iter()
            .copied()
            .filter(|s| wanted.contains(&s.suite()))
            .collect(),
        ..base
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| XksClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| XksClientError::ClientCert(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| XksClientError::ClientCert(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| XksClientError::ClientCert(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn system_bundle() -> Option<PathBuf> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

// --- What KMS reports for each failure (brief §7) ----------------------------------

const MSG_INVALID_RESPONSE: &str = "AWS KMS cannot interpret the response from the external key store proxy. If you see this error repeatedly, report it to your external key store proxy administrator.";
const MSG_KEY_NOT_ENABLED: &str = "The external key associated with this KMS key in an external key store is not enabled in the external key manager. Enable the external key in the external key manager and retry the request.";
const MSG_PROXY_INVALID_CIPHERTEXT: &str = "The external key store proxy rejected the request because the specified ciphertext or encryption context is corrupted, missing, or otherwise invalid.";
pub const MSG_CORRUPT_PROXY_CIPHERTEXT: &str = "The ciphertext that the external key store proxy submitted for decryption, or the encryption context, is corrupted, missing, or otherwise invalid.";
const MSG_KEY_USAGE: &str = "The external key associated with this KMS key in an external key store does not support the requested operation. Enable the operation on the key in your external key manager, and try the request again.";
const MSG_AUTH: &str = "The external key store proxy rejected the request because it could not authenticate AWS KMS. Verify the XKS proxy authentication credentials for your external key store and update if necessary.";
const MSG_ACCESS_DENIED: &str = "The external key store proxy denied access to the operation. Verify that the user and the external key are both authorized for this operation, and try the request again.";
const MSG_KEY_NOT_FOUND: &str = "The external key associated with this KMS key in an external key store was not found in its external key manager. If the external key ID associated with this KMS key is incorrect, create a new KMS key with the correct external key ID.";
const MSG_URI_PATH: &str = "The external key store proxy rejected the request because of an invalid URI path. Verify the URI path for your external key store and update if necessary.";
const MSG_UNSUPPORTED: &str = "The external key store proxy rejected the request because it does not support the requested operation. If you see this error repeatedly, report it to your external key store proxy administrator.";
const MSG_DEPENDENCY_TIMEOUT: &str = "The external key store proxy did not respond to the request in the time allotted. Retry the request. If you see this error repeatedly, report it to your external key store proxy administrator.";
const MSG_THROTTLED: &str = "The external key store proxy rejected the request due to a very high request rate. Reduce the frequency of your calls using KMS keys in this external key store.";
const MSG_INTERNAL: &str = "The external key store proxy rejected the request because it cannot communicate with the external key manager. Verify that the external key store proxy configuration is correct and that the external key manager is available.";
const MSG_UNREACHABLE: &str = "AWS KMS cannot communicate with the external key store proxy. This might be a transient network issue. If you see this error repeatedly, verify that your external key store proxy is active and is connected to the network, and that its endpoint URI is correct in your external keystore.";
const MSG_TLS: &str = "AWS KMS cannot establish a TLS connection to the external key store proxy. Verify the TLS configuration, including its certificate.";
const MSG_TIMED_OUT: &str = "AWS KMS rejected the request because the external key store proxy did not respond in time. Retry the request. If you see this error repeatedly, report it to your external key store proxy administrator.";
const MSG_ALL_UNAVAILABLE: &str = "The external key store proxy reported that none of its external key managers is available. Verify that the external key manager is running and reachable from the external key store proxy.";
const MSG_EMULATOR_INTERNAL: &str = "AWS KMS could not send the request to the external key store proxy because of an internal error. The request can be retried.";

impl XksFailure {
    /// The message KMS shows for this cause, whatever the exception.
    pub fn message(&self) -> &'static str {
        match self {
            Self::Proxy(p) => match p {
                ProxyError::Validation => MSG_INVALID_RESPONSE,
                ProxyError::InvalidState => MSG_KEY_NOT_ENABLED,
                ProxyError::InvalidCiphertext => MSG_PROXY_INVALID_CIPHERTEXT,
                ProxyError::InvalidKeyUsage => MSG_KEY_USAGE,
                ProxyError::AuthenticationFailed => MSG_AUTH,
                ProxyError::AccessDenied => MSG_ACCESS_DENIED,
                ProxyError::KeyNotFound => MSG_KEY_NOT_FOUND,
                ProxyError::InvalidUriPath => MSG_URI_PATH,
                ProxyError::Throttling => MSG_THROTTLED,
                ProxyError::UnsupportedOperation => MSG_UNSUPPORTED,
                ProxyError::DependencyTimeout => MSG_DEPENDENCY_TIMEOUT,
                ProxyError::Internal => MSG_INTERNAL,
            },
            Self::Unreachable | Self::Network => MSG_UNREACHABLE,
            Self::Tls => MSG_TLS,
            Self::TimedOut => MSG_TIMED_OUT,
            Self::Malformed(_) => MSG_INVALID_RESPONSE,
            Self::AllUnavailable => MSG_ALL_UNAVAILABLE,
            Self::Internal => MSG_EMULATOR_INTERNAL,
        }
    }

    /// CreateCustomKeyStore / UpdateCustomKeyStore (the health check failed).
    pub fn for_store_admin(&self) -> KmsError {
        use Exception as E;
        let exception = match self {
            Self::Proxy(p) => match p {
                ProxyError::AuthenticationFailed => E::XksProxyIncorrectAuthenticationCredential,
                ProxyError::InvalidUriPath | ProxyError::AccessDenied => {
                    E::XksProxyInvalidConfiguration
                }
                ProxyError::Throttling | ProxyError::DependencyTimeout => E::XksProxyUriUnreachable,
                ProxyError::UnsupportedOperation => E::UnsupportedOperation,
                ProxyError::Validation
                | ProxyError::InvalidState
                | ProxyError::InvalidCiphertext
                | ProxyError::InvalidKeyUsage
                | ProxyError::KeyNotFound
                | ProxyError::Internal => E::XksProxyInvalidResponse,
            },
            Self::Unreachable
            | Self::Tls
            | Self::TimedOut
            | Self::Network
            | Self::AllUnavailable => E::XksProxyUriUnreachable,
            Self::Malformed(_) => E::XksProxyInvalidResponse,
            Self::Internal => E::KmsInternal,
        };
        KmsError::new(exception, self.message())
    }

    /// ConnectCustomKeyStore: the store goes FAILED with this code.
    pub fn connection_error_code(&self) -> ConnectionErrorCode {
        use ConnectionErrorCode as C;
        match self {
            Self::Proxy(p) => match p {
                ProxyError::AuthenticationFailed => C::InvalidCredentials,
                ProxyError::AccessDenied => C::XksProxyAccessDenied,
                ProxyError::InvalidUriPath => C::XksProxyInvalidConfiguration,
                ProxyError::Throttling => C::XksProxyNotReachable,
                ProxyError::DependencyTimeout => C::XksProxyTimedOut,
                ProxyError::Validation
                | ProxyError::InvalidState
                | ProxyError::InvalidCiphertext
                | ProxyError::InvalidKeyUsage
                | ProxyError::KeyNotFound
                | ProxyError::UnsupportedOperation
                | ProxyError::Internal => C::XksProxyInvalidResponse,
            },
            Self::Unreachable | Self::AllUnavailable => C::XksProxyNotReachable,
            Self::Tls => C::XksProxyInvalidTlsConfiguration,
            Self::TimedOut => C::XksProxyTimedOut,
            Self::Network => C::NetworkErrors,
            Self::Malformed(_) => C::XksProxyInvalidResponse,
            Self::Internal => C::InternalError,
        }
    }

    /// CreateKey (GetKeyMetadata failed).
    pub fn for_create_key(&self) -> KmsError {
        use Exception as E;
        let exception = match self {
            Self::Proxy(p) => match p {
                ProxyError::InvalidState | ProxyError::InvalidKeyUsage => {
                    E::XksKeyInvalidConfiguration
                }
                ProxyError::KeyNotFound => E::XksKeyNotFound,
                ProxyError::UnsupportedOperation => E::XksKeyInvalidResponse,
                ProxyError::Validation
                | ProxyError::InvalidCiphertext
                | ProxyError::AuthenticationFailed
                | ProxyError::AccessDenied
                | ProxyError::InvalidUriPath
                | ProxyError::Throttling
                | ProxyError::DependencyTimeout
                | ProxyError::Internal => E::CustomKeyStoreInvalidState,
            },
            Self::Unreachable
            | Self::Tls
            | Self::TimedOut
            | Self::Network
            | Self::Malformed(_)
            | Self::AllUnavailable => E::CustomKeyStoreInvalidState,
            Self::Internal => E::KmsInternal,
        };
        KmsError::new(exception, self.message())
    }

    /// Encrypt, Decrypt, GenerateDataKey*, ReEncrypt: always `KMSInvalidStateException`.
    pub fn for_crypto(&self) -> KmsError {
        let exception = match self {
            Self::Internal => Exception::KmsInternal,
            Self::Proxy(_)
            | Self::Unreachable
            | Self::Tls
            | Self::TimedOut
            | Self::Network
            | Self::Malformed(_)
            | Self::AllUnavailable => Exception::KmsInvalidState,
        };
        KmsError::new(exception, self.message())
    }
}

/// Decodes a standard-Base64 CDIV for tests and tools.
pub fn cdiv_base64(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> String {
    STANDARD.encode(cdiv(aad, metadata, iv, ciphertext, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdiv_matches_the_spec_example() {
        let iv = hex::decode("1ccae5470f39700254779031").expect("hex");
        let ct = hex::decode("821c642b5b71783367deaf18").expect("hex");
        let tag = hex::decode("bc1c4dda7707d6812447c5955e99b261").expect("hex");
        assert_eq!(
            cdiv_base64(
                b"project=nile,department=marketing",
                b"key_version=1",
                &iv,
                &ct,
                &tag
            ),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    fn good_encrypt(aad: &[u8]) -> EncryptResponse {
        let (ct, iv, tag, md) = (vec![1u8; 40], vec![2u8; 12], vec![3u8; 16], b"v1".to_vec());
        let c = cdiv(aad, &md, &iv, &ct, &tag);
        EncryptResponse {
            authentication_tag: Base64Bytes(tag),
            ciphertext: Base64Bytes(ct),
            ciphertext_data_integrity_value: Some(Base64Bytes(c.to_vec())),
            ciphertext_metadata: Some(Base64Bytes(md)),
            initialization_vector: Base64Bytes(iv),
        }
    }

    #[test]
    fn encrypt_answers_are_checked_like_kms() {
        let aad = b"aad";
        assert_eq!(check_encrypt(&good_encrypt(aad), 40, aad, true), Ok(()));
        assert!(matches!(
            check_encrypt(&good_encrypt(aad), 41, aad, true),
            Err(XksFailure::Malformed(_))
        ));
        assert!(matches!(
            check_encrypt(&good_encrypt(aad), 40, b"other", true),
            Err(XksFailure::Malformed("CDIV mismatch"))
        ));
        let mut r = good_encrypt(aad);
        r.ciphertext_metadata = Some(Base64Bytes(vec![0; 21]));
        assert!(check_encrypt(&r, 40, aad, false).is_err());
        let mut r = good_encrypt(aad);
        r.initialization_vector = Base64Bytes(vec![0; 8]);
        assert!(check_encrypt(&r, 40, aad, false).is_err());
        let mut r = good_encrypt(aad);
        r.authentication_tag = Base64Bytes(vec![0; 12]);
        assert!(check_encrypt(&r, 40, aad, false).is_err());
        let mut r = good_encrypt(aad);
        r.ciphertext_data_integrity_value = None;
        assert!(check_encrypt(&r, 40, aad, true).is_err());
        assert_eq!(check_encrypt(&r, 40, aad, false), Ok(()));
    }

    #[test]
    fn failure_tables_follow_the_brief() {
        use ConnectionErrorCode as C;
        let auth = XksFailure::Proxy(ProxyError::AuthenticationFailed);
        assert_eq!(
            auth.for_store_admin().exception,
            Exception::XksProxyIncorrectAuthenticationCredential
        );
        assert_eq!(auth.connection_error_code(), C::InvalidCredentials);
        assert_eq!(
            auth.for_create_key().exception,
            Exception::CustomKeyStoreInvalidState
        );
        assert_eq!(auth.for_crypto().exception, Exception::KmsInvalidState);
        assert_eq!(
            XksFailure::Proxy(ProxyError::InvalidUriPath).connection_error_code(),
            C::XksProxyInvalidConfiguration
        );
        assert_eq!(
            XksFailure::TimedOut.connection_error_code(),
            C::XksProxyTimedOut
        );
        assert_eq!(
            XksFailure::AllUnavailable.for_store_admin().exception,
            Exception::XksProxyUriUnreachable
        );
        assert_eq!(
            XksFailure::Tls.connection_error_code(),
            C::XksProxyInvalidTlsConfiguration
        );
        assert_eq!(
            XksFailure::Proxy(ProxyError::KeyNotFound)
                .for_create_key()
                .exception,
            Exception::XksKeyNotFound
        );
        assert_eq!(
            XksFailure::Proxy(ProxyError::UnsupportedOperation)
                .for_create_key()
                .exception,
            Exception::XksKeyInvalidResponse
        );
        assert_eq!(
            XksFailure::Malformed("x").for_crypto().message,
            MSG_INVALID_RESPONSE
        );
    }
}
