//! The set of revoked device certificate serials, shared by the MQTT
//! broker's `ClientAuthenticate` hook and the device HTTPS endpoint.
//!
//! Loaded from the `revoked_certificates` table at start and updated by
//! `POST /api/v1/devices/{id}/revoke` after the revocation is committed, so
//! checking a connection or a request costs a set lookup, not a query.
//! Serials use the form of [`crate::pki::IssuedCertificate::serial_hex`]
//! (lower-case hex without leading zeros), which is what rmqtt reports and
//! what `devices.cert_serial` holds.
//!
//! A revocation also announces the device on a broadcast channel; the
//! embedded broker listens and kicks the device's live session at once.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use otter_proto::topics::DeviceId;
use tokio::sync::broadcast;

/// Revocations announced but not yet seen by a slow listener before the
/// oldest are dropped (the listener then logs; the set is still updated).
const ANNOUNCE_CAPACITY: usize = 1024;

/// Cheap to clone; all clones share one set.
#[derive(Clone)]
pub struct Revocations {
    serials: Arc<RwLock<HashSet<String>>>,
    announce: broadcast::Sender<DeviceId>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new(std::iter::empty())
    }
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("serials", &self.len())
            .finish_non_exhaustive()
    }
}

/// Lower-case hex without leading zeros.
fn normalize(serial_hex: &str) -> String {
    let lower = serial_hex.trim().to_ascii_lowercase().replace(':', "");
    let trimmed = lower.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

impl Revocations {
    /// A set holding `serials` (as loaded from the store).
    pub fn new(serials: impl IntoIterator<Item = String>) -> Revocations {
        let (announce, _) = broadcast::channel(ANNOUNCE_CAPACITY);
        Revocations {
            serials: Arc::new(RwLock::new(
                serials.into_iter().map(|s| normalize(&s)).collect(),
            )),
            announce,
        }
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        let serial = normalize(serial_hex);
        // A poisoned lock still holds a valid set (inserts cannot panic
        // halfway).
        match self.serials.read() {
            Ok(set) => set.contains(&serial),
            Err(poisoned) => poisoned.into_inner().contains(&serial),
        }
    }

    /// Adds a committed revocation and announces the device, whose live
    /// connections are then closed by the listeners.
    pub fn revoke(&self, device_id: &DeviceId, serial_hex: &str) {
        let serial = normalize(serial_hex);
        match self.serials.write() {
            Ok(mut set) => set.insert(serial),
            Err(poisoned) => poisoned.into_inner().insert(serial),
        };
        // No receiver (no broker running) is fine.
        let _ = self.announce.send(device_id.clone());
    }

    /// Receives the devices revoked from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceId> {
        self.announce.subscribe()
    }

    pub fn len(&self) -> usize {
        match self.serials.read() {
            Ok(set) => set.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_in_one_form() {
        let revocations = Revocations::new(["00AB:cd".to_owned()]);
        assert!(revocations.is_revoked("abcd"));
        assert!(revocations.is_revoked("0abcd"));
        assert!(!revocations.is_revoked("abce"));
        let device = DeviceId::parse("dev-1").unwrap();
        let mut announced = revocations.subscribe();
        revocations.revoke(&device, "12");
        assert!(revocations.is_revoked("12"));
        assert_eq!(announced.try_recv().unwrap(), device);
        assert_eq!(revocations.len(), 2);
    }
}
