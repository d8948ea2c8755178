//! The agent's configuration file, `agent.toml`.
//!
//! The file is parsed into [`RawConfig`] (serde, `deny_unknown_fields`, the
//! shape of the TOML) and then validated into [`AgentConfig`]: durations
//! parsed, URLs checked, relative paths resolved against the folder of the
//! file, and the files the agent needs at start-up checked to exist. Every
//! problem becomes a [`ConfigError`] that names the key at fault.
//!
//! Layout: the validated types first ([`AgentConfig`] and its sections), then
//! the raw serde shapes, then loading and validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use otter_proto::manifest::PackageKind;
use otter_proto::messages::Mode;
use otter_proto::topics::DeviceId;
use serde::Deserialize;

/// Default MQTT-over-TLS port (`DESIGN.md`).
pub const DEFAULT_MQTT_PORT: u16 = 8883;

/// A validated agent configuration. Paths are absolute or relative to the
/// process's working directory (already joined with the file's folder).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    /// Hardware model, matched against a manifest's `hardware` list.
    pub hardware: String,
    pub mode: Mode,
    /// Pull mode: time between two polls of the device endpoint (± 10 %
    /// jitter).
    pub poll_interval: Duration,
    /// Push-pull: time between two reconcile polls (± 10 % jitter), which
    /// pick up a notification the device missed; `None` (`"0s"`) disables
    /// them.
    pub reconcile_interval: Option<Duration>,
    pub mqtt: MqttEndpoint,
    /// Base URL of the device HTTPS endpoint (links in notifications are
    /// absolute, so push-pull does not use it; pull mode will).
    pub device_url: String,
    /// PEM file with the CA that signed the server certificates; the only root.
    pub ca: PathBuf,
    /// PEM file with the device certificate (chain).
    pub certificate: PathBuf,
    /// PEM file with the device private key.
    pub private_key: PathBuf,
    /// PEM Ed25519 public keys a manifest signature must verify against.
    pub trusted_signers: Vec<PathBuf>,
    /// PEM Ed25519 public keys of offline roots: a manifest signed by a key
    /// one of them certified (certificate in the manifest) is accepted too.
    pub trusted_roots: Vec<PathBuf>,
    /// Where `job.json` and `installed.json` live.
    pub state_dir: PathBuf,
    /// The device's X25519 encryption key file (`otter_package::wrap`),
    /// created at first start if missing (mode 0600, never overwritten);
    /// `<state_dir>/encryption.key` by default.
    pub encryption_key: PathBuf,
    /// The Unix socket where programs on the device take inhibitors
    /// (`crate::inhibit`); `<state_dir>/inhibit.sock` by default.
    pub inhibit_socket: PathBuf,
    /// Where downloads and unpacked payloads wait for installation.
    pub landing_zone: PathBuf,
    pub safe_state: SafeStateConfig,
    pub install: InstallConfig,
    /// `[health]`: the check after an install; `None` installs unchecked.
    pub health: Option<HealthConfig>,
    pub download: DownloadConfig,
    pub self_update: SelfUpdateConfig,
    /// The `agent.toml` this was loaded from (`None` from
    /// [`AgentConfig::from_toml_str`]); a configuration package merges over it.
    pub source: Option<PathBuf>,
}

/// `[self_update]`: how a new agent executable is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfUpdateConfig {
    /// A new agent that has not connected and confirmed within this long is
    /// replaced by the previous one.
    pub deadline: Duration,
    /// The running executable, set by `otter-agent --worker` (never read from
    /// the file); `None` means no supervisor runs this agent and a package of
    /// kind `agent` is refused.
    pub executable: Option<PathBuf>,
}

/// Host and port of the MQTT broker, from `mqtt_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Also the TLS server name: an IP literal must be in the certificate's SANs.
    pub host: String,
    pub port: u16,
}

/// `[safe_state]`: when may the device install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeStateConfig {
    /// Probe argv; empty means "always safe". Exit status 0 means safe.
    pub command: Vec<String>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No safe state within this long after the wait began: the job fails.
    pub deadline: Duration,
}

/// Which install handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// Copy the payload to `target_dir/<package name>` atomically.
    File,
    /// Run a command with the payload path.
    Command,
    /// Unpack a tar payload into `target_dir/<name>/versions/<version>` and
    /// switch the `current` symlink.
    Archive,
}

/// `[install]`: the default handler and its overrides per package kind
/// (`[install.kinds.<kind>]`) and per package name
/// (`[install.packages.<name>]`). A name override wins over a kind
/// override, which wins over the default; an override's missing keys are
/// taken from `[install]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallConfig {
    pub default: HandlerConfig,
    pub kinds: BTreeMap<String, HandlerConfig>,
    pub packages: BTreeMap<String, HandlerConfig>,
}

impl InstallConfig {
    /// The handler settings for a package.
    pub fn for_package(&self, kind: PackageKind, name: &str) -> &HandlerConfig {
        self.packages
            .get(name)
            .or_else(|| self.kinds.get(kind.as_str()))
            .unwrap_or(&self.default)
    }
}

/// One install handler's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerConfig {
    pub handler: HandlerKind,
    /// Target folder of the `file` and `archive` handlers.
    pub target_dir: PathBuf,
    /// Argv of the `command` handler; `{payload}`, `{name}` and `{version}`
    /// are substituted.
    pub command: Vec<String>,
    /// Argv the `command` handler runs to roll an install back (same
    /// substitutions); empty means it cannot roll back.
    pub rollback_command: Vec<String>,
    pub timeout: Duration,
}

/// `[health]`: the check that confirms an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Argv; exit status 0 means healthy. Run again, with a short backoff,
    /// until it succeeds or `deadline` passes.
    pub command: Vec<String>,
    /// No healthy answer within this long after the install: roll back.
    pub deadline: Duration,
}

/// `[download]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadConfig {
    /// Attempts in a row without progress before the download fails.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, unknown keys, wrong types, unknown mode or handler: the
    /// message from `toml` names the key and shows the line.
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("`{key}` names {path}, which does not exist or is not a file")]
    MissingFile { key: &'static str, path: PathBuf },
}

/// The TOML shape of `agent.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device_id: String,
    pub hardware: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: String,
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: String,
    pub mqtt_url: String,
    pub device_url: String,
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    #[serde(default)]
    pub trusted_signers: Vec<PathBuf>,
    #[serde(default)]
    pub trusted_roots: Vec<PathBuf>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub encryption_key: Option<PathBuf>,
    #[serde(default)]
    pub inhibit_socket: Option<PathBuf>,
    #[serde(default = "default_landing_zone")]
    pub landing_zone: PathBuf,
    #[serde(default)]
    pub safe_state: RawSafeState,
    #[serde(default)]
    pub install: RawInstall,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub download: RawDownload,
    #[serde(default)]
    pub self_update: RawSelfUpdate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSelfUpdate {
    pub deadline: String,
}

impl Default for RawSelfUpdate {
    fn default() -> Self {
        RawSelfUpdate {
            deadline: "2m".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSafeState {
    pub command: Vec<String>,
    pub initial_backoff: String,
    pub max_backoff: String,
    pub deadline: String,
}

impl Default for RawSafeState {
    fn default() -> Self {
        RawSafeState {
            command: Vec::new(),
            initial_backoff: "1s".into(),
            max_backoff: "60s".into(),
            deadline: "24h".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInstall {
    pub handler: HandlerKind,
    pub target_dir: PathBuf,
    pub command: Vec<String>,
    pub rollback_command: Vec<String>,
    pub timeout: String,
    /// `[install.kinds.<kind>]`: overrides per package kind.
    pub kinds: BTreeMap<String, RawInstallOverride>,
    /// `[install.packages.<name>]`: overrides per package name.
    pub packages: BTreeMap<String, RawInstallOverride>,
}

impl Default for RawInstall {
    fn default() -> Self {
        RawInstall {
            handler: HandlerKind::File,
            target_dir: "installed".into(),
            command: Vec::new(),
            rollback_command: Vec::new(),
            timeout: "10m".into(),
            kinds: BTreeMap::new(),
            packages: BTreeMap::new(),
        }
    }
}

/// An override of `[install]`: missing keys are taken from `[install]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstallOverride {
    pub handler: Option<HandlerKind>,
    pub target_dir: Option<PathBuf>,
    pub command: Option<Vec<String>>,
    pub rollback_command: Option<Vec<String>>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// Empty (the default): no health check.
    pub command: Vec<String>,
    pub deadline: String,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            command: Vec::new(),
            deadline: "60s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDownload {
    pub max_attempts: u32,
    pub initial_backoff: String,
    pub max_backoff: String,
}

impl Default for RawDownload {
    fn default() -> Self {
        RawDownload {
            max_attempts: 8,
            initial_backoff: "1s".into(),
            max_backoff: "60s".into(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    "state".into()
}

fn default_poll_interval() -> String {
    "30s".into()
}

fn default_reconcile_interval() -> String {
    "6h".into()
}

fn default_landing_zone() -> PathBuf {
    "landing".into()
}

impl AgentConfig {
    /// Reads, parses and validates `path`; relative paths in it are relative
    /// to the folder holding `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        // The overlay of an installed configuration package, if any, is
        // merged in and validated here, on every start.
        let mut config = crate::remote_config::load_with_overlay(&text, &base)?;
        config.source = Some(path.to_owned());
        config.check_files()?;
        Ok(config)
    }

    /// Parses and validates TOML text without touching the file system;
    /// relative paths are joined to `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        AgentConfig::from_raw(raw, base_dir)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> Result<AgentConfig, ConfigError> {
        let device_id = DeviceId::parse(&raw.device_id).map_err(|e| ConfigError::Invalid {
            key: "device_id",
            reason: e.to_string(),
        })?;
        otter_proto::manifest::validate_name(&raw.hardware).map_err(|reason| {
            ConfigError::Invalid {
                key: "hardware",
                reason,
            }
        })?;
        let mqtt = parse_mqtt_url(&raw.mqtt_url)?;
        let device_url = parse_device_url(&raw.device_url)?;
        if raw.trusted_signers.is_empty() && raw.trusted_roots.is_empty() {
            return Err(ConfigError::Invalid {
                key: "trusted_signers",
                reason: "at least one signer key (or a root key in trusted_roots) is needed, \
                         or no package could ever be installed"
                    .into(),
            });
        }
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let safe_state = SafeStateConfig {
            command: raw.safe_state.command,
            initial_backoff: duration(
                "safe_state.initial_backoff",
                &raw.safe_state.initial_backoff,
            )?,
            max_backoff: duration("safe_state.max_backoff", &raw.safe_state.max_backoff)?,
            deadline: duration("safe_state.deadline", &raw.safe_state.deadline)?,
        };
        check_backoff(
            "safe_state.max_backoff",
            safe_state.initial_backoff,
            safe_state.max_backoff,
        )?;

        let install = install_config(raw.install, &resolve)?;
        let health = if raw.health.command.is_empty() {
            None
        } else {
            Some(HealthConfig {
                command: raw.health.command,
                deadline: duration("health.deadline", &raw.health.deadline)?,
            })
        };

        let download = DownloadConfig {
            max_attempts: raw.download.max_attempts,
            initial_backoff: duration("download.initial_backoff", &raw.download.initial_backoff)?,
            max_backoff: duration("download.max_backoff", &raw.download.max_backoff)?,
        };
        if download.max_attempts == 0 {
            return Err(ConfigError::Invalid {
                key: "download.max_attempts",
                reason: "must be at least 1".into(),
            });
        }
        check_backoff(
            "download.max_backoff",
            download.initial_backoff,
            download.max_backoff,
        )?;

        let self_update = SelfUpdateConfig {
            deadline: duration("self_update.deadline", &raw.self_update.deadline)?,
            executable: None,
        };

        Ok(AgentConfig {
            device_id,
            hardware: raw.hardware,
            mode: raw.mode,
            poll_interval: duration("poll_interval", &raw.poll_interval)?,
            reconcile_interval: optional_duration("reconcile_interval", &raw.reconcile_interval)?,
            mqtt,
            device_url,
            ca: resolve(&raw.ca),
            certificate: resolve(&raw.certificate),
            private_key: resolve(&raw.private_key),
            trusted_signers: raw.trusted_signers.iter().map(|p| resolve(p)).collect(),
            trusted_roots: raw.trusted_roots.iter().map(|p| resolve(p)).collect(),
            state_dir: resolve(&raw.state_dir),
            encryption_key: match &raw.encryption_key {
                Some(path) => resolve(path),
                None => resolve(&raw.state_dir).join("encryption.key"),
            },
            inhibit_socket: match &raw.inhibit_socket {
                Some(path) => resolve(path),
                None => resolve(&raw.state_dir).join("inhibit.sock"),
            },
            landing_zone: resolve(&raw.landing_zone),
            safe_state,
            install,
            health,
            download,
            self_update,
            source: None,
        })
    }

    /// Checks that the files the agent reads at start-up exist.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut files: Vec<(&'static str, &Path)> = vec![
            ("ca", &self.ca),
            ("certificate", &self.certificate),
            ("private_key", &self.private_key),
        ];
        files.extend(
            self.trusted_signers
                .iter()
                .map(|p| ("trusted_signers", p.as_path())),
        );
        files.extend(
            self.trusted_roots
                .iter()
                .map(|p| ("trusted_roots", p.as_path())),
        );
        for (key, path) in files {
            if !path.is_file() {
                return Err(ConfigError::MissingFile {
                    key,
                    path: path.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Validates `[install]` and its overrides.
fn install_config(
    raw: RawInstall,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<InstallConfig, ConfigError> {
    let default = HandlerConfig {
        handler: raw.handler,
        target_dir: resolve(&raw.target_dir),
        command: raw.command,
        rollback_command: raw.rollback_command,
        timeout: duration("install.timeout", &raw.timeout)?,
    };
    check_handler(&default, "install.command", "install.rollback_command")?;
    let merged = |key: &'static str, o: RawInstallOverride| -> Result<HandlerConfig, ConfigError> {
        let handler = HandlerConfig {
            handler: o.handler.unwrap_or(default.handler),
            target_dir: o
                .target_dir
                .map(|path| resolve(&path))
                .unwrap_or_else(|| default.target_dir.clone()),
            command: o.command.unwrap_or_else(|| default.command.clone()),
            rollback_command: o
                .rollback_command
                .unwrap_or_else(|| default.rollback_command.clone()),
            timeout: match o.timeout {
                Some(text) => duration(key, &text)?,
                None => default.timeout,
            },
        };
        check_handler(&handler, key, key)?;
        Ok(handler)
    };
    let mut kinds = BTreeMap::new();
    for (kind, raw_override) in raw.kinds {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "install.kinds",
            reason,
        };
        let parsed: PackageKind = kind
            .parse()
            .map_err(|_| invalid(format!("{kind:?} is not a package kind")))?;
        if parsed == PackageKind::Agent {
            return Err(invalid(
                "packages of kind \"agent\" are always installed by the self-update".into(),
            ));
        }
        kinds.insert(kind, merged("install.kinds", raw_override)?);
    }
    let mut packages = BTreeMap::new();
    for (name, raw_override) in raw.packages {
        otter_proto::manifest::validate_name(&name).map_err(|reason| ConfigError::Invalid {
            key: "install.packages",
            reason: format!("{name:?}: {reason}"),
        })?;
        packages.insert(name, merged("install.packages", raw_override)?);
    }
    Ok(InstallConfig {
        default,
        kinds,
        packages,
    })
}

/// The checks every handler's settings pass; the keys name what is wrong.
fn check_handler(
    handler: &HandlerConfig,
    command_key: &'static str,
    rollback_key: &'static str,
) -> Result<(), ConfigError> {
    if handler.handler == HandlerKind::Command && handler.command.is_empty() {
        return Err(ConfigError::Invalid {
            key: command_key,
            reason: "the command handler needs a non-empty argv in `command`".into(),
        });
    }
    if handler.handler != HandlerKind::Command && !handler.rollback_command.is_empty() {
        return Err(ConfigError::Invalid {
            key: rollback_key,
            reason: "`rollback_command` is used by the command handler only".into(),
        });
    }
    Ok(())
}

/// A duration where zero means "never" (`None`).
fn optional_duration(key: &'static str, text: &str) -> Result<Option<Duration>, ConfigError> {
    let value = humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("{text:?} is not a duration like \"6h\" (or \"0s\" for never): {e}"),
    })?;
    Ok((!value.is_zero()).then_some(value))
}

fn duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("{text:?} is not a duration like \"30s\" or \"10m\": {e}"),
    })?;
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(value)
}

fn check_backoff(key: &'static str, initial: Duration, max: Duration) -> Result<(), ConfigError> {
    if max < initial {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{max:?} is smaller than the initial backoff {initial:?}"),
        });
    }
    Ok(())
}

fn parse_mqtt_url(text: &str) -> Result<MqttEndpoint, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key: "mqtt_url",
        reason,
    };
    let url = reqwest::Url::parse(text).map_err(|e| invalid(format!("{text:?}: {e}")))?;
    if url.scheme() != "mqtts" {
        return Err(invalid(format!(
            "scheme must be mqtts (MQTT over TLS), not {:?}",
            url.scheme()
        )));
    }
    if url.path() != "" && url.path() != "/" || url.query().is_some() || !url.username().is_empty()
    {
        return Err(invalid(
            "only mqtts://HOST:PORT is accepted (no path, query or user)".into(),
        ));
    }
    // `host_str` keeps the brackets of an IPv6 literal; the TLS server name
    // and the socket address want the bare address.
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| invalid("missing host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(MqttEndpoint {
        host,
        port: url.port().unwrap_or(DEFAULT_MQTT_PORT),
    })
}

fn parse_device_url(text: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(text).map_err(|e| ConfigError::Invalid {
        key: "device_url",
        reason: format!("{text:?}: {e}"),
    })?;
    if url.scheme() != "https" {
        return Err(ConfigError::Invalid {
            key: "device_url",
            reason: format!("scheme must be https, not {:?}", url.scheme()),
        });
    }
    Ok(text.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SAMPLE: &str = r#"
device_id = "dev-1"
hardware = "revB"
mode = "push-pull"
mqtt_url = "mqtts://127.0.0.1:8883"
device_url = "https://127.0.0.1:8443"
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["signers/signer-1.pub"]   # PEM Ed25519 public keys
# trusted_roots = ["roots/root-1.pub"]       # offline roots certifying signers
state_dir = "state"
landing_zone = "landing"

[safe_state]
command = []          # argv; empty = always safe. exit 0 = safe
initial_backoff = "1s"
max_backoff = "60s"
deadline = "24h"      # no safe state within this → report failed

[install]
handler = "file"      # "file" | "archive" | "command"
target_dir = "installed"          # file: payload goes to target_dir/<package name>, previous kept as <name>.previous
                                  # archive: tar unpacked to target_dir/<name>/versions/<version>, symlink target_dir/<name>/current
command = []          # command handler: argv, "{payload}" replaced by the payload path, "{name}" and "{version}" too
rollback_command = [] # command handler: argv restoring the previous version (same substitutions); empty = no rollback
timeout = "10m"

# Overrides: [install.packages.<name>] wins over [install.kinds.<kind>], which wins
# over [install]; keys left out are taken from [install].
# [install.kinds.application]
# handler = "archive"
# target_dir = "/opt/apps"
# [install.packages.sensor-fw]
# handler = "command"
# command = ["/usr/sbin/flash-fw", "{payload}"]

[health]
command = []          # argv run after an install until it exits 0; empty = no check
deadline = "60s"      # not healthy within this → roll back and report rolled-back

[download]
max_attempts = 8
initial_backoff = "1s"
max_backoff = "60s"
"#;

    #[test]
    fn sample_parses() {
        let config = AgentConfig::from_toml_str(SAMPLE, Path::new("/etc/otter")).unwrap();
        assert_eq!(config.device_id.as_str(), "dev-1");
        assert_eq!(config.mode, Mode::PushPull);
        assert_eq!(
            config.mqtt,
            MqttEndpoint {
                host: "127.0.0.1".into(),
                port: 8883
            }
        );
        assert_eq!(config.ca, Path::new("/etc/otter/ca.crt"));
        assert_eq!(
            config.trusted_signers,
            vec![PathBuf::from("/etc/otter/signers/signer-1.pub")]
        );
        assert_eq!(config.install.default.handler, HandlerKind::File);
        assert_eq!(
            config.install.default.target_dir,
            Path::new("/etc/otter/installed")
        );
        assert_eq!(config.install.default.timeout, Duration::from_secs(600));
        assert!(config.install.kinds.is_empty() && config.install.packages.is_empty());
        assert_eq!(config.health, None);
        assert_eq!(config.safe_state.deadline, Duration::from_secs(24 * 3600));
        assert_eq!(config.download.max_attempts, 8);
    }

    #[test]
    fn optional_sections_default() {
        let minimal = r#"
device_id = "dev-1"
hardware = "revB"
mqtt_url = "mqtts://[::1]"
device_url = "https://localhost:8443/"
ca = "/abs/ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = ["s.pub"]
"#;
        let config = AgentConfig::from_toml_str(minimal, Path::new("base")).unwrap();
        assert_eq!(config.mode, Mode::PushPull);
        assert_eq!(config.mqtt.host, "::1");
        assert_eq!(config.mqtt.port, DEFAULT_MQTT_PORT);
        assert_eq!(config.ca, Path::new("/abs/ca.crt"));
        assert_eq!(config.state_dir, Path::new("base/state"));
        assert_eq!(
            config.encryption_key,
            Path::new("base/state/encryption.key")
        );
        assert_eq!(config.safe_state.initial_backoff, Duration::from_secs(1));
        assert_eq!(config.download.max_backoff, Duration::from_secs(60));
        assert_eq!(config.device_url, "https://localhost:8443");
    }

    #[test]
    fn poll_intervals_default_parse_and_disable() {
        let config = AgentConfig::from_toml_str(SAMPLE, Path::new(".")).unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(30));
        assert_eq!(
            config.reconcile_interval,
            Some(Duration::from_secs(6 * 3600))
        );
        let text = SAMPLE.replacen(
            "mode = \"push-pull\"",
            "mode = \"pull\"\npoll_interval = \"1s\"\nreconcile_interval = \"0s\"",
            1,
        );
        let config = AgentConfig::from_toml_str(&text, Path::new(".")).unwrap();
        assert_eq!(config.mode, Mode::Pull);
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        assert_eq!(config.reconcile_interval, None);
        for (key, bad) in [
            ("poll_interval", "poll_interval = \"0s\""),
            ("poll_interval", "poll_interval = \"often\""),
            ("reconcile_interval", "reconcile_interval = \"sometimes\""),
        ] {
            let text = SAMPLE.replacen("mode = \"push-pull\"", bad, 1);
            let error = AgentConfig::from_toml_str(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{bad}: {error}");
        }
    }

    fn error_for(from: &str, to: &str) -> String {
        assert!(SAMPLE.contains(from), "{from}");
        let text = SAMPLE.replacen(from, to, 1);
        match AgentConfig::from_toml_str(&text, Path::new(".")) {
            Ok(_) => panic!("{to:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                "landing_zone = \"landing\"",
                "landing_zone = \"landing\"\ncolour = 1",
                "colour",
            ),
            (
                "timeout = \"10m\"",
                "timeout = \"ten minutes\"",
                "install.timeout",
            ),
            (
                "deadline = \"24h\"",
                "deadline = \"0s\"",
                "safe_state.deadline",
            ),
            (
                "mode = \"push-pull\"",
                "mode = \"carrier-pigeon\"",
                "carrier-pigeon",
            ),
            ("handler = \"file\"", "handler = \"tarball\"", "tarball"),
            (
                "handler = \"file\"",
                "handler = \"command\"",
                "install.command",
            ),
            (
                "mqtts://127.0.0.1:8883",
                "mqtt://127.0.0.1:1883",
                "mqtt_url",
            ),
            (
                "https://127.0.0.1:8443",
                "http://127.0.0.1:8443",
                "device_url",
            ),
            (
                "device_id = \"dev-1\"",
                "device_id = \"dev/1\"",
                "device_id",
            ),
            (
                "max_attempts = 8",
                "max_attempts = 0",
                "download.max_attempts",
            ),
            ("max_attempts = 8", "max_attempts = -1", "max_attempts"),
            ("[\"signers/signer-1.pub\"]", "[]", "trusted_signers"),
            (
                "max_backoff = \"60s\"",
                "max_backoff = \"1ms\"",
                "safe_state.max_backoff",
            ),
        ];
        for (from, to, expected) in cases {
            let error = error_for(from, to);
            assert!(error.contains(expected), "{to:?}: {error}");
        }
    }

    /// A name override wins over a kind override, which wins over
    /// `[install]`; keys an override leaves out come from `[install]`.
    #[test]
    fn install_overrides_per_kind_and_name() {
        let text = format!(
            "{SAMPLE}\n{}",
            r#"
[install.kinds.application]
handler = "archive"
target_dir = "/opt/apps"

[install.packages.sensor-fw]
handler = "command"
command = ["flash", "{payload}"]
rollback_command = ["flash", "--previous"]
timeout = "1m"
"#
        )
        .replace(
            "command = []          # argv run",
            "command = [\"check\"]  # argv run",
        );
        let config = AgentConfig::from_toml_str(&text, Path::new("/etc/otter")).unwrap();
        let install = &config.install;
        let app = install.for_package(PackageKind::Application, "web");
        assert_eq!(
            (app.handler, app.target_dir.as_path(), app.timeout),
            (
                HandlerKind::Archive,
                Path::new("/opt/apps"),
                Duration::from_secs(600)
            )
        );
        // The name override wins even over the kind's.
        let named = install.for_package(PackageKind::Application, "sensor-fw");
        assert_eq!(named.handler, HandlerKind::Command);
        assert_eq!(named.rollback_command, vec!["flash", "--previous"]);
        assert_eq!(named.timeout, Duration::from_secs(60));
        assert_eq!(named.target_dir, Path::new("/etc/otter/installed"));
        let firmware = install.for_package(PackageKind::Firmware, "other");
        assert_eq!(firmware, &install.default);
        assert_eq!(
            config.health,
            Some(HealthConfig {
                command: vec!["check".into()],
                deadline: Duration::from_secs(60)
            })
        );
    }

    #[test]
    fn bad_install_overrides_and_health_are_named() {
        let cases = [
            ("[install.kinds.gadget]\nhandler = \"archive\"", "gadget"),
            (
                "[install.kinds.agent]\nhandler = \"archive\"",
                "self-update",
            ),
            (
                "[install.packages.\"../x\"]\nhandler = \"archive\"",
                "install.packages",
            ),
            (
                "[install.packages.app]\nhandler = \"command\"",
                "install.packages",
            ),
            (
                "[install.packages.app]\nrollback_command = [\"x\"]",
                "command handler only",
            ),
            ("[install.kinds.firmware]\nflavour = 1", "flavour"),
            (
                "[install.kinds.firmware]\ntimeout = \"soon\"",
                "install.kinds",
            ),
        ];
        for (section, expected) in cases {
            let text = format!("{SAMPLE}\n{section}\n");
            let error = AgentConfig::from_toml_str(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{section}: {error}");
        }
        // A health check needs a positive deadline.
        let text = SAMPLE
            .replace(
                "command = []          # argv run",
                "command = [\"check\"] #",
            )
            .replace(
                "deadline = \"60s\"      # not healthy",
                "deadline = \"0s\" #",
            );
        let error = AgentConfig::from_toml_str(&text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(error.contains("health.deadline"), "{error}");
    }

    #[test]
    fn unknown_key_in_section() {
        let error = error_for("max_attempts = 8", "max_attempts = 8\nretries = 3");
        assert!(error.contains("retries"), "{error}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        for name in ["ca.crt", "device.crt", "device.key"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let error = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("trusted_signers") && error.contains("signer-1.pub"),
            "{error}"
        );
        std::fs::create_dir(dir.path().join("signers")).unwrap();
        std::fs::write(dir.path().join("signers/signer-1.pub"), "x").unwrap();
        let config = AgentConfig::load(&path).unwrap();
        assert_eq!(config.ca, dir.path().join("ca.crt"));
        let error = AgentConfig::load(&dir.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope.toml"), "{error}");
    }
}
