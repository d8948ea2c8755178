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
//!
//! Every notification and push offer carries the release's data key
//! HPKE-wrapped to the device's encryption key (`otter_package::wrap`),
//! bound to the device id, the release and the artifact sha256; the
//! plaintext key stays in this process. A targeted device with no
//! encryption key on record (an agent older than wrapping) is sent nothing:
//! its phase fails with [`NO_ENCRYPTION_KEY`] through the same path as a
//! device's own failure report. Wrapping is one X25519 seal per device
//! (about 100 µs), done inline in the batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use otter_package::DataKey;
use otter_package::wrap::{self, EncryptionPublicKey, WrapContext};
use otter_proto::api::Channel;
use otter_proto::manifest::SignedManifest;
use otter_proto::messages::{DeviceEvent, Mode, ServerMessage, UpdateNotification, encode};
use otter_proto::topics::{DeviceId, DeviceTopic};

use crate::broker::{BrokerError, MessageBus};
use crate::clock;
use crate::links::{self, LinkId, LinkSecret, LinkToken};
use crate::store::{NewLink, ReportToApply, Store, StoreError, StoredRelease};
use crate::vault::KeyVault;

/// The failure detail of a targeted device with no encryption key on record.
pub const NO_ENCRYPTION_KEY: &str = "device has no encryption key: upgrade its agent";

/// Why a notification could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing to the device: {0}")]
    Publish(BrokerError),
    #[error("release {0} of a deployment is missing")]
    MissingRelease(String),
    #[error("data key of release {release}: {reason}")]
    DataKey { release: String, reason: String },
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
    /// The device has no usable encryption key: nothing was sent and its
    /// phase failed with the reason.
    NoEncryptionKey,
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
    /// Opens the release data keys sealed in the database.
    pub vault: KeyVault,
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
#[derive(Debug, Clone)]
pub struct UpdateTemplate {
    pub deployment_id: String,
    pub release_id: String,
    pub manifest: SignedManifest,
    /// The plaintext data key: only ever sent wrapped ([`UpdateTemplate::wrap_for`]).
    pub data_key: DataKey,
    /// The artifact sha256 of the signed manifest, bound into every wrap.
    pub artifact_sha256: String,
    /// The deployment allows a downgrade; every notification says so.
    pub allow_downgrade: bool,
}

/// One device's result in [`Notifier::notify_batch`]: a publish failure
/// concerns that device only.
pub type DeviceOutcome = (DeviceId, Result<NotifyOutcome, NotifyError>);

/// What [`Notifier::prepare_update`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preparation {
    /// Boxed: a notification (manifest, certificate, revocation list) is
    /// far larger than the other answers.
    Ready(Box<PreparedUpdate>),
    /// The device is past needing its link (downloaded or finished).
    NotNeeded,
    /// The deployment does not target the device.
    NotTargeted,
    /// The device has no usable encryption key; its phase failed.
    NoEncryptionKey,
}

impl UpdateTemplate {
    /// The data key wrapped to `device_id`'s encryption key as stored
    /// (`None`: it has none), or why it cannot be.
    pub fn wrap_for(
        &self,
        device_id: &DeviceId,
        encryption_key: Option<&str>,
    ) -> Result<String, &'static str> {
        let key = encryption_key.ok_or(NO_ENCRYPTION_KEY)?;
        let key = EncryptionPublicKey::from_base64(key)
            .map_err(|_| "device encryption key on record is not valid")?;
        let context = WrapContext {
            device_id: device_id.as_str(),
            release: &self.release_id,
            artifact_sha256: &self.artifact_sha256,
        };
        wrap::wrap_data_key(&key, &self.data_key, &context)
            .map(|wrapped| wrapped.to_base64())
            .map_err(|_| "device encryption key on record is not usable")
    }
}

/// Checks an encryption key a device registers: standard base64 of 32
/// bytes, not all zero. Cheap (no curve operation), as it runs on every
/// poll; a key X25519 still refuses (a low-order point) fails the device's
/// phase when a release is wrapped to it ([`UpdateTemplate::wrap_for`]).
pub fn check_encryption_key(text: &str) -> Result<(), String> {
    EncryptionPublicKey::from_base64(text)
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// The plaintext data key of a stored release, opened from its sealed form
/// (`crate::vault`). It lives only in this process, to be wrapped per device.
pub fn release_data_key(vault: &KeyVault, release: &StoredRelease) -> Result<DataKey, NotifyError> {
    vault
        .open(&release.info.id, &release.data_key)
        .map_err(|error| NotifyError::DataKey {
            release: release.info.id.clone(),
            reason: error.to_string(),
        })
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
            data_key: release_data_key(&self.vault, &found.release)?,
            release_id: found.release.info.id,
            manifest: found.release.info.manifest,
            artifact_sha256: found.release.artifact_sha256,
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
        let mut ready: Vec<(&DeviceId, String)> = Vec::new();
        let mut refused: Vec<(&DeviceId, &'static str)> = Vec::new();
        for device_id in device_ids {
            let Some(target) = targets.get(device_id.as_str()) else {
                outcomes.push((device_id.clone(), Ok(NotifyOutcome::NotTargeted)));
                continue;
            };
            let sends = matches!(target.mode, Some(Mode::PushPull | Mode::Push))
                && target.phase.needs_link();
            let wrapped = if sends {
                match template.wrap_for(device_id, target.encryption_key.as_deref()) {
                    Ok(wrapped) => wrapped,
                    Err(reason) => {
                        refused.push((device_id, reason));
                        continue;
                    }
                }
            } else {
                String::new()
            };
            match target.mode {
                Some(Mode::PushPull) if target.phase.needs_link() => {
                    ready.push((device_id, wrapped));
                }
                Some(Mode::PushPull) => {
                    outcomes.push((device_id.clone(), Ok(NotifyOutcome::NotNeeded)));
                }
                Some(Mode::Push) => {
                    let outcome = self.offer_push(device_id, deployment_id, wrapped).await;
                    outcomes.push((device_id.clone(), outcome));
                }
                Some(Mode::Pull) | None => {
                    outcomes.push((device_id.clone(), Ok(NotifyOutcome::AwaitingPoll)));
                }
            }
        }

        self.fail_without_key(deployment_id, &refused).await?;
        outcomes.extend(
            refused
                .iter()
                .map(|(device_id, _)| ((*device_id).clone(), Ok(NotifyOutcome::NoEncryptionKey))),
        );

        let prepared = self.prepare_links(template, &ready).await?;
        let mut delivered: Vec<(&DeviceId, &PreparedUpdate)> = Vec::with_capacity(ready.len());
        for (&(device_id, _), prepared) in ready.iter().zip(&prepared) {
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
        let wrapped = match template.wrap_for(device_id, target.encryption_key.as_deref()) {
            Ok(wrapped) => wrapped,
            Err(reason) => {
                self.fail_without_key(deployment_id, &[(device_id, reason)])
                    .await?;
                return Ok(Preparation::NoEncryptionKey);
            }
        };
        let prepared = self
            .prepare_links(&template, &[(device_id, wrapped)])
            .await?;
        // `prepare_links` returns one update per device it was given.
        Ok(match prepared.into_iter().next() {
            Some(prepared) => Preparation::Ready(Box::new(prepared)),
            None => Preparation::NotTargeted,
        })
    }

    /// Fails the phase of devices that cannot be sent the release (no
    /// usable encryption key), with the reason as detail: the path a
    /// device's own `failed` report takes, in one transaction.
    async fn fail_without_key(
        &self,
        deployment_id: &str,
        refused: &[(&DeviceId, &'static str)],
    ) -> Result<(), NotifyError> {
        if refused.is_empty() {
            return Ok(());
        }
        let reports: Vec<ReportToApply<'_>> = refused
            .iter()
            .map(|(device_id, reason)| ReportToApply {
                deployment_id,
                device_id,
                event: DeviceEvent::Failed,
                detail: Some(reason),
            })
            .collect();
        self.store
            .apply_reports(
                &reports,
                &clock::now_rfc3339(),
                otter_proto::deployment::apply,
            )
            .await?;
        for (device_id, reason) in refused {
            tracing::warn!(device = %device_id, deployment = deployment_id, reason, "release not sent");
        }
        Ok(())
    }

    /// The links and notifications of devices that need them (the caller
    /// checked their phase and wrapped the data key to each), in
    /// `devices`' order: one read of their usable links and one transaction
    /// creating the missing ones with their `link.created` rows. The only
    /// place links are created.
    async fn prepare_links(
        &self,
        template: &UpdateTemplate,
        devices: &[(&DeviceId, String)],
    ) -> Result<Vec<PreparedUpdate>, NotifyError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let device_ids: Vec<&DeviceId> = devices.iter().map(|(device_id, _)| *device_id).collect();
        let device_ids = device_ids.as_slice();
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
        let signer_revocations = self.store.signer_revocations().await?.map(Box::new);
        Ok(chosen
            .into_iter()
            .zip(devices)
            .map(|((device_id, link_id, expires_at), (_, wrapped_key))| {
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
                        wrapped_key: wrapped_key.clone(),
                        allow_downgrade: template.allow_downgrade,
                        signer_revocations: signer_revocations.clone(),
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
