//! MQTT topic names and device identifiers.
//!
//! Every device owns the prefix `otter/devices/<id>/` and nothing else. Under
//! it the device publishes [`DeviceTopic::Register`], [`DeviceTopic::Status`]
//! and [`DeviceTopic::Ack`] and subscribes to [`DeviceTopic::Notify`] and
//! [`DeviceTopic::Chunk`], which only the server publishes to.

use std::fmt;

/// Prefix shared by all device topics.
pub const DEVICE_TOPIC_ROOT: &str = "otter/devices/";

/// Longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// The topics under one device's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    /// Device → server: [`crate::messages::Registration`].
    Register,
    /// Device → server: [`crate::messages::StatusReport`].
    Status,
    /// Server → device: [`crate::messages::ServerMessage`].
    Notify,
    /// Device → server, push mode: [`crate::messages::PushAck`].
    Ack,
    /// Server → device, push mode: binary [`crate::push::PushChunk`]s.
    Chunk,
}

impl DeviceTopic {
    pub const ALL: [DeviceTopic; 5] = [
        DeviceTopic::Register,
        DeviceTopic::Status,
        DeviceTopic::Notify,
        DeviceTopic::Ack,
        DeviceTopic::Chunk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceTopic::Register => "register",
            DeviceTopic::Status => "status",
            DeviceTopic::Notify => "notify",
            DeviceTopic::Ack => "ack",
            DeviceTopic::Chunk => "chunk",
        }
    }

    /// Whether the device itself may publish on this topic.
    pub fn device_may_publish(self) -> bool {
        matches!(
            self,
            DeviceTopic::Register | DeviceTopic::Status | DeviceTopic::Ack
        )
    }

    /// Whether the device may subscribe to this topic.
    pub fn device_may_subscribe(self) -> bool {
        matches!(self, DeviceTopic::Notify | DeviceTopic::Chunk)
    }
}

/// Full topic name for `topic` of device `device_id`.
pub fn device_topic(device_id: &DeviceId, topic: DeviceTopic) -> String {
    format!(
        "{DEVICE_TOPIC_ROOT}{}/{}",
        device_id.as_str(),
        topic.as_str()
    )
}

/// Splits a topic into the device id and the device topic, or `None` when the
/// topic is not exactly `otter/devices/<valid id>/<known topic>` (wildcards
/// included: `+` and `#` are not valid id characters).
pub fn parse_device_topic(topic: &str) -> Option<(DeviceId, DeviceTopic)> {
    let rest = topic.strip_prefix(DEVICE_TOPIC_ROOT)?;
    let (id, leaf) = rest.split_once('/')?;
    let device_id = DeviceId::parse(id).ok()?;
    let kind = DeviceTopic::ALL.into_iter().find(|t| t.as_str() == leaf)?;
    Some((device_id, kind))
}

/// A validated device identifier: 1 to 64 bytes of ASCII letters, digits,
/// `-`, `_` and `.`, not starting with `.` or `-`. The same string is the
/// certificate common name, the MQTT client id and the topic segment, so it
/// must be safe in all three.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} bytes")]
    TooLong,
    #[error(
        "device id may contain only letters, digits, '-', '_' and '.', and may not start with '-' or '.'"
    )]
    BadCharacter,
}

impl DeviceId {
    pub fn parse(id: &str) -> Result<Self, DeviceIdError> {
        if id.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        if id.len() > MAX_DEVICE_ID_LEN {
            return Err(DeviceIdError::TooLong);
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if !id.chars().all(allowed) || id.starts_with(['.', '-']) {
            return Err(DeviceIdError::BadCharacter);
        }
        Ok(DeviceId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic filter covering everything this device may touch.
    pub fn topic_prefix(&self) -> String {
        format!("{DEVICE_TOPIC_ROOT}{}/", self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceId::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for ok in ["a", "dev-1", "plant3.line_2", &"x".repeat(64)] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok}");
        }
        let cases = [
            ("", DeviceIdError::Empty),
            (&"x".repeat(65) as &str, DeviceIdError::TooLong),
            ("a/b", DeviceIdError::BadCharacter),
            ("+", DeviceIdError::BadCharacter),
            ("#", DeviceIdError::BadCharacter),
            ("-a", DeviceIdError::BadCharacter),
            (".a", DeviceIdError::BadCharacter),
            ("é", DeviceIdError::BadCharacter),
        ];
        for (input, err) in cases {
            assert_eq!(DeviceId::parse(input), Err(err), "{input:?}");
        }
    }

    #[test]
    fn topics_round_trip() {
        let id = DeviceId::parse("dev-1").unwrap();
        for t in DeviceTopic::ALL {
            let name = device_topic(&id, t);
            assert_eq!(parse_device_topic(&name), Some((id.clone(), t)));
        }
    }

    #[test]
    fn foreign_and_wildcard_topics_are_not_device_topics() {
        for bad in [
            "otter/devices/+/status",
            "otter/devices/#",
            "otter/devices/dev-1/status/extra",
            "otter/devices/dev-1/unknown",
            "otter/devices//status",
            "other/dev-1/status",
            "otter/devices/dev-1",
        ] {
            assert_eq!(parse_device_topic(bad), None, "{bad}");
        }
    }
}
