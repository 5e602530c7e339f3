//! The XKS spec's external key id rule — 1 to 128 characters of `A-Z a-z 0-9 . _ -` — in
//! one place. The config (`allowed_keys`, `shared_keys`), both backends (key creation,
//! PKCS#11 labels, `disabled_keys`, the health-check key), the API (a malformed id is a
//! 400 ValidationException, not a 404) and the KMS emulator (`XksKeyId`) all ask here.
//!
//! A leaf module like [`crate::secret`]: it depends on nothing, so every layer may use
//! it without changing the dependency directions in `src/lib.rs`.

/// The longest external key id the spec allows.
pub const MAX_LEN: usize = 128;

/// The rule in words, for error messages.
pub const RULE: &str = "1 to 128 characters of A-Z a-z 0-9 . _ -";

/// Whether every byte of `id` is in the spec's alphabet (length not checked: the KMS
/// emulator reports length and pattern as separate violations, as KMS does).
pub fn in_alphabet(id: &str) -> bool {
    id.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why `id` is not a valid external key id, if it is not.
pub fn check(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_LEN {
        return Err("must be 1 to 128 characters");
    }
    if !in_alphabet(id) {
        return Err("may contain only A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

/// Whether `id` is a valid external key id.
pub fn is_valid(id: &str) -> bool {
    check(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// XKS API spec, "externalKeyId": 1–128 characters of `[A-Za-z0-9._-]`.
    #[test]
    fn key_ids_follow_the_spec() {
        assert!(is_valid("a"));
        assert!(is_valid("Key_1.prod-2"));
        assert!(is_valid("abc-DEF_1.2"));
        assert!(is_valid(&"x".repeat(128)));
        assert_eq!(check(""), Err("must be 1 to 128 characters"));
        assert_eq!(check(&"x".repeat(129)), Err("must be 1 to 128 characters"));
        assert_eq!(check("a/b"), Err("may contain only A-Z a-z 0-9 . _ -"));
        assert!(!is_valid("a b"));
        assert!(!is_valid("clé"));
        assert!(!in_alphabet("a:b"));
        assert!(in_alphabet(""));
    }
}
