//! The rustls `ServerConfig`: TLS 1.2 and 1.3 restricted to the four cipher suites the
//! spec names, ALPN `h2` + `http/1.1`, ECDSA or RSA server keys, and optional mTLS whose
//! subject-name rule is enforced *inside* the handshake (spec: the handshake MUST be
//! refused for any other subject or chain). In the FIPS build ([`crate::crypto::FIPS`]),
//! only approved parameters: the spec's AES-256-GCM suites, NIST curves, RSA ≥ 2048 or
//! ECDSA P-256/P-384 certificates, and a config rustls itself reports as FIPS.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::{ClientAuthConfig, TlsConfig};
use crate::crypto::{self, tls::cipher_suite as suite, tls::kx_group};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    PrivateKey { path: String, reason: String },
    #[error("the certificate and private key are not usable together: {0}")]
    Mismatch(String),
    #[error("cannot use the client CA bundle {path}: {reason}")]
    ClientCa { path: String, reason: String },
    /// FIPS build: the server certificate's key is not one FIPS 140-3 approves for TLS.
    #[error("the certificate {path} cannot be used in FIPS 140-3 mode: {reason}")]
    NotFipsApproved { path: String, reason: String },
    /// FIPS build: rustls does not report the assembled config as FIPS (the module is
    /// not in FIPS mode, or something unapproved is in the provider).
    #[error(
        "this FIPS build's TLS configuration is not in FIPS mode (rustls ServerConfig::fips() is false); refusing to serve"
    )]
    NotFips,
}

/// The spec's suites (xks-api.md §Transport): two for TLS 1.3, two for TLS 1.2, over
/// the provider of [`crate::crypto::tls`] with its own key exchange groups.
///
/// FIPS build: only what FIPS 140-3 approves. The spec's ChaCha20-Poly1305 suite is not
/// approved, so three suites remain, all AES-256-GCM (KMS offers them). Key exchange on
/// NIST curves only (P-256, P-384): no X25519, and not the X25519MLKEM768 hybrid that
/// rustls's FIPS provider would otherwise offer first.
pub fn provider() -> CryptoProvider {
    let mut p = crypto::tls::default_provider();
    if crypto::FIPS {
        p.cipher_suites = vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ];
        p.kx_groups = vec![kx_group::SECP256R1, kx_group::SECP384R1];
    } else {
        p.cipher_suites = vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ];
    }
    p
}

/// Whether a certificate's key is one FIPS 140-3 approves for a TLS server: RSA of at
/// least 2048 bits, or ECDSA on P-256 or P-384 (FIPS 186-5, SP 800-52r2 §3.1). The
/// error says what the key is.
pub fn fips_approved_key(der: &[u8]) -> Result<(), String> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::RSA(rsa) if rsa.key_size() >= 2048 => Ok(()),
        PublicKey::RSA(rsa) => Err(format!(
            "an RSA key of {} bits (FIPS mode needs at least 2048)",
            rsa.key_size()
        )),
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                // prime256v1 (P-256), secp384r1 (P-384)
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" => Ok(()),
                _ => Err(format!(
                    "an EC key on curve {curve:?} (FIPS mode: ECDSA P-256 or P-384)"
                )),
            }
        }
        _ => Err(format!(
            "a {} key (FIPS mode: RSA >= 2048 bits or ECDSA P-256/P-384)",
            spki.algorithm.algorithm.to_id_string()
        )),
    }
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

/// The certificate's file name, for messages.
fn certificate_path(tls: &TlsConfig) -> String {
    match tls {
        TlsConfig::Files { certificate, .. } => certificate.display().to_string(),
        TlsConfig::Embedded { .. } => "(embedded)".into(),
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

/// The server's TLS configuration, with mTLS when `client_auth` is set.
pub fn server_config(
    tls: &TlsConfig,
    client_auth: Option<&ClientAuthConfig>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = load_identity(tls)?;
    if crypto::FIPS
        && let Some(leaf) = certs.first()
    {
        fips_approved_key(leaf).map_err(|reason| TlsError::NotFipsApproved {
            path: certificate_path(tls),
            reason,
        })?;
    }
    let provider = Arc::new(provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(client_verifier(auth, provider)?),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    // The spec requires HTTP/1.1 fallback; KMS may use either.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // rustls's own verdict over everything above (suites, groups, signature algorithms,
    // RNG, key provider, extended master secret for TLS 1.2): serve only if it agrees.
    if crypto::FIPS && !config.fips() {
        return Err(TlsError::NotFips);
    }
    Ok(Arc::new(config))
}

/// The mTLS verifier: the chain must verify to `auth.ca` (validity dates included), and
/// the leaf must carry one of `auth.subjects` as its CN or a DNS SAN.
fn client_verifier(
    auth: &ClientAuthConfig,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let path = auth.ca.display().to_string();
    let err = |reason: String| TlsError::ClientCa {
        path: path.clone(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&auth.ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(e.to_string()))?;
    for cert in certs {
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(SubjectVerifier {
        inner,
        subjects: auth.subjects.clone(),
    }))
}

/// Wraps the WebPKI client verifier with the spec's subject-name rule.
#[derive(Debug)]
struct SubjectVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    subjects: Vec<String>,
}

/// The CN values and DNS SANs of a certificate (lower-cased).
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The issuer's distinguished name, for messages ("issued by ...").
pub fn certificate_issuer(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(cert.issuer().to_string())
}

impl ClientCertVerifier for SubjectVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain and validity first: a wrong CA or an expired certificate fails here.
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(reason = %e, "mTLS: client certificate refused; handshake refused");
            return Err(refused());
        }
        let Ok(names) = certificate_names(end_entity) else {
            tracing::warn!("mTLS: client certificate cannot be parsed; handshake refused");
            return Err(refused());
        };
        if self
            .subjects
            .iter()
            .any(|want| names.iter().any(|n| n.eq_ignore_ascii_case(want)))
        {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(
                presented = ?names,
                "mTLS: client certificate does not carry a required subject name; handshake refused"
            );
            Err(refused())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The error for every refused client certificate. rustls turns a certificate error
/// into a specific alert (certificate_expired, unknown_ca, bad_certificate, ...); any
/// other error becomes `handshake_failure`, which is what AWS's conformance client
/// expects for every refused client certificate (and what AWS's sample proxy sends).
/// One alert for all reasons also tells a prober nothing about the CA or subject rules;
/// the operator's log line has the reason.
fn refused() -> rustls::Error {
    rustls::Error::General("client certificate refused".into())
}

/// Days until the leaf certificate expires (negative once expired).
pub fn days_to_expiry(tls: &TlsConfig) -> Result<i64, TlsError> {
    Ok(days_until(not_after(tls)?, std::time::SystemTime::now()))
}

/// Whole days from `now` until `not_after` (Unix seconds); negative once expired.
pub fn days_until(not_after: i64, now: std::time::SystemTime) -> i64 {
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    (not_after - now).div_euclid(86_400)
}

/// The leaf certificate's notAfter, in Unix seconds.
pub fn not_after(tls: &TlsConfig) -> Result<i64, TlsError> {
    let (certs, _key) = load_identity(tls)?;
    let leaf = certs.first().ok_or_else(|| TlsError::Certificate {
        path: "(leaf)".into(),
        reason: "empty chain".into(),
    })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Certificate {
            path: "(leaf)".into(),
            reason: e.to_string(),
        })?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::days_until;
    use std::time::{Duration, UNIX_EPOCH};

    const DAY: u64 = 86_400;

    #[test]
    fn days_to_expiry_count_down_with_the_clock_not_with_reloads() {
        // The metric is computed at scrape time from notAfter, so a proxy that runs
        // for months without a reload still reaches the expiry alert's threshold.
        let now = UNIX_EPOCH + Duration::from_secs(20_000 * DAY);
        let not_after = (20_010 * DAY + 1) as i64;
        assert_eq!(days_until(not_after, now), 10);
        assert_eq!(days_until(not_after, now + Duration::from_secs(9 * DAY)), 1);
        assert_eq!(
            days_until(not_after, now + Duration::from_secs(10 * DAY)),
            0
        );
        assert_eq!(
            days_until(not_after, now + Duration::from_secs(11 * DAY)),
            -1
        );
    }
}
