//! The rollout engine: the one task that owns device traffic. It consumes
//! the broker's events (registrations, status reports, connections) and the
//! API's requests to notify a new deployment's devices, and drives the
//! per-device phase machine of `otter_proto::deployment`.
//!
//! Notifications for a new deployment are queued and sent one device per
//! loop turn, interleaved with incoming events, so a large deployment does
//! not hold up devices' reports.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use otter_proto::deployment::{self, Outcome};
use otter_proto::messages::{
    DecodeError, ErrorMessage, Registration, ServerMessage, StatusReport, decode, encode,
};
use otter_proto::topics::{DeviceId, DeviceTopic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Actor, AuditEvent, AuditRecord};
use crate::broker::{BrokerEvent, MessageBus};
use crate::clock;
use crate::notify::{Notifier, NotifyError};
use crate::store::{AdvanceOutcome, Store, StoreError};

/// Capacity of the API → engine channel.
pub const COMMAND_CAPACITY: usize = 64;

/// Requests from the API to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineCommand {
    /// A deployment was committed: notify each of its devices (step 4).
    NotifyDeployment {
        deployment_id: String,
        device_ids: Vec<DeviceId>,
    },
}

/// Why handling one event failed (logged; the engine carries on).
#[derive(Debug, thiserror::Error)]
enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// The engine and what it drives.
pub struct Engine {
    store: Store,
    bus: Arc<dyn MessageBus>,
    notifier: Notifier,
    /// Devices still to notify, with their deployment.
    queue: VecDeque<(DeviceId, String)>,
}

impl Engine {
    pub fn new(notifier: Notifier) -> Self {
        Engine {
            store: notifier.store.clone(),
            bus: notifier.bus.clone(),
            notifier,
            queue: VecDeque::new(),
        }
    }

    /// Runs until `shutdown` is cancelled or both inputs are closed.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<BrokerEvent>,
        mut commands: mpsc::Receiver<EngineCommand>,
        shutdown: CancellationToken,
    ) {
        let mut events_open = true;
        let mut commands_open = true;
        while events_open || commands_open || !self.queue.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv(), if events_open => match event {
                    Some(event) => self.handle_event(event).await,
                    None => events_open = false,
                },
                command = commands.recv(), if commands_open => match command {
                    Some(EngineCommand::NotifyDeployment { deployment_id, device_ids }) => {
                        self.queue.extend(device_ids.into_iter().map(|d| (d, deployment_id.clone())));
                    }
                    None => commands_open = false,
                },
                _ = std::future::ready(()), if !self.queue.is_empty() => {
                    if let Some((device_id, deployment_id)) = self.queue.pop_front() {
                        self.notify(&device_id, &deployment_id).await;
                    }
                }
            }
        }
        tracing::debug!("engine stopped");
    }

    async fn notify(&self, device_id: &DeviceId, deployment_id: &str) {
        if let Err(error) = self.notifier.notify(device_id, deployment_id).await {
            tracing::error!(device = %device_id, deployment = deployment_id, %error, "notification failed");
        }
    }

    async fn handle_event(&self, event: BrokerEvent) {
        let result = match event {
            BrokerEvent::Message {
                device_id,
                topic,
                payload,
            } => match topic {
                DeviceTopic::Register => self.handle_registration(&device_id, &payload).await,
                DeviceTopic::Status => self.handle_status(&device_id, &payload).await,
                DeviceTopic::Ack => {
                    tracing::warn!(device = %device_id, "push mode is not implemented yet; ignoring an ack");
                    Ok(())
                }
                DeviceTopic::Notify | DeviceTopic::Chunk => {
                    tracing::warn!(device = %device_id, ?topic, "ignoring a device message on a server topic");
                    Ok(())
                }
            },
            BrokerEvent::Connected { device_id } | BrokerEvent::Disconnected { device_id } => self
                .store
                .touch_device(&device_id, &clock::now_rfc3339())
                .await
                .map_err(EngineError::from),
        };
        if let Err(error) = result {
            tracing::error!(%error, "handling a device event failed");
        }
    }

    /// Step 1, then step 4 for whatever is pending for the device.
    async fn handle_registration(
        &self,
        device_id: &DeviceId,
        payload: &Bytes,
    ) -> Result<(), EngineError> {
        let registration: Registration = match decode(payload) {
            Ok(registration) => registration,
            Err(error) => return self.reject(device_id, "register", &error).await,
        };
        if registration.protocol != otter_proto::PROTOCOL_VERSION {
            let error = DecodeError::Malformed(format!(
                "protocol version {} is not supported (expected {})",
                registration.protocol,
                otter_proto::PROTOCOL_VERSION
            ));
            return self.reject(device_id, "register", &error).await;
        }
        if !self
            .store
            .record_registration(device_id, &registration, &clock::now_rfc3339())
            .await?
        {
            return self
                .answer_error(
                    device_id,
                    "register",
                    "unknown-device",
                    "this device is not enrolled",
                )
                .await;
        }
        tracing::info!(device = %device_id, mode = registration.mode.as_str(), agent = %registration.agent_version, "device registered");
        for deployment_id in self.store.deployments_needing_link(device_id).await? {
            self.notify(device_id, &deployment_id).await;
        }
        Ok(())
    }

    /// Steps 5–8: a device reports progress on a deployment.
    async fn handle_status(
        &self,
        device_id: &DeviceId,
        payload: &Bytes,
    ) -> Result<(), EngineError> {
        let report: StatusReport = match decode(payload) {
            Ok(report) => report,
            Err(error) => return self.reject(device_id, "status", &error).await,
        };
        let Some(target) = self
            .store
            .notification_target(&report.deployment_id, device_id)
            .await?
        else {
            return self
                .answer_error(
                    device_id,
                    "status",
                    "unknown-deployment",
                    &format!(
                        "deployment {:?} does not target this device",
                        report.deployment_id
                    ),
                )
                .await;
        };
        match deployment::apply(target.phase, report.event) {
            Outcome::Advanced { to, revoke_link } => {
                let outcome = self
                    .store
                    .advance_target(
                        &report.deployment_id,
                        device_id,
                        target.phase,
                        to,
                        report.event,
                        report.detail.as_deref(),
                        revoke_link,
                        &clock::now_rfc3339(),
                    )
                    .await?;
                match outcome {
                    AdvanceOutcome::Advanced { revoked_links } => tracing::info!(
                        device = %device_id,
                        deployment = %report.deployment_id,
                        phase = to.as_str(),
                        revoked_links,
                        "device progressed"
                    ),
                    AdvanceOutcome::Stale => tracing::debug!(
                        device = %device_id,
                        deployment = %report.deployment_id,
                        "report raced another change; ignored"
                    ),
                }
            }
            Outcome::Ignored(reason) => tracing::debug!(
                device = %device_id,
                deployment = %report.deployment_id,
                event = report.event.as_str(),
                reason,
                "report ignored"
            ),
        }
        Ok(())
    }

    /// A message that is not a valid message: answer, audit, log.
    async fn reject(
        &self,
        device_id: &DeviceId,
        topic: &str,
        error: &DecodeError,
    ) -> Result<(), EngineError> {
        tracing::warn!(device = %device_id, topic, %error, "rejected a malformed device message");
        self.answer_error(device_id, topic, "malformed-message", &error.to_string())
            .await
    }

    /// Publishes `ServerMessage::Error` to the device and audits
    /// `message.rejected`.
    async fn answer_error(
        &self,
        device_id: &DeviceId,
        topic: &str,
        code: &str,
        message: &str,
    ) -> Result<(), EngineError> {
        let actor = Actor::device(device_id);
        let record = AuditRecord::new(&actor, AuditEvent::MessageRejected)
            .device(device_id.as_str())
            .details(serde_json::json!({ "topic": topic, "code": code, "reason": message }));
        self.store
            .append_audit(&clock::now_rfc3339(), &record)
            .await?;
        let answer = ServerMessage::Error(ErrorMessage {
            code: code.to_owned(),
            message: message.to_owned(),
        });
        if let Err(error) = self
            .bus
            .publish(device_id, DeviceTopic::Notify, encode(&answer))
            .await
        {
            tracing::debug!(device = %device_id, %error, "cannot answer the device");
        }
        Ok(())
    }
}
