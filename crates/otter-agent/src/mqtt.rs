//! The MQTT session with the update service (steps 1 and 5, and the reports
//! of steps 6–8).
//!
//! [`MqttSession::start`] creates a rumqttc client over TLS (client
//! certificate, client id = device id, persistent session, keepalive 30 s)
//! and spawns the task that polls its event loop. That task owns the
//! connection: it reconnects with backoff and jitter after any error,
//! subscribes to the device's `notify` and `chunk` topics after every
//! CONNACK, decodes what arrives on `notify`, passes the binary push chunks
//! of `chunk` through untouched, and hands [`MqttEvent`]s to the agent over
//! a bounded channel (so the broker never has more than the server's push
//! window waiting for the agent).
//!
//! The agent publishes with [`MqttSession::publish_registration`],
//! [`MqttSession::publish_report`] and [`MqttSession::publish_push_ack`].
//! All queue without waiting
//! (`try_publish`): the agent's loop must never wait on the event-loop task,
//! which may itself be waiting for the agent to take an event. A report that
//! does not fit the queue is logged; the agent re-sends its latest report
//! after every connection anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use otter_proto::messages::{PushAck, Registration, ServerMessage, StatusReport, decode, encode};
use otter_proto::topics::{DeviceId, DeviceTopic, device_topic};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::MqttEndpoint;

/// MQTT keepalive interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Time allowed for TCP + TLS + CONNACK.
pub const CONNECT_TIMEOUT_SECONDS: u64 = 30;
/// Reconnect backoff bounds.
pub const RECONNECT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Requests (publishes, subscribes) queued for the event loop.
const REQUEST_CAPACITY: usize = 64;
/// Events queued for the agent.
const EVENT_CAPACITY: usize = 16;
/// Incoming packets larger than this break the connection; up to it, an
/// oversized message is still read, acknowledged and refused by `decode`,
/// so the broker does not redeliver it forever. A push chunk (up to
/// `MAX_CHUNK_BYTES` of data, a header of at most 265 bytes, the topic and
/// the MQTT framing) must fit.
const MAX_INCOMING_PACKET: usize = {
    let chunk_packet = otter_proto::push::MAX_CHUNK_BYTES + 4096;
    let message_packet = 4 * otter_proto::MAX_MESSAGE_BYTES;
    if chunk_packet > message_packet {
        chunk_packet
    } else {
        message_packet
    }
};
const MAX_OUTGOING_PACKET: usize = otter_proto::MAX_MESSAGE_BYTES + 1024;

/// What the session tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttEvent {
    /// A CONNACK arrived (first connection or a reconnection): time to
    /// register and repeat the latest report.
    Connected,
    /// A well-formed message on the device's `notify` topic.
    Message(ServerMessage),
    /// A payload on the device's `chunk` topic: a binary push chunk, still
    /// to be decoded (`otter_proto::push::PushChunk::decode`).
    Chunk(Bytes),
    /// Pull mode: a poll was answered, so the server has heard the
    /// registration. `Connected` comes before the first poll (it makes the
    /// agent register), so this is the event that proves the server is
    /// reachable, e.g. for a new agent on trial after a self-update.
    ServerAnswered,
}

/// Why a message could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot queue MQTT publish on {topic}: {reason}")]
    Queue { topic: String, reason: String },
}

/// Where the agent sends what the server must hear. [`MqttSession`] is the
/// real one; tests record the messages instead.
pub trait Uplink: Send + Sync {
    /// Queues a registration (step 1) for the `register` topic.
    fn register(&self, registration: &Registration) -> Result<(), MqttError>;
    /// Queues a status report (steps 5–8) for the `status` topic.
    fn report(&self, report: &StatusReport) -> Result<(), MqttError>;
    /// Push mode: queues an acknowledgement for the `ack` topic. Only an
    /// MQTT session carries them; other uplinks refuse.
    fn push_ack(&self, ack: &PushAck) -> Result<(), MqttError> {
        Err(MqttError::Queue {
            topic: "ack".to_owned(),
            reason: format!(
                "this uplink cannot carry push acknowledgements (deployment {})",
                ack.deployment_id
            ),
        })
    }
}

impl Uplink for MqttSession {
    fn register(&self, registration: &Registration) -> Result<(), MqttError> {
        self.publish_registration(registration)
    }

    fn report(&self, report: &StatusReport) -> Result<(), MqttError> {
        self.publish_report(report)
    }

    fn push_ack(&self, ack: &PushAck) -> Result<(), MqttError> {
        self.publish_push_ack(ack)
    }
}

/// The publishing half of the session; the event loop runs in its own task.
#[derive(Debug, Clone)]
pub struct MqttSession {
    client: AsyncClient,
    register_topic: String,
    status_topic: String,
    ack_topic: String,
    delivery: Arc<Delivery>,
}

/// How many QoS 1 publishes the session queued and how many the broker
/// acknowledged, so [`MqttSession::close`] can wait for the last reports.
#[derive(Debug, Default)]
struct Delivery {
    queued: AtomicU64,
    acknowledged: AtomicU64,
    progress: Notify,
}

impl Delivery {
    fn unacknowledged(&self) -> u64 {
        self.queued
            .load(Ordering::Acquire)
            .saturating_sub(self.acknowledged.load(Ordering::Acquire))
    }
}

impl MqttSession {
    /// Starts the connection task. `tls` should come from
    /// [`crate::tls::DeviceTls::mqtt_config`].
    pub fn start(
        device_id: &DeviceId,
        endpoint: &MqttEndpoint,
        tls: rustls::ClientConfig,
    ) -> (MqttSession, mpsc::Receiver<MqttEvent>, JoinHandle<()>) {
        let mut options = MqttOptions::new(device_id.as_str(), &endpoint.host, endpoint.port);
        options
            .set_clean_session(false)
            .set_keep_alive(KEEP_ALIVE)
            .set_inflight(10)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut event_loop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECONDS);
        event_loop.set_network_options(network);

        let (events, receiver) = mpsc::channel(EVENT_CAPACITY);
        let topics = InboundTopics {
            notify: device_topic(device_id, DeviceTopic::Notify),
            chunk: device_topic(device_id, DeviceTopic::Chunk),
        };
        let delivery = Arc::new(Delivery::default());
        let task = tokio::spawn(drive(
            event_loop,
            client.clone(),
            topics,
            events,
            Arc::clone(&delivery),
        ));
        let session = MqttSession {
            client,
            register_topic: device_topic(device_id, DeviceTopic::Register),
            status_topic: device_topic(device_id, DeviceTopic::Status),
            ack_topic: device_topic(device_id, DeviceTopic::Ack),
            delivery,
        };
        (session, receiver, task)
    }

    pub fn publish_registration(&self, registration: &Registration) -> Result<(), MqttError> {
        self.publish(&self.register_topic, encode(registration))
    }

    pub fn publish_report(&self, report: &StatusReport) -> Result<(), MqttError> {
        tracing::info!(
            deployment = %report.deployment_id,
            event = report.event.as_str(),
            detail = report.detail.as_deref().unwrap_or(""),
            "reporting"
        );
        self.publish(&self.status_topic, encode(report))
    }

    /// Push mode: tells the server how many bytes of the artifact are
    /// durably written.
    pub fn publish_push_ack(&self, ack: &PushAck) -> Result<(), MqttError> {
        tracing::debug!(deployment = %ack.deployment_id, offset = ack.offset, "acknowledging pushed bytes");
        self.publish(&self.ack_topic, encode(ack))
    }

    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), MqttError> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| MqttError::Queue {
                topic: topic.to_owned(),
                reason: e.to_string(),
            })?;
        self.delivery.queued.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Waits (at most `grace`) until the broker has acknowledged every
    /// message queued so far, then asks the event loop to send DISCONNECT;
    /// the task ends once it has.
    ///
    /// The wait matters more than it looks: the agent usually exits right
    /// after (a restart, a self-update hand-over), and a socket closed with
    /// unread bytes in it (a PUBACK on its way) is reset, not closed, and a
    /// peer that gets a reset may drop what it had received but not yet
    /// read, such as the last status report.
    pub async fn close(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // Registered before the check, so an acknowledgement in between
            // still wakes us.
            let progress = self.delivery.progress.notified();
            let pending = self.delivery.unacknowledged();
            if pending == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                tracing::warn!(
                    unacknowledged = pending,
                    "closing the MQTT session before the broker acknowledged every message"
                );
                break;
            }
        }
        if let Err(e) = self.client.try_disconnect() {
            tracing::debug!(error = %e, "cannot queue MQTT disconnect");
        }
    }
}

/// The topics the device subscribes to.
struct InboundTopics {
    notify: String,
    chunk: String,
}

/// Polls the event loop forever (until DISCONNECT is sent or the agent is
/// gone), reconnecting with backoff.
async fn drive(
    mut event_loop: EventLoop,
    client: AsyncClient,
    topics: InboundTopics,
    events: mpsc::Sender<MqttEvent>,
    delivery: Arc<Delivery>,
) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL_BACKOFF, RECONNECT_MAX_BACKOFF);
    loop {
        let event = match event_loop.poll().await {
            Ok(event) => event,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "MQTT connection failed; reconnecting");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let forward = match event {
            Event::Incoming(Packet::ConnAck(connack)) => {
                backoff.reset();
                tracing::info!(session_present = connack.session_present, "MQTT connected");
                // Subscribing again on a resumed session is harmless and
                // covers a broker that lost the session.
                for topic in [&topics.notify, &topics.chunk] {
                    if let Err(e) = client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, %topic, "cannot queue a subscription");
                    }
                }
                Some(MqttEvent::Connected)
            }
            Event::Incoming(Packet::PubAck(_)) => {
                delivery.acknowledged.fetch_add(1, Ordering::AcqRel);
                delivery.progress.notify_waiters();
                None
            }
            Event::Incoming(Packet::SubAck(suback)) => {
                if suback
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure))
                {
                    tracing::error!(packet = suback.pkid, "broker refused a subscription");
                }
                None
            }
            Event::Incoming(Packet::Publish(publish)) if publish.topic == topics.chunk => {
                Some(MqttEvent::Chunk(publish.payload))
            }
            Event::Incoming(Packet::Publish(publish)) if publish.topic == topics.notify => {
                match decode::<ServerMessage>(&publish.payload) {
                    Ok(message) => Some(MqttEvent::Message(message)),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a malformed notification");
                        None
                    }
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                tracing::warn!(topic = %publish.topic, "ignoring a message on an unexpected topic");
                None
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                tracing::info!("MQTT disconnected");
                return;
            }
            _ => None,
        };
        if let Some(event) = forward
            && events.send(event).await.is_err()
        {
            // The agent stopped listening: nothing left to do.
            return;
        }
    }
}
