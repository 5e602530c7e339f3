//! The real binaries as child processes for the end-to-end tests: `xks-proxy` with a
//! swappable backend profile (software keystore today, SoftHSM when asked) and
//! `kms-emulator`, each on 127.0.0.1:0, with their output captured for assertions.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{AKID, AKID2, SECRET, SECRET2, XKS_HOST, repo};

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits (at most 60 s) for a line containing `marker` followed
    /// by an address.
    pub fn spawn(mut cmd: Command, marker: &str) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in streams {
            let output = output.clone();
            let tx = tx.clone();
            let marker = marker.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if let Some(pos) = line.find(&marker) {
                        let rest = &line[pos + marker.len()..];
                        let addr: String = rest
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '/')
                            .collect();
                        if let Ok(a) = addr.parse() {
                            let _ = tx.send(a);
                        }
                    }
                    output.lock().expect("lock").push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no {marker:?} line; output:\n{}",
                    output.lock().expect("lock").join("\n")
                );
            }
        };
        Proc {
            child,
            addr,
            output,
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("lock").join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP (the proxy reloads its credentials and keystore).
    pub fn hup(&self) {
        self.signal("-HUP");
    }

    /// SIGSTOP: the process keeps its socket (connections are accepted by the
    /// kernel) but never answers — a proxy that is up yet far too slow.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Proc::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        assert!(crate::harness::signal(self.pid(), sig));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xks-proxy"))
}

pub fn emulator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kms-emulator"))
}

/// Which key manager the proxy under test uses. The lifecycle tests take the
/// profile as a parameter, so the same flow runs against every backend.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The software keystore (always available).
    Software,
    /// A SoftHSMv2 token (`tests/softhsm/setup.sh` exports the variables).
    SoftHsm {
        module: String,
        token_label: String,
        user_pin: String,
    },
}

impl Backend {
    /// The SoftHSM profile from the variables tests/softhsm/setup.sh exports (the
    /// runner always does; `None` means it was not run).
    pub fn softhsm_from_env() -> Option<Backend> {
        Some(Backend::SoftHsm {
            module: std::env::var("XKS_TEST_PKCS11_MODULE").ok()?,
            token_label: std::env::var("XKS_TEST_SOFTHSM_TOKEN_LABEL").ok()?,
            user_pin: std::env::var("XKS_TEST_SOFTHSM_USER_PIN").ok()?,
        })
    }
}

/// A proxy's directory, config and environment (it can be started again).
pub struct ProxySetup {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub env: Vec<(String, String)>,
    pub prefix: String,
}

impl ProxySetup {
    /// Writes a config for `prefix` with two live credentials (AKID and AKID2, for
    /// rotation) and `latency_ms` of simulated key-manager latency.
    pub fn new(backend: Backend, prefix: &str, latency_ms: u64) -> ProxySetup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = vec![
            ("XKS_SECRET_A".to_owned(), SECRET.to_owned()),
            ("XKS_SECRET_B".to_owned(), SECRET2.to_owned()),
        ];
        let backend_toml = match &backend {
            Backend::Software => {
                let out = Command::new(proxy_bin())
                    .args(["keys", "generate-master-key"])
                    .output()
                    .expect("generate-master-key");
                assert!(out.status.success(), "{out:?}");
                let master = String::from_utf8(out.stdout)
                    .expect("utf8")
                    .trim()
                    .to_owned();
                env.push(("XKS_MASTER_KEY".to_owned(), master));
                format!(
                    "kind = \"software\"\nkeystore = \"keystore.json\"\nmaster_key_env = \"XKS_MASTER_KEY\"\nsimulated_latency_ms = {latency_ms}\n"
                )
            }
            Backend::SoftHsm {
                module,
                token_label,
                user_pin,
            } => {
                env.push(("XKS_HSM_PIN".to_owned(), user_pin.clone()));
                if let Ok(conf) = std::env::var("SOFTHSM2_CONF") {
                    env.push(("SOFTHSM2_CONF".to_owned(), conf));
                }
                format!(
                    "kind = \"pkcs11\"\nmodule = \"{module}\"\ntoken_label = \"{token_label}\"\nuser_pin_env = \"XKS_HSM_PIN\"\n"
                )
            }
        };
        let certs = repo().join("certs");
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"

[server.tls]
certificate = "{cert}"
private_key = "{key}"

[backend]
{backend_toml}
[[keystores]]
path_prefix = "{prefix}"

[[keystores.credentials]]
access_key_id = "{AKID}"
secret_env = "XKS_SECRET_A"

[[keystores.credentials]]
access_key_id = "{AKID2}"
secret_env = "XKS_SECRET_B"
"#,
            cert = certs.join("server-ecdsa.pem").display(),
            key = certs.join("server-ecdsa.key").display(),
        );
        std::fs::write(dir.path().join("proxy.toml"), text).expect("config");
        ProxySetup {
            dir,
            backend,
            env,
            prefix: prefix.to_owned(),
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    fn cli(&self, args: &[&str]) {
        let out = Command::new(proxy_bin())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("xks-proxy");
        assert!(
            out.status.success(),
            "xks-proxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates an external key (`usage` like "encrypt,decrypt").
    pub fn create_key(&self, label: &str, usage: &str) {
        self.cli(&["keys", "create", "--label", label, "--usage", usage]);
    }

    /// Disables a key the way each backend's operator does: the CLI for the software
    /// keystore, the `disabled_keys` list in the config for an HSM. Takes effect on
    /// SIGHUP.
    pub fn disable_key(&self, label: &str) {
        match self.backend {
            Backend::Software => self.cli(&["keys", "disable", "--label", label]),
            Backend::SoftHsm { .. } => self.set_disabled_keys(&[label]),
        }
    }

    pub fn enable_key(&self, label: &str) {
        match self.backend {
            Backend::Software => self.cli(&["keys", "enable", "--label", label]),
            Backend::SoftHsm { .. } => self.set_disabled_keys(&[]),
        }
    }

    /// Rewrites `[backend] disabled_keys` in the config.
    fn set_disabled_keys(&self, labels: &[&str]) {
        let text = std::fs::read_to_string(self.config()).expect("config");
        let mut out = String::new();
        for line in text.lines().filter(|l| !l.starts_with("disabled_keys")) {
            out.push_str(line);
            out.push('\n');
            if line == "[backend]" {
                let list: Vec<String> = labels.iter().map(|l| format!("\"{l}\"")).collect();
                out.push_str(&format!("disabled_keys = [{}]\n", list.join(", ")));
            }
        }
        std::fs::write(self.config(), out).expect("config");
    }

    pub fn start(&self) -> Proc {
        let mut cmd = Command::new(proxy_bin());
        cmd.args(["serve", "--config"])
            .arg(self.config())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Proc::spawn(cmd, "listening on https://")
    }
}

/// Starts `kms-emulator` on 127.0.0.1:0, dialling `proxy` for `xks.test.example`.
pub fn start_emulator(proxy: SocketAddr, extra: &[&str], data_dir: Option<&Path>) -> Proc {
    let mut cmd = Command::new(emulator_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--xks-health-interval", "0"])
        .arg("--xks-ca-bundle")
        .arg(repo().join("certs/ca.pem"))
        .arg("--xks-resolve")
        .arg(format!("{XKS_HOST}={proxy}"))
        .args(extra)
        .env("RUST_LOG", "debug")
        .env_remove("KMS_EMULATOR_XKS_RESOLVE");
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    Proc::spawn(cmd, "listening on http://")
}
