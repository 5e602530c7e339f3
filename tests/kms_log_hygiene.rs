//! The emulator never logs, describes or `Debug`-prints an XKS secret, a CloudHSM
//! key store password or a caller's plaintext: this test captures every log line
//! (TRACE level) of a run that creates, rotates and uses a store — failures included —
//! and searches it. (A CloudHSM store's whole life on a real token, rotated passwords
//! included, is searched the same way in `kms_cloudhsm_sdk`.)

mod common;
mod harness;
mod kms_support;

use common::Capture;
use kms_support::*;
use serde_json::json;
use xks_proxy::secret::SecretString;

#[tokio::test]
async fn secrets_and_plaintext_never_reach_logs_describe_or_debug() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let plaintext = b"attack at dawn, bring the secret plans";
    let r = Responder::start("/tenant-a").await;
    let mut cfg = config_for(r.addr);
    cfg.client_credentials = None;
    let e = Emu::start(cfg.clone()).await;
    let store = e.create_store("hygiene", "/tenant-a/kms/xks/v1").await;
    e.connect(&store).await;
    let key = e.create_xks_key(&store, "key-1").await["Arn"].clone();
    let ct = e
        .ok(
            "Encrypt",
            json!({"KeyId": key, "Plaintext": b64(plaintext)}),
        )
        .await;
    e.ok("Decrypt", json!({"CiphertextBlob": ct["CiphertextBlob"]}))
        .await;
    e.ok(
        "GenerateDataKey",
        json!({"KeyId": key, "NumberOfBytes": 32}),
    )
    .await;
    // A rejected rotation (the proxy does not know the new secret) and an accepted one.
    let rotate = json!({"CustomKeyStoreId": store,
        "XksProxyAuthenticationCredential": {"AccessKeyId": AKID2, "RawSecretAccessKey": SECRET2}});
    e.err("UpdateCustomKeyStore", rotate.clone()).await;
    r.set(|s| s.credentials.push((AKID2.to_owned(), SECRET2.to_owned())));
    e.ok("UpdateCustomKeyStore", rotate).await;
    // Validation failures on sensitive members.
    e.err(
        "CreateCustomKeyStore",
        json!({"CustomKeyStoreName": "x", "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
               "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": format!("{SECRET}!")}}),
    )
    .await;
    e.err(
        "Encrypt",
        json!({"KeyId": key, "Plaintext": b64(&[b'p'; 5000])}),
    )
    .await;

    // CloudHSM passwords in refused requests: unknown cluster, too long, wrong type.
    const HSM_PASSWORD: &str = "kmsuserHygienePw7";
    let mut messages = String::new();
    for body in [
        json!({"CustomKeyStoreName": "h", "CloudHsmClusterId": "cluster-abcdefghijk",
               "TrustAnchorCertificate": "x", "KeyStorePassword": HSM_PASSWORD}),
        json!({"CustomKeyStoreName": "h", "CloudHsmClusterId": "cluster-abcdefghijk",
               "TrustAnchorCertificate": "x", "KeyStorePassword": format!("{HSM_PASSWORD}{HSM_PASSWORD}")}),
    ] {
        messages.push_str(&e.err("CreateCustomKeyStore", body).await.1);
    }
    messages.push_str(
        &e.err(
            "UpdateCustomKeyStore",
            json!({"CustomKeyStoreId": store, "KeyStorePassword": HSM_PASSWORD}),
        )
        .await
        .1,
    );
    assert!(
        !messages.contains(HSM_PASSWORD),
        "password in an error: {messages}"
    );

    let described = e.ok("DescribeCustomKeyStores", json!({})).await.to_string();
    let debug = format!("{:?} {:?}", e.emulator, cfg);
    let with_creds = xks_proxy::kms::Config {
        client_credentials: Some(vec![("AKIDX".into(), SecretString::from(SECRET))]),
        ..cfg
    };
    let debug2 = format!("{with_creds:?}");
    e.stop().await;

    let logs = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf8");
    assert!(logs.contains("request"), "the capture works");
    for (what, text) in [
        ("logs", &logs),
        ("describe", &described),
        ("debug", &debug),
        ("debug", &debug2),
    ] {
        for secret in [SECRET, SECRET2] {
            assert!(!text.contains(secret), "XKS secret in {what}");
        }
        assert!(!text.contains(HSM_PASSWORD), "CloudHSM password in {what}");
        assert!(!text.contains("attack at dawn"), "plaintext in {what}");
        assert!(
            !text.contains(&b64(plaintext)),
            "Base64 plaintext in {what}"
        );
    }
}
