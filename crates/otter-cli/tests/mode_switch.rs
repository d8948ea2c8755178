//! Mode switch by update, end to end with real processes: devices enrolled
//! in one mode receive an `otter-agent-config` package (kind `config`) that
//! sets `mode = "push-pull"`; each agent validates it, writes its overlay,
//! reports `installed`, restarts its internals with the merged
//! configuration and re-registers in the new mode; a second release then
//! reaches them through push-pull (link + download, no push transfer).
//! A bad configuration package is refused (`failed`, with the reason) and
//! the agent keeps running in its old mode.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use otter_proto::api::{AuditEntry, DeploymentStatus, DeviceInfo};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{Process, Server, binary, otter_offline, wait_for};

const WAIT: Duration = Duration::from_secs(120);

/// The name the agent recognises as its own configuration.
const CONFIG_PACKAGE: &str = "otter-agent-config";

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

/// Enrols `id` with `tag`, sets `mode` in its agent.toml and starts it.
fn enroll_in_mode(
    server: &Server,
    root: &Path,
    id: &str,
    tag: &str,
    mode: &str,
) -> (PathBuf, Process) {
    let dir = root.join(id);
    server.otter_ok(&[
        "device",
        "enroll",
        id,
        "--tags",
        tag,
        "--hardware",
        "revB",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let config = dir.join("agent.toml");
    let text = fs::read_to_string(&config).unwrap();
    // Pull devices poll every second, so the test does not wait for them.
    let edited = text
        .replacen("mode = \"push-pull\"", &format!("mode = \"{mode}\""), 1)
        .replacen("poll_interval = \"30s\"", "poll_interval = \"1s\"", 1);
    assert!(
        edited.contains(&format!("mode = \"{mode}\"")) && edited.contains("poll_interval = \"1s\""),
        "mode not set in {edited}"
    );
    fs::write(&config, edited).unwrap();
    let agent = Process::spawn(
        id,
        Command::new(binary("otter-agent"))
            .arg("--config")
            .arg(&config),
        root,
    );
    (dir, agent)
}

fn build_package(
    root: &Path,
    key: &Path,
    name: &str,
    version: &str,
    kind: &str,
    payload: &[u8],
) -> PathBuf {
    let input = root.join(format!("{name}-{version}.payload"));
    fs::write(&input, payload).unwrap();
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
        input.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "package build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

fn deploy(server: &Server, package: &Path, release: &str, target: &str) -> String {
    server.otter_ok(&["release", "upload", package.to_str().unwrap()]);
    server
        .otter_ok(&["deploy", "create", "--release", release, "--target", target])
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

fn devices(server: &Server) -> Vec<DeviceInfo> {
    server.otter_json(&["devices", "list"])
}

fn wait_modes(server: &Server, ids: &[&str], mode: Mode) {
    wait_for(
        &format!("{ids:?} registered in mode {mode:?}"),
        WAIT,
        || {
            let all = devices(server);
            ids.iter()
                .all(|id| {
                    all.iter()
                        .any(|d| d.device_id.as_str() == *id && d.mode == Some(mode))
                })
                .then_some(())
        },
    );
}

fn audit_events(server: &Server, device: &str, deployment: &str) -> Vec<String> {
    let audit: Vec<AuditEntry> = server.otter_json(&[
        "audit",
        "list",
        "--device",
        device,
        "--deployment",
        deployment,
    ]);
    audit.into_iter().map(|e| e.event).collect()
}

/// Devices in `start` mode are switched to push-pull by one config
/// deployment (whose audit shows `delivered_by`, the start mode's transfer),
/// then install a second release through push-pull.
fn switch_to_push_pull(start: &str, start_mode: Mode, delivered_by: &str) {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) = start_server(root);
    let ids = ["dev-1", "dev-2"];
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for id in ids {
        let (dir, agent) = enroll_in_mode(&server, root, id, "switch", start);
        dirs.push(dir);
        agents.push(agent);
    }
    wait_modes(&server, &ids, start_mode);

    // One deployment of the agent's configuration, delivered in `start` mode.
    let config = build_package(
        root,
        &key,
        CONFIG_PACKAGE,
        "1.0.0",
        "config",
        b"# fleet switch\nmode = \"push-pull\"\n",
    );
    let deployment = deploy(
        &server,
        &config,
        &format!("{CONFIG_PACKAGE}@1.0.0"),
        "fleet:switch",
    );
    let status = wait_complete(&server, &deployment);
    for target in &status.targets {
        assert_eq!(target.phase, Phase::Installed, "{status:?}");
        let events = audit_events(&server, target.device_id.as_str(), &deployment);
        assert!(
            events.iter().any(|e| e == delivered_by),
            "{}: the configuration was not delivered in {start} mode: {events:?}",
            target.device_id
        );
    }
    // Without manual intervention, each agent runs again in its new mode.
    wait_modes(&server, &ids, Mode::PushPull);
    for (id, dir) in ids.iter().zip(&dirs) {
        let overlay = fs::read_to_string(dir.join("state/remote-config.toml")).unwrap();
        assert!(overlay.contains("push-pull"), "{id}: overlay {overlay}");
        let device = devices(&server)
            .into_iter()
            .find(|d| d.device_id.as_str() == *id)
            .unwrap();
        assert_eq!(
            device
                .installed
                .get(CONFIG_PACKAGE)
                .map(ToString::to_string),
            Some("1.0.0".to_owned()),
            "{id}"
        );
    }

    // A second release goes through push-pull: a link and a download.
    let firmware = b"second release, delivered by push-pull".to_vec();
    let package = build_package(root, &key, "sensor-fw", "1.0.0", "firmware", &firmware);
    let second = deploy(&server, &package, "sensor-fw@1.0.0", "fleet:switch");
    let status = wait_complete(&server, &second);
    for target in &status.targets {
        assert_eq!(target.phase, Phase::Installed, "{status:?}");
    }
    for (id, dir) in ids.iter().zip(&dirs) {
        assert_eq!(fs::read(dir.join("installed/sensor-fw")).unwrap(), firmware);
        let events = audit_events(&server, id, &second);
        for expected in ["link.created", "notification.sent", "download.served"] {
            assert!(
                events.iter().any(|e| e == expected),
                "{id}: no {expected} in {events:?}"
            );
        }
        assert!(
            !events.iter().any(|e| e.starts_with("push.")),
            "{id}: the second release was pushed: {events:?}"
        );
    }
    for agent in &mut agents {
        assert_eq!(agent.exited(), None, "{} exited", agent.name);
    }
}

#[test]
fn push_devices_switch_to_push_pull_by_a_config_deployment() {
    switch_to_push_pull("push", Mode::Push, "push.offered");
}

#[test]
fn pull_devices_switch_to_push_pull_by_a_config_deployment() {
    // A pull device hears of the deployment in a poll answer, which also
    // creates its link; it has no MQTT notification.
    switch_to_push_pull("pull", Mode::Pull, "link.created");
}

#[test]
fn a_bad_configuration_is_refused_and_the_agent_keeps_its_mode() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) = start_server(root);
    let (dir, mut agent) = enroll_in_mode(&server, root, "dev-x", "bad", "push-pull");
    wait_modes(&server, &["dev-x"], Mode::PushPull);

    let cases = [
        (
            "1.0.0",
            "mode = \"pull\"\ndevice_url = \"https://elsewhere.example:8443\"\n",
            "`device_url` cannot be changed remotely",
        ),
        ("1.0.1", "mode = \"carrier-pigeon\"\n", "carrier-pigeon"),
        (
            "1.0.2",
            "mode = \"pull\"\npoll_interval = \"soon\"\n",
            "poll_interval",
        ),
    ];
    for (version, text, reason) in cases {
        let package = build_package(
            root,
            &key,
            CONFIG_PACKAGE,
            version,
            "config",
            text.as_bytes(),
        );
        let deployment = deploy(
            &server,
            &package,
            &format!("{CONFIG_PACKAGE}@{version}"),
            "device:dev-x",
        );
        let status = wait_complete(&server, &deployment);
        assert_eq!(status.targets[0].phase, Phase::Failed, "{status:?}");
        let detail = status.targets[0].detail.clone().unwrap_or_default();
        assert!(detail.contains(reason), "{version}: reason {detail:?}");
        assert!(
            !dir.join("state/remote-config.toml").exists(),
            "{version}: a refused configuration was written"
        );
    }
    // Still running, still push-pull, and nothing recorded as installed.
    assert_eq!(agent.exited(), None, "the agent exited");
    let device = devices(&server)
        .into_iter()
        .find(|d| d.device_id.as_str() == "dev-x")
        .unwrap();
    assert_eq!(device.mode, Some(Mode::PushPull));
    assert_eq!(device.installed.get(CONFIG_PACKAGE), None);

    // And it still installs what it is sent.
    let firmware = b"after the refused configurations".to_vec();
    let package = build_package(root, &key, "sensor-fw", "1.0.0", "firmware", &firmware);
    let deployment = deploy(&server, &package, "sensor-fw@1.0.0", "device:dev-x");
    let status = wait_complete(&server, &deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert_eq!(fs::read(dir.join("installed/sensor-fw")).unwrap(), firmware);
}
