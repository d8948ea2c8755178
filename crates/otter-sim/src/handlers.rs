//! The two simulated parts of a simulated device, behind the agent's own
//! traits: [`RecordingInstaller`] (an [`Installer`] that records the install
//! in a shared [`InstallLog`] and leaves the payload to the agent, which
//! clears its landing zone afterwards) and the agent's own
//! [`otter_agent::safe_state::AlwaysSafe`] probe.
//!
//! The log is shared by every device of a fleet: one `std::sync::Mutex`
//! around a vector, held only to push or copy (never across `.await`), and a
//! `watch` channel with the count so a progress bar or a test can wait for
//! "N installed" without polling the vector.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use otter_agent::install::{InstallError, InstallRequest, Installer};
use otter_proto::topics::DeviceId;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// One install a simulated device performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRecord {
    pub device_id: DeviceId,
    pub deployment_id: String,
    pub name: String,
    pub version: semver::Version,
    pub payload_bytes: u64,
    /// SHA-256 (hex) of the payload as installed, when the fleet hashes
    /// payloads (tests); the agent has already checked it against the
    /// signed manifest either way.
    pub payload_sha256: Option<String>,
    pub at: SystemTime,
}

/// Every install of a fleet, in the order they happened.
#[derive(Debug, Clone)]
pub struct InstallLog {
    records: Arc<Mutex<Vec<InstallRecord>>>,
    count: Arc<watch::Sender<usize>>,
}

impl Default for InstallLog {
    fn default() -> Self {
        InstallLog {
            records: Arc::new(Mutex::new(Vec::new())),
            count: Arc::new(watch::channel(0).0),
        }
    }
}

impl InstallLog {
    pub fn new() -> Self {
        InstallLog::default()
    }

    fn push(&self, record: InstallRecord) {
        let count = {
            // A poisoned lock means a panic while pushing; the vector is
            // still a valid list of records, so keep using it.
            let mut records = self
                .records
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            records.push(record);
            records.len()
        };
        self.count.send_replace(count);
    }

    /// A copy of every record so far.
    pub fn records(&self) -> Vec<InstallRecord> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The records of one deployment.
    pub fn records_of(&self, deployment_id: &str) -> Vec<InstallRecord> {
        self.records()
            .into_iter()
            .filter(|record| record.deployment_id == deployment_id)
            .collect()
    }

    /// How many installs so far.
    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that sees the count change.
    pub fn watch(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }
}

/// The simulated installer of one device.
#[derive(Debug, Clone)]
pub struct RecordingInstaller {
    device_id: DeviceId,
    log: InstallLog,
    hash_payloads: bool,
}

impl RecordingInstaller {
    pub fn new(device_id: DeviceId, log: InstallLog, hash_payloads: bool) -> Self {
        RecordingInstaller {
            device_id,
            log,
            hash_payloads,
        }
    }
}

/// Capability name the simulated devices announce.
pub const INSTALLER_NAME: &str = "simulated";

impl Installer for RecordingInstaller {
    fn name(&self) -> &'static str {
        INSTALLER_NAME
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(async move {
            let (payload_bytes, payload_sha256) = if self.hash_payloads {
                let (size, digest) = hash_file(&request.payload).await?;
                (size, Some(digest))
            } else {
                let metadata = tokio::fs::metadata(&request.payload)
                    .await
                    .map_err(|source| io_error("reading", &request.payload, source))?;
                (metadata.len(), None)
            };
            self.log.push(InstallRecord {
                device_id: self.device_id.clone(),
                deployment_id: request.deployment_id.clone(),
                name: request.name.clone(),
                version: request.version.clone(),
                payload_bytes,
                payload_sha256,
                at: SystemTime::now(),
            });
            Ok(())
        })
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> InstallError {
    InstallError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Size and SHA-256 (hex) of a file, read in 64 KiB pieces.
async fn hash_file(path: &Path) -> Result<(u64, String), InstallError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| io_error("opening", path, source))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let count = file
            .read(&mut buffer)
            .await
            .map_err(|source| io_error("reading", path, source))?;
        if count == 0 {
            break;
        }
        hasher.update(buffer.get(..count).unwrap_or_default());
        size += count as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
