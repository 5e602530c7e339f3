//! The KMS emulator's ciphertext-blob parser (`kms::crypto::parse_blob`, reached through
//! `xks_proxy::fuzzing::kms_blob`): any bytes are refused or parsed, never a panic, and
//! a parsed blob re-encodes in the documented layout to exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(parsed) = xks_proxy::fuzzing::kms_blob(data) else {
        return;
    };
    assert!(matches!(parsed.format, 1..=3), "format {}", parsed.format);
    assert_eq!(&data[1..17], parsed.key_uuid.as_bytes());
    assert_eq!(&data[17..33], &parsed.backing_key_id[..]);
    assert_eq!(
        parsed.reencoded, data,
        "the parsed pieces lose or invent bytes"
    );
});
