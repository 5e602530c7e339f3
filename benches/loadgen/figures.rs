//! `xks-bench figures`: the suite behind the table in benches/README.md.
//!
//! It starts every server as a child process pinned to `--server-cpus` (the generator
//! is meant to run pinned to the other core: `taskset -c 0 xks-bench figures`), then
//! measures each scenario against the null server and each proxy back to back, so
//! every proxy figure sits next to the null server's measured minutes apart on the
//! same machine state. These machines are noisy; the ratios are the figures.
//!
//! Output (in `--out`): `runs.json` (every report), `figures.md` (the summary table and
//! every run's row), `latency-1800rps.svg` and `latency-c64.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

use crate::cli::{FiguresArgs, LoadArgs, OpArg, TargetArgs, Verify};
use crate::report::{self, Report};
use crate::runner::Plan;
use crate::servers::repo_file;
use crate::target::Target;

/// A server child process, killed (by its own pid) when dropped.
struct Server {
    name: String,
    child: Child,
    pid: u32,
    url: String,
    prefix: String,
    key_id: String,
    access_key_id: String,
    secret_file: Option<PathBuf>,
    idle_rss_kib: u64,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn spawn(name: &str, args: &[&str], cpus: &str) -> Result<Server> {
        let exe = std::env::current_exe().context("locating xks-bench")?;
        let mut cmd = if cpus.is_empty() {
            Command::new(&exe)
        } else {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&exe);
            c
        };
        cmd.args(args)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The proxy's request log goes to stderr: formatted and written, as in
            // production, but not kept (a file would fill the disk over the suite).
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", exe.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if !l.trim().is_empty() => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not announce itself within 60 s");
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("{name} said: {line}"))?;
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        let pid = v["pid"].as_u64().context("no pid")? as u32;
        // Settle, then read the idle RSS (nothing has connected yet).
        std::thread::sleep(Duration::from_millis(500));
        Ok(Server {
            name: name.to_owned(),
            pid,
            url: s("url").context("no url")?,
            prefix: s("prefix").unwrap_or_default(),
            key_id: s("key_id").unwrap_or_else(|| crate::servers::BENCH_KEY.to_owned()),
            access_key_id: s("access_key_id").unwrap_or_default(),
            secret_file: s("secret_file").map(PathBuf::from),
            idle_rss_kib: crate::procstat::rss_kib(pid).unwrap_or(0),
            child,
        })
    }

    /// A target for this server. The null server checks nothing, so any credential.
    async fn target(&self, dummy_secret: &Path) -> Result<Arc<Target>> {
        let args = TargetArgs {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            key_id: self.key_id.clone(),
            access_key_id: if self.access_key_id.is_empty() {
                "AKIAXKSBENCHNULL2345".to_owned()
            } else {
                self.access_key_id.clone()
            },
            secret: None,
            secret_file: Some(
                self.secret_file
                    .clone()
                    .unwrap_or_else(|| dummy_secret.to_owned()),
            ),
            region: "us-east-1".into(),
            service: "kms-xks-proxy".into(),
            ca: Some(repo_file("certs/ca.pem")),
            insecure: false,
            client_cert: None,
            client_key: None,
            connect_to: None,
            allow_remote: false,
        };
        Ok(Arc::new(Target::from_args(&args).await?))
    }
}

/// One scenario of the suite.
#[derive(Debug, Clone)]
struct Scenario {
    key: String,
    op: OpArg,
    concurrency: usize,
    rate: Option<f64>,
    new_connection: bool,
    http2_connections: Option<usize>,
}

fn load_args(s: &Scenario, a: &FiguresArgs, verify: Verify) -> LoadArgs {
    LoadArgs {
        op: s.op,
        mix: "encrypt=45,decrypt=45,metadata=5,health=5".into(),
        concurrency: s.concurrency,
        rate: s.rate,
        duration: a.duration,
        requests: None,
        warmup: a.warmup,
        http2: s.http2_connections.is_some(),
        connections: s.http2_connections,
        new_connection: s.new_connection,
        tls_resumption: false,
        timeout_ms: 250,
        plaintext_bytes: 32,
        aad_bytes: 100,
        no_cdiv: false,
        verify,
    }
}

fn scenarios(a: &FiguresArgs) -> Vec<Scenario> {
    let closed = |op: OpArg, name: &str, c: usize| Scenario {
        key: format!("{name} c={c}"),
        op,
        concurrency: c,
        rate: None,
        new_connection: false,
        http2_connections: None,
    };
    let mut out = Vec::new();
    for &c in &a.concurrency {
        out.push(closed(OpArg::Encrypt, "Encrypt", c));
    }
    for &c in &a.concurrency {
        out.push(closed(OpArg::Health, "GetHealthStatus", c));
    }
    out.push(Scenario {
        key: format!("Encrypt open {:.0}/s", a.rate),
        op: OpArg::Encrypt,
        concurrency: 64,
        rate: Some(a.rate),
        new_connection: false,
        http2_connections: None,
    });
    out.push(Scenario {
        key: "Encrypt new TLS conn/req c=8".into(),
        op: OpArg::Encrypt,
        concurrency: 8,
        rate: None,
        new_connection: true,
        http2_connections: None,
    });
    if !a.quick {
        out.push(Scenario {
            key: "Encrypt h2 c=64 (4 conns)".into(),
            op: OpArg::Encrypt,
            concurrency: 64,
            rate: None,
            new_connection: false,
            http2_connections: Some(4),
        });
        out.push(Scenario {
            key: "Mix c=64".into(),
            op: OpArg::Mix,
            concurrency: 64,
            rate: None,
            new_connection: false,
            http2_connections: None,
        });
    }
    out
}

/// Facts about the machine for the README.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let total = cpuinfo.matches("processor\t:").count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let allowed = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    format!(
        "{model}, {total} logical CPUs (generator allowed CPUs {allowed}, {cores} runtime worker(s)), Linux {}",
        kernel.trim()
    )
}

pub fn figures(a: &FiguresArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dummy_secret = a.out.join("null-server.secret");
    std::fs::write(
        &dummy_secret,
        "bm90LWEtc2VjcmV0LWZvci1hbnl0aGluZy1udWxsLXNlcnZlcg",
    )?;

    let machine = machine();
    eprintln!("machine: {machine}");
    let mut servers = vec![
        Server::spawn("null", &["null-server"], &a.server_cpus)?,
        Server::spawn("proxy (software)", &["proxy-server"], &a.server_cpus)?,
    ];
    if a.with_log_off {
        servers.push(Server::spawn(
            "proxy (software, log off)",
            &["proxy-server", "--log-level", "off"],
            &a.server_cpus,
        )?);
    }
    if let Some(cfg) = &a.hsm_config {
        let cfg = cfg.to_str().context("--hsm-config path is not UTF-8")?;
        let mut s = Server::spawn(
            "proxy (SoftHSM)",
            &["proxy-server", "--config", cfg],
            &a.server_cpus,
        )?;
        s.prefix.clone_from(&a.hsm_prefix);
        s.key_id.clone_from(&a.hsm_key_id);
        if !a.hsm_access_key_id.is_empty() {
            s.access_key_id.clone_from(&a.hsm_access_key_id);
        }
        if let Some(f) = &a.hsm_secret_file {
            s.secret_file = Some(f.clone());
        }
        servers.push(s);
    }
    for s in &servers {
        eprintln!(
            "{} at {} (pid {}), idle RSS {} KiB",
            s.name, s.url, s.pid, s.idle_rss_kib
        );
    }

    let rt = crate::client_runtime()?;
    let mut targets = Vec::new();
    for s in &servers {
        targets.push(rt.block_on(s.target(&dummy_secret))?);
    }

    // results[scenario][server] = (report, histogram)
    let mut results: Vec<(Scenario, Vec<(Report, Histogram<u64>)>)> = Vec::new();
    for sc in scenarios(a) {
        let mut row = Vec::new();
        for (server, target) in servers.iter().zip(&targets) {
            let verify = if server.name == "null" {
                Verify::Status
            } else {
                Verify::Full
            };
            let load = load_args(&sc, a, verify);
            let plan = Plan::from_args(&load, true, Some(server.pid))?;
            let label = format!("{} — {}", server.name, sc.key);
            eprintln!("running: {label}");
            let (rep, hist) =
                rt.block_on(crate::execute(Arc::clone(target), &load, plan, &label))?;
            eprint!("{}", report::markdown_row(&rep));
            row.push((rep, hist));
        }
        results.push((sc, row));
    }

    // Files: every report, the tables, the plots.
    let all: Vec<&Report> = results
        .iter()
        .flat_map(|(_, r)| r.iter().map(|x| &x.0))
        .collect();
    std::fs::write(
        a.out.join("runs.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "machine": machine,
            "servers": servers.iter().map(|s| serde_json::json!({
                "name": s.name, "idle_rss_kib": s.idle_rss_kib,
            })).collect::<Vec<_>>(),
            "runs": all,
        }))?,
    )?;
    let md = summary(a, &machine, &servers, &results);
    std::fs::write(a.out.join("figures.md"), &md)?;
    println!("{md}");
    for (sc, row) in &results {
        let file = if sc.rate.is_some() {
            "latency-1800rps.svg"
        } else if sc.key == "Encrypt c=64" {
            "latency-c64.svg"
        } else {
            continue;
        };
        let series: Vec<(String, &Histogram<u64>)> = servers
            .iter()
            .zip(row)
            .map(|(s, (_, h))| (s.name.clone(), h))
            .collect();
        crate::plot::latency_svg(&a.out.join(file), &sc.key, &series)?;
    }
    eprintln!("written: {}", a.out.display());
    Ok(())
}

/// The README table: each figure for the null server and each proxy, with the ratio.
fn summary(
    a: &FiguresArgs,
    machine: &str,
    servers: &[Server],
    results: &[(Scenario, Vec<(Report, Histogram<u64>)>)],
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {machine}. Runs of {:.0} s after {:.0} s warm-up; servers pinned to CPU(s) `{}`.\n",
        a.duration, a.warmup, a.server_cpus
    );
    let _ = write!(md, "| figure |");
    for s in servers {
        let _ = write!(md, " {} |", s.name);
    }
    for s in servers.iter().skip(1) {
        let _ = write!(md, " {} ÷ null |", s.name);
    }
    md.push('\n');
    md.push_str("|---|");
    for _ in 0..(servers.len() * 2 - 1) {
        md.push_str("---:|");
    }
    md.push('\n');

    let cpu = |r: &Report| r.server.as_ref().map_or(f64::NAN, |s| s.cpu_us_per_request);
    for (sc, row) in results {
        let Some((null, _)) = row.first() else {
            continue;
        };
        if sc.rate.is_some() {
            let lat =
                |r: &Report, f: fn(&report::Latency) -> f64| r.latency.as_ref().map_or(f64::NAN, f);
            let _ = write!(md, "| {} p50 / p99 / p99.9 ms (server µs/req) |", sc.key);
            for (r, _) in row {
                let _ = write!(
                    md,
                    " {:.2} / {:.2} / {:.2} ({:.0}){} |",
                    lat(r, |l| l.p50_ms),
                    lat(r, |l| l.p99_ms),
                    lat(r, |l| l.p99_9_ms),
                    cpu(r),
                    errors_note(r)
                );
            }
            for (r, _) in row.iter().skip(1) {
                let _ = write!(
                    md,
                    " p99 {:.1}× |",
                    lat(r, |l| l.p99_ms) / lat(null, |l| l.p99_ms)
                );
            }
        } else {
            let _ = write!(md, "| {} rps (server µs CPU/req) |", sc.key);
            for (r, _) in row {
                let _ = write!(
                    md,
                    " {:.0} ({:.1}){} |",
                    r.throughput_rps,
                    cpu(r),
                    errors_note(r)
                );
            }
            for (r, _) in row.iter().skip(1) {
                let _ = write!(
                    md,
                    " {:.2} (CPU {:.2}) |",
                    r.throughput_rps / null.throughput_rps,
                    cpu(null) / cpu(r)
                );
            }
        }
        md.push('\n');
    }
    // RSS: idle (before any load) and the most seen under load across the suite.
    let _ = write!(md, "| RSS idle / max under load (MiB) |");
    let mut peaks = BTreeMap::new();
    for (_, row) in results {
        for (i, (r, _)) in row.iter().enumerate() {
            let v = r.server.as_ref().map_or(0, |s| s.rss_max_kib);
            let e = peaks.entry(i).or_insert(0u64);
            *e = (*e).max(v);
        }
    }
    for (i, s) in servers.iter().enumerate() {
        let _ = write!(
            md,
            " {:.1} / {:.1} |",
            s.idle_rss_kib as f64 / 1024.0,
            peaks.get(&i).copied().unwrap_or(0) as f64 / 1024.0
        );
    }
    for _ in servers.iter().skip(1) {
        md.push_str(" |");
    }
    md.push_str("\n\nEvery run:\n\n");
    md.push_str(&report::markdown_header());
    for (_, row) in results {
        for (r, _) in row {
            md.push_str(&report::markdown_row(r));
        }
    }
    md
}

fn errors_note(r: &Report) -> String {
    if r.errors == 0 {
        String::new()
    } else {
        format!(" ⚠ {} errors", r.errors)
    }
}
