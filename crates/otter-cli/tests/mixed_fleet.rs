//! One deployment to a fleet of mixed modes: a push device, a pull device
//! and a push-pull device share a tag; a single `deploy create` reaches each
//! one in its own mode, and each installs the same bytes.

mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use otter_proto::api::{AuditEntry, Channel, DeploymentStatus, DeviceInfo};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{Process, Server, binary, otter_offline, wait_for};

const WAIT: Duration = Duration::from_secs(120);

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

#[test]
fn one_deployment_reaches_each_device_in_its_own_mode() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let key = root.join("signing.key");
    assert!(
        otter_offline(&["keys", "generate", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let server = Server::start_with(
        root,
        &[&root.join("signing.key.pub")],
        &["--push-chunk-size", "65536", "--push-window", "4"],
    );

    let devices = [
        ("dev-push", Mode::Push),
        ("dev-pull", Mode::Pull),
        ("dev-pp", Mode::PushPull),
    ];
    let mut agents = Vec::new();
    for (id, mode) in devices {
        let dir = root.join(id);
        server.otter_ok(&[
            "device",
            "enroll",
            id,
            "--tags",
            "plant-3",
            "--hardware",
            "revB",
            "--out",
            dir.to_str().unwrap(),
        ]);
        let config_path = dir.join("agent.toml");
        let config = fs::read_to_string(&config_path).unwrap();
        let edited = config
            .replacen(
                "mode = \"push-pull\"",
                &format!("mode = \"{}\"", mode.as_str()),
                1,
            )
            .replacen("poll_interval = \"30s\"", "poll_interval = \"1s\"", 1);
        assert!(edited.contains("poll_interval = \"1s\""), "{edited}");
        fs::write(&config_path, edited).unwrap();
        agents.push(Process::spawn(
            id,
            Command::new(binary("otter-agent"))
                .arg("--config")
                .arg(&config_path),
            root,
        ));
    }

    // Each registers in its own mode, over its own channel.
    let registered = wait_for("three registrations", WAIT, || {
        let listed: Vec<DeviceInfo> = server.otter_json(&["devices", "list"]);
        (listed.len() == 3 && listed.iter().all(|d| d.mode.is_some())).then_some(listed)
    });
    for (id, mode) in devices {
        let device = registered
            .iter()
            .find(|d| d.device_id.as_str() == id)
            .unwrap();
        assert_eq!(device.mode, Some(mode), "{id}");
        let channel = if mode == Mode::Pull {
            Channel::Poll
        } else {
            Channel::Mqtt
        };
        assert_eq!(device.registered_via, Some(channel), "{id}");
    }

    let content = payload(2 << 20, 3);
    let input = root.join("firmware.bin");
    fs::write(&input, &content).unwrap();
    let package = root.join("fw.otter");
    let built = otter_offline(&[
        "package",
        "build",
        "--key",
        key.to_str().unwrap(),
        "--name",
        "sensor-fw",
        "--version",
        "1.0.0",
        "--kind",
        "firmware",
        "--hardware",
        "revB",
        "--out",
        package.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    server.otter_ok(&["release", "upload", package.to_str().unwrap()]);
    let deployment = server
        .otter_ok(&[
            "deploy",
            "create",
            "--release",
            "sensor-fw@1.0.0",
            "--target",
            "fleet:plant-3",
        ])
        .trim()
        .to_owned();

    let status = wait_for("the mixed deployment to complete", WAIT, || {
        let status: DeploymentStatus = server.otter_json(&["deploy", "status", &deployment]);
        status.info.complete.then_some(status)
    });
    assert_eq!(status.info.devices, 3);
    for target in &status.targets {
        assert_eq!(target.phase, Phase::Installed, "{target:?}");
    }
    for (id, _) in devices {
        let installed = fs::read(root.join(id).join("installed/sensor-fw")).unwrap();
        assert!(installed == content, "{id} installed different bytes");
    }

    // Each was reached its own way: pushed chunks, a poll answer, an MQTT link.
    let audit_of = |id: &str| -> Vec<AuditEntry> {
        server.otter_json(&["audit", "list", "--device", id, "--deployment", &deployment])
    };
    let has = |audit: &[AuditEntry], event: &str| audit.iter().any(|e| e.event == event);
    let sent_via = |audit: &[AuditEntry]| -> Vec<String> {
        audit
            .iter()
            .filter(|e| e.event == "notification.sent")
            .map(|e| {
                e.details
                    .get("via")
                    .or_else(|| e.details.get("delivery"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect()
    };

    let push = audit_of("dev-push");
    assert!(has(&push, "push.offered") && has(&push, "push.completed"));
    assert!(!has(&push, "link.created") && !has(&push, "download.served"));
    assert!(sent_via(&push).iter().all(|v| v == "push"), "{push:#?}");

    let pull = audit_of("dev-pull");
    assert!(has(&pull, "link.created") && has(&pull, "download.served"));
    assert!(!has(&pull, "push.offered"));
    assert!(sent_via(&pull).iter().all(|v| v == "poll"), "{pull:#?}");

    let push_pull = audit_of("dev-pp");
    assert!(has(&push_pull, "link.created") && has(&push_pull, "download.served"));
    assert!(!has(&push_pull, "push.offered"));
    assert!(
        sent_via(&push_pull).contains(&"mqtt".to_owned()),
        "{push_pull:#?}"
    );

    for audit in [&push, &pull, &push_pull] {
        for step in [
            "deployment.targeted",
            "notification.sent",
            "device.received",
            "device.downloaded",
            "device.installing",
            "device.installed",
        ] {
            assert!(has(audit, step), "missing {step} in {audit:#?}");
        }
    }
    drop(agents);
}
