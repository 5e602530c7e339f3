//! The software-only build (no `pkcs11` feature): no PKCS#11 module can be loaded, so
//! no CloudHSM key store can be created; a store left in a data dir by a PKCS#11 build
//! fails to connect with `INTERNAL_ERROR`.

use super::clusters::Cluster;
use super::store::ConnectionErrorCode;
use crate::secret::{SecretBytes, SecretString};

/// Why an operation with a KMS key's material in the token failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFault {
    /// The store holds no logged-in session (always, in this build).
    NoSession,
    /// No secret key labelled with the KMS key's ARN.
    MaterialMissing,
    /// AES-GCM did not authenticate.
    NotAuthentic,
    /// Any other refusal of the token.
    Token(String),
}

/// Why a login attempt failed: the store's `ConnectionErrorCode` and a loggable reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ConnectionErrorCode,
    pub reason: String,
}

/// Holds nothing: there is no PKCS#11 in this build.
#[derive(Debug, Default)]
pub struct Sessions {
    _none: (),
}

impl Sessions {
    pub fn connect(
        &self,
        _store_id: &str,
        _cluster: &Cluster,
        _password: &SecretString,
    ) -> Result<SecretString, Refusal> {
        Err(Refusal {
            code: ConnectionErrorCode::InternalError,
            reason: "this kms-emulator was built without the pkcs11 feature".to_owned(),
        })
    }

    pub fn reopen(
        &self,
        _store_id: &str,
        _cluster: &Cluster,
        _password: &SecretString,
    ) -> Result<(), Refusal> {
        Err(Refusal {
            code: ConnectionErrorCode::InternalError,
            reason: "this kms-emulator was built without the pkcs11 feature".to_owned(),
        })
    }

    pub fn release(&self, _store_id: &str) {}

    pub fn generate_random(&self, _store_id: &str, _n: u32) -> Option<Result<Vec<u8>, String>> {
        None
    }

    pub fn create_key(&self, _store_id: &str, _label: &str) -> Result<(), KeyFault> {
        Err(KeyFault::NoSession)
    }

    pub fn encrypt(
        &self,
        _store_id: &str,
        _label: &str,
        _iv: [u8; 12],
        _data: &[u8],
        _aad: &[u8],
    ) -> Result<Vec<u8>, KeyFault> {
        Err(KeyFault::NoSession)
    }

    pub fn decrypt(
        &self,
        _store_id: &str,
        _label: &str,
        _iv: &[u8],
        _ciphertext_and_tag: &[u8],
        _aad: &[u8],
    ) -> Result<SecretBytes, KeyFault> {
        Err(KeyFault::NoSession)
    }

    pub fn destroy_key(&self, _store_id: &str, _label: &str) -> Result<usize, KeyFault> {
        Err(KeyFault::NoSession)
    }

    pub fn material_missing(&self, _store_id: &str, _label: &str) -> bool {
        false
    }

    pub fn holds(&self, _store_id: &str) -> bool {
        false
    }
}
