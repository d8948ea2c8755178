//! What the agent remembers across restarts: the current job and the
//! installed versions.
//!
//! Two JSON files in `state_dir`: `job.json` (the [`Job`] of
//! `otter_proto::job`, its stage included) and `installed.json` (package
//! name → version). Each is written atomically: a temporary file in the same
//! folder, fsync, rename over the old file, fsync of the folder. A crash
//! therefore leaves either the old or the new content, never a mix.
//!
//! A file that exists but cannot be parsed is a [`StateError::Corrupt`].
//! The agent's policy ([`StateStore::load_or_quarantine`]) is to move such a
//! file aside as `<name>.corrupt` and start idle: the server re-sends any
//! pending notification when the agent registers, and the installed
//! versions guard against installing twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use otter_proto::job::Job;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Installed package versions, by package name.
pub type InstalledVersions = BTreeMap<String, semver::Version>;

const JOB_FILE: &str = "job.json";
const INSTALLED_FILE: &str = "installed.json";

/// Largest state file read back, in bytes: a job is a few KiB.
const MAX_STATE_FILE_BYTES: u64 = 1 << 20;

/// Why the persisted state cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The persisted state of one agent, in one folder.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn job_path(&self) -> PathBuf {
        self.dir.join(JOB_FILE)
    }

    pub fn installed_path(&self) -> PathBuf {
        self.dir.join(INSTALLED_FILE)
    }

    /// The current job, or `None` when there is none yet.
    pub fn load_job(&self) -> Result<Option<Job>, StateError> {
        read_json(&self.job_path())
    }

    /// The installed versions; empty when nothing was installed yet.
    pub fn load_installed(&self) -> Result<InstalledVersions, StateError> {
        Ok(read_json(&self.installed_path())?.unwrap_or_default())
    }

    pub fn save_job(&self, job: &Job) -> Result<(), StateError> {
        write_json(&self.job_path(), job)
    }

    pub fn save_installed(&self, installed: &InstalledVersions) -> Result<(), StateError> {
        write_json(&self.installed_path(), installed)
    }

    /// Loads both files for start-up. A corrupt file is logged, renamed to
    /// `<name>.corrupt` for later inspection, and treated as absent; I/O
    /// errors (permissions, a missing disk) are returned.
    pub fn load_or_quarantine(&self) -> Result<(Option<Job>, InstalledVersions), StateError> {
        let job = quarantine_if_corrupt(self.load_job())?.flatten();
        let installed = quarantine_if_corrupt(self.load_installed())?.unwrap_or_default();
        Ok((job, installed))
    }
}

fn quarantine_if_corrupt<T>(loaded: Result<T, StateError>) -> Result<Option<T>, StateError> {
    match loaded {
        Ok(value) => Ok(Some(value)),
        Err(StateError::Corrupt { path, reason }) => {
            let mut aside = path.clone().into_os_string();
            aside.push(".corrupt");
            tracing::error!(
                path = %path.display(),
                %reason,
                "state file is corrupt; moving it aside and starting without it"
            );
            std::fs::rename(&path, &aside).map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// Reads a bounded JSON state file; `None` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let io_error = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    let length = file.metadata().map_err(io_error)?.len();
    if length > MAX_STATE_FILE_BYTES {
        return Err(StateError::Corrupt {
            path: path.to_owned(),
            reason: format!("{length} bytes is more than a state file can hold"),
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_STATE_FILE_BYTES),
        &mut bytes,
    )
    .map_err(io_error)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    // Serialising a Job or a map of strings to versions cannot fail.
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    write_atomically(path, &bytes).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// content: temporary file in the same folder, fsync, rename, fsync folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Makes a rename in `dir` durable. Opening a folder for fsync works on Unix;
/// elsewhere it is skipped.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
    }
    Ok(())
}

/// How long a state write is retried while the system is short of a
/// resource (see [`write_state`]).
const STATE_WRITE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a state write on the blocking pool, retrying with backoff while it
/// fails for want of a resource that comes back by itself: file
/// descriptors (the process's or the system's), memory, an interrupted
/// call. Giving up on the job for those would abandon an update over a
/// moment of load; any other error (permissions, a missing or full disk)
/// is returned at once.
pub async fn write_retrying(
    write: impl Fn() -> Result<(), StateError> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let write = std::sync::Arc::new(write);
    let deadline = tokio::time::Instant::now() + STATE_WRITE_PATIENCE;
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(5),
    );
    loop {
        let attempt = std::sync::Arc::clone(&write);
        let result = tokio::task::spawn_blocking(move || attempt())
            .await
            .map_err(|e| anyhow::anyhow!("state writer task: {e}"))?;
        match result {
            Err(StateError::Io { source, .. })
                if crate::backoff::is_transient_io(&source)
                    && tokio::time::Instant::now() < deadline =>
            {
                let delay = backoff.next_delay();
                tracing::warn!(error = %source, ?delay, "state write failed for want of a resource; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otter_proto::job::StepResult;
    use otter_proto::manifest::SignedManifest;
    use otter_proto::messages::UpdateNotification;

    fn job() -> Job {
        Job::new(UpdateNotification {
            signer_revocations: None,
            deployment_id: "d1".into(),
            release: "fw@1.0.0".into(),
            manifest: SignedManifest {
                manifest: "{}".into(),
                signer: "s".into(),
                signature: "g".into(),
                signer_certificate: None,
            },
            link: "https://127.0.0.1:8443/x".into(),
            link_expires_at: 10,
            wrapped_key: "k".into(),
            allow_downgrade: false,
        })
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert_eq!(store.load_job().unwrap(), None);
        assert!(store.load_installed().unwrap().is_empty());

        let mut job = job();
        store.save_job(&job).unwrap();
        assert_eq!(store.load_job().unwrap(), Some(job.clone()));
        job.advance(StepResult::Failed("disk full".into()));
        store.save_job(&job).unwrap();
        assert_eq!(store.load_job().unwrap(), Some(job));

        let installed: InstalledVersions =
            [("fw".to_string(), semver::Version::new(1, 2, 3))].into();
        store.save_installed(&installed).unwrap();
        assert_eq!(store.load_installed().unwrap(), installed);
        assert_eq!(
            names_in(store.dir()),
            vec!["installed.json".to_string(), "job.json".to_string()]
        );
    }

    #[test]
    fn corrupt_job_is_a_clear_error_and_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        std::fs::write(store.job_path(), b"{\"notification\": tru").unwrap();
        let error = store.load_job().unwrap_err();
        assert!(matches!(error, StateError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("job.json"), "{error}");

        let installed: InstalledVersions =
            [("fw".to_string(), semver::Version::new(2, 0, 0))].into();
        store.save_installed(&installed).unwrap();
        let (job, loaded) = store.load_or_quarantine().unwrap();
        assert_eq!(job, None);
        assert_eq!(loaded, installed);
        assert_eq!(
            names_in(dir.path()),
            vec!["installed.json".to_string(), "job.json.corrupt".to_string()]
        );
        // The next start finds no job and no error.
        assert_eq!(store.load_or_quarantine().unwrap().0, None);
    }

    #[test]
    fn oversized_state_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        std::fs::write(
            store.installed_path(),
            vec![b' '; MAX_STATE_FILE_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            store.load_installed(),
            Err(StateError::Corrupt { .. })
        ));
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn io_error(errno: i32) -> StateError {
        StateError::Io {
            path: "state/job.json".into(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[tokio::test]
    async fn state_writes_outlast_a_shortage_of_descriptors() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&calls);
        write_retrying(move || match counter.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err(io_error(24)),
            _ => Ok(()),
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn other_state_write_errors_are_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&calls);
        let error = write_retrying(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Err(io_error(13))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(error.to_string().contains("state/job.json"), "{error:#}");
    }
}
