//! `kms-emulator`: thin command-line front end over `xks_proxy::kms` — parse flags,
//! bind the listeners, print where it listens, serve until Ctrl-C or SIGTERM.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::net::TcpListener;

use xks_proxy::kms::{self, Config, Listeners, XksClientConfig};
use xks_proxy::secret::SecretString;

#[derive(Parser, Debug)]
#[command(
    name = "kms-emulator",
    version,
    about = "An AWS KMS emulator for external key stores: serves the KMS JSON API and calls an XKS proxy like KMS does"
)]
struct Cli {
    /// Plain-HTTP listen address (default 127.0.0.1:4599 when no listener is given).
    #[arg(long, env = "KMS_EMULATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// HTTPS listen address (needs --tls-cert and --tls-key).
    #[arg(long, env = "KMS_EMULATOR_TLS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the HTTPS listener.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the HTTPS listener.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The one Region served.
    #[arg(long, env = "KMS_EMULATOR_REGION", default_value = "us-east-1")]
    region: String,
    /// The one account served (12 digits).
    #[arg(long, env = "KMS_EMULATOR_ACCOUNT_ID", default_value = "111122223333")]
    account_id: String,
    /// Maps a caller's access key ID to its principal ARN (repeatable). Unmapped
    /// callers are arn:aws:iam::<account>:root.
    #[arg(long, value_name = "AKID=ARN")]
    principal: Vec<String>,
    /// Check every caller's SigV4 signature (needs --client-credentials-file).
    #[arg(long, requires = "client_credentials_file")]
    verify_client_sigv4: bool,
    /// File of caller credentials, one `ACCESS_KEY_ID SECRET_ACCESS_KEY` per line
    /// (`#` comments allowed). Used with --verify-client-sigv4.
    #[arg(long, env = "KMS_EMULATOR_CLIENT_CREDENTIALS_FILE")]
    client_credentials_file: Option<PathBuf>,
    /// Keep state in this directory (survives restarts); default: in memory.
    #[arg(long, env = "KMS_EMULATOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Time a store stays CONNECTING before the proxy is checked (e.g. 0s, 500ms, 2s).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    connect_delay: Duration,
    /// Time a store stays DISCONNECTING.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    disconnect_delay: Duration,
    /// Period of KmsHealthCheck calls to connected stores; 0 turns them off.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    xks_health_interval: Duration,
    /// Cryptographic requests per second per custom key store; 0: unlimited.
    #[arg(long, default_value_t = 1800)]
    xks_store_rps: u32,
    /// TEST KNOB: real length of one day of a key's deletion waiting period.
    #[arg(long, default_value = "86400s", value_parser = parse_duration)]
    deletion_day_length: Duration,
    /// Per-attempt proxy timeout. KMS uses 250 ms; raise only for slow CI.
    #[arg(long, default_value_t = 250)]
    xks_timeout_ms: u64,
    /// PEM bundle of CAs trusted for proxy certificates (default: the system bundle).
    #[arg(long, env = "KMS_EMULATOR_XKS_CA_BUNDLE")]
    xks_ca_bundle: Option<PathBuf>,
    /// Client certificate presented to proxies (KMS presents cks.kms.<region>.amazonaws.com).
    #[arg(long, requires = "xks_client_key")]
    xks_client_cert: Option<PathBuf>,
    /// Private key of --xks-client-cert.
    #[arg(long, requires = "xks_client_cert")]
    xks_client_key: Option<PathBuf>,
    /// TEST-ONLY: dial IP:PORT for proxy endpoint HOST (like curl --resolve); SNI,
    /// certificate checks, Host and SigV4 still use HOST. Repeatable, or
    /// comma-separated in the environment variable.
    #[arg(
        long,
        value_name = "HOST=IP:PORT",
        env = "KMS_EMULATOR_XKS_RESOLVE",
        value_delimiter = ','
    )]
    xks_resolve: Vec<String>,
    /// Open a new connection for every proxy call (no keep-alive pooling).
    #[arg(long)]
    xks_no_pool: bool,
    /// Do not ask proxies for a ciphertext data integrity value (CDIV).
    #[arg(long)]
    xks_no_cdiv: bool,
    /// Send this kmsViaService in proxy Encrypt/Decrypt metadata (policy tests).
    #[arg(long)]
    xks_via_service: Option<String>,
    /// TOML file of stand-in CloudHSM clusters (PKCS#11 tokens) for AWS_CLOUDHSM key
    /// stores; see the README's emulator section.
    #[cfg(feature = "pkcs11")]
    #[arg(long, env = "KMS_EMULATOR_CLOUDHSM_CLUSTERS")]
    cloudhsm_clusters: Option<PathBuf>,
    /// Log format.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
    /// Log level or filter (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// `250ms`, `2s`, `5m`, `1h`, `1d`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 250ms, 2s, 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn parse_resolve(entries: &[String]) -> Result<Vec<(String, SocketAddr)>> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (host, addr) = e
                .trim()
                .split_once('=')
                .with_context(|| format!("--xks-resolve {e:?}: expected HOST=IP:PORT"))?;
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("--xks-resolve {e:?}: {addr:?} is not IP:PORT"))?;
            Ok((host.to_ascii_lowercase(), addr))
        })
        .collect()
}

fn parse_principals(entries: &[String]) -> Result<HashMap<String, String>> {
    entries
        .iter()
        .map(|e| {
            let (akid, arn) = e
                .split_once('=')
                .with_context(|| format!("--principal {e:?}: expected AKID=ARN"))?;
            if !arn.starts_with("arn:") {
                bail!("--principal {e:?}: the principal must be an ARN");
            }
            Ok((akid.to_owned(), arn.to_owned()))
        })
        .collect()
}

fn read_client_credentials(path: &PathBuf) -> Result<Vec<(String, SecretString)>> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next()) {
            (Some(akid), Some(secret), None) => {
                out.push((akid.to_owned(), SecretString::new(secret.to_owned())))
            }
            // Never echo the line: it holds a secret.
            _ => bail!(
                "{} line {}: expected `ACCESS_KEY_ID SECRET_ACCESS_KEY`",
                path.display(),
                n + 1
            ),
        }
    }
    if out.is_empty() {
        bail!("{} holds no credentials", path.display());
    }
    Ok(out)
}

fn init_logging(cli: &Cli) -> Result<()> {
    // The proxy's logger, so both behave alike: colour only on a terminal (no escape
    // codes in redirected logs), request-derived strings escaped, RUST_LOG wins.
    let config = xks_proxy::config::LoggingConfig {
        format: if cli.log_format == "json" {
            xks_proxy::config::LogFormat::Json
        } else {
            xks_proxy::config::LogFormat::Human
        },
        level: cli.log_level.clone(),
    };
    xks_proxy::telemetry::init(&config)
        .map_err(|e| anyhow::anyhow!("cannot install the logger (--log-level?): {e}"))
}

fn config_from(cli: &Cli) -> Result<Config> {
    let client_credentials = if cli.verify_client_sigv4 {
        let path = cli
            .client_credentials_file
            .as_ref()
            .context("--verify-client-sigv4 needs --client-credentials-file")?;
        Some(read_client_credentials(path)?)
    } else {
        None
    };
    Ok(Config {
        region: cli.region.clone(),
        account_id: cli.account_id.clone(),
        principals: parse_principals(&cli.principal)?,
        client_credentials,
        data_dir: cli.data_dir.clone(),
        connect_delay: cli.connect_delay,
        disconnect_delay: cli.disconnect_delay,
        health_interval: cli.xks_health_interval,
        store_rps: cli.xks_store_rps,
        deletion_day_length: cli.deletion_day_length,
        xks: XksClientConfig {
            timeout: Duration::from_millis(cli.xks_timeout_ms),
            ca_bundle: cli.xks_ca_bundle.clone(),
            client_cert: cli.xks_client_cert.clone().zip(cli.xks_client_key.clone()),
            resolve: parse_resolve(&cli.xks_resolve)?,
            pool: !cli.xks_no_pool,
            cdiv: !cli.xks_no_cdiv,
            via_service: cli.xks_via_service.clone(),
        },
        clusters: clusters_from(cli)?,
    })
}

#[cfg(feature = "pkcs11")]
fn clusters_from(cli: &Cli) -> Result<kms::clusters::Clusters> {
    match &cli.cloudhsm_clusters {
        None => Ok(kms::clusters::Clusters::default()),
        Some(path) => Ok(kms::clusters::Clusters::load(path)?),
    }
}

#[cfg(not(feature = "pkcs11"))]
fn clusters_from(_cli: &Cli) -> Result<kms::clusters::Clusters> {
    Ok(kms::clusters::Clusters::default())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn main_async(cli: Cli) -> Result<()> {
    let config = config_from(&cli)?;
    if config.xks.timeout != kms::xks_client::DEFAULT_TIMEOUT {
        tracing::warn!(
            timeout_ms = cli.xks_timeout_ms,
            "XKS proxy timeout changed from KMS's 250 ms (for slow CI only)"
        );
    }
    for (host, addr) in &config.xks.resolve {
        tracing::info!(%host, %addr, "TEST-ONLY --xks-resolve mapping active");
    }
    if config.deletion_day_length != Duration::from_secs(86_400) {
        tracing::warn!(
            seconds = config.deletion_day_length.as_secs_f64(),
            "TEST KNOB: a deletion waiting-period day is shortened"
        );
    }
    let emulator = kms::Emulator::new(config).context("cannot start the emulator")?;

    let mut listeners = Listeners::default();
    let mut announce = Vec::new();
    let http_addr = match (cli.listen, cli.tls_listen) {
        (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 4599))),
        (l, _) => l,
    };
    if let Some(addr) = http_addr {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        announce.push(format!("listening on http://{}", l.local_addr()?));
        listeners.http.push(l);
    }
    if let Some(addr) = cli.tls_listen {
        let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
            bail!("--tls-listen needs --tls-cert and --tls-key");
        };
        let tls = kms::server_tls_config(cert, key)?;
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        announce.push(format!("listening on https://{}", l.local_addr()?));
        listeners.https.push((l, tls));
    }
    tracing::info!(
        region = %emulator.config().region,
        account_id = %emulator.config().account_id,
        data_dir = ?emulator.config().data_dir,
        version = env!("CARGO_PKG_VERSION"),
        "kms-emulator starting"
    );
    {
        // Tests and scripts wait for these lines, so flush them at once.
        let mut out = std::io::stdout().lock();
        for line in &announce {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    kms::serve(emulator, listeners, shutdown_signal()).await?;
    tracing::info!("kms-emulator stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("kms-emulator: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kms-emulator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-emulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
