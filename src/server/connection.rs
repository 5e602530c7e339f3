//! One accepted connection's life after TLS: HTTP/1.1 or HTTP/2, and the deadlines that
//! keep a stranger from holding it.
//!
//! The rules (all measured from events on this connection, checked by one watchdog):
//! - **First request**: a connection that has not carried a request whose signature
//!   verified is closed `header_read_timeout` after its handshake or its last answer,
//!   so a client that finishes TLS and sends nothing, or only junk, does not stay.
//! - **Request head** (HTTP/1.1): once the first byte of a request arrives on an idle
//!   connection, its head must be complete within `header_read_timeout`.
//! - **Body**: the API layer gives a body `body_read_timeout` (see `api::Api`).
//! - **Keep-alive**: a connection that has carried an authenticated request stays open
//!   while idle for `idle_timeout`, on HTTP/1.1 and HTTP/2 alike. hyper's own HTTP/1.1
//!   `header_read_timeout` is off: it would also time the wait *between* requests and
//!   close KMS's pooled connections after 10 s.
//!
//! HTTP/2 limits: `http2_max_concurrent_streams` streams, 16 KiB of headers, a stream
//! window of the body cap, hyper's defaults against rapid-reset and reset floods.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::api::{Api, Authenticated};
use crate::config::ServerConfig;

/// Largest HTTP/2 header block accepted (hyper's default, stated so it is ours).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/1.1 read buffer: a request head must fit (hyper's minimum is 8 KiB).
const H1_READ_BUFFER: usize = 32 * 1024;

/// The protocol a connection speaks, learned from its first bytes.
const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;

/// What the watchdog knows about the connection, written by the I/O wrapper and the
/// service.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished (0: the handshake).
    last_ms: AtomicU64,
    /// 1 + milliseconds since `epoch` when bytes arrived on an idle HTTP/1.1
    /// connection (a request head began); 0 when no head is pending.
    head_since: AtomicU64,
    /// Whether a request on this connection passed SigV4.
    authenticated: AtomicBool,
    proto: AtomicU8,
    /// Wakes the watchdog when a head begins: it may be sleeping towards a far idle
    /// deadline and must now watch a near one.
    head_started: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            authenticated: AtomicBool::new(false),
            proto: AtomicU8::new(PROTO_UNKNOWN),
            head_started: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == 0
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Release);
            self.head_started.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    /// What to do now, or when to look again.
    fn verdict(&self, limits: &Limits) -> Verdict {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::CheckIn(limits.header.min(limits.idle));
        }
        let now = self.now_ms();
        let head = self.head_since.load(Ordering::Acquire);
        if head != 0 && self.proto.load(Ordering::Acquire) != PROTO_H2 {
            let due = head - 1 + ms(limits.header);
            return if now >= due {
                Verdict::Close(CloseReason::HeadTimeout)
            } else {
                Verdict::CheckIn(Duration::from_millis(due - now))
            };
        }
        let trusted = self.authenticated.load(Ordering::Acquire);
        let limit = if trusted { limits.idle } else { limits.header };
        let due = self.last_ms.load(Ordering::Acquire) + ms(limit);
        match (now >= due, trusted) {
            (false, _) => Verdict::CheckIn(Duration::from_millis(due - now)),
            (true, true) => Verdict::Retire,
            (true, false) => Verdict::Close(CloseReason::NoAuthenticatedRequest),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

#[derive(Debug)]
enum Verdict {
    CheckIn(Duration),
    /// Idle past its keep-alive: close politely (HTTP/2 GOAWAY).
    Retire,
    /// A stranger past its deadline: drop the connection.
    Close(CloseReason),
}

/// Why a stranger's connection was dropped: the `reason` label of
/// `xks_connections_closed_total` (every value exists from start, at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// An HTTP/1.1 request head still incomplete after `header_read_timeout`.
    HeadTimeout,
    /// No authenticated request within `header_read_timeout` of the last activity.
    NoAuthenticatedRequest,
}

impl CloseReason {
    pub const ALL: [CloseReason; 2] = [
        CloseReason::HeadTimeout,
        CloseReason::NoAuthenticatedRequest,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeadTimeout => "head_timeout",
            CloseReason::NoAuthenticatedRequest => "no_authenticated_request",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            CloseReason::HeadTimeout => "request head not complete within header_read_timeout",
            CloseReason::NoAuthenticatedRequest => {
                "no authenticated request within header_read_timeout"
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
}

/// Ends a request's accounting when its service future finishes or is dropped.
struct InFlight(Arc<Activity>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's byte stream, reporting arrivals to the watchdog and telling
/// HTTP/2 (its client preface) from HTTP/1.1 on the first bytes.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    sniffed: Vec<u8>,
}

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

impl<S> Watched<S> {
    fn sniff(&mut self, data: &[u8]) {
        let want = H2_PREFACE_START.len() - self.sniffed.len();
        self.sniffed
            .extend_from_slice(&data[..data.len().min(want)]);
        if !H2_PREFACE_START.starts_with(&self.sniffed) {
            self.activity.proto.store(PROTO_H1, Ordering::Release);
        } else if self.sniffed.len() == H2_PREFACE_START.len() {
            self.activity.proto.store(PROTO_H2, Ordering::Release);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            if this.activity.proto.load(Ordering::Relaxed) == PROTO_UNKNOWN {
                this.sniff(&buf.filled()[before..]);
            }
            this.activity.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's settings for the XKS listener, from the body cap and the HTTP/2 stream
/// limit. `pub` for the benchmark's null server, which must speak exactly as the proxy
/// does.
pub fn http_builder(
    max_body_bytes: usize,
    http2_max_concurrent_streams: u32,
) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: our watchdog times request heads without timing keep-alive waits.
        .header_read_timeout(None)
        .max_buf_size(H1_READ_BUFFER)
        .keep_alive(true);
    // A stream may send a whole body at the cap without waiting for a window update.
    let stream_window = u32::try_from(max_body_bytes).unwrap_or(u32::MAX);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_stream_window_size(stream_window)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves HTTP on an accepted (and, with TLS, handshaken) stream until the client
/// leaves, a deadline above closes it, or shutdown drains it.
pub async fn serve<S>(
    stream: S,
    api: Arc<Api>,
    settings: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let act = Arc::clone(&activity);
    let service = service_fn(move |req: Request<Incoming>| {
        let api = Arc::clone(&api);
        let act = Arc::clone(&act);
        async move {
            act.request_started();
            let _guard = InFlight(Arc::clone(&act));
            let response = api.serve(req).await;
            if response.extensions().get::<Authenticated>().is_some() {
                act.authenticated.store(true, Ordering::Release);
            }
            Ok::<Response<Full<Bytes>>, Infallible>(response)
        }
    });
    let io = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
        sniffed: Vec::with_capacity(H2_PREFACE_START.len()),
    };
    let builder = http_builder(
        settings.max_body_bytes,
        settings.http2_max_concurrent_streams,
    );
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let limits = Limits {
        header: settings.header_read_timeout,
        idle: settings.idle_timeout,
    };
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    let mut check_in = Duration::ZERO;
    loop {
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
            _ = activity.head_started.notified(), if !closing => check_in = Duration::ZERO,
            _ = tokio::time::sleep(check_in), if !closing => {
                match activity.verdict(&limits) {
                    // Never busy-loop on a deadline that is due in under a millisecond.
                    Verdict::CheckIn(d) => check_in = d.max(Duration::from_millis(5)),
                    Verdict::Retire => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Verdict::Close(why) => {
                        metrics::counter!("xks_connections_closed_total", "reason" => why.label())
                            .increment(1);
                        tracing::debug!(reason = why.label(), "closing connection: {}", why.explain());
                        return;
                    }
                }
            }
        }
    }
}

/// Closes a connection whose TLS handshake failed so that the client reads the alert
/// rustls just wrote: stop sending (FIN), then read and discard what the client still
/// sends for a short while. Closing with unread bytes in the receive buffer would send
/// a TCP reset, which makes the client drop the alert unread ("broken pipe" in curl);
/// a TLS 1.3 client sends its first request right after its certificate, so there
/// usually are unread bytes.
pub async fn linger_close<S>(mut io: S, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = io.shutdown().await;
    let mut scratch = [0u8; 4096];
    let mut budget: usize = 64 * 1024;
    let _ = tokio::time::timeout(within, async {
        while budget > 0 {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(120),
        }
    }

    #[test]
    fn a_stranger_gets_the_header_timeout_and_a_client_the_idle_timeout() {
        let a = Activity::new();
        match a.verdict(&limits()) {
            Verdict::CheckIn(d) => assert!(d <= Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        a.authenticated.store(true, Ordering::Release);
        match a.verdict(&limits()) {
            Verdict::CheckIn(d) => assert!(d > Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_started_head_is_timed_on_http1_only() {
        let a = Activity::new();
        a.authenticated.store(true, Ordering::Release);
        a.proto.store(PROTO_H1, Ordering::Release);
        a.bytes_arrived();
        match a.verdict(&limits()) {
            Verdict::CheckIn(d) => assert!(d <= Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        // HTTP/2 control frames (PING, SETTINGS) between requests are not a head.
        a.proto.store(PROTO_H2, Ordering::Release);
        match a.verdict(&limits()) {
            Verdict::CheckIn(d) => assert!(d > Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bytes_of_a_request_in_flight_do_not_start_a_head() {
        let a = Activity::new();
        a.request_started();
        a.bytes_arrived();
        assert_eq!(a.head_since.load(Ordering::Acquire), 0);
    }

    #[test]
    fn zero_deadlines_close_at_once() {
        let a = Activity::new();
        let l = Limits {
            header: Duration::ZERO,
            idle: Duration::ZERO,
        };
        assert!(matches!(a.verdict(&l), Verdict::Close(_)));
        a.authenticated.store(true, Ordering::Release);
        assert!(matches!(a.verdict(&l), Verdict::Retire));
    }
}
