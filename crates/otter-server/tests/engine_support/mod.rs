//! Shared setup for the tests that drive the real engine, store and
//! notifier without a broker: a message bus that records every publish, a
//! device registration, and a release row whose blob is never read.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use otter_proto::api::ReleaseInfo;
use otter_proto::manifest::{PackageKind, SignedManifest};
use otter_proto::messages::{Mode, Registration};
use otter_proto::topics::{DeviceId, DeviceTopic};
use otter_server::broker::{BrokerError, MessageBus};
use otter_server::store::NewRelease;

/// Records every publish; every device has a session.
#[derive(Default)]
pub struct RecordingBus {
    pub published: Mutex<Vec<(DeviceId, DeviceTopic, Vec<u8>)>>,
}

impl MessageBus for RecordingBus {
    fn publish<'a>(
        &'a self,
        device_id: &'a DeviceId,
        topic: DeviceTopic,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>> {
        Box::pin(async move {
            // A poisoned lock means another test thread panicked already.
            self.published
                .lock()
                .unwrap()
                .push((device_id.clone(), topic, payload));
            Ok(())
        })
    }
}

/// The encryption key every device of these tests registers (one key is
/// enough: the wrap context still binds each device's id).
pub static DEVICE_KEY: std::sync::LazyLock<otter_package::wrap::DeviceKey> =
    std::sync::LazyLock::new(otter_package::wrap::DeviceKey::generate);

/// The vault of these tests' notifiers (what `data-key.secret` holds).
pub fn test_vault() -> otter_server::vault::KeyVault {
    otter_server::vault::KeyVault::from_secret([9; 32])
}

/// The data key of [`stub_release`].
pub fn stub_data_key() -> otter_package::DataKey {
    otter_package::DataKey::from_bytes([5; 32])
}

/// Opens the wrapped key of a notification to `device_id` of
/// [`stub_release`] with [`DEVICE_KEY`].
pub fn unwrap_stub_key(
    device_id: &str,
    wrapped_key: &str,
) -> Result<otter_package::DataKey, otter_package::PackageError> {
    let wrapped = otter_package::wrap::WrappedKey::from_base64(wrapped_key)?;
    let context = otter_package::wrap::WrapContext {
        device_id,
        release: "app@1.0.0",
        artifact_sha256: &"11".repeat(32),
    };
    otter_package::wrap::unwrap_data_key(&DEVICE_KEY, &wrapped, &context)
}

/// A `board-a` device's registration in `mode`, nothing installed.
pub fn registration(mode: Mode) -> Registration {
    Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: "board-a".to_owned(),
        installed: BTreeMap::new(),
        agent_version: "0.1.0".to_owned(),
        mode,
        capabilities: vec!["file".to_owned()],
        encryption_key: Some(DEVICE_KEY.public_key().to_base64()),
    }
}

/// Release `app@1.0.0` for `board-a`, uploaded at `at`; its manifest is not
/// a real signed one (nothing here verifies it).
pub fn stub_release(at: &str) -> NewRelease {
    NewRelease {
        info: ReleaseInfo {
            id: "app@1.0.0".to_owned(),
            name: "app".to_owned(),
            version: semver::Version::new(1, 0, 0),
            kind: PackageKind::Application,
            hardware: vec!["board-a".to_owned()],
            payload_size: 10,
            artifact_size: 20,
            payload_sha256: "00".repeat(32),
            manifest: SignedManifest {
                manifest: "{\"name\":\"app\"}".to_owned(),
                signer: "signer".to_owned(),
                signature: "signature".to_owned(),
                signer_certificate: None,
            },
            uploaded_at: at.to_owned(),
            uploaded_by: "admin".to_owned(),
        },
        artifact_sha256: "11".repeat(32),
        data_key: test_vault().seal("app@1.0.0", &stub_data_key()),
        blob_key: "22".repeat(32),
    }
}
