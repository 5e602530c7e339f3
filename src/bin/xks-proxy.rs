//! `xks-proxy`: thin command-line front end over the library.

/// jemalloc, not glibc malloc: glibc keeps what closed connections freed in its arenas
/// (RSS stays at its peak); jemalloc's background thread gives it back to the system
/// within seconds (issue 15 §4, benches/README.md "Memory per idle connection").
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use xks_proxy::backend::KeyUsage;
use xks_proxy::config::{BackendConfig, Config, TlsConfig};

#[derive(Parser)]
#[command(
    name = "xks-proxy",
    version = xks_proxy::crypto::VERSION,
    about = "AWS KMS External Key Store (XKS) proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Serve {
        #[arg(long, short, env = "XKS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Run a throw-away demo proxy: software keystore with one key, the dev TLS
    /// certificate, random demo credentials (printed). Never for production.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// The path prefix (the XksProxyUriPath is PREFIX/kms/xks/v1).
        #[arg(long, default_value = "/demo")]
        prefix: String,
    },
    /// Check a config file: everything `serve` checks before it binds its ports.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage keys in the configured backend (software keystore or PKCS#11 token).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Read the audit trail: check its chain and seals, or print matching records.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// SigV4 credentials for KMS.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// Print the proxy configuration file the KMS console imports for one path prefix
    /// (XksProxyUriPath + XksProxyAuthenticationCredential).
    KmsConfig {
        #[arg(long, short, env = "XKS_PROXY_CONFIG")]
        config: PathBuf,
        /// The path prefix ("" for none).
        #[arg(long)]
        prefix: String,
        /// Which credential of the prefix (default: the last listed, i.e. the newest).
        #[arg(long)]
        access_key_id: Option<String>,
    },
    /// Check a config end to end and print a report; exit code 0 only if all pass.
    Doctor {
        #[arg(long, short, env = "XKS_PROXY_CONFIG")]
        config: PathBuf,
        /// The DNS name KMS will use (checked against the certificate, whose chain must
        /// then reach a public CA, as KMS requires).
        #[arg(long)]
        endpoint: Option<String>,
        /// How KMS reaches the proxy (XksProxyConnectivity): the certificate rules are
        /// said for this option.
        #[arg(long, value_enum, default_value = "public-endpoint")]
        connectivity: xks_proxy::doctor::Connectivity,
        /// The CA bundle (PEM) the KMS you test against trusts, instead of the public
        /// roots real KMS trusts: the KMS emulator's `--xks-ca-bundle`, for a staging
        /// setup with a private CA. Never what production KMS does.
        #[arg(long)]
        kms_ca_bundle: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain and the checkpoint seals; name the first bad record (file,
    /// line, why). Exit 0: intact and sealed by a final checkpoint; 1: broken; 3:
    /// intact but its end is not sealed (a crash, a running proxy, or a cut tail), or
    /// no key was given.
    Verify {
        /// Audit files in chain order, or directories (their audit-*.jsonl, sorted).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The checkpoint key, as `[audit] key_file` names it.
        #[arg(long, conflicts_with = "key_env")]
        key_file: Option<PathBuf>,
        /// An environment variable holding the checkpoint key.
        #[arg(long)]
        key_env: Option<String>,
    },
    /// Print the request records (one JSON line each) that match every filter given.
    Show {
        /// Audit files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The kmsRequestId.
        #[arg(long)]
        request_id: Option<String>,
        /// The external key id.
        #[arg(long)]
        key: Option<String>,
        /// The awsPrincipalArn.
        #[arg(long)]
        principal: Option<String>,
        /// From this time on (RFC 3339, e.g. 2026-12-06T20:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Make a new access key id (20 chars of A-Z2-7) and secret (44 chars, 256 bits).
    New {
        /// Print JSON instead of two lines.
        #[arg(long, conflicts_with = "secret_file")]
        json: bool,
        /// Write the secret to this new file (mode 0600; refused if it exists) and print
        /// only the access key id, for `secret_file = "..."` in the config.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check everything `serve` checks before binding: syntax, every rule, every secret
    /// and file readable, the TLS certificate and key (parsed, and matching), the
    /// policy, the software keystore (opened with its master key) or the PKCS#11
    /// module file and PIN. Exit 0 only if `serve` would get as far as its ports and
    /// the HSM session.
    Check {
        #[arg(long, short, env = "XKS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Read AWS's sample proxy settings (aws-kms-xks-proxy's settings.toml) into a new
    /// config in DIR: every secret moved to a file (mode 0600), its ciphertexts kept
    /// decrypting; what cannot be carried over is listed as warnings
    ImportAwsSample {
        /// The sample's settings file (its configuration/settings.toml)
        settings: PathBuf,
        /// A new or empty directory for xks-proxy.toml and secrets/
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The token's label (default: the first token the module shows, as the sample
        /// took it)
        #[arg(long, value_name = "LABEL")]
        token_label: Option<String>,
        /// Where the sample ran: its relative paths (tls/...) are resolved here
        /// (default: the settings file's directory's parent)
        #[arg(long, value_name = "DIR")]
        sample_root: Option<PathBuf>,
    },
}

/// The key a `keys` subcommand acts on: `keys rotate ID`, or `--label ID` / `--id ID`.
#[derive(Debug, clap::Args)]
struct KeyName {
    /// The external key id (software keystore) or CKA_LABEL (PKCS#11).
    #[arg(
        value_name = "ID",
        required_unless_present = "label",
        conflicts_with = "label"
    )]
    key: Option<String>,
    /// The same, as an option.
    #[arg(long, alias = "id", value_name = "ID")]
    label: Option<String>,
}

impl KeyName {
    fn id(self) -> String {
        // clap guarantees exactly one of the two.
        self.key.or(self.label).unwrap_or_default()
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random master key (Base64) for the software keystore.
    GenerateMasterKey,
    /// Create the deep health check's own key on every PKCS#11 token that lacks it
    /// (needed once on an HSM whose keys were made by something else, e.g. AWS's
    /// sample proxy).
    CreateHealthCheckKey {
        #[command(flatten)]
        on: Target,
    },
    /// Create an AES-256 key (the software keystore file is created if missing).
    Create {
        #[command(flatten)]
        on: Target,
        #[command(flatten)]
        key: KeyName,
        /// Comma-separated usages: encrypt,decrypt,wrap,unwrap,sign,verify,derive.
        #[arg(long, default_value = "encrypt,decrypt")]
        usage: String,
    },
    /// List keys: id, type, usages, status.
    List {
        #[command(flatten)]
        on: Target,
    },
    /// Enable a key in the software keystore. PKCS#11: remove it from
    /// backend.disabled_keys, then reload.
    #[command(mut_arg("key", |a| a.help("The external key id in the software keystore")))]
    Enable {
        #[command(flatten)]
        on: Target,
        #[command(flatten)]
        key: KeyName,
    },
    /// Disable a key in the software keystore (a running proxy picks it up on SIGHUP).
    /// PKCS#11: list it in backend.disabled_keys, then reload.
    #[command(mut_arg("key", |a| a.help("The external key id in the software keystore")))]
    Disable {
        #[command(flatten)]
        on: Target,
        #[command(flatten)]
        key: KeyName,
    },
    /// Add a new version to a key in the software keystore; new encryptions use it, old
    /// ciphertexts still open. PKCS#11 keys have one version: create a new key and a new
    /// KMS key for it.
    #[command(mut_arg("key", |a| a.help("The external key id in the software keystore")))]
    Rotate {
        #[command(flatten)]
        on: Target,
        #[command(flatten)]
        key: KeyName,
    },
}

/// The config and, when it has several, the backend a key command works on.
#[derive(Debug, clap::Args)]
struct Target {
    #[arg(long, short, env = "XKS_PROXY_CONFIG")]
    config: PathBuf,
    /// The backend to work on: a [backends.NAME] (default: [backend]). Needed when the
    /// config has several.
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
}

impl Target {
    /// The config's key-admin view and the chosen backend.
    fn load(&self) -> Result<(xks_proxy::config::AdminConfig, BackendConfig, String)> {
        let admin = load_admin(&self.config)?;
        let entry = admin
            .backend(self.backend.as_deref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.config.display()))?;
        let (config, name) = (entry.config.clone(), entry.name.clone());
        Ok((admin, config, name))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xks-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    // Exit before binding anything, naming the key and the problem.
                    eprintln!("xks-proxy: {}: {e}", config.display());
                    return Ok(ExitCode::from(2));
                }
            };
            serve(cfg, Some(config), None)
        }
        Command::Demo { listen, prefix } => demo(&listen, &prefix),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => config_check(&config),
        Command::Config {
            command:
                ConfigCommand::ImportAwsSample {
                    settings,
                    out,
                    token_label,
                    sample_root,
                },
        } => import_aws_sample(&settings, &out, token_label, sample_root),
        Command::Keys { command } => keys(command),
        Command::Audit { command } => audit(command),
        Command::Credentials {
            command: CredentialsCommand::New { json, secret_file },
        } => {
            let (akid, secret) = xks_proxy::config::generate_credential();
            if let Some(path) = secret_file {
                write_new_secret_file(&path, secret.expose())?;
                println!("{akid}");
            } else if json {
                println!(
                    "{}",
                    serde_json::json!({"AccessKeyId": akid, "RawSecretAccessKey": secret.expose()})
                );
            } else {
                println!("access key id: {akid}\nsecret:        {}", secret.expose());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::KmsConfig {
            config,
            prefix,
            access_key_id,
        } => kms_config(&config, &prefix, access_key_id.as_deref()),
        Command::Doctor {
            config,
            endpoint,
            connectivity,
            kms_ca_bundle,
        } => Ok(xks_proxy::doctor::run(
            &config,
            &xks_proxy::doctor::Kms {
                endpoint: endpoint.as_deref(),
                connectivity,
                ca_bundle: kms_ca_bundle.as_deref(),
            },
        )),
    }
}

/// `config check`: everything `serve` checks before binding, so OK means `serve`
/// starts; then which secrets rotate with a reload.
fn config_check(config: &Path) -> Result<ExitCode> {
    match Config::load(config) {
        Ok(cfg) => {
            // Everything serve checks before binding, so OK means serve starts.
            if let Err(e) = xks_proxy::server::preflight(&cfg) {
                eprintln!("xks-proxy: {}: {e}", config.display());
                return Ok(ExitCode::from(2));
            }
            println!(
                "{}: OK ({} keystore(s): {})",
                config.display(),
                cfg.keystores.len(),
                cfg.keystores
                    .iter()
                    .map(|k| format!("'{}'", k.path_prefix))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            // Which secrets rotate with `systemctl reload` and which need a restart:
            // the question an operator has before rotating, answered for this file.
            println!(
                "secrets (a reload picks up a new value from a file, never from the environment):"
            );
            let secrets = xks_proxy::config::reload::secret_uses(&cfg);
            let w1 = secrets.iter().map(|s| s.setting.len()).max().unwrap_or(0);
            let w2 = secrets.iter().map(|s| s.source.len()).max().unwrap_or(0);
            for s in secrets {
                println!(
                    "  {:<w1$}  {:<w2$}  {}",
                    s.setting,
                    s.source,
                    if s.rotates_on_reload {
                        "rotates with a reload"
                    } else if s.source.starts_with("env") {
                        "needs a restart (a running process cannot see a changed environment)"
                    } else {
                        "needs a restart (read once at start)"
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("xks-proxy: {}: {e}", config.display());
            Ok(ExitCode::from(2))
        }
    }
}

/// `kms-config`: what KMS needs for one keystore (its URI path and a credential).
fn kms_config(config: &Path, prefix: &str, access_key_id: Option<&str>) -> Result<ExitCode> {
    let cfg = load(config)?;
    let ks = cfg
        .keystores
        .iter()
        .find(|k| k.path_prefix == prefix)
        .with_context(|| {
            format!(
                "no [[keystores]] with path_prefix = \"{prefix}\" in {}",
                config.display()
            )
        })?;
    let cred = match access_key_id {
        Some(id) => ks.credentials.iter().find(|c| c.access_key_id == id),
        None => ks.credentials.last(),
    }
    .context("no such credential in that keystore")?;
    let doc = serde_json::json!({
        "XksProxyUriPath": format!("{prefix}{}", xks_proxy::config::XKS_BASE),
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": cred.access_key_id,
            "RawSecretAccessKey": cred.secret.expose(),
        }
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(ExitCode::SUCCESS)
}

/// Text printed once the listener is bound, given the bound address.
type Banner = Box<dyn FnOnce(std::net::SocketAddr) -> String + Send>;

fn serve(cfg: Config, config_path: Option<PathBuf>, banner: Option<Banner>) -> Result<ExitCode> {
    xks_proxy::telemetry::init(&cfg.logging).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let backends =
            xks_proxy::backend::open_all(&cfg.backends).context("opening the backends")?;
        let running = xks_proxy::server::start(&cfg, backends).await?;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            fips_mode = xks_proxy::crypto::fips_mode(),
            crypto = xks_proxy::crypto::MODULE,
            prefixes = ?cfg.keystores.iter().map(|k| k.path_prefix.as_str()).collect::<Vec<_>>(),
            "xks-proxy listening on {}",
            running.base_url()
        );
        if let Some(addr) = running.ping_addr {
            tracing::info!("load-balancer health check listening on http://{addr}/ping");
        }
        if let Some(addr) = running.admin_addr {
            tracing::info!("metrics listening on http://{addr}/metrics");
        }
        if let Some(b) = banner {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", b(running.local_addr));
            let _ = out.flush();
        }
        xks_proxy::server::reload::run_until_stopped(&running, &cfg, config_path.as_deref()).await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        running.shutdown();
        running.wait().await;
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

const DEV_CERT: &[u8] = include_bytes!("../../certs/server-ecdsa.pem");
const DEV_KEY: &[u8] = include_bytes!("../../certs/server-ecdsa.key");
const DEV_CA: &[u8] = include_bytes!("../../certs/ca.pem");
const DEMO_KEY: &str = "demo-key-1";

/// The quick-start: everything in a private temp dir that is removed on exit.
fn demo(listen: &str, prefix: &str) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("xks-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating the demo directory")?;
    let _cleanup = RemoveOnDrop(dir.clone());
    write_private(
        &dir.join("master.key"),
        xks_proxy::backend::software::MasterKey::generate()
            .to_base64()
            .expose(),
    )?;
    let (akid, secret) = xks_proxy::config::generate_credential();
    write_private(&dir.join("secret"), secret.expose())?;
    std::fs::write(dir.join("ca.pem"), DEV_CA).context("writing the dev CA")?;
    let toml = format!(
        r#"
[server]
listen = "{listen}"
insecure_plain_http = true
[backend]
kind = "software"
keystore = "keystore.json"
master_key_file = "master.key"
[[keystores]]
path_prefix = "{prefix}"
[[keystores.credentials]]
access_key_id = "{akid}"
secret_file = "secret"
"#
    );
    let mut cfg = match Config::from_toml(&toml, &dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xks-proxy demo: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    cfg.server.tls = Some(TlsConfig::Embedded {
        certificate: DEV_CERT,
        private_key: DEV_KEY,
    });
    xks_proxy::key_admin::create(
        &cfg.backends[0].config,
        DEMO_KEY,
        &[KeyUsage::Encrypt, KeyUsage::Decrypt],
    )?;
    let ca = dir.join("ca.pem");
    let prefix = prefix.to_owned();
    let banner: Banner = Box::new(move |addr| {
        let host = demo_host(addr);
        format!(
            r#"
xks-proxy demo — software keystore, dev certificate, throw-away credentials. NOT for production.

  base URL        https://{host}
  path prefix     {prefix}   (XksProxyUriPath: {prefix}/kms/xks/v1)
  access key id   {akid}
  secret          {secret}
  external key    {DEMO_KEY}
  dev CA          {ca}

Health check:
  curl --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user '{akid}:{secret}' --cacert {ca} \
    -H 'Content-Type: application/json' \
    -d '{{"requestMetadata":{{"kmsRequestId":"demo-1","kmsOperation":"KmsHealthCheck"}}}}' \
    https://{host}{prefix}/kms/xks/v1/health

Encrypt ("hello world"):
  curl --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user '{akid}:{secret}' --cacert {ca} \
    -H 'Content-Type: application/json' \
    -d '{{"requestMetadata":{{"kmsRequestId":"demo-2","kmsOperation":"Encrypt","awsPrincipalArn":"arn:aws:iam::111122223333:user/demo","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/demo"}},"plaintext":"aGVsbG8gd29ybGQ=","encryptionAlgorithm":"AES_GCM","ciphertextDataIntegrityValueAlgorithm":"SHA_256"}}' \
    https://{host}{prefix}/kms/xks/v1/keys/{DEMO_KEY}/encrypt

Stop with Ctrl-C.
"#,
            secret = secret.expose(),
            ca = ca.display(),
        )
    });
    serve(cfg, None, Some(banner))
}

/// The host:port to print: `localhost` (what the dev certificate names) for loopback.
fn demo_host(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

fn parse_usages(s: &str) -> Result<Vec<KeyUsage>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            KeyUsage::parse(p).with_context(|| {
                format!(
                    "unknown usage '{p}' (encrypt, decrypt, wrap, unwrap, sign, verify, derive)"
                )
            })
        })
        .collect()
}

fn keys(command: KeysCommand) -> Result<ExitCode> {
    use xks_proxy::key_admin;
    let joined = |usages: &[KeyUsage]| {
        usages
            .iter()
            .map(|u| u.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    match command {
        KeysCommand::CreateHealthCheckKey { on } => {
            let made = key_admin::create_health_check_key(&on.load()?.1)?;
            println!("created the health-check key on {made} token(s) (the others had it)");
        }
        KeysCommand::GenerateMasterKey => println!(
            "{}",
            xks_proxy::backend::software::MasterKey::generate()
                .to_base64()
                .expose()
        ),
        KeysCommand::Create { on, key, usage } => {
            let label = key.id();
            let (admin, backend, name) = on.load()?;
            let usages = parse_usages(&usage)?;
            let created = key_admin::create(&backend, &label, &usages)?;
            if let (true, BackendConfig::Software { keystore, .. }) =
                (created.new_keystore, &backend)
            {
                eprintln!("created keystore {}", keystore.display());
            }
            if created.health_check_keys > 0 {
                eprintln!(
                    "created the health-check key on {} token(s)",
                    created.health_check_keys
                );
            }
            println!("created key {label} ({})", joined(&usages));
            if !admin.serves(&name, &label) {
                eprintln!(
                    "note: no [[keystores]] serves {label} yet: add it to the allowed_keys of the keystore that should (shared_keys in each, if several should), then reload"
                );
            }
        }
        KeysCommand::List { on } => {
            println!("{:<40} {:<10} {:<30} STATUS", "ID", "TYPE", "USAGES");
            for k in key_admin::list(&on.load()?.1)? {
                let version = k.version.map(|v| format!(" (version {v})"));
                println!(
                    "{:<40} {:<10} {:<30} {}{}",
                    k.id,
                    k.spec,
                    joined(&k.usages),
                    k.status,
                    version.unwrap_or_default()
                );
            }
        }
        KeysCommand::Enable { on, key } => set_enabled(&on, &key.id(), true)?,
        KeysCommand::Disable { on, key } => set_enabled(&on, &key.id(), false)?,
        KeysCommand::Rotate { on, key } => {
            let label = key.id();
            let v = key_admin::rotate(&on.load()?.1, &label)?;
            println!("key {label} now at version {v}; send SIGHUP to running proxies");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `config import-aws-sample`: converts, then writes the config and its secret files
/// into `out` (never over an existing file), and says what needs doing.
fn import_aws_sample(
    settings: &Path,
    out: &Path,
    token_label: Option<String>,
    sample_root: Option<PathBuf>,
) -> Result<ExitCode> {
    use xks_proxy::aws_sample::{Import, import};
    let text = std::fs::read_to_string(settings)
        .with_context(|| format!("cannot read {}", settings.display()))?;
    let how = Import {
        token_label,
        sample_root,
    };
    #[cfg(feature = "pkcs11")]
    let discover = xks_proxy::aws_sample::first_token_label;
    #[cfg(not(feature = "pkcs11"))]
    let discover = |_: &Path| -> Result<String, String> {
        Err("this build has no PKCS#11 support".to_owned())
    };
    let imported = import(settings, &text, &how, discover)
        .map_err(|e| anyhow::anyhow!("{}: {e}", settings.display()))?;
    let config = out.join("xks-proxy.toml");
    let mut secrets_dir = std::fs::DirBuilder::new();
    secrets_dir.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut secrets_dir, 0o700);
    secrets_dir
        .create(out.join("secrets"))
        .with_context(|| format!("cannot create {}", out.join("secrets").display()))?;
    for (path, secret) in &imported.secret_files {
        write_new_secret_file(&out.join(path), secret.expose())?;
    }
    write_new_file(&config, imported.config.as_bytes(), 0o644)?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {} and {} secret file(s) in {}",
        config.display(),
        imported.secret_files.len(),
        out.join("secrets").display()
    );
    for (prefix, akid) in &imported.new_credentials {
        println!(
            "new credential {akid} for prefix {prefix:?}: `xks-proxy kms-config --config {} --prefix {prefix:?}` prints what KMS needs",
            config.display()
        );
    }
    println!(
        "next: `xks-proxy keys create-health-check-key --config {0}`, then `xks-proxy config check --config {0}`",
        config.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` with only its owner able to read it, and writes `secret` to it. An
/// existing file is never overwritten: it may be a live credential.
fn write_new_secret_file(path: &Path, secret: &str) -> Result<()> {
    write_new_file(path, secret.as_bytes(), 0o600)
}

/// Creates `path` (never over an existing file) with `mode`, writes `data`, syncs.
fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The key admin commands need the `[backend]` table only: never the SigV4 secrets.
fn audit(command: AuditCommand) -> Result<ExitCode> {
    use xks_proxy::config::SecretSource;
    match command {
        AuditCommand::Verify {
            files,
            key_file,
            key_env,
        } => {
            let source = match (key_file, key_env) {
                (Some(f), _) => Some(SecretSource::File(f)),
                (None, Some(e)) => Some(SecretSource::Env(e)),
                (None, None) => None,
            };
            let key = source
                .map(|s| s.read("--key-file/--key-env"))
                .transpose()?
                .map(|k| xks_proxy::audit::SealKey::new(k.expose().as_bytes()));
            let report = xks_proxy::audit::verify(&xks_proxy::audit::expand(&files)?, key.as_ref());
            print!("{report}");
            Ok(ExitCode::from(report.exit_code()))
        }
        AuditCommand::Show {
            files,
            request_id,
            key,
            principal,
            since,
            until,
        } => {
            let when = |s: Option<String>, flag: &str| {
                s.map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("{flag}: not an RFC 3339 time"))
                })
                .transpose()
            };
            let filter = xks_proxy::audit::Filter {
                request_id,
                key_id: key,
                principal,
                since: when(since, "--since")?,
                until: when(until, "--until")?,
            };
            let found = xks_proxy::audit::show(&xks_proxy::audit::expand(&files)?, &filter)?;
            for line in &found {
                println!("{line}");
            }
            Ok(ExitCode::from(if found.is_empty() { 1 } else { 0 }))
        }
    }
}

fn load_admin(path: &Path) -> Result<xks_proxy::config::AdminConfig> {
    Config::load_admin(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn load(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn set_enabled(on: &Target, label: &str, enabled: bool) -> Result<()> {
    xks_proxy::key_admin::set_enabled(&on.load()?.1, label, enabled)?;
    println!(
        "key {label} {}; send SIGHUP to running proxies",
        if enabled { "enabled" } else { "disabled" }
    );
    Ok(())
}
