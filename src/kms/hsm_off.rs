//! The software-only build (no `pkcs11` feature): no PKCS#11 module can be loaded, so
//! no CloudHSM key store can be created; a store left in a data dir by a PKCS#11 build
//! fails to connect with `INTERNAL_ERROR`.

use super::clusters::Cluster;
use super::store::ConnectionErrorCode;
use crate::secret::SecretString;

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

    pub fn holds(&self, _store_id: &str) -> bool {
        false
    }
}
