//! `xks-bench flood`: does the proxy keep serving correctly signed requests while
//! unauthenticated clients flood it?
//!
//! Each round measures the `run` workload (the signed client: closed loop, or open loop
//! with `--rate`) twice against the same endpoint: unloaded, then with the attackers of
//! `attack.rs` started `--attack-ramp` seconds before it and stopped right after it.
//! The verdict compares the two: the attacked throughput must stay at least
//! `--min-ratio` (0.5) of the unloaded and its p99 under `--max-p99-ms` (250, KMS's
//! timeout), medians over the rounds. A signed request that fails (429, timeout,
//! refused connection) is an error, counted by name, never a success — and for the
//! p99 it counts as slower than the limit, since KMS sees a failed call.
//!
//! The unloaded run is measured in every round, minutes apart at most from the attacked
//! one, because these shared machines drift: the ratio is the figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::attack::{self, AttackPlan, AttackReport};
use crate::cli::FloodArgs;
use crate::report::{self, Report};
use crate::runner::Plan;
use crate::target::Target;
use crate::workload::{Rng, Workload};

/// One round: the same signed load unloaded and under attack.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: usize,
    pub unloaded: Report,
    pub attacked: Report,
    pub attackers: AttackReport,
    /// Attacked ÷ unloaded signed throughput.
    pub ratio: f64,
    /// p99 of every signed request sent unloaded, failures counted as slower than
    /// anything (see [`p99_counting_failures`]); absent when more than 1% failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unloaded_p99_all_ms: Option<f64>,
    /// The same under attack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attacked_p99_all_ms: Option<f64>,
}

/// The answer: medians over the rounds, against the thresholds.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub unloaded_rps: f64,
    pub attacked_rps: f64,
    /// Median of the per-round ratios.
    pub ratio: f64,
    /// p99 of the successes, unloaded (median over the rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unloaded_p99_ms: Option<f64>,
    /// p99 of the successes under attack (median over the rounds); absent when no round
    /// had a success. Context only: a run where most requests fail can have a fast
    /// p99 of the few that passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attacked_p99_ms: Option<f64>,
    /// What the latency test uses: p99 of every signed request under attack, a failure
    /// (429, timeout, refused, unsent) counting as slower than the limit — KMS sees a
    /// failed call, whatever its speed. Median over the rounds; absent when more than
    /// 1% failed (in the median round).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attacked_p99_all_ms: Option<f64>,
    /// The largest over the rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attacked_max_ms: Option<f64>,
    /// Signed requests that failed under attack, by name, all rounds together.
    pub attacked_errors: BTreeMap<String, u64>,
    /// Failed ÷ all signed requests under attack.
    pub attacked_error_share: f64,
    pub min_ratio: f64,
    pub max_p99_ms: f64,
    pub throughput_holds: bool,
    pub latency_holds: bool,
    /// Both hold.
    pub holds: bool,
}

/// What `flood --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub label: String,
    pub target: String,
    /// The attack as configured (after the caps and the split over kinds/versions).
    pub attack: AttackPlan,
    /// The address the server saw the signed client come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_source: Option<String>,
    pub rounds: Vec<Round>,
    pub verdict: Verdict,
}

/// `xks-bench flood`.
pub fn flood(args: &FloodArgs) -> Result<()> {
    ensure!((1..=20).contains(&args.rounds), "--rounds must be 1..=20");
    ensure!(
        (0.0..=60.0).contains(&args.attack_ramp),
        "--attack-ramp must be 0..=60 seconds"
    );
    ensure!(
        (0.0..=60.0).contains(&args.settle),
        "--settle must be 0..=60 seconds"
    );
    ensure!(
        args.min_ratio > 0.0 && args.min_ratio <= 1.0,
        "--min-ratio must be in (0, 1]"
    );
    ensure!(args.max_p99_ms > 0.0, "--max-p99-ms must be positive");
    let rt = crate::client_runtime()?;
    let target = Arc::new(rt.block_on(Target::from_args(&args.target))?);
    let mut plan = Plan::from_args(&args.load, args.quiet, args.server_pid)?;
    plan.tolerate_connect_failures = true;
    let attack_plan =
        AttackPlan::from_args(&args.attack, &target, args.client_source, plan.connections)?;
    let body = Workload::new(&args.load)?.encrypt_body(&mut Rng::new(0xa77ac4))?;
    let ramp = Duration::from_secs_f64(args.attack_ramp);
    let settle = Duration::from_secs_f64(args.settle);
    // The attack's own deadline, should the signed run overrun: everything it waits
    // for, plus slack for Decrypt samples and connects.
    let attack_max =
        ramp + plan.warmup + plan.duration + plan.timeout * 20 + Duration::from_secs(30);
    let say = |what: &str| {
        if !args.quiet {
            eprintln!("xks-bench flood: {what}");
        }
    };
    say(&format!(
        "attackers: {} from {}",
        attack_plan.describe(),
        sources_text(&attack_plan)
    ));

    let mut rounds = Vec::with_capacity(args.rounds);
    for r in 1..=args.rounds {
        say(&format!("round {r}/{}: unloaded", args.rounds));
        let (unloaded, unloaded_hist) = rt.block_on(crate::execute(
            Arc::clone(&target),
            &args.load,
            plan.clone(),
            &format!("{} unloaded r{r}", args.label),
            args.client_source,
        ))?;
        std::thread::sleep(settle);

        say(&format!("round {r}/{}: under attack", args.rounds));
        let attack = attack::start(
            attack_plan.clone(),
            Arc::clone(&target),
            body.clone(),
            args.quiet,
            attack_max,
        )?;
        std::thread::sleep(ramp);
        let attacked = rt.block_on(crate::execute(
            Arc::clone(&target),
            &args.load,
            plan.clone(),
            &format!("{} attacked r{r}", args.label),
            args.client_source,
        ));
        // Stop the attack whatever the signed run did.
        let attackers = attack.stop()?;
        let (attacked, attacked_hist) = attacked?;
        std::thread::sleep(settle);
        let ratio = if unloaded.throughput_rps > 0.0 {
            attacked.throughput_rps / unloaded.throughput_rps
        } else {
            0.0
        };
        rounds.push(Round {
            round: r,
            unloaded_p99_all_ms: p99_of_run(&unloaded_hist, &unloaded),
            attacked_p99_all_ms: p99_of_run(&attacked_hist, &attacked),
            unloaded,
            attacked,
            attackers,
            ratio,
        });
    }

    let verdict = verdict(&rounds, args.min_ratio, args.max_p99_ms);
    let report = FloodReport {
        label: args.label.clone(),
        target: format!("{}{}", target.authority, target.base_path),
        client_source: rounds.iter().find_map(|r| {
            r.attacked
                .client_source
                .clone()
                .or(r.unloaded.client_source.clone())
        }),
        attack: attack_plan,
        rounds,
        verdict,
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", markdown(&report));
    }
    Ok(())
}

/// The p99 of every request of a run with each failure (error or unsent slot) counted
/// as slower than any success: KMS gives up on a call at its timeout and sees a 429 as
/// a failure, so 2% failures put the p99 past any limit however fast the rest were.
/// `None` when more than 1% failed.
fn p99_counting_failures(latency: &Histogram<u64>, ok: u64, failed: u64) -> Option<f64> {
    // The rank of the 99th percentile among all requests; the failures rank last.
    let rank = 0.99 * (ok + failed) as f64;
    if ok == 0 || rank > ok as f64 {
        return None;
    }
    let q = (rank / ok as f64).min(1.0);
    Some(latency.value_at_quantile(q) as f64 / 1000.0)
}

/// [`p99_counting_failures`] of a run.
fn p99_of_run(latency: &Histogram<u64>, r: &Report) -> Option<f64> {
    p99_counting_failures(latency, r.requests_ok, r.errors + r.unsent)
}

/// The median over rounds; infinities count (a round that failed the latency test
/// stays failed), and no rounds is 0.
fn median(v: Vec<f64>) -> f64 {
    crate::report::median(v).unwrap_or(0.0)
}

/// Medians over the rounds, judged. A round with no signed success under attack has
/// an infinite p99 (it fails the latency test), not a missing one.
fn verdict(rounds: &[Round], min_ratio: f64, max_p99_ms: f64) -> Verdict {
    let p99 = |r: &Report| r.latency.as_ref().map_or(f64::INFINITY, |l| l.p99_ms);
    let finite = |v: f64| v.is_finite().then_some(v);
    let unloaded_rps = median(rounds.iter().map(|r| r.unloaded.throughput_rps).collect());
    let attacked_rps = median(rounds.iter().map(|r| r.attacked.throughput_rps).collect());
    let ratio = median(rounds.iter().map(|r| r.ratio).collect());
    let unloaded_p99 = median(rounds.iter().map(|r| p99(&r.unloaded)).collect());
    let attacked_p99 = median(rounds.iter().map(|r| p99(&r.attacked)).collect());
    let attacked_p99_all = median(
        rounds
            .iter()
            .map(|r| r.attacked_p99_all_ms.unwrap_or(f64::INFINITY))
            .collect(),
    );
    let attacked_max = rounds
        .iter()
        .filter_map(|r| r.attacked.latency.as_ref().map(|l| l.max_ms))
        .reduce(f64::max);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut failed, mut all) = (0u64, 0u64);
    for r in rounds {
        for (k, v) in &r.attacked.errors_by_name {
            *errors.entry(k.clone()).or_default() += v;
        }
        failed += r.attacked.errors + r.attacked.unsent;
        all += r.attacked.errors + r.attacked.unsent + r.attacked.requests_ok;
    }
    let throughput_holds = ratio >= min_ratio;
    let latency_holds = attacked_p99_all < max_p99_ms;
    Verdict {
        unloaded_rps,
        attacked_rps,
        ratio,
        unloaded_p99_ms: finite(unloaded_p99),
        attacked_p99_ms: finite(attacked_p99),
        attacked_p99_all_ms: finite(attacked_p99_all),
        attacked_max_ms: attacked_max,
        attacked_errors: errors,
        attacked_error_share: failed as f64 / all.max(1) as f64,
        min_ratio,
        max_p99_ms,
        throughput_holds,
        latency_holds,
        holds: throughput_holds && latency_holds,
    }
}

fn sources_text(plan: &AttackPlan) -> String {
    match plan.sources.as_slice() {
        [] => "-".to_owned(),
        [one] => one.to_string(),
        [first, .., last] => format!("{} sources ({first}–{last})", plan.sources.len()),
    }
}

/// The report for a human: the signed runs as `run` rows, the attackers per round,
/// and the verdict.
pub fn markdown(r: &FloodReport) -> String {
    let a = &r.attack;
    let mut out = format!(
        "Flood `{}` against {}: attackers {} from {}; signed client from {}; forged auth: {}; slow attackers send {}; {} new attacker connections/s at most{}.\n\n",
        r.label,
        r.target,
        a.describe(),
        sources_text(a),
        r.client_source.as_deref().unwrap_or("-"),
        serde_json::to_value(a.auth)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        a.trickle_ms
            .map_or("nothing after the headers/handshake".to_owned(), |ms| {
                format!("1 byte per {ms} ms")
            }),
        a.connect_rate,
        a.request_rate.map_or(String::new(), |rate| format!(
            "; fast-unsigned capped at {rate}/s"
        )),
    );
    out += &report::markdown_header();
    for round in &r.rounds {
        out += &report::markdown_row(&round.unloaded);
        out += &report::markdown_row(&round.attacked);
    }
    out += "\n(The attacked rows' client CPU includes the attackers' thread.)\n";
    out += "\nAttackers (refused = closed at TCP / during TLS; open = at stop (peak)):\n\n";
    out += "| round | attacker | http | conns | connects | refused tcp / tls | closed by server | closed by us | open (peak) | requests | answered by status | unanswered | trickled B | local failures |\n\
            |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n";
    for round in &r.rounds {
        for g in &round.attackers.groups {
            let answered = if g.answered.is_empty() {
                "-".to_owned()
            } else {
                g.answered
                    .iter()
                    .map(|(s, n)| format!("{s}×{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let conns = match g.group.streams_per_connection {
                Some(s) => format!("{}×{s}", g.group.connections),
                None => g.group.connections.to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                round.round,
                g.group.kind.name(),
                g.group.http,
                conns,
                g.connects,
                g.refused_tcp,
                g.refused_tls,
                g.closed_by_server,
                g.closed_by_attacker,
                g.open_at_stop,
                g.peak_open,
                g.requests,
                answered,
                g.unanswered,
                g.trickled_bytes,
                g.local_failures,
            );
        }
    }
    out += "\n";
    for round in &r.rounds {
        let _ = writeln!(
            out,
            "Round {}: attackers answered {:.0}/s, used {:.2} s CPU over {:.1} s ({:.2} of a generator core); signed throughput ratio {:.2}.",
            round.round,
            round.attackers.answered_per_s(),
            round.attackers.cpu_s,
            round.attackers.elapsed_s,
            round.attackers.cores_busy,
            round.ratio,
        );
    }
    let v = &r.verdict;
    let ms = |x: Option<f64>| x.map_or("none (no success)".to_owned(), |x| format!("{x:.2} ms"));
    let errors = if v.attacked_errors.is_empty() {
        "none".to_owned()
    } else {
        v.attacked_errors
            .iter()
            .map(|(k, n)| format!("{k}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "\n**Verdict: {}.** Signed throughput {:.0} rps under attack vs {:.0} unloaded = {:.2}× (needs ≥ {:.2}: {}); p99 under attack, failures counted as too slow: {} (needs < {:.0} ms: {}); p99 of the successes {} (unloaded {}), max {}; failed signed requests under attack {:.1}% ({errors}). Medians of {} round(s).",
        if v.holds { "HOLDS" } else { "FAILS" },
        v.attacked_rps,
        v.unloaded_rps,
        v.ratio,
        v.min_ratio,
        if v.throughput_holds { "holds" } else { "fails" },
        v.attacked_p99_all_ms
            .map_or("over (more than 1% failed)".to_owned(), |x| format!(
                "{x:.2} ms"
            )),
        v.max_p99_ms,
        if v.latency_holds { "holds" } else { "fails" },
        ms(v.attacked_p99_ms),
        ms(v.unloaded_p99_ms),
        ms(v.attacked_max_ms),
        v.attacked_error_share * 100.0,
        r.rounds.len(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::{median, p99_counting_failures};

    #[test]
    fn failures_count_as_slower_than_every_success() {
        // 1000 successes of 1..=1000 µs.
        let mut h = crate::runner::new_histogram();
        for us in 1..=1000 {
            h.record(us).expect("in range");
        }
        let p = |failed| p99_counting_failures(&h, 1000, failed);
        // No failure: the plain p99 (≈ 990 µs).
        assert!((p(0).expect("some") - 0.99).abs() < 0.01);
        // 5 failures of 1005: the p99 is the 995th request, a success.
        assert!((p(5).expect("some") - 0.995).abs() < 0.01);
        // 11 failures of 1011 (> 1%): past any limit.
        assert_eq!(p(11), None);
        assert_eq!(p99_counting_failures(&h, 0, 0), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(
            median(vec![1.0, f64::INFINITY, f64::INFINITY]),
            f64::INFINITY
        );
        assert_eq!(median(Vec::new()), 0.0);
    }
}
