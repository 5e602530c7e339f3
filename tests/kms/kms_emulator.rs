//! The KMS emulator against the in-test XKS responder (`kms_support`): the JSON
//! protocol, the six custom-key-store operations with their validation, uniqueness
//! and state rules, key management, cryptography with double encryption, every proxy
//! failure mapping, the quota, persistence across a restart and the periodic health
//! check. Everything runs over real sockets on 127.0.0.1.

use crate::kms_support;

use std::time::Duration;

use kms_support::*;
use serde_json::{Value, json};
use xks_proxy::kms::Config;

const PATH: &str = "/tenant-a/kms/xks/v1";

async fn setup() -> (Responder, Emu) {
    let r = Responder::start("/tenant-a").await;
    let e = Emu::start(config_for(r.addr)).await;
    (r, e)
}

async fn setup_with(f: impl FnOnce(&mut Config)) -> (Responder, Emu) {
    let r = Responder::start("/tenant-a").await;
    let mut cfg = config_for(r.addr);
    f(&mut cfg);
    let e = Emu::start(cfg).await;
    (r, e)
}

/// Polls `check` every 20 ms until it yields `Some`; fails naming `what` after 30 s (a
/// generous bound for an event, never a timing assertion).
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crate::harness::poll_async(Duration::from_secs(30), check)
        .await
        .unwrap_or_else(|| panic!("{what}: not within 30 s"))
}

/// A connected store with one XKS key on `key-1`; returns (store id, key ARN).
async fn connected_key(e: &Emu) -> (String, String) {
    let store = e.create_store("store-a", PATH).await;
    e.connect(&store).await;
    let key = e.create_xks_key(&store, "key-1").await;
    (store, key["Arn"].as_str().expect("arn").to_owned())
}

fn xks_create(name: &str) -> Value {
    xks_create_at(name, PATH)
}

/// A create request at `/tenant-a/<name>/kms/xks/v1`, unique per name.
fn xks_unique(name: &str) -> Value {
    xks_create_at(name, &format!("/tenant-a/{name}/kms/xks/v1"))
}

fn xks_create_at(name: &str, path: &str) -> Value {
    json!({
        "CustomKeyStoreName": name,
        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
        "XksProxyUriEndpoint": ENDPOINT,
        "XksProxyUriPath": path,
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
    })
}

#[tokio::test]
async fn every_response_has_a_request_id_and_errors_have_the_aws_shape() {
    let (r, e) = setup().await;
    let (status, headers, body) = e.raw("CreateCustomKeyStore", &xks_create("s1")).await;
    assert_eq!(status, 200, "{body}");
    let request_id = headers["x-amzn-requestid"].to_str().expect("id").to_owned();
    assert_eq!(request_id.len(), 36);
    // The same ID went to the proxy as kmsRequestId.
    let seen = r.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body["requestMetadata"]["kmsRequestId"],
        request_id.as_str()
    );
    assert_eq!(
        seen[0].body["requestMetadata"]["kmsOperation"],
        "CreateCustomKeyStore"
    );

    let (status, headers, body) = e.raw("NoSuchOperation", &json!({})).await;
    assert_eq!(status, 400);
    assert!(headers.contains_key("x-amzn-requestid"));
    assert_eq!(body["__type"], "UnknownOperationException");
    assert_eq!(headers["x-amzn-errortype"], "UnknownOperationException");

    let (ty, _, _) = e.err("EnableKeyRotation", json!({"KeyId": "x"})).await;
    assert_eq!(ty, "UnsupportedOperationException");

    // Malformed JSON and wrong member types.
    let resp = http_client()
        .post(&e.url)
        .header("x-amz-target", "TrentService.ListKeys")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(body["__type"], "SerializationException");
    let (ty, _, _) = e.err("ListKeys", json!({"Limit": "ten"})).await;
    assert_eq!(ty, "SerializationException");
}

#[tokio::test]
async fn the_full_lifecycle_of_a_store_and_its_key() {
    let (_r, e) = setup_with(|c| c.deletion_day_length = Duration::from_millis(40)).await;
    let store = e.create_store("lifecycle", PATH).await;
    assert!(store.starts_with("cks-") && store.len() == 21, "{store}");
    let s = e.store(&store).await;
    assert_eq!(s["ConnectionState"], "DISCONNECTED");
    assert_eq!(s["CustomKeyStoreType"], "EXTERNAL_KEY_STORE");
    assert!(s.get("ConnectionErrorCode").is_none());
    assert_eq!(s["XksProxyConfiguration"]["AccessKeyId"], AKID);
    assert_eq!(s["XksProxyConfiguration"]["UriEndpoint"], ENDPOINT);
    assert_eq!(s["XksProxyConfiguration"]["UriPath"], PATH);
    assert_eq!(
        s["XksProxyConfiguration"]["Connectivity"],
        "PUBLIC_ENDPOINT"
    );
    assert!(s["CreationDate"].is_f64() || s["CreationDate"].is_u64());
    // The secret is never returned.
    let all = e.ok("DescribeCustomKeyStores", json!({})).await;
    assert!(!all.to_string().contains(SECRET));
    assert_eq!(all["Truncated"], false);
    let by_name = e
        .ok(
            "DescribeCustomKeyStores",
            json!({"CustomKeyStoreName": "lifecycle"}),
        )
        .await;
    assert_eq!(
        by_name["CustomKeyStores"][0]["CustomKeyStoreId"],
        store.as_str()
    );

    // A key cannot be created while disconnected.
    let (ty, _, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "key-1"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");

    e.connect(&store).await;
    let key = e.create_xks_key(&store, "key-1").await;
    assert_eq!(key["Origin"], "EXTERNAL_KEY_STORE");
    assert_eq!(key["KeyState"], "Enabled");
    assert_eq!(key["Enabled"], true);
    assert_eq!(key["XksKeyConfiguration"]["Id"], "key-1");
    assert_eq!(key["CustomKeyStoreId"], store.as_str());
    assert_eq!(key["KeySpec"], "SYMMETRIC_DEFAULT");
    assert_eq!(key["KeyManager"], "CUSTOMER");
    assert_eq!(key["Description"], "");
    assert!(key.get("CurrentKeyMaterialId").is_none());
    let arn = key["Arn"].as_str().expect("arn").to_owned();
    assert!(arn.starts_with("arn:aws:kms:us-east-1:111122223333:key/"));

    let listed = e.ok("ListKeys", json!({})).await;
    assert_eq!(listed["Keys"][0]["KeyArn"], arn.as_str());

    let ct = e
        .ok("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"hello")}))
        .await;
    let pt = e
        .ok("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"hello");
    assert_eq!(pt["KeyId"], arn.as_str());

    // Deleting a connected store, or one with keys, is refused.
    let (ty, _, _) = e
        .err("DeleteCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");

    // Disconnect: the key reports Unavailable and cannot be used.
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    assert_eq!(e.store(&store).await["ConnectionState"], "DISCONNECTED");
    let d = e.ok("DescribeKey", json!({"KeyId": arn})).await;
    assert_eq!(d["KeyMetadata"]["KeyState"], "Unavailable");
    assert_eq!(d["KeyMetadata"]["Enabled"], false);
    let (ty, msg, status) = e
        .err("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"x")}))
        .await;
    assert_eq!((ty.as_str(), status), ("KMSInvalidStateException", 409));
    assert!(msg.contains("is unavailable"), "{msg}");
    // Disabling while Unavailable changes the stored state, shown after reconnect.
    e.ok("DisableKey", json!({"KeyId": arn})).await;
    e.connect(&store).await;
    let d = e.ok("DescribeKey", json!({"KeyId": arn})).await;
    assert_eq!(d["KeyMetadata"]["KeyState"], "Disabled");
    let (ty, msg, status) = e
        .err("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"x")}))
        .await;
    assert_eq!((ty.as_str(), status), ("DisabledException", 409));
    assert_eq!(msg, format!("{arn} is disabled."));
    e.ok("EnableKey", json!({"KeyId": arn})).await;
    let pt = e
        .ok("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"hello");

    // Schedule deletion; the store cannot be deleted until the key is gone.
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    let sched = e
        .ok(
            "ScheduleKeyDeletion",
            json!({"KeyId": arn, "PendingWindowInDays": 7}),
        )
        .await;
    assert_eq!(sched["KeyState"], "PendingDeletion");
    assert_eq!(sched["PendingWindowInDays"], 7);
    assert_eq!(sched["KeyId"], arn.as_str());
    let d = e.ok("DescribeKey", json!({"KeyId": arn})).await;
    // PendingDeletion is never hidden by Unavailable.
    assert_eq!(d["KeyMetadata"]["KeyState"], "PendingDeletion");
    assert!(d["KeyMetadata"]["DeletionDate"].as_f64().expect("date") > 0.0);
    let (ty, msg, _) = e.err("EnableKey", json!({"KeyId": arn})).await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(msg.ends_with("is pending deletion."));
    let (ty, _, _) = e
        .err("DeleteCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(ty, "CustomKeyStoreHasCMKsException");
    // 7 "days" of 40 ms: wait for the deletion (the event), bounded.
    eventually("the key is deleted after its 7 days", || async {
        let (status, _, _) = e.raw("DescribeKey", &json!({"KeyId": arn})).await;
        (status != 200).then_some(())
    })
    .await;
    let (ty, _, status) = e.err("DescribeKey", json!({"KeyId": arn})).await;
    assert_eq!((ty.as_str(), status), ("NotFoundException", 404));
    e.ok("DeleteCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    let (ty, _, _) = e
        .err(
            "DescribeCustomKeyStores",
            json!({"CustomKeyStoreId": store}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreNotFoundException");
}

#[tokio::test]
async fn proxy_requests_carry_kms_request_metadata_and_sigv4() {
    let (r, e) = setup_with(|c| {
        c.principals.insert(
            "AKIDCALLER".to_owned(),
            "arn:aws:iam::111122223333:role/app".to_owned(),
        );
        c.xks.via_service = Some("s3.amazonaws.com".to_owned());
    })
    .await;
    let (_store, arn) = connected_key(&e).await;
    r.clear_seen();
    let (_, headers, ct) = e
        .raw(
            "Encrypt",
            &json!({"KeyId": arn, "Plaintext": b64(b"data"), "EncryptionContext": {"a": "b"}}),
        )
        .await;
    let seen = r.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.path, "/tenant-a/kms/xks/v1/keys/key-1/encrypt");
    assert_eq!(
        s.host, XKS_HOST,
        "Host is the endpoint host, never the dialled port"
    );
    assert_eq!(s.signed_headers, "host;x-amz-date");
    let md = &s.body["requestMetadata"];
    assert_eq!(md["kmsOperation"], "Encrypt");
    assert_eq!(md["kmsKeyArn"], arn.as_str());
    assert_eq!(md["awsPrincipalArn"], "arn:aws:iam::111122223333:role/app");
    assert_eq!(
        md["kmsRequestId"],
        headers["x-amzn-requestid"].to_str().expect("id")
    );
    assert_eq!(s.body["encryptionAlgorithm"], "AES_GCM");
    assert_eq!(s.body["ciphertextDataIntegrityValueAlgorithm"], "SHA_256");
    // The proxy never sees the plaintext: it gets the inner layer (28 bytes more).
    assert_eq!(unb64(&s.body["plaintext"]).len(), 4 + 28);
    assert!(!s.body.to_string().contains(&b64(b"data")));

    r.clear_seen();
    e.ok(
        "Decrypt",
        json!({"CiphertextBlob": ct["CiphertextBlob"], "EncryptionContext": {"a": "b"}}),
    )
    .await;
    let seen = r.seen();
    assert_eq!(seen[0].body["requestMetadata"]["kmsOperation"], "Decrypt");
    assert_eq!(seen[0].body["ciphertextMetadata"], b64(b"v1"));

    // CreateKey's GetKeyMetadata has a principal but no kmsKeyArn.
    r.clear_seen();
    let store2 = e.create_store("second", "/tenant-a/x/kms/xks/v1").await;
    let _ = store2;
    let seen = r.seen();
    assert_eq!(
        seen[0].body["requestMetadata"]["kmsOperation"],
        "CreateCustomKeyStore"
    );
}

#[tokio::test]
async fn create_key_sends_metadata_without_a_key_arn() {
    let (r, e) = setup().await;
    let store = e.create_store("s", PATH).await;
    e.connect(&store).await;
    r.clear_seen();
    e.create_xks_key(&store, "key-1").await;
    let seen = r.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].path.ends_with("/keys/key-1/metadata"));
    let md = &seen[0].body["requestMetadata"];
    assert_eq!(md["kmsOperation"], "CreateKey");
    assert_eq!(md["awsPrincipalArn"], "arn:aws:iam::111122223333:root");
    assert!(md.get("kmsKeyArn").is_none());
}

#[tokio::test]
async fn cryptographic_operations_round_trip_and_check_inputs() {
    let (_r, e) = setup().await;
    let (_store, xks) = connected_key(&e).await;
    let local = e.ok("CreateKey", json!({"Description": "ordinary"})).await["KeyMetadata"].clone();
    assert_eq!(local["Origin"], "AWS_KMS");
    let local = local["Arn"].as_str().expect("arn").to_owned();
    let ec = json!({"purpose": "test", "tenant": "a"});

    for key in [&xks, &local] {
        let ct = e
            .ok(
                "Encrypt",
                json!({"KeyId": key, "Plaintext": b64(b"secret data"), "EncryptionContext": ec}),
            )
            .await;
        assert_eq!(ct["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
        let pt = e
            .ok(
                "Decrypt",
                json!({"CiphertextBlob": ct["CiphertextBlob"], "EncryptionContext": ec, "KeyId": key}),
            )
            .await;
        assert_eq!(unb64(&pt["Plaintext"]), b"secret data");
        // Wrong context: inside the proxy for XKS keys (KMSInvalidState), locally
        // for ordinary keys (InvalidCiphertext), as in real KMS.
        let (ty, _, _) = e
            .err(
                "Decrypt",
                json!({"CiphertextBlob": ct["CiphertextBlob"], "EncryptionContext": {"purpose": "other"}}),
            )
            .await;
        let want = if key == &xks {
            "KMSInvalidStateException"
        } else {
            "InvalidCiphertextException"
        };
        assert_eq!(ty, want);

        let dk = e
            .ok(
                "GenerateDataKey",
                json!({"KeyId": key, "KeySpec": "AES_256"}),
            )
            .await;
        assert_eq!(unb64(&dk["Plaintext"]).len(), 32);
        let back = e
            .ok("Decrypt", json!({"CiphertextBlob": dk["CiphertextBlob"]}))
            .await;
        assert_eq!(back["Plaintext"], dk["Plaintext"]);
        let dk = e
            .ok("GenerateDataKey", json!({"KeyId": key, "NumberOfBytes": 7}))
            .await;
        assert_eq!(unb64(&dk["Plaintext"]).len(), 7);
        let wp = e
            .ok(
                "GenerateDataKeyWithoutPlaintext",
                json!({"KeyId": key, "KeySpec": "AES_128", "EncryptionContext": ec}),
            )
            .await;
        assert!(wp.get("Plaintext").is_none());
        let back = e
            .ok(
                "Decrypt",
                json!({"CiphertextBlob": wp["CiphertextBlob"], "EncryptionContext": ec}),
            )
            .await;
        assert_eq!(unb64(&back["Plaintext"]).len(), 16);
    }

    // ReEncrypt both ways between an ordinary key and an XKS key.
    let ct = e
        .ok(
            "Encrypt",
            json!({"KeyId": local, "Plaintext": b64(b"move me")}),
        )
        .await;
    let moved = e
        .ok(
            "ReEncrypt",
            json!({"CiphertextBlob": ct["CiphertextBlob"], "DestinationKeyId": xks, "DestinationEncryptionContext": ec}),
        )
        .await;
    assert_eq!(moved["SourceKeyId"], local.as_str());
    assert_eq!(moved["KeyId"], xks.as_str());
    let back = e
        .ok(
            "ReEncrypt",
            json!({"CiphertextBlob": moved["CiphertextBlob"], "SourceEncryptionContext": ec, "DestinationKeyId": local}),
        )
        .await;
    let pt = e
        .ok("Decrypt", json!({"CiphertextBlob": back["CiphertextBlob"]}))
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"move me");

    // Input checks.
    let (ty, _, _) = e
        .err(
            "Decrypt",
            json!({"CiphertextBlob": ct["CiphertextBlob"], "KeyId": xks}),
        )
        .await;
    assert_eq!(ty, "IncorrectKeyException");
    let mut blob = unb64(&ct["CiphertextBlob"]);
    let last = blob.len() - 1;
    blob[last] ^= 1;
    let (ty, _, _) = e
        .err("Decrypt", json!({"CiphertextBlob": b64(&blob)}))
        .await;
    assert_eq!(ty, "InvalidCiphertextException");
    let (ty, _, _) = e
        .err("Decrypt", json!({"CiphertextBlob": b64(b"junk")}))
        .await;
    assert_eq!(ty, "InvalidCiphertextException");
    let (ty, _, status) = e
        .err(
            "Encrypt",
            json!({"KeyId": xks, "Plaintext": b64(b"x"), "DryRun": true}),
        )
        .await;
    assert_eq!((ty.as_str(), status), ("DryRunOperationException", 412));
    let (ty, _, _) = e
        .err(
            "Encrypt",
            json!({"KeyId": xks, "Plaintext": b64(b"x"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}),
        )
        .await;
    assert_eq!(ty, "InvalidKeyUsageException");
    let (ty, msg, _) = e
        .err(
            "Encrypt",
            json!({"KeyId": xks, "Plaintext": b64(&[0u8; 4097])}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    assert!(msg.contains("'plaintext'") && msg.contains("4096"), "{msg}");
    let (ty, _, _) = e
        .err(
            "GenerateDataKey",
            json!({"KeyId": xks, "NumberOfBytes": 8, "KeySpec": "AES_256"}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, _) = e.err("GenerateDataKey", json!({"KeyId": xks})).await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, status) = e
        .err(
            "Encrypt",
            json!({"KeyId": "11111111-2222-3333-4444-555555555555", "Plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!((ty.as_str(), status), ("NotFoundException", 404));
    let (ty, _, _) = e
        .err(
            "Encrypt",
            json!({"KeyId": "arn:aws:kms:broken", "Plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!(ty, "InvalidArnException");
    let (ty, _, _) = e
        .err(
            "Encrypt",
            json!({"KeyId": "alias/none", "Plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!(ty, "NotFoundException");
    let (ty, _, _) = e
        .err(
            "GenerateRandom",
            json!({"NumberOfBytes": 8, "CustomKeyStoreId": _store}),
        )
        .await;
    assert_eq!(ty, "UnsupportedOperationException");
    let rnd = e.ok("GenerateRandom", json!({"NumberOfBytes": 8})).await;
    assert_eq!(unb64(&rnd["Plaintext"]).len(), 8);
}

#[tokio::test]
async fn invalid_proxy_answers_are_never_accepted() {
    let (r, e) = setup().await;
    let (_store, arn) = connected_key(&e).await;
    let interpret = "AWS KMS cannot interpret the response from the external key store proxy";
    for mode in [Mode::ShortCiphertext, Mode::BadCdiv, Mode::LongMetadata] {
        r.set(|s| s.mode = mode.clone());
        let (ty, msg, status) = e
            .err("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"abc")}))
            .await;
        assert_eq!(
            (ty.as_str(), status),
            ("KMSInvalidStateException", 409),
            "{mode:?}"
        );
        assert!(msg.starts_with(interpret), "{mode:?}: {msg}");
    }
    r.set(|s| s.mode = Mode::Good);
    let ct = e
        .ok("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"abc")}))
        .await;
    r.set(|s| s.mode = Mode::CorruptDecrypt);
    let (ty, msg, _) = e
        .err("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(msg.contains("submitted for decryption"), "{msg}");
    r.set(|s| s.mode = Mode::Raw("{\"plaintext\": 5}"));
    let (ty, msg, _) = e
        .err("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(msg.starts_with(interpret));
    // Every proxy error name becomes KMSInvalidStateException with its own message.
    for (status, name, gist) in [
        (400, "ValidationException", "cannot interpret"),
        (
            400,
            "InvalidStateException",
            "is not enabled in the external key manager",
        ),
        (
            400,
            "InvalidKeyUsageException",
            "does not support the requested operation",
        ),
        (
            401,
            "AuthenticationFailedException",
            "could not authenticate AWS KMS",
        ),
        (403, "AccessDeniedException", "denied access"),
        (
            404,
            "KeyNotFoundException",
            "was not found in its external key manager",
        ),
        (404, "InvalidUriPathException", "invalid URI path"),
        (429, "ThrottlingException", "very high request rate"),
        (
            501,
            "UnsupportedOperationException",
            "does not support the requested operation",
        ),
        (
            503,
            "DependencyTimeoutException",
            "did not respond to the request in the time allotted",
        ),
        (
            500,
            "InternalException",
            "cannot communicate with the external key manager",
        ),
    ] {
        r.set(|s| s.mode = Mode::Error(status, name));
        let (ty, msg, _) = e
            .err("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"abc")}))
            .await;
        assert_eq!(ty, "KMSInvalidStateException", "{name}");
        assert!(msg.contains(gist), "{name}: {msg}");
        assert!(
            !msg.contains("canned"),
            "the proxy's errorMessage is never passed on"
        );
    }
    r.set(|s| s.mode = Mode::Error(400, "InvalidCiphertextException"));
    let (ty, msg, _) = e
        .err("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(
        msg.contains("ciphertext or encryption context is corrupted"),
        "{msg}"
    );
}

#[tokio::test]
async fn create_and_connect_failures_map_like_kms() {
    let r = Responder::start("/tenant-a").await;
    let e = Emu::start(config_for(r.addr)).await;

    // Wrong credentials.
    r.set(|s| s.credentials = vec![(AKID2.to_owned(), SECRET2.to_owned())]);
    let (ty, _, _) = e.err("CreateCustomKeyStore", xks_create("a")).await;
    assert_eq!(ty, "XksProxyIncorrectAuthenticationCredentialException");
    r.set(|s| s.credentials = vec![(AKID.to_owned(), SECRET.to_owned())]);
    let store = e.create_store("a", PATH).await;
    r.set(|s| s.credentials = vec![(AKID2.to_owned(), SECRET2.to_owned())]);
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    let s = e.wait_connection(&store).await;
    assert_eq!(s["ConnectionState"], "FAILED");
    assert_eq!(s["ConnectionErrorCode"], "INVALID_CREDENTIALS");
    // FAILED: connect is refused until disconnected; disconnect clears the code.
    let (ty, _, _) = e
        .err("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    let s = e.store(&store).await;
    assert_eq!(s["ConnectionState"], "DISCONNECTED");
    assert!(s.get("ConnectionErrorCode").is_none());
    r.set(|s| s.credentials = vec![(AKID.to_owned(), SECRET.to_owned())]);

    // Wrong path.
    let mut req = xks_create("b");
    req["XksProxyUriPath"] = json!("/wrong/kms/xks/v1");
    let (ty, _, _) = e.err("CreateCustomKeyStore", req).await;
    assert_eq!(ty, "XksProxyInvalidConfigurationException");
    r.set(|s| s.prefix = "/moved".to_owned());
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(
        e.wait_connection(&store).await["ConnectionErrorCode"],
        "XKS_PROXY_INVALID_CONFIGURATION"
    );
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    r.set(|s| s.prefix = "/tenant-a".to_owned());

    // All external key managers UNAVAILABLE.
    r.set(|s| s.health_statuses = vec!["UNAVAILABLE", "UNAVAILABLE"]);
    let (ty, msg, _) = e.err("CreateCustomKeyStore", xks_unique("c")).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert!(msg.contains("none of its external key managers"), "{msg}");
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(
        e.wait_connection(&store).await["ConnectionErrorCode"],
        "XKS_PROXY_NOT_REACHABLE"
    );
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    // DEGRADED still serves.
    r.set(|s| s.health_statuses = vec!["UNAVAILABLE", "DEGRADED"]);
    e.connect(&store).await;
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    r.set(|s| s.health_statuses = vec!["ACTIVE"]);

    // Malformed health answers.
    r.set(|s| s.mode = Mode::Raw("{\"xksProxyFleetSize\": 0}"));
    let (ty, _, _) = e.err("CreateCustomKeyStore", xks_unique("d")).await;
    assert_eq!(ty, "XksProxyInvalidResponseException");
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(
        e.wait_connection(&store).await["ConnectionErrorCode"],
        "XKS_PROXY_INVALID_RESPONSE"
    );
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    r.set(|s| s.mode = Mode::Error(403, "AccessDeniedException"));
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(
        e.wait_connection(&store).await["ConnectionErrorCode"],
        "XKS_PROXY_ACCESS_DENIED"
    );
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    r.set(|s| s.mode = Mode::Good);

    // Too slow: 250 ms per attempt, retried once, then TIMED_OUT.
    r.set(|s| s.delay = Duration::from_millis(400));
    r.clear_seen();
    let started = std::time::Instant::now();
    let (ty, msg, _) = e.err("CreateCustomKeyStore", xks_unique("e")).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert!(msg.contains("did not respond in time"), "{msg}");
    let took = started.elapsed();
    // Two attempts that each waited the full 250 ms (a lower bound is behaviour: the
    // emulator cannot give up sooner); the upper bound only catches a hang.
    assert!(
        took >= Duration::from_millis(480) && took < Duration::from_secs(30),
        "{took:?}"
    );
    assert_eq!(r.seen().len(), 2, "exactly one retry after a timeout");
    // And no third attempt turns up later (a quiet period: nothing to wait for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.seen().len(), 2, "exactly one retry after a timeout");
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(
        e.wait_connection(&store).await["ConnectionErrorCode"],
        "XKS_PROXY_TIMED_OUT"
    );
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    r.set(|s| s.delay = Duration::ZERO);
}

#[tokio::test]
async fn unreachable_and_untrusted_proxies() {
    // Nothing listens on this port any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let e = Emu::start(config_for(closed)).await;
    let (ty, msg, _) = e.err("CreateCustomKeyStore", xks_create("down")).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert!(msg.contains("cannot communicate"), "{msg}");

    // A store created while the proxy was up, connected after it went down.
    let r = Responder::start("/tenant-a").await;
    let mut cfg = config_for(r.addr);
    cfg.xks
        .resolve
        .push(("down.test.example".to_owned(), closed));
    let e = Emu::start(cfg).await;
    let store = e.create_store("up", PATH).await;
    let mut req = xks_create("down");
    req["XksProxyUriEndpoint"] = json!("https://down.test.example");
    let (ty, _, _) = e.err("CreateCustomKeyStore", req).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    // Point the store at the dead host (allowed while DISCONNECTED) – the health
    // check with the new values fails, so nothing changes.
    let (ty, _, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "XksProxyUriEndpoint": "https://down.test.example"}),
        )
        .await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert_eq!(
        e.store(&store).await["XksProxyConfiguration"]["UriEndpoint"],
        ENDPOINT
    );

    // A CA bundle that does not hold the proxy's CA: TLS failure.
    let mut cfg = config_for(r.addr);
    cfg.xks.ca_bundle = Some(repo().join("certs/self-signed-client.pem"));
    let e2 = Emu::start(cfg).await;
    let (ty, msg, _) = e2.err("CreateCustomKeyStore", xks_unique("tls")).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert!(msg.contains("TLS"), "{msg}");
    // Connect on a store made with a trusting emulator, sharing no state: use the
    // VPC path (no health check on create) to get a store into e2.
    let vpc = e2
        .ok(
            "CreateCustomKeyStore",
            json!({
                "CustomKeyStoreName": "vpc",
                "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                "XksProxyUriEndpoint": ENDPOINT,
                "XksProxyUriPath": PATH,
                "XksProxyConnectivity": "VPC_ENDPOINT_SERVICE",
                "XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
                "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
            }),
        )
        .await["CustomKeyStoreId"]
        .as_str()
        .expect("id")
        .to_owned();
    let s = e2.store(&vpc).await;
    assert_eq!(
        s["XksProxyConfiguration"]["VpcEndpointServiceName"],
        "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"
    );
    assert_eq!(
        s["XksProxyConfiguration"]["VpcEndpointServiceOwner"],
        "111122223333"
    );
    e2.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": vpc}))
        .await;
    assert_eq!(
        e2.wait_connection(&vpc).await["ConnectionErrorCode"],
        "XKS_PROXY_INVALID_TLS_CONFIGURATION"
    );
}

#[tokio::test]
async fn create_key_checks_the_external_key() {
    let (r, e) = setup().await;
    let store = e.create_store("s", PATH).await;
    e.connect(&store).await;
    r.set(|s| {
        let mut k = ExtKey::aes256();
        k.spec = "AES_128";
        s.keys.insert("aes128".into(), k);
        let mut k = ExtKey::aes256();
        k.usage = vec!["ENCRYPT"];
        s.keys.insert("encrypt-only".into(), k);
        let mut k = ExtKey::aes256();
        k.status = "DISABLED";
        s.keys.insert("disabled".into(), k);
    });
    let create = |id: &str| json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": id});
    let (ty, _, _) = e.err("CreateKey", create("missing")).await;
    assert_eq!(ty, "XksKeyNotFoundException");
    for id in ["aes128", "encrypt-only", "disabled"] {
        let (ty, msg, _) = e.err("CreateKey", create(id)).await;
        assert_eq!(ty, "XksKeyInvalidConfigurationException", "{id}");
        assert!(msg.contains(id), "{msg}");
    }
    e.ok("CreateKey", create("key-1")).await;
    let (ty, _, _) = e.err("CreateKey", create("key-1")).await;
    assert_eq!(ty, "XksKeyAlreadyInUseException");
    let (ty, _, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": "cks-00000000000000000", "XksKeyId": "k"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreNotFoundException");
    for (status, name, want) in [
        (
            501,
            "UnsupportedOperationException",
            "XksKeyInvalidResponseException",
        ),
        (
            400,
            "InvalidStateException",
            "XksKeyInvalidConfigurationException",
        ),
        (
            401,
            "AuthenticationFailedException",
            "CustomKeyStoreInvalidStateException",
        ),
        (
            403,
            "AccessDeniedException",
            "CustomKeyStoreInvalidStateException",
        ),
        (
            500,
            "InternalException",
            "CustomKeyStoreInvalidStateException",
        ),
    ] {
        r.set(|s| s.mode = Mode::Error(status, name));
        let (ty, _, _) = e.err("CreateKey", create("other")).await;
        assert_eq!(ty, want, "{name}");
    }
    r.set(|s| s.mode = Mode::Good);
    // Parameter rules.
    let (ty, _, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, _) = e.err("CreateKey", json!({"XksKeyId": "k"})).await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "k", "KeySpec": "RSA_2048"}),
        )
        .await;
    assert_eq!(ty, "UnsupportedOperationException");
    let (ty, _, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "bad/id"}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
}

#[tokio::test]
async fn store_validation_and_uniqueness_rules() {
    let (_r, e) = setup().await;
    let bad: Vec<(Value, &str)> = vec![
        (json!({"CustomKeyStoreName": ""}), "customKeyStoreName"),
        (json!({}), "customKeyStoreName"),
        (
            json!({"XksProxyUriEndpoint": "https://xks.test.example:8443"}),
            "xksProxyUriEndpoint",
        ),
        (
            json!({"XksProxyUriEndpoint": "http://xks.test.example"}),
            "xksProxyUriEndpoint",
        ),
        (
            json!({"XksProxyUriEndpoint": "https://a"}),
            "xksProxyUriEndpoint",
        ),
        (
            json!({"XksProxyUriPath": "/kms/xks/v1/extra"}),
            "xksProxyUriPath",
        ),
        (
            json!({"XksProxyUriPath": "/tenant/kms/xks"}),
            "xksProxyUriPath",
        ),
        (
            json!({"XksProxyConnectivity": "PRIVATE"}),
            "xksProxyConnectivity",
        ),
        (json!({"CustomKeyStoreType": "OTHER"}), "customKeyStoreType"),
        (
            json!({"XksProxyAuthenticationCredential": {"AccessKeyId": "SHORT", "RawSecretAccessKey": SECRET}}),
            "accessKeyId",
        ),
        (
            json!({"XksProxyAuthenticationCredential": {"AccessKeyId": "akiaxkstestcredential2", "RawSecretAccessKey": SECRET}}),
            "accessKeyId",
        ),
        (
            json!({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": "short"}}),
            "rawSecretAccessKey",
        ),
        (
            json!({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID}}),
            "rawSecretAccessKey",
        ),
        (
            json!({"XksProxyUriPath": null, "XksProxyUriEndpoint": null}),
            "xksProxyUriEndpoint",
        ),
        (
            json!({"XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-0123"}),
            "xksProxyVpcEndpointServiceName",
        ),
        (
            json!({"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE"}),
            "xksProxyVpcEndpointServiceName",
        ),
        (
            json!({"CloudHsmClusterId": "cluster-234567abcdefg"}),
            "cloudHsmClusterId",
        ),
    ];
    for (patch, member) in bad {
        let mut req = xks_create("v");
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                req.as_object_mut().expect("object").remove(k);
            } else {
                req[k] = v.clone();
            }
        }
        if patch.as_object().expect("object").is_empty() {
            req.as_object_mut()
                .expect("object")
                .remove("CustomKeyStoreName");
        }
        let (ty, msg, status) = e.err("CreateCustomKeyStore", req.clone()).await;
        assert_eq!(
            (ty.as_str(), status),
            ("ValidationException", 400),
            "{req}: {msg}"
        );
        assert!(msg.contains(member), "{member}: {msg}");
        assert!(
            !msg.contains(SECRET) && !msg.contains(AKID),
            "sensitive value echoed: {msg}"
        );
    }

    // CloudHSM (the default type) fails in KMS's terms, not with a crash.
    let (ty, _, _) = e
        .err(
            "CreateCustomKeyStore",
            json!({"CustomKeyStoreName": "hsm", "CloudHsmClusterId": "cluster-234567abcdefg",
                   "TrustAnchorCertificate": "cert", "KeyStorePassword": "password1"}),
        )
        .await;
    assert_eq!(ty, "CloudHsmClusterNotFoundException");

    let a = e.create_store("unique", PATH).await;
    let (ty, _, _) = e.err("CreateCustomKeyStore", xks_create("unique")).await;
    assert_eq!(ty, "CustomKeyStoreNameInUseException");
    let (ty, _, _) = e.err("CreateCustomKeyStore", xks_create("other")).await;
    assert_eq!(ty, "XksProxyUriInUseException");
    // PUBLIC stores may share an endpoint with different paths.
    let b = e.create_store("other", "/tenant-a/b/kms/xks/v1").await;
    // A VPC store may not reuse an endpoint another store uses.
    let vpc = |name: &str, endpoint: &str, svc: &str| {
        json!({
            "CustomKeyStoreName": name,
            "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
            "XksProxyUriEndpoint": endpoint,
            "XksProxyUriPath": "/kms/xks/v1",
            "XksProxyConnectivity": "VPC_ENDPOINT_SERVICE",
            "XksProxyVpcEndpointServiceName": format!("com.amazonaws.vpce.us-east-1.vpce-svc-{svc}"),
            "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
        })
    };
    let (ty, _, _) = e
        .err("CreateCustomKeyStore", vpc("v1", ENDPOINT, "aaaa"))
        .await;
    assert_eq!(ty, "XksProxyUriEndpointInUseException");
    e.ok(
        "CreateCustomKeyStore",
        vpc("v1", "https://vpc1.example.com", "aaaa"),
    )
    .await;
    let (ty, _, _) = e
        .err(
            "CreateCustomKeyStore",
            vpc("v2", "https://vpc2.example.com", "aaaa"),
        )
        .await;
    assert_eq!(ty, "XksProxyVpcEndpointServiceInUseException");
    // 10 stores at most.
    for i in 3..10 {
        e.ok(
            "CreateCustomKeyStore",
            vpc(
                &format!("v{i}"),
                &format!("https://vpc{i}.example.com"),
                &format!("b{i}"),
            ),
        )
        .await;
    }
    let (ty, _, _) = e
        .err(
            "CreateCustomKeyStore",
            vpc("v11", "https://vpc11.example.com", "c11"),
        )
        .await;
    assert_eq!(ty, "LimitExceededException");

    // Describe: pagination, selectors, markers.
    let page = e.ok("DescribeCustomKeyStores", json!({"Limit": 4})).await;
    assert_eq!(page["CustomKeyStores"].as_array().expect("list").len(), 4);
    assert_eq!(page["Truncated"], true);
    let mut seen = 4;
    let mut marker = page["NextMarker"].clone();
    for _ in 0..10 {
        let p = e
            .ok(
                "DescribeCustomKeyStores",
                json!({"Limit": 4, "Marker": marker}),
            )
            .await;
        seen += p["CustomKeyStores"].as_array().expect("list").len();
        if p["Truncated"] == false {
            assert!(p.get("NextMarker").is_none());
            break;
        }
        marker = p["NextMarker"].clone();
    }
    assert_eq!(seen, 10);
    let (ty, _, _) = e
        .err("DescribeCustomKeyStores", json!({"Marker": "nonsense"}))
        .await;
    assert_eq!(ty, "InvalidMarkerException");
    let (ty, _, _) = e
        .err(
            "DescribeCustomKeyStores",
            json!({"CustomKeyStoreId": a, "CustomKeyStoreName": "unique"}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, _) = e
        .err(
            "DescribeCustomKeyStores",
            json!({"CustomKeyStoreName": "nope"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreNotFoundException");
    let (ty, _, _) = e.err("DescribeCustomKeyStores", json!({"Limit": 0})).await;
    assert_eq!(ty, "ValidationException");
    let (ty, _, _) = e
        .err(
            "DeleteCustomKeyStore",
            json!({"CustomKeyStoreId": "cks-nope"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreNotFoundException");
    let (ty, _, _) = e
        .err("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": b}))
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
    let (ty, _, _) = e.err("ConnectCustomKeyStore", json!({})).await;
    assert_eq!(ty, "ValidationException");
}

#[tokio::test]
async fn update_rules_per_state_and_credential_rotation() {
    let (r, e) = setup().await;
    let store = e.create_store("u", PATH).await;
    e.connect(&store).await;
    let key = e.create_xks_key(&store, "key-1").await["Arn"]
        .as_str()
        .expect("arn")
        .to_owned();
    // Allowed while CONNECTED: name, credential, path.
    e.ok(
        "UpdateCustomKeyStore",
        json!({"CustomKeyStoreId": store, "NewCustomKeyStoreName": "renamed"}),
    )
    .await;
    assert_eq!(e.store(&store).await["CustomKeyStoreName"], "renamed");
    // Not allowed while CONNECTED: endpoint and connectivity.
    let (ty, _, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "XksProxyUriEndpoint": "https://other.example.com"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
    // Both credential halves are required.
    let (ty, msg, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "XksProxyAuthenticationCredential": {"AccessKeyId": AKID2}}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    assert!(msg.contains("rawSecretAccessKey"), "{msg}");
    // New credentials the proxy does not know yet: refused, old ones stay.
    let rotate = json!({"CustomKeyStoreId": store,
        "XksProxyAuthenticationCredential": {"AccessKeyId": AKID2, "RawSecretAccessKey": SECRET2}});
    let (ty, _, _) = e.err("UpdateCustomKeyStore", rotate.clone()).await;
    assert_eq!(ty, "XksProxyIncorrectAuthenticationCredentialException");
    assert_eq!(
        e.store(&store).await["XksProxyConfiguration"]["AccessKeyId"],
        AKID
    );
    // The proxy holds both; rotate; then the proxy drops the old one.
    r.set(|s| s.credentials.push((AKID2.to_owned(), SECRET2.to_owned())));
    r.clear_seen();
    e.ok("UpdateCustomKeyStore", rotate).await;
    let seen = r.seen();
    assert_eq!(
        seen[0].body["requestMetadata"]["kmsOperation"],
        "UpdateCustomKeyStore"
    );
    assert_eq!(
        e.store(&store).await["XksProxyConfiguration"]["AccessKeyId"],
        AKID2
    );
    r.set(|s| s.credentials = vec![(AKID2.to_owned(), SECRET2.to_owned())]);
    e.ok(
        "Encrypt",
        json!({"KeyId": key, "Plaintext": b64(b"after rotation")}),
    )
    .await;
    // Path change while connected, checked with the new value.
    let (ty, _, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "XksProxyUriPath": "/elsewhere/kms/xks/v1"}),
        )
        .await;
    assert_eq!(ty, "XksProxyInvalidConfigurationException");
    // Connectivity switch to VPC needs a new endpoint and a service name.
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    let (ty, _, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "XksProxyConnectivity": "VPC_ENDPOINT_SERVICE"}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    e.ok(
        "UpdateCustomKeyStore",
        json!({"CustomKeyStoreId": store, "XksProxyConnectivity": "VPC_ENDPOINT_SERVICE",
               "XksProxyUriEndpoint": "https://vpc.example.com",
               "XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-0abc"}),
    )
    .await;
    // And back to PUBLIC with an empty service name (the one "" allowed).
    e.ok(
        "UpdateCustomKeyStore",
        json!({"CustomKeyStoreId": store, "XksProxyConnectivity": "PUBLIC_ENDPOINT",
               "XksProxyUriEndpoint": ENDPOINT, "XksProxyVpcEndpointServiceName": ""}),
    )
    .await;
    let s = e.store(&store).await;
    assert_eq!(
        s["XksProxyConfiguration"]["Connectivity"],
        "PUBLIC_ENDPOINT"
    );
    assert!(
        s["XksProxyConfiguration"]
            .get("VpcEndpointServiceName")
            .is_none()
    );
    // FAILED stores cannot be updated.
    r.set(|s| s.mode = Mode::Error(500, "InternalException"));
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(e.wait_connection(&store).await["ConnectionState"], "FAILED");
    let (ty, _, _) = e
        .err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "NewCustomKeyStoreName": "x"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
}

#[tokio::test]
async fn connecting_is_asynchronous_and_disconnect_cancels_it() {
    let (r, e) = setup_with(|c| {
        c.connect_delay = Duration::from_millis(300);
        c.disconnect_delay = Duration::from_millis(200);
    })
    .await;
    let store = e.create_store("slow", PATH).await;
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(e.store(&store).await["ConnectionState"], "CONNECTING");
    // Connect again while CONNECTING: accepted, no change.
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    let (ty, _, _) = e
        .err("DeleteCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
    // Disconnect during the attempt: its result is dropped.
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    assert_eq!(e.store(&store).await["ConnectionState"], "DISCONNECTING");
    let (ty, _, _) = e
        .err("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException");
    eventually("the store becomes DISCONNECTED", || async {
        (e.store(&store).await["ConnectionState"] == "DISCONNECTED").then_some(())
    })
    .await;
    // The cancelled attempt wakes 300 ms after the connect and must then send nothing:
    // a quiet period (something that must NOT happen has no event to wait for), well
    // past its wake-up.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(r.seen().len() == 1, "no health check after the disconnect");
    e.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": store}))
        .await;
    let s = e.wait_connection(&store).await;
    assert_eq!(s["ConnectionState"], "CONNECTED");
}

#[tokio::test]
async fn the_per_store_quota_throttles() {
    let (_r, e) = setup_with(|c| c.store_rps = 3).await;
    let (_store, arn) = connected_key(&e).await;
    let mut throttled = 0;
    for _ in 0..6 {
        let (status, _, body) = e
            .raw("Encrypt", &json!({"KeyId": arn, "Plaintext": b64(b"x")}))
            .await;
        if status != 200 {
            assert_eq!(status, 400);
            assert_eq!(body["__type"], "ThrottlingException");
            throttled += 1;
        }
    }
    assert!(throttled >= 2, "{throttled}");
    // Ordinary keys are not charged to any store.
    let local = e.ok("CreateKey", json!({})).await["KeyMetadata"]["KeyId"].clone();
    for _ in 0..10 {
        e.ok("Encrypt", json!({"KeyId": local, "Plaintext": b64(b"x")}))
            .await;
    }
}

#[tokio::test]
async fn state_survives_a_restart_with_a_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Responder::start("/tenant-a").await;
    let mut cfg = config_for(r.addr);
    cfg.data_dir = Some(dir.path().to_owned());
    let e = Emu::start(cfg.clone()).await;
    let (store, arn) = connected_key(&e).await;
    let local = e.ok("CreateKey", json!({})).await["KeyMetadata"]["Arn"].clone();
    let ct = e
        .ok(
            "Encrypt",
            json!({"KeyId": arn, "Plaintext": b64(b"durable"), "EncryptionContext": {"k": "v"}}),
        )
        .await;
    let ct2 = e
        .ok(
            "Encrypt",
            json!({"KeyId": local, "Plaintext": b64(b"durable too")}),
        )
        .await;
    e.stop().await;

    let e = Emu::start(cfg).await;
    assert_eq!(e.store(&store).await["ConnectionState"], "CONNECTED");
    let pt = e
        .ok(
            "Decrypt",
            json!({"CiphertextBlob": ct["CiphertextBlob"], "EncryptionContext": {"k": "v"}}),
        )
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"durable");
    let pt = e
        .ok("Decrypt", json!({"CiphertextBlob": ct2["CiphertextBlob"]}))
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"durable too");
    let d = e.ok("DescribeKey", json!({"KeyId": arn})).await;
    assert_eq!(d["KeyMetadata"]["XksKeyConfiguration"]["Id"], "key-1");
}

#[tokio::test]
async fn periodic_health_checks_never_change_the_state() {
    let (r, e) = setup_with(|c| c.health_interval = Duration::from_millis(100)).await;
    let store = e.create_store("h", PATH).await;
    e.connect(&store).await;
    let periodic = || {
        r.seen()
            .iter()
            .filter(|s| s.body["requestMetadata"]["kmsOperation"] == "KmsHealthCheck")
            .count()
    };
    eventually("two successful periodic health checks", || async {
        let stats = e.emulator.health_stats();
        stats.get(&store).is_some_and(|s| s.ok >= 2).then_some(())
    })
    .await;
    assert!(periodic() >= 2, "{} KmsHealthCheck requests", periodic());
    r.set(|s| s.mode = Mode::Error(500, "InternalException"));
    eventually("a failed periodic health check", || async {
        let stats = e.emulator.health_stats();
        stats
            .get(&store)
            .is_some_and(|s| s.failed >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(e.store(&store).await["ConnectionState"], "CONNECTED");
    let stats = e.emulator.health_stats();
    assert!(
        stats[&store].ok >= 2 && stats[&store].failed >= 1,
        "{stats:?}"
    );
    // The emulator-only status route.
    let resp = http_client()
        .get(format!("{}/_emulator/health-checks", e.url))
        .send()
        .await
        .expect("get");
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert!(body[&store]["failed"].as_u64().expect("count") >= 1);
    // Disconnected stores are not checked.
    e.ok(
        "DisconnectCustomKeyStore",
        json!({"CustomKeyStoreId": store}),
    )
    .await;
    // A check already on its way may still land: let it (generously), then a quiet
    // period of several intervals must see none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.clear_seen();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        r.seen().is_empty(),
        "{} checks after the disconnect",
        r.seen().len()
    );
}

#[tokio::test]
async fn caller_signatures_are_checked_when_asked() {
    use std::time::SystemTime;
    use xks_proxy::secret::SecretString;
    let (_r, e) = setup_with(|c| {
        c.client_credentials = Some(vec![(
            "AKIDCALLER".to_owned(),
            SecretString::from("caller-secret"),
        )]);
    })
    .await;
    // The harness sends a fake signature (no X-Amz-Date, made-up signature).
    let (ty, _, _) = e.err("ListKeys", json!({})).await;
    assert!(
        ty == "IncompleteSignatureException" || ty == "InvalidSignatureException",
        "{ty}"
    );
    let send = |akid: &'static str, secret: &'static str| {
        let url = e.url.clone();
        async move {
            let mut req = http::Request::builder()
                .method("POST")
                .uri(&url)
                .header("x-amz-target", "TrentService.ListKeys")
                .header("content-type", "application/x-amz-json-1.1")
                .body(bytes::Bytes::from_static(b"{}"))
                .expect("request");
            xks_proxy::sigv4::sign_request(
                &mut req,
                akid,
                &SecretString::from(secret),
                "us-east-1",
                "kms",
                SystemTime::now(),
            )
            .expect("sign");
            let resp = http_client()
                .execute(reqwest::Request::try_from(req).expect("request"))
                .await
                .expect("send");
            let status = resp.status();
            let body: Value =
                serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
            (status, body)
        }
    };
    let (status, body) = send("AKIDCALLER", "caller-secret").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = send("AKIDCALLER", "wrong-secret").await;
    assert_eq!(body["__type"], "InvalidSignatureException");
    let (_, body) = send("AKIDOTHER", "caller-secret").await;
    assert_eq!(body["__type"], "UnrecognizedClientException");
    let resp = http_client()
        .post(&e.url)
        .header("x-amz-target", "TrentService.ListKeys")
        .body("{}")
        .send()
        .await
        .expect("send");
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(body["__type"], "MissingAuthenticationTokenException");
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_mtls_proxies() {
    let r = Responder::start_mtls("/tenant-a").await;
    // Without a client certificate the handshake is refused.
    let e = Emu::start(config_for(r.addr)).await;
    let (ty, msg, _) = e.err("CreateCustomKeyStore", xks_create("no-cert")).await;
    assert_eq!(ty, "XksProxyUriUnreachableException");
    assert!(msg.contains("TLS"), "{msg}");
    // With KMS's identity (cks.kms.us-east-1.amazonaws.com from the dev CA) it works.
    let mut cfg = config_for(r.addr);
    cfg.xks.client_cert = Some((
        repo().join("certs/kms-client.pem"),
        repo().join("certs/kms-client.key"),
    ));
    let e = Emu::start(cfg).await;
    let (_store, arn) = connected_key(&e).await;
    let ct = e
        .ok("Encrypt", json!({"KeyId": arn, "Plaintext": b64(b"mtls")}))
        .await;
    let pt = e
        .ok("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    assert_eq!(unb64(&pt["Plaintext"]), b"mtls");
}

#[tokio::test]
async fn cancelling_a_deletion_brings_the_key_back_disabled() {
    let (_r, e) = setup().await;
    let key = e.ok("CreateKey", json!({})).await["KeyMetadata"]["Arn"].clone();
    let (ty, _, _) = e
        .err(
            "ScheduleKeyDeletion",
            json!({"KeyId": key, "PendingWindowInDays": 31}),
        )
        .await;
    assert_eq!(ty, "ValidationException");
    let s = e.ok("ScheduleKeyDeletion", json!({"KeyId": key})).await;
    assert_eq!(s["PendingWindowInDays"], 30);
    let (ty, msg, _) = e
        .err("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")}))
        .await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(msg.ends_with("is pending deletion."));
    let (ty, _, _) = e.err("ScheduleKeyDeletion", json!({"KeyId": key})).await;
    assert_eq!(ty, "KMSInvalidStateException");
    let c = e.ok("CancelKeyDeletion", json!({"KeyId": key})).await;
    assert_eq!(c["KeyId"], key);
    let d = e.ok("DescribeKey", json!({"KeyId": key})).await["KeyMetadata"].clone();
    assert_eq!(d["KeyState"], "Disabled");
    assert!(d.get("DeletionDate").is_none());
    let (ty, msg, _) = e.err("CancelKeyDeletion", json!({"KeyId": key})).await;
    assert_eq!(ty, "KMSInvalidStateException");
    assert!(msg.ends_with("is not pending deletion."));
}
