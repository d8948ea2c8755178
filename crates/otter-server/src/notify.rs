//! Step 4: the one way the server creates a download link and publishes it
//! to a device, used when a deployment is committed, when a device
//! registers with something still pending, and in the answer to a poll.
//!
//! The work is done in batches of one deployment's devices, so a large
//! deployment costs a few transactions rather than several per device:
//! [`Notifier::update_template`] reads the release once per deployment;
//! [`Notifier::notify_batch`] reads the devices' modes and phases in one
//! query, prepares the links of those that need one (reused while at least
//! half of their lifetime remains, otherwise created with `link.created`,
//! all in one transaction), publishes each notification on the device's
//! `notify` topic, then records every `notification.sent` (with the
//! channel) and move from pending to notified in one more transaction. The
//! single-device functions ([`Notifier::notify`], [`Notifier::prepare_update`],
//! [`Notifier::record_delivery`]) are batches of one of the same code; the
//! device endpoint's poll (`device_http`) answers with the notification
//! instead of publishing it.
//!
//! Each device is served in the mode it last registered: push-pull as
//! above, push with a push offer and no link (`crate::push`), pull not at
//! all (the device gets the update when it polls).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use otter_proto::api::Channel;
use otter_proto::manifest::SignedManifest;
use otter_proto::messages::{Mode, ServerMessage, UpdateNotification, encode};
use otter_proto::topics::{DeviceId, DeviceTopic};

use crate::broker::{BrokerError, MessageBus};
use crate::clock;
use crate::links::{self, LinkId, LinkSecret, LinkToken};
use crate::store::{NewLink, Store, StoreError};

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

/// What every notification of one deployment shares, read once per
/// deployment by [`Notifier::update_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateTemplate {
    pub deployment_id: String,
    pub release_id: String,
    pub manifest: SignedManifest,
    pub data_key: String,
    /// The deployment allows a downgrade; every notification says so.
    pub allow_downgrade: bool,
}

/// One device's result in [`Notifier::notify_batch`]: a publish failure
/// concerns that device only.
pub type DeviceOutcome = (DeviceId, Result<NotifyOutcome, NotifyError>);

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
    /// The release data of `deployment_id`'s notifications, or `None` for
    /// an unknown deployment.
    pub async fn update_template(
        &self,
        deployment_id: &str,
    ) -> Result<Option<UpdateTemplate>, NotifyError> {
        let Some(found) = self.store.release_of_deployment(deployment_id).await? else {
            return Ok(None);
        };
        Ok(Some(UpdateTemplate {
            deployment_id: deployment_id.to_owned(),
            release_id: found.release.info.id,
            manifest: found.release.info.manifest,
            data_key: found.release.data_key,
            allow_downgrade: found.allow_downgrade,
        }))
    }

    /// Tells `device_id` about `deployment_id` if it still needs it: a batch
    /// of one of [`Notifier::notify_batch`].
    pub async fn notify(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Result<NotifyOutcome, NotifyError> {
        let Some(template) = self.update_template(deployment_id).await? else {
            return Ok(NotifyOutcome::NotTargeted);
        };
        let outcomes = self
            .notify_batch(&template, std::slice::from_ref(device_id))
            .await?;
        // A batch has one outcome per device it was given.
        match outcomes.into_iter().next() {
            Some((_, outcome)) => outcome,
            None => Ok(NotifyOutcome::NotTargeted),
        }
    }

    /// Tells each of `device_ids` about the template's deployment if it
    /// still needs it, in the mode it last registered: push-pull gets the
    /// link over MQTT, push gets a push offer (`crate::push`, one device at
    /// a time), pull (or a device never registered) gets nothing until it
    /// polls. Push-pull devices cost one read, one transaction for the new
    /// links, one publish each and one transaction for the deliveries,
    /// whatever their number; callers keep batches to a few hundred devices
    /// so the engine's other work interleaves.
    ///
    /// Returns one outcome per device (not in `device_ids`' order); an error
    /// for the whole batch is a store error.
    pub async fn notify_batch(
        &self,
        template: &UpdateTemplate,
        device_ids: &[DeviceId],
    ) -> Result<Vec<DeviceOutcome>, NotifyError> {
        let deployment_id = template.deployment_id.as_str();
        let targets = self
            .store
            .delivery_targets(deployment_id, device_ids)
            .await?;
        let targets: HashMap<&str, _> = targets
            .iter()
            .map(|target| (target.device_id.as_str(), target))
            .collect();
        let mut outcomes: Vec<DeviceOutcome> = Vec::with_capacity(device_ids.len());
        let mut ready: Vec<&DeviceId> = Vec::new();
        for device_id in device_ids {
            let Some(target) = targets.get(device_id.as_str()) else {
                outcomes.push((device_id.clone(), Ok(NotifyOutcome::NotTargeted)));
                continue;
            };
            match target.mode {
                Some(Mode::PushPull) if target.phase.needs_link() => ready.push(device_id),
                Some(Mode::PushPull) => {
                    outcomes.push((device_id.clone(), Ok(NotifyOutcome::NotNeeded)));
                }
                Some(Mode::Push) => {
                    let outcome = self.offer_push(device_id, deployment_id).await;
                    outcomes.push((device_id.clone(), outcome));
                }
                Some(Mode::Pull) | None => {
                    outcomes.push((device_id.clone(), Ok(NotifyOutcome::AwaitingPoll)));
                }
            }
        }

        let prepared = self.prepare_links(template, &ready).await?;
        let mut delivered: Vec<(&DeviceId, &PreparedUpdate)> = Vec::with_capacity(ready.len());
        for (device_id, prepared) in ready.iter().copied().zip(&prepared) {
            let message = ServerMessage::Update(prepared.notification.clone());
            match self
                .bus
                .publish(device_id, DeviceTopic::Notify, encode(&message))
                .await
            {
                Ok(()) => delivered.push((device_id, prepared)),
                Err(BrokerError::NoSession { .. }) => {
                    tracing::debug!(device = %device_id, deployment = deployment_id, "device offline; notification waits for its registration");
                    outcomes.push((device_id.clone(), Ok(NotifyOutcome::DeviceOffline)));
                }
                Err(error) => {
                    outcomes.push((device_id.clone(), Err(NotifyError::Publish(error))));
                }
            }
        }
        self.record_deliveries(deployment_id, &delivered, Channel::Mqtt)
            .await?;
        outcomes.extend(
            delivered
                .into_iter()
                .map(|(device_id, _)| (device_id.clone(), Ok(NotifyOutcome::Sent))),
        );
        Ok(outcomes)
    }

    /// Step 4 without the sending, for one device: its link for the
    /// deployment (reused while at least half of its lifetime remains, else
    /// created and audited `link.created`) and the notification carrying it.
    /// The device endpoint's poll answer is made here, with the code that
    /// makes the MQTT notifications, so there is one way to create a link.
    pub async fn prepare_update(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Result<Preparation, NotifyError> {
        let Some(template) = self.update_template(deployment_id).await? else {
            return Ok(Preparation::NotTargeted);
        };
        let targets = self
            .store
            .delivery_targets(deployment_id, std::slice::from_ref(device_id))
            .await?;
        let Some(target) = targets.first() else {
            return Ok(Preparation::NotTargeted);
        };
        if !target.phase.needs_link() {
            return Ok(Preparation::NotNeeded);
        }
        let prepared = self.prepare_links(&template, &[device_id]).await?;
        // `prepare_links` returns one update per device it was given.
        Ok(match prepared.into_iter().next() {
            Some(prepared) => Preparation::Ready(prepared),
            None => Preparation::NotTargeted,
        })
    }

    /// The links and notifications of devices that need them (the caller
    /// checked their phase), in `device_ids`' order: one read of their
    /// usable links and one transaction creating the missing ones with
    /// their `link.created` rows. The only place links are created.
    async fn prepare_links(
        &self,
        template: &UpdateTemplate,
        device_ids: &[&DeviceId],
    ) -> Result<Vec<PreparedUpdate>, NotifyError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let deployment_id = template.deployment_id.as_str();
        let now = clock::now_unix();
        let ttl = i64::try_from(self.link_ttl.as_secs())
            .unwrap_or(i64::MAX)
            .max(1);
        let usable = self
            .store
            .usable_links(deployment_id, device_ids, now.saturating_add(ttl / 2))
            .await?;
        let new_expiry = now.saturating_add(ttl);
        let mut new_links = Vec::new();
        let mut chosen = Vec::with_capacity(device_ids.len());
        for device_id in device_ids.iter().copied() {
            match usable.get(device_id.as_str()) {
                Some(link) => chosen.push((device_id, link.link_id, link.expires_at)),
                None => {
                    let link_id = LinkId::random();
                    new_links.push(NewLink {
                        link_id,
                        device_id,
                        expires_at: new_expiry,
                    });
                    chosen.push((device_id, link_id, new_expiry));
                }
            }
        }
        self.store
            .insert_links(deployment_id, &new_links, &clock::now_rfc3339())
            .await?;
        Ok(chosen
            .into_iter()
            .map(|(device_id, link_id, expires_at)| {
                let token = LinkToken::sign(
                    &self.link_secret,
                    link_id,
                    expires_at,
                    device_id,
                    deployment_id,
                );
                PreparedUpdate {
                    notification: UpdateNotification {
                        deployment_id: deployment_id.to_owned(),
                        release: template.release_id.clone(),
                        manifest: template.manifest.clone(),
                        link: links::download_url(&self.device_base_url, &token),
                        link_expires_at: expires_at,
                        data_key: template.data_key.clone(),
                        allow_downgrade: template.allow_downgrade,
                    },
                    link_id,
                }
            })
            .collect())
    }

    /// Records that a prepared notification reached the device `via` a
    /// channel: a batch of one of [`Notifier::record_deliveries`].
    pub async fn record_delivery(
        &self,
        device_id: &DeviceId,
        prepared: &PreparedUpdate,
        via: Channel,
    ) -> Result<(), NotifyError> {
        self.record_deliveries(
            &prepared.notification.deployment_id,
            &[(device_id, prepared)],
            via,
        )
        .await
    }

    /// Records that prepared notifications of `deployment_id` reached their
    /// devices `via` a channel, in one transaction: each phase moves from
    /// pending to notified and each gets its `notification.sent` row.
    pub async fn record_deliveries(
        &self,
        deployment_id: &str,
        delivered: &[(&DeviceId, &PreparedUpdate)],
        via: Channel,
    ) -> Result<(), NotifyError> {
        if delivered.is_empty() {
            return Ok(());
        }
        let records: Vec<(&DeviceId, serde_json::Value)> = delivered
            .iter()
            .map(|(device_id, prepared)| {
                let notification = &prepared.notification;
                let details = serde_json::json!({
                    "release": notification.release,
                    "link_id": prepared.link_id.to_hex(),
                    "link_expires_at": notification.link_expires_at,
                    "via": via.as_str(),
                });
                (*device_id, details)
            })
            .collect();
        self.store
            .record_notifications(deployment_id, &records, &clock::now_rfc3339())
            .await?;
        for (device_id, prepared) in delivered {
            crate::metrics::metrics().notification(via);
            tracing::info!(device = %device_id, deployment = deployment_id, release = %prepared.notification.release, via = via.as_str(), "notification sent");
        }
        Ok(())
    }
}
