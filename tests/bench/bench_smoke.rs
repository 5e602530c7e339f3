//! Smoke test of the load generator (`xks-bench`, benches/loadgen/): it runs for about a
//! second against an in-process test proxy (tests/common) in each of its main modes and
//! must finish with zero errors and a well-formed JSON report. This checks the tool,
//! never a speed. The flood mode (unloaded run, then the same under unauthenticated
//! attackers) must finish with a well-formed report, every attacker kind must have
//! connected, and no forged request may ever be answered 200.

use crate::common;
use crate::harness;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{KEY, Options, PREFIX, TestProxy};

/// Runs `xks-bench` with `args`, killing it if it overruns `limit`; returns stdout.
fn xks_bench(args: &[&str], limit: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xks-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xks-bench");
    let deadline = Instant::now() + limit;
    // Bounded poll: the tool bounds itself; this only stops a hung one.
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        panic!("xks-bench {args:?} did not finish within {limit:?}");
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "xks-bench {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 report")
}

/// The report's invariants: zero errors, some successes, consistent counts and
/// ordered percentiles.
fn check_report(text: &str, expect_op: &str) -> Value {
    let r: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{text}"));
    assert_eq!(r["errors"], 0, "errors in {text}");
    assert_eq!(r["errors_by_name"], serde_json::json!({}), "{text}");
    let ok = r["requests_ok"].as_u64().expect("requests_ok");
    assert!(ok > 0, "no successful request: {text}");
    assert_eq!(r["shape"]["op"], expect_op);
    assert!(r["throughput_rps"].as_f64().expect("rps") > 0.0);
    assert!(r["elapsed_s"].as_f64().expect("elapsed") > 0.0);
    let l = &r["latency"];
    let p = |k: &str| {
        l[k].as_f64()
            .unwrap_or_else(|| panic!("latency.{k} in {text}"))
    };
    assert!(p("p50_ms") > 0.0);
    assert!(p("p50_ms") <= p("p90_ms") && p("p90_ms") <= p("p99_ms"));
    assert!(p("p99_ms") <= p("p99_9_ms") && p("p99_9_ms") <= p("max_ms"));
    assert!(r["client_cpu_us_per_request"].as_f64().is_some());
    r
}

fn target_args<'a>(url: &'a str, akid: &'a str, secret_file: &'a str, ca: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--url",
        url,
        "--prefix",
        PREFIX,
        "--key-id",
        KEY,
        "--access-key-id",
        akid,
        "--secret-file",
        secret_file,
        "--ca",
        ca,
        "--json",
        "--quiet",
        // Debug builds on a shared 2-core machine: generous, so only real failures fail.
        "--timeout-ms",
        "10000",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_bench_drives_a_proxy_with_zero_errors_and_reports_json() {
    let proxy = TestProxy::start(Options::default()).await;
    let url = proxy.base();
    let akid = proxy.creds[0].akid.clone();
    let secret_file = proxy.dir.path().join("secret0");
    assert!(secret_file.exists(), "tests/common writes secret0");
    let secret_file = secret_file.display().to_string();
    let ca = common::repo().join("certs/ca.pem").display().to_string();
    let plot = proxy.dir.path().join("latency.svg");
    let plot_arg = plot.display().to_string();
    let pid = std::process::id().to_string();

    let runs: Vec<(Vec<&str>, &str)> = vec![
        // Closed loop, every operation mixed (Decrypt checks plaintexts it encrypted),
        // with a plot and the server's CPU/RSS (the proxy runs in this process).
        (
            vec![
                "--op",
                "mix",
                "-c",
                "4",
                "--duration",
                "1",
                "--plot",
                &plot_arg,
                "--server-pid",
                &pid,
            ],
            "mix",
        ),
        // Open loop at a fixed rate over HTTP/2 with shared connections.
        (
            vec![
                "--op",
                "encrypt",
                "--rate",
                "100",
                "-c",
                "8",
                "--duration",
                "1",
                "--http2",
                "--connections",
                "2",
            ],
            "encrypt",
        ),
        // A new TLS connection for every request.
        (
            vec![
                "--op",
                "health",
                "-c",
                "2",
                "--duration",
                "0.5",
                "--new-connection",
            ],
            "health",
        ),
        // A request-count bound.
        (
            vec![
                "--op",
                "decrypt",
                "-c",
                "2",
                "--requests",
                "20",
                "--duration",
                "30",
            ],
            "decrypt",
        ),
    ];
    for (extra, op) in runs {
        let mut args: Vec<String> = target_args(&url, &akid, &secret_file, &ca)
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            xks_bench(&args, Duration::from_secs(60))
        })
        .await
        .expect("join");
        let r = check_report(&out, op);
        if extra.contains(&"--requests") {
            assert_eq!(r["requests_ok"], 20, "exactly the requested count: {out}");
        }
        if extra.contains(&"--server-pid") {
            let server = &r["server"];
            assert!(server["cpu_us_per_request"].as_f64().is_some(), "{out}");
            assert!(server["rss_max_kib"].as_u64().expect("rss") > 0, "{out}");
        }
        if extra.contains(&"--rate") {
            assert_eq!(r["shape"]["mode"], "open");
            assert!(r["service_latency"]["p99_ms"].as_f64().is_some(), "{out}");
        }
    }
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("KMS timeout"),
        "an SVG with the timeout marked"
    );
    proxy.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_bench_flood_runs_every_attacker_and_reports_a_verdict() {
    let proxy = TestProxy::start(Options::default()).await;
    let url = proxy.base();
    let akid = proxy.creds[0].akid.clone();
    let secret_file = proxy.dir.path().join("secret0").display().to_string();
    let ca = common::repo().join("certs/ca.pem").display().to_string();
    let mut args: Vec<String> = target_args(&url, &akid, &secret_file, &ca)
        .into_iter()
        .map(str::to_owned)
        .collect();
    args[0] = "flood".to_owned();
    args.extend(
        [
            "--op",
            "encrypt",
            "-c",
            "2",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--attack-ramp",
            "0.3",
            "--settle",
            "0.1",
            "--attack",
            "fast-unsigned,slow-body,slow-head,idle",
            "--attack-http",
            "1.1,2",
            "--attack-connections",
            "8",
            "--attack-streams",
            "4",
            "--attack-sources",
            "2",
            "--attack-rate",
            "200",
            "--trickle-ms",
            "100",
        ]
        .map(str::to_owned),
    );
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        xks_bench(&args, Duration::from_secs(90))
    })
    .await
    .expect("join");
    let r: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{out}"));
    let rounds = r["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 1, "{out}");
    let round = &rounds[0];
    // Unloaded, the signed client must see no error at all.
    check_report(&round["unloaded"].to_string(), "encrypt");
    // Attacked: well-formed whatever the proxy did (no assertion about speed).
    let attacked = &round["attacked"];
    assert_eq!(attacked["shape"]["op"], "encrypt", "{out}");
    let ok = attacked["requests_ok"].as_u64().expect("requests_ok");
    let errors = attacked["errors"].as_u64().expect("errors");
    assert!(ok + errors > 0, "the signed client sent nothing: {out}");
    if let Some(l) = attacked.get("latency") {
        let p = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("latency.{k}"));
        assert!(
            p("p50_ms") <= p("p99_ms") && p("p99_ms") <= p("max_ms"),
            "{out}"
        );
    }
    assert!(round["ratio"].as_f64().expect("ratio") >= 0.0);
    // The signed client comes from 127.0.0.1, the attackers from 127.0.0.2 and .3.
    assert_eq!(r["client_source"], "127.0.0.1", "{out}");
    assert_eq!(
        r["attack"]["sources"],
        serde_json::json!(["127.0.0.2", "127.0.0.3"]),
        "{out}"
    );
    let groups = round["attackers"]["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 8, "4 kinds × 2 HTTP versions: {out}");
    let mut established = 0;
    for g in groups {
        assert!(g["connects"].as_u64().expect("connects") > 0, "{g}");
        established += g["established"].as_u64().expect("established");
        let answered = g["answered"].as_object().expect("answered");
        assert!(
            !answered.contains_key("200"),
            "a forged request got 200: {g}"
        );
        if g["kind"] == "fast-unsigned" {
            assert!(!answered.is_empty(), "fast-unsigned got no answer: {g}");
        }
    }
    assert!(established > 0, "{out}");
    let v = &r["verdict"];
    assert!(
        v["holds"].is_boolean() && v["ratio"].as_f64().is_some(),
        "{out}"
    );
    proxy.running.shutdown();
}

#[test]
fn null_server_answers_and_exits_when_its_parent_closes_stdin() {
    let (mut server, info) = start_server(&["null-server"]);
    let url = info["url"].as_str().expect("url").to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "any-secret-the-null-server-checks-nothing").expect("secret");
    let ca = common::repo().join("certs/ca.pem");
    let out = xks_bench(
        &[
            "run",
            "--url",
            &url,
            "--access-key-id",
            "AKIAXKSBENCHNULL2345",
            "--secret-file",
            path(&secret),
            "--ca",
            path(&ca),
            "--verify",
            "status",
            "--op",
            "encrypt",
            "-c",
            "2",
            "--duration",
            "0.5",
            "--json",
            "--quiet",
            "--timeout-ms",
            "10000",
        ],
        Duration::from_secs(60),
    );
    check_report(&out, "encrypt");
    // Closing stdin stops the server (how `figures` makes sure no server outlives it).
    let status = stop_server(&mut server, Duration::from_secs(20));
    assert!(status.is_some(), "null server did not exit on stdin EOF");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An `xks-bench` server (`args[0]`: `null-server`, `proxy-server`) as a child that
/// exits when its stdin closes (bounded by `--max-secs` too), and the JSON line it
/// announced itself with.
fn start_server(args: &[&str]) -> (Child, Value) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_xks-bench"))
        .arg(args[0])
        .args(["--exit-on-stdin-eof", "--max-secs", "120"])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", args[0]));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("announce line");
    let info: Value = serde_json::from_str(&line).expect("JSON announce line");
    (server, info)
}

/// Closes the server's stdin and waits up to `limit` for it to exit (killed if not).
fn stop_server(server: &mut Child, limit: Duration) -> Option<ExitStatus> {
    drop(server.stdin.take());
    let status = harness::wait_exit(server, limit);
    if status.is_none() {
        let _ = server.kill();
    }
    status
}

/// Issue 16 §2's benchmark is runnable: `proxy-server --audit-dir` serves with the
/// audit trail on, `run` drives it with zero errors, and the trail it leaves holds a
/// record per request and ends sealed (a tool check, never a speed).
#[test]
fn the_audit_on_proxy_server_records_every_request_of_a_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trail = dir.path().join("trail");
    let (mut server, info) = start_server(&[
        "proxy-server",
        "--log-level",
        "warn",
        "--audit-dir",
        path(&trail),
    ]);
    let s = |k: &str| info[k].as_str().expect(k).to_owned();
    let (url, prefix, key, akid, secret) = (
        s("url"),
        s("prefix"),
        s("key_id"),
        s("access_key_id"),
        s("secret_file"),
    );
    let ca = common::repo().join("certs/ca.pem");
    let out = xks_bench(
        &[
            "run",
            "--url",
            &url,
            "--prefix",
            &prefix,
            "--key-id",
            &key,
            "--access-key-id",
            &akid,
            "--secret-file",
            &secret,
            "--ca",
            path(&ca),
            "--op",
            "encrypt",
            "-c",
            "2",
            "--duration",
            "0.5",
            "--json",
            "--quiet",
            "--timeout-ms",
            "10000",
        ],
        Duration::from_secs(60),
    );
    let report = check_report(&out, "encrypt");
    let status = stop_server(&mut server, Duration::from_secs(30));
    assert!(status.is_some(), "proxy server did not exit on stdin EOF");
    let files = xks_proxy::audit::audit_files(&trail).expect("trail");
    let verified = xks_proxy::audit::verify(&files, None);
    assert!(verified.problem.is_none(), "{verified}");
    assert!(verified.ends_final, "{verified}");
    // Warm-up requests are recorded too, so at least as many as the report counts.
    let ok = report["requests_ok"].as_u64().expect("ok");
    assert!(verified.requests >= ok, "{} < {ok}", verified.requests);
}
