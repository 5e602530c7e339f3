//! The four XKS APIs and every error row, over real TLS, against the real server, with
//! a client that signs like KMS (aws-sigv4). Each test cites the spec rule it checks.

use crate::common;

use bytes::Bytes;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_over_http1_and_http2() {
    // Spec: HTTP/1.1 or later, with fallback to HTTP/1.1 (ALPN h2 + http/1.1).
    let p = TestProxy::start(Options::default()).await;
    for (h2, version) in [
        (false, http::Version::HTTP_11),
        (true, http::Version::HTTP_2),
    ] {
        let r = p.client(h2).post(&health_url(&p), &health_body()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.version, version);
        assert_eq!(r.body["xksProxyFleetSize"], 1);
        assert!(
            r.body["xksProxyModel"]
                .as_str()
                .expect("model")
                .starts_with("xks-proxy ")
        );
        let details = r.body["ekmFleetDetails"].as_array().expect("details");
        assert!((1..=10).contains(&details.len()));
        assert_eq!(details[0]["healthStatus"], "ACTIVE");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_key_metadata_reports_spec_usage_and_status() {
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let body = json!({"requestMetadata": {"kmsRequestId": "m", "kmsOperation": "CreateKey", "awsPrincipalArn": PRINCIPAL}});
    let r = c.post(&key_url(&p, KEY, "metadata"), &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
    );
    let r = c.post(&key_url(&p, KEY_DISABLED, "metadata"), &body).await;
    assert_eq!(r.body["keyStatus"], "DISABLED");
    let r = c
        .post(&key_url(&p, KEY_ENCRYPT_ONLY, "metadata"), &body)
        .await;
    assert_eq!(r.body["keyUsage"], json!(["ENCRYPT"]));
    // Spec: awsPrincipalArn is required for GetKeyMetadata.
    let no_principal =
        json!({"requestMetadata": {"kmsRequestId": "m", "kmsOperation": "CreateKey"}});
    let r = c.post(&key_url(&p, KEY, "metadata"), &no_principal).await;
    assert_eq!((r.status, r.error_name()), (400, "ValidationException"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_round_trip_with_cdiv_at_the_spec_size_edges() {
    // Spec: accept at least 4300-byte plaintext and 8192-byte AAD; CDIV per Appendix C.
    let p = TestProxy::start(Options::default()).await;
    for h2 in [false, true] {
        let c = p.client(h2);
        for (pt_len, aad_len) in [(1usize, 0usize), (32, 100), (4300, 8192)] {
            let pt: Vec<u8> = (0..pt_len).map(|i| (i * 7 + 3) as u8).collect();
            let aad: Vec<u8> = (0..aad_len).map(|i| (i * 5) as u8).collect();
            let aad_opt = (aad_len > 0).then_some(&aad[..]);
            let enc = c
                .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(&pt, aad_opt))
                .await;
            assert_eq!(enc.status, 200, "{:?}", enc.body);
            let ct = unb64(&enc.body["ciphertext"]);
            let iv = unb64(&enc.body["initializationVector"]);
            let tag = unb64(&enc.body["authenticationTag"]);
            let md = unb64(&enc.body["ciphertextMetadata"]);
            assert_eq!(ct.len(), pt.len(), "ciphertext same length as plaintext");
            assert_eq!(iv.len(), 12);
            assert_eq!(tag.len(), 16);
            assert!(md.len() <= 20);
            // Client-side CDIV: SHA-256(aad || metadata || iv || ciphertext || tag).
            let want = xks_proxy::api::aad::cdiv(&aad, &md, &iv, &ct, &tag);
            assert_eq!(
                unb64(&enc.body["ciphertextDataIntegrityValue"]),
                want.to_vec()
            );
            let dec = c
                .post(
                    &key_url(&p, KEY, "decrypt"),
                    &decrypt_body(&enc.body, aad_opt),
                )
                .await;
            assert_eq!(dec.status, 200, "{:?}", dec.body);
            assert_eq!(unb64(&dec.body["plaintext"]), pt);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cdiv_unless_asked() {
    // Spec: ciphertextDataIntegrityValue is returned iff the request named an algorithm.
    let p = TestProxy::start(Options::default()).await;
    let mut body = encrypt_body(b"abc", None);
    body.as_object_mut()
        .expect("obj")
        .remove("ciphertextDataIntegrityValueAlgorithm");
    let r = p
        .client(false)
        .post(&key_url(&p, KEY, "encrypt"), &body)
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.get("ciphertextDataIntegrityValue").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_past_what_we_support_are_501() {
    // Spec: a size beyond what the proxy supports past the required minimum → 501.
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let r = c
        .post(
            &key_url(&p, KEY, "encrypt"),
            &encrypt_body(&vec![1u8; xks_proxy::api::MAX_DATA + 1], None),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (501, "UnsupportedOperationException")
    );
    let r = c
        .post(
            &key_url(&p, KEY, "encrypt"),
            &encrypt_body(b"x", Some(&vec![1u8; xks_proxy::api::MAX_AAD + 1])),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (501, "UnsupportedOperationException")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_byte_iv_is_valid_input_but_not_one_the_software_keystore_made() {
    // Spec: IV 12 or 16 bytes. The software keystore only makes 12-byte IVs.
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let enc = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"hello", None))
        .await;
    let mut body = decrypt_body(&enc.body, None);
    body["initializationVector"] = json!(b64(&[0u8; 16]));
    let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidCiphertextException")
    );
    // Spec error table: an IV, tag or ciphertext that is "corrupted, missing, or
    // otherwise invalid" is InvalidCiphertextException (Decrypt), lengths included.
    body["initializationVector"] = json!(b64(&[0u8; 13]));
    let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidCiphertextException")
    );
    let good = decrypt_body(&enc.body, None);
    let mut cases = Vec::new();
    let mut b = good.clone();
    b["authenticationTag"] = json!(b64(&[0u8; 15]));
    cases.push((b, "authenticationTag"));
    for field in ["initializationVector", "authenticationTag", "ciphertext"] {
        let mut b = good.clone();
        b.as_object_mut().expect("obj").remove(field);
        cases.push((b, field));
    }
    for (body, field) in cases {
        let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "InvalidCiphertextException"),
            "{field}: {:?}",
            r.body
        );
        let msg = r.body["errorMessage"].as_str().unwrap_or("");
        assert!(msg.contains(field), "{msg:?} names {field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_invalid_ciphertext() {
    // Spec: a modified ciphertext, tag, AAD or ciphertextMetadata MUST be detected.
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let enc = c
        .post(
            &key_url(&p, KEY, "encrypt"),
            &encrypt_body(b"secret data", Some(b"ctx")),
        )
        .await;
    let flip = |v: &serde_json::Value| {
        let mut b = unb64(v);
        b[0] ^= 1;
        json!(b64(&b))
    };
    for field in [
        "ciphertext",
        "authenticationTag",
        "initializationVector",
        "ciphertextMetadata",
    ] {
        let mut body = decrypt_body(&enc.body, Some(b"ctx"));
        body[field] = flip(&body[field]);
        let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "InvalidCiphertextException"),
            "{field}"
        );
    }
    // Wrong AAD, and AAD moved into the metadata field.
    let r = c
        .post(
            &key_url(&p, KEY, "decrypt"),
            &decrypt_body(&enc.body, Some(b"cty")),
        )
        .await;
    assert_eq!(r.error_name(), "InvalidCiphertextException");
    let mut body = decrypt_body(&enc.body, None);
    body.as_object_mut()
        .expect("obj")
        .remove("ciphertextMetadata");
    let r = c.post(&key_url(&p, KEY, "decrypt"), &body).await;
    assert_eq!(r.error_name(), "InvalidCiphertextException");
    // Another key cannot open it.
    let r = c
        .post(
            &key_url(&p, KEY_DECRYPT_ONLY, "decrypt"),
            &decrypt_body(&enc.body, Some(b"ctx")),
        )
        .await;
    assert_eq!(r.error_name(), "InvalidCiphertextException");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_state_and_usage_errors() {
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let enc = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    // Disabled key → 400 InvalidStateException (all APIs with a key).
    let r = c
        .post(
            &key_url(&p, KEY_DISABLED, "encrypt"),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!((r.status, r.error_name()), (400, "InvalidStateException"));
    let r = c
        .post(
            &key_url(&p, KEY_DISABLED, "decrypt"),
            &decrypt_body(&enc.body, None),
        )
        .await;
    assert_eq!((r.status, r.error_name()), (400, "InvalidStateException"));
    // Usage not allowed → 400 InvalidKeyUsageException.
    let r = c
        .post(
            &key_url(&p, KEY_DECRYPT_ONLY, "encrypt"),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException")
    );
    let r = c
        .post(
            &key_url(&p, KEY_ENCRYPT_ONLY, "decrypt"),
            &decrypt_body(&enc.body, None),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException")
    );
    // Spec, Encrypt order of work (Appendix C): a CDIV is returned only after the
    // output has been decrypted again. An encrypt-only key cannot be checked, so a
    // CDIV request on it is 400 InvalidKeyUsageException (AWS's conformance client
    // test_encrypt_only_key expects exactly that); without a CDIV it encrypts.
    let mut with_cdiv = encrypt_body(b"x", None);
    with_cdiv["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");
    let r = c
        .post(&key_url(&p, KEY_ENCRYPT_ONLY, "encrypt"), &with_cdiv)
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException"),
        "{:?}",
        r.body
    );
    let without_cdiv = encrypt_body_without_cdiv(b"x");
    let r = c
        .post(&key_url(&p, KEY_ENCRYPT_ONLY, "encrypt"), &without_cdiv)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body.get("ciphertextDataIntegrityValue").is_none());
    // Unknown key → 404 KeyNotFoundException.
    for op in ["metadata", "encrypt", "decrypt"] {
        let body = match op {
            "encrypt" => encrypt_body(b"x", None),
            "decrypt" => decrypt_body(&enc.body, None),
            _ => json!({"requestMetadata": metadata("CreateKey")}),
        };
        let r = c.post(&key_url(&p, "no-such-key", op), &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "KeyNotFoundException"),
            "{op}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors() {
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let url = key_url(&p, KEY, "encrypt");
    let enc = c.post(&url, &encrypt_body(b"x", None)).await;
    let mut cases = vec![];
    let mut b = encrypt_body(b"x", None);
    b["encryptionAlgorithm"] = json!("AES_CBC");
    cases.push(("encrypt", b, "encryptionAlgorithm must be AES_GCM"));
    let mut b = encrypt_body(b"x", None);
    b["ciphertextDataIntegrityValueAlgorithm"] = json!("MD5");
    cases.push(("encrypt", b, "SHA_256"));
    let mut b = encrypt_body(b"x", None);
    b["plaintext"] = json!("aGVsbG8_-w"); // URL-safe alphabet
    cases.push(("encrypt", b, "Base64"));
    let mut b = encrypt_body(b"x", None);
    b["requestMetadata"]
        .as_object_mut()
        .expect("obj")
        .remove("kmsKeyArn");
    cases.push(("encrypt", b, "kmsKeyArn"));
    let mut b = encrypt_body(b"x", None);
    b.as_object_mut().expect("obj").remove("plaintext");
    cases.push(("encrypt", b, "plaintext"));
    let mut b = decrypt_body(&enc.body, None);
    b["ciphertextMetadata"] = json!(b64(&[1u8; 21]));
    cases.push(("decrypt", b, "20 bytes"));
    cases.push(("encrypt", json!("not an object"), "invalid request body"));
    for (op, body, needle) in cases {
        let r = c.post(&key_url(&p, KEY, op), &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "ValidationException"),
            "{needle}: {:?}",
            r.body
        );
        let msg = r.body["errorMessage"].as_str().expect("message");
        assert!(msg.contains(needle), "{msg:?} should mention {needle}");
        assert!(msg.len() < 512 && msg.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
    let r = c
        .post_raw(&url, Bytes::from_static(b"{not json"), |_| {})
        .await;
    assert_eq!(r.error_name(), "ValidationException");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_kms_operations_are_accepted() {
    // Spec: unknown requestMetadata fields and kmsOperation values MUST NOT be rejected.
    let p = TestProxy::start(Options::default()).await;
    let mut body = encrypt_body(b"x", None);
    body["requestMetadata"]["kmsOperation"] = json!("SomeFutureOperation");
    body["requestMetadata"]["someNewField"] = json!({"nested": true});
    body["topLevelExtra"] = json!(42);
    let r = p
        .client(false)
        .post(&key_url(&p, KEY, "encrypt"), &body)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_404_405_and_key_id_rules() {
    let p = TestProxy::start(Options {
        allowed_keys: Some(vec![KEY.into(), KEY_DISABLED.into()]),
        ..Options::default()
    })
    .await;
    let c = p.client(false);
    // Spec: any other path → 404 InvalidUriPathException.
    for path in [
        "/kms/xks/v1/health".to_owned(), // prefix not configured
        "/other/kms/xks/v1/health".to_owned(),
        format!("{PREFIX}/kms/xks/v1/keys/{KEY}/sign"),
        format!("{PREFIX}/kms/xks/v2/health"),
        "/".to_owned(),
    ] {
        let r = c.post(&p.url(&path), &health_body()).await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "InvalidUriPathException"),
            "{path}"
        );
    }
    // Spec: a non-POST on one of the four URIs MUST get 405.
    for path in [
        format!("{PREFIX}/kms/xks/v1/health"),
        format!("{PREFIX}/kms/xks/v1/keys/{KEY}/encrypt"),
    ] {
        let resp = c.http.get(p.url(&path)).send().await.expect("get");
        assert_eq!(resp.status().as_u16(), 405);
        assert_eq!(resp.headers()["allow"], "POST");
    }
    // Key ids outside [A-Za-z0-9._-]{1,128}: ValidationException (after authentication).
    let long = "k".repeat(129);
    for bad in ["bad%20id", long.as_str(), "bad:id"] {
        let r = c
            .post(&key_url(&p, bad, "encrypt"), &encrypt_body(b"x", None))
            .await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "ValidationException"),
            "{bad}"
        );
    }
    // A key outside the prefix's allow-list is "not found" for this tenant.
    let r = c
        .post(
            &key_url(&p, KEY_ENCRYPT_ONLY, "encrypt"),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!((r.status, r.error_name()), (404, "KeyNotFoundException"));
    let r = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_are_401() {
    // Spec: an invalid SigV4 signature → 401 AuthenticationFailedException.
    let p = TestProxy::start(Options::default()).await;
    let c = p.client(false);
    let url = health_url(&p);
    let body = Bytes::from(serde_json::to_vec(&health_body()).expect("json"));
    let wrong_secret = c.with_cred(Cred {
        akid: p.creds[0].akid.clone(),
        secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242".into(),
    });
    let unknown = c.with_cred(Cred {
        akid: "ABCDEFGHIJKLMNOPQRST".into(),
        secret: p.creds[0].secret.clone(),
    });
    let mut wrong_region = c.clone();
    wrong_region.region = "eu-west-1".into();
    for (name, client) in [
        ("wrong secret", &wrong_secret),
        ("unknown access key id", &unknown),
    ] {
        let r = client.post(&url, &health_body()).await;
        assert_eq!(
            (r.status, r.error_name()),
            (401, "AuthenticationFailedException"),
            "{name}"
        );
    }
    // Any region in the scope is fine when the config does not restrict it.
    assert_eq!(wrong_region.post(&url, &health_body()).await.status, 200);
    type Tamper = Box<dyn FnOnce(&mut http::Request<Bytes>)>;
    let tampers: Vec<(&str, Tamper)> = vec![
        (
            "no authorization",
            Box::new(|r| {
                r.headers_mut().remove("authorization");
            }),
        ),
        (
            "no x-amz-date",
            Box::new(|r| {
                r.headers_mut().remove("x-amz-date");
            }),
        ),
        (
            "tampered body",
            Box::new(|r| {
                *r.body_mut() = Bytes::from(
                    r.body()
                        .to_vec()
                        .into_iter()
                        .map(|b| if b == b'h' { b'H' } else { b })
                        .collect::<Vec<_>>(),
                );
            }),
        ),
        (
            "garbage authorization",
            Box::new(|r| {
                r.headers_mut().insert(
                    "authorization",
                    http::HeaderValue::from_static("AWS4-HMAC-SHA256 nonsense"),
                );
            }),
        ),
        (
            "basic auth",
            Box::new(|r| {
                r.headers_mut().insert(
                    "authorization",
                    http::HeaderValue::from_static("Basic dXNlcjpwYXNz"),
                );
            }),
        ),
        (
            "date changed",
            Box::new(|r| {
                r.headers_mut().insert(
                    "x-amz-date",
                    http::HeaderValue::from_static("20200101T000000Z"),
                );
            }),
        ),
    ];
    for (name, tamper) in tampers {
        let r = c.post_raw(&url, body.clone(), tamper).await;
        assert_eq!(
            (r.status, r.error_name()),
            (401, "AuthenticationFailedException"),
            "{name}"
        );
        let msg = r.body["errorMessage"].as_str().unwrap_or("");
        assert!(!msg.contains(p.creds[0].secret.expose()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_credentials_are_live_at_once() {
    // Spec: SHOULD accept at least two credential sets per path prefix (rotation).
    let p = TestProxy::start(Options::default()).await;
    for cred in &p.creds {
        let r = p
            .client(false)
            .with_cred(cred.clone())
            .post(&health_url(&p), &health_body())
            .await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prefix_and_second_tenant() {
    // Spec: the path prefix is optional; many prefixes = many logical keystores.
    let (akid, secret) = xks_proxy::config::generate_credential();
    let dir = tempfile::tempdir().expect("dir");
    let secret_path = dir.path().join("s");
    std::fs::write(&secret_path, secret.expose()).expect("write");
    // Two keystores: each names its keys (tenants are isolated by default).
    let extra = format!(
        "[[keystores]]\npath_prefix = \"\"\nallowed_keys = [\"{KEY}\"]\n[[keystores.credentials]]\naccess_key_id = \"{akid}\"\nsecret_file = \"{}\"\n",
        secret_path.display()
    );
    let p = TestProxy::start(Options {
        extra_keystores: extra,
        allowed_keys: Some(vec![KEY_ENCRYPT_ONLY.into()]),
        ..Options::default()
    })
    .await;
    let other = p.client(false).with_cred(Cred { akid, secret });
    let r = other
        .post(&p.url("/kms/xks/v1/health"), &health_body())
        .await;
    assert_eq!(r.status, 200);
    let r = other
        .post(
            &p.url(&format!("/kms/xks/v1/keys/{KEY}/encrypt")),
            &encrypt_body(b"x", None),
        )
        .await;
    assert_eq!(r.status, 200);
    // Tenant A's credentials do not open the empty prefix, and vice versa.
    let r = p
        .client(false)
        .post(&p.url("/kms/xks/v1/health"), &health_body())
        .await;
    assert_eq!(r.status, 401);
    let r = other.post(&health_url(&p), &health_body()).await;
    assert_eq!(r.status, 401);
}

/// A `[[keystores]]` entry for `prefix` with `keys` and one fresh credential (its secret
/// file written into `dir`).
fn tenant(dir: &std::path::Path, prefix: &str, keys: &str) -> (String, Cred) {
    let (akid, secret) = xks_proxy::config::generate_credential();
    let path = dir.join(format!("secret-{}", prefix.trim_start_matches('/')));
    std::fs::write(&path, secret.expose()).expect("write");
    let toml = format!(
        "[[keystores]]\npath_prefix = \"{prefix}\"\n{keys}\n[[keystores.credentials]]\naccess_key_id = \"{akid}\"\nsecret_file = \"{}\"\n",
        path.display()
    );
    (toml, Cred { akid, secret })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_use_another_tenants_key() {
    // Spec, URIs: "A path prefix identifies one logical keystore (tenant)". Issue 10 §3:
    // tenant /b, with its own valid credentials, asks for a key assigned to /example.
    // For /b's keystore that key does not exist, so the answer is the spec's row
    // "404 KeyNotFoundException — no such external key" (ApiError::KeyNotAllowed), the
    // same as for a key no keystore has: /b learns nothing about /example's keys.
    let dir = tempfile::tempdir().expect("dir");
    let (example_toml, example) = tenant(
        dir.path(),
        "/example",
        &format!("allowed_keys = [\"{KEY}\"]"),
    );
    let (b_toml, b) = tenant(
        dir.path(),
        "/b",
        &format!("allowed_keys = [\"{KEY_ENCRYPT_ONLY}\"]"),
    );
    // Before tenant isolation this config (no assignment) let /b encrypt under key-1.
    let (scratch, unassigned, _) = prepare(&Options {
        extra_keystores: example_toml.replace(&format!("allowed_keys = [\"{KEY}\"]"), "")
            + &b_toml.replace(&format!("allowed_keys = [\"{KEY_ENCRYPT_ONLY}\"]"), ""),
        allowed_keys: Some(vec![]),
        ..Options::default()
    });
    let e = xks_proxy::config::Config::from_toml(&unassigned, scratch.path()).expect_err("refused");
    assert_eq!(e.key, "keystores[1].allowed_keys", "{e}");
    assert!(e.problem.contains("path_prefix = \"/example\""), "{e}");

    let p = TestProxy::start(Options {
        extra_keystores: example_toml + &b_toml,
        allowed_keys: Some(vec![]),
        ..Options::default()
    })
    .await;
    let as_example = p.client(false).with_cred(example);
    let as_b = p.client(false).with_cred(b);
    let url =
        |prefix: &str, key: &str, op: &str| p.url(&format!("{prefix}/kms/xks/v1/keys/{key}/{op}"));

    // /example's own credentials work on its key.
    let enc = as_example
        .post(
            &url("/example", KEY, "encrypt"),
            &encrypt_body(b"tenant A's secret", None),
        )
        .await;
    assert_eq!(enc.status, 200, "{:?}", enc.body);
    let dec = as_example
        .post(
            &url("/example", KEY, "decrypt"),
            &decrypt_body(&enc.body, None),
        )
        .await;
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    assert_eq!(unb64(&dec.body["plaintext"]), b"tenant A's secret");

    // /b's valid credentials, through /b's prefix, on /example's key: 404 for every API.
    for (op, body) in [
        (
            "metadata",
            json!({"requestMetadata": metadata("DescribeKey")}),
        ),
        ("encrypt", encrypt_body(b"x", None)),
        ("decrypt", decrypt_body(&enc.body, None)),
    ] {
        let r = as_b.post(&url("/b", KEY, op), &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "KeyNotFoundException"),
            "{op}: {:?}",
            r.body
        );
        let unknown = as_b.post(&url("/b", "no-such-key", op), &body).await;
        assert_eq!(
            r.body, unknown.body,
            "{op}: indistinguishable from a missing key"
        );
    }
    // /b's credentials do not open /example's prefix either (401, SigV4 per prefix),
    // and /b still serves its own key.
    let r = as_b
        .post(&url("/example", KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (401, "AuthenticationFailedException")
    );
    let r = as_b
        .post(
            &url("/b", KEY_ENCRYPT_ONLY, "metadata"),
            &json!({"requestMetadata": metadata("DescribeKey")}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_on_the_main_and_the_plain_listener() {
    let p = TestProxy::start(Options {
        ping_listener: true,
        ..Options::default()
    })
    .await;
    let c = p.client(false);
    let resp = c.http.get(p.url("/ping")).send().await.expect("ping");
    assert_eq!(resp.status().as_u16(), 200);
    let plain = p.running.ping_addr.expect("ping listener");
    let resp = reqwest::get(format!("http://{plain}/ping"))
        .await
        .expect("plain ping");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = reqwest::get(format!("http://{plain}/kms/xks/v1/health"))
        .await
        .expect("other");
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_get_a_spec_error_not_a_hang() {
    // A declared length over the cap is refused without buffering it (the chunked case
    // is in tests/proxy/curl.rs, sent by curl): 200 KiB over HTTP/1.1, 1 MiB over HTTP/2.
    let p = TestProxy::start(Options::default()).await;
    let url = key_url(&p, KEY, "encrypt");
    let started = std::time::Instant::now();
    for (h2, size) in [(false, 200 * 1024), (true, 1024 * 1024)] {
        let c = p.client(h2);
        let resp = c
            .http
            .post(&url)
            .body(vec![b'a'; size])
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 501, "h2={h2}");
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
        assert_eq!(body["errorName"], "UnsupportedOperationException");
    }
    // A hang guard, not a speed check.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // The server is still fine.
    let c = p.client(false);
    assert_eq!(c.post(&health_url(&p), &health_body()).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_server_key_works() {
    // The spec's TLS 1.2 suites include ECDHE_RSA and ECDHE_ECDSA: both key types serve.
    let p = TestProxy::start(Options {
        rsa: true,
        ..Options::default()
    })
    .await;
    let r = p.client(false).post(&health_url(&p), &health_body()).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_spec_cipher_suites_are_offered() {
    use rustls::crypto::ring::cipher_suite as cs;
    let p = TestProxy::start(Options::default()).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    // Each of the spec's suites for an ECDSA key negotiates; in the FIPS build all but
    // ChaCha20-Poly1305, which is not an approved algorithm (tests/fips.rs).
    let chacha = cs::TLS13_CHACHA20_POLY1305_SHA256;
    let chacha_offered = !xks_proxy::crypto::FIPS;
    for suite in [
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ]
    .into_iter()
    .chain(chacha_offered.then_some(chacha))
    {
        let connector = tokio_rustls::TlsConnector::from(rustls_client(Some(vec![suite])));
        let tcp = tokio::net::TcpStream::connect(p.addr()).await.expect("tcp");
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .expect("handshake");
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(suite.suite())
        );
    }
    // Suites outside the spec's list are refused.
    for suite in [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
    .into_iter()
    .chain((!chacha_offered).then_some(chacha))
    {
        let connector = tokio_rustls::TlsConnector::from(rustls_client(Some(vec![suite])));
        let tcp = tokio::net::TcpStream::connect(p.addr()).await.expect("tcp");
        assert!(
            connector.connect(name.clone(), tcp).await.is_err(),
            "{suite:?} must be refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_are_cut_off() {
    // A client that connects and says nothing is closed after header_read_timeout.
    use tokio::io::AsyncReadExt;
    let p = TestProxy::start(Options {
        extra_server: "header_read_timeout_ms = 300\n".into(),
        ..Options::default()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(p.addr()).await.expect("tcp");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("server must close the connection, not leave it hanging");
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    // SIGTERM semantics: stop accepting, finish what is in flight. The key manager
    // takes 1 s and the request deadline is raised to 5 s, so the request is certainly
    // still in the key manager at the shutdown and certainly within its deadline.
    let (dir, text, creds) = prepare(&Options {
        simulated_latency_ms: 1000,
        ..Options::default()
    });
    let text = text + "\n[limits]\nbackend_deadline_ms = 5000\n";
    let p = TestProxy::start_with(dir, &text, creds).await;
    let c = p.client(false);
    let url = key_url(&p, KEY, "encrypt");
    let inflight = tokio::spawn({
        let c = c.clone();
        async move { c.post(&url, &encrypt_body(b"in flight", None)).await }
    });
    // The event: the request is being processed (authenticated, counted in flight;
    // the key manager then holds it for 1 s). Bounded wait.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while p.running.api.in_flight() == 0 {
        assert!(
            std::time::Instant::now() < until,
            "the request never got in flight"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    p.running.shutdown();
    let r = inflight.await.expect("join");
    assert_eq!(
        r.status, 200,
        "the in-flight request completes: {:?}",
        r.body
    );
    let addr = p.addr();
    tokio::time::timeout(std::time::Duration::from_secs(30), p.running.wait())
        .await
        .expect("drains (bounded)");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_503_and_health_unavailable_when_the_key_manager_is_down() {
    // A key manager slower than the call deadline fails its deep check: health reports
    // UNAVAILABLE (answered from the cache) and /ping tells the load balancer. The key
    // manager takes 1.5 s, so a deep check cannot end sooner.
    let p = TestProxy::start(Options {
        simulated_latency_ms: 1500,
        ..Options::default()
    })
    .await;
    let c = p.client(false);
    let resp = c.http.get(p.url("/ping")).send().await.expect("ping");
    assert_eq!(resp.status().as_u16(), 503);
    let started = std::time::Instant::now();
    let r = c.post(&health_url(&p), &health_body()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE");
    // Behaviour, with a wide margin: the answer came before any deep check could have
    // finished (each takes the key manager's 1.5 s), so it did not run or wait for one.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "health answers from its cache, not from a deep check: {:?}",
        started.elapsed()
    );
    // And a request that needs the key manager: 503 DependencyTimeoutException.
    let r = c
        .post(&key_url(&p, KEY, "encrypt"), &encrypt_body(b"x", None))
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (503, "DependencyTimeoutException")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_when_configured() {
    let (dir, text, creds) = prepare(&Options::default());
    let start = text.find("[server.tls]").expect("tls");
    let end = text[start..].find("\n\n").map(|e| start + e).expect("end");
    let plain = format!("{}{}", &text[..start], &text[end..]).replacen(
        "[server]\n",
        "[server]\ninsecure_plain_http = true\n",
        1,
    );
    let config = xks_proxy::config::Config::from_toml(&plain, dir.path()).expect("config");
    assert!(config.server.tls.is_none());
    let backends = xks_proxy::backend::open_all(&config.backends).expect("backend");
    let running = xks_proxy::server::start(&config, backends)
        .await
        .expect("start");
    assert_eq!(running.scheme, "http");
    let url = format!("http://{}{PREFIX}/kms/xks/v1/health", running.local_addr);
    let c = Client {
        http: reqwest::Client::new(),
        cred: creds[0].clone(),
        region: REGION.into(),
    };
    assert_eq!(c.post(&url, &health_body()).await.status, 200);
    // Without the flag, a missing [server.tls] is a config error.
    let no_flag = plain.replace("insecure_plain_http = true\n", "");
    let e = xks_proxy::config::Config::from_toml(&no_flag, dir.path()).expect_err("needs TLS");
    assert_eq!(e.key, "server.tls");
}
