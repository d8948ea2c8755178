//! The `otter-agent` binary: a bad or missing configuration ends the process
//! with a non-zero status and a message naming the problem.

use std::process::Command;

/// A complete configuration whose files (CA, certificate, key) are absent.
const VALID_CONFIG: &str = r#"
device_id = "dev-1"
hardware = "revB"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["s.pub"]
"#;

fn run_with_config(path: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_otter-agent"))
        .arg("--config")
        .arg(path)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_with_config(&dir.path().join("agent.toml"));
    assert!(!ok);
    assert!(stderr.contains("agent.toml"), "{stderr}");
}

#[test]
fn unknown_handler() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("{VALID_CONFIG}[install]\nhandler = \"floppy\"\n"),
    )
    .unwrap();
    let (ok, stderr) = run_with_config(&path);
    assert!(!ok);
    assert!(stderr.contains("floppy"), "{stderr}");
}

#[test]
fn config_from_the_environment_with_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, VALID_CONFIG).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_otter-agent"))
        .env("OTTER_AGENT_CONFIG", &path)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ca.crt") && stderr.contains("`ca`"),
        "{stderr}"
    );
}

/// Waits for `condition`, failing after ten seconds.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `otter-agent inhibit -- COMMAND` holds its inhibitor while the command
/// runs, releases it when the command ends, and exits with its status.
#[tokio::test]
async fn inhibit_holds_while_the_command_runs() {
    use otter_agent::inhibit::{InhibitServer, Inhibitors};

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, VALID_CONFIG).unwrap();
    // The agent's side, on the default socket `<state_dir>/inhibit.sock`.
    let inhibitors = Inhibitors::new();
    let server =
        InhibitServer::start(&dir.path().join("state/inhibit.sock"), inhibitors.clone()).unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_otter-agent"))
        .current_dir(dir.path())
        .args(["inhibit", "--config"])
        .arg(&config)
        .args([
            "--reason",
            "batch running",
            "--name",
            "batch-42",
            "--ttl",
            "10m",
        ])
        .args(["--", "sh", "-c"])
        .arg("touch started; while [ ! -e go ]; do sleep 0.02; done; exit 7")
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap();
    wait_for("the command to start", || {
        dir.path().join("started").exists()
    })
    .await;
    let held = inhibitors.list(None, std::time::Instant::now());
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].name, "batch-42");
    assert_eq!(held[0].reason, "batch running");
    assert!(held[0].ttl_seconds > 590 && held[0].ttl_seconds <= 600);

    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_otter-agent"))
        .args(["--config"])
        .arg(&config)
        .args(["inhibit", "--list"])
        .env("RUST_LOG", "off")
        .output()
        .await
        .unwrap();
    assert!(listed.status.success());
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        stdout.contains("batch-42") && stdout.contains("batch running"),
        "{stdout}"
    );

    std::fs::write(dir.path().join("go"), b"").unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(7));
    wait_for("the release", || {
        inhibitors.first_held(std::time::Instant::now()).is_none()
    })
    .await;
    server.stop().await;
}

/// Without an agent to take the inhibitor from, the command does not run.
#[test]
fn inhibit_without_an_agent_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, VALID_CONFIG).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_otter-agent"))
        .current_dir(dir.path())
        .arg("--config")
        .arg(&config)
        .args(["inhibit", "--reason", "batch", "--", "touch", "ran"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("inhibit.sock"), "{stderr}");
    assert!(!dir.path().join("ran").exists());
}
