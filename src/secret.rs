//! Secret values (SigV4 secrets, master keys, PINs, plaintext): zeroized on drop,
//! redacted in `Debug`, never `Serialize`d and never `Display`ed.
//!
//! Keeping these as distinct types means the compiler, not reviewer vigilance, stops a
//! secret from reaching a log line or an error message: `tracing` fields and `{:?}`
//! only ever see `"[redacted N bytes]"`.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Bytes that must never be logged: key material, plaintext, decrypted output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a zeroizing buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The secret bytes. Callers must not log or copy them into non-zeroizing storage.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Mutable access, for in-place crypto (AES-GCM seals and opens in place).
    pub fn expose_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {} bytes]", self.0.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

/// A secret string (a SigV4 secret access key, an HSM PIN).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret text. Callers must not log it or put it in an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<&str> for SecretString {
    fn from(s: &str) -> Self {
        Self::new(s.to_owned())
    }
}

impl Zeroize for SecretString {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SecretString::from("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY4242");
        let b = SecretBytes::from_slice(b"attack at dawn");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{b:?}"), "[redacted 14 bytes]");
        assert!(!format!("{:#?}", (s, b)).contains("dawn"));
    }
}
