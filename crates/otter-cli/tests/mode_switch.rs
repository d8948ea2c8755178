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

use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    Process, Server, build_package, edit_agent_config, enroll, events, start_agent,
    start_server_with_key, with_fast_poll, with_mode,
};

/// The name the agent recognises as its own configuration.
const CONFIG_PACKAGE: &str = "otter-agent-config";

/// Enrols `id` with `tag`, sets `mode` in its agent.toml and starts it.
fn enroll_in_mode(
    server: &Server,
    root: &Path,
    id: &str,
    tag: &str,
    mode: &str,
) -> (PathBuf, Process) {
    let dir = enroll(server, root, id, Some(tag));
    // Pull devices poll every second, so the test does not wait for them.
    let edited = edit_agent_config(&dir, |text| with_fast_poll(&with_mode(&text, mode)));
    assert!(
        edited.contains(&format!("mode = \"{mode}\"")) && edited.contains("poll_interval = \"1s\""),
        "mode not set in {edited}"
    );
    let agent = start_agent(root, id, &dir);
    (dir, agent)
}

fn audit_events(server: &Server, device: &str, deployment: &str) -> Vec<String> {
    let audit = server.audit(device, deployment);
    events(&audit).into_iter().map(str::to_owned).collect()
}

/// Devices in `start` mode are switched to push-pull by one config
/// deployment (whose audit shows `delivered_by`, the start mode's transfer),
/// then install a second release through push-pull.
fn switch_to_push_pull(start: &str, start_mode: Mode, delivered_by: &str) {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) = start_server_with_key(root, &[]);
    let ids = ["dev-1", "dev-2"];
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for id in ids {
        let (dir, agent) = enroll_in_mode(&server, root, id, "switch", start);
        dirs.push(dir);
        agents.push(agent);
    }
    server.wait_modes(&ids, start_mode);

    // One deployment of the agent's configuration, delivered in `start` mode.
    let config = build_package(
        root,
        &key,
        CONFIG_PACKAGE,
        "1.0.0",
        "config",
        b"# fleet switch\nmode = \"push-pull\"\n",
    );
    let deployment =
        server.upload_and_deploy(&config, &format!("{CONFIG_PACKAGE}@1.0.0"), "fleet:switch");
    let status = server.wait_deployment_complete(&deployment);
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
    server.wait_modes(&ids, Mode::PushPull);
    for (id, dir) in ids.iter().zip(&dirs) {
        let overlay = fs::read_to_string(dir.join("state/remote-config.toml")).unwrap();
        assert!(overlay.contains("push-pull"), "{id}: overlay {overlay}");
        let device = server.device(id).unwrap();
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
    let second = server.upload_and_deploy(&package, "sensor-fw@1.0.0", "fleet:switch");
    let status = server.wait_deployment_complete(&second);
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
    let (server, key) = start_server_with_key(root, &[]);
    let (dir, mut agent) = enroll_in_mode(&server, root, "dev-x", "bad", "push-pull");
    server.wait_modes(&["dev-x"], Mode::PushPull);

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
        let deployment = server.upload_and_deploy(
            &package,
            &format!("{CONFIG_PACKAGE}@{version}"),
            "device:dev-x",
        );
        let status = server.wait_deployment_complete(&deployment);
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
    let device = server.device("dev-x").unwrap();
    assert_eq!(device.mode, Some(Mode::PushPull));
    assert_eq!(device.installed.get(CONFIG_PACKAGE), None);

    // And it still installs what it is sent.
    let firmware = b"after the refused configurations".to_vec();
    let package = build_package(root, &key, "sensor-fw", "1.0.0", "firmware", &firmware);
    let deployment = server.upload_and_deploy(&package, "sensor-fw@1.0.0", "device:dev-x");
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert_eq!(fs::read(dir.join("installed/sensor-fw")).unwrap(), firmware);
}
