//! `xks-bench figures`: the suite behind the table in benches/README.md.
//!
//! It starts every server as a child process pinned to `--server-cpus` (the generator
//! is meant to run pinned to the other core: `taskset -c 0 xks-bench figures`), then
//! measures each scenario against the null server and each proxy back to back, so
//! every proxy figure sits next to the null server's measured minutes apart on the
//! same machine state. These machines are noisy; the ratios are the figures.
//!
//! Every scenario is measured `--rounds` times, all servers back to back in each round;
//! the table shows medians of throughput, CPU and open-loop percentiles, and ratios as
//! the median of the per-round ratios; the plots use the rounds' merged histograms.
//!
//! Output (in `--out`): `runs.json` (every report), `figures.md` (the summary table,
//! the ratios to the same-run ceilings, the tail latencies, the memory per idle
//! connection when `--idle-connections` asks for it, and every run's row),
//! `latency-1800rps.svg` and `latency-c64.svg`.

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
    fn spawn(name: &str, args: &[&str], cpus: &str, env: &[(String, String)]) -> Result<Server> {
        let exe = std::env::current_exe().context("locating xks-bench")?;
        let mut cmd = if cpus.is_empty() {
            Command::new(&exe)
        } else {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&exe);
            c
        };
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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
    /// An Encrypt that asks for no CDIV (one key-manager call instead of two).
    no_cdiv: bool,
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
        no_cdiv: s.no_cdiv,
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
        no_cdiv: false,
    };
    let mut out = Vec::new();
    for &c in &a.concurrency {
        out.push(closed(OpArg::Encrypt, "Encrypt", c));
    }
    // Without a CDIV: one key-manager call per request instead of two (KMS asks for a
    // CDIV on GenerateDataKey, not on every Encrypt).
    for &c in a.concurrency.iter().filter(|&&c| c > 1) {
        out.push(Scenario {
            no_cdiv: true,
            ..closed(OpArg::Encrypt, "Encrypt no CDIV", c)
        });
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
        no_cdiv: false,
    });
    out.push(Scenario {
        key: "Encrypt new TLS conn/req c=8".into(),
        op: OpArg::Encrypt,
        concurrency: 8,
        rate: None,
        new_connection: true,
        http2_connections: None,
        no_cdiv: false,
    });
    if !a.quick {
        out.push(Scenario {
            key: "Encrypt h2 c=64 (4 conns)".into(),
            op: OpArg::Encrypt,
            concurrency: 64,
            rate: None,
            new_connection: false,
            http2_connections: Some(4),
            no_cdiv: false,
        });
        out.push(Scenario {
            key: "Mix c=64".into(),
            op: OpArg::Mix,
            concurrency: 64,
            rate: None,
            new_connection: false,
            http2_connections: None,
            no_cdiv: false,
        });
    }
    out
}

/// Facts about the machine for the README.
pub fn machine() -> String {
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

/// A fresh SoftHSM token under `dir` (tests/softhsm/setup.sh): the environment the
/// SoftHSM proxy and loop need, and the module path.
struct SoftHsm {
    env: Vec<(String, String)>,
    module: String,
    token: String,
    pin: String,
}

fn softhsm_token(dir: &Path) -> Result<SoftHsm> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let (token, pin) = ("xks-bench", "1234");
    let out = Command::new("bash")
        .arg(repo_file("tests/softhsm/setup.sh"))
        .arg(dir)
        .args([token, "12345678", pin])
        .output()
        .context("running tests/softhsm/setup.sh")?;
    if !out.status.success() {
        bail!(
            "tests/softhsm/setup.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut vars = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
            vars.insert(k.to_owned(), v.trim_matches(['\'', '"']).to_owned());
        }
    }
    let conf = vars
        .get("SOFTHSM2_CONF")
        .context("setup.sh printed no SOFTHSM2_CONF")?;
    let module = vars
        .get("XKS_TEST_PKCS11_MODULE")
        .context("setup.sh printed no module")?
        .clone();
    Ok(SoftHsm {
        env: vec![
            ("SOFTHSM2_CONF".into(), conf.clone()),
            ("XKS_BENCH_HSM_PIN".into(), pin.into()),
        ],
        module,
        token: token.into(),
        pin: pin.into(),
    })
}

/// Runs `xks-bench softhsm-loop` pinned like the servers; returns its ops/s.
fn softhsm_loop(hsm: &SoftHsm, a: &FiguresArgs, with_decrypt: bool) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let mut cmd = if a.server_cpus.is_empty() {
        Command::new(&exe)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(&a.server_cpus).arg(&exe);
        c
    };
    cmd.args(["softhsm-loop", "--json", "--module", &hsm.module])
        .args(["--token-label", &hsm.token, "--pin", &hsm.pin])
        .args(["--key-label", crate::servers::BENCH_KEY])
        .args(["--duration", &format!("{}", a.duration.min(10.0))])
        .envs(hsm.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if with_decrypt {
        cmd.arg("--with-decrypt");
    }
    let out = cmd.output().context("running softhsm-loop")?;
    if !out.status.success() {
        bail!(
            "softhsm-loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["ops_per_s"]
        .as_f64()
        .context("softhsm-loop printed no ops_per_s")
}

/// The median of the finite values; NaN when there are none.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    crate::report::median(v).unwrap_or(f64::NAN)
}

/// One server's results for one scenario, over the rounds.
struct Cell {
    reports: Vec<Report>,
    merged: Histogram<u64>,
}

pub fn figures(a: &FiguresArgs) -> Result<()> {
    anyhow::ensure!((1..=20).contains(&a.rounds), "--rounds must be 1..=20");
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dummy_secret = a.out.join("null-server.secret");
    std::fs::write(
        &dummy_secret,
        "bm90LWEtc2VjcmV0LWZvci1hbnl0aGluZy1udWxsLXNlcnZlcg",
    )?;

    let machine = machine();
    let load_start = report::load_average();
    eprintln!("machine: {machine}; load average {load_start:.2}");
    let mut servers = vec![
        Server::spawn("null", &["null-server"], &a.server_cpus, &[])?,
        Server::spawn("proxy (software)", &["proxy-server"], &a.server_cpus, &[])?,
    ];
    if a.with_log_off {
        servers.push(Server::spawn(
            "proxy (software, log off)",
            &["proxy-server", "--log-level", "off"],
            &a.server_cpus,
            &[],
        )?);
    }
    if a.with_audit {
        // Issue 16 §2: Encrypt throughput and p99 with the audit trail on, against
        // "proxy (software)" in the same round.
        let trail = a.out.join("audit-trail");
        let _ = std::fs::remove_dir_all(&trail);
        servers.push(Server::spawn(
            "proxy (software, audit log on)",
            &["proxy-server", "--audit-dir", &trail.display().to_string()],
            &a.server_cpus,
            &[],
        )?);
    }
    let hsm = if a.softhsm {
        let hsm = softhsm_token(&a.out.join("softhsm"))?;
        // The same-run ceiling of the SoftHSM proxy (issue 15 §1).
        servers.push(Server::spawn(
            CEILING_HSM,
            &[
                "null-server",
                "--hsm-module",
                &hsm.module,
                "--hsm-token",
                &hsm.token,
            ],
            &a.server_cpus,
            &hsm.env,
        )?);
        servers.push(Server::spawn(
            "proxy (SoftHSM)",
            &[
                "proxy-server",
                "--softhsm-module",
                &hsm.module,
                "--softhsm-token",
                &hsm.token,
            ],
            &a.server_cpus,
            &hsm.env,
        )?);
        Some(hsm)
    } else {
        None
    };
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

    let scenarios = scenarios(a);
    // cells[scenario][server]
    let mut cells: Vec<Vec<Cell>> = scenarios
        .iter()
        .map(|_| {
            servers
                .iter()
                .map(|_| Cell {
                    reports: Vec::new(),
                    merged: crate::runner::new_histogram(),
                })
                .collect()
        })
        .collect();
    for round in 0..a.rounds {
        for (sc, row) in scenarios.iter().zip(cells.iter_mut()) {
            for ((server, target), cell) in servers.iter().zip(&targets).zip(row.iter_mut()) {
                let verify = if server.name == "null" || server.name == CEILING_HSM {
                    Verify::Status
                } else {
                    Verify::Full
                };
                let load = load_args(sc, a, verify);
                let plan = Plan::from_args(&load, true, Some(server.pid))?;
                let label = format!("{} — {}", server.name, sc.key);
                eprintln!("round {}/{}: {label}", round + 1, a.rounds);
                let (rep, hist) = rt.block_on(crate::execute(
                    Arc::clone(target),
                    &load,
                    plan,
                    &label,
                    None,
                ))?;
                eprint!("{}", report::markdown_row(&rep));
                let _ = cell.merged.add(&hist);
                cell.reports.push(rep);
            }
        }
    }
    drop(targets);

    // The plain SoftHSM loops run alone, after the load, on the server CPU.
    let loops = match &hsm {
        Some(h) => Some((softhsm_loop(h, a, false)?, softhsm_loop(h, a, true)?)),
        None => None,
    };
    // The memory figures last: they hold thousands of connections against the real
    // binary, and must not share the machine with the runs above.
    let idle = [false, true]
        .into_iter()
        .filter(|_| a.idle_connections > 0)
        .map(|http2| idle_memory(a, http2))
        .collect::<Result<Vec<_>>>()?;
    let load_end = report::load_average();

    let all: Vec<&Report> = cells
        .iter()
        .flatten()
        .flat_map(|c| c.reports.iter())
        .collect();
    std::fs::write(
        a.out.join("runs.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "machine": machine,
            "load_average_1m": {"start": load_start, "end": load_end},
            "servers": servers.iter().map(|s| serde_json::json!({
                "name": s.name, "idle_rss_kib": s.idle_rss_kib,
            })).collect::<Vec<_>>(),
            "softhsm_loop_ops_per_s": loops.map(|(e, ed)| serde_json::json!({
                "encrypt": e, "encrypt_and_decrypt": ed,
            })),
            "idle_connections": idle,
            "runs": all,
        }))?,
    )?;
    let mut md = summary(
        a,
        &machine,
        (load_start, load_end),
        &servers,
        &scenarios,
        &cells,
        loops,
    );
    if !idle.is_empty() {
        md.push_str(&idle_table(a, &idle));
    }
    std::fs::write(a.out.join("figures.md"), &md)?;
    println!("{md}");
    for (sc, row) in scenarios.iter().zip(&cells) {
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
            .map(|(s, c)| (s.name.clone(), &c.merged))
            .collect();
        crate::plot::latency_svg(&a.out.join(file), &sc.key, &series)?;
    }
    eprintln!("written: {}", a.out.display());
    Ok(())
}

/// The name of the SoftHSM ceiling server in the tables.
const CEILING_HSM: &str = "ceiling (SoftHSM)";

/// Each proxy's server CPU per request as a multiple of its same-run ceiling (the null
/// server for the software keystore, [`CEILING_HSM`] for SoftHSM): the median of the
/// per-round ratios, for every closed-loop keep-alive Encrypt scenario.
fn ceiling_ratios(servers: &[Server], scenarios: &[Scenario], cells: &[Vec<Cell>]) -> String {
    let cpu = |r: &Report| r.server.as_ref().map_or(f64::NAN, |s| s.cpu_us_per_request);
    let find = |name: &str| servers.iter().position(|s| s.name == name);
    let pairs: Vec<(usize, usize)> = servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name.starts_with("proxy"))
        .filter_map(|(i, s)| {
            let ceiling = if s.name.contains("SoftHSM") {
                find(CEILING_HSM)?
            } else {
                find("null")?
            };
            Some((i, ceiling))
        })
        .collect();
    if pairs.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nServer CPU per request as a multiple of the same-run ceiling (software: the null server; SoftHSM: the ceiling server, null + the same PKCS#11 calls inline), median of per-round ratios:\n\n| figure |",
    );
    for &(i, c) in &pairs {
        let _ = write!(md, " {} ÷ {} |", servers[i].name, servers[c].name);
    }
    md.push_str("\n|---|");
    for _ in &pairs {
        md.push_str("---:|");
    }
    md.push('\n');
    for (sc, row) in scenarios.iter().zip(cells) {
        if sc.op != OpArg::Encrypt
            || sc.rate.is_some()
            || sc.new_connection
            || sc.http2_connections.is_some()
        {
            continue;
        }
        let _ = write!(md, "| {} |", sc.key);
        for &(i, c) in &pairs {
            let ratio = median(
                row[i]
                    .reports
                    .iter()
                    .zip(&row[c].reports)
                    .map(|(p, n)| cpu(p) / cpu(n))
                    .collect(),
            );
            let _ = write!(md, " {ratio:.2}× |");
        }
        md.push('\n');
    }
    md
}

/// The README table: each figure for the null server and each proxy, with the ratio.
fn summary(
    a: &FiguresArgs,
    machine: &str,
    load: (f64, f64),
    servers: &[Server],
    scenarios: &[Scenario],
    cells: &[Vec<Cell>],
    loops: Option<(f64, f64)>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {machine}. {} round(s) of {:.0} s runs after {:.0} s warm-up; servers pinned to CPU(s) `{}`; load average {:.1} at start, {:.1} at end.\n",
        a.rounds, a.duration, a.warmup, a.server_cpus, load.0, load.1
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
    for (sc, row) in scenarios.iter().zip(cells) {
        let Some(null) = row.first() else { continue };
        if sc.rate.is_some() {
            // Median over the rounds of each round's percentile (`round_median`): one
            // round that collides with another session's build must not decide the
            // figure (the plot shows the merged histograms, tail included).
            let pct = round_median;
            let _ = write!(md, "| {} p50 / p99 / p99.9 ms (server µs/req) |", sc.key);
            for c in row {
                let _ = write!(
                    md,
                    " {:.2} / {:.2} / {:.2} ({:.0}){} |",
                    pct(c, |l| l.p50_ms),
                    pct(c, |l| l.p99_ms),
                    pct(c, |l| l.p99_9_ms),
                    median(c.reports.iter().map(cpu).collect()),
                    errors_note(&c.reports)
                );
            }
            for c in row.iter().skip(1) {
                let _ = write!(
                    md,
                    " p99 {:.1}× |",
                    pct(c, |l| l.p99_ms) / pct(null, |l| l.p99_ms)
                );
            }
        } else {
            let _ = write!(md, "| {} rps (server µs CPU/req) |", sc.key);
            for c in row {
                let _ = write!(
                    md,
                    " {:.0} ({:.1}){} |",
                    median(c.reports.iter().map(|r| r.throughput_rps).collect()),
                    median(c.reports.iter().map(cpu).collect()),
                    errors_note(&c.reports)
                );
            }
            for c in row.iter().skip(1) {
                let rps = median(
                    c.reports
                        .iter()
                        .zip(&null.reports)
                        .map(|(p, n)| p.throughput_rps / n.throughput_rps)
                        .collect(),
                );
                let cpu_ratio = median(
                    c.reports
                        .iter()
                        .zip(&null.reports)
                        .map(|(p, n)| cpu(n) / cpu(p))
                        .collect(),
                );
                let _ = write!(md, " {rps:.2} (CPU {cpu_ratio:.2}) |");
            }
        }
        md.push('\n');
    }
    // RSS: idle (before any load) and the most seen under load across the suite.
    let _ = write!(md, "| RSS idle / max under load (MiB) |");
    for (i, s) in servers.iter().enumerate() {
        let peak = cells
            .iter()
            .flat_map(|row| row[i].reports.iter())
            .map(|r| r.server.as_ref().map_or(0, |s| s.rss_max_kib))
            .max()
            .unwrap_or(0);
        let _ = write!(
            md,
            " {:.1} / {:.1} |",
            s.idle_rss_kib as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    for _ in servers.iter().skip(1) {
        md.push_str(" |");
    }
    md.push('\n');
    if let Some((enc, enc_dec)) = loops {
        let hsm = servers
            .iter()
            .position(|s| s.name.starts_with("proxy") && s.name.contains("SoftHSM"));
        let best = hsm
            .and_then(|i| {
                scenarios
                    .iter()
                    .zip(cells)
                    .filter(|(sc, _)| {
                        sc.op == OpArg::Encrypt
                            && sc.rate.is_none()
                            && !sc.new_connection
                            && sc.http2_connections.is_none()
                    })
                    .map(|(_, row)| {
                        median(row[i].reports.iter().map(|r| r.throughput_rps).collect())
                    })
                    .max_by(f64::total_cmp)
            })
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "\nPlain SoftHSM loop in-process on the server CPU (1 thread, cached key handle, 32 B): {enc:.0} encrypts/s; {enc_dec:.0} encrypt+decrypt/s (the HSM work of one Encrypt with CDIV, which verify-decrypts). Best proxy (SoftHSM) Encrypt rate above: {best:.0}/s = {:.2}× the encrypt+decrypt loop ({:.2}× the encrypt-only loop).",
            best / enc_dec,
            best / enc
        );
    }
    md.push_str(&ceiling_ratios(servers, scenarios, cells));
    md.push_str(&tail_latency(servers, scenarios, cells));
    md.push_str("\nEvery run:\n\n");
    md.push_str(&report::markdown_header());
    for row in cells {
        for c in row {
            for r in &c.reports {
                md.push_str(&report::markdown_row(r));
            }
        }
    }
    md
}

/// Issue 15 §5: p50 / p99 / p99.9 of every proxy at KMS's default quota (open loop)
/// and one request at a time, each the median over the rounds of that round's
/// percentile, against the 2 ms target (both backends at the quota; the software
/// keystore at c=1).
fn tail_latency(servers: &[Server], scenarios: &[Scenario], cells: &[Vec<Cell>]) -> String {
    const TARGET_MS: f64 = 2.0;
    let pct = round_median;
    let mut md = String::from(
        "\nTail latency (ms, p50 / p99 / p99.9; target p99.9 ≤ 2 ms at the quota on both backends, and at c=1 on the software keystore):\n\n| figure | server | p50 / p99 / p99.9 ms | p99.9 ≤ 2 ms |\n|---|---|---:|---|\n",
    );
    for (sc, row) in scenarios.iter().zip(cells) {
        let c1 = sc.op == OpArg::Encrypt
            && sc.concurrency == 1
            && sc.rate.is_none()
            && !sc.no_cdiv
            && !sc.new_connection;
        if sc.rate.is_none() && !c1 {
            continue;
        }
        for (s, c) in servers.iter().zip(row) {
            if !s.name.starts_with("proxy") {
                continue;
            }
            let p999 = pct(c, |l| l.p99_9_ms);
            let targeted = sc.rate.is_some() || !s.name.contains("SoftHSM");
            let verdict = match (targeted, p999 <= TARGET_MS) {
                (false, _) => "(no target)",
                (true, true) => "met",
                (true, false) => "**not met**",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} / {:.2} / {:.2}{} | {verdict} |",
                sc.key,
                s.name,
                pct(c, |l| l.p50_ms),
                pct(c, |l| l.p99_ms),
                p999,
                errors_note(&c.reports),
            );
        }
    }
    md
}

/// One `benches/idle.sh` run: `--idle-connections` idle keep-alive connections held
/// against the real `xks-proxy` binary (software keystore, its allocator), its RSS
/// before, holding and after they close, as `hold.json` reports it.
fn idle_memory(a: &FiguresArgs, http2: bool) -> Result<serde_json::Value> {
    let proxy = if a.idle_proxy.is_absolute() {
        a.idle_proxy.clone()
    } else {
        repo_file(&a.idle_proxy.to_string_lossy())
    };
    anyhow::ensure!(
        proxy.is_file(),
        "{} is missing: build it with `cargo build --release --features bench --bins`, or pass --idle-proxy",
        proxy.display()
    );
    let exe = std::env::current_exe().context("locating xks-bench")?;
    let out = a.out.join(if http2 { "idle-http2" } else { "idle-http1" });
    eprintln!(
        "memory: {} idle HTTP/{} connections against {}",
        a.idle_connections,
        if http2 { "2" } else { "1.1" },
        proxy.display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(repo_file("benches/idle.sh"))
        .arg(&proxy)
        .arg(&exe)
        .arg(&out)
        .arg(a.idle_connections.to_string())
        .arg("3")
        .stdout(Stdio::null());
    if http2 {
        cmd.env("HTTP2", "1");
    }
    let status = cmd.status().context("running benches/idle.sh")?;
    anyhow::ensure!(status.success(), "benches/idle.sh failed ({status})");
    let json = std::fs::read_to_string(out.join("hold.json"))
        .with_context(|| format!("reading {}", out.join("hold.json").display()))?;
    Ok(serde_json::from_str(&json)?)
}

/// Issue 15 §4: RSS per idle connection and whether it is given back, per HTTP version.
fn idle_table(a: &FiguresArgs, runs: &[serde_json::Value]) -> String {
    const TARGET_KIB: f64 = 12.0;
    let mib = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("–".to_owned(), |k| format!("{:.1}", k / 1024.0))
    };
    let mut md = format!(
        "\nMemory per idle keep-alive TLS connection (`xks-proxy` at {}, software keystore; {} connections, each carried one signed request; target ≤ 12 KiB, so 10 000 stay under 150 MiB, and RSS back near idle after they close):\n\n| HTTP | held | RSS before / holding / after close / 15 s later MiB | KiB per idle connection | ≤ 12 KiB | new client ok / errors |\n|---|---:|---:|---:|---|---:|\n",
        a.idle_proxy.display(),
        a.idle_connections
    );
    for r in runs {
        let per = r["kib_per_idle_connection"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {} | {} of {} | {} / {} / {} / {} | {per:.1} | {} | {} / {} |",
            r["http"].as_str().unwrap_or("?"),
            r["held"],
            r["asked"],
            mib(&r["rss_before_kib"]),
            mib(&r["rss_held_kib"]),
            mib(&r["rss_after_close_kib"]),
            mib(&r["rss_late_after_close_kib"]),
            if per <= TARGET_KIB {
                "met"
            } else {
                "**not met**"
            },
            r["new_client"]["requests_ok"],
            r["new_client"]["errors"],
        );
    }
    md
}

/// A latency percentile of a cell: the median over the rounds of each round's value.
fn round_median(c: &Cell, f: fn(&report::Latency) -> f64) -> f64 {
    median(
        c.reports
            .iter()
            .filter_map(|r| r.latency.as_ref().map(f))
            .collect(),
    )
}

fn errors_note(reports: &[Report]) -> String {
    let n: u64 = reports.iter().map(|r| r.errors).sum();
    if n == 0 {
        String::new()
    } else {
        format!(" ⚠ {n} errors")
    }
}
