//! Signing requests the way AWS KMS signs its calls to an XKS proxy.
//!
//! This file owns [`sign_request`], used by the KMS emulator's XKS client, the load
//! generator and tests. It wraps the `aws-sigv4` crate on purpose: an independent
//! implementation signing and ours verifying (`verify.rs`) is a real cross-check; if
//! we used our own canonicaliser on both sides, a shared bug would pass every test.
//!
//! What KMS sends, and so what we produce: `Authorization` with SignedHeaders exactly
//! `host;x-amz-date`, `X-Amz-Date`, payload hash = SHA-256 of the body (no
//! `x-amz-content-sha256` header), no session token. Other headers (content-type,
//! user-agent, ...) stay unsigned.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SessionTokenMode, SignableBody, SignableRequest,
    SigningSettings, UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use crate::secret::SecretString;

/// Why a request could not be signed. Messages never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("request has neither a Host header nor a URI authority to sign as host")]
    NoHost,
    #[error("the request's Host header is not visible ASCII")]
    InvalidHost,
    #[error("invalid signing parameters: {0}")]
    Params(#[from] v4::signing_params::BuildError),
    #[error("aws-sigv4 could not sign the request: {0}")]
    Signing(#[from] aws_sigv4::http_request::SigningError),
}

/// The host value a client will send: the `Host` header if the request has one,
/// else the URI authority without userinfo and without the scheme's default port
/// (hyper and reqwest leave `:443`/`:80` out of `Host`).
fn host_to_sign<B>(req: &http::Request<B>) -> Result<String, SignError> {
    if let Some(host) = req.headers().get(http::header::HOST) {
        return host
            .to_str()
            .map(str::to_owned)
            .map_err(|_| SignError::InvalidHost);
    }
    let authority = req.uri().authority().ok_or(SignError::NoHost)?;
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_userinfo, rest)| rest);
    let default_port = match req.uri().scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    if default_port.is_some() && authority.port_u16() == default_port {
        // `host()` keeps IPv6 brackets, so this is the authority minus ":port".
        return Ok(authority.host().to_owned());
    }
    Ok(host_port.to_owned())
}

/// Signs `req` like AWS KMS signs calls to an XKS proxy: SigV4, SignedHeaders exactly
/// `host;x-amz-date`, payload hash = SHA-256 of the body, the URI's query (KMS sends
/// none). Inserts `authorization` and `x-amz-date` headers, replacing any already
/// there.
///
/// Does NOT insert a `host` header; the host signed is the `host` header if present,
/// else the URI authority with a default port (:443 for https, :80 for http) removed
/// — i.e. what hyper/reqwest will send. Other headers already on the request
/// (content-type, ...) are left unsigned, as KMS does.
///
/// The path is signed exactly as it is in the URI (no dot-segment normalisation),
/// double-encoded as for every non-S3 service, matching our verifier.
pub fn sign_request(
    req: &mut http::Request<bytes::Bytes>,
    access_key_id: &str,
    secret: &SecretString,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<(), SignError> {
    let host = host_to_sign(req)?;

    // aws-credential-types keeps its copy of the secret in a zeroizing buffer and
    // redacts it in Debug, so this copy is as safe as ours.
    let identity: Identity =
        Credentials::new(access_key_id, secret.expose(), None, None, "xks-proxy").into();

    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Double;
    settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
    settings.session_token_mode = SessionTokenMode::Exclude;
    // Our verifier hashes the path as received, so sign it as sent.
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;

    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()?
        .into();

    let uri = req.uri().to_string();
    // Only `host` is offered to the signer: aws-sigv4 adds x-amz-date itself, so the
    // signed set is exactly host;x-amz-date, whatever else the request carries.
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri.as_str(),
        std::iter::once(("host", host.as_str())),
        SignableBody::Bytes(req.body()),
    )?;
    let (instructions, _signature) = sign(signable, &params)?.into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sigv4::test_vectors::{self, VECTORS};

    fn request(uri: &str) -> http::Request<bytes::Bytes> {
        http::Request::builder()
            .method("POST")
            .uri(uri)
            .body(bytes::Bytes::new())
            .expect("request")
    }

    /// Rule: for every vendored AWS case that signs only host;x-amz-date, signing
    /// the suite's unsigned `request.txt` yields exactly the suite's Authorization.
    #[test]
    fn matches_aws_vectors_that_sign_only_host_and_date() {
        let mut checked = 0;
        for v in VECTORS {
            let (parts, _) = test_vectors::parse_request(v.signed_request);
            let want = parts.headers["authorization"].to_str().expect("ascii");
            if !want.contains("SignedHeaders=host;x-amz-date,") {
                continue;
            }
            let (parts, body) = test_vectors::parse_request(v.request);
            let mut req = http::Request::from_parts(parts, body);
            sign_request(
                &mut req,
                test_vectors::ACCESS_KEY_ID,
                &SecretString::from(test_vectors::SECRET),
                "us-east-1",
                "service",
                test_vectors::time(),
            )
            .expect(v.name);
            assert_eq!(req.headers()["authorization"], want, "{}", v.name);
            assert_eq!(
                req.headers()["x-amz-date"],
                "20150830T123600Z",
                "{}",
                v.name
            );
            checked += 1;
        }
        assert!(checked >= 5, "only {checked} vectors checked");
    }

    /// Rule (KMS behaviour): SignedHeaders is exactly host;x-amz-date even when the
    /// request carries other headers, and no host header is added.
    #[test]
    fn signs_exactly_host_and_date() {
        let mut req = request("https://xks.example.com/kms/xks/v1/keys/k/encrypt");
        req.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        req.headers_mut()
            .insert("user-agent", http::HeaderValue::from_static("kms-emulator"));
        sign_request(
            &mut req,
            "AKIAXKSPROXYTEST2345",
            &SecretString::from("p4Xk7Qz9Lm2Vb8Nc1Rt6Yw3Ue5Io0PaSdFgHjKlZxC"),
            "us-east-1",
            "kms-xks-proxy",
            test_vectors::time(),
        )
        .expect("sign");
        let auth = req.headers()["authorization"].to_str().expect("ascii");
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIAXKSPROXYTEST2345/20150830/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature="
        ));
        assert!(req.headers().get("host").is_none());
        assert!(req.headers().get("x-amz-content-sha256").is_none());
        assert!(!auth.contains("p4Xk7Qz9"));
    }

    /// Rule: the signed host is what hyper/reqwest send: default ports dropped.
    #[test]
    fn host_to_sign_drops_default_ports_only() {
        let cases = [
            ("https://h.example/", "h.example"),
            ("https://h.example:443/", "h.example"),
            ("https://h.example:8443/", "h.example:8443"),
            ("http://h.example:80/", "h.example"),
            ("http://h.example:443/", "h.example:443"),
            ("https://[::1]:443/", "[::1]"),
            ("https://[::1]:8443/", "[::1]:8443"),
            ("https://user@h.example:8443/", "h.example:8443"),
        ];
        for (uri, want) in cases {
            assert_eq!(host_to_sign(&request(uri)).expect(uri), want, "{uri}");
        }
        let mut with_header = request("https://h.example:443/");
        with_header
            .headers_mut()
            .insert("host", http::HeaderValue::from_static("other.example:443"));
        assert_eq!(
            host_to_sign(&with_header).expect("header"),
            "other.example:443"
        );
        assert!(matches!(
            host_to_sign(&request("/no/authority")),
            Err(SignError::NoHost)
        ));
    }

    /// Rule: no host to sign is an error, never a panic inside aws-sigv4.
    #[test]
    fn origin_form_without_host_is_an_error() {
        let mut req = request("/kms/xks/v1/health");
        let err = sign_request(
            &mut req,
            "AKID",
            &SecretString::from("secret-secret-secret-secret-secret-secret-x"),
            "us-east-1",
            "kms-xks-proxy",
            SystemTime::now(),
        )
        .expect_err("no host");
        assert!(matches!(err, SignError::NoHost));
        assert!(!err.to_string().contains("secret-secret"));
    }
}
