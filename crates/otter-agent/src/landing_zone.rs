//! The landing zone: where a deployment's download and unpacked payload wait
//! until they are installed.
//!
//! One folder per deployment, `landing_zone/<deployment_id>/`, holding
//! `artifact.part` (the download, appended to and resumed), `payload.tmp`
//! (the unpack in progress) and `payload` (the verified plaintext, renamed
//! into place only when complete). The deployment id comes from the network,
//! so it is checked to be a plain name before it becomes a path.

use std::path::{Path, PathBuf};

/// Why a landing-zone operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LandingZoneError {
    #[error("deployment id {0:?} cannot name a landing-zone folder")]
    BadDeploymentId(String),
    #[error("landing zone {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The landing-zone root folder.
#[derive(Debug, Clone)]
pub struct LandingZone {
    root: PathBuf,
}

/// The files of one deployment in the landing zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentFiles {
    pub dir: PathBuf,
    /// The download so far (encrypted, compressed).
    pub artifact_part: PathBuf,
    /// The unpack in progress.
    pub payload_tmp: PathBuf,
    /// The verified plaintext, ready to install.
    pub payload: PathBuf,
}

impl LandingZone {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LandingZone { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file names of `deployment_id`, without touching the disk.
    pub fn files(&self, deployment_id: &str) -> Result<DeploymentFiles, LandingZoneError> {
        // Same rules as device ids: letters, digits, '-', '_', '.', not
        // starting with '.' or '-', so never "..", never a separator.
        otter_proto::manifest::validate_name(deployment_id)
            .map_err(|_| LandingZoneError::BadDeploymentId(deployment_id.to_owned()))?;
        let dir = self.root.join(deployment_id);
        Ok(DeploymentFiles {
            artifact_part: dir.join("artifact.part"),
            payload_tmp: dir.join("payload.tmp"),
            payload: dir.join("payload"),
            dir,
        })
    }

    /// Creates the deployment's folder if needed and returns its files.
    pub async fn prepare(&self, deployment_id: &str) -> Result<DeploymentFiles, LandingZoneError> {
        let files = self.files(deployment_id)?;
        tokio::fs::create_dir_all(&files.dir)
            .await
            .map_err(|source| LandingZoneError::Io {
                path: files.dir.clone(),
                source,
            })?;
        Ok(files)
    }

    /// Removes a deployment's folder; a folder already gone is fine.
    pub async fn remove(&self, deployment_id: &str) -> Result<(), LandingZoneError> {
        let files = self.files(deployment_id)?;
        remove_dir(&files.dir).await
    }

    /// Removes every deployment folder except `keep`'s: leftovers of jobs
    /// replaced or finished before a crash.
    pub async fn remove_all_except(&self, keep: Option<&str>) -> Result<(), LandingZoneError> {
        let io_error = |source| LandingZoneError::Io {
            path: self.root.clone(),
            source,
        };
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(io_error)? {
            if keep.is_some_and(|keep| entry.file_name() == keep) {
                continue;
            }
            let path = entry.path();
            let is_dir = entry.file_type().await.map_err(io_error)?.is_dir();
            let result = if is_dir {
                remove_dir(&path).await
            } else {
                tokio::fs::remove_file(&path)
                    .await
                    .map_err(|source| LandingZoneError::Io { path, source })
            };
            result?;
        }
        Ok(())
    }
}

async fn remove_dir(dir: &Path) -> Result<(), LandingZoneError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LandingZoneError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_refused() {
        let zone = LandingZone::new("/landing");
        for bad in ["..", "../etc", "a/b", "", ".hidden", "-x"] {
            assert!(
                matches!(zone.files(bad), Err(LandingZoneError::BadDeploymentId(_))),
                "{bad}"
            );
        }
        let files = zone.files("dep-1").unwrap();
        assert_eq!(
            files.artifact_part,
            Path::new("/landing/dep-1/artifact.part")
        );
        assert_eq!(files.payload, Path::new("/landing/dep-1/payload"));
    }

    #[tokio::test]
    async fn prepare_remove_and_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let zone = LandingZone::new(dir.path().join("landing"));
        zone.remove_all_except(None).await.unwrap(); // no root yet: fine
        let a = zone.prepare("a").await.unwrap();
        std::fs::write(&a.artifact_part, b"x").unwrap();
        zone.prepare("b").await.unwrap();
        zone.prepare("c").await.unwrap();
        zone.remove("c").await.unwrap();
        zone.remove("c").await.unwrap();
        zone.remove_all_except(Some("a")).await.unwrap();
        let left: Vec<_> = std::fs::read_dir(zone.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("a")]);
        assert_eq!(std::fs::read(&a.artifact_part).unwrap(), b"x");
    }
}
