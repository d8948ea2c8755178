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
