//! Decrypt (spec §"Decrypt"): rebuild the AAD from the request's AAD and metadata, and
//! open under the key version the metadata names.

use super::aad::{self, MAX_METADATA_LEN, Metadata};
use super::error::ApiError;
use super::wire::{Base64Secret, DecryptRequest, DecryptResponse};
use super::{Call, MAX_AAD, MAX_DATA, require_key_arn, require_principal};
use crate::backend::{Opening, TAG_LEN};

pub async fn handle(call: &Call<'_>, req: DecryptRequest) -> Result<DecryptResponse, ApiError> {
    require_principal(&req.request_metadata)?;
    require_key_arn(&req.request_metadata)?;
    if req.encryption_algorithm != "AES_GCM" {
        return Err(ApiError::Validation(
            "encryptionAlgorithm must be AES_GCM".into(),
        ));
    }
    let ciphertext = req.ciphertext.0;
    if ciphertext.is_empty() {
        return Err(ApiError::InvalidCiphertext(
            "ciphertext is missing or empty",
        ));
    }
    if ciphertext.len() > MAX_DATA {
        return Err(ApiError::Unsupported(format!(
            "ciphertext larger than this proxy supports ({MAX_DATA} bytes; the spec requires 4300)"
        )));
    }
    let iv = req.initialization_vector.0;
    // Spec error table: IV or tag "missing, or otherwise invalid" → InvalidCiphertext.
    if iv.len() != 12 && iv.len() != 16 {
        return Err(ApiError::InvalidCiphertext(
            "initializationVector is missing or not 12 or 16 bytes",
        ));
    }
    let tag = req.authentication_tag.0;
    if tag.len() != TAG_LEN {
        return Err(ApiError::InvalidCiphertext(
            "authenticationTag is missing or not 16 bytes",
        ));
    }
    // Present-but-empty and absent differ for the sample's AAD (a digest or none).
    let aad_present = req.additional_authenticated_data.is_some();
    let user_aad = req
        .additional_authenticated_data
        .map(|a| a.0)
        .unwrap_or_default();
    if user_aad.len() > MAX_AAD {
        return Err(ApiError::Unsupported(format!(
            "additionalAuthenticatedData larger than this proxy supports ({MAX_AAD} bytes; the spec requires 8192)"
        )));
    }
    let md_bytes = req.ciphertext_metadata.map(|m| m.0).unwrap_or_default();
    if md_bytes.len() > MAX_METADATA_LEN {
        return Err(ApiError::Validation(
            "ciphertextMetadata must be at most 20 bytes".into(),
        ));
    }
    // Every ciphertext we make carries our metadata. The only other kind we open is
    // one AWS's sample proxy made, recognised by exactly its static metadata (config
    // validation keeps that from ever looking like ours, so none of ours is ever tried
    // the sample's way). PKCS#11 keys have the one version 0.
    let (key_version, full_aad) = match Metadata::decode(&md_bytes) {
        Some(md) => (md.key_version, aad::encode(&user_aad, &md_bytes)),
        None if call.aws_sample_metadata == Some(md_bytes.as_slice()) => (
            0,
            aad::aws_sample(aad_present.then_some(user_aad.as_slice()), &md_bytes),
        ),
        None => {
            return Err(ApiError::InvalidCiphertext(
                "ciphertextMetadata is missing or not in a format this proxy wrote",
            ));
        }
    };
    let key = call.key_id.to_owned();
    let plaintext = call
        .backend
        .call(move |b| {
            b.decrypt(
                &key,
                Opening {
                    key_version,
                    iv: &iv,
                    ciphertext: &ciphertext,
                    tag: &tag,
                    aad: &full_aad,
                },
            )
        })
        .await?;
    Ok(DecryptResponse {
        plaintext: Base64Secret(plaintext),
    })
}
