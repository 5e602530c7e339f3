//! Encrypt (spec §"Encrypt"): AES-256-GCM under the spec's AAD construction, with the
//! CDIV computed from the output *before* a verify-decrypt (spec Appendix C order).

use subtle::ConstantTimeEq;

use super::aad::{self, Metadata};
use super::error::ApiError;
use super::wire::{Base64Bytes, EncryptRequest, EncryptResponse};
use super::{Call, MAX_AAD, MAX_DATA, require_key_arn, require_principal};
use crate::backend::{BackendError, Opening};

pub async fn handle(call: &Call<'_>, req: EncryptRequest) -> Result<EncryptResponse, ApiError> {
    require_principal(&req.request_metadata)?;
    require_key_arn(&req.request_metadata)?;
    if req.encryption_algorithm != "AES_GCM" {
        return Err(ApiError::Validation(
            "encryptionAlgorithm must be AES_GCM".into(),
        ));
    }
    let want_cdiv = match req.ciphertext_data_integrity_value_algorithm.as_deref() {
        None => false,
        Some("SHA_256") => true,
        Some(_) => {
            return Err(ApiError::Validation(
                "ciphertextDataIntegrityValueAlgorithm must be SHA_256 when present".into(),
            ));
        }
    };
    let plaintext = req.plaintext.0;
    if plaintext.is_empty() {
        return Err(ApiError::Validation("plaintext must not be empty".into()));
    }
    if plaintext.len() > MAX_DATA {
        return Err(ApiError::Unsupported(format!(
            "plaintext larger than this proxy supports ({MAX_DATA} bytes; the spec requires 4300)"
        )));
    }
    let user_aad = req
        .additional_authenticated_data
        .map(|a| a.0)
        .unwrap_or_default();
    if user_aad.len() > MAX_AAD {
        return Err(ApiError::Unsupported(format!(
            "additionalAuthenticatedData larger than this proxy supports ({MAX_AAD} bytes; the spec requires 8192)"
        )));
    }
    let key = call.key_id.to_owned();

    // One trip through the backend boundary: encrypt, CDIV from that output, then the
    // verify-decrypt. Doing all three in one blocking call saves a thread hop, and the
    // order is the spec's: a corruption between encrypt and CDIV would be caught by the
    // self-check, and one after it by KMS's CDIV check.
    let (sealed, cdiv) = call
        .backend
        .call(move |b| {
            let aad_for = |v| aad::encode(&user_aad, &Metadata::v1(v).encode());
            let sealed = b.encrypt(&key, plaintext.expose(), &aad_for)?;
            let md = Metadata::v1(sealed.key_version).encode();
            let full_aad = aad::encode(&user_aad, &md);
            let cdiv = want_cdiv
                .then(|| aad::cdiv(&user_aad, &md, &sealed.iv, &sealed.ciphertext, &sealed.tag));
            if want_cdiv {
                // Spec order of work: no CDIV leaves the proxy before the output has been
                // decrypted again. A key that may not decrypt cannot be checked, so the
                // request fails with the backend's UsageNotAllowed (400
                // InvalidKeyUsageException), as AWS's conformance client requires.
                let back = b.decrypt(
                    &key,
                    Opening {
                        key_version: sealed.key_version,
                        iv: &sealed.iv,
                        ciphertext: &sealed.ciphertext,
                        tag: &sealed.tag,
                        aad: &full_aad,
                    },
                );
                match back {
                    Ok(pt) if bool::from(pt.expose().ct_eq(plaintext.expose())) => {}
                    Ok(_) | Err(BackendError::InvalidCiphertext) => {
                        return Ok(Err(ApiError::SelfCheckFailed));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Ok((sealed, cdiv)))
        })
        .await??;
    let md = Metadata::v1(sealed.key_version).encode();
    debug_assert_eq!(sealed.tag.len(), 16);
    Ok(EncryptResponse {
        authentication_tag: Base64Bytes(sealed.tag.to_vec()),
        ciphertext: Base64Bytes(sealed.ciphertext),
        ciphertext_data_integrity_value: cdiv.map(|c| Base64Bytes(c.to_vec())),
        ciphertext_metadata: Some(Base64Bytes(md.to_vec())),
        initialization_vector: Base64Bytes(sealed.iv),
    })
}
