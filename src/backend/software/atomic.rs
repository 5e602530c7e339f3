//! Crash-safe file replacement for the keystore: write a temp file in the same
//! directory, fsync it, rename it over the target, fsync the directory. A reader (the
//! proxy's hot reload) therefore sees either the old file or the new one, never half
//! of one, and a crash never loses both.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::crypto::rand::{SecureRandom, SystemRandom};

use super::error::KeystoreError;

/// What to do if the target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Replace it (saving an existing keystore).
    Replace,
    /// Fail with [`KeystoreError::AlreadyExists`] (creating a keystore).
    CreateNew,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KeystoreError {
    let path = path.to_owned();
    move |cause| KeystoreError::Io {
        action,
        path,
        cause,
    }
}

/// Writes `contents` to `path` atomically, with mode 0600 on Unix.
pub(super) fn write(path: &Path, contents: &[u8], mode: Mode) -> Result<(), KeystoreError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        // Said plainly: otherwise the first failure names a hidden temp file.
        return Err(KeystoreError::Io {
            action: "write the keystore into the directory",
            path: dir,
            cause: io::Error::new(io::ErrorKind::NotFound, "it does not exist"),
        });
    }
    let tmp = temp_path(path, &dir)?;
    let result = write_temp(&tmp, contents).and_then(|()| publish(&tmp, path, mode));
    if result.is_err() {
        // Best effort: the temp file is garbage now, and a leftover one would only
        // confuse an operator. The original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `.<name>.tmp-<random>` next to the target: same filesystem (so rename is atomic),
/// hidden, and unguessable so it can't be pre-created by someone else.
fn temp_path(path: &Path, dir: &Path) -> Result<PathBuf, KeystoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keystore".to_owned());
    let mut nonce = [0u8; 8];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KeystoreError::Random)?;
    Ok(dir.join(format!(".{name}.tmp-{}", hex::encode(nonce))))
}

fn write_temp(tmp: &Path, contents: &[u8]) -> Result<(), KeystoreError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Created 0600 from the start, never chmod-ed after: no window where the
        // file is readable by others.
        options.mode(0o600);
    }
    let mut file = options.open(tmp).map_err(io_err("create", tmp))?;
    file.write_all(contents).map_err(io_err("write", tmp))?;
    file.sync_all().map_err(io_err("fsync", tmp))
}

fn publish(tmp: &Path, path: &Path, mode: Mode) -> Result<(), KeystoreError> {
    match mode {
        Mode::Replace => fs::rename(tmp, path).map_err(io_err("rename into place", path)),
        Mode::CreateNew => {
            // A hard link is an atomic "create if absent" for a complete file: no
            // race between checking and renaming, and never a half-written target.
            match fs::hard_link(tmp, path) {
                Ok(()) => fs::remove_file(tmp).map_err(io_err("remove", tmp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(KeystoreError::AlreadyExists {
                        path: path.to_owned(),
                    })
                }
                // Filesystems without hard links: check, then rename (racy only
                // against a concurrent `create` of the same path).
                Err(_) if path.exists() => Err(KeystoreError::AlreadyExists {
                    path: path.to_owned(),
                }),
                Err(_) => fs::rename(tmp, path).map_err(io_err("rename into place", path)),
            }
        }
    }
}

/// Makes the rename itself durable (POSIX only persists a directory entry once the
/// directory is fsynced).
fn sync_dir(dir: &Path) -> Result<(), KeystoreError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
