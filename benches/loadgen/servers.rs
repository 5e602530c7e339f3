//! The servers `xks-bench` measures against, each a process of its own so its CPU and
//! RSS can be read from /proc and it can be pinned to its own core:
//!
//! - `null-server`: bare hyper + rustls with the proxy's exact TLS config
//!   (`xks_proxy::server::tls::server_config`) and the proxy's HTTP settings, reading
//!   the body and answering a fixed Encrypt-shaped JSON 200. No routing, SigV4, JSON or
//!   crypto: the ceiling of our stack on this machine.
//! - `proxy-server`: our proxy (`xks_proxy::server::start`) with a fresh software
//!   keystore in a temp dir, or any config given (e.g. a SoftHSM profile).
//!
//! Both print one JSON line on stdout once listening (`url`, `pid`, and for the proxy
//! the prefix, key id, access key id and secret file), and stop on SIGINT/SIGTERM, on
//! stdin EOF (`--exit-on-stdin-eof`, so a parent's death takes them along) or after
//! `--max-secs`.

use std::convert::Infallible;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use xks_proxy::backend::KeyUsage;
use xks_proxy::config::{Config, SecretSource, TlsConfig};

use crate::cli::{NullServerArgs, ProxyServerArgs, ServeArgs};

/// What the null server answers: an Encrypt response for a 32-byte plaintext, so the
/// bytes on the wire match the proxy's.
const NULL_BODY: &[u8] = br#"{"authenticationTag":"vBxN2ncH1oEkR8WVXpmyYQ==","ciphertext":"ghxkK1txeDNn3q8YghxkK1txeDNn3q8YghxkK1txeDM=","ciphertextDataIntegrityValue":"qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=","ciphertextMetadata":"AQAAAAE=","initializationVector":"HMrlRw85cAJUd5Ax"}"#;

/// What marks an Encrypt request that asks for a CDIV.
const CDIV_FIELD: &[u8] = b"ciphertextDataIntegrityValueAlgorithm";

/// The same as the proxy's header/handshake timeout default.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The proxy's default body cap.
const MAX_BODY: usize = 64 * 1024;

pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn tls_files(args: &ServeArgs) -> TlsConfig {
    TlsConfig::Files {
        certificate: args
            .cert
            .clone()
            .unwrap_or_else(|| repo_file("certs/server-ecdsa.pem")),
        private_key: args
            .key
            .clone()
            .unwrap_or_else(|| repo_file("certs/server-ecdsa.key")),
    }
}

/// The runtime every server here uses: the proxy's (multi-threaded, one worker per
/// CPU it may run on — so `taskset -c 1` gives one worker, as for the proxy).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The line a parent reads to find the server.
fn announce(fields: serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{fields}")?;
    out.flush()?;
    Ok(())
}

/// Resolves when the server should stop (signal, stdin EOF, or its lifetime).
async fn stop_signal(args: &ServeArgs) {
    let lifetime = tokio::time::sleep(Duration::from_secs(args.max_secs));
    let stdin_eof = async {
        if args.exit_on_stdin_eof {
            // A plain thread: tokio's stdin needs a feature the proxy does not use.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                use std::io::Read as _;
                let mut stdin = std::io::stdin();
                let mut buf = [0u8; 256];
                // Bounded: a parent never writes much; EOF or an error ends it.
                for _ in 0..1_000_000 {
                    match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = tx.send(());
            });
            let _ = rx.await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let signals = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = lifetime => {}
        _ = stdin_eof => {}
        _ = signals => {}
    }
}

/// `xks-bench null-server`.
pub fn null_server(args: &NullServerArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let config = xks_proxy::server::tls::server_config(&tls_files(&args.serve), None)?;
        let acceptor = TlsAcceptor::from(config);
        let work = crate::ceiling::from_args(args)?;
        let listener = TcpListener::bind(args.serve.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.serve.listen))?;
        let addr = listener.local_addr()?;
        announce(serde_json::json!({
            "server": if work.is_some() { "ceiling" } else { "null" },
            "url": format!("https://localhost:{}", addr.port()),
            "addr": addr.to_string(),
            "pid": std::process::id(),
        }))?;
        let stop = stop_signal(&args.serve);
        tokio::pin!(stop);
        // Bounded by the stop signal (which includes --max-secs).
        loop {
            let tcp = tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // As the proxy: Nagle off on every accepted socket.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let work = work.clone();
            tokio::spawn(async move {
                if let Ok(Ok(tls)) =
                    tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await
                {
                    let service = service_fn(move |req| null_answer(req, work.clone()));
                    // The proxy's own hyper settings, at its defaults.
                    let _ = xks_proxy::server::connection::http_builder(
                        MAX_BODY,
                        xks_proxy::config::DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
                    )
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                }
            });
        }
        Ok(())
    })
}

async fn null_answer(
    req: http::Request<Incoming>,
    work: Option<std::sync::Arc<dyn crate::ceiling::Work>>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    // Read the body like the proxy must (SigV4 covers it), under the same cap.
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes());
    let ok = match (&body, work) {
        (Ok(body), Some(work)) => {
            // The request's CDIV flag, found as cheaply as possible: the ceiling
            // must not charge itself the JSON parse the proxy pays.
            let cdiv = body.windows(CDIV_FIELD.len()).any(|w| w == CDIV_FIELD);
            work.serve(cdiv).is_ok()
        }
        (body, None) => body.is_ok(),
        (Err(_), Some(_)) => false,
    };
    let mut resp = http::Response::new(Full::new(Bytes::from_static(if ok {
        NULL_BODY
    } else {
        b"{\"errorName\":\"ValidationException\"}"
    })));
    if !ok {
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A temp dir removed when the server exits.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The key the generated keystore holds.
pub const BENCH_KEY: &str = "bench-key-1";

/// Which key manager a generated bench proxy uses.
#[derive(Debug, Clone)]
pub enum BenchBackend {
    /// A fresh software keystore in the temp dir.
    Software,
    /// A PKCS#11 token (SoftHSM in the figures): module, token label, and the
    /// environment variable holding the user PIN.
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        pin_env: String,
    },
}

/// A proxy config written into `dir` with one SigV4 credential (secret in
/// `dir/secret`), the given TLS files and backend; for the software keystore also the
/// master key and a keystore holding [`BENCH_KEY`]. Returns the config and the access
/// key id.
pub fn bench_proxy_config(
    dir: &Path,
    listen: std::net::SocketAddr,
    prefix: &str,
    tls: &TlsConfig,
    backend: &BenchBackend,
) -> Result<(Config, String)> {
    let backend_toml = match backend {
        BenchBackend::Software => {
            use xks_proxy::backend::software::{Keystore, MasterKey};
            let master = MasterKey::generate();
            write_private(&dir.join("master.key"), master.to_base64().expose())?;
            let mut ks = Keystore::create(&dir.join("keystore.json"), &master)?;
            ks.create_key(BENCH_KEY, &[KeyUsage::Encrypt, KeyUsage::Decrypt])?;
            ks.save()?;
            "kind = \"software\"\nkeystore = \"keystore.json\"\nmaster_key_file = \"master.key\"\n"
                .to_owned()
        }
        BenchBackend::Pkcs11 {
            module,
            token_label,
            pin_env,
        } => format!(
            "kind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{token_label}\"\nuser_pin_env = \"{pin_env}\"\n",
            module.display()
        ),
    };
    let (akid, secret) = xks_proxy::config::generate_credential();
    write_private(&dir.join("secret"), secret.expose())?;
    let TlsConfig::Files {
        certificate,
        private_key,
    } = tls
    else {
        anyhow::bail!("the bench proxy takes certificate files");
    };
    let text = format!(
        r#"
[server]
listen = "{listen}"
[server.tls]
certificate = "{cert}"
private_key = "{key}"

[backend]
{backend_toml}
[[keystores]]
path_prefix = "{prefix}"
[[keystores.credentials]]
access_key_id = "{akid}"
secret_file = "secret"
"#,
        cert = certificate.display(),
        key = private_key.display(),
    );
    std::fs::write(dir.join("proxy.toml"), &text)?;
    let config =
        Config::from_toml(&text, dir).map_err(|e| anyhow::anyhow!("generated config: {e}"))?;
    Ok((config, akid))
}

/// Opens the configured backends; for a generated PKCS#11 proxy, first creates the
/// bench key and the health-check key on the token if they are missing.
fn open_backends(config: &Config, generated: bool) -> Result<xks_proxy::backend::Opened> {
    #[cfg(feature = "pkcs11")]
    if let ([entry], true) = (config.backends.as_slice(), generated)
        && let xks_proxy::config::BackendConfig::Pkcs11(settings) = &entry.config
    {
        let backend = xks_proxy::backend::pkcs11::Pkcs11Backend::open(settings)?;
        if !backend.list_keys()?.iter().any(|k| k.id == BENCH_KEY) {
            backend.create_key(BENCH_KEY, &[KeyUsage::Encrypt, KeyUsage::Decrypt])?;
        }
        backend.create_health_check_key()?;
        let backend: std::sync::Arc<dyn xks_proxy::backend::CryptoBackend> =
            std::sync::Arc::new(backend);
        return Ok([(entry.name.clone(), backend)].into());
    }
    let _ = generated;
    xks_proxy::backend::open_all(&config.backends).context("opening the backends")
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// The audit trail of `proxy-server --audit-dir`: a fresh key in `dir`, files in `trail`.
fn bench_audit(dir: &Path, trail: &Path, fsync: &str) -> Result<xks_proxy::config::AuditConfig> {
    use xks_proxy::config::{AuditConfig, AuditFsync, AuditOnFailure};
    let (_, key) = xks_proxy::config::generate_credential();
    let key_file = dir.join("audit.key");
    write_private(&key_file, key.expose())?;
    Ok(AuditConfig {
        directory: trail.to_path_buf(),
        key,
        key_source: SecretSource::File(key_file),
        rotate_bytes: Some(64 * 1024 * 1024),
        rotate_interval: None,
        queue_capacity: 4096,
        on_failure: AuditOnFailure::FailClosed,
        fsync: match fsync {
            "never" => AuditFsync::Never,
            "interval" => AuditFsync::Interval,
            "every_record" => AuditFsync::EveryRecord,
            other => {
                anyhow::bail!("--audit-fsync: '{other}' is not never, interval or every_record")
            }
        },
        checkpoint_interval: std::time::Duration::from_secs(60),
    })
}

/// `xks-bench proxy-server`.
pub fn proxy_server(args: &ProxyServerArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xks-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = TempDir(dir.clone());
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => {
            let backend = match &args.softhsm_module {
                None => BenchBackend::Software,
                Some(module) => BenchBackend::Pkcs11 {
                    module: module.clone(),
                    token_label: args.softhsm_token.clone(),
                    pin_env: args.softhsm_pin_env.clone(),
                },
            };
            bench_proxy_config(
                &dir,
                args.serve.listen,
                &args.prefix,
                &tls_files(&args.serve),
                &backend,
            )?
            .0
        }
    };
    config.server.listen = args.serve.listen;
    if let Some(n) = args.max_in_flight {
        anyhow::ensure!(n > 0, "--max-in-flight must be positive");
        config.server.max_in_flight = n;
    }
    if let Some(trail) = &args.audit_dir {
        config.audit = Some(bench_audit(&dir, trail, &args.audit_fsync)?);
    }
    config.logging.level.clone_from(&args.log_level);
    config.logging.format = if args.log_json {
        xks_proxy::config::LogFormat::Json
    } else {
        xks_proxy::config::LogFormat::Human
    };
    xks_proxy::telemetry::init(&config.logging).map_err(anyhow::Error::msg)?;

    let rt = runtime()?;
    rt.block_on(async {
        let backends = open_backends(&config, args.config.is_none())?;
        let running = xks_proxy::server::start(&config, backends).await?;
        let first = config.keystores.first();
        let cred = first.and_then(|k| k.credentials.first());
        announce(serde_json::json!({
            "server": "proxy",
            "url": format!("{}://localhost:{}", running.scheme, running.local_addr.port()),
            "addr": running.local_addr.to_string(),
            "pid": std::process::id(),
            "prefix": first.map(|k| k.path_prefix.clone()),
            "key_id": if args.config.is_none() { Some(BENCH_KEY) } else { None },
            "access_key_id": cred.map(|c| c.access_key_id.clone()),
            "secret_file": cred.and_then(|c| match &c.source {
                SecretSource::File(p) => Some(p.display().to_string()),
                SecretSource::Env(_) => None,
            }),
        }))?;
        stop_signal(&args.serve).await;
        running.shutdown();
        // Bounded by the proxy's own shutdown grace.
        running.wait().await;
        Ok::<_, anyhow::Error>(())
    })
}
