//! One deployment to a fleet of mixed modes: a push device, a pull device
//! and a push-pull device share a tag; a single `deploy create` reaches each
//! one in its own mode, and each installs the same bytes.

mod support;

use std::fs;

use otter_proto::api::{AuditEntry, Channel};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    WAIT, build_firmware, edit_agent_config, enroll, has, payload, start_agent,
    start_server_with_key, wait_for, with_fast_poll, with_mode,
};

#[test]
fn one_deployment_reaches_each_device_in_its_own_mode() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, key) =
        start_server_with_key(root, &["--push-chunk-size", "65536", "--push-window", "4"]);

    let devices = [
        ("dev-push", Mode::Push),
        ("dev-pull", Mode::Pull),
        ("dev-pp", Mode::PushPull),
    ];
    let mut agents = Vec::new();
    for (id, mode) in devices {
        let dir = enroll(&server, root, id, Some("plant-3"));
        let edited = edit_agent_config(&dir, |config| {
            with_fast_poll(&with_mode(&config, mode.as_str()))
        });
        assert!(edited.contains("poll_interval = \"1s\""), "{edited}");
        agents.push(start_agent(root, id, &dir));
    }

    // Each registers in its own mode, over its own channel.
    let registered = wait_for("three registrations", WAIT, || {
        let listed = server.devices();
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
    let package = build_firmware(root, &key, "1.0.0", &content);
    let deployment = server.upload_and_deploy(&package, "sensor-fw@1.0.0", "fleet:plant-3");

    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.info.devices, 3);
    for target in &status.targets {
        assert_eq!(target.phase, Phase::Installed, "{target:?}");
    }
    for (id, _) in devices {
        let installed = fs::read(root.join(id).join("installed/sensor-fw")).unwrap();
        assert!(installed == content, "{id} installed different bytes");
    }

    // Each was reached its own way: pushed chunks, a poll answer, an MQTT link.
    let audit_of = |id: &str| server.audit(id, &deployment);
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
