//! Encrypt (spec §"Encrypt"): AES-256-GCM under the spec's AAD construction, with the
//! CDIV computed from the output *before* a verify-decrypt (spec Appendix C order).

use std::cell::RefCell;

use subtle::ConstantTimeEq;

use super::aad::{self, Metadata};
use super::error::ApiError;
use super::wire::{Base64Bytes, EncryptRequest, EncryptResponse};
use super::{Call, MAX_AAD, MAX_DATA, require_key_arn, require_principal};
use crate::backend::{BackendError, CryptoBackend, KeyVersion, Opening, Sealed};
use crate::secret::SecretBytes;

/// The answer and the key version that sealed it (for the request log and audit record).
pub async fn handle(
    call: &Call<'_>,
    req: EncryptRequest,
) -> Result<(EncryptResponse, KeyVersion), ApiError> {
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
    let sealing = call
        .backend
        .call(move |b| seal_and_check(b, &key, &plaintext, &user_aad, want_cdiv))
        .await?;
    let Checked::Sealed(sealing) = sealing else {
        return Err(ApiError::SelfCheckFailed);
    };
    let Sealing {
        sealed,
        metadata,
        cdiv,
    } = sealing;
    let key_version = sealed.key_version;
    debug_assert_eq!(sealed.tag.len(), 16);
    let response = EncryptResponse {
        authentication_tag: Base64Bytes(sealed.tag.to_vec()),
        ciphertext: Base64Bytes(sealed.ciphertext),
        ciphertext_data_integrity_value: cdiv.map(|c| Base64Bytes(c.to_vec())),
        ciphertext_metadata: Some(Base64Bytes(metadata.to_vec())),
        initialization_vector: Base64Bytes(sealed.iv),
    };
    Ok((response, key_version))
}

/// What one Encrypt produced in the backend: the sealed output, its
/// `ciphertextMetadata` and the CDIV when asked. `metadata` is the bytes the backend's
/// AAD callback built for the version it sealed with — captured, not recomputed — as is
/// the AAD the self-check opens under (in [`seal_and_check`]): the same bytes by
/// construction, and the metadata encoded once.
struct Sealing {
    sealed: Sealed,
    metadata: [u8; aad::METADATA_LEN],
    cdiv: Option<[u8; 32]>,
}

/// The outcome of the backend call: sealed (and, with a CDIV, opened again to the same
/// plaintext), or the self-check failed. A backend failure is the call's `Err`.
enum Checked {
    Sealed(Sealing),
    SelfCheckFailed,
}

/// Runs on the backend's call thread: encrypt, the CDIV from that output, then (with a
/// CDIV) the verify-decrypt under the very AAD the backend sealed under.
fn seal_and_check(
    b: &dyn CryptoBackend,
    key: &str,
    plaintext: &SecretBytes,
    user_aad: &[u8],
    want_cdiv: bool,
) -> Result<Checked, BackendError> {
    // The backend calls this with the version it seals under (again, if it retries on
    // another session or token): the last call's bytes are the ones sealed under.
    let built = RefCell::new(None);
    let aad_for = |version: KeyVersion| {
        let metadata = Metadata::v1(version).encode();
        let full = aad::encode(user_aad, &metadata);
        *built.borrow_mut() = Some((version, metadata, full.clone()));
        full
    };
    let sealed = b.encrypt(key, plaintext.expose(), &aad_for)?;
    let Some((version, metadata, aad)) = built.into_inner() else {
        return Err(BackendError::Failed(
            "the backend sealed without asking for its AAD".into(),
        ));
    };
    if version != sealed.key_version {
        return Err(BackendError::Failed(
            "the backend sealed under another key version than its AAD names".into(),
        ));
    }
    let cdiv = want_cdiv.then(|| {
        aad::cdiv(
            user_aad,
            &metadata,
            &sealed.iv,
            &sealed.ciphertext,
            &sealed.tag,
        )
    });
    if want_cdiv {
        // Spec order of work: no CDIV leaves the proxy before the output has been
        // decrypted again. A key that may not decrypt cannot be checked, so the request
        // fails with the backend's UsageNotAllowed (400 InvalidKeyUsageException), as
        // AWS's conformance client requires.
        let back = b.decrypt(
            key,
            Opening {
                key_version: sealed.key_version,
                iv: &sealed.iv,
                ciphertext: &sealed.ciphertext,
                tag: &sealed.tag,
                aad: &aad,
            },
        );
        match back {
            Ok(pt) if bool::from(pt.expose().ct_eq(plaintext.expose())) => {}
            Ok(_) | Err(BackendError::InvalidCiphertext) => return Ok(Checked::SelfCheckFailed),
            Err(e) => return Err(e),
        }
    }
    Ok(Checked::Sealed(Sealing {
        sealed,
        metadata,
        cdiv,
    }))
}
