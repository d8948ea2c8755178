//! Step 4: the one way the server creates a download link and publishes it
//! to a device, used both when a deployment is committed and when a device
//! registers with something still pending.
//!
//! [`Notifier::notify`] reuses the device's current link for the deployment
//! while at least half of its lifetime remains, otherwise creates one
//! (`link.created`), publishes `ServerMessage::Update` on the device's
//! `notify` topic, and then records `notification.sent` and the move from
//! pending to notified.

use std::sync::Arc;
use std::time::Duration;

use otter_proto::messages::{ServerMessage, UpdateNotification, encode};
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
}

impl Notifier {
    /// Notifies `device_id` of `deployment_id` if it still needs its link.
    pub async fn notify(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Result<NotifyOutcome, NotifyError> {
        let Some(target) = self
            .store
            .notification_target(deployment_id, device_id)
            .await?
        else {
            return Ok(NotifyOutcome::NotTargeted);
        };
        if !target.phase.needs_link() {
            return Ok(NotifyOutcome::NotNeeded);
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
        let message = ServerMessage::Update(UpdateNotification {
            deployment_id: deployment_id.to_owned(),
            release: target.release_id.clone(),
            manifest: release.info.manifest.clone(),
            link: links::download_url(&self.device_base_url, &token),
            link_expires_at: expires_at,
            data_key: release.data_key.clone(),
        });
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
        self.store
            .record_notification(
                deployment_id,
                device_id,
                serde_json::json!({
                    "release": target.release_id,
                    "link_id": link_id.to_hex(),
                    "link_expires_at": expires_at,
                }),
                &clock::now_rfc3339(),
            )
            .await?;
        tracing::info!(device = %device_id, deployment = deployment_id, release = %target.release_id, "notification sent");
        Ok(NotifyOutcome::Sent)
    }
}
