//! The attackers of `xks-bench flood`: unauthenticated clients that try to take the
//! proxy's capacity away from correctly signed ones.
//!
//! - `fast-unsigned`: well-formed Encrypt POSTs with a forged SigV4 Authorization, back
//!   to back (HTTP/2: `--attack-streams` at once per connection). What the server must
//!   do to refuse them (TLS, HTTP, body read, SigV4) is CPU the signed client loses.
//! - `slow-body`: request headers announcing a body, then the body one byte per
//!   `--trickle-ms` or never. A server that reserves anything per request (a permit, a
//!   buffer) before the body is in and the signature checked is held for as long as it
//!   waits.
//! - `slow-head`: a TLS handshake, then the request head (HTTP/2: the connection
//!   preface) one byte at a time, or nothing: a connection slot held without a request.
//! - `idle`: a TLS handshake and silence.
//!
//! They run on a thread of their own with a single-threaded runtime, so they can never
//! take more than one core, and their CPU is measured apart from the signed client's
//! (on a two-core machine the generator's core is shared: the report says how much the
//! attackers took). Connections are spread over several loopback source addresses
//! (bound before connecting), so a per-address connection cap meets N addresses, as it
//! would meet a botnet. Every count, rate and loop is capped; the whole attack stops
//! when told to or at its hard deadline, and its runtime is then dropped with every
//! connection it holds.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::cli::{AttackArgs, AttackAuth, AttackHttp, AttackKind};
use crate::procstat::CpuClock;
use crate::target::Target;
use crate::workload::Op;

/// Attacker connections held at once, all kinds together.
const MAX_CONNECTIONS: usize = 16_384;
/// HTTP/2 streams per attacker connection.
const MAX_STREAMS: usize = 1024;
/// Loopback source addresses (127.0.0.2 ..= 127.0.0.251).
const MAX_SOURCES: usize = 250;
/// New attacker connections per second.
const MAX_CONNECT_RATE: f64 = 20_000.0;
/// Fast-unsigned requests per second when a rate is given.
const MAX_REQUEST_RATE: f64 = 1_000_000.0;
/// File descriptors kept free besides the attackers' (signed client, runtime, files).
const FD_HEADROOM: usize = 256;
/// A TCP connect that takes longer than this counts as refused.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A TLS handshake that takes longer than this counts as refused (the proxy allows
/// 10 s by default).
const TLS_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause after a failed connection attempt, so a refusing server is not spun against
/// (the connect rate bounds it too).
const FAIL_PAUSE: Duration = Duration::from_millis(50);
/// Loop caps: every loop ends by count as well as by the stop or the deadline.
const MAX_CONNECTS_PER_SLOT: u64 = 1_000_000;
const MAX_REQUESTS_PER_STREAM: u64 = 100_000_000;
const MAX_RAW_EVENTS: u64 = 10_000_000;
/// Largest response body an attacker reads.
const MAX_RESPONSE: usize = 64 * 1024;
/// The HTTP/2 connection preface and an empty SETTINGS frame: what an HTTP/2
/// slow-head attacker trickles.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// One kind of attacker on one HTTP version, and how many connections it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub kind: AttackKind,
    /// `1.1` or `2` (the ALPN offered).
    pub http: &'static str,
    pub connections: usize,
    /// Streams kept open per connection (HTTP/2 fast-unsigned and slow-body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams_per_connection: Option<usize>,
}

impl Group {
    fn http2(&self) -> bool {
        self.http == "2"
    }
}

/// The whole attack, validated and capped (what the report calls `attack`).
#[derive(Debug, Clone, Serialize)]
pub struct AttackPlan {
    pub groups: Vec<Group>,
    pub sources: Vec<IpAddr>,
    /// One byte per this many ms from slow attackers; `None`: they send nothing.
    pub trickle_ms: Option<u64>,
    pub slow_body_bytes: usize,
    pub connect_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<f64>,
    pub auth: AttackAuth,
}

impl AttackPlan {
    /// Checks the options against the caps and the process's file limit, spreads the
    /// connections over kinds and HTTP versions, and picks the source addresses.
    pub fn from_args(
        args: &AttackArgs,
        target: &Target,
        client_source: Option<IpAddr>,
        client_connections: usize,
    ) -> Result<AttackPlan> {
        ensure!(
            target.addr.ip().is_loopback(),
            "flood attacks loopback targets only ({} is not)",
            target.addr
        );
        ensure!(!args.attack.is_empty(), "--attack names no attacker");
        ensure!(
            !args.attack_http.is_empty(),
            "--attack-http names no version"
        );
        ensure!(
            (1..=MAX_STREAMS).contains(&args.attack_streams),
            "--attack-streams must be 1..={MAX_STREAMS}"
        );
        ensure!(
            args.attack_connect_rate > 0.0 && args.attack_connect_rate <= MAX_CONNECT_RATE,
            "--attack-connect-rate must be in (0, {MAX_CONNECT_RATE}]"
        );
        if let Some(r) = args.attack_rate {
            ensure!(
                r > 0.0 && r <= MAX_REQUEST_RATE,
                "--attack-rate must be in (0, {MAX_REQUEST_RATE}]"
            );
        }
        ensure!(
            (1..=1_048_576).contains(&args.slow_body_bytes),
            "--slow-body-bytes must be 1..=1048576"
        );
        ensure!(
            args.trickle_ms <= 600_000,
            "--trickle-ms must be at most 600000"
        );

        let mut versions = args.attack_http.clone();
        versions.sort();
        versions.dedup();
        let mut kinds = Vec::new();
        for entry in &args.attack {
            if kinds.iter().any(|(k, _)| *k == entry.kind) {
                bail!("--attack names {} twice", entry.kind.name());
            }
            kinds.push((entry.kind, entry.connections));
        }
        let shared: Vec<usize> = {
            let n = kinds.iter().filter(|(_, c)| c.is_none()).count();
            split(args.attack_connections, n)
        };
        let mut shares = shared.into_iter();
        let mut groups = Vec::new();
        for (kind, count) in kinds {
            let total = count.unwrap_or_else(|| shares.next().unwrap_or(0));
            for (version, n) in versions.iter().zip(split(total, versions.len())) {
                if n == 0 {
                    continue;
                }
                let http2 = *version == AttackHttp::H2;
                groups.push(Group {
                    kind,
                    http: if http2 { "2" } else { "1.1" },
                    connections: n,
                    streams_per_connection: (http2
                        && matches!(kind, AttackKind::FastUnsigned | AttackKind::SlowBody))
                    .then_some(args.attack_streams),
                });
            }
        }
        let total: usize = groups.iter().map(|g| g.connections).sum();
        ensure!(total > 0, "the attack has no connections");
        ensure!(
            total <= MAX_CONNECTIONS,
            "{total} attacker connections: at most {MAX_CONNECTIONS}"
        );
        if let Some(limit) = open_files_limit() {
            ensure!(
                total + client_connections + FD_HEADROOM <= limit,
                "{total} attacker + {client_connections} client connections need more than this process's {limit} open files (ulimit -n)"
            );
        }

        let sources: Vec<IpAddr> = match target.addr.ip() {
            IpAddr::V4(_) => {
                ensure!(
                    (1..=MAX_SOURCES).contains(&args.attack_sources),
                    "--attack-sources must be 1..={MAX_SOURCES}"
                );
                (0..args.attack_sources)
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
                    .collect()
            }
            IpAddr::V6(v6) => {
                ensure!(
                    args.attack_sources == 1,
                    "IPv6 loopback has one address (::1): use --attack-sources 1, or an IPv4 target"
                );
                vec![IpAddr::V6(v6)]
            }
        };
        if let Some(client) = client_source {
            ensure!(
                !sources.contains(&client) || target.addr.is_ipv6(),
                "--client-source {client} is one of the attackers' addresses"
            );
        }
        Ok(AttackPlan {
            groups,
            sources,
            trickle_ms: (args.trickle_ms > 0).then_some(args.trickle_ms),
            slow_body_bytes: args.slow_body_bytes,
            connect_rate: args.attack_connect_rate,
            request_rate: args.attack_rate,
            auth: args.attack_auth,
        })
    }

    /// One line for humans: `fast-unsigned 1.1×32 2×32(×256 streams), idle 1.1×8`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for kind in AttackKind::ALL {
            let mine: Vec<String> = self
                .groups
                .iter()
                .filter(|g| g.kind == kind)
                .map(|g| match g.streams_per_connection {
                    Some(s) => format!("h{}×{}(×{s} streams)", g.http, g.connections),
                    None => format!("h{}×{}", g.http, g.connections),
                })
                .collect();
            if !mine.is_empty() {
                parts.push(format!("{} {}", kind.name(), mine.join(" ")));
            }
        }
        parts.join(", ")
    }

    fn trickle(&self) -> Option<Duration> {
        self.trickle_ms.map(Duration::from_millis)
    }
}

/// `total` split into `parts` near-equal shares, the larger ones first.
fn split(total: usize, parts: usize) -> Vec<usize> {
    if parts == 0 {
        return Vec::new();
    }
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// The soft limit on open files (/proc/self/limits), if readable.
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What one group saw (the report's `attackers.groups`).
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    #[serde(flatten)]
    pub group: Group,
    /// Connection attempts.
    pub connects: u64,
    /// TCP and TLS done: a connection the server accepted.
    pub established: u64,
    /// TCP connect refused, reset or timed out.
    pub refused_tcp: u64,
    /// Closed or reset during the TLS handshake: how a server that accepts and then
    /// drops a connection over a cap looks from outside.
    pub refused_tls: u64,
    /// Our own failures (e.g. no free local port); not the server's doing.
    pub local_failures: u64,
    /// Established connections the server closed (with or without an answer first).
    pub closed_by_server: u64,
    /// Connections we closed after an answer (an HTTP/1.1 slow request, once answered,
    /// is spent: the attacker reconnects).
    pub closed_by_attacker: u64,
    /// Established connections still open when the attack stopped.
    pub open_at_stop: u64,
    pub peak_open: u64,
    /// Requests (HTTP/2 streams) whose headers were sent.
    pub requests: u64,
    /// Responses by HTTP status.
    pub answered: BTreeMap<String, u64>,
    /// Requests that ended without a response (reset, GOAWAY, connection closed).
    pub unanswered: u64,
    /// Bytes the slow attackers trickled.
    pub trickled_bytes: u64,
}

/// What the attack did (the report's `attackers`).
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// From the start of the attack to its stop.
    pub elapsed_s: f64,
    /// CPU the attackers' thread used (on the generator's core).
    pub cpu_s: f64,
    /// `cpu_s / elapsed_s`: the share of a core the attackers took.
    pub cores_busy: f64,
    pub groups: Vec<GroupReport>,
}

impl AttackReport {
    /// Responses the attackers got per second, all groups together.
    pub fn answered_per_s(&self) -> f64 {
        let n: u64 = self.groups.iter().flat_map(|g| g.answered.values()).sum();
        n as f64 / self.elapsed_s.max(1e-3)
    }
}

/// A running attack; [`Attack::stop`] ends it and returns what it saw. Dropped without
/// `stop`, it still stops its thread.
#[derive(Debug)]
pub struct Attack {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<AttackReport>>>,
}

/// Starts the attack on its own thread. `body` is the Encrypt body the requests carry;
/// the attack stops by itself after `max`.
pub fn start(
    plan: AttackPlan,
    target: Arc<Target>,
    body: Bytes,
    quiet: bool,
    max: Duration,
) -> Result<Attack> {
    let ctx = Ctx::new(plan, target, body)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("xks-bench-attack".into())
        .spawn(move || attack_thread(ctx, rx, quiet, max))
        .context("starting the attack thread")?;
    Ok(Attack {
        stop: Some(tx),
        thread: Some(thread),
    })
}

impl Attack {
    pub fn stop(mut self) -> Result<AttackReport> {
        self.finish()
    }

    fn finish(&mut self) -> Result<AttackReport> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the attack thread panicked"))?,
            None => bail!("the attack was already stopped"),
        }
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

fn attack_thread(
    ctx: Ctx,
    stop: tokio::sync::oneshot::Receiver<()>,
    quiet: bool,
    max: Duration,
) -> Result<AttackReport> {
    let cpu_start = CpuClock::this_thread();
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the attack runtime")?;
    let ctx = Arc::new(ctx);
    rt.block_on(drive(Arc::clone(&ctx), stop, quiet, max));
    // The runtime runs tasks only inside block_on: the counters are frozen here.
    let elapsed = started.elapsed();
    let cpu = CpuClock::this_thread().since(&cpu_start);
    let groups = ctx.snapshot();
    // Drops every task and with it every connection still held.
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(AttackReport {
        elapsed_s: elapsed.as_secs_f64(),
        cpu_s: cpu.as_secs_f64(),
        cores_busy: cpu.as_secs_f64() / elapsed.as_secs_f64().max(1e-3),
        groups,
    })
}

/// Spawns every connection slot, prints progress, and returns on the stop signal or
/// the deadline.
async fn drive(
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    quiet: bool,
    max: Duration,
) {
    for (g, group) in ctx.plan.groups.iter().enumerate() {
        for i in 0..group.connections {
            tokio::spawn(slot(Arc::clone(&ctx), g, i));
        }
    }
    let start = Instant::now();
    let deadline = start + max;
    let mut last_answered = 0u64;
    // Bounded: one tick a second up to the deadline.
    for _ in 0..=max.as_secs() + 1 {
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if Instant::now() >= deadline {
            break;
        }
        if !quiet {
            let sum = |f: fn(&Counters) -> &AtomicU64| -> u64 {
                ctx.counters
                    .iter()
                    .map(|c| f(c).load(Ordering::Relaxed))
                    .sum()
            };
            let answered: u64 = ctx.counters.iter().map(Counters::answered_total).sum();
            eprintln!(
                "[{:6.1}s attack ] open {:>6}  connects {:>7}  refused {:>6}  server-closed {:>6}  answered {:>9.0}/s",
                start.elapsed().as_secs_f64(),
                sum(|c| &c.open),
                sum(|c| &c.connects),
                sum(|c| &c.refused_tcp) + sum(|c| &c.refused_tls),
                sum(|c| &c.closed_by_server),
                answered.saturating_sub(last_answered) as f64,
            );
            last_answered = answered;
        }
    }
    ctx.stopping.store(true, Ordering::Release);
}

/// Live counters of one group.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    established: AtomicU64,
    refused_tcp: AtomicU64,
    refused_tls: AtomicU64,
    local_failures: AtomicU64,
    closed_by_server: AtomicU64,
    closed_by_attacker: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    requests: AtomicU64,
    unanswered: AtomicU64,
    trickled_bytes: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn answered(&self, status: u16) {
        let mut map = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        *map.entry(status).or_default() += 1;
    }

    fn answered_total(&self) -> u64 {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

/// Counts a connection as open while it lives (and the peak).
struct OpenGuard<'a>(&'a Counters);

impl<'a> OpenGuard<'a> {
    fn new(c: &'a Counters) -> Self {
        let now = c.open.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak_open.fetch_max(now, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Spaces events `1 / rate` apart, shared by every task (no burst after a lull).
#[derive(Debug)]
struct Pacer {
    every: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Self {
            every: Duration::from_secs_f64(1.0 / rate),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The time the caller may go at.
    fn take(&self) -> Instant {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let at = (*next).max(now);
        *next = at + self.every;
        at
    }
}

/// Any attacker byte stream: TLS over TCP, or TCP for a plain-HTTP target.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a connection attempt failed.
enum OpenError {
    Local,
    Tcp,
    Tls,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ServerClosed,
    AttackerClosed,
}

/// A request body for attackers: all at once, or a trickle (one byte per interval, or
/// never: the stream then waits until it is dropped).
#[derive(Debug)]
enum AttackBody {
    Full(Option<Bytes>),
    Trickle {
        left: usize,
        every: Option<Duration>,
        sleep: Pin<Box<tokio::time::Sleep>>,
    },
}

impl AttackBody {
    fn trickle(len: usize, every: Option<Duration>) -> Self {
        AttackBody::Trickle {
            left: len,
            every,
            sleep: Box::pin(tokio::time::sleep(every.unwrap_or_default())),
        }
    }
}

impl Body for AttackBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            AttackBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            AttackBody::Trickle { left, every, sleep } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                // No interval: never a byte; the stream is held until dropped.
                let Some(every) = *every else {
                    return Poll::Pending;
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                sleep.as_mut().reset(Instant::now() + every);
                *left -= 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b" ")))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttackBody::Full(b) => b.is_none(),
            AttackBody::Trickle { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttackBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            AttackBody::Trickle { left, .. } => SizeHint::with_exact(*left as u64),
        }
    }
}

/// An HTTP client connection of either version.
enum Sender {
    H1(http1::SendRequest<AttackBody>),
    H2(http2::SendRequest<AttackBody>),
}

impl Sender {
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: http::Request<AttackBody>,
    ) -> hyper::Result<http::Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Everything the attack's tasks share.
struct Ctx {
    plan: AttackPlan,
    target: Arc<Target>,
    tls_h1: Option<TlsConnector>,
    tls_h2: Option<TlsConnector>,
    counters: Vec<Counters>,
    stopping: AtomicBool,
    connect_pacer: Pacer,
    request_pacer: Option<Pacer>,
    /// A well-formed Encrypt body.
    body: Bytes,
    path: String,
    /// The trickled body of HTTP/1.1 slow-body requests.
    slow_body: Bytes,
}

impl Ctx {
    fn new(plan: AttackPlan, target: Arc<Target>, body: Bytes) -> Result<Self> {
        // Resumption on: an attacker makes its reconnects as cheap as it can.
        let (tls_h1, tls_h2) = if target.tls {
            (
                Some(TlsConnector::from(target.client_config(false, true)?)),
                Some(TlsConnector::from(target.client_config(true, true)?)),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            counters: plan.groups.iter().map(|_| Counters::default()).collect(),
            connect_pacer: Pacer::new(plan.connect_rate),
            request_pacer: plan.request_rate.map(Pacer::new),
            slow_body: Bytes::from(vec![b' '; plan.slow_body_bytes]),
            path: target.path(Op::Encrypt),
            plan,
            target,
            tls_h1,
            tls_h2,
            stopping: AtomicBool::new(false),
            body,
        })
    }

    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Vec<GroupReport> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.plan
            .groups
            .iter()
            .zip(&self.counters)
            .map(|(g, c)| GroupReport {
                group: g.clone(),
                connects: get(&c.connects),
                established: get(&c.established),
                refused_tcp: get(&c.refused_tcp),
                refused_tls: get(&c.refused_tls),
                local_failures: get(&c.local_failures),
                closed_by_server: get(&c.closed_by_server),
                closed_by_attacker: get(&c.closed_by_attacker),
                open_at_stop: get(&c.open),
                peak_open: get(&c.peak_open),
                requests: get(&c.requests),
                answered: c
                    .statuses
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|(s, n)| (s.to_string(), *n))
                    .collect(),
                unanswered: get(&c.unanswered),
                trickled_bytes: get(&c.trickled_bytes),
            })
            .collect()
    }

    /// The forged credentials: (X-Amz-Date, Authorization), or none.
    fn forged(&self) -> Option<(String, String)> {
        let akid = match self.plan.auth {
            AttackAuth::None => return None,
            AttackAuth::BadSignature => self.target.access_key_id.as_str(),
            AttackAuth::UnknownKey => "AKIAXKSBENCHATTACKER",
        };
        let date = amz_date(SystemTime::now());
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={akid}/{}/{}/{}/aws4_request, SignedHeaders=host;x-amz-date, Signature={}",
            &date[..8],
            self.target.region,
            self.target.service,
            "0badc0de".repeat(8)
        );
        Some((date, auth))
    }

    /// An Encrypt request for hyper (HTTP/2 wants the full URI for :authority).
    fn request(&self, http2: bool, body: AttackBody, len: usize) -> http::Request<AttackBody> {
        let scheme = if self.target.tls { "https" } else { "http" };
        let mut builder = if http2 {
            http::Request::post(format!("{scheme}://{}{}", self.target.authority, self.path))
                .version(http::Version::HTTP_2)
        } else {
            http::Request::post(self.path.as_str())
                .header(http::header::HOST, self.target.authority.as_str())
        }
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, len);
        if let Some((date, auth)) = self.forged() {
            builder = builder
                .header("x-amz-date", date)
                .header(http::header::AUTHORIZATION, auth);
        }
        // Fails only on an invalid header value, and every value here is ours.
        builder
            .body(body)
            .unwrap_or_else(|_| http::Request::new(AttackBody::Full(None)))
    }

    /// An HTTP/1.1 request head as bytes (for the raw attackers).
    fn raw_head(&self, content_length: usize) -> Bytes {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\n",
            self.path, self.target.authority
        );
        if let Some((date, auth)) = self.forged() {
            head += &format!("x-amz-date: {date}\r\nauthorization: {auth}\r\n");
        }
        head += "\r\n";
        Bytes::from(head)
    }

    /// TCP from `source`, then TLS offering h2 or http/1.1.
    async fn open(&self, source: IpAddr, http2: bool) -> Result<Box<dyn Io>, OpenError> {
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|_| OpenError::Local)?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|_| OpenError::Local)?;
        let tcp = match tokio::time::timeout(TCP_CONNECT_TIMEOUT, socket.connect(self.target.addr))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(OpenError::Local);
            }
            _ => return Err(OpenError::Tcp),
        };
        let _ = tcp.set_nodelay(true);
        let tls = if http2 { &self.tls_h2 } else { &self.tls_h1 };
        let Some(tls) = tls else {
            return Ok(Box::new(tcp));
        };
        match tokio::time::timeout(
            TLS_TIMEOUT,
            tls.connect(self.target.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            _ => Err(OpenError::Tls),
        }
    }

    /// A hyper connection carrying attack requests until the server closes it.
    async fn hyper_conn(self: &Arc<Self>, io: Box<dyn Io>, group: usize, slow: bool) -> End {
        let io = TokioIo::new(io);
        if self.plan.groups[group].http2() {
            let Ok((send, conn)) = http2::handshake(TokioExecutor::new(), io).await else {
                return End::ServerClosed;
            };
            let mut streams = tokio::task::JoinSet::new();
            for _ in 0..self.plan.groups[group].streams_per_connection.unwrap_or(1) {
                let ctx = Arc::clone(self);
                let send = Sender::H2(send.clone());
                streams.spawn(async move { ctx.stream_loop(send, group, slow).await });
            }
            drop(send);
            // The connection ends when the server closes it (the streams' loops only
            // end on their count cap); dropping the set stops the streams.
            let _ = conn.await;
            End::ServerClosed
        } else {
            let Ok((send, conn)) = http1::handshake(io).await else {
                return End::ServerClosed;
            };
            let ctx = Arc::clone(self);
            let mut requests =
                tokio::spawn(async move { ctx.stream_loop(Sender::H1(send), group, slow).await });
            let end = tokio::select! {
                biased;
                ended = &mut requests => ended.unwrap_or(End::AttackerClosed),
                _ = conn => End::ServerClosed,
            };
            requests.abort();
            end
        }
    }

    /// Requests one after another on one connection (HTTP/2: on one stream slot).
    async fn stream_loop(&self, mut send: Sender, group: usize, slow: bool) -> End {
        let c = &self.counters[group];
        for _ in 0..MAX_REQUESTS_PER_STREAM {
            if self.stopped() {
                return End::AttackerClosed;
            }
            if !slow && let Some(p) = &self.request_pacer {
                tokio::time::sleep_until(p.take()).await;
            }
            if send.ready().await.is_err() {
                return End::ServerClosed;
            }
            let (body, len) = if slow {
                let n = self.plan.slow_body_bytes;
                (AttackBody::trickle(n, self.plan.trickle()), n)
            } else {
                (AttackBody::Full(Some(self.body.clone())), self.body.len())
            };
            let req = self.request(matches!(send, Sender::H2(_)), body, len);
            bump(&c.requests);
            match send.send(req).await {
                Ok(resp) => {
                    c.answered(resp.status().as_u16());
                    let _ = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await;
                }
                Err(_) => {
                    bump(&c.unanswered);
                    if send.is_closed() {
                        return End::ServerClosed;
                    }
                }
            }
        }
        End::AttackerClosed
    }

    /// A raw connection: `first` at once, then `trickle` one byte per interval, reading
    /// whatever the server says. With `request`, a request was sent: its HTTP/1.1
    /// answer is counted, and the connection then closed by us (a slow request, once
    /// answered, is spent).
    async fn raw(
        &self,
        io: Box<dyn Io>,
        group: usize,
        first: Bytes,
        trickle: Bytes,
        request: bool,
    ) -> End {
        let c = &self.counters[group];
        let (mut rd, mut wr) = tokio::io::split(io);
        if request {
            bump(&c.requests);
        }
        let unanswered = || {
            if request {
                bump(&c.unanswered);
            }
            End::ServerClosed
        };
        if !first.is_empty() && (wr.write_all(&first).await.is_err() || wr.flush().await.is_err()) {
            return unanswered();
        }
        let every = self.plan.trickle();
        let mut sent = 0usize;
        let mut next = Instant::now() + every.unwrap_or_default();
        let mut buf = vec![0u8; 4096];
        let mut head: Vec<u8> = Vec::with_capacity(16);
        // Bounded: every event is a read or a one-byte write.
        for _ in 0..MAX_RAW_EVENTS {
            let due = every.is_some() && sent < trickle.len();
            tokio::select! {
                read = rd.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return unanswered(),
                    Ok(n) => {
                        if head.len() < 12 {
                            let take = n.min(12 - head.len());
                            head.extend_from_slice(&buf[..take]);
                        }
                        if let Some(status) = h1_status(&head) {
                            c.answered(status);
                            return End::AttackerClosed;
                        }
                    }
                },
                () = tokio::time::sleep_until(next), if due => {
                    if wr.write_all(&trickle[sent..=sent]).await.is_err() || wr.flush().await.is_err() {
                        return unanswered();
                    }
                    sent += 1;
                    bump(&c.trickled_bytes);
                    next += every.unwrap_or_default();
                }
            }
        }
        End::AttackerClosed
    }
}

/// The status of an HTTP/1.x status line, once 12 bytes of it are in.
fn h1_status(head: &[u8]) -> Option<u16> {
    if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `YYYYMMDDTHHMMSSZ`, as SigV4 wants it.
fn amz_date(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// One connection slot of a group: connects (paced), attacks until the connection
/// ends, and connects again, until the attack stops.
async fn slot(ctx: Arc<Ctx>, group: usize, index: usize) {
    let g = &ctx.plan.groups[group];
    let c = &ctx.counters[group];
    let source = ctx.plan.sources[index % ctx.plan.sources.len()];
    for _ in 0..MAX_CONNECTS_PER_SLOT {
        if ctx.stopped() {
            return;
        }
        tokio::time::sleep_until(ctx.connect_pacer.take()).await;
        if ctx.stopped() {
            return;
        }
        bump(&c.connects);
        let io = match ctx.open(source, g.http2()).await {
            Ok(io) => io,
            Err(e) => {
                bump(match e {
                    OpenError::Local => &c.local_failures,
                    OpenError::Tcp => &c.refused_tcp,
                    OpenError::Tls => &c.refused_tls,
                });
                tokio::time::sleep(FAIL_PAUSE).await;
                continue;
            }
        };
        bump(&c.established);
        let _open = OpenGuard::new(c);
        let end = match (g.kind, g.http2()) {
            (AttackKind::FastUnsigned, _) => ctx.hyper_conn(io, group, false).await,
            (AttackKind::SlowBody, true) => ctx.hyper_conn(io, group, true).await,
            (AttackKind::SlowBody, false) => {
                let head = ctx.raw_head(ctx.plan.slow_body_bytes);
                ctx.raw(io, group, head, ctx.slow_body.clone(), true).await
            }
            (AttackKind::SlowHead, false) => {
                let head = ctx.raw_head(ctx.body.len());
                ctx.raw(io, group, Bytes::new(), head, false).await
            }
            (AttackKind::SlowHead, true) => {
                ctx.raw(
                    io,
                    group,
                    Bytes::new(),
                    Bytes::from_static(H2_PREFACE),
                    false,
                )
                .await
            }
            (AttackKind::Idle, _) => ctx.raw(io, group, Bytes::new(), Bytes::new(), false).await,
        };
        bump(match end {
            End::ServerClosed => &c.closed_by_server,
            End::AttackerClosed => &c.closed_by_attacker,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_spreads_the_remainder_first() {
        assert_eq!(split(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(split(1, 2), vec![1, 0]);
        assert!(split(5, 0).is_empty());
    }

    #[test]
    fn h1_status_reads_the_status_line() {
        assert_eq!(h1_status(b"HTTP/1.1 408 "), Some(408));
        assert_eq!(h1_status(b"HTTP/1.1 40"), None);
        assert_eq!(h1_status(b"\0\0\0\x04\0\0\0\0\0\0\0\0"), None);
    }

    #[test]
    fn amz_date_is_sigv4_shaped() {
        let d = amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365));
        assert_eq!(d, "19710101T000000Z");
    }
}
