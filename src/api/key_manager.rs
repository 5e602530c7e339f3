//! The key managers in service: each configured backend behind its own
//! [`Handle`] (its own call threads, permits, wait queue and deadline) and its own
//! [`HealthMonitor`], and [`KeyManagers`], the set by name that tenants point into.
//!
//! Why one of each per backend: a tenant whose HSM hangs or dies must not take a
//! permit, a call thread or a health answer from a tenant on another key manager.
//! GetHealthStatus under a prefix reports that prefix's key manager only.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::health::HealthMonitor;
use crate::backend::{CallLimits, CryptoBackend, Handle};
use crate::config::{BackendConfig, HealthConfig};

/// One backend in service.
#[derive(Debug)]
pub struct KeyManager {
    /// Its name in the config (`default` for `[backend]`).
    pub name: Arc<str>,
    pub handle: Handle,
    pub health: Arc<HealthMonitor>,
    /// The identity of what it was opened from
    /// ([`crate::config::reload::split_backend`]): a reload keeps this key manager
    /// while its backend's identity is unchanged, and opens a new one otherwise. `None`
    /// for a backend handed in ready-made that no config describes.
    pub identity: Option<crate::config::reload::BackendIdentity>,
    /// Dropped with this key manager, which ends its health monitor.
    _stop: watch::Sender<bool>,
}

/// Every key manager in service, by name.
pub type KeyManagers = BTreeMap<String, Arc<KeyManager>>;

impl KeyManager {
    /// Puts `backend` in service: its call threads, a first deep check (bounded by
    /// [`super::health::STARTUP_BUDGET`]), and its health monitor, which runs until
    /// this key manager is dropped or `shutdown` fires.
    pub async fn start(
        name: &str,
        backend: Arc<dyn CryptoBackend>,
        config: Option<&BackendConfig>,
        mut limits: CallLimits,
        health: HealthConfig,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Arc<Self>> {
        limits.concurrency = backend.concurrency();
        let vendor = backend.ekm_vendor();
        let handle = Handle::new(name, backend, limits)?;
        let monitor = HealthMonitor::start(&handle, health, vendor).await;
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(Arc::clone(&monitor).run(handle.clone(), stop_rx, shutdown));
        Ok(Arc::new(Self {
            name: Arc::from(name),
            handle,
            health: monitor,
            identity: config.map(|c| crate::config::reload::split_backend(c).0),
            _stop: stop,
        }))
    }
}
