//! HTTP and HTTPS accept loops for the emulator (HTTP/1.1 and HTTP/2 via
//! hyper-util's auto builder) with graceful shutdown: on shutdown the listeners close
//! and in-flight requests finish (bounded by a drain timeout).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Emulator, StartError, protocol};

/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound sockets to serve on. Binding is the caller's job so tests can use port 0
/// and read the address back before serving starts.
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Vec<TcpListener>,
    pub https: Vec<(TcpListener, Arc<rustls::ServerConfig>)>,
}

/// A server TLS configuration from PEM files (ALPN h2 and http/1.1).
pub fn server_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StartError::Config(format!("TLS certificate {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| StartError::Config(format!("TLS key {}: {e}", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        crate::crypto::tls::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| StartError::Config(format!("TLS certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts on every listener until `shutdown` resolves, then drains.
pub async fn serve(
    emulator: Emulator,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners.http {
        loops.spawn(accept_loop(
            emulator.clone(),
            listener,
            None,
            graceful.clone(),
            stop_tx.subscribe(),
        ));
    }
    for (listener, tls) in listeners.https {
        loops.spawn(accept_loop(
            emulator.clone(),
            listener,
            Some(TlsAcceptor::from(tls)),
            graceful.clone(),
            stop_tx.subscribe(),
        ));
    }
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(());
    while loops.join_next().await.is_some() {}
    match Arc::try_unwrap(graceful) {
        Ok(g) => {
            if tokio::time::timeout(DRAIN_TIMEOUT, g.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("drain timeout: closing remaining connections");
            }
        }
        Err(_) => tracing::warn!("accept loops still hold the shutdown handle"),
    }
    Ok(())
}

async fn accept_loop(
    emulator: Emulator,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.recv() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE; back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let emulator = emulator.clone();
        let service = service_fn(move |req| {
            let emulator = emulator.clone();
            async move { Ok::<_, std::convert::Infallible>(protocol::handle(&emulator, req).await) }
        });
        match &tls {
            None => {
                let conn = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                // A watcher, not the shutdown handle, so that only the accept loops
                // hold the handle and `serve` can take it back once they stop.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls_stream = match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}
