//! The health check after an install (`[health]` in `agent.toml`).
//!
//! [`check_health`] runs the configured argv (with `{name}`, `{version}` and
//! `{payload}` substituted, as for install commands) until it exits 0 or the
//! deadline passes, with a short backoff between attempts; each attempt is
//! itself cut off at the deadline. The error says why the last attempt
//! failed (exit status and the tail of its stderr), which the agent reports
//! with the rollback.

use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::HealthConfig;
use crate::install::{InstallRequest, STDERR_TAIL_BYTES, read_tail, substitute};

/// Why an install is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// No attempt succeeded before the deadline; the last one's failure.
    #[error("health check failed: {last}")]
    Unhealthy { last: String },
    #[error("health check cancelled")]
    Cancelled,
}

/// Runs the health check for `request` until it passes, the deadline
/// passes, or `cancel` fires.
pub async fn check_health(
    config: &HealthConfig,
    request: &InstallRequest,
    cancel: &CancellationToken,
) -> Result<(), HealthError> {
    let deadline = Instant::now() + config.deadline;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let argv = substitute(&config.command, request);
    let mut last: Option<Attempt> = None;
    loop {
        let failure = tokio::select! {
            result = attempt(&argv, request, deadline) => match result {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            },
            () = cancel.cancelled() => return Err(HealthError::Cancelled),
        };
        tracing::info!(%failure, "health check not passed yet");
        let now = Instant::now();
        if now >= deadline {
            // An attempt cut off by the deadline says less than the
            // failure before it.
            let last = match (failure, last) {
                (Attempt::TimedOut, Some(Attempt::Failed(earlier))) => earlier,
                (failure, _) => failure.to_string(),
            };
            return Err(HealthError::Unhealthy { last });
        }
        last = Some(failure);
        let delay = backoff.next_delay().min(deadline - now);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Err(HealthError::Cancelled),
        }
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum Attempt {
    Failed(String),
    TimedOut,
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Failed(reason) => f.write_str(reason),
            Attempt::TimedOut => f.write_str("no answer before the deadline"),
        }
    }
}

/// One run of the command.
async fn attempt(
    argv: &[String],
    request: &InstallRequest,
    deadline: Instant,
) -> Result<(), Attempt> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Attempt::Failed("empty health command".into()));
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("OTTER_DEPLOYMENT_ID", &request.deployment_id)
        .env("OTTER_PACKAGE_NAME", &request.name)
        .env("OTTER_PACKAGE_VERSION", request.version.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Attempt::Failed(format!("cannot start {program:?}: {e}")))?;
    let stderr = child.stderr.take();
    let run = async {
        let tail = match stderr {
            Some(stderr) => read_tail(stderr, STDERR_TAIL_BYTES).await,
            None => Vec::new(),
        };
        (child.wait().await, tail)
    };
    // Dropping `run` at the deadline drops the child, which kills it.
    let (status, tail) = tokio::time::timeout_at(deadline, run)
        .await
        .map_err(|_| Attempt::TimedOut)?;
    let status =
        status.map_err(|e| Attempt::Failed(format!("cannot wait for {program:?}: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let tail = String::from_utf8_lossy(&tail).trim().to_owned();
    let status = match status.code() {
        Some(code) => format!("exit {code}"),
        None => status.to_string(),
    };
    Err(Attempt::Failed(if tail.is_empty() {
        status
    } else {
        format!("{status}: {tail}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> InstallRequest {
        InstallRequest {
            deployment_id: "d1".into(),
            name: "web".into(),
            version: semver::Version::new(2, 0, 0),
            kind: otter_proto::manifest::PackageKind::Application,
            payload: "/nonexistent".into(),
        }
    }

    fn config(script: &str, deadline: Duration) -> HealthConfig {
        HealthConfig {
            command: vec!["sh".into(), "-c".into(), script.into()],
            deadline,
        }
    }

    #[tokio::test]
    async fn passes_fails_and_retries() {
        let cancel = CancellationToken::new();
        let ok = config(
            "test \"$OTTER_PACKAGE_VERSION\" = 2.0.0",
            Duration::from_secs(5),
        );
        check_health(&ok, &request(), &cancel).await.unwrap();

        let bad = config("echo broken {name} >&2; exit 3", Duration::from_secs(1));
        let error = check_health(&bad, &request(), &cancel).await.unwrap_err();
        assert_eq!(error.to_string(), "health check failed: exit 3: broken web");

        // Healthy on the third attempt: retried within the deadline.
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("count");
        let script = format!(
            "echo x >> {0}; test $(wc -l < {0}) -ge 3",
            counter.display()
        );
        check_health(
            &config(&script, Duration::from_secs(10)),
            &request(),
            &cancel,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&counter).unwrap().lines().count(),
            3
        );

        let slow = config("sleep 10", Duration::from_millis(300));
        let error = check_health(&slow, &request(), &cancel).await.unwrap_err();
        assert!(error.to_string().contains("deadline"), "{error}");
    }
}
