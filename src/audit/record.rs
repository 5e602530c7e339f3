//! The audit trail's line format and its cryptography: one JSON object per line, fields
//! in a fixed order, each carrying `prev` (hex SHA-256 of the previous line's bytes), and
//! the HMAC-SHA256 seal on chain starts and checkpoints. The only place the audit trail
//! uses [`crate::crypto`] (ring, or the AWS-LC FIPS module in the FIPS build).

use std::fmt;

use serde::Serialize;

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What separates a sealed line's body from its MAC: the MAC is always the last field.
const MAC_FIELD: &str = ",\"mac\":\"";

/// Hex SHA-256 of one line's bytes (without its newline): the next line's `prev`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(crate::crypto::digest::digest(&crate::crypto::digest::SHA256, line).as_ref())
}

/// The checkpoint key. HMAC-SHA256 (see the README's "Audit trail" for why not
/// Ed25519). No `Debug` of the key, no `Clone`: the crypto library keeps its copy and we keep none.
pub struct SealKey(crate::crypto::hmac::Key);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    /// The key bytes are used as given (the configured text, trimmed).
    pub fn new(secret: &[u8]) -> Self {
        Self(crate::crypto::hmac::Key::new(
            crate::crypto::hmac::HMAC_SHA256,
            secret,
        ))
    }

    fn tag(&self, body: &[u8]) -> String {
        hex::encode(crate::crypto::hmac::sign(&self.0, body).as_ref())
    }

    /// Constant-time check of `mac_hex` over `body`.
    fn verify(&self, body: &[u8], mac_hex: &str) -> bool {
        hex::decode(mac_hex)
            .is_ok_and(|mac| crate::crypto::hmac::verify(&self.0, body, &mac).is_ok())
    }

    /// Appends the MAC to a serialized object: `{...}` → `{...,"mac":"<hex>"}`. The MAC
    /// covers every byte before `,"mac"` — seq, prev (the chain head it seals), time
    /// and the rest — so no field of a sealed line can change without the key.
    pub fn seal(&self, object: &str) -> String {
        let body = object.strip_suffix('}').unwrap_or(object);
        format!("{body}{MAC_FIELD}{}\"}}", self.tag(body.as_bytes()))
    }

    /// Whether a sealed line's MAC is right. `None`: the line carries no MAC.
    pub fn check(&self, line: &str) -> Option<bool> {
        let (body, mac) = split_seal(line)?;
        Some(self.verify(body.as_bytes(), mac))
    }
}

/// `(body, mac)` of a sealed line.
fn split_seal(line: &str) -> Option<(&str, &str)> {
    let at = line.rfind(MAC_FIELD)?;
    let mac = line[at + MAC_FIELD.len()..].strip_suffix("\"}")?;
    Some((&line[..at], mac))
}

/// One line: the chain fields, then the kind's own fields (in their declared order).
#[derive(Serialize)]
pub struct Line<'a, T: Serialize> {
    pub seq: u64,
    pub prev: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub body: &'a T,
}

/// One XKS request, as the API saw it. Never plaintext, AAD, ciphertext or secrets:
/// this type has no field that could hold them. Request-derived strings are escaped
/// by serde_json when the line is written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// RFC 3339, UTC, when the answer was decided.
    pub time: String,
    pub kms_request_id: Option<String>,
    pub kms_operation: Option<String>,
    /// GetKeyMetadata, Encrypt, Decrypt or GetHealthStatus.
    pub xks_operation: Option<&'static str>,
    pub principal: Option<String>,
    pub source_vpc: Option<String>,
    pub source_vpce: Option<String>,
    pub prefix: Option<String>,
    pub access_key_id: Option<String>,
    pub key_id: Option<String>,
    /// The key version used (Encrypt) or named by the ciphertext (Decrypt).
    pub key_version: Option<u32>,
    /// "ok" or "error".
    pub outcome: &'static str,
    /// The spec errorName of an error answer.
    pub error_name: Option<&'static str>,
    pub status: u16,
    pub backend: Option<String>,
    pub latency_us: u64,
}

/// The first line of every file: why the chain starts (or continues) here. Sealed.
#[derive(Debug, Clone, Serialize)]
pub struct ChainStart {
    pub time: String,
    /// `new`, `resumed`, `resumed_after_unclean_stop`, `rotated`,
    /// `recovered_after_write_error`, or `previous_unreadable`.
    pub reason: &'static str,
    /// What the reason is about (the previous file, the error), when there is one.
    pub detail: Option<String>,
}

/// A seal over the chain up to the line before it (its `prev`). Sealed.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    pub time: String,
    /// Written at shutdown: nothing follows in this chain until a `resumed` start.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Records that were lost (writer failure or a full queue with `on_failure =
/// "continue"`): the chain itself says how many, where.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub time: String,
    pub lost: u64,
    pub reason: String,
}

/// Now, as the records write it (RFC 3339 UTC with microseconds).
pub fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_covers_every_byte_before_the_mac_and_needs_the_key() {
        let key = SealKey::new(b"0123456789abcdef0123456789abcdef");
        let line = key.seal(r#"{"seq":3,"prev":"ab","type":"checkpoint","final":true}"#);
        assert!(line.ends_with("\"}"), "{line}");
        assert_eq!(key.check(&line), Some(true));
        assert_eq!(
            key.check(&line.replace("\"seq\":3", "\"seq\":4")),
            Some(false)
        );
        let other = SealKey::new(b"another key another key another k");
        assert_eq!(other.check(&line), Some(false));
        assert_eq!(key.check(r#"{"seq":1}"#), None);
        assert!(!format!("{key:?}").contains("0123"));
    }

    #[test]
    fn the_hash_is_sha256_of_the_line_bytes() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            line_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(GENESIS.len(), 64);
    }
}
