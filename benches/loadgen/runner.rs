//! The load loops. Closed loop: N workers, each with one request outstanding. Open
//! loop: requests at a fixed arrival rate, each timed from its *intended* send time, so
//! a stall is charged to every request it delayed (no coordinated omission). Both
//! bounded by a duration and an optional request count, with a hard stop.
//!
//! Each worker records into its own HDR histogram (no shared locks on the hot path);
//! they are merged at the end.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::cli::LoadArgs;
use crate::conn::{Conn, Connector};
use crate::procstat::{self, CpuClock};
use crate::workload::{ErrorLabel, Rng, Workload};

/// Histogram range: 1 µs to 60 s at 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2*low, sigfig <= 5):
    // this cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid constant histogram bounds")
}

/// Everything one worker counted.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of successful requests, µs (open loop: from the intended send time
    /// whenever the worker was late for it).
    pub latency: Histogram<u64>,
    /// Open loop only: from the actual send (what the server and network took).
    pub service: Histogram<u64>,
    /// Failed requests (an error answer, a timeout, a refused connection), timed like
    /// `latency`: how long until the client knew. Overload figures need it: an excess
    /// refused at once is not the same as one that timed out.
    pub error_latency: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Open loop: requests whose slot came after the hard stop.
    pub unsent: u64,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            service: new_histogram(),
            error_latency: new_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            unsent: 0,
        }
    }

    fn error(&mut self, label: ErrorLabel) {
        *self.errors.entry(label.into_owned()).or_default() += 1;
    }

    fn merge(&mut self, other: &Stats) {
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        let _ = self.error_latency.add(&other.error_latency);
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.unsent += other.unsent;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub stats: Stats,
    /// From the start of the measured window to the last measured completion.
    pub elapsed: Duration,
    /// CPU this process spent in the window.
    pub client_cpu: Duration,
    /// The server's CPU in the window and RSS (when its pid was given).
    pub server: Option<ServerUsage>,
}

#[derive(Debug, Clone, Copy)]
pub struct ServerUsage {
    pub cpu: Duration,
    /// RSS when the measured window opened.
    pub rss_before_kib: u64,
    /// Largest RSS sampled (4 Hz) during the window.
    pub rss_max_kib: u64,
    /// The process's peak RSS since it started (VmHWM), read at the end.
    pub rss_hwm_kib: u64,
}

/// How to shape and bound the load (from the command line, or set by `figures`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub concurrency: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub new_connection: bool,
    pub timeout: Duration,
    pub quiet: bool,
    pub server_pid: Option<u32>,
    /// A connection that cannot be opened before the clock starts is counted inside the
    /// run (its worker retries) instead of stopping it: `flood` connects while the
    /// server is under attack, and a refused connection is a result, not a failure.
    pub tolerate_connect_failures: bool,
}

impl Plan {
    pub fn from_args(load: &LoadArgs, quiet: bool, server_pid: Option<u32>) -> Result<Plan> {
        anyhow::ensure!(
            load.concurrency >= 1 && load.concurrency <= 10_000,
            "--concurrency must be 1..=10000"
        );
        anyhow::ensure!(
            load.duration > 0.0 && load.duration <= 3600.0,
            "--duration must be in (0, 3600] seconds"
        );
        anyhow::ensure!(
            (0.0..=600.0).contains(&load.warmup),
            "--warmup must be 0..=600 seconds"
        );
        if let Some(r) = load.rate {
            anyhow::ensure!(r > 0.0 && r <= 1_000_000.0, "--rate must be in (0, 1e6]");
        }
        let connections = load.connections.unwrap_or(load.concurrency).max(1);
        anyhow::ensure!(
            load.http2 || connections == load.concurrency,
            "--connections differs from --concurrency: only HTTP/2 can share a connection"
        );
        Ok(Plan {
            concurrency: load.concurrency,
            connections: connections.min(load.concurrency),
            rate: load.rate,
            duration: Duration::from_secs_f64(load.duration),
            requests: load.requests,
            warmup: Duration::from_secs_f64(load.warmup),
            new_connection: load.new_connection,
            timeout: Duration::from_millis(load.timeout_ms.max(1)),
            quiet,
            server_pid,
            tolerate_connect_failures: false,
        })
    }
}

/// State every worker shares.
struct Shared {
    workload: Arc<Workload>,
    connector: Connector,
    plan: Plan,
    start: Instant,
    measure_start: Instant,
    deadline: Instant,
    /// No request is sent after this (open loop: late slots become `unsent`).
    hard_stop: Instant,
    /// Measured requests issued so far (for --requests) / open-loop slot counter.
    issued: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// Measured completions: the last one's time (µs since measure_start).
    last_done_us: AtomicU64,
    done: AtomicBool,
}

/// Runs the plan against the connector's target.
pub async fn run(workload: Arc<Workload>, connector: Connector, plan: Plan) -> Result<Outcome> {
    // Keep-alive connections are opened before the clock starts, as KMS's are long
    // lived; a failed one is retried by its worker inside the run.
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(plan.concurrency);
    if !plan.new_connection {
        let mut opened: Vec<Option<Conn>> = Vec::with_capacity(plan.connections);
        // One deadline for all of them: a server that stalls handshakes cannot stretch
        // the run by a timeout per connection.
        let connect_deadline = Instant::now() + plan.timeout * 20;
        for _ in 0..plan.connections {
            let attempt = tokio::time::timeout_at(connect_deadline, connector.connect())
                .await
                .unwrap_or(Err(crate::conn::TransportError("ClientTimeout")));
            match attempt {
                Ok(c) => opened.push(Some(c)),
                Err(_) if plan.tolerate_connect_failures => opened.push(None),
                Err(e) => anyhow::bail!(
                    "cannot connect to {} ({}): {}",
                    connector.target.authority,
                    connector.target.addr,
                    e.0
                ),
            }
        }
        for i in 0..plan.concurrency {
            let slot = i % plan.connections;
            if i < plan.connections {
                conns.push(opened[slot].take());
            } else {
                conns.push(conns[slot].as_ref().and_then(Conn::share));
            }
        }
    } else {
        conns.resize_with(plan.concurrency, || None);
    }

    let start = Instant::now();
    let measure_start = start + plan.warmup;
    let deadline = measure_start + plan.duration;
    let hard_stop = deadline + plan.timeout + Duration::from_secs(1);
    let shared = Arc::new(Shared {
        workload,
        connector,
        plan: plan.clone(),
        start,
        measure_start,
        deadline,
        hard_stop,
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_done_us: AtomicU64::new(0),
        done: AtomicBool::new(false),
    });

    let monitor = tokio::spawn(monitor(Arc::clone(&shared)));
    let mut workers = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let seed = (i as u64) << 32 ^ u64::from(std::process::id());
        workers.spawn(async move {
            match shared.plan.rate {
                None => closed_worker(&shared, conn, Rng::new(seed)).await,
                Some(rate) => open_worker(&shared, conn, Rng::new(seed), rate).await,
            }
        });
    }
    let mut stats = Stats::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(s) => stats.merge(&s),
            Err(_) => stats.error(Cow::Borrowed("WorkerPanicked")),
        }
    }
    shared.done.store(true, Ordering::Release);
    let (client_cpu, server) = monitor.await.unwrap_or((Duration::ZERO, None));
    let elapsed = Duration::from_micros(shared.last_done_us.load(Ordering::Acquire))
        .max(Duration::from_millis(1));
    Ok(Outcome {
        stats,
        elapsed,
        client_cpu,
        server,
    })
}

/// One request on `conn` (connecting first if needed). Returns the result and the
/// time the request was sent.
async fn one_request(
    shared: &Shared,
    conn: &mut Option<Conn>,
    rng: &mut Rng,
    stats_sent: &mut Instant,
) -> Result<(), ErrorLabel> {
    let op = shared.workload.pick(rng);
    let (req, expect) = shared.workload.request(&shared.connector, op, rng)?;
    *stats_sent = Instant::now();
    let plan = &shared.plan;
    if conn.as_ref().is_none_or(|c| !c.is_usable()) {
        *conn = None;
        let c = tokio::time::timeout(plan.timeout, shared.connector.connect())
            .await
            .map_err(|_| Cow::Borrowed("ClientTimeout"))?
            .map_err(|e| Cow::Borrowed(e.0))?;
        *conn = Some(c);
    }
    let Some(c) = conn.as_mut() else {
        return Err(Cow::Borrowed("ConnectFailed"));
    };
    let result = c.send(req, plan.timeout).await;
    if plan.new_connection {
        // Dropping the sender closes the connection (after this response).
        *conn = None;
    }
    match result {
        Ok((status, body)) => shared.workload.check(&expect, status, &body),
        Err(e) => {
            // An HTTP/1.1 connection whose request failed or timed out is in an
            // unknown state: replace it. HTTP/2 streams fail alone.
            if matches!(conn, Some(Conn::H1(_))) {
                *conn = None;
            }
            Err(Cow::Borrowed(e.0))
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIST_MAX_US)
}

impl Shared {
    fn note_done(&self, now: Instant, ok: bool) {
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if now >= self.measure_start {
            let us = micros(now - self.measure_start);
            self.last_done_us.fetch_max(us, Ordering::AcqRel);
        }
    }

    /// Whether another measured request may be issued under --requests.
    fn take_measured_slot(&self) -> bool {
        match self.plan.requests {
            None => true,
            Some(limit) => self.issued.fetch_add(1, Ordering::AcqRel) < limit,
        }
    }
}

async fn closed_worker(shared: &Shared, mut conn: Option<Conn>, mut rng: Rng) -> Stats {
    let mut stats = Stats::new();
    // A hard cap on iterations besides the clock: no loop here is unbounded.
    let cap = shared
        .plan
        .requests
        .unwrap_or(u64::MAX / 2)
        .saturating_add(10_000_000);
    for _ in 0..cap {
        let now = Instant::now();
        if now >= shared.deadline {
            break;
        }
        let measured = now >= shared.measure_start;
        if measured && !shared.take_measured_slot() {
            break;
        }
        let mut sent = now;
        let result = one_request(shared, &mut conn, &mut rng, &mut sent).await;
        let done = Instant::now();
        shared.note_done(done, result.is_ok());
        if measured {
            match result {
                Ok(()) => {
                    let _ = stats.latency.record(micros(done - sent));
                    stats.ok += 1;
                }
                Err(e) => {
                    let _ = stats.error_latency.record(micros(done - sent));
                    stats.error(e);
                }
            }
        } else if result.is_err() {
            // Do not spin on a dead server during warm-up.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if conn.is_none() && !shared.plan.new_connection && done < shared.deadline {
            // A failed connection: a short pause so a refused connect cannot spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stats
}

async fn open_worker(shared: &Shared, mut conn: Option<Conn>, mut rng: Rng, rate: f64) -> Stats {
    let mut stats = Stats::new();
    let warmup_slots = (shared.plan.warmup.as_secs_f64() * rate).floor() as u64;
    let measured_slots = match shared.plan.requests {
        Some(n) => n.min((shared.plan.duration.as_secs_f64() * rate).ceil() as u64),
        None => (shared.plan.duration.as_secs_f64() * rate).round() as u64,
    };
    let total = warmup_slots + measured_slots;
    for _ in 0..=total {
        let n = shared.issued.fetch_add(1, Ordering::AcqRel);
        if n >= total {
            break;
        }
        let intended = shared.start + Duration::from_secs_f64(n as f64 / rate);
        let measured = n >= warmup_slots;
        if Instant::now() >= shared.hard_stop {
            if measured {
                stats.unsent += 1;
            }
            continue;
        }
        // A worker that reaches its slot early was not held up by the server, so the
        // clock starts when it actually sends: tokio's timer fires up to ~1 ms late,
        // and that lateness is the generator's, not the server's. A worker that reaches
        // its slot late was held up by earlier responses, so the clock starts at the
        // intended time: that wait is exactly what coordinated omission would hide.
        let on_time = Instant::now() <= intended;
        tokio::time::sleep_until(intended).await;
        let mut sent = Instant::now();
        let result = one_request(shared, &mut conn, &mut rng, &mut sent).await;
        let done = Instant::now();
        shared.note_done(done, result.is_ok());
        let start = if on_time { sent } else { intended };
        if measured {
            match result {
                Ok(()) => {
                    let _ = stats.latency.record(micros(done - start));
                    let _ = stats.service.record(micros(done - sent));
                    stats.ok += 1;
                }
                Err(e) => {
                    let _ = stats.error_latency.record(micros(done - start));
                    stats.error(e);
                }
            }
        }
    }
    stats
}

/// Progress lines, and CPU/RSS samples at the window's edges. Returns (client CPU,
/// server usage) over the measured window.
async fn monitor(shared: Arc<Shared>) -> (Duration, Option<ServerUsage>) {
    let pid = shared.plan.server_pid;
    let mut rss_before = 0;
    let mut rss_max = 0;
    let mut client_at_start = None;
    let mut server_at_start = None;
    let mut last = (Instant::now(), 0u64);
    let tick = Duration::from_millis(250);
    // Bounded: the run's hard stop plus slack, at 4 ticks a second.
    let max_ticks =
        ((shared.hard_stop - shared.start).as_secs_f64() / tick.as_secs_f64()) as u64 + 200;
    let mut next_print = shared.start + Duration::from_secs(1);
    for _ in 0..max_ticks {
        if shared.done.load(Ordering::Acquire) {
            break;
        }
        let now = Instant::now();
        if client_at_start.is_none() && now >= shared.measure_start {
            client_at_start = Some(CpuClock::this_process());
            if let Some(pid) = pid {
                server_at_start = Some(CpuClock::process(pid));
                rss_before = procstat::rss_kib(pid).unwrap_or(0);
            }
        }
        if let Some(pid) = pid {
            rss_max = rss_max.max(procstat::rss_kib(pid).unwrap_or(0));
        }
        if now >= next_print {
            next_print += Duration::from_secs(1);
            let done = shared.completed.load(Ordering::Relaxed);
            let failed = shared.failed.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
            last = (now, done);
            if !shared.plan.quiet {
                let phase = if now < shared.measure_start {
                    "warm-up"
                } else {
                    "measure"
                };
                eprintln!(
                    "[{:6.1}s {phase}] ok {done:>9}  {rate:>9.0}/s  errors {failed}",
                    (now - shared.start).as_secs_f64()
                );
            }
        }
        // Sample at the start of the window precisely rather than on the next tick.
        let wake = if client_at_start.is_none() {
            shared.measure_start.min(now + tick)
        } else {
            now + tick
        };
        tokio::time::sleep_until(wake.max(now + Duration::from_millis(1))).await;
    }
    // A run shorter than one tick never sampled the start: use the run's start.
    let client_start = client_at_start.unwrap_or_else(CpuClock::this_process);
    let client_cpu = CpuClock::this_process().since(&client_start);
    let server = pid.map(|pid| {
        let end = CpuClock::process(pid);
        let cpu = server_at_start.map(|s| end.since(&s)).unwrap_or_default();
        ServerUsage {
            cpu,
            rss_before_kib: rss_before,
            rss_max_kib: rss_max.max(rss_before),
            rss_hwm_kib: procstat::peak_rss_kib(pid).unwrap_or(0),
        }
    });
    (client_cpu, server)
}
