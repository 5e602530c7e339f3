//! The admin listener's metrics as an alert rule reads them (issue 12, "Metrics and
//! alerts an operator can trust"): every counter an alert watches exists at 0 from the
//! start, failures are counted where they happen, and a credential removed by a reload
//! takes its age series with it.
//!
//! One test in its own file on purpose: the `metrics` registry is global to the
//! process, so "0 at start" can only be asserted in a process nothing else has used.
//! `tests/prometheus.sh` reads the same endpoint with a real Prometheus server.

mod common;

use std::collections::BTreeMap;

use common::*;

/// The value of the one series of `name` with exactly `labels`, if exported.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let (n, rest) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (head, ""),
            };
            if n != name {
                return None;
            }
            // Label values here never contain `,` or `"` (they are ours or test ids).
            let got: BTreeMap<&str, &str> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.strip_prefix('"')?.strip_suffix('"')?))
                })
                .collect::<Option<_>>()?;
            (got == want).then(|| value.parse().ok())?
        })
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    scrape_metrics(admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_alert_watches_exists_at_zero_counts_failures_and_forgets_removed_credentials() {
    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replacen(
        "[server]\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[server]\n",
        1,
    );
    let p = TestProxy::start_with(dir, &text, creds).await;
    let admin = p.running.admin_addr.expect("admin listener");

    // Before any request: every counter with a known label set is there, at 0 — a
    // rate() over a series born at its first increment misses that increment.
    let m = scrape(admin).await;
    let at_zero: &[(&str, &[(&str, &str)])] = &[
        ("xks_reloads_total", &[("outcome", "ok")]),
        ("xks_reloads_total", &[("outcome", "failed")]),
        (
            "xks_unauthenticated_rejections_total",
            &[("reason", "signature")],
        ),
        (
            "xks_unauthenticated_rejections_total",
            &[("reason", "unknown_path")],
        ),
        (
            "xks_unauthenticated_rejections_total",
            &[("reason", "method_not_allowed")],
        ),
        (
            "xks_unauthenticated_rejections_total",
            &[("reason", "body_too_large")],
        ),
        (
            "xks_unauthenticated_rejections_total",
            &[("reason", "body_unreadable")],
        ),
        (
            "xks_connections_refused_total",
            &[("listener", "xks"), ("reason", "total")],
        ),
        (
            "xks_connections_refused_total",
            &[("listener", "xks"), ("reason", "per_source")],
        ),
        (
            "xks_connections_refused_total",
            &[("listener", "admin"), ("reason", "total")],
        ),
        (
            "xks_connections_closed_total",
            &[("reason", "head_timeout")],
        ),
        (
            "xks_connections_closed_total",
            &[("reason", "no_authenticated_request")],
        ),
        (
            "xks_tls_handshake_failures_total",
            &[("listener", "xks"), ("reason", "protocol_error")],
        ),
        (
            "xks_tls_handshake_failures_total",
            &[("listener", "xks"), ("reason", "timeout")],
        ),
        ("xks_backend_calls_skipped_total", &[("backend", "default")]),
        (
            "xks_requests_total",
            &[
                ("operation", "Encrypt"),
                ("prefix", PREFIX),
                ("outcome", "ok"),
            ],
        ),
        (
            "xks_requests_total",
            &[
                ("operation", "Decrypt"),
                ("prefix", PREFIX),
                ("outcome", "ok"),
            ],
        ),
        (
            "xks_requests_total",
            &[
                ("operation", "GetHealthStatus"),
                ("prefix", PREFIX),
                ("outcome", "ok"),
            ],
        ),
        (
            "xks_requests_total",
            &[
                ("operation", "GetKeyMetadata"),
                ("prefix", PREFIX),
                ("outcome", "ok"),
            ],
        ),
    ];
    for (name, labels) in at_zero {
        assert_eq!(
            series(&m, name, labels),
            Some(0.0),
            "{name}{labels:?} at start:\n{m}"
        );
    }
    assert_eq!(
        series(&m, "xks_config_last_reload_successful", &[]),
        Some(1.0)
    );
    // The latency histograms too, with no observation yet.
    let encrypt_ok = [
        ("operation", "Encrypt"),
        ("prefix", PREFIX),
        ("outcome", "ok"),
    ];
    assert_eq!(
        series(&m, "xks_request_duration_seconds_count", &encrypt_ok),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "xks_backend_call_duration_seconds_count",
            &[("backend", "default")]
        ),
        Some(0.0),
        "{m}"
    );
    // The certificate's days to expiry, from its notAfter at this scrape.
    assert!(
        series(&m, "xks_tls_certificate_days_to_expiry", &[]).is_some_and(|d| d > 0.0),
        "{m}"
    );
    // Both configured credentials have an age, from their secret files (just written).
    for c in &p.creds {
        let labels = [
            ("prefix", PREFIX),
            ("access_key_id", c.akid.as_str()),
            ("source", "file"),
        ];
        assert_eq!(
            series(&m, "xks_credential_age_days", &labels),
            Some(0.0),
            "{m}"
        );
    }

    // Refused before SigV4, each by its reason: a request with no signature at all,
    // and one for a path no tenant has.
    let c = p.client(false);
    let unsigned = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem()).expect("ca"))
        .resolve("localhost", p.addr())
        .build()
        .expect("client");
    let r = unsigned
        .post(health_url(&p))
        .body(serde_json::to_vec(&health_body()).expect("json"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(
        c.post(&p.url("/nobody/kms/xks/v1/health"), &health_body())
            .await
            .status,
        404
    );
    assert_eq!(c.post(&health_url(&p), &health_body()).await.status, 200);
    // KMS with a stale secret: one of the prefix's access key ids, a wrong signature.
    let stale = c.with_cred(Cred {
        akid: p.creds[0].akid.clone(),
        secret: xks_proxy::config::generate_credential().1,
    });
    assert_eq!(
        stale.post(&health_url(&p), &health_body()).await.status,
        401
    );
    let m = scrape(admin).await;
    // Strangers count under prefix and operation "-": nobody without a credential can
    // move a tenant's error ratio (or its alerts); KMS's own failures count for it.
    let stranger = |outcome| {
        series(
            &m,
            "xks_requests_total",
            &[("operation", "-"), ("prefix", "-"), ("outcome", outcome)],
        )
    };
    assert_eq!(stranger("AuthenticationFailedException"), Some(1.0), "{m}");
    assert_eq!(stranger("InvalidUriPathException"), Some(1.0), "{m}");
    let kms_auth = [
        ("operation", "GetHealthStatus"),
        ("prefix", PREFIX),
        ("outcome", "AuthenticationFailedException"),
    ];
    assert_eq!(
        series(&m, "xks_requests_total", &kms_auth),
        Some(1.0),
        "{m}"
    );
    let rejected = |reason| {
        series(
            &m,
            "xks_unauthenticated_rejections_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(rejected("signature"), Some(2.0), "{m}");
    assert_eq!(rejected("unknown_path"), Some(1.0), "{m}");
    assert_eq!(rejected("body_too_large"), Some(0.0), "{m}");
    // The latency histogram's HELP names the labels it carries.
    assert!(m.contains(
        "# HELP xks_request_duration_seconds Time from request head to response, by operation, prefix and outcome"
    ));
    let health_ok = [
        ("operation", "GetHealthStatus"),
        ("prefix", PREFIX),
        ("outcome", "ok"),
    ];
    assert_eq!(series(&m, "xks_requests_total", &health_ok), Some(1.0));

    // A reload of a file that does not validate: counted, and the gauge says the
    // running config is not the file's until a reload works.
    let path = p.dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        text.replace(
            &format!("path_prefix = \"{PREFIX}\""),
            "path_prefix = \"bad/\"",
        ),
    )
    .expect("write");
    assert!(p.running.reloader().reload_file(&path).await.is_err());
    let m = scrape(admin).await;
    assert_eq!(
        series(&m, "xks_reloads_total", &[("outcome", "failed")]),
        Some(1.0)
    );
    assert_eq!(
        series(&m, "xks_config_last_reload_successful", &[]),
        Some(0.0)
    );

    // Rotation's last step removes credential 1: its age series goes with it (an age
    // alert on a credential that no longer exists would fire forever).
    let block = format!(
        "[[keystores.credentials]]\naccess_key_id = \"{}\"\nsecret_file = \"secret1\"\n",
        p.creds[1].akid
    );
    assert!(text.contains(&block));
    std::fs::write(&path, text.replace(&block, "")).expect("write");
    p.running
        .reloader()
        .reload_file(&path)
        .await
        .expect("reload");
    let m = scrape(admin).await;
    assert_eq!(
        series(&m, "xks_reloads_total", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        series(&m, "xks_config_last_reload_successful", &[]),
        Some(1.0)
    );
    let age = |c: &Cred| {
        series(
            &m,
            "xks_credential_age_days",
            &[
                ("prefix", PREFIX),
                ("access_key_id", c.akid.as_str()),
                ("source", "file"),
            ],
        )
    };
    assert_eq!(age(&p.creds[0]), Some(0.0), "{m}");
    assert_eq!(
        age(&p.creds[1]),
        None,
        "a removed credential keeps no series:\n{m}"
    );
}
