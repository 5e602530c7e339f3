//! Keep-alive HTTP/1.1 connections between requests (issue 15 §4): every request on a
//! keep-alive connection is answered, none says `connection: close`, and bytes that
//! arrive after a pause (a request in pieces) or together (two pipelined requests)
//! reach hyper whole. Written for "parking" idle connections (dropping hyper's
//! connection between requests), which was reverted for its cost per request
//! (benches/README.md, "Memory per idle connection"); they hold for any such change.
//!
//! The pauses below only separate the pieces in time; no test asserts a speed.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Every wait in this file is bounded by this (never reached when things work).
const BOUND: Duration = Duration::from_secs(20);
/// A pause between requests (the reverted parking needed one to take effect).
const PAUSE: Duration = Duration::from_millis(50);

async fn tls(p: &TestProxy) -> TlsStream<TcpStream> {
    raw_tls(p.addr(), [127, 0, 0, 1].into(), b"http/1.1", None)
        .await
        .expect("tls")
}

/// The request as HTTP/1.1 bytes on the wire.
fn wire(req: &http::Request<Bytes>) -> Vec<u8> {
    let mut out = format!("POST {} HTTP/1.1\r\n", req.uri()).into_bytes();
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", req.body().len()).as_bytes());
    out.extend_from_slice(req.body());
    out
}

/// Reads one whole HTTP/1.1 response (head and Content-Length body) as text, keeping
/// bytes of a next response in `pending`.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    pending: &mut Vec<u8>,
) -> String {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().expect("length"))
                .unwrap_or(0);
            if pending.len() >= end + 4 + len {
                let whole: Vec<u8> = pending.drain(..end + 4 + len).collect();
                return String::from_utf8_lossy(&whole).into_owned();
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(BOUND, io.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a whole response");
        pending.extend_from_slice(&buf[..n]);
    }
}

fn assert_kept_alive(response: &str) {
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("connection: close"),
        "a keep-alive connection must not be closed: {response}"
    );
}

#[tokio::test]
async fn request_after_request_on_one_keep_alive_connection() {
    let p = TestProxy::start(Options::default()).await;
    let io = tls(&p).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    let conn = tokio::spawn(async move { drop(conn.await) });
    for i in 0..5u8 {
        let req = signed_encrypt(&p, &[i; 16], false).map(Full::new);
        let resp = tokio::time::timeout(BOUND, send.send_request(req))
            .await
            .expect("answer in time")
            .expect("response");
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()
                .get(http::header::CONNECTION)
                .is_none_or(|v| v != "close")
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(!body.is_empty());
        tokio::time::sleep(PAUSE).await;
    }
    assert!(
        !conn.is_finished(),
        "the proxy closed a keep-alive connection"
    );
}

#[tokio::test]
async fn a_request_in_pieces_and_pipelined_requests_reach_hyper_whole() {
    let p = TestProxy::start(Options::default()).await;
    let mut io = tls(&p).await;
    let mut pending = Vec::new();

    // A first request, so that the connection has answered once.
    io.write_all(&wire(&signed_encrypt(&p, b"first", false)))
        .await
        .expect("write");
    assert_kept_alive(&read_response(&mut io, &mut pending).await);
    tokio::time::sleep(PAUSE).await;

    // A request in three pieces with pauses: the first starts the next request
    // and the rest follow.
    let bytes = wire(&signed_encrypt(&p, b"in pieces", false));
    for piece in [&bytes[..1], &bytes[1..40], &bytes[40..]] {
        io.write_all(piece).await.expect("write");
        io.flush().await.expect("flush");
        tokio::time::sleep(PAUSE).await;
    }
    assert_kept_alive(&read_response(&mut io, &mut pending).await);
    tokio::time::sleep(PAUSE).await;

    // Two pipelined requests in one write: the second may sit in hyper's buffer when
    // the first is answered, and must not be lost between the two answers.
    let mut two = wire(&signed_encrypt(&p, b"pipelined 1", false));
    two.extend_from_slice(&wire(&signed_encrypt(&p, b"pipelined 2", false)));
    io.write_all(&two).await.expect("write");
    assert_kept_alive(&read_response(&mut io, &mut pending).await);
    assert_kept_alive(&read_response(&mut io, &mut pending).await);
    tokio::time::sleep(PAUSE).await;

    // And the connection still serves after all that.
    io.write_all(&wire(&signed_encrypt(&p, b"last", false)))
        .await
        .expect("write");
    assert_kept_alive(&read_response(&mut io, &mut pending).await);
}
