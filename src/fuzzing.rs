//! Thin wrappers over private parsers, for the coverage-guided fuzz targets in `fuzz/`
//! (see `fuzz/README.md`). Not an API: hidden from the docs, and nothing in the
//! product calls it.
//!
//! Everything else the targets drive is already public ([`crate::api::route::parse`],
//! [`crate::sigv4::verify`], [`crate::api::Api::serve`], [`crate::kms::protocol::handle`],
//! [`crate::config::Config::from_toml`]); only the emulator's ciphertext-blob parser is
//! private to its module, so it is reached through [`kms_blob`].

/// What the emulator's blob parser (`kms::crypto::parse_blob`) read from a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedBlob {
    /// 1 (AWS_KMS key), 2 (XKS key) or 3 (a key in a CloudHSM key store: one layer,
    /// sealed in the token).
    pub format: u8,
    /// The key UUID the header names.
    pub key_uuid: uuid::Uuid,
    /// The 16-byte backing-key ID the header names.
    pub backing_key_id: Vec<u8>,
    /// The parsed pieces re-encoded in the documented blob layout; a parser that read
    /// the blob faithfully gives back exactly the input.
    pub reencoded: Vec<u8>,
}

/// Parses `blob` as the emulator's Decrypt and ReEncrypt do; `None` where they would
/// answer InvalidCiphertextException before looking up a key.
pub fn kms_blob(blob: &[u8]) -> Option<ParsedBlob> {
    use crate::kms::crypto::{Blob, parse_blob};
    let parsed = parse_blob(blob).ok()?;
    let key_uuid = parsed.key_uuid();
    let backing_key_id = parsed.backing_key_id().to_vec();
    let (format, reencoded) = match &parsed {
        Blob::Local { header, inner } => (header[0], [*header, *inner].concat()),
        Blob::Xks { header, sealed } => {
            let mut out = header.to_vec();
            out.push(u8::try_from(sealed.iv.len()).ok()?);
            out.extend_from_slice(&sealed.iv);
            out.extend_from_slice(&sealed.tag);
            out.push(u8::try_from(sealed.metadata.len()).ok()?);
            out.extend_from_slice(&sealed.metadata);
            out.extend_from_slice(&sealed.ciphertext);
            (header[0], out)
        }
    };
    Some(ParsedBlob {
        format,
        key_uuid,
        backing_key_id,
        reencoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The property the `kms_blob` target checks, on the layouts of both formats.
    #[test]
    fn well_formed_blobs_re_encode_to_themselves_and_short_ones_are_refused() {
        let header = |format: u8| {
            let mut h = vec![format];
            h.extend(1..=32u8);
            h
        };
        let local = [header(1), vec![0; 12], b"data".to_vec(), vec![0; 16]].concat();
        let cloudhsm = [header(3), vec![0; 12], b"data".to_vec(), vec![0; 16]].concat();
        let xks = [
            header(2),
            vec![12],
            vec![7; 12],
            vec![8; 16],
            vec![5, 1, 0, 0, 0, 1],
            vec![9; 12 + 3 + 16],
        ]
        .concat();
        for blob in [local, cloudhsm, xks] {
            let parsed = kms_blob(&blob).expect("well-formed");
            assert_eq!(parsed.reencoded, blob);
            assert_eq!(parsed.key_uuid.as_bytes()[..], blob[1..17]);
            assert_eq!(parsed.backing_key_id, blob[17..33]);
            assert_eq!(kms_blob(&blob[..32]), None);
        }
    }
}
