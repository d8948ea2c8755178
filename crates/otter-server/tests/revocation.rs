//! Device certificate revocation against the whole server (`otter_server::run`
//! on port-0 loopback addresses): the embedded broker kicks the revoked
//! device's live MQTT session and refuses its reconnect, the device HTTPS
//! endpoint refuses its certificate on new and kept-alive connections, a
//! report it sends changes nothing, and other devices are unaffected.
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

mod common;

use std::sync::Arc;
use std::time::Duration;

use otter_proto::api::{CreatedToken, DeviceInfo, EnrollResponse, ErrorBody};
use otter_proto::deployment::Phase;
use otter_proto::messages::{DeviceEvent, Mode, Registration, StatusReport, encode};
use reqwest::StatusCode;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{HARDWARE, Server, TIMEOUT, client_tls, device_https_client, error_code, payload};

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

fn mqtt_client(server: &Server, enrolled: &EnrollResponse) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(
        enrolled.device_id.as_str(),
        "127.0.0.1",
        server.endpoints.mqtt.port(),
    );
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(client_tls(enrolled))),
    ));
    AsyncClient::new(options, 16)
}

/// Polls until the CONNACK; returns its code, or the error ending the
/// connection first.
async fn connect_result(eventloop: &mut EventLoop) -> Result<ConnectReturnCode, ConnectionError> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    })
    .await
    .expect("timed out waiting for a CONNACK")
}

/// Polls until the connection ends; returns the error.
async fn until_disconnected(eventloop: &mut EventLoop) -> ConnectionError {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Err(error) = eventloop.poll().await {
                return error;
            }
        }
    })
    .await
    .expect("timed out waiting for the broker to close the connection")
}

async fn suback(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
) -> SubscribeReasonCode {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await.unwrap() {
                return ack.return_codes[0];
            }
        }
    })
    .await
    .expect("timed out waiting for a SUBACK")
}

/// One HTTP/1.1 connection over mutual TLS, kept alive between requests, so
/// the test knows a later request reuses the connection of an earlier one.
struct KeptAlive {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buffer: Vec<u8>,
}

impl KeptAlive {
    async fn open(server: &Server, enrolled: &EnrollResponse) -> KeptAlive {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(enrolled)));
        let tcp = tokio::net::TcpStream::connect(server.endpoints.device)
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        KeptAlive {
            stream: connector.connect(name, tcp).await.unwrap(),
            buffer: Vec::new(),
        }
    }

    /// Sends a POST and reads the answer (status, body); the answer must
    /// carry a Content-Length.
    async fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).await.unwrap();
        self.stream.write_all(body).await.unwrap();
        self.stream.flush().await.unwrap();
        tokio::time::timeout(TIMEOUT, self.read_answer())
            .await
            .expect("timed out waiting for an answer")
    }

    async fn read_answer(&mut self) -> (u16, Vec<u8>) {
        let head_end = loop {
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buffer[..head_end].to_vec()).unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .expect("an answer with a content-length");
        while self.buffer.len() < head_end + length {
            self.fill().await;
        }
        let body = self.buffer[head_end..head_end + length].to_vec();
        self.buffer.drain(..head_end + length);
        (status, body)
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let read = self.stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "connection closed before a whole answer");
        self.buffer.extend_from_slice(&chunk[..read]);
    }
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).unwrap().error
}

#[tokio::test]
async fn a_revoked_device_is_cut_off_at_once_and_others_are_not() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::start().await;
    let revoked = server.enroll("dev-r", &[]).await;
    let other = server.enroll("dev-o", &[]).await;

    // An operator token whose name the audit row must carry.
    let response = server
        .post_json(
            "/api/v1/tokens",
            serde_json::json!({ "name": "alice", "role": "operator" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let alice: CreatedToken = response.json().await.unwrap();

    // Both devices connected over MQTT.
    let (_revoked_mqtt, mut revoked_loop) = mqtt_client(&server, &revoked);
    assert_eq!(
        connect_result(&mut revoked_loop).await.unwrap(),
        ConnectReturnCode::Success
    );
    let (other_mqtt, mut other_loop) = mqtt_client(&server, &other);
    assert_eq!(
        connect_result(&mut other_loop).await.unwrap(),
        ConnectReturnCode::Success
    );

    // dev-r polls on a connection kept alive and gets an update with a link.
    let mut kept = KeptAlive::open(&server, &revoked).await;
    let (status, _) = kept.post("/v1/poll", &encode(&registration())).await;
    assert_eq!(status, 200);
    server.upload_release("fw", "1.0.0", &payload(1000)).await;
    let deployment = server
        .deploy("fw@1.0.0", "device:dev-r")
        .await
        .deployment_id;
    let (status, body) = kept.post("/v1/poll", &encode(&registration())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: otter_proto::messages::PollResponse = serde_json::from_slice(&body).unwrap();
    let update = answer.update.expect("an update");
    assert_eq!(server.phase(&deployment, "dev-r").await, Phase::Notified);

    // The revocation, by alice.
    let response = server
        .http
        .post(server.url("/api/v1/devices/dev-r/revoke"))
        .bearer_auth(&alice.token)
        .json(&serde_json::json!({ "reason": "stolen" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let shown: DeviceInfo = response.json().await.unwrap();
    assert!(shown.revoked_at.is_some());

    // MQTT: the live session is kicked, the reconnect refused.
    until_disconnected(&mut revoked_loop).await;
    drop(revoked_loop);
    let (_again, mut again_loop) = mqtt_client(&server, &revoked);
    match connect_result(&mut again_loop).await {
        Ok(code) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        Err(error) => panic!("unexpected reconnect result: {error:?}"),
    }
    // The other device is still connected and served.
    assert_eq!(
        suback(&other_mqtt, &mut other_loop, "otter/devices/dev-o/notify").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    // HTTPS, on the connection kept alive from before the revocation.
    let (status, body) = kept.post("/v1/poll", &encode(&registration())).await;
    assert_eq!(status, 403);
    assert_eq!(error_of(&body), "device-revoked");

    // HTTPS, new connections: download, poll and status all refused.
    let audit_before = server.audit("device=dev-r").await.len();
    let device_http = device_https_client(&revoked);
    let response = device_http.get(&update.link).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "device-revoked");
    let device_url =
        |path: &str| format!("https://127.0.0.1:{}{path}", server.endpoints.device.port());
    let response = device_http
        .post(device_url("/v1/poll"))
        .header("content-type", "application/json")
        .body(encode(&registration()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "device-revoked");
    let report = StatusReport {
        deployment_id: deployment.clone(),
        event: DeviceEvent::Received,
        detail: None,
    };
    let response = device_http
        .post(device_url("/v1/status"))
        .header("content-type", "application/json")
        .body(encode(&report))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "device-revoked");
    // Nothing changed: the phase, the audit rows of the device.
    assert_eq!(server.phase(&deployment, "dev-r").await, Phase::Notified);
    assert_eq!(server.audit("device=dev-r").await.len(), audit_before);

    // The other device's HTTPS still works.
    let response = device_https_client(&other)
        .post(device_url("/v1/poll"))
        .header("content-type", "application/json")
        .body(encode(&registration()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Audited once, by alice, with the reason; its pending link revoked.
    let rows = server.audit("device=dev-r").await;
    let revocations: Vec<_> = rows
        .iter()
        .filter(|e| e.event == "device.revoked")
        .collect();
    assert_eq!(revocations.len(), 1, "{rows:?}");
    assert_eq!(revocations[0].actor, "alice");
    assert_eq!(revocations[0].details["reason"], "stolen");
    assert_eq!(revocations[0].details["links_revoked"], 1);
    assert_eq!(server.count("dev-r", "link.revoked").await, 1);

    // A second revoke: 409, nothing more audited.
    let response = server
        .post_json("/api/v1/devices/dev-r/revoke", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(response).await, "device-revoked");
    assert_eq!(server.count("dev-r", "device.revoked").await, 1);

    // The list shows which device is revoked.
    let devices: Vec<DeviceInfo> = server.get_json("/api/v1/devices").await;
    let revoked_at = |id: &str| {
        devices
            .iter()
            .find(|d| d.device_id.as_str() == id)
            .unwrap()
            .revoked_at
            .clone()
    };
    assert!(revoked_at("dev-r").is_some());
    assert_eq!(revoked_at("dev-o"), None);
}

#[tokio::test]
async fn revoke_refuses_bad_input_and_viewers_without_changing_anything() {
    let server = Server::start().await;
    server.enroll("dev-v", &[]).await;
    let response = server
        .post_json(
            "/api/v1/tokens",
            serde_json::json!({ "name": "vic", "role": "viewer" }),
        )
        .await;
    let viewer: CreatedToken = response.json().await.unwrap();

    let response = server
        .http
        .post(server.url("/api/v1/devices/dev-v/revoke"))
        .bearer_auth(&viewer.token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    let response = server
        .post_json("/api/v1/devices/nobody/revoke", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "unknown-device");

    let response = server
        .post_json(
            "/api/v1/devices/dev-v/revoke",
            serde_json::json!({ "reason": "x".repeat(2000) }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let response = server
        .post_json(
            "/api/v1/devices/dev-v/revoke",
            serde_json::json!({ "why": "unknown field" }),
        )
        .await;
    assert!(response.status().is_client_error());

    assert_eq!(server.count("dev-v", "device.revoked").await, 0);
    let device: DeviceInfo = server.get_json("/api/v1/devices/dev-v").await;
    assert_eq!(device.revoked_at, None);
}

#[tokio::test]
async fn revocations_survive_a_restart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::start().await;
    let enrolled = server.enroll("dev-s", &[]).await;
    let response = server
        .post_json("/api/v1/devices/dev-s/revoke", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let server = Server::start_configured(server.stop().await, |_| {}).await;
    let (_client, mut eventloop) = mqtt_client(&server, &enrolled);
    match connect_result(&mut eventloop).await {
        Ok(code) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        Err(error) => panic!("unexpected connect result: {error:?}"),
    }
    let response = device_https_client(&enrolled)
        .post(format!(
            "https://127.0.0.1:{}/v1/poll",
            server.endpoints.device.port()
        ))
        .header("content-type", "application/json")
        .body(encode(&registration()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "device-revoked");
}
