//! awsJson1.1 for the emulator: `POST /` with `X-Amz-Target: TrentService.<Op>`,
//! JSON in and out, the caller's identity from SigV4, and — the one place in the
//! emulator where it happens — each [`Exception`] turned into its wire name and HTTP
//! status (`{"__type","message"}` body plus `x-amzn-ErrorType`).
//!
//! Every response, errors included, carries `x-amzn-RequestId`; the same UUID is the
//! `kmsRequestId` the emulator sends to the proxy. One log line per request: ID,
//! operation, outcome, latency — never a body.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{Exception, KmsError};
use super::{Ctx, Emulator};
use crate::sigv4::{self, AuthError, VerifyPolicy};

/// The largest request body accepted (a maximal key policy is 128 KiB of JSON).
const MAX_BODY: usize = 1024 * 1024;
const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The wire name and HTTP status of every exception. Exhaustive on purpose: a new
/// exception does not compile until it has a row here. Statuses follow the Smithy
/// model's `httpError` traits; unmodelled ones follow what AWS sends.
pub fn wire(e: Exception) -> (&'static str, StatusCode) {
    use Exception as E;
    const BAD: StatusCode = StatusCode::BAD_REQUEST;
    match e {
        E::CustomKeyStoreNotFound => ("CustomKeyStoreNotFoundException", BAD),
        E::CustomKeyStoreInvalidState => ("CustomKeyStoreInvalidStateException", BAD),
        E::CustomKeyStoreNameInUse => ("CustomKeyStoreNameInUseException", BAD),
        E::CustomKeyStoreHasCmks => ("CustomKeyStoreHasCMKsException", BAD),
        E::CloudHsmClusterNotFound => ("CloudHsmClusterNotFoundException", BAD),
        E::CloudHsmClusterNotActive => ("CloudHsmClusterNotActiveException", BAD),
        E::CloudHsmClusterInUse => ("CloudHsmClusterInUseException", BAD),
        E::CloudHsmClusterInvalidConfiguration => {
            ("CloudHsmClusterInvalidConfigurationException", BAD)
        }
        E::CloudHsmClusterNotRelated => ("CloudHsmClusterNotRelatedException", BAD),
        E::IncorrectTrustAnchor => ("IncorrectTrustAnchorException", BAD),
        E::XksProxyUriInUse => ("XksProxyUriInUseException", BAD),
        E::XksProxyUriEndpointInUse => ("XksProxyUriEndpointInUseException", BAD),
        E::XksProxyUriUnreachable => ("XksProxyUriUnreachableException", BAD),
        E::XksProxyIncorrectAuthenticationCredential => {
            ("XksProxyIncorrectAuthenticationCredentialException", BAD)
        }
        E::XksProxyInvalidConfiguration => ("XksProxyInvalidConfigurationException", BAD),
        E::XksProxyInvalidResponse => ("XksProxyInvalidResponseException", BAD),
        E::XksProxyVpcEndpointServiceInUse => ("XksProxyVpcEndpointServiceInUseException", BAD),
        E::XksKeyNotFound => ("XksKeyNotFoundException", BAD),
        E::XksKeyInvalidConfiguration => ("XksKeyInvalidConfigurationException", BAD),
        E::XksKeyAlreadyInUse => ("XksKeyAlreadyInUseException", BAD),
        E::XksKeyInvalidResponse => ("XksKeyInvalidResponseException", BAD),
        E::KmsInvalidState => ("KMSInvalidStateException", StatusCode::CONFLICT),
        E::Disabled => ("DisabledException", StatusCode::CONFLICT),
        E::NotFound => ("NotFoundException", StatusCode::NOT_FOUND),
        E::InvalidCiphertext => ("InvalidCiphertextException", BAD),
        E::IncorrectKey => ("IncorrectKeyException", BAD),
        E::InvalidKeyUsage => ("InvalidKeyUsageException", BAD),
        E::InvalidArn => ("InvalidArnException", BAD),
        E::InvalidGrantToken => ("InvalidGrantTokenException", BAD),
        E::InvalidMarker => ("InvalidMarkerException", BAD),
        E::UnsupportedOperation => ("UnsupportedOperationException", BAD),
        E::LimitExceeded => ("LimitExceededException", BAD),
        E::DryRunOperation => ("DryRunOperationException", StatusCode::PRECONDITION_FAILED),
        E::KmsInternal => ("KMSInternalException", StatusCode::INTERNAL_SERVER_ERROR),
        // 400, not 429: botocore retries a ThrottlingException only with 400.
        E::Throttling => ("ThrottlingException", BAD),
        E::Validation => ("ValidationException", BAD),
        E::Serialization => ("SerializationException", BAD),
        E::UnknownOperation => ("UnknownOperationException", BAD),
        E::UnrecognizedClient => ("UnrecognizedClientException", BAD),
        E::InvalidSignature => ("InvalidSignatureException", BAD),
        E::IncompleteSignature => ("IncompleteSignatureException", BAD),
        E::MissingAuthenticationToken => ("MissingAuthenticationTokenException", BAD),
    }
}

/// The operations the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CreateCustomKeyStore,
    ConnectCustomKeyStore,
    DisconnectCustomKeyStore,
    UpdateCustomKeyStore,
    DescribeCustomKeyStores,
    DeleteCustomKeyStore,
    CreateKey,
    DescribeKey,
    ListKeys,
    EnableKey,
    DisableKey,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    Encrypt,
    Decrypt,
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    ReEncrypt,
    GenerateRandom,
}

impl Op {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "CreateCustomKeyStore" => Self::CreateCustomKeyStore,
            "ConnectCustomKeyStore" => Self::ConnectCustomKeyStore,
            "DisconnectCustomKeyStore" => Self::DisconnectCustomKeyStore,
            "UpdateCustomKeyStore" => Self::UpdateCustomKeyStore,
            "DescribeCustomKeyStores" => Self::DescribeCustomKeyStores,
            "DeleteCustomKeyStore" => Self::DeleteCustomKeyStore,
            "CreateKey" => Self::CreateKey,
            "DescribeKey" => Self::DescribeKey,
            "ListKeys" => Self::ListKeys,
            "EnableKey" => Self::EnableKey,
            "DisableKey" => Self::DisableKey,
            "ScheduleKeyDeletion" => Self::ScheduleKeyDeletion,
            "CancelKeyDeletion" => Self::CancelKeyDeletion,
            "Encrypt" => Self::Encrypt,
            "Decrypt" => Self::Decrypt,
            "GenerateDataKey" => Self::GenerateDataKey,
            "GenerateDataKeyWithoutPlaintext" => Self::GenerateDataKeyWithoutPlaintext,
            "ReEncrypt" => Self::ReEncrypt,
            "GenerateRandom" => Self::GenerateRandom,
            _ => return None,
        })
    }
}

/// Real KMS operations the emulator does not implement: they get a clear
/// `UnsupportedOperationException` instead of looking like a typo.
const KNOWN_UNIMPLEMENTED: &[&str] = &[
    "CreateAlias",
    "CreateGrant",
    "DeleteAlias",
    "DeleteImportedKeyMaterial",
    "DeriveSharedSecret",
    "DisableKeyRotation",
    "EnableKeyRotation",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "GetKeyPolicy",
    "GetKeyRotationStatus",
    "GetParametersForImport",
    "GetPublicKey",
    "ImportKeyMaterial",
    "ListAliases",
    "ListGrants",
    "ListKeyPolicies",
    "ListKeyRotations",
    "ListResourceTags",
    "ListRetirableGrants",
    "PutKeyPolicy",
    "ReplicateKey",
    "RetireGrant",
    "RevokeGrant",
    "RotateKeyOnDemand",
    "Sign",
    "TagResource",
    "UntagResource",
    "UpdateAlias",
    "UpdateKeyDescription",
    "UpdatePrimaryRegion",
    "Verify",
    "VerifyMac",
];

/// Handles one HTTP request; never fails (errors become KMS error responses).
pub async fn handle<B>(emulator: &Emulator, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let (parts, body) = req.into_parts();

    // Emulator-only route: periodic health-check results (not part of KMS).
    if parts.method == Method::GET && parts.uri.path() == "/_emulator/health-checks" {
        let stats = emulator.health_stats();
        let body = serde_json::to_vec(&stats).unwrap_or_default();
        return finish(StatusCode::OK, &request_id, "application/json", body, None);
    }

    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(
                &request_id,
                &KmsError::new(
                    Exception::Serialization,
                    "The request body is unreadable or larger than 1 MiB.",
                ),
            );
        }
    };

    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let op_name = target.strip_prefix("TrentService.").unwrap_or("");
    let op = Op::parse(op_name);
    let outcome = async {
        if parts.method != Method::POST {
            return Err(KmsError::new(
                Exception::UnknownOperation,
                "KMS operations are POST requests to /.",
            ));
        }
        let op = op.ok_or_else(|| {
            if KNOWN_UNIMPLEMENTED.contains(&op_name) {
                KmsError::new(
                    Exception::UnsupportedOperation,
                    format!("The KMS emulator does not implement {op_name}."),
                )
            } else {
                KmsError::new(Exception::UnknownOperation, "")
            }
        })?;
        let principal_arn = authenticate(emulator, &parts, &body)?;
        let ctx = Ctx {
            request_id: request_id.clone(),
            principal_arn,
        };
        dispatch(emulator, op, &ctx, &body).await
    }
    .await;

    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(json) => {
            tracing::info!(request_id = %request_id, op = op_name, outcome = "ok", elapsed_ms, "request");
            finish(StatusCode::OK, &request_id, JSON_CONTENT_TYPE, json, None)
        }
        Err(e) => {
            let (name, status) = wire(e.exception);
            tracing::info!(
                request_id = %request_id,
                op = op_name,
                outcome = name,
                status = status.as_u16(),
                elapsed_ms,
                "request"
            );
            error_response(&request_id, &e)
        }
    }
}

fn error_response(request_id: &str, e: &KmsError) -> Response<Full<Bytes>> {
    let (name, status) = wire(e.exception);
    let body = serde_json::to_vec(&serde_json::json!({
        "__type": name,
        "message": e.message,
    }))
    .unwrap_or_default();
    finish(status, request_id, JSON_CONTENT_TYPE, body, Some(name))
}

fn finish(
    status: StatusCode,
    request_id: &str,
    content_type: &'static str,
    body: Vec<u8>,
    error_type: Option<&'static str>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    if let Some(name) = error_type {
        h.insert("x-amzn-errortype", HeaderValue::from_static(name));
    }
    resp
}

/// The access key ID in a SigV4 `Authorization` header, if any.
fn access_key_id(parts: &http::request::Parts) -> Option<&str> {
    let auth = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let cred = auth.split("Credential=").nth(1)?;
    cred.split('/').next().filter(|s| !s.is_empty())
}

/// The caller's principal ARN; checks the signature when that is switched on.
fn authenticate(
    emulator: &Emulator,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<String, KmsError> {
    let akid = access_key_id(parts);
    if let Some(creds) = &emulator.shared.client_credentials {
        let Some(id) = akid else {
            return Err(KmsError::new(
                Exception::MissingAuthenticationToken,
                "Missing Authentication Token",
            ));
        };
        if creds.get(id).is_none() {
            return Err(KmsError::new(
                Exception::UnrecognizedClient,
                "The security token included in the request is invalid.",
            ));
        }
        let policy = VerifyPolicy {
            service: "kms".to_owned(),
            allowed_regions: Some(vec![emulator.config().region.clone()]),
            max_skew: Duration::from_secs(300),
        };
        sigv4::verify(parts, body, creds, &policy, SystemTime::now())
            .map_err(|e| signature_error(&e))?;
    }
    Ok(emulator.principal_for(akid))
}

fn signature_error(e: &AuthError) -> KmsError {
    let (exception, message) = match e {
        AuthError::UnknownAccessKeyId => (
            Exception::UnrecognizedClient,
            "The security token included in the request is invalid.".to_owned(),
        ),
        AuthError::SignatureMismatch => (
            Exception::InvalidSignature,
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method."
                .to_owned(),
        ),
        AuthError::ClockSkew => (
            Exception::InvalidSignature,
            "Signature expired: the request time is too far from the server time.".to_owned(),
        ),
        AuthError::RegionNotAllowed | AuthError::WrongService => (
            Exception::InvalidSignature,
            format!("Credential should be scoped to a valid region and service: {e}."),
        ),
        AuthError::MissingAuthorization => (
            Exception::MissingAuthenticationToken,
            "Missing Authentication Token".to_owned(),
        ),
        AuthError::MultipleAuthorization
        | AuthError::MalformedAuthorization(_)
        | AuthError::UnsupportedAlgorithm
        | AuthError::MissingDate
        | AuthError::MalformedDate
        | AuthError::ScopeDateMismatch
        | AuthError::HostNotSigned
        | AuthError::DateNotSigned
        | AuthError::MissingHost
        | AuthError::SignedHeaderMissing => (Exception::IncompleteSignature, e.to_string()),
    };
    KmsError::new(exception, message)
}

/// Parses an operation's input. An empty body counts as `{}`. The message is fixed
/// (plus serde's position) so that no member value — possibly plaintext — is echoed.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, KmsError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        KmsError::new(
            Exception::Serialization,
            format!(
                "The request body is not valid JSON for this operation (line {}, column {}).",
                e.line(),
                e.column()
            ),
        )
    })
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, KmsError> {
    serde_json::to_vec(v).map_err(|e| KmsError::internal(&e))
}

async fn dispatch(emu: &Emulator, op: Op, ctx: &Ctx, body: &[u8]) -> Result<Vec<u8>, KmsError> {
    match op {
        Op::CreateCustomKeyStore => json(&emu.create_custom_key_store(ctx, parse(body)?).await?),
        Op::ConnectCustomKeyStore => json(&emu.connect_custom_key_store(ctx, parse(body)?)?),
        Op::DisconnectCustomKeyStore => json(&emu.disconnect_custom_key_store(parse(body)?)?),
        Op::UpdateCustomKeyStore => json(&emu.update_custom_key_store(ctx, parse(body)?).await?),
        Op::DescribeCustomKeyStores => json(&emu.describe_custom_key_stores(parse(body)?)?),
        Op::DeleteCustomKeyStore => json(&emu.delete_custom_key_store(parse(body)?)?),
        Op::CreateKey => json(&emu.create_key(ctx, parse(body)?).await?),
        Op::DescribeKey => json(&emu.describe_key(parse(body)?)?),
        Op::ListKeys => json(&emu.list_keys(parse(body)?)?),
        Op::EnableKey => json(&emu.enable_key(parse(body)?)?),
        Op::DisableKey => json(&emu.disable_key(parse(body)?)?),
        Op::ScheduleKeyDeletion => json(&emu.schedule_key_deletion(parse(body)?)?),
        Op::CancelKeyDeletion => json(&emu.cancel_key_deletion(parse(body)?)?),
        Op::Encrypt => json(&emu.encrypt(ctx, parse(body)?).await?),
        Op::Decrypt => json(&emu.decrypt(ctx, parse(body)?).await?),
        Op::GenerateDataKey => json(&emu.generate_data_key(ctx, parse(body)?).await?),
        Op::GenerateDataKeyWithoutPlaintext => json(
            &emu.generate_data_key_without_plaintext(ctx, parse(body)?)
                .await?,
        ),
        Op::ReEncrypt => json(&emu.re_encrypt(ctx, parse(body)?).await?),
        Op::GenerateRandom => json(&emu.generate_random(parse(body)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the model's status codes (brief §1) for the exceptions that matter most.
    #[test]
    fn statuses_follow_the_model() {
        assert_eq!(
            wire(Exception::KmsInvalidState),
            ("KMSInvalidStateException", StatusCode::CONFLICT)
        );
        assert_eq!(wire(Exception::Disabled).1, StatusCode::CONFLICT);
        assert_eq!(wire(Exception::NotFound).1, StatusCode::NOT_FOUND);
        assert_eq!(
            wire(Exception::DryRunOperation).1,
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            wire(Exception::KmsInternal).1,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            wire(Exception::Throttling),
            ("ThrottlingException", StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            wire(Exception::CustomKeyStoreHasCmks).0,
            "CustomKeyStoreHasCMKsException"
        );
        assert_eq!(
            wire(Exception::XksKeyInvalidResponse).1,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn parse_errors_do_not_echo_values() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct In {
            #[serde(rename = "Limit")]
            limit: Option<i64>,
        }
        let err = parse::<In>(br#"{"Limit":"attack at dawn"}"#).expect_err("type error");
        assert_eq!(err.exception, Exception::Serialization);
        assert!(!err.message.contains("attack"));
        assert!(parse::<In>(b"").is_ok());
    }

    #[test]
    fn access_key_id_is_read_from_the_authorization_header() {
        let req = Request::builder()
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
            )
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        assert_eq!(access_key_id(&parts), Some("AKIDEXAMPLE"));
    }
}
