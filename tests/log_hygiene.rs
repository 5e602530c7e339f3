//! Spec: plaintext MUST never be logged. Neither may secrets. This test runs real
//! requests with every log level on (TRACE, including hyper, h2, rustls via the `log`
//! bridge) and searches everything captured for the plaintext, the decrypted output,
//! the SigV4 secrets and the master key, raw and Base64-encoded.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_the_logs_at_trace_level() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .try_init()
        .expect("subscriber");

    let p = TestProxy::start(Options::default()).await;
    let master = std::fs::read_to_string(p.dir.path().join("master.key")).expect("master");
    let canary = b"PLAINTEXT-CANARY-7f3a9c-never-log-me".to_vec();
    let mut found_request_line = false;
    for h2 in [false, true] {
        let c = p.client(h2);
        let enc = c
            .post(
                &key_url(&p, KEY, "encrypt"),
                &encrypt_body(&canary, Some(b"aad-ctx")),
            )
            .await;
        assert_eq!(enc.status, 200);
        let dec = c
            .post(
                &key_url(&p, KEY, "decrypt"),
                &decrypt_body(&enc.body, Some(b"aad-ctx")),
            )
            .await;
        assert_eq!(unb64(&dec.body["plaintext"]), canary);
        // Failures log too: a bad signature, a disabled key, a malformed body.
        let bad = c.with_cred(Cred {
            akid: p.creds[0].akid.clone(),
            secret: p.creds[1].secret.clone(),
        });
        assert_eq!(
            bad.post(&key_url(&p, KEY, "encrypt"), &encrypt_body(&canary, None))
                .await
                .status,
            401
        );
        let r = c
            .post(
                &key_url(&p, KEY_DISABLED, "encrypt"),
                &encrypt_body(&canary, None),
            )
            .await;
        assert_eq!(r.status, 400);
        let mut wrong_type = encrypt_body(&canary, None);
        wrong_type["plaintext"] = json!([String::from_utf8(canary.clone()).expect("utf8")]);
        let r = c.post(&key_url(&p, KEY, "encrypt"), &wrong_type).await;
        assert_eq!(r.status, 400);
        assert!(
            !r.body.to_string().contains("CANARY"),
            "error messages must not echo input"
        );
    }
    // Every log line there will be: stop the server and wait (bounded) until it has
    // drained, so its connection tasks have finished and logged.
    p.running.shutdown();
    tokio::time::timeout(std::time::Duration::from_secs(30), p.running.wait())
        .await
        .expect("the proxy stops");
    let logs = capture.text();
    assert!(
        logs.len() > 1000,
        "TRACE logging captured little ({} bytes): the test would prove nothing",
        logs.len()
    );
    for line in logs.lines() {
        if line.contains("xks request")
            && line.contains("kms_request_id")
            && line.contains("outcome")
        {
            found_request_line = true;
        }
    }
    assert!(
        found_request_line,
        "one line per request with kmsRequestId and outcome"
    );

    let mut forbidden: Vec<(String, String)> = vec![
        (
            "plaintext".into(),
            String::from_utf8(canary.clone()).expect("utf8"),
        ),
        ("plaintext (Base64)".into(), b64(&canary)),
        ("plaintext fragment".into(), "CANARY-7f3a9c".into()),
        ("master key".into(), master.trim().to_owned()),
    ];
    for (i, c) in p.creds.iter().enumerate() {
        forbidden.push((format!("secret {i}"), c.secret.expose().to_owned()));
    }
    for (what, needle) in &forbidden {
        assert!(!logs.contains(needle.as_str()), "{what} found in the logs");
    }
    // Debug output of the whole config holds no secret either.
    let dbg = format!("{:?}", p.config);
    for (what, needle) in &forbidden {
        assert!(!dbg.contains(needle.as_str()), "{what} in Debug of Config");
    }
}
