//! The supervisor: plain `otter-agent` runs the agent proper as a child
//! process of the same executable (`otter-agent --worker`) and is what makes
//! a self-update safe (see [`crate::self_update`] for the whole protocol).
//!
//! What it does: starts the worker with a pipe as its stdin (the worker
//! stops when the pipe closes, so killing the supervisor never leaves an
//! orphan agent); on SIGINT/SIGTERM closes the pipe and waits for the worker;
//! when the worker exits with [`STAGED_EXIT_CODE`] swaps the staged
//! executable in and starts a *trial* worker; during a trial polls the marker
//! until the worker confirms (then re-executes itself into the new binary),
//! or rolls back when the trial worker exits or its deadline passes. Outside
//! a trial, a worker that exits ends the supervisor with the same status, so
//! the service manager sees what it would have seen without a supervisor.
//!
//! The rules are the pure function [`decide`] (marker state + what happened
//! → [`Action`]), tested by table; [`supervise`] is the shell that performs
//! the actions with processes, timers and files.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, ChildStdin};
use tokio::time::Instant;

use crate::self_update::{
    Marker, MarkerState, MarkerStore, STAGED_EXIT_CODE, restore_previous, swap_in, unix_now,
    with_deadline_from,
};
use crate::state::StateError;

/// How often the marker is read during a trial.
pub const MARKER_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a worker has to stop after its stdin closes before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// The command-line flag that makes `otter-agent` run as the worker.
pub const WORKER_FLAG: &str = "--worker";

/// What the supervisor just learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The supervisor starts. `deadline_passed`: the marker's wall-clock
    /// deadline is over (the device restarted during a long trial).
    Start { deadline_passed: bool },
    /// The worker exited; `None` when it was killed by a signal or could
    /// not be started at all.
    WorkerExited { code: Option<i32> },
    /// Time to look at the marker again during a trial.
    Tick { deadline_passed: bool },
}

/// What the supervisor does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker, no trial.
    StartWorker,
    /// Swap the staged executable in, mark the trial, start the trial worker.
    SwapIn,
    /// A trial is under way (after a supervisor restart): start the worker
    /// and keep the marker's deadline.
    ContinueTrial,
    /// Nothing new.
    KeepWaiting,
    /// Stop the worker, mark `rolled-back` with `reason`, restore the previous
    /// executable, start the worker from it.
    RollBack { reason: String },
    /// A rollback was marked before a restart: finish restoring, start the
    /// worker (which reports and clears the marker).
    FinishRollback,
    /// The new agent confirmed: clear the marker and restart into the new
    /// binary.
    Confirmed,
    /// End the supervisor with this status.
    Exit { code: i32 },
}

/// The supervisor's rules. See the module documentation.
pub fn decide(marker: Option<&Marker>, observation: Observation) -> Action {
    let state = marker.map(|m| &m.state);
    match observation {
        Observation::Start { deadline_passed } => match state {
            None => Action::StartWorker,
            Some(MarkerState::Staged) => Action::SwapIn,
            Some(MarkerState::Trial) if deadline_passed => Action::RollBack {
                reason: "the new agent did not confirm before its deadline (the device restarted during the trial)"
                    .into(),
            },
            Some(MarkerState::Trial) => Action::ContinueTrial,
            Some(MarkerState::Confirmed) => Action::Confirmed,
            Some(MarkerState::RolledBack { .. }) => Action::FinishRollback,
        },
        Observation::WorkerExited { code } => match state {
            Some(MarkerState::Staged) => Action::SwapIn,
            Some(MarkerState::Trial) => Action::RollBack {
                reason: match code {
                    Some(code) => format!("the new agent exited with status {code} during its trial"),
                    None => "the new agent could not start or was killed during its trial".into(),
                },
            },
            Some(MarkerState::Confirmed) => Action::Confirmed,
            None | Some(MarkerState::RolledBack { .. }) => match code {
                Some(code) if code == i32::from(STAGED_EXIT_CODE) => {
                    // A staged exit without a staged marker: nothing to swap.
                    Action::Exit { code: 1 }
                }
                Some(code) => Action::Exit { code },
                None => Action::Exit { code: 1 },
            },
        },
        Observation::Tick { deadline_passed } => match (state, marker) {
            (Some(MarkerState::Trial), Some(marker)) if deadline_passed => Action::RollBack {
                reason: format!(
                    "the new agent did not connect and confirm within {}",
                    humantime::format_duration(marker.timeout())
                ),
            },
            (Some(MarkerState::Confirmed), _) => Action::Confirmed,
            _ => Action::KeepWaiting,
        },
    }
}

/// Where the supervisor finds everything.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The agent executable, resolved once at start: after a swap, the
    /// running image no longer has a path, this one does.
    pub executable: PathBuf,
    /// Passed to the worker as `--config`.
    pub config_path: PathBuf,
    /// Where the self-update marker lives.
    pub state_dir: PathBuf,
}

/// How the supervisor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorExit {
    /// Exit the process with this status.
    Exit(i32),
    /// Execute `executable` again with the same arguments: a confirmed
    /// self-update replaced it.
    ReExec,
}

/// A running worker.
struct Worker {
    child: Child,
    /// Dropping it closes the pipe: the worker's signal to stop.
    stdin: Option<ChildStdin>,
}

/// Runs workers until `shutdown` completes or a worker's exit ends the
/// supervisor. See the module documentation.
pub async fn supervise(
    options: &SupervisorOptions,
    shutdown: impl Future<Output = ()>,
) -> SupervisorExit {
    let markers = MarkerStore::new(&options.state_dir);
    let mut worker: Option<Worker> = None;
    let mut trial_until: Option<Instant> = None;
    let initial = load_marker(&markers);
    let mut observation = Observation::Start {
        deadline_passed: initial
            .as_ref()
            .is_some_and(|marker| marker.deadline <= unix_now()),
    };
    tokio::pin!(shutdown);
    loop {
        let marker = load_marker(&markers);
        let action = decide(marker.as_ref(), observation);
        tracing::debug!(?observation, ?action, "supervisor");
        // Set when an action fails in a way the rules must hear about
        // (a worker that cannot be started).
        let mut immediate: Option<Observation> = None;
        match (action, marker) {
            (Action::StartWorker, _) => {
                trial_until = None;
                immediate = start(options, &mut worker);
            }
            (Action::SwapIn, Some(marker)) => match swap_in(&options.executable, &marker) {
                Ok(()) => {
                    let marker = with_deadline_from(marker, unix_now());
                    if let Err(error) = markers.transition(&marker, MarkerState::Trial) {
                        tracing::error!(%error, "cannot mark the self-update trial");
                    }
                    tracing::info!(version = %marker.version, "new agent executable in place; starting its trial");
                    trial_until = Some(Instant::now() + marker.timeout());
                    immediate = start(options, &mut worker);
                }
                Err(error) => {
                    let reason = format!("cannot swap in the new executable: {error}");
                    trial_until = None;
                    roll_back(options, &markers, &marker, reason, &mut worker).await;
                    immediate = start(options, &mut worker);
                }
            },
            (Action::ContinueTrial, Some(marker)) => {
                let left = u64::try_from(marker.deadline.saturating_sub(unix_now()))
                    .unwrap_or(0)
                    .min(marker.timeout_seconds);
                tracing::info!(version = %marker.version, seconds_left = left, "continuing the self-update trial");
                trial_until = Some(Instant::now() + Duration::from_secs(left));
                immediate = start(options, &mut worker);
            }
            (Action::RollBack { reason }, Some(marker)) => {
                trial_until = None;
                roll_back(options, &markers, &marker, reason, &mut worker).await;
                immediate = start(options, &mut worker);
            }
            (Action::FinishRollback, _) => {
                trial_until = None;
                if let Err(error) = restore_previous(&options.executable) {
                    tracing::error!(%error, "cannot restore the previous agent executable");
                }
                immediate = start(options, &mut worker);
            }
            (Action::Confirmed, _) => {
                trial_until = None;
                tracing::info!("the new agent confirmed; restarting into it");
                stop(&mut worker).await;
                match markers.remove() {
                    Ok(()) => return SupervisorExit::ReExec,
                    Err(error) => {
                        // Re-executing would find the marker again: loop.
                        tracing::error!(%error, "cannot clear the self-update marker");
                        immediate = start(options, &mut worker);
                    }
                }
            }
            (Action::Exit { code }, _) => {
                stop(&mut worker).await;
                return SupervisorExit::Exit(code);
            }
            (Action::KeepWaiting, _) => {}
            (action, None) => {
                // Only reachable if the marker vanished between the read and
                // the decision; decide again from the start.
                tracing::warn!(?action, "the self-update marker disappeared");
                immediate = start_if_idle(options, &mut worker);
            }
        }
        if let Some(next) = immediate {
            observation = next;
            continue;
        }

        observation = tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("stopping the agent");
                stop(&mut worker).await;
                return SupervisorExit::Exit(0);
            }
            code = wait(&mut worker) => {
                worker = None;
                Observation::WorkerExited { code }
            }
            () = tick(trial_until) => Observation::Tick {
                deadline_passed: trial_until.is_some_and(|until| Instant::now() >= until),
            },
        };
    }
}

/// The marker, with a corrupt one moved aside (it can no longer be acted on).
fn load_marker(markers: &MarkerStore) -> Option<Marker> {
    match markers.load() {
        Ok(marker) => marker,
        Err(StateError::Corrupt { path, reason }) => {
            tracing::error!(path = %path.display(), %reason, "self-update marker is corrupt; moving it aside");
            let mut aside = path.clone().into_os_string();
            aside.push(".corrupt");
            let _ = std::fs::rename(&path, aside);
            None
        }
        Err(error) => {
            tracing::error!(%error, "cannot read the self-update marker");
            None
        }
    }
}

/// Starts a worker; on failure, the observation to feed back.
fn start(options: &SupervisorOptions, worker: &mut Option<Worker>) -> Option<Observation> {
    match spawn_worker(options) {
        Ok(started) => {
            *worker = Some(started);
            None
        }
        Err(error) => {
            tracing::error!(%error, executable = %options.executable.display(), "cannot start the agent");
            Some(Observation::WorkerExited { code: None })
        }
    }
}

fn start_if_idle(options: &SupervisorOptions, worker: &mut Option<Worker>) -> Option<Observation> {
    if worker.is_some() {
        None
    } else {
        start(options, worker)
    }
}

fn spawn_worker(options: &SupervisorOptions) -> std::io::Result<Worker> {
    let mut child = tokio::process::Command::new(&options.executable)
        .arg(WORKER_FLAG)
        .arg("--config")
        .arg(&options.config_path)
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take();
    Ok(Worker { child, stdin })
}

/// Waits for the worker to exit; pending forever when none runs.
async fn wait(worker: &mut Option<Worker>) -> Option<i32> {
    let Some(running) = worker.as_mut() else {
        return std::future::pending().await;
    };
    match running.child.wait().await {
        Ok(status) => status.code(),
        Err(error) => {
            tracing::error!(%error, "cannot wait for the agent");
            None
        }
    }
}

/// Completes after [`MARKER_POLL_INTERVAL`] during a trial; never otherwise.
async fn tick(trial_until: Option<Instant>) {
    if trial_until.is_none() {
        return std::future::pending().await;
    }
    tokio::time::sleep(MARKER_POLL_INTERVAL).await;
}

/// Asks the worker to stop (closes its stdin), kills it after [`STOP_GRACE`].
async fn stop(worker: &mut Option<Worker>) {
    let Some(mut running) = worker.take() else {
        return;
    };
    drop(running.stdin.take());
    if tokio::time::timeout(STOP_GRACE, running.child.wait())
        .await
        .is_err()
    {
        tracing::warn!("the agent did not stop in time; killing it");
        let _ = running.child.kill().await;
    }
}

/// Kills the trial worker, marks the rollback, restores the previous binary.
async fn roll_back(
    options: &SupervisorOptions,
    markers: &MarkerStore,
    marker: &Marker,
    reason: String,
    worker: &mut Option<Worker>,
) {
    tracing::warn!(%reason, version = %marker.version, "rolling the agent back");
    if let Some(mut running) = worker.take() {
        // A failed trial gets no grace: it may be hanging.
        let _ = running.child.kill().await;
    }
    // Marked first: a crash from here on finishes the rollback at start.
    if let Err(error) = markers.transition(marker, MarkerState::RolledBack { reason }) {
        tracing::error!(%error, "cannot mark the rollback");
    }
    match restore_previous(&options.executable) {
        Ok(true) => {}
        Ok(false) => tracing::warn!("no previous executable to restore; keeping the current one"),
        Err(error) => tracing::error!(%error, "cannot restore the previous agent executable"),
    }
}

/// `path` without a trailing " (deleted)" that Linux appends to the
/// executable of a process whose file was replaced.
pub fn executable_path(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(state: MarkerState) -> Marker {
        Marker {
            deployment_id: "d1".into(),
            package: "otter-agent".into(),
            version: semver::Version::new(2, 0, 0),
            previous_version: None,
            sha256: String::new(),
            timeout_seconds: 90,
            deadline: 0,
            state,
        }
    }

    fn is_rollback(action: &Action, containing: &str) -> bool {
        matches!(action, Action::RollBack { reason } if reason.contains(containing))
    }

    #[test]
    fn decisions() {
        use MarkerState::*;
        use Observation::*;
        let rolled = RolledBack { reason: "x".into() };
        let staged_code = Some(i32::from(STAGED_EXIT_CODE));
        let fresh = Start {
            deadline_passed: false,
        };
        let late = Start {
            deadline_passed: true,
        };
        let early_tick = Tick {
            deadline_passed: false,
        };
        let late_tick = Tick {
            deadline_passed: true,
        };
        let cases: Vec<(Option<MarkerState>, Observation, Action)> = vec![
            (None, fresh, Action::StartWorker),
            (Some(Staged), fresh, Action::SwapIn),
            (Some(Trial), fresh, Action::ContinueTrial),
            (Some(Confirmed), fresh, Action::Confirmed),
            (Some(rolled.clone()), fresh, Action::FinishRollback),
            (
                None,
                WorkerExited { code: Some(0) },
                Action::Exit { code: 0 },
            ),
            (
                None,
                WorkerExited { code: Some(2) },
                Action::Exit { code: 2 },
            ),
            (None, WorkerExited { code: None }, Action::Exit { code: 1 }),
            (
                None,
                WorkerExited { code: staged_code },
                Action::Exit { code: 1 },
            ),
            (
                Some(Staged),
                WorkerExited { code: staged_code },
                Action::SwapIn,
            ),
            (Some(Staged), WorkerExited { code: Some(1) }, Action::SwapIn),
            (
                Some(Confirmed),
                WorkerExited { code: Some(0) },
                Action::Confirmed,
            ),
            (
                Some(rolled.clone()),
                WorkerExited { code: Some(3) },
                Action::Exit { code: 3 },
            ),
            (Some(Trial), early_tick, Action::KeepWaiting),
            (Some(Confirmed), early_tick, Action::Confirmed),
            (None, late_tick, Action::KeepWaiting),
            (Some(Staged), late_tick, Action::KeepWaiting),
        ];
        for (state, observation, expected) in cases {
            let marker = state.clone().map(marker);
            assert_eq!(
                decide(marker.as_ref(), observation),
                expected,
                "{state:?} + {observation:?}"
            );
        }
        let trial = marker(Trial);
        assert!(is_rollback(
            &decide(Some(&trial), WorkerExited { code: Some(1) }),
            "exited with status 1"
        ));
        assert!(is_rollback(
            &decide(Some(&trial), WorkerExited { code: None }),
            "could not start or was killed"
        ));
        assert!(is_rollback(
            &decide(Some(&trial), late_tick),
            "within 1m 30s"
        ));
        assert!(is_rollback(
            &decide(Some(&trial), late),
            "restarted during the trial"
        ));
    }

    #[test]
    fn deleted_suffix_is_dropped() {
        assert_eq!(
            executable_path(Path::new("/opt/otter-agent (deleted)")),
            Path::new("/opt/otter-agent")
        );
        assert_eq!(
            executable_path(Path::new("/opt/otter-agent")),
            Path::new("/opt/otter-agent")
        );
    }
}
