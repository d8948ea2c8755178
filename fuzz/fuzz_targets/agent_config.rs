//! `agent.toml`, and agent-configuration packages merged over it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = otter_agent::config::AgentConfig::from_toml_str(text, std::path::Path::new("/nonexistent"));
    }
});
