//! SigV4 canonicalisation and the signature arithmetic, as pure functions.
//!
//! This file owns, for the header-signed (not presigned) form of SigV4 as non-S3
//! services use it:
//! - the canonical request: method, canonical URI, canonical query, canonical headers,
//!   signed-headers list, payload hash ([`canonical_request`]);
//! - the string to sign ([`string_to_sign`]);
//! - the signing-key HMAC chain ([`derive_signing_key`]) and the signature
//!   ([`signature`]).
//!
//! It knows nothing of policy (which service, how much clock skew, which headers must
//! be signed): that is `verify.rs`. Keeping these functions pure is what lets the unit
//! tests compare them byte for byte with the AWS test suite in `tests/sigv4-vectors/`.
//!
//! Reference: AWS General Reference, "Create a canonical request for Signature
//! Version 4", and the behaviour of the `aws-sigv4` crate that our signer wraps (where
//! the two could differ we follow the crate, so that what we sign we also accept).

use std::fmt;

use crate::crypto::{digest, hmac};
use http::request::Parts;
use zeroize::Zeroizing;

use super::AuthError;
use crate::secret::SecretString;

/// The only algorithm KMS uses for XKS calls.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The fixed last element of every SigV4 credential scope.
pub const SCOPE_TERMINATOR: &str = "aws4_request";

/// Lower-case hex SHA-256 of `data`: the payload hash and the canonical-request hash.
pub fn hex_sha256(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// Appends `bytes` to `out`, percent-encoding every byte that is not an RFC 3986
/// unreserved character (`A-Z a-z 0-9 - . _ ~`), with upper-case hex as SigV4 requires.
/// `/` is kept when `keep_slash` (paths), encoded otherwise (query names and values).
pub fn uri_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// The canonical URI of a request path *as received* (already percent-encoded on the
/// wire).
///
/// Non-S3 services encode the path a second time ("double encoding"): every byte that
/// is not unreserved or `/` is percent-encoded again, so a received `%3D` becomes
/// `%253D`. That is what `aws-sigv4` does by default, so it is what KMS-style signers
/// produce. An empty path is `/`.
///
/// We deliberately do NOT remove dot segments or merge slashes: the signature then
/// covers exactly the bytes the router sees, so no two different paths can share a
/// signature. (Our signer turns normalisation off to match; KMS's XKS paths contain
/// neither dot segments nor double slashes, so nothing legitimate is lost.)
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out = String::with_capacity(path.len() + 8);
    uri_encode(path.as_bytes(), true, &mut out);
    out
}

/// Decodes `%XX` escapes and `+` (as a space, the form-urlencoded rule `aws-sigv4`
/// applies when it reads a query). An invalid escape is kept literally, as the
/// `form_urlencoded` crate does, rather than failing: the signature check decides.
fn query_decode(s: &str) -> Vec<u8> {
    fn hex_val(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_val);
                let lo = bytes.get(i + 2).copied().and_then(hex_val);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The canonical query string: each `name=value` decoded then URI-encoded (RFC 3986
/// unreserved kept, `/` encoded), sorted by encoded name then encoded value, joined
/// with `&`. A parameter without `=` has an empty value; empty pieces (`a=1&&b=2`) are
/// skipped, as `aws-sigv4` does. KMS sends no query; the AWS vectors have some.
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return String::new();
    };
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            let mut enc_name = String::new();
            let mut enc_value = String::new();
            uri_encode(&query_decode(name), false, &mut enc_name);
            uri_encode(&query_decode(value), false, &mut enc_value);
            (enc_name, enc_value)
        })
        .collect();
    params.sort();
    let mut out = String::with_capacity(query.len() + 8);
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// Appends one header value, canonicalised: leading and trailing spaces removed and
/// every internal run of spaces collapsed to one ("Trimall" in the SigV4 docs).
///
/// Only the space character counts, exactly as in `aws-sigv4` (which matches what S3
/// and the other services do); HTTP parsers have already stripped surrounding tabs.
/// Works on bytes because a header value may legally carry non-UTF-8 `obs-text`.
pub fn push_trimmed_value(value: &[u8], out: &mut Vec<u8>) {
    let mut pending_space = false;
    let mut wrote_any = false;
    for &b in value {
        if b == b' ' {
            pending_space = wrote_any;
        } else {
            if pending_space {
                out.push(b' ');
                pending_space = false;
            }
            out.push(b);
            wrote_any = true;
        }
    }
}

/// Builds the canonical request of `parts` for the given `SignedHeaders` list
/// (`"host;x-amz-date"`: lower-case names, sorted, `;`-separated, as taken from the
/// Authorization header) and payload hash (lower-case hex SHA-256 of the body):
///
/// ```text
/// METHOD \n canonical URI \n canonical query \n
/// name:value \n   (one line per signed header, in SignedHeaders order)
/// \n SignedHeaders \n payload hash
/// ```
///
/// Each signed header's values are all of that name's values in received order,
/// each trimmed ([`push_trimmed_value`]), joined with `,`. A signed header the
/// request does not carry is an error, not an empty line: the client claimed to
/// sign something we cannot see.
///
/// This function does not validate `signed_headers` (the verifier does that first);
/// on any input it returns a value or an error, never panics.
pub fn canonical_request(
    parts: &Parts,
    signed_headers: &str,
    payload_hash: &str,
) -> Result<Vec<u8>, AuthError> {
    let uri = canonical_uri(parts.uri.path());
    let query = canonical_query(parts.uri.query());
    let method = parts.method.as_str();

    let mut out =
        Vec::with_capacity(method.len() + uri.len() + query.len() + 2 * signed_headers.len() + 192);
    out.extend_from_slice(method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(uri.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(query.as_bytes());
    out.push(b'\n');

    for name in signed_headers.split(';') {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        // `get_all` with a string that is not a valid header name finds nothing (it
        // does not panic), which lands in the "missing" error below.
        let mut values = parts.headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            if name != "host" {
                return Err(AuthError::SignedHeaderMissing);
            }
            // No Host header: HTTP/2 carries the host as `:authority`, which hyper
            // puts in the request URI.
            let authority = parts.uri.authority().ok_or(AuthError::MissingHost)?;
            push_trimmed_value(authority.as_str().as_bytes(), &mut out);
        }
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_trimmed_value(value.as_bytes(), &mut out);
        }
        out.push(b'\n');
    }

    out.push(b'\n');
    out.extend_from_slice(signed_headers.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    Ok(out)
}

/// The string to sign: algorithm, request time (`X-Amz-Date`), credential scope
/// (`yyyymmdd/region/service/aws4_request`) and the hex SHA-256 of the canonical
/// request, one per line with no trailing newline.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &[u8]) -> String {
    let hash = hex_sha256(canonical_request);
    let mut out =
        String::with_capacity(ALGORITHM.len() + amz_date.len() + scope.len() + hash.len() + 3);
    out.push_str(ALGORITHM);
    out.push('\n');
    out.push_str(amz_date);
    out.push('\n');
    out.push_str(scope);
    out.push('\n');
    out.push_str(&hash);
    out
}

/// A derived SigV4 signing key. It is as good as the secret for the day, region and
/// service it was derived for, so it is zeroized on drop and redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Zeroizing<[u8; 32]>);

impl SigningKey {
    /// The key bytes, for the signature HMAC. Do not log or copy them.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key no credential has: the verifier signs with it for an unknown access key
    /// id, so that failure costs the same work as a wrong signature.
    pub(crate) fn decoy() -> Self {
        SigningKey(Zeroizing::new([0x5a; 32]))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Zeroizing<[u8; 32]> {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(tag.as_ref());
    out
}

/// The SigV4 signing-key chain:
/// `kDate = HMAC("AWS4" + secret, date)`, `kRegion = HMAC(kDate, region)`,
/// `kService = HMAC(kRegion, service)`, `kSigning = HMAC(kService, "aws4_request")`.
///
/// Every intermediate is held in a zeroizing buffer. (ring's own HMAC key schedule is
/// not zeroized by ring, which is the default [`crate::crypto`]; that is outside what we can control without another crate.)
pub fn derive_signing_key(
    secret: &SecretString,
    date: &str,
    region: &str,
    service: &str,
) -> SigningKey {
    let mut k_secret = Zeroizing::new(Vec::with_capacity(4 + secret.len()));
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.expose().as_bytes());
    let k_date = hmac_sha256(&k_secret, date.as_bytes());
    let k_region = hmac_sha256(k_date.as_ref(), region.as_bytes());
    let k_service = hmac_sha256(k_region.as_ref(), service.as_bytes());
    SigningKey(hmac_sha256(k_service.as_ref(), SCOPE_TERMINATOR.as_bytes()))
}

/// The raw signature: `HMAC-SHA256(signing key, string to sign)`. The Authorization
/// header carries it as 64 lower-case hex digits.
pub fn signature(key: &SigningKey, string_to_sign: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key.expose()),
        string_to_sign,
    );
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("GET").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("test request").into_parts().0
    }

    /// SigV4 docs, "Derive a signing key": the published example derivation for
    /// date 20120215, region us-east-1, service iam.
    #[test]
    fn signing_key_matches_aws_documented_example() {
        let key = derive_signing_key(&SECRET.into(), "20120215", "us-east-1", "iam");
        assert_eq!(
            hex::encode(key.expose()),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    /// Rule: the payload hash of an empty body is SHA-256("") (every vanilla vector).
    #[test]
    fn empty_body_hash() {
        assert_eq!(
            hex_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Rule: non-S3 canonical URI = the received path encoded again; unreserved and `/`
    /// kept; empty path is `/`. Pinned by the suite's double-encode-path case.
    #[test]
    fn canonical_uri_double_encodes_the_received_path() {
        let request = include_str!("../../tests/sigv4-vectors/double-encode-path/request.txt");
        let creq = include_str!(
            "../../tests/sigv4-vectors/double-encode-path/header-canonical-request.txt"
        );
        let path = request
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .expect("request line has a target");
        let expected = creq.lines().nth(1).expect("canonical URI line");
        assert_eq!(canonical_uri(path), expected);
        assert_eq!(expected, "/test/%40connections/JBDvjfGEIAMCERw%253D");

        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(
            canonical_uri("/tenant-a/kms/xks/v1/keys/k1/encrypt"),
            "/tenant-a/kms/xks/v1/keys/k1/encrypt"
        );
        // Dot segments and double slashes are hashed as received, not normalised.
        assert_eq!(canonical_uri("/a/./b//c"), "/a/./b//c");
        assert_eq!(canonical_uri("/a b%2Fc"), "/a%20b%252Fc");
    }

    /// Rule: query names/values are URI-encoded and sorted by name then value.
    #[test]
    fn canonical_query_sorts_and_encodes() {
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
        assert_eq!(canonical_query(Some("b=2&a=1")), "a=1&b=2");
        assert_eq!(canonical_query(Some("a=2&a=1")), "a=1&a=2");
        assert_eq!(canonical_query(Some("flag&x=")), "flag=&x=");
        assert_eq!(canonical_query(Some("a=1&&b=2")), "a=1&b=2");
        assert_eq!(canonical_query(Some("k=a%2fb")), "k=a%2Fb");
        assert_eq!(canonical_query(Some("k=a+b")), "k=a%20b");
        assert_eq!(canonical_query(Some("k=%zz%4")), "k=%25zz%254");
        assert_eq!(
            canonical_query(Some("Param-3=Value3&Param=Value2&%E1%88%B4=Value1")),
            "%E1%88%B4=Value1&Param=Value2&Param-3=Value3"
        );
    }

    /// Rule: "Trimall" — trim, collapse internal runs of spaces, nothing else.
    #[test]
    fn header_values_are_trimmed_and_collapsed() {
        let cases: &[(&str, &str)] = &[
            ("value1", "value1"),
            ("  value1  ", "value1"),
            ("\"a   b   c\"", "\"a b c\""),
            ("a \t b", "a \t b"),
            ("", ""),
            ("     ", ""),
            ("x", "x"),
        ];
        for (input, want) in cases {
            let mut out = Vec::new();
            push_trimmed_value(input.as_bytes(), &mut out);
            assert_eq!(out, want.as_bytes(), "input {input:?}");
        }
    }

    /// Rule: host is the Host header if present, else the URI authority (HTTP/2).
    #[test]
    fn host_falls_back_to_authority() {
        let h1 = parts("/", &[("host", "h.example:8443")]);
        let h2 = parts("https://h.example:8443/", &[]);
        let hash = hex_sha256(b"");
        let a = canonical_request(&h1, "host", &hash).expect("h1");
        let b = canonical_request(&h2, "host", &hash).expect("h2");
        assert_eq!(a, b);
        assert_eq!(
            canonical_request(&parts("/", &[]), "host", &hash),
            Err(AuthError::MissingHost)
        );
        assert_eq!(
            canonical_request(&h1, "host;x-missing", &hash),
            Err(AuthError::SignedHeaderMissing)
        );
        // Not a valid header name: looked up, not found, no panic.
        assert_eq!(
            canonical_request(&h1, "host;BAD NAME\n", &hash),
            Err(AuthError::SignedHeaderMissing)
        );
    }
}
