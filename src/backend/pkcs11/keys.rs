//! Keys on a token: what we read from their attributes ([`KeyInfo`]: spec, usages,
//! end date), how a key id becomes a search template, choosing among search results,
//! and the templates the admin calls use to create keys.
//!
//! Truthfulness rules (KMS relies on them): the spec is `Aes{bits}` only for
//! `CKK_AES` keys, with the size from `CKA_VALUE_LEN`; anything else is
//! `Other("<CKK name>")`, so a generic secret or an RSA key is never mistaken for
//! AES-256. Usages come from the `CKA_*` flags, which we check ourselves before any
//! crypto (some HSMs do not enforce them, and their error codes differ).

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use time::{Date, Month};

use super::settings::KeyIdAttribute;
use crate::backend::{KeySpec, KeyUsage};

/// The attributes read for every key, in one C_GetAttributeValue round.
pub(crate) const INFO_ATTRIBUTES: [AttributeType; 11] = [
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Derive,
    AttributeType::EndDate,
];

/// Reads a key's [`KeyInfo`] in one C_GetAttributeValue round.
///
/// SoftHSM 2.6 cannot read back `CKA_START_DATE`/`CKA_END_DATE` of a private object
/// (it stores them in clear and tries to decrypt them: CKR_GENERAL_ERROR; SoftHSMv2
/// issues #655/#804). So on CKR_GENERAL_ERROR the attributes are read again without the
/// date, and the date counts as unreadable, which disables the key (fail closed). A
/// second failure is returned as is (the token may be gone; the caller checks).
pub(crate) fn read_key_info(session: &Session, handle: ObjectHandle) -> Result<KeyInfo, CkError> {
    match session.get_attributes(handle, &INFO_ATTRIBUTES) {
        Ok(attrs) => Ok(KeyInfo::from_attributes(&attrs)),
        Err(first @ CkError::Pkcs11(RvError::GeneralError, _)) => {
            let without_date: Vec<AttributeType> = INFO_ATTRIBUTES
                .iter()
                .copied()
                .filter(|t| *t != AttributeType::EndDate)
                .collect();
            match session.get_attributes(handle, &without_date) {
                Ok(attrs) => {
                    let mut info = KeyInfo::from_attributes(&attrs);
                    info.end_date = EndDate::Unreadable;
                    Ok(info)
                }
                Err(_) => Err(first),
            }
        }
        Err(e) => Err(e),
    }
}

/// `CKA_END_DATE` as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndDate {
    /// Absent or empty: no end.
    None,
    /// The last day the key may be used (UTC).
    On(Date),
    /// Present but not a date. Treated as expired: fail closed.
    Unreadable,
}

/// What the backend knows about one key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyInfo {
    pub class: Option<ObjectClass>,
    pub key_type: Option<KeyType>,
    /// `CKA_VALUE_LEN` in bytes.
    pub value_len: Option<usize>,
    pub usages: Vec<KeyUsage>,
    pub end_date: EndDate,
}

impl KeyInfo {
    pub(crate) fn from_attributes(attrs: &[Attribute]) -> Self {
        let mut info = KeyInfo {
            class: None,
            key_type: None,
            value_len: None,
            usages: Vec::new(),
            end_date: EndDate::None,
        };
        for a in attrs {
            match a {
                Attribute::Class(c) => info.class = Some(*c),
                Attribute::KeyType(t) => info.key_type = Some(*t),
                Attribute::ValueLen(l) => info.value_len = Some(usize::from(*l)),
                Attribute::Encrypt(true) => info.usages.push(KeyUsage::Encrypt),
                Attribute::Decrypt(true) => info.usages.push(KeyUsage::Decrypt),
                Attribute::Wrap(true) => info.usages.push(KeyUsage::Wrap),
                Attribute::Unwrap(true) => info.usages.push(KeyUsage::Unwrap),
                Attribute::Sign(true) => info.usages.push(KeyUsage::Sign),
                Attribute::Verify(true) => info.usages.push(KeyUsage::Verify),
                Attribute::Derive(true) => info.usages.push(KeyUsage::Derive),
                Attribute::EndDate(d) => {
                    info.end_date = parse_ck_date(&d.year, &d.month, &d.day);
                }
                _ => {}
            }
        }
        info.usages.sort();
        info.usages.dedup();
        info
    }

    /// The spec as GetKeyMetadata reports it. Never `Aes` for a non-AES key.
    pub(crate) fn spec(&self) -> KeySpec {
        match (self.key_type, self.value_len) {
            (Some(t), Some(len)) if t == KeyType::AES => KeySpec::Aes {
                bits: u32::try_from(len.saturating_mul(8)).unwrap_or(u32::MAX),
            },
            (Some(t), None) if t == KeyType::AES => KeySpec::Other("AES".into()),
            (Some(t), _) => {
                let name = t.to_string();
                KeySpec::Other(name.strip_prefix("CKK_").unwrap_or(&name).to_owned())
            }
            (None, _) => match self.class {
                Some(c) => {
                    let name = c.to_string();
                    KeySpec::Other(name.strip_prefix("CKO_").unwrap_or(&name).to_owned())
                }
                None => KeySpec::Other("UNKNOWN".into()),
            },
        }
    }

    /// Only AES-256 secret keys do KMS's crypto: anything else is refused before the
    /// HSM is asked (a weaker key under a known label must not quietly serve).
    pub(crate) fn is_aes256(&self) -> bool {
        self.class == Some(ObjectClass::SECRET_KEY) && self.spec() == (KeySpec::Aes { bits: 256 })
    }

    pub(crate) fn allows(&self, usage: KeyUsage) -> bool {
        self.usages.contains(&usage)
    }

    /// Whether `CKA_END_DATE` has passed on `today` (UTC): the end date is the last
    /// valid day.
    pub(crate) fn expired(&self, today: Date) -> bool {
        match self.end_date {
            EndDate::None => false,
            EndDate::On(last) => today > last,
            EndDate::Unreadable => true,
        }
    }
}

/// Parses a `CK_DATE` (ASCII `YYYY`, `MM`, `DD`). All zeros or spaces means "no date"
/// (what SoftHSM returns for an unset `CKA_END_DATE`).
pub(crate) fn parse_ck_date(year: &[u8], month: &[u8], day: &[u8]) -> EndDate {
    let all = year.iter().chain(month).chain(day);
    if all.clone().all(|b| *b == 0 || *b == b' ') {
        return EndDate::None;
    }
    fn num(digits: &[u8]) -> Option<u32> {
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
    let parsed = (|| {
        let y = i32::try_from(num(year)?).ok()?;
        let m = Month::try_from(u8::try_from(num(month)?).ok()?).ok()?;
        let d = u8::try_from(num(day)?).ok()?;
        Date::from_calendar_date(y, m, d).ok()
    })();
    match parsed {
        Some(d) => EndDate::On(d),
        None => EndDate::Unreadable,
    }
}

/// The search template naming `key_id`.
pub(crate) fn id_template(attr: KeyIdAttribute, key_id: &str) -> Vec<Attribute> {
    match attr {
        KeyIdAttribute::Label => vec![Attribute::Label(key_id.as_bytes().to_vec())],
        KeyIdAttribute::Id => vec![Attribute::Id(key_id.as_bytes().to_vec())],
    }
}

/// Which attribute carries the key id, for listing.
pub(crate) fn id_attribute_type(attr: KeyIdAttribute) -> AttributeType {
    match attr {
        KeyIdAttribute::Label => AttributeType::Label,
        KeyIdAttribute::Id => AttributeType::Id,
    }
}

/// Chooses the object a key id means among search results.
///
/// Exactly one secret key wins. Several secret keys under one id is ambiguous and
/// refused (picking one could encrypt under a different key than the next request).
/// No secret key but other objects (an RSA pair under the label) → the private key,
/// else the first, so metadata can report its real spec; crypto refuses it anyway.
pub(crate) fn choose(found: &[KeyInfo]) -> Result<Option<usize>, usize> {
    let secret: Vec<usize> = found
        .iter()
        .enumerate()
        .filter(|(_, i)| i.class == Some(ObjectClass::SECRET_KEY))
        .map(|(n, _)| n)
        .collect();
    match secret.len() {
        1 => Ok(Some(secret[0])),
        0 if found.is_empty() => Ok(None),
        0 => Ok(Some(
            found
                .iter()
                .position(|i| i.class == Some(ObjectClass::PRIVATE_KEY))
                .unwrap_or(0),
        )),
        n => Err(n),
    }
}

/// The template of a new AES-256 key: token object, private, sensitive,
/// non-extractable, CKA_LABEL = CKA_ID = the key id, usage flags exactly as asked.
pub fn aes256_template(key_id: &str, usages: &[KeyUsage]) -> Vec<Attribute> {
    let has = |u: KeyUsage| usages.contains(&u);
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(key_id.as_bytes().to_vec()),
        Attribute::Id(key_id.as_bytes().to_vec()),
        Attribute::Encrypt(has(KeyUsage::Encrypt)),
        Attribute::Decrypt(has(KeyUsage::Decrypt)),
        Attribute::Wrap(has(KeyUsage::Wrap)),
        Attribute::Unwrap(has(KeyUsage::Unwrap)),
        Attribute::Sign(has(KeyUsage::Sign)),
        Attribute::Verify(has(KeyUsage::Verify)),
        Attribute::Derive(has(KeyUsage::Derive)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::types::Date as CkDate;

    fn info(attrs: Vec<Attribute>) -> KeyInfo {
        KeyInfo::from_attributes(&attrs)
    }

    #[test]
    fn spec_is_truthful() {
        let aes = |len: usize| {
            info(vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(len.try_into().expect("fits")),
            ])
        };
        assert_eq!(aes(32).spec(), KeySpec::Aes { bits: 256 });
        assert!(aes(32).is_aes256());
        assert_eq!(aes(16).spec(), KeySpec::Aes { bits: 128 });
        assert!(!aes(16).is_aes256());
        let generic = info(vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
        ]);
        assert_eq!(generic.spec(), KeySpec::Other("GENERIC_SECRET".into()));
        assert!(!generic.is_aes256());
        let rsa = info(vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
        ]);
        assert_eq!(rsa.spec(), KeySpec::Other("RSA".into()));
        let cert = info(vec![Attribute::Class(ObjectClass::CERTIFICATE)]);
        assert_eq!(cert.spec(), KeySpec::Other("CERTIFICATE".into()));
    }

    #[test]
    fn usages_come_from_the_flags() {
        let i = info(vec![
            Attribute::Decrypt(true),
            Attribute::Encrypt(true),
            Attribute::Wrap(false),
            Attribute::Derive(true),
        ]);
        assert_eq!(
            i.usages,
            vec![KeyUsage::Encrypt, KeyUsage::Decrypt, KeyUsage::Derive]
        );
        assert!(i.allows(KeyUsage::Encrypt) && !i.allows(KeyUsage::Wrap));
    }

    #[test]
    fn end_dates() {
        let day = |y, m, d| Date::from_calendar_date(y, m, d).expect("date");
        let with = |y: &str, m: &str, d: &str| {
            info(vec![Attribute::EndDate(
                CkDate::new_from_str_slice(y, m, d).expect("ck date"),
            )])
        };
        let past = with("2000", "01", "31");
        assert_eq!(past.end_date, EndDate::On(day(2000, Month::January, 31)));
        assert!(past.expired(day(2000, Month::February, 1)));
        assert!(!past.expired(day(2000, Month::January, 31)));
        let unset = info(vec![Attribute::EndDate(CkDate::new_empty())]);
        assert_eq!(unset.end_date, EndDate::None);
        assert!(!unset.expired(day(2100, Month::January, 1)));
        assert_eq!(with("20x0", "01", "01").end_date, EndDate::Unreadable);
        assert_eq!(with("2000", "13", "01").end_date, EndDate::Unreadable);
        assert!(with("2000", "13", "01").expired(day(1990, Month::January, 1)));
        assert_eq!(parse_ck_date(b"    ", b"  ", b"  "), EndDate::None);
    }

    #[test]
    fn choosing_among_matches() {
        let secret = info(vec![Attribute::Class(ObjectClass::SECRET_KEY)]);
        let public = info(vec![Attribute::Class(ObjectClass::PUBLIC_KEY)]);
        let private = info(vec![Attribute::Class(ObjectClass::PRIVATE_KEY)]);
        assert_eq!(choose(&[]), Ok(None));
        assert_eq!(choose(&[public.clone(), secret.clone()]), Ok(Some(1)));
        assert_eq!(choose(&[public.clone(), private]), Ok(Some(1)));
        assert_eq!(choose(&[public]), Ok(Some(0)));
        assert_eq!(choose(&[secret.clone(), secret]), Err(2));
    }

    #[test]
    fn new_key_template_is_locked_down() {
        let t = aes256_template("k1", &[KeyUsage::Encrypt, KeyUsage::Decrypt]);
        for must in [
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Private(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Label(b"k1".to_vec()),
            Attribute::Id(b"k1".to_vec()),
        ] {
            assert!(t.contains(&must), "{must:?}");
        }
    }
}
