//! Anti-rollback end to end, with the real `otter-server`, `otter-agent` and
//! `otter` CLI: devices with sensor-fw 2.0.0 refuse an older release unless
//! both the package (`otter package build --allow-downgrade`, signed into
//! the manifest) and the deployment (`otter deploy create
//! --allow-downgrade`) allow it; the server refuses a deployment flag that
//! the release's manifest does not back, and creates nothing. One device per
//! mode, so the deployment's flag is shown to travel in the MQTT
//! notification, the poll answer and the push offer alike.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use otter_proto::api::{AuditEntry, DeploymentInfo};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    Process, Server, WAIT, build_firmware, edit_agent_config, enroll, generate_signing_key,
    otter_offline, payload, start_agent, wait_for, with_fast_poll, with_mode,
};

/// One device per mode, all tagged `line`.
const DEVICES: [(&str, Mode); 3] = [
    ("dev-mqtt", Mode::PushPull),
    ("dev-poll", Mode::Pull),
    ("dev-push", Mode::Push),
];

/// Enrols and starts the devices of [`DEVICES`], waits until each has
/// registered in its mode, and returns their folders and agents.
fn start_devices(server: &Server, root: &Path) -> Vec<(PathBuf, Process)> {
    let devices: Vec<(PathBuf, Process)> = DEVICES
        .iter()
        .map(|(id, mode)| {
            let dir = enroll(server, root, id, Some("line"));
            match mode {
                Mode::Pull => {
                    edit_agent_config(&dir, |text| with_fast_poll(&with_mode(&text, "pull")));
                }
                Mode::Push => {
                    edit_agent_config(&dir, |text| with_mode(&text, "push"));
                }
                _ => {}
            }
            let agent = start_agent(root, id, &dir);
            (dir, agent)
        })
        .collect();
    for (id, mode) in DEVICES {
        server.wait_modes(&[id], mode);
    }
    devices
}

/// The version of sensor-fw the agent recorded in `state/installed.json`.
fn installed_version(device_dir: &Path) -> String {
    let text = fs::read_to_string(device_dir.join("state/installed.json")).unwrap();
    let installed: serde_json::Value = serde_json::from_str(&text).unwrap();
    installed["sensor-fw"].as_str().unwrap().to_owned()
}

/// Asserts every device has `version` recorded and `bytes` installed.
fn assert_installed(devices: &[(PathBuf, Process)], version: &str, bytes: &[u8]) {
    for (dir, _) in devices {
        assert_eq!(installed_version(dir), version, "{}", dir.display());
        assert!(
            fs::read(dir.join("installed/sensor-fw")).unwrap() == bytes,
            "{} holds other bytes than {version}",
            dir.display()
        );
    }
}

/// Deploys `release` to the fleet (with `--allow-downgrade` if `allow`),
/// waits until every device is done, asserts they all reached `phase`, and
/// returns each one's detail.
fn deploy_and_wait(server: &Server, release: &str, allow: bool, phase: Phase) -> Vec<String> {
    let mut args = vec![
        "deploy",
        "create",
        "--release",
        release,
        "--target",
        "fleet:line",
    ];
    if allow {
        args.push("--allow-downgrade");
    }
    let deployment = server.otter_ok(&args).trim().to_owned();
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.info.allow_downgrade, allow);
    assert_eq!(status.targets.len(), DEVICES.len());
    status
        .targets
        .iter()
        .map(|target| {
            assert_eq!(
                target.phase, phase,
                "{}: {:?}",
                target.device_id, target.detail
            );
            target.detail.clone().unwrap_or_default()
        })
        .collect()
}

#[test]
fn a_downgrade_needs_the_package_and_the_deployment_to_allow_it() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);
    let devices = start_devices(&server, root);

    // 2.0.0 installs as usual.
    let v2 = payload(50_000, 2);
    server.upload_release(&build_firmware(root, &key, "2.0.0", &v2));
    deploy_and_wait(&server, "sensor-fw@2.0.0", false, Phase::Installed);
    assert_installed(&devices, "2.0.0", &v2);

    // 0.9.0, built without --allow-downgrade, deployed without it: refused
    // on every device, which keeps 2.0.0.
    let v09 = payload(50_000, 9);
    server.upload_release(&build_firmware(root, &key, "0.9.0", &v09));
    for detail in deploy_and_wait(&server, "sensor-fw@0.9.0", false, Phase::Failed) {
        assert_eq!(
            detail,
            "downgrade from 2.0.0 to 0.9.0 refused: neither the signed manifest nor the \
             deployment allows a downgrade (package sensor-fw)"
        );
    }
    assert_installed(&devices, "2.0.0", &v2);

    // The same release deployed with --allow-downgrade: the server refuses,
    // since its manifest does not allow a downgrade, and creates nothing.
    let before: Vec<DeploymentInfo> = server.otter_json(&["deploy", "list"]);
    let audit_before: Vec<AuditEntry> = server.otter_json(&["audit", "list"]);
    let refused = server.otter(&[
        "deploy",
        "create",
        "--release",
        "sensor-fw@0.9.0",
        "--target",
        "fleet:line",
        "--allow-downgrade",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("signed manifest does not allow a downgrade"),
        "{stderr}"
    );
    let after: Vec<DeploymentInfo> = server.otter_json(&["deploy", "list"]);
    assert_eq!(after, before);
    let audit_after: Vec<AuditEntry> = server.otter_json(&["audit", "list"]);
    assert_eq!(audit_after.len(), audit_before.len());

    // 1.0.0, built with --allow-downgrade (signed into its manifest).
    let v1 = payload(50_000, 1);
    let input = root.join("sensor-fw-1.0.0.payload");
    fs::write(&input, &v1).unwrap();
    let package = root.join("sensor-fw-1.0.0.otter");
    let package_text = package.to_str().unwrap();
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
        "--allow-downgrade",
        "--out",
        package_text,
        input.to_str().unwrap(),
    ]);
    assert!(built.status.success(), "{built:?}");
    let inspected = otter_offline(&["package", "inspect", package_text]);
    assert!(
        String::from_utf8_lossy(&inspected.stdout).contains("downgrade   allowed"),
        "{inspected:?}"
    );
    server.upload_release(&package);

    // Deployed without the flag: the deployment does not allow it.
    for detail in deploy_and_wait(&server, "sensor-fw@1.0.0", false, Phase::Failed) {
        assert_eq!(
            detail,
            "downgrade from 2.0.0 to 1.0.0 refused: the deployment does not allow a downgrade \
             (package sensor-fw)"
        );
    }
    assert_installed(&devices, "2.0.0", &v2);

    // Both flags: every device installs 1.0.0 and registers it.
    deploy_and_wait(&server, "sensor-fw@1.0.0", true, Phase::Installed);
    assert_installed(&devices, "1.0.0", &v1);
    for (id, _) in DEVICES {
        wait_for(&format!("{id} to register 1.0.0"), WAIT, || {
            let device = server.device(id)?;
            (device.installed.get("sensor-fw")? == &semver::Version::new(1, 0, 0)).then_some(())
        });
    }
}
