//! GetHealthStatus and `/ping`: a background deep check of the backend, cached, so the
//! endpoints answer in microseconds however slow the key manager is.
//!
//! Spec: the health check SHOULD be deep (real crypto on a dedicated key) and MAY answer
//! from a cache no older than 60 s. The monitor re-checks every `check_interval` (≤ 50 s,
//! each check bounded by [`CHECK_BUDGET`]), and at once when a request finds the key
//! manager gone after it answered, or answering after it was gone
//! ([`Handle::availability_changed`]; at most one such check per [`EVENT_GAP`]);
//! if the cached result is older than 60 s (a check is hung), every entry is reported
//! UNAVAILABLE rather than passing off stale good news.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::wire::{EkmFleetDetail, HealthResponse};
use crate::backend::{EkmHealth, Handle, HealthState};
use crate::config::HealthConfig;

/// GetHealthStatus's `xksProxyModel`: the version, and whether this is the FIPS build
/// (which does not start unless its module is in FIPS mode, see [`crate::crypto`]).
pub const MODEL: &str = if crate::crypto::FIPS {
    concat!(
        "xks-proxy ",
        env!("CARGO_PKG_VERSION"),
        " (FIPS 140-3 mode)"
    )
} else {
    concat!("xks-proxy ", env!("CARGO_PKG_VERSION"))
};

/// The spec's limit on the age of a cached health answer.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// How long one deep check may take: a round trip per token (primary and failovers,
/// each allowed ≥ 1 s by the PKCS#11 backend), not one request's 200 ms deadline —
/// under load the check also waits for a free session like any request. The config
/// caps `check_interval_secs` at `MAX_AGE - CHECK_BUDGET` so a cached answer never ages
/// past 60 s while the next check is still allowed to run.
pub const CHECK_BUDGET: Duration = Duration::from_secs(10);

/// The largest `health.check_interval_secs` (config validates against this): a check
/// started at the end of an interval, taking its whole budget, still leaves the cached
/// answer younger than [`MAX_AGE`].
pub const MAX_CHECK_INTERVAL_SECS: u64 = MAX_AGE.as_secs() - CHECK_BUDGET.as_secs();

/// The least time between two deep checks that requests' outcomes triggered.
pub const EVENT_GAP: Duration = Duration::from_millis(250);

/// The first check, before the proxy serves: short, so a hung key manager delays the
/// start by at most this (it then reports UNAVAILABLE until a later check succeeds).
pub const STARTUP_BUDGET: Duration = Duration::from_secs(2);

/// One completed deep check.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub entries: Vec<EkmHealth>,
    pub checked_at: Instant,
}

/// The cached deep-check result plus what GetHealthStatus reports about us.
#[derive(Debug)]
pub struct HealthMonitor {
    latest: ArcSwap<Snapshot>,
    config: HealthConfig,
    ekm_vendor: String,
}

impl HealthMonitor {
    /// Runs the first deep check now (so `/ping` is meaningful from the first request).
    pub async fn start(handle: &Handle, config: HealthConfig, ekm_vendor: String) -> Arc<Self> {
        let entries = check(handle, &[], STARTUP_BUDGET).await;
        Arc::new(Self {
            latest: ArcSwap::from_pointee(Snapshot {
                entries,
                checked_at: Instant::now(),
            }),
            config,
            ekm_vendor,
        })
    }

    /// Re-checks every `check_interval` until `stop` fires or its sender is dropped
    /// (the key manager left service), or `shutdown` fires.
    pub async fn run(
        self: Arc<Self>,
        handle: Handle,
        mut stop: tokio::sync::watch::Receiver<bool>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick fires at once; `start` already checked
        loop {
            let event = tokio::select! {
                _ = tick.tick() => false,
                () = handle.availability_changed() => true,
                _ = stop.changed() => return,
                _ = shutdown.changed() => return,
            };
            let previous = self.latest.load_full();
            let entries = check(&handle, &previous.entries, CHECK_BUDGET).await;
            for e in &entries {
                if e.state != HealthState::Active {
                    tracing::warn!(backend = %handle.name(), ekm = %e.id, state = e.state.as_str(), "key manager not healthy");
                }
            }
            self.latest.store(Arc::new(Snapshot {
                entries,
                checked_at: Instant::now(),
            }));
            if event {
                // Requests flapping between failure and success must not turn into
                // back-to-back deep checks: at most one event-driven check per gap.
                tokio::select! {
                    _ = tokio::time::sleep(EVENT_GAP) => {}
                    _ = stop.changed() => return,
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// The entries to report now (UNAVAILABLE if the cache is older than 60 s).
    pub fn current(&self) -> Vec<EkmHealth> {
        let snap = self.latest.load();
        if snap.checked_at.elapsed() > MAX_AGE {
            return unavailable_like(&snap.entries);
        }
        snap.entries.clone()
    }

    /// `/ping`: healthy unless every key-manager instance is UNAVAILABLE.
    pub fn serving(&self) -> bool {
        self.current()
            .iter()
            .any(|e| e.state != HealthState::Unavailable)
    }

    /// The GetHealthStatus response body.
    pub fn response(&self) -> HealthResponse {
        HealthResponse {
            xks_proxy_fleet_size: self.config.fleet_size,
            xks_proxy_vendor: self.config.vendor.clone(),
            xks_proxy_model: MODEL.to_owned(),
            ekm_vendor: self.ekm_vendor.clone(),
            ekm_fleet_details: self
                .current()
                .into_iter()
                .take(10)
                .map(|e| EkmFleetDetail {
                    id: e.id,
                    model: e.model,
                    health_status: e.state.as_str().to_owned(),
                })
                .collect(),
        }
    }
}

/// One deep check through the backend boundary; a failed or timed-out check reports
/// the previous entries (or one placeholder) as UNAVAILABLE.
///
/// The budget is generous (a round trip per instance), but a key manager whose own
/// check is slower than a request may be — one request deadline per instance, timed
/// inside the call so a wait for a free session under load does not count — would time
/// out every KMS call: it is reported UNAVAILABLE, whatever it answered.
async fn check(handle: &Handle, previous: &[EkmHealth], budget: Duration) -> Vec<EkmHealth> {
    let per_instance = handle.limits().deadline;
    let checked = handle
        .call_within(budget, |b| {
            let started = Instant::now();
            let entries = b.health();
            Ok((entries, started.elapsed()))
        })
        .await;
    match checked {
        Ok((entries, _)) if entries.is_empty() => unavailable_like(previous),
        Ok((entries, took)) => {
            let limit = per_instance.saturating_mul(entries.len().try_into().unwrap_or(u32::MAX));
            if took > limit {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    limit_ms = limit.as_millis() as u64,
                    "deep health check slower than requests may take; reporting UNAVAILABLE"
                );
                unavailable_like(&entries)
            } else {
                entries
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "deep health check failed");
            unavailable_like(previous)
        }
    }
}

fn unavailable_like(previous: &[EkmHealth]) -> Vec<EkmHealth> {
    if previous.is_empty() {
        return vec![EkmHealth {
            id: "key-manager".into(),
            model: "unknown".into(),
            state: HealthState::Unavailable,
        }];
    }
    previous
        .iter()
        .map(|e| EkmHealth {
            state: HealthState::Unavailable,
            ..e.clone()
        })
        .collect()
}
