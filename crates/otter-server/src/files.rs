//! Small file helpers shared by the modules that write to the data
//! directory: private (0600) files and atomic replacement.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so a reader sees the old content or the new, never a mix.
/// The file is created with mode 0600.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o600)
}

/// Same as [`write_private_atomically`] with an explicit mode.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let temporary = temporary_sibling(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let suffix: u64 = rand::random();
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{suffix:016x}.tmp"));
    path.with_file_name(name)
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read or create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, expected {expected}")]
    WrongLength {
        path: String,
        len: usize,
        expected: usize,
    },
}

/// Reads the `N`-byte secret at `path`, or creates it with `N` random bytes
/// (mode 0600, written atomically). A file of another length is an error,
/// never replaced: whatever it protects would be lost with it.
pub fn load_or_create_secret<const N: usize>(path: &Path) -> Result<[u8; N], SecretFileError> {
    use std::io::Read;
    let io_error = |source| SecretFileError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::File::open(path) {
        Ok(file) => {
            let mut bytes = Vec::with_capacity(N);
            // Read one byte more than needed to detect a longer file.
            file.take(N as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(io_error)?;
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| SecretFileError::WrongLength {
                    path: path.display().to_string(),
                    len: bytes.len(),
                    expected: N,
                })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; N] = std::array::from_fn(|_| rand::random());
            write_private_atomically(path, &secret).map_err(io_error)?;
            Ok(secret)
        }
        Err(error) => Err(io_error(error)),
    }
}

/// Creates a directory (and its parents) with mode 0700 if it is missing.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_private_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_private_atomically(&path, b"one").unwrap();
        write_private_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
