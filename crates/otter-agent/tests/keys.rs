//! Signing-key hierarchy on the device (issue 6, item 4): a device that pins
//! only an offline root key installs packages of any signer the root
//! certified (rotation without touching the device), refuses a signer of
//! another root or with an expired certificate, and once a root-signed
//! revocation list naming a signer reaches it, refuses that signer's
//! packages (reported failed, nothing installed), across restarts, and an
//! older list never un-revokes it.
//!
//! Harness as in `hostile.rs`: the agent loop without a broker, reports
//! recorded by a fake uplink, artifacts from a real HTTPS server with mutual
//! TLS, packages built with `otter-package`, keys and certificates made as
//! `otter keys create-root | certify | revoke` make them.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ed25519_dalek::SigningKey;
use otter_agent::install::FileInstaller;
use otter_agent::state::StateStore;
use otter_agent::{Agent, AgentConfig, Handlers};
use otter_package::keys::key_id;
use otter_package::trust::{certify, revoke};
use otter_proto::manifest::{Manifest, PackageKind, SignedManifest};
use otter_proto::messages::{DeviceEvent, UpdateNotification};
use otter_proto::trust::SignedRevocationList;
use support::{AlwaysSafe, Answer, Counting, Pki, Recorder, Running, TestServer, unix_now};

const DAY: i64 = 86_400;

/// A device pinning one root key (no directly trusted signer).
struct Device {
    _dir: tempfile::TempDir,
    root_dir: std::path::PathBuf,
    pki: Pki,
    root_key: SigningKey,
    installer: Arc<Counting>,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().unwrap();
        let root_dir = dir.path().join("device");
        std::fs::create_dir(&root_dir).unwrap();
        let pki = Pki::create(&root_dir);
        std::fs::create_dir(root_dir.join("roots")).unwrap();
        // As `otter keys create-root` makes it; only the .pub is on the device.
        let offline = dir.path().join("offline-root.key");
        otter_package::keys::generate_key_pair(&offline).unwrap();
        let root_key = otter_package::keys::read_signing_key(&offline).unwrap();
        std::fs::copy(
            otter_package::keys::public_key_path(&offline),
            root_dir.join("roots/root-1.pub"),
        )
        .unwrap();
        std::fs::write(
            root_dir.join("agent.toml"),
            r#"
device_id = "dev-1"
hardware = "revB"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_roots = ["roots/root-1.pub"]

[download]
max_attempts = 2
initial_backoff = "10ms"
max_backoff = "50ms"
"#,
        )
        .unwrap();
        std::fs::create_dir(root_dir.join("installed")).unwrap();
        let installer = Arc::new(Counting {
            inner: FileInstaller::new(root_dir.join("installed")),
            runs: AtomicUsize::new(0),
        });
        Device {
            _dir: dir,
            root_dir,
            pki,
            root_key,
            installer,
        }
    }

    fn start(&self, uplink: &Arc<Recorder>) -> Running {
        let config = AgentConfig::load(&self.root_dir.join("agent.toml")).unwrap();
        let handlers = Handlers {
            installer: self.installer.clone(),
            safe_state: Arc::new(AlwaysSafe),
        };
        let agent = Agent::with_handlers(&config, &self.pki.device_tls(), handlers).unwrap();
        Running::start(agent, uplink.clone())
    }

    /// Builds `sensor-fw@version` signed by `signer` with `certificate`
    /// embedded; serves its artifact; returns the notification.
    async fn release(
        &self,
        deployment: &str,
        version: &str,
        signer: &SigningKey,
        certificate: Option<otter_proto::trust::SignedCertificate>,
        revocations: Option<SignedRevocationList>,
    ) -> (UpdateNotification, TestServer) {
        let mut options = otter_package::format::BuildOptions::new(
            "sensor-fw",
            semver::Version::parse(version).unwrap(),
            PackageKind::Firmware,
            vec!["revB".into()],
        );
        options.signer_certificate = certificate;
        let scratch = self.root_dir.parent().unwrap().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let mut package = Vec::new();
        let payload = format!("firmware {version}");
        otter_package::format::build_package(
            &mut payload.as_bytes(),
            &mut package,
            signer,
            &options,
            &scratch,
        )
        .unwrap();
        let mut reader = &package[..];
        let header = otter_package::format::read_header(&mut reader).unwrap();
        let server = TestServer::start(&self.pki, reader.to_vec(), |_, _| Answer::Body {
            honour_range: true,
            cut_after: None,
        })
        .await;
        let manifest: SignedManifest = header.signed_manifest;
        let wrapped_key = support::wrap_key(
            &self.root_dir.join("state/encryption.key"),
            "dev-1",
            &manifest,
            &header.data_key.to_base64(),
        );
        let release = Manifest::from_json(&manifest.manifest)
            .unwrap()
            .release_id();
        let notification = UpdateNotification {
            signer_revocations: revocations.map(Box::new),
            deployment_id: deployment.into(),
            release,
            manifest,
            link: server.url("/a"),
            link_expires_at: unix_now() + 3600,
            wrapped_key,
            allow_downgrade: false,
        };
        (notification, server)
    }

    fn certify(
        &self,
        signer: &SigningKey,
        from: i64,
        to: i64,
    ) -> Option<otter_proto::trust::SignedCertificate> {
        Some(
            certify(
                &self.root_key,
                &signer.verifying_key(),
                "build-host",
                from,
                to,
            )
            .unwrap(),
        )
    }

    fn installed_version(&self) -> Option<semver::Version> {
        StateStore::new(self.root_dir.join("state"))
            .load_installed()
            .unwrap()
            .get("sensor-fw")
            .cloned()
    }

    fn stored_revocation_sequence(&self) -> Option<u64> {
        let path = otter_agent::signer_trust::revocations_path(&self.root_dir.join("state"));
        let text = std::fs::read_to_string(path).ok()?;
        let signed = otter_package::trust::parse_revocation_list(&text).unwrap();
        Some(
            otter_package::trust::verify_revocation_list(&self.root_key.verifying_key(), &signed)
                .unwrap()
                .sequence,
        )
    }
}

fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rng())
}

#[tokio::test]
async fn root_pinned_device_rotates_refuses_and_revokes() {
    let device = Device::new();
    let uplink = Arc::new(Recorder::default());
    let running = device.start(&uplink);
    let now = unix_now();

    // A signer certified by the pinned root installs.
    let first = new_key();
    let first_cert = device.certify(&first, now - DAY, now + DAY);
    let (update, _server1) = device
        .release("dep-1", "1.0.0", &first, first_cert.clone(), None)
        .await;
    running.update(update).await;
    assert_eq!(uplink.wait_outcome("dep-1").await.0, DeviceEvent::Installed);
    assert_eq!(
        device.installed_version(),
        Some(semver::Version::new(1, 0, 0))
    );

    // Rotation: a second signer, certified later, installs; agent.toml untouched.
    let config_before = std::fs::read(device.root_dir.join("agent.toml")).unwrap();
    let second = new_key();
    let (update, _server2) = device
        .release(
            "dep-2",
            "1.1.0",
            &second,
            device.certify(&second, now, now + DAY),
            None,
        )
        .await;
    running.update(update).await;
    assert_eq!(uplink.wait_outcome("dep-2").await.0, DeviceEvent::Installed);
    assert_eq!(
        device.installed_version(),
        Some(semver::Version::new(1, 1, 0))
    );
    assert_eq!(
        std::fs::read(device.root_dir.join("agent.toml")).unwrap(),
        config_before
    );
    let runs_after_rotation = device.installer.runs.load(Ordering::SeqCst);
    assert_eq!(runs_after_rotation, 2);

    // A signer certified by another root, one with an expired certificate,
    // and one with no certificate at all: refused before any download.
    let foreign_root = new_key();
    let stranger = new_key();
    let foreign_cert = Some(
        certify(
            &foreign_root,
            &stranger.verifying_key(),
            "x",
            now - DAY,
            now + DAY,
        )
        .unwrap(),
    );
    let expired = new_key();
    let cases = [
        ("dep-foreign", stranger.clone(), foreign_cert, "root"),
        (
            "dep-expired",
            expired.clone(),
            device.certify(&expired, now - 3 * DAY, now - 2 * DAY),
            "expired",
        ),
        ("dep-bare", new_key(), None, "unknown key"),
    ];
    let mut servers = Vec::new();
    for (deployment, signer, certificate, _) in &cases {
        let (update, server) = device
            .release(deployment, "2.0.0", signer, certificate.clone(), None)
            .await;
        running.update(update).await;
        servers.push(server);
    }
    for (deployment, _, _, expected) in &cases {
        let (event, detail) = uplink.wait_outcome(deployment).await;
        assert_eq!(event, DeviceEvent::Failed, "{deployment}");
        assert!(detail.contains(expected), "{deployment}: {detail}");
    }
    for server in &servers {
        assert!(server.seen().is_empty(), "downloaded: {:?}", server.seen());
    }

    // Revocation lists, made offline: sequence 1 revokes an unrelated key,
    // sequence 2 adds the first signer.
    let (list1, doc1) = revoke(
        &device.root_key,
        None,
        &key_id(&new_key().verifying_key()),
        "old",
        now,
    )
    .unwrap();
    let (list2, _) = revoke(
        &device.root_key,
        Some(&doc1),
        &key_id(&first.verifying_key()),
        "laptop stolen",
        now,
    )
    .unwrap();
    // A list forged with another root is ignored (and does not revoke).
    let (forged, _) = revoke(
        &foreign_root,
        None,
        &key_id(&second.verifying_key()),
        "",
        now,
    )
    .unwrap();

    let (update, _server3) = device
        .release(
            "dep-revoked",
            "3.0.0",
            &first,
            first_cert.clone(),
            Some(list2),
        )
        .await;
    running.update(update).await;
    let (event, detail) = uplink.wait_outcome("dep-revoked").await;
    assert_eq!(event, DeviceEvent::Failed);
    assert!(
        detail.contains("revoked") && detail.contains("laptop stolen"),
        "{detail}"
    );
    assert_eq!(device.stored_revocation_sequence(), Some(2));

    // The stale list (which does not name the first signer) does not
    // un-revoke it; the forged one does not replace anything.
    for (deployment, list) in [("dep-stale", list1), ("dep-forged", forged)] {
        let (update, _server) = device
            .release(deployment, "3.0.1", &first, first_cert.clone(), Some(list))
            .await;
        running.update(update).await;
        let (event, detail) = uplink.wait_outcome(deployment).await;
        assert_eq!(event, DeviceEvent::Failed, "{deployment}");
        assert!(detail.contains("revoked"), "{deployment}: {detail}");
        assert_eq!(device.stored_revocation_sequence(), Some(2));
    }
    running.stop().await;
    assert_eq!(
        device.installer.runs.load(Ordering::SeqCst),
        runs_after_rotation
    );
    assert_eq!(
        device.installed_version(),
        Some(semver::Version::new(1, 1, 0))
    );
    assert_eq!(
        std::fs::read(device.root_dir.join("installed/sensor-fw")).unwrap(),
        b"firmware 1.1.0"
    );

    // After a restart the stored list still applies (no list in the
    // notification), and the second signer still installs.
    let running = device.start(&uplink);
    let (update, _server4) = device
        .release("dep-after-restart", "4.0.0", &first, first_cert, None)
        .await;
    running.update(update).await;
    let (event, detail) = uplink.wait_outcome("dep-after-restart").await;
    assert_eq!(event, DeviceEvent::Failed);
    assert!(detail.contains("revoked"), "{detail}");
    let (update, _server5) = device
        .release(
            "dep-second",
            "4.0.1",
            &second,
            device.certify(&second, now - DAY, now + DAY),
            None,
        )
        .await;
    running.update(update).await;
    assert_eq!(
        uplink.wait_outcome("dep-second").await.0,
        DeviceEvent::Installed
    );
    running.stop().await;
    assert_eq!(
        device.installed_version(),
        Some(semver::Version::new(4, 0, 1))
    );
}
