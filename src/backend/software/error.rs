//! [`KeystoreError`]: everything that can go wrong opening, changing or saving a
//! software keystore, or loading its master key.
//!
//! These errors reach operators (CLI output, startup logs), never the wire: the
//! request path only sees [`BackendError`](crate::backend::BackendError). Messages
//! name paths, environment variable names, key ids and lengths, and never the
//! content of a master key or any key material. That is why the base64 decoder's
//! own error (which quotes the offending byte) is deliberately dropped.

use std::io;
use std::path::PathBuf;

/// Why a keystore (or its master key) could not be opened, changed or saved.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("the master key environment variable {var} is not set")]
    MasterKeyEnvUnset { var: String },

    #[error(
        "the master key in environment variable {var} is not valid: expected standard base64 of exactly 32 bytes"
    )]
    MasterKeyEnvInvalid { var: String },

    // `cause`, not `source`: the message already says it, and an error chain printing
    // the source again would say it twice.
    #[error("cannot read the master key file {}: {cause}", .path.display())]
    MasterKeyFileRead { path: PathBuf, cause: io::Error },

    #[error(
        "the master key file {} is not valid: expected 32 raw bytes, or standard base64 of exactly 32 bytes",
        .path.display()
    )]
    MasterKeyFileInvalid { path: PathBuf },

    #[error("a master key must be exactly 32 bytes, got {len}")]
    MasterKeyLength { len: usize },

    #[error("keystore file {} does not exist (create it first, e.g. with `xks-proxy keys create`)", .path.display())]
    NotFound { path: PathBuf },

    #[error("refusing to overwrite the existing keystore file {}", .path.display())]
    AlreadyExists { path: PathBuf },

    /// An I/O step failed; `action` says which ("read", "write", "rename", ...).
    #[error("cannot {action} {}: {cause}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: io::Error,
    },

    /// The file is not a keystore at all (not JSON, wrong shape, unknown fields).
    #[error("{} is not a valid xks-proxy keystore file: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },

    #[error(
        "{} has keystore format version {found}; this xks-proxy reads version {supported} only",
        .path.display()
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u64,
        supported: u32,
    },

    /// The key check value does not verify: almost always the wrong master key.
    #[error(
        "the master key does not open the keystore {} (wrong master key, or the file's kdf_salt or key_check was modified)",
        .path.display()
    )]
    WrongMasterKey { path: PathBuf },

    /// The master key is right (its key check verifies) but the file's MAC does not:
    /// someone edited ids, flags, usages, versions or sealed material by hand.
    #[error(
        "the keystore {} failed its integrity check: the file was modified outside xks-proxy (the master key is right); restore it from a backup",
        .path.display()
    )]
    Tampered { path: PathBuf },

    /// The MAC verified but the content breaks an invariant or a sealed key does not
    /// open. Only a bug or a forged MAC gets here; the keystore is refused as a whole.
    #[error("the keystore {} is corrupt: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },

    #[error("invalid key id {id:?}: a key id is {}", crate::key_id::RULE)]
    InvalidKeyId { id: String },

    #[error("a key with id {id:?} already exists in the keystore")]
    KeyExists { id: String },

    #[error("no key with id {id:?} in the keystore")]
    NoSuchKey { id: String },

    /// `save` found a file on disk other than the one this handle read or wrote:
    /// another admin command changed it meanwhile, and saving would undo that change.
    #[error(
        "the keystore {} was changed by another command since it was opened; open it again and retry",
        .path.display()
    )]
    ChangedOnDisk { path: PathBuf },

    #[error("key {id:?} has reached the maximum number of versions")]
    TooManyVersions { id: String },

    #[error("the operating system's random number generator failed")]
    Random,

    #[error("AES-GCM sealing failed")]
    Crypto,
}

impl KeystoreError {
    /// Builds [`KeystoreError::InvalidKeyId`] without letting an absurdly long input
    /// flood a log line.
    pub(super) fn invalid_key_id(id: &str) -> Self {
        let id: String = id.chars().take(140).collect();
        KeystoreError::InvalidKeyId { id }
    }
}
