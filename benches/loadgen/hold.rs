//! `xks-bench hold`: many idle keep-alive connections of KMS's kind — each has carried
//! one signed request, then stays open and silent — and, while they are held, a normal
//! load from a new client. Answers "what does an idle KMS connection cost the proxy"
//! (RSS per connection, and whether it is given back when they close) and "does the
//! proxy still serve new clients with N of them open" (issue 11 §3).
//!
//! Connections are spread over loopback source addresses (127.0.0.2 ...), as KMS's
//! fleet would be, so the proxy's per-source cap does not refuse them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::cli::HoldArgs;
use crate::conn::{Conn, Connector};
use crate::procstat;
use crate::report::{self, Report};
use crate::runner::Plan;
use crate::target::Target;
use crate::workload::{Op, Rng, Workload};

/// Loopback source addresses available (127.0.0.2 ..= 127.0.0.251).
const MAX_SOURCES: usize = 250;
/// Connections opened at once while building the held set.
const OPEN_PARALLEL: usize = 128;
/// How long the held set settles before RSS is read (allocator, kernel buffers).
const SETTLE: Duration = Duration::from_secs(2);
/// Per-connection budget for connect + TLS + the one signed request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize)]
struct HoldReport {
    label: String,
    asked: usize,
    held: usize,
    open_failures: BTreeMap<String, u64>,
    http: &'static str,
    sources: usize,
    /// Server RSS, KiB: before any held connection, with all held and idle, after the
    /// new client's load (still held), and after they all closed.
    rss_before_kib: Option<u64>,
    rss_held_kib: Option<u64>,
    rss_under_load_kib: Option<u64>,
    rss_after_close_kib: Option<u64>,
    /// (held − before) / held.
    kib_per_idle_connection: Option<f64>,
    /// The new client's run while the connections were held.
    new_client: Report,
    /// Held connections that answered a second signed request after the load (sampled).
    held_still_served: u64,
    held_checked: u64,
    load_average_1m: f64,
}

pub fn hold(args: &HoldArgs) -> Result<()> {
    ensure!(
        (1..=MAX_SOURCES).contains(&args.hold_sources),
        "--hold-sources must be 1..={MAX_SOURCES}"
    );
    let rt = crate::client_runtime()?;
    let report = rt.block_on(run(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", markdown(&report));
    }
    ensure!(
        report.held == report.asked,
        "only {} of {} connections could be held",
        report.held,
        report.asked
    );
    Ok(())
}

async fn run(args: &HoldArgs) -> Result<HoldReport> {
    let target = Arc::new(Target::from_args(&args.target).await?);
    ensure!(
        target.addr.is_ipv4(),
        "hold spreads connections over 127.0.0.x: use an IPv4 loopback target"
    );
    let rss = || args.server_pid.and_then(procstat::rss_kib);
    let workload = Arc::new(Workload::new(&args.load)?);
    let rss_before = rss();

    // The held set: connect, one signed GetHealthStatus, keep the connection.
    let gate = Arc::new(Semaphore::new(OPEN_PARALLEL));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..args.hold_connections {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % args.hold_sources) as u8));
        let connector =
            Connector::new(Arc::clone(&target), args.hold_http2, false)?.with_source(Some(source));
        let workload = Arc::clone(&workload);
        let gate = Arc::clone(&gate);
        opening.spawn(async move {
            let _slot = gate.acquire_owned().await;
            let mut rng = Rng::new(i as u64 + 1);
            let open = async {
                let mut conn = connector.connect().await.map_err(|e| e.0)?;
                signed_once(&connector, &workload, &mut conn, &mut rng).await?;
                Ok::<_, &'static str>(conn)
            };
            tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .unwrap_or(Err("OpenTimeout"))
                .map(|conn| (connector, conn))
        });
    }
    let mut held: Vec<(Connector, Conn)> = Vec::with_capacity(args.hold_connections);
    let mut open_failures = BTreeMap::new();
    while let Some(r) = opening.join_next().await {
        match r {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(label)) => *open_failures.entry(label.to_owned()).or_default() += 1,
            Err(_) => *open_failures.entry("TaskFailed".to_owned()).or_default() += 1,
        }
    }
    if !args.quiet {
        eprintln!(
            "holding {} idle connections ({} failed to open)",
            held.len(),
            open_failures.values().sum::<u64>()
        );
    }
    tokio::time::sleep(SETTLE).await;
    let rss_held = rss();

    // A new client's load while they are held (from 127.0.0.1, not a held source).
    let plan = Plan::from_args(&args.load, true, args.server_pid)?;
    let (new_client, _) = crate::execute(
        Arc::clone(&target),
        &args.load,
        plan,
        &args.label,
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    )
    .await?;
    let rss_under_load = rss();

    // Still KMS's connections: a sample answers a second signed request.
    let (mut checked, mut served) = (0u64, 0u64);
    let step = (held.len() / 200).max(1);
    let mut rng = Rng::new(7);
    for (connector, conn) in held.iter_mut().step_by(step) {
        checked += 1;
        if signed_once(connector, &workload, conn, &mut rng)
            .await
            .is_ok()
        {
            served += 1;
        }
    }
    let count = held.len();
    drop(held);
    tokio::time::sleep(SETTLE * 2).await;
    let rss_after_close = rss();

    let per_conn = match (rss_before, rss_held) {
        (Some(b), Some(h)) if count > 0 => Some((h.saturating_sub(b)) as f64 / count as f64),
        _ => None,
    };
    Ok(HoldReport {
        label: args.label.clone(),
        asked: args.hold_connections,
        held: count,
        open_failures,
        http: if args.hold_http2 { "2" } else { "1.1" },
        sources: args.hold_sources,
        rss_before_kib: rss_before,
        rss_held_kib: rss_held,
        rss_under_load_kib: rss_under_load,
        rss_after_close_kib: rss_after_close,
        kib_per_idle_connection: per_conn,
        new_client,
        held_still_served: served,
        held_checked: checked,
        load_average_1m: report::load_average(),
    })
}

/// One signed GetHealthStatus on `conn`, checked.
async fn signed_once(
    connector: &Connector,
    workload: &Workload,
    conn: &mut Conn,
    rng: &mut Rng,
) -> Result<(), &'static str> {
    let (req, expect) = workload
        .request(connector, Op::Health, rng)
        .map_err(|_| "SignFailed")?;
    let (status, body) = conn.send(req, OPEN_TIMEOUT).await.map_err(|e| e.0)?;
    workload
        .check(&expect, status, &body)
        .map_err(|_| "HealthCheckFailed")
}

fn markdown(r: &HoldReport) -> String {
    let mib = |k: Option<u64>| k.map_or("–".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
    let lat = r.new_client.latency.as_ref();
    format!(
        "| held idle connections (HTTP/{}) | RSS before / held / under load / after close MiB | KiB per idle connection | new client ok / errors | new client p50 / p99 ms | held ones still served |\n\
         |---:|---:|---:|---:|---:|---:|\n\
         | {} of {} | {} / {} / {} / {} | {} | {} / {} | {} / {} | {} of {} sampled |\n\
         \nopen failures: {:?}; load average {:.2}\n",
        r.http,
        r.held,
        r.asked,
        mib(r.rss_before_kib),
        mib(r.rss_held_kib),
        mib(r.rss_under_load_kib),
        mib(r.rss_after_close_kib),
        r.kib_per_idle_connection
            .map_or("–".to_owned(), |k| format!("{k:.1}")),
        r.new_client.requests_ok,
        r.new_client.errors,
        lat.map_or("–".to_owned(), |l| format!("{:.2}", l.p50_ms)),
        lat.map_or("–".to_owned(), |l| format!("{:.2}", l.p99_ms)),
        r.held_still_served,
        r.held_checked,
        r.open_failures,
        r.load_average_1m,
    )
}
