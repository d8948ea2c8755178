//! The agent loop (steps 5–8) without a broker: session events are fed in
//! through the channel the MQTT task would use, reports are recorded by a
//! fake uplink, and the artifact comes from a real HTTPS server with mutual
//! TLS. Packages are built and signed with `otter-package`, so signature,
//! hash, decryption and decompression are the real ones.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use otter_agent::install::FileInstaller;
use otter_agent::mqtt::MqttEvent;
use otter_agent::safe_state::{SafeStateError, SafeStateProbe};
use otter_agent::{Agent, AgentConfig, Handlers};
use otter_proto::job::{Job, Stage};
use otter_proto::manifest::{PackageKind, SignedManifest};
use otter_proto::messages::{DeviceEvent, UpdateNotification};
use support::{
    Answer, Counting, Pki, Recorder, Running, TestServer, pseudo_random_bytes, unix_now, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

/// A probe the test opens and closes.
struct Gate(AtomicBool);

impl SafeStateProbe for Gate {
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
        let open = self.0.load(Ordering::SeqCst);
        Box::pin(async move { Ok(open) })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    signing_key: ed25519_dalek::SigningKey,
    payload: Vec<u8>,
    signed: SignedManifest,
    data_key: String,
    artifact: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let pki = Pki::create(&root);
        std::fs::create_dir(root.join("signers")).unwrap();
        let key_path = root.join("signers/signer-1");
        otter_package::keys::generate_key_pair(&key_path).unwrap();
        let signing_key = otter_package::keys::read_signing_key(&key_path).unwrap();
        let payload = pseudo_random_bytes(300_000, 9);
        let (signed, data_key, artifact) = build(&signing_key, &payload, "1.0.0", &root);
        let fixture = Fixture {
            _dir: dir,
            root,
            pki,
            signing_key,
            payload,
            signed,
            data_key,
            artifact,
        };
        fixture.write_config("revB");
        fixture
    }

    fn write_config(&self, hardware: &str) {
        let text = format!(
            r#"
device_id = "dev-1"
hardware = "{hardware}"
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
"#
        );
        std::fs::write(self.root.join("agent.toml"), text).unwrap();
    }

    fn config(&self) -> AgentConfig {
        AgentConfig::load(&self.root.join("agent.toml")).unwrap()
    }

    fn notification(&self, deployment: &str, link: &str) -> UpdateNotification {
        UpdateNotification {
            signer_revocations: None,
            deployment_id: deployment.into(),
            release: "sensor-fw@1.0.0".into(),
            manifest: self.signed.clone(),
            link: link.into(),
            link_expires_at: unix_now() + 3600,
            wrapped_key: support::wrap_key(
                &self.root.join("state/encryption.key"),
                "dev-1",
                &self.signed,
                &self.data_key,
            ),
            allow_downgrade: false,
        }
    }

    fn installed_file(&self) -> PathBuf {
        self.root.join("installed/sensor-fw")
    }

    fn landing(&self, deployment: &str) -> PathBuf {
        self.root.join("landing").join(deployment)
    }

    /// An agent on this fixture's configuration and device certificate.
    fn agent(&self, handlers: Handlers) -> Agent {
        Agent::with_handlers(&self.config(), &self.pki.device_tls(), handlers).unwrap()
    }

    /// Starts an agent loop with `handlers`, publishing to `uplink`.
    fn run_agent(&self, handlers: Handlers, uplink: &Arc<Recorder>) -> Running {
        Running::start(self.agent(handlers), uplink.clone())
    }

    /// Handlers whose device is always in a safe state.
    fn open_handlers(&self) -> Handlers {
        handlers(self, always_open()).0
    }

    /// A download server that serves the artifact, honouring Range.
    async fn serve_artifact(&self) -> TestServer {
        TestServer::start(&self.pki, self.artifact.clone(), serve_everything()).await
    }

    fn persisted_job(&self) -> Option<Job> {
        otter_agent::state::StateStore::new(self.root.join("state"))
            .load_job()
            .unwrap()
    }
}

/// Builds a signed package and splits it into manifest, data key, artifact.
fn build(
    key: &ed25519_dalek::SigningKey,
    payload: &[u8],
    version: &str,
    scratch: &Path,
) -> (SignedManifest, String, Vec<u8>) {
    let options = otter_package::format::BuildOptions::new(
        "sensor-fw",
        semver::Version::parse(version).unwrap(),
        PackageKind::Firmware,
        vec!["revB".into()],
    );
    let mut package = Vec::new();
    otter_package::format::build_package(&mut &payload[..], &mut package, key, &options, scratch)
        .unwrap();
    let mut reader = &package[..];
    let header = otter_package::format::read_header(&mut reader).unwrap();
    (
        header.signed_manifest,
        header.data_key.to_base64(),
        reader.to_vec(),
    )
}

fn always_open() -> Arc<Gate> {
    Arc::new(Gate(AtomicBool::new(true)))
}

fn handlers(fixture: &Fixture, gate: Arc<Gate>) -> (Handlers, Arc<Counting>) {
    let installer = Arc::new(Counting {
        inner: FileInstaller::new(fixture.root.join("installed")),
        runs: AtomicUsize::new(0),
    });
    (
        Handlers {
            installer: installer.clone(),
            safe_state: gate,
        },
        installer,
    )
}

fn serve_everything() -> impl Fn(usize, Option<u64>) -> Answer + Send + Sync + 'static {
    |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    }
}

#[tokio::test]
async fn full_cycle_installs_reports_in_order_and_repeats_on_reconnect() {
    let fixture = Fixture::new();
    let server = fixture.serve_artifact().await;
    let (handlers, installer) = handlers(&fixture, always_open());
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(handlers, &uplink);

    running.send(MqttEvent::Connected).await;
    wait_until("registration", WAIT, || !uplink.registrations().is_empty()).await;
    {
        let registrations = uplink.registrations();
        let registration = &registrations[0];
        assert_eq!(registration.hardware, "revB");
        assert!(registration.installed.is_empty());
        assert_eq!(registration.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(registration.capabilities.contains(&"file".to_string()));
        assert!(
            registration
                .capabilities
                .contains(&"range-resume".to_string())
        );
    }

    running
        .update(fixture.notification("dep-1", &server.url("/v1/download/t1")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    assert_eq!(
        uplink.events("dep-1"),
        vec![
            DeviceEvent::Received,
            DeviceEvent::Downloaded,
            DeviceEvent::Installing,
            DeviceEvent::Installed
        ]
    );
    assert!(std::fs::read(fixture.installed_file()).unwrap() == fixture.payload);
    assert!(
        !fixture.landing("dep-1").exists(),
        "landing zone not cleared"
    );
    let installed = otter_agent::state::StateStore::new(fixture.root.join("state"))
        .load_installed()
        .unwrap();
    assert_eq!(installed["sensor-fw"], semver::Version::new(1, 0, 0));
    assert!(matches!(
        fixture.persisted_job().unwrap().stage,
        Stage::Finished {
            event: DeviceEvent::Installed,
            ..
        }
    ));

    // The same notification again only repeats the outcome.
    running
        .update(fixture.notification("dep-1", &server.url("/v1/download/t1")))
        .await;
    wait_until("repeat", WAIT, || uplink.events("dep-1").len() == 5).await;
    assert_eq!(uplink.last("dep-1").unwrap().event, DeviceEvent::Installed);

    // The install is followed by a registration with the new version.
    wait_until("registration after install", WAIT, || {
        uplink.registrations().len() == 2
    })
    .await;
    assert_eq!(
        uplink.registrations()[1].installed["sensor-fw"],
        semver::Version::new(1, 0, 0)
    );

    // A reconnection registers again, then repeats the report.
    running.send(MqttEvent::Connected).await;
    wait_until("third registration", WAIT, || {
        uplink.registrations().len() == 3 && uplink.events("dep-1").len() == 6
    })
    .await;
    assert_eq!(uplink.last("dep-1").unwrap().event, DeviceEvent::Installed);

    // Another deployment of the installed version is reported, not installed.
    running
        .update(fixture.notification("dep-2", &server.url("/v1/download/t2")))
        .await;
    uplink.wait_event("dep-2", DeviceEvent::Installed).await;
    assert!(
        uplink
            .last("dep-2")
            .unwrap()
            .detail
            .unwrap()
            .contains("already installed")
    );

    running.stop().await;
    assert_eq!(installer.runs.load(Ordering::SeqCst), 1);
    assert_eq!(server.seen().len(), 1, "{:?}", server.seen());
}

#[tokio::test]
async fn a_tampered_artifact_is_never_installed() {
    let fixture = Fixture::new();
    let mut tampered = fixture.artifact.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    let server = TestServer::start(&fixture.pki, tampered, serve_everything()).await;
    let (handlers, installer) = handlers(&fixture, always_open());
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(handlers, &uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Failed).await;
    assert_eq!(
        uplink.events("dep-1"),
        vec![DeviceEvent::Received, DeviceEvent::Failed]
    );
    let detail = uplink.last_detail("dep-1");
    assert!(detail.contains("hash mismatch"), "{detail}");
    running.stop().await;
    assert_eq!(installer.runs.load(Ordering::SeqCst), 0);
    assert!(!fixture.installed_file().exists());
    assert!(!fixture.landing("dep-1").exists());
}

#[tokio::test]
async fn a_bad_signature_is_refused_before_any_download() {
    let fixture = Fixture::new();
    let server = fixture.serve_artifact().await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(fixture.open_handlers(), &uplink);

    // The manifest text altered after signing (a larger declared size).
    let mut forged = fixture.notification("dep-forged", &server.url("/a"));
    forged.manifest.manifest = forged
        .manifest
        .manifest
        .replacen("\"size\":", "\"size\":1", 1);
    running.update(forged).await;
    // A package signed by a key the device does not trust.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (signed, data_key, _) = build(&stranger, b"evil", "1.0.0", &fixture.root);
    let mut untrusted = fixture.notification("dep-stranger", &server.url("/a"));
    untrusted.manifest = signed;
    untrusted.wrapped_key = support::wrap_key(
        &fixture.root.join("state/encryption.key"),
        "dev-1",
        &untrusted.manifest,
        &data_key,
    );
    running.update(untrusted).await;

    for deployment in ["dep-forged", "dep-stranger"] {
        uplink.wait_event(deployment, DeviceEvent::Failed).await;
        let detail = uplink.last_detail(deployment);
        assert!(detail.contains("signature check failed"), "{detail}");
        assert_eq!(uplink.events(deployment), vec![DeviceEvent::Failed]);
    }
    running.stop().await;
    assert!(
        server.seen().is_empty(),
        "downloaded despite a bad signature"
    );
    assert_eq!(fixture.persisted_job(), None);
    let _ = &fixture.signing_key;
}

#[tokio::test]
async fn incompatible_hardware_and_downgrades_are_refused() {
    let fixture = Fixture::new();
    fixture.write_config("revA");
    let server = fixture.serve_artifact().await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(fixture.open_handlers(), &uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Failed).await;
    let detail = uplink.last_detail("dep-1");
    assert!(detail.contains("revA"), "{detail}");
    running.stop().await;

    // revB device with 2.0.0 installed refuses 1.0.0.
    fixture.write_config("revB");
    otter_agent::state::StateStore::new(fixture.root.join("state"))
        .save_installed(&[("sensor-fw".to_string(), semver::Version::new(2, 0, 0))].into())
        .unwrap();
    let running = fixture.run_agent(fixture.open_handlers(), &uplink);
    running
        .update(fixture.notification("dep-2", &server.url("/a")))
        .await;
    uplink.wait_event("dep-2", DeviceEvent::Failed).await;
    let detail = uplink.last_detail("dep-2");
    assert!(detail.contains("downgrade"), "{detail}");
    running.stop().await;
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn a_restart_resumes_from_the_landing_zone_and_installs_once() {
    let fixture = Fixture::new();
    let server = fixture.serve_artifact().await;
    let gate = Arc::new(Gate(AtomicBool::new(false)));
    let (handlers_closed, installer) = handlers(&fixture, gate.clone());
    let uplink = Arc::new(Recorder::default());

    // First run: downloaded, then stuck waiting for a safe state; stopped.
    let running = fixture.run_agent(handlers_closed.clone(), &uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Downloaded).await;
    running.stop().await;
    assert_eq!(fixture.persisted_job().unwrap().stage, Stage::Downloaded);
    assert!(fixture.landing("dep-1").join("payload").exists());
    assert!(!fixture.installed_file().exists());

    // Second run: the device is safe now; the job resumes without a notification.
    gate.0.store(true, Ordering::SeqCst);
    let running = fixture.run_agent(handlers_closed.clone(), &uplink);
    running.send(MqttEvent::Connected).await;
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    running.stop().await;
    assert!(std::fs::read(fixture.installed_file()).unwrap() == fixture.payload);

    // Third run: nothing to do but repeat the outcome, after the
    // registration and when the notification comes again.
    let running = fixture.run_agent(handlers_closed, &uplink);
    let reports_before = uplink.events("dep-1").len();
    running.send(MqttEvent::Connected).await;
    running
        .update(fixture.notification("dep-1", &server.url("/a")))
        .await;
    wait_until("two repeats", WAIT, || {
        uplink.events("dep-1").len() == reports_before + 2
    })
    .await;
    running.stop().await;

    assert_eq!(
        installer.runs.load(Ordering::SeqCst),
        1,
        "installed more than once"
    );
    assert_eq!(server.seen().len(), 1, "downloaded more than once");
    assert!(!fixture.root.join("installed/sensor-fw.previous").exists());
    let events = uplink.events("dep-1");
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == DeviceEvent::Installing)
            .count(),
        1
    );
    assert_eq!(events.last(), Some(&DeviceEvent::Installed));
}

#[tokio::test]
async fn an_expired_link_waits_for_a_refresh() {
    let fixture = Fixture::new();
    let server = fixture.serve_artifact().await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(fixture.open_handlers(), &uplink);
    let mut stale = fixture.notification("dep-1", &server.url("/old"));
    stale.link_expires_at = unix_now() - 60;
    running.update(stale).await;
    uplink.wait_event("dep-1", DeviceEvent::Received).await;
    running
        .update(fixture.notification("dep-1", &server.url("/fresh")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    running.stop().await;
    let paths: Vec<String> = server.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/fresh".to_string()]);
}

#[tokio::test]
async fn a_gone_link_fails_the_job_once() {
    let fixture = Fixture::new();
    let server = TestServer::start(&fixture.pki, Vec::new(), |_, _| Answer::Status(410)).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(fixture.open_handlers(), &uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/revoked")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Failed).await;
    running.stop().await;
    let detail = uplink.last_detail("dep-1");
    assert!(detail.contains("410"), "{detail}");
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn a_corrupt_job_file_starts_the_agent_idle() {
    let fixture = Fixture::new();
    let state = fixture.root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("job.json"), b"{ not json").unwrap();
    let agent = fixture.agent(fixture.open_handlers());
    assert_eq!(agent.job(), None);
    assert!(state.join("job.json.corrupt").exists());
    assert!(!state.join("job.json").exists());
}

/// The agent's gate, counting how often the wait asked it.
struct CountedGate {
    inner: otter_agent::inhibit::InhibitorGate,
    checks: AtomicUsize,
}

impl SafeStateProbe for CountedGate {
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        self.inner.is_safe()
    }

    fn check(&self) -> BoxFuture<'_, Result<otter_agent::safe_state::Safety, SafeStateError>> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        self.inner.check()
    }
}

/// Issue 7 item 4: an inhibitor taken over the agent's socket holds the
/// install once the artifact is downloaded; when its holder's connection
/// closes (the holder died) the install goes ahead.
#[tokio::test]
async fn an_inhibitor_held_over_the_socket_holds_the_install_until_its_holder_goes() {
    use otter_agent::inhibit::{InhibitClient, InhibitServer, InhibitorGate, Inhibitors};

    let fixture = Fixture::new();
    let server = fixture.serve_artifact().await;
    let socket_path = fixture.config().inhibit_socket;
    assert_eq!(socket_path, fixture.root.join("state/inhibit.sock"));
    let inhibitors = Inhibitors::new();
    let socket = InhibitServer::start(&socket_path, inhibitors.clone()).unwrap();
    let mut holder = InhibitClient::connect(&socket_path).await.unwrap();
    holder
        .take("motion", "robot in motion", Duration::from_secs(600))
        .await
        .unwrap();

    let (mut handlers, installer) = handlers(&fixture, always_open());
    let gate = Arc::new(CountedGate {
        inner: InhibitorGate::new(inhibitors.clone(), handlers.safe_state.clone()),
        checks: AtomicUsize::new(0),
    });
    handlers.safe_state = gate.clone();
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(handlers, &uplink);
    running
        .update(fixture.notification("dep-1", &server.url("/a")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Downloaded).await;
    // Several rounds of the wait (10–50 ms apart) pass without an install.
    wait_until("five safe-state checks", WAIT, || {
        gate.checks.load(Ordering::SeqCst) >= 5
    })
    .await;
    assert_eq!(
        uplink.events("dep-1"),
        vec![DeviceEvent::Received, DeviceEvent::Downloaded]
    );
    assert_eq!(installer.runs.load(Ordering::SeqCst), 0);
    assert_eq!(fixture.persisted_job().unwrap().stage, Stage::Downloaded);

    // The holder goes away: its inhibitor ends and the install proceeds.
    drop(holder);
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    running.stop().await;
    assert_eq!(installer.runs.load(Ordering::SeqCst), 1);
    assert!(std::fs::read(fixture.installed_file()).unwrap() == fixture.payload);
    socket.stop().await;
    assert!(!socket_path.exists());
}
