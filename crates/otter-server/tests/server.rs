//! The whole server in-process: `otter_server::run` on port-0 loopback
//! addresses in a temporary data directory, driven over real HTTP (the
//! operator API), real mutual TLS (the device endpoint, with certificates
//! issued through the enrol API) and real MQTT over TLS (rumqttc against
//! the embedded broker).
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

mod common;

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use otter_proto::api::{
    DeploymentInfo, DeploymentStatus, DeviceInfo, EnrollResponse, ErrorBody, ReleaseInfo,
};
use otter_proto::deployment::Phase;
use otter_proto::manifest::Manifest;
use otter_proto::messages::{
    DeviceEvent, Mode, Registration, ServerMessage, StatusReport, UpdateNotification, encode,
};
use otter_proto::topics::{DeviceId, DeviceTopic, device_topic};
use reqwest::StatusCode;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use common::{
    HARDWARE, Server, TIMEOUT, client_tls, device_https_client, error_code, eventually, package,
    payload, signer,
};

const MAX_UPLOAD: u64 = 1 << 20;

/// A server whose links live `link_ttl` and whose uploads are capped at
/// `MAX_UPLOAD`, in `dir` (fresh, or kept from an earlier run).
async fn start_server_in(dir: tempfile::TempDir, link_ttl: Duration) -> Server {
    Server::start_configured(dir, |config| {
        config.link_ttl = link_ttl;
        config.max_upload_bytes = MAX_UPLOAD;
    })
    .await
}

/// A server in a fresh folder with links that live an hour.
async fn start_server() -> Server {
    start_server_in(tempfile::tempdir().unwrap(), Duration::from_secs(3600)).await
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.count())
        .unwrap_or(0)
}

// --- operator API -----------------------------------------------------------

#[tokio::test]
async fn admin_token_is_private_and_authenticates() {
    let server = start_server().await;
    let token_path = server.data_dir().join("admin.token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(server.token.starts_with("otter_") && server.token.len() > 40);

    let health = server
        .http
        .get(server.url("/api/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );

    assert_eq!(server.get("/api/v1/devices").await.status(), StatusCode::OK);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic abc"),
        Some("Bearer "),
    ] {
        let mut request = server.http.get(server.url("/api/v1/devices"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(error_code(response).await, "unauthorized");
    }
    let unknown_route = server.get("/api/v1/nothing").await;
    assert_eq!(unknown_route.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(unknown_route).await, "not-found");

    // A restart keeps the token file and the token.
    let token = server.token.clone();
    let dir = server.stop().await;
    assert!(!dir.path().join("data/endpoints.json").exists());
    let server = start_server_in(dir, Duration::from_secs(3600)).await;
    assert_eq!(server.token, token);
    assert_eq!(server.get("/api/v1/devices").await.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn enrolment_and_device_listing() {
    let server = start_server().await;
    let enrolled = server.enroll("dev-1", &["line-1", "north"]).await;
    assert_eq!(enrolled.device_id.as_str(), "dev-1");
    assert!(enrolled.certificate_pem.contains("BEGIN CERTIFICATE"));
    assert!(enrolled.private_key_pem.contains("PRIVATE KEY"));
    assert!(enrolled.ca_pem.contains("BEGIN CERTIFICATE"));
    assert_eq!(enrolled.trusted_signers.len(), 1);
    assert_eq!(
        enrolled.mqtt_url,
        format!("mqtts://127.0.0.1:{}", server.endpoints.mqtt.port())
    );
    assert_eq!(
        enrolled.device_url,
        format!("https://127.0.0.1:{}", server.endpoints.device.port())
    );
    server.enroll("dev-2", &["line-2"]).await;

    let all: Vec<DeviceInfo> = server.get("/api/v1/devices").await.json().await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(),
        ["dev-1", "dev-2"]
    );
    assert_eq!(all[0].tags, ["line-1", "north"]);
    assert_eq!(all[0].mode, None);
    let line2: Vec<DeviceInfo> = server
        .get("/api/v1/devices?tag=line-2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(line2.len(), 1);
    assert_eq!(line2[0].device_id.as_str(), "dev-2");
    let one: DeviceInfo = server
        .get("/api/v1/devices/dev-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one.hardware, HARDWARE);

    let missing = server.get("/api/v1/devices/nobody").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(missing).await, "unknown-device");

    let duplicate = server
        .post_json(
            "/api/v1/devices",
            serde_json::json!({"device_id": "dev-1", "hardware": HARDWARE}),
        )
        .await;
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(duplicate).await, "device-exists");

    for bad in [
        serde_json::json!({"device_id": "a/b", "hardware": HARDWARE}),
        serde_json::json!({"device_id": "dev-3", "hardware": "rev B"}),
        serde_json::json!({"device_id": "dev-3", "hardware": HARDWARE, "tags": ["#"]}),
        serde_json::json!({"device_id": "dev-3"}),
        serde_json::json!({"device_id": "dev-3", "hardware": HARDWARE, "extra": 1}),
    ] {
        let response = server.post_json("/api/v1/devices", bad.clone()).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let not_json = server
        .http
        .post(server.url("/api/v1/devices"))
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(not_json).await, "invalid-json");

    let audit = server.audit("device=dev-1").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event, "device.enrolled");
    assert_eq!(audit[0].actor, "admin");
    assert_eq!(audit[0].at.len(), "2026-01-01T00:00:00.000Z".len());
    server.stop().await;
}

#[tokio::test]
async fn release_upload_verifies_before_storing() {
    let server = start_server().await;
    let scratch = server.dir.path().to_path_buf();
    let key = signer(server.dir.path());
    let good = package(&key, &scratch, "fw", "1.0.0", &payload(200_000));

    let blobs = server.data_dir().join("blobs");
    let tmp = server.data_dir().join("tmp");
    let untrusted = package(
        &SigningKey::from_bytes(&[9; 32]),
        &scratch,
        "fw",
        "2.0.0",
        b"x",
    );
    let mut tampered = package(&key, &scratch, "fw", "3.0.0", &payload(200_000));
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let truncated = good[..good.len() - 10].to_vec();
    for (what, body) in [
        ("untrusted", untrusted),
        ("tampered", tampered),
        ("truncated", truncated),
        ("garbage", b"not a package at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        let response = server.upload(body).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}"
        );
        let body: ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error, "invalid-package", "{what}");
        assert!(!body.message.is_empty());
    }
    let too_large = server.upload(vec![0; MAX_UPLOAD as usize + 1]).await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(files_in(&blobs), 0);
    assert_eq!(files_in(&tmp), 0);
    let releases: Vec<ReleaseInfo> = server.get("/api/v1/releases").await.json().await.unwrap();
    assert!(releases.is_empty());

    let response = server.upload(good.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let release: ReleaseInfo = response.json().await.unwrap();
    assert_eq!(release.id, "fw@1.0.0");
    assert_eq!(release.uploaded_by, "admin");
    assert_eq!(release.payload_size, payload(200_000).len() as u64);
    let manifest = Manifest::from_json(&release.manifest.manifest).unwrap();
    // Only the artifact is stored, under its digest.
    let blob = std::fs::read(blobs.join(&manifest.artifact.sha256)).unwrap();
    assert_eq!(blob, good[good.len() - blob.len()..]);
    assert_eq!(hex::encode(Sha256::digest(&blob)), manifest.artifact.sha256);
    assert_eq!(files_in(&tmp), 0);

    let duplicate = server.upload(good).await;
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(duplicate).await, "release-exists");
    assert_eq!(files_in(&blobs), 1);

    let shown: ReleaseInfo = server
        .get("/api/v1/releases/fw@1.0.0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown, release);
    let missing = server.get("/api/v1/releases/fw@9.9.9").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(missing).await, "unknown-release");
    let uploads: Vec<_> = server
        .audit("")
        .await
        .into_iter()
        .filter(|e| e.event == "release.uploaded")
        .collect();
    assert_eq!(uploads.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn deployment_input_errors() {
    let server = start_server().await;
    let key = signer(server.dir.path());
    let scratch = server.dir.path().to_path_buf();
    server.enroll("dev-1", &["line-1"]).await;
    assert_eq!(
        server
            .upload(package(&key, &scratch, "fw", "1.0.0", b"hello"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let cases = [
        (
            "nope@1.0.0",
            "all",
            StatusCode::NOT_FOUND,
            "unknown-release",
        ),
        (
            "fw@1.0.0",
            "device:ghost",
            StatusCode::NOT_FOUND,
            "unknown-device",
        ),
        (
            "fw@1.0.0",
            "fleet:empty",
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty-target",
        ),
        (
            "fw@1.0.0",
            "everyone",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-target",
        ),
        (
            "fw",
            "all",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-release",
        ),
    ];
    for (release, target, status, code) in cases {
        let response = server
            .post_json(
                "/api/v1/deployments",
                serde_json::json!({"release": release, "target": target}),
            )
            .await;
        assert_eq!(response.status(), status, "{release} {target}");
        assert_eq!(error_code(response).await, code, "{release} {target}");
    }
    let deployments: Vec<DeploymentInfo> = server
        .get("/api/v1/deployments")
        .await
        .json()
        .await
        .unwrap();
    assert!(deployments.is_empty());

    let created = server.deploy("fw@1.0.0", "fleet:line-1").await;
    assert_eq!(created.devices, 1);
    assert_eq!(created.created_by, "admin");
    assert!(!created.complete);
    let audit = server
        .audit(&format!("deployment={}", created.deployment_id))
        .await;
    let events: Vec<&str> = audit.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(&events[..2], ["deployment.created", "deployment.targeted"]);
    assert_eq!(audit[1].device_id.as_deref(), Some("dev-1"));
    let missing = server.get("/api/v1/deployments/dep-none").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(missing).await, "unknown-deployment");
    server.stop().await;
}

// --- devices: MQTT and the download endpoint ---------------------------------

struct MqttDevice {
    device_id: DeviceId,
    client: AsyncClient,
    events: EventLoop,
    received: VecDeque<ServerMessage>,
}

impl MqttDevice {
    async fn connect(server: &Server, enrolled: &EnrollResponse) -> MqttDevice {
        let mut options = MqttOptions::new(
            enrolled.device_id.as_str(),
            "127.0.0.1",
            server.endpoints.mqtt.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(client_tls(enrolled)),
        )));
        let (client, events) = AsyncClient::new(options, 16);
        let mut device = MqttDevice {
            device_id: enrolled.device_id.clone(),
            client,
            events,
            received: VecDeque::new(),
        };
        device
            .client
            .subscribe(
                device_topic(&device.device_id, DeviceTopic::Notify),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        device
            .poll_until(|event| matches!(event, Event::Incoming(Packet::SubAck(_))))
            .await;
        device
    }

    /// Polls the connection until `done` accepts an event, keeping every
    /// server message that arrives meanwhile.
    async fn poll_until(&mut self, mut done: impl FnMut(&Event) -> bool) {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let event = self.events.poll().await.expect("mqtt connection failed");
                if let Event::Incoming(Packet::Publish(publish)) = &event {
                    self.received.push_back(
                        serde_json::from_slice(&publish.payload).expect("server message"),
                    );
                }
                if done(&event) {
                    return;
                }
            }
        })
        .await
        .expect("timed out polling mqtt")
    }

    async fn publish(&mut self, topic: DeviceTopic, payload: Vec<u8>) {
        self.client
            .publish(
                device_topic(&self.device_id, topic),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        self.poll_until(|event| matches!(event, Event::Incoming(Packet::PubAck(_))))
            .await;
    }

    async fn register(&mut self) {
        let registration = Registration {
            protocol: otter_proto::PROTOCOL_VERSION,
            hardware: HARDWARE.into(),
            installed: [("fw".to_owned(), semver::Version::new(0, 9, 0))].into(),
            agent_version: "0.1.0".into(),
            mode: Mode::PushPull,
            capabilities: vec!["file".into(), "range".into()],
            encryption_key: common::encryption_key(),
        };
        self.publish(DeviceTopic::Register, encode(&registration))
            .await;
    }

    async fn report(&mut self, deployment_id: &str, event: DeviceEvent, detail: Option<&str>) {
        let report = StatusReport {
            deployment_id: deployment_id.into(),
            event,
            detail: detail.map(str::to_owned),
        };
        self.publish(DeviceTopic::Status, encode(&report)).await;
    }

    async fn next_message(&mut self) -> ServerMessage {
        if self.received.is_empty() {
            self.poll_until(|event| matches!(event, Event::Incoming(Packet::Publish(_))))
                .await;
        }
        self.received.pop_front().unwrap()
    }

    /// The next update accepted by `wanted`. A notification may arrive
    /// twice (a deployment committed while the device registers is answered
    /// by both paths, with the same link), so repeats are skipped.
    async fn next_update_where(
        &mut self,
        mut wanted: impl FnMut(&UpdateNotification) -> bool,
    ) -> UpdateNotification {
        loop {
            match self.next_message().await {
                ServerMessage::Update(update) if wanted(&update) => return update,
                ServerMessage::Update(_) => continue,
                other => panic!("expected an update, got {other:?}"),
            }
        }
    }

    async fn next_update(&mut self) -> UpdateNotification {
        self.next_update_where(|_| true).await
    }

    /// The next error message, skipping repeated updates.
    async fn next_error_code(&mut self) -> String {
        loop {
            match self.next_message().await {
                ServerMessage::Error(error) => return error.code,
                ServerMessage::Update(_) => continue,
                other @ ServerMessage::PushOffer(_) => panic!("expected an error, got {other:?}"),
            }
        }
    }
}

/// Waits until the server has processed `count` registrations of `device`.
async fn wait_registrations(server: &Server, device: &str, count: usize) {
    eventually("the registration to be processed", || async {
        let registrations = server.count(device, "device.registered").await;
        (registrations >= count).then_some(())
    })
    .await
}

#[tokio::test]
async fn push_pull_over_mqtt_and_mtls() {
    let server = start_server().await;
    let key = signer(server.dir.path());
    let scratch = server.dir.path().to_path_buf();
    let device_a = server.enroll("dev-a", &["line-1"]).await;
    let device_b = server.enroll("dev-b", &["line-1"]).await;
    let package_1 = package(&key, &scratch, "fw", "1.0.0", &payload(200_000));
    let release_1: ReleaseInfo = server.upload(package_1.clone()).await.json().await.unwrap();
    let artifact_1 = package_1[package_1.len() - release_1.artifact_size as usize..].to_vec();

    // Step 2–4 while dev-a is offline: it stays pending until it registers.
    let deployment_1 = server.deploy("fw@1.0.0", "device:dev-a").await;
    assert_eq!(
        server.phase(&deployment_1.deployment_id, "dev-a").await,
        Phase::Pending
    );

    // Step 1, answered with what is pending (steps 4–5).
    let mut mqtt_a = MqttDevice::connect(&server, &device_a).await;
    mqtt_a.register().await;
    wait_registrations(&server, "dev-a", 1).await;
    let update = mqtt_a.next_update().await;
    assert_eq!(update.deployment_id, deployment_1.deployment_id);
    assert_eq!(update.release, "fw@1.0.0");
    assert_eq!(update.manifest, release_1.manifest);
    common::unwrap_key(
        &common::DEVICE_KEY,
        "dev-a",
        &update.manifest,
        &update.wrapped_key,
    )
    .unwrap();
    let link_prefix = format!(
        "https://127.0.0.1:{}/v1/download/",
        server.endpoints.device.port()
    );
    assert!(update.link.starts_with(&link_prefix), "{}", update.link);
    server
        .wait_phase(&deployment_1.deployment_id, "dev-a", Phase::Notified)
        .await;
    let registered: DeviceInfo = server
        .get("/api/v1/devices/dev-a")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(registered.mode, Some(Mode::PushPull));
    assert_eq!(registered.agent_version.as_deref(), Some("0.1.0"));
    assert!(registered.registered_at.is_some());

    // Step 6: the download endpoint.
    let http_a = device_https_client(&device_a);
    let http_b = device_https_client(&device_b);
    let full = http_a.get(&update.link).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    let manifest = Manifest::from_json(&release_1.manifest.manifest).unwrap();
    assert_eq!(
        full.headers()["etag"],
        format!("\"{}\"", manifest.artifact.sha256)
    );
    assert_eq!(
        full.headers()["content-length"],
        artifact_1.len().to_string()
    );
    assert_eq!(full.bytes().await.unwrap(), artifact_1);

    let partial = http_a
        .get(&update.link)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        partial.headers()["content-range"],
        format!("bytes 10-{}/{}", artifact_1.len() - 1, artifact_1.len())
    );
    assert_eq!(partial.bytes().await.unwrap(), artifact_1[10..]);
    let middle = http_a
        .get(&update.link)
        .header("range", "bytes=5-9")
        .send()
        .await
        .unwrap();
    assert_eq!(middle.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(middle.bytes().await.unwrap(), artifact_1[5..10]);
    let beyond = http_a
        .get(&update.link)
        .header("range", format!("bytes={}-", artifact_1.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    let stolen = http_b.get(&update.link).send().await.unwrap();
    assert_eq!(stolen.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(stolen).await, "wrong-device");
    for garbage in ["x", "AAAA", &"A".repeat(75)] {
        let response = http_a
            .get(format!("{link_prefix}{garbage}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{garbage}");
        assert_eq!(error_code(response).await, "unknown-link");
    }
    // No client certificate: the handshake completes (for `POST /v1/enrol`)
    // but the link is refused.
    let anonymous = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(device_a.ca_pem.as_bytes()).unwrap())
                    .unwrap();
                roots
            })
            .with_no_client_auth(),
        )
        .build()
        .unwrap();
    let anonymous_answer = anonymous.get(&update.link).send().await.unwrap();
    assert_eq!(anonymous_answer.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_code(anonymous_answer).await,
        "device-certificate-required"
    );

    // Steps 5–8 reported over MQTT; downloading revokes the link.
    let deployment_id = deployment_1.deployment_id.clone();
    mqtt_a
        .report(&deployment_id, DeviceEvent::Received, None)
        .await;
    server
        .wait_phase(&deployment_id, "dev-a", Phase::Received)
        .await;
    mqtt_a
        .report(&deployment_id, DeviceEvent::Downloaded, None)
        .await;
    server
        .wait_phase(&deployment_id, "dev-a", Phase::Downloaded)
        .await;
    let revoked = http_a.get(&update.link).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::GONE);
    assert_eq!(error_code(revoked).await, "link-revoked");
    // A duplicate report changes nothing and writes no audit row.
    mqtt_a
        .report(&deployment_id, DeviceEvent::Downloaded, None)
        .await;
    mqtt_a
        .report(&deployment_id, DeviceEvent::Installing, None)
        .await;
    mqtt_a
        .report(&deployment_id, DeviceEvent::Installed, Some("took 3 s"))
        .await;
    server
        .wait_phase(&deployment_id, "dev-a", Phase::Installed)
        .await;
    let status: DeploymentStatus = server
        .get(&format!("/api/v1/deployments/{deployment_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(status.info.complete);
    assert_eq!(status.targets[0].detail.as_deref(), Some("took 3 s"));

    let mut trail: Vec<String> = server
        .audit(&format!("deployment={deployment_id}"))
        .await
        .into_iter()
        .map(|e| e.event)
        .collect();
    // The notification may have gone out twice (see `next_update_where`).
    trail.dedup_by(|a, b| a == "notification.sent" && b == "notification.sent");
    assert_eq!(
        trail,
        [
            "deployment.created",
            "deployment.targeted",
            "link.created",
            "notification.sent",
            "download.served",
            "download.served",
            "download.served",
            "link.refused",
            "device.received",
            "device.downloaded",
            "link.revoked",
            "link.refused",
            "device.installing",
            "device.installed",
        ]
    );
    let served = server.audit(&format!("deployment={deployment_id}")).await;
    let range_starts: Vec<u64> = served
        .iter()
        .filter(|e| e.event == "download.served")
        .map(|e| e.details["range_start"].as_u64().unwrap())
        .collect();
    assert_eq!(range_starts, [0, 10, 5]);

    // A deployment made while the device is connected is pushed at once.
    let package_2 = package(&key, &scratch, "fw", "2.0.0", b"second");
    assert_eq!(server.upload(package_2).await.status(), StatusCode::CREATED);
    let deployment_2 = server.deploy("fw@2.0.0", "fleet:line-1").await;
    assert_eq!(deployment_2.devices, 2);
    let update_2 = mqtt_a
        .next_update_where(|u| u.deployment_id == deployment_2.deployment_id)
        .await;
    assert_eq!(update_2.deployment_id, deployment_2.deployment_id);
    assert_ne!(update_2.link, update.link);
    assert_eq!(
        http_a.get(&update_2.link).send().await.unwrap().status(),
        StatusCode::OK
    );
    // dev-b never connected: pending, no link yet.
    assert_eq!(
        server.phase(&deployment_2.deployment_id, "dev-b").await,
        Phase::Pending
    );

    // Bad device messages: answered, audited, nothing else changes.
    mqtt_a
        .publish(DeviceTopic::Status, b"{not json".to_vec())
        .await;
    assert_eq!(mqtt_a.next_error_code().await, "malformed-message");
    mqtt_a
        .report("dep-unknown", DeviceEvent::Installed, None)
        .await;
    assert_eq!(mqtt_a.next_error_code().await, "unknown-deployment");
    let mut old_protocol = serde_json::to_value(Registration {
        protocol: 99,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode: Mode::Pull,
        capabilities: vec![],
        encryption_key: None,
    })
    .unwrap();
    old_protocol["protocol"] = 99.into();
    mqtt_a
        .publish(DeviceTopic::Register, old_protocol.to_string().into_bytes())
        .await;
    assert_eq!(mqtt_a.next_error_code().await, "malformed-message");
    let rejected = server
        .audit("device=dev-a")
        .await
        .into_iter()
        .filter(|e| e.event == "message.rejected")
        .count();
    assert_eq!(rejected, 3);
    let still: DeviceInfo = server
        .get("/api/v1/devices/dev-a")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(still.mode, Some(Mode::PushPull));
    assert_eq!(
        server.phase(&deployment_2.deployment_id, "dev-a").await,
        Phase::Notified
    );

    // Failure detail is kept.
    mqtt_a
        .report(
            &deployment_2.deployment_id,
            DeviceEvent::Failed,
            Some("disk full"),
        )
        .await;
    let failed = server
        .wait_audit_event(
            &format!("deployment={}&device=dev-a", deployment_2.deployment_id),
            "device.failed",
        )
        .await;
    assert_eq!(failed.details["detail"], "disk full");
    assert_eq!(failed.actor, "dev-a");
    server.stop().await;
}

#[tokio::test]
async fn links_expire() {
    let server = start_server_in(tempfile::tempdir().unwrap(), Duration::from_secs(1)).await;
    let key = signer(server.dir.path());
    let scratch = server.dir.path().to_path_buf();
    let device = server.enroll("dev-x", &[]).await;
    assert_eq!(
        server
            .upload(package(&key, &scratch, "fw", "1.0.0", b"tiny"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let mut mqtt = MqttDevice::connect(&server, &device).await;
    mqtt.register().await;
    wait_registrations(&server, "dev-x", 1).await;
    server.deploy("fw@1.0.0", "device:dev-x").await;
    let update = mqtt.next_update().await;
    let http = device_https_client(&device);
    let status = eventually("the link to expire", || async {
        let response = http.get(&update.link).send().await.unwrap();
        (response.status() != StatusCode::OK).then_some(response)
    })
    .await;
    assert_eq!(status.status(), StatusCode::GONE);
    assert_eq!(error_code(status).await, "link-expired");
    let refused = server
        .wait_audit_event("device=dev-x", "link.refused")
        .await;
    assert_eq!(refused.details["reason"], "link-expired");

    // Registering again publishes a fresh link, which works.
    mqtt.register().await;
    let fresh = mqtt.next_update_where(|u| u.link != update.link).await;
    assert_ne!(fresh.link, update.link);
    let response = http.get(&fresh.link).send().await.unwrap();
    // The fresh link lives one second too; it either served or just expired.
    assert!(
        matches!(response.status(), StatusCode::OK | StatusCode::GONE),
        "{}",
        response.status()
    );
    server.stop().await;
}
