//! The command line of `xks-bench` (clap derive): one subcommand per role — the load
//! generator (`run`), the same load under an unauthenticated flood (`flood`), the
//! servers it measures against (`null-server`, `proxy-server`), the figure suite behind
//! benches/README.md (`figures`), the plain PKCS#11 loop (`softhsm-loop`) and the
//! KMS-level soak through the emulator with a proxy restart (`soak`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "xks-bench",
    version,
    about = "KMS-like load generator for XKS proxies, plus the servers and figure suite it is measured with"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive an XKS endpoint like KMS does and report throughput, errors and latency.
    Run(Box<RunArgs>),
    /// The `run` workload measured twice — unloaded, then while attackers flood the
    /// endpoint with unauthenticated connections and requests (fast and slow, HTTP/1.1
    /// and HTTP/2) — and whether it holds up: throughput ratio and p99 against KMS's
    /// 250 ms timeout. Loopback targets only.
    Flood(Box<FloodArgs>),
    /// Bare hyper + rustls on the proxy's exact TLS config, answering a fixed JSON 200:
    /// the ceiling of our stack on this machine.
    NullServer(NullServerArgs),
    /// Our proxy in-process with a fresh software keystore (or a config you give).
    ProxyServer(ProxyServerArgs),
    /// The benches/README.md figure suite: every proxy figure next to the null server,
    /// measured in the same run.
    Figures(Box<FiguresArgs>),
    /// A plain PKCS#11 AES-GCM loop in-process (cached key handle): what a SoftHSM-backed
    /// proxy is compared with.
    SofthsmLoop(SofthsmLoopArgs),
    /// Nothing lost: GenerateDataKey + Decrypt round trips through `kms-emulator` and
    /// `xks-proxy` (real binaries), each Decrypt of an earlier ciphertext, the proxy
    /// restarted once midway; counts mismatches and failed decrypts (both must be 0),
    /// reports throughput, latency and the RSS of both servers.
    Soak(Box<SoakArgs>),
    /// Many idle keep-alive connections of KMS's kind (each carried one signed request)
    /// held open, and a normal load from a new client meanwhile: the server's RSS per
    /// idle connection, whether it is given back, and whether new clients are served.
    Hold(Box<HoldArgs>),
}

/// Which XKS call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpArg {
    /// Encrypt: 32-byte plaintext, ~100-byte AAD, CDIV requested (the GenerateDataKey case).
    Encrypt,
    /// Decrypt of ciphertexts this run encrypted, checking the plaintext.
    Decrypt,
    /// GetKeyMetadata.
    Metadata,
    /// GetHealthStatus.
    Health,
    /// A weighted mix (see --mix).
    Mix,
}

/// How much of each response is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Status, JSON shape, lengths, CDIV and decrypted plaintext (a real XKS proxy).
    Full,
    /// HTTP status only (the null server answers the same body to everything).
    Status,
}

/// Where to send and how to authenticate: any XKS endpoint, ours or anyone's.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Base URL: scheme, host and port (https://localhost:8443). The XKS path is
    /// PREFIX/kms/xks/v1/...
    #[arg(long, default_value = "https://localhost:8443")]
    pub url: String,
    /// The path prefix (XksProxyUriPath without /kms/xks/v1), e.g. /tenant-a.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// The external key id for Encrypt/Decrypt/GetKeyMetadata.
    #[arg(long, default_value = "bench-key-1")]
    pub key_id: String,
    /// SigV4 access key id.
    #[arg(long, env = "XKS_BENCH_ACCESS_KEY_ID", default_value = "")]
    pub access_key_id: String,
    /// SigV4 secret (prefer --secret-file or the environment variable).
    #[arg(long, env = "XKS_BENCH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// File holding the SigV4 secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Region in the credential scope (KMS signs with its own region).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// SigV4 service name.
    #[arg(long, default_value = "kms-xks-proxy")]
    pub service: String,
    /// CA bundle (PEM) that signed the server certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Do not verify the server certificate (never against a production proxy).
    #[arg(long)]
    pub insecure: bool,
    /// Client certificate chain (PEM) for mTLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Connect here instead of resolving the URL's host (like curl --resolve); the
    /// host is still what is sent, signed and verified in the certificate.
    #[arg(long)]
    pub connect_to: Option<SocketAddr>,
    /// Allow a non-loopback target. Off by default: this tool sends load, and load
    /// belongs on your own machine unless you mean it.
    #[arg(long)]
    pub allow_remote: bool,
}

/// How the load is shaped and bounded.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Which call to make.
    #[arg(long, value_enum, default_value = "encrypt")]
    pub op: OpArg,
    /// Weights for --op mix: encrypt=N,decrypt=N,metadata=N,health=N.
    #[arg(long, default_value = "encrypt=45,decrypt=45,metadata=5,health=5")]
    pub mix: String,
    /// Closed loop: workers, each with one request outstanding. Open loop: the most
    /// requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub concurrency: usize,
    /// Open loop: a fixed arrival rate (requests/s). A request delayed because every
    /// worker was still waiting for earlier responses is timed from its intended send
    /// time, so a stall is charged to every request it delays (no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many measured requests (whichever bound comes first).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured warm-up before the measured duration, seconds.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Use HTTP/2 (ALPN h2); default HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// TLS connections (keep-alive). Default: one per worker; with HTTP/2 several
    /// workers may share one.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Open a new TCP + TLS connection for every request (measures handshakes).
    #[arg(long)]
    pub new_connection: bool,
    /// With --new-connection, allow TLS session resumption (default: full handshakes).
    #[arg(long)]
    pub tls_resumption: bool,
    /// Per-request timeout, milliseconds (KMS gives a proxy 250 ms).
    #[arg(long, default_value_t = 250)]
    pub timeout_ms: u64,
    /// Encrypt plaintext size, bytes.
    #[arg(long, default_value_t = 32)]
    pub plaintext_bytes: usize,
    /// Encrypt AAD size, bytes (KMS's encryption-context AAD; 0 for none).
    #[arg(long, default_value_t = 100)]
    pub aad_bytes: usize,
    /// Do not ask for a CDIV on Encrypt.
    #[arg(long)]
    pub no_cdiv: bool,
    /// How much of each response to check.
    #[arg(long, value_enum, default_value = "full")]
    pub verify: Verify,
}

/// One kind of unauthenticated attacker (`flood --attack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Well-formed Encrypt POSTs with a forged SigV4 signature (see --attack-auth), as
    /// fast as the connection allows; over HTTP/2, --attack-streams at once per
    /// connection.
    FastUnsigned,
    /// Request headers announcing a body (--slow-body-bytes), then the body one byte per
    /// --trickle-ms, or never; over HTTP/2, --attack-streams such streams per connection.
    SlowBody,
    /// A TLS handshake, then the request head (HTTP/2: the connection preface) one byte
    /// per --trickle-ms, or nothing.
    SlowHead,
    /// A TLS handshake, then silence.
    Idle,
}

impl AttackKind {
    pub const ALL: [AttackKind; 4] = [
        AttackKind::FastUnsigned,
        AttackKind::SlowBody,
        AttackKind::SlowHead,
        AttackKind::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttackKind::FastUnsigned => "fast-unsigned",
            AttackKind::SlowBody => "slow-body",
            AttackKind::SlowHead => "slow-head",
            AttackKind::Idle => "idle",
        }
    }
}

/// One `--attack` entry: a kind, and optionally its own connection count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttackEntry {
    pub kind: AttackKind,
    /// Connections of this kind (over every --attack-http version); `None`: a share
    /// of --attack-connections.
    pub connections: Option<usize>,
}

/// Parses `KIND` or `KIND=CONNECTIONS` (clap value parser for `--attack`).
pub fn parse_attack_entry(text: &str) -> Result<AttackEntry, String> {
    let (name, count) = match text.split_once('=') {
        Some((n, c)) => (n.trim(), Some(c.trim())),
        None => (text.trim(), None),
    };
    let kind = AttackKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            format!("unknown attacker '{name}' (fast-unsigned, slow-body, slow-head, idle)")
        })?;
    let connections = count
        .map(|c| {
            c.parse::<usize>()
                .map_err(|_| format!("'{c}' in '{text}' is not a connection count"))
        })
        .transpose()?;
    Ok(AttackEntry { kind, connections })
}

/// An HTTP version the attackers speak (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum AttackHttp {
    #[value(name = "1.1")]
    H1,
    #[value(name = "2")]
    H2,
}

/// What the attackers put in Authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackAuth {
    /// The target's real access key id, a current X-Amz-Date and a wrong signature: the
    /// server must hash the body and compute the HMAC before it can say no (its most
    /// expensive rejection).
    BadSignature,
    /// An access key id the server does not know.
    UnknownKey,
    /// No Authorization and no X-Amz-Date.
    None,
}

/// The attackers of `flood`: which, how many, how fast, from where. Every count and rate
/// is capped (see `attack.rs`); connections are spread over loopback source addresses.
#[derive(Debug, Clone, Args)]
pub struct AttackArgs {
    /// Attackers: KIND or KIND=CONNECTIONS, comma-separated (fast-unsigned, slow-body,
    /// slow-head, idle). Kinds without a count share --attack-connections evenly.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_attack_entry,
        default_value = "fast-unsigned,slow-body,slow-head,idle"
    )]
    pub attack: Vec<AttackEntry>,
    /// HTTP versions the attackers use; each kind's connections are split evenly over
    /// them.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "1.1,2")]
    pub attack_http: Vec<AttackHttp>,
    /// Attacker connections held at once by the kinds without an explicit count (in
    /// all, at most 16384).
    #[arg(long, default_value_t = 256)]
    pub attack_connections: usize,
    /// HTTP/2 streams each fast-unsigned or slow-body connection keeps open (the proxy
    /// allows 256 per connection); at most 1024.
    #[arg(long, default_value_t = 256)]
    pub attack_streams: usize,
    /// Loopback source addresses the attackers spread their connections over:
    /// 127.0.0.2, 127.0.0.3, ... (never the signed client's 127.0.0.1), so that a
    /// per-address connection cap meets N addresses. IPv6 loopback has one (::1).
    #[arg(long, default_value_t = 4)]
    pub attack_sources: usize,
    /// New attacker connections per second, all attackers together (reconnects after
    /// the server closes one included): bounds the handshake load on both sides.
    #[arg(long, default_value_t = 500.0)]
    pub attack_connect_rate: f64,
    /// Fast-unsigned requests per second, all connections together (default: as fast as
    /// they are answered).
    #[arg(long)]
    pub attack_rate: Option<f64>,
    /// Slow attackers send one byte per this many milliseconds; 0: nothing at all after
    /// the request headers (slow-body) or the handshake (slow-head).
    #[arg(long, default_value_t = 1000)]
    pub trickle_ms: u64,
    /// The Content-Length slow-body requests announce (keep it under the server's body
    /// cap, or they are refused at once).
    #[arg(long, default_value_t = 1000)]
    pub slow_body_bytes: usize,
    /// What the attackers put in Authorization.
    #[arg(long, value_enum, default_value = "bad-signature")]
    pub attack_auth: AttackAuth,
}

#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The measured, correctly signed client (the `run` options; closed loop unless
    /// --rate).
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub attack: AttackArgs,
    /// Rounds, each an unloaded run then an attacked run; the verdict uses medians.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Seconds the attackers run before the signed client starts (so slow connections
    /// have piled up when it connects).
    #[arg(long, default_value_t = 2.0)]
    pub attack_ramp: f64,
    /// Seconds of quiet after each run, so the server has dropped the previous run's
    /// connections before the next begins.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Bind the signed client's connections to this address (default: unbound, which on
    /// IPv4 loopback is 127.0.0.1; the report names the address seen).
    #[arg(long)]
    pub client_source: Option<IpAddr>,
    /// Verdict: the attacked throughput must be at least this fraction of the unloaded.
    #[arg(long, default_value_t = 0.5)]
    pub min_ratio: f64,
    /// Verdict: the attacked p99 must stay under this (KMS's timeout).
    #[arg(long, default_value_t = 250.0)]
    pub max_p99_ms: f64,
    /// A name for this scenario in reports.
    #[arg(long, default_value = "flood")]
    pub label: String,
    /// Print the report as JSON on stdout (default: markdown).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file (whatever stdout gets).
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// The server's process id: its CPU and RSS in both runs (loopback only).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// A name for this run in reports.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Print the report as JSON on stdout (default: a markdown table).
    #[arg(long)]
    pub json: bool,
    /// Write a latency plot (SVG) here, with KMS's 250 ms timeout marked.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The server's process id: report its CPU per request and its RSS (loopback only).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The new client's load while the connections are held.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Idle keep-alive connections to hold.
    #[arg(long, default_value_t = 10_000)]
    pub hold_connections: usize,
    /// Loopback source addresses to spread them over (127.0.0.2 ...), so a per-source
    /// connection cap sees a fleet, as it would see KMS's.
    #[arg(long, default_value_t = 64)]
    pub hold_sources: usize,
    /// Hold HTTP/2 connections (default HTTP/1.1).
    #[arg(long)]
    pub hold_http2: bool,
    /// A name for this run in reports.
    #[arg(long, default_value = "hold")]
    pub label: String,
    /// Print the report as JSON on stdout (default: markdown).
    #[arg(long)]
    pub json: bool,
    /// The server's process id: its RSS before, while holding and after.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// What every server subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where to listen (loopback; port 0 picks one, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Server certificate chain (default: the dev ECDSA certificate in certs/).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Server private key (default: the dev ECDSA key in certs/).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Exit after this many seconds whatever happens (servers are bounded too).
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
    /// Exit when standard input closes (so a parent that dies takes its servers along).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NullServerArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The same-run ceiling of a PKCS#11-backed proxy: also do, inline, the key-manager
    /// work of each request on this module's token — one AES-256-GCM encrypt with a
    /// cached handle, plus a decrypt of it when the request asks for a CDIV.
    #[arg(long)]
    pub hsm_module: Option<PathBuf>,
    /// Token label for --hsm-module (its key `bench-key-1` is created if missing).
    #[arg(long, default_value = "xks-bench")]
    pub hsm_token: String,
    /// Environment variable holding the token's user PIN, for --hsm-module.
    #[arg(long, default_value = "XKS_BENCH_HSM_PIN")]
    pub hsm_pin_env: String,
}

#[derive(Debug, Clone, Args)]
pub struct ProxyServerArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Run with this proxy config instead of a generated software keystore (e.g. a
    /// `kind = "pkcs11"` backend). Its credentials are yours to pass to `run`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Path prefix of the generated keystore.
    #[arg(long, default_value = "/bench")]
    pub prefix: String,
    /// Log level of the proxy's request log (info is what production runs with; off
    /// shows what logging costs).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines instead of human text.
    #[arg(long)]
    pub log_json: bool,
    /// Generate a PKCS#11 proxy on this module instead of a software keystore (the
    /// bench key and the health-check key are created on the token if missing).
    #[arg(long, conflicts_with = "config")]
    pub softhsm_module: Option<PathBuf>,
    /// Token label for --softhsm-module.
    #[arg(long, default_value = "xks-bench")]
    pub softhsm_token: String,
    /// Environment variable holding the token's user PIN, for --softhsm-module.
    #[arg(long, default_value = "XKS_BENCH_HSM_PIN")]
    pub softhsm_pin_env: String,
    /// Override `[server] max_in_flight` (the global limit on requests being processed):
    /// a small value shows how few held requests starve everyone (`flood`).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Write the audit trail (issue 16 §2) into this directory (a fresh checkpoint key
    /// is generated; fail closed). Off by default.
    #[arg(long, value_name = "DIR")]
    pub audit_dir: Option<PathBuf>,
    /// The audit trail's fsync policy with --audit-dir: never, interval, every_record.
    #[arg(long, default_value = "interval", requires = "audit_dir")]
    pub audit_fsync: String,
}

#[derive(Debug, Clone, Args)]
pub struct FiguresArgs {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// CPU list the servers are pinned to (taskset -c); empty for no pinning.
    #[arg(long, default_value = "1")]
    pub server_cpus: String,
    /// Steady-state open-loop rate (KMS's default quota per key store).
    #[arg(long, default_value_t = 1800.0)]
    pub rate: f64,
    /// Closed-loop concurrencies to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub concurrency: Vec<usize>,
    /// Also measure the proxy on SoftHSM: a fresh token is made with
    /// tests/softhsm/setup.sh under --out, and a plain in-process PKCS#11 loop is
    /// measured on the server CPU for the ratio.
    #[arg(long)]
    pub softhsm: bool,
    /// Rounds: every scenario is measured this many times, all servers back to back in
    /// each round; the table shows medians over the rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also run the proxy with logging off (shows the request log's cost).
    #[arg(long)]
    pub with_log_off: bool,
    /// Also run the proxy with the audit trail on (fsync = interval, files under
    /// OUT/audit-trail): the audit log's cost, next to "proxy (software)".
    #[arg(long)]
    pub with_audit: bool,
    /// Write every report (JSON), the markdown table and the plots here.
    #[arg(long, default_value = "target/xks-bench-figures")]
    pub out: PathBuf,
    /// Only the quick subset (the smoke of the suite itself).
    #[arg(long)]
    pub quick: bool,
    /// Idle keep-alive connections to hold against the real `xks-proxy` (software
    /// keystore) for the memory figures, over HTTP/1.1 and then HTTP/2
    /// (`benches/idle.sh`); 0 skips them.
    #[arg(long, default_value_t = 0)]
    pub idle_connections: usize,
    /// The `xks-proxy` binary the memory figures run (build it with `cargo build
    /// --release --features bench --bins`): the product's allocator, which the
    /// in-process proxies here share.
    #[arg(long, default_value = "target/release/xks-proxy")]
    pub idle_proxy: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct SofthsmLoopArgs {
    /// The PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long, env = "XKS_TEST_PKCS11_MODULE")]
    pub module: PathBuf,
    /// Token label.
    #[arg(long, env = "XKS_TEST_SOFTHSM_TOKEN_LABEL", default_value = "xks-test")]
    pub token_label: String,
    /// User PIN (a test token's).
    #[arg(
        long,
        env = "XKS_TEST_SOFTHSM_USER_PIN",
        default_value = "1234",
        hide_env_values = true
    )]
    pub pin: String,
    /// CKA_LABEL of an AES-256 key (created if missing).
    #[arg(long, default_value = "bench-key-1")]
    pub key_label: String,
    /// Plaintext size, bytes.
    #[arg(long, default_value_t = 32)]
    pub plaintext_bytes: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Threads, each with its own session.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Look the key up by label on every call (the anti-pattern) instead of caching
    /// the handle.
    #[arg(long)]
    pub lookup_each_call: bool,
    /// Each operation is an encrypt and a decrypt of its output: the HSM work of one
    /// Encrypt with a CDIV (the proxy's verify-decrypt).
    #[arg(long)]
    pub with_decrypt: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The key manager behind the soak's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoakBackend {
    /// A fresh software keystore in the work directory.
    Software,
    /// A PKCS#11 token: the one tests/softhsm/setup.sh made (its exported variables).
    Softhsm,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Round trips (one GenerateDataKey and one Decrypt each).
    #[arg(long, default_value_t = 1_000_000)]
    pub round_trips: u64,
    /// Round trips in flight at once (workers).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// The proxy's key manager.
    #[arg(long, value_enum, default_value = "software")]
    pub backend: SoakBackend,
    /// PKCS#11 module, for --backend softhsm.
    #[arg(long, env = "XKS_TEST_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// Token label, for --backend softhsm.
    #[arg(long, env = "XKS_TEST_SOFTHSM_TOKEN_LABEL")]
    pub token_label: Option<String>,
    /// The token's user PIN, for --backend softhsm (a test token's).
    #[arg(long, env = "XKS_TEST_SOFTHSM_USER_PIN", hide_env_values = true)]
    pub pin: Option<String>,
    /// The external key (CKA_LABEL on a token). Default: `bench-key-1` in the fresh
    /// software keystore; `soak-<pid>-<time>` made on the token, so runs never share one.
    #[arg(long)]
    pub key_label: Option<String>,
    /// Restart the proxy (SIGTERM, wait for its exit, start it again on the same
    /// config, port and key manager) when this fraction of the round trips is done.
    #[arg(long, default_value_t = 0.5)]
    pub restart_at: f64,
    /// Never restart the proxy.
    #[arg(long)]
    pub no_restart: bool,
    /// After the new proxy is up, how long errors of an unreachable or slow proxy are
    /// still put down to the restart (and retried) rather than counted as failures.
    #[arg(long, default_value_t = 2000)]
    pub restart_grace_ms: u64,
    /// Ciphertexts kept for Decrypt targets: a uniform sample of everything made so far
    /// (half the Decrypts) next to the most recent ones (the other half). The sample
    /// taken when the restart begins is decrypted again at the end.
    #[arg(long, default_value_t = 10_000)]
    pub sample: usize,
    /// The emulator's per-attempt proxy timeout (KMS: 250 ms; raise only for debug
    /// builds).
    #[arg(long, default_value_t = 250)]
    pub xks_timeout_ms: u64,
    /// The emulator's per-key-store request quota (KMS: 1800/s); 0: unlimited.
    /// Throttled requests are retried, and counted apart.
    #[arg(long, default_value_t = 0)]
    pub store_rps: u32,
    /// Client timeout of one KMS call (the emulator answers within ~2x the proxy timeout).
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Log filter of both servers (RUST_LOG). Their logs are read and counted, never
    /// stored; warnings and errors are kept for the report.
    #[arg(long, default_value = "info")]
    pub server_log: String,
    /// The `xks-proxy` binary (default: next to this one).
    #[arg(long, env = "XKS_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// The `kms-emulator` binary (default: next to this one).
    #[arg(long, env = "KMS_EMULATOR_BIN")]
    pub emulator_bin: Option<PathBuf>,
    /// Work directory for the proxy's config, keystore and secret (default: a fresh
    /// temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up (and fail) after this many minutes.
    #[arg(long, default_value_t = 240.0)]
    pub max_minutes: f64,
    /// A name for this run in reports.
    #[arg(long, default_value = "soak")]
    pub label: String,
    /// Print the report as JSON on stdout (default: markdown).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}
