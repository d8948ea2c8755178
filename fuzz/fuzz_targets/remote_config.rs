//! The content of an `otter-agent-config` package, checked and merged over
//! the device's own `agent.toml` (two real ones: push-pull with defaults,
//! and pull with install and probe commands).
//!
//! Properties: parsing never panics; an overlay that passes the check names
//! none of the device's own keys; and whatever the merged configuration
//! becomes, identity, keys, URLs and paths stay those of the device's file
//! (the invariant in ARCHITECTURE.md).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use otter_agent::config::AgentConfig;
use otter_agent::remote_config::{parse_overlay, validate_merged};
use otter_fuzz_support::samples::agent_toml;
use otter_proto::messages::Mode;

/// Keys only the device's own file may set.
const DEVICE_KEYS: [&str; 10] = [
    "device_id",
    "hardware",
    "mqtt_url",
    "device_url",
    "ca",
    "certificate",
    "private_key",
    "trusted_signers",
    "state_dir",
    "landing_zone",
];

const FOLDER: &str = "/etc/otter";

/// The base files and their parsed configurations.
fn bases() -> &'static [(String, AgentConfig); 2] {
    static BASES: OnceLock<[(String, AgentConfig); 2]> = OnceLock::new();
    BASES.get_or_init(|| {
        [
            agent_toml(Mode::PushPull, false),
            agent_toml(Mode::Pull, true),
        ]
        .map(|text| {
            let config = AgentConfig::from_toml_str(&text, Path::new(FOLDER))
                .expect("the sample agent.toml is valid");
            (text, config)
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(overlay) = parse_overlay(text) else {
        return;
    };
    for key in DEVICE_KEYS {
        assert!(!overlay.contains_key(key), "`{key}` passed the check");
    }
    if let Some(install) = overlay.get("install").and_then(|value| value.as_table()) {
        assert!(!install.contains_key("target_dir"));
    }

    for (base_text, base) in bases() {
        let Ok(merged) = validate_merged(base_text, &overlay, Path::new(FOLDER)) else {
            continue;
        };
        assert_eq!(merged.device_id, base.device_id);
        assert_eq!(merged.hardware, base.hardware);
        assert_eq!(merged.mqtt, base.mqtt);
        assert_eq!(merged.device_url, base.device_url);
        assert_eq!(merged.ca, base.ca);
        assert_eq!(merged.certificate, base.certificate);
        assert_eq!(merged.private_key, base.private_key);
        assert_eq!(merged.trusted_signers, base.trusted_signers);
        assert_eq!(merged.state_dir, base.state_dir);
        assert_eq!(merged.landing_zone, base.landing_zone);
        assert_eq!(
            merged.install.default.target_dir,
            base.install.default.target_dir
        );
        // The overrides hold paths: only the device's own file sets them.
        assert_eq!(merged.install.kinds, base.install.kinds);
        assert_eq!(merged.install.packages, base.install.packages);
        assert_eq!(merged.health, base.health);
    }
});
