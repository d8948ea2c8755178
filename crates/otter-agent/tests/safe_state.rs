//! The safe-state wait with a real probe command: a probe that fails twice
//! then succeeds, a deadline that passes, a probe that cannot run.

use std::time::Duration;

use otter_agent::safe_state::{
    AlwaysSafe, CommandProbe, SafeStateError, SafeStatePolicy, SafeStateProbe, wait_for_safe_state,
};
use tokio_util::sync::CancellationToken;

fn policy(deadline: Duration) -> SafeStatePolicy {
    SafeStatePolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        deadline,
    }
}

/// Waits for `probe` with the test policy and `deadline`, never cancelled.
async fn wait_uncancelled(
    probe: &dyn SafeStateProbe,
    deadline: Duration,
) -> Result<(), SafeStateError> {
    wait_for_safe_state(probe, &policy(deadline), &CancellationToken::new()).await
}

/// A probe script that counts its calls in a file and succeeds from the
/// third call on.
fn counting_probe(dir: &std::path::Path) -> (CommandProbe, std::path::PathBuf) {
    let counter = dir.join("calls");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ]",
        c = counter.display()
    );
    (
        CommandProbe::new(vec!["sh".into(), "-c".into(), script]),
        counter,
    )
}

#[tokio::test]
async fn probe_failing_twice_then_succeeding_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let (probe, counter) = counting_probe(dir.path());
    wait_uncancelled(&probe, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(counter).unwrap().trim(), "3");
}

#[tokio::test]
async fn deadline_exceeded_is_an_error() {
    let probe = CommandProbe::new(vec!["false".into()]);
    let error = wait_uncancelled(&probe, Duration::from_millis(150))
        .await
        .unwrap_err();
    assert!(
        matches!(error, SafeStateError::DeadlineExceeded(_)),
        "{error}"
    );
}

#[tokio::test]
async fn a_probe_that_cannot_run_stops_the_wait() {
    let probe = CommandProbe::new(vec!["/nonexistent/is-it-safe".into()]);
    let error = wait_uncancelled(&probe, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(error, SafeStateError::ProbeFailed { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("is-it-safe"), "{error}");
}

#[tokio::test]
async fn always_safe_and_cancellation() {
    wait_uncancelled(&AlwaysSafe, Duration::from_secs(1))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let probe = CommandProbe::new(vec!["false".into()]);
    let error = wait_for_safe_state(&probe, &policy(Duration::from_secs(30)), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(error, SafeStateError::Cancelled), "{error}");
}
