//! The rollout engine: the one task that owns device traffic. It consumes
//! the broker's events (registrations, status reports, connections) and the
//! API's requests to notify a new deployment's devices, and drives the
//! per-device phase machine of `otter_proto::deployment`.
//!
//! Notifications for a new deployment are queued and sent in batches of
//! [`NOTIFY_BATCH`] devices, one batch per loop turn
//! ([`Notifier::notify_batch`]: one read, one transaction of links, the
//! publishes, one transaction of deliveries), with the release read once per
//! deployment. The loop prefers, in order: commands, pending notification
//! batches, push deadlines, device events; so a deployment reaches its whole
//! fleet before the first devices' reports are handled (they wait in the
//! channel, a few seconds at most for a very large fleet).
//!
//! Device events are taken up to [`EVENT_BATCH`] at a time (what is already
//! queued); consecutive status reports among them are applied in one
//! transaction ([`apply_reports`]), in arrival order, and any other event is
//! handled after the reports before it, so each device's events keep their
//! order.
//!
//! Push mode's transfers ([`crate::push::Pusher`]) are owned here too:
//! acknowledgements and disconnections move them, and the loop wakes at
//! their earliest resend deadline.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use otter_proto::api::Channel;
use otter_proto::deployment;
use otter_proto::messages::{
    DecodeError, ErrorMessage, PushAck, Registration, ServerMessage, StatusReport, decode, encode,
};
use otter_proto::topics::{DeviceId, DeviceTopic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Actor, AuditEvent, AuditRecord};
use crate::broker::{BrokerEvent, MessageBus};
use crate::clock;
use crate::notify::{Notifier, NotifyError, UpdateTemplate};
use crate::push::{PushError, Pusher};
use crate::store::{RegistrationOutcome, ReportApplied, ReportToApply, Store, StoreError};

/// Devices notified per loop turn. Large enough that a deployment costs a
/// few transactions, small enough that a batch (a few tens of milliseconds)
/// does not hold up reports.
pub const NOTIFY_BATCH: usize = 500;

/// Capacity of the API → engine channel.
pub const COMMAND_CAPACITY: usize = 64;

/// Most device events taken from the channel per loop turn; the status
/// reports among them are applied in one transaction.
pub const EVENT_BATCH: usize = 256;

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
    #[error(transparent)]
    Push(#[from] PushError),
}

/// A committed deployment's devices still to notify.
struct PendingDeployment {
    deployment_id: String,
    device_ids: VecDeque<DeviceId>,
    /// Read at the first batch, then shared by every notification.
    template: Option<UpdateTemplate>,
}

/// The engine and what it drives.
pub struct Engine {
    store: Store,
    bus: Arc<dyn MessageBus>,
    notifier: Notifier,
    /// Deployments with devices still to notify, oldest first.
    queue: VecDeque<PendingDeployment>,
    /// Push transfers in progress.
    push: Pusher,
}

impl Engine {
    pub fn new(notifier: Notifier, push: Pusher) -> Self {
        Engine {
            store: notifier.store.clone(),
            bus: notifier.bus.clone(),
            notifier,
            queue: VecDeque::new(),
            push,
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
            // In this order: a deployment's notifications all go out before
            // the reports they cause are handled (the devices notified first
            // would otherwise hold up the rest of the fleet: on a 9,500-device
            // deployment, notifying the last device took 28 s instead of
            // about one); reports wait in the channel meanwhile.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = commands.recv(), if commands_open => match command {
                    Some(EngineCommand::NotifyDeployment { deployment_id, device_ids }) => {
                        self.queue.push_back(PendingDeployment {
                            deployment_id,
                            device_ids: device_ids.into(),
                            template: None,
                        });
                    }
                    None => commands_open = false,
                },
                _ = std::future::ready(()), if !self.queue.is_empty() => {
                    self.notify_next_batch().await;
                }
                () = sleep_until(self.push.next_deadline()) => {
                    self.push.on_deadline(std::time::Instant::now()).await;
                }
                event = events.recv(), if events_open => match event {
                    Some(event) => {
                        // What else is already queued goes with it.
                        let mut batch = vec![event];
                        while batch.len() < EVENT_BATCH {
                            match events.try_recv() {
                                Ok(event) => batch.push(event),
                                Err(_) => break,
                            }
                        }
                        self.handle_events(batch).await;
                    }
                    None => events_open = false,
                },
            }
        }
        tracing::debug!("engine stopped");
    }

    /// Notifies the next [`NOTIFY_BATCH`] devices of the oldest pending
    /// deployment, dropping it from the queue once all are done.
    async fn notify_next_batch(&mut self) {
        let Some(pending) = self.queue.front_mut() else {
            return;
        };
        if pending.template.is_none() {
            match self.notifier.update_template(&pending.deployment_id).await {
                Ok(Some(template)) => pending.template = Some(template),
                Ok(None) => {
                    tracing::error!(deployment = %pending.deployment_id, "deployment to notify is missing");
                    self.queue.pop_front();
                    return;
                }
                Err(error) => {
                    tracing::error!(deployment = %pending.deployment_id, %error, "notification failed; devices are notified when they register");
                    self.queue.pop_front();
                    return;
                }
            }
        }
        let take = pending.device_ids.len().min(NOTIFY_BATCH);
        let batch: Vec<DeviceId> = pending.device_ids.drain(..take).collect();
        if let Some(template) = &pending.template {
            match self.notifier.notify_batch(template, &batch).await {
                Ok(outcomes) => {
                    for (device_id, outcome) in outcomes {
                        if let Err(error) = outcome {
                            tracing::error!(device = %device_id, deployment = %template.deployment_id, %error, "notification failed");
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(deployment = %template.deployment_id, devices = batch.len(), %error, "notification batch failed");
                }
            }
        }
        if pending.device_ids.is_empty() {
            self.queue.pop_front();
        }
    }

    async fn notify(&self, device_id: &DeviceId, deployment_id: &str) {
        if let Err(error) = self.notifier.notify(device_id, deployment_id).await {
            tracing::error!(device = %device_id, deployment = deployment_id, %error, "notification failed");
        }
    }

    async fn handle_event(&mut self, event: BrokerEvent) {
        let result = match event {
            BrokerEvent::Message {
                device_id,
                topic,
                payload,
            } => match topic {
                DeviceTopic::Register => self.handle_registration(&device_id, &payload).await,
                DeviceTopic::Status => match decode::<StatusReport>(&payload) {
                    Ok(report) => {
                        self.apply_status_reports(vec![(device_id, report)]).await;
                        Ok(())
                    }
                    Err(error) => self.reject(&device_id, "status", &error).await,
                },
                DeviceTopic::Ack => self.handle_push_ack(&device_id, &payload).await,
                DeviceTopic::Notify | DeviceTopic::Chunk => {
                    tracing::warn!(device = %device_id, ?topic, "ignoring a device message on a server topic");
                    Ok(())
                }
            },
            BrokerEvent::Connected { device_id } => {
                self.push.on_connect(&device_id);
                self.store
                    .touch_device(&device_id, &clock::now_rfc3339())
                    .await
                    .map_err(EngineError::from)
            }
            BrokerEvent::Disconnected { device_id } => {
                self.push.on_disconnect(&device_id);
                self.store
                    .touch_device(&device_id, &clock::now_rfc3339())
                    .await
                    .map_err(EngineError::from)
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "handling a device event failed");
        }
    }

    /// Push mode: the device acknowledged bytes it durably holds.
    async fn handle_push_ack(
        &mut self,
        device_id: &DeviceId,
        payload: &Bytes,
    ) -> Result<(), EngineError> {
        let ack: PushAck = match decode(payload) {
            Ok(ack) => ack,
            Err(error) => return self.reject(device_id, "ack", &error).await,
        };
        self.push
            .on_ack(device_id, &ack, std::time::Instant::now())
            .await?;
        Ok(())
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
        if let Some(key) = &registration.encryption_key
            && let Err(reason) = crate::notify::check_encryption_key(key)
        {
            let error = DecodeError::Malformed(reason);
            return self.reject(device_id, "register", &error).await;
        }
        // Every MQTT registration is stored and audited, so the last-seen
        // threshold (for unchanged polls) does not apply.
        let now = clock::now_rfc3339();
        let outcome = self
            .store
            .record_registration(device_id, &registration, Channel::Mqtt, &now, &now)
            .await?;
        if outcome == RegistrationOutcome::UnknownDevice {
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

    /// Handles queued events in order, except that consecutive status
    /// reports are applied together ([`apply_reports`]); the batch is
    /// applied before any other event, so each device's events keep their
    /// order.
    async fn handle_events(&mut self, events: Vec<BrokerEvent>) {
        let mut reports: Vec<(DeviceId, StatusReport)> = Vec::new();
        for event in events {
            match event {
                BrokerEvent::Message {
                    device_id,
                    topic: DeviceTopic::Status,
                    payload,
                } => match decode::<StatusReport>(&payload) {
                    Ok(report) => reports.push((device_id, report)),
                    Err(error) => {
                        // A malformed report changes no phase: answered now.
                        if let Err(error) = self.reject(&device_id, "status", &error).await {
                            tracing::error!(%error, "handling a device event failed");
                        }
                    }
                },
                other => {
                    self.apply_status_reports(std::mem::take(&mut reports))
                        .await;
                    self.handle_event(other).await;
                }
            }
        }
        self.apply_status_reports(reports).await;
    }

    /// Steps 5–8: devices report progress on deployments, applied in one
    /// transaction; a report on a deployment that does not target its
    /// device is answered with an error.
    async fn apply_status_reports(&self, reports: Vec<(DeviceId, StatusReport)>) {
        if reports.is_empty() {
            return;
        }
        let borrowed: Vec<(&DeviceId, &StatusReport)> = reports
            .iter()
            .map(|(device_id, report)| (device_id, report))
            .collect();
        let outcomes = match apply_reports(&self.store, &borrowed).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            // The batch was rolled back as a whole: apply the reports one by
            // one, so one failure costs only its own report.
            Err(error) if reports.len() > 1 => {
                tracing::warn!(reports = reports.len(), %error, "applying a batch of status reports failed; applying them one by one");
                let mut outcomes = Vec::with_capacity(reports.len());
                for (device_id, report) in &reports {
                    outcomes.push(apply_report(&self.store, device_id, report).await);
                }
                outcomes
            }
            Err(error) => vec![Err(error)],
        };
        for ((device_id, report), outcome) in reports.iter().zip(outcomes) {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::error!(device = %device_id, deployment = %report.deployment_id, %error, "applying a status report failed");
                    continue;
                }
            };
            if outcome == ReportOutcome::UnknownDeployment
                && let Err(error) = self
                    .answer_error(
                        device_id,
                        "status",
                        "unknown-deployment",
                        &unknown_deployment_message(report),
                    )
                    .await
            {
                tracing::error!(%error, "handling a device event failed");
            }
        }
    }

    /// A message that is not a valid message: answer, audit, log.
    async fn reject(
        &self,
        device_id: &DeviceId,
        topic: &str,
        error: &DecodeError,
    ) -> Result<(), EngineError> {
        tracing::warn!(device = %device_id, topic, %error, "rejected a malformed device message");
        // The same codes as the device endpoint answers over HTTPS.
        let code = match error {
            DecodeError::TooLarge(_) => "message-too-large",
            DecodeError::Malformed(_) => "malformed-message",
        };
        self.answer_error(device_id, topic, code, &error.to_string())
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
        audit_rejection(&self.store, device_id, topic, code, message).await?;
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

/// What [`apply_report`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The phase moved (and the link was revoked when the step needs it).
    Applied,
    /// The phase machine ignored the event (a repeat, or out of order).
    Ignored,
    /// The deployment does not target the device.
    UnknownDeployment,
}

/// Steps 5–8 for one report: [`apply_reports`] with a batch of one. Used by
/// `device_http`'s `POST /v1/status`.
pub async fn apply_report(
    store: &Store,
    device_id: &DeviceId,
    report: &StatusReport,
) -> Result<ReportOutcome, StoreError> {
    let outcomes = apply_reports(store, &[(device_id, report)]).await?;
    // `apply_reports` answers every report it was given.
    Ok(outcomes.first().copied().unwrap_or(ReportOutcome::Ignored))
}

/// Steps 5–8, the one handling of devices' status reports, whether they
/// came over MQTT (the engine task, a batch of what was queued) or HTTPS
/// (`device_http`'s `POST /v1/status`, a batch of one): phase machine, audit
/// row and link revocation, for the whole batch in one transaction
/// ([`Store::apply_reports`]). Reports are applied in order, each seeing the
/// effect of the earlier ones, so a device's reports keep their order.
/// Returns one outcome per report, in order.
///
/// Safe to call concurrently: the transaction holds the write lock, and each
/// change is guarded by the phase it was computed from.
pub async fn apply_reports(
    store: &Store,
    reports: &[(&DeviceId, &StatusReport)],
) -> Result<Vec<ReportOutcome>, StoreError> {
    let to_apply: Vec<ReportToApply<'_>> = reports
        .iter()
        .map(|(device_id, report)| ReportToApply {
            deployment_id: &report.deployment_id,
            device_id,
            event: report.event,
            detail: report.detail.as_deref(),
        })
        .collect();
    let applied = store
        .apply_reports(&to_apply, &clock::now_rfc3339(), deployment::apply)
        .await?;
    Ok(to_apply
        .iter()
        .zip(applied)
        .map(|(report, applied)| match applied {
            ReportApplied::Advanced {
                to, revoked_links, ..
            } => {
                tracing::info!(
                    device = %report.device_id,
                    deployment = %report.deployment_id,
                    phase = to.as_str(),
                    revoked_links,
                    "device progressed"
                );
                ReportOutcome::Applied
            }
            ReportApplied::Ignored { reason, .. } => {
                tracing::debug!(
                    device = %report.device_id,
                    deployment = %report.deployment_id,
                    event = report.event.as_str(),
                    reason,
                    "report ignored"
                );
                ReportOutcome::Ignored
            }
            ReportApplied::UnknownDeployment => ReportOutcome::UnknownDeployment,
        })
        .collect())
}

/// The message answering a report on a deployment that does not target the
/// device.
pub fn unknown_deployment_message(report: &StatusReport) -> String {
    format!(
        "deployment {:?} does not target this device",
        report.deployment_id
    )
}

/// Audits `message.rejected` for a device message the server refused; `topic`
/// names where it came from (an MQTT topic, or `poll` / `status` over HTTPS).
pub async fn audit_rejection(
    store: &Store,
    device_id: &DeviceId,
    topic: &str,
    code: &str,
    message: &str,
) -> Result<(), StoreError> {
    let actor = Actor::device(device_id);
    let record = AuditRecord::new(&actor, AuditEvent::MessageRejected)
        .device(device_id.as_str())
        .details(serde_json::json!({ "topic": topic, "code": code, "reason": message }));
    store.append_audit(&clock::now_rfc3339(), &record).await?;
    Ok(())
}

/// Completes at `deadline`; never when there is none.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}
