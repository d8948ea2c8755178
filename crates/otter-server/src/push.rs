//! Push mode (steps 4–6 without a link): the server sends the artifact
//! itself over MQTT, in chunks, with a window of unacknowledged bytes, and
//! resumes from what the device acknowledged.
//!
//! The exchange: [`Notifier::offer_push`] publishes a `PushOffer` on the
//! device's `notify` topic (audited `notification.sent` with
//! `"delivery": "push"` and `push.offered`). The device answers with a
//! `PushAck` carrying the bytes it durably holds (0, or more when resuming),
//! and the server publishes binary `PushChunk`s on the device's `chunk`
//! topic from there, never more than the window ahead of the last
//! acknowledgement. Each acknowledgement (sent by the device after the
//! chunk is written and synced) moves the window on. When the device holds
//! every byte the transfer is complete (`push.completed`, with the bytes
//! sent); the device then verifies, unpacks and reports `downloaded` itself.
//!
//! Layout:
//! - [`PushSettings`]: chunk size, window, resend timeout (server flags).
//! - [`PushTransfer`]: the window rules for one (deployment, device), sans
//!   I/O: acknowledgements and timeouts in, byte ranges to send out.
//! - [`Pusher`]: the shell owned by the engine task (the one owner of device
//!   traffic, so no lock): reads ranges from the blob store, publishes them,
//!   persists progress (`Store::save_push_progress`) and audits.
//! - `Notifier::offer_push`: the push branch of step 4, called by
//!   `Notifier::notify`, the one way a device is told about an update.
//!
//! Resume: a device that connects again (or loses its last connection)
//! pauses its transfers: whatever was in flight is presumed lost. Back, it
//! registers, gets the offer again and acknowledges what it holds; the
//! first acknowledgement of a paused transfer restarts it from that offset (`push.resumed` when it
//! is not 0), so acknowledged bytes are never sent again. Without any
//! acknowledgement for [`PushSettings::ack_timeout`] the window is sent
//! again from the last acknowledged offset, at most
//! [`PushSettings::max_resends`] times in a row; then the transfer waits for
//! the device's next registration. Progress (acknowledged offset, bytes
//! sent) is persisted, so the count of bytes sent survives a server restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use otter_proto::messages::{Mode, PushAck, PushOffer, ServerMessage, encode};
use otter_proto::push::{MAX_CHUNK_BYTES, PushChunk};
use otter_proto::topics::{DeviceId, DeviceTopic};
use tokio::io::AsyncReadExt;

use crate::audit::{Actor, AuditEvent, AuditRecord};
use crate::blobs::{BlobError, BlobKey, BlobStore};
use crate::broker::{BrokerError, MessageBus};
use crate::clock;
use crate::notify::{Notifier, NotifyError, NotifyOutcome};
use crate::store::{PushProgress, Store, StoreError};

/// Default chunk size: a quarter of the largest chunk, so a chunk and its
/// fsync on a small device stay short.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Default window, in chunks: 1 MiB in flight with the default chunk size.
pub const DEFAULT_WINDOW_CHUNKS: u32 = 4;
/// Default time without an acknowledgement before the window is resent.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default resends in a row without progress before waiting for the
/// device's next registration.
pub const DEFAULT_MAX_RESENDS: u32 = 5;

/// How the server pushes artifacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushSettings {
    /// Bytes per chunk (the last one may be shorter); 1 to
    /// [`MAX_CHUNK_BYTES`], so a chunk fits the MQTT packet limits.
    pub chunk_size: u32,
    /// Chunks sent ahead of the device's last acknowledgement; at least 1.
    pub window_chunks: u32,
    pub ack_timeout: Duration,
    pub max_resends: u32,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            chunk_size: DEFAULT_CHUNK_SIZE,
            window_chunks: DEFAULT_WINDOW_CHUNKS,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            max_resends: DEFAULT_MAX_RESENDS,
        }
    }
}

impl PushSettings {
    /// Checks the limits; the message names the setting at fault.
    pub fn validate(&self) -> Result<(), String> {
        let chunk = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
        if chunk == 0 || chunk > MAX_CHUNK_BYTES {
            return Err(format!(
                "the push chunk size must be between 1 and {MAX_CHUNK_BYTES} bytes, not {}",
                self.chunk_size
            ));
        }
        if self.window_chunks == 0 {
            return Err("the push window must be at least 1 chunk".to_owned());
        }
        if self.ack_timeout.is_zero() {
            return Err("the push acknowledgement timeout must not be 0".to_owned());
        }
        Ok(())
    }

    /// The most bytes ever unacknowledged.
    pub fn window_bytes(&self) -> u64 {
        u64::from(self.chunk_size) * u64::from(self.window_chunks)
    }
}

/// One chunk to send: `length` bytes of the artifact from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub offset: u64,
    pub length: u32,
}

/// What an acknowledgement did to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckEffect {
    /// The acknowledgement (re)started a paused transfer from this offset.
    pub started_from: Option<u64>,
    /// Send these, in order.
    pub send: Vec<ChunkRange>,
    /// The device holds the whole artifact.
    pub complete: bool,
}

/// Why an acknowledgement cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("acknowledged offset {offset} is beyond the artifact's {size} bytes")]
    BeyondEnd { offset: u64, size: u64 },
}

/// What a resend deadline did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeoutEffect {
    /// Send these again (from the last acknowledged offset).
    Resend(Vec<ChunkRange>),
    /// Too many resends without progress: paused until the device's next
    /// acknowledgement (it sends one when it gets the offer again).
    GaveUp,
    /// The deadline was not reached (or the transfer is not running).
    NotDue,
}

/// The window of one push transfer, without I/O. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTransfer {
    artifact_size: u64,
    chunk_size: u64,
    window: u64,
    ack_timeout: Duration,
    max_resends: u32,
    /// Every byte before it is durably on the device.
    acked: u64,
    /// The next byte to send.
    next: u64,
    /// False until the first acknowledgement, and again after a disconnect
    /// or too many resends: the next acknowledgement sets the base.
    running: bool,
    /// When the window last moved or was resent; the deadline counts from it.
    last_progress: Instant,
    resends: u32,
    /// Every byte published for this transfer, resends included.
    bytes_sent: u64,
}

impl PushTransfer {
    /// A paused transfer of `artifact_size` bytes that already sent
    /// `bytes_sent` (from the store, after a server restart).
    pub fn new(artifact_size: u64, settings: &PushSettings, bytes_sent: u64, now: Instant) -> Self {
        PushTransfer {
            artifact_size,
            chunk_size: u64::from(settings.chunk_size.max(1)),
            window: settings.window_bytes().max(1),
            ack_timeout: settings.ack_timeout,
            max_resends: settings.max_resends,
            acked: 0,
            next: 0,
            running: false,
            last_progress: now,
            resends: 0,
            bytes_sent,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Applies the device's acknowledgement that it holds `offset` bytes.
    pub fn on_ack(&mut self, offset: u64, now: Instant) -> Result<AckEffect, AckError> {
        if offset > self.artifact_size {
            return Err(AckError::BeyondEnd {
                offset,
                size: self.artifact_size,
            });
        }
        let mut effect = AckEffect::default();
        if !self.running {
            // The base of a new attempt: whatever was in flight is gone.
            self.running = true;
            self.acked = offset;
            self.next = offset;
            self.resends = 0;
            self.last_progress = now;
            effect.started_from = Some(offset);
        } else if offset > self.acked {
            self.acked = offset;
            // The device may hold more than we sent in this attempt (chunks
            // of an earlier attempt redelivered by the broker).
            self.next = self.next.max(offset);
            self.resends = 0;
            self.last_progress = now;
        } else {
            // A repeat or an older acknowledgement: nothing new.
            return Ok(effect);
        }
        if self.acked == self.artifact_size {
            self.running = false;
            effect.complete = true;
            return Ok(effect);
        }
        effect.send = self.fill_window();
        Ok(effect)
    }

    /// The device went away: what was in flight is presumed lost.
    pub fn pause(&mut self) {
        self.running = false;
    }

    /// When the window is resent if no acknowledgement comes.
    pub fn deadline(&self) -> Option<Instant> {
        self.running.then(|| self.last_progress + self.ack_timeout)
    }

    /// Called at or after [`PushTransfer::deadline`].
    pub fn on_timeout(&mut self, now: Instant) -> TimeoutEffect {
        match self.deadline() {
            Some(deadline) if now >= deadline => {}
            _ => return TimeoutEffect::NotDue,
        }
        if self.resends >= self.max_resends {
            self.running = false;
            return TimeoutEffect::GaveUp;
        }
        self.resends += 1;
        self.next = self.acked;
        self.last_progress = now;
        TimeoutEffect::Resend(self.fill_window())
    }

    /// The chunks that fit the window after `next`, counted as sent.
    fn fill_window(&mut self) -> Vec<ChunkRange> {
        let mut ranges = Vec::new();
        while self.next < self.artifact_size {
            let length = self.chunk_size.min(self.artifact_size - self.next);
            if self.next + length > self.acked + self.window {
                break;
            }
            ranges.push(ChunkRange {
                offset: self.next,
                // At most `chunk_size`, which is a u32.
                length: u32::try_from(length).unwrap_or(u32::MAX),
            });
            self.next += length;
            self.bytes_sent += length;
        }
        ranges
    }
}

/// Why pushing to a device failed (logged; the engine carries on).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the artifact: {0}")]
    Blob(#[from] BlobError),
    #[error("release {0} has an invalid blob key")]
    BadBlobKey(String),
    #[error("publishing a chunk: {0}")]
    Publish(BrokerError),
}

/// An active transfer and what the shell needs to feed it.
#[derive(Debug)]
struct ActiveTransfer {
    machine: PushTransfer,
    blob_key: BlobKey,
}

/// The push shell; owned by the engine task.
pub struct Pusher {
    store: Store,
    bus: Arc<dyn MessageBus>,
    blobs: BlobStore,
    settings: PushSettings,
    /// By (device, deployment). Bounded by the deployments in progress on
    /// push devices; a transfer leaves when it completes or its deployment
    /// no longer needs delivery.
    transfers: HashMap<(DeviceId, String), ActiveTransfer>,
    /// Open connections per device, from the broker's events.
    connections: HashMap<DeviceId, u32>,
}

impl Pusher {
    pub fn new(
        store: Store,
        bus: Arc<dyn MessageBus>,
        blobs: BlobStore,
        settings: PushSettings,
    ) -> Self {
        Pusher {
            store,
            bus,
            blobs,
            settings,
            transfers: HashMap::new(),
            connections: HashMap::new(),
        }
    }

    /// A device acknowledged bytes of a pushed artifact.
    pub async fn on_ack(
        &mut self,
        device_id: &DeviceId,
        ack: &PushAck,
        now: Instant,
    ) -> Result<(), PushError> {
        let key = (device_id.clone(), ack.deployment_id.clone());
        if !self.transfers.contains_key(&key) {
            let Some(active) = self.load(device_id, &ack.deployment_id, now).await? else {
                return Ok(());
            };
            self.transfers.insert(key.clone(), active);
        }
        let Some(active) = self.transfers.get_mut(&key) else {
            return Ok(());
        };
        let effect = match active.machine.on_ack(ack.offset, now) {
            Ok(effect) => effect,
            Err(error) => {
                tracing::warn!(device = %device_id, deployment = %ack.deployment_id, %error, "ignoring an acknowledgement");
                return Ok(());
            }
        };
        let artifact_size = active.machine.artifact_size;
        if let Some(offset) = effect.started_from {
            tracing::info!(device = %device_id, deployment = %ack.deployment_id, offset, "push transfer started");
            if offset > 0 {
                let actor = Actor::server();
                let record = AuditRecord::new(&actor, AuditEvent::PushResumed)
                    .device(device_id.as_str())
                    .deployment(&ack.deployment_id)
                    .details(serde_json::json!({
                        "offset": offset,
                        "artifact_size": artifact_size,
                    }));
                self.store
                    .append_audit(&clock::now_rfc3339(), &record)
                    .await?;
            }
        }
        let sent = self.send(&key, &effect.send).await;
        let Some(active) = self.transfers.get(&key) else {
            return sent;
        };
        let progress = PushProgress {
            acked_offset: active.machine.acked(),
            bytes_sent: active.machine.bytes_sent(),
        };
        if effect.complete {
            self.transfers.remove(&key);
            let actor = Actor::server();
            let record = AuditRecord::new(&actor, AuditEvent::PushCompleted)
                .device(device_id.as_str())
                .deployment(&ack.deployment_id)
                .details(serde_json::json!({
                    "artifact_size": artifact_size,
                    "bytes_sent": progress.bytes_sent,
                }));
            self.store
                .save_push_progress(
                    &ack.deployment_id,
                    device_id,
                    &progress,
                    Some(&record),
                    &clock::now_rfc3339(),
                )
                .await?;
            tracing::info!(device = %device_id, deployment = %ack.deployment_id, bytes_sent = progress.bytes_sent, "push transfer complete");
        } else {
            self.store
                .save_push_progress(
                    &ack.deployment_id,
                    device_id,
                    &progress,
                    None,
                    &clock::now_rfc3339(),
                )
                .await?;
        }
        sent
    }

    /// A device connected. Whatever was in flight on an earlier connection
    /// may be lost, so its transfers wait for an acknowledgement on this one
    /// (its answer to the offer its registration brings).
    pub fn on_connect(&mut self, device_id: &DeviceId) {
        *self.connections.entry(device_id.clone()).or_default() += 1;
        self.pause_device(device_id);
    }

    /// A device's connection ended. When none is left its transfers pause
    /// (no resends into the broker's offline queue); when the device has
    /// already reconnected (the broker reports the old connection's end after
    /// the new one's start on a takeover) nothing changes, so the new
    /// connection's acknowledgements keep their meaning.
    pub fn on_disconnect(&mut self, device_id: &DeviceId) {
        let remaining = match self.connections.get_mut(device_id) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count
            }
            None => 0,
        };
        if remaining == 0 {
            self.connections.remove(device_id);
            self.pause_device(device_id);
        }
    }

    fn pause_device(&mut self, device_id: &DeviceId) {
        for ((device, _), active) in self.transfers.iter_mut() {
            if device == device_id {
                active.machine.pause();
            }
        }
    }

    /// The earliest resend deadline of all transfers.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.transfers
            .values()
            .filter_map(|active| active.machine.deadline())
            .min()
    }

    /// Resends the windows whose deadline passed (or drops transfers whose
    /// deployment no longer needs delivery).
    pub async fn on_deadline(&mut self, now: Instant) {
        let due: Vec<(DeviceId, String)> = self
            .transfers
            .iter()
            .filter(|(_, active)| active.machine.deadline().is_some_and(|d| d <= now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let (device_id, deployment_id) = &key;
            let still_needed = match self
                .store
                .notification_target(deployment_id, device_id)
                .await
            {
                Ok(target) => target.is_some_and(|target| target.phase.needs_link()),
                Err(error) => {
                    tracing::warn!(%error, "cannot read a push target; keeping the transfer");
                    true
                }
            };
            if !still_needed {
                self.transfers.remove(&key);
                continue;
            }
            let Some(active) = self.transfers.get_mut(&key) else {
                continue;
            };
            match active.machine.on_timeout(now) {
                TimeoutEffect::Resend(ranges) => {
                    tracing::info!(device = %device_id, deployment = %deployment_id, from = active.machine.acked(), "no acknowledgement; resending the window");
                    if let Err(error) = self.send(&key, &ranges).await {
                        tracing::warn!(device = %device_id, deployment = %deployment_id, %error, "resending failed");
                    }
                }
                TimeoutEffect::GaveUp => {
                    tracing::warn!(device = %device_id, deployment = %deployment_id, "device stopped acknowledging; waiting for its next registration");
                }
                TimeoutEffect::NotDue => {}
            }
        }
    }

    /// Builds the transfer for a first acknowledgement, or `None` when the
    /// deployment does not (or no longer) need delivery to the device.
    async fn load(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
        now: Instant,
    ) -> Result<Option<ActiveTransfer>, PushError> {
        let Some(target) = self
            .store
            .notification_target(deployment_id, device_id)
            .await?
        else {
            tracing::debug!(device = %device_id, deployment = deployment_id, "acknowledgement for a deployment that does not target the device");
            return Ok(None);
        };
        if !target.phase.needs_link() {
            tracing::debug!(device = %device_id, deployment = deployment_id, phase = target.phase.as_str(), "acknowledgement after the transfer; ignored");
            return Ok(None);
        }
        let Some(release) = self.store.release(&target.release_id).await? else {
            return Ok(None);
        };
        let blob_key = BlobKey::from_sha256_hex(&release.blob_key)
            .ok_or_else(|| PushError::BadBlobKey(target.release_id.clone()))?;
        let bytes_sent = self
            .store
            .push_progress(deployment_id, device_id)
            .await?
            .map(|progress| progress.bytes_sent)
            .unwrap_or(0);
        Ok(Some(ActiveTransfer {
            machine: PushTransfer::new(release.info.artifact_size, &self.settings, bytes_sent, now),
            blob_key,
        }))
    }

    /// Reads and publishes `ranges` of the transfer `key`, in order. The
    /// device gone (no session) pauses the transfer, as does any failure.
    async fn send(
        &mut self,
        key: &(DeviceId, String),
        ranges: &[ChunkRange],
    ) -> Result<(), PushError> {
        let Some(active) = self.transfers.get(key) else {
            return Ok(());
        };
        let blob_key = active.blob_key.clone();
        let (device_id, deployment_id) = key;
        let mut data = Vec::new();
        for range in ranges {
            let result = async {
                data.clear();
                self.blobs
                    .open_range(&blob_key, range.offset, u64::from(range.length))
                    .await?
                    .read_to_end(&mut data)
                    .await
                    .map_err(BlobError::Io)?;
                if data.len() != usize::try_from(range.length).unwrap_or(usize::MAX) {
                    return Err(PushError::Blob(BlobError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the blob is shorter than the release's artifact size",
                    ))));
                }
                let chunk = PushChunk {
                    deployment_id,
                    offset: range.offset,
                    data: &data,
                };
                self.bus
                    .publish(device_id, DeviceTopic::Chunk, chunk.encode())
                    .await
                    .map_err(PushError::Publish)?;
                let metrics = crate::metrics::metrics();
                metrics.push_chunks_sent.increment();
                metrics.push_chunk_bytes.add(data.len() as u64);
                Ok(())
            }
            .await;
            if let Err(error) = result {
                if let Some(active) = self.transfers.get_mut(key) {
                    active.machine.pause();
                }
                return match error {
                    PushError::Publish(BrokerError::NoSession { .. }) => {
                        tracing::debug!(device = %device_id, deployment = %deployment_id, "device offline; the transfer waits for it");
                        Ok(())
                    }
                    error => Err(error),
                };
            }
        }
        Ok(())
    }
}

impl Notifier {
    /// Step 4 for a push device: publishes the offer (with the data key
    /// the caller wrapped to the device) and records `notification.sent`
    /// (delivery push) and `push.offered`, with the offset last
    /// acknowledged (where a resume will likely start).
    pub(crate) async fn offer_push(
        &self,
        device_id: &DeviceId,
        deployment_id: &str,
        wrapped_key: String,
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
        let message = ServerMessage::PushOffer(PushOffer {
            deployment_id: deployment_id.to_owned(),
            release: target.release_id.clone(),
            manifest: release.info.manifest.clone(),
            wrapped_key,
            chunk_size: self.push_chunk_size,
            allow_downgrade: target.allow_downgrade,
            signer_revocations: self.store.signer_revocations().await?.map(Box::new),
        });
        match self
            .bus
            .publish(device_id, DeviceTopic::Notify, encode(&message))
            .await
        {
            Ok(()) => {}
            Err(BrokerError::NoSession { .. }) => {
                tracing::debug!(device = %device_id, deployment = deployment_id, "device offline; the offer waits for its registration");
                return Ok(NotifyOutcome::DeviceOffline);
            }
            Err(error) => return Err(NotifyError::Publish(error)),
        }
        let from_offset = self
            .store
            .push_progress(deployment_id, device_id)
            .await?
            .map(|progress| progress.acked_offset)
            .unwrap_or(0);
        let at = clock::now_rfc3339();
        self.store
            .record_notification(
                deployment_id,
                device_id,
                serde_json::json!({
                    "release": target.release_id,
                    "delivery": Mode::Push.as_str(),
                }),
                &at,
            )
            .await?;
        crate::metrics::metrics().notifications_push.increment();
        let actor = Actor::server();
        let record = AuditRecord::new(&actor, AuditEvent::PushOffered)
            .device(device_id.as_str())
            .deployment(deployment_id)
            .details(serde_json::json!({
                "release": target.release_id,
                "artifact_size": release.info.artifact_size,
                "chunk_size": self.push_chunk_size,
                "from_offset": from_offset,
            }));
        self.store.append_audit(&at, &record).await?;
        tracing::info!(device = %device_id, deployment = deployment_id, release = %target.release_id, from_offset, "push offer sent");
        Ok(NotifyOutcome::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(chunk_size: u32, window_chunks: u32) -> PushSettings {
        PushSettings {
            chunk_size,
            window_chunks,
            ack_timeout: Duration::from_secs(30),
            max_resends: 2,
        }
    }

    fn ranges(list: &[(u64, u32)]) -> Vec<ChunkRange> {
        list.iter()
            .map(|&(offset, length)| ChunkRange { offset, length })
            .collect()
    }

    /// Events in → ranges out, for one transfer of 100 bytes, chunks of 10,
    /// a window of 3 chunks.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        Ack(u64),
        Pause,
        Timeout,
    }

    fn check(events: &[Event], expected: &[Vec<(u64, u32)>], expected_sent: u64) {
        let start = Instant::now();
        let mut transfer = PushTransfer::new(100, &settings(10, 3), 0, start);
        let mut now = start;
        for (event, expected) in events.iter().zip(expected) {
            let got = match *event {
                Event::Ack(offset) => transfer.on_ack(offset, now).unwrap().send,
                Event::Pause => {
                    transfer.pause();
                    Vec::new()
                }
                Event::Timeout => {
                    now += Duration::from_secs(31);
                    match transfer.on_timeout(now) {
                        TimeoutEffect::Resend(ranges) => ranges,
                        other => panic!("{event:?}: {other:?}"),
                    }
                }
            };
            assert_eq!(got, ranges(expected), "after {event:?} in {events:?}");
            assert!(
                transfer.next - transfer.acked <= 30,
                "window exceeded: {transfer:?}"
            );
        }
        assert_eq!(transfer.bytes_sent(), expected_sent, "{events:?}");
    }

    #[test]
    fn window_rules() {
        use Event::*;
        // A fresh transfer: the window, then one chunk per acknowledgement.
        check(
            &[Ack(0), Ack(10), Ack(30), Ack(30), Ack(20)],
            &[
                vec![(0, 10), (10, 10), (20, 10)],
                vec![(30, 10)],
                vec![(40, 10), (50, 10)],
                vec![],
                vec![],
            ],
            60,
        );
        // A resume from a non-zero offset sends nothing before it.
        check(&[Ack(70)], &[vec![(70, 10), (80, 10), (90, 10)]], 30);
        // After a pause, the first acknowledgement is the new base, even
        // below the acknowledged offset; the lost window is sent again.
        check(
            &[Ack(0), Ack(10), Pause, Ack(10), Ack(10)],
            &[
                vec![(0, 10), (10, 10), (20, 10)],
                vec![(30, 10)],
                vec![],
                vec![(10, 10), (20, 10), (30, 10)],
                vec![],
            ],
            70,
        );
        // A timeout resends the window from the last acknowledgement.
        check(
            &[Ack(0), Ack(20), Timeout],
            &[
                vec![(0, 10), (10, 10), (20, 10)],
                vec![(30, 10), (40, 10)],
                vec![(20, 10), (30, 10), (40, 10)],
            ],
            80,
        );
        // The device holds more than this attempt sent (redelivered chunks).
        check(
            &[Ack(0), Ack(50)],
            &[
                vec![(0, 10), (10, 10), (20, 10)],
                vec![(50, 10), (60, 10), (70, 10)],
            ],
            60,
        );
    }

    #[test]
    fn last_chunk_is_short_and_completion_stops_sending() {
        let now = Instant::now();
        let mut transfer = PushTransfer::new(25, &settings(10, 4), 0, now);
        let effect = transfer.on_ack(0, now).unwrap();
        assert_eq!(effect.send, ranges(&[(0, 10), (10, 10), (20, 5)]));
        assert!(!effect.complete);
        assert!(transfer.on_ack(20, now).unwrap().send.is_empty());
        let done = transfer.on_ack(25, now).unwrap();
        assert!(done.complete && done.send.is_empty());
        assert_eq!(transfer.deadline(), None);
        assert_eq!(transfer.bytes_sent(), 25);
        assert_eq!(
            transfer.on_ack(26, now),
            Err(AckError::BeyondEnd {
                offset: 26,
                size: 25
            })
        );
        // Already complete when the transfer (re)starts.
        let mut whole = PushTransfer::new(25, &settings(10, 4), 7, now);
        let effect = whole.on_ack(25, now).unwrap();
        assert_eq!((effect.started_from, effect.complete), (Some(25), true));
        assert_eq!(whole.bytes_sent(), 7);
    }

    #[test]
    fn deadlines_and_giving_up() {
        let start = Instant::now();
        let mut transfer = PushTransfer::new(100, &settings(10, 2), 0, start);
        assert_eq!(transfer.deadline(), None, "not running before an ack");
        transfer.on_ack(0, start).unwrap();
        let deadline = transfer.deadline().unwrap();
        assert_eq!(deadline, start + Duration::from_secs(30));
        assert_eq!(
            transfer.on_timeout(deadline - Duration::from_secs(1)),
            TimeoutEffect::NotDue
        );
        let mut now = deadline;
        for _ in 0..2 {
            assert!(matches!(transfer.on_timeout(now), TimeoutEffect::Resend(r) if r.len() == 2));
            now += Duration::from_secs(30);
        }
        assert_eq!(transfer.on_timeout(now), TimeoutEffect::GaveUp);
        assert!(!transfer.is_running());
        assert_eq!(transfer.deadline(), None);
        // The device's next acknowledgement starts it again.
        let effect = transfer.on_ack(0, now).unwrap();
        assert_eq!(effect.started_from, Some(0));
        assert_eq!(effect.send.len(), 2);
    }

    #[test]
    fn settings_limits() {
        assert!(PushSettings::default().validate().is_ok());
        assert_eq!(PushSettings::default().window_bytes(), 1 << 20);
        for bad in [
            settings(0, 1),
            settings(u32::try_from(MAX_CHUNK_BYTES).unwrap() + 1, 1),
            settings(10, 0),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(
            settings(u32::try_from(MAX_CHUNK_BYTES).unwrap(), 1)
                .validate()
                .is_ok()
        );
    }
}
