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
use std::process::Command;
use std::time::{Duration, Instant};

use otter_proto::api::{AuditEntry, DeploymentStatus, DeviceInfo, ReleaseInfo};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{Process, Server, binary, otter_offline, wait_for};

const WAIT: Duration = Duration::from_secs(120);

fn signing_key(root: &Path) -> (PathBuf, PathBuf) {
    let key = root.join("signing.key");
    let output = otter_offline(&["keys", "generate", "--out", key.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (key, root.join("signing.key.pub"))
}

/// Enrols `id` and switches its generated agent.toml to push mode.
fn enroll_push_device(server: &Server, root: &Path, id: &str) -> PathBuf {
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
    let text = fs::read_to_string(&config).unwrap();
    let edited = text.replace("mode = \"push-pull\"", "mode = \"push\"");
    assert_ne!(edited, text, "agent.toml has no mode line to edit:\n{text}");
    fs::write(&config, edited).unwrap();
    dir
}

fn start_agent(root: &Path, log_name: &str, dir: &Path) -> Process {
    Process::spawn(
        log_name,
        Command::new(binary("otter-agent"))
            .arg("--config")
            .arg(dir.join("agent.toml")),
        root,
    )
}

fn wait_registered_as_push(server: &Server, id: &str) {
    wait_for(&format!("{id} to register in push mode"), WAIT, || {
        let devices: Vec<DeviceInfo> = server.otter_json(&["devices", "list"]);
        devices
            .iter()
            .any(|d| d.device_id.as_str() == id && d.mode == Some(Mode::Push))
            .then_some(())
    });
}

/// Deterministic, poorly compressible payload of `size` bytes.
fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
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
    let input = root.join(format!("payload-{version}.bin"));
    fs::write(&input, payload).unwrap();
    let package = root.join(format!("sensor-fw-{version}.otter"));
    let output = otter_offline(&[
        "package",
        "build",
        "--key",
        key.to_str().unwrap(),
        "--name",
        "sensor-fw",
        "--version",
        version,
        "--kind",
        "firmware",
        "--hardware",
        "revB",
        "--out",
        package.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "package build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let release = server
        .otter_ok(&["release", "upload", package.to_str().unwrap()])
        .trim()
        .to_owned();
    let releases: Vec<ReleaseInfo> = server.otter_json(&["release", "list"]);
    let artifact_size = releases
        .iter()
        .find(|r| r.id == release)
        .map(|r| r.artifact_size)
        .expect("uploaded release is listed");
    let deployment = server
        .otter_ok(&[
            "deploy",
            "create",
            "--release",
            &release,
            "--target",
            &format!("device:{device}"),
        ])
        .trim()
        .to_owned();
    (deployment, artifact_size)
}

fn wait_installed(server: &Server, deployment: &str) {
    let status = wait_for(
        &format!("deployment {deployment} to complete"),
        WAIT,
        || {
            let status: DeploymentStatus = server.otter_json(&["deploy", "status", deployment]);
            status.info.complete.then_some(status)
        },
    );
    assert_eq!(status.targets.len(), 1);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
}

fn audit(server: &Server, device: &str, deployment: &str) -> Vec<AuditEntry> {
    server.otter_json(&[
        "audit",
        "list",
        "--device",
        device,
        "--deployment",
        deployment,
    ])
}

/// Asserts that `steps` occur in `audit`, in this order (others may be
/// between them).
fn assert_steps_in_order(audit: &[AuditEntry], steps: &[&str]) {
    let events: Vec<&str> = audit.iter().map(|e| e.event.as_str()).collect();
    let mut position = 0;
    for step in steps {
        let found = events[position..].iter().position(|e| e == step);
        assert!(
            found.is_some(),
            "audit lacks {step} after position {position}: {events:?}"
        );
        position += found.unwrap_or(0) + 1;
    }
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
    let (key, public_key) = signing_key(root);
    let server = Server::start(root, &[&public_key]);
    let dir = enroll_push_device(&server, root, "dev-push");
    let _agent = start_agent(root, "dev-push", &dir);
    wait_registered_as_push(&server, "dev-push");

    let content = payload(3 << 20, 11);
    let (deployment, artifact_size) = deploy(&server, root, &key, "1.0.0", &content, "dev-push");
    wait_installed(&server, &deployment);
    assert!(
        fs::read(dir.join("installed/sensor-fw")).unwrap() == content,
        "the installed payload differs from the release"
    );

    let audit = audit(&server, "dev-push", &deployment);
    assert_steps_in_order(
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
    let events: Vec<&str> = audit.iter().map(|e| e.event.as_str()).collect();
    assert!(
        !events
            .iter()
            .any(|e| e.starts_with("link.") || *e == "download.served"),
        "push mode made or used a link: {events:?}"
    );
    let sent = audit
        .iter()
        .find(|e| e.event == "notification.sent")
        .unwrap();
    assert_eq!(sent.details["delivery"], "push", "{}", sent.details);
    let offered = audit.iter().find(|e| e.event == "push.offered").unwrap();
    assert_eq!(details_u64(offered, "from_offset"), 0);
    assert_eq!(details_u64(offered, "artifact_size"), artifact_size);
    let completed = audit.iter().find(|e| e.event == "push.completed").unwrap();
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
    let (key, public_key) = signing_key(root);
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
    wait_registered_as_push(&server, "dev-resume");

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
    let status: DeploymentStatus = server.otter_json(&["deploy", "status", &deployment]);
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

    let audit = audit(&server, "dev-resume", &deployment);
    assert_steps_in_order(
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
    let offers = audit.iter().filter(|e| e.event == "push.offered").count();
    assert!(
        offers >= 2,
        "one offer before and one after the restart: {audit:?}"
    );
    let resumed = audit.iter().find(|e| e.event == "push.resumed").unwrap();
    let resumed_from = details_u64(resumed, "offset");
    assert!(
        resumed_from >= quarter && resumed_from <= artifact_size,
        "resumed from {resumed_from}; the device held {held_at_kill} of {artifact_size} at the kill"
    );
    // Acknowledged bytes were not sent again: over both attempts the server
    // sent the artifact once, plus at most what was in flight at the kill.
    let completed = audit.iter().find(|e| e.event == "push.completed").unwrap();
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
