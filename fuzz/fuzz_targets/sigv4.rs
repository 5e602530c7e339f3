//! The SigV4 verifier: the `Authorization` and `X-Amz-Date` parsers, the canonical
//! request builder and the policy checks (`sigv4::verify`, `sigv4::canonical`).
//!
//! Input: a raw HTTP/1.1 request in the AWS SigV4 test suite's format (`METHOD target
//! HTTP/1.1`, `Name:value` lines, a blank line, the body), so the suite's signed
//! requests (`tests/sigv4-vectors/`) are the seeds. Each input is checked three ways:
//! 1. `verify` answers (any result, never a panic) with a fixed, printable message;
//! 2. the canonical request of the header's SignedHeaders is deterministic and framed
//!    as documented;
//! 3. the same request, re-signed KMS-style (host;x-amz-date) with our own canonical
//!    functions, verifies: whatever the path, query, headers and body, the verifier
//!    accepts what a correct signer makes of them.
#![no_main]

use std::sync::LazyLock;
use std::time::SystemTime;

use http::header::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use xks_proxy::secret::SecretString;
use xks_proxy::sigv4::canonical::{self, SigningKey};
use xks_proxy::sigv4::{Credential, CredentialSet, VerifyPolicy, verify};

const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// The test suite's signing time, 2015-08-30T12:36:00Z.
const AMZ_DATE: &str = "20150830T123600Z";
const SCOPE: &str = "20150830/us-east-1/kms-xks-proxy/aws4_request";

fn now() -> SystemTime {
    time::macros::datetime!(2015-08-30 12:36:00 UTC).into()
}

static CREDENTIALS: LazyLock<CredentialSet> = LazyLock::new(|| {
    CredentialSet::new(vec![Credential::new(
        ACCESS_KEY_ID,
        SecretString::from(SECRET),
    )])
    .expect("one credential")
});

static KEY: LazyLock<SigningKey> = LazyLock::new(|| {
    canonical::derive_signing_key(
        &SecretString::from(SECRET),
        "20150830",
        "us-east-1",
        "kms-xks-proxy",
    )
});

/// A request head as the suite's text format describes it.
struct Head<'a> {
    method: &'a [u8],
    target: &'a [u8],
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Splits the text like an HTTP/1.1 server would hand it over: values stripped of
/// surrounding whitespace, an obs-fold line joined to the previous value with a space.
fn split(data: &[u8]) -> Option<(Head<'_>, &[u8])> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next()?;
    let space = request_line.iter().position(|&b| b == b' ')?;
    let (method, rest) = (&request_line[..space], &request_line[space + 1..]);
    let target = rest.strip_suffix(b" HTTP/1.1").unwrap_or(rest);
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for line in lines {
        if let [b' ' | b'\t', ..] = line {
            if let Some(last) = headers.last_mut() {
                last.1.push(b' ');
                last.1.extend_from_slice(trim(line));
            }
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        headers.push((line[..colon].to_vec(), trim(&line[colon + 1..]).to_vec()));
    }
    Some((
        Head {
            method,
            target,
            headers,
        },
        body,
    ))
}

/// The request head, minus headers http cannot carry; `skip` names headers to leave out.
fn parts(head: &Head<'_>, skip: &[&str]) -> Option<http::request::Parts> {
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(head.method).ok()?)
        .uri(http::Uri::try_from(head.target).ok()?);
    for (name, value) in &head.headers {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if skip.contains(&name.as_str()) {
            continue;
        }
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = split(data) else {
        return;
    };
    let Some(received) = parts(&head, &[]) else {
        return;
    };

    // 1. As received. The suite signs for service "service"; KMS for kms-xks-proxy.
    let service = if data.windows(9).any(|w| w == b"/service/") {
        "service"
    } else {
        "kms-xks-proxy"
    };
    let policy = VerifyPolicy {
        service: service.to_owned(),
        ..VerifyPolicy::default()
    };
    match verify(&received, body, &CREDENTIALS, &policy, now()) {
        Ok(v) => assert_eq!(v.access_key_id, ACCESS_KEY_ID),
        Err(e) => {
            // AuthError's contract: fixed, printable ASCII, under 200 characters.
            let msg = e.to_string();
            assert!(msg.len() < 200 && msg.bytes().all(|b| (0x20..0x7f).contains(&b)));
        }
    }

    // 2. The canonical request of whatever SignedHeaders the request claims.
    let signed_headers = received
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("SignedHeaders=").nth(1))
        .map_or("host;x-amz-date", |v| v.split(',').next().unwrap_or(v));
    let payload_hash = canonical::hex_sha256(body);
    let first = canonical::canonical_request(&received, signed_headers, &payload_hash);
    let again = canonical::canonical_request(&received, signed_headers, &payload_hash);
    assert_eq!(first, again, "canonical request is not deterministic");
    if let Ok(creq) = &first {
        assert!(creq.starts_with(format!("{}\n", received.method).as_bytes()));
        assert!(creq.ends_with(format!("\n\n{signed_headers}\n{payload_hash}").as_bytes()));
    }

    // 3. Re-signed like KMS signs, it must verify.
    let Some(mut resigned) = parts(&head, &["authorization", "x-amz-date"]) else {
        return;
    };
    resigned
        .headers
        .insert("x-amz-date", HeaderValue::from_static(AMZ_DATE));
    let Ok(creq) = canonical::canonical_request(&resigned, "host;x-amz-date", &payload_hash) else {
        // No Host header and no authority: nothing to sign as host.
        return;
    };
    let sts = canonical::string_to_sign(AMZ_DATE, SCOPE, &creq);
    let signature = hex::encode(canonical::signature(&KEY, sts.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{SCOPE}, SignedHeaders=host;x-amz-date, Signature={signature}"
    );
    resigned.headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&authorization).expect("visible ASCII"),
    );
    if let Err(e) = verify(
        &resigned,
        body,
        &CREDENTIALS,
        &VerifyPolicy::default(),
        now(),
    ) {
        panic!("a correctly signed request was refused: {e}");
    }
});
