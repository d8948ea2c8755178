//! The audit log: the one way the server records what happened (step 9).
//!
//! Every step of the push-pull process, every refused link and every
//! rejected device message becomes one row written by [`append`], inside the
//! transaction of the change it describes when there is one, so a change and
//! its record commit together or not at all. Rows are never updated or
//! deleted (the SQLite schema enforces this with triggers).

use otter_proto::api::ActorKind;
use otter_proto::messages::DeviceEvent;
use otter_proto::topics::DeviceId;
use sqlx::AnyConnection;
use tokio::sync::mpsc;

use crate::store::Store;

/// Who caused an audited event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub kind: ActorKind,
    /// Operator token name, device id or `server`.
    pub name: String,
}

impl Actor {
    pub fn operator(token_name: &str) -> Actor {
        Actor {
            kind: ActorKind::Operator,
            name: token_name.to_owned(),
        }
    }

    pub fn device(device_id: &DeviceId) -> Actor {
        Actor {
            kind: ActorKind::Device,
            name: device_id.to_string(),
        }
    }

    pub fn server() -> Actor {
        Actor {
            kind: ActorKind::Server,
            name: "server".to_owned(),
        }
    }

    fn kind_str(&self) -> &'static str {
        match self.kind {
            ActorKind::Operator => "operator",
            ActorKind::Device => "device",
            ActorKind::Server => "server",
        }
    }
}

/// Parses a stored actor kind.
pub(crate) fn parse_actor_kind(kind: &str) -> Option<ActorKind> {
    match kind {
        "operator" => Some(ActorKind::Operator),
        "device" => Some(ActorKind::Device),
        "server" => Some(ActorKind::Server),
        _ => None,
    }
}

/// The events the server records. Names are part of the audit's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    DeviceEnrolled,
    DeviceRegistered,
    ReleaseUploaded,
    DeploymentCreated,
    /// One per device a deployment targets (step 3).
    DeploymentTargeted,
    LinkCreated,
    /// A notification with a link was published to the device (step 4).
    NotificationSent,
    /// A device report advanced its phase (steps 5–8).
    Device(DeviceEvent),
    LinkRevoked,
    /// One per download request, with the range start.
    DownloadServed,
    /// A download link was refused (403/410), with the reason.
    LinkRefused,
    /// A device message could not be accepted.
    MessageRejected,
    /// Push mode: the offer was published, with the offset last
    /// acknowledged (step 4).
    PushOffered,
    /// Push mode: a transfer restarted from a non-zero acknowledged offset.
    PushResumed,
    /// Push mode: the device holds the whole artifact, with the bytes sent.
    PushCompleted,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::DeviceEnrolled => "device.enrolled",
            AuditEvent::DeviceRegistered => "device.registered",
            AuditEvent::ReleaseUploaded => "release.uploaded",
            AuditEvent::DeploymentCreated => "deployment.created",
            AuditEvent::DeploymentTargeted => "deployment.targeted",
            AuditEvent::LinkCreated => "link.created",
            AuditEvent::NotificationSent => "notification.sent",
            AuditEvent::Device(DeviceEvent::Received) => "device.received",
            AuditEvent::Device(DeviceEvent::Downloaded) => "device.downloaded",
            AuditEvent::Device(DeviceEvent::Installing) => "device.installing",
            AuditEvent::Device(DeviceEvent::Installed) => "device.installed",
            AuditEvent::Device(DeviceEvent::Failed) => "device.failed",
            AuditEvent::Device(DeviceEvent::RolledBack) => "device.rolled-back",
            AuditEvent::LinkRevoked => "link.revoked",
            AuditEvent::DownloadServed => "download.served",
            AuditEvent::LinkRefused => "link.refused",
            AuditEvent::MessageRejected => "message.rejected",
            AuditEvent::PushOffered => "push.offered",
            AuditEvent::PushResumed => "push.resumed",
            AuditEvent::PushCompleted => "push.completed",
        }
    }
}

/// One row to append.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub actor: &'a Actor,
    pub device_id: Option<&'a str>,
    pub deployment_id: Option<&'a str>,
    pub event: AuditEvent,
    pub details: serde_json::Value,
}

impl<'a> AuditRecord<'a> {
    pub fn new(actor: &'a Actor, event: AuditEvent) -> Self {
        AuditRecord {
            actor,
            device_id: None,
            deployment_id: None,
            event,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn device(mut self, device_id: &'a str) -> Self {
        self.device_id = Some(device_id);
        self
    }

    pub fn deployment(mut self, deployment_id: &'a str) -> Self {
        self.deployment_id = Some(deployment_id);
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// Appends one audit row on `connection` (a pooled connection or an open
/// transaction) and returns its sequence number.
pub async fn append(
    connection: &mut AnyConnection,
    at: &str,
    record: &AuditRecord<'_>,
) -> Result<i64, sqlx::Error> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO audit (at, actor_kind, actor, device_id, deployment_id, event, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
    )
    .bind(at)
    .bind(record.actor.kind_str())
    .bind(record.actor.name.as_str())
    .bind(record.device_id)
    .bind(record.deployment_id)
    .bind(record.event.as_str())
    .bind(record.details.to_string())
    .fetch_one(connection)
    .await?;
    tracing::debug!(
        seq,
        event = record.event.as_str(),
        actor = %record.actor.name,
        device = record.device_id,
        deployment = record.deployment_id,
        "audit"
    );
    Ok(seq)
}

/// Rows queued by [`AuditQueue::record`] written per transaction at most.
pub const QUEUE_BATCH: usize = 512;
/// Rows the queue holds before [`AuditQueue::record`] waits for room.
const QUEUE_CAPACITY: usize = 8192;

/// An owned row, for [`AuditQueue`].
#[derive(Debug, Clone)]
pub struct QueuedAudit {
    pub at: String,
    pub actor: Actor,
    pub device_id: Option<String>,
    pub deployment_id: Option<String>,
    pub event: AuditEvent,
    pub details: serde_json::Value,
}

impl QueuedAudit {
    pub fn of(at: String, record: &AuditRecord<'_>) -> QueuedAudit {
        QueuedAudit {
            at,
            actor: record.actor.clone(),
            device_id: record.device_id.map(str::to_owned),
            deployment_id: record.deployment_id.map(str::to_owned),
            event: record.event,
            details: record.details.clone(),
        }
    }

    pub fn record(&self) -> AuditRecord<'_> {
        AuditRecord {
            actor: &self.actor,
            device_id: self.device_id.as_deref(),
            deployment_id: self.deployment_id.as_deref(),
            event: self.event,
            details: self.details.clone(),
        }
    }
}

/// Audit rows of events that change no other state (a download served, a
/// link refused), written in the background in batches by
/// [`write_queued`]: one transaction for up to [`QUEUE_BATCH`] rows instead
/// of one each, and the request that caused them never waits for the
/// database's write lock. A row keeps the time of its event; it is in the
/// database a few milliseconds later, and lost only if the process dies in
/// between (a graceful stop writes everything queued).
#[derive(Debug, Clone)]
pub struct AuditQueue {
    sender: mpsc::Sender<QueuedAudit>,
}

impl AuditQueue {
    /// The queue and its receiving end, for [`write_queued`].
    pub fn new() -> (AuditQueue, mpsc::Receiver<QueuedAudit>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (AuditQueue { sender }, receiver)
    }

    /// Queues a row stamped `at`; waits only if the queue is full.
    pub async fn record(&self, at: String, record: &AuditRecord<'_>) {
        if self.sender.send(QueuedAudit::of(at, record)).await.is_err() {
            tracing::error!(
                event = record.event.as_str(),
                device = record.device_id,
                "audit writer stopped; row lost"
            );
        }
    }
}

/// Writes queued rows until every [`AuditQueue`] is dropped and the queue
/// is empty.
pub async fn write_queued(store: Store, mut receiver: mpsc::Receiver<QueuedAudit>) {
    let mut batch = Vec::with_capacity(QUEUE_BATCH);
    while receiver.recv_many(&mut batch, QUEUE_BATCH).await > 0 {
        if let Err(error) = store.append_audits(&batch).await {
            tracing::error!(%error, rows = batch.len(), "cannot write queued audit rows");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_event_names() {
        let expected = [
            (DeviceEvent::Received, "device.received"),
            (DeviceEvent::Downloaded, "device.downloaded"),
            (DeviceEvent::Installing, "device.installing"),
            (DeviceEvent::Installed, "device.installed"),
            (DeviceEvent::Failed, "device.failed"),
            (DeviceEvent::RolledBack, "device.rolled-back"),
        ];
        for (event, name) in expected {
            assert_eq!(AuditEvent::Device(event).as_str(), name);
            assert_eq!(format!("device.{}", event.as_str()), name);
        }
    }

    #[test]
    fn actor_kinds_round_trip() {
        for actor in [
            Actor::operator("admin"),
            Actor::device(&DeviceId::parse("d1").unwrap()),
            Actor::server(),
        ] {
            assert_eq!(parse_actor_kind(actor.kind_str()), Some(actor.kind));
        }
    }
}
