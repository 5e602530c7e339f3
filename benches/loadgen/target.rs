//! The endpoint under load: its address, the host name sent and signed, the XKS paths
//! under its prefix, the SigV4 credential, and the rustls client configuration (CA
//! bundle or insecure, optional client certificate, ALPN, resumption).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use xks_proxy::secret::SecretString;

use crate::cli::TargetArgs;

/// Everything a connection and a request need to know about the endpoint.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where TCP connects.
    pub addr: SocketAddr,
    /// `https` or `http` (a proxy behind a TLS-terminating load balancer).
    pub tls: bool,
    /// The URI authority as sent (`localhost:8443`): HTTP/1.1 Host, HTTP/2 :authority.
    pub authority: String,
    /// TLS server name (certificate check and SNI).
    pub server_name: ServerName<'static>,
    /// `<prefix>/kms/xks/v1`.
    pub base_path: String,
    pub key_id: String,
    pub access_key_id: String,
    pub secret: SecretString,
    pub region: String,
    pub service: String,
    /// Certificate checks and client certificate; ALPN is set per connection kind.
    pub tls_base: Arc<TlsBase>,
}

/// The parts of the rustls client config that do not depend on the HTTP version.
#[derive(Debug)]
pub struct TlsBase {
    verifier: Arc<dyn ServerCertVerifier>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl Target {
    /// Resolves the URL and loads credentials and TLS material.
    pub async fn from_args(args: &TargetArgs) -> Result<Target> {
        let uri: http::Uri = args
            .url
            .parse()
            .with_context(|| format!("--url {} is not a URL", args.url))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("--url must start with https:// or http://"),
        };
        let authority = uri
            .authority()
            .context("--url has no host")?
            .as_str()
            .to_owned();
        let host = uri.host().context("--url has no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = match args.connect_to {
            Some(a) => a,
            None => tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
                .await
                .with_context(|| format!("cannot resolve {host}"))?
                // Prefer IPv4 loopback: the dev certificate names 127.0.0.1, and
                // "localhost" may list ::1 first.
                .min_by_key(|a| !a.is_ipv4())
                .with_context(|| format!("{host} resolves to no address"))?,
        };
        if !addr.ip().is_loopback() && !args.allow_remote {
            bail!(
                "{addr} is not a loopback address; pass --allow-remote to load a remote endpoint on purpose"
            );
        }
        let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .with_context(|| format!("{host} is not a valid TLS server name"))?;

        let secret = match (&args.secret, &args.secret_file) {
            (Some(s), None) => SecretString::from(s.as_str()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read --secret-file {}", f.display()))?;
                SecretString::from(text.trim())
            }
            (Some(_), Some(_)) => bail!("give --secret or --secret-file, not both"),
            (None, None) => bail!("no SigV4 secret: --secret-file, --secret or XKS_BENCH_SECRET"),
        };
        if args.access_key_id.is_empty() {
            bail!("no SigV4 access key id: --access-key-id or XKS_BENCH_ACCESS_KEY_ID");
        }
        let prefix = args.prefix.trim_end_matches('/');
        if !prefix.is_empty() && !prefix.starts_with('/') {
            bail!("--prefix must start with / (got {prefix})");
        }

        let verifier: Arc<dyn ServerCertVerifier> = if args.insecure {
            Arc::new(AcceptAnyCert(provider()))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            let ca = args
                .ca
                .as_deref()
                .context("give --ca with the server's CA bundle (or --insecure)")?;
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read --ca {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("bad PEM in {}", ca.display()))?)
                    .context("unusable CA certificate")?;
            }
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(provider()),
            )
            .build()
            .context("building the certificate verifier")?
        };
        let client_auth = match (&args.client_cert, &args.client_key) {
            (Some(c), Some(k)) => Some(load_identity(c, k)?),
            _ => None,
        };

        Ok(Target {
            addr,
            tls,
            authority,
            server_name,
            base_path: format!("{prefix}/kms/xks/v1"),
            key_id: args.key_id.clone(),
            access_key_id: args.access_key_id.clone(),
            secret,
            region: args.region.clone(),
            service: args.service.clone(),
            tls_base: Arc::new(TlsBase {
                verifier,
                client_auth,
            }),
        })
    }

    /// The URI path of an operation on this endpoint.
    pub fn path(&self, op: crate::workload::Op) -> String {
        use crate::workload::Op;
        match op {
            Op::Health => format!("{}/health", self.base_path),
            Op::Metadata => format!("{}/keys/{}/metadata", self.base_path, self.key_id),
            Op::Encrypt => format!("{}/keys/{}/encrypt", self.base_path, self.key_id),
            Op::Decrypt => format!("{}/keys/{}/decrypt", self.base_path, self.key_id),
        }
    }

    /// A rustls client config for one kind of connection.
    pub fn client_config(
        &self,
        http2: bool,
        resumption: bool,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&self.tls_base.verifier));
        let mut config = match &self.tls_base.client_auth {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .context("client certificate and key do not match")?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        if !resumption {
            // A handshake benchmark must pay for full handshakes, as a fresh KMS host does.
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

/// rustls with ring, all default suites: the server picks, as with KMS.
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn load_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read --client-cert {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read --client-key {}", key.display()))?;
    Ok((chain, key))
}

/// `--insecure`: accepts any server certificate but still checks the handshake
/// signatures, so the TLS work measured is the same as with verification.
#[derive(Debug)]
struct AcceptAnyCert(rustls::crypto::CryptoProvider);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
