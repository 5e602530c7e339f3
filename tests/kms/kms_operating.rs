//! Operating features seen from KMS's side, through the KMS emulator: mTLS with the
//! emulator presenting a KMS-like client certificate (`cks.kms.us-east-1.amazonaws.com`),
//! and secondary-authorization denials surfacing as the KMS exceptions the brief names
//! (CreateKey → CustomKeyStoreInvalidStateException, crypto → KMSInvalidStateException).
//! Credential rotation through UpdateCustomKeyStore is covered in tests/kms/kms_sdk_e2e.rs.

use crate::common;
use crate::kms_support;

use common::{Options, TestProxy, prepare};
use kms_support::{AKID, Emu, SECRET, b64, config_for};
use serde_json::json;

const PATH: &str = "/tenant-a/kms/xks/v1";

const POLICY: &str = r#"
@id("allow-all")
permit(principal, action, resource);

@id("no-data-keys")
forbid(principal, action == Xks::Action::"Encrypt", resource)
when { context.kmsOperation == "GenerateDataKey" };

@id("no-key-denied")
forbid(principal, action, resource == Xks::Key::"/tenant-a/key-denied");
"#;

/// A proxy with mTLS on (dev CA + KMS's name), the policy above, KMS-side credentials,
/// and the external keys key-1 and key-denied.
async fn proxy() -> TestProxy {
    let (dir, text, creds) = prepare(&Options::default());
    std::fs::write(dir.path().join("secret0"), SECRET).expect("secret");
    std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("policy");
    let mut ks = xks_proxy::backend::software::Keystore::open(
        &dir.path().join("keystore.json"),
        &xks_proxy::backend::software::MasterKey::from_file(&dir.path().join("master.key"))
            .expect("master"),
    )
    .expect("keystore");
    ks.create_key(
        "key-denied",
        &[
            xks_proxy::backend::KeyUsage::Encrypt,
            xks_proxy::backend::KeyUsage::Decrypt,
        ],
    )
    .expect("key");
    let mtls = format!(
        "client_ca = \"{}\"\nclient_subjects = [\"cks.kms.us-east-1.amazonaws.com\"]\n",
        common::repo().join("certs/ca.pem").display()
    );
    let text = text
        .replace(&creds[0].akid, AKID)
        .replace("\n[backend]", &format!("{mtls}\n[backend]"))
        + "\n[policy]\nfile = \"policy.cedar\"\n";
    let p = TestProxy::start_with(dir, &text, creds).await;
    assert!(p.config.server.client_auth.is_some());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_with_its_client_certificate_connects_and_policy_denials_are_kms_errors() {
    let p = proxy().await;
    let mut cfg = config_for(p.addr());
    let certs = common::repo().join("certs");
    cfg.xks.client_cert = Some((certs.join("kms-client.pem"), certs.join("kms-client.key")));
    let e = Emu::start(cfg).await;
    let store = e.create_store("mtls-store", PATH).await;
    e.connect(&store).await;
    let key = e.create_xks_key(&store, common::KEY).await;
    let arn = key["Arn"].as_str().expect("arn").to_owned();

    // Allowed by the policy: Encrypt/Decrypt round trip through the proxy.
    let enc = e
        .ok(
            "Encrypt",
            json!({"KeyId": arn, "Plaintext": b64(b"through mTLS")}),
        )
        .await;
    let dec = e
        .ok("Decrypt", json!({"CiphertextBlob": enc["CiphertextBlob"]}))
        .await;
    assert_eq!(dec["Plaintext"], b64(b"through mTLS"));

    // Denied by a forbid on kmsOperation: the caller sees KMSInvalidStateException.
    let (ty, msg, status) = e
        .err(
            "GenerateDataKey",
            json!({"KeyId": arn, "KeySpec": "AES_256"}),
        )
        .await;
    assert_eq!(
        (ty.as_str(), status),
        ("KMSInvalidStateException", 409),
        "{msg}"
    );
    // Denied at CreateKey (GetKeyMetadata): CustomKeyStoreInvalidStateException.
    let (ty, msg, _) = e
        .err(
            "CreateKey",
            json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "key-denied"}),
        )
        .await;
    assert_eq!(ty, "CustomKeyStoreInvalidStateException", "{msg}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_without_a_client_certificate_cannot_reach_an_mtls_proxy() {
    let p = proxy().await;
    let e = Emu::start(config_for(p.addr())).await;
    // CreateCustomKeyStore health-checks the proxy synchronously; the handshake is
    // refused, which KMS reports as an unreachable proxy.
    let (ty, msg, _) = e
        .err(
            "CreateCustomKeyStore",
            json!({
                "CustomKeyStoreName": "no-cert",
                "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                "XksProxyUriEndpoint": kms_support::ENDPOINT,
                "XksProxyUriPath": PATH,
                "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
            }),
        )
        .await;
    assert_eq!(ty, "XksProxyUriUnreachableException", "{msg}");
    e.stop().await;
}
