//! The spec's 12 error names and the ONLY mapping from internal errors to the wire
//! (HTTP status + `{"errorName","errorMessage"}`). Every match here is exhaustive with
//! no `_` arm, so a new internal error cannot reach the wire without a decision.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use super::wire::ErrorResponse;
use crate::backend::BackendError;
use crate::sigv4::AuthError;

/// The spec's error names (§"Error Codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorName {
    ValidationException,
    InvalidStateException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    AuthenticationFailedException,
    AccessDeniedException,
    KeyNotFoundException,
    InvalidUriPathException,
    ThrottlingException,
    UnsupportedOperationException,
    DependencyTimeoutException,
    InternalException,
}

impl ErrorName {
    pub const ALL: [ErrorName; 12] = [
        ErrorName::ValidationException,
        ErrorName::InvalidStateException,
        ErrorName::InvalidCiphertextException,
        ErrorName::InvalidKeyUsageException,
        ErrorName::AuthenticationFailedException,
        ErrorName::AccessDeniedException,
        ErrorName::KeyNotFoundException,
        ErrorName::InvalidUriPathException,
        ErrorName::ThrottlingException,
        ErrorName::UnsupportedOperationException,
        ErrorName::DependencyTimeoutException,
        ErrorName::InternalException,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::ValidationException => "ValidationException",
            ErrorName::InvalidStateException => "InvalidStateException",
            ErrorName::InvalidCiphertextException => "InvalidCiphertextException",
            ErrorName::InvalidKeyUsageException => "InvalidKeyUsageException",
            ErrorName::AuthenticationFailedException => "AuthenticationFailedException",
            ErrorName::AccessDeniedException => "AccessDeniedException",
            ErrorName::KeyNotFoundException => "KeyNotFoundException",
            ErrorName::InvalidUriPathException => "InvalidUriPathException",
            ErrorName::ThrottlingException => "ThrottlingException",
            ErrorName::UnsupportedOperationException => "UnsupportedOperationException",
            ErrorName::DependencyTimeoutException => "DependencyTimeoutException",
            ErrorName::InternalException => "InternalException",
        }
    }

    /// The spec's HTTP status for each name.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorName::ValidationException
            | ErrorName::InvalidStateException
            | ErrorName::InvalidCiphertextException
            | ErrorName::InvalidKeyUsageException => StatusCode::BAD_REQUEST,
            ErrorName::AuthenticationFailedException => StatusCode::UNAUTHORIZED,
            ErrorName::AccessDeniedException => StatusCode::FORBIDDEN,
            ErrorName::KeyNotFoundException | ErrorName::InvalidUriPathException => {
                StatusCode::NOT_FOUND
            }
            ErrorName::ThrottlingException => StatusCode::TOO_MANY_REQUESTS,
            ErrorName::UnsupportedOperationException => StatusCode::NOT_IMPLEMENTED,
            ErrorName::DependencyTimeoutException => StatusCode::SERVICE_UNAVAILABLE,
            ErrorName::InternalException => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Everything that can go wrong while serving one XKS request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Not an XKS URI, or a prefix this proxy does not serve.
    #[error("no XKS API at this path (check the path prefix and the operation name)")]
    UnknownPath,
    /// An XKS URI with a method other than POST (spec: 405).
    #[error("this URI accepts only POST")]
    MethodNotAllowed,
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body larger than this proxy accepts ({0} bytes)")]
    BodyTooLarge(usize),
    /// The body could not be read (client went away, malformed framing, too slow).
    #[error("request body could not be read")]
    BodyUnreadable,
    /// An input is invalid; the message names which and why (never its value).
    #[error("{0}")]
    Validation(String),
    /// A size past the spec's minimum that this proxy does not support.
    #[error("{0}")]
    Unsupported(String),
    /// The key id is valid but not on this prefix's allow-list. Reported as "not found":
    /// a tenant must not learn which keys other tenants have.
    #[error("no such key under this path prefix")]
    KeyNotAllowed,
    /// Ciphertext, IV, tag or metadata that can never open (bad lengths, unknown format).
    #[error("{0}")]
    InvalidCiphertext(&'static str),
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The global in-flight limit is reached (load shedding).
    #[error("the proxy is at its in-flight request limit; retry")]
    Overloaded,
    /// This path prefix's request quota is spent.
    #[error("request quota for this path prefix exceeded; retry")]
    QuotaExceeded,
    /// Secondary authorization denied the request. The message names no policy: the
    /// operator's log line does.
    #[error("denied by the proxy's authorization policy")]
    AccessDenied,
    /// The encrypt self-check (CDIV order of work) did not give back the plaintext.
    #[error("encrypt self-check failed; nothing was returned")]
    SelfCheckFailed,
    /// The audit trail cannot take this request's record (`[audit] on_failure =
    /// "fail_closed"`): no key use without its record. The log line says why.
    #[error("the proxy's audit trail cannot record requests right now; retry")]
    AuditUnavailable,
}

impl ApiError {
    /// The wire name for this error: the one place this decision is made.
    pub fn error_name(&self) -> ErrorName {
        match self {
            ApiError::UnknownPath => ErrorName::InvalidUriPathException,
            // 405 has no name of its own in the spec; the status is what it requires.
            ApiError::MethodNotAllowed => ErrorName::InvalidUriPathException,
            ApiError::Auth(_) => ErrorName::AuthenticationFailedException,
            ApiError::BodyTooLarge(_) => ErrorName::UnsupportedOperationException,
            ApiError::BodyUnreadable => ErrorName::ValidationException,
            ApiError::Validation(_) => ErrorName::ValidationException,
            ApiError::Unsupported(_) => ErrorName::UnsupportedOperationException,
            ApiError::KeyNotAllowed => ErrorName::KeyNotFoundException,
            ApiError::InvalidCiphertext(_) => ErrorName::InvalidCiphertextException,
            ApiError::SelfCheckFailed => ErrorName::InternalException,
            ApiError::Overloaded => ErrorName::ThrottlingException,
            ApiError::QuotaExceeded => ErrorName::ThrottlingException,
            ApiError::AccessDenied => ErrorName::AccessDeniedException,
            // The spec's one 503 row: KMS treats it as the proxy's dependency being
            // unavailable, which the audit trail is.
            ApiError::AuditUnavailable => ErrorName::DependencyTimeoutException,
            ApiError::Backend(b) => match b {
                BackendError::KeyNotFound => ErrorName::KeyNotFoundException,
                BackendError::KeyDisabled => ErrorName::InvalidStateException,
                BackendError::UsageNotAllowed(_) => ErrorName::InvalidKeyUsageException,
                BackendError::InvalidCiphertext => ErrorName::InvalidCiphertextException,
                BackendError::Timeout => ErrorName::DependencyTimeoutException,
                BackendError::Busy => ErrorName::ThrottlingException,
                BackendError::Unavailable(_) => ErrorName::InternalException,
                BackendError::Failed(_) => ErrorName::InternalException,
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // Every other error's status is its name's (the spec's table). Listed, not
            // matched with a catch-all, so a new variant must be decided here too.
            ApiError::UnknownPath
            | ApiError::Auth(_)
            | ApiError::BodyTooLarge(_)
            | ApiError::BodyUnreadable
            | ApiError::Validation(_)
            | ApiError::Unsupported(_)
            | ApiError::KeyNotAllowed
            | ApiError::InvalidCiphertext(_)
            | ApiError::Backend(_)
            | ApiError::Overloaded
            | ApiError::QuotaExceeded
            | ApiError::AccessDenied
            | ApiError::SelfCheckFailed
            | ApiError::AuditUnavailable => self.error_name().status(),
        }
    }

    /// The `errorMessage` text. Authentication failures all get one generic text:
    /// telling an unknown access key id from a wrong signature would confirm valid ids
    /// to anyone who can reach the endpoint. The request log line keeps the reason.
    pub fn wire_text(&self) -> String {
        if let ApiError::Auth(_) = self {
            AUTH_FAILED_MESSAGE.to_owned()
        } else {
            self.to_string()
        }
    }

    /// The wire response.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = ErrorResponse {
            error_name: self.error_name().as_str().to_owned(),
            error_message: Some(wire_message(&self.wire_text())),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(Full::new(Bytes::from(bytes)));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if matches!(self, ApiError::MethodNotAllowed) {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        resp
    }
}

/// The one `errorMessage` of every 401.
pub const AUTH_FAILED_MESSAGE: &str = "the request signature could not be verified for this path prefix (the proxy's log names the reason)";

/// Spec: errorMessage is printable ASCII (0x20-0x7e) and under 512 characters. Our
/// messages are fixed strings, so this is defence in depth, not a formatter.
pub fn wire_message(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(511)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KeyUsage;

    /// The spec's error table, one row per internal error we can produce.
    #[test]
    fn every_internal_error_maps_to_the_spec_row() {
        let rows: Vec<(ApiError, &str, u16)> = vec![
            (ApiError::UnknownPath, "InvalidUriPathException", 404),
            (ApiError::MethodNotAllowed, "InvalidUriPathException", 405),
            (
                ApiError::Auth(AuthError::SignatureMismatch),
                "AuthenticationFailedException",
                401,
            ),
            (
                ApiError::BodyTooLarge(65536),
                "UnsupportedOperationException",
                501,
            ),
            (ApiError::BodyUnreadable, "ValidationException", 400),
            (ApiError::Validation("x".into()), "ValidationException", 400),
            (
                ApiError::Unsupported("x".into()),
                "UnsupportedOperationException",
                501,
            ),
            (ApiError::KeyNotAllowed, "KeyNotFoundException", 404),
            (
                ApiError::InvalidCiphertext("x"),
                "InvalidCiphertextException",
                400,
            ),
            (ApiError::SelfCheckFailed, "InternalException", 500),
            (ApiError::Overloaded, "ThrottlingException", 429),
            (ApiError::QuotaExceeded, "ThrottlingException", 429),
            (ApiError::AccessDenied, "AccessDeniedException", 403),
            (
                ApiError::AuditUnavailable,
                "DependencyTimeoutException",
                503,
            ),
            (
                BackendError::KeyNotFound.into(),
                "KeyNotFoundException",
                404,
            ),
            (
                BackendError::KeyDisabled.into(),
                "InvalidStateException",
                400,
            ),
            (
                BackendError::UsageNotAllowed(KeyUsage::Encrypt).into(),
                "InvalidKeyUsageException",
                400,
            ),
            (
                BackendError::InvalidCiphertext.into(),
                "InvalidCiphertextException",
                400,
            ),
            (
                BackendError::Timeout.into(),
                "DependencyTimeoutException",
                503,
            ),
            (BackendError::Busy.into(), "ThrottlingException", 429),
            (
                BackendError::Unavailable("CKR_DEVICE_REMOVED".into()).into(),
                "InternalException",
                500,
            ),
            (
                BackendError::Failed("x".into()).into(),
                "InternalException",
                500,
            ),
        ];
        for (err, name, status) in rows {
            assert_eq!(err.error_name().as_str(), name, "{err:?}");
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let resp = err.to_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
    }

    /// Issue 10 §4: a 401 body must not say which check failed (an unknown access key
    /// id versus a wrong signature would confirm valid ids).
    #[test]
    fn every_authentication_failure_has_one_wire_message() {
        let bodies: Vec<Bytes> = [
            AuthError::UnknownAccessKeyId,
            AuthError::SignatureMismatch,
            AuthError::MissingAuthorization,
            AuthError::ClockSkew,
        ]
        .into_iter()
        .map(|e| {
            let resp = ApiError::Auth(e).to_response();
            futures_body(resp)
        })
        .collect();
        for b in &bodies {
            assert_eq!(b, &bodies[0]);
        }
        let text = String::from_utf8_lossy(&bodies[0]);
        assert!(text.contains(AUTH_FAILED_MESSAGE), "{text}");
        assert!(!text.contains("access key"), "{text}");
    }

    fn futures_body(resp: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(resp.into_body().collect())
            .expect("infallible")
            .to_bytes()
    }

    #[test]
    fn spec_table_statuses() {
        // Spec §"Error Codes": the HTTP code of each name.
        let expected = [400, 400, 400, 400, 401, 403, 404, 404, 429, 501, 503, 500];
        for (name, code) in ErrorName::ALL.iter().zip(expected) {
            assert_eq!(name.status().as_u16(), code, "{name:?}");
        }
    }

    #[test]
    fn messages_are_printable_ascii_under_512() {
        let m = wire_message(&format!("bad\u{7}\n{}é", "x".repeat(600)));
        assert!(m.len() < 512);
        assert!(m.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
}
