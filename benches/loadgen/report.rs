//! The end-of-run report: throughput, errors by errorName, latency percentiles from
//! the HDR histogram, client and server CPU per request, server RSS. As JSON for
//! machines (`--json`, and the figure suite's files) and a markdown table for humans.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::runner::Outcome;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        })
    }
}

/// What the load was.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub op: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    pub concurrency: usize,
    pub connections: usize,
    /// Open loop: the target arrival rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub http: &'static str,
    pub new_connection_per_request: bool,
    pub duration_s: f64,
}

/// The server's side of a run (when its pid was known).
#[derive(Debug, Clone, Serialize)]
pub struct ServerSide {
    pub cpu_s: f64,
    /// Server CPU per request (successes and errors), µs.
    pub cpu_us_per_request: f64,
    /// Cores the server kept busy on average.
    pub cpu_utilization: f64,
    pub rss_before_kib: u64,
    pub rss_max_kib: u64,
    pub rss_hwm_kib: u64,
}

/// One run's report (`--json` prints exactly this).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub shape: Shape,
    pub elapsed_s: f64,
    pub requests_ok: u64,
    pub errors: u64,
    pub errors_by_name: BTreeMap<String, u64>,
    /// Open loop: slots never sent because the hard stop came first.
    pub unsent: u64,
    /// Successful requests per second over the measured window.
    pub throughput_rps: f64,
    /// Successes only; open loop: from the intended send time when the generator was
    /// held up by earlier responses (no coordinated omission).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Open loop: from the actual send time (what the server and network took).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_latency: Option<Latency>,
    /// Failures (error answers, timeouts), timed like `latency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_latency: Option<Latency>,
    pub client_cpu_us_per_request: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSide>,
    /// The machine's 1-minute load average when the run ended: on a shared machine,
    /// what else was competing for the cores.
    pub load_average_1m: f64,
    /// The address the server saw the client connect from (when it connected at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_source: Option<String>,
}

impl Report {
    pub fn new(label: &str, target: &str, shape: Shape, outcome: &Outcome) -> Report {
        let stats = &outcome.stats;
        let elapsed = outcome.elapsed.as_secs_f64();
        let errors = stats.error_count();
        let all = (stats.ok + errors).max(1) as f64;
        Report {
            label: label.to_owned(),
            target: target.to_owned(),
            shape,
            elapsed_s: elapsed,
            requests_ok: stats.ok,
            errors,
            errors_by_name: stats.errors.clone(),
            unsent: stats.unsent,
            throughput_rps: stats.ok as f64 / elapsed,
            latency: Latency::from_histogram(&stats.latency),
            service_latency: Latency::from_histogram(&stats.service),
            error_latency: Latency::from_histogram(&stats.error_latency),
            client_cpu_us_per_request: outcome.client_cpu.as_secs_f64() * 1e6 / all,
            server: outcome.server.map(|s| ServerSide {
                cpu_s: s.cpu.as_secs_f64(),
                cpu_us_per_request: s.cpu.as_secs_f64() * 1e6 / all,
                cpu_utilization: s.cpu.as_secs_f64() / elapsed,
                rss_before_kib: s.rss_before_kib,
                rss_max_kib: s.rss_max_kib,
                rss_hwm_kib: s.rss_hwm_kib,
            }),
            load_average_1m: load_average(),
            client_source: None,
        }
    }
}

/// The 1-minute load average from /proc/loadavg (0 if unreadable).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The header of [`markdown_row`]'s table.
pub fn markdown_header() -> String {
    "| run | op | load | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | server µs/req | client µs/req |\n\
     |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        .to_owned()
}

/// One report as a markdown table row.
pub fn markdown_row(r: &Report) -> String {
    let s = &r.shape;
    let mut load = match s.rate {
        Some(rate) => format!("open {rate:.0}/s, {} conns", s.connections),
        None => format!("c={}", s.concurrency),
    };
    if s.http == "2" {
        let _ = write!(load, ", h2/{} conns", s.connections);
    }
    if s.new_connection_per_request {
        load.push_str(", new conn/req");
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let l = r.latency.as_ref();
    let errors = if r.errors == 0 {
        "0".to_owned()
    } else {
        r.errors_by_name
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
        r.label,
        s.op,
        load,
        r.throughput_rps,
        f(l.map(|l| l.p50_ms)),
        f(l.map(|l| l.p90_ms)),
        f(l.map(|l| l.p99_ms)),
        f(l.map(|l| l.p99_9_ms)),
        f(l.map(|l| l.max_ms)),
        errors,
        r.server
            .as_ref()
            .map_or("-".to_owned(), |sv| format!("{:.1}", sv.cpu_us_per_request)),
        r.client_cpu_us_per_request,
    )
}

/// A whole report for a human: the table row plus the details a row has no room for.
pub fn markdown(r: &Report) -> String {
    let mut out = markdown_header();
    out += &markdown_row(r);
    let _ = writeln!(
        out,
        "\n{} ok, {} errors, {} unsent in {:.2} s against {}",
        r.requests_ok, r.errors, r.unsent, r.elapsed_s, r.target
    );
    if let Some(sl) = &r.service_latency {
        let _ = writeln!(
            out,
            "service time (from actual send): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            sl.p50_ms, sl.p99_ms, sl.p99_9_ms, sl.max_ms
        );
    }
    if let Some(el) = &r.error_latency {
        let _ = writeln!(
            out,
            "failures answered in: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            el.p50_ms, el.p99_ms, el.p99_9_ms, el.max_ms
        );
    }
    if let Some(sv) = &r.server {
        let _ = writeln!(
            out,
            "server: {:.1} µs CPU/request, {:.2} cores busy, RSS {} KiB before, {} KiB max under load (peak since start {} KiB)",
            sv.cpu_us_per_request,
            sv.cpu_utilization,
            sv.rss_before_kib,
            sv.rss_max_kib,
            sv.rss_hwm_kib
        );
    }
    out
}

/// The median of `v` (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}
