//! Issue 12, "rejections you can diagnose": a failed TLS handshake (here, a client that
//! does not trust the proxy's certificate, as KMS would not trust a private CA) is a
//! warning with its reason, not a debug line; `xks_tls_handshake_failures_total` counts
//! it by reason (every reason exported at 0 from the start); and a stranger who fails
//! handshakes in a loop cannot flood the log. Its own test binary: the log budget and
//! the metrics recorder are per process.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use xks_proxy::config::{LogFormat, LoggingConfig};

const ATTEMPTS: usize = 200;

/// A client whose trust store is empty: it refuses the proxy's certificate and says so
/// with an alert.
async fn distrusting_handshake(addr: std::net::SocketAddr) {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    assert!(
        result.is_err(),
        "the client must refuse the dev certificate"
    );
}

async fn metrics_text(admin: std::net::SocketAddr) -> String {
    scrape_metrics(admin).await
}

#[test]
fn failed_handshakes_are_warnings_with_a_reason_counted_and_never_a_flood() {
    let capture = Capture::default();
    let config = LoggingConfig {
        format: LogFormat::Json,
        level: "info".into(),
    };
    let sub = xks_proxy::telemetry::subscriber(&config, false, capture.clone()).expect("sub");
    let (elapsed, before, after) = tracing::subscriber::with_default(sub, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
            .block_on(async {
                let (dir, text, creds) = prepare(&Options::default());
                let text = text.replacen(
                    "[server]\n",
                    "[admin]\nlisten = \"127.0.0.1:0\"\n\n[server]\n",
                    1,
                );
                let p = TestProxy::start_with(dir, &text, creds).await;
                let admin = p.running.admin_addr.expect("admin listener");
                let before = metrics_text(admin).await;
                let started = Instant::now();
                for _ in 0..ATTEMPTS {
                    distrusting_handshake(p.addr()).await;
                }
                let elapsed = started.elapsed();
                // The proxy counts a failure when its side of the handshake ends: wait
                // (bounded) until all are counted.
                let want = format!(
                    "xks_tls_handshake_failures_total{{listener=\"xks\",reason=\"certificate_rejected_by_client\"}} {ATTEMPTS}"
                );
                let mut after = String::new();
                for _ in 0..200 {
                    after = metrics_text(admin).await;
                    if after.contains(&want) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                p.running.shutdown();
                (elapsed, before, after)
            })
    });
    // Every reason exists before the first failure, at 0.
    for reason in xks_proxy::server::HANDSHAKE_FAILURE_REASONS {
        let series =
            format!("xks_tls_handshake_failures_total{{listener=\"xks\",reason=\"{reason}\"}} 0");
        assert!(before.contains(&series), "{series} missing:\n{before}");
    }
    assert!(
        after.contains(&format!(
            "xks_tls_handshake_failures_total{{listener=\"xks\",reason=\"certificate_rejected_by_client\"}} {ATTEMPTS}"
        )),
        "{after}"
    );
    let logs = capture.text();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["message"] == "TLS handshake failed")
        .collect();
    assert!(!lines.is_empty(), "{logs}");
    for l in &lines {
        assert_eq!(l["level"], "WARN", "{l}");
        assert_eq!(l["reason"], "certificate_rejected_by_client", "{l}");
    }
    // At most 10 lines per 10 s window the attempts spanned: never one per attempt.
    let windows = elapsed.as_secs() as usize / 10 + 2;
    assert!(
        lines.len() <= 10 * windows && lines.len() < ATTEMPTS,
        "{} lines for {ATTEMPTS} failures in {elapsed:?}",
        lines.len()
    );
}
