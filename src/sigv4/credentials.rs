//! The SigV4 credentials a path prefix accepts, and a per-credential cache of derived
//! signing keys.
//!
//! This file owns:
//! - [`Credential`]: one access key id + secret (the secret only ever in a
//!   [`SecretString`]), plus a small cache of derived signing keys;
//! - [`CredentialSet`]: the live credentials of one path prefix. The XKS spec asks a
//!   proxy to accept at least two at once so an operator can rotate (add new on the
//!   proxy, update KMS, remove old) without an outage; a set may hold any number.
//!
//! Config loading and secret-format validation (43–64 chars of `a-zA-Z0-9/+=`) live
//! in the config module, not here: this layer accepts whatever it is given.
//!
//! Why a cache: deriving the signing key is four HMACs, about a third of the cost of a
//! verification, and its inputs (date, region, service) change once a day. Keys are
//! only inserted after a signature verified with them, so an attacker without the
//! secret can neither grow nor churn the cache; it is bounded anyway.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use super::canonical::SigningKey;
use crate::secret::SecretString;

/// How many (date, region, service) signing keys a credential remembers. Four covers
/// today and yesterday (requests around midnight) in two regions.
const KEY_CACHE_CAPACITY: usize = 4;

struct CachedKey {
    date: String,
    region: String,
    service: String,
    key: SigningKey,
}

/// One SigV4 credential: an access key id and its secret.
pub struct Credential {
    access_key_id: String,
    secret: SecretString,
    /// Most recently inserted first. `SigningKey` zeroizes itself when an entry is
    /// evicted or the credential is dropped.
    key_cache: RwLock<VecDeque<CachedKey>>,
}

impl Credential {
    pub fn new(access_key_id: impl Into<String>, secret: SecretString) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret,
            key_cache: RwLock::new(VecDeque::with_capacity(KEY_CACHE_CAPACITY)),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret. Callers must not log it or put it in an error.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// The cached signing key for this scope, if a request verified with it earlier.
    pub(crate) fn cached_signing_key(
        &self,
        date: &str,
        region: &str,
        service: &str,
    ) -> Option<SigningKey> {
        // A poisoned lock only means another thread panicked mid-operation; the cache
        // holds plain values that are never left half-written, so keep using it.
        let cache = self
            .key_cache
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        cache
            .iter()
            .find(|e| e.date == date && e.region == region && e.service == service)
            .map(|e| e.key.clone())
    }

    /// Remembers a signing key. Call only after a signature verified with `key`.
    pub(crate) fn remember_signing_key(
        &self,
        date: &str,
        region: &str,
        service: &str,
        key: SigningKey,
    ) {
        let mut cache = self
            .key_cache
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Another thread may have inserted the same scope since our lookup.
        if cache
            .iter()
            .any(|e| e.date == date && e.region == region && e.service == service)
        {
            return;
        }
        if cache.len() >= KEY_CACHE_CAPACITY {
            cache.pop_back();
        }
        cache.push_front(CachedKey {
            date: date.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            key,
        });
    }

    /// Number of cached signing keys (for tests and diagnostics; never the keys).
    pub(crate) fn cached_key_count(&self) -> usize {
        self.key_cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &self.secret)
            .field("cached_signing_keys", &self.cached_key_count())
            .finish()
    }
}

/// Raised when a credential set would hold two secrets for one access key id: the
/// spec requires an access key id to identify exactly one secret.
#[derive(Debug, thiserror::Error)]
#[error("access key id {0} appears more than once")]
pub struct DuplicateAccessKeyId(pub String);

/// A path prefix's live credentials, looked up by access key id.
///
/// Held as `Arc`s so a configuration reload can build a new set that shares the
/// unchanged credentials (and their warm key caches) with the old one.
#[derive(Debug, Clone, Default)]
pub struct CredentialSet {
    creds: Vec<Arc<Credential>>,
}

impl CredentialSet {
    pub fn new(creds: Vec<Credential>) -> Result<Self, DuplicateAccessKeyId> {
        Self::from_shared(creds.into_iter().map(Arc::new).collect())
    }

    /// Like [`CredentialSet::new`], reusing credentials already shared with another
    /// set (so their signing-key caches carry over a reload).
    pub fn from_shared(creds: Vec<Arc<Credential>>) -> Result<Self, DuplicateAccessKeyId> {
        for (i, c) in creds.iter().enumerate() {
            if creds[..i]
                .iter()
                .any(|d| d.access_key_id == c.access_key_id)
            {
                return Err(DuplicateAccessKeyId(c.access_key_id.clone()));
            }
        }
        Ok(Self { creds })
    }

    /// The credential with this access key id. A linear scan: sets hold a handful.
    /// (Access key ids are not secret, so a plain comparison is fine.)
    pub fn get(&self, access_key_id: &str) -> Option<&Credential> {
        self.creds
            .iter()
            .find(|c| c.access_key_id == access_key_id)
            .map(|c| c.as_ref())
    }

    /// The shared handle of a credential, for building the next set on reload.
    pub fn get_shared(&self, access_key_id: &str) -> Option<&Arc<Credential>> {
        self.creds.iter().find(|c| c.access_key_id == access_key_id)
    }

    /// Whether any credential of the set has a signing key cached for this scope
    /// (the verifier makes an unknown access key id cost the same as a known one).
    pub(crate) fn has_cached_scope(&self, date: &str, region: &str, service: &str) -> bool {
        self.creds
            .iter()
            .any(|c| c.cached_signing_key(date, region, service).is_some())
    }

    pub fn access_key_ids(&self) -> impl Iterator<Item = &str> {
        self.creds.iter().map(|c| c.access_key_id.as_str())
    }

    pub fn len(&self) -> usize {
        self.creds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sigv4::canonical::derive_signing_key;

    const SECRET_43: &str = "0123456789abcdefghijABCDEFGHIJ+/=0123456789";
    const SECRET_64: &str = "0123456789abcdefghijABCDEFGHIJklmnopqrstKLMNOPQRST+/=0123456789a";

    fn cred(id: &str, secret: &str) -> Credential {
        Credential::new(id, SecretString::from(secret))
    }

    #[test]
    fn secrets_are_the_spec_lengths() {
        assert_eq!(SECRET_43.len(), 43);
        assert_eq!(SECRET_64.len(), 64);
    }

    /// Spec: an access key id must identify exactly one secret.
    #[test]
    fn duplicate_access_key_id_is_rejected() {
        let err = CredentialSet::new(vec![
            cred("AKIAAAAAAAAAAAAAAAAA", SECRET_43),
            cred("AKIBBBBBBBBBBBBBBBBB", SECRET_64),
            cred("AKIAAAAAAAAAAAAAAAAA", SECRET_64),
        ])
        .expect_err("duplicate");
        assert_eq!(err.0, "AKIAAAAAAAAAAAAAAAAA");
        assert!(!err.to_string().contains(SECRET_64));
    }

    /// Spec (rotation): at least two credential sets live at once, found by id.
    #[test]
    fn lookup_by_access_key_id() {
        let set = CredentialSet::new(vec![
            cred("AKIAAAAAAAAAAAAAAAAA", SECRET_43),
            cred("AKIBBBBBBBBBBBBBBBBB", SECRET_64),
        ])
        .expect("distinct ids");
        assert_eq!(set.len(), 2);
        assert!(!set.is_empty());
        assert_eq!(
            set.get("AKIBBBBBBBBBBBBBBBBB").map(|c| c.secret().expose()),
            Some(SECRET_64)
        );
        assert!(set.get("AKIA").is_none());
        assert!(set.get("").is_none());
        let ids: Vec<&str> = set.access_key_ids().collect();
        assert_eq!(ids, ["AKIAAAAAAAAAAAAAAAAA", "AKIBBBBBBBBBBBBBBBBB"]);
        assert!(CredentialSet::new(vec![]).expect("empty").is_empty());

        // Sharing across a reload keeps the same credential object.
        let shared = set
            .get_shared("AKIAAAAAAAAAAAAAAAAA")
            .expect("present")
            .clone();
        let next = CredentialSet::from_shared(vec![shared.clone()]).expect("one");
        assert!(Arc::ptr_eq(
            &shared,
            next.get_shared("AKIAAAAAAAAAAAAAAAAA").expect("present")
        ));
    }

    /// Rule: the cache is bounded (4 scopes) and evicts the oldest insertion.
    #[test]
    fn key_cache_is_bounded() {
        let c = cred("AKIAAAAAAAAAAAAAAAAA", SECRET_43);
        let dates = ["20240101", "20240102", "20240103", "20240104", "20240105"];
        for d in dates {
            let key = derive_signing_key(c.secret(), d, "us-east-1", "kms-xks-proxy");
            c.remember_signing_key(d, "us-east-1", "kms-xks-proxy", key.clone());
            // Inserting the same scope again is a no-op.
            c.remember_signing_key(d, "us-east-1", "kms-xks-proxy", key);
        }
        assert_eq!(c.cached_key_count(), KEY_CACHE_CAPACITY);
        assert!(
            c.cached_signing_key("20240101", "us-east-1", "kms-xks-proxy")
                .is_none()
        );
        let hit = c
            .cached_signing_key("20240105", "us-east-1", "kms-xks-proxy")
            .expect("newest cached");
        assert_eq!(
            hit,
            derive_signing_key(c.secret(), "20240105", "us-east-1", "kms-xks-proxy")
        );
        assert!(
            c.cached_signing_key("20240105", "us-west-2", "kms-xks-proxy")
                .is_none()
        );
    }

    /// Rule: a secret never appears in Debug output (logs use `{:?}`).
    #[test]
    fn debug_never_shows_the_secret_or_derived_keys() {
        let c = cred("AKIAAAAAAAAAAAAAAAAA", SECRET_64);
        let key = derive_signing_key(c.secret(), "20240101", "us-east-1", "kms-xks-proxy");
        let key_hex = hex::encode(key.expose());
        c.remember_signing_key("20240101", "us-east-1", "kms-xks-proxy", key.clone());
        let set =
            CredentialSet::new(vec![c, cred("AKIBBBBBBBBBBBBBBBBB", SECRET_43)]).expect("distinct");
        for text in [
            format!("{set:?}"),
            format!("{set:#?}"),
            format!("{key:?}"),
            format!("{:?}", set.get("AKIAAAAAAAAAAAAAAAAA")),
        ] {
            assert!(!text.contains(SECRET_64), "{text}");
            assert!(!text.contains(SECRET_43), "{text}");
            assert!(!text.contains(&key_hex), "{text}");
        }
        assert!(format!("{set:?}").contains("AKIAAAAAAAAAAAAAAAAA"));
    }
}
