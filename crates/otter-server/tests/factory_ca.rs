//! The factory path: devices holding certificates of the operator's own CA
//! (`--device-ca`), registered with `POST /api/v1/devices/import`, against
//! the whole server (`otter_server::run` on port-0 loopback addresses). The
//! broker and the device endpoint accept such a certificate once imported;
//! a certificate of a CA the server does not trust is refused at import and
//! at the TLS handshake; an import with one bad certificate stores nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use otter_proto::api::{DeviceInfo, ImportDevicesResponse};
use otter_proto::messages::{Mode, Registration};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Transport};

use common::{FactoryCa, HARDWARE, Server, TIMEOUT, client_tls_from_pem, error_code};

fn registration() -> Registration {
    Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode: Mode::Pull,
        capabilities: vec!["file".into()],
        encryption_key: common::encryption_key(),
    }
}

/// Polls the device endpoint with a certificate; the HTTP status, or `None`
/// when the TLS handshake (or the connection) failed.
async fn poll_status(server: &Server, certificate: &(String, String)) -> Option<StatusCode> {
    let ca_pem = std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls_from_pem(&ca_pem, &certificate.0, &certificate.1))
        .build()
        .unwrap();
    let url = format!(
        "https://127.0.0.1:{}/v1/poll",
        server.endpoints.device.port()
    );
    match client.post(url).json(&registration()).send().await {
        Ok(response) => Some(response.status()),
        Err(_) => None,
    }
}

/// Connects to the broker with a certificate: the CONNACK code, or `None`
/// when the connection failed before one.
async fn mqtt_connect(
    server: &Server,
    device_id: &str,
    certificate: &(String, String),
) -> Option<ConnectReturnCode> {
    let ca_pem = std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap();
    let mut options = MqttOptions::new(device_id, "127.0.0.1", server.endpoints.mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(client_tls_from_pem(
            &ca_pem,
            &certificate.0,
            &certificate.1,
        ))),
    ));
    let (_client, mut eventloop) = AsyncClient::new(options, 16);
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Some(ack.code),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .unwrap()
}

async fn devices(server: &Server) -> Vec<DeviceInfo> {
    server.get_json::<Vec<DeviceInfo>>("/api/v1/devices").await
}

#[tokio::test]
async fn imported_factory_certificates_are_accepted_and_strangers_are_not() {
    let factory = FactoryCa::new("Plant 3 Factory CA");
    let stranger_ca = FactoryCa::new("Someone Else's CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("factory-ca.pem");
    std::fs::write(&ca_file, &factory.pem).unwrap();
    let server = Server::start_configured(dir, |config| {
        config.device_cas = vec![ca_file.clone()];
    })
    .await;

    let device = factory.issue("factory-1");
    let stranger = stranger_ca.issue("factory-2");

    // Trusted at the TLS level, but not imported yet: not a known device.
    assert_eq!(
        poll_status(&server, &device).await,
        Some(StatusCode::FORBIDDEN)
    );
    // A certificate of a CA the server does not trust fails the handshake.
    assert_eq!(poll_status(&server, &stranger).await, None);
    assert_eq!(mqtt_connect(&server, "factory-2", &stranger).await, None);

    // An import holding one untrusted certificate stores nothing.
    let response = server
        .post_json(
            "/api/v1/devices/import",
            serde_json::json!({"devices": [
                {"certificate_pem": device.0, "hardware": HARDWARE, "tags": ["line-1"]},
                {"certificate_pem": stranger.0, "hardware": HARDWARE},
            ]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(response).await, "invalid-certificate");
    assert!(devices(&server).await.is_empty());
    // Not a certificate at all.
    let response = server
        .post_json(
            "/api/v1/devices/import",
            serde_json::json!({"devices": [{"certificate_pem": "garbage", "hardware": HARDWARE}]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(devices(&server).await.is_empty());

    let response = server
        .post_json(
            "/api/v1/devices/import",
            serde_json::json!({"devices": [
                {"certificate_pem": device.0, "hardware": HARDWARE, "tags": ["line-1"]},
            ]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let imported: ImportDevicesResponse = response.json().await.unwrap();
    assert_eq!(imported.devices.len(), 1);
    assert_eq!(imported.devices[0].device_id.as_str(), "factory-1");
    let listed = devices(&server).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tags, vec!["line-1".to_owned()]);
    assert_eq!(
        server.count("factory-1", "device.enrolled").await,
        1,
        "the import is audited"
    );

    // Now both the device endpoint and the broker take it.
    assert_eq!(poll_status(&server, &device).await, Some(StatusCode::OK));
    assert_eq!(
        mqtt_connect(&server, "factory-1", &device).await,
        Some(ConnectReturnCode::Success)
    );

    // A second import of the same device is refused.
    let response = server
        .post_json(
            "/api/v1/devices/import",
            serde_json::json!({"devices": [{"certificate_pem": device.0, "hardware": HARDWARE}]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    server.stop().await;
}

#[tokio::test]
async fn a_device_ca_file_that_is_not_a_ca_stops_the_start() {
    let factory = FactoryCa::new("Plant 3 Factory CA");
    let (leaf, _) = factory.issue("not-a-ca");
    let dir = tempfile::tempdir().unwrap();
    let leaf_file = dir.path().join("leaf.pem");
    std::fs::write(&leaf_file, leaf).unwrap();
    let mut config = otter_server::config::ServerConfig::ephemeral(dir.path().join("data"));
    config.device_cas = vec![leaf_file];
    let error = otter_server::run(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("not a CA"),
        "unexpected error: {error:#}"
    );
}
