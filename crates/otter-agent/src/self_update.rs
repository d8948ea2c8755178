//! Agent self-update: a package of kind `agent` replaces the agent binary.
//!
//! Two processes share the work (see [`crate::supervisor`]): the *worker*
//! (the agent proper, `otter-agent --worker`) and the *supervisor* (plain
//! `otter-agent`, which starts the worker and watches it). They talk through
//! one file, the [`Marker`] `state_dir/self-update.json`, written atomically:
//!
//! 1. The worker installs an `agent` package with [`SelfUpdateInstaller`]:
//!    it copies the verified payload next to its executable as
//!    `.otter-agent.new` (mode 0755, fsync), records the marker `staged`,
//!    persists its job as `Installing`, reports `installing` and exits with
//!    [`STAGED_EXIT_CODE`].
//! 2. The supervisor ([`swap_in`]) copies the running executable to
//!    `otter-agent.previous`, renames the staged file over the executable,
//!    marks the marker `trial` with a fresh deadline and starts the worker
//!    from the new executable.
//! 3. The new worker, once connected and registered, records the version,
//!    reports `installed` and marks the marker `confirmed`. The supervisor
//!    then clears the marker and re-executes itself into the new binary.
//! 4. If the trial worker exits, or the deadline passes first, the
//!    supervisor kills it, marks the marker `rolled-back` with the reason and
//!    renames `otter-agent.previous` back ([`restore_previous`]); the worker
//!    it starts from the restored binary reports `rolled-back` for the
//!    deployment, puts the previous version back in `installed.json` and
//!    removes the marker.
//!
//! Every file swap is a rename inside the executable's folder, so a crash at
//! any point leaves either the old or the new executable at its path, and
//! the marker says which step to redo ([`Marker::transition`] lists the legal
//! moves). Layout: constants, the marker and its store, the installer, then
//! the file operations of the supervisor.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::install::{InstallError, InstallRequest, Installer};
use crate::state::{StateError, StateStore, sync_dir, write_atomically};

/// Exit status of a worker that staged a new executable: "swap it in".
/// 75 is `EX_TEMPFAIL` of `sysexits.h`, which no other path of the agent
/// uses (a bad configuration exits 2, an error 1).
pub const STAGED_EXIT_CODE: u8 = 75;

/// The marker's file name in `state_dir`.
pub const MARKER_FILE: &str = "self-update.json";

/// How long a new agent has to connect and confirm, unless `[self_update]
/// deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// Where a self-update stands. Persisted in [`MARKER_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub deployment_id: String,
    /// Package name (the key in `installed.json`).
    pub package: String,
    /// The version being installed.
    pub version: semver::Version,
    /// The version recorded before this update, put back on rollback.
    pub previous_version: Option<semver::Version>,
    /// SHA-256 (hex) of the staged executable: tells the supervisor, after a
    /// crash, whether the swap already happened.
    pub sha256: String,
    /// The trial length, from the worker's `[self_update] deadline`.
    pub timeout_seconds: u64,
    /// Unix seconds by which the new agent must confirm. Set at staging and
    /// again when the trial starts.
    pub deadline: i64,
    #[serde(flatten)]
    pub state: MarkerState,
}

/// The steps of a self-update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MarkerState {
    /// The new executable waits next to the old one.
    Staged,
    /// The new executable is in place and running on probation.
    Trial,
    /// The new agent connected and reported; nothing is left to undo.
    Confirmed,
    /// The previous executable is (being) put back; `reason` is reported.
    RolledBack { reason: String },
}

impl MarkerState {
    pub fn name(&self) -> &'static str {
        match self {
            MarkerState::Staged => "staged",
            MarkerState::Trial => "trial",
            MarkerState::Confirmed => "confirmed",
            MarkerState::RolledBack { .. } => "rolled-back",
        }
    }
}

/// A transition [`Marker::transition`] does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a self-update cannot go from {from} to {to}")]
pub struct TransitionError {
    pub from: &'static str,
    pub to: &'static str,
}

impl Marker {
    /// The marker moved to `to`: staged → trial | rolled-back,
    /// trial → confirmed | rolled-back; anything else is refused.
    pub fn transition(&self, to: MarkerState) -> Result<Marker, TransitionError> {
        let allowed = matches!(
            (&self.state, &to),
            (MarkerState::Staged, MarkerState::Trial)
                | (MarkerState::Staged, MarkerState::RolledBack { .. })
                | (MarkerState::Trial, MarkerState::Confirmed)
                | (MarkerState::Trial, MarkerState::RolledBack { .. })
        );
        if !allowed {
            return Err(TransitionError {
                from: self.state.name(),
                to: to.name(),
            });
        }
        Ok(Marker {
            state: to,
            ..self.clone()
        })
    }

    /// The trial length as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }
}

/// Reads and writes the marker of one state folder.
#[derive(Debug, Clone)]
pub struct MarkerStore {
    path: PathBuf,
}

impl MarkerStore {
    pub fn new(state_dir: &Path) -> Self {
        MarkerStore {
            path: state_dir.join(MARKER_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The marker, or `None` when no self-update is under way.
    pub fn load(&self) -> Result<Option<Marker>, StateError> {
        crate::state::read_json(&self.path)
    }

    pub fn save(&self, marker: &Marker) -> Result<(), StateError> {
        // Serialising strings, versions and integers cannot fail.
        let bytes = serde_json::to_vec_pretty(marker).unwrap_or_default();
        write_atomically(&self.path, &bytes).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Moves the stored marker to `to` and saves it.
    pub fn transition(&self, marker: &Marker, to: MarkerState) -> Result<Marker, MarkerError> {
        let next = marker.transition(to)?;
        self.save(&next)?;
        Ok(next)
    }

    /// Deletes the marker (the self-update is over).
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        if let Some(dir) = self.path.parent() {
            sync_dir(dir).map_err(|source| StateError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Why the marker could not move on.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// `.otter-agent.new`: the staged executable beside `executable`.
pub fn staged_path(executable: &Path) -> PathBuf {
    sibling(executable, |name| format!(".{name}.new"))
}

/// `otter-agent.previous`: the executable kept for a rollback.
pub fn previous_path(executable: &Path) -> PathBuf {
    sibling(executable, |name| format!("{name}.previous"))
}

fn sibling(executable: &Path, name: impl Fn(&str) -> String) -> PathBuf {
    let file_name = executable
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "otter-agent".to_owned());
    executable.with_file_name(name(&file_name))
}

/// Installs packages of kind `agent` by staging them for the supervisor.
#[derive(Debug, Clone)]
pub struct SelfUpdateInstaller {
    /// The running executable; `None` when no supervisor runs this agent
    /// (a library user, a test), where a self-update is refused.
    executable: Option<PathBuf>,
    state_dir: PathBuf,
    timeout: Duration,
}

impl SelfUpdateInstaller {
    pub fn new(executable: Option<PathBuf>, state_dir: &Path, timeout: Duration) -> Self {
        SelfUpdateInstaller {
            executable,
            state_dir: state_dir.to_owned(),
            timeout,
        }
    }
}

impl Installer for SelfUpdateInstaller {
    fn name(&self) -> &'static str {
        "self-update"
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        let this = self.clone();
        let request = request.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.stage(&request))
                .await
                .map_err(|e| InstallError::Task(e.to_string()))?
        })
    }
}

impl SelfUpdateInstaller {
    /// Copies the payload beside the executable and writes the `staged`
    /// marker. Running it twice stages the same bytes twice: harmless.
    fn stage(&self, request: &InstallRequest) -> Result<(), InstallError> {
        let Some(executable) = &self.executable else {
            return Err(InstallError::Rejected(
                "a self-update needs the otter-agent supervisor (this agent runs without one)"
                    .into(),
            ));
        };
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| InstallError::Io {
                action,
                path,
                source,
            }
        };
        let staged = staged_path(executable);
        let mut source =
            std::fs::File::open(&request.payload).map_err(io("cannot open", &request.payload))?;
        let mut target = std::fs::File::create(&staged).map_err(io("cannot create", &staged))?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = source
                .read(&mut buffer)
                .map_err(io("cannot read", &request.payload))?;
            let Some(chunk) = buffer.get(..read).filter(|chunk| !chunk.is_empty()) else {
                break;
            };
            hasher.update(chunk);
            target
                .write_all(chunk)
                .map_err(io("cannot write", &staged))?;
        }
        set_executable(&target).map_err(io("cannot make executable", &staged))?;
        target.sync_all().map_err(io("cannot sync", &staged))?;
        drop(target);
        if let Some(dir) = staged.parent() {
            sync_dir(dir).map_err(io("cannot sync", dir))?;
        }

        let previous_version = StateStore::new(&self.state_dir)
            .load_installed()
            .ok()
            .and_then(|installed| installed.get(&request.name).cloned());
        let marker = Marker {
            deployment_id: request.deployment_id.clone(),
            package: request.name.clone(),
            version: request.version.clone(),
            previous_version,
            sha256: hex::encode(hasher.finalize()),
            timeout_seconds: self.timeout.as_secs().max(1),
            deadline: unix_now().saturating_add(duration_seconds(self.timeout)),
            state: MarkerState::Staged,
        };
        MarkerStore::new(&self.state_dir)
            .save(&marker)
            .map_err(|e| InstallError::Rejected(e.to_string()))?;
        tracing::info!(
            staged = %staged.display(),
            version = %request.version,
            "new agent executable staged; handing over to the supervisor"
        );
        Ok(())
    }
}

#[cfg(unix)]
fn set_executable(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
fn set_executable(_file: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

/// Why the supervisor could not swap or restore an executable.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the staged executable {0} is missing and the swap has not happened")]
    StagedMissing(PathBuf),
    #[error("no previous executable {0} to restore")]
    PreviousMissing(PathBuf),
}

/// Supervisor, step 2: keeps the running executable as
/// `otter-agent.previous` and renames the staged one over it. Idempotent: if
/// the staged file is gone and the executable already has the marker's
/// hash, the swap happened before a crash and nothing is done.
pub fn swap_in(executable: &Path, marker: &Marker) -> Result<(), SwapError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SwapError::Io {
            action,
            path,
            source,
        }
    };
    let staged = staged_path(executable);
    let previous = previous_path(executable);
    if !staged.exists() {
        return match sha256_of(executable) {
            Ok(hash) if hash == marker.sha256 => Ok(()),
            _ => Err(SwapError::StagedMissing(staged)),
        };
    }
    // A copy, not a rename: the executable's path must never be empty.
    let keeping = sibling(executable, |name| format!(".{name}.previous.tmp"));
    std::fs::copy(executable, &keeping).map_err(io("cannot copy", executable))?;
    std::fs::File::open(&keeping)
        .and_then(|file| file.sync_all())
        .map_err(io("cannot sync", &keeping))?;
    std::fs::rename(&keeping, &previous).map_err(io("cannot rename", &previous))?;
    std::fs::rename(&staged, executable).map_err(io("cannot rename", executable))?;
    if let Some(dir) = executable.parent() {
        sync_dir(dir).map_err(io("cannot sync", dir))?;
    }
    Ok(())
}

/// Supervisor, rollback: renames `otter-agent.previous` back over the
/// executable. `Ok(false)` when there is nothing to restore (already done).
pub fn restore_previous(executable: &Path) -> Result<bool, SwapError> {
    let previous = previous_path(executable);
    if !previous.exists() {
        return Ok(false);
    }
    std::fs::rename(&previous, executable).map_err(|source| SwapError::Io {
        action: "cannot restore",
        path: executable.to_owned(),
        source,
    })?;
    if let Some(dir) = executable.parent() {
        sync_dir(dir).map_err(|source| SwapError::Io {
            action: "cannot sync",
            path: dir.to_owned(),
            source,
        })?;
    }
    // A staged file left over from an interrupted swap is useless now.
    let _ = std::fs::remove_file(staged_path(executable));
    Ok(true)
}

/// SHA-256 (hex) of a file, streamed.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        match buffer.get(..read) {
            Some(chunk) if !chunk.is_empty() => hasher.update(chunk),
            _ => return Ok(hex::encode(hasher.finalize())),
        }
    }
}

/// Unix seconds now (0 before 1970: a device without a clock).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn duration_seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// The marker with a new deadline `timeout` from `now`.
pub fn with_deadline_from(marker: Marker, now: i64) -> Marker {
    let deadline = now.saturating_add(i64::try_from(marker.timeout_seconds).unwrap_or(i64::MAX));
    Marker { deadline, ..marker }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(state: MarkerState) -> Marker {
        Marker {
            deployment_id: "d1".into(),
            package: "otter-agent".into(),
            version: semver::Version::new(2, 0, 0),
            previous_version: Some(semver::Version::new(1, 0, 0)),
            sha256: "00".into(),
            timeout_seconds: 120,
            deadline: 1000,
            state,
        }
    }

    fn rolled_back() -> MarkerState {
        MarkerState::RolledBack {
            reason: "exit 1".into(),
        }
    }

    #[test]
    fn marker_transitions() {
        use MarkerState::*;
        let cases = [
            (Staged, Trial, true),
            (Staged, rolled_back(), true),
            (Staged, Confirmed, false),
            (Staged, Staged, false),
            (Trial, Confirmed, true),
            (Trial, rolled_back(), true),
            (Trial, Staged, false),
            (Trial, Trial, false),
            (Confirmed, rolled_back(), false),
            (Confirmed, Trial, false),
            (rolled_back(), Trial, false),
            (rolled_back(), Confirmed, false),
        ];
        for (from, to, allowed) in cases {
            let result = marker(from.clone()).transition(to.clone());
            assert_eq!(result.is_ok(), allowed, "{from:?} → {to:?}: {result:?}");
            if let Ok(next) = result {
                assert_eq!(next.state, to);
                assert_eq!(next.deployment_id, "d1");
            }
        }
    }

    #[test]
    fn marker_file_round_trip_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let store = MarkerStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        let staged = marker(MarkerState::Staged);
        store.save(&staged).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["state"], "staged");
        assert_eq!(json["deployment_id"], "d1");
        assert_eq!(json["deadline"], 1000);
        let trial = store.transition(&staged, MarkerState::Trial).unwrap();
        assert_eq!(store.load().unwrap(), Some(trial.clone()));
        let error = store.transition(&trial, MarkerState::Staged).unwrap_err();
        assert!(error.to_string().contains("trial to staged"), "{error}");
        let back = store.transition(&trial, rolled_back()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MARKER_FILE)).unwrap();
        assert!(
            text.contains("\"rolled-back\"") && text.contains("exit 1"),
            "{text}"
        );
        assert_eq!(store.load().unwrap(), Some(back));
        store.remove().unwrap();
        store.remove().unwrap();
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn sibling_names() {
        let exe = Path::new("/opt/otter/bin/otter-agent");
        assert_eq!(
            staged_path(exe),
            Path::new("/opt/otter/bin/.otter-agent.new")
        );
        assert_eq!(
            previous_path(exe),
            Path::new("/opt/otter/bin/otter-agent.previous")
        );
    }

    fn request(dir: &Path, payload: &[u8]) -> InstallRequest {
        let path = dir.join("payload");
        std::fs::write(&path, payload).unwrap();
        InstallRequest {
            deployment_id: "d7".into(),
            name: "otter-agent".into(),
            version: semver::Version::new(3, 1, 0),
            kind: otter_proto::manifest::PackageKind::Agent,
            payload: path,
        }
    }

    #[tokio::test]
    async fn stage_swap_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("otter-agent");
        std::fs::write(&exe, b"old agent").unwrap();
        let state = dir.path().join("state");
        StateStore::new(&state)
            .save_installed(&[("otter-agent".to_string(), semver::Version::new(3, 0, 0))].into())
            .unwrap();
        let installer =
            SelfUpdateInstaller::new(Some(exe.clone()), &state, Duration::from_secs(30));
        installer
            .install(&request(dir.path(), b"new agent"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(staged_path(&exe)).unwrap(), b"new agent");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(staged_path(&exe))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
        }
        let marker = MarkerStore::new(&state).load().unwrap().unwrap();
        assert_eq!(marker.state, MarkerState::Staged);
        assert_eq!(marker.deployment_id, "d7");
        assert_eq!(marker.version, semver::Version::new(3, 1, 0));
        assert_eq!(marker.previous_version, Some(semver::Version::new(3, 0, 0)));
        assert_eq!(marker.timeout_seconds, 30);
        assert_eq!(marker.sha256, sha256_of(&staged_path(&exe)).unwrap());

        swap_in(&exe, &marker).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new agent");
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old agent");
        assert!(!staged_path(&exe).exists());
        // Again after a crash: recognised as done.
        swap_in(&exe, &marker).unwrap();
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old agent");

        assert!(restore_previous(&exe).unwrap());
        assert_eq!(std::fs::read(&exe).unwrap(), b"old agent");
        assert!(!restore_previous(&exe).unwrap());
        // The swap cannot be repeated now: the executable is not the staged one.
        assert!(matches!(
            swap_in(&exe, &marker),
            Err(SwapError::StagedMissing(_))
        ));
    }

    #[tokio::test]
    async fn refused_without_a_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let installer = SelfUpdateInstaller::new(None, dir.path(), Duration::from_secs(30));
        let error = installer
            .install(&request(dir.path(), b"new"))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("supervisor"), "{error}");
        assert_eq!(MarkerStore::new(dir.path()).load().unwrap(), None);
    }
}
