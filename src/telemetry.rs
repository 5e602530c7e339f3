//! Logging setup: `tracing` with a human or JSON formatter on stderr.
//!
//! What is logged is decided at the call sites (one line per request in `api`); this
//! module only decides how it looks. Secrets cannot reach it: they are types whose
//! `Debug` is redacted and they are never passed as fields.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the config's level.
/// Returns an error if a subscriber is already installed.
pub fn init(config: &LoggingConfig) -> Result<(), String> {
    // Colour only for a terminal: log files and journald must not get escape codes, and
    // colouring cost ~1.6 µs per request (benches/README.md).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // try_init also bridges the `log` crate (rustls, h2 log through it).
    tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(
        config,
        ansi,
        std::io::stderr,
    )?)
    .map_err(|e| e.to_string())
}

/// The subscriber [`init`] installs, writing to `writer` (tests read what the operator
/// would). Request-derived strings are passed as `&str` or `Debug` fields, never
/// `Display`: the human format then prints them quoted with `\n` and `\u{1b}` escaped,
/// and the JSON format escapes them as JSON, so no request can start a forged line.
pub fn subscriber<W>(
    config: &LoggingConfig,
    ansi: bool,
    writer: W,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, String>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    Ok(match config.format {
        LogFormat::Human => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    })
}

/// A budget for a warning that strangers can trigger (failed TLS handshakes, refused
/// connections): at most `per_window` lines per `window`; the rest are only counted,
/// and the next line that gets through says how many were left out. So an attacker
/// cannot flood the log, and an operator still sees the first of each burst.
#[derive(Debug)]
pub struct LogBudget {
    window: std::time::Duration,
    per_window: u32,
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    started: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(window: std::time::Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            state: std::sync::Mutex::new(BudgetState {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: log this one, and say that `n` were left out since the last line.
    /// `None`: over budget, leave it out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(std::time::Instant::now())
    }

    fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st
            .started
            .is_none_or(|s| now.duration_since(s) >= self.window)
        {
            st.started = Some(now);
            st.logged = 0;
        }
        if st.logged >= self.per_window {
            st.suppressed += 1;
            return None;
        }
        st.logged += 1;
        Some(std::mem::take(&mut st.suppressed))
    }
}

/// The Prometheus recorder: installed once per process (the `metrics` facade is global
/// by design), the first time an admin listener starts.
pub fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Dense below KMS's 250 ms timeout, where the decisions are made.
            const LATENCY: &[f64] = &[
                0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 1.0, 2.5,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "xks_requests_total",
        "XKS requests by operation, path prefix and outcome (ok or the spec errorName); mirrors KMS's XksProxyErrors"
    );
    describe_histogram!(
        "xks_request_duration_seconds",
        Unit::Seconds,
        "Time from request head to response, by operation, prefix and outcome (ok or the spec errorName); mirrors KMS's XksProxyLatency"
    );
    describe_histogram!(
        "xks_backend_call_duration_seconds",
        Unit::Seconds,
        "One key-manager call through the backend boundary, waiting included, by backend"
    );
    describe_gauge!(
        "xks_backend_calls_in_flight",
        "Key-manager calls running (sessions in use), by backend"
    );
    describe_gauge!(
        "xks_backend_calls_waiting",
        "Key-manager calls waiting for a free session, by backend"
    );
    describe_gauge!(
        "xks_ekm_health_status",
        "1 for the current health status of each key-manager instance (ACTIVE, DEGRADED, UNAVAILABLE), by backend; 0 in every state for a backend a reload removed"
    );
    describe_gauge!(
        "xks_tls_certificate_days_to_expiry",
        "Days until the server certificate expires; mirrors KMS's XksProxyCertificateDaysToExpire"
    );
    describe_counter!(
        "xks_backend_calls_skipped_total",
        "Key-manager calls dropped unstarted because their caller's deadline had passed or it had gone, by backend"
    );
    describe_gauge!(
        "xks_requests_in_flight",
        "Authenticated XKS requests being processed (out of server.max_in_flight)"
    );
    describe_gauge!(
        "xks_requests_awaiting_body",
        "XKS requests whose body is still arriving (not yet authenticated)"
    );
    describe_counter!(
        "xks_connections_refused_total",
        "Connections closed at accept because a connection limit was reached, by listener (xks, ping, admin) and reason (total = max_connections, per_source = max_connections_per_source)"
    );
    describe_counter!(
        "xks_connections_closed_total",
        "Unauthenticated connections dropped at a deadline, by reason (head_timeout, no_authenticated_request)"
    );
    describe_counter!(
        "xks_unauthenticated_rejections_total",
        "XKS requests refused before their SigV4 signature verified, by reason (signature, unknown_path, method_not_allowed, body_too_large, body_unreadable)"
    );
    describe_counter!(
        "xks_reloads_total",
        "Config reloads (SIGHUP or file watch), by outcome (ok, failed); a failed reload changes nothing"
    );
    describe_gauge!(
        "xks_config_last_reload_successful",
        "1 if the last reload (or the start) applied the config file, 0 if it was refused and the proxy runs an older config"
    );
    describe_gauge!(
        "xks_fips_mode",
        "1 if every cryptographic operation of the proxy runs on the FIPS 140-3 validated AWS-LC module in FIPS mode (a `fips` build), 0 otherwise"
    );
    describe_counter!(
        "xks_audit_records_written_total",
        "Audit records (request and gap lines) written to the audit trail"
    );
    describe_counter!(
        "xks_audit_records_dropped_total",
        "Audit records lost while their request was answered (on_failure = continue, or written after the answer and then failed), by reason; the chain's next gap record says how many"
    );
    describe_counter!(
        "xks_audit_requests_refused_total",
        "Requests answered 503 because the audit trail could not take their record (on_failure = fail_closed), by reason"
    );
    describe_counter!(
        "xks_audit_write_errors_total",
        "Failed audit writes or syncs (the writer then retries with a new file every second)"
    );
    describe_gauge!(
        "xks_audit_queue_depth",
        "Audit records queued for the writer (out of audit.queue_capacity)"
    );
    describe_counter!(
        "xks_tls_handshake_failures_total",
        "TLS handshakes that failed, by listener and reason (client_certificate_refused, no_client_certificate, certificate_rejected_by_client, incompatible_client, protocol_error, closed_by_client, timeout, io_error)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_log_budget_lets_the_first_lines_of_a_window_through_and_counts_the_rest() {
        let budget = LogBudget::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(budget.admit_at(t0), Some(0));
        assert_eq!(budget.admit_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(budget.admit_at(t0 + Duration::from_secs(9)), None);
        }
        // The next window's first line says how many were left out.
        assert_eq!(budget.admit_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(budget.admit_at(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(budget.admit_at(t0 + Duration::from_secs(12)), None);
    }
}
