//! Step 6 end to end: download the artifact into the landing zone, check it,
//! decrypt and decompress it into the payload.
//!
//! Order matters: the artifact's size and SHA-256 are checked against the
//! signed manifest before a single byte is decrypted, and a mismatching file
//! is deleted, so a tampered download is never unpacked nor installed. The
//! unpack streams `artifact.part` → `payload.tmp` (bounded memory, checks the
//! plaintext size and hash) and renames `payload.tmp` → `payload` only when
//! it is complete.
//!
//! [`fetch`] downloads and then calls [`verify_and_unpack`], which push mode
//! (`crate::push`) also calls once the server has sent every byte of
//! `artifact.part`: one check-and-unpack path for every mode.

use std::io::{BufReader, BufWriter, Read};

use otter_package::DataKey;
use otter_proto::manifest::Manifest;
use tokio_util::sync::CancellationToken;

use crate::download::{DownloadError, Downloader};
use crate::landing_zone::DeploymentFiles;
use crate::state::sync_dir;

/// Why the payload did not land.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The downloaded (or pushed) artifact is not the one the manifest signs.
    #[error("hash mismatch: the received artifact does not match the signed manifest")]
    HashMismatch,
    #[error("cannot unpack the artifact: {0}")]
    Unpack(otter_package::PackageError),
    #[error("landing zone: {0}")]
    Local(std::io::Error),
    #[error("fetch cancelled")]
    Cancelled,
}

impl FetchError {
    /// Whether the job should simply be resumed later (shutdown, replaced).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            FetchError::Cancelled | FetchError::Download(DownloadError::Cancelled)
        )
    }

    /// Whether the fetch failed for want of a resource that comes back by
    /// itself (file descriptors, memory): worth trying again later rather
    /// than failing the update.
    pub fn is_transient(&self) -> bool {
        let io = match self {
            FetchError::Local(error) => error,
            FetchError::Unpack(otter_package::PackageError::Io(error)) => error,
            FetchError::Download(DownloadError::Local { source, .. }) => source,
            _ => return false,
        };
        crate::backoff::is_transient_io(io)
    }
}

/// Downloads, verifies and unpacks one artifact into `files.payload`.
pub async fn fetch(
    downloader: &Downloader,
    link: &(dyn Fn() -> String + Send + Sync),
    files: &DeploymentFiles,
    manifest: &Manifest,
    data_key: &DataKey,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    downloader
        .download(link, &files.artifact_part, manifest.artifact.size, cancel)
        .await?;
    verify_and_unpack(files, manifest, data_key, cancel).await
}

/// Checks a complete `artifact.part` against the signed manifest (size and
/// SHA-256; a mismatching file is deleted) and unpacks it into
/// `files.payload`.
pub async fn verify_and_unpack(
    files: &DeploymentFiles,
    manifest: &Manifest,
    data_key: &DataKey,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    let artifact_part = files.artifact_part.clone();
    let digest =
        tokio::task::spawn_blocking(move || otter_package::pipeline::hash_file(&artifact_part))
            .await
            .map_err(|e| FetchError::Local(std::io::Error::other(e)))?
            .map_err(FetchError::Unpack)?;
    if digest != manifest.artifact {
        tracing::warn!(
            expected = ?manifest.artifact,
            actual = ?digest,
            "received artifact does not match the manifest; deleting it"
        );
        remove_if_present(&files.artifact_part).map_err(FetchError::Local)?;
        return Err(FetchError::HashMismatch);
    }

    let files = files.clone();
    let manifest = manifest.clone();
    let data_key = data_key.clone();
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || unpack_blocking(&files, &manifest, &data_key, &cancel))
        .await
        .map_err(|e| FetchError::Local(std::io::Error::other(e)))?
}

fn unpack_blocking(
    files: &DeploymentFiles,
    manifest: &Manifest,
    data_key: &DataKey,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    let artifact = std::fs::File::open(&files.artifact_part).map_err(FetchError::Local)?;
    let mut reader = CancellableReader {
        inner: BufReader::new(artifact),
        cancel,
    };
    let output = std::fs::File::create(&files.payload_tmp).map_err(FetchError::Local)?;
    let mut writer = BufWriter::new(output);
    let unpacked = otter_package::pipeline::unpack(&mut reader, manifest, data_key, &mut writer);
    if let Err(error) = unpacked {
        drop(writer);
        let _ = std::fs::remove_file(&files.payload_tmp);
        return Err(if cancel.is_cancelled() {
            FetchError::Cancelled
        } else {
            FetchError::Unpack(error)
        });
    }
    let output = writer
        .into_inner()
        .map_err(|e| FetchError::Local(e.into_error()))?;
    output.sync_all().map_err(FetchError::Local)?;
    drop(output);
    std::fs::rename(&files.payload_tmp, &files.payload).map_err(FetchError::Local)?;
    sync_dir(&files.dir).map_err(FetchError::Local)?;
    Ok(())
}

/// Lets a shutdown or a replaced job stop an unpack between two reads.
struct CancellableReader<'a, R> {
    inner: R,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for CancellableReader<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
        self.inner.read(buffer)
    }
}

fn remove_if_present(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn only_resource_shortages_make_a_fetch_worth_retrying() {
        const EMFILE: i32 = 24;
        const EACCES: i32 = 13;
        assert!(FetchError::Local(os(EMFILE)).is_transient());
        assert!(FetchError::Unpack(otter_package::PackageError::Io(os(EMFILE))).is_transient());
        assert!(
            FetchError::Download(DownloadError::Local {
                path: "artifact.part".into(),
                source: os(EMFILE),
            })
            .is_transient()
        );
        assert!(!FetchError::Local(os(EACCES)).is_transient());
        assert!(!FetchError::HashMismatch.is_transient());
        assert!(!FetchError::Cancelled.is_transient());
    }
}
