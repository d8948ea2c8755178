//! Steps 5–8 in batches: a burst of status reports from many devices, queued
//! before the real engine task starts so that it takes them from its channel
//! in batches, applied to the real store, with a recording message bus in
//! place of the broker.
//!
//! The burst mixes devices, repeats, out-of-order and impossible reports,
//! several reports of one device in one batch, a registration, a malformed
//! report and a report on an unknown deployment. Checks, per device, that the
//! result is what applying the reports one by one through the phase machine
//! gives: the final phase, exactly one `device.<event>` row per accepted
//! transition (in order, with its move), and the link revoked (with one
//! `link.revoked` row) exactly when a transition said so; and that the bad
//! reports were answered.

mod engine_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine_support::{RecordingBus, registration, stub_release};
use otter_proto::api::{Channel, Target};
use otter_proto::deployment::{self, Outcome, Phase};
use otter_proto::messages::{DeviceEvent, Mode, ServerMessage, StatusReport, decode, encode};
use otter_proto::topics::{DeviceId, DeviceTopic};
use otter_server::audit::Actor;
use otter_server::blobs::BlobStore;
use otter_server::broker::{BrokerEvent, MessageBus};
use otter_server::engine::{EVENT_BATCH, Engine};
use otter_server::links::{LinkId, LinkSecret};
use otter_server::notify::Notifier;
use otter_server::push::{PushSettings, Pusher};
use otter_server::store::{AuditFilter, CreatedDeployment, DeploymentCreation, NewDevice, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 300;
/// Reports per device in the burst.
const REPORTS_PER_DEVICE: usize = 5;

fn status(device_id: &DeviceId, report: &StatusReport) -> BrokerEvent {
    BrokerEvent::Message {
        device_id: device_id.clone(),
        topic: DeviceTopic::Status,
        payload: Bytes::from(encode(report)),
    }
}

/// The reports of device `index`, in order: a few fixed shapes that cover
/// the cases (a normal run, repeats, out of order, after the end), then
/// pseudo-random sequences.
fn reports_of(index: usize) -> Vec<DeviceEvent> {
    use DeviceEvent::*;
    let events = [Received, Downloaded, Installing, Installed, Failed];
    match index {
        0 => vec![Received, Downloaded, Installing, Installed, Installed],
        1 => vec![Received, Received, Downloaded, Downloaded, Received],
        2 => vec![Downloaded, Received, Installing, Failed, Installed],
        3 => vec![Installed, Received, Downloaded, Installing, Failed],
        4 => vec![Failed, Received, Downloaded, Installing, Installed],
        _ => {
            let mut state = (index as u64).wrapping_mul(6364136223846793005) | 1;
            (0..REPORTS_PER_DEVICE)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    events[((state >> 33) % events.len() as u64) as usize]
                })
                .collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reports_is_applied_as_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    let operator = Actor::operator("admin");
    let at = otter_server::clock::now_rfc3339();
    let release = stub_release(&at);
    store.insert_release(&release, &operator).await.unwrap();
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::parse(&format!("dev-{i:05}")).unwrap())
        .collect();
    let new_devices: Vec<NewDevice> = devices
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
    for device_id in &devices {
        store
            .record_registration(
                device_id,
                &registration(Mode::PushPull),
                Channel::Mqtt,
                &at,
                &at,
            )
            .await
            .unwrap();
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
    assert!(matches!(created, CreatedDeployment::Created { .. }));

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
    // Step 4 first, so every device has a link and is notified.
    let template = notifier.update_template("dep-1").await.unwrap().unwrap();
    notifier.notify_batch(&template, &devices).await.unwrap();
    bus.published.lock().unwrap().clear();

    // The burst: round-robin over groups of devices, so each batch holds
    // all the reports of many devices, interleaved; plus the odd events.
    let per_device: Vec<Vec<DeviceEvent>> = (0..DEVICES).map(reports_of).collect();
    let mut burst = Vec::new();
    let indexed: Vec<(usize, &DeviceId)> = devices.iter().enumerate().collect();
    for group in indexed.chunks(20) {
        let mut remaining: Vec<_> = group
            .iter()
            .map(|(index, _)| per_device[*index].iter().enumerate())
            .collect();
        for _ in 0..REPORTS_PER_DEVICE {
            for ((index, device_id), events) in group.iter().zip(remaining.iter_mut()) {
                let Some((round, event)) = events.next() else {
                    continue;
                };
                let report = StatusReport {
                    deployment_id: "dep-1".to_owned(),
                    event: *event,
                    detail: Some(format!("round {round}")),
                };
                burst.push(status(device_id, &report));
                // A registration amid device 0's reports: handled in order,
                // between two batches of reports.
                if *index == 0 && round == 1 {
                    burst.push(BrokerEvent::Message {
                        device_id: (*device_id).clone(),
                        topic: DeviceTopic::Register,
                        payload: Bytes::from(encode(&registration(Mode::PushPull))),
                    });
                }
            }
        }
    }
    let unknown = StatusReport {
        deployment_id: "no-such-deployment".to_owned(),
        event: DeviceEvent::Received,
        detail: None,
    };
    burst.insert(10, status(&devices[7], &unknown));
    burst.insert(
        20,
        BrokerEvent::Message {
            device_id: devices[8].clone(),
            topic: DeviceTopic::Status,
            payload: Bytes::from_static(b"{not json"),
        },
    );
    assert!(burst.len() > 2 * EVENT_BATCH, "several batches");
    let total = burst.len();

    let (events_sender, events) = mpsc::channel(total);
    for event in burst {
        events_sender.try_send(event).unwrap();
    }
    let (_commands_sender, commands) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let blobs = BlobStore::open_local(&dir.path().join("blobs")).unwrap();
    let pusher = Pusher::new(store.clone(), bus_dyn, blobs, PushSettings::default());
    let engine =
        tokio::spawn(Engine::new(notifier, pusher).run(events, commands, shutdown.clone()));

    // The model: the same reports through the phase machine, one by one.
    let mut expected_phase: HashMap<String, Phase> = HashMap::new();
    let mut expected_moves: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    let mut expected_revoked: HashMap<String, bool> = HashMap::new();
    for (index, device_id) in devices.iter().enumerate() {
        let mut phase = Phase::Notified;
        let mut moves = Vec::new();
        let mut revoked = false;
        for event in &per_device[index] {
            if let Outcome::Advanced { to, revoke_link } = deployment::apply(phase, *event) {
                moves.push((
                    format!("device.{}", event.as_str()),
                    phase.as_str().to_owned(),
                    to.as_str().to_owned(),
                ));
                revoked |= revoke_link;
                phase = to;
            }
        }
        expected_phase.insert(device_id.to_string(), phase);
        expected_moves.insert(device_id.to_string(), moves);
        expected_revoked.insert(device_id.to_string(), revoked);
    }
    let expected_rows: usize = expected_moves.values().map(Vec::len).sum();
    assert!(expected_rows > DEVICES, "the burst moves devices far");

    // Done when every expected row is there and both bad reports answered.
    let filter = AuditFilter {
        deployment_id: Some("dep-1".to_owned()),
        limit: 100_000,
        ..AuditFilter::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = store.audit_entries(&filter).await.unwrap();
        let device_rows = rows
            .iter()
            .filter(|entry| entry.event.starts_with("device."))
            .count();
        let answered = bus.published.lock().unwrap().len();
        if device_rows >= expected_rows && answered >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{device_rows} of {expected_rows} rows, {answered} answers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    engine.await.unwrap();

    let status = store.deployment_status("dep-1").await.unwrap().unwrap();
    for target in &status.targets {
        assert_eq!(
            target.phase,
            expected_phase[target.device_id.as_str()],
            "{}",
            target.device_id
        );
    }
    assert_eq!(status.targets.len(), DEVICES);

    let rows = store.audit_entries(&filter).await.unwrap();
    let mut moves: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    let mut link_revoked_rows: HashMap<String, usize> = HashMap::new();
    for entry in &rows {
        let device_id = entry.device_id.clone().unwrap_or_default();
        if entry.event.starts_with("device.") {
            assert_eq!(entry.actor, device_id);
            assert!(
                entry.details["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with("round ")
            );
            moves.entry(device_id).or_default().push((
                entry.event.clone(),
                entry.details["from"].as_str().unwrap().to_owned(),
                entry.details["to"].as_str().unwrap().to_owned(),
            ));
        } else if entry.event == "link.revoked" {
            *link_revoked_rows.entry(device_id).or_default() += 1;
        }
    }
    let link_rows: HashMap<String, String> = rows
        .iter()
        .filter(|entry| entry.event == "link.created")
        .map(|entry| {
            (
                entry.device_id.clone().unwrap_or_default(),
                entry.details["link_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for device_id in &devices {
        let name = device_id.to_string();
        assert_eq!(
            moves.get(&name).cloned().unwrap_or_default(),
            expected_moves[&name],
            "{name}: device.* rows"
        );
        let revoked = expected_revoked[&name];
        assert_eq!(
            link_revoked_rows.get(&name).copied().unwrap_or(0),
            usize::from(revoked),
            "{name}: link.revoked rows"
        );
        let link_id = LinkId::from_hex(&link_rows[&name]).unwrap();
        let stored = store.link(&link_id).await.unwrap().unwrap();
        assert_eq!(stored.revoked, revoked, "{name}: link revoked");
    }
    // Hand-checked: device 0's whole run in one burst.
    assert_eq!(expected_phase["dev-00000"], Phase::Installed);
    assert_eq!(expected_moves["dev-00000"].len(), 4);
    assert!(expected_revoked["dev-00000"]);

    // The two bad reports were answered, each to its device.
    let published = bus.published.lock().unwrap().clone();
    let mut codes: Vec<(String, String)> = published
        .iter()
        .map(|(device_id, topic, payload)| {
            assert_eq!(*topic, DeviceTopic::Notify);
            let ServerMessage::Error(error) = decode::<ServerMessage>(payload).unwrap() else {
                panic!("not an error answer for {device_id}");
            };
            (device_id.to_string(), error.code)
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        vec![
            ("dev-00007".to_owned(), "unknown-deployment".to_owned()),
            ("dev-00008".to_owned(), "malformed-message".to_owned()),
        ]
    );
}
