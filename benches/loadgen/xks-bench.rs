//! `xks-bench`: a KMS-like load generator for XKS proxies (ours or anyone's), the
//! servers it is measured against, and the figure suite behind benches/README.md.
//!
//! Files (all under benches/loadgen/):
//! - `cli.rs`: the command line (clap derive).
//! - `target.rs`: the endpoint — address, host, paths, SigV4 credential, rustls client.
//! - `conn.rs`: one TCP + TLS + HTTP/1.1-or-2 connection (hyper's low-level client).
//! - `workload.rs`: the four XKS calls with realistic bodies, KMS-style signing, and
//!   the response checks; the Decrypt sample pool.
//! - `runner.rs`: closed and open loops, progress, CPU/RSS sampling.
//! - `report.rs`: HDR percentiles, JSON and markdown; `plot.rs`: the SVG latency plot.
//! - `procstat.rs`: CPU and RSS of a process from /proc.
//! - `servers.rs`: `null-server` and `proxy-server`; `ceiling.rs`: the null server's
//!   `--hsm-module` work, the same-run ceiling of a PKCS#11-backed proxy.
//! - `figures.rs`: the README figure suite; `softhsm.rs`: the plain PKCS#11 loop.
//! - `flood.rs`: `flood`, the signed workload unloaded and under attack, and the
//!   verdict; `attack.rs`: the unauthenticated attackers it runs (fast and slow,
//!   HTTP/1.1 and HTTP/2, from several loopback addresses).
//! - `soak.rs`: `soak`, GenerateDataKey + Decrypt round trips through the real
//!   `kms-emulator` and `xks-proxy` with a proxy restart midway: nothing lost, RSS
//!   flat; `kms.rs`: the small signed client for the KMS JSON API it uses.
//! - `hold.rs`: `hold`, thousands of idle keep-alive connections of KMS's kind and a
//!   new client's load meanwhile: RSS per idle connection, new clients still served.
#![forbid(unsafe_code)]

/// The product's allocator (`src/bin/xks-proxy.rs`): the proxies measured in-process here
/// (`proxy-server`, `figures`) must allocate as `xks-proxy` does, and the null server and
/// ceiling beside them the same way, or a ratio would partly measure two allocators.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod attack;
mod ceiling;
mod cli;
mod conn;
mod figures;
mod flood;
mod hold;
mod kms;
mod plot;
mod procstat;
mod report;
mod runner;
mod servers;
mod soak;
mod softhsm;
mod target;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;

use cli::{Cli, Command, LoadArgs, RunArgs, Verify};
use conn::Connector;
use report::{Report, Shape};
use runner::Plan;
use target::Target;
use workload::{Op, Workload};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(&args),
        Command::Flood(args) => flood::flood(&args),
        Command::NullServer(args) => servers::null_server(&args),
        Command::ProxyServer(args) => servers::proxy_server(&args),
        Command::Figures(args) => figures::figures(&args),
        Command::SofthsmLoop(args) => softhsm::softhsm_loop(&args),
        Command::Soak(args) => soak::soak(&args),
        Command::Hold(args) => hold::hold(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xks-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The generator's runtime: multi-threaded, one worker per CPU it may run on (so
/// `taskset -c 0` gives it exactly one core).
pub fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_command(args: &RunArgs) -> Result<()> {
    let rt = client_runtime()?;
    let (report, latency) = rt.block_on(async {
        let target = Arc::new(Target::from_args(&args.target).await?);
        let plan = Plan::from_args(&args.load, args.quiet, args.server_pid)?;
        execute(target, &args.load, plan, &args.label, None).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::markdown(&report));
    }
    if let Some(path) = &args.plot {
        plot::latency_svg(
            path,
            &format!(
                "{} — {} latency by percentile",
                report.label, report.shape.op
            ),
            &[(report.label.clone(), &latency)],
        )?;
        if !args.quiet {
            eprintln!("latency plot written to {}", path.display());
        }
    }
    Ok(())
}

/// One complete run: connections (from `source` if given), Decrypt samples if needed,
/// the load, the report. Also returns the latency histogram (for plots).
pub async fn execute(
    target: Arc<Target>,
    load: &LoadArgs,
    plan: Plan,
    label: &str,
    source: Option<std::net::IpAddr>,
) -> Result<(Report, Histogram<u64>)> {
    let connector =
        Connector::new(Arc::clone(&target), load.http2, load.tls_resumption)?.with_source(source);
    let seen = connector.clone();
    let mut workload = Workload::new(load)?;
    if workload.uses(Op::Decrypt) && load.verify == Verify::Full {
        // A pool of real ciphertexts, made before the clock starts.
        workload.samples =
            workload::make_samples(&workload, &connector, 64, plan.timeout * 20).await?;
    }
    let shape = Shape {
        op: format!("{:?}", load.op).to_lowercase(),
        mode: if plan.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        concurrency: plan.concurrency,
        connections: if plan.new_connection {
            0
        } else {
            plan.connections
        },
        rate: plan.rate,
        http: if load.http2 { "2" } else { "1.1" },
        new_connection_per_request: plan.new_connection,
        duration_s: plan.duration.as_secs_f64(),
    };
    let outcome = runner::run(Arc::new(workload), connector, plan).await?;
    let mut report = Report::new(
        label,
        &format!("{}{}", target.authority, target.base_path),
        shape,
        &outcome,
    );
    report.client_source = seen.seen_source().map(|ip| ip.to_string());
    Ok((report, outcome.stats.latency))
}
