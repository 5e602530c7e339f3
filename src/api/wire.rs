//! The XKS API's JSON bodies (spec §"API Specification"): one struct per request and
//! response, shared by the proxy (which decodes requests) and the KMS emulator (which
//! encodes them), so both sides speak exactly one shape.
//!
//! Rules encoded here: binary fields are *standard* Base64 (RFC 4648 §4, padded, not
//! URL-safe); unknown JSON members are accepted (KMS may add fields); `plaintext` is a
//! [`Base64Secret`] so it is zeroized and never printed by `Debug`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::SecretBytes;

/// Binary data carried as standard Base64.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Base64Bytes(pub Vec<u8>);

impl fmt::Debug for Base64Bytes {
    // Ciphertexts, IVs and tags are not secret, but dumping kilobytes into a log helps
    // nobody: show the length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

/// Secret binary data (plaintext) carried as standard Base64.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Base64Secret(pub SecretBytes);

impl fmt::Debug for Base64Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64Secret({:?})", self.0)
    }
}

struct B64Visitor;

impl Visitor<'_> for B64Visitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a standard Base64 string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        // Fixed message: never echo the input, which may be plaintext.
        STANDARD
            .decode(v)
            .map_err(|_| E::custom("not valid standard (RFC 4648 section 4) Base64"))
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(B64Visitor).map(Base64Bytes)
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(B64Visitor)
            .map(|v| Base64Secret(SecretBytes::new(v)))
    }
}

impl Serialize for Base64Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let encoded = zeroize::Zeroizing::new(STANDARD.encode(self.0.expose()));
        s.serialize_str(&encoded)
    }
}

/// `requestMetadata`, present in every request. Unknown members are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    /// Opaque; never validated for shape, always logged.
    pub kms_request_id: String,
    /// Any value is accepted, including ones the spec does not list.
    pub kms_operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_principal_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_source_vpc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_source_vpce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_via_service: Option<String>,
}

/// GetHealthStatus request (POST `/health`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthRequest {
    pub request_metadata: RequestMetadata,
}

/// GetKeyMetadata request (POST `/keys/<id>/metadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataRequest {
    pub request_metadata: RequestMetadata,
}

/// Encrypt request (POST `/keys/<id>/encrypt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    pub request_metadata: RequestMetadata,
    pub plaintext: Base64Secret,
    /// MUST be `AES_GCM`.
    pub encryption_algorithm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_authenticated_data: Option<Base64Bytes>,
    /// `SHA_256` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value_algorithm: Option<String>,
}

/// Encrypt response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    pub authentication_tag: Base64Bytes,
    pub ciphertext: Base64Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<Base64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<Base64Bytes>,
    pub initialization_vector: Base64Bytes,
}

/// Decrypt request (POST `/keys/<id>/decrypt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    pub request_metadata: RequestMetadata,
    // Spec error table: a ciphertext, IV or tag that is "corrupted, missing, or otherwise
    // invalid" is InvalidCiphertextException, not ValidationException. So a missing one
    // decodes as empty and `api::decrypt` refuses it under that name. (Invalid Base64
    // stays ValidationException: that is the request's encoding, not the ciphertext.)
    #[serde(default)]
    pub ciphertext: Base64Bytes,
    /// MUST be `AES_GCM`.
    pub encryption_algorithm: String,
    #[serde(default)]
    pub initialization_vector: Base64Bytes,
    #[serde(default)]
    pub authentication_tag: Base64Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_authenticated_data: Option<Base64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<Base64Bytes>,
}

/// Decrypt response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptResponse {
    pub plaintext: Base64Secret,
}

/// GetKeyMetadata response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataResponse {
    pub key_spec: String,
    pub key_usage: Vec<String>,
    pub key_status: String,
}

/// One `ekmFleetDetails` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmFleetDetail {
    pub id: String,
    pub model: String,
    pub health_status: String,
}

/// GetHealthStatus response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    pub xks_proxy_fleet_size: u32,
    pub xks_proxy_vendor: String,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<EkmFleetDetail>,
}

/// Every error's body (spec §"Error Codes").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    pub error_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_members_are_accepted() {
        // Spec: KMS may add fields to requestMetadata; they must not be rejected.
        let r: HealthRequest = serde_json::from_str(
            r#"{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"SomethingNew","future":1},"extra":true}"#,
        )
        .expect("parse");
        assert_eq!(r.request_metadata.kms_operation, "SomethingNew");
    }

    #[test]
    fn url_safe_base64_is_rejected_without_echoing_the_input() {
        // Spec: binary fields are standard Base64 (RFC 4648 section 4), not URL-safe.
        let err = serde_json::from_str::<EncryptRequest>(
            r#"{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"Encrypt"},"plaintext":"c2VjcmV0_-","encryptionAlgorithm":"AES_GCM"}"#,
        )
        .expect_err("url-safe alphabet");
        assert!(err.to_string().contains("Base64"));
        assert!(!err.to_string().contains("c2VjcmV0"));
    }

    #[test]
    fn plaintext_debug_is_redacted() {
        let r = DecryptResponse {
            plaintext: Base64Secret(SecretBytes::from_slice(b"attack at dawn")),
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("attack"));
        assert!(!shown.contains("YXR0YWNr"));
        let json = serde_json::to_string(&r).expect("serialize");
        assert_eq!(json, r#"{"plaintext":"YXR0YWNrIGF0IGRhd24="}"#);
    }
}
