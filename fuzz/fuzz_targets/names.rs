//! Names that arrive as text: MQTT topic names (the broker's ACL hook and
//! the server's inbound handler), device ids (certificate common name, MQTT
//! client id, API paths and bodies), deployment targets and release ids
//! (operator API and CLI).
//!
//! Properties: parsing never panics, and every accepted name is canonical:
//! it prints back to exactly the input, so no two strings name the same
//! device, topic, target or release. A device id is a safe topic segment:
//! the topic built from it parses back to the same device and topic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otter_proto::api::Target;
use otter_proto::manifest::parse_release_id;
use otter_proto::topics::{
    DeviceId, DeviceTopic, MAX_DEVICE_ID_LEN, device_topic, parse_device_topic,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Some((device_id, topic)) = parse_device_topic(text) {
        assert_eq!(device_topic(&device_id, topic), text);
    }

    let parsed = DeviceId::parse(text);
    // The serde path (API bodies, EnrollRequest) applies the same rules.
    let from_json: Result<DeviceId, _> = serde_json::from_value(text.into());
    assert_eq!(parsed.as_ref().ok(), from_json.as_ref().ok());
    if let Ok(device_id) = parsed {
        assert_eq!(device_id.as_str(), text);
        assert!(text.len() <= MAX_DEVICE_ID_LEN);
        assert!(!text.contains(['/', '+', '#', '\0']), "{text:?}");
        for topic in DeviceTopic::ALL {
            let name = device_topic(&device_id, topic);
            assert_eq!(parse_device_topic(&name), Some((device_id.clone(), topic)));
            assert!(name.starts_with(&device_id.topic_prefix()));
        }
    }

    if let Ok(target) = Target::parse(text) {
        assert_eq!(target.to_string(), text);
    }

    if let Ok((name, version)) = parse_release_id(text) {
        assert_eq!(format!("{name}@{version}"), text);
    }
});
