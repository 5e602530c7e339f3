//! The SigV4 verifier: decides whether a received XKS request was signed by a
//! credential of its path prefix.
//!
//! This file owns the *policy* of verification (which algorithm, which service and
//! regions, how much clock skew, which headers must be signed) and the parsing of the
//! attacker-controlled `Authorization` and `X-Amz-Date` headers. The arithmetic
//! (canonical request, string to sign, HMACs) is in `canonical.rs`.
//!
//! The parser is deliberately strict: KMS always sends exactly
//! `AWS4-HMAC-SHA256 Credential=<id>/<yyyymmdd>/<region>/kms-xks-proxy/aws4_request,
//! SignedHeaders=host;x-amz-date, Signature=<64 hex>`, so anything that is not
//! well-formed SigV4 is refused before any cryptography runs. Every input yields a
//! value or an [`AuthError`]; nothing here can panic.
//!
//! Headers that are present but NOT in SignedHeaders are ignored, as SigV4 specifies:
//! the signature covers only what the client chose to sign. Real clients (curl
//! `--aws-sigv4`, proxies, load balancers) add unsigned headers such as `user-agent`
//! or `x-forwarded-for`, and KMS itself signs only `host;x-amz-date`. Everything we act
//! on is covered: the method, path, query and body are always in the canonical request.

use crate::secret::SecretString;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::request::Parts;
use subtle::ConstantTimeEq;

use super::AuthError;
use super::canonical::{self, ALGORITHM, SCOPE_TERMINATOR};
use super::credentials::CredentialSet;

/// What the verifier enforces beyond a correct signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// The service in the credential scope. KMS uses `kms-xks-proxy`.
    pub service: String,
    /// Regions accepted in the credential scope; `None` accepts any (KMS signs with
    /// its own region, which the proxy may not know in advance).
    pub allowed_regions: Option<Vec<String>>,
    /// Largest accepted distance between X-Amz-Date and our clock, either way. The
    /// spec says 5 minutes; exactly `max_skew` away is still accepted.
    pub max_skew: Duration,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        Self {
            service: "kms-xks-proxy".to_owned(),
            allowed_regions: None,
            max_skew: Duration::from_secs(300),
        }
    }
}

/// Who signed a request that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key_id: String,
    /// The region from the credential scope (KMS's region).
    pub region: String,
}

/// The parsed `Authorization` header. Borrowed from the header value; every field has
/// passed the syntax checks in [`parse_authorization`].
#[derive(Debug, PartialEq, Eq)]
struct Authorization<'a> {
    access_key_id: &'a str,
    /// `yyyymmdd/region/service/aws4_request`, verbatim, for the string to sign.
    scope: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: [u8; 32],
}

fn malformed(reason: &'static str) -> AuthError {
    AuthError::MalformedAuthorization(reason)
}

/// A credential-scope component (access key id, region, service): non-empty visible
/// ASCII. `/` cannot occur (we split on it), nor `,` (we split the header on it).
fn is_scope_component(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// RFC 9110 token characters, lower-case only: SigV4 requires lower-case names.
fn is_lower_token_char(b: u8) -> bool {
    b.is_ascii_lowercase()
        || b.is_ascii_digit()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// SignedHeaders: `;`-separated, non-empty, lower-case header names, strictly
/// ascending (which also rules out duplicates). SigV4 signers always emit this exact
/// form, so accepting anything looser would only widen what an attacker can vary.
fn check_signed_headers(list: &str) -> Result<(), AuthError> {
    if list.is_empty() {
        return Err(malformed("SignedHeaders is empty"));
    }
    let mut previous: Option<&str> = None;
    for name in list.split(';') {
        if name.is_empty() {
            return Err(malformed("SignedHeaders has an empty header name"));
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed("SignedHeaders names must be lower-case"));
        }
        if !name.bytes().all(is_lower_token_char) {
            return Err(malformed("SignedHeaders has an invalid header name"));
        }
        if let Some(prev) = previous
            && prev >= name
        {
            return Err(malformed("SignedHeaders must be sorted with no duplicates"));
        }
        previous = Some(name);
    }
    Ok(())
}

/// Signature: exactly 64 lower-case hex digits (what every SigV4 signer emits).
fn parse_signature(s: &str) -> Result<[u8; 32], AuthError> {
    if s.len() != 64 {
        return Err(malformed("Signature must be 64 hex digits"));
    }
    if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(malformed("Signature must be lower-case hex"));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| malformed("Signature must be lower-case hex"))?;
    Ok(out)
}

/// Parses `AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
///
/// Accepted: the three components in any order, each exactly once, separated by `,`
/// with optional spaces after the comma; one or more spaces after the algorithm.
/// Everything else is refused with a fixed reason.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, AuthError> {
    let Some((algorithm, rest)) = value.split_once(' ') else {
        return if value == ALGORITHM {
            Err(malformed("no Credential, SignedHeaders or Signature"))
        } else {
            Err(AuthError::UnsupportedAlgorithm)
        };
    };
    if algorithm != ALGORITHM {
        return Err(AuthError::UnsupportedAlgorithm);
    }

    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for piece in rest.trim_start_matches(' ').split(',') {
        let piece = piece.trim_start_matches(' ');
        if piece.is_empty() {
            return Err(malformed("empty component"));
        }
        let Some((key, val)) = piece.split_once('=') else {
            return Err(malformed("component is not key=value"));
        };
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(malformed("unknown component")),
        };
        if slot.replace(val).is_some() {
            return Err(malformed("duplicate component"));
        }
    }
    let credential = credential.ok_or(malformed("missing Credential"))?;
    let signed_headers = signed_headers.ok_or(malformed("missing SignedHeaders"))?;
    let signature = signature.ok_or(malformed("missing Signature"))?;

    // Credential = <access key id>/<scope>, scope = <date>/<region>/<service>/aws4_request.
    let mut fields = credential.split('/');
    let (Some(access_key_id), Some(date), Some(region), Some(service), Some(terminator), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(malformed(
            "Credential must be id/yyyymmdd/region/service/aws4_request",
        ));
    };
    if terminator != SCOPE_TERMINATOR {
        return Err(malformed("credential scope must end in aws4_request"));
    }
    if !is_scope_component(access_key_id) {
        return Err(malformed("access key id is empty or not visible ASCII"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("credential scope date is not yyyymmdd"));
    }
    if !is_scope_component(region) || !is_scope_component(service) {
        return Err(malformed(
            "credential scope region or service is empty or not visible ASCII",
        ));
    }
    // Everything after "<access key id>/" is the scope, verbatim.
    let scope = &credential[access_key_id.len() + 1..];

    check_signed_headers(signed_headers)?;
    let signature = parse_signature(signature)?;

    Ok(Authorization {
        access_key_id,
        scope,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// Parses `yyyyMMddTHHmmssZ` (UTC) into a point in time. `None` for anything else,
/// including impossible dates (Feb 30) and times (25:00:00), and for instants before
/// 1970, which no legitimate request carries.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let day = u8::try_from(digits(6..8)?).ok()?;
    let hour = u8::try_from(digits(9..11)?).ok()?;
    let minute = u8::try_from(digits(11..13)?).ok()?;
    let second = u8::try_from(digits(13..15)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let clock = time::Time::from_hms(hour, minute, second).ok()?;
    let unix = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp();
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(unix).ok()?))
}

/// True if `a` and `b` are at most `max` apart, in either direction.
fn within(a: SystemTime, b: SystemTime, max: Duration) -> bool {
    match a.duration_since(b) {
        Ok(d) => d <= max,
        Err(e) => e.duration() <= max,
    }
}

/// The access key id a request's `Authorization` header names, when the header parses:
/// for the log line of a refused request, so an operator can tell which client (or
/// which stale credential) it was. Never used to decide anything.
pub fn presented_access_key_id(parts: &Parts) -> Option<String> {
    let value = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    parse_authorization(value)
        .ok()
        .map(|a| a.access_key_id.chars().take(64).collect())
}

/// Verifies the SigV4 signature of a received request.
///
/// `parts` are the request head as hyper delivered it; `body` the exact received
/// bytes (the signature covers their SHA-256); `credentials` the set of the path
/// prefix the router matched; `now` the proxy's clock (a parameter so tests can pin
/// it).
///
/// Checks, in order (cheap syntax and policy before any HMAC):
/// 1. exactly one Authorization header, well-formed AWS4-HMAC-SHA256;
/// 2. exactly one X-Amz-Date, `yyyyMMddTHHmmssZ`, whose date is the scope date, and
///    within `policy.max_skew` of `now`;
/// 3. scope service is `policy.service`, region allowed by `policy.allowed_regions`;
/// 4. SignedHeaders includes `host` and `x-amz-date`;
/// 5. the access key id is in `credentials`;
/// 6. the recomputed signature equals the received one (constant-time compare).
pub fn verify(
    parts: &Parts,
    body: &[u8],
    credentials: &CredentialSet,
    policy: &VerifyPolicy,
    now: SystemTime,
) -> Result<Verified, AuthError> {
    // 1. Authorization. Two headers would let an intermediary and we disagree on
    // which one counts, so refuse rather than pick.
    let mut auth_values = parts.headers.get_all(http::header::AUTHORIZATION).iter();
    let auth_value = auth_values.next().ok_or(AuthError::MissingAuthorization)?;
    if auth_values.next().is_some() {
        return Err(AuthError::MultipleAuthorization);
    }
    let auth_value = auth_value
        .to_str()
        .map_err(|_| malformed("header is not visible ASCII"))?;
    let auth = parse_authorization(auth_value)?;

    // 2. X-Amz-Date: required (we do not fall back to `Date`), once.
    let mut date_values = parts.headers.get_all("x-amz-date").iter();
    let amz_date = date_values.next().ok_or(AuthError::MissingDate)?;
    if date_values.next().is_some() {
        return Err(AuthError::MalformedDate);
    }
    let amz_date = amz_date.to_str().map_err(|_| AuthError::MalformedDate)?;
    let request_time = parse_amz_date(amz_date).ok_or(AuthError::MalformedDate)?;
    if amz_date.get(..8) != Some(auth.date) {
        return Err(AuthError::ScopeDateMismatch);
    }
    // Replay window: the spec's 5 minutes, inclusive at the edge, both directions.
    if !within(request_time, now, policy.max_skew) {
        return Err(AuthError::ClockSkew);
    }

    // 3. Scope policy.
    if auth.service != policy.service {
        return Err(AuthError::WrongService);
    }
    if let Some(allowed) = &policy.allowed_regions
        && !allowed.iter().any(|r| r == auth.region)
    {
        return Err(AuthError::RegionNotAllowed);
    }

    // 4. Host binds the signature to this proxy (not another service sharing the
    // secret); x-amz-date binds it to the time we just checked. Without the latter,
    // the date check above would be about an unsigned, replaceable header.
    let mut host_signed = false;
    let mut date_signed = false;
    for name in auth.signed_headers.split(';') {
        host_signed |= name == "host";
        date_signed |= name == "x-amz-date";
    }
    if !host_signed {
        return Err(AuthError::HostNotSigned);
    }
    if !date_signed {
        return Err(AuthError::DateNotSigned);
    }

    // 5. Credential. An unknown access key id is not refused here: it goes through the
    // same canonicalisation and HMAC as a wrong signature (with a fixed decoy key), so
    // response time does not tell an attacker which access key ids exist.
    let credential = credentials.get(auth.access_key_id);

    // 6. Recompute. The payload hash is always our own hash of the received bytes,
    // even if an x-amz-content-sha256 header is present (that is just a header).
    let payload_hash = canonical::hex_sha256(body);
    let creq = canonical::canonical_request(parts, auth.signed_headers, &payload_hash)?;
    let sts = canonical::string_to_sign(amz_date, auth.scope, &creq);

    let cached =
        credential.and_then(|c| c.cached_signing_key(auth.date, auth.region, auth.service));
    let was_cached = cached.is_some();
    let key = match (cached, credential) {
        (Some(key), _) => key,
        (None, Some(c)) => {
            canonical::derive_signing_key(c.secret(), auth.date, auth.region, auth.service)
        }
        // An unknown id costs what a known one would: one HMAC where the set's
        // credentials already have this scope's key cached, the full derivation where
        // they do not.
        (None, None) if credentials.has_cached_scope(auth.date, auth.region, auth.service) => {
            canonical::SigningKey::decoy()
        }
        (None, None) => canonical::derive_signing_key(
            &SecretString::from("decoy-secret-that-no-credential-has"),
            auth.date,
            auth.region,
            auth.service,
        ),
    };
    let expected = canonical::signature(&key, sts.as_bytes());
    let matches = bool::from(expected.ct_eq(&auth.signature));
    let credential = credential.ok_or(AuthError::UnknownAccessKeyId)?;
    if !matches {
        return Err(AuthError::SignatureMismatch);
    }

    // Only a key that just produced a valid signature is cached, so requests without
    // the secret cannot insert into (or evict from) the cache.
    if !was_cached {
        credential.remember_signing_key(auth.date, auth.region, auth.service, key);
    }
    Ok(Verified {
        access_key_id: credential.access_key_id().to_owned(),
        region: auth.region.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;
    use crate::sigv4::credentials::Credential;
    use crate::sigv4::sign::sign_request;
    use crate::sigv4::test_vectors::{self, VECTORS};

    const AKID: &str = "AKIAXKSPROXYTEST2345";
    const AKID2: &str = "AKIAXKSPROXYROTATE23";
    /// 43 chars, the XKS minimum.
    const SECRET_43: &str = "p4Xk7Qz9Lm2Vb8Nc1Rt6Yw3Ue5Io0PaSdFgHjKlZxC";
    /// 64 chars, the XKS maximum.
    const SECRET_64: &str = "Zx9Cv8Bn7Mq6Wr5Et4Yu3Io2Pa1SdFgHjKlQwErTyUiOpAsDfGhJkLzXcVbNm+/=";
    const PATH: &str = "/tenant-a/kms/xks/v1/keys/k1/encrypt";
    const HOST: &str = "xks.example.com";
    const REGION: &str = "us-east-1";

    /// 2024-03-01T12:00:00Z.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_709_294_400)
    }

    fn creds() -> CredentialSet {
        CredentialSet::new(vec![
            Credential::new(AKID, SecretString::from(SECRET_43)),
            Credential::new(AKID2, SecretString::from(SECRET_64)),
        ])
        .expect("distinct ids")
    }

    fn policy() -> VerifyPolicy {
        VerifyPolicy::default()
    }

    /// A KMS-style signed request (signed by aws-sigv4 through `sign_request`).
    fn signed_with(
        akid: &str,
        secret: &str,
        region: &str,
        service: &str,
        path: &str,
        body: &[u8],
        time: SystemTime,
    ) -> http::Request<bytes::Bytes> {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("https://{HOST}{path}"))
            .header("content-type", "application/json")
            .body(bytes::Bytes::copy_from_slice(body))
            .expect("request");
        sign_request(
            &mut req,
            akid,
            &SecretString::from(secret),
            region,
            service,
            time,
        )
        .expect("sign");
        req
    }

    fn signed(body: &[u8]) -> http::Request<bytes::Bytes> {
        signed_with(AKID, SECRET_43, REGION, "kms-xks-proxy", PATH, body, t0())
    }

    fn check(req: &http::Request<bytes::Bytes>, now: SystemTime) -> Result<Verified, AuthError> {
        let (parts, body) = req.clone().into_parts();
        verify(&parts, &body, &creds(), &policy(), now)
    }

    fn set_header(req: &mut http::Request<bytes::Bytes>, name: &'static str, value: &str) {
        req.headers_mut().insert(
            name,
            http::HeaderValue::from_str(value).expect("valid test header"),
        );
    }

    fn auth_of(req: &http::Request<bytes::Bytes>) -> String {
        req.headers()["authorization"]
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    // ---- AWS test-suite vectors -------------------------------------------------

    /// Rule: our canonical request and string to sign equal AWS's byte for byte, the
    /// derived signature equals AWS's, and `verify` accepts AWS's signed request at
    /// the vector's time (service "service", region us-east-1).
    #[test]
    fn aws_vectors_canonical_request_string_to_sign_and_verify() {
        let vector_set = CredentialSet::new(vec![Credential::new(
            test_vectors::ACCESS_KEY_ID,
            SecretString::from(test_vectors::SECRET),
        )])
        .expect("one credential");
        let vector_policy = VerifyPolicy {
            service: "service".to_owned(),
            allowed_regions: Some(vec!["us-east-1".to_owned()]),
            max_skew: Duration::from_secs(300),
        };
        for v in VECTORS {
            let (parts, body) = test_vectors::parse_request(v.signed_request);
            let auth_value = parts.headers["authorization"].to_str().expect("ascii");
            let auth = parse_authorization(auth_value).expect(v.name);

            let creq = canonical::canonical_request(
                &parts,
                auth.signed_headers,
                &canonical::hex_sha256(&body),
            )
            .expect(v.name);
            assert_eq!(
                String::from_utf8_lossy(&creq),
                v.canonical_request,
                "{}: canonical request",
                v.name
            );

            let amz_date = parts.headers["x-amz-date"].to_str().expect("ascii");
            let sts = canonical::string_to_sign(amz_date, auth.scope, &creq);
            assert_eq!(sts, v.string_to_sign, "{}: string to sign", v.name);

            let key = canonical::derive_signing_key(
                &SecretString::from(test_vectors::SECRET),
                auth.date,
                auth.region,
                auth.service,
            );
            assert_eq!(
                hex::encode(canonical::signature(&key, sts.as_bytes())),
                v.signature.trim_end(),
                "{}: signature",
                v.name
            );

            let verified = verify(
                &parts,
                &body,
                &vector_set,
                &vector_policy,
                test_vectors::time(),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
            assert_eq!(verified.access_key_id, test_vectors::ACCESS_KEY_ID);
            assert_eq!(verified.region, "us-east-1");

            // And under the real XKS policy the same request is refused: the scope
            // names service "service", not kms-xks-proxy.
            assert_eq!(
                verify(&parts, &body, &vector_set, &policy(), test_vectors::time()),
                Err(AuthError::WrongService),
                "{}",
                v.name
            );
        }
    }

    // ---- Round trips with aws-sigv4 --------------------------------------------

    /// Rule: what KMS-style signing (aws-sigv4) produces, we accept — for empty,
    /// tiny and larger-than-one-packet bodies on a prefixed XKS path.
    #[test]
    fn round_trip_body_sizes() {
        for size in [0usize, 1, 4300] {
            let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let req = signed(&body);
            let v = check(&req, t0()).unwrap_or_else(|e| panic!("size {size}: {e}"));
            assert_eq!(
                v,
                Verified {
                    access_key_id: AKID.to_owned(),
                    region: REGION.to_owned()
                }
            );
        }
    }

    /// Rule: the XKS secret is 43–64 characters; both extremes work, and two
    /// credentials are live in one set at once (rotation).
    #[test]
    fn two_credentials_live_in_one_set_both_verify() {
        for (akid, secret) in [(AKID, SECRET_43), (AKID2, SECRET_64)] {
            let req = signed_with(akid, secret, REGION, "kms-xks-proxy", PATH, b"{}", t0());
            assert_eq!(
                check(&req, t0()).expect(akid).access_key_id,
                akid.to_owned()
            );
        }
    }

    /// Rule: HTTP/2 carries the host in `:authority` (hyper: the URI authority) with
    /// no Host header; the signed host is checked against that.
    #[test]
    fn http2_authority_stands_in_for_host() {
        let req = signed(b"{}");
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.uri().authority().map(|a| a.as_str()), Some(HOST));
        check(&req, t0()).expect("authority used as host");

        // HTTP/1.1 shape: origin-form URI plus a Host header.
        let (mut parts, body) = req.into_parts();
        parts.uri = PATH.parse().expect("path");
        parts
            .headers
            .insert("host", http::HeaderValue::from_static(HOST));
        verify(&parts, &body, &creds(), &policy(), t0()).expect("host header used");
        // Neither: nothing to check the signed host against.
        parts.headers.remove("host");
        assert_eq!(
            verify(&parts, &body, &creds(), &policy(), t0()),
            Err(AuthError::MissingHost)
        );
    }

    /// Rule: SigV4 covers only SignedHeaders. A header added after signing (curl and
    /// load balancers add user-agent, x-forwarded-for, ...) must not break it.
    #[test]
    fn unsigned_extra_header_still_verifies() {
        let mut req = signed(b"{}");
        set_header(&mut req, "user-agent", "curl/8.5.0");
        set_header(&mut req, "x-forwarded-for", "10.0.0.1");
        // content-type was on the request but unsigned, as KMS does; change it too.
        set_header(&mut req, "content-type", "text/plain");
        check(&req, t0()).expect("unsigned headers are outside the signature");
    }

    /// Rule: the cache only gains a key after a successful verification.
    #[test]
    fn signing_key_cached_only_after_success() {
        let set = creds();
        let good = signed(b"{}");
        let mut bad = good.clone();
        *bad.body_mut() = bytes::Bytes::from_static(b"{ }");
        let (bp, bb) = bad.into_parts();
        assert_eq!(
            verify(&bp, &bb, &set, &policy(), t0()),
            Err(AuthError::SignatureMismatch)
        );
        let cred = set.get(AKID).expect("present");
        assert_eq!(cred.cached_key_count(), 0);
        let (gp, gb) = good.into_parts();
        verify(&gp, &gb, &set, &policy(), t0()).expect("good");
        assert_eq!(cred.cached_key_count(), 1);
        // A second verification uses the cache and still succeeds.
        verify(&gp, &gb, &set, &policy(), t0()).expect("good, cached");
        assert_eq!(cred.cached_key_count(), 1);
        // A wrong signature is still refused when the key comes from the cache.
        assert_eq!(
            verify(&bp, &bb, &set, &policy(), t0()),
            Err(AuthError::SignatureMismatch)
        );
    }

    // ---- Negatives -----------------------------------------------------------------

    #[test]
    fn wrong_secret_is_signature_mismatch() {
        let req = signed_with(AKID, SECRET_64, REGION, "kms-xks-proxy", PATH, b"{}", t0());
        assert_eq!(check(&req, t0()), Err(AuthError::SignatureMismatch));
    }

    #[test]
    fn wrong_service_is_rejected() {
        let req = signed_with(AKID, SECRET_43, REGION, "kms", PATH, b"{}", t0());
        assert_eq!(check(&req, t0()), Err(AuthError::WrongService));
    }

    #[test]
    fn region_not_allowed_is_rejected() {
        let req = signed_with(
            AKID,
            SECRET_43,
            "eu-west-1",
            "kms-xks-proxy",
            PATH,
            b"{}",
            t0(),
        );
        // Any region passes when allowed_regions is None (KMS's region)...
        assert_eq!(check(&req, t0()).expect("any region").region, "eu-west-1");
        // ...but not when the operator pinned the regions.
        let (parts, body) = req.into_parts();
        let pinned = VerifyPolicy {
            allowed_regions: Some(vec!["us-east-1".to_owned(), "us-west-2".to_owned()]),
            ..VerifyPolicy::default()
        };
        assert_eq!(
            verify(&parts, &body, &creds(), &pinned, t0()),
            Err(AuthError::RegionNotAllowed)
        );
    }

    /// Spec: reject X-Amz-Date more than 5 minutes from our clock, either way.
    /// Exactly 300 s away is accepted; 301 s is not.
    #[test]
    fn clock_skew_edges_both_directions() {
        let req = signed(b"{}");
        for secs in [0u64, 1, 299, 300] {
            check(&req, t0() + Duration::from_secs(secs))
                .unwrap_or_else(|e| panic!("request {secs}s old: {e}"));
            check(&req, t0() - Duration::from_secs(secs))
                .unwrap_or_else(|e| panic!("request {secs}s ahead: {e}"));
        }
        // 300 s and a fraction is already past the edge.
        assert_eq!(
            check(&req, t0() + Duration::from_millis(300_001)),
            Err(AuthError::ClockSkew)
        );
        for secs in [301u64, 3600, 86_400 * 365] {
            assert_eq!(
                check(&req, t0() + Duration::from_secs(secs)),
                Err(AuthError::ClockSkew),
                "stale by {secs}s"
            );
            assert_eq!(
                check(&req, t0() - Duration::from_secs(secs)),
                Err(AuthError::ClockSkew),
                "future by {secs}s"
            );
        }
    }

    /// Rule: the X-Amz-Date date must equal the credential scope date.
    #[test]
    fn scope_date_must_match_x_amz_date() {
        let mut req = signed(b"{}");
        let auth = auth_of(&req).replace("/20240301/", "/20240302/");
        set_header(&mut req, "authorization", &auth);
        assert_eq!(check(&req, t0()), Err(AuthError::ScopeDateMismatch));
    }

    #[test]
    fn x_amz_date_missing_duplicated_or_malformed() {
        let req = signed(b"{}");
        let mut missing = req.clone();
        missing.headers_mut().remove("x-amz-date");
        assert_eq!(check(&missing, t0()), Err(AuthError::MissingDate));

        let mut twice = req.clone();
        twice.headers_mut().append(
            "x-amz-date",
            http::HeaderValue::from_static("20240301T120000Z"),
        );
        assert_eq!(check(&twice, t0()), Err(AuthError::MalformedDate));

        for bad in [
            "",
            "20240301T120000",
            "20240301 120000Z",
            "20240301T120000z",
            "2024-03-01T12:00:00Z",
            "20240301T1200000Z",
            "20240230T120000Z",
            "20241301T120000Z",
            "20240301T246000Z",
            "20240301T120060Z",
            "2024030xT120000Z",
            "+2024301T120000Z",
            "Fri, 01 Mar 2024 12:00:00 GMT",
        ] {
            let mut r = req.clone();
            set_header(&mut r, "x-amz-date", bad);
            assert_eq!(check(&r, t0()), Err(AuthError::MalformedDate), "{bad:?}");
        }
        // A well-formed date before 1970 cannot be anywhere near now.
        let mut r = req.clone();
        set_header(&mut r, "x-amz-date", "19691231T235959Z");
        assert_eq!(check(&r, t0()), Err(AuthError::MalformedDate));
    }

    #[test]
    fn tampered_body_one_byte() {
        let mut req = signed(b"{\"plaintext\":\"AAAA\"}");
        let mut body = req.body().to_vec();
        body[3] ^= 0x01;
        *req.body_mut() = body.into();
        assert_eq!(check(&req, t0()), Err(AuthError::SignatureMismatch));
    }

    #[test]
    fn tampered_path() {
        let req = signed(b"{}");
        for other in [
            "/tenant-b/kms/xks/v1/keys/k1/encrypt",
            "/tenant-a/kms/xks/v1/keys/k2/encrypt",
            "/tenant-a/kms/xks/v1/keys/k1/decrypt",
            "/tenant-a/kms/xks/v1/keys/k1/encrypt/",
            "/tenant-a/kms/xks/v1/keys/./k1/encrypt",
            "/tenant-a/kms/xks/v1/keys/k1/encrypt?x=1",
        ] {
            let (mut parts, body) = req.clone().into_parts();
            parts.uri = format!("https://{HOST}{other}").parse().expect("uri");
            assert_eq!(
                verify(&parts, &body, &creds(), &policy(), t0()),
                Err(AuthError::SignatureMismatch),
                "{other}"
            );
        }
    }

    #[test]
    fn tampered_method_or_host() {
        let req = signed(b"{}");
        let (mut parts, body) = req.clone().into_parts();
        parts.method = http::Method::PUT;
        assert_eq!(
            verify(&parts, &body, &creds(), &policy(), t0()),
            Err(AuthError::SignatureMismatch)
        );
        let mut other_host = req.clone();
        set_header(&mut other_host, "host", "evil.example.com");
        assert_eq!(check(&other_host, t0()), Err(AuthError::SignatureMismatch));
    }

    /// Rule: a header added to SignedHeaders after signing changes the canonical
    /// request, so the old signature no longer matches.
    #[test]
    fn header_added_to_signed_headers_after_signing() {
        let mut req = signed(b"{}");
        let auth = auth_of(&req).replace(
            "SignedHeaders=host;x-amz-date",
            "SignedHeaders=content-type;host;x-amz-date",
        );
        set_header(&mut req, "authorization", &auth);
        assert_eq!(check(&req, t0()), Err(AuthError::SignatureMismatch));
    }

    /// Rule: a signed header's value is covered by the signature.
    #[test]
    fn signed_header_value_changed() {
        // Sign x-amz-date (covered by SignedHeaders) then move it by one second, and
        // keep the scope date equal so only the signature can catch it.
        let mut req = signed(b"{}");
        set_header(&mut req, "x-amz-date", "20240301T120001Z");
        assert_eq!(check(&req, t0()), Err(AuthError::SignatureMismatch));
    }

    /// Rule: every header named in SignedHeaders must be in the request.
    #[test]
    fn signed_header_missing() {
        let mut req = signed(b"{}");
        let auth = auth_of(&req).replace(
            "SignedHeaders=host;x-amz-date",
            "SignedHeaders=host;x-amz-date;x-custom",
        );
        set_header(&mut req, "authorization", &auth);
        assert_eq!(check(&req, t0()), Err(AuthError::SignedHeaderMissing));
    }

    #[test]
    fn unknown_access_key_id() {
        let req = signed_with(
            "AKIAUNKNOWNUNKNOWN23",
            SECRET_43,
            REGION,
            "kms-xks-proxy",
            PATH,
            b"{}",
            t0(),
        );
        assert_eq!(check(&req, t0()), Err(AuthError::UnknownAccessKeyId));
    }

    /// Rule: host and x-amz-date must be signed (XKS: SignedHeaders=host;x-amz-date).
    #[test]
    fn host_and_date_must_be_signed() {
        let mut req = signed(b"{}");
        let auth =
            auth_of(&req).replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date");
        set_header(&mut req, "authorization", &auth);
        assert_eq!(check(&req, t0()), Err(AuthError::HostNotSigned));

        let mut req = signed(b"{}");
        let auth = auth_of(&req).replace("SignedHeaders=host;x-amz-date", "SignedHeaders=host");
        set_header(&mut req, "authorization", &auth);
        assert_eq!(check(&req, t0()), Err(AuthError::DateNotSigned));
    }

    #[test]
    fn authorization_missing_or_repeated() {
        let req = signed(b"{}");
        let mut none = req.clone();
        none.headers_mut().remove("authorization");
        assert_eq!(check(&none, t0()), Err(AuthError::MissingAuthorization));

        let mut two = req.clone();
        let value = req.headers()["authorization"].clone();
        two.headers_mut().append("authorization", value);
        assert_eq!(check(&two, t0()), Err(AuthError::MultipleAuthorization));
    }

    // One table on purpose (issue 17): each row is one rule of the Authorization
    // grammar and its fixed reason, and reading the rows together is the review that
    // no hostile form is missing or answered differently.
    /// Rule: the Authorization grammar is strict; each hostile form has a fixed
    /// reason. Optional spaces after commas (and any component order) are tolerated.
    #[test]
    fn malformed_authorization_table() {
        let req = signed(b"{}");
        let good = auth_of(&req);
        let sig = good.rsplit("Signature=").next().expect("sig").to_owned();
        let cred = format!("{AKID}/20240301/{REGION}/kms-xks-proxy/aws4_request");
        let sh = "host;x-amz-date";

        // Tolerated variants of the real header: all must verify.
        for ok in [
            format!("AWS4-HMAC-SHA256 Credential={cred},SignedHeaders={sh},Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Credential={cred},  SignedHeaders={sh},   Signature={sig}"),
            format!("AWS4-HMAC-SHA256   Credential={cred}, SignedHeaders={sh}, Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Signature={sig}, Credential={cred}, SignedHeaders={sh}"),
        ] {
            let mut r = req.clone();
            set_header(&mut r, "authorization", &ok);
            check(&r, t0()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }

        use AuthError::{MalformedAuthorization as M, UnsupportedAlgorithm as Alg};
        // The real header with one component replaced.
        let with = |c: &str, h: &str, s: &str| {
            format!("AWS4-HMAC-SHA256 Credential={c}, SignedHeaders={h}, Signature={s}")
        };
        let scope = |id: &str, date: &str, region: &str, service: &str, term: &str| {
            with(&format!("{id}/{date}/{region}/{service}/{term}"), sh, &sig)
        };
        const SHAPE: &str = "Credential must be id/yyyymmdd/region/service/aws4_request";
        const REG_SVC: &str = "credential scope region or service is empty or not visible ASCII";
        const SORTED: &str = "SignedHeaders must be sorted with no duplicates";
        let full = with(&cred, sh, &sig);
        let cases: Vec<(String, AuthError)> = vec![
            // Algorithm.
            (String::new(), Alg),
            ("Basic dXNlcjpwYXNz".into(), Alg),
            (full.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"), Alg),
            (full.replace("AWS4-HMAC-SHA256", "aws4-hmac-sha256"), Alg),
            (
                full.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"),
                Alg,
            ),
            (
                "AWS4-HMAC-SHA256".into(),
                M("no Credential, SignedHeaders or Signature"),
            ),
            // Component list.
            ("AWS4-HMAC-SHA256 ".into(), M("empty component")),
            (format!("{full},"), M("empty component")),
            (
                full.replace(", SignedHeaders", ",, SignedHeaders"),
                M("empty component"),
            ),
            (format!("{full}, Extra=1"), M("unknown component")),
            (
                full.replace("Credential=", "credential="),
                M("unknown component"),
            ),
            (
                full.replace("Credential=", "Credential "),
                M("component is not key=value"),
            ),
            (full.replace(", ", " "), M("missing SignedHeaders")),
            (format!("{full}, Signature={sig}"), M("duplicate component")),
            (
                full.replace("Credential=", &format!("Credential={cred}, Credential=")),
                M("duplicate component"),
            ),
            (
                format!("AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={sh}"),
                M("missing Signature"),
            ),
            (
                format!("AWS4-HMAC-SHA256 Credential={cred}, Signature={sig}"),
                M("missing SignedHeaders"),
            ),
            (
                format!("AWS4-HMAC-SHA256 SignedHeaders={sh}, Signature={sig}"),
                M("missing Credential"),
            ),
            // Credential and scope.
            (
                scope(AKID, "20240301", REGION, "kms-xks-proxy", "aws4_requesT"),
                M("credential scope must end in aws4_request"),
            ),
            (
                scope(
                    AKID,
                    "20240301",
                    REGION,
                    "kms-xks-proxy",
                    "aws4_request/extra",
                ),
                M(SHAPE),
            ),
            (
                with(&format!("{AKID}/20240301/{REGION}/kms-xks-proxy"), sh, &sig),
                M(SHAPE),
            ),
            (with(AKID, sh, &sig), M(SHAPE)),
            (
                scope("", "20240301", REGION, "kms-xks-proxy", "aws4_request"),
                M("access key id is empty or not visible ASCII"),
            ),
            (
                scope(AKID, "2024031", REGION, "kms-xks-proxy", "aws4_request"),
                M("credential scope date is not yyyymmdd"),
            ),
            (
                scope(AKID, "2024-03-01", REGION, "kms-xks-proxy", "aws4_request"),
                M("credential scope date is not yyyymmdd"),
            ),
            (
                scope(AKID, "20240301", "", "kms-xks-proxy", "aws4_request"),
                M(REG_SVC),
            ),
            (
                scope(AKID, "20240301", REGION, "", "aws4_request"),
                M(REG_SVC),
            ),
            (
                scope(AKID, "20240301", "us east", "kms-xks-proxy", "aws4_request"),
                M(REG_SVC),
            ),
            // SignedHeaders.
            (with(&cred, "", &sig), M("SignedHeaders is empty")),
            (
                with(&cred, "host;;x-amz-date", &sig),
                M("SignedHeaders has an empty header name"),
            ),
            (
                with(&cred, "host;x-amz-date;", &sig),
                M("SignedHeaders has an empty header name"),
            ),
            (
                with(&cred, "Host;x-amz-date", &sig),
                M("SignedHeaders names must be lower-case"),
            ),
            (
                with(&cred, "host;x amz date", &sig),
                M("SignedHeaders has an invalid header name"),
            ),
            (
                with(&cred, "host;x-amz-date:", &sig),
                M("SignedHeaders has an invalid header name"),
            ),
            (with(&cred, "x-amz-date;host", &sig), M(SORTED)),
            (with(&cred, "host;host;x-amz-date", &sig), M(SORTED)),
            // Signature.
            (with(&cred, sh, ""), M("Signature must be 64 hex digits")),
            (
                with(&cred, sh, &sig[..63]),
                M("Signature must be 64 hex digits"),
            ),
            (
                with(&cred, sh, &format!("{sig}0")),
                M("Signature must be 64 hex digits"),
            ),
            (format!("{full} "), M("Signature must be 64 hex digits")),
            (
                with(&cred, sh, &sig.to_uppercase()),
                M("Signature must be lower-case hex"),
            ),
            (
                with(&cred, sh, &"g".repeat(64)),
                M("Signature must be lower-case hex"),
            ),
            (
                with(&cred, sh, &format!("0x{}", &sig[2..])),
                M("Signature must be lower-case hex"),
            ),
        ];
        assert!(cases.len() >= 15);
        for (value, want) in cases {
            let mut r = req.clone();
            set_header(&mut r, "authorization", &value);
            assert_eq!(check(&r, t0()), Err(want.clone()), "{value:?}");
            assert!(want.to_string().len() < 200);
        }

        // Not visible ASCII (obs-text): refused before parsing.
        let mut r = req.clone();
        r.headers_mut().insert(
            "authorization",
            http::HeaderValue::from_bytes(b"AWS4-HMAC-SHA256 Credential=\xff").expect("obs-text"),
        );
        assert_eq!(check(&r, t0()), Err(M("header is not visible ASCII")));
    }

    /// Rule: never panic on any input. A deterministic fuzz loop mutates the
    /// Authorization, X-Amz-Date and path of a valid request; every outcome must be
    /// a value, and an `Ok` is only possible for the real credential.
    #[test]
    fn hostile_mutations_never_panic() {
        struct Rng(u64);
        impl Rng {
            fn next(&mut self) -> u64 {
                // xorshift64*: deterministic, no dependency.
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
            }
            fn below(&mut self, n: usize) -> usize {
                usize::try_from(self.next() % n.max(1) as u64).expect("fits")
            }
        }
        const ALPHABET: &[u8] =
            b"AWS4-HMAC-SHA256 Credential=/,;= SignedHeadersSignature0123456789abcdefxyz\x7f\xff\t%";

        fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
            let mut v = input.to_vec();
            for _ in 0..=rng.below(4) {
                match rng.below(7) {
                    0 if !v.is_empty() => {
                        let i = rng.below(v.len());
                        v[i] = ALPHABET[rng.below(ALPHABET.len())];
                    }
                    1 => {
                        let i = rng.below(v.len() + 1);
                        v.insert(i, ALPHABET[rng.below(ALPHABET.len())]);
                    }
                    2 if !v.is_empty() => {
                        let i = rng.below(v.len());
                        v.remove(i);
                    }
                    3 => {
                        let i = rng.below(v.len() + 1);
                        v.truncate(i);
                    }
                    4 if !v.is_empty() => {
                        // Duplicate a slice (repeats components and separators).
                        let a = rng.below(v.len());
                        let b = a + rng.below(v.len() - a);
                        let piece = v[a..=b.min(v.len() - 1)].to_vec();
                        let at = rng.below(v.len() + 1);
                        v.splice(at..at, piece);
                    }
                    5 => v = (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
                    _ => {}
                }
            }
            v
        }

        let set = creds();
        let req = signed(b"{\"k\":1}");
        let auth = auth_of(&req);
        let mut rng = Rng(0x5EED_5EED_1234_5678);
        let mut ok = 0usize;
        let mut tried = 0usize;
        for round in 0..20_000 {
            let (mut parts, body) = req.clone().into_parts();
            match round % 3 {
                0 => {
                    let m = mutate(&mut rng, auth.as_bytes());
                    let Ok(value) = http::HeaderValue::from_bytes(&m) else {
                        continue;
                    };
                    parts.headers.insert("authorization", value);
                }
                1 => {
                    let m = mutate(&mut rng, b"20240301T120000Z");
                    let Ok(value) = http::HeaderValue::from_bytes(&m) else {
                        continue;
                    };
                    parts.headers.insert("x-amz-date", value);
                }
                _ => {
                    let m = mutate(&mut rng, PATH.as_bytes());
                    let Ok(uri) = http::Uri::builder()
                        .scheme("https")
                        .authority(HOST)
                        .path_and_query(m)
                        .build()
                    else {
                        continue;
                    };
                    parts.uri = uri;
                }
            }
            tried += 1;
            if let Ok(v) = verify(&parts, &body, &set, &policy(), t0()) {
                assert_eq!(v.access_key_id, AKID);
                ok += 1;
            }
        }
        assert!(tried > 10_000, "fuzz loop exercised too little: {tried}");
        // Nearly every mutation must fail; a few benign ones (extra spaces after a
        // comma, no-op edits) may pass.
        assert!(ok < tried / 10, "{ok} of {tried} mutations verified");
    }

    /// Rule: no secret and no signature ever appears in an error or Debug output.
    #[test]
    fn errors_and_debug_never_show_secrets() {
        let set = creds();
        let req = signed(b"{}");
        let sig = auth_of(&req)
            .rsplit("Signature=")
            .next()
            .expect("sig")
            .to_owned();
        let mut outputs = vec![format!("{set:?}"), format!("{set:#?}")];
        let mut tampered = req.clone();
        *tampered.body_mut() = bytes::Bytes::from_static(b"{ }");
        let (p, b) = tampered.into_parts();
        let err = verify(&p, &b, &set, &policy(), t0()).expect_err("tampered");
        outputs.push(format!("{err:?}"));
        outputs.push(err.to_string());
        let (p, b) = req.into_parts();
        let ok = verify(&p, &b, &set, &policy(), t0()).expect("good");
        outputs.push(format!("{ok:?}"));
        outputs.push(format!("{set:?}")); // now with a cached key
        for text in outputs {
            assert!(!text.contains(SECRET_43), "{text}");
            assert!(!text.contains(SECRET_64), "{text}");
            assert!(!text.contains(&sig), "{text}");
        }
    }

    #[test]
    fn amz_date_parser() {
        assert_eq!(parse_amz_date("20240301T120000Z"), Some(t0()));
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        assert!(parse_amz_date("20240229T235959Z").is_some());
        assert_eq!(parse_amz_date("20230229T000000Z"), None);
        assert_eq!(parse_amz_date("99999999T999999Z"), None);
        assert_eq!(parse_amz_date("2024030１T12000Z"), None);
    }
}
