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

use otter_proto::api::{DeploymentStatus, DeviceInfo};
use otter_proto::deployment::Phase;
use support::{
    Process, Server, WAIT, binary, build_firmware, build_package, edit_agent_config, enroll,
    start_agent_exe, start_server_with_key, wait_for, with_fast_poll, with_mode,
};

/// Copies the agent binary into `root/bin`, where a self-update may
/// replace it.
fn agent_copy(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("otter-agent");
    fs::copy(binary("otter-agent"), &exe).unwrap();
    exe
}

/// A server and one enrolled device whose agent supervisor runs a copy of
/// the agent binary, registered and ready for a self-update.
struct Rig {
    server: Server,
    key: PathBuf,
    dir: PathBuf,
    exe: PathBuf,
    /// The agent copy's bytes before any update.
    original: Vec<u8>,
    agent: Process,
}

/// Starts a [`Rig`] for device `id` in `mode` with a self-update trial
/// `deadline`.
fn start_rig(root: &Path, id: &str, mode: &str, deadline: &str) -> Rig {
    let (server, key) = start_server_with_key(root, &[]);
    let dir = enroll(&server, root, id, None);
    edit_agent_config(&dir, |text| {
        with_fast_poll(&with_mode(&text, mode))
            + &format!("\n[self_update]\ndeadline = \"{deadline}\"\n")
    });
    let exe = agent_copy(root);
    let original = fs::read(&exe).unwrap();
    let agent = start_agent_exe(&exe, root, id, &dir);
    wait_registered(&server, id);
    Rig {
        server,
        key,
        dir,
        exe,
        original,
        agent,
    }
}

/// Uploads the package and deploys it to one device; returns the deployment.
fn deploy(server: &Server, package: &Path, release: &str, device: &str) -> String {
    server.upload_and_deploy(package, release, &format!("device:{device}"))
}

fn device(server: &Server, id: &str) -> DeviceInfo {
    server.device(id).expect("device listed")
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
    let bytes = b"firmware after the self-update".to_vec();
    let package = build_firmware(root, key, "1.0.0", &bytes);
    let deployment = deploy(server, &package, "sensor-fw@1.0.0", id);
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert_eq!(fs::read(dir.join("installed/sensor-fw")).unwrap(), bytes);
}

/// Builds `otter-agent` `version` of `executable`, deploys it to `device`
/// and waits for the deployment to complete.
fn deploy_agent(
    server: &Server,
    root: &Path,
    key: &Path,
    version: &str,
    executable: &[u8],
    device: &str,
) -> DeploymentStatus {
    let package = build_package(root, key, "otter-agent", version, "agent", executable);
    let deployment = deploy(server, &package, &format!("otter-agent@{version}"), device);
    server.wait_deployment_complete(&deployment)
}

#[test]
fn self_update_swaps_in_the_new_agent_and_restarts_into_it() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let Rig {
        server,
        key,
        dir,
        exe,
        original,
        mut agent,
    } = start_rig(root, "dev-u", "push-pull", "90s");
    let supervisor_pid = agent.pid();

    // The real agent with bytes appended: a different file that still runs
    // (the ELF loader ignores trailing data).
    let mut new_agent = original.clone();
    new_agent.extend_from_slice(b"\n-- otter self-update test build --\n");
    let status = deploy_agent(&server, root, &key, "2.0.0", &new_agent, "dev-u");
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
    let Rig {
        server,
        key,
        dir,
        exe,
        original,
        mut agent,
    } = start_rig(root, "dev-b", "push-pull", "4s");

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
        let status = deploy_agent(&server, root, &key, version, script.as_bytes(), "dev-b");
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

/// In pull mode there is no CONNACK: the new agent confirms only once the
/// server has answered one of its polls, then reports `installed`.
#[test]
fn pull_mode_self_update_confirms_after_an_answered_poll() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let Rig {
        server,
        key,
        dir,
        exe,
        original,
        mut agent,
    } = start_rig(root, "dev-p", "pull", "90s");
    let mut new_agent = original.clone();
    new_agent.extend_from_slice(b"\n-- otter self-update test build (pull) --\n");
    let status = deploy_agent(&server, root, &key, "2.0.0", &new_agent, "dev-p");
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert!(
        fs::read(&exe).unwrap() == new_agent,
        "the executable is not the new agent"
    );
    let log = agent.log_text();
    assert!(log.contains("self-update confirmed"), "{log}");
    assert_running(&mut agent);
    prove_agent_works(&server, root, &key, &dir, "dev-p");
}
