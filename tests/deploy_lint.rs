//! The deployment files in `deploy/` are checked by the tools operators and CI would use:
//! `systemd-analyze` (verify, security, sysusers), `xks-proxy config check` on every
//! shipped config, hadolint and shellcheck, kubernetes-validate, kubectl's kustomize and
//! checkov, cfn-lint and checkov — plus the properties each file promises (hardening
//! directives, /ping health checks, the fleet size following the replica count, the
//! KMS principal on the endpoint service, ...).
//!
//! Linters come from `target/deploy-venv` (`tests/deploy/install-tools.sh`). A missing
//! linter fails the test; the one exception is `systemd-analyze`, which the issue asks
//! for "when available": without it the unit is still checked directive by directive.

mod deploy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use deploy::*;
use serde_json::Value;

const MIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------- systemd

/// `[Section]` -> key -> values (keys may repeat, e.g. SystemCallFilter).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {}: not KEY=VALUE: {line}", n + 1));
        assert!(
            !section.is_empty(),
            "unit line {}: key outside a section",
            n + 1
        );
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    out
}

#[test]
fn systemd_unit_is_hardened() {
    let text = std::fs::read_to_string(deploy().join("systemd/xks-proxy.service")).expect("unit");
    let unit = parse_unit(&text);
    let service = &unit["Service"];
    let one = |k: &str| -> &str {
        let v = service
            .get(k)
            .unwrap_or_else(|| panic!("[Service] {k}= missing"));
        v.last().expect("value")
    };
    // A dedicated user, never root.
    assert_eq!(one("User"), "xks-proxy");
    assert_eq!(one("Group"), "xks-proxy");
    // Only CAP_NET_BIND_SERVICE, for :443.
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(k), v, "[Service] {k}");
    }
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!(
        nofile >= 65536,
        "LimitNOFILE={nofile}: raise it for many KMS connections"
    );
    // Reload = SIGHUP to the main process; start = serve with the config; refuse a bad
    // config before starting.
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(one("ExecStart").ends_with("xks-proxy serve --config /etc/xks-proxy/xks-proxy.toml"));
    assert!(one("ExecStartPre").contains("xks-proxy config check --config"));
    assert!(one("EnvironmentFile").starts_with("/etc/xks-proxy/"));
    // The drain (shutdown_grace_ms = 10 s) must fit in the stop timeout.
    let stop: u64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("seconds");
    assert!(
        stop > 10,
        "TimeoutStopSec={stop}s must exceed the 10 s drain"
    );
    assert_eq!(one("StateDirectory"), "xks-proxy");
    assert_eq!(
        unit["Install"]["WantedBy"],
        vec!["multi-user.target".to_owned()]
    );
}

/// The unit with ExecStart pointing at the binary this test built, so `verify` can
/// check the command exists.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(deploy().join("systemd/xks-proxy.service")).expect("unit");
    let text = text.replace("/usr/local/bin/xks-proxy", env!("CARGO_BIN_EXE_xks-proxy"));
    let path = dir.join("xks-proxy.service");
    std::fs::write(&path, text).expect("write unit");
    path
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = find_tool("systemd-analyze") else {
        // The issue asks for `systemd-analyze verify` "when available"; the directives
        // are still checked one by one in systemd_unit_is_hardened.
        eprintln!(
            "NOTE: systemd-analyze not found: unit checked by systemd_unit_is_hardened only ({INSTALL_HINT})"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let unit = unit_for_this_build(tmp.path());
    // `verify` exits 0 even for unknown keys or bad values, which it only prints: any
    // diagnostic about our file fails the test.
    let out = run(Command::new(&analyze).arg("verify").arg(&unit), MIN);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_us: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("xks-proxy.service"))
        .collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The hardening, scored by systemd itself: overall exposure at most 2.0 of 10 ("OK";
    // "UNSAFE" is 9+). --threshold is in tenths.
    let out = run(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(&unit),
        MIN,
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 2.0:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let level = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .expect("exposure line");
    eprintln!("{level}");
}

#[test]
fn systemd_sysusers_file_creates_the_service_user() {
    let Some(sysusers) = find_tool("systemd-sysusers") else {
        eprintln!("NOTE: systemd-sysusers not found; sysusers file not checked ({INSTALL_HINT})");
        return;
    };
    // Into a scratch root, never the host's /etc.
    let root = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(root.path().join("etc")).expect("etc");
    run_ok(
        Command::new(sysusers)
            .arg(format!("--root={}", root.path().display()))
            .arg(deploy().join("systemd/xks-proxy.sysusers")),
        MIN,
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("xks-proxy:"))
        .expect("xks-proxy user created");
    assert!(line.ends_with(":/usr/sbin/nologin"), "{line}");
    let uid: u32 = line.split(':').nth(2).expect("uid").parse().expect("uid");
    assert!(uid > 0 && uid < 1000, "a system user: uid {uid}");
}

// ------------------------------------------------------------- configs we ship in deploy/

/// The deploy configs name production paths; map them into a scratch root holding
/// the dev certificate, a keystore and secrets, as an operator's host would.
struct Scratch {
    dir: tempfile::TempDir,
}

const MASTER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242";

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tmp");
        let etc = dir.path().join("etc/xks-proxy");
        for d in ["tls", "secrets"] {
            std::fs::create_dir_all(etc.join(d)).expect("mkdir");
        }
        std::fs::create_dir_all(dir.path().join("var/lib/xks-proxy")).expect("mkdir");
        let certs = repo().join("certs");
        for (src, dst) in [
            ("server-ecdsa.pem", "fullchain.pem"),
            ("server-ecdsa.key", "privkey.pem"),
            ("server-ecdsa.pem", "tls.crt"),
            ("server-ecdsa.key", "tls.key"),
        ] {
            std::fs::copy(certs.join(src), etc.join("tls").join(dst)).expect("copy cert");
        }
        write_private(&etc.join("secrets/master-key"), MASTER_KEY);
        write_private(&etc.join("secrets/sigv4-secret-primary"), SECRET);
        Scratch { dir }
    }

    fn rewrite(&self, text: &str) -> String {
        let root = self.dir.path().display().to_string();
        text.replace("\"/etc/xks-proxy/", &format!("\"{root}/etc/xks-proxy/"))
            .replace(
                "\"/var/lib/xks-proxy/",
                &format!("\"{root}/var/lib/xks-proxy/"),
            )
    }

    fn proxy(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_xks-proxy"));
        c.env("XKS_MASTER_KEY", MASTER_KEY)
            .env("XKS_SECRET_PRIMARY", SECRET)
            .env_remove("XKS_PROXY_FLEET_SIZE");
        c
    }

    /// Writes `text` (rewritten) as a config, creates its keystore with one key, and
    /// runs `config check`; returns the check's output.
    fn check(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.rewrite(text)).expect("write config");
        let _ = std::fs::remove_file(self.dir.path().join("var/lib/xks-proxy/keystore.json"));
        run_ok(
            self.proxy()
                .args(["keys", "create", "--label", "app-key-1", "--config"])
                .arg(&path),
            MIN,
        );
        run_ok(
            self.proxy()
                .args(["config", "check", "--config"])
                .arg(&path),
            MIN,
        )
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[test]
fn every_deploy_config_passes_config_check() {
    let scratch = Scratch::new();
    let mut checked = Vec::new();
    for rel in [
        "systemd/xks-proxy.toml",
        "container/xks-proxy.toml",
        "kubernetes/xks-proxy.toml",
    ] {
        let text = std::fs::read_to_string(deploy().join(rel)).expect(rel);
        let out = scratch.check(&rel.replace('/', "-"), &text);
        assert!(out.contains("OK"), "{rel}: {out}");
        checked.push(rel);
    }
    // No TOML in deploy/ escapes the check (softhsm-demo.toml is a template, checked by
    // tests/deploy_container.rs after the entrypoint fills it in).
    let mut all = Vec::new();
    for dir in ["systemd", "container", "kubernetes", "aws"] {
        for e in std::fs::read_dir(deploy().join(dir)).expect("dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                all.push(format!(
                    "{dir}/{}",
                    p.file_name().expect("name").to_string_lossy()
                ));
            }
        }
    }
    all.retain(|p| p != "container/softhsm-demo.toml" && !checked.contains(&p.as_str()));
    assert!(all.is_empty(), "deploy configs not checked: {all:?}");
}

#[test]
fn systemd_env_example_names_every_secret_and_its_placeholders_are_refused() {
    let config = std::fs::read_to_string(deploy().join("systemd/xks-proxy.toml")).expect("toml");
    let env = std::fs::read_to_string(deploy().join("systemd/xks-proxy.env.example")).expect("env");
    let assigned: BTreeMap<&str, &str> = env
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| l.split_once('=').expect("="))
        .collect();
    let mut names = 0;
    for line in config.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if let Some((k, v)) = line.split_once('=')
            && k.trim().ends_with("_env")
        {
            let var = v.trim().trim_matches('"');
            assert!(
                assigned.contains_key(var),
                "env example lacks {var} ({})",
                k.trim()
            );
            names += 1;
        }
    }
    assert!(names >= 2, "expected the master key and a SigV4 secret");
    // An env file copied without editing must not start a proxy.
    let scratch = Scratch::new();
    let path = scratch.dir.path().join("systemd.toml");
    std::fs::write(&path, scratch.rewrite(&config)).expect("write");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xks-proxy"));
    cmd.args(["config", "check", "--config"]).arg(&path);
    for (k, v) in &assigned {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, MIN);
    assert!(
        !out.status.success(),
        "the placeholder env file passed config check"
    );
}

// ---------------------------------------------------------------------------- container

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = require_tool("hadolint");
    run_ok(
        Command::new(hadolint)
            .args(["--failure-threshold", "info"])
            .arg(deploy().join("container/Dockerfile")),
        MIN,
    );
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_ping_healthcheck() {
    let text = std::fs::read_to_string(deploy().join("container/Dockerfile")).expect("Dockerfile");
    // Logical lines (continuations joined), comments dropped.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, l)| (i, *l))
        .collect();
    assert!(
        stages.len() >= 3,
        "multi-stage: build, softhsm-demo, runtime"
    );
    assert!(
        stages[0].1.contains(" AS build"),
        "first stage builds: {}",
        stages[0].1
    );
    // The default target is the last stage: the minimal runtime.
    let (last_i, last) = stages[stages.len() - 1];
    assert!(
        last.contains("distroless") && last.ends_with(" AS runtime"),
        "final stage: {last}"
    );
    assert!(stages.iter().any(|(_, l)| l.ends_with(" AS softhsm-demo")));
    // Every stage that runs the proxy runs it as a non-root user and health-checks /ping.
    for (n, (start, from)) in stages.iter().enumerate() {
        if from.contains(" AS build") || from.starts_with("FROM busybox") {
            continue;
        }
        let end = stages.get(n + 1).map_or(lines.len(), |s| s.0);
        let body = &lines[*start..end];
        let user = body
            .iter()
            .rev()
            .find(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("{from}: no USER"));
        let uid = user[5..].split(':').next().expect("uid");
        assert!(uid != "0" && uid != "root", "{from}: runs as {user}");
        let hc = body
            .iter()
            .find(|l| l.starts_with("HEALTHCHECK "))
            .unwrap_or_else(|| panic!("{from}: no HEALTHCHECK"));
        assert!(
            hc.contains("127.0.0.1/8080") || hc.contains("127.0.0.1:8080/ping"),
            "{hc}"
        );
        assert!(hc.contains("/ping") || hc.contains("GET /ping"), "{hc}");
    }
    assert!(last_i > 0);
    // Every COPY from the build context names a file that exists in the repository.
    for l in &lines {
        if let Some(rest) = l.strip_prefix("COPY ") {
            if rest.contains("--from=") {
                continue;
            }
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for src in &words[..words.len() - 1] {
                if *src == "." {
                    continue;
                }
                assert!(
                    repo().join(src).exists(),
                    "COPY source {src} does not exist"
                );
            }
        }
    }
    // The baked-in default config is the one tested by every_deploy_config_passes_config_check.
    assert!(joined.contains("COPY deploy/container/xks-proxy.toml /etc/xks-proxy/xks-proxy.toml"));
    // The .dockerignore must not hide what the build needs.
    let ignore = std::fs::read_to_string(deploy().join("container/Dockerfile.dockerignore"))
        .expect("ignore");
    for needed in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "certs",
        "deploy/container",
    ] {
        assert!(
            !ignore.lines().any(|l| l.trim() == needed),
            "Dockerfile.dockerignore excludes {needed}"
        );
    }
}

#[test]
fn deploy_shell_scripts_pass_shellcheck() {
    let shellcheck = require_tool("shellcheck");
    let mut scripts = vec![deploy().join("container/softhsm-demo-entrypoint.sh")];
    for e in std::fs::read_dir(repo().join("tests/deploy")).expect("tests/deploy") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "sh") {
            scripts.push(p);
        }
    }
    assert!(scripts.len() >= 2);
    run_ok(Command::new(shellcheck).args(&scripts), MIN);
}

// --------------------------------------------------------------------------- kubernetes

fn k8s() -> PathBuf {
    deploy().join("kubernetes")
}

/// The YAML files of a kustomization directory, other than kustomization.yaml itself.
fn yaml_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    v.sort();
    v
}

#[test]
fn kustomization_lists_every_manifest() {
    for dir in [k8s(), k8s().join("components/prometheus-operator")] {
        let kust = yaml_docs(&dir.join("kustomization.yaml"));
        let listed: Vec<String> = kust[0]["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect();
        let files = yaml_files(&dir);
        let mut missing: Vec<&String> = files.iter().filter(|f| !listed.contains(f)).collect();
        missing.sort();
        assert!(
            missing.is_empty(),
            "{}: not listed in kustomization.yaml: {missing:?}",
            dir.display()
        );
        for l in &listed {
            assert!(
                dir.join(l).is_file(),
                "{}: lists missing file {l}",
                dir.display()
            );
        }
    }
    // Every file a generator reads is either shipped or an operator secret (secrets/).
    let kust = &yaml_docs(&k8s().join("kustomization.yaml"))[0];
    for generator in ["configMapGenerator", "secretGenerator"] {
        for g in kust[generator].as_array().expect(generator) {
            for f in g["files"].as_array().expect("files") {
                let f = f.as_str().expect("file");
                let path = f.split_once('=').map_or(f, |(_, p)| p);
                assert!(
                    path.starts_with("secrets/") || k8s().join(path).is_file(),
                    "{generator} reads missing {path}"
                );
            }
        }
    }
}

#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let kv = require_tool("kubernetes-validate");
    let mut files: Vec<PathBuf> = yaml_files(&k8s()).iter().map(|f| k8s().join(f)).collect();
    assert!(files.len() >= 8, "{files:?}");
    let out = run_ok(
        Command::new(&kv).args(["--strict"]).args(&files),
        Duration::from_secs(120),
    );
    for f in &files {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        assert!(
            out.lines()
                .any(|l| l.contains(&name) && l.contains("passed")),
            "{name} was not validated:\n{out}"
        );
    }
    // The ServiceMonitor is a CRD that kubernetes-validate has no schema for; check the
    // fields the Prometheus Operator needs by hand.
    files.clear();
    let sm = &yaml_docs(&k8s().join("components/prometheus-operator/servicemonitor.yaml"))[0];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["kind"], "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "metrics"
    );
}

#[test]
fn kubernetes_manifests_pass_checkov() {
    let checkov = require_tool("checkov");
    let out = run(
        Command::new(checkov)
            .args([
                "--framework",
                "kubernetes",
                "--compact",
                "--quiet",
                "--skip-download",
                "-o",
                "cli",
                "-d",
            ])
            .arg(k8s())
            .env("BC_SKIP_MAPPING", "TRUE"),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Failed checks: 0"),
        "checkov found problems ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Passed checks:"),
        "checkov scanned nothing:\n{stdout}"
    );
}

/// `kubectl kustomize` of a copy of deploy/kubernetes with throw-away secrets.
fn render(replicas: Option<u32>) -> (tempfile::TempDir, PathBuf, Vec<Value>) {
    let kubectl = require_tool("kubectl");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("kubernetes");
    copy_dir(&k8s(), &dir);
    if let Some(n) = replicas {
        let path = dir.join("deployment.yaml");
        let text = std::fs::read_to_string(&path).expect("deployment");
        assert!(text.contains("\n  replicas: 3\n"));
        std::fs::write(
            &path,
            text.replace("\n  replicas: 3\n", &format!("\n  replicas: {n}\n")),
        )
        .expect("write");
    }
    let secrets = dir.join("secrets");
    let certs = repo().join("certs");
    std::fs::copy(certs.join("server-ecdsa.pem"), secrets.join("tls.crt")).expect("crt");
    std::fs::copy(certs.join("server-ecdsa.key"), secrets.join("tls.key")).expect("key");
    std::fs::write(secrets.join("master-key"), MASTER_KEY).expect("mk");
    std::fs::write(secrets.join("sigv4-secret-primary"), SECRET).expect("secret");
    std::fs::write(secrets.join("keystore.json"), "{}").expect("keystore");
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(&dir), MIN);
    let rendered = tmp.path().join("rendered.yaml");
    std::fs::write(&rendered, &out).expect("write rendered");
    let docs = yaml_docs(&rendered);
    (tmp, rendered, docs)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in the rendered output"))
}

#[test]
fn kustomization_renders_a_valid_fleet() {
    let (_tmp, rendered, docs) = render(None);
    // The rendered whole (with the generated ConfigMap and Secrets) is valid too.
    let kv = require_tool("kubernetes-validate");
    run_ok(
        Command::new(kv).arg("--strict").arg(&rendered),
        Duration::from_secs(120),
    );
    for d in &docs {
        assert_eq!(
            d["metadata"]["namespace"].as_str().unwrap_or("xks-proxy"),
            "xks-proxy",
            "{} {} outside the namespace",
            d["kind"],
            d["metadata"]["name"]
        );
    }

    let dep = find(&docs, "Deployment", "xks-proxy");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // Readiness on /ping; liveness that does not restart on a key-manager outage.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ping");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "ping");
    assert!(c["livenessProbe"].is_object());
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    // Security context.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // Rolling updates never drop below the fleet; the drain fits the grace period.
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop");
    assert!(
        grace > pause + 10,
        "grace {grace}s < preStop {pause}s + 10 s drain"
    );
    // Prometheus scraping of the metrics port.
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9100");
    assert!(
        c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == 9100)
    );
    let metrics = find(&docs, "Service", "xks-proxy-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 9100);

    // Config, credentials and the shared keystore come from the generated ConfigMap and
    // Secrets, under their hashed names.
    let cm = find(&docs, "ConfigMap", "xks-proxy-config-");
    let toml = cm["data"]["xks-proxy.toml"].as_str().expect("toml");
    assert!(toml.contains("[admin]") && toml.contains("ping_listen = \"0.0.0.0:8080\""));
    let vols = pod["volumes"].as_array().expect("volumes");
    let vol = |n: &str| {
        vols.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("volume {n}"))
    };
    assert_eq!(vol("config")["configMap"]["name"], cm["metadata"]["name"]);
    for (v, secret) in [
        ("keystore", "xks-proxy-keystore-"),
        ("secrets", "xks-proxy-secrets-"),
        ("tls", "xks-proxy-tls-"),
    ] {
        let s = find(&docs, "Secret", secret);
        assert_eq!(
            vol(v)["secret"]["secretName"],
            s["metadata"]["name"],
            "volume {v}"
        );
    }
    assert_eq!(
        find(&docs, "Secret", "xks-proxy-tls-")["type"],
        "kubernetes.io/tls"
    );
    let mounts = c["volumeMounts"].as_array().expect("mounts");
    assert!(
        mounts.iter().all(|m| m["readOnly"] == true),
        "every mount read-only"
    );

    // The NLB Service: TCP 443 passed through to the TLS port, health on /ping.
    let svc = find(&docs, "Service", "xks-proxy");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["ports"][0]["port"], 443);
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "xks");
    let a = &svc["metadata"]["annotations"];
    assert_eq!(
        a["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"],
        "/ping"
    );
    assert_eq!(
        a["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"],
        "8080"
    );
    assert!(
        a.get("service.beta.kubernetes.io/aws-load-balancer-ssl-cert")
            .is_none(),
        "TLS must pass through"
    );

    // PDB and HPA target the same pods / Deployment.
    let pdb = find(&docs, "PodDisruptionBudget", "xks-proxy");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler", "xks-proxy");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
}

#[test]
fn fleet_size_follows_the_replica_count() {
    for replicas in [3u32, 5] {
        let (_tmp, _, docs) = render((replicas != 3).then_some(replicas));
        let dep = find(&docs, "Deployment", "xks-proxy");
        assert_eq!(dep["spec"]["replicas"], replicas);
        let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env");
        let fleet = env
            .iter()
            .find(|e| e["name"] == "XKS_PROXY_FLEET_SIZE")
            .expect("XKS_PROXY_FLEET_SIZE");
        assert_eq!(fleet["value"], replicas.to_string(), "env follows replicas");
        let hpa = find(&docs, "HorizontalPodAutoscaler", "xks-proxy");
        assert_eq!(
            hpa["spec"]["minReplicas"], replicas,
            "HPA floor follows replicas"
        );
    }
}

// ---------------------------------------------------------------------------------- AWS

fn template() -> PathBuf {
    deploy().join("aws/xks-proxy-nlb.yaml")
}

#[test]
fn cloudformation_template_passes_cfn_lint() {
    let cfn_lint = require_tool("cfn-lint");
    run_ok(
        Command::new(cfn_lint)
            .args([
                "--regions",
                "us-east-1",
                "eu-west-1",
                "ap-southeast-2",
                "--",
            ])
            .arg(template()),
        Duration::from_secs(180),
    );
}

#[test]
fn cloudformation_template_passes_checkov() {
    let checkov = require_tool("checkov");
    let out = run(
        Command::new(checkov)
            .args([
                "--framework",
                "cloudformation",
                "--compact",
                "--quiet",
                "--skip-download",
                "-o",
                "cli",
                "-f",
            ])
            .arg(template())
            .env("BC_SKIP_MAPPING", "TRUE"),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Failed checks: 0"),
        "checkov found problems ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The template as JSON, through cfn-lint's own decoder (it knows the !Ref tags).
fn template_json() -> Value {
    let python = require_tool("python");
    let out = run_ok(
        Command::new(python)
            .arg("-c")
            .arg(
                "import json, sys\nfrom cfnlint.decode import decode\n\
                 t, m = decode(sys.argv[1])\nassert not m, m\nprint(json.dumps(t))",
            )
            .arg(template()),
        MIN,
    );
    serde_json::from_str(&out).expect("json")
}

#[test]
fn cloudformation_template_builds_what_kms_requires() {
    let t = template_json();
    let r = &t["Resources"];
    let p = &t["Parameters"];
    // Both connectivity paths.
    let allowed: Vec<&str> = p["Connectivity"]["AllowedValues"]
        .as_array()
        .expect("values")
        .iter()
        .map(|v| v.as_str().expect("s"))
        .collect();
    assert_eq!(allowed, ["VPC_ENDPOINT_SERVICE", "PUBLIC_ENDPOINT"]);
    // An NLB across at least two subnets (two required parameters), cross-zone.
    let lb = &r["LoadBalancer"]["Properties"];
    assert_eq!(lb["Type"], "network");
    let subnets = lb["Subnets"].as_array().expect("subnets");
    assert_eq!(subnets[0], serde_json::json!({"Ref": "Subnet1"}));
    assert_eq!(subnets[1], serde_json::json!({"Ref": "Subnet2"}));
    assert_eq!(p["Subnet1"]["Type"], "AWS::EC2::Subnet::Id");
    assert_eq!(p["Subnet2"]["Type"], "AWS::EC2::Subnet::Id");
    assert!(p["Subnet1"].get("Default").is_none() && p["Subnet2"].get("Default").is_none());
    // TCP passthrough on 443.
    let listener = &r["Listener"]["Properties"];
    assert_eq!(listener["Port"], 443);
    assert_eq!(listener["Protocol"], "TCP");
    assert!(
        listener.get("Certificates").is_none(),
        "TLS must pass through the NLB"
    );
    // Target health on /ping over HTTP.
    let tg = &r["TargetGroup"]["Properties"];
    assert_eq!(tg["Protocol"], "TCP");
    assert_eq!(tg["HealthCheckProtocol"], "HTTP");
    assert_eq!(tg["HealthCheckPath"], "/ping");
    assert_eq!(
        tg["HealthCheckPort"],
        serde_json::json!({"Ref": "PingPort"})
    );
    assert_eq!(p["PingPort"]["Default"], 8080);
    // The endpoint service: acceptance off, private DNS name, only KMS as principal.
    let es = &r["EndpointService"];
    assert_eq!(es["Type"], "AWS::EC2::VPCEndpointService");
    assert_eq!(es["Properties"]["AcceptanceRequired"], false);
    assert_eq!(
        es["Properties"]["PrivateDnsName"],
        serde_json::json!({"Ref": "EndpointDnsName"})
    );
    let perms = &r["EndpointServicePermissions"]["Properties"];
    assert_eq!(
        perms["AllowedPrincipals"],
        serde_json::json!([{"Fn::Sub": "cks.kms.${AWS::Region}.amazonaws.com"}])
    );
    assert_eq!(
        t["Outputs"]["XksProxyVpcEndpointServiceName"]["Value"],
        serde_json::json!({"Fn::Sub": "com.amazonaws.vpce.${AWS::Region}.${EndpointService}"})
    );
    // Public path: internet-facing scheme when not VPC.
    assert_eq!(
        lb["Scheme"],
        serde_json::json!({"Fn::If": ["IsVpcEndpointService", "internal", "internet-facing"]})
    );
}
