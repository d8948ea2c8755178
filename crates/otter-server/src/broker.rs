//! The embedded MQTT broker (rmqtt, in-process) and the [`MessageBus`] through
//! which the server core talks to devices.
//!
//! Devices connect with MQTT over TLS only, presenting a client certificate of
//! the device CA. Identity is the certificate's common name: the
//! `ClientAuthenticate` hook admits a client only when that CN is a valid
//! [`DeviceId`] equal to the MQTT client id, and never as superuser, so the ACL
//! hooks always run. A device may subscribe to its own
//! `otter/devices/<id>/notify` and `chunk` (push mode) and publish to its own
//! `register`, `status` and `ack` (push mode), nothing else.
//!
//! Inbound: the `MessagePublish` hook turns each device publish that passes the
//! ACL into a [`BrokerEvent::Message`] on a bounded channel; connection hooks
//! add [`BrokerEvent::Connected`] / [`BrokerEvent::Disconnected`]. Outbound:
//! [`EmbeddedBroker`] implements [`MessageBus::publish`] by routing a QoS 1
//! message through rmqtt, which queues it for an offline persistent session.
//!
//! Layout: public types and [`start_embedded`], then the rmqtt hook handler
//! (`DeviceHooks`) and the pure ACL rules it applies (`authenticate`,
//! `may_subscribe`, `inbound_device_topic`), which are unit-tested at the end.
//!
//! rmqtt facts this module relies on (rmqtt 0.24.0, rmqtt-net 0.5.0):
//! - all broker state lives in a `ServerContext`, so several brokers can run in
//!   one process (the tests do); the only process-wide state is the cache of
//!   the "system busy" check, which we switch off;
//! - the listener is bound by `rmqtt::net::Builder::bind`, before the broker
//!   runs, so bind errors surface here and port 0 works (`local_addr`);
//! - sessions and queued messages live in memory: a server restart loses them;
//! - `MqttServer::start` exits the process on error, so we spawn `run` ourselves
//!   and abort it to stop accepting.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use otter_proto::topics::{DeviceId, DeviceTopic, device_topic, parse_device_topic};
use rmqtt::codec::types::QoS;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::server::MqttServer;
use rmqtt::shared::Entry;
use rmqtt::types::{
    AuthResult, CodecPublish, ConnectInfo, From, Id, LastWill, Publish, PublishAclResult,
    SubscribeAclResult,
};
use tokio::sync::mpsc;

/// How long undelivered messages and disconnected persistent sessions are
/// kept: devices may be offline for days (rmqtt's defaults are 5 min and 2 h).
pub const OFFLINE_RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);
/// Messages queued per offline device. The server sends few notifications and
/// the registration answer repeats what is pending, so a short queue suffices.
pub const MAX_QUEUED_MESSAGES_PER_DEVICE: usize = 100;
/// How long a connection or disconnection event waits for room in the event
/// channel before it is dropped (it only refreshes `last_seen` and pauses
/// push transfers, which their resend timer also covers). Device *messages*
/// never time out: a dropped status report would be lost for good (the
/// device already has its PUBACK), so the session waits for room instead.
/// Waiting blocks only that device's session (each connection has its own
/// task) and delays its PUBACK: honest backpressure. A benchmark with 9,500
/// devices filled the channel within seconds when reports were dropped after
/// 5 s, and deployments never completed.
pub const EVENT_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Client id under which the server's own publishes enter the broker. It
/// contains a space, so no device can ever have it.
const SERVER_CLIENT_ID: &str = "otter server";

/// What the server core receives from devices. The device id is the
/// authenticated one (certificate CN == client id), never read from a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    Message {
        device_id: DeviceId,
        topic: DeviceTopic,
        payload: Bytes,
    },
    Connected {
        device_id: DeviceId,
    },
    Disconnected {
        device_id: DeviceId,
    },
}

/// Listener and limits of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Port 0 picks a free port; [`start_embedded`] returns the bound address.
    pub listen: SocketAddr,
    /// PEM bundle of the device CAs (ours and any `--device-ca`): the only
    /// issuers whose client certificates are accepted.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: u32,
    /// Capacity of the device event channel.
    pub event_capacity: usize,
    /// Revoked certificate serials: refused at CONNECT; a revoked device's
    /// live session is kicked when the revocation is announced.
    pub revocations: crate::revocation::Revocations,
}

impl BrokerConfig {
    /// A configuration with the PKI's certificates, 1 MiB packets and room
    /// for 8192 pending events.
    pub fn from_pki(listen: SocketAddr, pki: &crate::pki::Pki) -> BrokerConfig {
        BrokerConfig {
            listen,
            ca_cert: pki.client_cas_path().to_owned(),
            server_cert: pki.server_cert_path().to_owned(),
            server_key: pki.server_key_path().to_owned(),
            max_packet_size: 1024 * 1024,
            event_capacity: 8192,
            revocations: crate::revocation::Revocations::default(),
        }
    }
}

/// Why the broker could not start or a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address could not be bound (in use, not local, ...).
    #[error("cannot listen on {address}: {message}")]
    Bind {
        address: SocketAddr,
        message: String,
    },
    /// The certificate files could not be read or do not form a valid TLS
    /// configuration.
    #[error("broker tls configuration: {0}")]
    Tls(String),
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// Nothing is subscribed to the topic: the device never connected since
    /// the broker started, or its session expired. Nothing was queued; the
    /// device learns what is pending when it registers.
    #[error("device {device_id} has no session; message not queued")]
    NoSession { device_id: DeviceId },
    /// The broker accepted the message but could not hand it to the device's
    /// session, e.g. because its queue is full.
    #[error("message for device {device_id} dropped by the broker: {reason}")]
    Dropped { device_id: DeviceId, reason: String },
}

/// The server's side of the message bus. An external broker will be a second
/// implementation.
pub trait MessageBus: Send + Sync + 'static {
    /// Publishes QoS 1 to `otter/devices/<id>/<topic>`; queued by the broker
    /// for an offline persistent session. The server publishes on
    /// [`DeviceTopic::Notify`]; other topics have no subscribers.
    fn publish<'a>(
        &'a self,
        device_id: &'a DeviceId,
        topic: DeviceTopic,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>>;
}

/// Handle to the running embedded broker. Cheap to clone; when the last clone
/// is dropped the broker stops accepting connections.
#[derive(Clone)]
pub struct EmbeddedBroker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    scx: ServerContext,
    /// Identity of the server's own publishes.
    server_identity: Id,
    accept_loop: tokio::task::JoinHandle<()>,
    /// [`kick_revoked`].
    revocation_listener: tokio::task::JoinHandle<()>,
}

impl Drop for BrokerInner {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.revocation_listener.abort();
    }
}

/// Disconnects (and discards the session of) each device announced as
/// revoked; its reconnect is then refused by [`authenticate`].
async fn kick_revoked(
    scx: ServerContext,
    listener_id: u16,
    mut revoked: tokio::sync::broadcast::Receiver<DeviceId>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let device_id = match revoked.recv().await {
            Ok(device_id) => device_id,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "revocation announcements missed; sessions not kicked"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let shared = scx.extends.shared().await;
        if !shared.exist(device_id.as_str()) {
            continue;
        }
        let id = Id::new(
            scx.node.id(),
            listener_id,
            None,
            None,
            device_id.as_str().into(),
            None,
        );
        let mut entry = shared.entry(id);
        match entry.kick(true, true, true).await {
            Ok(_) => tracing::info!(device = %device_id, "revoked device disconnected"),
            Err(error) => {
                tracing::warn!(device = %device_id, %error, "kicking a revoked device failed")
            }
        }
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Stops accepting connections and disconnects every client. Queued
    /// messages and sessions are discarded (rmqtt keeps them in memory only).
    pub async fn shutdown(&self) {
        self.inner.accept_loop.abort();
        let entries: Vec<Box<dyn Entry>> = self.inner.scx.extends.shared().await.iter().collect();
        for mut entry in entries {
            if let Err(error) = entry.kick(true, true, true).await {
                tracing::debug!(%error, "kicking a client at shutdown failed");
            }
        }
    }
}

impl MessageBus for EmbeddedBroker {
    fn publish<'a>(
        &'a self,
        device_id: &'a DeviceId,
        topic: DeviceTopic,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>> {
        Box::pin(async move {
            let topic = device_topic(device_id, topic);
            let (topic_length, payload_length) = (topic.len(), payload.len());
            let publish = Publish::from(CodecPublish {
                dup: false,
                retain: false,
                qos: QoS::AtLeastOnce,
                topic: topic.into(),
                packet_id: None,
                payload: Bytes::from(payload),
                properties: None,
            })
            // The expiry of a queued message counts from its creation time;
            // without one it would never expire.
            .create_time(rmqtt::utils::timestamp_millis());
            let from = From::from_system(self.inner.server_identity.clone());
            // `Shared::forwards` rather than `SessionState::forwards`, which
            // discards whether anyone received the message.
            let result = self
                .inner
                .scx
                .extends
                .shared()
                .await
                .forwards(None, from, publish)
                .await;
            match result {
                Ok(0) => Err(BrokerError::NoSession {
                    device_id: device_id.clone(),
                }),
                Ok(_) => {
                    crate::metrics::metrics().mqtt_published(topic_length, payload_length);
                    Ok(())
                }
                Err((_, failures)) => Err(BrokerError::Dropped {
                    device_id: device_id.clone(),
                    reason: failures
                        .iter()
                        .map(|(_, _, _, reason)| reason.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
            }
        })
    }
}

/// Starts rmqtt in-process on the current tokio runtime. Returns once the TLS
/// listener is bound, with the bound address (port 0 picks a free port), the
/// bus handle and the receiver of device events.
pub async fn start_embedded(
    config: BrokerConfig,
) -> Result<(EmbeddedBroker, SocketAddr, mpsc::Receiver<BrokerEvent>), BrokerError> {
    if config.event_capacity == 0 {
        return Err(BrokerError::Config(
            "event_capacity must be at least 1".to_owned(),
        ));
    }
    if config.max_packet_size == 0 {
        // rmqtt reads 0 as "unlimited".
        return Err(BrokerError::Config(
            "max_packet_size must be at least 1".to_owned(),
        ));
    }
    let path = |path: &PathBuf| {
        path.to_str()
            .map(str::to_owned)
            .ok_or_else(|| BrokerError::Config(format!("{} is not UTF-8", path.display())))
    };
    let listener = rmqtt::net::Builder::new()
        .name("otter-devices")
        .laddr(config.listen)
        .reuseaddr(Some(true))
        .nodelay(true)
        .allow_anonymous(false)
        .max_packet_size(config.max_packet_size)
        .max_qos_allowed(QoS::AtLeastOnce)
        .max_clientid_len(otter_proto::topics::MAX_DEVICE_ID_LEN)
        .max_mqueue_len(MAX_QUEUED_MESSAGES_PER_DEVICE)
        .session_expiry_interval(OFFLINE_RETENTION)
        .max_session_expiry_interval(OFFLINE_RETENTION)
        .message_expiry_interval(OFFLINE_RETENTION)
        .tls_cert(Some(path(&config.server_cert)?))
        .tls_key(Some(path(&config.server_key)?))
        .tls_client_ca_certs(Some(path(&config.ca_cert)?))
        .tls_cross_certificate(true)
        .cert_cn_as_username(true)
        .collect_cert_info(true)
        .bind()
        .map_err(|error| BrokerError::Bind {
            address: config.listen,
            message: format!("{error:#}"),
        })?
        .tls()
        .map_err(|error| BrokerError::Tls(format!("{error:#}")))?;
    let local_addr = listener.local_addr().map_err(|error| BrokerError::Bind {
        address: config.listen,
        message: format!("{error:#}"),
    })?;

    // The busy check refuses CONNECTs while the machine's load average is
    // high, a process-wide judgement that is wrong for an embedded broker.
    let scx = ServerContext::new().busy_check_enable(false).build().await;
    let (event_sender, event_receiver) = mpsc::channel(config.event_capacity);
    let register = scx.extends.hook_mgr().register();
    for hook_type in DeviceHooks::TYPES {
        register
            .add(
                hook_type,
                Box::new(DeviceHooks {
                    events: event_sender.clone(),
                    revocations: config.revocations.clone(),
                }),
            )
            .await;
    }
    register.start().await;

    // rmqtt keys listener settings by an id, by default the configured port,
    // which is 0 for every test broker; the bound port is unique.
    let listener_id = local_addr.port();
    let server = MqttServer::new(scx.clone())
        .listener_by_id(listener, listener_id)
        .build();
    let accept_loop = tokio::spawn(async move {
        if let Err(error) = server.run().await {
            tracing::error!(error = format!("{error:#}"), "embedded mqtt broker stopped");
        }
    });
    let server_identity = Id::new(
        scx.node.id(),
        listener_id,
        None,
        None,
        SERVER_CLIENT_ID.into(),
        None,
    );
    let revocation_listener = tokio::spawn(kick_revoked(
        scx.clone(),
        listener_id,
        config.revocations.subscribe(),
    ));
    tracing::info!(%local_addr, "embedded mqtt broker listening");
    let broker = EmbeddedBroker {
        inner: Arc::new(BrokerInner {
            scx,
            server_identity,
            accept_loop,
            revocation_listener,
        }),
    };
    Ok((broker, local_addr, event_receiver))
}

/// The rmqtt hook handler: authentication, ACL, and forwarding of device
/// events to the server core.
struct DeviceHooks {
    events: mpsc::Sender<BrokerEvent>,
    revocations: crate::revocation::Revocations,
}

impl DeviceHooks {
    const TYPES: [Type; 6] = [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::MessagePublish,
        Type::ClientConnected,
        Type::ClientDisconnected,
    ];

    async fn handle(&self, param: &Parameter<'_>, accumulated: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(connect_info) => {
                let result = match authenticate(connect_info, &self.revocations) {
                    Ok(_) => AuthResult::Allow(false, None),
                    Err(reason) => {
                        tracing::info!(client_id = %connect_info.client_id(), reason, "mqtt connection refused");
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let result = if may_subscribe(&session.id.client_id, &subscribe.topic_filter) {
                    SubscribeAclResult::new_success(QoS::AtLeastOnce, None)
                } else {
                    tracing::info!(client_id = %session.id.client_id, topic_filter = %subscribe.topic_filter, "mqtt subscription refused");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let result = if inbound_device_topic(&session.id.client_id, &publish.topic)
                    .is_some()
                {
                    PublishAclResult::allow()
                } else {
                    tracing::info!(client_id = %session.id.client_id, topic = %publish.topic, "mqtt publish refused");
                    // `false`: drop the message but keep the connection; MQTT
                    // 3.1.1 has no negative PUBACK.
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            Parameter::MessagePublish(Some(session), from, publish) => {
                // This hook runs before the publish ACL, so it applies the
                // same rule itself. The identity is the session's, which
                // authentication tied to the certificate.
                let inbound = (from.id.client_id == session.id.client_id)
                    .then(|| inbound_device_topic(&session.id.client_id, &publish.topic))
                    .flatten();
                if let Some((device_id, topic)) = inbound {
                    let metrics = crate::metrics::metrics();
                    metrics.mqtt_received_messages.increment();
                    metrics
                        .mqtt_received_payload_bytes
                        .add(publish.payload.len() as u64);
                    if topic == DeviceTopic::Register {
                        metrics.registration(otter_proto::api::Channel::Mqtt);
                    }
                    self.send(BrokerEvent::Message {
                        device_id,
                        topic,
                        payload: publish.payload.clone(),
                    })
                    .await;
                }
                (true, accumulated)
            }
            Parameter::ClientConnected(session) => {
                crate::metrics::metrics().mqtt_connects.increment();
                if let Ok(device_id) = DeviceId::parse(&session.id.client_id) {
                    self.send(BrokerEvent::Connected { device_id }).await;
                }
                (true, accumulated)
            }
            Parameter::ClientDisconnected(session, _reason) => {
                crate::metrics::metrics().mqtt_disconnects.increment();
                if let Ok(device_id) = DeviceId::parse(&session.id.client_id) {
                    self.send(BrokerEvent::Disconnected { device_id }).await;
                }
                (true, accumulated)
            }
            _ => (true, accumulated),
        }
    }

    async fn send(&self, event: BrokerEvent) {
        if matches!(event, BrokerEvent::Message { .. }) {
            if self.events.send(event).await.is_err() {
                tracing::debug!("device event receiver gone; event dropped");
            }
            return;
        }
        match self.events.send_timeout(event, EVENT_SEND_TIMEOUT).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(event)) => {
                tracing::warn!(?event, "device event channel full; event dropped");
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                tracing::debug!("device event receiver gone; event dropped");
            }
        }
    }
}

// Written out instead of `#[async_trait]` (the expansion rmqtt's trait
// expects) to avoid a dependency for one impl.
impl Handler for DeviceHooks {
    fn hook<'life0, 'life1, 'async_trait>(
        &'life0 self,
        param: &'life1 Parameter<'_>,
        accumulated: Option<HookResult>,
    ) -> Pin<Box<dyn Future<Output = ReturnType> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(param, accumulated))
    }
}

/// The device a CONNECT may be admitted as, or why not: the client
/// certificate must not be revoked, its CN must be a valid device id equal
/// to the client id, and a
/// last will may only target a topic the device may publish to (rmqtt
/// publishes wills without the publish ACL).
fn authenticate(
    connect_info: &ConnectInfo,
    revocations: &crate::revocation::Revocations,
) -> Result<DeviceId, &'static str> {
    let certificate = connect_info
        .cert()
        .ok_or("no client certificate information")?;
    let serial = certificate
        .serial
        .as_deref()
        .ok_or("client certificate has no serial")?;
    if revocations.is_revoked(serial) {
        return Err("client certificate is revoked");
    }
    let common_name = certificate
        .common_name
        .as_deref()
        .ok_or("client certificate has no common name")?;
    let device_id =
        DeviceId::parse(common_name).map_err(|_| "certificate common name is not a device id")?;
    if &**connect_info.client_id() != device_id.as_str() {
        return Err("client id differs from the certificate common name");
    }
    if let Some(last_will) = connect_info.last_will() {
        let topic = match last_will {
            LastWill::V3(will) => &will.topic,
            LastWill::V5(will) => &will.topic,
        };
        if inbound_device_topic(device_id.as_str(), topic).is_none() {
            return Err("last will topic not allowed");
        }
    }
    Ok(device_id)
}

/// Whether the client may subscribe to `topic_filter`: only its own notify
/// topic, spelled out (wildcards never match, shared subscriptions are off).
fn may_subscribe(client_id: &str, topic_filter: &str) -> bool {
    match parse_device_topic(topic_filter) {
        Some((device_id, topic)) => device_id.as_str() == client_id && topic.device_may_subscribe(),
        None => false,
    }
}

/// The device topic a publish of `client_id` on `topic` is, if the device may
/// publish there: its own `register` or `status`.
fn inbound_device_topic(client_id: &str, topic: &str) -> Option<(DeviceId, DeviceTopic)> {
    let (device_id, device_topic) = parse_device_topic(topic)?;
    (device_id.as_str() == client_id && device_topic.device_may_publish())
        .then_some((device_id, device_topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_limited_to_the_own_notify_topic() {
        let cases = [
            ("dev-1", "otter/devices/dev-1/notify", true),
            ("dev-1", "otter/devices/dev-1/chunk", true),
            ("dev-1", "otter/devices/dev-2/chunk", false),
            ("dev-1", "otter/devices/dev-1/ack", false),
            ("dev-1", "otter/devices/dev-2/notify", false),
            ("dev-1", "otter/devices/dev-1/status", false),
            ("dev-1", "otter/devices/dev-1/register", false),
            ("dev-1", "otter/devices/#", false),
            ("dev-1", "otter/devices/+/notify", false),
            ("dev-1", "otter/devices/dev-1/#", false),
            ("dev-1", "#", false),
            ("dev-1", "$share/group/otter/devices/dev-1/notify", false),
            ("otter server", "otter/devices/dev-1/notify", false),
        ];
        for (client_id, filter, expected) in cases {
            assert_eq!(
                may_subscribe(client_id, filter),
                expected,
                "{client_id} {filter}"
            );
        }
    }

    #[test]
    fn publishes_are_limited_to_the_own_register_and_status_topics() {
        let dev_1 = DeviceId::parse("dev-1").unwrap();
        let cases = [
            (
                "otter/devices/dev-1/register",
                Some((dev_1.clone(), DeviceTopic::Register)),
            ),
            (
                "otter/devices/dev-1/status",
                Some((dev_1.clone(), DeviceTopic::Status)),
            ),
            (
                "otter/devices/dev-1/ack",
                Some((dev_1.clone(), DeviceTopic::Ack)),
            ),
            ("otter/devices/dev-1/notify", None),
            ("otter/devices/dev-1/chunk", None),
            ("otter/devices/dev-2/ack", None),
            ("otter/devices/dev-2/status", None),
            ("otter/devices/dev-1/status/extra", None),
            ("other/topic", None),
        ];
        for (topic, expected) in cases {
            assert_eq!(inbound_device_topic("dev-1", topic), expected, "{topic}");
        }
    }
}
