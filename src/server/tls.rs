//! The rustls `ServerConfig`: TLS 1.2 and 1.3 restricted to the four cipher suites the
//! spec names, ALPN `h2` + `http/1.1`, ECDSA or RSA server keys.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    PrivateKey { path: String, reason: String },
    #[error("the certificate and private key are not usable together: {0}")]
    Mismatch(String),
}

/// The spec's suites (xks-api.md §Transport): two for TLS 1.3, two for TLS 1.2.
pub fn provider() -> CryptoProvider {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    p
}

/// Loads the certificate chain and key named by the config.
pub fn load_identity(
    tls: &TlsConfig,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match tls {
        TlsConfig::Files {
            certificate,
            private_key,
        } => {
            let cert_name = certificate.display().to_string();
            let certs = CertificateDer::pem_file_iter(certificate)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Certificate {
                    path: cert_name.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::Certificate {
                    path: cert_name,
                    reason: "no CERTIFICATE block found".into(),
                });
            }
            // Never put the key's content in an error; the path and the kind of
            // failure are enough.
            let key =
                PrivateKeyDer::from_pem_file(private_key).map_err(|e| TlsError::PrivateKey {
                    path: private_key.display().to_string(),
                    reason: pem_error_kind(&e),
                })?;
            Ok((certs, key))
        }
        TlsConfig::Embedded {
            certificate,
            private_key,
        } => {
            let certs = CertificateDer::pem_slice_iter(certificate)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Certificate {
                    path: "(embedded)".into(),
                    reason: e.to_string(),
                })?;
            let key =
                PrivateKeyDer::from_pem_slice(private_key).map_err(|e| TlsError::PrivateKey {
                    path: "(embedded)".into(),
                    reason: pem_error_kind(&e),
                })?;
            Ok((certs, key))
        }
    }
}

fn pem_error_kind(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::NoItemsFound => "no PRIVATE KEY block found".into(),
        Error::Io(io) => io.kind().to_string(),
        _ => "not a valid PEM private key".into(),
    }
}

/// The server's TLS configuration.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = load_identity(tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    // The spec requires HTTP/1.1 fallback; KMS may use either.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
