//! [`MasterKey`]: the 32-byte key that seals a software keystore, and where it comes
//! from (an environment variable or a file, never the config file itself).

use std::fmt;
use std::path::Path;

use crate::crypto::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::error::KeystoreError;
use crate::secret::{SecretBytes, SecretString};

/// Length of a master key in bytes (AES-256 / HKDF input of 256 bits).
pub const MASTER_KEY_LEN: usize = 32;

/// The keystore master key: exactly 32 bytes, zeroized on drop, redacted in `Debug`.
///
/// It never seals anything directly: HKDF-SHA256 derives separate sealing and MAC
/// subkeys from it (see `keystore.rs`), so one key serves both purposes safely.
#[derive(Clone)]
pub struct MasterKey(SecretBytes);

impl MasterKey {
    /// Reads the key from environment variable `var`: standard base64 of 32 bytes,
    /// surrounding whitespace ignored. Errors name `var`, never its value.
    pub fn from_env(var: &str) -> Result<Self, KeystoreError> {
        // Names no environment can hold are "unset", never handed to the OS (std
        // documents that it may panic on them).
        let nameable = !var.is_empty() && !var.contains(['=', '\0']);
        let Some(value) = nameable.then(|| std::env::var_os(var)).flatten() else {
            return Err(KeystoreError::MasterKeyEnvUnset {
                var: var.to_owned(),
            });
        };
        let invalid = || KeystoreError::MasterKeyEnvInvalid {
            var: var.to_owned(),
        };
        // into_string hands back the same buffer, so wrapping it keeps it wiped.
        let value = Zeroizing::new(value.into_string().map_err(|_| invalid())?);
        decode_base64(value.as_bytes()).ok_or_else(invalid)
    }

    /// Reads the key from a file holding either exactly 32 raw bytes, or standard
    /// base64 of 32 bytes (surrounding whitespace ignored). Errors name the path,
    /// never the content. Warns (does not fail) if the file is readable by others.
    pub fn from_file(path: &Path) -> Result<Self, KeystoreError> {
        let content = Zeroizing::new(std::fs::read(path).map_err(|cause| {
            KeystoreError::MasterKeyFileRead {
                path: path.to_owned(),
                cause,
            }
        })?);
        warn_if_shared(path);
        if content.len() == MASTER_KEY_LEN {
            // Base64 of 32 bytes is at least 44 characters, so a 32-byte file can
            // only be raw key bytes.
            return Self::from_bytes(&content);
        }
        decode_base64(&content).ok_or_else(|| KeystoreError::MasterKeyFileInvalid {
            path: path.to_owned(),
        })
    }

    /// Takes exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeystoreError> {
        if bytes.len() != MASTER_KEY_LEN {
            return Err(KeystoreError::MasterKeyLength { len: bytes.len() });
        }
        Ok(Self(SecretBytes::from_slice(bytes)))
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn try_generate() -> Result<Self, KeystoreError> {
        let mut bytes = SecretBytes::new(vec![0u8; MASTER_KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.expose_mut())
            .map_err(|_| KeystoreError::Random)?;
        Ok(Self(bytes))
    }

    /// A fresh random key from the operating system's CSPRNG.
    ///
    /// # Panics
    /// If the OS random number generator fails (`getrandom` erroring), where no
    /// safe key can be made at all. Use [`MasterKey::try_generate`] to handle it.
    pub fn generate() -> Self {
        match Self::try_generate() {
            Ok(key) => key,
            Err(e) => panic!("cannot generate a master key: {e}"),
        }
    }

    /// Standard base64, the form `from_env` and `from_file` read back.
    pub fn to_base64(&self) -> SecretString {
        SecretString::new(STANDARD.encode(self.0.expose()))
    }

    /// The raw key, for HKDF in this module only.
    pub(super) fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MasterKey").field(&self.0).finish()
    }
}

/// Trims ASCII whitespace and decodes standard base64 into exactly 32 bytes. The
/// decoder's error is dropped on purpose: it quotes the offending input byte.
fn decode_base64(text: &[u8]) -> Option<MasterKey> {
    let text = text.trim_ascii();
    let decoded = Zeroizing::new(STANDARD.decode(text).ok()?);
    MasterKey::from_bytes(&decoded).ok()
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "the master key file is readable or writable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_with_whitespace() {
        let key = MasterKey::generate();
        let text = format!("  {}\n", key.to_base64().expose());
        let back = decode_base64(text.as_bytes()).expect("decodes");
        assert_eq!(back.expose(), key.expose());
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(matches!(
            MasterKey::from_bytes(&[0; 31]),
            Err(KeystoreError::MasterKeyLength { len: 31 })
        ));
        // Base64 of 16 bytes: valid base64, wrong length.
        assert!(decode_base64(STANDARD.encode([1u8; 16]).as_bytes()).is_none());
        assert!(decode_base64(b"not base64 at all!").is_none());
    }

    #[test]
    fn impossible_env_var_names_are_unset_not_a_panic() {
        for var in ["", "A=B", "A\0B"] {
            assert!(matches!(
                MasterKey::from_env(var),
                Err(KeystoreError::MasterKeyEnvUnset { .. })
            ));
        }
    }

    #[test]
    fn debug_is_redacted() {
        let key = MasterKey::from_bytes(&[0xAB; 32]).expect("32 bytes");
        let dbg = format!("{key:?}");
        assert_eq!(dbg, "MasterKey([redacted 32 bytes])");
        assert!(!dbg.contains(key.to_base64().expose()));
    }
}
