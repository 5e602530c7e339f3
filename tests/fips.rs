//! FIPS 140-3 mode (issue 16 §1, README "Compliance"): what the proxy offers and says,
//! in both builds. Every test asserts the FIPS build's behaviour under
//! `cargo test --features fips --test fips` (tests/run-all.sh's FIPS stage) and the
//! default build's unchanged behaviour under the plain `cargo test`, so neither branch
//! of [`xks_proxy::crypto::FIPS`] goes untested.
//!
//! The TLS oracles are independent of the server's crypto: OpenSSL's `s_client`, and
//! rustls clients on *ring*; the CDIV is recomputed with *ring*, and every request is
//! signed by `aws-sigv4` (RustCrypto), so a 200 means the FIPS module's HMAC/SHA-256
//! agreed with another implementation.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use serde_json::json;
use xks_proxy::crypto::FIPS;

/// What the proxy's TLS listener did with one client.
#[derive(Debug)]
struct Handshake {
    ok: bool,
    /// `s_client -brief` output (protocol, suite, group), or the error.
    text: String,
}

/// `openssl s_client` against the proxy with `args` (e.g. `-groups X25519`): did the
/// handshake complete, and what did it negotiate. Loopback, bounded by `-verify_return_error`
/// and EOF on stdin.
async fn s_client(p: &TestProxy, args: &[&str]) -> Handshake {
    let port = p.addr().port().to_string();
    let ca = repo().join("certs/ca.pem");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("openssl")
            .args(["s_client", "-brief", "-verify_return_error", "-servername"])
            .arg("localhost")
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(ca)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client (Debian: openssl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Handshake {
            ok: out.status.success() && text.contains("CONNECTION ESTABLISHED"),
            text,
        }
    })
    .await
    .expect("join")
}

/// A rustls client on *ring* offering only `groups` (and `suites`, if given).
async fn rustls_handshake(
    p: &TestProxy,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Result<(rustls::NamedGroup, rustls::CipherSuite), String> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = groups;
    if let Some(s) = suites {
        provider.cipher_suites = s;
    }
    rustls_handshake_with(p, provider).await
}

async fn rustls_handshake_with(
    p: &TestProxy,
    provider: rustls::crypto::CryptoProvider,
) -> Result<(rustls::NamedGroup, rustls::CipherSuite), String> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca_pem()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(p.addr()).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let conn = tls.get_ref().1;
    Ok((
        conn.negotiated_key_exchange_group()
            .expect("a key exchange")
            .name(),
        conn.negotiated_cipher_suite().expect("a suite").suite(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_offering_only_x25519_is_refused_and_p256_gets_aes_gcm() {
    let p = TestProxy::start(Options::default()).await;

    let x25519 = s_client(&p, &["-groups", "X25519"]).await;
    assert_eq!(
        x25519.ok, !FIPS,
        "X25519 only (FIPS build: refused; default: accepted): {x25519:?}"
    );

    for (group, name) in [("P-256", "prime256v1"), ("P-384", "secp384r1")] {
        let h = s_client(&p, &["-groups", group]).await;
        assert!(h.ok, "{group} must get in: {h:?}");
        assert!(
            h.text.contains("Ciphersuite: TLS_AES_256_GCM_SHA384"),
            "{group}: {h:?}"
        );
        assert!(h.text.contains(name), "{group} negotiated: {h:?}");
    }

    // TLS 1.2 on a NIST curve: the spec's ECDHE-ECDSA AES-256-GCM suite (the dev
    // certificate is ECDSA P-256).
    let tls12 = s_client(&p, &["-tls1_2", "-groups", "P-256"]).await;
    assert!(tls12.ok, "{tls12:?}");
    assert!(
        tls12.text.contains("ECDHE-ECDSA-AES256-GCM-SHA384"),
        "{tls12:?}"
    );

    // ChaCha20-Poly1305 is one of the spec's suites but not FIPS-approved.
    let chacha = s_client(
        &p,
        &[
            "-tls1_3",
            "-ciphersuites",
            "TLS_CHACHA20_POLY1305_SHA256",
            "-groups",
            "P-256",
        ],
    )
    .await;
    assert_eq!(chacha.ok, !FIPS, "ChaCha20-Poly1305 only: {chacha:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rustls_client_gets_only_nist_groups_and_aes_gcm_in_fips_mode() {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    use rustls::{CipherSuite, NamedGroup};
    let p = TestProxy::start(Options::default()).await;

    let x25519 = rustls_handshake(&p, vec![kx_group::X25519], None).await;
    if FIPS {
        assert!(x25519.is_err(), "X25519 only must be refused: {x25519:?}");
    } else {
        assert_eq!(x25519.map(|r| r.0), Ok(NamedGroup::X25519));
    }
    for (group, named) in [
        (kx_group::SECP256R1, NamedGroup::secp256r1),
        (kx_group::SECP384R1, NamedGroup::secp384r1),
    ] {
        assert_eq!(
            rustls_handshake(&p, vec![group], None).await,
            Ok((named, CipherSuite::TLS13_AES_256_GCM_SHA384))
        );
    }
    // A client preferring X25519 but able to do P-256 (every browser and SDK): in FIPS
    // mode the server picks P-256.
    let mixed = rustls_handshake(&p, vec![kx_group::X25519, kx_group::SECP256R1], None).await;
    let want = if FIPS {
        NamedGroup::secp256r1
    } else {
        NamedGroup::X25519
    };
    assert_eq!(mixed.map(|r| r.0), Ok(want));

    let chacha = rustls_handshake(
        &p,
        vec![kx_group::SECP256R1],
        Some(vec![cs::TLS13_CHACHA20_POLY1305_SHA256]),
    )
    .await;
    assert_eq!(chacha.is_ok(), !FIPS, "ChaCha20-Poly1305: {chacha:?}");
    assert_eq!(
        rustls_handshake(
            &p,
            vec![kx_group::SECP384R1],
            Some(vec![cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]),
        )
        .await,
        Ok((
            NamedGroup::secp384r1,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        ))
    );
}

/// The post-quantum hybrid rustls's FIPS provider offers first by default is refused:
/// the proxy's groups are NIST curves only.
#[cfg(feature = "fips")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_x25519mlkem768_hybrid_is_refused() {
    let p = TestProxy::start(Options::default()).await;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
    let r = rustls_handshake_with(&p, provider).await;
    assert!(r.is_err(), "X25519MLKEM768 only must be refused: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_config_health_version_and_metric_say_whether_fips_mode_is_on() {
    assert_eq!(xks_proxy::crypto::fips_mode(), FIPS);

    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replacen(
        "[server]\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[server]\n",
        1,
    );
    let p = TestProxy::start_with(dir, &text, creds).await;
    let tls = p.config.server.tls.as_ref().expect("tls");
    let server = xks_proxy::server::tls::server_config(tls, None).expect("config");
    assert_eq!(server.fips(), FIPS, "rustls's own verdict");

    let health = p.client(true).post(&health_url(&p), &health_body()).await;
    assert_eq!(health.status, 200);
    let model = health.body["xksProxyModel"].as_str().expect("model");
    assert!(model.starts_with("xks-proxy "), "{model}");
    assert_eq!(model.contains("FIPS 140-3 mode"), FIPS, "{model}");

    let admin = p.running.admin_addr.expect("admin listener");
    let metrics = scrape_metrics(admin).await;
    let want = format!("xks_fips_mode {}", u8::from(FIPS));
    assert!(
        metrics.lines().any(|l| l == want),
        "{want} missing from /metrics"
    );

    let version = Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .arg("--version")
        .output()
        .expect("xks-proxy --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with(concat!("xks-proxy ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert_eq!(version.contains("FIPS 140-3 mode"), FIPS, "{version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fips_refuses_a_build_without_it_and_serves_with_it() {
    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replacen("[server]\n", "[server]\nrequire_fips = true\n", 1);
    let loaded = xks_proxy::config::Config::from_toml(&text, dir.path());
    assert_eq!(
        loaded.is_ok(),
        FIPS,
        "require_fips = true loads only in a FIPS build: {:?}",
        loaded.as_ref().err()
    );
    match loaded {
        Err(e) => {
            assert_eq!(e.key, "server.require_fips");
            assert!(e.problem.contains("--features fips"), "{e}");
        }
        Ok(_) => {
            let p = TestProxy::start_with(dir, &text, creds).await;
            let r = p.client(false).post(&health_url(&p), &health_body()).await;
            assert_eq!(r.status, 200);
        }
    }

    // The binary says the same, before it binds anything.
    let (dir, text, _) = prepare(&Options::default());
    let text = text.replacen("[server]\n", "[server]\nrequire_fips = true\n", 1);
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, text).expect("config");
    let check = Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .expect("config check");
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.success(), FIPS, "{err}");
    if !FIPS {
        assert!(err.contains("server.require_fips"), "{err}");
        assert!(
            err.contains("cargo build --release --features fips"),
            "{err}"
        );
    }
}

/// A self-signed certificate for `localhost` with a key made by `openssl req -newkey
/// SPEC` (e.g. `rsa:1024`, `ed25519`), in `dir`.
fn certificate(dir: &Path, name: &str, newkey: &[&str]) -> xks_proxy::config::TlsConfig {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    xks_proxy::config::TlsConfig::Files {
        certificate: cert,
        private_key: key,
    }
}

#[test]
fn certificates_outside_rsa_2048_and_ecdsa_p256_p384_are_refused_in_fips_mode() {
    use xks_proxy::server::tls::{TlsError, fips_approved_key, server_config};
    let dir = tempfile::tempdir().expect("tempdir");
    let approved = [
        certificate(
            dir.path(),
            "p384",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        xks_proxy::config::TlsConfig::Files {
            certificate: repo().join("certs/server-rsa.pem"),
            private_key: repo().join("certs/server-rsa.key"),
        },
        xks_proxy::config::TlsConfig::Files {
            certificate: repo().join("certs/server-ecdsa.pem"),
            private_key: repo().join("certs/server-ecdsa.key"),
        },
    ];
    for tls in &approved {
        let (certs, _) = xks_proxy::server::tls::load_identity(tls).expect("identity");
        assert_eq!(fips_approved_key(&certs[0]), Ok(()), "{tls:?}");
        server_config(tls, None).expect("an approved certificate serves");
    }
    for (name, newkey, says) in [
        ("rsa1024", &["-newkey", "rsa:1024"][..], "1024 bits"),
        (
            "p521",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"][..],
            "1.3.132.0.35",
        ),
        ("ed25519", &["-newkey", "ed25519"][..], "1.3.101.112"),
    ] {
        let tls = certificate(dir.path(), name, newkey);
        let (certs, _) = xks_proxy::server::tls::load_identity(&tls).expect("identity");
        let verdict = fips_approved_key(&certs[0]);
        assert!(
            verdict.as_ref().is_err_and(|e| e.contains(says)),
            "{name}: {verdict:?}"
        );
        let served = server_config(&tls, None);
        if FIPS {
            assert!(
                matches!(&served, Err(TlsError::NotFipsApproved { reason, .. }) if reason.contains(says)),
                "{name}: {served:?}"
            );
        } else if name == "ed25519" {
            // The default build keeps serving what it served before.
            assert!(served.is_ok(), "{name}: {served:?}");
        }
    }
}

/// The proxy's own behaviour on the FIPS module: keystore (HKDF, HMAC, AES-GCM sealing),
/// SigV4 verification, Encrypt with AAD and CDIV, Decrypt, tamper detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_and_cdiv_agree_with_an_independent_implementation() {
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(true);
    let aad = b"context: fips".as_slice();
    let enc = c
        .post(
            &key_url(&p, KEY, "encrypt"),
            &encrypt_body(b"plain as day", Some(aad)),
        )
        .await;
    assert_eq!(enc.status, 200, "{:?}", enc.body);

    // CDIV (spec Appendix C): SHA-256 over AAD || metadata || IV || ciphertext || tag,
    // recomputed with ring.
    let mut input = aad.to_vec();
    for field in [
        "ciphertextMetadata",
        "initializationVector",
        "ciphertext",
        "authenticationTag",
    ] {
        input.extend(unb64(&enc.body[field]));
    }
    let cdiv = ring::digest::digest(&ring::digest::SHA256, &input);
    assert_eq!(
        unb64(&enc.body["ciphertextDataIntegrityValue"]),
        cdiv.as_ref()
    );

    let dec = c
        .post(
            &key_url(&p, KEY, "decrypt"),
            &decrypt_body(&enc.body, Some(aad)),
        )
        .await;
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    assert_eq!(unb64(&dec.body["plaintext"]), b"plain as day");

    let mut tampered = enc.body.clone();
    let mut tag = unb64(&enc.body["authenticationTag"]);
    tag[0] ^= 1;
    tampered["authenticationTag"] = json!(b64(&tag));
    let bad = c
        .post(
            &key_url(&p, KEY, "decrypt"),
            &decrypt_body(&tampered, Some(aad)),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_name(), "InvalidCiphertextException");

    // A wrong secret: the verifier's HMAC says no.
    let stranger = c.with_cred(Cred {
        akid: p.creds[0].akid.clone(),
        secret: xks_proxy::secret::SecretString::from("not-the-secret-not-the-secret-not-the-se"),
    });
    let denied = stranger.post(&health_url(&p), &health_body()).await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.error_name(), "AuthenticationFailedException");
}
