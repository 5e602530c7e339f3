//! Applying a reload to a running proxy, and what triggers one. What a reload may
//! change is decided in [`crate::config::reload`]; this module builds the new state,
//! swaps it in all at once, and warns about the restart-only settings that differ.
//! [`Watch`] and [`run_until_stopped`] are the triggers: SIGHUP, and an optional poll
//! of the config's files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{
    Running, ServeError, load_policy, note_reload, register_series, set_backend_series, tls,
};
use crate::api::Api;
use crate::api::key_manager::{KeyManager, KeyManagers};
use crate::backend::{CryptoBackend, PreparedReload};
use crate::config::reload::{Reloadable, RestartOnly, split, split_backend};
use crate::config::{BackendEntry, Config};

/// Applies a new config to a running proxy without dropping a connection: everything is
/// built first, then swapped in at once; on any error nothing changes.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub(super) api: Arc<Api>,
    pub(super) tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    pub(super) cert_not_after: Arc<std::sync::atomic::AtomicI64>,
    /// The restart-only settings the process runs with; also what a backend a reload
    /// opens is started with (its call limits and health settings).
    pub(super) started: Arc<RestartOnly>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// One reload at a time: two interleaved reloads could each keep the other's
    /// half-applied state.
    pub(super) applying: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// Reloads credentials, allow-lists, quotas, the policy, the TLS certificate and
    /// client CA, and the backends: a backend whose identity is unchanged
    /// ([`crate::config::reload::split_backend`]) stays in service and reloads its live
    /// part (its keystore file, the PKCS#11 disabled-key list and PINs); a new backend,
    /// or one whose identity changed (re-pointed to another module, token or keystore),
    /// is opened and put in service; a backend no keystore uses any more leaves service
    /// once the requests that started with it have finished. Every other setting needs
    /// a restart ([`RestartOnly`]): a change to one is logged as a warning naming its
    /// key, and otherwise ignored.
    ///
    /// All or nothing, in two phases: first the new credentials, policy, TLS config,
    /// new backends and tenants are built and every backend that stays reads and checks
    /// its part ([`CryptoBackend::prepare_reload`]); only if all of that worked does
    /// anything change: the staying backends commit theirs and the rest is swapped in.
    /// A backend that cannot open or prepare fails the reload and changes nothing.
    pub async fn reload(&self, config: &Config) -> Result<(), ServeError> {
        let _one_at_a_time = self.applying.lock().await;
        let result = self.apply(config).await;
        note_reload(result.is_ok());
        result
    }

    /// Reads the config file and applies it ([`Reloader::reload`]); a file that does
    /// not load or validate changes nothing and counts as a failed reload.
    pub async fn reload_file(&self, path: &Path) -> Result<Config, ServeError> {
        let config = Config::load(path).inspect_err(|_| note_reload(false))?;
        self.reload(&config).await?;
        Ok(config)
    }

    async fn apply(&self, config: &Config) -> Result<(), ServeError> {
        let (fixed, live) = split(config);
        for k in live.keystores {
            crate::api::credential_set(k)?;
        }
        let policy = load_policy(live.policy_file)?;
        let tls = match (&self.tls, live.tls) {
            (Some(_), Some((t, client_auth))) => Some((
                tls::server_config(t, client_auth)?,
                tls::not_after(t).unwrap_or(i64::MIN),
            )),
            // Turning TLS on or off is restart-only (`server.tls` below).
            _ => None,
        };
        let running = self.api.tenants();
        let (managers, prepared) = self.backends(&live, running.managers()).await?;
        let tenants = crate::api::Tenants::from_config(live.keystores, managers)?;
        // Every backend that stays has read and checked its part: apply them all.
        for (m, p) in prepared {
            m.handle.commit_reload(p);
        }
        // Everything built and the backends agreed: swap. In-flight requests keep what
        // they started with; new handshakes get the new certificate.
        let new_managers = tenants.managers().clone();
        self.api.replace_tenants(tenants);
        note_backend_changes(running.managers(), &new_managers);
        drop(running);
        register_series(&self.api);
        self.api.replace_policy(policy);
        if let (Some(slot), Some((cfg, not_after))) = (&self.tls, tls) {
            slot.store(cfg);
            self.cert_not_after.store(not_after, Ordering::Release);
        }
        for d in self.started.differences(&fixed) {
            tracing::warn!(setting = d.key, running = %d.running, config = %d.config, "changed in the config but needs a restart; still running with the old value");
        }
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// The key managers the new config names: running ones whose identity is
    /// unchanged, each with its reload prepared (read and checked, not applied), and
    /// new ones opened for the rest. The first backend that cannot open or prepare
    /// fails the whole reload; dropping what was prepared applies nothing, and what was
    /// opened for it closes again.
    async fn backends(
        &self,
        live: &Reloadable<'_>,
        running: &KeyManagers,
    ) -> Result<(KeyManagers, Vec<(Arc<KeyManager>, PreparedReload)>), ServeError> {
        let mut managers = KeyManagers::new();
        let mut staying = Vec::new();
        for entry in live.backends {
            let (identity, _) = split_backend(&entry.config);
            match running.get(&entry.name) {
                Some(m) if m.identity.as_ref() == Some(&identity) => {
                    staying.push((Arc::clone(m), entry.config.clone()));
                    managers.insert(entry.name.clone(), Arc::clone(m));
                }
                _ => {
                    let backend = open_in_background(entry).await?;
                    let m = self.put_in_service(entry, backend).await?;
                    managers.insert(entry.name.clone(), m);
                }
            }
        }
        let mut prepared = Vec::with_capacity(staying.len());
        for (m, backend_config) in staying {
            let p = m
                .handle
                // Not a KMS request: re-reading a keystore file may take longer than a
                // request's deadline; the health check's budget bounds it.
                .call_within(crate::api::health::CHECK_BUDGET, move |b| {
                    b.prepare_reload(Some(&backend_config))
                })
                .await
                .map_err(|source| ServeError::BackendReload {
                    name: m.name.to_string(),
                    source,
                })?;
            prepared.push((m, p));
        }
        Ok((managers, prepared))
    }

    async fn put_in_service(
        &self,
        entry: &BackendEntry,
        backend: Arc<dyn CryptoBackend>,
    ) -> Result<Arc<KeyManager>, ServeError> {
        KeyManager::start(
            &entry.name,
            backend,
            Some(&entry.config),
            self.started.limits,
            self.started.health.clone(),
            self.shutdown.clone(),
        )
        .await
        .map_err(ServeError::CallThreads)
    }
}

/// Logs which backends a reload added, re-pointed or removed, and zeroes the series of
/// those that left service.
fn note_backend_changes(old: &KeyManagers, new: &KeyManagers) {
    for (name, was) in old {
        match new.get(name) {
            Some(now) if Arc::ptr_eq(now, was) => {}
            Some(_) => {
                tracing::info!(backend = %name, "backend re-pointed: the new settings serve new requests; the old backend closes when its requests have finished");
                set_backend_series(was, false);
            }
            None => {
                tracing::info!(backend = %name, "backend removed: it closes when its requests have finished");
                set_backend_series(was, false);
            }
        }
    }
    for name in new.keys() {
        if !old.contains_key(name) {
            tracing::info!(backend = %name, "backend added");
        }
    }
}

/// Opens a backend for a reload off the async threads (loading a PKCS#11 module and
/// logging in block), within the health check's budget: a module that hangs fails the
/// reload instead of stalling it.
async fn open_in_background(entry: &BackendEntry) -> Result<Arc<dyn CryptoBackend>, ServeError> {
    let config = entry.config.clone();
    let fail = |reason: String| ServeError::BackendOpen {
        name: entry.name.clone(),
        reason,
    };
    let opening = tokio::task::spawn_blocking(move || crate::backend::open(&config));
    match tokio::time::timeout(crate::api::health::CHECK_BUDGET, opening).await {
        Ok(Ok(Ok(backend))) => Ok(backend),
        Ok(Ok(Err(e))) => Err(fail(e.to_string())),
        Ok(Err(_panicked)) => Err(fail("opening it panicked".into())),
        Err(_elapsed) => Err(fail(format!(
            "it did not open within {} s",
            crate::api::health::CHECK_BUDGET.as_secs()
        ))),
    }
}

/// The file watch: modification times of the watched files and of their directories,
/// polled (no inotify dependency; it follows Kubernetes' ConfigMap and Secret symlink
/// swaps too, since `metadata()` follows links). The directories matter on Kubernetes:
/// the kubelet swaps a volume's `..data` link and only then adds the links of new keys,
/// so a poll between the two sees the new config before its new secret file, the
/// reload is refused, and no file changes again; the directory does.
#[derive(Debug)]
pub struct Watch {
    files: Vec<PathBuf>,
    stamps: Vec<Option<SystemTime>>,
}

impl Watch {
    /// Starts watching `files` as they are now.
    pub fn new(files: &[PathBuf]) -> Self {
        Self {
            stamps: stamps(files),
            files: files.to_vec(),
        }
    }

    /// Whether a file or its directory changed since the last call (or [`Watch::new`]).
    pub fn changed(&mut self) -> bool {
        let now = stamps(&self.files);
        let changed = now != self.stamps;
        self.stamps = now;
        changed
    }

    /// Watches `files` from now on (a reloaded config may name other files).
    pub fn follow(&mut self, files: &[PathBuf]) {
        *self = Self::new(files);
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    let mut paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    paths.extend(files.iter().filter_map(|f| f.parent()));
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP and, with
/// `reload.watch_interval_secs`, when a watched file changes. `config_path` is the file
/// `running` was started from (`None`: the demo, which has nothing to re-read).
pub async fn run_until_stopped(running: &Running, config: &Config, config_path: Option<&Path>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        };
        let reloader = running.reloader();
        let watching = config.reload_watch.filter(|_| config_path.is_some());
        let mut watch = Watch::new(&config.watched_files);
        // Without a watch the tick is never polled (the `if` below); an hour is a
        // placeholder interval.
        let mut tick = tokio::time::interval(watching.unwrap_or(Duration::from_secs(3600)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    reload_from(&reloader, config_path, &mut watch).await;
                }
                _ = tick.tick(), if watching.is_some() => {
                    if watch.changed() {
                        tracing::info!("a watched file changed: reloading");
                        reload_from(&reloader, config_path, &mut watch).await;
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (running, config, config_path);
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Re-reads the config file and applies it; a config that fails changes nothing and
/// keeps the old watch list. On success the watch follows the new config's files.
async fn reload_from(reloader: &Reloader, config_path: Option<&Path>, watch: &mut Watch) {
    let Some(path) = config_path else {
        tracing::info!(
            "nothing to reload: this proxy was started without a config file (the demo)"
        );
        return;
    };
    match reloader.reload_file(path).await {
        Ok(new) => watch.follow(&new.watched_files),
        Err(e) => tracing::error!(error = %e, "reload refused; keeping the old config"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn touch(path: &Path, secs: u64) {
        std::fs::File::open(path)
            .expect("open")
            .set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .expect("set mtime");
    }

    /// The file watch reloads when a watched file changes, and when its directory does:
    /// Kubernetes swaps a volume's `..data` link before it adds new keys' links, so the
    /// directory is what changes last (see [`Watch`]). A change is reported once.
    #[test]
    fn the_watch_sees_a_changed_file_and_a_changed_directory_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("xks-proxy.toml");
        std::fs::write(&config, "x").expect("write");
        let mut watch = Watch::new(std::slice::from_ref(&config));
        assert!(!watch.changed(), "nothing changed yet");
        touch(&config, 1_000);
        assert!(watch.changed(), "the file changed");
        assert!(!watch.changed(), "reported once");
        touch(dir.path(), 2_000);
        assert!(watch.changed(), "its directory changed");
        // A reloaded config names other files: the watch follows them.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let secret = other_dir.path().join("secret");
        std::fs::write(&secret, "s").expect("write");
        watch.follow(std::slice::from_ref(&secret));
        touch(&config, 3_000);
        assert!(!watch.changed(), "the old file is no longer watched");
        touch(&secret, 4_000);
        assert!(watch.changed(), "the new one is");
    }
}
