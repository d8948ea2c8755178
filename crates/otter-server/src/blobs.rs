//! Where release artifacts live: a local folder today, S3-compatible object
//! storage in a later issue (a second variant of [`BlobStore`]).
//!
//! Blobs are content-addressed: the key is the artifact's SHA-256, which the
//! signed manifest already states, so a key can never name a path outside
//! the folder and two uploads of the same bytes share one file. Blobs only
//! hold encrypted artifacts, never plaintext.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

/// The name of a blob: 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    /// Accepts a SHA-256 in lower-case hex; `None` for anything else.
    pub fn from_sha256_hex(hex_digest: &str) -> Option<Self> {
        let valid = hex_digest.len() == 64
            && hex_digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| BlobKey(hex_digest.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} does not exist")]
    NotFound(String),
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
}

/// The artifact store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// A store in `root` (created if missing).
    pub fn open_local(root: &Path) -> Result<Self, BlobError> {
        crate::files::create_private_dir(root)?;
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    fn path_of(&self, key: &BlobKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Moves the complete file `source` into the store under `key`. `source`
    /// must be on the same file system (the server's `tmp/` is), so this is a
    /// rename: readers never see a partial blob.
    pub async fn put_file(&self, key: &BlobKey, source: &Path) -> Result<(), BlobError> {
        tokio::fs::rename(source, self.path_of(key)).await?;
        Ok(())
    }

    /// Whether a blob exists.
    pub async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.path_of(key)).await?)
    }

    /// Size of a blob in bytes.
    pub async fn size(&self, key: &BlobKey) -> Result<u64, BlobError> {
        match tokio::fs::metadata(self.path_of(key)).await {
            Ok(metadata) => Ok(metadata.len()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(key.as_str().to_owned()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A reader of `length` bytes of the blob from byte `start`.
    pub async fn open_range(
        &self,
        key: &BlobKey,
        start: u64,
        length: u64,
    ) -> Result<impl AsyncRead + Send + Unpin + 'static, BlobError> {
        let mut file = match tokio::fs::File::open(self.path_of(key)).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(key.as_str().to_owned()));
            }
            Err(error) => return Err(error.into()),
        };
        file.seek(std::io::SeekFrom::Start(start)).await?;
        Ok(file.take(length))
    }

    /// Removes a blob; a missing blob is not an error.
    pub async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path_of(key)).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_digests_only() {
        assert!(BlobKey::from_sha256_hex(&"a1".repeat(32)).is_some());
        for bad in [
            "",
            "../etc/passwd",
            &"A1".repeat(32),
            &"a".repeat(63),
            &"g".repeat(64),
        ] {
            assert!(BlobKey::from_sha256_hex(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn put_then_ranged_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open_local(&dir.path().join("blobs")).unwrap();
        let source = dir.path().join("incoming");
        std::fs::write(&source, b"0123456789").unwrap();
        let key = BlobKey::from_sha256_hex(&"ab".repeat(32)).unwrap();
        assert!(!store.exists(&key).await.unwrap());
        store.put_file(&key, &source).await.unwrap();
        assert!(!source.exists());
        assert_eq!(store.size(&key).await.unwrap(), 10);
        let mut text = String::new();
        store
            .open_range(&key, 3, 4)
            .await
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        assert_eq!(text, "3456");
        store.delete(&key).await.unwrap();
        assert!(matches!(
            store.size(&key).await,
            Err(BlobError::NotFound(_))
        ));
        store.delete(&key).await.unwrap();
    }
}
