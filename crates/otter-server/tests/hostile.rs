//! Hostile input on the server's device side (issue 6, item 8): each test
//! sends what an attacker or a broken device would, checks the clear
//! refusal, and then checks that nothing changed: the target's phase, the
//! deployment's audit trail (apart from the refusal's own row), the link
//! for its rightful owner. `docs/hostile-input.md` maps every case of the
//! item to the test that covers it; the cases already covered elsewhere
//! are not repeated here.
//!
//! The whole server runs in-process (`otter_server::run` on port-0 loopback
//! addresses), driven over real mutual TLS (the device endpoint) and real
//! MQTT over TLS (rumqttc against the embedded broker).
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

mod common;

use std::sync::Arc;
use std::time::Duration;

use otter_proto::api::EnrollResponse;
use otter_proto::deployment::Phase;
use otter_proto::manifest::Manifest;
use otter_proto::messages::{
    DeviceEvent, Mode, PollResponse, Registration, ServerMessage, StatusReport, UpdateNotification,
    encode,
};
use otter_proto::topics::{DeviceTopic, device_topic};
use reqwest::StatusCode;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};

use common::{
    HARDWARE, Server, TIMEOUT, client_tls, device_https_client, error_code, eventually, payload,
};

// --- a polling device -------------------------------------------------------

/// A device in pull mode: its HTTPS client with its own certificate.
struct PollingDevice {
    http: reqwest::Client,
    base: String,
}

impl PollingDevice {
    fn new(server: &Server, enrolled: &EnrollResponse) -> PollingDevice {
        PollingDevice {
            http: device_https_client(enrolled),
            base: format!("https://127.0.0.1:{}", server.endpoints.device.port()),
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Polls (registering in pull mode); returns the pending update.
    async fn update(&self) -> UpdateNotification {
        let response = self
            .post("/v1/poll", encode(&registration(Mode::Pull)))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: PollResponse = response.json().await.unwrap();
        answer.update.expect("an update")
    }

    async fn report(&self, deployment_id: &str, event: DeviceEvent) {
        let report = StatusReport {
            deployment_id: deployment_id.into(),
            event,
            detail: None,
        };
        let response = self.post("/v1/status", encode(&report)).await;
        assert!(response.status().is_success(), "{}", response.status());
    }

    async fn download(&self, link: &str) -> reqwest::Response {
        self.http.get(link).send().await.unwrap()
    }
}

fn registration(mode: Mode) -> Registration {
    Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode,
        capabilities: vec!["file".into(), "range".into()],
        encryption_key: common::encryption_key(),
    }
}

// --- what "nothing changed" means -------------------------------------------

/// The deployment's audit events in order, without `link.refused` rows (the
/// refusal's own record, checked separately).
async fn trail(server: &Server, deployment_id: &str) -> Vec<String> {
    server
        .audit(&format!("deployment={deployment_id}"))
        .await
        .into_iter()
        .map(|entry| entry.event)
        .filter(|event| event != "link.refused")
        .collect()
}

/// Waits for `device`'s `link.refused` row and checks its reason.
async fn expect_refusal_row(server: &Server, device: &str, reason: &str) {
    let refused = server
        .wait_audit_event(&format!("device={device}"), "link.refused")
        .await;
    assert_eq!(refused.details["reason"], reason, "{refused:#?}");
    assert_eq!(refused.actor, device);
}

/// A deployment of a fresh `fw@1.0.0` to `dev-a`, which polled its link.
async fn deployed_to_dev_a(server: &Server) -> (EnrollResponse, String, UpdateNotification) {
    let enrolled = server.enroll("dev-a", &[]).await;
    server.upload_release("fw", "1.0.0", &payload(50_000)).await;
    let deployment_id = server
        .deploy("fw@1.0.0", "device:dev-a")
        .await
        .deployment_id;
    let update = PollingDevice::new(server, &enrolled).update().await;
    assert_eq!(update.deployment_id, deployment_id);
    server
        .wait_phase(&deployment_id, "dev-a", Phase::Notified)
        .await;
    (enrolled, deployment_id, update)
}

// --- links --------------------------------------------------------------------

#[tokio::test]
async fn another_devices_link_is_refused_and_changes_nothing() {
    let server = Server::start().await;
    let (enrolled_a, deployment_id, update) = deployed_to_dev_a(&server).await;
    let device_a = PollingDevice::new(&server, &enrolled_a);
    let device_b = PollingDevice::new(&server, &server.enroll("dev-b", &[]).await);
    let before = trail(&server, &deployment_id).await;

    let stolen = device_b.download(&update.link).await;
    assert_eq!(stolen.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(stolen).await, "wrong-device");
    expect_refusal_row(&server, "dev-b", "wrong-device").await;

    // Nothing changed: same phase, same trail, dev-b got no target, and the
    // link still serves its owner (the attempt did not revoke it).
    assert_eq!(server.phase(&deployment_id, "dev-a").await, Phase::Notified);
    assert_eq!(trail(&server, &deployment_id).await, before);
    assert_eq!(server.count("dev-b", "download.served").await, 0);
    let status: otter_proto::api::DeploymentStatus = server
        .get_json(&format!("/api/v1/deployments/{deployment_id}"))
        .await;
    assert!(
        status
            .targets
            .iter()
            .all(|t| t.device_id.as_str() == "dev-a")
    );
    let owner = device_a.download(&update.link).await;
    assert_eq!(owner.status(), StatusCode::OK);
    assert!(!owner.bytes().await.unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_replayed_link_after_downloaded_is_refused_and_changes_nothing() {
    let server = Server::start().await;
    let (enrolled_a, deployment_id, update) = deployed_to_dev_a(&server).await;
    let device_a = PollingDevice::new(&server, &enrolled_a);
    assert_eq!(
        device_a.download(&update.link).await.status(),
        StatusCode::OK
    );
    device_a.report(&deployment_id, DeviceEvent::Received).await;
    device_a
        .report(&deployment_id, DeviceEvent::Downloaded)
        .await;
    server
        .wait_phase(&deployment_id, "dev-a", Phase::Downloaded)
        .await;
    server
        .wait_audit_event(&format!("deployment={deployment_id}"), "link.revoked")
        .await;
    let before = trail(&server, &deployment_id).await;
    let served_before = server.count("dev-a", "download.served").await;

    // The same link again, whole and as a range: refused as revoked.
    for range in [None, Some("bytes=10-")] {
        let mut request = device_a.http.get(&update.link);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        let replayed = request.send().await.unwrap();
        assert_eq!(replayed.status(), StatusCode::GONE, "{range:?}");
        assert_eq!(error_code(replayed).await, "link-revoked");
    }
    expect_refusal_row(&server, "dev-a", "link-revoked").await;
    eventually("both refusals to be audited", || async {
        (server.count("dev-a", "link.refused").await == 2).then_some(())
    })
    .await;

    assert_eq!(
        server.phase(&deployment_id, "dev-a").await,
        Phase::Downloaded
    );
    assert_eq!(trail(&server, &deployment_id).await, before);
    assert_eq!(
        server.count("dev-a", "download.served").await,
        served_before
    );
    // A poll does not hand out a new link for a downloaded deployment.
    let response = device_a
        .post("/v1/poll", encode(&registration(Mode::Pull)))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: PollResponse = response.json().await.unwrap();
    assert_eq!(answer.update, None);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_link_is_refused_and_changes_nothing() {
    let server = Server::start_configured(tempfile::tempdir().unwrap(), |config| {
        config.link_ttl = Duration::from_secs(1);
    })
    .await;
    let (enrolled_a, deployment_id, update) = deployed_to_dev_a(&server).await;
    let device_a = PollingDevice::new(&server, &enrolled_a);
    let before = trail(&server, &deployment_id).await;
    let served_before = server.count("dev-a", "download.served").await;

    // Wait for the expiry by asking (the only way to learn it), not by a
    // sleep; a download served before it would change the count below.
    let refused = eventually("the link to expire", || async {
        let response = device_a.download(&update.link).await;
        (response.status() == StatusCode::GONE).then_some(response)
    })
    .await;
    assert_eq!(error_code(refused).await, "link-expired");
    expect_refusal_row(&server, "dev-a", "link-expired").await;

    assert_eq!(server.phase(&deployment_id, "dev-a").await, Phase::Notified);
    let served = server.count("dev-a", "download.served").await - served_before;
    let after: Vec<String> = trail(&server, &deployment_id)
        .await
        .into_iter()
        .filter(|event| event != "download.served")
        .collect();
    assert_eq!(after, before, "{served} downloads served before expiry");
    // The next poll replaces the link: the deployment was not harmed.
    let fresh = device_a.update().await;
    assert_eq!(fresh.deployment_id, deployment_id);
    assert_ne!(fresh.link, update.link);
    server.stop().await;
}

// --- MQTT -----------------------------------------------------------------------

/// A device on MQTT over TLS with its own certificate, subscribed to its
/// `notify` topic, allowed to send packets up to `max_packet` bytes.
struct MqttDevice {
    enrolled: EnrollResponse,
    client: AsyncClient,
    events: EventLoop,
}

impl MqttDevice {
    async fn connect(server: &Server, enrolled: &EnrollResponse) -> MqttDevice {
        let mut options = MqttOptions::new(
            enrolled.device_id.as_str(),
            "127.0.0.1",
            server.endpoints.mqtt.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(4 << 20, 4 << 20);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(client_tls(enrolled)),
        )));
        let (client, events) = AsyncClient::new(options, 16);
        let mut device = MqttDevice {
            enrolled: enrolled.clone(),
            client,
            events,
        };
        device
            .client
            .subscribe(
                device_topic(&enrolled.device_id, DeviceTopic::Notify),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        device
            .next(|event| matches!(event, Event::Incoming(Packet::SubAck(_))).then_some(()))
            .await;
        device
    }

    /// Polls the connection until `wanted` picks an event.
    async fn next<T>(&mut self, mut wanted: impl FnMut(&Event) -> Option<T>) -> T {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let event = self.events.poll().await.expect("mqtt connection failed");
                if let Some(value) = wanted(&event) {
                    return value;
                }
            }
        })
        .await
        .expect("timed out polling mqtt")
    }

    /// Publishes on the device's own `topic` (QoS 1) and waits for the ack.
    async fn publish(&mut self, topic: DeviceTopic, payload: Vec<u8>) {
        let topic = device_topic(&self.enrolled.device_id, topic);
        self.publish_on(topic, payload).await;
    }

    /// Publishes on any topic (QoS 1) and waits for the ack.
    async fn publish_on(&mut self, topic: String, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        self.next(|event| matches!(event, Event::Incoming(Packet::PubAck(_))).then_some(()))
            .await;
    }

    /// The code of the next `ServerMessage::Error`, skipping updates.
    async fn next_error_code(&mut self) -> String {
        self.next(|event| match event {
            Event::Incoming(Packet::Publish(publish)) => {
                match serde_json::from_slice::<ServerMessage>(&publish.payload) {
                    Ok(ServerMessage::Error(error)) => Some(error.code),
                    _ => None,
                }
            }
            _ => None,
        })
        .await
    }
}

#[tokio::test]
async fn oversized_and_malformed_mqtt_messages_are_refused_and_change_nothing() {
    let server = Server::start().await;
    let enrolled = server.enroll("dev-m", &[]).await;
    server.upload_release("fw", "1.0.0", &payload(1_000)).await;
    let deployment_id = server
        .deploy("fw@1.0.0", "device:dev-m")
        .await
        .deployment_id;
    let mut device = MqttDevice::connect(&server, &enrolled).await;
    device
        .publish(DeviceTopic::Register, encode(&registration(Mode::PushPull)))
        .await;
    server
        .wait_phase(&deployment_id, "dev-m", Phase::Notified)
        .await;
    let before = trail(&server, &deployment_id).await;
    let registered = server.count("dev-m", "device.registered").await;

    // Over the 64 KiB message bound but within the packet limit: a valid
    // report padded with spaces, and a registration of the same size.
    let report = StatusReport {
        deployment_id: deployment_id.clone(),
        event: DeviceEvent::Received,
        detail: None,
    };
    let mut big_report = encode(&report);
    big_report.resize(otter_proto::MAX_MESSAGE_BYTES + 1, b' ');
    let mut big_registration = encode(&registration(Mode::Pull));
    big_registration.resize(otter_proto::MAX_MESSAGE_BYTES + 1, b' ');
    // The same codes as over HTTPS: too large, or not a message.
    for (topic, body, code) in [
        (DeviceTopic::Status, big_report, "message-too-large"),
        (DeviceTopic::Register, big_registration, "message-too-large"),
        (
            DeviceTopic::Status,
            b"\x00\xff not json".to_vec(),
            "malformed-message",
        ),
        (DeviceTopic::Ack, b"[]".to_vec(), "malformed-message"),
    ] {
        device.publish(topic, body).await;
        assert_eq!(device.next_error_code().await, code);
    }
    let rejected: Vec<_> = eventually("four rejections", || async {
        let rows: Vec<_> = server
            .audit("device=dev-m")
            .await
            .into_iter()
            .filter(|e| e.event == "message.rejected")
            .collect();
        (rows.len() == 4).then_some(rows)
    })
    .await;
    for row in &rejected[..2] {
        let reason = row.details["reason"].as_str().unwrap();
        assert!(reason.contains("exceeds the limit"), "{row:#?}");
    }

    // Over the broker's 1 MiB packet limit: the broker drops the connection
    // without passing anything on.
    device
        .client
        .publish(
            device_topic(&enrolled.device_id, DeviceTopic::Status),
            QoS::AtLeastOnce,
            false,
            vec![b' '; (1 << 20) + 1],
        )
        .await
        .unwrap();
    let closed = tokio::time::timeout(TIMEOUT, async {
        loop {
            match device.events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return false,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    })
    .await
    .expect("the broker neither acked nor closed");
    assert!(closed, "the broker acked a packet over its limit");

    // Nothing changed: phase, trail, registration; a well-formed message
    // after reconnecting is the only thing the server hears next.
    let mut device = MqttDevice::connect(&server, &enrolled).await;
    device.publish(DeviceTopic::Status, encode(&report)).await;
    server
        .wait_phase(&deployment_id, "dev-m", Phase::Received)
        .await;
    let mut expected = before.clone();
    expected.push("device.received".to_owned());
    assert_eq!(trail(&server, &deployment_id).await, expected);
    assert_eq!(server.count("dev-m", "message.rejected").await, 4);
    assert_eq!(server.count("dev-m", "device.registered").await, registered);
    let info: otter_proto::api::DeviceInfo = server.get_json("/api/v1/devices/dev-m").await;
    assert_eq!(info.mode, Some(Mode::PushPull));
    server.stop().await;
}

#[tokio::test]
async fn a_device_publishing_on_another_devices_topics_changes_nothing() {
    let server = Server::start().await;
    let enrolled_a = server.enroll("dev-a", &[]).await;
    let enrolled_b = server.enroll("dev-b", &[]).await;
    server.upload_release("fw", "1.0.0", &payload(1_000)).await;
    let deployment_id = server
        .deploy("fw@1.0.0", "device:dev-b")
        .await
        .deployment_id;
    let mut device_b = MqttDevice::connect(&server, &enrolled_b).await;
    device_b
        .publish(DeviceTopic::Register, encode(&registration(Mode::PushPull)))
        .await;
    server
        .wait_phase(&deployment_id, "dev-b", Phase::Notified)
        .await;
    let audit_b = server.audit("device=dev-b").await;
    let trail_before = trail(&server, &deployment_id).await;
    let info_b: otter_proto::api::DeviceInfo = server.get_json("/api/v1/devices/dev-b").await;

    // dev-a sends well-formed messages on dev-b's topics: reports that would
    // move dev-b's phase, a registration in another mode, a forged update.
    let mut device_a = MqttDevice::connect(&server, &enrolled_a).await;
    let b = &enrolled_b.device_id;
    for event in [
        DeviceEvent::Received,
        DeviceEvent::Downloaded,
        DeviceEvent::Installed,
    ] {
        let report = StatusReport {
            deployment_id: deployment_id.clone(),
            event,
            detail: None,
        };
        device_a
            .publish_on(device_topic(b, DeviceTopic::Status), encode(&report))
            .await;
    }
    device_a
        .publish_on(
            device_topic(b, DeviceTopic::Register),
            encode(&registration(Mode::Pull)),
        )
        .await;
    let forged = ServerMessage::Error(otter_proto::messages::ErrorMessage {
        code: "forged".into(),
        message: "from dev-a".into(),
    });
    device_a
        .publish_on(device_topic(b, DeviceTopic::Notify), encode(&forged))
        .await;
    // On its own topic, a report for dev-b's deployment: not dev-a's.
    let report = StatusReport {
        deployment_id: deployment_id.clone(),
        event: DeviceEvent::Installed,
        detail: None,
    };
    device_a.publish(DeviceTopic::Status, encode(&report)).await;
    assert_eq!(device_a.next_error_code().await, "unknown-deployment");
    // A marker on dev-a's own topic: the broker handles one client's
    // publishes in order, so once it is answered the forged ones were
    // handled (dropped) too.
    device_a
        .publish(DeviceTopic::Status, b"marker".to_vec())
        .await;
    assert_eq!(device_a.next_error_code().await, "malformed-message");

    // Nothing changed for dev-b, and dev-a only has its two rejections.
    assert_eq!(server.phase(&deployment_id, "dev-b").await, Phase::Notified);
    assert_eq!(trail(&server, &deployment_id).await, trail_before);
    assert_eq!(server.audit("device=dev-b").await, audit_b);
    let info_after: otter_proto::api::DeviceInfo = server.get_json("/api/v1/devices/dev-b").await;
    assert_eq!(info_after.mode, info_b.mode);
    assert_eq!(info_after.registered_via, info_b.registered_via);
    let events_a: Vec<String> = server
        .audit("device=dev-a")
        .await
        .into_iter()
        .map(|e| e.event)
        .filter(|e| e != "device.enrolled")
        .collect();
    assert_eq!(events_a, ["message.rejected", "message.rejected"]);
    // dev-b's own error, published by the server, is the first thing after
    // its update that reaches it: the forged one never arrived.
    device_b.publish(DeviceTopic::Status, b"{".to_vec()).await;
    assert_eq!(device_b.next_error_code().await, "malformed-message");
    server.stop().await;
}

// --- names that reach the file system ------------------------------------------

/// A change to a manifest before it is signed again.
type ManifestChange = fn(&mut Manifest);

/// Files under `dir`, recursively, as paths relative to it.
fn tree(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn signed_packages_with_traversal_names_store_nothing() {
    let server = Server::start().await;
    let key = server.signer();
    let good = common::package(&key, server.dir.path(), "fw", "1.0.0", &payload(1_000));
    let mut reader = &good[..];
    let header = otter_package::format::read_header(&mut reader).unwrap();
    let artifact = reader.to_vec();
    let manifest = Manifest::from_json(&header.signed_manifest.manifest).unwrap();
    let files_before = tree(server.dir.path());
    let audit_before = server.audit("limit=10000").await.len();

    // Each is signed by the trusted key: only validation can refuse it.
    let hostile: [(&str, ManifestChange); 4] = [
        ("name", |m| m.name = "../../escape".into()),
        ("name with a separator", |m| m.name = "a/b".into()),
        ("hardware", |m| m.hardware = vec!["../revB".into()]),
        ("artifact digest", |m| {
            m.artifact.sha256 = format!("../../{}", &m.artifact.sha256[6..])
        }),
    ];
    for (what, change) in &hostile {
        let mut bad = manifest.clone();
        change(&mut bad);
        let rewritten = otter_package::format::PackageHeader {
            signed_manifest: otter_package::sign::sign_manifest(&bad, &key),
            data_key: header.data_key.clone(),
        };
        let mut package = Vec::new();
        otter_package::format::write_header(&mut package, &rewritten).unwrap();
        package.extend_from_slice(&artifact);
        let response = server.upload(package).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}"
        );
        let body: otter_proto::api::ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error, "invalid-package", "{what}");
        assert!(!body.message.is_empty(), "{what}");
    }

    // Enrolment names (the device id becomes a certificate's CN and an MQTT
    // topic segment; the CLI names bundle files after nothing else).
    for body in [
        serde_json::json!({ "device_id": "../escape", "hardware": HARDWARE }),
        serde_json::json!({ "device_id": "a/b", "hardware": HARDWARE }),
        serde_json::json!({ "device_id": "dev-x", "hardware": "../revB" }),
        serde_json::json!({ "device_id": "dev-x", "hardware": HARDWARE, "tags": ["../t"] }),
    ] {
        let response = server.post_json("/api/v1/devices", body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        let error: otter_proto::api::ErrorBody = response.json().await.unwrap();
        assert!(!error.message.is_empty(), "{body}");
    }
    let devices: Vec<otter_proto::api::DeviceInfo> = server.get_json("/api/v1/devices").await;
    assert!(devices.is_empty(), "{devices:#?}");

    // Nothing stored, nothing audited, no file created anywhere in the
    // test's folder (which holds the data directory).
    let releases: Vec<otter_proto::api::ReleaseInfo> = server.get_json("/api/v1/releases").await;
    assert!(releases.is_empty(), "{releases:#?}");
    assert_eq!(server.audit("limit=10000").await.len(), audit_before);
    let added: Vec<_> = tree(server.dir.path())
        .into_iter()
        .filter(|path| !files_before.contains(path))
        .collect();
    assert!(added.is_empty(), "files created: {added:?}");
    server.stop().await;
}

// --- wrong hardware -----------------------------------------------------------

#[tokio::test]
async fn a_release_for_other_hardware_is_not_deployed_and_changes_nothing() {
    let server = Server::start().await;
    let response = server
        .post_json(
            "/api/v1/devices",
            serde_json::json!({ "device_id": "dev-old", "hardware": "revA", "tags": ["old"] }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let old: EnrollResponse = response.json().await.unwrap();
    server.enroll("dev-new", &[]).await;
    server.upload_release("fw", "1.0.0", &payload(1_000)).await;
    let audit_before = server.audit("limit=10000").await;

    for (target, code) in [
        ("device:dev-old", "incompatible-hardware"),
        ("fleet:old", "empty-target"),
    ] {
        let response = server
            .post_json(
                "/api/v1/deployments",
                serde_json::json!({ "release": "fw@1.0.0", "target": target }),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{target}"
        );
        let body: otter_proto::api::ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error, code, "{target}");
        assert!(
            body.message.contains("revA") || body.message.contains("hardware"),
            "{}",
            body.message
        );
    }
    let deployments: Vec<otter_proto::api::DeploymentInfo> =
        server.get_json("/api/v1/deployments").await;
    assert!(deployments.is_empty(), "{deployments:#?}");
    assert_eq!(server.audit("limit=10000").await, audit_before);

    // The whole fleet: only the device whose hardware the release lists.
    let deployment = server.deploy("fw@1.0.0", "all").await;
    assert_eq!(deployment.devices, 1);
    let status: otter_proto::api::DeploymentStatus = server
        .get_json(&format!("/api/v1/deployments/{}", deployment.deployment_id))
        .await;
    let targeted: Vec<&str> = status
        .targets
        .iter()
        .map(|t| t.device_id.as_str())
        .collect();
    assert_eq!(targeted, ["dev-new"]);
    // The other device's poll offers it nothing.
    let device = PollingDevice::new(&server, &old);
    let mut revision_a = registration(Mode::Pull);
    revision_a.hardware = "revA".into();
    let response = device.post("/v1/poll", encode(&revision_a)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: PollResponse = response.json().await.unwrap();
    assert_eq!(answer.update, None);
    server.stop().await;
}
