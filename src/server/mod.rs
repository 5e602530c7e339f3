//! The network side: accept loop, connection cap, TLS handshake, HTTP/1.1 + HTTP/2 (by
//! ALPN), idle and header timeouts, the optional plain-HTTP `/ping` listener, and
//! graceful drain on shutdown.
//!
//! `server` knows nothing of the XKS API beyond handing each request to [`Api::serve`].

pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::api::Api;
use crate::api::health::HealthMonitor;
use crate::backend::{CryptoBackend, Handle};
use crate::config::{Config, ServerConfig};

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
    pub api: Arc<Api>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Starts graceful shutdown: stop accepting, let in-flight requests finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until every listener has drained (or the grace period ran out).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// The base URL of the XKS listener.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }
}

/// Binds the configured listeners and starts serving with `backend`.
pub async fn start(
    config: &Config,
    backend: Arc<dyn CryptoBackend>,
) -> Result<Running, ServeError> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let ping_listener = match config.server.ping_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
        None => None,
    };
    start_on(config, backend, listener, ping_listener).await
}

/// Like [`start`], on listeners the caller bound (tests, socket activation).
pub async fn start_on(
    config: &Config,
    backend: Arc<dyn CryptoBackend>,
    listener: TcpListener,
    ping_listener: Option<TcpListener>,
) -> Result<Running, ServeError> {
    let tls = match &config.server.tls {
        Some(t) => Some(TlsAcceptor::from(tls::server_config(t)?)),
        None => {
            tracing::warn!(
                "serving PLAIN HTTP (server.insecure_plain_http = true): only safe behind a TLS-terminating load balancer on a private network"
            );
            None
        }
    };
    let mut limits = config.limits;
    limits.concurrency = backend.concurrency();
    let ekm_vendor = backend.ekm_vendor();
    let handle = Handle::new(backend, limits);
    let health = HealthMonitor::start(&handle, config.health.clone(), ekm_vendor).await;
    let api = Arc::new(Api::new(config, handle.clone(), Arc::clone(&health))?);

    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&health).run(handle, shutdown_rx.clone()));
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
            tasks.spawn(ping_loop(l, health, shutdown_rx));
            addr
        }
        None => None,
    };
    Ok(Running {
        local_addr,
        ping_addr,
        scheme,
        api,
        shutdown,
        tasks,
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    api: Arc<Api>,
    settings: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    // One permit per open connection: bounds them, and lets shutdown wait for all of
    // them to be returned (every connection drained).
    let connections = Arc::new(Semaphore::new(settings.max_connections));
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
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(%peer, limit = settings.max_connections, "connection limit reached; closing new connection");
            continue;
        };
        // Nagle would add up to 40 ms to small responses (measured: p99.9 26 ms on c=1).
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let api = Arc::clone(&api);
        let settings = Arc::clone(&settings);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, api, &settings, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => serve_connection(tcp, api, &settings, shutdown).await,
            }
        });
    }
    drop(listener);
    // Drain: wait until every connection has returned its permit, within the grace.
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(settings.shutdown_grace, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// Tracks whether a connection is idle: requests in flight and the last activity.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }
    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Acquire)))
    }
}

struct InFlight<'a>(&'a Activity);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn http_builder(settings: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn serve_connection<S>(
    stream: S,
    api: Arc<Api>,
    settings: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let act = Arc::clone(&activity);
    let service = service_fn(move |req: Request<Incoming>| {
        let api = Arc::clone(&api);
        let act = Arc::clone(&act);
        async move {
            act.in_flight.fetch_add(1, Ordering::AcqRel);
            let _guard = InFlight(&act);
            Ok::<Response<Full<Bytes>>, Infallible>(api.serve(req).await)
        }
    });
    let builder = http_builder(settings);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle = settings.idle_timeout;
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let check_in = idle
            .saturating_sub(activity.idle_for())
            .max(Duration::from_millis(10));
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(check_in), if !closing => {
                if activity.in_flight.load(Ordering::Acquire) == 0 && activity.idle_for() >= idle {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The plain-HTTP listener for load-balancer health checks: `GET /ping` only.
async fn ping_loop(
    listener: TcpListener,
    health: Arc<HealthMonitor>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp: TcpStream = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let health = Arc::clone(&health);
                async move {
                    let resp = if req.uri().path() == "/ping"
                        && (req.method() == http::Method::GET || req.method() == http::Method::HEAD)
                    {
                        crate::api::ping_response(health.serving())
                    } else {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                        *r.status_mut() = http::StatusCode::NOT_FOUND;
                        r
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
