//! The proxy on a public endpoint, played by the attacker (issue 10 §2, §4): anyone can
//! open TLS connections, send heads without bodies, say nothing, or come back with a
//! refused client certificate. Each test sets a limit low, plays the hostile client at
//! it, and checks that a correctly signed client is still served — the promise is that
//! nothing scarce is held for a request whose signature has not verified.
//!
//! Waits are for events (a counter the server exposes, a connection closing, a response
//! arriving), each with a generous bound; no test asserts a speed.

use crate::common;

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every wait in this file is bounded by this (never reached when things work).
const BOUND: Duration = Duration::from_secs(20);

/// A request body that declares `len` bytes and never sends one: the slow-body attack.
struct Stalled(u64);

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0)
    }
}

fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// An unsigned Encrypt head (any credentials would do: they are never checked before
/// the body arrives) with a stalled body.
fn stalled_encrypt(p: &TestProxy, h2: bool) -> http::Request<Stalled> {
    let authority = format!("localhost:{}", p.addr().port());
    let path = format!("{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt");
    if h2 {
        http::Request::post(format!("https://{authority}{path}"))
    } else {
        http::Request::post(path).header(http::header::HOST, &authority)
    }
    .header(http::header::CONTENT_TYPE, "application/json")
    .header(http::header::AUTHORIZATION, "AWS4-HMAC-SHA256 Credential=AKIAATTACKER/20240101/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=00")
    .body(Stalled(100))
    .expect("request")
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2<B> = hyper::client::conn::http2::SendRequest<B>;

/// An HTTP/1.1 client connection; its task's handle ends when the server closes it.
async fn h1(p: &TestProxy, source: IpAddr) -> (H1, tokio::task::JoinHandle<()>) {
    let io = raw_tls(p.addr(), source, b"http/1.1", None)
        .await
        .expect("tls");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    (send, tokio::spawn(async move { drop(conn.await) }))
}

async fn h2<B>(p: &TestProxy, source: IpAddr) -> (H2<B>, tokio::task::JoinHandle<()>)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = raw_tls(p.addr(), source, b"h2", None).await.expect("tls");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    (send, tokio::spawn(async move { drop(conn.await) }))
}

async fn status_of<B>(resp: hyper::Result<http::Response<B>>) -> u16
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let resp = resp.expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Reads one whole HTTP/1.1 response (head and Content-Length body) as text.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(BOUND, io.read(&mut buf))
            .await
            .expect("a response")
            .expect("read");
        assert!(n > 0, "closed mid-response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits until `cond` holds, polling; panics with `what` after BOUND.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(BOUND, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Waits until the server closes the connection served by `task`.
async fn closed_by_server(task: tokio::task::JoinHandle<()>, what: &str) {
    tokio::time::timeout(BOUND, task)
        .await
        .unwrap_or_else(|_| panic!("the server did not close {what}"))
        .expect("join");
}

/// Issue 10 §2: with `max_in_flight = 2`, slow-body requests (heads that declare a body
/// and never send it) used to take both in-flight permits before their signature was
/// read, so every signed request got 429 for the length of the body timeout. Now the
/// permit is taken only after SigV4: the stalled requests hold none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_in_flight_permit() {
    let p = TestProxy::start(Options {
        // Bodies get a minute, so the attack lasts the whole test.
        extra_server: "max_in_flight = 2\nbody_read_timeout_ms = 60000\n".into(),
        ..Options::default()
    })
    .await;
    // Four HTTP/1.1 connections from another source, each a POST head that declares
    // a body and never sends it.
    let mut raw = Vec::new();
    for _ in 0..4 {
        let mut io = raw_tls(p.addr(), lo(2), b"http/1.1", None)
            .await
            .expect("tls");
        let head = format!(
            "POST {PREFIX}/kms/xks/v1/keys/{KEY}/encrypt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        );
        io.write_all(head.as_bytes()).await.expect("head");
        raw.push(io);
    }
    // And one HTTP/2 connection with eight stalled streams.
    let (mut send2, _conn2) = h2::<Stalled>(&p, lo(3)).await;
    let mut streams = Vec::new();
    for _ in 0..8 {
        send2.ready().await.expect("h2 ready");
        streams.push(tokio::spawn(send2.send_request(stalled_encrypt(&p, true))));
    }
    until("the 12 stalled requests to reach the body read", || {
        p.running.api.awaiting_body() >= 12
    })
    .await;
    assert_eq!(p.running.api.in_flight(), 0, "no permit is held");
    // A signed client is served, on both protocols, while the attack goes on.
    for http2 in [false, true] {
        let c = p.client(http2);
        for _ in 0..5 {
            let r = c
                .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    }
    assert!(p.running.api.awaiting_body() >= 12, "the attack was on");
    drop(raw);
    for s in streams {
        s.abort();
    }
}

/// Issue 10 §2: the body must arrive within `body_read_timeout_ms` (KMS sends ~1 KiB at
/// once); a slow one is answered 400 and the stalled request is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_body_deadline_is_refused() {
    let p = TestProxy::start(Options {
        extra_server: "body_read_timeout_ms = 200\n".into(),
        ..Options::default()
    })
    .await;
    let (mut send, _conn) = h2::<Stalled>(&p, lo(1)).await;
    send.ready().await.expect("ready");
    let resp = tokio::time::timeout(BOUND, send.send_request(stalled_encrypt(&p, true)))
        .await
        .expect("answered within the bound");
    assert_eq!(status_of(resp).await, 400);
    until("the stalled request to be gone", || {
        p.running.api.awaiting_body() == 0
    })
    .await;
}

/// Issue 10 §2: a connection that completes its handshake and sends nothing is closed
/// after `header_read_timeout` (it used to live for `idle_timeout`, 120 s), on
/// HTTP/1.1 and on HTTP/2 (preface and SETTINGS, then silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let p = TestProxy::start(Options {
        extra_server: "header_read_timeout_ms = 300\nidle_timeout_ms = 600000\n".into(),
        ..Options::default()
    })
    .await;
    let mut io = raw_tls(p.addr(), lo(1), b"http/1.1", None)
        .await
        .expect("tls");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(BOUND, io.read(&mut buf))
        .await
        .expect("closed by the server");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    let (_send, conn) = h2::<Full<Bytes>>(&p, lo(1)).await;
    closed_by_server(conn, "a silent HTTP/2 connection").await;
}

/// Issue 10 §2: once a request's first byte arrives, its head must be complete within
/// `header_read_timeout` — also on a connection that has already carried an
/// authenticated request and may otherwise idle for `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off() {
    let p = TestProxy::start(Options {
        extra_server: "header_read_timeout_ms = 300\nidle_timeout_ms = 600000\n".into(),
        ..Options::default()
    })
    .await;
    let io = raw_tls(p.addr(), lo(1), b"http/1.1", None)
        .await
        .expect("tls");
    // One authenticated request by hand, then half a head.
    let mut io = io;
    let req = signed_encrypt(&p, b"hostile", false).map(Full::new);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let mut head = format!("POST {} HTTP/1.1\r\n", parts.uri);
    for (k, v) in &parts.headers {
        head += &format!("{}: {}\r\n", k, v.to_str().expect("ascii"));
    }
    head += &format!("Content-Length: {}\r\n\r\n", body.len());
    io.write_all(head.as_bytes()).await.expect("head");
    io.write_all(&body).await.expect("body");
    let answer = read_response(&mut io).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut buf = vec![0u8; 8192];
    io.write_all(b"POST /tenant-a/kms/xks/v1/health HTTP/1.1\r\nHost: loc")
        .await
        .expect("half a head");
    let n = tokio::time::timeout(BOUND, io.read(&mut buf))
        .await
        .expect("closed by the server");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// Either protocol's client connection.
enum Conn {
    H1(H1),
    H2(H2<Full<Bytes>>),
}

impl Conn {
    /// Sends one signed Encrypt and returns its status.
    async fn encrypt(&mut self, p: &TestProxy, h2: bool) -> u16 {
        let req = signed_encrypt(p, b"hostile", h2).map(Full::new);
        match self {
            Conn::H1(s) => {
                s.ready().await.expect("ready");
                status_of(s.send_request(req).await).await
            }
            Conn::H2(s) => {
                s.ready().await.expect("ready");
                status_of(s.send_request(req).await).await
            }
        }
    }
}

/// An HTTP/1.1 and an HTTP/2 connection, each having carried one signed request.
async fn authenticated_pair(p: &TestProxy) -> [(Conn, tokio::task::JoinHandle<()>); 2] {
    let (one, conn1) = h1(p, lo(1)).await;
    let (two, conn2) = h2::<Full<Bytes>>(p, lo(1)).await;
    let mut pair = [(Conn::H1(one), conn1), (Conn::H2(two), conn2)];
    for ((conn, _), h2) in pair.iter_mut().zip([false, true]) {
        assert_eq!(conn.encrypt(p, h2).await, 200);
    }
    pair
}

/// Issue 10 §2: keep-alive is not a slow client. An idle connection that has carried an
/// authenticated request stays open past `header_read_timeout` (hyper's HTTP/1.1 timer
/// used to close it then), on HTTP/1.1 and HTTP/2, and carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_stays_open_for_the_idle_timeout() {
    let p = TestProxy::start(Options {
        extra_server: "header_read_timeout_ms = 200\nidle_timeout_ms = 600000\n".into(),
        ..Options::default()
    })
    .await;
    let [(one, conn1), (two, conn2)] = authenticated_pair(&p).await;
    // Idle for several header timeouts: passing time is the point here, not an event.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!conn1.is_finished(), "HTTP/1.1 keep-alive closed early");
    assert!(!conn2.is_finished(), "HTTP/2 connection closed early");
    for (mut conn, h2) in [(one, false), (two, true)] {
        assert_eq!(conn.encrypt(&p, h2).await, 200, "still open");
    }
}

/// The other side of keep-alive: an authenticated connection idle for `idle_timeout`
/// is closed, on both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_connection_idle_past_the_idle_timeout_is_closed() {
    let p = TestProxy::start(Options {
        extra_server: "idle_timeout_ms = 300\n".into(),
        ..Options::default()
    })
    .await;
    // The senders stay alive: only the server may close these connections.
    let [(_one, conn1), (_two, conn2)] = authenticated_pair(&p).await;
    closed_by_server(conn1, "an idle HTTP/1.1 connection").await;
    closed_by_server(conn2, "an idle HTTP/2 connection").await;
}

/// Issue 10 §2: one source cannot take every connection. With a per-source cap of 3,
/// a fourth connection from 127.0.0.2 is closed at once, while 127.0.0.1 (KMS, say)
/// still connects and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_connection() {
    let p = TestProxy::start(Options {
        extra_server: "max_connections_per_source = 3\n".into(),
        ..Options::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            raw_tls(p.addr(), lo(2), b"http/1.1", None)
                .await
                .expect("within the cap"),
        );
    }
    let fourth = raw_tls(p.addr(), lo(2), b"http/1.1", None).await;
    assert!(
        fourth.is_err(),
        "the fourth connection from one source is refused"
    );
    let r = p
        .client(false)
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    assert_eq!(r.status, 200, "another source is served: {:?}", r.body);
    // Closing one frees a slot for that source.
    drop(held.pop());
    let mut again = Err(std::io::Error::other("not yet"));
    tokio::time::timeout(BOUND, async {
        while again.is_err() {
            again = raw_tls(p.addr(), lo(2), b"http/1.1", None).await;
        }
    })
    .await
    .expect("the slot is freed");
}

/// Issue 10 §2: the plain-HTTP `/ping` listener is bounded like the main one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ping_listener_is_bounded() {
    let p = TestProxy::start(Options {
        ping_listener: true,
        extra_server: "ping_max_connections = 2\nheader_read_timeout_ms = 300\n".into(),
        ..Options::default()
    })
    .await;
    let ping = p.running.ping_addr.expect("ping listener");
    let a = tcp_from(lo(1), ping).await.expect("first");
    let _b = tcp_from(lo(1), ping).await.expect("second");
    // The third is accepted by the kernel and closed by the proxy at once.
    let mut c = tcp_from(lo(1), ping).await.expect("tcp");
    let _ = c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(BOUND, c.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // A silent connection is closed after the header timeout, freeing its slot.
    let mut a = a;
    let n = tokio::time::timeout(BOUND, a.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    drop(a);
    let mut answered = false;
    tokio::time::timeout(BOUND, async {
        while !answered {
            let Ok(mut d) = tcp_from(lo(1), ping).await else {
                continue;
            };
            if d.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_ok()
                && let Ok(n) = d.read(&mut buf).await
            {
                answered = String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200");
            }
        }
    })
    .await
    .expect("a freed slot serves /ping");
}

/// Issue 10 §1 (AWS's conformance client, test_negative_mtls): a refused client
/// certificate ends in a `handshake_failure` alert the client receives — not a reset
/// ("broken pipe") and not a reason-specific alert. TLS 1.3 refuses after the client's
/// Finished, so the alert arrives on the client's first read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_ends_in_a_handshake_failure_alert() {
    let (dir, text, creds) = prepare(&Options::default());
    let text = text.replace(
        "[server.tls]\n",
        &format!(
            "[server.tls]\nclient_ca = \"{}\"\nclient_subjects = [\"cks.kms.us-east-1.amazonaws.com\"]\n",
            repo().join("certs/ca.pem").display()
        ),
    );
    let p = TestProxy::start_with(dir, &text, creds).await;
    for (cert, key) in [
        ("certs/expired-client.pem", "certs/expired-client.key"),
        (
            "certs/self-signed-client.pem",
            "certs/self-signed-client.key",
        ),
        ("certs/wrong-name-client.pem", "certs/wrong-name-client.key"),
    ] {
        let alert = match raw_tls(p.addr(), lo(1), b"http/1.1", Some((cert, key))).await {
            Err(e) => e,
            Ok(mut io) => {
                // TLS 1.3: the client is done; the server's verdict follows.
                let _ = io
                    .write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .await;
                let mut buf = [0u8; 64];
                match tokio::time::timeout(BOUND, io.read(&mut buf))
                    .await
                    .expect("an answer")
                {
                    Err(e) => e,
                    Ok(n) => panic!("{cert}: read {n} bytes instead of an alert"),
                }
            }
        };
        let inner = alert
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("{cert}: not a TLS error: {alert:?}"));
        assert_eq!(
            inner,
            &rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
            "{cert}"
        );
    }
    // The good certificate still works.
    let mut io = raw_tls(
        p.addr(),
        lo(1),
        b"http/1.1",
        Some(("certs/kms-client.pem", "certs/kms-client.key")),
    )
    .await
    .expect("good client");
    io.write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let n = io.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// Issue 10 §4: a 401 says the same whether the access key id is unknown or the
/// signature is wrong (which would otherwise confirm valid ids to anyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_says_the_same() {
    let p = TestProxy::start(Options::default()).await;
    let good = p.client(false);
    let unknown = good.with_cred(Cred {
        akid: "AKIAUNKNOWNUNKNOWN23".into(),
        secret: p.creds[0].secret.clone(),
    });
    let wrong_secret = good.with_cred(Cred {
        akid: p.creds[0].akid.clone(),
        secret: xks_proxy::secret::SecretString::new(
            "wrongwrongwrongwrongwrongwrongwrongwrongwrongwrong".into(),
        ),
    });
    let url = key_url(&p, KEY, "encrypt");
    let a = unknown.post(&url, &encrypt_body(b"x", None)).await;
    let b = wrong_secret.post(&url, &encrypt_body(b"x", None)).await;
    assert_eq!((a.status, b.status), (401, 401));
    assert_eq!(a.body, b.body);
    assert_eq!(a.error_name(), "AuthenticationFailedException");
}
