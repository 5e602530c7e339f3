//! One client connection: TCP (TCP_NODELAY, as KMS's HTTP stack sets it), TLS by
//! rustls, and hyper's low-level HTTP/1.1 or HTTP/2 client on top — no pool, no
//! retries, nothing between the measurement and the wire that KMS would not have.
//! Optionally from a chosen source address (`flood` keeps the signed client's address
//! apart from the attackers', as a per-address limit would see them).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::target::Target;

/// Largest response body read; an XKS response is a few hundred bytes.
const MAX_RESPONSE: usize = 64 * 1024;

/// Why a request did not produce a response. The label is what the report counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError(pub &'static str);

/// A live connection that can carry requests.
#[derive(Debug)]
pub enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// How connections are made (built once per run).
#[derive(Clone)]
pub struct Connector {
    pub target: Arc<Target>,
    pub http2: bool,
    tls: Option<TlsConnector>,
    /// Bind here before connecting (`None`: the kernel picks, 127.0.0.1 on loopback).
    source: Option<IpAddr>,
    /// The local address of the first connection made (what the server saw).
    seen_source: Arc<OnceLock<IpAddr>>,
}

/// Opens a TCP connection to `addr`, from `source` if given (port chosen by the
/// kernel). Binding first is how one host shows up as several loopback addresses.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    match source {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("target", &self.target.authority)
            .field("http2", &self.http2)
            .field("tls", &self.tls.is_some())
            .field("source", &self.source)
            .finish()
    }
}

impl Connector {
    pub fn new(target: Arc<Target>, http2: bool, resumption: bool) -> anyhow::Result<Self> {
        let tls = if target.tls {
            Some(TlsConnector::from(target.client_config(http2, resumption)?))
        } else {
            None
        };
        Ok(Self {
            target,
            http2,
            tls,
            source: None,
            seen_source: Arc::new(OnceLock::new()),
        })
    }

    /// Connections from `source` (bound before connecting) instead of the kernel's pick.
    pub fn with_source(mut self, source: Option<IpAddr>) -> Self {
        self.source = source;
        self
    }

    /// The source address the server saw on this connector's first connection.
    pub fn seen_source(&self) -> Option<IpAddr> {
        self.seen_source.get().copied()
    }

    /// Opens a connection: TCP, TLS handshake, HTTP handshake.
    pub async fn connect(&self) -> Result<Conn, TransportError> {
        let tcp = tcp_connect(self.target.addr, self.source)
            .await
            .map_err(|_| TransportError("ConnectFailed"))?;
        if let Ok(local) = tcp.local_addr() {
            let _ = self.seen_source.set(local.ip());
        }
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let stream = tls
                    .connect(self.target.server_name.clone(), tcp)
                    .await
                    .map_err(|_| TransportError("TlsHandshakeFailed"))?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                if self.http2 && !h2 {
                    return Err(TransportError("NoH2Alpn"));
                }
                self.handshake(TokioIo::new(stream)).await
            }
            None => self.handshake(TokioIo::new(tcp)).await,
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Conn, TransportError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if self.http2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|_| TransportError("HttpHandshakeFailed"))?;
            // The connection task ends when every sender is dropped or the peer closes.
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn::H2(send))
        } else {
            let (send, conn) = http1::handshake(io)
                .await
                .map_err(|_| TransportError("HttpHandshakeFailed"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn::H1(send))
        }
    }

    /// Builds the request shape this connection kind wants: HTTP/1.1 sends the path
    /// with a Host header; HTTP/2 needs the full URI for :authority (and no Host).
    /// Either way `sign_request` signs exactly the host the server will see.
    pub fn request(&self, path: &str, body: Bytes) -> http::Request<Bytes> {
        let mut builder = http::Request::post(if self.http2 {
            format!(
                "{}://{}{}",
                if self.target.tls { "https" } else { "http" },
                self.target.authority,
                path
            )
        } else {
            path.to_owned()
        })
        .header(http::header::CONTENT_TYPE, "application/json");
        if self.http2 {
            builder = builder.version(http::Version::HTTP_2);
        } else {
            builder = builder.header(http::header::HOST, self.target.authority.as_str());
        }
        // Only fails on an invalid header value, and every value here is ours.
        builder.body(body).unwrap_or_default()
    }
}

impl Conn {
    /// Sends one request and reads the whole response (bounded by `timeout`).
    pub async fn send(
        &mut self,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), TransportError> {
        let req = req.map(Full::new);
        let work = async {
            let resp = match self {
                Conn::H1(s) => {
                    s.ready()
                        .await
                        .map_err(|_| TransportError("ConnectionClosed"))?;
                    s.send_request(req).await
                }
                Conn::H2(s) => {
                    s.ready()
                        .await
                        .map_err(|_| TransportError("ConnectionClosed"))?;
                    s.send_request(req).await
                }
            }
            .map_err(|_| TransportError("RequestFailed"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|_| TransportError("BodyReadFailed"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| TransportError("ClientTimeout"))?
    }

    /// Another handle on the same connection: HTTP/2 only (streams multiplex); an
    /// HTTP/1.1 connection carries one request at a time, so it is never shared.
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::H2(s) => Some(Conn::H2(s.clone())),
            Conn::H1(_) => None,
        }
    }

    /// Whether the connection can take another request (a closed or failed HTTP/1.1
    /// connection must be replaced).
    pub fn is_usable(&self) -> bool {
        match self {
            Conn::H1(s) => !s.is_closed(),
            Conn::H2(s) => !s.is_closed(),
        }
    }
}
