//! The health check after an install and the automatic rollback, through the
//! agent loop with the configured handlers: an application package goes to
//! the `archive` handler (`[install.kinds.application]`), and `[health]`
//! runs the `bin/healthy` script of the version `current` points at. The
//! artifact comes from a real HTTPS server with mutual TLS; packages are
//! built and signed with `otter-package`.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use otter_agent::{Agent, AgentConfig};
use otter_proto::job::{Job, Stage};
use otter_proto::manifest::{PackageKind, SignedManifest};
use otter_proto::messages::{DeviceEvent, UpdateNotification};
use support::{Answer, Pki, Recorder, Running, TestServer, unix_now, wait_until};

const WAIT: Duration = Duration::from_secs(30);

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    signing_key: ed25519_dalek::SigningKey,
}

/// A release of the `web` application, ready to be offered.
struct Release {
    signed: SignedManifest,
    data_key: String,
    artifact: Vec<u8>,
}

impl Fixture {
    /// `health_deadline`: how long the health check may take.
    fn new(health_deadline: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let pki = Pki::create(&root);
        std::fs::create_dir(root.join("signers")).unwrap();
        let key_path = root.join("signers/signer-1");
        otter_package::keys::generate_key_pair(&key_path).unwrap();
        let signing_key = otter_package::keys::read_signing_key(&key_path).unwrap();
        let text = format!(
            r#"
device_id = "dev-1"
hardware = "revB"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["signers/signer-1.pub"]

[install.kinds.application]
handler = "archive"
target_dir = "apps"

[health]
command = ["sh", "{}/apps/{{name}}/current/bin/healthy"]
deadline = "{health_deadline}"
"#,
            root.display()
        );
        std::fs::write(root.join("agent.toml"), text).unwrap();
        Fixture {
            _dir: dir,
            root,
            pki,
            signing_key,
        }
    }

    fn config(&self) -> AgentConfig {
        AgentConfig::load(&self.root.join("agent.toml")).unwrap()
    }

    /// Version `version` of `web`, whose health script is `healthy`.
    fn release(&self, version: &str, healthy: &str) -> Release {
        let payload = app_tar(version, healthy);
        let options = otter_package::format::BuildOptions::new(
            "web",
            semver::Version::parse(version).unwrap(),
            PackageKind::Application,
            vec!["revB".into()],
        );
        let mut package = Vec::new();
        otter_package::format::build_package(
            &mut &payload[..],
            &mut package,
            &self.signing_key,
            &options,
            &self.root,
        )
        .unwrap();
        let mut reader = &package[..];
        let header = otter_package::format::read_header(&mut reader).unwrap();
        Release {
            signed: header.signed_manifest,
            data_key: header.data_key.to_base64(),
            artifact: reader.to_vec(),
        }
    }

    fn notification(&self, deployment: &str, release: &Release, link: &str) -> UpdateNotification {
        let manifest =
            otter_proto::manifest::Manifest::from_json(&release.signed.manifest).unwrap();
        UpdateNotification {
            signer_revocations: None,
            deployment_id: deployment.into(),
            release: manifest.release_id(),
            manifest: release.signed.clone(),
            link: link.into(),
            link_expires_at: unix_now() + 3600,
            wrapped_key: support::wrap_key(
                &self.root.join("state/encryption.key"),
                "dev-1",
                &release.signed,
                &release.data_key,
            ),
            allow_downgrade: false,
        }
    }

    fn current(&self) -> PathBuf {
        std::fs::read_link(self.root.join("apps/web/current")).unwrap()
    }

    fn versions(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("apps/web/versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn installed_version(&self) -> Option<semver::Version> {
        otter_agent::state::StateStore::new(self.root.join("state"))
            .load_installed()
            .unwrap()
            .get("web")
            .cloned()
    }

    fn persisted_job(&self) -> Option<Job> {
        otter_agent::state::StateStore::new(self.root.join("state"))
            .load_job()
            .unwrap()
    }

    /// An agent with the configured handlers, running its loop.
    fn run_agent(&self, uplink: &Arc<Recorder>) -> Running {
        let agent = Agent::new(&self.config(), &self.pki.device_tls()).unwrap();
        Running::start(agent, uplink.clone())
    }
}

/// A tar archive of the application: `bin/healthy` (the health script) and
/// a `VERSION` file.
fn app_tar(version: &str, healthy: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data, mode) in [
        ("VERSION", version.as_bytes(), 0o644),
        ("bin/healthy", healthy.as_bytes(), 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap()
}

async fn serve(pki: &Pki, release: &Release) -> TestServer {
    TestServer::start(pki, release.artifact.clone(), |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    })
    .await
}

#[tokio::test]
async fn a_failed_health_check_rolls_the_archive_back_and_reports_it() {
    let fixture = Fixture::new("2s");
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);

    // 1.0.0 is healthy: installed, recorded, current.
    let one = fixture.release("1.0.0", "exit 0\n");
    let server = serve(&fixture.pki, &one).await;
    running
        .update(fixture.notification("dep-1", &one, &server.url("/v1/download/t1")))
        .await;
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    assert_eq!(fixture.current(), Path::new("versions/1.0.0"));
    assert_eq!(
        fixture.installed_version(),
        Some(semver::Version::new(1, 0, 0))
    );

    // 2.0.0 never gets healthy: rolled back to 1.0.0, reported with the reason.
    let two = fixture.release("2.0.0", "echo 'port 8080 is not answering' >&2\nexit 1\n");
    let server = serve(&fixture.pki, &two).await;
    running
        .update(fixture.notification("dep-2", &two, &server.url("/v1/download/t2")))
        .await;
    uplink.wait_event("dep-2", DeviceEvent::RolledBack).await;
    assert_eq!(
        uplink.events("dep-2"),
        vec![
            DeviceEvent::Received,
            DeviceEvent::Downloaded,
            DeviceEvent::Installing,
            DeviceEvent::RolledBack
        ]
    );
    assert_eq!(
        uplink.last_detail("dep-2"),
        "health check failed: exit 1: port 8080 is not answering; rolled back to 1.0.0"
    );
    assert_eq!(fixture.current(), Path::new("versions/1.0.0"));
    assert_eq!(
        std::fs::read_to_string(fixture.root.join("apps/web/current/VERSION")).unwrap(),
        "1.0.0"
    );
    assert_eq!(fixture.versions(), ["1.0.0"]);
    assert_eq!(
        fixture.installed_version(),
        Some(semver::Version::new(1, 0, 0))
    );
    assert!(matches!(
        fixture.persisted_job().unwrap().stage,
        Stage::Finished {
            event: DeviceEvent::RolledBack,
            ..
        }
    ));
    assert!(!fixture.root.join("landing/dep-2").exists());
    running.stop().await;
}

#[tokio::test]
async fn a_restart_during_the_health_check_checks_again_without_reinstalling() {
    // Long enough that the first agent is stopped mid-check.
    let fixture = Fixture::new("10m");
    let go = fixture.root.join("go");
    // Healthy once the test says so.
    let script = format!("test -e {}\n", go.display());
    let one = fixture.release("1.0.0", &script);
    let server = serve(&fixture.pki, &one).await;
    let uplink = Arc::new(Recorder::default());
    let running = fixture.run_agent(&uplink);
    running
        .update(fixture.notification("dep-1", &one, &server.url("/v1/download/t1")))
        .await;
    wait_until("health check stage persisted", WAIT, || {
        fixture
            .persisted_job()
            .is_some_and(|job| job.stage == Stage::HealthCheck)
    })
    .await;
    // Switched, but not recorded as installed until the check passes.
    assert_eq!(fixture.current(), Path::new("versions/1.0.0"));
    assert_eq!(fixture.installed_version(), None);
    running.stop().await;

    std::fs::write(&go, "").unwrap();
    let running = fixture.run_agent(&uplink);
    uplink.wait_event("dep-1", DeviceEvent::Installed).await;
    assert_eq!(
        fixture.installed_version(),
        Some(semver::Version::new(1, 0, 0))
    );
    // Checked again, not downloaded nor installed again.
    assert_eq!(server.seen().len(), 1, "{:?}", server.seen());
    assert_eq!(
        uplink
            .events("dep-1")
            .iter()
            .filter(|e| **e == DeviceEvent::Installing)
            .count(),
        1
    );
    running.stop().await;
}
