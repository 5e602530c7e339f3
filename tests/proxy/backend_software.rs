//! The software keystore backend: the shared conformance suite, then what is specific
//! to the software keystore (file integrity, master key handling, atomic saves,
//! rotation, hot reload, redaction).

use crate::conformance;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use xks_proxy::backend::software::{Keystore, KeystoreError, MasterKey, SoftwareBackend};
use xks_proxy::backend::{
    BackendError, CryptoBackend, HealthState, KeyStatus, KeyUsage, Opening, Sealed,
};

use conformance::Fixture;

const AAD: &[u8] = b"\x00\x00\x00";

struct Setup {
    // Held so the directory lives as long as the test.
    dir: tempfile::TempDir,
    path: PathBuf,
    master: MasterKey,
    fixture: Fixture,
}

/// A keystore in a fresh temp dir holding the conformance fixture's keys.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keystore.json");
    let master = MasterKey::generate();
    let mut ks = Keystore::create(&path, &master).expect("create keystore");
    let both = [KeyUsage::Encrypt, KeyUsage::Decrypt];
    ks.create_key("full", &both).expect("full");
    ks.create_key("encrypt-only", &[KeyUsage::Encrypt])
        .expect("encrypt-only");
    ks.create_key("decrypt-only", &[KeyUsage::Decrypt])
        .expect("decrypt-only");
    ks.create_key("wrap-only", &[KeyUsage::Wrap, KeyUsage::Unwrap])
        .expect("wrap-only");
    ks.create_key("disabled", &both).expect("disabled");
    ks.set_enabled("disabled", false).expect("disable");
    Setup {
        dir,
        path,
        master,
        fixture: Fixture {
            full: "full".into(),
            encrypt_only: "encrypt-only".into(),
            decrypt_only: "decrypt-only".into(),
            neither: "wrap-only".into(),
            disabled: "disabled".into(),
            missing: "no-such-key".into(),
        },
    }
}

fn backend(s: &Setup) -> SoftwareBackend {
    SoftwareBackend::open(&s.path, s.master.clone()).expect("open backend")
}

fn encrypt(b: &SoftwareBackend, key: &str, pt: &[u8]) -> Sealed {
    b.encrypt(key, pt, &|_| AAD.to_vec()).expect("encrypt")
}

fn decrypt(b: &SoftwareBackend, key: &str, s: &Sealed) -> Result<Vec<u8>, BackendError> {
    b.decrypt(
        key,
        Opening {
            key_version: s.key_version,
            iv: &s.iv,
            ciphertext: &s.ciphertext,
            tag: &s.tag,
            aad: AAD,
        },
    )
    .map(|p| p.expose().to_vec())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("ser")).expect("write")
}

/// The index of key `id` in the file's `keys` array.
fn key_index(v: &Value, id: &str) -> usize {
    v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .position(|k| k["id"] == id)
        .expect("key in file")
}

fn open_err(path: &Path, master: &MasterKey) -> KeystoreError {
    Keystore::open(path, master).expect_err("the keystore must not open")
}

// ---------------------------------------------------------------------------------
// The shared suite

#[test]
fn conformance_suite() {
    let s = setup();
    conformance::run_all(&backend(&s), &s.fixture);
}

#[test]
fn conformance_suite_after_rotation_and_reload() {
    let s = setup();
    let b = backend(&s);
    let mut ks = Keystore::open(&s.path, &s.master).expect("open");
    for id in ["full", "encrypt-only", "decrypt-only", "disabled"] {
        assert_eq!(ks.rotate(id).expect("rotate"), 2);
    }
    b.reload().expect("reload");
    conformance::run_all(&b, &s.fixture);
    assert_eq!(encrypt(&b, "full", b"x").key_version, 2);
}

// ---------------------------------------------------------------------------------
// File integrity and the master key

#[test]
fn wrong_master_key_is_a_clear_error() {
    let s = setup();
    let err = open_err(&s.path, &MasterKey::generate());
    assert!(
        matches!(err, KeystoreError::WrongMasterKey { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("the master key does not open the keystore"),
        "{msg}"
    );
    assert!(msg.contains("keystore.json"), "names the file: {msg}");
    let err = SoftwareBackend::open(&s.path, MasterKey::generate()).expect_err("backend too");
    assert!(
        matches!(err, KeystoreError::WrongMasterKey { .. }),
        "{err:?}"
    );
}

#[test]
fn flipping_enabled_in_the_file_is_detected() {
    let s = setup();
    let mut v = read_json(&s.path);
    let i = key_index(&v, "disabled");
    assert_eq!(v["keys"][i]["enabled"], false);
    v["keys"][i]["enabled"] = Value::Bool(true);
    write_json(&s.path, &v);
    let err = open_err(&s.path, &s.master);
    assert!(matches!(err, KeystoreError::Tampered { .. }), "{err:?}");
    assert!(
        err.to_string().contains("modified outside xks-proxy"),
        "{err}"
    );
}

/// A named hand edit of the keystore JSON.
type Edit = (&'static str, fn(&mut Value));

#[test]
fn other_hand_edits_are_detected() {
    let edits: [Edit; 5] = [
        ("usages widened", |v| {
            let i = key_index(v, "encrypt-only");
            v["keys"][i]["usages"] = serde_json::json!(["DECRYPT", "ENCRYPT"]);
        }),
        ("key renamed", |v| {
            let i = key_index(v, "full");
            v["keys"][i]["id"] = Value::from("fuller");
        }),
        ("key removed", |v| {
            let i = key_index(v, "full");
            v["keys"].as_array_mut().expect("keys").remove(i);
        }),
        ("created changed", |v| {
            v["created"] = Value::from("2000-01-01T00:00:00Z");
        }),
        ("version renumbered", |v| {
            let i = key_index(v, "full");
            v["keys"][i]["versions"][0]["version"] = Value::from(7);
        }),
    ];
    for (what, edit) in edits {
        let s = setup();
        let mut v = read_json(&s.path);
        edit(&mut v);
        write_json(&s.path, &v);
        let err = open_err(&s.path, &s.master);
        assert!(
            matches!(err, KeystoreError::Tampered { .. }),
            "{what}: {err:?}"
        );
    }
}

#[test]
fn blobs_swapped_between_keys_are_refused() {
    let s = setup();
    let mut v = read_json(&s.path);
    let (a, b) = (key_index(&v, "full"), key_index(&v, "encrypt-only"));
    let blob_a = v["keys"][a]["versions"][0]["sealed"].clone();
    v["keys"][a]["versions"][0]["sealed"] = v["keys"][b]["versions"][0]["sealed"].clone();
    v["keys"][b]["versions"][0]["sealed"] = blob_a;
    write_json(&s.path, &v);
    // The MAC catches it first; the unit tests in keystore.rs show that the sealing
    // AAD alone refuses it too, even under a valid MAC.
    let err = open_err(&s.path, &s.master);
    assert!(matches!(err, KeystoreError::Tampered { .. }), "{err:?}");
}

#[test]
fn unknown_fields_and_future_versions_are_refused_clearly() {
    let s = setup();
    let original = read_json(&s.path);

    let mut v = original.clone();
    v["format_version"] = Value::from(2);
    write_json(&s.path, &v);
    let err = open_err(&s.path, &s.master);
    assert!(
        matches!(
            err,
            KeystoreError::UnsupportedFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );

    let mut v = original.clone();
    v["extra"] = Value::from(1);
    write_json(&s.path, &v);
    assert!(matches!(
        open_err(&s.path, &s.master),
        KeystoreError::Malformed { .. }
    ));

    std::fs::write(&s.path, b"not json").expect("write");
    assert!(matches!(
        open_err(&s.path, &s.master),
        KeystoreError::Malformed { .. }
    ));

    std::fs::write(&s.path, b"{\"hello\": 1}").expect("write");
    assert!(matches!(
        open_err(&s.path, &s.master),
        KeystoreError::Malformed { .. }
    ));

    // Whitespace is not content: a reformatted but otherwise untouched file opens.
    write_json(&s.path, &original);
    std::fs::write(&s.path, serde_json::to_vec(&original).expect("compact")).expect("write");
    Keystore::open(&s.path, &s.master).expect("reformatted file opens");
}

#[test]
fn missing_keystore_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.json");
    let err = open_err(&path, &MasterKey::generate());
    assert!(matches!(err, KeystoreError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn create_refuses_to_overwrite() {
    let s = setup();
    let before = std::fs::read(&s.path).expect("read");
    let err = Keystore::create(&s.path, &MasterKey::generate()).expect_err("must refuse");
    assert!(
        matches!(err, KeystoreError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(&s.path).expect("read"),
        before,
        "file untouched"
    );

    let other = s.dir.path().join("something-else.txt");
    std::fs::write(&other, b"precious").expect("write");
    assert!(matches!(
        Keystore::create(&other, &s.master),
        Err(KeystoreError::AlreadyExists { .. })
    ));
    assert_eq!(std::fs::read(&other).expect("read"), b"precious");
}

#[test]
fn saves_are_atomic_leave_no_temp_files_and_are_private() {
    let s = setup();
    let mut ks = Keystore::open(&s.path, &s.master).expect("open");
    for i in 0..5 {
        ks.create_key(&format!("k{i}"), &[KeyUsage::Encrypt])
            .expect("create");
        ks.rotate("full").expect("rotate");
        ks.set_enabled("full", i % 2 == 0).expect("toggle");
    }
    ks.save().expect("save");
    let names: Vec<String> = std::fs::read_dir(s.dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["keystore.json".to_owned()],
        "only the keystore remains"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&s.path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let reopened = Keystore::open(&s.path, &s.master).expect("reopen");
    assert_eq!(reopened.list(), ks.list());
}

#[test]
fn two_admin_handles_do_not_silently_overwrite_each_other() {
    let s = setup();
    let mut a = Keystore::open(&s.path, &s.master).expect("open a");
    let mut b = Keystore::open(&s.path, &s.master).expect("open b");
    a.set_enabled("full", false).expect("a disables");
    let err = b.rotate("full").expect_err("b's view is stale");
    assert!(
        matches!(err, KeystoreError::ChangedOnDisk { .. }),
        "{err:?}"
    );
    // b's memory was rolled back; the file still has a's change.
    assert_eq!(b.key_info("full").expect("full").version_count, 1);
    let now = Keystore::open(&s.path, &s.master).expect("reopen");
    assert!(!now.key_info("full").expect("full").enabled);
}

// ---------------------------------------------------------------------------------
// Admin operations, rotation and reload

#[test]
fn admin_operations_validate_their_input() {
    let s = setup();
    let mut ks = Keystore::open(&s.path, &s.master).expect("open");
    for bad in ["", "a/b", "has space", "é", &"x".repeat(129)] {
        let err = ks.create_key(bad, &[KeyUsage::Encrypt]).expect_err(bad);
        assert!(
            matches!(err, KeystoreError::InvalidKeyId { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert!(matches!(
        ks.create_key("full", &[KeyUsage::Encrypt]),
        Err(KeystoreError::KeyExists { .. })
    ));
    assert!(matches!(
        ks.set_enabled("nope", false),
        Err(KeystoreError::NoSuchKey { .. })
    ));
    assert!(matches!(
        ks.rotate("nope"),
        Err(KeystoreError::NoSuchKey { .. })
    ));

    let info = ks
        .create_key(
            "dup",
            &[KeyUsage::Decrypt, KeyUsage::Encrypt, KeyUsage::Decrypt],
        )
        .expect("create");
    assert_eq!(info.usages, vec![KeyUsage::Encrypt, KeyUsage::Decrypt]);
    assert!(info.enabled);
    assert_eq!((info.current_version, info.version_count), (1, 1));

    let ids: Vec<String> = ks.list().into_iter().map(|k| k.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "list is sorted by id");
    assert_eq!(ids.len(), 6);
}

#[test]
fn rotation_keeps_old_ciphertexts_decryptable() {
    let s = setup();
    let b = backend(&s);
    let old = encrypt(&b, "full", b"before rotation");
    assert_eq!(old.key_version, 1);

    let mut ks = Keystore::open(&s.path, &s.master).expect("open");
    assert_eq!(ks.rotate("full").expect("rotate"), 2);
    assert_eq!(ks.rotate("full").expect("rotate"), 3);
    let info = ks.key_info("full").expect("full");
    assert_eq!((info.current_version, info.version_count), (3, 3));
    b.reload().expect("reload");

    let new = encrypt(&b, "full", b"after rotation");
    assert_eq!(new.key_version, 3, "new encryptions use the newest version");
    assert_eq!(decrypt(&b, "full", &old).expect("old"), b"before rotation");
    assert_eq!(decrypt(&b, "full", &new).expect("new"), b"after rotation");
    // Versions are distinct keys: a v3 ciphertext does not open as v2.
    let mislabelled = Sealed {
        key_version: 2,
        ..new.clone()
    };
    assert_eq!(
        decrypt(&b, "full", &mislabelled),
        Err(BackendError::InvalidCiphertext)
    );
    let unknown = Sealed {
        key_version: 4,
        ..new
    };
    assert_eq!(
        decrypt(&b, "full", &unknown),
        Err(BackendError::InvalidCiphertext)
    );
}

#[test]
fn reload_picks_up_a_disable_from_another_handle() {
    let s = setup();
    let b = backend(&s);
    let sealed = encrypt(&b, "full", b"hello");

    let mut ks = Keystore::open(&s.path, &s.master).expect("open");
    ks.set_enabled("full", false).expect("disable");
    // Not seen until reload: the backend serves its verified snapshot.
    assert_eq!(
        b.key_metadata("full").expect("md").status,
        KeyStatus::Enabled
    );
    b.reload().expect("reload");
    assert_eq!(
        b.key_metadata("full").expect("md").status,
        KeyStatus::Disabled
    );
    assert_eq!(
        b.encrypt("full", b"x", &|_| AAD.to_vec()).map(|_| ()),
        Err(BackendError::KeyDisabled)
    );
    assert_eq!(decrypt(&b, "full", &sealed), Err(BackendError::KeyDisabled));

    ks.set_enabled("full", true).expect("enable");
    b.reload().expect("reload");
    assert_eq!(decrypt(&b, "full", &sealed).expect("decrypt"), b"hello");
}

#[test]
fn failed_reload_keeps_the_old_state_and_reports_degraded() {
    let s = setup();
    let b = backend(&s);
    let good = std::fs::read(&s.path).expect("read");
    let mut v = read_json(&s.path);
    let i = key_index(&v, "full");
    v["keys"][i]["enabled"] = Value::Bool(false);
    write_json(&s.path, &v);

    let err = b.reload().expect_err("tampered file");
    assert!(matches!(err, KeystoreError::Tampered { .. }), "{err:?}");
    let sealed = encrypt(&b, "full", b"still serving");
    assert_eq!(
        decrypt(&b, "full", &sealed).expect("decrypt"),
        b"still serving"
    );
    assert_eq!(b.health()[0].state, HealthState::Degraded);

    std::fs::remove_file(&s.path).expect("rm");
    assert!(matches!(b.reload(), Err(KeystoreError::NotFound { .. })));
    assert_eq!(encrypt(&b, "full", b"x").ciphertext.len(), 1);

    std::fs::write(&s.path, good).expect("restore");
    b.reload().expect("reload");
    assert_eq!(b.health()[0].state, HealthState::Active);
}

#[test]
fn health_names_the_keystore_file() {
    let s = setup();
    let b = backend(&s);
    let health = b.health();
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].id, "keystore.json");
    assert_eq!(
        health[0].model,
        format!(
            "software keystore (xks-proxy {})",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(health[0].state, HealthState::Active);
    assert_eq!(b.ekm_vendor(), "xks-proxy software keystore");
}

#[test]
fn simulated_latency_blocks_and_sleeps() {
    let s = setup();
    let b = backend(&s);
    assert!(!b.may_block(), "in-memory AES-GCM never blocks");
    let b = b.with_simulated_latency(Duration::from_millis(30));
    assert!(b.may_block());
    let start = Instant::now();
    b.key_metadata("full").expect("md");
    let sealed = encrypt(&b, "full", b"slow");
    decrypt(&b, "full", &sealed).expect("decrypt");
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// Redaction

#[test]
fn debug_never_shows_key_bytes() {
    let s = setup();
    let b = backend(&s);
    let ks = Keystore::open(&s.path, &s.master).expect("open");
    let b64 = s.master.to_base64();
    let raw = STANDARD.decode(b64.expose()).expect("b64");
    let secrets = [
        b64.expose().to_owned(),
        hex::encode(&raw),
        hex::encode_upper(&raw),
    ];
    let dbg = format!(
        "{ks:?}\n{ks:#?}\n{b:?}\n{b:#?}\n{:?}\n{:#?}",
        s.master, s.master
    );
    for secret in &secrets {
        assert!(
            !dbg.contains(secret.as_str()),
            "Debug leaks the master key:\n{dbg}"
        );
    }
    assert!(dbg.contains("redacted"), "{dbg}");
    // Nor does the keystore file carry the master key in any form.
    let file = std::fs::read_to_string(&s.path).expect("read");
    for secret in &secrets {
        assert!(!file.contains(secret.as_str()));
    }
}

// ---------------------------------------------------------------------------------
// Master key sources

#[test]
fn master_key_from_unset_env_var_names_the_var() {
    let var = "XKS_PROXY_TEST_MASTER_KEY_THAT_IS_NEVER_SET";
    let err = MasterKey::from_env(var).expect_err("unset");
    assert!(
        matches!(err, KeystoreError::MasterKeyEnvUnset { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(var), "{err}");
}

/// Environment variables can't be set in-process without `unsafe` (edition 2024), so
/// this re-runs the test binary with them set and `master_key_from_env_child` selected.
#[test]
fn master_key_from_env() {
    let key = MasterKey::generate();
    let output = std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            // Its name in the `proxy` test binary (tests/proxy/main.rs).
            "backend_software::master_key_from_env_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("XKS_TEST_CHILD", "1")
        .env(
            "XKS_TEST_MK_GOOD",
            format!("  {}\n", key.to_base64().expose()),
        )
        .env("XKS_TEST_MK_EXPECT", key.to_base64().expose())
        .env("XKS_TEST_MK_BAD", "c2VjcmV0LWJ1dC10b28tc2hvcnQ=")
        .output()
        .expect("spawn child test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("1 passed"), "child did not run:\n{stdout}");
}

/// The child half of `master_key_from_env` (a no-op when run directly).
#[test]
fn master_key_from_env_child() {
    if std::env::var_os("XKS_TEST_CHILD").is_none() {
        return;
    }
    let key = MasterKey::from_env("XKS_TEST_MK_GOOD").expect("good key");
    let expected = std::env::var("XKS_TEST_MK_EXPECT").expect("expect");
    assert_eq!(key.to_base64().expose(), expected);

    let err = MasterKey::from_env("XKS_TEST_MK_BAD").expect_err("16 bytes is too short");
    assert!(
        matches!(err, KeystoreError::MasterKeyEnvInvalid { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("XKS_TEST_MK_BAD"), "{msg}");
    assert!(!msg.contains("c2VjcmV0"), "the value leaked: {msg}");
}

#[test]
fn master_key_from_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = MasterKey::generate();
    let b64 = key.to_base64();

    let text = dir.path().join("mk.b64");
    std::fs::write(&text, format!("\n  {}  \n", b64.expose())).expect("write");
    let loaded = MasterKey::from_file(&text).expect("base64 file");
    assert_eq!(loaded.to_base64().expose(), b64.expose());

    let raw = dir.path().join("mk.bin");
    std::fs::write(&raw, STANDARD.decode(b64.expose()).expect("b64")).expect("write");
    let loaded = MasterKey::from_file(&raw).expect("raw file");
    assert_eq!(loaded.to_base64().expose(), b64.expose());

    // A file made from a key opens a keystore made with the same key.
    let ks_path = dir.path().join("ks.json");
    Keystore::create(&ks_path, &key).expect("create");
    Keystore::open(&ks_path, &loaded).expect("same key opens it");

    let bad = dir.path().join("mk.bad");
    std::fs::write(&bad, "hunter2-is-not-a-key").expect("write");
    let err = MasterKey::from_file(&bad).expect_err("bad content");
    assert!(
        matches!(err, KeystoreError::MasterKeyFileInvalid { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("mk.bad") && !msg.contains("hunter2"), "{msg}");

    let missing = dir.path().join("mk.missing");
    let err = MasterKey::from_file(&missing).expect_err("missing");
    assert!(
        matches!(err, KeystoreError::MasterKeyFileRead { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("mk.missing"), "{err}");

    assert!(matches!(
        MasterKey::from_bytes(&[0; 16]),
        Err(KeystoreError::MasterKeyLength { len: 16 })
    ));
}
