//! CloudHSM key stores end to end: the real `kms-emulator` binary with stand-in
//! clusters on real SoftHSMv2 tokens (`tests/softhsm/setup.sh`, one throw-away
//! directory per test), driven by `aws-sdk-kms`. The token is also checked from
//! outside the emulator with OpenSC's `pkcs11-tool` (the password rotation, the
//! operator's reset), so the emulator is not its own oracle.
#![cfg(feature = "pkcs11")]

use crate::kms_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_kms::Client;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    ConnectionErrorCodeType, ConnectionStateType, CustomKeyStoresListEntry, KeyState, OriginType,
};
use kms_support::procs::{Proc, emulator_bin};
use kms_support::sdk::{self, code, connect, describe, service_code, settled};

/// The emulator binary: `KMS_EMULATOR_BIN` when set (as for the boto3 suite), else
/// the one Cargo built for this test.
fn emulator() -> PathBuf {
    std::env::var_os("KMS_EMULATOR_BIN").map_or_else(emulator_bin, PathBuf::from)
}

const SO_PIN: &str = "12345678";
const CLUSTER_A: &str = "cluster-aaaaaaaaaaaa";
/// Same backup lineage as A: related.
const CLUSTER_B: &str = "cluster-bbbbbbbbbbbb";
/// Another lineage: unrelated.
const CLUSTER_C: &str = "cluster-cccccccccccc";
/// Two HSMs, both in one AZ.
const CLUSTER_ONE_AZ: &str = "cluster-dddddddddddd";
const CLUSTER_UNINITIALIZED: &str = "cluster-eeeeeeeeeeee";
/// Related to A, but one HSM only.
const CLUSTER_B_SMALL: &str = "cluster-ffffffffffff";
const WAIT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn anchor() -> String {
    std::fs::read_to_string(repo().join("certs/cloudhsm-trust-anchor.pem")).expect("anchor")
}

/// A SoftHSM directory with one token per label (each with its own user PIN).
struct Hsm {
    dir: tempfile::TempDir,
    conf: String,
    module: String,
}

impl Hsm {
    fn new(tokens: &[(&str, &str)]) -> Hsm {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conf = String::new();
        let mut module = String::new();
        for (label, pin) in tokens {
            let out = Command::new(repo().join("tests/softhsm/setup.sh"))
                .arg(dir.path())
                .args([label, SO_PIN, pin])
                .output()
                .expect("run tests/softhsm/setup.sh (needs softhsm2)");
            assert!(
                out.status.success(),
                "setup.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(v) = line.strip_prefix("export SOFTHSM2_CONF=") {
                    conf = v.to_owned();
                }
                if let Some(v) = line.strip_prefix("export XKS_TEST_PKCS11_MODULE=") {
                    module = v.to_owned();
                }
            }
        }
        Hsm { dir, conf, module }
    }

    /// `pkcs11-tool` against this token directory.
    fn tool(&self, label: &str) -> Command {
        let mut c = Command::new("pkcs11-tool");
        c.env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", &self.module, "--token-label", label]);
        c
    }

    /// Whether `pin` logs in as the user, from a process of its own (a fresh
    /// C_Initialize, so nothing cached).
    fn user_pin_works(&self, label: &str, pin: &str) -> bool {
        self.tool(label)
            .args(["--login", "--pin", pin, "--list-objects"])
            .output()
            .expect("pkcs11-tool (OpenSC)")
            .status
            .success()
    }

    /// `pkcs11-tool --list-objects` of the secret keys kmsuser (password `pin`) owns,
    /// from a process of its own.
    fn secret_keys(&self, label: &str, pin: &str) -> String {
        let out = self
            .tool(label)
            .args([
                "--login",
                "--pin",
                pin,
                "--list-objects",
                "--type",
                "secrkey",
            ])
            .output()
            .expect("pkcs11-tool (OpenSC)");
        assert!(
            out.status.success(),
            "list-objects: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes the secret key labelled `object` behind the emulator's back.
    fn delete_secret_key(&self, label: &str, pin: &str, object: &str) {
        let out = self
            .tool(label)
            .args([
                "--login",
                "--pin",
                pin,
                "--delete-object",
                "--type",
                "secrkey",
            ])
            .args(["--label", object])
            .output()
            .expect("pkcs11-tool (OpenSC)");
        assert!(
            out.status.success(),
            "delete-object: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The operator resets kmsuser's password on the cluster (C_InitPIN as SO).
    fn operator_reset(&self, label: &str, new_pin: &str) {
        let out = self
            .tool(label)
            .args(["--login", "--login-type", "so", "--so-pin", SO_PIN])
            .args(["--init-pin", "--new-pin", new_pin])
            .output()
            .expect("pkcs11-tool (OpenSC)");
        assert!(
            out.status.success(),
            "init-pin: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes a cluster file; each entry: (id, token label, hsms_per_az, lineage, state).
    fn clusters(&self, name: &str, entries: &[(&str, &str, &str, &str, &str)]) -> PathBuf {
        let mut text = String::new();
        for (id, label, hsms, lineage, state) in entries {
            text.push_str(&format!(
                "[[cluster]]\nid = \"{id}\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\n\
                 trust_anchor = \"{}\"\nhsms_per_az = {hsms}\nbackup_lineage = \"{lineage}\"\n\
                 state = \"{state}\"\n\n",
                self.module,
                repo().join("certs/cloudhsm-trust-anchor.pem").display()
            ));
        }
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write clusters");
        path
    }

    fn emulator(&self, clusters: &Path, data_dir: Option<&Path>) -> Proc {
        self.emulator_with(clusters, data_dir, &[])
    }

    fn emulator_with(&self, clusters: &Path, data_dir: Option<&Path>, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(emulator());
        cmd.args(["--listen", "127.0.0.1:0", "--xks-health-interval", "0"])
            .args(extra)
            .arg("--cloudhsm-clusters")
            .arg(clusters)
            .env("SOFTHSM2_CONF", &self.conf)
            .env("RUST_LOG", "debug");
        if let Some(d) = data_dir {
            cmd.arg("--data-dir").arg(d);
        }
        Proc::spawn(cmd, "listening on http://")
    }
}

/// The registry most tests use.
fn standard_clusters(hsm: &Hsm) -> PathBuf {
    hsm.clusters(
        "clusters.toml",
        &[
            (CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE"),
            (CLUSTER_B, "hsm-b", "[1, 2]", "lineage-1", "ACTIVE"),
            (CLUSTER_C, "hsm-c", "[1, 1]", "lineage-2", "ACTIVE"),
            (CLUSTER_ONE_AZ, "hsm-c", "[2, 0]", "lineage-3", "ACTIVE"),
            (
                CLUSTER_UNINITIALIZED,
                "hsm-c",
                "[1, 1]",
                "lineage-4",
                "UNINITIALIZED",
            ),
            (CLUSTER_B_SMALL, "hsm-b", "[1]", "lineage-1", "ACTIVE"),
        ],
    )
}

fn sdk(emulator: &Proc) -> Client {
    kms_support::sdk::client(
        &format!("http://{}", emulator.addr),
        "AKIDSDK",
        "sdk-secret",
    )
}

async fn create(
    kms: &Client,
    name: &str,
    cluster: &str,
    anchor: &str,
    pw: &str,
) -> Result<String, String> {
    kms.create_custom_key_store()
        .custom_key_store_name(name)
        .cloud_hsm_cluster_id(cluster)
        .trust_anchor_certificate(anchor)
        .key_store_password(pw)
        .send()
        .await
        .map(|o| o.custom_key_store_id().expect("id").to_owned())
        .map_err(service_code)
}

async fn disconnect(kms: &Client, id: &str) {
    sdk::disconnect(kms, id).await;
    let s = settled(kms, id).await;
    assert_eq!(
        s.connection_state(),
        Some(&ConnectionStateType::Disconnected)
    );
}

fn assert_failed(s: &CustomKeyStoresListEntry, want: ConnectionErrorCodeType) {
    assert_eq!(
        s.connection_state(),
        Some(&ConnectionStateType::Failed),
        "{s:?}"
    );
    assert_eq!(s.connection_error_code(), Some(&want), "{s:?}");
}

fn assert_connected(s: &CustomKeyStoresListEntry) {
    assert_eq!(
        s.connection_state(),
        Some(&ConnectionStateType::Connected),
        "{s:?}"
    );
    assert!(s.connection_error_code().is_none());
}

#[tokio::test]
async fn cloudhsm_store_lifecycle_rotates_the_password_and_follows_an_operator_reset() {
    const ORIGINAL: &str = "kmsuserOriginal1";
    const RESET: &str = "operatorReset22";
    let hsm = Hsm::new(&[
        ("hsm-a", ORIGINAL),
        ("hsm-b", "unusedPin1"),
        ("hsm-c", "unusedPin2"),
    ]);
    let emu = hsm.emulator(&standard_clusters(&hsm), None);
    let kms = sdk(&emu);

    // Create: type omitted means AWS_CLOUDHSM.
    let id = create(&kms, "hsm-store", CLUSTER_A, &anchor(), ORIGINAL)
        .await
        .expect("create");
    let s = describe(&kms, &id).await;
    assert_eq!(
        s.custom_key_store_type().map(|t| t.as_str()),
        Some("AWS_CLOUDHSM")
    );
    assert_eq!(s.cloud_hsm_cluster_id(), Some(CLUSTER_A));
    assert_eq!(s.trust_anchor_certificate(), Some(anchor().as_str()));
    assert!(s.xks_proxy_configuration().is_none());
    assert_eq!(
        s.connection_state(),
        Some(&ConnectionStateType::Disconnected)
    );

    // GenerateRandom from the cluster needs a connected store.
    assert_eq!(
        code(
            kms.generate_random()
                .number_of_bytes(32)
                .custom_key_store_id(&id)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException"
    );

    // Connect: KMS logs in as kmsuser and rotates its password.
    assert_connected(&connect(&kms, &id).await);
    let random = kms
        .generate_random()
        .number_of_bytes(48)
        .custom_key_store_id(&id)
        .send()
        .await
        .expect("GenerateRandom from the token");
    assert_eq!(random.plaintext().map(|b| b.as_ref().len()), Some(48));
    assert!(
        !hsm.user_pin_works("hsm-a", ORIGINAL),
        "after CONNECTED the original kmsuser password must no longer log in"
    );
    // Renaming is allowed while CONNECTED; the password and cluster are not.
    kms.update_custom_key_store()
        .custom_key_store_id(&id)
        .new_custom_key_store_name("hsm-store-renamed")
        .send()
        .await
        .expect("rename while connected");
    assert_eq!(
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&id)
                .key_store_password(RESET)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException"
    );
    assert_eq!(
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&id)
                .cloud_hsm_cluster_id(CLUSTER_B)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException"
    );
    assert_eq!(
        code(
            kms.delete_custom_key_store()
                .custom_key_store_id(&id)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException"
    );

    // The operator resets kmsuser's password on the cluster: KMS's one is stale.
    disconnect(&kms, &id).await;
    hsm.operator_reset("hsm-a", RESET);
    assert_failed(
        &connect(&kms, &id).await,
        ConnectionErrorCodeType::InvalidCredentials,
    );
    assert_eq!(
        code(
            kms.connect_custom_key_store()
                .custom_key_store_id(&id)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException",
        "a FAILED store must be disconnected before it connects again"
    );
    disconnect(&kms, &id).await;

    // Tell KMS the current password, reconnect: connected, and rotated again.
    kms.update_custom_key_store()
        .custom_key_store_id(&id)
        .key_store_password(RESET)
        .send()
        .await
        .expect("update password");
    assert_connected(&connect(&kms, &id).await);
    assert!(
        !hsm.user_pin_works("hsm-a", RESET),
        "rotated again on connect"
    );

    disconnect(&kms, &id).await;
    // No key can be created in a store that is not connected.
    assert_eq!(
        code(
            kms.create_key()
                .origin(OriginType::AwsCloudhsm)
                .custom_key_store_id(&id)
                .send()
                .await
        ),
        "CustomKeyStoreInvalidStateException"
    );
    kms.delete_custom_key_store()
        .custom_key_store_id(&id)
        .send()
        .await
        .expect("delete");
    assert_eq!(
        code(
            kms.describe_custom_key_stores()
                .custom_key_store_id(&id)
                .send()
                .await
        ),
        "CustomKeyStoreNotFoundException"
    );
    // Every other store operation on the deleted store's id: not found.
    let gone = [
        code(
            kms.connect_custom_key_store()
                .custom_key_store_id(&id)
                .send()
                .await,
        ),
        code(
            kms.disconnect_custom_key_store()
                .custom_key_store_id(&id)
                .send()
                .await,
        ),
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&id)
                .key_store_password(RESET)
                .send()
                .await,
        ),
        code(
            kms.delete_custom_key_store()
                .custom_key_store_id(&id)
                .send()
                .await,
        ),
    ];
    assert_eq!(
        gone,
        ["CustomKeyStoreNotFoundException"; 4].map(String::from)
    );

    // No password, original, reset or rotated, in anything the emulator wrote.
    let logs = emu.output.lock().expect("lock").join("\n");
    assert!(
        logs.contains("kmsuser password rotated"),
        "the capture works"
    );
    for pw in [ORIGINAL, RESET] {
        assert!(!logs.contains(pw), "a kmsuser password reached the logs");
    }
}

#[tokio::test]
async fn cloudhsm_create_and_update_errors_follow_the_model() {
    let hsm = Hsm::new(&[
        ("hsm-a", "kmsuserPw1"),
        ("hsm-b", "kmsuserPw2"),
        ("hsm-c", "kmsuserPw3"),
    ]);
    let emu = hsm.emulator(&standard_clusters(&hsm), None);
    let kms = sdk(&emu);
    let a = anchor();
    let other =
        std::fs::read_to_string(repo().join("certs/cloudhsm-other-anchor.pem")).expect("pem");

    let cases: [(&str, &str, &str, &str); 7] = [
        (
            "cluster-unknownunknown",
            &a,
            "kmsuserPw1",
            "CloudHsmClusterNotFoundException",
        ),
        (
            CLUSTER_UNINITIALIZED,
            &a,
            "kmsuserPw1",
            "CloudHsmClusterNotActiveException",
        ),
        (
            CLUSTER_A,
            &other,
            "kmsuserPw1",
            "IncorrectTrustAnchorException",
        ),
        (
            CLUSTER_A,
            "not a certificate",
            "kmsuserPw1",
            "IncorrectTrustAnchorException",
        ),
        (
            CLUSTER_ONE_AZ,
            &a,
            "kmsuserPw1",
            "CloudHsmClusterInvalidConfigurationException",
        ),
        (CLUSTER_A, &a, "short6", "ValidationException"),
        (CLUSTER_A, &a, &"x".repeat(33), "ValidationException"),
    ];
    for (cluster, anchor, pw, want) in cases {
        assert_eq!(
            create(&kms, "s", cluster, anchor, pw)
                .await
                .expect_err(want),
            want,
            "{cluster}"
        );
    }

    let id = create(&kms, "first", CLUSTER_A, &a, "kmsuserPw1")
        .await
        .expect("create");
    // The same cluster, or one sharing its backup history, backs one store only.
    for cluster in [CLUSTER_A, CLUSTER_B] {
        assert_eq!(
            create(&kms, "second", cluster, &a, "kmsuserPw2")
                .await
                .expect_err("in use"),
            "CloudHsmClusterInUseException"
        );
    }
    assert_eq!(
        create(&kms, "first", CLUSTER_C, &a, "kmsuserPw3")
            .await
            .expect_err("name"),
        "CustomKeyStoreNameInUseException"
    );
    let third = create(&kms, "third", CLUSTER_C, &a, "kmsuserPw3")
        .await
        .expect("create C");

    let update = |cluster: &'static str| {
        kms.update_custom_key_store()
            .custom_key_store_id(&id)
            .cloud_hsm_cluster_id(cluster)
            .send()
    };
    assert_eq!(
        code(update(CLUSTER_C).await),
        "CloudHsmClusterNotRelatedException"
    );
    assert_eq!(
        code(update(CLUSTER_B_SMALL).await),
        "CloudHsmClusterInvalidConfigurationException"
    );
    assert_eq!(
        code(update("cluster-unknownunknown").await),
        "CloudHsmClusterNotFoundException"
    );
    update(CLUSTER_B).await.expect("a related cluster");
    assert_eq!(
        describe(&kms, &id).await.cloud_hsm_cluster_id(),
        Some(CLUSTER_B)
    );
    assert_eq!(
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&id)
                .new_custom_key_store_name("third")
                .send()
                .await
        ),
        "CustomKeyStoreNameInUseException"
    );
    assert_eq!(
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&id)
                .key_store_password("short6")
                .send()
                .await
        ),
        "ValidationException"
    );
    assert_eq!(
        code(
            kms.update_custom_key_store()
                .custom_key_store_id(&third)
                .xks_proxy_uri_path("/kms/xks/v1")
                .send()
                .await
        ),
        "ValidationException",
        "XKS members on a CloudHSM store"
    );
}

#[tokio::test]
async fn cloudhsm_kmsuser_is_locked_out_after_five_refused_logins() {
    const RIGHT: &str = "kmsuserRight1";
    let hsm = Hsm::new(&[("hsm-a", RIGHT)]);
    let clusters = hsm.clusters(
        "clusters.toml",
        &[(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")],
    );
    let emu = hsm.emulator(&clusters, None);
    let kms = sdk(&emu);
    let id = create(&kms, "locked", CLUSTER_A, &anchor(), "kmsuserWrong1")
        .await
        .expect("create");

    for _ in 0..4 {
        assert_failed(
            &connect(&kms, &id).await,
            ConnectionErrorCodeType::InvalidCredentials,
        );
        disconnect(&kms, &id).await;
    }
    assert_failed(
        &connect(&kms, &id).await,
        ConnectionErrorCodeType::UserLockedOut,
    );
    disconnect(&kms, &id).await;
    // Locked: even without a password change nothing reaches the token.
    assert_failed(
        &connect(&kms, &id).await,
        ConnectionErrorCodeType::UserLockedOut,
    );
    disconnect(&kms, &id).await;
    // A password update allows one login; a wrong one keeps the lock.
    kms.update_custom_key_store()
        .custom_key_store_id(&id)
        .key_store_password("kmsuserWrong2")
        .send()
        .await
        .expect("update");
    assert_failed(
        &connect(&kms, &id).await,
        ConnectionErrorCodeType::UserLockedOut,
    );
    disconnect(&kms, &id).await;
    kms.update_custom_key_store()
        .custom_key_store_id(&id)
        .key_store_password(RIGHT)
        .send()
        .await
        .expect("update");
    assert_connected(&connect(&kms, &id).await);
}

#[tokio::test]
async fn cloudhsm_connect_failures_and_the_rotated_password_survive_a_restart() {
    let hsm = Hsm::new(&[("hsm-a", "kmsuserPw1")]);
    let data = tempfile::tempdir().expect("data dir");
    let entry =
        |hsms: &'static str, state: &'static str| [(CLUSTER_A, "hsm-a", hsms, "lineage-1", state)];
    let good = hsm.clusters("good.toml", &entry("[1, 1]", "ACTIVE"));
    let id = {
        let emu = hsm.emulator(&good, Some(data.path()));
        let kms = sdk(&emu);
        let id = create(&kms, "restart", CLUSTER_A, &anchor(), "kmsuserPw1")
            .await
            .expect("create");
        assert_connected(&connect(&kms, &id).await);
        disconnect(&kms, &id).await;
        id
    };
    // Only the emulator's state knows the rotated password now.
    assert!(!hsm.user_pin_works("hsm-a", "kmsuserPw1"));
    {
        let emu = hsm.emulator(&good, Some(data.path()));
        let kms = sdk(&emu);
        assert_connected(&connect(&kms, &id).await);
    }
    {
        // Restarted while CONNECTED: the emulator logs in again by itself.
        let emu = hsm.emulator(&good, Some(data.path()));
        let kms = sdk(&emu);
        assert_connected(&describe(&kms, &id).await);
        let deadline = Instant::now() + WAIT;
        while kms
            .generate_random()
            .number_of_bytes(16)
            .custom_key_store_id(&id)
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the session never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        disconnect(&kms, &id).await;
    }
    {
        let none = hsm.clusters("none.toml", &entry("[0, 0]", "ACTIVE"));
        let emu = hsm.emulator(&none, Some(data.path()));
        let kms = sdk(&emu);
        assert_failed(
            &connect(&kms, &id).await,
            ConnectionErrorCodeType::InsufficientCloudhsmHsms,
        );
        disconnect(&kms, &id).await;
    }
    {
        let inactive = hsm.clusters("inactive.toml", &entry("[1, 1]", "DEGRADED"));
        let emu = hsm.emulator(&inactive, Some(data.path()));
        let kms = sdk(&emu);
        assert_eq!(
            code(
                kms.connect_custom_key_store()
                    .custom_key_store_id(&id)
                    .send()
                    .await
            ),
            "CloudHsmClusterNotActiveException"
        );
        assert_eq!(
            describe(&kms, &id).await.connection_state(),
            Some(&ConnectionStateType::Disconnected)
        );
    }
    {
        let gone = hsm.clusters("gone.toml", &[]);
        let emu = hsm.emulator(&gone, Some(data.path()));
        let kms = sdk(&emu);
        assert_failed(
            &connect(&kms, &id).await,
            ConnectionErrorCodeType::ClusterNotFound,
        );
    }
}

#[tokio::test]
async fn cloudhsm_connect_reports_a_missing_user_token_and_module() {
    let hsm = Hsm::new(&[("hsm-a", "kmsuserPw1")]);
    // A second token with no user PIN: the cluster has no kmsuser.
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args(["--module", &hsm.module, "--slot-index", "1", "--init-token"])
        .args(["--label", "hsm-nouser", "--so-pin", SO_PIN])
        .output()
        .expect("pkcs11-tool (OpenSC)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut clusters = hsm.clusters(
        "clusters.toml",
        &[
            (CLUSTER_A, "hsm-nouser", "[1, 1]", "lineage-1", "ACTIVE"),
            (CLUSTER_B, "hsm-absent", "[1, 1]", "lineage-2", "ACTIVE"),
            (CLUSTER_C, "hsm-a", "[1, 1]", "lineage-3", "ACTIVE"),
        ],
    );
    // Cluster C's module cannot be loaded.
    let text = std::fs::read_to_string(&clusters).expect("read");
    let broken = text.replacen(
        &format!("id = \"{CLUSTER_C}\"\nmodule = \"{}\"", hsm.module),
        &format!("id = \"{CLUSTER_C}\"\nmodule = \"/nonexistent/libnothing.so\""),
        1,
    );
    assert_ne!(broken, text);
    clusters = hsm.dir.path().join("broken.toml");
    std::fs::write(&clusters, broken).expect("write");
    let emu = hsm.emulator(&clusters, None);
    let kms = sdk(&emu);
    for (name, cluster, want) in [
        ("nouser", CLUSTER_A, ConnectionErrorCodeType::UserNotFound),
        ("absent", CLUSTER_B, ConnectionErrorCodeType::NetworkErrors),
        (
            "nomodule",
            CLUSTER_C,
            ConnectionErrorCodeType::InternalError,
        ),
    ] {
        let id = create(&kms, name, cluster, &anchor(), "kmsuserPw1")
            .await
            .expect(name);
        assert_failed(&connect(&kms, &id).await, want);
    }
}

/// The `label:` lines of a `pkcs11-tool --list-objects` listing.
fn labels(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn cloudhsm_keys_live_in_the_token_under_their_arn() {
    const PIN: &str = "kmsuserKeys11";
    // The operator resets kmsuser's password to look into the token (the emulator
    // rotated the one it was given); its logged-in session keeps working meanwhile.
    const LOOK: &str = "operatorLook1";
    const LOOK2: &str = "operatorLook2";
    let hsm = Hsm::new(&[
        ("hsm-a", PIN),
        ("hsm-b", "unusedPin1"),
        ("hsm-c", "unusedPin2"),
    ]);
    // One "day" of a deletion waiting period lasts 100 ms: 7 days = 0.7 s.
    let emu = hsm.emulator_with(
        &standard_clusters(&hsm),
        None,
        &["--deletion-day-length", "100ms"],
    );
    let kms = sdk(&emu);
    let store = create(&kms, "keys", CLUSTER_A, &anchor(), PIN)
        .await
        .expect("create store");
    let new_key = || {
        kms.create_key()
            .origin(OriginType::AwsCloudhsm)
            .custom_key_store_id(&store)
    };
    assert_eq!(
        code(new_key().send().await),
        "CustomKeyStoreInvalidStateException"
    );
    assert_eq!(
        code(
            kms.create_key()
                .origin(OriginType::AwsCloudhsm)
                .custom_key_store_id("cks-0123456789abcdef0")
                .send()
                .await
        ),
        "CustomKeyStoreNotFoundException"
    );
    assert_connected(&connect(&kms, &store).await);

    let md = new_key()
        .description("in the cluster")
        .send()
        .await
        .expect("create key")
        .key_metadata()
        .expect("metadata")
        .clone();
    let arn = md.arn().expect("arn").to_owned();
    assert_eq!(md.origin(), Some(&OriginType::AwsCloudhsm));
    assert_eq!(md.custom_key_store_id(), Some(store.as_str()));
    assert_eq!(md.cloud_hsm_cluster_id(), Some(CLUSTER_A));
    assert_eq!(md.key_state(), Some(&KeyState::Enabled));

    // Encrypt / Decrypt / GenerateDataKey(WithoutPlaintext) / ReEncrypt, with context.
    let ctx = |v: &str| {
        let mut m = std::collections::HashMap::new();
        m.insert("purpose".to_owned(), v.to_owned());
        m
    };
    let enc = kms
        .encrypt()
        .key_id(&arn)
        .plaintext(Blob::new(b"cloudhsm plaintext".to_vec()))
        .set_encryption_context(Some(ctx("a")))
        .send()
        .await
        .expect("encrypt");
    assert_eq!(enc.key_id(), Some(arn.as_str()));
    let blob = enc.ciphertext_blob().expect("blob").clone();
    let dec = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .set_encryption_context(Some(ctx("a")))
        .send()
        .await
        .expect("decrypt");
    assert_eq!(dec.plaintext().expect("pt").as_ref(), b"cloudhsm plaintext");
    assert_eq!(dec.key_id(), Some(arn.as_str()));
    assert_eq!(
        code(
            kms.decrypt()
                .ciphertext_blob(blob.clone())
                .set_encryption_context(Some(ctx("b")))
                .send()
                .await
        ),
        "InvalidCiphertextException"
    );
    let gdk = kms
        .generate_data_key()
        .key_id(&arn)
        .number_of_bytes(32)
        .send()
        .await
        .expect("generate data key");
    let opened = kms
        .decrypt()
        .ciphertext_blob(gdk.ciphertext_blob().expect("blob").clone())
        .send()
        .await
        .expect("decrypt data key");
    assert_eq!(opened.plaintext(), gdk.plaintext());
    let wp = kms
        .generate_data_key_without_plaintext()
        .key_id(&arn)
        .number_of_bytes(16)
        .send()
        .await
        .expect("generate data key without plaintext");
    let wp_blob = wp.ciphertext_blob().expect("blob").clone();
    let opened = kms
        .decrypt()
        .ciphertext_blob(wp_blob.clone())
        .send()
        .await
        .expect("decrypt data key");
    assert_eq!(opened.plaintext().expect("pt").as_ref().len(), 16);
    // ReEncrypt: CloudHSM -> AWS_KMS -> CloudHSM.
    let local = kms.create_key().send().await.expect("aws_kms key");
    let local_arn = local.key_metadata().and_then(|m| m.arn()).expect("arn");
    let to_local = kms
        .re_encrypt()
        .ciphertext_blob(blob.clone())
        .set_source_encryption_context(Some(ctx("a")))
        .destination_key_id(local_arn)
        .send()
        .await
        .expect("re-encrypt to AWS_KMS");
    assert_eq!(to_local.source_key_id(), Some(arn.as_str()));
    let back = kms
        .re_encrypt()
        .ciphertext_blob(to_local.ciphertext_blob().expect("blob").clone())
        .destination_key_id(&arn)
        .send()
        .await
        .expect("re-encrypt to CloudHSM");
    let reblob = back.ciphertext_blob().expect("blob").clone();
    let dec = kms
        .decrypt()
        .ciphertext_blob(reblob.clone())
        .send()
        .await
        .expect("decrypt re-encrypted");
    assert_eq!(dec.plaintext().expect("pt").as_ref(), b"cloudhsm plaintext");

    // Outside the emulator: one AES key labelled with the ARN, sensitive, never
    // extractable, owned by kmsuser.
    hsm.operator_reset("hsm-a", LOOK);
    let listing = hsm.secret_keys("hsm-a", LOOK);
    assert_eq!(labels(&listing), vec![arn.clone()], "{listing}");
    assert!(listing.contains("AES length 32"), "{listing}");
    assert!(listing.contains("never extractable"), "{listing}");
    assert!(listing.contains("sensitive"), "{listing}");
    // The emulator's session outlives the reset.
    kms.encrypt()
        .key_id(&arn)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .expect("encrypt after the reset");

    // Disconnected: the key is Unavailable and unusable; no key can be made.
    disconnect(&kms, &store).await;
    let described = kms
        .describe_key()
        .key_id(&arn)
        .send()
        .await
        .expect("describe");
    assert_eq!(
        described.key_metadata().and_then(|m| m.key_state()),
        Some(&KeyState::Unavailable)
    );
    assert_eq!(
        code(
            kms.encrypt()
                .key_id(&arn)
                .plaintext(Blob::new(b"x".to_vec()))
                .send()
                .await
        ),
        "KMSInvalidStateException"
    );
    assert_eq!(
        code(kms.decrypt().ciphertext_blob(blob.clone()).send().await),
        "KMSInvalidStateException"
    );

    // Reconnect (the operator's reset password told to KMS): old ciphertexts open.
    kms.update_custom_key_store()
        .custom_key_store_id(&store)
        .key_store_password(LOOK)
        .send()
        .await
        .expect("update password");
    assert_connected(&connect(&kms, &store).await);
    for (b, ec) in [(&blob, Some(ctx("a"))), (&wp_blob, None), (&reblob, None)] {
        kms.decrypt()
            .ciphertext_blob(b.clone())
            .set_encryption_context(ec)
            .send()
            .await
            .expect("old ciphertext after reconnect");
    }

    // The material deleted behind KMS's back: KMSInvalidStateException.
    hsm.operator_reset("hsm-a", LOOK2);
    hsm.delete_secret_key("hsm-a", LOOK2, &arn);
    assert!(labels(&hsm.secret_keys("hsm-a", LOOK2)).is_empty());
    let gone = kms
        .encrypt()
        .key_id(&arn)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .expect_err("material deleted");
    let svc = gone.as_service_error().expect("service error");
    assert_eq!(svc.code(), Some("KMSInvalidStateException"));
    assert!(
        svc.message().is_some_and(|m| m.contains("key material")),
        "{svc:?}"
    );
    assert_eq!(
        code(
            kms.decrypt()
                .ciphertext_blob(blob.clone())
                .set_encryption_context(Some(ctx("a")))
                .send()
                .await
        ),
        "KMSInvalidStateException"
    );

    // ScheduleKeyDeletion: at the end of the waiting period the material is destroyed
    // in the token.
    let doomed = new_key()
        .send()
        .await
        .expect("create key")
        .key_metadata()
        .and_then(|m| m.arn())
        .expect("arn")
        .to_owned();
    assert_eq!(
        labels(&hsm.secret_keys("hsm-a", LOOK2)),
        vec![doomed.clone()]
    );
    kms.schedule_key_deletion()
        .key_id(&doomed)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("schedule deletion");
    let deadline = Instant::now() + WAIT;
    loop {
        match kms.describe_key().key_id(&doomed).send().await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(
                    e.as_service_error().and_then(|s| s.code()),
                    Some("NotFoundException")
                );
                break;
            }
        }
        assert!(Instant::now() < deadline, "the key was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(labels(&hsm.secret_keys("hsm-a", LOOK2)).is_empty());

    let logs = emu.output.lock().expect("lock").join("\n");
    assert!(logs.contains("key material destroyed in the CloudHSM cluster"));
    for secret in [PIN, LOOK, LOOK2, "cloudhsm plaintext"] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
}

#[tokio::test]
async fn cloudhsm_keys_survive_restarts_and_deletion_while_disconnected_leaves_the_material() {
    const PIN: &str = "kmsuserRestart1";
    const LOOK: &str = "operatorLook3";
    let hsm = Hsm::new(&[("hsm-a", PIN)]);
    let data = tempfile::tempdir().expect("data dir");
    let entry = |hsms: &'static str| [(CLUSTER_A, "hsm-a", hsms, "lineage-1", "ACTIVE")];
    let good = hsm.clusters("good.toml", &entry("[1, 1]"));
    let one_az = hsm.clusters("one-az.toml", &entry("[2, 0]"));
    let encrypt = |kms: &Client, key: &str| {
        kms.encrypt()
            .key_id(key)
            .plaintext(Blob::new(b"kept across restarts".to_vec()))
    };

    let (store, kept, doomed, blob) = {
        let emu = hsm.emulator_with(
            &good,
            Some(data.path()),
            &["--deletion-day-length", "100ms"],
        );
        let kms = sdk(&emu);
        let store = create(&kms, "restart-keys", CLUSTER_A, &anchor(), PIN)
            .await
            .expect("create store");
        assert_connected(&connect(&kms, &store).await);
        let mut arns = Vec::new();
        for _ in 0..2 {
            arns.push(
                kms.create_key()
                    .origin(OriginType::AwsCloudhsm)
                    .custom_key_store_id(&store)
                    .send()
                    .await
                    .expect("create key")
                    .key_metadata()
                    .and_then(|m| m.arn())
                    .expect("arn")
                    .to_owned(),
            );
        }
        let (kept, doomed) = (arns[0].clone(), arns[1].clone());
        let blob = encrypt(&kms, &kept)
            .send()
            .await
            .expect("encrypt")
            .ciphertext_blob()
            .expect("blob")
            .clone();
        kms.schedule_key_deletion()
            .key_id(&doomed)
            .pending_window_in_days(7)
            .send()
            .await
            .expect("schedule deletion");
        // The waiting period ends while the store is disconnected: KMS deletes the
        // key, but the material stays in the cluster (best effort), with a warning.
        disconnect(&kms, &store).await;
        let deadline = Instant::now() + WAIT;
        while kms.describe_key().key_id(&doomed).send().await.is_ok() {
            assert!(Instant::now() < deadline, "the key was never deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs = emu.output.lock().expect("lock").join("\n");
        assert!(
            logs.contains("could not be destroyed in the CloudHSM cluster"),
            "no warning"
        );
        (store, kept, doomed, blob)
    };
    hsm.operator_reset("hsm-a", LOOK);
    let mut left = labels(&hsm.secret_keys("hsm-a", LOOK));
    left.sort();
    let mut want = vec![kept.clone(), doomed.clone()];
    want.sort();
    assert_eq!(left, want, "the doomed key's material stays in the token");

    {
        // A cluster down to one AZ: keys still work, no new key can be made.
        let emu = hsm.emulator(&one_az, Some(data.path()));
        let kms = sdk(&emu);
        kms.update_custom_key_store()
            .custom_key_store_id(&store)
            .key_store_password(LOOK)
            .send()
            .await
            .expect("update password");
        assert_connected(&connect(&kms, &store).await);
        let md = kms
            .describe_key()
            .key_id(&kept)
            .send()
            .await
            .expect("describe");
        let md = md.key_metadata().expect("metadata");
        assert_eq!(md.origin(), Some(&OriginType::AwsCloudhsm));
        assert_eq!(md.cloud_hsm_cluster_id(), Some(CLUSTER_A));
        assert_eq!(md.key_state(), Some(&KeyState::Enabled));
        kms.decrypt()
            .ciphertext_blob(blob.clone())
            .send()
            .await
            .expect("decrypt after a restart");
        assert_eq!(
            code(
                kms.create_key()
                    .origin(OriginType::AwsCloudhsm)
                    .custom_key_store_id(&store)
                    .send()
                    .await
            ),
            "CloudHsmClusterInvalidConfigurationException"
        );
    }
    {
        // Restarted while CONNECTED: the session comes back by itself, and with it
        // the key.
        let emu = hsm.emulator(&good, Some(data.path()));
        let kms = sdk(&emu);
        let deadline = Instant::now() + WAIT;
        while kms
            .decrypt()
            .ciphertext_blob(blob.clone())
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the key never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        encrypt(&kms, &kept).send().await.expect("encrypt");
    }
}

#[tokio::test]
async fn cloudhsm_key_store_requests_count_against_the_store_quota() {
    const PIN: &str = "kmsuserQuota1";
    let hsm = Hsm::new(&[("hsm-a", PIN)]);
    let clusters = hsm.clusters(
        "clusters.toml",
        &[(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")],
    );
    // One request per second per store: a burst of ten must be throttled.
    let emu = hsm.emulator_with(&clusters, None, &["--xks-store-rps", "1"]);
    let kms = sdk(&emu);
    let store = create(&kms, "quota", CLUSTER_A, &anchor(), PIN)
        .await
        .expect("create store");
    assert_connected(&connect(&kms, &store).await);
    let arn = kms
        .create_key()
        .origin(OriginType::AwsCloudhsm)
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("create key")
        .key_metadata()
        .and_then(|m| m.arn())
        .expect("arn")
        .to_owned();
    let mut throttled = 0;
    for _ in 0..10 {
        if let Err(e) = kms
            .encrypt()
            .key_id(&arn)
            .plaintext(Blob::new(b"x".to_vec()))
            .send()
            .await
        {
            assert_eq!(
                e.as_service_error().and_then(|s| s.code()),
                Some("ThrottlingException")
            );
            throttled += 1;
        }
    }
    assert!(
        throttled > 0,
        "ten requests in a burst were never throttled"
    );
    // Keys in no store are not charged.
    let local = kms.create_key().send().await.expect("aws_kms key");
    let local = local.key_metadata().and_then(|m| m.arn()).expect("arn");
    for _ in 0..10 {
        kms.encrypt()
            .key_id(local)
            .plaintext(Blob::new(b"x".to_vec()))
            .send()
            .await
            .expect("AWS_KMS keys are not throttled");
    }
}

/// Where the AWS CLI is: `target/py-venv/bin` (made by tests/run-all.sh), else the PATH.
/// Neither is a failure, not a skip.
fn aws_cli_dir() -> Vec<PathBuf> {
    let venv = repo().join("target/py-venv/bin");
    if venv.join("aws").is_file() {
        return vec![venv];
    }
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("aws").is_file());
    assert!(
        on_path,
        "the AWS CLI is needed: tests/run-all.sh installs it in target/py-venv"
    );
    Vec::new()
}

/// Issue 13: README "CloudHSM walkthrough", both blocks pasted as written into one
/// scratch directory: terminal 1 makes the SoftHSM token, the trust anchor and the
/// cluster file and starts the emulator; terminal 2 drives the whole life cycle with
/// the AWS CLI. The substitutions: the emulator listens on a free port (and terminal 2
/// dials it), and the module path if this machine keeps SoftHSM elsewhere. Checked
/// from outside afterwards: the README's password no longer logs in (rotated), and the
/// deleted key's material is gone from the token.
#[tokio::test]
async fn the_readme_cloudhsm_walkthrough_works_as_written() {
    use kms_support::readme;
    const README_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const README_PIN: &str = "kmsuserPass1";
    let heading = "### CloudHSM walkthrough (copy-paste, two terminals)";
    let (terminal1, terminal2) = (readme::sh_block(heading, 0), readme::sh_block(heading, 1));

    let module = if Path::new(README_MODULE).is_file() {
        README_MODULE.to_owned()
    } else {
        std::env::var("XKS_TEST_PKCS11_MODULE")
            .expect("SoftHSM is elsewhere here: set XKS_TEST_PKCS11_MODULE")
    };
    let terminal1 = readme::substitute(
        &readme::substitute(
            &terminal1,
            &format!("module = \"{README_MODULE}\""),
            &format!("module = \"{module}\""),
        ),
        "kms-emulator --cloudhsm-clusters clusters.toml --deletion-day-length 1s\n",
        "kms-emulator --cloudhsm-clusters clusters.toml --deletion-day-length 1s --listen 127.0.0.1:0\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = emulator().parent().expect("bin dir").to_path_buf();
    let mut cmd = readme::bash(&terminal1, dir.path(), &[bin_dir]);
    // The reader's environment must not leak in: no SoftHSM config of theirs.
    cmd.env_remove("SOFTHSM2_CONF");
    let emu = Proc::spawn(cmd, "listening on http://");
    let _group = readme::Group(emu.pid());

    let terminal2 = readme::substitute(
        &terminal2,
        "AWS_ENDPOINT_URL_KMS=http://127.0.0.1:4599",
        &format!("AWS_ENDPOINT_URL_KMS=http://{}", emu.addr),
    );
    let mut cmd = readme::bash(&terminal2, dir.path(), &aws_cli_dir());
    // No profile, config or credentials file of the machine's user.
    for v in ["AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"] {
        cmd.env_remove(v);
    }
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    let ran = readme::run_to_end(cmd, Duration::from_secs(240));
    let (out, log) = (ran.stdout, emu.output());
    assert!(
        ran.status.success(),
        "terminal 2 failed: {}\nstdout:\n{out}\nstderr:\n{}\nemulator:\n{log}",
        ran.status,
        ran.stderr
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "CONNECTED\tNone",
            "hello, CloudHSM key",
            "DISCONNECTED\tNone",
            "Unavailable",
            "CONNECTED\tNone",
            "PendingDeletion",
            "DISCONNECTED\tNone",
        ],
        "stderr:\n{}",
        ran.stderr
    );

    // The emulator agrees: no store, no key left.
    let kms = sdk(&emu);
    let stores = kms
        .describe_custom_key_stores()
        .send()
        .await
        .expect("describe stores");
    assert!(stores.custom_key_stores().is_empty(), "{stores:?}");
    let keys = kms.list_keys().send().await.expect("list keys");
    assert!(keys.keys().is_empty(), "{keys:?}");

    // The token, from outside: the README's password was rotated away, and after the
    // operator resets it, kmsuser owns no secret key (the deletion destroyed it).
    let hsm = Hsm {
        conf: dir.path().join("softhsm2.conf").display().to_string(),
        module,
        dir,
    };
    assert!(!hsm.user_pin_works("hsm-a", README_PIN), "not rotated");
    hsm.operator_reset("hsm-a", "operatorLooks1");
    let listing = hsm.secret_keys("hsm-a", "operatorLooks1");
    assert!(labels(&listing).is_empty(), "{listing}");
    assert!(!log.contains(README_PIN), "the password reached a log line");
}

/// Issue 13: KMS's troubleshooting guide says a CloudHSM key's crypto "might fail even
/// when its key state is `Enabled`" when its material was deleted from the cluster,
/// and that the state "eventually changes to `UNAVAILABLE`" with crypto failing
/// KMSInvalidStateException. The emulator's "eventually" is the first operation that
/// finds the material gone; a reconnect (the guide's recovery: a related cluster from
/// a backup, then reconnect) looks again. Other keys in the store are untouched, and
/// PendingDeletion still shows.
#[tokio::test]
async fn a_cloudhsm_key_whose_material_was_deleted_becomes_unavailable_until_a_reconnect() {
    const PIN: &str = "kmsuserGone11";
    const LOOK: &str = "operatorGone22";
    let hsm = Hsm::new(&[("hsm-a", PIN)]);
    let clusters = hsm.clusters(
        "clusters.toml",
        &[(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")],
    );
    let emu = hsm.emulator(&clusters, None);
    let kms = sdk(&emu);
    let store = create(&kms, "gone", CLUSTER_A, &anchor(), PIN)
        .await
        .expect("create store");
    assert_connected(&connect(&kms, &store).await);
    let new_key = || async {
        kms.create_key()
            .origin(OriginType::AwsCloudhsm)
            .custom_key_store_id(&store)
            .send()
            .await
            .expect("create key")
            .key_metadata()
            .and_then(|m| m.arn())
            .expect("arn")
            .to_owned()
    };
    let (arn, other) = (new_key().await, new_key().await);
    let state = |id: String| {
        let kms = kms.clone();
        async move {
            let md = kms
                .describe_key()
                .key_id(id)
                .send()
                .await
                .expect("describe key");
            let md = md.key_metadata().expect("metadata").clone();
            (md.key_state().cloned().expect("state"), md.enabled())
        }
    };
    let encrypt = |id: String| {
        let kms = kms.clone();
        async move {
            kms.encrypt()
                .key_id(id)
                .plaintext(Blob::new(b"gone".to_vec()))
                .send()
                .await
        }
    };
    let blob = encrypt(arn.clone())
        .await
        .expect("encrypt before")
        .ciphertext_blob()
        .expect("blob")
        .clone();

    hsm.operator_reset("hsm-a", LOOK);
    hsm.delete_secret_key("hsm-a", LOOK, &arn);
    // Nothing has looked yet: still Enabled, as the guide describes.
    assert_eq!(state(arn.clone()).await, (KeyState::Enabled, true));
    fn missing<R, E: ProvideErrorMetadata>(r: Result<R, aws_sdk_kms::error::SdkError<E>>) {
        let Err(e) = r else {
            panic!("the key works without its material")
        };
        let svc = e.as_service_error().expect("service error");
        assert_eq!(svc.code(), Some("KMSInvalidStateException"));
        assert!(
            svc.message().is_some_and(|m| m.contains("key material")),
            "{:?}",
            svc.message()
        );
    }
    missing(encrypt(arn.clone()).await);
    assert_eq!(state(arn.clone()).await, (KeyState::Unavailable, false));
    // Now rejected without a trip to the token, with the same reason.
    missing(encrypt(arn.clone()).await);
    let r = kms.decrypt().ciphertext_blob(blob.clone()).send().await;
    assert_eq!(code(r), "KMSInvalidStateException");
    // The store's other key is unaffected.
    assert_eq!(state(other.clone()).await, (KeyState::Enabled, true));
    encrypt(other.clone()).await.expect("the other key works");
    // PendingDeletion shows whatever the material; cancelling leaves it Disabled
    // (KMS), which shows as Unavailable while the material is missing.
    kms.schedule_key_deletion()
        .key_id(&arn)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("schedule deletion");
    assert_eq!(state(arn.clone()).await, (KeyState::PendingDeletion, false));
    kms.cancel_key_deletion()
        .key_id(&arn)
        .send()
        .await
        .expect("cancel deletion");
    assert_eq!(state(arn.clone()).await, (KeyState::Unavailable, false));

    // A reconnect looks again: the stored state shows until an operation finds the
    // material still missing.
    disconnect(&kms, &store).await;
    kms.update_custom_key_store()
        .custom_key_store_id(&store)
        .key_store_password(LOOK)
        .send()
        .await
        .expect("tell the emulator the reset password");
    assert_connected(&connect(&kms, &store).await);
    assert_eq!(state(arn.clone()).await, (KeyState::Disabled, false));
    kms.enable_key().key_id(&arn).send().await.expect("enable");
    assert_eq!(state(arn.clone()).await, (KeyState::Enabled, true));
    missing(encrypt(arn.clone()).await);
    assert_eq!(state(arn.clone()).await, (KeyState::Unavailable, false));
}

/// Issue 13, the state errors of the CloudHSM store operations not reached elsewhere:
/// Disconnect of a DISCONNECTED store, Delete of a store that still holds a key
/// (pending deletion counts), Update to a related cluster that is not active, and —
/// with a long `--disconnect-delay` holding the store in DISCONNECTING — Connect,
/// Disconnect, Update and Delete all refused with CustomKeyStoreInvalidState.
#[tokio::test]
async fn cloudhsm_store_operations_refuse_what_the_store_state_forbids() {
    const PIN: &str = "kmsuserState1";
    const PIN_C: &str = "kmsuserState3";
    const CLUSTER_B_DEGRADED: &str = "cluster-bbbbbbbbbbbb";
    let hsm = Hsm::new(&[("hsm-a", PIN), ("hsm-b", "unusedPin1"), ("hsm-c", PIN_C)]);
    let clusters = hsm.clusters(
        "clusters.toml",
        &[
            (CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE"),
            (
                CLUSTER_B_DEGRADED,
                "hsm-b",
                "[1, 1]",
                "lineage-1",
                "DEGRADED",
            ),
            (CLUSTER_C, "hsm-c", "[1, 1]", "lineage-2", "ACTIVE"),
        ],
    );
    let emu = hsm.emulator(&clusters, None);
    let kms = sdk(&emu);
    let store = create(&kms, "state", CLUSTER_A, &anchor(), PIN)
        .await
        .expect("create store");
    assert_connected(&connect(&kms, &store).await);
    let key = kms
        .create_key()
        .origin(OriginType::AwsCloudhsm)
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("create key");
    let key = key.key_metadata().and_then(|m| m.arn()).expect("arn");
    kms.schedule_key_deletion()
        .key_id(key)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("schedule deletion");
    disconnect(&kms, &store).await;
    let r = kms
        .disconnect_custom_key_store()
        .custom_key_store_id(&store)
        .send()
        .await;
    assert_eq!(code(r), "CustomKeyStoreInvalidStateException");
    let r = kms
        .delete_custom_key_store()
        .custom_key_store_id(&store)
        .send()
        .await;
    assert_eq!(code(r), "CustomKeyStoreHasCMKsException");
    let r = kms
        .update_custom_key_store()
        .custom_key_store_id(&store)
        .cloud_hsm_cluster_id(CLUSTER_B_DEGRADED)
        .send()
        .await;
    assert_eq!(code(r), "CloudHsmClusterNotActiveException");
    assert_eq!(
        describe(&kms, &store).await.cloud_hsm_cluster_id(),
        Some(CLUSTER_A)
    );

    // DISCONNECTING lasts ten minutes here: every call below lands inside it.
    let slow = hsm.emulator_with(&clusters, None, &["--disconnect-delay", "600s"]);
    let kms = sdk(&slow);
    let store = create(&kms, "slow", CLUSTER_C, &anchor(), PIN_C)
        .await
        .expect("create store");
    assert_connected(&connect(&kms, &store).await);
    kms.disconnect_custom_key_store()
        .custom_key_store_id(&store)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(
        describe(&kms, &store).await.connection_state(),
        Some(&ConnectionStateType::Disconnecting)
    );
    let id = store.as_str();
    let refusals = [
        (
            "connect",
            code(
                kms.connect_custom_key_store()
                    .custom_key_store_id(id)
                    .send()
                    .await,
            ),
        ),
        (
            "disconnect",
            code(
                kms.disconnect_custom_key_store()
                    .custom_key_store_id(id)
                    .send()
                    .await,
            ),
        ),
        (
            "update",
            code(
                kms.update_custom_key_store()
                    .custom_key_store_id(id)
                    .new_custom_key_store_name("renamed")
                    .send()
                    .await,
            ),
        ),
        (
            "delete",
            code(
                kms.delete_custom_key_store()
                    .custom_key_store_id(id)
                    .send()
                    .await,
            ),
        ),
    ];
    for (op, got) in refusals {
        assert_eq!(got, "CustomKeyStoreInvalidStateException", "{op}");
    }
}

/// Issue 13: USER_LOGGED_IN. PKCS#11 login state belongs to the application, so the
/// emulator can see kmsuser logged in only by itself: two clusters (different backup
/// lineages, so both may back a store) on one token; while the first store holds its
/// kmsuser session, connecting the second finds the user already logged in.
#[tokio::test]
async fn cloudhsm_connect_reports_kmsuser_already_logged_in() {
    const PIN: &str = "kmsuserTwice1";
    let hsm = Hsm::new(&[("hsm-a", PIN)]);
    let clusters = hsm.clusters(
        "clusters.toml",
        &[
            (CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE"),
            (CLUSTER_C, "hsm-a", "[1, 1]", "lineage-2", "ACTIVE"),
        ],
    );
    let emu = hsm.emulator(&clusters, None);
    let kms = sdk(&emu);
    let first = create(&kms, "first", CLUSTER_A, &anchor(), PIN)
        .await
        .expect("create first");
    let second = create(&kms, "second", CLUSTER_C, &anchor(), PIN)
        .await
        .expect("create second");
    assert_connected(&connect(&kms, &first).await);
    assert_failed(
        &connect(&kms, &second).await,
        ConnectionErrorCodeType::UserLoggedIn,
    );
    // The first store's session is untouched by the refused attempt.
    assert_connected(&describe(&kms, &first).await);
    kms.generate_random()
        .number_of_bytes(8)
        .custom_key_store_id(&first)
        .send()
        .await
        .expect("the first store's session still works");
}

/// Issue 13: CreateCustomKeyStore's LimitExceededException for CloudHSM stores: ten
/// stores on ten unrelated clusters, and the eleventh is refused (KMS's default quota
/// of custom key stores per account and Region is 10).
#[tokio::test]
async fn cloudhsm_create_refuses_the_eleventh_store() {
    let hsm = Hsm::new(&[("hsm-a", "kmsuserLimit1")]);
    let ids: Vec<String> = ('a'..='k')
        .map(|c| format!("cluster-limit{}", c.to_string().repeat(6)))
        .collect();
    let lineages: Vec<String> = ids.iter().map(|id| format!("lineage-{id}")).collect();
    let entries: Vec<(&str, &str, &str, &str, &str)> = ids
        .iter()
        .zip(&lineages)
        .map(|(id, l)| (id.as_str(), "hsm-a", "[1, 1]", l.as_str(), "ACTIVE"))
        .collect();
    let emu = hsm.emulator(&hsm.clusters("clusters.toml", &entries), None);
    let kms = sdk(&emu);
    for (n, id) in ids.iter().enumerate().take(10) {
        create(&kms, &format!("s{n}"), id, &anchor(), "kmsuserLimit1")
            .await
            .unwrap_or_else(|e| panic!("store {n}: {e}"));
    }
    assert_eq!(
        create(&kms, "s10", &ids[10], &anchor(), "kmsuserLimit1").await,
        Err("LimitExceededException".to_owned())
    );
}
