//! Step 4: the one way the server creates a download link and publishes it
//! to a device, used both when a deployment is committed and when a device
//! registers with something still pending.
//!
//! [`Notifier::prepare_update`] reuses the device's current link for the
//! deployment while at least half of its lifetime remains, otherwise creates
//! one (`link.created`), and builds the `UpdateNotification`;
//! [`Notifier::record_delivery`] records `notification.sent` (with the
//! channel) and the move from pending to notified. [`Notifier::notify`]
//! publishes between the two, on the device's `notify` topic; the device
//! endpoint's poll (`device_http`) answers with the notification instead.
//!
//! `notify` serves each device in the mode it last registered: push-pull as
//! above, push with a push offer and no link (`crate::push`), pull not at
//! all (the device gets the update when it polls).

use std::sync::Arc;
use std::time::Duration;

use otter_proto::api::Channel;
use otter_proto::messages::{Mode, ServerMessage, UpdateNotification, encode};
use otter_proto::topics::{DeviceId, DeviceTopic};

use crate::broker::{BrokerError, MessageBus};
use crate::clock;
use crate::links::{self, LinkId, LinkSecret, LinkToken};
use crate::store::{Store, StoreError};

/// Why a notification could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing to the device: {0}")]
    Publish(BrokerError),
    #[error("release {0} of a deployment is missing")]
    MissingRelease(String),
}

/// What [`Notifier::notify`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyOutcome {
    /// Published; the device is (at least) notified.
    Sent,
    /// The device is past needing its link (downloaded or finished).
    NotNeeded,
    /// The deployment does not target the device.
    NotTargeted,
    /// The broker has no session for the device: nothing was queued. The
    /// device is notified when it registers.
    DeviceOffline,
    /// The device is in pull mode (or never registered): nothing is sent;
    /// it gets the update when it polls.
    AwaitingPoll,
}

/// Creates links and publishes notifications.
#[derive(Clone)]
pub struct Notifier {
    pub store: Store,
    pub bus: Arc<dyn MessageBus>,
    pub link_secret: Arc<LinkSecret>,
    /// `https://host:port` of the device endpoint.
    pub device_base_url: String,
    pub link_ttl: Duration,
    /// Chunk size announced in push offers (`crate::push`).
    pub push_chunk_size: u32,
}

/// A notification ready to go to a device, made by
/// [`Notifier::prepare_update`]: the link it carries exists and is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedUpdate {
    pub notification: UpdateNotification,
    pub link_id: LinkId,
}

/// What [`Notifier::prepare_update`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preparation {
    Ready(PreparedUpdate),
    /// The device is past needing its link (downloaded or finished).
    NotNeeded,
    /// The deployment does not target the device.
    NotTargeted,
}

impl Notifier {
    /// Tells `device_id` about `deployment_id` if it still needs it, in the
    /// mode the device last registered with: push-pull gets the link over
    /// MQTT, push gets a push offer (`crate::push`), pull (or a device never
    /// registered) gets nothing until it polls.
    pub async fn notify(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Result<NotifyOutcome, NotifyError> {
        match self.store.device(device_id).await?.and_then(|d| d.mode) {
            Some(Mode::PushPull) => {}
            Some(Mode::Push) => return self.offer_push(device_id, deployment_id).await,
            Some(Mode::Pull) | None => return Ok(NotifyOutcome::AwaitingPoll),
        }
        let prepared = match self.prepare_update(device_id, deployment_id).await? {
            Preparation::Ready(prepared) => prepared,
            Preparation::NotNeeded => return Ok(NotifyOutcome::NotNeeded),
            Preparation::NotTargeted => return Ok(NotifyOutcome::NotTargeted),
        };
        let message = ServerMessage::Update(prepared.notification.clone());
        match self
            .bus
            .publish(device_id, DeviceTopic::Notify, encode(&message))
            .await
        {
            Ok(()) => {}
            Err(BrokerError::NoSession { .. }) => {
                tracing::debug!(device = %device_id, deployment = deployment_id, "device offline; notification waits for its registration");
                return Ok(NotifyOutcome::DeviceOffline);
            }
            Err(error) => return Err(NotifyError::Publish(error)),
        }
        self.record_delivery(device_id, &prepared, Channel::Mqtt)
            .await?;
        Ok(NotifyOutcome::Sent)
    }

    /// Step 4 without the sending: the device's link for the deployment
    /// (reused while at least half of its lifetime remains, else created and
    /// audited `link.created`) and the notification carrying it. Both the
    /// MQTT publish above and the device endpoint's poll answer are made
    /// here, so there is one way to create a link.
    pub async fn prepare_update(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Result<Preparation, NotifyError> {
        let Some(target) = self
            .store
            .notification_target(deployment_id, device_id)
            .await?
        else {
            return Ok(Preparation::NotTargeted);
        };
        if !target.phase.needs_link() {
            return Ok(Preparation::NotNeeded);
        }
        let release = self
            .store
            .release(&target.release_id)
            .await?
            .ok_or_else(|| NotifyError::MissingRelease(target.release_id.clone()))?;

        let now = clock::now_unix();
        let ttl = i64::try_from(self.link_ttl.as_secs())
            .unwrap_or(i64::MAX)
            .max(1);
        let (link_id, expires_at) = match self
            .store
            .usable_link(deployment_id, device_id, now.saturating_add(ttl / 2))
            .await?
        {
            Some(link) => (link.link_id, link.expires_at),
            None => {
                let link_id = LinkId::random();
                let expires_at = now.saturating_add(ttl);
                self.store
                    .insert_link(
                        &link_id,
                        deployment_id,
                        device_id,
                        expires_at,
                        &clock::now_rfc3339(),
                    )
                    .await?;
                (link_id, expires_at)
            }
        };
        let token = LinkToken::sign(
            &self.link_secret,
            link_id,
            expires_at,
            device_id,
            deployment_id,
        );
        Ok(Preparation::Ready(PreparedUpdate {
            notification: UpdateNotification {
                deployment_id: deployment_id.to_owned(),
                release: target.release_id.clone(),
                manifest: release.info.manifest.clone(),
                link: links::download_url(&self.device_base_url, &token),
                link_expires_at: expires_at,
                data_key: release.data_key.clone(),
            },
            link_id,
        }))
    }

    /// Records that a prepared notification reached the device `via` a
    /// channel: the phase moves from pending to notified and
    /// `notification.sent` is audited.
    pub async fn record_delivery(
        &self,
        device_id: &DeviceId,
        prepared: &PreparedUpdate,
        via: Channel,
    ) -> Result<(), NotifyError> {
        let notification = &prepared.notification;
        self.store
            .record_notification(
                &notification.deployment_id,
                device_id,
                serde_json::json!({
                    "release": notification.release,
                    "link_id": prepared.link_id.to_hex(),
                    "link_expires_at": notification.link_expires_at,
                    "via": via.as_str(),
                }),
                &clock::now_rfc3339(),
            )
            .await?;
        crate::metrics::metrics().notification(via);
        tracing::info!(device = %device_id, deployment = %notification.deployment_id, release = %notification.release, via = via.as_str(), "notification sent");
        Ok(())
    }
}
