//! `agent.toml`, as the agent reads it at every start.
//!
//! Properties: parsing never panics; an accepted configuration keeps what
//! `AgentConfig` promises the rest of the agent (a valid hardware name, at
//! least one signer, every path absolute once joined to the file's folder,
//! backoffs that do not shrink, at least one download attempt, a command
//! for the command handler, nothing the file may not set); and merging an
//! empty configuration package over it, which re-serialises the TOML,
//! gives back the same configuration.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use otter_agent::config::{AgentConfig, HandlerKind};
use otter_agent::remote_config::validate_merged;
use otter_proto::manifest::validate_name;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let folder = Path::new("/etc/otter");
    let Ok(config) = AgentConfig::from_toml_str(text, folder) else {
        return;
    };

    assert_eq!(validate_name(&config.hardware), Ok(()));
    assert!(!config.trusted_signers.is_empty());
    let paths = [
        &config.ca,
        &config.certificate,
        &config.private_key,
        &config.state_dir,
        &config.landing_zone,
        &config.install.default.target_dir,
    ];
    let handlers = || {
        std::iter::once(&config.install.default)
            .chain(config.install.kinds.values())
            .chain(config.install.packages.values())
    };
    let targets = handlers().map(|handler| &handler.target_dir);
    for path in paths
        .into_iter()
        .chain(&config.trusted_signers)
        .chain(targets)
    {
        assert!(path.is_absolute(), "{} is relative", path.display());
    }
    assert!(config.safe_state.initial_backoff <= config.safe_state.max_backoff);
    assert!(config.download.initial_backoff <= config.download.max_backoff);
    assert!(config.download.max_attempts >= 1);
    for handler in handlers() {
        if handler.handler == HandlerKind::Command {
            assert!(!handler.command.is_empty());
        } else {
            assert!(handler.rollback_command.is_empty());
        }
    }
    assert!(config.install.kinds.keys().all(|kind| kind != "agent"));
    if let Some(health) = &config.health {
        assert!(!health.command.is_empty() && !health.deadline.is_zero());
    }
    assert_eq!(config.source, None);
    assert_eq!(config.self_update.executable, None);

    let merged = validate_merged(text, &toml::Table::new(), folder);
    assert!(
        matches!(&merged, Ok(merged) if merged == &config),
        "an empty overlay changed the configuration: {merged:?}"
    );
});
