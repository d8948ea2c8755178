//! Step 4 in batches: a deployment to many devices, run through the real
//! engine task and store, with a recording message bus in place of the
//! broker (the bus is the only part left out, so what is counted here is
//! exactly what the engine and `notify` did).
//!
//! Checks, per push-pull device: exactly one link, one `link.created`, one
//! `notification.sent` and one published update carrying that link, and the
//! phase moved to notified; and that pull devices and devices that never
//! registered get nothing (they wait for their poll or registration).

mod engine_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_support::{RecordingBus, registration, stub_data_key, stub_release, unwrap_stub_key};
use otter_proto::api::{Channel, Target};
use otter_proto::deployment::Phase;
use otter_proto::messages::{Mode, ServerMessage, decode};
use otter_proto::topics::{DeviceId, DeviceTopic};
use otter_server::audit::Actor;
use otter_server::blobs::BlobStore;
use otter_server::broker::MessageBus;
use otter_server::engine::{Engine, EngineCommand, NOTIFY_BATCH};
use otter_server::links::LinkSecret;
use otter_server::notify::Notifier;
use otter_server::push::{PushSettings, Pusher};
use otter_server::store::{AuditFilter, CreatedDeployment, DeploymentCreation, NewDevice, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// More than two batches, so the last one is partial.
const PUSH_PULL_DEVICES: usize = NOTIFY_BATCH * 2 + 37;
const PULL_DEVICES: usize = 10;
const UNREGISTERED_DEVICES: usize = 5;

fn device(index: usize, kind: &str) -> DeviceId {
    DeviceId::parse(&format!("{kind}-{index:05}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_to_many_devices_is_notified_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    let operator = Actor::operator("admin");
    let at = otter_server::clock::now_rfc3339();

    let release = stub_release(&at);
    store.insert_release(&release, &operator).await.unwrap();

    let push_pull: Vec<DeviceId> = (0..PUSH_PULL_DEVICES).map(|i| device(i, "pp")).collect();
    let pull: Vec<DeviceId> = (0..PULL_DEVICES).map(|i| device(i, "pull")).collect();
    let unregistered: Vec<DeviceId> = (0..UNREGISTERED_DEVICES)
        .map(|i| device(i, "never"))
        .collect();
    let all: Vec<DeviceId> = push_pull
        .iter()
        .chain(&pull)
        .chain(&unregistered)
        .cloned()
        .collect();
    let new_devices: Vec<NewDevice> = all
        .iter()
        .enumerate()
        .map(|(index, device_id)| NewDevice {
            device_id: device_id.clone(),
            hardware: "board-a".to_owned(),
            tags: Vec::new(),
            cert_serial: format!("{index:08x}"),
        })
        .collect();
    store
        .enroll_devices(&new_devices, &operator, &at)
        .await
        .unwrap();
    for (devices, mode) in [(&push_pull, Mode::PushPull), (&pull, Mode::Pull)] {
        for device_id in devices {
            store
                .record_registration(device_id, &registration(mode), Channel::Mqtt, &at, &at)
                .await
                .unwrap();
        }
    }

    let created = store
        .create_deployment(&DeploymentCreation {
            deployment_id: "dep-1",
            release_id: "app@1.0.0",
            target: &Target::All,
            allow_downgrade: false,
            actor: &operator,
            at: &at,
        })
        .await
        .unwrap();
    let CreatedDeployment::Created { device_ids } = created else {
        panic!("deployment not created: {created:?}");
    };
    assert_eq!(device_ids.len(), all.len());

    let bus = Arc::new(RecordingBus::default());
    let bus_dyn: Arc<dyn MessageBus> = bus.clone();
    let notifier = Notifier {
        store: store.clone(),
        bus: bus_dyn.clone(),
        link_secret: Arc::new(LinkSecret::from_bytes([7; 32])),
        device_base_url: "https://127.0.0.1:8443".to_owned(),
        link_ttl: Duration::from_secs(3600),
        push_chunk_size: 1024,
        vault: engine_support::test_vault(),
    };
    let blobs = BlobStore::open_local(&dir.path().join("blobs")).unwrap();
    let pusher = Pusher::new(store.clone(), bus_dyn, blobs, PushSettings::default());
    let (_events_sender, events) = mpsc::channel(16);
    let (commands_sender, commands) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let engine =
        tokio::spawn(Engine::new(notifier, pusher).run(events, commands, shutdown.clone()));
    commands_sender
        .send(EngineCommand::NotifyDeployment {
            deployment_id: "dep-1".to_owned(),
            device_ids,
        })
        .await
        .unwrap();

    // Every push-pull device notified, polled with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = store.deployment_status("dep-1").await.unwrap().unwrap();
        if status.info.phases.get(&Phase::Notified).copied() == Some(PUSH_PULL_DEVICES as u64) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "not all notified: {:?}",
            status.info.phases
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.cancel();
    engine.await.unwrap();

    let phases: HashMap<String, Phase> = status
        .targets
        .iter()
        .map(|target| (target.device_id.to_string(), target.phase))
        .collect();
    for device_id in &push_pull {
        assert_eq!(phases[device_id.as_str()], Phase::Notified, "{device_id}");
    }
    for device_id in pull.iter().chain(&unregistered) {
        assert_eq!(phases[device_id.as_str()], Phase::Pending, "{device_id}");
    }

    let entries = store
        .audit_entries(&AuditFilter {
            deployment_id: Some("dep-1".to_owned()),
            limit: 100_000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let mut link_created: HashMap<String, Vec<String>> = HashMap::new();
    let mut notification_sent: HashMap<String, Vec<String>> = HashMap::new();
    for entry in &entries {
        let device_id = entry.device_id.clone().unwrap_or_default();
        let link_id = entry.details["link_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match entry.event.as_str() {
            "link.created" => link_created.entry(device_id).or_default().push(link_id),
            "notification.sent" => {
                assert_eq!(entry.details["via"], "mqtt");
                notification_sent
                    .entry(device_id)
                    .or_default()
                    .push(link_id);
            }
            _ => {}
        }
    }
    assert_eq!(link_created.len(), PUSH_PULL_DEVICES);
    assert_eq!(notification_sent.len(), PUSH_PULL_DEVICES);

    let published = bus.published.lock().unwrap().clone();
    assert_eq!(published.len(), PUSH_PULL_DEVICES);
    let mut published_links: HashMap<String, String> = HashMap::new();
    for (device_id, topic, payload) in &published {
        assert_eq!(*topic, DeviceTopic::Notify);
        let ServerMessage::Update(update) = decode::<ServerMessage>(payload).unwrap() else {
            panic!("not an update for {device_id}");
        };
        assert_eq!(update.deployment_id, "dep-1");
        assert_eq!(update.release, "app@1.0.0");
        assert_eq!(update.manifest, release.info.manifest);
        assert!(!update.wrapped_key.contains(&stub_data_key().to_base64()));
        let opened = unwrap_stub_key(device_id.as_str(), &update.wrapped_key).unwrap();
        assert_eq!(opened.as_bytes(), stub_data_key().as_bytes());
        // Bound to the device: it does not open as another one's.
        assert!(unwrap_stub_key("someone-else", &update.wrapped_key).is_err());
        assert!(
            published_links
                .insert(device_id.to_string(), update.link)
                .is_none()
        );
    }

    let mut link_ids = std::collections::HashSet::new();
    for device_id in &push_pull {
        let created = &link_created[device_id.as_str()];
        let sent = &notification_sent[device_id.as_str()];
        assert_eq!(created.len(), 1, "{device_id}: link.created rows");
        assert_eq!(
            sent, created,
            "{device_id}: notification.sent names its link"
        );
        assert!(link_ids.insert(created[0].clone()), "link ids are unique");
        let link_id = otter_server::links::LinkId::from_hex(&created[0]).unwrap();
        let stored = store.link(&link_id).await.unwrap().unwrap();
        assert_eq!(stored.device_id, device_id.as_str());
        assert!(!stored.revoked);
        assert!(published_links[device_id.as_str()].starts_with("https://127.0.0.1:8443/"));
    }
}
