//! The push-pull loop end to end, with real processes: one `otter-server`
//! on embedded defaults, three `otter-agent`s, and the `otter` CLI, talking
//! real MQTT over mutual TLS, real HTTPS and real files on loopback.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use otter_proto::api::ReleaseInfo;
use otter_proto::deployment::Phase;
use support::{
    Process, Server, WAIT, assert_steps_in_order, build_firmware, count, edit_agent_config, enroll,
    generate_signing_key, payload, start_agent, wait_for,
};

struct Device {
    id: &'static str,
    dir: PathBuf,
    _agent: Process,
}

fn enroll_and_start(server: &Server, root: &Path, id: &'static str, tag: &str) -> Device {
    let dir = enroll(server, root, id, Some(tag));
    let agent = start_agent(root, id, &dir);
    Device {
        id,
        dir,
        _agent: agent,
    }
}

/// A reqwest client presenting `device`'s certificate to the device endpoint.
fn device_client(device_dir: &Path, ca_dir: &Path) -> reqwest::Client {
    let mut identity = fs::read(device_dir.join("device.crt")).unwrap();
    identity.extend(fs::read(device_dir.join("device.key")).unwrap());
    let ca = reqwest::Certificate::from_pem(&fs::read(ca_dir.join("ca.crt")).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap()
}

/// GETs `url` on the device endpoint with the certificate of `device_dir`.
async fn get_with_device_certificate(
    device_dir: &Path,
    ca_dir: &Path,
    url: &str,
) -> reqwest::Response {
    device_client(device_dir, ca_dir)
        .get(url)
        .send()
        .await
        .unwrap()
}

/// The link a device was given, from the job its agent persisted.
fn persisted_link(device: &Device) -> String {
    let job: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(device.dir.join("state/job.json")).unwrap())
            .unwrap();
    job["notification"]["link"]
        .as_str()
        .expect("link in job.json")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_to_a_fleet_end_to_end() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();

    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);

    let a = enroll_and_start(&server, root, "dev-a", "line-2");
    let b = enroll_and_start(&server, root, "dev-b", "line-2");
    let c = enroll_and_start(&server, root, "dev-c", "line-3");

    // Step 1: all three register (mode, agent version and hardware stored).
    wait_for("three registrations", WAIT, || {
        let devices = server.devices();
        (devices.len() == 3
            && devices
                .iter()
                .all(|d| d.mode.is_some() && d.agent_version.is_some()))
        .then_some(())
    });

    // A tampered package is refused at upload and leaves nothing behind.
    let good_payload = payload(3 << 20, 7);
    let good = build_firmware(root, &key, "1.0.0", &good_payload);
    let mut tampered_bytes = fs::read(&good).unwrap();
    let last = tampered_bytes.len() - 100;
    tampered_bytes[last] ^= 0x55;
    let tampered = root.join("tampered.otter");
    fs::write(&tampered, &tampered_bytes).unwrap();
    let refused = server.otter(&["release", "upload", tampered.to_str().unwrap()]);
    assert!(!refused.status.success(), "tampered package was accepted");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("invalid-package"),
        "unexpected refusal: {message}"
    );
    let releases: Vec<ReleaseInfo> = server.otter_json(&["release", "list"]);
    assert!(
        releases.is_empty(),
        "a refused upload stored a release: {releases:?}"
    );

    // Steps 2–9: deploy to fleet line-2 (dev-a and dev-b, not dev-c).
    assert_eq!(server.upload_release(&good), "sensor-fw@1.0.0");
    let deployment = server.create_deployment("sensor-fw@1.0.0", "fleet:line-2");
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.info.devices, 2);
    let mut targeted: Vec<_> = status
        .targets
        .iter()
        .map(|t| (t.device_id.to_string(), t.phase))
        .collect();
    targeted.sort();
    assert_eq!(
        targeted,
        vec![
            ("dev-a".to_owned(), Phase::Installed),
            ("dev-b".to_owned(), Phase::Installed)
        ]
    );

    // The payload landed, byte for byte, on the two targeted devices only.
    for device in [&a, &b] {
        let installed = fs::read(device.dir.join("installed/sensor-fw")).unwrap();
        assert!(
            installed == good_payload,
            "{} installed different bytes",
            device.id
        );
    }
    assert!(
        !c.dir.join("installed/sensor-fw").exists(),
        "dev-c installed an update not meant for it"
    );
    for d in &server.devices() {
        let version = d.installed.get("sensor-fw").map(ToString::to_string);
        let expected = (d.device_id.as_str() != "dev-c").then(|| "1.0.0".to_owned());
        assert_eq!(
            version, expected,
            "installed versions reported by {}",
            d.device_id
        );
    }

    // Steps 3–9 are in the audit, in order, for each targeted device.
    let expected_steps = [
        "deployment.targeted",
        "link.created",
        "notification.sent",
        "device.received",
        "device.downloaded",
        "link.revoked",
        "device.installing",
        "device.installed",
    ];
    for device in [&a, &b] {
        let audit = server.audit(device.id, &deployment);
        assert_steps_in_order(device.id, &audit, &expected_steps);
        let installed = audit
            .iter()
            .find(|e| e.event == "device.installed")
            .unwrap();
        assert_eq!(
            (installed.actor.as_str(), installed.device_id.as_deref()),
            (device.id, Some(device.id))
        );
    }
    let audit_c = server.audit("dev-c", &deployment);
    assert!(
        audit_c.is_empty(),
        "dev-c appears in the deployment's audit: {audit_c:?}"
    );

    // The links are revoked; another device's certificate is refused.
    let ca_dir = &a.dir;
    let link_a = persisted_link(&a);
    let answer = get_with_device_certificate(&a.dir, ca_dir, &link_a).await;
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::GONE,
        "dev-a's link after install"
    );
    let body: otter_proto::api::ErrorBody = answer.json().await.unwrap();
    assert!(!body.message.is_empty());
    let answer = get_with_device_certificate(&c.dir, ca_dir, &link_a).await;
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::FORBIDDEN,
        "dev-c presenting dev-a's link"
    );

    // A certificate from another CA does not get past the TLS handshake.
    let foreign = foreign_identity();
    let ca = reqwest::Certificate::from_pem(&fs::read(ca_dir.join("ca.crt")).unwrap()).unwrap();
    let stranger = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(foreign.as_bytes()).unwrap())
        .build()
        .unwrap();
    let refused = stranger.get(&link_a).send().await;
    assert!(
        refused.is_err(),
        "a foreign certificate got an HTTP answer: {:?}",
        refused.map(|r| r.status())
    );

    // A tampered download is never installed: corrupt the stored artifact
    // of a second release, deploy it to dev-c, and watch it fail.
    let second = build_firmware(root, &key, "2.0.0", &payload(1 << 20, 9));
    let release: ReleaseInfo =
        serde_json::from_str(&server.otter_ok(&["release", "list", "--json"]))
            .map(|all: Vec<ReleaseInfo>| all.into_iter().next().unwrap())
            .unwrap();
    assert_eq!(release.id, "sensor-fw@1.0.0");
    server.upload_release(&second);
    let blob = find_file_of_size(
        &server.data_dir.join("blobs"),
        server.artifact_size("sensor-fw@2.0.0"),
    );
    let mut blob_bytes = fs::read(&blob).unwrap();
    blob_bytes[1000] ^= 0xff;
    fs::write(&blob, &blob_bytes).unwrap();
    let deployment2 = server.create_deployment("sensor-fw@2.0.0", "device:dev-c");
    let status = server.wait_deployment_complete(&deployment2);
    assert_eq!(status.targets.len(), 1);
    assert_eq!(status.targets[0].phase, Phase::Failed, "{status:?}");
    let reason = status.targets[0].detail.clone().unwrap_or_default();
    assert!(
        reason.contains("hash") || reason.contains("sha256"),
        "failure reason: {reason}"
    );
    assert!(
        !c.dir.join("installed/sensor-fw").exists(),
        "the tampered download was installed"
    );
    let landing = c.dir.join("landing");
    let leftovers: Vec<_> = fs::read_dir(&landing)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|p| !p.join("payload").exists()),
        "unpacked payload left in {leftovers:?}"
    );
}

fn find_file_of_size(dir: &Path, size: u64) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    let mut found = Vec::new();
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.metadata().map(|m| m.len()).ok() == Some(size) {
                found.push(path);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one blob of {size} bytes, found {found:?}"
    );
    found.remove(0)
}

/// A client certificate and key issued by a CA the server has never seen.
fn foreign_identity() -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Mallory CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dev-a");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let _ = ca;
    format!("{}{}", cert.pem(), key.serialize_pem())
}

/// An agent killed while it waits for a safe state resumes from its landing
/// zone after a restart: it neither downloads again nor installs twice.
#[test]
fn agent_restart_resumes_without_repeating_steps() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let mut server = Server::start(root, &[&public_key]);

    let dir = enroll(&server, root, "dev-r", None);
    // The device is "busy" until the file `safe` exists.
    let safe_flag = root.join("safe");
    let probe = format!(
        "command = [\"test\", \"-f\", {:?}]",
        safe_flag.to_str().unwrap()
    );
    let config = edit_agent_config(&dir, |config| {
        config.replacen("command = []", &probe, 1).replace(
            "initial_backoff = \"1s\"\nmax_backoff = \"60s\"\ndeadline",
            "initial_backoff = \"100ms\"\nmax_backoff = \"300ms\"\ndeadline",
        )
    });
    assert!(config.contains(&probe), "probe not set in {config}");
    let spawn_agent = || start_agent(root, "dev-r", &dir);

    let mut agent = spawn_agent();
    wait_for("dev-r to register", WAIT, || {
        server
            .devices()
            .iter()
            .any(|d| d.mode.is_some())
            .then_some(())
    });
    let content = payload(2 << 20, 11);
    let package = build_firmware(root, &key, "1.0.0", &content);
    server.upload_release(&package);
    let deployment = server.create_deployment("sensor-fw@1.0.0", "device:dev-r");
    wait_for("dev-r to download", WAIT, || {
        let status = server.deployment_status(&deployment);
        (status.targets[0].phase == Phase::Downloaded).then_some(())
    });

    // Killed without warning while waiting for the safe state.
    drop(agent);
    assert!(!dir.join("installed/sensor-fw").exists());
    let registrations_before = count(&server.device_audit("dev-r"), "device.registered");
    agent = spawn_agent();
    wait_for("dev-r to register again", WAIT, || {
        (count(&server.device_audit("dev-r"), "device.registered") > registrations_before)
            .then_some(())
    });
    fs::write(&safe_flag, b"").unwrap();
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert!(fs::read(dir.join("installed/sensor-fw")).unwrap() == content);

    // A further restart changes nothing: no second install.
    drop(agent);
    let registrations_before = count(&server.device_audit("dev-r"), "device.registered");
    let _agent = spawn_agent();
    wait_for("dev-r to register a third time", WAIT, || {
        (count(&server.device_audit("dev-r"), "device.registered") > registrations_before)
            .then_some(())
    });
    let audit = server.audit("dev-r", &deployment);
    assert_eq!(
        count(&audit, "download.served"),
        1,
        "downloaded again after the restart: {audit:#?}"
    );
    assert_eq!(count(&audit, "device.installing"), 1);
    assert_eq!(count(&audit, "device.installed"), 1);
    assert!(
        !dir.join("installed/sensor-fw.previous").exists(),
        "installed twice"
    );

    // SIGTERM stops the server cleanly.
    let exit = server.process.terminate(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| s.success()),
        "server exit after SIGTERM: {exit:?}"
    );
}
