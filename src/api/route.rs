//! URI shapes: the only place that knows what an XKS path looks like.
//!
//! `[/<prefix>]/kms/xks/v1/health` and `[/<prefix>]/kms/xks/v1/keys/<id>/{metadata,
//! encrypt,decrypt}` (spec §"URI Path"). The prefix must be one the config names; the key
//! id is returned raw and validated only *after* authentication, so an unauthenticated
//! caller learns nothing but "no such path" (404) or "wrong method" (405).

/// The four XKS APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    GetHealthStatus,
    GetKeyMetadata,
    Encrypt,
    Decrypt,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::GetHealthStatus,
        Operation::GetKeyMetadata,
        Operation::Encrypt,
        Operation::Decrypt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::GetHealthStatus => "GetHealthStatus",
            Operation::GetKeyMetadata => "GetKeyMetadata",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// A parsed XKS path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// "" or "/a/b" — not yet checked against the configured prefixes.
    pub prefix: &'a str,
    pub operation: Operation,
    /// The raw path segment; `None` for health.
    pub key_id: Option<&'a str>,
}

/// The spec caps the whole request URI at 256 characters.
pub const MAX_URI_LEN: usize = 256;

const BASE: &str = "/kms/xks/v1";
const HEALTH: &str = "/kms/xks/v1/health";

/// Parses a request path. `None` means "not an XKS URI" (404 InvalidUriPathException).
pub fn parse(path: &str) -> Option<Route<'_>> {
    if path.len() > MAX_URI_LEN {
        return None;
    }
    if let Some(prefix) = path.strip_suffix(HEALTH) {
        return Some(Route {
            prefix,
            operation: Operation::GetHealthStatus,
            key_id: None,
        });
    }
    // .../kms/xks/v1/keys/<id>/<op>: peel from the right, since a key id never holds '/'.
    let (rest, op) = path.rsplit_once('/')?;
    let operation = match op {
        "metadata" => Operation::GetKeyMetadata,
        "encrypt" => Operation::Encrypt,
        "decrypt" => Operation::Decrypt,
        _ => return None,
    };
    let (rest, key_id) = rest.rsplit_once('/')?;
    let prefix = rest.strip_suffix("/keys")?.strip_suffix(BASE)?;
    Some(Route {
        prefix,
        operation,
        key_id: Some(key_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_uris_with_and_without_prefix() {
        // Spec: base is https://<server>[/<path-prefix>]/kms/xks/v1
        let r = parse("/kms/xks/v1/health").expect("health");
        assert_eq!(
            (r.prefix, r.operation, r.key_id),
            ("", Operation::GetHealthStatus, None)
        );
        let r = parse("/t/a/kms/xks/v1/keys/k-1.x_y/encrypt").expect("encrypt");
        assert_eq!(
            (r.prefix, r.operation, r.key_id),
            ("/t/a", Operation::Encrypt, Some("k-1.x_y"))
        );
        assert_eq!(
            parse("/p/kms/xks/v1/keys/k/decrypt").map(|r| r.operation),
            Some(Operation::Decrypt)
        );
        assert_eq!(
            parse("/p/kms/xks/v1/keys/k/metadata").map(|r| r.operation),
            Some(Operation::GetKeyMetadata)
        );
    }

    #[test]
    fn other_paths_are_not_xks_uris() {
        // Spec: any other path is 404 InvalidUriPathException.
        for p in [
            "/",
            "/kms/xks/v1",
            "/kms/xks/v1/keys/k",
            "/kms/xks/v1/keys/k/sign",
            "/kms/xks/v2/health",
            "/kms/xks/v1/key/k/encrypt",
            "/kms/xks/v1/health/",
            "/kms/xks/v1/keys/k/encrypt/",
            "kms/xks/v1/keys/k/encrypt/x",
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
    }

    #[test]
    fn uri_longer_than_256_is_rejected() {
        // Spec: the whole URI is at most 256 characters.
        let long = format!("/{}/kms/xks/v1/health", "a".repeat(240));
        assert!(long.len() > MAX_URI_LEN);
        assert_eq!(parse(&long), None);
    }

    #[test]
    fn empty_key_id_is_returned_for_validation() {
        // An empty or odd key id is a ValidationException after authentication, not a 404.
        assert_eq!(
            parse("/kms/xks/v1/keys//encrypt").and_then(|r| r.key_id),
            Some("")
        );
    }
}
