//! The agent's MQTT session against the server's real embedded broker, over
//! real TLS with certificates from the server's own PKI.

use std::time::Duration;

use otter_agent::config::MqttEndpoint;
use otter_agent::mqtt::{MqttEvent, MqttSession};
use otter_agent::tls::DeviceTls;
use otter_proto::messages::{DeviceEvent, StatusReport, decode};
use otter_proto::topics::{DeviceId, DeviceTopic};
use otter_server::broker::{BrokerConfig, BrokerEvent, start_embedded};
use otter_server::pki::Pki;

const WAIT: Duration = Duration::from_secs(20);

/// The agent sends its last reports and closes the session at once (as it
/// does before a restart or a self-update hand-over): every report must
/// reach the server. Closing without waiting for the broker's
/// acknowledgements resets the connection, and the broker then loses
/// reports it had received but not read (seen in CI as a lost `installing`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_just_before_close_all_reach_the_server() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
    let config = BrokerConfig::from_pki("127.0.0.1:0".parse().unwrap(), &pki);
    let (_broker, address, mut broker_events) = start_embedded(config).await.unwrap();

    let device = DeviceId::parse("dev-close").unwrap();
    let issued = pki.issue_device(&device).unwrap();
    let cert = dir.path().join("device.crt");
    let key = dir.path().join("device.key");
    std::fs::write(&cert, &issued.certificate_pem).unwrap();
    std::fs::write(&key, &issued.private_key_pem).unwrap();
    let tls = DeviceTls::load(pki.ca_cert_path(), &cert, &key).unwrap();
    let endpoint = MqttEndpoint {
        host: "127.0.0.1".to_owned(),
        port: address.port(),
    };

    // Several rounds, each a fresh connection: the loss was a race.
    const ROUNDS: usize = 5;
    const REPORTS: usize = 40;
    for round in 0..ROUNDS {
        let (session, mut events, connection) =
            MqttSession::start(&device, &endpoint, tls.mqtt_config().unwrap());
        let first = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
        assert!(matches!(first, Some(MqttEvent::Connected)), "{first:?}");

        let deployment = format!("dep-round-{round}");
        for i in 0..REPORTS {
            let report = StatusReport {
                deployment_id: deployment.clone(),
                event: DeviceEvent::Received,
                detail: Some(i.to_string()),
            };
            session.publish_report(&report).unwrap();
        }
        session.close(WAIT).await;
        tokio::time::timeout(WAIT, connection)
            .await
            .expect("the session task ends after DISCONNECT")
            .unwrap();
        drop(events);

        // Every report, in order, before the broker sees the client go.
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout(WAIT, broker_events.recv())
                .await
                .expect("broker events stalled")
                .expect("broker event channel closed");
            match event {
                BrokerEvent::Message {
                    topic: DeviceTopic::Status,
                    payload,
                    ..
                } => {
                    let report: StatusReport = decode(&payload).unwrap();
                    if report.deployment_id == deployment {
                        seen.push(report.detail.unwrap_or_default());
                    }
                }
                BrokerEvent::Disconnected { .. } => break,
                _ => {}
            }
        }
        let expected: Vec<String> = (0..REPORTS).map(|i| i.to_string()).collect();
        assert_eq!(seen, expected, "round {round}");
    }
}
