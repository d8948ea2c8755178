//! Push mode end to end, with real processes: `otter-server`, push-mode
//! `otter-agent`s and the `otter` CLI on loopback.
//!
//! - A push-mode agent receives a multi-MiB release as MQTT chunks (no link
//!   is ever made), installs it byte for byte, and every step is audited.
//! - A push interrupted mid-way (the agent killed with SIGKILL once a
//!   quarter of the artifact is on its disk) resumes when the agent comes
//!   back, from what it had acknowledged: the server's count of bytes sent
//!   over both attempts stays within the artifact plus one window.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use otter_proto::api::AuditEntry;
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    Server, WAIT, assert_steps_in_order, build_firmware, count, edit_agent_config, enroll, events,
    find_event, generate_signing_key, payload, start_agent, with_mode,
};

/// Enrols `id` and switches its generated agent.toml to push mode.
fn enroll_push_device(server: &Server, root: &Path, id: &str) -> PathBuf {
    let dir = enroll(server, root, id, None);
    edit_agent_config(&dir, |text| with_mode(&text, "push"));
    dir
}

/// Builds, uploads and deploys `sensor-fw@version` to one device; returns
/// the deployment id and the artifact size.
fn deploy(
    server: &Server,
    root: &Path,
    key: &Path,
    version: &str,
    payload: &[u8],
    device: &str,
) -> (String, u64) {
    let package = build_firmware(root, key, version, payload);
    let release = server.upload_release(&package);
    let artifact_size = server.artifact_size(&release);
    let deployment = server.create_deployment(&release, &format!("device:{device}"));
    (deployment, artifact_size)
}

fn wait_installed(server: &Server, deployment: &str) {
    let status = server.wait_deployment_complete(deployment);
    assert_eq!(status.targets.len(), 1);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
}

fn details_u64(entry: &AuditEntry, key: &str) -> u64 {
    entry.details[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{} has no number {key}: {}", entry.event, entry.details))
}

#[test]
fn push_mode_delivers_a_release_without_a_link() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);
    let dir = enroll_push_device(&server, root, "dev-push");
    let _agent = start_agent(root, "dev-push", &dir);
    server.wait_modes(&["dev-push"], Mode::Push);

    let content = payload(3 << 20, 11);
    let (deployment, artifact_size) = deploy(&server, root, &key, "1.0.0", &content, "dev-push");
    wait_installed(&server, &deployment);
    assert!(
        fs::read(dir.join("installed/sensor-fw")).unwrap() == content,
        "the installed payload differs from the release"
    );

    let audit = server.audit("dev-push", &deployment);
    assert_steps_in_order(
        "dev-push",
        &audit,
        &[
            "deployment.targeted",
            "notification.sent",
            "push.offered",
            "device.received",
            "push.completed",
            "device.downloaded",
            "device.installing",
            "device.installed",
        ],
    );
    let events = events(&audit);
    assert!(
        !events
            .iter()
            .any(|e| e.starts_with("link.") || *e == "download.served"),
        "push mode made or used a link: {events:?}"
    );
    let sent = find_event(&audit, "notification.sent");
    assert_eq!(sent.details["delivery"], "push", "{}", sent.details);
    let offered = find_event(&audit, "push.offered");
    assert_eq!(details_u64(offered, "from_offset"), 0);
    assert_eq!(details_u64(offered, "artifact_size"), artifact_size);
    let completed = find_event(&audit, "push.completed");
    let bytes_sent = details_u64(completed, "bytes_sent");
    // Default window: 4 chunks of 256 KiB.
    assert!(
        (artifact_size..=artifact_size + (1 << 20)).contains(&bytes_sent),
        "sent {bytes_sent} bytes for an artifact of {artifact_size}"
    );
    let landing = dir.join("landing").join(&deployment);
    assert!(
        !landing.exists(),
        "the landing zone was not cleared after the install"
    );
}

#[test]
fn interrupted_push_resumes_without_resending_acknowledged_bytes() {
    const CHUNK: u64 = 16 * 1024;
    const WINDOW_CHUNKS: u64 = 4;
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start_with(
        root,
        &[&public_key],
        &[
            "--push-chunk-size",
            &CHUNK.to_string(),
            "--push-window",
            &WINDOW_CHUNKS.to_string(),
        ],
    );
    let dir = enroll_push_device(&server, root, "dev-resume");
    let mut agent = start_agent(root, "dev-resume", &dir);
    server.wait_modes(&["dev-resume"], Mode::Push);

    let content = payload(6 << 20, 23);
    let (deployment, artifact_size) = deploy(&server, root, &key, "1.0.0", &content, "dev-resume");

    // Kill the agent once a quarter of the artifact is on its disk. The
    // file is polled closely (this is the condition, not a delay): with
    // small chunks the rest takes far longer than one poll.
    let part = dir.join("landing").join(&deployment).join("artifact.part");
    let quarter = artifact_size / 4;
    let deadline = Instant::now() + WAIT;
    loop {
        let held = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if held >= quarter {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a quarter of the artifact ({held} of {artifact_size} bytes)"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    agent.kill();
    let held_at_kill = fs::metadata(&part).map(|m| m.len()).unwrap();
    assert!(
        held_at_kill < artifact_size,
        "the transfer completed before the kill ({held_at_kill} of {artifact_size} bytes)"
    );
    let status = server.deployment_status(&deployment);
    assert!(
        status.targets[0].phase < Phase::Downloaded,
        "{:?}",
        status.targets[0]
    );

    let _agent = start_agent(root, "dev-resume-restarted", &dir);
    wait_installed(&server, &deployment);
    assert!(
        fs::read(dir.join("installed/sensor-fw")).unwrap() == content,
        "the installed payload differs from the release"
    );

    let audit = server.audit("dev-resume", &deployment);
    assert_steps_in_order(
        "dev-resume",
        &audit,
        &[
            "notification.sent",
            "push.offered",
            "device.received",
            "push.resumed",
            "push.completed",
            "device.downloaded",
            "device.installed",
        ],
    );
    // The restarted agent answers its registration's offer again (its
    // acknowledgement at start may resume the transfer even before that).
    let offers = count(&audit, "push.offered");
    assert!(
        offers >= 2,
        "one offer before and one after the restart: {audit:?}"
    );
    let resumed = find_event(&audit, "push.resumed");
    let resumed_from = details_u64(resumed, "offset");
    assert!(
        resumed_from >= quarter && resumed_from <= artifact_size,
        "resumed from {resumed_from}; the device held {held_at_kill} of {artifact_size} at the kill"
    );
    // Acknowledged bytes were not sent again: over both attempts the server
    // sent the artifact once, plus at most what was in flight at the kill.
    let completed = find_event(&audit, "push.completed");
    let bytes_sent = details_u64(completed, "bytes_sent");
    let window = CHUNK * WINDOW_CHUNKS;
    eprintln!(
        "artifact {artifact_size} bytes, held at the kill {held_at_kill}, resumed from {resumed_from}, sent {bytes_sent}"
    );
    assert!(
        bytes_sent >= artifact_size && bytes_sent <= artifact_size + window,
        "sent {bytes_sent} bytes for an artifact of {artifact_size} (window {window})"
    );
}
