//! SigV4 for the XKS proxy: our own verifier (the product: every XKS call is
//! authenticated here) and a signer (wrapping the `aws-sigv4` crate) used by the KMS
//! emulator, the load generator and tests to sign exactly like AWS KMS does.
//!
//! Why a hand-written verifier: `aws-sigv4` only signs. Verifying means parsing
//! attacker-controlled headers, enforcing the XKS rules (service name, 5-minute clock
//! skew, `host` and `x-amz-date` signed) and comparing in constant time, none of which
//! a signing library does for us. Signing with an independent implementation then
//! checking with ours is also the best cross-check we have that ours is right.
//!
//! Files:
//! - [`canonical`]: canonical request, string to sign, signing-key derivation and the
//!   signature HMAC. Pure functions of their inputs, shared by the verifier and tests,
//!   pinned by the vendored AWS test vectors (`tests/sigv4-vectors/`).
//! - [`credentials`]: a path prefix's live credentials (two or more during rotation),
//!   each with a small cache of derived signing keys.
//! - `verify.rs`: [`verify`], the request authenticator, and [`VerifyPolicy`].
//! - [`sign`]: [`sign_request`], KMS-style signing through `aws-sigv4`.
//!
//! Every failure is an [`AuthError`]; the wire layer maps all of them to
//! 401 AuthenticationFailedException.

pub mod canonical;
pub mod credentials;
pub mod sign;
mod verify;

pub use credentials::{Credential, CredentialSet, DuplicateAccessKeyId};
pub use sign::{SignError, sign_request};
pub use verify::{Verified, VerifyPolicy, presented_access_key_id, verify};

/// Why a request failed authentication. Every variant maps to 401
/// AuthenticationFailedException at the wire layer.
///
/// Messages are fixed strings: they never contain request data, a signature or a
/// secret (an attacker must not be able to make us echo their input into logs, and an
/// error must never carry key material). They are printable ASCII, under 200
/// characters, and written for the operator reading a log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("request has no Authorization header")]
    MissingAuthorization,
    #[error("request has more than one Authorization header")]
    MultipleAuthorization,
    /// The reason is a fixed string chosen by the parser, never request data.
    #[error("malformed SigV4 Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    #[error("Authorization header does not use the AWS4-HMAC-SHA256 algorithm")]
    UnsupportedAlgorithm,
    #[error("request has no X-Amz-Date header")]
    MissingDate,
    #[error("X-Amz-Date must appear once, in the form yyyyMMddTHHmmssZ")]
    MalformedDate,
    #[error(
        "X-Amz-Date is further from the proxy's clock than the allowed skew (default 5 minutes)"
    )]
    ClockSkew,
    #[error("credential scope date does not match the date in X-Amz-Date")]
    ScopeDateMismatch,
    #[error("credential scope service is not this proxy's service name (kms-xks-proxy by default)")]
    WrongService,
    #[error("credential scope region is not in this proxy's allowed regions")]
    RegionNotAllowed,
    #[error("unknown access key id for this path prefix")]
    UnknownAccessKeyId,
    #[error("SignedHeaders must include host")]
    HostNotSigned,
    #[error("SignedHeaders must include x-amz-date")]
    DateNotSigned,
    #[error("request has neither a Host header nor an :authority to check the signed host against")]
    MissingHost,
    #[error("a header named in SignedHeaders is not present in the request")]
    SignedHeaderMissing,
    #[error(
        "signature does not match; check the secret for this access key id and that nothing altered the request"
    )]
    SignatureMismatch,
}

#[cfg(test)]
mod tests {
    use super::AuthError;

    /// Rule (module doc of `AuthError`): messages are fixed, printable ASCII, < 200
    /// chars, because the wire layer copies them into the 401 body.
    #[test]
    fn every_message_is_short_printable_ascii() {
        let all = [
            AuthError::MissingAuthorization,
            AuthError::MultipleAuthorization,
            AuthError::MalformedAuthorization("a fixed reason"),
            AuthError::UnsupportedAlgorithm,
            AuthError::MissingDate,
            AuthError::MalformedDate,
            AuthError::ClockSkew,
            AuthError::ScopeDateMismatch,
            AuthError::WrongService,
            AuthError::RegionNotAllowed,
            AuthError::UnknownAccessKeyId,
            AuthError::HostNotSigned,
            AuthError::DateNotSigned,
            AuthError::MissingHost,
            AuthError::SignedHeaderMissing,
            AuthError::SignatureMismatch,
        ];
        for e in all {
            let msg = e.to_string();
            assert!(!msg.is_empty() && msg.len() < 200, "{msg}");
            assert!(msg.bytes().all(|b| (0x20..0x7f).contains(&b)), "{msg}");
        }
    }
}

/// The vendored AWS SigV4 test-suite cases (`tests/sigv4-vectors/`, see its README)
/// and a tiny parser for the suite's raw HTTP/1.1 request files.
#[cfg(test)]
pub(crate) mod test_vectors {
    use std::time::SystemTime;

    pub(crate) const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
    pub(crate) const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// The suite's signing time, 2015-08-30T12:36:00Z.
    pub(crate) fn time() -> SystemTime {
        time::macros::datetime!(2015-08-30 12:36:00 UTC).into()
    }

    pub(crate) struct Vector {
        pub name: &'static str,
        /// `request.txt`: the request before signing.
        pub request: &'static str,
        /// `header-signed-request.txt`: with X-Amz-Date and Authorization.
        pub signed_request: &'static str,
        pub canonical_request: &'static str,
        pub string_to_sign: &'static str,
        pub signature: &'static str,
    }

    macro_rules! vector {
        ($name:literal) => {
            Vector {
                name: $name,
                request: include_str!(concat!("../../tests/sigv4-vectors/", $name, "/request.txt")),
                signed_request: include_str!(concat!(
                    "../../tests/sigv4-vectors/",
                    $name,
                    "/header-signed-request.txt"
                )),
                canonical_request: include_str!(concat!(
                    "../../tests/sigv4-vectors/",
                    $name,
                    "/header-canonical-request.txt"
                )),
                string_to_sign: include_str!(concat!(
                    "../../tests/sigv4-vectors/",
                    $name,
                    "/header-string-to-sign.txt"
                )),
                signature: include_str!(concat!(
                    "../../tests/sigv4-vectors/",
                    $name,
                    "/header-signature.txt"
                )),
            }
        };
    }

    pub(crate) const VECTORS: &[Vector] = &[
        vector!("get-vanilla"),
        vector!("post-vanilla"),
        vector!("get-vanilla-query"),
        vector!("post-vanilla-query"),
        vector!("get-vanilla-query-order-encoded"),
        vector!("get-unreserved"),
        vector!("post-x-www-form-urlencoded"),
        vector!("get-header-value-trim"),
        vector!("get-header-key-duplicate"),
        vector!("get-header-value-order"),
        vector!("get-header-value-multiline"),
        vector!("post-header-key-sort"),
        vector!("post-header-value-case"),
    ];

    /// Parses a suite request file (`METHOD target HTTP/1.1`, `Name:value` lines,
    /// a blank line, the body) the way an HTTP/1.1 server would hand it to us:
    /// values stripped of surrounding whitespace, and an obs-fold continuation line
    /// (leading space) joined to the previous value with a space (RFC 9112 §5.2).
    pub(crate) fn parse_request(text: &str) -> (http::request::Parts, bytes::Bytes) {
        let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
        let mut lines = head.lines();
        let request_line = lines.next().expect("request line");
        let (method, rest) = request_line.split_once(' ').expect("method");
        let target = rest.strip_suffix(" HTTP/1.1").expect("HTTP/1.1");

        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                let last = headers.last_mut().expect("continuation after a header");
                last.1.push(' ');
                last.1.push_str(line.trim());
            } else {
                let (name, value) = line.split_once(':').expect("name:value");
                headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
            }
        }

        let mut builder = http::Request::builder().method(method).uri(target);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let (parts, ()) = builder.body(()).expect("valid request").into_parts();
        (parts, bytes::Bytes::copy_from_slice(body.as_bytes()))
    }
}
