//! Model constraint checks (required members, lengths, patterns, enums, ranges) that
//! turn into one `ValidationException` in AWS's observed wording:
//! `1 validation error detected: Value 'x' at 'member' failed to satisfy constraint: …`.
//!
//! The model's regular expressions are hand-written matchers here (the crate has no
//! regex engine, and these few patterns are simple); each one is pinned by a test.
//! Sensitive members never have their value echoed.

use super::error::KmsError;

/// Collects every violation of one request, so the caller sees them all at once, as
/// AWS reports them.
#[derive(Debug, Default)]
pub struct Violations(Vec<String>);

/// Whether a member's value may be shown in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Yes,
    /// Sensitive member (`Plaintext`, `AccessKeyId`, `RawSecretAccessKey`, passwords).
    Redacted,
}

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, member: &str, value: Option<&str>, shown: Shown, constraint: &str) {
        let head = match (value, shown) {
            (Some(v), Shown::Yes) => format!("Value '{v}' at '{member}'"),
            (None, _) => format!("Value null at '{member}'"),
            (Some(_), Shown::Redacted) => format!("Value at '{member}'"),
        };
        self.0
            .push(format!("{head} failed to satisfy constraint: {constraint}"));
    }

    /// A required member that is absent.
    pub fn required<T>(&mut self, member: &str, value: &Option<T>) {
        if value.is_none() {
            self.push(member, None, Shown::Yes, "Member must not be null");
        }
    }

    /// A free-form violation of a member (for rules the model states in prose).
    pub fn custom(&mut self, member: &str, value: Option<&str>, shown: Shown, constraint: &str) {
        self.push(member, value, shown, constraint);
    }

    /// String length in characters, as Smithy counts it.
    pub fn length(
        &mut self,
        member: &str,
        value: Option<&str>,
        min: usize,
        max: usize,
        shown: Shown,
    ) -> bool {
        let Some(v) = value else { return true };
        let n = v.chars().count();
        if n < min {
            self.push(
                member,
                Some(v),
                shown,
                &format!("Member must have length greater than or equal to {min}"),
            );
            return false;
        }
        if n > max {
            self.push(
                member,
                Some(v),
                shown,
                &format!("Member must have length less than or equal to {max}"),
            );
            return false;
        }
        true
    }

    /// Blob length in bytes (the value itself is never shown).
    pub fn blob_length(&mut self, member: &str, value: Option<&[u8]>, min: usize, max: usize) {
        let Some(v) = value else { return };
        if v.len() < min {
            self.push(
                member,
                Some(""),
                Shown::Redacted,
                &format!("Member must have length greater than or equal to {min}"),
            );
        } else if v.len() > max {
            self.push(
                member,
                Some(""),
                Shown::Redacted,
                &format!("Member must have length less than or equal to {max}"),
            );
        }
    }

    /// A pattern check; `ok` is the result of the matching `is_*` function below.
    pub fn pattern(
        &mut self,
        member: &str,
        value: Option<&str>,
        ok: fn(&str) -> bool,
        pattern: &str,
        shown: Shown,
    ) {
        let Some(v) = value else { return };
        if !ok(v) {
            self.push(
                member,
                Some(v),
                shown,
                &format!("Member must satisfy regular expression pattern: {pattern}"),
            );
        }
    }

    /// Length then pattern, the usual pair; the pattern is only checked when the
    /// length is fine (AWS reports one constraint per member).
    #[allow(clippy::too_many_arguments)]
    pub fn string(
        &mut self,
        member: &str,
        value: Option<&str>,
        min: usize,
        max: usize,
        ok: fn(&str) -> bool,
        pattern: &str,
        shown: Shown,
    ) {
        if self.length(member, value, min, max, shown) {
            self.pattern(member, value, ok, pattern, shown);
        }
    }

    pub fn one_of(&mut self, member: &str, value: Option<&str>, allowed: &[&str]) {
        let Some(v) = value else { return };
        if !allowed.contains(&v) {
            self.push(
                member,
                Some(v),
                Shown::Yes,
                &format!(
                    "Member must satisfy enum value set: [{}]",
                    allowed.join(", ")
                ),
            );
        }
    }

    pub fn range(&mut self, member: &str, value: Option<i64>, min: i64, max: i64) {
        let Some(v) = value else { return };
        let shown = v.to_string();
        if v < min {
            self.push(
                member,
                Some(&shown),
                Shown::Yes,
                &format!("Member must have value greater than or equal to {min}"),
            );
        } else if v > max {
            self.push(
                member,
                Some(&shown),
                Shown::Yes,
                &format!("Member must have value less than or equal to {max}"),
            );
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was violated, else one `ValidationException`.
    pub fn finish(self) -> Result<(), KmsError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(KmsError::validation(format!(
                "1 validation error detected: {}",
                self.0[0]
            ))),
            n => Err(KmsError::validation(format!(
                "{n} validation errors detected: {}",
                self.0.join("; ")
            ))),
        }
    }
}

pub const XKS_ENDPOINT_PATTERN: &str = "^https://[a-zA-Z0-9.-]+$";
pub const XKS_PATH_PATTERN: &str = r"^(/[a-zA-Z0-9\/_-]+/kms/xks/v\d{1,2})$|^(/kms/xks/v\d{1,2})$";
pub const VPC_SERVICE_PATTERN: &str =
    r"^(com|eu)\.amazonaws\.vpce\.([a-z]+-){2,3}\d+\.vpce-svc-[0-9a-z]+$";
pub const ACCESS_KEY_ID_PATTERN: &str = "^[A-Z2-7]+$";
pub const SECRET_PATTERN: &str = r"^[a-zA-Z0-9\/+=]+$";
pub const XKS_KEY_ID_PATTERN: &str = "^[a-zA-Z0-9-_.]+$";
pub const CLUSTER_ID_PATTERN: &str = "cluster-[2-7a-zA-Z]{11,16}";
pub const ACCOUNT_ID_PATTERN: &str = "[0-9]{12}";
pub const MARKER_PATTERN: &str = r"[\u0020-\u00FF]*";
pub const POLICY_PATTERN: &str = r"[\u0009\u000A\u000D\u0020-\u00FF]+";

/// `^https://[a-zA-Z0-9.-]+$`: no port, no path, no user info.
pub fn is_xks_endpoint(s: &str) -> bool {
    s.strip_prefix("https://").is_some_and(|host| {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    })
}

/// `^(/[a-zA-Z0-9\/_-]+/kms/xks/v\d{1,2})$|^(/kms/xks/v\d{1,2})$`
pub fn is_xks_path(s: &str) -> bool {
    // Strip the version digits: `v` followed by one or two digits at the very end.
    let digits = s.bytes().rev().take_while(u8::is_ascii_digit).count();
    if !(1..=2).contains(&digits) {
        return false;
    }
    let Some(stem) = s[..s.len() - digits].strip_suffix("/kms/xks/v") else {
        return false;
    };
    if stem.is_empty() {
        return true;
    }
    // `/[a-zA-Z0-9/_-]+`: a slash then at least one allowed character.
    stem.len() >= 2
        && stem.starts_with('/')
        && stem[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_' || b == b'-')
}

/// `^(com|eu)\.amazonaws\.vpce\.([a-z]+-){2,3}\d+\.vpce-svc-[0-9a-z]+$`
pub fn is_vpc_service_name(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("com.amazonaws.vpce.")
        .or_else(|| s.strip_prefix("eu.amazonaws.vpce."))
    else {
        return false;
    };
    let Some((region, svc)) = rest.split_once(".vpce-svc-") else {
        return false;
    };
    if svc.is_empty()
        || !svc
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return false;
    }
    // `([a-z]+-){2,3}\d+`, e.g. `us-east-1` or `us-gov-west-1`.
    let parts: Vec<&str> = region.split('-').collect();
    let Some((last, words)) = parts.split_last() else {
        return false;
    };
    (2..=3).contains(&words.len())
        && words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
}

pub fn is_access_key_id(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

pub fn is_secret(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'+' || b == b'=')
}

pub fn is_xks_key_id(s: &str) -> bool {
    crate::key_id::in_alphabet(s)
}

pub fn is_cluster_id(s: &str) -> bool {
    s.strip_prefix("cluster-").is_some_and(|r| {
        (11..=16).contains(&r.len())
            && r.bytes()
                .all(|b| b.is_ascii_alphabetic() || (b'2'..=b'7').contains(&b))
    })
}

pub fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

pub fn is_marker(s: &str) -> bool {
    s.chars().all(|c| ('\u{20}'..='\u{ff}').contains(&c))
}

pub fn is_policy(s: &str) -> bool {
    s.chars()
        .all(|c| matches!(c, '\u{09}' | '\u{0a}' | '\u{0d}' | '\u{20}'..='\u{ff}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_pattern_matches_the_model() {
        assert!(is_xks_endpoint("https://xks.test.example"));
        assert!(is_xks_endpoint("https://localhost"));
        assert!(is_xks_endpoint("https://127.0.0.1"));
        assert!(!is_xks_endpoint("https://xks.test.example:8443"));
        assert!(!is_xks_endpoint("https://xks.test.example/path"));
        assert!(!is_xks_endpoint("http://xks.test.example"));
        assert!(!is_xks_endpoint("https://"));
        assert!(!is_xks_endpoint("https://user@host"));
    }

    #[test]
    fn path_pattern_matches_the_model() {
        for ok in [
            "/kms/xks/v1",
            "/kms/xks/v10",
            "/tenant-a/kms/xks/v1",
            "/a/b_c/kms/xks/v1",
            "/example-prefix/kms/xks/v1",
        ] {
            assert!(is_xks_path(ok), "{ok}");
        }
        for bad in [
            "/kms/xks/v",
            "/kms/xks/v123",
            "kms/xks/v1",
            "/tenant/kms/xks/v1/",
            "//kms/xks/v1x",
            "/tenant a/kms/xks/v1",
            "/kms/xks/v1/keys",
            "/tenant.a/kms/xks/v1",
        ] {
            assert!(!is_xks_path(bad), "{bad}");
        }
        // The prefix group is `/` plus at least one character, which may be `/`.
        assert!(!is_xks_path("//kms/xks/v1"));
        assert!(is_xks_path("///kms/xks/v1"));
    }

    #[test]
    fn vpc_service_name_pattern_matches_the_model() {
        assert!(is_vpc_service_name(
            "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"
        ));
        assert!(is_vpc_service_name(
            "com.amazonaws.vpce.us-gov-west-1.vpce-svc-abc"
        ));
        assert!(is_vpc_service_name(
            "eu.amazonaws.vpce.eu-west-1.vpce-svc-1"
        ));
        assert!(!is_vpc_service_name("com.amazonaws.vpce.us1.vpce-svc-1"));
        assert!(!is_vpc_service_name(
            "com.amazonaws.vpce.us-east-1.vpce-svc-ABC"
        ));
        assert!(!is_vpc_service_name(
            "org.amazonaws.vpce.us-east-1.vpce-svc-1"
        ));
        assert!(!is_vpc_service_name(
            "com.amazonaws.vpce.a-b-c-d-1.vpce-svc-1"
        ));
    }

    #[test]
    fn small_patterns() {
        assert!(is_access_key_id("AKIA4GBY3I6JCE5M2HPM"));
        assert!(!is_access_key_id("AKIA4GBY3I6JCE5M2HP1"));
        assert!(is_secret("a/b+c=0"));
        assert!(!is_secret("a-b"));
        assert!(is_xks_key_id("key-1_a.b"));
        assert!(!is_xks_key_id("key/1"));
        assert!(is_cluster_id("cluster-2a23b4cdefg"));
        assert!(!is_cluster_id("cluster-1a23b"));
        assert!(is_account_id("111122223333"));
        assert!(!is_account_id("11112222333"));
        assert!(is_marker("abc"));
        assert!(!is_marker("\u{7}"));
        assert!(is_policy("{\n\t\"a\": 1}"));
    }

    #[test]
    fn messages_follow_the_aws_wording_and_hide_sensitive_values() {
        let mut v = Violations::new();
        v.length(
            "xksProxyAuthenticationCredential.accessKeyId",
            Some("AB"),
            20,
            30,
            Shown::Redacted,
        );
        let err = v.finish().expect_err("violation");
        assert_eq!(
            err.message,
            "1 validation error detected: Value at 'xksProxyAuthenticationCredential.accessKeyId' \
             failed to satisfy constraint: Member must have length greater than or equal to 20"
        );
        let mut v = Violations::new();
        v.length("customKeyStoreName", Some(""), 1, 256, Shown::Yes);
        v.required("customKeyStoreId", &None::<String>);
        let err = v.finish().expect_err("violations");
        assert!(
            err.message
                .starts_with("2 validation errors detected: Value '' at")
        );
        assert!(err.message.contains("; Value null at 'customKeyStoreId'"));
    }
}
