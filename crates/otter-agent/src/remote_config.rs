//! Mode switch by update: the agent's own configuration as a package.
//!
//! A package of kind `config` named [`AGENT_CONFIG_PACKAGE`] carries a TOML
//! document with the part of `agent.toml` that may change remotely: the
//! top-level `mode`, `poll_interval` and `reconcile_interval`, and the
//! sections `[safe_state]`, `[install]` (not `target_dir`, nor the
//! `kinds` and `packages` overrides, which hold paths), `[download]` and
//! `[self_update]`. Identity, keys, URLs and paths stay in the device's own
//! file: a package naming them is refused ([`RemoteConfigError::Forbidden`]).
//!
//! Installing one ([`RemoteConfigInstaller`]) merges it over the base
//! `agent.toml` and any previous overlay, validates the merged document
//! exactly as [`AgentConfig`] validates a file (unknown key, bad duration,
//! bad mode, missing file…) and only then writes the combined overlay
//! atomically to `state_dir/remote-config.toml`. A refused package changes
//! nothing. [`AgentConfig::load`] applies the overlay on every start
//! ([`load_with_overlay`]), so the switched mode survives a restart; the
//! agent loop ends with `RunOutcome::Restart` after such an install and the
//! binary runs the agent again with the reloaded configuration.
//!
//! Merging: a top-level value of the overlay replaces the base's; a section
//! is merged key by key. Successive packages accumulate.
//!
//! Layout: constants and errors, the pure parts (check, merge, validate),
//! the file parts, then the installer.

use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use otter_proto::manifest::{Manifest, PackageKind};

use crate::config::{AgentConfig, ConfigError};
use crate::install::{InstallError, InstallRequest, Installer};
use crate::state::write_atomically;

/// The name of the package that configures the agent itself.
pub const AGENT_CONFIG_PACKAGE: &str = "otter-agent-config";

/// The overlay's file name in `state_dir`.
pub const OVERLAY_FILE: &str = "remote-config.toml";

/// Largest configuration document accepted, from a package or the overlay.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Top-level values a configuration package may set.
const ALLOWED_VALUES: &[&str] = &["mode", "poll_interval", "reconcile_interval"];
/// Sections a configuration package may set, key by key.
const ALLOWED_SECTIONS: &[&str] = &["safe_state", "install", "download", "self_update"];
/// Keys of `agent.toml` that only the device's own file may set.
const FORBIDDEN_KEYS: &[&str] = &[
    "device_id",
    "hardware",
    "mqtt_url",
    "device_url",
    "ca",
    "certificate",
    "private_key",
    "trusted_signers",
    "trusted_roots",
    "state_dir",
    "landing_zone",
    "inhibit_socket",
    "install.target_dir",
    // Overrides hold target folders of their own.
    "install.kinds",
    "install.packages",
];

/// Why a configuration package is refused or cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum RemoteConfigError {
    #[error("the configuration is not valid TOML: {0}")]
    Syntax(String),
    #[error(
        "`{key}` cannot be changed remotely: identity, keys, URLs and paths stay in the device's own agent.toml"
    )]
    Forbidden { key: String },
    #[error("`{key}` is not a setting a configuration package may change")]
    Unknown { key: String },
    #[error("`{key}` must be a table")]
    NotATable { key: String },
    #[error("the resulting configuration is invalid: {0}")]
    Invalid(#[from] ConfigError),
    #[error("this agent's configuration was not loaded from a file, so it cannot be changed")]
    NoSource,
    #[error("the configuration is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Is this the package that configures the agent itself?
pub fn is_agent_config(manifest: &Manifest) -> bool {
    manifest.kind == PackageKind::Config && manifest.name == AGENT_CONFIG_PACKAGE
}

/// Parses a configuration document and checks it names only settings that
/// may change remotely.
pub fn parse_overlay(text: &str) -> Result<toml::Table, RemoteConfigError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| RemoteConfigError::Syntax(e.to_string()))?;
    check_overlay(&table)?;
    Ok(table)
}

/// Checks every key of an overlay against the allowed and forbidden lists.
pub fn check_overlay(overlay: &toml::Table) -> Result<(), RemoteConfigError> {
    for (key, value) in overlay {
        if FORBIDDEN_KEYS.contains(&key.as_str()) {
            return Err(RemoteConfigError::Forbidden { key: key.clone() });
        }
        if ALLOWED_VALUES.contains(&key.as_str()) {
            continue;
        }
        if !ALLOWED_SECTIONS.contains(&key.as_str()) {
            return Err(RemoteConfigError::Unknown { key: key.clone() });
        }
        let toml::Value::Table(section) = value else {
            return Err(RemoteConfigError::NotATable { key: key.clone() });
        };
        for inner in section.keys() {
            let full = format!("{key}.{inner}");
            if FORBIDDEN_KEYS.contains(&full.as_str()) {
                return Err(RemoteConfigError::Forbidden { key: full });
            }
            // Other unknown keys inside a section are caught by the
            // validation of the merged document, which names them.
        }
    }
    Ok(())
}

/// Merges `overlay` into `base`: values replace, sections merge key by key.
pub fn merge(base: &mut toml::Table, overlay: &toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(section)), toml::Value::Table(changes)) => {
                for (inner, inner_value) in changes {
                    section.insert(inner.clone(), inner_value.clone());
                }
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Validates `base_text` with `overlay` merged over it, as a file in
/// `base_dir` would be (without checking files exist).
pub fn validate_merged(
    base_text: &str,
    overlay: &toml::Table,
    base_dir: &Path,
) -> Result<AgentConfig, RemoteConfigError> {
    let mut merged: toml::Table =
        toml::from_str(base_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    merge(&mut merged, overlay);
    let text = toml::to_string(&merged).map_err(|e| RemoteConfigError::Syntax(e.to_string()))?;
    Ok(AgentConfig::from_toml_str(&text, base_dir)?)
}

/// The overlay's path for a configuration whose state lives in `state_dir`.
pub fn overlay_path(state_dir: &Path) -> PathBuf {
    state_dir.join(OVERLAY_FILE)
}

/// `agent.toml` text with the overlay found in its `state_dir` applied; the
/// base alone when there is no overlay. An overlay that no longer validates
/// (e.g. written for a newer agent that was rolled back) is logged and
/// ignored rather than leaving the device without a running agent.
pub fn load_with_overlay(base_text: &str, base_dir: &Path) -> Result<AgentConfig, ConfigError> {
    let base = AgentConfig::from_toml_str(base_text, base_dir)?;
    let path = overlay_path(&base.state_dir);
    let overlay = match read_overlay(&path) {
        Ok(Some(overlay)) => overlay,
        Ok(None) => return Ok(base),
        Err(error) => {
            tracing::error!(%error, path = %path.display(), "ignoring the remote configuration");
            return Ok(base);
        }
    };
    match validate_merged(base_text, &overlay, base_dir) {
        Ok(config) => {
            tracing::info!(path = %path.display(), mode = config.mode.as_str(), "remote configuration applied");
            Ok(config)
        }
        Err(error) => {
            tracing::error!(%error, path = %path.display(), "ignoring the remote configuration");
            Ok(base)
        }
    }
}

/// The overlay in `path`, checked; `None` when there is none.
fn read_overlay(path: &Path) -> Result<Option<toml::Table>, RemoteConfigError> {
    match read_bounded(path) {
        Ok(text) => parse_overlay(&text).map(Some),
        Err(RemoteConfigError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

fn read_bounded(path: &Path) -> Result<String, RemoteConfigError> {
    use std::io::Read as _;
    let io = |action: &'static str| {
        let path = path.to_owned();
        move |source| RemoteConfigError::Io {
            action,
            path,
            source,
        }
    };
    let file = std::fs::File::open(path).map_err(io("cannot open"))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io("cannot read"))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(RemoteConfigError::TooLarge);
    }
    Ok(text)
}

/// Applies the configuration document in `payload` to the agent whose base
/// file is `source`: check, merge over base + previous overlay, validate
/// (files included), then write the combined overlay atomically. Returns the
/// configuration the agent will run with.
pub fn apply(source: &Path, payload: &Path) -> Result<AgentConfig, RemoteConfigError> {
    let incoming = parse_overlay(&read_bounded(payload)?)?;
    let base_text = read_bounded(source)?;
    let base_dir = match source.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = AgentConfig::from_toml_str(&base_text, &base_dir)?;
    let path = overlay_path(&base.state_dir);
    let mut combined = match read_overlay(&path) {
        Ok(previous) => previous.unwrap_or_default(),
        Err(error) => {
            tracing::warn!(%error, "the previous remote configuration is unusable; replacing it");
            toml::Table::new()
        }
    };
    merge(&mut combined, &incoming);
    let config = validate_merged(&base_text, &combined, &base_dir)?;
    config.check_files()?;
    let text = toml::to_string(&combined).map_err(|e| RemoteConfigError::Syntax(e.to_string()))?;
    write_atomically(&path, text.as_bytes()).map_err(|source| RemoteConfigError::Io {
        action: "cannot write",
        path: path.clone(),
        source,
    })?;
    Ok(config)
}

/// Installs the [`AGENT_CONFIG_PACKAGE`] package.
#[derive(Debug, Clone)]
pub struct RemoteConfigInstaller {
    /// The base `agent.toml`; `None` for a configuration not read from a file.
    source: Option<PathBuf>,
}

impl RemoteConfigInstaller {
    pub fn new(source: Option<PathBuf>) -> Self {
        RemoteConfigInstaller { source }
    }
}

impl Installer for RemoteConfigInstaller {
    fn name(&self) -> &'static str {
        "agent-config"
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        let source = self.source.clone();
        let payload = request.payload.clone();
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || {
                let source = source.ok_or(RemoteConfigError::NoSource)?;
                apply(&source, &payload)
            })
            .await
            .map_err(|e| InstallError::Task(e.to_string()))?;
            match result {
                Ok(config) => {
                    tracing::info!(mode = config.mode.as_str(), "remote configuration accepted");
                    Ok(())
                }
                Err(error) => Err(InstallError::Rejected(format!(
                    "configuration refused: {error}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otter_proto::messages::Mode;
    use std::time::Duration;

    const BASE: &str = r#"
device_id = "dev-1"
hardware = "revB"
mode = "push"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["signer.pub"]

[download]
max_attempts = 8
"#;

    /// A folder with `agent.toml` and the files it names.
    fn device() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.crt", "device.crt", "device.key", "signer.pub"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, BASE).unwrap();
        (dir, path)
    }

    fn package(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("payload");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn good_overlay_switches_mode_and_survives_a_reload() {
        let (dir, source) = device();
        assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::Push);
        let payload = package(
            dir.path(),
            "mode = \"push-pull\"\n[download]\ninitial_backoff = \"2s\"\n",
        );
        let config = apply(&source, &payload).unwrap();
        assert_eq!(config.mode, Mode::PushPull);
        assert_eq!(config.download.initial_backoff, Duration::from_secs(2));
        // The section merged key by key: the base's max_attempts stays.
        assert_eq!(config.download.max_attempts, 8);
        let overlay = dir.path().join("state").join(OVERLAY_FILE);
        assert!(overlay.is_file());

        let reloaded = AgentConfig::load(&source).unwrap();
        assert_eq!(reloaded.mode, Mode::PushPull);
        assert_eq!(reloaded.download.initial_backoff, Duration::from_secs(2));

        // A second package accumulates over the first.
        let payload = package(dir.path(), "[download]\nmax_attempts = 3\n");
        let config = apply(&source, &payload).unwrap();
        assert_eq!(config.mode, Mode::PushPull);
        assert_eq!(config.download.max_attempts, 3);
        assert_eq!(config.download.initial_backoff, Duration::from_secs(2));
    }

    #[test]
    fn bad_overlays_are_refused_and_nothing_is_written() {
        let cases = [
            ("device_url = \"https://evil:8443\"", "device_url"),
            ("trusted_signers = [\"mine.pub\"]", "trusted_signers"),
            ("[install]\ntarget_dir = \"/\"", "install.target_dir"),
            ("mode = \"carrier-pigeon\"", "carrier-pigeon"),
            (
                "[download]\ninitial_backoff = \"soon\"",
                "download.initial_backoff",
            ),
            ("[safe_state]\ndeadline = \"0s\"", "safe_state.deadline"),
            ("[download]\nretries = 3", "retries"),
            ("colour = \"blue\"", "colour"),
            ("download = 3", "download"),
            ("[install]\nhandler = \"command\"", "install.command"),
            ("mode = ", "TOML"),
        ];
        for (text, expected) in cases {
            let (dir, source) = device();
            let payload = package(dir.path(), text);
            let error = apply(&source, &payload).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(
                !dir.path().join("state").join(OVERLAY_FILE).exists(),
                "{text:?} wrote an overlay"
            );
            assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::Push);
        }
    }

    #[test]
    fn a_refused_package_keeps_the_previous_overlay() {
        let (dir, source) = device();
        apply(&source, &package(dir.path(), "mode = \"push-pull\"")).unwrap();
        let overlay = dir.path().join("state").join(OVERLAY_FILE);
        let before = std::fs::read(&overlay).unwrap();
        assert!(apply(&source, &package(dir.path(), "mode = \"nope\"")).is_err());
        assert_eq!(std::fs::read(&overlay).unwrap(), before);
        assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::PushPull);
    }

    #[test]
    fn an_overlay_that_no_longer_validates_is_ignored_at_load() {
        let (dir, source) = device();
        let overlay = dir.path().join("state").join(OVERLAY_FILE);
        std::fs::create_dir_all(overlay.parent().unwrap()).unwrap();
        std::fs::write(&overlay, "[download]\nfuture_setting = 1\n").unwrap();
        assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::Push);
        std::fs::write(&overlay, "mode = \"pull\"\n").unwrap();
        assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::Pull);
    }

    #[tokio::test]
    async fn installer_reports_the_reason() {
        let (dir, source) = device();
        let request = InstallRequest {
            deployment_id: "d1".into(),
            name: AGENT_CONFIG_PACKAGE.into(),
            version: semver::Version::new(1, 0, 0),
            kind: PackageKind::Config,
            payload: package(dir.path(), "ca = \"other.crt\""),
        };
        let error = RemoteConfigInstaller::new(Some(source.clone()))
            .install(&request)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("`ca` cannot be changed remotely"), "{error}");
        let error = RemoteConfigInstaller::new(None)
            .install(&request)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("not loaded from a file"), "{error}");
        let ok = InstallRequest {
            payload: package(dir.path(), "mode = \"push-pull\""),
            ..request
        };
        RemoteConfigInstaller::new(Some(source.clone()))
            .install(&ok)
            .await
            .unwrap();
        assert_eq!(AgentConfig::load(&source).unwrap().mode, Mode::PushPull);
    }
}
