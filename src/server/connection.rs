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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
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
    /// An answer was given on the current HTTP/1.1 cycle (set when the service future
    /// ends, cleared when a request or a cycle starts): with the io flushed after it,
    /// hyper's next read is a wait for the next request, and the connection may park.
    answered: AtomicBool,
    /// Where the current HTTP/1.1 cycle stands on parking (`PARK_*`). The io moves it
    /// to `PARK_ASKED` when hyper waits for a next request with everything answered
    /// and flushed, and wakes the serve loop through `park`; the serve loop moves it
    /// to `PARK_RETIRING` when it shuts hyper down.
    park_state: AtomicU8,
    park: tokio::sync::Notify,
    /// hyper read again after it was told to shut down: it was not idle after all
    /// (say, it was draining an unread request body) and the connection must close,
    /// not park.
    read_while_retiring: AtomicBool,
}

/// `Activity::park_state` values.
const PARK_NO: u8 = 0;
const PARK_ASKED: u8 = 1;
const PARK_RETIRING: u8 = 2;

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
            answered: AtomicBool::new(false),
            park_state: AtomicU8::new(PARK_NO),
            park: tokio::sync::Notify::new(),
            read_while_retiring: AtomicBool::new(false),
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
        self.answered.store(false, Ordering::Release);
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
        self.0.answered.store(true, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's byte stream, reporting arrivals to the watchdog and telling
/// HTTP/2 (its client preface) from HTTP/1.1 on the first bytes.
///
/// On HTTP/1.1 it also decides when the connection parks (see [`serve`]): when hyper
/// asks for bytes with the last answer given and flushed and nothing pending, it
/// answers `Pending` without reading and raises `park`; hyper, which only reads on
/// our say-so, then stands still until the serve loop retires it.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    sniffed: Vec<u8>,
    /// Bytes read while parked (or left in hyper's buffer when it was retired),
    /// replayed to the next hyper connection before `inner`.
    prefix: Bytes,
    /// HTTP/1.1 connections park between requests; HTTP/2 ones never do.
    may_park: bool,
    /// No byte written since the last successful flush.
    flushed: bool,
}

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

impl<S> Watched<S> {
    /// On HTTP/1.1, with the last answer given and flushed and nothing pending, asks
    /// the serve loop to park the connection (once per cycle). hyper flushes the io
    /// only once its own write buffer is empty, and its connection state is back to
    /// idle by then, so this is checked at that flush: hyper may not read again
    /// before the client's next request (it waits on a read it registered earlier),
    /// and parking only then would keep its buffers through the whole idle time.
    fn ask_to_park(&self) -> bool {
        let act = &self.activity;
        let ready = self.may_park
            && self.flushed
            && self.prefix.is_empty()
            && act.answered.load(Ordering::Acquire)
            && act.in_flight.load(Ordering::Acquire) == 0
            && act
                .park_state
                .compare_exchange(PARK_NO, PARK_ASKED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if ready {
            act.park.notify_one();
        }
        ready
    }

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
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if this.may_park {
            let act = &this.activity;
            match act.park_state.load(Ordering::Acquire) {
                // Not reading `inner` registers no waker: hyper stays put until the
                // serve loop, woken by `ask_to_park`, shuts it down.
                PARK_ASKED => return Poll::Pending,
                PARK_RETIRING => act.read_while_retiring.store(true, Ordering::Release),
                _ if this.ask_to_park() => return Poll::Pending,
                _ => {}
            }
        }
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
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.flushed = false;
        }
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.flushed = false;
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper flushes the io only once its own write buffer is empty, so a flush
        // after the answer means the answer has left hyper and rustls.
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.flushed = true;
            self.ask_to_park();
        }
        polled
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's settings for the XKS listener, from the body cap and the HTTP/2 stream
/// limit. `pub` for the benchmark's null server, which must speak exactly as the proxy
/// does. The proxy itself serves HTTP/2 with it and HTTP/1.1 with [`http1_builder`]
/// (the same HTTP/1.1 settings), whose connections it can take back between requests.
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

/// hyper's HTTP/1.1 settings: those of [`http_builder`]'s `http1()`.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(H1_READ_BUFFER)
        .keep_alive(true);
    builder
}

/// The connection's deadlines and the shutdown signal, watched while one phase of the
/// connection runs (hyper serving, or a parked wait for bytes).
struct Watchdog {
    activity: Arc<Activity>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    /// Shutdown or retirement began: the phase under way is asked to finish, and no
    /// new one starts.
    closing: bool,
    check_in: Duration,
}

/// Why the watchdog interrupts a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    /// Shutdown, or idle past the keep-alive: finish politely.
    Close,
    /// The HTTP/1.1 io asks to park (see [`Watched`]).
    Park,
}

impl Watchdog {
    /// Runs `phase` until it ends (`Some`), or until a stranger's deadline or an
    /// interrupt that `interrupt` cannot turn into an orderly end closes the
    /// connection (`None`). `interrupt` returns true when `phase` will now end by
    /// itself (hyper's graceful shutdown begun), false to abandon it.
    async fn run<F: Future>(
        &mut self,
        mut phase: Pin<&mut F>,
        mut interrupt: impl FnMut(Pin<&mut F>, Interrupt) -> bool,
    ) -> Option<F::Output> {
        if self.closing && !interrupt(phase.as_mut(), Interrupt::Close) {
            return None;
        }
        loop {
            tokio::select! {
                out = phase.as_mut() => return Some(out),
                _ = self.shutdown.changed(), if !self.closing => {
                    self.closing = true;
                    if !interrupt(phase.as_mut(), Interrupt::Close) {
                        return None;
                    }
                }
                _ = self.activity.park.notified(), if !self.closing => {
                    if self.activity.park_state.load(Ordering::Acquire) == PARK_ASKED
                        && !interrupt(phase.as_mut(), Interrupt::Park)
                    {
                        return None;
                    }
                }
                _ = self.activity.head_started.notified(), if !self.closing => {
                    self.check_in = Duration::ZERO;
                }
                _ = tokio::time::sleep(self.check_in), if !self.closing => {
                    match self.activity.verdict(&self.limits) {
                        // Never busy-loop on a deadline that is due in under a millisecond.
                        Verdict::CheckIn(d) => self.check_in = d.max(Duration::from_millis(5)),
                        Verdict::Retire => {
                            self.closing = true;
                            if !interrupt(phase.as_mut(), Interrupt::Close) {
                                return None;
                            }
                        }
                        Verdict::Close(why) => {
                            metrics::counter!("xks_connections_closed_total", "reason" => why.label())
                                .increment(1);
                            tracing::debug!(reason = why.label(), "closing connection: {}", why.explain());
                            return None;
                        }
                    }
                }
            }
        }
    }
}

/// hyper's HTTP/1.1 connection, driven without shutting the stream down at its end so
/// that the stream can be taken back (`into_parts`) to park. Boxed: the task's future
/// does not carry hyper's connection inline while the connection is parked.
struct H1Serving<I, S: hyper::service::HttpService<Incoming>> {
    conn: Box<http1::Connection<I, S>>,
}

impl<I, S, B> Future for H1Serving<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().conn.poll_without_shutdown(cx)
    }
}

/// Bytes read while waiting for a request: enough to tell HTTP/2's preface from
/// HTTP/1.1 on a new connection, one read's worth on a parked one (the rest stays in
/// rustls's buffer for hyper).
const WAIT_READ: usize = 16;

/// Waits for the client's next bytes without hyper and keeps them for replay; on a new
/// connection, until the protocol is known. `Ok(false)`: the client closed.
async fn wait_for_bytes<S>(io: &mut Watched<S>) -> std::io::Result<bool>
where
    S: AsyncRead + Unpin,
{
    let mut got = io.prefix.to_vec();
    loop {
        let mut buf = [0u8; WAIT_READ];
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        got.extend_from_slice(&buf[..n]);
        if io.activity.proto.load(Ordering::Acquire) != PROTO_UNKNOWN {
            io.prefix = Bytes::from(got);
            return Ok(true);
        }
    }
}

/// Serves HTTP on an accepted (and, with TLS, handshaken) stream until the client
/// leaves, a deadline above closes it, or shutdown drains it.
///
/// An idle HTTP/1.1 connection is *parked*: between requests hyper's connection
/// (read and write buffers of 8 KiB or more, its dispatcher) is dropped and only the
/// stream remains, waiting for the next request's first bytes; hyper is started
/// again for it, with those bytes replayed. hyper is retired only when it is idle
/// (the last answer given and flushed, nothing of a next request buffered), where its
/// graceful shutdown sends nothing and, through `without_shutdown`, hands the stream
/// back. This is what brings an idle keep-alive connection from about 31 KiB to the
/// stream's own cost (issue 15 §4, benches/README.md). HTTP/2 keeps its connection
/// state (HPACK tables, stream ids, windows) for the connection's life, so it is
/// served by hyper throughout.
pub async fn serve<S>(
    stream: S,
    api: Arc<Api>,
    settings: &ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let mut io = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
        sniffed: Vec::with_capacity(H2_PREFACE_START.len()),
        prefix: Bytes::new(),
        may_park: false,
        flushed: true,
    };
    let closing = *shutdown.borrow();
    let mut watchdog = Watchdog {
        activity: Arc::clone(&activity),
        limits: Limits {
            header: settings.header_read_timeout,
            idle: settings.idle_timeout,
        },
        closing,
        shutdown,
        check_in: Duration::ZERO,
    };
    let service = |activity: &Arc<Activity>| {
        let act = Arc::clone(activity);
        let api = Arc::clone(&api);
        service_fn(move |req: Request<Incoming>| {
            let api = Arc::clone(&api);
            let act = Arc::clone(&act);
            // Boxed: hyper's HTTP/1.1 dispatcher keeps a heap slot the size of the
            // service future for the whole life of its connection (`Box::pin(None)`),
            // and `Api::serve`'s future is about 3.8 KiB. Boxed, the slot is a pointer
            // and the 3.8 KiB exist only while a request is in flight (issue 15 §4; one
            // allocation per request, next to the dozens a request already makes).
            Box::pin(async move {
                act.request_started();
                let _guard = InFlight(Arc::clone(&act));
                let response = api.serve(req).await;
                if response.extensions().get::<Authenticated>().is_some() {
                    act.authenticated.store(true, Ordering::Release);
                }
                Ok::<Response<Full<Bytes>>, Infallible>(response)
            })
        })
    };

    // The first bytes tell the protocol (a stranger that sends none is closed by the
    // watchdog at its header deadline, as before).
    let first = {
        let wait = std::pin::pin!(wait_for_bytes(&mut io));
        watchdog.run(wait, |_, _| false).await
    };
    if !matches!(first, Some(Ok(true))) {
        return;
    }

    if activity.proto.load(Ordering::Acquire) == PROTO_H2 {
        // Boxed so that the task's future does not carry hyper's connection inline.
        let builder = http_builder(
            settings.max_body_bytes,
            settings.http2_max_concurrent_streams,
        );
        let mut conn = Box::pin(builder.serve_connection(TokioIo::new(io), service(&activity)));
        let graceful = |conn: Pin<&mut _>, _| {
            auto::Connection::graceful_shutdown(conn);
            true
        };
        if let Some(Err(e)) = watchdog.run(conn.as_mut(), graceful).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return;
    }

    io.may_park = true;
    let h1 = http1_builder();
    loop {
        // Serve requests until hyper is idle and the io asks to park.
        activity.answered.store(false, Ordering::Release);
        activity.park_state.store(PARK_NO, Ordering::Release);
        activity.read_while_retiring.store(false, Ordering::Release);
        io.flushed = true;
        let mut serving = H1Serving {
            conn: Box::new(h1.serve_connection(TokioIo::new(io), service(&activity))),
        };
        let mut parking = false;
        let ended = watchdog
            .run(Pin::new(&mut serving), |serving, why| {
                // On a park, hyper is idle (see `Watched`): its graceful shutdown
                // stops it reading and, with nothing to answer, sends nothing — no
                // `connection: close`. On a close, it finishes the request under way.
                if why == Interrupt::Park
                    && (activity.in_flight.load(Ordering::Acquire) > 0
                        || !activity.answered.load(Ordering::Acquire))
                {
                    // A pipelined request began after the flush that asked: serve it.
                    activity.park_state.store(PARK_NO, Ordering::Release);
                    return true;
                }
                parking = why == Interrupt::Park;
                activity.park_state.store(PARK_RETIRING, Ordering::Release);
                Pin::new(&mut *serving.get_mut().conn).graceful_shutdown();
                true
            })
            .await;
        match ended {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
            None => return,
        }
        let http1::Parts {
            io: hyper_io,
            read_buf,
            ..
        } = serving.conn.into_parts();
        io = hyper_io.into_inner();
        // Bytes of a next request that hyper read but did not parse: replayed. Copied,
        // and the rest dropped now: `read_buf` holds hyper's whole read buffer.
        if !read_buf.is_empty() {
            let mut replay = read_buf.to_vec();
            replay.extend_from_slice(&io.prefix);
            io.prefix = Bytes::from(replay);
        }
        drop(read_buf);
        if !parking || watchdog.closing || activity.read_while_retiring.load(Ordering::Acquire) {
            // The client left, or we closed politely: end TLS and TCP as hyper would.
            let _ = tokio::time::timeout(watchdog.limits.header, io.shutdown()).await;
            return;
        }
        // Parked: only the stream and the watchdog remain until the next bytes.
        if io.prefix.is_empty() {
            let next = {
                let wait = std::pin::pin!(wait_for_bytes(&mut io));
                watchdog.run(wait, |_, why| why == Interrupt::Park).await
            };
            match next {
                Some(Ok(true)) => {}
                Some(_) => return,
                None => {
                    if watchdog.closing {
                        let _ = tokio::time::timeout(watchdog.limits.header, io.shutdown()).await;
                    }
                    return;
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
