//! Messages exchanged over MQTT between a device and the server.
//!
//! All are JSON. Device → server: [`Registration`] on `register`,
//! [`StatusReport`] on `status`. Server → device: [`ServerMessage`] on
//! `notify`. Every message from a peer goes through [`decode`], which bounds
//! its size and turns any malformation into a [`DecodeError`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::manifest::SignedManifest;

/// The three ways a device receives updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Mode {
    /// The server sends the payload itself.
    #[serde(rename = "push")]
    Push,
    /// The device polls and downloads.
    #[serde(rename = "pull")]
    Pull,
    /// The server notifies; the device downloads when ready.
    #[default]
    #[serde(rename = "push-pull")]
    PushPull,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Push => "push",
            Mode::Pull => "pull",
            Mode::PushPull => "push-pull",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "push" => Ok(Mode::Push),
            "pull" => Ok(Mode::Pull),
            "push-pull" => Ok(Mode::PushPull),
            other => Err(format!(
                "unknown mode {other:?} (expected push, pull or push-pull)"
            )),
        }
    }
}

/// Step 1: a device announces itself, on every (re)connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// [`crate::PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// Hardware model, matched against a manifest's `hardware`.
    pub hardware: String,
    /// Installed package versions, by package name.
    pub installed: BTreeMap<String, semver::Version>,
    pub agent_version: String,
    pub mode: Mode,
    /// Free-form capability names (`"file"`, `"command"`, `"range"`, ...).
    pub capabilities: Vec<String>,
    /// Standard base64 of the device's 32-byte X25519 public encryption key:
    /// the server wraps each release's data key to it (HPKE). Absent from
    /// agents older than per-device wrapping; such a device is sent no
    /// release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

/// Server → device, on the device's `notify` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    /// Step 4: an update is available at a temporary link.
    Update(UpdateNotification),
    /// The server could not accept something the device sent.
    Error(ErrorMessage),
    /// Push mode: the artifact itself follows on the device's `chunk` topic.
    /// The device answers with a [`PushAck`] giving the offset it already
    /// holds (0, or more when resuming), and acknowledges as it goes.
    PushOffer(PushOffer),
}

/// Push mode: what a device needs to receive, check and install a release
/// whose artifact the server sends over MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushOffer {
    pub deployment_id: String,
    /// `name@version`.
    pub release: String,
    pub manifest: SignedManifest,
    /// The release's data key, HPKE-wrapped to this device (see
    /// [`UpdateNotification`]).
    pub wrapped_key: String,
    /// Size of every chunk but the last, in bytes (at most
    /// [`crate::push::MAX_CHUNK_BYTES`]).
    pub chunk_size: u32,
    /// The deployment allows a downgrade (see [`UpdateNotification`]).
    #[serde(default, skip_serializing_if = "crate::manifest::is_false")]
    pub allow_downgrade: bool,
    /// The signer revocation list in force (see [`UpdateNotification`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_revocations: Option<Box<crate::trust::SignedRevocationList>>,
}

/// Push mode, device → server on `ack`: every byte before `offset` of the
/// deployment's artifact is durably written on the device; send from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushAck {
    pub deployment_id: String,
    pub offset: u64,
}

/// Pull mode (and the push-pull reconcile poll): the answer to a poll of the
/// device HTTPS endpoint, `POST /v1/poll` with the device's [`Registration`]
/// as body. Nothing pending is `update: None` (or `304 Not Modified` when
/// the device's `If-None-Match` equals the answer's `ETag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollResponse {
    /// The pending update with its temporary link, as in push-pull.
    pub update: Option<UpdateNotification>,
}

/// Step 4/5: what a device needs to fetch and install one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateNotification {
    pub deployment_id: String,
    /// `name@version`.
    pub release: String,
    pub manifest: SignedManifest,
    /// `https://` URL of the temporary, per-device download link.
    pub link: String,
    /// Unix seconds after which the link answers 410.
    pub link_expires_at: i64,
    /// The release's 32-byte data key, HPKE-wrapped to this device's
    /// encryption key and bound to its device id, the release and the
    /// manifest's artifact sha256 (`otter_package::wrap`): standard base64 of
    /// `enc || ciphertext`. Only this device can open it. (`data_key` is the
    /// name jobs persisted by older agents used; such a key no longer opens.)
    #[serde(alias = "data_key")]
    pub wrapped_key: String,
    /// The deployment allows installing this release over a newer version
    /// (`otter deploy create --allow-downgrade`). The device downgrades only
    /// when the signed manifest allows it too (`job::decide`). Absent means
    /// false, and false is not sent, so older agents still read the message.
    #[serde(default, skip_serializing_if = "crate::manifest::is_false")]
    pub allow_downgrade: bool,
    /// The signer revocation list in force on the server, root-signed: the
    /// device keeps the newest valid list it has seen and refuses packages
    /// by the keys it names. Absent when none was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_revocations: Option<Box<crate::trust::SignedRevocationList>>,
}

/// An error answer to a device message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMessage {
    /// Short machine-readable code, e.g. `malformed-message`.
    pub code: String,
    pub message: String,
}

/// Steps 5–8: progress of one device on one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub deployment_id: String,
    pub event: DeviceEvent,
    /// Optional human-readable detail (an error reason, a note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a device reports about a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceEvent {
    /// Step 5: the notification arrived.
    Received,
    /// Step 6: downloaded, verified, decrypted, decompressed, landed.
    Downloaded,
    /// Step 7: safe state reached, install started.
    Installing,
    /// Step 8: installed; the new version runs.
    Installed,
    /// Step 8: download, verification or install failed; `detail` says why.
    Failed,
    /// Step 8: installed, then rolled back.
    RolledBack,
}

impl DeviceEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceEvent::Received => "received",
            DeviceEvent::Downloaded => "downloaded",
            DeviceEvent::Installing => "installing",
            DeviceEvent::Installed => "installed",
            DeviceEvent::Failed => "failed",
            DeviceEvent::RolledBack => "rolled-back",
        }
    }
}

/// Why bytes from a peer are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the limit of {max} bytes", max = crate::MAX_MESSAGE_BYTES)]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Decodes a JSON message from a peer, bounded by [`crate::MAX_MESSAGE_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > crate::MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Encodes a message. Serialising these types cannot fail (no maps with
/// non-string keys, no custom serialisers that error).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_round_trip() {
        let reg = Registration {
            protocol: 1,
            hardware: "revB".into(),
            installed: [("fw".to_string(), semver::Version::new(1, 0, 0))].into(),
            agent_version: "0.1.0".into(),
            mode: Mode::PushPull,
            capabilities: vec!["file".into()],
            encryption_key: Some("a2V5".into()),
        };
        let bytes = encode(&reg);
        assert_eq!(decode::<Registration>(&bytes).unwrap(), reg);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"mode\":\"push-pull\""), "{text}");
    }

    #[test]
    fn report_and_server_message_shapes() {
        let report = StatusReport {
            deployment_id: "d1".into(),
            event: DeviceEvent::RolledBack,
            detail: None,
        };
        assert_eq!(
            String::from_utf8(encode(&report)).unwrap(),
            r#"{"deployment_id":"d1","event":"rolled-back"}"#
        );
        let err = ServerMessage::Error(ErrorMessage {
            code: "x".into(),
            message: "y".into(),
        });
        assert_eq!(
            String::from_utf8(encode(&err)).unwrap(),
            r#"{"type":"error","code":"x","message":"y"}"#
        );
        assert_eq!(decode::<ServerMessage>(&encode(&err)).unwrap(), err);
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(matches!(
            decode::<StatusReport>(b"\xff\xfe"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<StatusReport>(b"{}"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<StatusReport>(br#"{"deployment_id":"d","event":"exploded"}"#),
            Err(DecodeError::Malformed(_))
        ));
        let big = vec![b' '; crate::MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            decode::<StatusReport>(&big),
            Err(DecodeError::TooLarge(big.len()))
        );
    }
}
