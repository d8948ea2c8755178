//! Agent self-update end to end, with real processes: an `otter-server`, an
//! `otter-agent` supervisor running a *copy* of the agent binary from the
//! test's temporary folder (the build's own binary is never swapped), and
//! `agent`-kind packages deployed with the `otter` CLI.
//!
//! - A good new agent (the real binary with some bytes appended, so it
//!   differs and still runs) is swapped in, confirms, is reported
//!   `installed`, and the supervisor restarts into it.
//! - A new agent that exits at once, and one that hangs past the trial
//!   deadline, are rolled back: the deployment ends `rolled-back` with the
//!   reason, the original executable is back byte for byte, and the restored
//!   agent keeps working.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use otter_proto::api::{DeploymentStatus, DeviceInfo};
use otter_proto::deployment::Phase;
use support::{Process, Server, binary, otter_offline, wait_for};

const WAIT: Duration = Duration::from_secs(120);

/// A server with a fresh signing key.
fn start_server(root: &Path) -> (Server, PathBuf) {
    let key = root.join("signing.key");
    let output = otter_offline(&["keys", "generate", "--out", key.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let server = Server::start(root, &[&root.join("signing.key.pub")]);
    (server, key)
}

/// Enrols `id` and appends `extra` to its `agent.toml`.
fn enroll(server: &Server, root: &Path, id: &str, extra: &str) -> PathBuf {
    let dir = root.join(id);
    server.otter_ok(&[
        "device",
        "enroll",
        id,
        "--hardware",
        "revB",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let config = dir.join("agent.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(extra);
    fs::write(&config, text).unwrap();
    dir
}

/// Copies the agent binary into `root/bin`, where a self-update may
/// replace it.
fn agent_copy(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("otter-agent");
    fs::copy(binary("otter-agent"), &exe).unwrap();
    exe
}

fn start_agent(exe: &Path, device_dir: &Path, root: &Path, name: &str) -> Process {
    Process::spawn(
        name,
        Command::new(exe)
            .arg("--config")
            .arg(device_dir.join("agent.toml")),
        root,
    )
}

fn build_package(
    root: &Path,
    key: &Path,
    name: &str,
    version: &str,
    kind: &str,
    payload: &Path,
) -> PathBuf {
    let out = root.join(format!("{name}-{version}.otter"));
    let output = otter_offline(&[
        "package",
        "build",
        "--key",
        key.to_str().unwrap(),
        "--name",
        name,
        "--version",
        version,
        "--kind",
        kind,
        "--hardware",
        "revB",
        "--out",
        out.to_str().unwrap(),
        payload.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "package build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Uploads the package and deploys it to one device; returns the deployment.
fn deploy(server: &Server, package: &Path, release: &str, device: &str) -> String {
    server.otter_ok(&["release", "upload", package.to_str().unwrap()]);
    server
        .otter_ok(&[
            "deploy",
            "create",
            "--release",
            release,
            "--target",
            &format!("device:{device}"),
        ])
        .trim()
        .to_owned()
}

fn wait_complete(server: &Server, deployment: &str) -> DeploymentStatus {
    wait_for(
        &format!("deployment {deployment} to complete"),
        WAIT,
        || {
            let status: DeploymentStatus = server.otter_json(&["deploy", "status", deployment]);
            status.info.complete.then_some(status)
        },
    )
}

fn device(server: &Server, id: &str) -> DeviceInfo {
    let devices: Vec<DeviceInfo> = server.otter_json(&["devices", "list"]);
    devices
        .into_iter()
        .find(|d| d.device_id.as_str() == id)
        .expect("device listed")
}

fn wait_registered(server: &Server, id: &str) {
    wait_for(&format!("{id} to register"), WAIT, || {
        device(server, id).mode.is_some().then_some(())
    });
}

fn assert_running(agent: &mut Process) {
    assert_eq!(agent.exited(), None, "the agent supervisor exited");
}

/// Deploys a small firmware and checks the running agent installs it.
fn prove_agent_works(server: &Server, root: &Path, key: &Path, dir: &Path, id: &str) {
    let payload = root.join("firmware.bin");
    let bytes = b"firmware after the self-update".to_vec();
    fs::write(&payload, &bytes).unwrap();
    let package = build_package(root, key, "sensor-fw", "1.0.0", "firmware", &payload);
    let deployment = deploy(server, &package, "sensor-fw@1.0.0", id);
    let status = wait_complete(server, &deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert_eq!(fs::read(dir.join("installed/sensor-fw")).unwrap(), bytes);
}

#[test]
fn self_update_swaps_in_the_new_agent_and_restarts_into_it() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) = start_server(root);
    let dir = enroll(
        &server,
        root,
        "dev-u",
        "\n[self_update]\ndeadline = \"90s\"\n",
    );
    let exe = agent_copy(root);
    let original = fs::read(&exe).unwrap();
    let mut agent = start_agent(&exe, &dir, root, "dev-u");
    wait_registered(&server, "dev-u");
    let supervisor_pid = agent.pid();

    // The real agent with bytes appended: a different file that still runs
    // (the ELF loader ignores trailing data).
    let mut new_agent = original.clone();
    new_agent.extend_from_slice(b"\n-- otter self-update test build --\n");
    let payload = root.join("new-otter-agent");
    fs::write(&payload, &new_agent).unwrap();
    let package = build_package(root, &key, "otter-agent", "2.0.0", "agent", &payload);
    let deployment = deploy(&server, &package, "otter-agent@2.0.0", "dev-u");
    let status = wait_complete(&server, &deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");

    assert!(
        fs::read(&exe).unwrap() == new_agent,
        "the executable is not the new agent"
    );
    assert!(
        fs::read(root.join("bin/otter-agent.previous")).unwrap() == original,
        "the previous executable was not kept"
    );
    assert!(!root.join("bin/.otter-agent.new").exists());
    assert_eq!(
        device(&server, "dev-u")
            .installed
            .get("otter-agent")
            .map(ToString::to_string),
        Some("2.0.0".to_owned())
    );

    // The supervisor clears the marker and re-executes itself into the new
    // binary: same pid, and its executable is a live file again.
    let marker = dir.join("state/self-update.json");
    wait_for("the supervisor to restart into the new agent", WAIT, || {
        let image = fs::read_link(format!("/proc/{supervisor_pid}/exe")).ok()?;
        (!marker.exists() && image == exe).then_some(())
    });
    assert_running(&mut agent);
    assert_eq!(agent.pid(), supervisor_pid);

    // The restarted agent is registered and installs the next release.
    prove_agent_works(&server, root, &key, &dir, "dev-u");
    assert_running(&mut agent);
    let log = agent.log_text();
    assert!(log.contains("self-update confirmed"), "{log}");
}

#[test]
fn broken_new_agents_are_rolled_back_and_reported() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) = start_server(root);
    let dir = enroll(
        &server,
        root,
        "dev-b",
        "\n[self_update]\ndeadline = \"4s\"\n",
    );
    let exe = agent_copy(root);
    let original = fs::read(&exe).unwrap();
    let mut agent = start_agent(&exe, &dir, root, "dev-b");
    wait_registered(&server, "dev-b");

    let cases = [
        (
            "2.0.0",
            "#!/bin/sh\nexit 1\n",
            "exited with status 1 during its trial",
        ),
        // `exec`, so that killing the trial process kills the sleep.
        (
            "2.0.1",
            "#!/bin/sh\nexec sleep 600\n",
            "did not connect and confirm within 4s",
        ),
    ];
    for (version, script, reason) in cases {
        let payload = root.join(format!("broken-{version}"));
        fs::write(&payload, script).unwrap();
        let package = build_package(root, &key, "otter-agent", version, "agent", &payload);
        let deployment = deploy(
            &server,
            &package,
            &format!("otter-agent@{version}"),
            "dev-b",
        );
        let status = wait_complete(&server, &deployment);
        let target = &status.targets[0];
        assert_eq!(target.phase, Phase::RolledBack, "{version}: {status:?}");
        let detail = target.detail.clone().unwrap_or_default();
        assert!(detail.contains(reason), "{version}: reason {detail:?}");

        // The report came from the restored agent; the files are as before.
        assert!(
            fs::read(&exe).unwrap() == original,
            "{version}: the original executable is not back"
        );
        assert!(!root.join("bin/otter-agent.previous").exists());
        wait_for("the marker to be cleared", WAIT, || {
            (!dir.join("state/self-update.json").exists()).then_some(())
        });
        assert_running(&mut agent);
        assert_eq!(
            device(&server, "dev-b").installed.get("otter-agent"),
            None,
            "{version}: a rolled-back version is listed as installed"
        );
    }

    // The restored agent re-registered and keeps working.
    prove_agent_works(&server, root, &key, &dir, "dev-b");
    assert_running(&mut agent);
}
