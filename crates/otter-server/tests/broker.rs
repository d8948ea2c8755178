//! The embedded broker against real rumqttc clients over real TLS on
//! 127.0.0.1, one broker per test on port 0.
//!
//! Each test builds a PKI in a temporary directory, issues device
//! certificates, starts the broker and drives MQTT clients; waiting is always
//! "until this event arrives, at most `TIMEOUT`", never a sleep.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use otter_proto::topics::{DeviceId, DeviceTopic, device_topic};
use otter_server::broker::{
    BrokerConfig, BrokerError, BrokerEvent, EmbeddedBroker, MessageBus, start_embedded,
};
use otter_server::pki::{IssuedCertificate, Pki};
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions,
    Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc::Receiver;

use common::client_tls_from_pem;

const TIMEOUT: Duration = Duration::from_secs(20);

struct Fixture {
    // Holds the PKI files the broker reads.
    _data_dir: tempfile::TempDir,
    pki: Pki,
    broker: EmbeddedBroker,
    address: SocketAddr,
    events: Receiver<BrokerEvent>,
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

async fn start_broker() -> Fixture {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let data_dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
    let config = BrokerConfig::from_pki("127.0.0.1:0".parse().unwrap(), &pki);
    let (broker, address, events) = start_embedded(config).await.unwrap();
    assert_ne!(address.port(), 0);
    Fixture {
        _data_dir: data_dir,
        pki,
        broker,
        address,
        events,
    }
}

fn tls_for(ca_pem: &str, device_certificate: &IssuedCertificate) -> TlsConfiguration {
    TlsConfiguration::Rustls(Arc::new(client_tls_from_pem(
        ca_pem,
        &device_certificate.certificate_pem,
        &device_certificate.private_key_pem,
    )))
}

fn client(
    fixture: &Fixture,
    client_id: &str,
    device_certificate: &IssuedCertificate,
    clean_session: bool,
) -> (AsyncClient, EventLoop) {
    // "127.0.0.1" is one of the names the server certificate always covers.
    let mut options = MqttOptions::new(client_id, "127.0.0.1", fixture.address.port());
    options.set_clean_session(clean_session);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(tls_for(
        fixture.pki.ca_pem(),
        device_certificate,
    )));
    AsyncClient::new(options, 16)
}

/// Polls the event loop until `select` picks an event, failing on a
/// connection error or after `TIMEOUT`.
async fn poll_until<T>(
    eventloop: &mut EventLoop,
    mut select: impl FnMut(&Event) -> Option<T>,
) -> T {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let event = eventloop.poll().await.expect("mqtt connection failed");
            if let Some(selected) = select(&event) {
                return selected;
            }
        }
    })
    .await
    .expect("timed out waiting for an mqtt event")
}

/// Polls until the connection ends with an error, which is returned.
async fn poll_until_error(eventloop: &mut EventLoop) -> ConnectionError {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    panic!("connection unexpectedly accepted: {ack:?}")
                }
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("timed out waiting for the connection to fail")
}

async fn connack(eventloop: &mut EventLoop) -> ConnAck {
    poll_until(eventloop, |event| match event {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.clone()),
        _ => None,
    })
    .await
}

async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
) -> SubscribeReasonCode {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    poll_until(eventloop, |event| match event {
        Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes[0]),
        _ => None,
    })
    .await
}

async fn publish(client: &AsyncClient, eventloop: &mut EventLoop, topic: &str, payload: &[u8]) {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .unwrap();
    poll_until(eventloop, |event| {
        matches!(event, Event::Incoming(Packet::PubAck(_))).then_some(())
    })
    .await
}

/// Sends DISCONNECT and closes the connection. rmqtt waits for the client
/// to close the socket after a DISCONNECT (as MQTT 3.1.1 asks of clients),
/// and rumqttc closes it only when its event loop is dropped.
async fn disconnect(client: AsyncClient, mut eventloop: EventLoop) {
    client.disconnect().await.unwrap();
    poll_until(&mut eventloop, |event| {
        matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
    })
    .await;
}

/// Keeps polling `eventloop` (so its connection stays serviced) until the
/// broker reports `select`ed event.
async fn next_event_matching<T>(
    events: &mut Receiver<BrokerEvent>,
    eventloop: Option<&mut EventLoop>,
    mut select: impl FnMut(BrokerEvent) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            let event = events.recv().await.expect("broker event channel closed");
            if let Some(selected) = select(event) {
                return selected;
            }
        }
    };
    let drive = async {
        match eventloop {
            Some(eventloop) => loop {
                if let Err(error) = eventloop.poll().await {
                    panic!("mqtt connection failed: {error}");
                }
            },
            None => std::future::pending().await,
        }
    };
    tokio::time::timeout(TIMEOUT, async {
        tokio::select! {
            selected = wait => selected,
            never = drive => never,
        }
    })
    .await
    .expect("timed out waiting for a broker event")
}

/// The next broker event of the same kind as `like` (whatever its fields),
/// for the caller to compare with `like`.
async fn next_event_like(
    events: &mut Receiver<BrokerEvent>,
    eventloop: Option<&mut EventLoop>,
    like: &BrokerEvent,
) -> BrokerEvent {
    next_event_matching(events, eventloop, |event| {
        (std::mem::discriminant(&event) == std::mem::discriminant(like)).then_some(event)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_message_reaches_the_server_with_the_authenticated_id() {
    let mut fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let (client, mut eventloop) = client(&fixture, "dev-1", &dev_1, true);
    let ack = connack(&mut eventloop).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let connected = BrokerEvent::Connected {
        device_id: device("dev-1"),
    };
    assert_eq!(
        next_event_like(&mut fixture.events, Some(&mut eventloop), &connected).await,
        connected
    );

    let topic = device_topic(&device("dev-1"), DeviceTopic::Register);
    publish(&client, &mut eventloop, &topic, b"{\"hello\":1}").await;
    let message = BrokerEvent::Message {
        device_id: device("dev-1"),
        topic: DeviceTopic::Register,
        payload: bytes::Bytes::from_static(b"{\"hello\":1}"),
    };
    assert_eq!(
        next_event_like(&mut fixture.events, Some(&mut eventloop), &message).await,
        message
    );

    disconnect(client, eventloop).await;
    let disconnected = BrokerEvent::Disconnected {
        device_id: device("dev-1"),
    };
    assert_eq!(
        next_event_like(&mut fixture.events, None, &disconnected).await,
        disconnected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_wildcard_subscriptions_are_refused() {
    let fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let (client, mut eventloop) = client(&fixture, "dev-1", &dev_1, true);
    connack(&mut eventloop).await;

    for topic in [
        device_topic(&device("dev-2"), DeviceTopic::Notify),
        "otter/devices/#".to_owned(),
        "otter/devices/+/notify".to_owned(),
        device_topic(&device("dev-1"), DeviceTopic::Status),
    ] {
        let code = subscribe(&client, &mut eventloop, &topic).await;
        assert_eq!(code, SubscribeReasonCode::Failure, "{topic}");
    }
    let own = device_topic(&device("dev-1"), DeviceTopic::Notify);
    let code = subscribe(&client, &mut eventloop, &own).await;
    assert_eq!(code, SubscribeReasonCode::Success(QoS::AtLeastOnce));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_on_another_devices_topic_is_not_delivered() {
    let mut fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let dev_2 = fixture.pki.issue_device(&device("dev-2")).unwrap();

    // dev-2 listens on its own notify topic to prove nothing arrives there
    // either when dev-1 tries to publish on it.
    let (client_2, mut eventloop_2) = client(&fixture, "dev-2", &dev_2, true);
    connack(&mut eventloop_2).await;
    let notify_2 = device_topic(&device("dev-2"), DeviceTopic::Notify);
    subscribe(&client_2, &mut eventloop_2, &notify_2).await;

    let (client_1, mut eventloop_1) = client(&fixture, "dev-1", &dev_1, true);
    connack(&mut eventloop_1).await;
    for forged_topic in [
        device_topic(&device("dev-2"), DeviceTopic::Status),
        notify_2.clone(),
        device_topic(&device("dev-1"), DeviceTopic::Notify),
    ] {
        publish(&client_1, &mut eventloop_1, &forged_topic, b"forged").await;
    }
    // The broker handles one client's publishes in order: once this one is
    // reported, the ones before it would have been too.
    publish(
        &client_1,
        &mut eventloop_1,
        &device_topic(&device("dev-1"), DeviceTopic::Status),
        b"marker",
    )
    .await;

    let mut messages = Vec::new();
    next_event_matching(
        &mut fixture.events,
        Some(&mut eventloop_1),
        |event| match event {
            BrokerEvent::Message { ref payload, .. } => {
                let is_marker = payload.as_ref() == b"marker";
                messages.push(event);
                is_marker.then_some(())
            }
            _ => None,
        },
    )
    .await;
    assert_eq!(
        messages,
        vec![BrokerEvent::Message {
            device_id: device("dev-1"),
            topic: DeviceTopic::Status,
            payload: bytes::Bytes::from_static(b"marker"),
        }]
    );

    // The server's own notification reaches dev-2, and it is the first
    // publish dev-2 sees: the forged one was dropped.
    fixture
        .broker
        .publish(&device("dev-2"), DeviceTopic::Notify, b"genuine".to_vec())
        .await
        .unwrap();
    let received = poll_until(&mut eventloop_2, |event| match event {
        Event::Incoming(Packet::Publish(publish)) => Some(publish.payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(received.as_ref(), b"genuine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_must_match_the_certificate() {
    let mut fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let (_client, mut eventloop) = client(&fixture, "dev-2", &dev_1, true);
    let error = poll_until_error(&mut eventloop).await;
    assert!(
        matches!(
            error,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{error:?}"
    );
    assert!(
        fixture.events.try_recv().is_err(),
        "a refused client produced an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_on_a_foreign_topic_is_refused() {
    let fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let mut options = MqttOptions::new("dev-1", "127.0.0.1", fixture.address.port());
    options.set_transport(Transport::tls_with_config(tls_for(
        fixture.pki.ca_pem(),
        &dev_1,
    )));
    options.set_last_will(rumqttc::LastWill::new(
        device_topic(&device("dev-2"), DeviceTopic::Notify),
        "forged",
        QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut eventloop) = AsyncClient::new(options, 16);
    let error = poll_until_error(&mut eventloop).await;
    assert!(
        matches!(
            error,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_another_ca_fails_the_tls_handshake() {
    let mut fixture = start_broker().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_pki = Pki::load_or_create(other_dir.path(), &[]).unwrap();
    let foreign = other_pki.issue_device(&device("dev-1")).unwrap();
    let (_client, mut eventloop) = client(&fixture, "dev-1", &foreign, true);
    let error = poll_until_error(&mut eventloop).await;
    // With TLS 1.3 the server checks the client certificate after the
    // client considers the handshake done, so the refusal arrives as a TLS
    // alert on the first read (here DecryptError: the foreign CA has the
    // same name, so its signature is what fails), never as a CONNACK.
    let text = format!("{error:?}");
    assert!(
        !matches!(error, ConnectionError::ConnectionRefused(_)),
        "{text}"
    );
    assert!(text.contains("AlertReceived"), "{text}");
    assert!(
        fixture.events.try_recv().is_err(),
        "a refused client produced an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_for_an_offline_device_is_delivered_on_reconnect() {
    let mut fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let notify = device_topic(&device("dev-1"), DeviceTopic::Notify);

    // Without any session there is nobody to queue for.
    let result = fixture
        .broker
        .publish(&device("dev-1"), DeviceTopic::Notify, b"too early".to_vec())
        .await;
    assert!(
        matches!(result, Err(BrokerError::NoSession { .. })),
        "{result:?}"
    );

    let (client, mut eventloop) = client(&fixture, "dev-1", &dev_1, false);
    connack(&mut eventloop).await;
    assert_eq!(
        subscribe(&client, &mut eventloop, &notify).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    disconnect(client, eventloop).await;
    // Once the broker reports the device offline, its session is offline.
    next_event_matching(&mut fixture.events, None, |event| {
        matches!(event, BrokerEvent::Disconnected { .. }).then_some(())
    })
    .await;

    for payload in [&b"first"[..], b"second"] {
        fixture
            .broker
            .publish(&device("dev-1"), DeviceTopic::Notify, payload.to_vec())
            .await
            .unwrap();
    }

    let (_client, mut eventloop) = self::client(&fixture, "dev-1", &dev_1, false);
    let ack = connack(&mut eventloop).await;
    assert!(ack.session_present);
    let mut received = Vec::new();
    poll_until(&mut eventloop, |event| match event {
        Event::Incoming(Packet::Publish(publish)) => {
            assert_eq!(publish.topic, notify);
            assert_eq!(publish.qos, QoS::AtLeastOnce);
            received.push(publish.payload.clone());
            (received.len() == 2).then_some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(received, vec![&b"first"[..], &b"second"[..]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_broker_on_a_taken_port_fails_to_start() {
    let fixture = start_broker().await;
    let config = BrokerConfig::from_pki(fixture.address, &fixture.pki);
    let result = start_embedded(config).await;
    assert!(
        matches!(result, Err(BrokerError::Bind { .. })),
        "{:?}",
        result.map(|(_, address, _)| address)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_clients_and_stops_accepting() {
    let fixture = start_broker().await;
    let dev_1 = fixture.pki.issue_device(&device("dev-1")).unwrap();
    let (_client, mut eventloop) = client(&fixture, "dev-1", &dev_1, true);
    connack(&mut eventloop).await;

    fixture.broker.shutdown().await;
    poll_until_error(&mut eventloop).await;
    let (_client, mut eventloop) = client(&fixture, "dev-1", &dev_1, true);
    let error = poll_until_error(&mut eventloop).await;
    assert!(matches!(error, ConnectionError::Io(_)), "{error:?}");
}
