//! The network side: accept loops, connection admission ([`admission`]), the TLS
//! handshake, each connection's HTTP and deadlines ([`connection`]), the optional
//! plain-HTTP `/ping` and admin listeners, and graceful drain on shutdown.
//!
//! `server` knows nothing of the XKS API beyond handing each request to [`Api::serve`]
//! (and reading the [`crate::api::Authenticated`] mark on its answer).

pub mod admission;
pub mod connection;
pub mod reload;
pub mod tls;

pub use reload::Reloader;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api::Api;
use crate::api::key_manager::{KeyManager, KeyManagers};
use crate::config::{Config, ServerConfig};
use admission::{Gate, Refused};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("invalid credentials: {0}")]
    Credentials(#[from] crate::sigv4::DuplicateAccessKeyId),
    #[error("invalid keystores: {0}")]
    Tenants(#[from] crate::api::TenantsError),
    #[error("authorization policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cannot start the backend's call threads: {0}")]
    CallThreads(std::io::Error),
    #[error("backend '{name}' refused the reload: {source}")]
    BackendReload {
        name: String,
        source: crate::backend::BackendError,
    },
    #[error("cannot open backend '{name}': {reason}")]
    BackendOpen { name: String, reason: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Fips(#[from] crate::crypto::FipsError),
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// A started proxy: its addresses and the way to stop it.
#[derive(Debug)]
pub struct Running {
    /// Where the XKS listener is bound (useful with port 0).
    pub local_addr: SocketAddr,
    /// Where the plain-HTTP `/ping` listener is bound, if configured.
    pub ping_addr: Option<SocketAddr>,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Where the admin (metrics) listener is bound, if configured.
    pub admin_addr: Option<SocketAddr>,
    pub api: Arc<Api>,
    reloader: Reloader,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

/// Sets one key manager's gauges: its calls in flight and waiting, and 1 for each
/// instance's current health status. A key manager that left service (`live` false)
/// reads 0 everywhere, so none of its series can hold an alert.
fn set_backend_series(m: &KeyManager, live: bool) {
    let backend = m.name.to_string();
    let (in_flight, waiting) = if live {
        (m.handle.in_flight() as f64, m.handle.waiting() as f64)
    } else {
        (0.0, 0.0)
    };
    metrics::gauge!("xks_backend_calls_in_flight", "backend" => backend.clone()).set(in_flight);
    metrics::gauge!("xks_backend_calls_waiting", "backend" => backend.clone()).set(waiting);
    for e in m.health.current() {
        for state in crate::backend::HealthState::ALL {
            metrics::gauge!(
                "xks_ekm_health_status",
                "backend" => backend.clone(),
                "id" => e.id.clone(),
                "model" => e.model.clone(),
                "status" => state.as_str()
            )
            .set(if live && e.state == state { 1.0 } else { 0.0 });
        }
    }
}

/// Everything `serve` checks before it binds its ports, short of binding and of
/// opening HSM sessions: the tenants and their credentials, the policy, the TLS
/// certificate chain and key (read, parsed, and matched with each other), the client
/// CA, and the backend's own preflight (the software keystore opened with its master
/// key; PKCS#11 module files and PIN sources). `config check` and `doctor` run exactly
/// this, so that their OK means `serve` will start. Errors name the config key.
pub fn preflight(config: &Config) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError;
    crate::crypto::check(config.server.require_fips)
        .map_err(|e| ConfigError::new("server.require_fips", e.to_string()))?;
    for k in &config.keystores {
        crate::api::credential_set(k).map_err(|e| ConfigError::new("keystores", e.to_string()))?;
    }
    load_policy(config.policy_file.as_deref())
        .map_err(|e| ConfigError::new("policy.file", e.to_string()))?;
    if let Some(audit) = &config.audit {
        crate::audit::preflight(audit).map_err(|e| ConfigError::new("audit.directory", e))?;
    }
    if let Some(t) = &config.server.tls {
        tls::server_config(t, config.server.client_auth.as_ref()).map_err(|e| {
            let key = match &e {
                tls::TlsError::Certificate { .. } => "server.tls.certificate",
                tls::TlsError::PrivateKey { .. } => "server.tls.private_key",
                tls::TlsError::Mismatch(_) => "server.tls",
                tls::TlsError::ClientCa { .. } => "server.tls.client_ca",
                tls::TlsError::NotFipsApproved { .. } => "server.tls.certificate",
                tls::TlsError::NotFips => "server.tls",
            };
            ConfigError::new(key, e.to_string())
        })?;
    }
    for b in &config.backends {
        crate::backend::preflight(&b.config).map_err(|e| {
            use crate::backend::OpenError;
            use crate::backend::software::KeystoreError;
            let field = match &e {
                OpenError::Config(_) => None,
                OpenError::Software(
                    KeystoreError::MasterKeyEnvUnset { .. }
                    | KeystoreError::MasterKeyEnvInvalid { .. },
                ) => Some("master_key_env"),
                OpenError::Software(
                    KeystoreError::MasterKeyFileRead { .. }
                    | KeystoreError::MasterKeyFileInvalid { .. }
                    | KeystoreError::MasterKeyLength { .. },
                ) => Some("master_key_file"),
                OpenError::Software(_) => Some("keystore"),
                #[cfg(feature = "pkcs11")]
                OpenError::Pkcs11(_) => None,
            };
            let key = match field {
                Some(f) => format!("{}.{f}", b.table),
                None => b.table.clone(),
            };
            ConfigError::new(key, e.to_string())
        })?;
    }
    Ok(())
}

fn load_policy(
    file: Option<&std::path::Path>,
) -> Result<Option<Arc<crate::policy::Policy>>, ServeError> {
    match file {
        None => Ok(None),
        Some(path) => {
            let policy = crate::policy::Policy::from_file(path)?;
            tracing::info!(file = %path.display(), policies = ?policy.policy_ids(), "secondary authorization policy loaded");
            Ok(Some(Arc::new(policy)))
        }
    }
}

impl Running {
    /// Starts graceful shutdown: stop accepting, let in-flight requests finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until every listener has drained (or the grace period ran out), then
    /// seals the audit trail with its final checkpoint.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        if let Some(trail) = self.api.audit() {
            trail.close().await;
        }
    }

    /// The handle that applies a new config (SIGHUP, file watch).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The base URL of the XKS listener.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }
}

/// Binds the configured listeners and starts serving with `backends` (one per
/// `config.backends` entry, by name: [`crate::backend::open_all`]).
pub async fn start(
    config: &Config,
    backends: crate::backend::Opened,
) -> Result<Running, ServeError> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let ping_listener = bind_optional(config.server.ping_listen).await?;
    let admin_listener = bind_optional(config.admin_listen).await?;
    start_on(config, backends, listener, ping_listener, admin_listener).await
}

async fn bind_optional(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, ServeError> {
    match addr {
        Some(addr) => Ok(Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        )),
        None => Ok(None),
    }
}

/// Like [`start`], on listeners the caller bound (tests, socket activation).
pub async fn start_on(
    config: &Config,
    backends: crate::backend::Opened,
    listener: TcpListener,
    ping_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
) -> Result<Running, ServeError> {
    // Before anything serves: a FIPS build whose module is not in FIPS mode, or a config
    // requiring FIPS mode on a build without it, does not start.
    crate::crypto::check(config.server.require_fips)?;
    let cert_not_after = Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN));
    let tls = tls_config(&config.server, &cert_not_after)?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let managers = start_key_managers(config, backends, &shutdown_rx).await?;
    let audit = match &config.audit {
        Some(a) => {
            ignore_file_size_signal();
            Some(Arc::new(crate::audit::Trail::start(a)?))
        }
        None => None,
    };
    let api = Arc::new(Api::new(config, managers)?.with_audit(audit));
    api.replace_policy(load_policy(config.policy_file.as_deref())?);
    let reloader = Reloader {
        started: Arc::new(crate::config::reload::split(config).0),
        api: Arc::clone(&api),
        tls: tls.clone(),
        cert_not_after: Arc::clone(&cert_not_after),
        shutdown: shutdown_rx.clone(),
        applying: Arc::default(),
    };

    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let mut tasks = tokio::task::JoinSet::new();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tasks.spawn(accept_loop(
        listener,
        tls,
        Arc::clone(&api),
        config.server.clone(),
        shutdown_rx.clone(),
    ));
    let ping_addr = match ping_listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            tasks.spawn(side_loop(
                l,
                Side::Ping,
                Arc::clone(&api),
                Arc::clone(&cert_not_after),
                config.server.clone(),
                shutdown_rx.clone(),
            ));
            addr
        }
        None => None,
    };
    let admin_addr = match admin_listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            if addr.is_some_and(|a| !a.ip().is_loopback()) {
                tracing::warn!(listen = ?addr, "the admin (metrics) listener is not on loopback: keep it on a private network");
            }
            if crate::telemetry::prometheus().is_none() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            register_series(&api);
            metrics::gauge!("xks_config_last_reload_successful").set(1.0);
            metrics::gauge!("xks_fips_mode").set(if crate::crypto::fips_mode() {
                1.0
            } else {
                0.0
            });
            tasks.spawn(side_loop(
                l,
                Side::Admin,
                Arc::clone(&api),
                Arc::clone(&cert_not_after),
                config.server.clone(),
                shutdown_rx,
            ));
            addr
        }
        None => None,
    };
    Ok(Running {
        local_addr,
        ping_addr,
        scheme,
        admin_addr,
        api,
        reloader,
        shutdown,
        tasks,
    })
}

/// The TLS config the accept loop starts with (a reload swaps it), and the
/// certificate's expiry for `/ping` and the metrics; `None` for plain HTTP.
fn tls_config(
    server: &ServerConfig,
    cert_not_after: &std::sync::atomic::AtomicI64,
) -> Result<Option<Arc<ArcSwap<rustls::ServerConfig>>>, ServeError> {
    let Some(t) = &server.tls else {
        tracing::warn!(
            "serving PLAIN HTTP (server.insecure_plain_http = true): only safe behind a TLS-terminating load balancer on a private network"
        );
        return Ok(None);
    };
    let cfg = tls::server_config(t, server.client_auth.as_ref())?;
    cert_not_after.store(tls::not_after(t).unwrap_or(i64::MIN), Ordering::Release);
    if server.client_auth.is_some() {
        tracing::info!(
            "mTLS on: clients must present a certificate with a configured subject name"
        );
    }
    Ok(Some(Arc::new(ArcSwap::new(cfg))))
}

/// Puts every configured backend in service (`backends` holds one per
/// `config.backends` entry, by name).
async fn start_key_managers(
    config: &Config,
    mut backends: crate::backend::Opened,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<KeyManagers, ServeError> {
    // Every key manager's first deep check at once: a hung one delays the start by
    // one STARTUP_BUDGET, not one per backend.
    let mut starting = tokio::task::JoinSet::new();
    for entry in &config.backends {
        let backend = backends
            .remove(&entry.name)
            .ok_or_else(|| ServeError::BackendOpen {
                name: entry.name.clone(),
                reason: "not opened (start was given no backend by this name)".into(),
            })?;
        let (entry, limits, health, stop) = (
            entry.clone(),
            config.limits,
            config.health.clone(),
            shutdown_rx.clone(),
        );
        starting.spawn(async move {
            let m = KeyManager::start(
                &entry.name,
                backend,
                Some(&entry.config),
                limits,
                health,
                stop,
            )
            .await;
            (entry.name, m)
        });
    }
    let mut managers = KeyManagers::new();
    while let Some(started) = starting.join_next().await {
        let (name, m) = started.map_err(|e| ServeError::BackendOpen {
            name: "?".into(),
            reason: e.to_string(),
        })?;
        managers.insert(name, m.map_err(ServeError::CallThreads)?);
    }
    Ok(managers)
}

/// A write past `RLIMIT_FSIZE` raises SIGXFSZ, whose default action kills the
/// process: with an audit trail the writer must see the error (EFBIG) and apply
/// `on_failure` instead. A tokio listener replaces the default action for the life of
/// the process (no `unsafe` needed); nobody needs to read from it.
fn ignore_file_size_signal() {
    // SIGXFSZ is 25 on every Linux architecture we build for (x86, ARM, RISC-V).
    #[cfg(target_os = "linux")]
    if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25)) {
        tracing::warn!(error = %e, "cannot catch SIGXFSZ: a file size limit would stop the process instead of failing an audit write");
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    api: Arc<Api>,
    settings: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    // One admission per open connection: bounds them in all and per source, and lets
    // shutdown wait for all of them to be returned (every connection drained).
    let gate = Gate::new(
        settings.max_connections,
        settings.max_connections_per_source,
    );
    let settings = Arc::new(settings);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admission = match gate.admit(peer) {
            Ok(a) => a,
            Err(refused) => {
                note_refused(refused, "xks", peer, &gate);
                continue;
            }
        };
        // Nagle would add up to 40 ms to small responses (measured: p99.9 26 ms on c=1).
        let _ = tcp.set_nodelay(true);
        // The config current at accept time: a reload changes it for new connections.
        let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
        let api = Arc::clone(&api);
        let settings = Arc::clone(&settings);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _admission = admission;
            let Some(acceptor) = tls else {
                connection::serve(tcp, api, &settings, shutdown).await;
                return;
            };
            let handshake = acceptor.accept(tcp).into_fallible();
            match tokio::time::timeout(settings.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => connection::serve(stream, api, &settings, shutdown).await,
                Ok(Err((e, tcp))) => {
                    note_handshake_failure(peer, handshake_failure_reason(&e), Some(&e));
                    // Let the client read the alert (a refused client certificate must
                    // end in an alert it can name), then close.
                    connection::linger_close(tcp, settings.body_read_timeout).await;
                }
                Err(_) => note_handshake_failure(peer, "timeout", None),
            }
        });
    }
    drop(listener);
    // Drain: wait until every connection has returned its admission, within the grace.
    if !gate.drained(settings.shutdown_grace).await {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// The reasons of `xks_tls_handshake_failures_total`, all exported from the start.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "client_certificate_refused",
    "no_client_certificate",
    "certificate_rejected_by_client",
    "incompatible_client",
    "protocol_error",
    "closed_by_client",
    "timeout",
    "io_error",
];

/// Why a TLS handshake failed, as a metric label an operator can act on.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::AlertDescription as A;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        // Our mTLS verifier refuses with a general error (see tls.rs: it makes rustls
        // send handshake_failure, which clients can name).
        Some(rustls::Error::General(_) | rustls::Error::InvalidCertificate(_)) => {
            "client_certificate_refused"
        }
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA,
        )) => "certificate_rejected_by_client",
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible_client",
        Some(_) => "protocol_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed_by_client",
        None => "io_error",
    }
}

/// Counts a reload (SIGHUP or file watch) and keeps the last outcome as a gauge, so an
/// alert can say "the running config is not the file on disk" until a reload works.
fn note_reload(ok: bool) {
    metrics::counter!("xks_reloads_total", "outcome" => if ok { "ok" } else { "failed" })
        .increment(1);
    metrics::gauge!("xks_config_last_reload_successful").set(if ok { 1.0 } else { 0.0 });
}

/// Makes every counter series whose labels are known in advance exist, at 0: a
/// `rate()` or `increase()` over a series that appears only at its first increment
/// misses that increment, so an alert on the first failure would never fire. Called
/// at start and after each reload (new prefixes).
fn register_series(api: &Api) {
    for listener in ["xks", "ping", "admin"] {
        for reason in ["total", "per_source"] {
            metrics::counter!("xks_connections_refused_total", "listener" => listener, "reason" => reason)
                .increment(0);
        }
    }
    for reason in HANDSHAKE_FAILURE_REASONS {
        metrics::counter!("xks_tls_handshake_failures_total", "listener" => "xks", "reason" => *reason)
            .increment(0);
    }
    for why in connection::CloseReason::ALL {
        metrics::counter!("xks_connections_closed_total", "reason" => why.label()).increment(0);
    }
    for why in crate::api::UnauthenticatedRejection::ALL {
        metrics::counter!("xks_unauthenticated_rejections_total", "reason" => why.label())
            .increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("xks_reloads_total", "outcome" => outcome).increment(0);
    }
    for name in api.tenants().managers().keys() {
        metrics::counter!("xks_backend_calls_skipped_total", "backend" => name.clone())
            .increment(0);
        let _ = metrics::histogram!("xks_backend_call_duration_seconds", "backend" => name.clone());
    }
    // Per prefix and operation, the success series: the denominator of every error
    // ratio. Error series appear with their first error (a rate over them is then
    // read against this one).
    for prefix in api.tenants().prefixes() {
        for operation in crate::api::route::Operation::ALL {
            metrics::counter!(
                "xks_requests_total",
                "operation" => operation.as_str(),
                "prefix" => prefix.to_owned(),
                "outcome" => "ok"
            )
            .increment(0);
            // Registered, not recorded: the latency series exist before the first
            // request, so a rate() over them sees the first burst.
            let _ = metrics::histogram!(
                "xks_request_duration_seconds",
                "operation" => operation.as_str(),
                "prefix" => prefix.to_owned(),
                "outcome" => "ok"
            );
        }
    }
}

/// At most 10 handshake-failure lines per 10 s: strangers trigger them at will.
static HANDSHAKE_LOG: crate::telemetry::LogBudget =
    crate::telemetry::LogBudget::new(Duration::from_secs(10), 10);

/// Counts a failed TLS handshake and logs it at warn (within [`HANDSHAKE_LOG`]): a
/// wrong client certificate, KMS refusing our certificate, an old TLS version — each
/// is something an operator must see without turning on debug logging.
fn note_handshake_failure(peer: SocketAddr, reason: &'static str, error: Option<&std::io::Error>) {
    metrics::counter!("xks_tls_handshake_failures_total", "listener" => "xks", "reason" => reason)
        .increment(1);
    if let Some(left_out) = HANDSHAKE_LOG.admit() {
        match error {
            Some(e) => {
                tracing::warn!(%peer, reason, error = %e, left_out, "TLS handshake failed")
            }
            None => tracing::warn!(%peer, reason, left_out, "TLS handshake failed"),
        }
    }
}

/// At most 10 "connection limit reached" lines per 10 s.
static REFUSED_LOG: crate::telemetry::LogBudget =
    crate::telemetry::LogBudget::new(Duration::from_secs(10), 10);

/// Counts and logs a refused connection. Debug level for the per-source cap, and a
/// budget for the total cap: an attacker must not be able to flood the log by trying.
fn note_refused(refused: Refused, listener: &'static str, peer: SocketAddr, gate: &Gate) {
    match refused {
        Refused::Total => {
            metrics::counter!("xks_connections_refused_total", "listener" => listener, "reason" => "total")
                .increment(1);
            if let Some(left_out) = REFUSED_LOG.admit() {
                tracing::warn!(%peer, listener, limit = gate.limit(), left_out, "connection limit reached; closing new connection");
            }
        }
        Refused::Source => {
            metrics::counter!("xks_connections_refused_total", "listener" => listener, "reason" => "per_source")
                .increment(1);
            tracing::debug!(%peer, listener, limit = gate.per_source_limit(), "per-source connection limit reached; closing new connection");
        }
    }
}

/// What a side listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Plain HTTP for load-balancer health checks: `GET /ping` only.
    Ping,
    /// The admin listener: `GET /metrics` (Prometheus text) and `GET /ping`.
    Admin,
}

/// The `/ping` and admin listeners: plain HTTP/1.1, GET only, bounded like the XKS
/// listener (a connection cap in all and per source, a head deadline, keep-alive for at
/// most `header_read_timeout` between requests).
async fn side_loop(
    listener: TcpListener,
    side: Side,
    api: Arc<Api>,
    cert_not_after: Arc<std::sync::atomic::AtomicI64>,
    settings: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = Gate::new(
        settings.ping_max_connections,
        settings
            .max_connections_per_source
            .min(settings.ping_max_connections),
    );
    let name = match side {
        Side::Ping => "ping",
        Side::Admin => "admin",
    };
    loop {
        let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admission = match gate.admit(peer) {
            Ok(a) => a,
            Err(refused) => {
                note_refused(refused, name, peer, &gate);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let api = Arc::clone(&api);
        let cert_not_after = Arc::clone(&cert_not_after);
        let header_timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let _admission = admission;
            let service = service_fn(move |req: Request<Incoming>| {
                let api = Arc::clone(&api);
                let cert_not_after = Arc::clone(&cert_not_after);
                async move {
                    let get =
                        req.method() == http::Method::GET || req.method() == http::Method::HEAD;
                    let resp = match (side, req.uri().path(), get) {
                        (_, "/ping", true) => crate::api::ping_response(api.serving()),
                        (Side::Admin, "/metrics", true) => metrics_response(&api, &cert_not_after),
                        _ => {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"not found\n")));
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            // hyper's head timeout also times the wait between requests here: right for
            // health checkers and scrapers, which reconnect cheaply.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Appends `xks_credential_age_days` for the credentials configured now. Rendered here
/// rather than kept in the registry, which has no removal: a credential a reload
/// removed must disappear with it, or an age alert on it would fire forever.
fn render_credential_ages(
    out: &mut String,
    tenants: &crate::api::Tenants,
    now: std::time::SystemTime,
) {
    use std::fmt::Write;
    out.push_str(
        "# HELP xks_credential_age_days Whole days since each configured credential's secret was set, by prefix, access_key_id and source: \"file\" = the secret file's modification time, \"env\" = when the proxy read the variable (start or last reload; the real age is unknowable). Mirrors KMS's XksProxyCredentialAge\n# TYPE xks_credential_age_days gauge\n",
    );
    let mut rows: Vec<_> = tenants
        .iter()
        .flat_map(|t| {
            t.credential_since
                .iter()
                .map(move |c| (t.prefix.as_str(), c))
        })
        .collect();
    rows.sort_by(|a, b| (a.0, &a.1.access_key_id).cmp(&(b.0, &b.1.access_key_id)));
    for (prefix, c) in rows {
        let days = now.duration_since(c.since).unwrap_or_default().as_secs() / 86_400;
        let _ = writeln!(
            out,
            "xks_credential_age_days{{prefix=\"{}\",access_key_id=\"{}\",source=\"{}\"}} {days}",
            label_value(prefix),
            label_value(&c.access_key_id),
            c.source
        );
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Refreshes the gauges that are read, not counted, then renders the registry.
fn metrics_response(
    api: &Api,
    cert_not_after: &std::sync::atomic::AtomicI64,
) -> Response<Full<Bytes>> {
    let Some(handle) = crate::telemetry::prometheus() else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"metrics recorder unavailable\n",
        )));
        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        return r;
    };
    metrics::gauge!("xks_requests_in_flight").set(api.in_flight() as f64);
    metrics::gauge!("xks_requests_awaiting_body").set(api.awaiting_body() as f64);
    if let Some(trail) = api.audit() {
        // Read at each scrape (this is the gauge's one writer).
        metrics::gauge!("xks_audit_queue_depth").set(trail.queue_depth() as f64);
    }
    for m in api.tenants().managers().values() {
        set_backend_series(m, true);
    }
    // From the certificate's notAfter at each scrape: a proxy that runs for months
    // without a reload still counts down towards the expiry alert.
    let not_after = cert_not_after.load(Ordering::Acquire);
    if not_after != i64::MIN {
        let days = tls::days_until(not_after, std::time::SystemTime::now());
        metrics::gauge!("xks_tls_certificate_days_to_expiry").set(days as f64);
    }
    let mut text = handle.render();
    render_credential_ages(&mut text, &api.tenants(), std::time::SystemTime::now());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
