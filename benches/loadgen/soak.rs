//! `xks-bench soak`: nothing lost. GenerateDataKey + Decrypt round trips through the
//! real `kms-emulator` and `xks-proxy` binaries (software keystore or a PKCS#11 token),
//! with the proxy restarted once midway while the load keeps running.
//!
//! The scenario:
//! 1. A proxy config in a work directory (`servers::bench_proxy_config`: fixed loopback
//!    port, dev certificate), the proxy started, then the emulator dialling it for
//!    `xks.test.example`. Through the emulator's KMS API: CreateCustomKeyStore
//!    (EXTERNAL_KEY_STORE, PUBLIC_ENDPOINT), ConnectCustomKeyStore, CreateKey with
//!    Origin EXTERNAL_KEY_STORE.
//! 2. `--concurrency` workers, each round trip: GenerateDataKey with an encryption
//!    context naming the round trip; keep the CiphertextBlob and the SHA-256 of the
//!    Plaintext; Decrypt an *earlier* ciphertext (half the time one of the most recent,
//!    half the time one of a uniform sample of everything made so far) and compare the
//!    plaintext's hash. A different plaintext is a mismatch; a failed call is a failure.
//! 3. At `--restart-at` of the round trips: SIGTERM to the proxy, wait for its exit,
//!    start it again on the same config, port and key manager (the emulator keeps
//!    running and keeps its pooled connections to fail over by itself). Calls that
//!    fail inside the restart window — from the SIGTERM until `--restart-grace-ms`
//!    after the new proxy listens — with what KMS says of a proxy that is gone or slow
//!    are retried with backoff and counted as retried, never as lost. Any other error,
//!    and any error outside the window, is a failure.
//! 4. At the end, every ciphertext of the sample taken when the restart began is
//!    decrypted again (by the new proxy), and so are the post-restart ones of the final
//!    sample.
//!
//! The RSS of each server is sampled every second: the old proxy's start, peak and end,
//! the new proxy's, the emulator's, and a trajectory by tenths of the run (flat is the
//! claim). The command fails (exit 1) unless every round trip completed with no
//! mismatch, no failure, no failed re-decrypt, and both proxies and the emulator
//! stopped cleanly on SIGTERM.
//!
//! Here: the command, the setup, the load's orchestration, the restart and the RSS
//! sampler. `soak/load.rs`: the round trips, the ciphertext pool, the restart window
//! and which errors are retried; `soak/child.rs`: the servers as child processes;
//! `soak/report.rs`: the report and the verdict.

mod child;
mod load;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use xks_proxy::config::TlsConfig;

use crate::cli::{SoakArgs, SoakBackend};
use crate::kms::{CallError, KmsClient};
use crate::report::load_average;
use crate::runner::new_histogram;
use crate::servers::{BENCH_KEY, BenchBackend, bench_proxy_config, repo_file};
use child::{LogTally, Managed};
use load::{Counters, Made, Pool, RestartWindow, Shared, Tallies, redecrypt_all, worker};
use report::{
    FinalCheck, Memory, RestartReport, Rss, RssPoint, build_report, exit_text, exited_cleanly,
    markdown,
};

/// The proxy's endpoint as the key store names it; the emulator dials our port for it.
const XKS_HOST: &str = "xks.test.example";
/// The proxy's path prefix (XksProxyUriPath = PREFIX/kms/xks/v1).
const PREFIX: &str = "/soak";
/// The emulator's Region (its default).
const REGION: &str = "us-east-1";
/// The environment variable the proxy reads the token PIN from.
const PIN_ENV: &str = "XKS_SOAK_HSM_PIN";

/// `name` next to this executable (cargo puts every binary of the package together).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating xks-bench")?;
    Ok(exe.with_file_name(name))
}

/// Everything needed to start the proxy, the first time and after the restart.
struct ProxyLauncher {
    bin: PathBuf,
    config: PathBuf,
    /// The proxy's fixed address (the same after the restart).
    listen: SocketAddr,
    env: Vec<(String, String)>,
    log_filter: String,
}

impl ProxyLauncher {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn start(&self, name: &str) -> Result<Managed> {
        Managed::spawn_listening(name, self.command(), self.listen)
    }

    /// `xks-proxy keys create` (on a token it also makes the health-check key).
    fn create_key(&self, label: &str) -> Result<()> {
        let out = Command::new(&self.bin)
            .args([
                "keys",
                "create",
                "--label",
                label,
                "--usage",
                "encrypt,decrypt",
            ])
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .context("running xks-proxy keys create")?;
        anyhow::ensure!(
            out.status.success(),
            "xks-proxy keys create --label {label}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

/// The proxy side, prepared: how to start it, its external key and KMS's credential.
struct ProxySetup {
    launcher: ProxyLauncher,
    /// The external key id (XksKeyId; CKA_LABEL on a token).
    key: String,
    access_key_id: String,
    secret_file: PathBuf,
}

/// A directory removed when dropped (unless the user named it).
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A loopback port free right now. The proxy binds it, and binds it again after the
/// restart: the emulator's `--xks-resolve` mapping is fixed at its start, as a real
/// proxy's address is fixed in DNS.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

// --- The command ------------------------------------------------------------------------

pub fn soak(args: &SoakArgs) -> Result<()> {
    anyhow::ensure!(args.round_trips > 0, "--round-trips must be positive");
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be 1..=1024"
    );
    anyhow::ensure!(
        args.no_restart || (args.restart_at > 0.0 && args.restart_at < 1.0),
        "--restart-at must be in (0, 1)"
    );
    anyhow::ensure!(args.sample > 0, "--sample must be positive");
    anyhow::ensure!(
        args.max_minutes > 0.0 && args.max_minutes <= 24.0 * 60.0,
        "--max-minutes must be in (0, 1440]"
    );
    let proxy_bin = match &args.proxy_bin {
        Some(p) => p.clone(),
        None => sibling("xks-proxy")?,
    };
    let emulator_bin = match &args.emulator_bin {
        Some(p) => p.clone(),
        None => sibling("kms-emulator")?,
    };
    for b in [&proxy_bin, &emulator_bin] {
        anyhow::ensure!(
            b.is_file(),
            "{} not found (cargo build --release --features bench --bins, or --proxy-bin/--emulator-bin)",
            b.display()
        );
    }
    let work = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            WorkDir {
                path: d.clone(),
                remove: false,
            }
        }
        None => {
            let d = std::env::temp_dir().join(format!("xks-bench-soak-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d)?;
            WorkDir {
                path: d,
                remove: true,
            }
        }
    };
    let setup = prepare_proxy(args, &work.path, &proxy_bin)?;
    let port = setup.launcher.listen.port();
    let key_label = setup.key.clone();

    let load_start = load_average();
    let machine = crate::figures::machine();
    if !args.quiet {
        eprintln!(
            "soak: {} round trips at c={} on {:?}; machine: {machine}; load average {load_start:.2}",
            args.round_trips, args.concurrency, args.backend
        );
    }
    let proxy = setup.launcher.start("xks-proxy")?;
    let mut emulator_cmd = Command::new(&emulator_bin);
    emulator_cmd
        .args(["--listen", "127.0.0.1:0"])
        .arg("--xks-ca-bundle")
        .arg(repo_file("certs/ca.pem"))
        .arg("--xks-resolve")
        .arg(format!("{XKS_HOST}=127.0.0.1:{port}"))
        .args(["--xks-store-rps", &args.store_rps.to_string()])
        .args(["--xks-timeout-ms", &args.xks_timeout_ms.to_string()])
        .args(["--region", REGION])
        .env("RUST_LOG", &args.server_log)
        .env("NO_COLOR", "1")
        .env_remove("KMS_EMULATOR_XKS_RESOLVE")
        .env_remove("KMS_EMULATOR_DATA_DIR");
    let (emulator, emulator_addr) =
        Managed::spawn_announced("kms-emulator", emulator_cmd, "listening on http://")?;

    let rt = crate::client_runtime()?;
    let outcome = rt.block_on(run_load(args, setup, proxy, emulator, &emulator_addr))?;
    let load_end = load_average();

    let report = build_report(args, outcome, machine, (load_start, load_end), &key_label);
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{text}");
    } else {
        print!("{}", markdown(&report));
    }
    drop(work);
    if !report.nothing_lost {
        bail!("soak failed: {}", report.problems.join("; "));
    }
    Ok(())
}

/// Writes the proxy config (and for the software keystore the keystore with its key;
/// for a token, creates the key).
fn prepare_proxy(args: &SoakArgs, dir: &Path, bin: &Path) -> Result<ProxySetup> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let tls = TlsConfig::Files {
        certificate: repo_file("certs/server-ecdsa.pem"),
        private_key: repo_file("certs/server-ecdsa.key"),
    };
    let mut env = Vec::new();
    let backend = match args.backend {
        SoakBackend::Software => BenchBackend::Software,
        SoakBackend::Softhsm => {
            let hint = "run eval \"$(tests/softhsm/setup.sh \"$PWD/target/soak-softhsm\" xks-soak)\" first";
            let module = args
                .pkcs11_module
                .clone()
                .with_context(|| format!("--backend softhsm needs --pkcs11-module ({hint})"))?;
            let token_label = args
                .token_label
                .clone()
                .with_context(|| format!("--backend softhsm needs --token-label ({hint})"))?;
            let pin = args
                .pin
                .clone()
                .with_context(|| format!("--backend softhsm needs --pin ({hint})"))?;
            env.push((PIN_ENV.to_owned(), pin));
            BenchBackend::Pkcs11 {
                module,
                token_label,
                pin_env: PIN_ENV.to_owned(),
            }
        }
    };
    let (_, access_key_id) = bench_proxy_config(dir, listen, PREFIX, &tls, &backend)?;
    let launcher = ProxyLauncher {
        bin: bin.to_owned(),
        config: dir.join("proxy.toml"),
        listen,
        env,
        log_filter: args.server_log.clone(),
    };
    let key = match (args.backend, &args.key_label) {
        (SoakBackend::Software, None) => BENCH_KEY.to_owned(),
        (SoakBackend::Software, Some(label)) => {
            launcher.create_key(label)?;
            label.clone()
        }
        (SoakBackend::Softhsm, label) => {
            let label = label.clone().unwrap_or_else(|| {
                let secs = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("soak-{}-{secs}", std::process::id())
            });
            launcher.create_key(&label)?;
            label
        }
    };
    Ok(ProxySetup {
        launcher,
        key,
        access_key_id,
        // bench_proxy_config writes the secret beside the config.
        secret_file: dir.join("secret"),
    })
}

/// Connected store and key through the KMS API; returns the key's ARN.
async fn setup_kms(kms: &KmsClient, secret_file: &Path, akid: &str, key: &str) -> Result<String> {
    let secret = std::fs::read_to_string(secret_file)
        .with_context(|| format!("reading {}", secret_file.display()))?;
    let kms_err = |op: &'static str| move |e: CallError| anyhow::anyhow!("{op}: {e}");
    let created = kms
        .call(
            "CreateCustomKeyStore",
            &json!({
                "CustomKeyStoreName": format!("xks-bench-soak-{}", std::process::id()),
                "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                "XksProxyUriEndpoint": format!("https://{XKS_HOST}"),
                "XksProxyUriPath": format!("{PREFIX}/kms/xks/v1"),
                "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                "XksProxyAuthenticationCredential": {
                    "AccessKeyId": akid,
                    "RawSecretAccessKey": secret.trim(),
                },
            }),
        )
        .await
        .map_err(kms_err("CreateCustomKeyStore"))?;
    let store = created["CustomKeyStoreId"]
        .as_str()
        .context("CreateCustomKeyStore returned no id")?
        .to_owned();
    kms.call("ConnectCustomKeyStore", &json!({"CustomKeyStoreId": store}))
        .await
        .map_err(kms_err("ConnectCustomKeyStore"))?;
    // Bounded: 600 × 50 ms.
    let mut state = Value::Null;
    for _ in 0..600 {
        let d = kms
            .call(
                "DescribeCustomKeyStores",
                &json!({"CustomKeyStoreId": store}),
            )
            .await
            .map_err(kms_err("DescribeCustomKeyStores"))?;
        state = d["CustomKeyStores"][0].clone();
        if state["ConnectionState"] != "CONNECTING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(
        state["ConnectionState"] == "CONNECTED",
        "the key store did not connect: {state}"
    );
    let made = kms
        .call(
            "CreateKey",
            &json!({
                "Origin": "EXTERNAL_KEY_STORE",
                "CustomKeyStoreId": store,
                "XksKeyId": key,
                "Description": "xks-bench soak",
            }),
        )
        .await
        .map_err(kms_err("CreateKey"))?;
    made["KeyMetadata"]["Arn"]
        .as_str()
        .map(str::to_owned)
        .context("CreateKey returned no Arn")
}

/// Everything the load phase produced.
struct Outcome {
    shared: Arc<Shared>,
    elapsed: Duration,
    generate: Histogram<u64>,
    decrypt: Histogram<u64>,
    restart: Option<RestartReport>,
    restart_error: Option<String>,
    final_check: FinalCheck,
    memory: Memory,
    proxy_logs: Vec<LogTally>,
    emulator_log: LogTally,
    final_proxy_exit: Result<(ExitStatus, Duration)>,
    emulator_exit: Result<(ExitStatus, Duration)>,
}

async fn run_load(
    args: &SoakArgs,
    setup: ProxySetup,
    proxy: Managed,
    mut emulator: Managed,
    emulator_addr: &str,
) -> Result<Outcome> {
    let kms = KmsClient::new(
        &format!("http://{emulator_addr}"),
        REGION,
        Duration::from_millis(args.request_timeout_ms),
        args.concurrency,
    )?;
    let key_arn = setup_kms(&kms, &setup.secret_file, &setup.access_key_id, &setup.key).await?;
    let launcher = setup.launcher;

    let n = args.round_trips;
    let restart_after = if args.no_restart {
        None
    } else {
        Some(((n as f64 * args.restart_at).round() as u64).clamp(1, n))
    };
    let clock = Instant::now();
    let shared = Arc::new(Shared {
        kms,
        key_arn,
        // In every encryption context: this run's ciphertexts are its own.
        run_id: format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        n,
        next: AtomicU64::new(0),
        counters: Counters::default(),
        tallies: Mutex::new(Tallies::default()),
        pool: Mutex::new(Pool::new(args.sample)),
        window: RestartWindow::new(),
        restart_after,
        restart_due: tokio::sync::Notify::new(),
        clock,
        deadline: clock + Duration::from_secs_f64(args.max_minutes * 60.0),
        stop: AtomicBool::new(false),
    });
    let memory = Arc::new(Mutex::new(Memory {
        proxy_before: Rss::begin(proxy.pid),
        proxy_after: None,
        emulator: Rss::begin(emulator.pid),
        generator: Rss::begin(std::process::id()),
        series: Vec::new(),
    }));
    // The pid the sampler reads (0 while the proxy restarts).
    let proxy_pid = Arc::new(AtomicU32::new(proxy.pid));
    let proxy_logs = Arc::new(Mutex::new(Vec::new()));

    let sampler = tokio::spawn(sample_memory(
        Arc::clone(&shared),
        Arc::clone(&memory),
        Arc::clone(&proxy_pid),
        args.quiet,
    ));
    let grace = Duration::from_millis(args.restart_grace_ms);
    let mut controller = {
        let shared = Arc::clone(&shared);
        let memory = Arc::clone(&memory);
        let proxy_pid = Arc::clone(&proxy_pid);
        let proxy_logs = Arc::clone(&proxy_logs);
        let quiet = args.quiet;
        tokio::spawn(async move {
            if shared.restart_after.is_none() {
                return Ok::<_, anyhow::Error>((proxy, None));
            }
            shared.restart_due.notified().await;
            let s = Arc::clone(&shared);
            tokio::task::spawn_blocking(move || {
                let steps = Restart {
                    shared: &s,
                    launcher: &launcher,
                    memory: &memory,
                    proxy_pid: &proxy_pid,
                    proxy_logs: &proxy_logs,
                    grace,
                    quiet,
                };
                steps.run(proxy)
            })
            .await
            .context("the restart thread")?
            .map(|(p, r)| (p, Some(r)))
        })
    };

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        workers.spawn(worker(Arc::clone(&shared)));
    }
    let mut generate = new_histogram();
    let mut decrypt = new_histogram();
    let mut restart_result = None;
    // Until every worker is done; a failed restart stops them claiming more work.
    loop {
        tokio::select! {
            r = &mut controller, if restart_result.is_none() => {
                let r = r.context("the restart task").and_then(|r| r);
                if r.is_err() {
                    shared.stop.store(true, Ordering::Relaxed);
                }
                restart_result = Some(r);
            }
            w = workers.join_next() => match w {
                Some(Ok(stats)) => {
                    let _ = generate.add(&stats.generate);
                    let _ = decrypt.add(&stats.decrypt);
                }
                Some(Err(e)) => bail!("a worker panicked: {e}"),
                None => break,
            },
        }
    }
    let elapsed = clock.elapsed();
    let reached = shared
        .restart_after
        .is_none_or(|at| shared.counters.done.load(Ordering::Acquire) >= at);
    let restart_result = match restart_result {
        Some(r) => r,
        // The restart is running or done: wait for it.
        None if reached => controller.await.context("the restart task").and_then(|r| r),
        // Stopped before the restart point (deadline): the proxy goes with the task.
        None => {
            controller.abort();
            Err(anyhow::anyhow!(
                "stopped after {} round trips, before the restart point",
                shared.counters.done.load(Ordering::Acquire)
            ))
        }
    };
    let (mut proxy, restart, snapshot, restart_error) = match restart_result {
        Ok((p, Some((r, snap)))) => (Some(p), Some(r), Some(snap), None),
        Ok((p, None)) => (Some(p), None, None, None),
        Err(e) => (None, None, None, Some(format!("{e:#}"))),
    };

    // The final check: the sample taken when the restart began, then the post-restart
    // part of the final sample, all decrypted again by the (new) proxy.
    let (before, after): (Vec<Made>, Vec<Made>) = {
        let pool = shared
            .pool
            .lock()
            .map_err(|_| anyhow::anyhow!("pool lock"))?;
        let before = snapshot.unwrap_or_else(|| pool.sample.clone());
        let after = if restart.is_some() {
            pool.sample
                .iter()
                .filter(|m| !m.before_restart)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        (before, after)
    };
    if !args.quiet {
        eprintln!(
            "soak: load done in {:.1} s; decrypting again {} ciphertexts from before the restart and {} from after",
            elapsed.as_secs_f64(),
            before.len(),
            after.len()
        );
    }
    let mut final_check = FinalCheck {
        before_restart: before.len() as u64,
        before_restart_ok: 0,
        after_restart: after.len() as u64,
        after_restart_ok: 0,
    };
    if proxy.is_some() {
        final_check.before_restart_ok = redecrypt_all(&shared, before, args.concurrency).await;
        final_check.after_restart_ok = redecrypt_all(&shared, after, args.concurrency).await;
    }
    sampler.abort();
    let _ = sampler.await;

    // End figures, then a clean stop of both servers.
    let mut memory = memory
        .lock()
        .map_err(|_| anyhow::anyhow!("memory lock"))?
        .clone();
    match memory.proxy_after.as_mut() {
        Some(r) => r.finish(),
        None => memory.proxy_before.finish(),
    }
    memory.emulator.finish();
    memory.generator.finish();
    let final_proxy_exit = match proxy.as_mut() {
        Some(p) => {
            let exit = tokio::task::block_in_place(|| p.terminate());
            if let Ok(mut logs) = proxy_logs.lock() {
                logs.push(p.tally());
            }
            exit
        }
        None => Err(anyhow::anyhow!("no proxy running at the end")),
    };
    let emulator_exit = tokio::task::block_in_place(|| emulator.terminate());
    let emulator_log = emulator.tally();
    let proxy_logs = proxy_logs.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Outcome {
        shared,
        elapsed,
        generate,
        decrypt,
        restart,
        restart_error,
        final_check,
        memory,
        proxy_logs,
        emulator_log,
        final_proxy_exit,
        emulator_exit,
    })
}

// --- The restart --------------------------------------------------------------------------

/// The restart, run on a blocking thread while the workers keep sending.
struct Restart<'a> {
    shared: &'a Shared,
    launcher: &'a ProxyLauncher,
    memory: &'a Mutex<Memory>,
    proxy_pid: &'a AtomicU32,
    proxy_logs: &'a Mutex<Vec<LogTally>>,
    grace: Duration,
    quiet: bool,
}

impl Restart<'_> {
    /// SIGTERM → exit → start again. Returns the new proxy, the facts, and the sample of
    /// pre-restart ciphertexts to decrypt again at the end.
    fn run(self, mut old: Managed) -> Result<(Managed, (RestartReport, Vec<Made>))> {
        let shared = self.shared;
        let at = shared.counters.done.load(Ordering::Acquire);
        // The old proxy's figures, just before it stops serving.
        if let Ok(mut m) = self.memory.lock() {
            m.proxy_before.finish();
        }
        let snapshot: Vec<Made> = shared
            .pool
            .lock()
            .map(|p| p.sample.clone())
            .unwrap_or_default();
        if !self.quiet {
            eprintln!(
                "soak: restarting the proxy (pid {}) after {at} round trips",
                old.pid
            );
        }
        self.proxy_pid.store(0, Ordering::Release);
        let t0 = Instant::now();
        shared.window.open(shared.now_us());
        let exit = old.terminate();
        let drain = t0.elapsed();
        if let Ok(mut logs) = self.proxy_logs.lock() {
            logs.push(old.tally());
        }
        let old_exit = exit_text(&exit);
        let clean = exited_cleanly(&exit);
        drop(old);
        exit?;
        let new = self.launcher.start("xks-proxy (restarted)")?;
        let ready_us = shared.now_us();
        let downtime = t0.elapsed();
        shared.window.ready(ready_us, self.grace);
        if let Ok(mut m) = self.memory.lock() {
            m.proxy_after = Some(Rss::begin(new.pid));
        }
        self.proxy_pid.store(new.pid, Ordering::Release);
        if !self.quiet {
            eprintln!(
                "soak: old proxy {old_exit} (drain {:.0} ms); new proxy pid {} listening {:.0} ms after SIGTERM",
                drain.as_secs_f64() * 1000.0,
                new.pid,
                downtime.as_secs_f64() * 1000.0
            );
        }
        let report = RestartReport {
            at_round_trip: at,
            drain_ms: drain.as_secs_f64() * 1000.0,
            downtime_ms: downtime.as_secs_f64() * 1000.0,
            old_proxy_exit: old_exit,
            old_proxy_exited_cleanly: clean,
            sampled_before: snapshot.len(),
        };
        Ok((new, (report, snapshot)))
    }
}

/// Every second: RSS of the proxy (whichever runs), the emulator and this process, and
/// a progress line every 10 s. Runs until aborted.
async fn sample_memory(
    shared: Arc<Shared>,
    memory: Arc<Mutex<Memory>>,
    proxy_pid: Arc<AtomicU32>,
    quiet: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_progress = Instant::now();
    // Until aborted by the load's end.
    loop {
        tick.tick().await;
        let Some(point) = memory_point(&shared, &memory, &proxy_pid) else {
            continue;
        };
        if !quiet && last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let c = &shared.counters;
            eprintln!(
                "soak: {}/{} round trips ({:.0}/s), {} mismatches, {} failed, {} retried; RSS proxy {:.1} MiB, emulator {:.1} MiB",
                point.round_trips_done,
                shared.n,
                point.round_trips_done as f64 / point.elapsed_s.max(1e-9),
                c.mismatches.load(Ordering::Relaxed),
                c.failed_generate.load(Ordering::Relaxed)
                    + c.failed_decrypt.load(Ordering::Relaxed),
                c.retried_generate.load(Ordering::Relaxed)
                    + c.retried_decrypt.load(Ordering::Relaxed),
                point.proxy_kib as f64 / 1024.0,
                point.emulator_kib as f64 / 1024.0,
            );
        }
    }
}

/// Samples every process once and records the point.
fn memory_point(
    shared: &Shared,
    memory: &Mutex<Memory>,
    proxy_pid: &AtomicU32,
) -> Option<RssPoint> {
    let done = shared.counters.done.load(Ordering::Acquire);
    let pid = proxy_pid.load(Ordering::Acquire);
    let mut m = memory.lock().ok()?;
    let proxy_kib = match (pid, m.proxy_after.as_mut()) {
        (0, _) => 0,
        (pid, Some(after)) if after.pid == pid => after.sample(),
        _ => m.proxy_before.sample(),
    };
    let point = RssPoint {
        round_trips_done: done,
        elapsed_s: shared.clock.elapsed().as_secs_f64(),
        proxy_kib,
        emulator_kib: m.emulator.sample(),
        generator_kib: m.generator.sample(),
    };
    m.series.push(point.clone());
    Some(point)
}
