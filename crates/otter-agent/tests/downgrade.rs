//! Anti-rollback in the agent loop: with 2.0.0 installed, a notification of
//! 1.0.0 is refused unless both the signed manifest and the deployment allow
//! a downgrade, and a refusal changes nothing on the device: no download, no
//! job, no landing zone folder, the installed file and versions untouched.
//! Driven as `agent_flow.rs` drives the loop: events through the MQTT task's
//! channel, reports recorded by a fake uplink, the artifact from a real
//! HTTPS server with mutual TLS.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use otter_agent::install::FileInstaller;
use otter_agent::mqtt::MqttEvent;
use otter_agent::state::StateStore;
use otter_agent::{Agent, AgentConfig, Handlers};
use otter_proto::manifest::{PackageKind, SignedManifest};
use otter_proto::messages::{DeviceEvent, ServerMessage, UpdateNotification};
use support::{AlwaysSafe, Answer, Counting, Pki, Recorder, TestServer, pseudo_random_bytes};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(30);

/// A signed 1.0.0 package, split as a notification carries it.
struct Package {
    signed: SignedManifest,
    /// The data key wrapped to the device of `dir` (as the server would).
    wrapped_key: String,
    artifact: Vec<u8>,
}

fn build(key: &ed25519_dalek::SigningKey, payload: &[u8], allow: bool, dir: &Path) -> Package {
    let mut options = otter_package::format::BuildOptions::new(
        "sensor-fw",
        semver::Version::new(1, 0, 0),
        PackageKind::Firmware,
        vec!["revB".into()],
    );
    options.allow_downgrade = allow;
    let mut package = Vec::new();
    otter_package::format::build_package(&mut &payload[..], &mut package, key, &options, dir)
        .unwrap();
    let mut reader = &package[..];
    let header = otter_package::format::read_header(&mut reader).unwrap();
    Package {
        signed: header.signed_manifest.clone(),
        wrapped_key: support::wrap_key(
            &dir.join("state/encryption.key"),
            "dev-1",
            &header.signed_manifest,
            &header.data_key.to_base64(),
        ),
        artifact: reader.to_vec(),
    }
}

fn notification(
    deployment: &str,
    package: &Package,
    link: String,
    allow: bool,
) -> UpdateNotification {
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 3600;
    UpdateNotification {
        signer_revocations: None,
        deployment_id: deployment.into(),
        release: "sensor-fw@1.0.0".into(),
        manifest: package.signed.clone(),
        link,
        link_expires_at: expires,
        wrapped_key: package.wrapped_key.clone(),
        allow_downgrade: allow,
    }
}

const CONFIG: &str = r#"
device_id = "dev-1"
hardware = "revB"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["signers/signer-1.pub"]

[safe_state]
initial_backoff = "10ms"
max_backoff = "50ms"

[download]
max_attempts = 3
initial_backoff = "10ms"
max_backoff = "50ms"
"#;

fn serve_everything() -> impl Fn(usize, Option<u64>) -> Answer + Send + Sync + 'static {
    |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    }
}

/// Everything in `dir`, or nothing when it does not exist.
fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn a_downgrade_needs_both_flags_and_a_refusal_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::create(root);
    std::fs::create_dir(root.join("signers")).unwrap();
    let key_path = root.join("signers/signer-1");
    otter_package::keys::generate_key_pair(&key_path).unwrap();
    let key = otter_package::keys::read_signing_key(&key_path).unwrap();
    std::fs::write(root.join("agent.toml"), CONFIG).unwrap();

    // 2.0.0 is installed: its file and its recorded version.
    let installed_file = root.join("installed/sensor-fw");
    std::fs::create_dir_all(installed_file.parent().unwrap()).unwrap();
    std::fs::write(&installed_file, b"firmware 2.0.0").unwrap();
    let state = StateStore::new(root.join("state"));
    std::fs::create_dir_all(state.dir()).unwrap();
    state
        .save_installed(&[("sensor-fw".to_string(), semver::Version::new(2, 0, 0))].into())
        .unwrap();
    let installed_json = std::fs::read(state.installed_path()).unwrap();

    let payload = pseudo_random_bytes(100_000, 3);
    let forbidding = build(&key, &payload, false, root);
    let allowing = build(&key, &payload, true, root);
    let server_forbidding =
        TestServer::start(&pki, forbidding.artifact.clone(), serve_everything()).await;
    let server_allowing =
        TestServer::start(&pki, allowing.artifact.clone(), serve_everything()).await;

    let installer = Arc::new(Counting {
        inner: FileInstaller::new(root.join("installed")),
        runs: AtomicUsize::new(0),
    });
    let handlers = Handlers {
        installer: installer.clone(),
        safe_state: Arc::new(AlwaysSafe),
    };
    let config = AgentConfig::load(&root.join("agent.toml")).unwrap();
    let agent = Agent::with_handlers(&config, &pki.device_tls(), handlers).unwrap();
    let uplink = Arc::new(Recorder::default());
    let (events, receiver) = mpsc::channel(16);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn({
        let uplink = uplink.clone();
        async move {
            agent
                .run(receiver, uplink.as_ref(), async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let send = |n: UpdateNotification| {
        let events = events.clone();
        async move {
            events
                .send(MqttEvent::Message(ServerMessage::Update(n)))
                .await
                .unwrap()
        }
    };

    // (manifest allows, deployment allows, why it is refused)
    let refused = [
        (
            "dep-neither",
            &forbidding,
            &server_forbidding,
            false,
            "neither the signed manifest nor the deployment allows a downgrade",
        ),
        (
            "dep-manifest-only",
            &allowing,
            &server_allowing,
            false,
            "the deployment does not allow a downgrade",
        ),
        (
            "dep-deployment-only",
            &forbidding,
            &server_forbidding,
            true,
            "the signed manifest does not allow a downgrade",
        ),
    ];
    for (deployment, package, server, deployment_allows, why) in refused {
        send(notification(
            deployment,
            package,
            server.url("/a"),
            deployment_allows,
        ))
        .await;
        uplink.wait_event(deployment, DeviceEvent::Failed).await;
        let reports = uplink.reports_for(deployment);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let detail = reports[0].detail.clone().unwrap();
        assert_eq!(
            detail,
            format!("downgrade from 2.0.0 to 1.0.0 refused: {why} (package sensor-fw)")
        );
    }
    // Nothing changed: no request, no job, no landing folder, no install.
    assert!(
        server_forbidding.seen().is_empty(),
        "{:?}",
        server_forbidding.seen()
    );
    assert!(
        server_allowing.seen().is_empty(),
        "{:?}",
        server_allowing.seen()
    );
    assert_eq!(state.load_job().unwrap(), None);
    assert_eq!(entries(&root.join("landing")), Vec::<PathBuf>::new());
    assert_eq!(
        std::fs::read(state.installed_path()).unwrap(),
        installed_json
    );
    assert_eq!(std::fs::read(&installed_file).unwrap(), b"firmware 2.0.0");
    assert_eq!(installer.runs.load(Ordering::SeqCst), 0);

    // Both flags: the downgrade is installed like any update.
    send(notification(
        "dep-both",
        &allowing,
        server_allowing.url("/b"),
        true,
    ))
    .await;
    uplink.wait_event("dep-both", DeviceEvent::Installed).await;
    let events: Vec<DeviceEvent> = uplink
        .reports_for("dep-both")
        .iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(
        events,
        vec![
            DeviceEvent::Received,
            DeviceEvent::Downloaded,
            DeviceEvent::Installing,
            DeviceEvent::Installed
        ]
    );
    assert!(std::fs::read(&installed_file).unwrap() == payload);
    assert_eq!(
        state.load_installed().unwrap()["sensor-fw"],
        semver::Version::new(1, 0, 0)
    );

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
    assert_eq!(installer.runs.load(Ordering::SeqCst), 1);
}
