//! The soak's report: RSS and CPU of every process, the counts, the verdict; as JSON
//! (`--json`, `--json-out`) and markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};

use super::Outcome;
use super::child::LogTally;
use crate::cli::{SoakArgs, SoakBackend};
use crate::procstat::{CpuClock, peak_rss_kib, rss_kib};
use crate::report::Latency;

/// One process's resident memory (KiB) and CPU over its part of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss {
    pub pid: u32,
    /// When the load began (the new proxy: as soon as it listened).
    pub start_kib: u64,
    /// The most seen by the 1 s sampler.
    pub peak_sampled_kib: u64,
    /// VmHWM: the kernel's high-water mark since the process started.
    pub peak_kib: u64,
    /// When it stopped serving load (the old proxy: just before SIGTERM).
    pub end_kib: u64,
    /// CPU time used from `start` to `end`, seconds.
    pub cpu_s: f64,
    #[serde(skip)]
    cpu_start: CpuClock,
}

impl Rss {
    pub fn begin(pid: u32) -> Self {
        let now = rss_kib(pid).unwrap_or(0);
        Rss {
            pid,
            start_kib: now,
            peak_sampled_kib: now,
            peak_kib: 0,
            end_kib: 0,
            cpu_s: 0.0,
            cpu_start: CpuClock::process(pid),
        }
    }

    pub fn sample(&mut self) -> u64 {
        let now = rss_kib(self.pid).unwrap_or(0);
        self.peak_sampled_kib = self.peak_sampled_kib.max(now);
        now
    }

    pub fn finish(&mut self) {
        self.end_kib = self.sample();
        self.peak_kib = peak_rss_kib(self.pid).unwrap_or(0);
        self.cpu_s = CpuClock::process(self.pid)
            .since(&self.cpu_start)
            .as_secs_f64();
    }
}

/// RSS at one point of the run.
#[derive(Debug, Clone, Serialize)]
pub struct RssPoint {
    pub round_trips_done: u64,
    pub elapsed_s: f64,
    /// 0 while the proxy restarts.
    pub proxy_kib: u64,
    pub emulator_kib: u64,
    pub generator_kib: u64,
}

/// The RSS records the sampler and the restart share.
#[derive(Clone)]
pub struct Memory {
    pub proxy_before: Rss,
    pub proxy_after: Option<Rss>,
    pub emulator: Rss,
    pub generator: Rss,
    pub series: Vec<RssPoint>,
}

// --- The report -------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub at_round_trip: u64,
    /// SIGTERM to the old proxy's exit (its drain).
    pub drain_ms: f64,
    /// SIGTERM to the new proxy listening.
    pub downtime_ms: f64,
    pub old_proxy_exit: String,
    pub old_proxy_exited_cleanly: bool,
    /// Ciphertexts of the first proxy in the sample taken at the restart.
    pub sampled_before: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalCheck {
    /// Pre-restart ciphertexts (the sample taken when the restart began) decrypted again.
    pub before_restart: u64,
    pub before_restart_ok: u64,
    /// Post-restart ciphertexts of the final sample decrypted again.
    pub after_restart: u64,
    pub after_restart_ok: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RssReport {
    pub proxy_before_restart: Rss,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_after_restart: Option<Rss>,
    pub emulator: Rss,
    pub generator: Rss,
    /// At the start and after each tenth of the round trips.
    pub by_tenth: Vec<RssPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub label: String,
    pub backend: SoakBackend,
    pub machine: String,
    pub load_average_1m: BTreeMap<&'static str, f64>,
    pub round_trips_requested: u64,
    pub round_trips_done: u64,
    pub concurrency: usize,
    pub generated: u64,
    pub decrypted: u64,
    pub decrypts_of_earlier_ciphertexts: u64,
    /// Decrypts by the new proxy of ciphertexts the old one made.
    pub cross_restart_decrypts: u64,
    pub mismatches: u64,
    pub failed_generate: u64,
    pub failed_decrypts: u64,
    pub failures_by_reason: BTreeMap<String, u64>,
    pub failure_examples: Vec<String>,
    /// Attempts retried because the proxy was restarting.
    pub retried_generate: u64,
    pub retried_decrypt: u64,
    pub retries_by_reason: BTreeMap<String, u64>,
    /// Of those, attempts this generator sent before the SIGTERM. A graceful drain
    /// answers what the old proxy had in flight, so this stays near 0 (a few, at most:
    /// the emulator forwards a call a moment after it arrives, and a request sent on an
    /// idle pooled connection as the proxy closes it is lost, as with any keep-alive).
    pub retried_sent_before_sigterm: u64,
    /// Attempts the emulator's own quota throttled (retried).
    pub throttled: u64,
    pub final_check: FinalCheck,
    /// The load phase (final check excluded), restart included.
    pub elapsed_s: f64,
    pub round_trips_per_s: f64,
    pub kms_calls_per_s: f64,
    pub latency_generate_data_key: Option<Latency>,
    pub latency_decrypt: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartReport>,
    pub rss: RssReport,
    pub final_proxy_exit: String,
    pub emulator_exit: String,
    pub proxy_log: Vec<LogTally>,
    pub emulator_log: LogTally,
    pub settings: Value,
    /// Every round trip done, no mismatch, no failure, every re-decrypt right, clean
    /// exits.
    pub nothing_lost: bool,
    /// Why not, when not.
    pub problems: Vec<String>,
}

pub fn exit_text(status: &Result<(ExitStatus, Duration)>) -> String {
    match status {
        Ok((s, took)) => format!("{s} after {:.0} ms", took.as_secs_f64() * 1000.0),
        Err(e) => format!("{e:#}"),
    }
}

pub fn exited_cleanly(status: &Result<(ExitStatus, Duration)>) -> bool {
    matches!(status, Ok((s, _)) if s.success())
}

/// The series at the start and after each tenth of the round trips.
pub fn by_tenth(series: &[RssPoint], n: u64) -> Vec<RssPoint> {
    let mut out = Vec::new();
    for k in 0..=10u64 {
        let want = n * k / 10;
        if let Some(p) = series.iter().find(|p| p.round_trips_done >= want) {
            out.push(p.clone());
        }
    }
    out
}

pub fn build_report(
    args: &SoakArgs,
    o: Outcome,
    machine: String,
    load: (f64, f64),
    key_label: &str,
) -> SoakReport {
    let c = &o.shared.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Acquire);
    let tallies = o
        .shared
        .tallies
        .lock()
        .map(|t| (t.failures.clone(), t.retries.clone(), t.examples.clone()))
        .unwrap_or_default();
    let done = get(&c.done);
    let elapsed = o.elapsed.as_secs_f64().max(1e-9);
    let calls = o.generate.len() + o.decrypt.len();
    let mut problems = Vec::new();
    if done < args.round_trips {
        problems.push(format!(
            "only {done} of {} round trips done",
            args.round_trips
        ));
    }
    for (what, n) in [
        ("mismatches", get(&c.mismatches)),
        ("failed GenerateDataKey calls", get(&c.failed_generate)),
        ("failed Decrypt calls", get(&c.failed_decrypt)),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    let f = &o.final_check;
    if f.before_restart_ok < f.before_restart || f.after_restart_ok < f.after_restart {
        problems.push(format!(
            "re-decrypt: {}/{} before the restart, {}/{} after",
            f.before_restart_ok, f.before_restart, f.after_restart_ok, f.after_restart
        ));
    }
    if let Some(e) = &o.restart_error {
        problems.push(format!("restart: {e}"));
    }
    if let Some(r) = &o.restart
        && !r.old_proxy_exited_cleanly
    {
        problems.push(format!("old proxy on SIGTERM: {}", r.old_proxy_exit));
    }
    if !exited_cleanly(&o.final_proxy_exit) {
        problems.push(format!(
            "proxy at the end: {}",
            exit_text(&o.final_proxy_exit)
        ));
    }
    if !exited_cleanly(&o.emulator_exit) {
        problems.push(format!(
            "emulator at the end: {}",
            exit_text(&o.emulator_exit)
        ));
    }
    let mut series = o.memory.series;
    if let Some(last) = series.last().cloned() {
        // The end figures as the last point (after the final check).
        series.push(RssPoint {
            round_trips_done: done,
            elapsed_s: last.elapsed_s.max(elapsed),
            proxy_kib: o
                .memory
                .proxy_after
                .as_ref()
                .unwrap_or(&o.memory.proxy_before)
                .end_kib,
            emulator_kib: o.memory.emulator.end_kib,
            generator_kib: o.memory.generator.end_kib,
        });
    }
    SoakReport {
        label: args.label.clone(),
        backend: args.backend,
        machine,
        load_average_1m: BTreeMap::from([("start", load.0), ("end", load.1)]),
        round_trips_requested: args.round_trips,
        round_trips_done: done,
        concurrency: args.concurrency,
        generated: get(&c.generated),
        decrypted: get(&c.decrypted),
        decrypts_of_earlier_ciphertexts: get(&c.decrypts_of_earlier),
        cross_restart_decrypts: get(&c.cross_restart_decrypts),
        mismatches: get(&c.mismatches),
        failed_generate: get(&c.failed_generate),
        failed_decrypts: get(&c.failed_decrypt),
        failures_by_reason: tallies.0,
        failure_examples: tallies.2,
        retried_generate: get(&c.retried_generate),
        retried_decrypt: get(&c.retried_decrypt),
        retries_by_reason: tallies.1,
        retried_sent_before_sigterm: get(&c.retried_sent_before_sigterm),
        throttled: get(&c.throttled),
        final_check: o.final_check.clone(),
        elapsed_s: elapsed,
        round_trips_per_s: done as f64 / elapsed,
        kms_calls_per_s: calls as f64 / elapsed,
        latency_generate_data_key: Latency::from_histogram(&o.generate),
        latency_decrypt: Latency::from_histogram(&o.decrypt),
        restart: o.restart.clone(),
        rss: RssReport {
            proxy_before_restart: o.memory.proxy_before.clone(),
            proxy_after_restart: o.memory.proxy_after.clone(),
            emulator: o.memory.emulator.clone(),
            generator: o.memory.generator.clone(),
            by_tenth: by_tenth(&series, done),
        },
        final_proxy_exit: exit_text(&o.final_proxy_exit),
        emulator_exit: exit_text(&o.emulator_exit),
        proxy_log: o.proxy_logs.clone(),
        emulator_log: o.emulator_log.clone(),
        settings: json!({
            "restart_at": (!args.no_restart).then_some(args.restart_at),
            "restart_grace_ms": args.restart_grace_ms,
            "sample": args.sample,
            "xks_timeout_ms": args.xks_timeout_ms,
            "store_rps": args.store_rps,
            "request_timeout_ms": args.request_timeout_ms,
            "server_log": args.server_log,
            "external_key": key_label,
        }),
        nothing_lost: problems.is_empty(),
        problems,
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The report for a human.
pub fn markdown(r: &SoakReport) -> String {
    let mut md = String::new();
    let lat = |l: &Option<Latency>| {
        l.as_ref().map_or("-".to_owned(), |l| {
            format!("{:.2} / {:.2} / {:.1}", l.p50_ms, l.p99_ms, l.max_ms)
        })
    };
    let _ = writeln!(
        md,
        "| soak | round trips | mismatches | failed GDK / Decrypt | retried (restart) | re-decrypted pre / post restart | round trips/s | GDK p50 / p99 / max ms | Decrypt p50 / p99 / max ms |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = &r.final_check;
    let _ = writeln!(
        md,
        "| {} ({}, c={}) | {} | {} | {} / {} | {} | {}/{} / {}/{} | {:.0} | {} | {} |",
        r.label,
        match r.backend {
            SoakBackend::Software => "software keystore",
            SoakBackend::Softhsm => "SoftHSM",
        },
        r.concurrency,
        r.round_trips_done,
        r.mismatches,
        r.failed_generate,
        r.failed_decrypts,
        r.retried_generate + r.retried_decrypt,
        f.before_restart_ok,
        f.before_restart,
        f.after_restart_ok,
        f.after_restart,
        r.round_trips_per_s,
        lat(&r.latency_generate_data_key),
        lat(&r.latency_decrypt),
    );
    let _ = writeln!(
        md,
        "\n| process | pid | RSS start MiB | peak (sampled) | peak (VmHWM) | end | CPU s |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut rows = vec![("proxy before restart", &r.rss.proxy_before_restart)];
    if let Some(after) = &r.rss.proxy_after_restart {
        rows.push(("proxy after restart", after));
    }
    rows.push(("kms-emulator", &r.rss.emulator));
    rows.push(("xks-bench (generator)", &r.rss.generator));
    for (name, x) in rows {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            x.pid,
            mib(x.start_kib),
            mib(x.peak_sampled_kib),
            mib(x.peak_kib),
            mib(x.end_kib),
            x.cpu_s
        );
    }
    let tenths: Vec<String> = r
        .rss
        .by_tenth
        .iter()
        .map(|p| format!("{:.1}/{:.1}", mib(p.proxy_kib), mib(p.emulator_kib)))
        .collect();
    let _ = writeln!(
        md,
        "\nRSS proxy/emulator (MiB) at the start and after each tenth: {}",
        tenths.join(", ")
    );
    if let Some(rs) = &r.restart {
        let _ = writeln!(
            md,
            "Restart after {} round trips: old proxy {} (drain {:.0} ms), new proxy listening {:.0} ms after SIGTERM; {} decrypts by the new proxy of the old one's ciphertexts during the load.",
            rs.at_round_trip,
            rs.old_proxy_exit,
            rs.drain_ms,
            rs.downtime_ms,
            r.cross_restart_decrypts
        );
    }
    if !r.retries_by_reason.is_empty() {
        let list: Vec<String> = r
            .retries_by_reason
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect();
        let _ = writeln!(
            md,
            "Retried during the restart: {} ({} of them sent to KMS before the SIGTERM)",
            list.join(", "),
            r.retried_sent_before_sigterm
        );
    }
    if r.throttled > 0 {
        let _ = writeln!(
            md,
            "Throttled by the emulator's quota (retried): {}",
            r.throttled
        );
    }
    let _ = writeln!(
        md,
        "{:.0} KMS calls/s over {:.1} s; machine: {}; load average {:.2} at start, {:.2} at end.",
        r.kms_calls_per_s,
        r.elapsed_s,
        r.machine,
        r.load_average_1m.get("start").copied().unwrap_or(0.0),
        r.load_average_1m.get("end").copied().unwrap_or(0.0),
    );
    if r.nothing_lost {
        let _ = writeln!(md, "Verdict: nothing lost.");
    } else {
        let _ = writeln!(md, "Verdict: FAILED: {}", r.problems.join("; "));
        for e in &r.failure_examples {
            let _ = writeln!(md, "  - {e}");
        }
    }
    md
}
