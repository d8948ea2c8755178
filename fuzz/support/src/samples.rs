//! Real values of every type a fuzz target parses.
//!
//! `make-corpus` encodes them with the project's own encoders (`encode`,
//! `PushChunk::encode`, `build_package`, `sign_manifest`, serde) into the
//! seed corpora, so each seed is what a server, agent or CLI really sends or
//! stores, and the fuzzer starts from inputs that reach deep into a parser.

use std::collections::BTreeMap;

use otter_agent::self_update::{Marker, MarkerState};
use otter_package::format::{BuildOptions, build_package};
use otter_package::sign::sign_manifest;
use otter_proto::api::{BatchEnrollRequest, CreateDeployment, EnrollRequest, ErrorBody};
use otter_proto::job::{Delivery, Job, Stage};
use otter_proto::manifest::{
    Compression, Encryption, MANIFEST_FORMAT, Manifest, PackageKind, SignedManifest,
};
use otter_proto::messages::{
    DeviceEvent, ErrorMessage, Mode, PollResponse, PushAck, PushOffer, Registration, ServerMessage,
    StatusReport, UpdateNotification,
};
use otter_proto::push::PushChunk;
use otter_proto::topics::{DeviceId, DeviceTopic, device_topic};
use semver::Version;

use crate::trusted_key;
use crate::unpack_case::digest;

const DEVICE: &str = "dev-0001";
const DEPLOYMENT: &str = "d-7f3a";

fn device_id() -> DeviceId {
    // A constant that satisfies the id rules.
    DeviceId::parse(DEVICE).expect("the sample device id is valid")
}

pub fn manifest() -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "sensor-fw".into(),
        version: Version::parse("1.2.3-rc.1+b7").expect("the sample version is valid"),
        kind: PackageKind::Firmware,
        hardware: vec!["revB".into(), "revC".into()],
        payload: digest(b"payload"),
        artifact: digest(b"artifact"),
        compression: Compression::Zstd { window_log: 23 },
        encryption: Encryption::ChaCha20Poly1305Stream {
            chunk_size: 65536,
            nonce_prefix: "00112233445566".into(),
        },
        created_at: 1_764_000_000,
        allow_downgrade: false,
    }
}

/// [`manifest`] signed by the key every target trusts.
pub fn signed_manifest() -> SignedManifest {
    sign_manifest(&manifest(), &trusted_key())
}

/// The signer [`certified_manifest`] uses: certified by the trusted key as
/// a root, not trusted directly.
pub fn certified_signer() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[3; 32])
}

/// [`manifest`] signed by [`certified_signer`], carrying its certificate
/// from the trusted key (as a root), valid 2025-01-01 to 2035-01-01.
pub fn certified_manifest() -> SignedManifest {
    let signer = certified_signer();
    let mut signed = sign_manifest(&manifest(), &signer);
    signed.signer_certificate = otter_package::trust::certify(
        &trusted_key(),
        &signer.verifying_key(),
        "ci-signer",
        1_735_689_600,
        2_051_222_400,
    )
    .ok()
    .map(Box::new);
    signed
}

/// A root-signed list revoking the untrusted key (sequence 1).
pub fn revocation_list() -> otter_proto::trust::SignedRevocationList {
    let revoked = otter_package::keys::key_id(&crate::untrusted_key().verifying_key());
    match otter_package::trust::revoke(&trusted_key(), None, &revoked, "leaked", 1_764_000_000) {
        Ok((signed, _)) => signed,
        Err(error) => panic!("the sample list is valid: {error}"),
    }
}

/// An HPKE-wrapped data key has this shape (`enc || ciphertext`, 80 bytes).
const WRAPPED_KEY: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";

pub fn registration() -> Registration {
    Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: "revB".into(),
        installed: [
            ("sensor-fw".to_owned(), Version::new(1, 2, 2)),
            ("otter-agent-config".to_owned(), Version::new(3, 0, 0)),
        ]
        .into(),
        agent_version: "0.1.0".into(),
        mode: Mode::PushPull,
        capabilities: vec!["file".into(), "range".into()],
        encryption_key: Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".into()),
    }
}

pub fn status_reports() -> Vec<StatusReport> {
    vec![
        StatusReport {
            deployment_id: DEPLOYMENT.into(),
            event: DeviceEvent::Received,
            detail: None,
        },
        StatusReport {
            deployment_id: DEPLOYMENT.into(),
            event: DeviceEvent::Failed,
            detail: Some("payload does not match the manifest".into()),
        },
    ]
}

pub fn push_ack() -> PushAck {
    PushAck {
        deployment_id: DEPLOYMENT.into(),
        offset: 131_072,
    }
}

pub fn notification() -> UpdateNotification {
    UpdateNotification {
        deployment_id: DEPLOYMENT.into(),
        release: manifest().release_id(),
        manifest: signed_manifest(),
        link: "https://ota.example:8443/v1/artifacts/AAECAwQFBgcICQoLDA0ODw".into(),
        link_expires_at: 1_764_003_600,
        wrapped_key: WRAPPED_KEY.into(),
        allow_downgrade: false,
        signer_revocations: Some(Box::new(revocation_list())),
    }
}

pub fn push_offer() -> PushOffer {
    PushOffer {
        deployment_id: DEPLOYMENT.into(),
        release: manifest().release_id(),
        manifest: signed_manifest(),
        wrapped_key: WRAPPED_KEY.into(),
        chunk_size: 65536,
        allow_downgrade: true,
        signer_revocations: None,
    }
}

pub fn server_messages() -> Vec<ServerMessage> {
    vec![
        ServerMessage::Update(notification()),
        ServerMessage::Error(ErrorMessage {
            code: "malformed-message".into(),
            message: "missing field `event`".into(),
        }),
        ServerMessage::PushOffer(push_offer()),
    ]
}

pub fn poll_responses() -> Vec<PollResponse> {
    vec![
        PollResponse { update: None },
        PollResponse {
            update: Some(notification()),
        },
    ]
}

/// Encoded push chunks: the first of an artifact and one further on.
pub fn push_chunks() -> Vec<Vec<u8>> {
    vec![
        PushChunk {
            deployment_id: DEPLOYMENT,
            offset: 0,
            data: b"\x28\xb5\x2f\xfd artifact bytes",
        }
        .encode(),
        PushChunk {
            deployment_id: DEPLOYMENT,
            offset: 1 << 20,
            data: &[0xa5; 64],
        }
        .encode(),
    ]
}

/// Topic names, deployment targets and release ids: the names peers and
/// operators send as text.
pub fn names() -> Vec<String> {
    let mut names: Vec<String> = DeviceTopic::ALL
        .into_iter()
        .map(|topic| device_topic(&device_id(), topic))
        .collect();
    names.extend([
        "all".to_owned(),
        "fleet:plant-3".to_owned(),
        format!("device:{DEVICE}"),
        manifest().release_id(),
    ]);
    names
}

pub fn enroll_request() -> EnrollRequest {
    EnrollRequest {
        device_id: device_id(),
        tags: vec!["plant-3".into(), "line_2".into()],
        hardware: "revB".into(),
    }
}

pub fn batch_enroll_request() -> BatchEnrollRequest {
    let mut second = enroll_request();
    second.device_id = DeviceId::parse("dev-0002").expect("the sample device id is valid");
    second.tags.clear();
    BatchEnrollRequest {
        devices: vec![enroll_request(), second],
    }
}

pub fn create_deployment() -> CreateDeployment {
    CreateDeployment {
        release: manifest().release_id(),
        target: "fleet:plant-3".into(),
        allow_downgrade: true,
    }
}

pub fn error_body() -> ErrorBody {
    ErrorBody {
        error: "not-found".into(),
        message: "no release sensor-fw@9.9.9".into(),
    }
}

/// `job.json` contents: a link job just received, a push job installing,
/// jobs in the health check and rolling back, and a finished, failed one.
pub fn jobs() -> Vec<Job> {
    vec![
        Job {
            notification: notification(),
            delivery: Delivery::Link,
            stage: Stage::Received,
        },
        Job {
            notification: UpdateNotification {
                link: String::new(),
                ..notification()
            },
            delivery: Delivery::Push { chunk_size: 65536 },
            stage: Stage::Installing,
        },
        Job {
            notification: notification(),
            delivery: Delivery::Link,
            stage: Stage::HealthCheck,
        },
        Job {
            notification: notification(),
            delivery: Delivery::Link,
            stage: Stage::RollingBack {
                reason: "health check failed: exit 1".into(),
            },
        },
        Job {
            notification: notification(),
            delivery: Delivery::Link,
            stage: Stage::Finished {
                event: DeviceEvent::Failed,
                detail: Some("no safe state within 24h".into()),
            },
        },
    ]
}

/// `installed.json` contents.
pub fn installed() -> BTreeMap<String, Version> {
    registration().installed
}

/// `self-update.json` contents: staged, and rolled back with a reason.
pub fn markers() -> Vec<Marker> {
    let staged = Marker {
        deployment_id: DEPLOYMENT.into(),
        package: "otter-agent".into(),
        version: Version::new(0, 2, 0),
        previous_version: Some(Version::new(0, 1, 0)),
        sha256: digest(b"agent").sha256,
        timeout_seconds: 120,
        deadline: 1_764_000_120,
        state: MarkerState::Staged,
    };
    let rolled_back = Marker {
        previous_version: None,
        state: MarkerState::RolledBack {
            reason: "the new agent did not connect within 2m".into(),
        },
        ..staged.clone()
    };
    vec![staged, rolled_back]
}

/// An `agent.toml` as `otter device enroll` writes one, in `mode`; with a
/// command install handler and a safe-state probe when `commands` is set.
pub fn agent_toml(mode: Mode, commands: bool) -> String {
    let mut table = toml::Table::new();
    let mut set = |key: &str, value: toml::Value| {
        table.insert(key.to_owned(), value);
    };
    set("device_id", DEVICE.into());
    set("hardware", "revB".into());
    set("mode", mode.as_str().into());
    set("poll_interval", "30s".into());
    set("reconcile_interval", "6h".into());
    set("mqtt_url", "mqtts://ota.example:8883".into());
    set("device_url", "https://ota.example:8443".into());
    set("ca", "ca.crt".into());
    set("certificate", "device.crt".into());
    set("private_key", "device.key".into());
    set(
        "trusted_signers",
        toml::Value::Array(vec!["signers/signer-1.pub".into()]),
    );
    set("state_dir", "state".into());
    set("landing_zone", "/var/lib/otter/landing".into());
    if commands {
        set("safe_state", section(safe_state_with_probe()));
        set("install", section(command_install()));
        let mut download = toml::Table::new();
        download.insert("max_attempts".into(), toml::Value::Integer(3));
        download.insert("initial_backoff".into(), "500ms".into());
        download.insert("max_backoff".into(), "1m".into());
        set("download", toml::Value::Table(download));
        let mut self_update = toml::Table::new();
        self_update.insert("deadline".into(), "5m".into());
        set("self_update", toml::Value::Table(self_update));
    }
    toml::to_string(&table).unwrap_or_default()
}

/// Contents of `otter-agent-config` packages: a mode switch, new install
/// and probe commands, and one the agent must refuse (it names the device's
/// identity).
pub fn overlays() -> Vec<String> {
    let mut mode_switch = toml::Table::new();
    mode_switch.insert("mode".into(), Mode::Pull.as_str().into());
    mode_switch.insert("poll_interval".into(), "45s".into());
    mode_switch.insert("reconcile_interval".into(), "0s".into());
    let mut handlers = toml::Table::new();
    handlers.insert("safe_state".into(), section(safe_state_with_probe()));
    handlers.insert("install".into(), section(command_install()));
    let mut forbidden = toml::Table::new();
    forbidden.insert("device_id".into(), "someone-else".into());
    forbidden.insert("mode".into(), Mode::Push.as_str().into());
    [mode_switch, handlers, forbidden]
        .iter()
        .map(|table| toml::to_string(table).unwrap_or_default())
        .collect()
}

fn section(entries: Vec<(&str, toml::Value)>) -> toml::Value {
    toml::Value::Table(
        entries
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect(),
    )
}

fn safe_state_with_probe() -> Vec<(&'static str, toml::Value)> {
    vec![
        (
            "command",
            toml::Value::Array(vec!["/usr/bin/otter-safe".into(), "--quiet".into()]),
        ),
        ("initial_backoff", "2s".into()),
        ("max_backoff", "30s".into()),
        ("deadline", "1h".into()),
    ]
}

fn command_install() -> Vec<(&'static str, toml::Value)> {
    vec![
        ("handler", "command".into()),
        (
            "command",
            toml::Value::Array(vec![
                "/usr/sbin/flash".into(),
                "{payload}".into(),
                "{name}@{version}".into(),
            ]),
        ),
        ("timeout", "15m".into()),
    ]
}

/// Package files built by `build_package` with the trusted key: an empty
/// payload and a small, compressible one, in 1 KiB chunks so the artifact
/// spans several.
pub fn packages() -> std::io::Result<Vec<Vec<u8>>> {
    let payloads: [&[u8]; 2] = [b"", &b"sensor calibration table v7\n".repeat(60)];
    let mut packages = Vec::new();
    for payload in payloads {
        let mut options = BuildOptions::new(
            "sensor-fw",
            Version::new(1, 0, 0),
            PackageKind::Firmware,
            vec!["revB".into()],
        );
        options.chunk_size = 1024;
        let mut package = Vec::new();
        build_package(
            &mut &payload[..],
            &mut package,
            &trusted_key(),
            &options,
            &std::env::temp_dir(),
        )
        .map_err(std::io::Error::other)?;
        packages.push(package);
    }
    Ok(packages)
}
