//! Step 7: waiting until the device says it is safe to install.
//!
//! A [`SafeStateProbe`] answers "is it safe now?". [`CommandProbe`] runs the
//! configured argv (exit status 0 = safe); [`AlwaysSafe`] stands for an empty
//! command. [`wait_for_safe_state`] asks again with exponential backoff until
//! the answer is yes or the deadline passes. A probe may say why it is not
//! safe ([`SafeStateProbe::check`]); the agent's inhibitors
//! ([`crate::inhibit::InhibitorGate`]) do, and the wait logs the reason each
//! time it changes.
//!
//! The deadline counts from the start of the wait in this run of the agent:
//! a restart starts a new wait (the job stage is persisted, its timing is
//! not).

use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Longest a single probe may run before it counts as "not safe".
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why no safe state was reached.
#[derive(Debug, thiserror::Error)]
pub enum SafeStateError {
    #[error("no safe state reached within {0:?}")]
    DeadlineExceeded(Duration),
    #[error("safe-state probe {command:?} cannot run: {source}")]
    ProbeFailed {
        command: String,
        source: std::io::Error,
    },
    #[error("safe-state wait cancelled")]
    Cancelled,
}

/// A probe's answer with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Safety {
    Safe,
    /// Not yet, and why.
    NotSafe(String),
}

/// Answers whether the device is in a safe state to install right now.
pub trait SafeStateProbe: Send + Sync {
    /// `Ok(true)` when safe; `Ok(false)` when not yet; `Err` when the probe
    /// itself is broken (the wait stops: waiting would not fix it).
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>>;

    /// Like [`SafeStateProbe::is_safe`], with the reason when not safe. The
    /// default asks `is_safe` and gives a generic reason.
    fn check(&self) -> BoxFuture<'_, Result<Safety, SafeStateError>> {
        Box::pin(async move {
            Ok(if self.is_safe().await? {
                Safety::Safe
            } else {
                Safety::NotSafe("the safe-state probe says not safe".into())
            })
        })
    }
}

/// The probe of an empty `safe_state.command`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysSafe;

impl SafeStateProbe for AlwaysSafe {
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
        Box::pin(async { Ok(true) })
    }
}

/// Runs a command; exit status 0 means safe.
#[derive(Debug, Clone)]
pub struct CommandProbe {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandProbe {
    /// `argv` must not be empty (see [`probe_for`]).
    pub fn new(argv: Vec<String>) -> Self {
        CommandProbe {
            argv,
            timeout: PROBE_TIMEOUT,
        }
    }
}

impl SafeStateProbe for CommandProbe {
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
        Box::pin(async move {
            let Some((program, args)) = self.argv.split_first() else {
                return Ok(true);
            };
            let spawned = tokio::process::Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = spawned.map_err(|source| SafeStateError::ProbeFailed {
                command: self.argv.join(" "),
                source,
            })?;
            match tokio::time::timeout(self.timeout, child.wait()).await {
                Ok(Ok(status)) => Ok(status.success()),
                Ok(Err(source)) => Err(SafeStateError::ProbeFailed {
                    command: self.argv.join(" "),
                    source,
                }),
                Err(_elapsed) => {
                    tracing::warn!(timeout = ?self.timeout, "safe-state probe timed out; not safe");
                    // kill_on_drop reaps it when `child` goes out of scope.
                    Ok(false)
                }
            }
        })
    }
}

/// The probe for a configured command: [`AlwaysSafe`] when it is empty.
pub fn probe_for(command: &[String]) -> Box<dyn SafeStateProbe> {
    if command.is_empty() {
        Box::new(AlwaysSafe)
    } else {
        Box::new(CommandProbe::new(command.to_vec()))
    }
}

/// How long and how often to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeStatePolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub deadline: Duration,
}

/// Asks `probe` until it answers safe, sleeping with backoff in between;
/// fails once `policy.deadline` has passed without a safe answer.
pub async fn wait_for_safe_state(
    probe: &dyn SafeStateProbe,
    policy: &SafeStatePolicy,
    cancel: &CancellationToken,
) -> Result<(), SafeStateError> {
    let deadline = tokio::time::Instant::now() + policy.deadline;
    let mut backoff = Backoff::new(policy.initial_backoff, policy.max_backoff);
    let mut last_reason = None;
    loop {
        let answer = tokio::select! {
            answer = probe.check() => answer?,
            () = cancel.cancelled() => return Err(SafeStateError::Cancelled),
        };
        let reason = match answer {
            Safety::Safe => return Ok(()),
            Safety::NotSafe(reason) => reason,
        };
        if last_reason.as_ref() != Some(&reason) {
            tracing::info!(%reason, "waiting for safe state");
            last_reason = Some(reason);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(SafeStateError::DeadlineExceeded(policy.deadline));
        }
        // Never sleep past the deadline: the last probe happens at it.
        let delay = backoff.next_delay().min(deadline - now);
        tracing::debug!(?delay, "device not in a safe state; waiting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Err(SafeStateError::Cancelled),
        }
    }
}
