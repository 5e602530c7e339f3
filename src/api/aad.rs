//! The spec's AAD construction, our `ciphertextMetadata` format, and the CDIV — pure
//! functions with the spec's vectors as tests.
//!
//! Every ciphertext this proxy makes carries `ciphertextMetadata = [format, version(4, BE)]`
//! and was sealed with AAD = `u16_be(len aad) || aad || u8(len md) || md`. Recording the
//! format means a future change of AAD scheme can tell old ciphertexts apart; recording
//! the key version means rotation never strands them. Binding both into the AAD means a
//! modified metadata byte fails authentication (spec: "a modified value MUST be detected").

use crate::crypto::digest;

use crate::backend::KeyVersion;

/// Our first (and so far only) ciphertext format: the spec's AAD construction, with the
/// key version in the metadata.
pub const FORMAT_V1: u8 = 1;

/// Encoded length of our metadata (spec allows up to 20 bytes).
pub const METADATA_LEN: usize = 5;

/// The spec's limit on `ciphertextMetadata`.
pub const MAX_METADATA_LEN: usize = 20;

/// Our `ciphertextMetadata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    pub format: u8,
    pub key_version: KeyVersion,
}

impl Metadata {
    pub fn v1(key_version: KeyVersion) -> Self {
        Self {
            format: FORMAT_V1,
            key_version,
        }
    }

    pub fn encode(self) -> [u8; METADATA_LEN] {
        let v = self.key_version.to_be_bytes();
        [self.format, v[0], v[1], v[2], v[3]]
    }

    /// Parses metadata this proxy wrote. `None` for anything else (an unknown format
    /// is an InvalidCiphertextException: we cannot know how it was sealed).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [FORMAT_V1, a, b, c, d] => Some(Self::v1(u32::from_be_bytes([*a, *b, *c, *d]))),
            _ => None,
        }
    }
}

/// The AAD handed to AES-GCM: `u16_be(len aad) || aad || u8(len md) || md`.
///
/// Callers have already bounded `aad` (≤ 8192 required, our cap is below 65536) and
/// `metadata` (≤ 20), so the length prefixes cannot overflow; the asserts document it.
pub fn encode(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    debug_assert!(aad.len() <= u16::MAX as usize);
    debug_assert!(metadata.len() <= u8::MAX as usize);
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    out.extend_from_slice(&(aad.len() as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// The AAD AWS's sample proxy (aws-samples/aws-kms-xks-proxy, `build_full_aad`) gave
/// the HSM: `u16_be(len aad) || SHA-256(aad) || u8(len md) || md`, where the digest is
/// there whenever the request carried the AAD field, even empty, and not when it did
/// not. Used only to open ciphertexts that proxy made (a keystore's
/// `aws_sample_ciphertexts`); never to seal.
pub fn aws_sample(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    debug_assert!(metadata.len() <= u8::MAX as usize);
    let mut out = Vec::with_capacity(3 + 32 + metadata.len());
    match aad {
        Some(a) => {
            debug_assert!(a.len() <= u16::MAX as usize);
            out.extend_from_slice(&(a.len() as u16).to_be_bytes());
            out.extend_from_slice(digest::digest(&digest::SHA256, a).as_ref());
        }
        None => out.extend_from_slice(&[0, 0]),
    }
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// CDIV = SHA-256(aad || ciphertextMetadata || iv || ciphertext || tag), absent = empty.
pub fn cdiv(aad: &[u8], metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn spec_appendix_c_cdiv_worked_example() {
        // Spec Appendix C: the worked CDIV example.
        let aad = b"project=nile,department=marketing";
        let md = b"key_version=1";
        let iv = hex::decode("1ccae5470f39700254779031").expect("hex");
        let ct = hex::decode("821c642b5b71783367deaf18").expect("hex");
        let tag = hex::decode("bc1c4dda7707d6812447c5955e99b261").expect("hex");
        let got = cdiv(aad, md, &iv, &ct, &tag);
        assert_eq!(
            hex::encode(got),
            "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
        );
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(got),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    #[test]
    fn the_aws_sample_aad_digests_a_present_aad_even_when_empty() {
        // ../shared/vectors/aws-sample/README.md: absent → no digest; present but empty
        // → the length 0 and SHA-256("") follow; the static metadata closes it.
        assert_eq!(aws_sample(None, b""), vec![0, 0, 0]);
        let empty = aws_sample(Some(b""), b"v0.0.1");
        assert_eq!(&empty[..2], &[0, 0]);
        assert_eq!(
            hex::encode(&empty[2..34]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(&empty[34..], b"\x06v0.0.1");
        let some = aws_sample(Some(&[7u8; 33]), b"");
        assert_eq!(&some[..2], &33u16.to_be_bytes());
        assert_eq!(some.len(), 2 + 32 + 1);
    }

    #[test]
    fn aad_with_neither_field_is_three_zero_bytes() {
        // Spec: a missing field has length 0 and no bytes.
        assert_eq!(encode(&[], &[]), vec![0, 0, 0]);
    }

    #[test]
    fn aad_is_length_prefixed_so_bytes_cannot_move_between_fields() {
        assert_eq!(encode(b"ab", b"c"), vec![0, 2, b'a', b'b', 1, b'c']);
        assert_ne!(encode(b"abc", b""), encode(b"ab", b"c"));
        let big = vec![7u8; 8192];
        let e = encode(&big, &[1, 2]);
        assert_eq!(&e[..2], &8192u16.to_be_bytes());
        assert_eq!(e.len(), 2 + 8192 + 1 + 2);
    }

    #[test]
    fn metadata_round_trips_and_rejects_unknown_formats() {
        let m = Metadata::v1(0x0102_0304);
        let enc = m.encode();
        assert_eq!(enc, [1, 1, 2, 3, 4]);
        assert!(enc.len() <= MAX_METADATA_LEN);
        assert_eq!(Metadata::decode(&enc), Some(m));
        assert_eq!(Metadata::decode(&[2, 0, 0, 0, 1]), None);
        assert_eq!(Metadata::decode(&[1, 0, 0, 1]), None);
        assert_eq!(Metadata::decode(&[]), None);
    }
}
