//! End to end with the real binaries and the real Rust SDK: `xks-proxy` (software
//! keystore; SoftHSM from tests/softhsm/setup.sh's variables) and `kms-emulator` on loopback, driven
//! by `aws-sdk-kms` through the whole external-key-store lifecycle, plus the failure
//! paths asserted by exception name and ConnectionErrorCode.

use crate::kms_support;

use std::time::Duration;

use aws_sdk_kms::Client;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    ConnectionErrorCodeType, ConnectionStateType, CustomKeyStoreType, KeyState, OriginType,
    XksProxyAuthenticationCredentialType, XksProxyConnectivityType,
};
use kms_support::procs::{Backend, Proc, ProxySetup, start_emulator};
use kms_support::sdk::{code, connect, disconnect, service_code};
use kms_support::{AKID, AKID2, ENDPOINT, SECRET, SECRET2};

const PREFIX: &str = "/tenant-a";
const PATH: &str = "/tenant-a/kms/xks/v1";

fn sdk(emulator: &Proc) -> Client {
    kms_support::sdk::client(
        &format!("http://{}", emulator.addr),
        "AKIDSDKCALLER",
        "sdk-caller-secret",
    )
}

fn cred(akid: &str, secret: &str) -> XksProxyAuthenticationCredentialType {
    XksProxyAuthenticationCredentialType::builder()
        .access_key_id(akid)
        .raw_secret_access_key(secret)
        .build()
        .expect("credential")
}

async fn create_store(
    kms: &Client,
    name: &str,
    path: &str,
    akid: &str,
    secret: &str,
) -> Result<String, String> {
    kms.create_custom_key_store()
        .custom_key_store_name(name)
        .custom_key_store_type(CustomKeyStoreType::ExternalKeyStore)
        .xks_proxy_uri_endpoint(ENDPOINT)
        .xks_proxy_uri_path(path)
        .xks_proxy_connectivity(XksProxyConnectivityType::PublicEndpoint)
        .xks_proxy_authentication_credential(cred(akid, secret))
        .send()
        .await
        .map(|o| o.custom_key_store_id().expect("id").to_owned())
        .map_err(service_code)
}

async fn encrypt(kms: &Client, key: &str, data: &[u8]) -> Result<Blob, String> {
    kms.encrypt()
        .key_id(key)
        .plaintext(Blob::new(data))
        .encryption_context("purpose", "e2e")
        .send()
        .await
        .map(|o| o.ciphertext_blob().expect("blob").clone())
        .map_err(|e| {
            format!(
                "{}: {}",
                e.as_service_error().and_then(|s| s.code()).unwrap_or("?"),
                e.as_service_error().and_then(|s| s.message()).unwrap_or("")
            )
        })
}

async fn decrypt(kms: &Client, blob: &Blob) -> Vec<u8> {
    kms.decrypt()
        .ciphertext_blob(blob.clone())
        .encryption_context("purpose", "e2e")
        .send()
        .await
        .expect("decrypt")
        .plaintext()
        .expect("plaintext")
        .as_ref()
        .to_vec()
}

/// The whole lifecycle against one proxy backend.
async fn lifecycle(backend: Backend) {
    let proxy_setup = ProxySetup::new(backend.clone(), PREFIX, 0);
    proxy_setup.create_key("key-1", "encrypt,decrypt");
    proxy_setup.create_key("key-enc", "encrypt");
    let proxy = proxy_setup.start();
    let emulator = start_emulator(proxy.addr, &["--deletion-day-length", "100ms"], None);
    let kms = sdk(&emulator);

    // Create → DISCONNECTED → connect → CONNECTED.
    let store = create_store(&kms, "e2e-store", PATH, AKID, SECRET)
        .await
        .expect("create store");
    let d = kms
        .describe_custom_key_stores()
        .custom_key_store_name("e2e-store")
        .send()
        .await
        .expect("describe");
    let entry = &d.custom_key_stores()[0];
    assert_eq!(
        entry.connection_state(),
        Some(&ConnectionStateType::Disconnected)
    );
    assert_eq!(entry.custom_key_store_id(), Some(store.as_str()));
    let cfg = entry.xks_proxy_configuration().expect("xks config");
    assert_eq!(cfg.access_key_id(), Some(AKID));
    assert!(entry.creation_date().is_some());
    let s = connect(&kms, &store).await;
    assert_eq!(
        s.connection_state(),
        Some(&ConnectionStateType::Connected),
        "{s:?}"
    );
    assert!(s.connection_error_code().is_none());

    // Keys: one in the store, one ordinary.
    let key = kms
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store)
        .xks_key_id("key-1")
        .description("e2e")
        .send()
        .await
        .expect("create key");
    let md = key.key_metadata().expect("metadata");
    assert_eq!(md.origin(), Some(&OriginType::ExternalKeyStore));
    assert_eq!(md.key_state(), Some(&KeyState::Enabled));
    assert_eq!(
        md.xks_key_configuration().and_then(|x| x.id()),
        Some("key-1")
    );
    let arn = md.arn().expect("arn").to_owned();
    let local = kms.create_key().send().await.expect("local key");
    let local = local
        .key_metadata()
        .expect("md")
        .arn()
        .expect("arn")
        .to_owned();

    // Encrypt / Decrypt / GenerateDataKey* / ReEncrypt.
    let blob = encrypt(&kms, &arn, b"end to end").await.expect("encrypt");
    assert_eq!(decrypt(&kms, &blob).await, b"end to end");
    let dk = kms
        .generate_data_key()
        .key_id(&arn)
        .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
        .send()
        .await
        .expect("gdk");
    assert_eq!(dk.plaintext().expect("pt").as_ref().len(), 32);
    let back = kms
        .decrypt()
        .ciphertext_blob(dk.ciphertext_blob().expect("blob").clone())
        .send()
        .await
        .expect("decrypt data key");
    assert_eq!(back.plaintext(), dk.plaintext());
    let wp = kms
        .generate_data_key_without_plaintext()
        .key_id(&arn)
        .number_of_bytes(24)
        .send()
        .await
        .expect("gdkwp");
    let back = kms
        .decrypt()
        .ciphertext_blob(wp.ciphertext_blob().expect("blob").clone())
        .send()
        .await
        .expect("decrypt");
    assert_eq!(back.plaintext().expect("pt").as_ref().len(), 24);
    let moved = kms
        .re_encrypt()
        .ciphertext_blob(blob.clone())
        .source_encryption_context("purpose", "e2e")
        .destination_key_id(&local)
        .send()
        .await
        .expect("re-encrypt to local");
    assert_eq!(moved.source_key_id(), Some(arn.as_str()));
    let home = kms
        .re_encrypt()
        .ciphertext_blob(moved.ciphertext_blob().expect("blob").clone())
        .destination_key_id(&arn)
        .destination_encryption_context("purpose", "e2e")
        .send()
        .await
        .expect("re-encrypt to xks");
    assert_eq!(
        decrypt(&kms, home.ciphertext_blob().expect("blob")).await,
        b"end to end"
    );

    // External-key checks at CreateKey.
    let r = kms
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store)
        .xks_key_id("key-enc")
        .send()
        .await;
    assert_eq!(code(r), "XksKeyInvalidConfigurationException");
    let r = kms
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store)
        .xks_key_id("no-such-key")
        .send()
        .await;
    match r {
        Err(e) => assert!(
            matches!(
                e.into_service_error(),
                aws_sdk_kms::operation::create_key::CreateKeyError::XksKeyNotFoundException(_)
            ),
            "typed XksKeyNotFoundException"
        ),
        Ok(_) => panic!("unknown external key accepted"),
    }

    // Rotate the proxy credentials while connected (the proxy holds both).
    kms.update_custom_key_store()
        .custom_key_store_id(&store)
        .xks_proxy_authentication_credential(cred(AKID2, SECRET2))
        .send()
        .await
        .expect("rotate");
    let d = kms
        .describe_custom_key_stores()
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("describe");
    assert_eq!(
        d.custom_key_stores()[0]
            .xks_proxy_configuration()
            .and_then(|c| c.access_key_id()),
        Some(AKID2)
    );
    assert_eq!(decrypt(&kms, &blob).await, b"end to end");

    // Disable the external key in the proxy → the exact KMS error (on SoftHSM through
    // the config's disabled_keys list, as an HSM operator would).
    {
        proxy_setup.disable_key("key-1");
        proxy.hup();
        let mut last = String::new();
        for _ in 0..600 {
            match encrypt(&kms, &arn, b"x").await {
                Err(e) => {
                    last = e;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert!(
            last.starts_with("KMSInvalidStateException: The external key associated with this KMS key in an external key store is not enabled in the external key manager."),
            "{last}"
        );
        proxy_setup.enable_key("key-1");
        proxy.hup();
        let mut ok = false;
        for _ in 0..600 {
            if encrypt(&kms, &arn, b"x").await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "key works again after enable + SIGHUP");
    }

    // Disconnect → Unavailable → reconnect → works.
    disconnect(&kms, &store).await;
    let d = kms
        .describe_key()
        .key_id(&arn)
        .send()
        .await
        .expect("describe key");
    assert_eq!(
        d.key_metadata().and_then(|m| m.key_state()),
        Some(&KeyState::Unavailable)
    );
    let e = encrypt(&kms, &arn, b"x").await.expect_err("unavailable");
    assert!(e.starts_with("KMSInvalidStateException"), "{e}");
    let s = connect(&kms, &store).await;
    assert_eq!(s.connection_state(), Some(&ConnectionStateType::Connected));
    assert_eq!(decrypt(&kms, &blob).await, b"end to end");

    // Schedule deletion; the store cannot go until the key is gone.
    let sched = kms
        .schedule_key_deletion()
        .key_id(&arn)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("schedule");
    assert_eq!(sched.key_state(), Some(&KeyState::PendingDeletion));
    disconnect(&kms, &store).await;
    let r = kms
        .delete_custom_key_store()
        .custom_key_store_id(&store)
        .send()
        .await;
    assert_eq!(code(r), "CustomKeyStoreHasCMKsException");
    // 7 days of 100 ms each: wait for the deletion (the event), bounded.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = kms.describe_key().key_id(&arn).send().await;
        if r.is_err() {
            assert_eq!(code(r), "NotFoundException");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the key is not deleted 30 s after its 7 days"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kms.delete_custom_key_store()
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("delete store");

    // Nothing secret reached the emulator's log (it ran at debug level).
    let log = emulator.output();
    assert!(
        !log.contains(SECRET) && !log.contains(SECRET2),
        "secret in the log"
    );
    assert!(!log.contains("end to end"), "plaintext in the log");
    // Redirected to a pipe (a file, journald), neither binary writes colour codes.
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in the emulator's log:\n{log}"
    );
    assert!(
        !proxy.output().contains('\u{1b}'),
        "ANSI escape in the proxy's log"
    );
}

#[tokio::test]
async fn sdk_lifecycle_against_the_software_keystore() {
    lifecycle(Backend::Software).await;
}

// The proxy binary serves PKCS#11 only with the (default) `pkcs11` feature.
#[cfg(feature = "pkcs11")]
#[tokio::test]
async fn sdk_lifecycle_against_softhsm() {
    // The same flow with the proxy on a real SoftHSMv2 token.
    let backend = Backend::softhsm_from_env().expect(
        "the SoftHSM token variables are not set: run eval \"$(tests/softhsm/setup.sh \"$PWD/target/softhsm\")\" first (tests/run-all.sh does)",
    );
    lifecycle(backend).await;
}

#[tokio::test]
async fn sdk_failure_paths() {
    let proxy_setup = ProxySetup::new(Backend::Software, PREFIX, 0);
    proxy_setup.create_key("key-1", "encrypt,decrypt");
    let proxy = proxy_setup.start();
    let emulator = start_emulator(proxy.addr, &[], None);
    let kms = sdk(&emulator);

    // Wrong credentials: an exception on create, INVALID_CREDENTIALS on connect.
    assert_eq!(
        create_store(&kms, "bad-cred", PATH, "AKIAWRONGCREDENTIAL2345", SECRET).await,
        Err("XksProxyIncorrectAuthenticationCredentialException".to_owned())
    );
    let store = create_store(&kms, "good", PATH, AKID, SECRET)
        .await
        .expect("create");
    let r = kms
        .update_custom_key_store()
        .custom_key_store_id(&store)
        .xks_proxy_authentication_credential(cred(AKID, SECRET2))
        .send()
        .await;
    assert_eq!(
        code(r),
        "XksProxyIncorrectAuthenticationCredentialException"
    );
    // Wrong path.
    assert_eq!(
        create_store(&kms, "bad-path", "/nobody/kms/xks/v1", AKID, SECRET).await,
        Err("XksProxyInvalidConfigurationException".to_owned())
    );

    // Proxy down: UriUnreachable on create, XKS_PROXY_NOT_REACHABLE on connect.
    drop(proxy);
    assert_eq!(
        create_store(&kms, "down", "/tenant-a/other/kms/xks/v1", AKID, SECRET).await,
        Err("XksProxyUriUnreachableException".to_owned())
    );
    let s = connect(&kms, &store).await;
    assert_eq!(s.connection_state(), Some(&ConnectionStateType::Failed));
    assert_eq!(
        s.connection_error_code(),
        Some(&ConnectionErrorCodeType::XksProxyNotReachable)
    );
    disconnect(&kms, &store).await;

    // A key manager slower than KMS waits. Margins are wide both ways, so load on the
    // machine cannot flip an outcome: the key manager takes 500 ms, the proxy's own
    // backend deadline is raised to 3 s, the patient emulator that makes the store and
    // key waits 5 s, and the hasty one (sharing its state directory) gives up after
    // 150 ms, which nothing can beat since the key manager sleeps 500 ms.
    let slow_setup = ProxySetup::new(Backend::Software, PREFIX, 500);
    let mut slow_toml = std::fs::read_to_string(slow_setup.config()).expect("config");
    slow_toml.push_str("\n[limits]\nbackend_deadline_ms = 3000\n");
    std::fs::write(slow_setup.config(), slow_toml).expect("config");
    slow_setup.create_key("key-1", "encrypt,decrypt");
    slow_setup.create_key("key-2", "encrypt,decrypt");
    let slow = slow_setup.start();
    let state = tempfile::tempdir().expect("tempdir");
    let patient = start_emulator(slow.addr, &["--xks-timeout-ms", "5000"], Some(state.path()));
    let kms2 = sdk(&patient);
    // Until the proxy's first deep health check is done it reports UNAVAILABLE.
    let mut store2 = None;
    for _ in 0..100 {
        match create_store(&kms2, "slow", PATH, AKID, SECRET).await {
            Ok(id) => {
                store2 = Some(id);
                break;
            }
            Err(code) => {
                assert_eq!(code, "XksProxyUriUnreachableException");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let store2 = store2.expect("the slow proxy never reported healthy");
    let s = connect(&kms2, &store2).await;
    assert_eq!(s.connection_state(), Some(&ConnectionStateType::Connected));
    let key2 = kms2
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store2)
        .xks_key_id("key-1")
        .send()
        .await
        .expect("create key with a patient emulator")
        .key_metadata()
        .and_then(|m| m.arn())
        .expect("arn")
        .to_owned();
    drop(patient);
    let hasty = start_emulator(slow.addr, &["--xks-timeout-ms", "150"], Some(state.path()));
    let kms2 = sdk(&hasty);
    let e = encrypt(&kms2, &key2, b"x").await.expect_err("times out");
    assert!(
        e.starts_with("KMSInvalidStateException") && e.contains("did not respond in time"),
        "{e}"
    );
    let r = kms2
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store2)
        .xks_key_id("key-2")
        .send()
        .await;
    match r {
        Err(e) => {
            let svc = e.as_service_error().expect("service error");
            assert_eq!(svc.code(), Some("CustomKeyStoreInvalidStateException"));
            assert!(
                svc.message()
                    .unwrap_or("")
                    .contains("did not respond in time"),
                "{:?}",
                svc.message()
            );
        }
        Ok(_) => panic!("a 500 ms key manager must time out a 150 ms wait"),
    }

    // A proxy that accepts connections but never answers: XKS_PROXY_TIMED_OUT.
    disconnect(&kms2, &store2).await;
    slow.freeze();
    let s = connect(&kms2, &store2).await;
    assert_eq!(s.connection_state(), Some(&ConnectionStateType::Failed));
    assert_eq!(
        s.connection_error_code(),
        Some(&ConnectionErrorCodeType::XksProxyTimedOut),
        "{s:?}"
    );
    assert_eq!(
        create_store(&kms2, "frozen", "/tenant-a/frozen/kms/xks/v1", AKID, SECRET).await,
        Err("XksProxyUriUnreachableException".to_owned())
    );
    slow.thaw();
}

#[tokio::test]
async fn sdk_signatures_are_verified_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("callers");
    std::fs::write(&creds, "AKIDSDKCALLER sdk-caller-secret\n").expect("write");
    let mut cmd = std::process::Command::new(kms_support::procs::emulator_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--xks-health-interval", "0"])
        .arg("--verify-client-sigv4")
        .arg("--client-credentials-file")
        .arg(&creds);
    let emulator = Proc::spawn(cmd, "listening on http://");
    let kms = sdk(&emulator);
    let key = kms.create_key().send().await.expect("signed by the SDK");
    let arn = key.key_metadata().and_then(|m| m.arn()).expect("arn");
    let blob = encrypt(&kms, arn, b"signed").await.expect("encrypt");
    assert_eq!(decrypt(&kms, &blob).await, b"signed");
    let wrong = kms_support::sdk::client(
        &format!("http://{}", emulator.addr),
        "AKIDSDKCALLER",
        "not-the-secret",
    );
    let r = wrong.list_keys().send().await;
    assert_eq!(code(r), "InvalidSignatureException");
}

/// Issue 11 §3: the emulator killed with SIGKILL mid-run (no shutdown of any kind) and
/// restarted on its `--data-dir`: every store, key and ciphertext from before still
/// works, through the real SDK.
#[tokio::test]
async fn an_emulator_killed_mid_run_keeps_every_store_key_and_ciphertext() {
    let proxy_setup = ProxySetup::new(Backend::Software, PREFIX, 0);
    proxy_setup.create_key("key-1", "encrypt,decrypt");
    let proxy = proxy_setup.start();
    let state = tempfile::tempdir().expect("state dir");
    let emulator = start_emulator(proxy.addr, &[], Some(state.path()));
    let kms = sdk(&emulator);
    let store = create_store(&kms, "durable", PATH, AKID, SECRET)
        .await
        .expect("create store");
    let s = connect(&kms, &store).await;
    assert_eq!(s.connection_state(), Some(&ConnectionStateType::Connected));
    let xks_key = kms
        .create_key()
        .origin(OriginType::ExternalKeyStore)
        .custom_key_store_id(&store)
        .xks_key_id("key-1")
        .send()
        .await
        .expect("create key");
    let xks_key = xks_key
        .key_metadata()
        .expect("metadata")
        .key_id()
        .to_owned();
    let local = kms.create_key().send().await.expect("local key");
    let local = local.key_metadata().expect("metadata").key_id().to_owned();
    let mut made = Vec::new();
    for i in 0..20 {
        let key = if i % 2 == 0 { &xks_key } else { &local };
        let data = format!("before the kill {i}").into_bytes();
        let blob = encrypt(&kms, key, &data).await.expect("encrypt");
        made.push((data, blob));
    }
    // SIGKILL (Proc's drop kills with SIGKILL and reaps).
    drop(emulator);

    let emulator = start_emulator(proxy.addr, &[], Some(state.path()));
    let kms = sdk(&emulator);
    let d = kms
        .describe_custom_key_stores()
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("describe");
    assert_eq!(
        d.custom_key_stores()[0].custom_key_store_name(),
        Some("durable")
    );
    for key in [&xks_key, &local] {
        let m = kms
            .describe_key()
            .key_id(key)
            .send()
            .await
            .expect("describe key");
        assert_eq!(
            m.key_metadata().and_then(|m| m.key_state()),
            Some(&KeyState::Enabled)
        );
    }
    // The store may need connecting again after a restart, as after any emulator start.
    if d.custom_key_stores()[0].connection_state() != Some(&ConnectionStateType::Connected) {
        let s = connect(&kms, &store).await;
        assert_eq!(s.connection_state(), Some(&ConnectionStateType::Connected));
    }
    for (data, blob) in &made {
        assert_eq!(&decrypt(&kms, blob).await, data);
    }
    // And it keeps working after the restart.
    let blob = encrypt(&kms, &xks_key, b"after")
        .await
        .expect("encrypt after");
    assert_eq!(decrypt(&kms, &blob).await, b"after");
}
