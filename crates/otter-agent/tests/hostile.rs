//! Hostile input on the device side (issue 6, item 8): notifications an
//! attacker or a broken server could send. Each test checks the clear
//! refusal (a `failed` report naming the reason) and that nothing changed:
//! no download (or, for a bomb, nothing kept from it), no persisted job,
//! no installer run, the installed file and `installed.json` as they were,
//! nothing written outside the landing zone. `docs/hostile-input.md` maps
//! every case of the item to the test that covers it.
//!
//! Harness as in `agent_flow.rs`: the agent loop without a broker (events
//! fed through the MQTT task's channel, reports recorded by a fake uplink),
//! the artifact from a real HTTPS server with mutual TLS, packages built
//! and signed with `otter-package`.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use otter_agent::install::FileInstaller;
use otter_agent::state::StateStore;
use otter_agent::{Agent, AgentConfig, Handlers};
use otter_proto::job::Stage;
use otter_proto::manifest::{Manifest, PackageKind, SignedManifest};
use otter_proto::messages::{DeviceEvent, UpdateNotification};
use support::{
    AlwaysSafe, Answer, Counting, Pki, Recorder, Running, TestServer, pseudo_random_bytes, unix_now,
};

// --- harness ----------------------------------------------------------------

/// A device folder with an installed `sensor-fw` 0.9.0 and a trusted key.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    signing_key: ed25519_dalek::SigningKey,
    installer: Arc<Counting>,
}

const INSTALLED: &[u8] = b"firmware 0.9.0";

impl Fixture {
    fn new(hardware: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("device");
        std::fs::create_dir(&root).unwrap();
        let pki = Pki::create(&root);
        std::fs::create_dir(root.join("signers")).unwrap();
        let key_path = root.join("signers/signer-1");
        otter_package::keys::generate_key_pair(&key_path).unwrap();
        let signing_key = otter_package::keys::read_signing_key(&key_path).unwrap();
        std::fs::write(
            root.join("agent.toml"),
            format!(
                r#"
device_id = "dev-1"
hardware = "{hardware}"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["signers/signer-1.pub"]

[download]
max_attempts = 2
initial_backoff = "10ms"
max_backoff = "50ms"
"#
            ),
        )
        .unwrap();
        std::fs::create_dir(root.join("installed")).unwrap();
        std::fs::write(root.join("installed/sensor-fw"), INSTALLED).unwrap();
        StateStore::new(root.join("state"))
            .save_installed(&[("sensor-fw".to_string(), semver::Version::new(0, 9, 0))].into())
            .unwrap();
        let installer = Arc::new(Counting {
            inner: FileInstaller::new(root.join("installed")),
            runs: AtomicUsize::new(0),
        });
        Fixture {
            _dir: dir,
            root,
            pki,
            signing_key,
            installer,
        }
    }

    /// Starts an agent loop publishing to `uplink`.
    fn run_agent(&self, uplink: &Arc<Recorder>) -> Running {
        let config = AgentConfig::load(&self.root.join("agent.toml")).unwrap();
        let handlers = Handlers {
            installer: self.installer.clone(),
            safe_state: Arc::new(AlwaysSafe),
        };
        let agent = Agent::with_handlers(&config, &self.pki.device_tls(), handlers).unwrap();
        Running::start(agent, uplink.clone())
    }

    /// Builds `sensor-fw@version` of `payload` for `revB`, signed with the
    /// trusted key: the signed manifest, data key and artifact.
    fn build(&self, payload: &[u8], version: &str) -> (SignedManifest, String, Vec<u8>) {
        let options = otter_package::format::BuildOptions::new(
            "sensor-fw",
            semver::Version::parse(version).unwrap(),
            PackageKind::Firmware,
            vec!["revB".into()],
        );
        let scratch = self.root.join("build-scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let mut package = Vec::new();
        otter_package::format::build_package(
            &mut &payload[..],
            &mut package,
            &self.signing_key,
            &options,
            &scratch,
        )
        .unwrap();
        let mut reader = &package[..];
        let header = otter_package::format::read_header(&mut reader).unwrap();
        (
            header.signed_manifest,
            header.data_key.to_base64(),
            reader.to_vec(),
        )
    }

    /// Checks that the device is as [`Fixture::new`] left it, apart from an
    /// empty landing zone and, when the refusal came after the download
    /// started (`failed_job`), the job recorded as finished with `failed`
    /// (so a repeated notification is answered, not retried).
    fn assert_unchanged(&self, failed_job: Option<&str>) {
        assert_eq!(self.installer.runs.load(Ordering::SeqCst), 0);
        assert_eq!(
            std::fs::read(self.root.join("installed/sensor-fw")).unwrap(),
            INSTALLED
        );
        let store = StateStore::new(self.root.join("state"));
        assert_eq!(
            store.load_installed().unwrap(),
            [("sensor-fw".to_string(), semver::Version::new(0, 9, 0))].into()
        );
        let job = store.load_job().unwrap();
        match failed_job {
            None => assert_eq!(job, None, "a job was persisted"),
            Some(deployment) => {
                let job = job.expect("the failed job is recorded");
                assert_eq!(job.notification.deployment_id, deployment);
                assert!(
                    matches!(
                        job.stage,
                        Stage::Finished {
                            event: DeviceEvent::Failed,
                            ..
                        }
                    ),
                    "{:?}",
                    job.stage
                );
            }
        }
        let landing = self.root.join("landing");
        let left: Vec<_> = std::fs::read_dir(&landing)
            .map(|entries| entries.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in the landing zone: {left:?}");
        // Nothing beside the device folder (where `..` would lead).
        let beside: Vec<_> = std::fs::read_dir(self.root.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != "device")
            .collect();
        assert!(beside.is_empty(), "written outside the device: {beside:?}");
        let installed: Vec<_> = std::fs::read_dir(self.root.join("installed"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(installed, ["sensor-fw"]);
    }
}

impl Fixture {
    /// A notification of `manifest` with `data_key` wrapped to this device.
    fn notification(
        &self,
        deployment: &str,
        link: &str,
        (manifest, data_key): (SignedManifest, String),
    ) -> UpdateNotification {
        let key_file = self.root.join("state/encryption.key");
        let wrapped_key = support::wrap_key(&key_file, "dev-1", &manifest, &data_key);
        notification_wrapped(deployment, link, manifest, wrapped_key)
    }
}

fn notification_wrapped(
    deployment: &str,
    link: &str,
    manifest: SignedManifest,
    wrapped_key: String,
) -> UpdateNotification {
    UpdateNotification {
        signer_revocations: None,
        deployment_id: deployment.into(),
        release: "sensor-fw@1.0.0".into(),
        manifest,
        link: link.into(),
        link_expires_at: unix_now() + 3600,
        wrapped_key,
        allow_downgrade: false,
    }
}

async fn serve(pki: &Pki, artifact: Vec<u8>) -> TestServer {
    TestServer::start(pki, artifact, |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    })
    .await
}

// --- tests --------------------------------------------------------------------

#[tokio::test]
async fn path_traversal_in_a_deployment_id_is_refused_and_writes_nothing() {
    let fixture = Fixture::new("revB");
    let (signed, data_key, artifact) = fixture.build(b"new firmware", "1.0.0");
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    let hostile = [
        "..",
        "../escape",
        "../../escape",
        "a/b",
        "/tmp/otter-hostile-escape",
        ".hidden",
    ];
    for deployment in hostile {
        running
            .update(fixture.notification(
                deployment,
                &server.url("/a"),
                (signed.clone(), data_key.clone()),
            ))
            .await;
    }
    for deployment in hostile {
        let detail = uplink.wait_failure(deployment).await;
        assert!(detail.contains(deployment), "{deployment}: {detail}");
        assert_eq!(uplink.events(deployment), [DeviceEvent::Failed]);
    }
    // A package name (it becomes `installed/<name>`) with a traversal,
    // signed by the trusted key: only validation can refuse it.
    let mut manifest = Manifest::from_json(&signed.manifest).unwrap();
    manifest.name = "../../escape".into();
    let evil = otter_package::sign::sign_manifest(&manifest, &fixture.signing_key);
    let mut named = fixture.notification("dep-name", &server.url("/a"), (evil, data_key.clone()));
    named.release = "../../escape@1.0.0".into();
    running.update(named).await;
    let detail = uplink.wait_failure("dep-name").await;
    assert!(detail.contains("name"), "{detail}");
    assert_eq!(uplink.events("dep-name"), [DeviceEvent::Failed]);
    running.stop().await;
    assert!(server.seen().is_empty(), "downloaded: {:?}", server.seen());
    assert!(!Path::new("/tmp/otter-hostile-escape").exists());
    fixture.assert_unchanged(None);
}

#[tokio::test]
async fn tampered_signatures_are_refused_before_any_download() {
    let fixture = Fixture::new("revB");
    let (signed, data_key, artifact) = fixture.build(b"new firmware", "1.0.0");
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);

    // One bit of the signature flipped (base64 of 64 bytes: the first
    // character changes the first byte's top bits).
    let mut flipped = signed.clone();
    let first = if flipped.signature.starts_with('A') {
        "B"
    } else {
        "A"
    };
    flipped.signature.replace_range(0..1, first);
    // A signature that is not base64, one of the wrong length, none at all.
    let mut garbage = signed.clone();
    garbage.signature = "not base64!".into();
    let mut short = signed.clone();
    short.signature = "AAAA".into();
    let mut empty = signed.clone();
    empty.signature.clear();
    // The signer field naming another (untrusted) key.
    let mut other_signer = signed.clone();
    other_signer.signer = "A".repeat(43) + "=";
    let cases = [
        ("dep-flipped", flipped),
        ("dep-garbage", garbage),
        ("dep-short", short),
        ("dep-empty", empty),
        ("dep-signer", other_signer),
    ];
    for (deployment, manifest) in &cases {
        running
            .update(fixture.notification(
                deployment,
                &server.url("/a"),
                (manifest.clone(), data_key.clone()),
            ))
            .await;
    }
    for (deployment, _) in &cases {
        let detail = uplink.wait_failure(deployment).await;
        assert!(
            detail.contains("signature check failed"),
            "{deployment}: {detail}"
        );
        assert_eq!(uplink.events(deployment), [DeviceEvent::Failed]);
    }
    // The notification's release must be the signed one.
    let mut renamed = fixture.notification("dep-renamed", &server.url("/a"), (signed, data_key));
    renamed.release = "sensor-fw@9.0.0".into();
    running.update(renamed).await;
    let detail = uplink.wait_failure("dep-renamed").await;
    assert!(detail.contains("sensor-fw@9.0.0"), "{detail}");
    running.stop().await;
    assert!(server.seen().is_empty(), "downloaded: {:?}", server.seen());
    fixture.assert_unchanged(None);
}

#[tokio::test]
async fn wrong_hardware_is_refused_before_any_download_and_changes_nothing() {
    let fixture = Fixture::new("revA");
    let (signed, data_key, artifact) = fixture.build(b"new firmware", "1.0.0");
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a"), (signed, data_key)))
        .await;
    let detail = uplink.wait_failure("dep-1").await;
    assert!(detail.contains("revA"), "{detail}");
    assert_eq!(uplink.events("dep-1"), [DeviceEvent::Failed]);
    running.stop().await;
    assert!(server.seen().is_empty(), "downloaded: {:?}", server.seen());
    fixture.assert_unchanged(None);
}

#[tokio::test]
async fn a_decompression_bomb_stops_at_the_declared_size_and_installs_nothing() {
    let fixture = Fixture::new("revB");
    // 16 MiB of zeros compress to a few KiB; the re-signed manifest (a
    // builder bug or a stolen key) declares 4 KiB of payload.
    let declared = 4096;
    let bomb = vec![0u8; 16 << 20];
    let (signed, data_key, artifact) = fixture.build(&bomb, "1.0.0");
    assert!(artifact.len() < 1 << 20, "{}", artifact.len());
    let mut manifest = Manifest::from_json(&signed.manifest).unwrap();
    manifest.payload.size = declared;
    let lying = otter_package::sign::sign_manifest(&manifest, &fixture.signing_key);
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    running
        .update(fixture.notification("dep-bomb", &server.url("/a"), (lying, data_key)))
        .await;
    let detail = uplink.wait_failure("dep-bomb").await;
    assert_eq!(
        uplink.events("dep-bomb"),
        [DeviceEvent::Received, DeviceEvent::Failed]
    );
    assert!(
        detail.contains("larger than the manifest declares"),
        "{detail}"
    );
    running.stop().await;
    assert_eq!(server.seen().len(), 1);
    fixture.assert_unchanged(Some("dep-bomb"));
}

#[tokio::test]
async fn a_payload_unlike_its_signed_hash_is_refused_and_changes_nothing() {
    // Same size, one payload byte different from what the manifest signs:
    // the artifact is re-encrypted so that decryption succeeds.
    let fixture = Fixture::new("revB");
    let payload = pseudo_random_bytes(100_000, 3);
    let (signed, _, _) = fixture.build(&payload, "1.0.0");
    let mut altered = payload.clone();
    altered[50_000] ^= 0x01;
    let (altered_signed, data_key, artifact) = fixture.build(&altered, "1.0.0");
    let mut manifest = Manifest::from_json(&altered_signed.manifest).unwrap();
    manifest.payload = Manifest::from_json(&signed.manifest).unwrap().payload;
    let lying = otter_package::sign::sign_manifest(&manifest, &fixture.signing_key);
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a"), (lying, data_key)))
        .await;
    let detail = uplink.wait_failure("dep-1").await;
    assert!(detail.contains("does not match the manifest"), "{detail}");
    running.stop().await;
    fixture.assert_unchanged(Some("dep-1"));
}

#[tokio::test]
async fn a_data_key_wrapped_for_another_device_is_refused_before_any_download() {
    let fixture = Fixture::new("revB");
    let (signed, data_key, artifact) = fixture.build(b"new firmware", "1.0.0");
    let server = serve(&fixture.pki, artifact).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    let link = server.url("/a");
    // Wrapped for device A (its own key and id), handed to this device.
    let device_a = otter_package::wrap::DeviceKey::generate();
    let for_a = support::wrap_to(device_a.public_key(), "dev-a", &signed, &data_key);
    running
        .update(notification_wrapped("dep-a", &link, signed.clone(), for_a))
        .await;
    // This device's public key but bound to another device's id.
    let own =
        otter_package::wrap::DeviceKey::read(&fixture.root.join("state/encryption.key")).unwrap();
    let relabelled = support::wrap_to(own.public_key(), "dev-a", &signed, &data_key);
    running
        .update(notification_wrapped(
            "dep-b",
            &link,
            signed.clone(),
            relabelled,
        ))
        .await;
    // Not a wrapped key at all.
    running
        .update(notification_wrapped(
            "dep-c",
            &link,
            signed.clone(),
            "%%%".into(),
        ))
        .await;
    for deployment in ["dep-a", "dep-b", "dep-c"] {
        let detail = uplink.wait_failure(deployment).await;
        assert!(
            detail.starts_with("cannot unwrap the data key: "),
            "{deployment}: {detail}"
        );
        assert_eq!(uplink.events(deployment), [DeviceEvent::Failed]);
    }
    running.stop().await;
    assert!(server.seen().is_empty(), "downloaded: {:?}", server.seen());
    fixture.assert_unchanged(None);
}
