//! [`AuditQueue`]: audit rows written in the background, in batches.

use super::*;

/// Rows queued by [`AuditQueue::record`] written per transaction at most.
pub const QUEUE_BATCH: usize = 512;
/// Rows the queue holds before [`AuditQueue::record`] waits for room.
pub(super) const QUEUE_CAPACITY: usize = 8192;

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

// ---------------------------------------------------------------------------
// The hash chain.
