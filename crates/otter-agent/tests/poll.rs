//! Pull mode's poll task against a scripted HTTPS server with client
//! certificates (`support::TestServer`): the first event is `Connected`, a
//! registration triggers a poll at once, an update in a poll answer reaches
//! the agent as an MQTT-style update event, and a report the server failed
//! to take makes the next successful poll send `Connected` again, so the
//! agent repeats its latest report.

mod support;

use std::time::Duration;

use otter_agent::mqtt::{MqttEvent, Uplink};
use otter_agent::poll::{PollClient, start_pull};
use otter_proto::manifest::SignedManifest;
use otter_proto::messages::{
    DeviceEvent, Mode, PollResponse, Registration, ServerMessage, StatusReport, UpdateNotification,
    encode,
};
use support::{Answer, Pki, TestServer};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(20);

async fn next_event(events: &mut mpsc::Receiver<MqttEvent>) -> MqttEvent {
    tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .expect("timed out waiting for an event")
        .expect("the poll task ended")
}

#[tokio::test]
async fn pull_uplink_polls_forwards_updates_and_repeats_lost_reports() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let update = UpdateNotification {
        signer_revocations: None,
        deployment_id: "dep-1".into(),
        release: "fw@1.0.0".into(),
        manifest: SignedManifest {
            manifest: "{}".into(),
            signer: String::new(),
            signature: String::new(),
            signer_certificate: None,
        },
        link: "https://127.0.0.1:1/v1/download/x".into(),
        link_expires_at: 0,
        wrapped_key: String::new(),
        allow_downgrade: false,
    };
    let answer = encode(&PollResponse {
        update: Some(update.clone()),
    });
    // Request 0: the first poll, answered with the update. Request 1: the
    // report, refused with 503. Then every poll: 304.
    let server = TestServer::start(&pki, answer, |index, _| match index {
        0 => Answer::Body {
            honour_range: false,
            cut_after: None,
        },
        1 => Answer::Status(503),
        _ => Answer::Status(304),
    })
    .await;
    let client =
        PollClient::new(&server.base_url, pki.device_tls().https_config().unwrap()).unwrap();
    let (sender, mut events) = mpsc::channel(16);
    let (uplink, task) = start_pull(client, Duration::from_secs(2), sender);

    assert_eq!(next_event(&mut events).await, MqttEvent::Connected);
    assert!(server.seen().is_empty(), "polled before registering");
    let registration = Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: "revB".into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode: Mode::Pull,
        capabilities: vec!["file".into()],
        encryption_key: None,
    };
    uplink.register(&registration).unwrap();
    assert_eq!(
        next_event(&mut events).await,
        MqttEvent::Message(ServerMessage::Update(update))
    );
    // The first answered poll proves the server is reachable (a new agent on
    // trial confirms on it); it is said once, not after every poll.
    assert_eq!(next_event(&mut events).await, MqttEvent::ServerAnswered);

    uplink
        .report(&StatusReport {
            deployment_id: "dep-1".into(),
            event: DeviceEvent::Received,
            detail: None,
        })
        .unwrap();
    // The report fails (503); the next poll succeeds (304) and asks the
    // agent to repeat itself.
    assert_eq!(next_event(&mut events).await, MqttEvent::Connected);
    let seen = server.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/poll", "/v1/status", "/v1/poll"]);
    assert!(seen.iter().all(|r| r.client_certificate));

    // The agent gone, the task ends.
    drop(events);
    uplink.register(&registration).unwrap();
    tokio::time::timeout(TIMEOUT, task)
        .await
        .expect("the poll task did not end")
        .unwrap();
}
