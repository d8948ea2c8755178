//! The device's signer trust: the pinned roots and directly trusted signer
//! keys of `agent.toml` (`trusted_roots`, `trusted_signers`) and the newest
//! root-signed signer revocation list it has seen.
//!
//! The server attaches its revocation list to every update it sends
//! (`UpdateNotification::signer_revocations`, `PushOffer`); [`accept`] keeps
//! it only if a pinned root signed it and its sequence is greater than the
//! one held, then stores it in `<state_dir>/signer-revocations.json`
//! (atomically) before it is used. A list with a bad signature or a lower or
//! equal sequence is ignored with a log line and never replaces the stored
//! one, so a replayed old list cannot un-revoke a key. Every manifest check
//! (on notification and again before installing) goes through the store.

use std::path::{Path, PathBuf};

use anyhow::Context;
use otter_package::trust::TrustStore;
use otter_proto::trust::SignedRevocationList;

use crate::config::AgentConfig;

/// Largest revocation list file read back (the list holds at most 4096
/// keys of ~100 bytes each).
const MAX_LIST_FILE: u64 = 2 << 20;

/// Where the newest accepted revocation list is kept.
pub fn revocations_path(state_dir: &Path) -> PathBuf {
    state_dir.join("signer-revocations.json")
}

/// Builds the trust store from the configured key files and the stored list.
/// A stored list that no longer verifies (e.g. its root was unpinned) is
/// ignored with a warning.
pub fn load(config: &AgentConfig) -> anyhow::Result<TrustStore> {
    let read = |paths: &[PathBuf], what: &str| -> anyhow::Result<Vec<_>> {
        paths
            .iter()
            .map(|path| {
                otter_package::keys::read_verifying_key(path)
                    .with_context(|| format!("reading {what} key {}", path.display()))
            })
            .collect()
    };
    let roots = read(&config.trusted_roots, "trusted root")?;
    let signers = read(&config.trusted_signers, "trusted signer")?;
    let mut trust = TrustStore::new(&roots, &signers);
    let path = revocations_path(&config.state_dir);
    match read_list(&path) {
        Ok(None) => {}
        Ok(Some(list)) => match trust.apply_revocation_list(&list) {
            Ok(applied) => {
                tracing::info!(
                    sequence = applied.sequence,
                    revoked = applied.revoked.len(),
                    "signer revocation list loaded"
                );
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "stored signer revocation list ignored");
            }
        },
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "stored signer revocation list unreadable; ignored");
        }
    }
    Ok(trust)
}

/// Applies a list received from the server if it is valid and newer, and
/// stores it. Returns whether it was applied. Never fails the caller: a
/// refused list is only logged; if storing fails, the list is still used in
/// memory (it only ever makes the device stricter).
pub fn accept(trust: &mut TrustStore, list: &SignedRevocationList, state_dir: &Path) -> bool {
    if trust.revocations().is_some_and(|(held, _)| held == list) {
        return false;
    }
    match trust.apply_revocation_list(list) {
        Ok(applied) => {
            tracing::info!(
                sequence = applied.sequence,
                revoked = applied.revoked.len(),
                "signer revocation list accepted"
            );
            let path = revocations_path(state_dir);
            let bytes = serde_json::to_vec_pretty(list).unwrap_or_default();
            if let Err(error) = crate::state::write_atomically(&path, &bytes) {
                tracing::error!(path = %path.display(), %error, "cannot store the signer revocation list");
            }
            true
        }
        Err(error) => {
            tracing::warn!(%error, "signer revocation list from the server ignored");
            false
        }
    }
}

fn read_list(path: &Path) -> anyhow::Result<Option<SignedRevocationList>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    anyhow::ensure!(metadata.len() <= MAX_LIST_FILE, "file too large");
    let text = std::fs::read_to_string(path)?;
    Ok(Some(otter_package::trust::parse_revocation_list(&text)?))
}
