//! Key administration on a backend, offline: what `xks-proxy keys` does (create, list,
//! enable, disable, rotate, the health-check key), as functions the tests call. The
//! binary parses arguments and prints; the rules live here: a software keystore is
//! changed in its file (a running proxy picks it up on reload), a PKCS#11 key is made
//! on the token, and what PKCS#11 cannot do in place (rotate, enable or disable on the
//! token) is refused with the way to do it instead.

use crate::backend::software::{Keystore, KeystoreError};
use crate::backend::{KeyUsage, master_key_from};
use crate::config::BackendConfig;

/// Why a key command failed. Messages name keys and files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[cfg(feature = "pkcs11")]
    #[error(transparent)]
    Pkcs11(#[from] crate::backend::pkcs11::Pkcs11Error),
    /// The command has no meaning on this kind of backend; the text says what to do.
    #[error("{0}")]
    NotOnThisBackend(String),
}

/// One key as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    /// `AES_256`, or the token's key type.
    pub spec: String,
    pub usages: Vec<KeyUsage>,
    /// `ENABLED`, `DISABLED`, ...
    pub status: String,
    /// The software keystore's current version (PKCS#11 keys have one).
    pub version: Option<u32>,
}

/// What [`create`] did besides making the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    /// The software keystore file did not exist and was created.
    pub new_keystore: bool,
    /// Tokens the deep health check's key was made on (PKCS#11: with the first key).
    pub health_check_keys: usize,
}

/// The software keystore named by `backend`, created (empty) if its file is missing.
/// The flag says whether it was created.
fn keystore(backend: &BackendConfig) -> Result<(Keystore, bool), KeyAdminError> {
    match backend {
        BackendConfig::Software {
            keystore,
            master_key,
            ..
        } => {
            let master = master_key_from(master_key)?;
            if keystore.exists() {
                Ok((Keystore::open(keystore, &master)?, false))
            } else {
                Ok((Keystore::create(keystore, &master)?, true))
            }
        }
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(_) => Err(KeyAdminError::NotOnThisBackend(
            "this command is for the software keystore".into(),
        )),
    }
}

/// Makes key `id` with `usages`. On PKCS#11 the deep health check's own key is made
/// with it on every token that lacks it, so an operator never has to know about it.
pub fn create(
    backend: &BackendConfig,
    id: &str,
    usages: &[KeyUsage],
) -> Result<Created, KeyAdminError> {
    match backend {
        BackendConfig::Software { .. } => {
            let (mut ks, new_keystore) = keystore(backend)?;
            ks.create_key(id, usages)?;
            ks.save()?;
            Ok(Created {
                new_keystore,
                health_check_keys: 0,
            })
        }
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => {
            let hsm = crate::backend::pkcs11::Pkcs11Backend::open(settings)?;
            hsm.create_key(id, usages)?;
            Ok(Created {
                new_keystore: false,
                health_check_keys: hsm.create_health_check_key()?,
            })
        }
    }
}

/// Makes the health-check key on every PKCS#11 token that lacks it; the number made.
pub fn create_health_check_key(backend: &BackendConfig) -> Result<usize, KeyAdminError> {
    match backend {
        BackendConfig::Software { .. } => Err(KeyAdminError::NotOnThisBackend(
            "the software keystore needs no health-check key (its deep check needs none)".into(),
        )),
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => {
            let hsm = crate::backend::pkcs11::Pkcs11Backend::open(settings)?;
            Ok(hsm.create_health_check_key()?)
        }
    }
}

/// Every key of the backend (a missing software keystore is created empty).
pub fn list(backend: &BackendConfig) -> Result<Vec<Listed>, KeyAdminError> {
    match backend {
        BackendConfig::Software { .. } => Ok(keystore(backend)?
            .0
            .list()
            .into_iter()
            .map(|k| Listed {
                id: k.id,
                spec: "AES_256".into(),
                usages: k.usages,
                status: if k.enabled { "ENABLED" } else { "DISABLED" }.into(),
                version: Some(k.current_version),
            })
            .collect()),
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(settings) => {
            let hsm = crate::backend::pkcs11::Pkcs11Backend::open(settings)?;
            Ok(hsm
                .list_keys()?
                .into_iter()
                .map(|k| Listed {
                    id: k.id,
                    spec: k.spec.name(),
                    usages: k.usages,
                    status: k.status.as_str().into(),
                    version: None,
                })
                .collect())
        }
    }
}

/// Enables or disables key `id` in the software keystore. A PKCS#11 key is enabled or
/// disabled in the config (`disabled_keys`), not on the token: refused, saying so.
pub fn set_enabled(backend: &BackendConfig, id: &str, enabled: bool) -> Result<(), KeyAdminError> {
    match backend {
        BackendConfig::Software { .. } => {
            let (mut ks, _) = keystore(backend)?;
            ks.set_enabled(id, enabled)?;
            Ok(ks.save()?)
        }
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(_) if enabled => Err(KeyAdminError::NotOnThisBackend(format!(
            "a PKCS#11 key is enabled in the config, not on the token: remove {id:?} from backend.disabled_keys, then reload (`systemctl reload xks-proxy` or SIGHUP); a key past its CKA_END_DATE needs that date changed on the token"
        ))),
        #[cfg(feature = "pkcs11")]
        BackendConfig::Pkcs11(_) => Err(KeyAdminError::NotOnThisBackend(format!(
            "a PKCS#11 key is disabled in the config, not on the token: add {id:?} to backend.disabled_keys, then reload (`systemctl reload xks-proxy` or SIGHUP)"
        ))),
    }
}

/// Gives software key `id` a new version for new encryptions (the old ones keep
/// decrypting); the new version. PKCS#11 keys have one version: refused, saying how to
/// move to a new key instead.
pub fn rotate(backend: &BackendConfig, id: &str) -> Result<u32, KeyAdminError> {
    #[cfg(feature = "pkcs11")]
    if let BackendConfig::Pkcs11(_) = backend {
        return Err(KeyAdminError::NotOnThisBackend(format!(
            "PKCS#11 keys have one version, so they do not rotate in place: create a new key (`xks-proxy keys create --config FILE NEW-LABEL`), create a new KMS key in the external key store for it, and move your application to that KMS key; {id} keeps decrypting what it encrypted until you list it in backend.disabled_keys"
        )));
    }
    let (mut ks, _) = keystore(backend)?;
    let version = ks.rotate(id)?;
    ks.save()?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSource;

    fn software(dir: &std::path::Path) -> BackendConfig {
        let master = crate::backend::software::MasterKey::generate();
        std::fs::write(dir.join("master.key"), master.to_base64().expose()).expect("write");
        BackendConfig::Software {
            keystore: dir.join("ks.json"),
            master_key: SecretSource::File(dir.join("master.key")),
            simulated_latency: std::time::Duration::ZERO,
        }
    }

    /// The software keystore's key lifecycle as `xks-proxy keys` runs it: the first
    /// create makes the keystore file; disable, enable and rotate persist in it.
    #[test]
    fn a_software_key_is_created_disabled_enabled_and_rotated_in_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = software(dir.path());
        let made = create(&b, "k1", &[KeyUsage::Encrypt, KeyUsage::Decrypt]).expect("create");
        assert!(made.new_keystore);
        assert!(
            !create(&b, "k2", &[KeyUsage::Encrypt])
                .expect("create")
                .new_keystore
        );
        set_enabled(&b, "k1", false).expect("disable");
        let status = |id: &str| {
            list(&b)
                .expect("list")
                .into_iter()
                .find(|k| k.id == id)
                .expect("listed")
        };
        assert_eq!(status("k1").status, "DISABLED");
        set_enabled(&b, "k1", true).expect("enable");
        assert_eq!(status("k1").status, "ENABLED");
        assert_eq!(
            rotate(&b, "k1").expect("rotate"),
            status("k1").version.expect("v")
        );
        assert_eq!(status("k1").version, Some(2));
        assert!(matches!(
            create_health_check_key(&b),
            Err(KeyAdminError::NotOnThisBackend(_))
        ));
        assert!(set_enabled(&b, "missing", false).is_err());
    }
}
