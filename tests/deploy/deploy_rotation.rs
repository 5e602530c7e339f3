//! deploy/README.md section 9, credential rotation, run against the real `xks-proxy
//! serve` with the configs we ship, on each platform the way that platform delivers
//! files and reloads:
//!
//! - systemd (`deploy/systemd/`): secret files written beside their final name and
//!   renamed into place; the reload is the unit's own `ExecReload=` command.
//! - container (`deploy/container/`): the same files in the directory mounted over
//!   `/etc/xks-proxy`; the reload is SIGHUP to the proxy (`docker kill --signal HUP`).
//! - Kubernetes (`deploy/kubernetes/`): the config and the secrets are volumes the
//!   kubelet rewrites (a new timestamped directory, then the `..data` symlink renamed
//!   over the old one); nothing can signal a pod, so the pods' `[reload]` file watch
//!   notices the swap.
//!
//! Each: the old credential works; `xks-proxy credentials new`; its secret file and a
//! second entry; reload; both work and `kms-config` hands KMS the new one; the old
//! entry and file removed; reload; the old credential gets 401, the new one 200.
//! Every wait is for a log line (or the process's exit), with a deadline.
//!
//! Paths in the shipped configs (`/etc/xks-proxy/...`, `/var/lib/xks-proxy/...`) are
//! moved under a temp dir, listeners to 127.0.0.1:0, and the Kubernetes watch interval
//! from 10 s to 1 s; nothing else changes.

use crate::common;
use crate::kms_support;
use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Cred, encrypt_body};
use kms_support::procs::Proc;
use xks_proxy::secret::SecretString;

const PREFIX: &str = "/prod";
const KEY: &str = "app-key-1";
/// The access key id in every shipped config; its secret file is named after it.
const SHIPPED_AKID: &str = "EXAMPLEEXAMPLEEXAMPL";
const MASTER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
/// How long any one event (a reload, the proxy's start) may take.
const EVENT: Duration = Duration::from_secs(30);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xks-proxy"))
}

// ------------------------------------------------------------------ the shipped configs

/// A shipped config with its host paths moved under `root` and its listeners on
/// loopback port 0.
fn staged(rel: &str, root: &Path) -> String {
    let text = std::fs::read_to_string(support::deploy().join(rel)).expect(rel);
    let root = root.display().to_string();
    text.lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            if !line.trim_start().starts_with('#') && (key == "listen" || key == "ping_listen") {
                format!("{key} = \"127.0.0.1:0\"")
            } else {
                line.replace("\"/etc/xks-proxy/", &format!("\"{root}/etc/xks-proxy/"))
                    .replace(
                        "\"/var/lib/xks-proxy/",
                        &format!("\"{root}/var/lib/xks-proxy/"),
                    )
            }
        })
        .map(|l| l + "\n")
        .collect()
}

/// The files a config names, by what they hold.
#[derive(Debug)]
struct Named {
    certificate: PathBuf,
    private_key: PathBuf,
    master_key: PathBuf,
    keystore: PathBuf,
    /// access key id -> secret file
    secrets: BTreeMap<String, PathBuf>,
}

fn named(text: &str) -> Named {
    let v: toml::Value = toml::from_str(text).expect("TOML");
    let path = |p: &toml::Value| PathBuf::from(p.as_str().expect("a path"));
    let tls = &v["server"]["tls"];
    let backend = &v["backend"];
    for env in ["master_key_env", "user_pin_env"] {
        assert!(
            backend.get(env).is_none(),
            "backend.{env}: a shipped config names its secrets by file"
        );
    }
    let mut secrets = BTreeMap::new();
    for ks in v["keystores"].as_array().expect("keystores") {
        for c in ks["credentials"].as_array().expect("credentials") {
            assert!(
                c.get("secret_env").is_none(),
                "secret_env: a credential in an env var cannot rotate without a restart"
            );
            secrets.insert(
                c["access_key_id"].as_str().expect("id").to_owned(),
                path(&c["secret_file"]),
            );
        }
    }
    Named {
        certificate: path(&tls["certificate"]),
        private_key: path(&tls["private_key"]),
        master_key: path(&backend["master_key_file"]),
        keystore: path(&backend["keystore"]),
        secrets,
    }
}

/// `config` plus one more `[[keystores.credentials]]` entry after the last one, as
/// step 1 says, its secret in `file` (the old entries keep theirs).
fn with_credential(config: &str, akid: &str, file: &Path) -> String {
    format!(
        "{config}\n[[keystores.credentials]]\naccess_key_id = \"{akid}\"\nsecret_file = \"{}\"\n",
        file.display()
    )
}

/// `config` without the credential entry of `akid` (step 3).
fn without_credential(config: &str, akid: &str) -> String {
    let entries: Vec<&str> = config.split("[[keystores.credentials]]").collect();
    let kept: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| !e.contains(&format!("access_key_id = \"{akid}\"")))
        .collect();
    assert_eq!(kept.len() + 1, entries.len(), "one entry for {akid}");
    kept.join("[[keystores.credentials]]")
}

// ---------------------------------------------------------------- how files are written

/// systemd and container: a file written beside its final name, then renamed over it
/// (or into place), so a reader sees the old file or the new one, never half of one.
fn put_file(path: &Path, data: &[u8]) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().expect("dir");
    std::fs::create_dir_all(dir).expect("mkdir");
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().expect("name").to_string_lossy()
    ));
    std::fs::write(&tmp, data).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// A ConfigMap or Secret volume as the kubelet writes it (its AtomicWriter): the files
/// live in a timestamped directory, `..data` links to it, and every visible name links
/// to `..data/<name>`. An update writes a whole new timestamped directory, renames a
/// new `..data` link over the old one (one atomic step for all files of the volume),
/// adds links for new names, removes the links of names that are gone, and deletes
/// the old directory.
struct KubeletVolume {
    dir: PathBuf,
    generation: u32,
}

impl KubeletVolume {
    fn new(dir: PathBuf) -> KubeletVolume {
        std::fs::create_dir_all(&dir).expect("mkdir");
        KubeletVolume { dir, generation: 0 }
    }

    fn publish(&mut self, files: &BTreeMap<String, Vec<u8>>) {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        self.generation += 1;
        let ts = format!(
            "..2026_12_06_12_00_{:02}.{}",
            self.generation,
            std::process::id()
        );
        let fresh = self.dir.join(&ts);
        std::fs::create_dir(&fresh).expect("timestamped dir");
        for (name, data) in files {
            let f = fresh.join(name);
            std::fs::write(&f, data).expect("write");
            // defaultMode 0440, group = the pod's fsGroup.
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440)).expect("chmod");
        }
        let data = self.dir.join("..data");
        let old = std::fs::read_link(&data).ok();
        let tmp = self.dir.join("..data_tmp");
        symlink(&ts, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, &data).expect("swap ..data");
        for name in files.keys() {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{name}"), &link).expect("visible link");
            }
        }
        for e in std::fs::read_dir(&self.dir).expect("read dir") {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !files.contains_key(&name) {
                std::fs::remove_file(self.dir.join(&name)).expect("remove stale link");
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).expect("remove old dir");
        }
    }
}

// --------------------------------------------------------------------- the proxy itself

fn serve(config: &Path) -> Proc {
    let mut cmd = bin();
    cmd.args(["serve", "--config"])
        .arg(config)
        // The config's level (info) logs every reload; nothing in the test's own
        // environment changes that, or hands the proxy a secret.
        .env("RUST_LOG", "info")
        .env_remove("XKS_PROXY_FLEET_SIZE")
        .env_remove("XKS_SECRET_NEXT");
    Proc::spawn(cmd, "listening on https://")
}

fn count(p: &Proc, needle: &str) -> usize {
    p.output
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until the proxy has logged `needle` more than `before` times.
async fn logged(p: &mut Proc, needle: &str, before: usize) {
    let deadline = Instant::now() + EVENT;
    while count(p, needle) <= before {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("the proxy exited ({status}):\n{}", p.output());
        }
        assert!(
            Instant::now() < deadline,
            "no new {needle:?} within {EVENT:?}:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the platform makes the proxy reload, given the proxy's pid.
enum Trigger {
    /// systemd: the unit's `ExecReload=`, `$MAINPID` filled in (`systemctl reload`).
    ExecReload(String),
    /// `docker kill --signal HUP`: SIGHUP to the container's PID 1, the proxy.
    Sighup,
    /// Kubernetes: nothing is sent; the file watch sees the kubelet's swap.
    FileWatch,
}

impl Trigger {
    fn send(&self, p: &Proc) {
        match self {
            Trigger::ExecReload(line) => {
                let line = line.replace("$MAINPID", &p.pid().to_string());
                let words: Vec<&str> = line.split_whitespace().collect();
                let status = Command::new(words[0])
                    .args(&words[1..])
                    .status()
                    .expect("ExecReload");
                assert!(status.success(), "{line}: {status}");
            }
            Trigger::Sighup => p.hup(),
            Trigger::FileWatch => {}
        }
    }

    /// What the proxy logs when it starts reloading for this cause.
    fn cause(&self) -> &'static str {
        match self {
            Trigger::ExecReload(_) | Trigger::Sighup => "SIGHUP: reloading",
            Trigger::FileWatch => "a watched file changed: reloading",
        }
    }
}

/// Reloads (or lets the watch do it) after `change` and waits for the outcome:
/// `configuration reloaded`, or with `refused`, `reload refused`; never the other.
async fn reload(p: &mut Proc, how: &Trigger, refused: bool, change: impl FnOnce()) {
    const OK: &str = "configuration reloaded";
    const REFUSED: &str = "reload refused";
    let (outcome, other) = if refused {
        (REFUSED, OK)
    } else {
        (OK, REFUSED)
    };
    let (causes, outcomes, others) = (count(p, how.cause()), count(p, outcome), count(p, other));
    change();
    how.send(p);
    logged(p, how.cause(), causes).await;
    logged(p, outcome, outcomes).await;
    assert_eq!(
        count(p, other),
        others,
        "unexpected {other:?}:\n{}",
        p.output()
    );
}

struct Kms {
    port: u16,
}

impl Kms {
    /// A signed Encrypt with `cred`, as KMS sends it; the status.
    async fn encrypt(&self, cred: &Cred) -> u16 {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], self.port).into();
        let url = format!(
            "https://localhost:{}{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt",
            self.port
        );
        let reply = Client::new(addr, false, cred.clone())
            .post(&url, &encrypt_body(b"rotation", None))
            .await;
        assert!(
            reply.status == 200 || reply.error_name() == "AuthenticationFailedException",
            "{} {:?}",
            reply.status,
            reply.body
        );
        reply.status
    }
}

/// `xks-proxy credentials new --json`, as step 1 runs it.
fn credentials_new() -> Cred {
    let out = bin()
        .args(["credentials", "new", "--json"])
        .output()
        .expect("credentials new");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    Cred {
        akid: v["AccessKeyId"].as_str().expect("id").to_owned(),
        secret: SecretString::new(v["RawSecretAccessKey"].as_str().expect("secret").to_owned()),
    }
}

/// The access key id `kms-config` gives KMS (step 2): the prefix's newest credential.
fn kms_config_akid(config: &Path) -> String {
    let out = bin()
        .args(["kms-config", "--prefix", PREFIX, "--config"])
        .arg(config)
        .output()
        .expect("kms-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["XksProxyAuthenticationCredential"]["AccessKeyId"]
        .as_str()
        .expect("id")
        .to_owned()
}

fn make_keystore(config: &Path) {
    let out = bin()
        .args(["keys", "create", "--label", KEY, "--config"])
        .arg(config)
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dev_cert() -> (Vec<u8>, Vec<u8>) {
    let certs = support::repo().join("certs");
    (
        std::fs::read(certs.join("server-ecdsa.pem")).expect("cert"),
        std::fs::read(certs.join("server-ecdsa.key")).expect("key"),
    )
}

fn old_credential() -> Cred {
    let (_, secret) = xks_proxy::config::generate_credential();
    Cred {
        akid: SHIPPED_AKID.to_owned(),
        secret,
    }
}

// ----------------------------------------------------------- systemd and the container

/// The shipped unit's `ExecReload=` line.
fn unit_exec_reload() -> String {
    let unit =
        std::fs::read_to_string(support::deploy().join("systemd/xks-proxy.service")).expect("unit");
    let reload: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecReload="))
        .collect();
    assert_eq!(reload.len(), 1, "one ExecReload= in the unit");
    assert!(
        !unit.lines().any(|l| {
            let l = l.trim();
            l.starts_with("EnvironmentFile=") || l.starts_with("Environment=")
        }),
        "the unit hands the proxy no environment: its secrets are files"
    );
    reload[0].to_owned()
}

/// Section 9 on a host or in a container: files written and renamed, then a signal.
async fn rotate_with_files(rel: &str, how: Trigger, try_an_env_var_first: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let config_path = root.join("etc/xks-proxy/xks-proxy.toml");
    let shipped = staged(rel, root);
    let files = named(&shipped);
    let old = old_credential();
    assert_eq!(
        files.secrets.keys().collect::<Vec<_>>(),
        [SHIPPED_AKID],
        "{rel}: one credential, the example"
    );
    let secrets_dir = files.secrets[SHIPPED_AKID]
        .parent()
        .expect("dir")
        .to_owned();
    assert_eq!(
        files.secrets[SHIPPED_AKID]
            .file_name()
            .expect("name")
            .to_string_lossy(),
        format!("sigv4-{SHIPPED_AKID}"),
        "{rel}: the secret file is named after its access key id"
    );
    let (cert, key) = dev_cert();
    put_file(&files.certificate, &cert);
    put_file(&files.private_key, &key);
    put_file(&files.master_key, MASTER_KEY.as_bytes());
    put_file(&files.secrets[SHIPPED_AKID], old.secret.expose().as_bytes());
    std::fs::create_dir_all(files.keystore.parent().expect("dir")).expect("mkdir");
    put_file(&config_path, shipped.as_bytes());
    make_keystore(&config_path);

    let mut proxy = serve(&config_path);
    let kms = Kms {
        port: proxy.addr.port(),
    };
    assert_eq!(
        kms.encrypt(&old).await,
        200,
        "{rel}: the shipped credential"
    );

    // Step 1. xks-proxy credentials new.
    let new = credentials_new();
    if try_an_env_var_first {
        // What the env-var deploy files did: the new secret in a variable the running
        // proxy never received. The reload is refused and the new id is unknown.
        let with_env = format!(
            "{shipped}\n[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_env = \"XKS_SECRET_NEXT\"\n",
            new.akid
        );
        reload(&mut proxy, &how, true, || {
            put_file(&config_path, with_env.as_bytes())
        })
        .await;
        assert_eq!(kms.encrypt(&new).await, 401, "{rel}: env var, not reloaded");
        assert_eq!(kms.encrypt(&old).await, 200, "{rel}: nothing changed");
    }
    // Its secret in a new file named after it, a second entry after the current one.
    let new_file = secrets_dir.join(format!("sigv4-{}", new.akid));
    let both = with_credential(&shipped, &new.akid, &new_file);
    reload(&mut proxy, &how, false, || {
        put_file(&new_file, new.secret.expose().as_bytes());
        put_file(&config_path, both.as_bytes());
    })
    .await;
    assert_eq!(kms.encrypt(&new).await, 200, "{rel}: the new credential");
    assert_eq!(kms.encrypt(&old).await, 200, "{rel}: the old one, still");

    // Step 2. What KMS is given: the newest credential.
    assert_eq!(kms_config_akid(&config_path), new.akid, "{rel}: kms-config");

    // Step 3. The old entry and its file go; reload.
    let only_new = without_credential(&both, SHIPPED_AKID);
    reload(&mut proxy, &how, false, || {
        put_file(&config_path, only_new.as_bytes());
        std::fs::remove_file(&files.secrets[SHIPPED_AKID]).expect("remove old secret");
    })
    .await;
    assert_eq!(
        kms.encrypt(&old).await,
        401,
        "{rel}: the old credential, retired"
    );
    assert_eq!(kms.encrypt(&new).await, 200, "{rel}: the new credential");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_rotation_writes_files_and_reloads_with_the_units_exec_reload() {
    rotate_with_files(
        "systemd/xks-proxy.toml",
        Trigger::ExecReload(unit_exec_reload()),
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_rotation_writes_files_in_the_mounted_directory_and_sends_sighup() {
    rotate_with_files("container/xks-proxy.toml", Trigger::Sighup, false).await;
}

// ---------------------------------------------------------------------------- Kubernetes

/// Where the Deployment mounts what (checked against the rendered manifests by
/// tests/deploy/deploy_lint.rs, `kubernetes_mounts_hold_every_file_the_config_names`).
const K8S_CONFIG_DIR: &str = "etc/xks-proxy/config";
const K8S_SECRETS_DIR: &str = "etc/xks-proxy/secrets";
const K8S_TLS_DIR: &str = "etc/xks-proxy/tls";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_rotation_swaps_the_volumes_and_every_pod_reloads_by_itself() {
    let deployment = std::fs::read_to_string(support::deploy().join("kubernetes/deployment.yaml"))
        .expect("deployment");
    for needle in [
        "mountPath: /etc/xks-proxy/config\n",
        "mountPath: /etc/xks-proxy/secrets\n",
        "\"--config\", \"/etc/xks-proxy/config/xks-proxy.toml\"",
    ] {
        assert!(deployment.contains(needle), "deployment.yaml: {needle}");
    }
    assert!(
        !deployment.contains("subPath:"),
        "a subPath mount never sees an update"
    );

    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let shipped = staged("kubernetes/xks-proxy.toml", root);
    let watch = "\nwatch_interval_secs = 10\n";
    assert!(
        shipped.contains(watch),
        "the pods reload by themselves: [reload] watch_interval_secs"
    );
    let shipped = shipped.replace(watch, "\nwatch_interval_secs = 1\n");
    let files = named(&shipped);
    let old = old_credential();

    // The volumes, laid out as the Deployment mounts them.
    let mut config_vol = KubeletVolume::new(root.join(K8S_CONFIG_DIR));
    let mut secrets_vol = KubeletVolume::new(root.join(K8S_SECRETS_DIR));
    let mut tls_vol = KubeletVolume::new(root.join(K8S_TLS_DIR));
    let in_volume = |vol: &KubeletVolume, p: &Path| -> String {
        assert_eq!(p.parent(), Some(vol.dir.as_path()), "{}", p.display());
        p.file_name().expect("name").to_string_lossy().into_owned()
    };
    let (cert, key) = dev_cert();
    tls_vol.publish(&BTreeMap::from([
        (in_volume(&tls_vol, &files.certificate), cert),
        (in_volume(&tls_vol, &files.private_key), key),
    ]));
    let mut secrets = BTreeMap::from([
        (
            in_volume(&secrets_vol, &files.master_key),
            MASTER_KEY.as_bytes().to_vec(),
        ),
        (
            in_volume(&secrets_vol, &files.secrets[SHIPPED_AKID]),
            old.secret.expose().as_bytes().to_vec(),
        ),
    ]);
    secrets_vol.publish(&secrets);
    let toml = |text: &str| -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([("xks-proxy.toml".to_owned(), text.as_bytes().to_vec())])
    };
    config_vol.publish(&toml(&shipped));
    let config_path = config_vol.dir.join("xks-proxy.toml");
    // The keystore Secret is not part of a rotation (a new one rolls the pods).
    std::fs::create_dir_all(files.keystore.parent().expect("dir")).expect("mkdir");
    make_keystore(&config_path);

    let mut pod = serve(&config_path);
    let kms = Kms {
        port: pod.addr.port(),
    };
    let watch = Trigger::FileWatch;
    assert_eq!(kms.encrypt(&old).await, 200, "the shipped credential");

    // Step 1: `kubectl apply -k` with the new secret file and the new entry. The
    // ConfigMap and the Secret are separate volumes; here the kubelet happens to
    // deliver the config first. The pod refuses a config whose secret file is not
    // there yet, and keeps serving the old one...
    let new = credentials_new();
    let new_name = format!("sigv4-{}", new.akid);
    let both = with_credential(&shipped, &new.akid, &secrets_vol.dir.join(&new_name));
    reload(&mut pod, &watch, true, || config_vol.publish(&toml(&both))).await;
    assert_eq!(kms.encrypt(&new).await, 401, "config before its secret");
    assert_eq!(kms.encrypt(&old).await, 200, "nothing changed");
    // ...and applies it when the Secret's swap brings the file (every file of a volume
    // is rewritten on a swap, so the old credential's file, which it watches, changed).
    secrets.insert(new_name, new.secret.expose().as_bytes().to_vec());
    reload(&mut pod, &watch, false, || secrets_vol.publish(&secrets)).await;
    assert_eq!(kms.encrypt(&new).await, 200, "the new credential");
    assert_eq!(kms.encrypt(&old).await, 200, "the old one, still");

    // Step 2.
    assert_eq!(kms_config_akid(&config_path), new.akid, "kms-config");

    // Step 3: the old entry and its secret removed, applied; again two swaps.
    let only_new = without_credential(&both, SHIPPED_AKID);
    reload(&mut pod, &watch, false, || {
        config_vol.publish(&toml(&only_new))
    })
    .await;
    assert_eq!(kms.encrypt(&old).await, 401, "the old credential, retired");
    secrets.remove(&in_volume(&secrets_vol, &files.secrets[SHIPPED_AKID]));
    reload(&mut pod, &watch, false, || secrets_vol.publish(&secrets)).await;
    assert_eq!(kms.encrypt(&new).await, 200, "the new credential");
    assert_eq!(kms.encrypt(&old).await, 401, "the old credential");
    assert!(
        !secrets_vol
            .dir
            .join(format!("sigv4-{SHIPPED_AKID}"))
            .exists(),
        "the kubelet removed the old file"
    );
    assert_eq!(count(&pod, "SIGHUP"), 0, "no signal was sent");
}
