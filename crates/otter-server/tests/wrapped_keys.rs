//! Per-device wrapping of the data key against the whole server
//! (`otter_server::run` on port-0 loopback addresses): a device that
//! registers its encryption key over MQTT gets the release's data key
//! wrapped to that key and bound to its id, never in clear; another key or
//! another device id does not open it; a device with no key on record is
//! sent nothing and its phase fails with the reason; a malformed key is
//! refused; a key change is audited; the blob store holds neither the
//! plaintext nor the data key.
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use otter_package::wrap::DeviceKey;
use otter_proto::api::{DeploymentStatus, EnrollResponse};
use otter_proto::deployment::Phase;
use otter_proto::messages::{
    Mode, PollResponse, Registration, ServerMessage, UpdateNotification, encode,
};
use otter_proto::topics::{DeviceId, DeviceTopic, device_topic};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};

use common::{HARDWARE, Server, TIMEOUT, client_tls, device_https_client, eventually, payload};

fn registration(mode: Mode, encryption_key: Option<String>) -> Registration {
    Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode,
        capabilities: vec!["file".into()],
        encryption_key,
    }
}

/// A device on MQTT with its certificate, subscribed to its notify topic.
struct MqttDevice {
    device_id: DeviceId,
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
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(client_tls(enrolled))),
        ));
        let (client, events) = AsyncClient::new(options, 16);
        let mut device = MqttDevice {
            device_id: enrolled.device_id.clone(),
            client,
            events,
        };
        let topic = device_topic(&device.device_id, DeviceTopic::Notify);
        device
            .client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        device
            .next(|event| matches!(event, Event::Incoming(Packet::SubAck(_))))
            .await;
        device
    }

    /// Polls the connection until `done` holds for an event; returns the
    /// payload of the last publish received.
    async fn next(&mut self, mut done: impl FnMut(&Event) -> bool) -> Option<Vec<u8>> {
        tokio::time::timeout(TIMEOUT, async {
            let mut last = None;
            loop {
                let event = self.events.poll().await.expect("mqtt connection failed");
                if let Event::Incoming(Packet::Publish(publish)) = &event {
                    last = Some(publish.payload.to_vec());
                }
                if done(&event) {
                    return last;
                }
            }
        })
        .await
        .expect("timed out polling mqtt")
    }

    async fn register(&mut self, registration: &Registration) {
        self.client
            .publish(
                device_topic(&self.device_id, DeviceTopic::Register),
                QoS::AtLeastOnce,
                false,
                encode(registration),
            )
            .await
            .unwrap();
        self.next(|event| matches!(event, Event::Incoming(Packet::PubAck(_))))
            .await;
    }

    /// The next server message, raw and parsed.
    async fn next_message(&mut self) -> (Vec<u8>, ServerMessage) {
        let raw = self
            .next(|event| matches!(event, Event::Incoming(Packet::Publish(_))))
            .await
            .unwrap();
        let message = serde_json::from_slice(&raw).expect("server message");
        (raw, message)
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn data_keys_are_wrapped_per_device_and_never_sent_in_clear() {
    let server = Server::start().await;
    let device_a = server.enroll("dev-a", &[]).await;
    let _device_b = server.enroll("dev-b", &[]).await;
    let device_old = server.enroll("dev-old", &[]).await;

    // The release, with its data key as only the publisher and server know it.
    let plaintext = payload(20_000);
    let package = common::package(
        &server.signer(),
        server.dir.path(),
        "fw",
        "1.0.0",
        &plaintext,
    );
    let header = otter_package::format::read_header(&mut &package[..]).unwrap();
    let data_key = header.data_key.clone();
    let data_key_text = data_key.to_base64();
    let response = server.upload(package).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    // dev-a registers over MQTT with its key; a malformed key is refused
    // first (nothing stored: the device still has no key after it).
    let key_a = DeviceKey::generate();
    let key_b = DeviceKey::generate();
    let mut mqtt_a = MqttDevice::connect(&server, &device_a).await;
    mqtt_a
        .register(&registration(
            Mode::PushPull,
            Some(base64::engine::general_purpose::STANDARD.encode([0u8; 32])),
        ))
        .await;
    match mqtt_a.next_message().await.1 {
        ServerMessage::Error(error) => {
            assert_eq!(error.code, "malformed-message");
            assert!(
                error.message.contains("encryption key"),
                "{}",
                error.message
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(server.count("dev-a", "device.encryption-key-set").await, 0);
    mqtt_a
        .register(&registration(
            Mode::PushPull,
            Some(key_a.public_key().to_base64()),
        ))
        .await;
    let set = server
        .wait_audit_event("device=dev-a", "device.encryption-key-set")
        .await;
    assert_eq!(set.details["old_fingerprint"], serde_json::Value::Null);
    assert_eq!(
        set.details["new_fingerprint"],
        key_a.public_key().fingerprint()
    );

    // dev-old is an agent from before wrapping: it polls with no key.
    let old_http = device_https_client(&device_old);
    let poll_url = format!(
        "https://127.0.0.1:{}/v1/poll",
        server.endpoints.device.port()
    );
    let poll_old = || async {
        let response = old_http
            .post(&poll_url)
            .header("content-type", "application/json")
            .body(encode(&registration(Mode::Pull, None)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json::<PollResponse>().await.unwrap()
    };
    assert_eq!(poll_old().await.update, None);

    // A deployment to dev-a: the notification carries the key wrapped.
    let deployment = server.deploy("fw@1.0.0", "device:dev-a").await;
    let (raw, message) = mqtt_a.next_message().await;
    let ServerMessage::Update(update) = message else {
        panic!("expected an update, got {message:?}");
    };
    assert_eq!(update.deployment_id, deployment.deployment_id);
    assert!(
        !contains(&raw, data_key_text.as_bytes()),
        "data key in clear"
    );
    assert!(
        !contains(&raw, data_key.as_bytes()),
        "data key bytes in clear"
    );
    let opened = common::unwrap_key(&key_a, "dev-a", &update.manifest, &update.wrapped_key)
        .expect("dev-a opens its key");
    assert_eq!(opened.as_bytes(), data_key.as_bytes());
    // Not with another device's key, nor as another device.
    let error =
        common::unwrap_key(&key_b, "dev-a", &update.manifest, &update.wrapped_key).unwrap_err();
    assert!(
        error.to_string().starts_with("cannot unwrap the data key"),
        "{error}"
    );
    assert!(common::unwrap_key(&key_a, "dev-b", &update.manifest, &update.wrapped_key).is_err());
    server
        .wait_phase(&deployment.deployment_id, "dev-a", Phase::Notified)
        .await;

    // A deployment to dev-old: nothing sent, its phase fails with the reason.
    let to_old = server.deploy("fw@1.0.0", "device:dev-old").await;
    assert_eq!(poll_old().await.update, None);
    let status: DeploymentStatus = server
        .get_json(&format!("/api/v1/deployments/{}", to_old.deployment_id))
        .await;
    let target = &status.targets[0];
    assert_eq!(target.phase, Phase::Failed);
    assert_eq!(
        target.detail.as_deref(),
        Some("device has no encryption key: upgrade its agent")
    );
    assert_eq!(server.count("dev-old", "link.created").await, 0);
    assert_eq!(server.count("dev-old", "notification.sent").await, 0);

    // dev-a's state was wiped: a new key is accepted and audited, and the
    // next notification is wrapped to it.
    let key_a2 = DeviceKey::generate();
    mqtt_a
        .register(&registration(
            Mode::PushPull,
            Some(key_a2.public_key().to_base64()),
        ))
        .await;
    let update: UpdateNotification = loop {
        if let (_, ServerMessage::Update(update)) = mqtt_a.next_message().await {
            break update;
        }
    };
    common::unwrap_key(&key_a2, "dev-a", &update.manifest, &update.wrapped_key)
        .expect("wrapped to the new key");
    assert!(common::unwrap_key(&key_a, "dev-a", &update.manifest, &update.wrapped_key).is_err());
    let changes: Vec<_> = eventually("the key change to be audited", || async {
        let changes: Vec<_> = server
            .audit("device=dev-a")
            .await
            .into_iter()
            .filter(|e| e.event == "device.encryption-key-set")
            .collect();
        (changes.len() == 2).then_some(changes)
    })
    .await;
    let change = changes
        .iter()
        .find(|e| e.details["old_fingerprint"] != serde_json::Value::Null)
        .unwrap();
    assert_eq!(
        change.details["old_fingerprint"],
        key_a.public_key().fingerprint()
    );
    assert_eq!(
        change.details["new_fingerprint"],
        key_a2.public_key().fingerprint()
    );

    // The blob store holds the encrypted artifact only.
    let blobs = files_under(&server.data_dir().join("blobs"));
    assert!(!blobs.is_empty());
    for blob in blobs {
        let bytes = std::fs::read(&blob).unwrap();
        assert!(!contains(&bytes, data_key.as_bytes()), "{}", blob.display());
        assert!(
            !contains(&bytes, data_key_text.as_bytes()),
            "{}",
            blob.display()
        );
        assert!(!contains(&bytes, &plaintext[..64]), "{}", blob.display());
    }
    // Nor do the audit rows carry the key.
    let audit = server.audit("").await;
    assert!(
        !serde_json::to_string(&audit)
            .unwrap()
            .contains(&data_key_text)
    );
}
