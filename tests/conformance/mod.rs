//! The backend conformance suite: one set of checks, written once over
//! `&dyn CryptoBackend`, that every backend must pass (the software keystore in
//! `tests/proxy/backend_software.rs`, a real SoftHSMv2 token in the PKCS#11 tests).
//!
//! Each backend test creates the keys of a [`Fixture`] its own way and calls
//! [`run_all`]. Every check names itself in its assertion messages, and its doc line
//! cites the rule it pins: the `CryptoBackend` contract in `src/backend/mod.rs` or the
//! XKS API spec (`docs/xks-api.md`).
//!
//! Checks assert only what the contract promises, so they hold for any correct
//! backend: e.g. key versions are whatever the backend reports (the software keystore
//! starts at 1, HSMs without versioning use 0), and usage lists are checked for
//! ENCRYPT/DECRYPT only (an HSM key may carry WRAP as well).

use std::sync::Mutex;

use xks_proxy::backend::{
    BackendError, CryptoBackend, HealthState, KeySpec, KeyStatus, KeyUsage, KeyVersion, Opening,
    Sealed,
};

/// Key ids the suite needs; each backend test creates these keys its own way.
pub struct Fixture {
    pub full: String,         // AES-256, ENCRYPT+DECRYPT, enabled
    pub encrypt_only: String, // AES-256, ENCRYPT only
    pub decrypt_only: String, // AES-256, DECRYPT only
    pub neither: String,      // AES-256, no ENCRYPT and no DECRYPT (e.g. WRAP only, or nothing)
    pub disabled: String,     // AES-256, ENCRYPT+DECRYPT, disabled
    pub missing: String,      // an id that names no key
}

/// Runs every check against `backend`. Panics (with the check's name) on the first
/// violation.
pub fn run_all(backend: &dyn CryptoBackend, fx: &Fixture) {
    metadata_of_each_key(backend, fx);
    round_trip_with_aad(backend, fx);
    sealed_output_shape(backend, fx);
    fresh_iv_per_encryption(backend, fx);
    tampering_is_invalid_ciphertext(backend, fx);
    wrong_lengths_are_invalid_ciphertext(backend, fx);
    wrong_key_version_is_invalid_ciphertext(backend, fx);
    sixteen_byte_iv_is_invalid_ciphertext(backend, fx);
    encrypt_only_key(backend, fx);
    decrypt_only_key(backend, fx);
    key_without_encrypt_or_decrypt(backend, fx);
    disabled_key(backend, fx);
    missing_key(backend, fx);
    aad_callback_gets_the_sealing_version(backend, fx);
    health_is_deep_and_well_formed(backend);
    concurrent_round_trips(backend, fx);
}

// ---------------------------------------------------------------------------------
// Helpers

/// An AAD shaped like the spec's construction (`u16_be(len(aad)) || aad || u8(len(md))
/// || md`), so backends are exercised with what `api` really hands them.
fn spec_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    let aad_len = u16::try_from(aad.len()).expect("test AAD fits u16");
    let md_len = u8::try_from(metadata.len()).expect("test metadata fits u8");
    out.extend_from_slice(&aad_len.to_be_bytes());
    out.extend_from_slice(aad);
    out.push(md_len);
    out.extend_from_slice(metadata);
    out
}

/// Deterministic, non-repeating test plaintext of `len` bytes, varied by `seed`.
fn plaintext(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, good enough to make every buffer distinct.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[track_caller]
fn encrypt_ok(
    check: &str,
    backend: &dyn CryptoBackend,
    key: &str,
    pt: &[u8],
    aad: &[u8],
) -> Sealed {
    backend
        .encrypt(key, pt, &|_| aad.to_vec())
        .unwrap_or_else(|e| panic!("{check}: encrypt under {key:?} failed: {e:?}"))
}

fn opening<'a>(sealed: &'a Sealed, aad: &'a [u8]) -> Opening<'a> {
    Opening {
        key_version: sealed.key_version,
        iv: &sealed.iv,
        ciphertext: &sealed.ciphertext,
        tag: &sealed.tag,
        aad,
    }
}

#[track_caller]
fn assert_invalid_ciphertext(check: &str, what: &str, result: Result<impl Sized, BackendError>) {
    match result {
        Err(BackendError::InvalidCiphertext) => {}
        Err(e) => panic!("{check}: {what}: expected InvalidCiphertext, got {e:?}"),
        Ok(_) => panic!("{check}: {what}: expected InvalidCiphertext, but it decrypted"),
    }
}

fn flip_first_bit(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if let Some(b) = out.first_mut() {
        *b ^= 0x01;
    }
    out
}

/// The key version this backend stamps on new ciphertexts (learned from `full`), so
/// hand-made inputs for other keys use a version the backend could plausibly know.
fn backend_version(backend: &dyn CryptoBackend, fx: &Fixture) -> KeyVersion {
    encrypt_ok(
        "backend_version",
        backend,
        &fx.full,
        b"probe",
        &spec_aad(b"", b""),
    )
    .key_version
}

// ---------------------------------------------------------------------------------
// Checks

/// GetKeyMetadata (spec): keySpec AES_256, keyUsage lists what the key allows, keyStatus
/// ENABLED/DISABLED; at most 10 usages, no duplicates.
pub fn metadata_of_each_key(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "metadata_of_each_key";
    // (key, ENCRYPT expected, DECRYPT expected, status)
    let cases = [
        (&fx.full, true, true, KeyStatus::Enabled),
        (&fx.encrypt_only, true, false, KeyStatus::Enabled),
        (&fx.decrypt_only, false, true, KeyStatus::Enabled),
        (&fx.neither, false, false, KeyStatus::Enabled),
        (&fx.disabled, true, true, KeyStatus::Disabled),
    ];
    for (key, encrypt, decrypt, status) in cases {
        let md = backend
            .key_metadata(key)
            .unwrap_or_else(|e| panic!("{CHECK}: metadata of {key:?} failed: {e:?}"));
        assert_eq!(
            md.spec,
            KeySpec::Aes { bits: 256 },
            "{CHECK}: spec of {key:?}"
        );
        assert_eq!(md.status, status, "{CHECK}: status of {key:?}");
        assert_eq!(
            md.usages.contains(&KeyUsage::Encrypt),
            encrypt,
            "{CHECK}: ENCRYPT in usages of {key:?}: {:?}",
            md.usages
        );
        assert_eq!(
            md.usages.contains(&KeyUsage::Decrypt),
            decrypt,
            "{CHECK}: DECRYPT in usages of {key:?}: {:?}",
            md.usages
        );
        assert!(
            md.usages.len() <= 10,
            "{CHECK}: more than 10 usages on {key:?}"
        );
        let mut dedup = md.usages.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(
            dedup.len(),
            md.usages.len(),
            "{CHECK}: duplicate usages on {key:?}"
        );
    }
}

/// Encrypt/Decrypt (spec): plaintexts of at least 4300 bytes and AAD of up to
/// 8192 bytes (plus the spec's length/metadata framing) round-trip exactly.
pub fn round_trip_with_aad(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "round_trip_with_aad";
    let aads = [
        spec_aad(b"", b""),
        spec_aad(
            b"project=nile,department=marketing",
            b"\x01\x00\x00\x00\x01",
        ),
        spec_aad(&plaintext(8192, 7), &[0xAB; 20]),
    ];
    for (i, size) in [1usize, 32, 4300].into_iter().enumerate() {
        for (j, aad) in aads.iter().enumerate() {
            let pt = plaintext(size, (i * 10 + j) as u64);
            let sealed = encrypt_ok(CHECK, backend, &fx.full, &pt, aad);
            let back = backend
                .decrypt(&fx.full, opening(&sealed, aad))
                .unwrap_or_else(|e| panic!("{CHECK}: decrypt of {size} bytes failed: {e:?}"));
            assert!(
                back.expose() == pt,
                "{CHECK}: {size} bytes did not round-trip"
            );
        }
    }
}

/// Encrypt (spec): ciphertext is as long as the plaintext, the IV is 12 bytes (every
/// backend we ship), the tag is 16 bytes and separate from the ciphertext.
pub fn sealed_output_shape(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "sealed_output_shape";
    for size in [1usize, 32, 4300] {
        let pt = plaintext(size, 100 + size as u64);
        let sealed = encrypt_ok(CHECK, backend, &fx.full, &pt, &spec_aad(b"", b""));
        assert_eq!(sealed.ciphertext.len(), size, "{CHECK}: ciphertext length");
        assert_eq!(sealed.iv.len(), 12, "{CHECK}: IV length");
        assert_eq!(sealed.tag.len(), 16, "{CHECK}: tag length");
        // Not for 1 byte: a correct cipher leaves it unchanged once in 256 runs.
        if size > 1 {
            assert_ne!(
                sealed.ciphertext, pt,
                "{CHECK}: ciphertext equals plaintext ({size} bytes)"
            );
        }
    }
}

/// AES-GCM security (NIST SP 800-38D): an IV is never reused, so two encryptions
/// of the same plaintext and AAD differ.
pub fn fresh_iv_per_encryption(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "fresh_iv_per_encryption";
    let pt = plaintext(32, 200);
    let aad = spec_aad(b"same", b"");
    let a = encrypt_ok(CHECK, backend, &fx.full, &pt, &aad);
    let b = encrypt_ok(CHECK, backend, &fx.full, &pt, &aad);
    assert_ne!(a.iv, b.iv, "{CHECK}: IV reused");
    assert_ne!(a.ciphertext, b.ciphertext, "{CHECK}: identical ciphertexts");
    assert_ne!(a.tag, b.tag, "{CHECK}: identical tags");
}

/// Decrypt (spec InvalidCiphertextException; contract: "any authentication failure is
/// InvalidCiphertext"): a changed tag, ciphertext, IV or AAD never decrypts.
pub fn tampering_is_invalid_ciphertext(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "tampering_is_invalid_ciphertext";
    let pt = plaintext(64, 300);
    let aad = spec_aad(b"context", b"\x01");
    let sealed = encrypt_ok(CHECK, backend, &fx.full, &pt, &aad);
    let good = opening(&sealed, &aad);

    let tag = flip_first_bit(&sealed.tag);
    let ct = flip_first_bit(&sealed.ciphertext);
    let iv = flip_first_bit(&sealed.iv);
    let other_aad = flip_first_bit(&aad);
    let mut last_ct_byte = sealed.ciphertext.clone();
    if let Some(b) = last_ct_byte.last_mut() {
        *b ^= 0x80;
    }
    let cases: [(&str, Opening<'_>); 7] = [
        ("tag bit flipped", Opening { tag: &tag, ..good }),
        (
            "ciphertext bit flipped",
            Opening {
                ciphertext: &ct,
                ..good
            },
        ),
        (
            "last ciphertext byte changed",
            Opening {
                ciphertext: &last_ct_byte,
                ..good
            },
        ),
        ("IV bit flipped", Opening { iv: &iv, ..good }),
        (
            "AAD bit flipped",
            Opening {
                aad: &other_aad,
                ..good
            },
        ),
        ("AAD missing", Opening { aad: &[], ..good }),
        (
            "ciphertext truncated",
            Opening {
                ciphertext: &sealed.ciphertext[..63],
                ..good
            },
        ),
    ];
    for (what, op) in cases {
        assert_invalid_ciphertext(CHECK, what, backend.decrypt(&fx.full, op));
    }
    // And the untouched input still decrypts (the failures above are not flukes).
    let back = backend
        .decrypt(&fx.full, good)
        .unwrap_or_else(|e| panic!("{CHECK}: untouched input failed: {e:?}"));
    assert!(
        back.expose() == pt,
        "{CHECK}: untouched input decrypted wrongly"
    );
}

/// Contract ("wrong IV length ... is InvalidCiphertext"): a short or missing tag or IV
/// is refused as InvalidCiphertext, never as a crash or a different error.
pub fn wrong_lengths_are_invalid_ciphertext(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "wrong_lengths_are_invalid_ciphertext";
    let aad = spec_aad(b"", b"");
    let sealed = encrypt_ok(CHECK, backend, &fx.full, &plaintext(32, 400), &aad);
    let good = opening(&sealed, &aad);
    let cases: [(&str, Opening<'_>); 4] = [
        (
            "15-byte tag",
            Opening {
                tag: &sealed.tag[..15],
                ..good
            },
        ),
        ("empty tag", Opening { tag: &[], ..good }),
        (
            "11-byte IV",
            Opening {
                iv: &sealed.iv[..11],
                ..good
            },
        ),
        ("empty IV", Opening { iv: &[], ..good }),
    ];
    for (what, op) in cases {
        assert_invalid_ciphertext(CHECK, what, backend.decrypt(&fx.full, op));
    }
}

/// Contract ("unknown key version" is InvalidCiphertext): a ciphertext claiming a
/// version other than the one that sealed it never decrypts.
pub fn wrong_key_version_is_invalid_ciphertext(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "wrong_key_version_is_invalid_ciphertext";
    let aad = spec_aad(b"", b"");
    let sealed = encrypt_ok(CHECK, backend, &fx.full, &plaintext(32, 500), &aad);
    for version in [
        sealed.key_version.wrapping_add(1),
        sealed.key_version.wrapping_add(1000),
        u32::MAX,
    ] {
        if version == sealed.key_version {
            continue;
        }
        let op = Opening {
            key_version: version,
            ..opening(&sealed, &aad)
        };
        assert_invalid_ciphertext(
            CHECK,
            &format!("version {version}"),
            backend.decrypt(&fx.full, op),
        );
    }
}

/// Decrypt (spec: IV is 12 or 16 bytes): our backends only make 12-byte IVs, so a
/// 16-byte IV is InvalidCiphertext (a backend that accepted 16-byte IVs still could not
/// authenticate a ciphertext made under a 12-byte one).
pub fn sixteen_byte_iv_is_invalid_ciphertext(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "sixteen_byte_iv_is_invalid_ciphertext";
    let aad = spec_aad(b"", b"");
    let sealed = encrypt_ok(CHECK, backend, &fx.full, &plaintext(32, 600), &aad);
    let mut iv16 = sealed.iv.clone();
    iv16.extend_from_slice(&[0u8; 4]);
    let op = Opening {
        iv: &iv16,
        ..opening(&sealed, &aad)
    };
    assert_invalid_ciphertext(CHECK, "16-byte IV", backend.decrypt(&fx.full, op));
}

/// Encrypt/Decrypt (spec InvalidKeyUsageException; contract: decrypt checks DECRYPT):
/// an ENCRYPT-only key encrypts but refuses to decrypt, even its own ciphertext.
pub fn encrypt_only_key(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "encrypt_only_key";
    let aad = spec_aad(b"", b"");
    let sealed = encrypt_ok(CHECK, backend, &fx.encrypt_only, &plaintext(32, 700), &aad);
    assert_eq!(sealed.ciphertext.len(), 32, "{CHECK}: ciphertext length");
    let result = backend.decrypt(&fx.encrypt_only, opening(&sealed, &aad));
    assert_eq!(
        result.map(|_| ()),
        Err(BackendError::UsageNotAllowed(KeyUsage::Decrypt)),
        "{CHECK}: decrypt"
    );
}

/// Encrypt/Decrypt (spec InvalidKeyUsageException; contract: encrypt checks ENCRYPT):
/// a DECRYPT-only key refuses to encrypt; its decrypt path is allowed, so a
/// well-formed garbage input fails authentication (InvalidCiphertext), not usage.
pub fn decrypt_only_key(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "decrypt_only_key";
    let aad = spec_aad(b"", b"");
    let result = backend.encrypt(&fx.decrypt_only, b"hello", &|_| aad.clone());
    assert_eq!(
        result.map(|_| ()),
        Err(BackendError::UsageNotAllowed(KeyUsage::Encrypt)),
        "{CHECK}: encrypt"
    );
    let garbage = Opening {
        key_version: backend_version(backend, fx),
        iv: &[0x11; 12],
        ciphertext: &[0x22; 32],
        tag: &[0x33; 16],
        aad: &aad,
    };
    assert_invalid_ciphertext(
        CHECK,
        "garbage input",
        backend.decrypt(&fx.decrypt_only, garbage),
    );
}

/// Encrypt/Decrypt (spec InvalidKeyUsageException): a key allowing neither ENCRYPT
/// nor DECRYPT refuses both.
pub fn key_without_encrypt_or_decrypt(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "key_without_encrypt_or_decrypt";
    let aad = spec_aad(b"", b"");
    let result = backend.encrypt(&fx.neither, b"hello", &|_| aad.clone());
    assert_eq!(
        result.map(|_| ()),
        Err(BackendError::UsageNotAllowed(KeyUsage::Encrypt)),
        "{CHECK}: encrypt"
    );
    let garbage = Opening {
        key_version: backend_version(backend, fx),
        iv: &[0x11; 12],
        ciphertext: &[0x22; 32],
        tag: &[0x33; 16],
        aad: &aad,
    };
    assert_eq!(
        backend.decrypt(&fx.neither, garbage).map(|_| ()),
        Err(BackendError::UsageNotAllowed(KeyUsage::Decrypt)),
        "{CHECK}: decrypt"
    );
}

/// Spec InvalidStateException ("key disabled"): a disabled key refuses encrypt and
/// decrypt with KeyDisabled, and GetKeyMetadata reports DISABLED.
pub fn disabled_key(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "disabled_key";
    let aad = spec_aad(b"", b"");
    assert_eq!(
        backend
            .encrypt(&fx.disabled, b"hello", &|_| aad.clone())
            .map(|_| ()),
        Err(BackendError::KeyDisabled),
        "{CHECK}: encrypt"
    );
    let garbage = Opening {
        key_version: backend_version(backend, fx),
        iv: &[0x11; 12],
        ciphertext: &[0x22; 32],
        tag: &[0x33; 16],
        aad: &aad,
    };
    assert_eq!(
        backend.decrypt(&fx.disabled, garbage).map(|_| ()),
        Err(BackendError::KeyDisabled),
        "{CHECK}: decrypt"
    );
    let md = backend
        .key_metadata(&fx.disabled)
        .unwrap_or_else(|e| panic!("{CHECK}: metadata failed: {e:?}"));
    assert_eq!(md.status, KeyStatus::Disabled, "{CHECK}: metadata status");
}

/// Spec KeyNotFoundException: an id naming no key is KeyNotFound for all three key
/// operations.
pub fn missing_key(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "missing_key";
    let aad = spec_aad(b"", b"");
    assert_eq!(
        backend.key_metadata(&fx.missing).map(|_| ()),
        Err(BackendError::KeyNotFound),
        "{CHECK}: metadata"
    );
    assert_eq!(
        backend
            .encrypt(&fx.missing, b"hello", &|_| aad.clone())
            .map(|_| ()),
        Err(BackendError::KeyNotFound),
        "{CHECK}: encrypt"
    );
    let garbage = Opening {
        key_version: backend_version(backend, fx),
        iv: &[0x11; 12],
        ciphertext: &[0x22; 32],
        tag: &[0x33; 16],
        aad: &aad,
    };
    assert_eq!(
        backend.decrypt(&fx.missing, garbage).map(|_| ()),
        Err(BackendError::KeyNotFound),
        "{CHECK}: decrypt"
    );
}

/// Contract ("asks `aad` for the AAD for the key version it will use"): the callback
/// sees exactly the version reported in `Sealed.key_version`, and the AAD it returns
/// is the one the tag covers.
pub fn aad_callback_gets_the_sealing_version(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "aad_callback_gets_the_sealing_version";
    let seen = Mutex::new(Vec::new());
    let aad_for = |v: KeyVersion| spec_aad(b"versioned", &v.to_be_bytes());
    let sealed = backend
        .encrypt(&fx.full, &plaintext(32, 800), &|v| {
            seen.lock().expect("lock").push(v);
            aad_for(v)
        })
        .unwrap_or_else(|e| panic!("{CHECK}: encrypt failed: {e:?}"));
    let seen = seen.into_inner().expect("lock");
    assert!(
        !seen.is_empty(),
        "{CHECK}: the aad callback was never called"
    );
    assert!(
        seen.iter().all(|&v| v == sealed.key_version),
        "{CHECK}: callback saw versions {seen:?}, Sealed says {}",
        sealed.key_version
    );
    let aad = aad_for(sealed.key_version);
    let back = backend
        .decrypt(&fx.full, opening(&sealed, &aad))
        .unwrap_or_else(|e| panic!("{CHECK}: decrypt with the callback's AAD failed: {e:?}"));
    assert!(
        back.expose() == plaintext(32, 800),
        "{CHECK}: wrong plaintext"
    );
    let other = aad_for(sealed.key_version.wrapping_add(1));
    assert_invalid_ciphertext(
        CHECK,
        "AAD of another version",
        backend.decrypt(&fx.full, opening(&sealed, &other)),
    );
}

/// GetHealthStatus (spec): 1 to 10 `ekmFleetDetails` entries, each with an id and a
/// model; a healthy backend's deep check reports ACTIVE; `ekmVendor` is non-empty.
pub fn health_is_deep_and_well_formed(backend: &dyn CryptoBackend) {
    const CHECK: &str = "health_is_deep_and_well_formed";
    let health = backend.health();
    assert!(
        (1..=10).contains(&health.len()),
        "{CHECK}: {} entries, want 1..=10",
        health.len()
    );
    for entry in &health {
        assert!(
            !entry.id.trim().is_empty(),
            "{CHECK}: empty id in {entry:?}"
        );
        assert!(
            !entry.model.trim().is_empty(),
            "{CHECK}: empty model in {entry:?}"
        );
        assert_eq!(entry.state, HealthState::Active, "{CHECK}: {entry:?}");
    }
    assert!(
        !backend.ekm_vendor().trim().is_empty(),
        "{CHECK}: empty ekm_vendor"
    );
}

/// Contract ("safe to call from many threads at once"): 8 threads x 200 round trips,
/// each with its own plaintext and AAD, and not one wrong result.
pub fn concurrent_round_trips(backend: &dyn CryptoBackend, fx: &Fixture) {
    const CHECK: &str = "concurrent_round_trips";
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 200;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for r in 0..ROUNDS {
                        let seed = t * ROUNDS + r;
                        let pt = plaintext(1 + (seed as usize % 97), 10_000 + seed);
                        let aad = spec_aad(&seed.to_be_bytes(), b"");
                        match backend.encrypt(&fx.full, &pt, &|_| aad.clone()) {
                            Ok(sealed) => {
                                match backend.decrypt(&fx.full, opening(&sealed, &aad)) {
                                    Ok(back) if back.expose() == pt => {}
                                    Ok(_) => failures
                                        .push(format!("thread {t} round {r}: wrong plaintext")),
                                    Err(e) => failures
                                        .push(format!("thread {t} round {r}: decrypt {e:?}")),
                                }
                            }
                            Err(e) => failures.push(format!("thread {t} round {r}: encrypt {e:?}")),
                        }
                    }
                    failures
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker thread panicked"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{CHECK}: {} of {} round trips failed, first: {:?}",
        failures.len(),
        THREADS * ROUNDS,
        failures.first()
    );
}
