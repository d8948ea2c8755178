//! A fleet of simulated devices in this process: each one the real agent
//! (`otter_agent::run_with_handlers`) with its own certificate, its own
//! `agent.toml`, state folder and landing zone, its own MQTT session and/or
//! poll client; only the installer ([`RecordingInstaller`]) and the
//! safe-state probe (always safe) are simulated.
//!
//! Layout of the work folder: `ca.crt` and `signers/` (shared by every
//! device, read-only), then `devices/<id>/` with `agent.toml`, `device.crt`,
//! `device.key`, `state/` and `landing/` (the agent empties its landing zone
//! after each install).
//!
//! Connections are spread over several server addresses: device `i` connects
//! to `hosts[i % hosts.len()]` (rumqttc cannot bind a source address, so the
//! destination varies; each destination address and port has its own ~28,000
//! ephemeral ports). Devices are started at `connect_rate` per second: the
//! connection belongs to the agent library, so the simulator paces starts
//! rather than gating each handshake, which bounds connects in flight to
//! about `connect_rate` × handshake time. A device whose agent asks to
//! restart (a mode switch) runs again with its reloaded configuration, as
//! `otter-agent` does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otter_agent::safe_state::AlwaysSafe;
use otter_agent::tls::DeviceTls;
use otter_agent::{AgentConfig, Handlers, RunOutcome};
use otter_proto::api::EnrollResponse;
use otter_proto::messages::Mode;
use otter_proto::topics::DeviceId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handlers::{InstallLog, RecordingInstaller};
use crate::limits;

/// How long [`Fleet::stop`] waits for the agents to disconnect.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a fleet runs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Holds every device's folder (created if missing).
    pub work_dir: PathBuf,
    pub mode: Mode,
    /// Hardware model the devices announce (packages must list it).
    pub hardware: String,
    /// Server addresses, used round-robin; each must be in the server
    /// certificate. Empty: the host of the enrolment URLs.
    pub hosts: Vec<IpAddr>,
    /// Pull mode: time between two polls.
    pub poll_interval: Duration,
    /// Push-pull: time between two reconcile polls (`None`: none).
    pub reconcile_interval: Option<Duration>,
    /// Devices started per second (0: all at once).
    pub connect_rate: u32,
    /// Hash each installed payload into the install log (tests); costs a
    /// read of every payload.
    pub hash_payloads: bool,
}

/// Why a fleet cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no devices to run")]
    Empty,
    #[error(
        "{devices} {mode} devices need about {needed} open files but this process may hold \
         {limit} (ulimit -n; the hard limit is the ceiling): run fewer devices per process"
    )]
    TooManyDevices {
        devices: usize,
        mode: &'static str,
        needed: u64,
        limit: u64,
    },
    #[error("invalid URL {url:?} in the enrolment answer")]
    BadUrl { url: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("the task writing device folders failed: {0}")]
    Task(String),
}

/// A device that stopped on its own, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFailure {
    pub device_id: String,
    pub reason: String,
}

/// Running simulated devices. Stop them with [`Fleet::stop`]; dropping the
/// fleet cancels them too, without waiting.
pub struct Fleet {
    devices: Vec<DeviceId>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    log: InstallLog,
    failures: Arc<Mutex<Vec<DeviceFailure>>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Open files one idle device of `mode` holds: its MQTT connection, or its
/// pooled poll connection. A download adds one for its duration only (the
/// agent keeps no download connection open afterwards), so a fleet that
/// fits idle fits a deployment too unless nearly every device downloads at
/// the same instant; one that would not is warned about.
fn files_per_device(mode: Mode) -> u64 {
    match mode {
        Mode::Push | Mode::Pull | Mode::PushPull => 1,
    }
}

/// Worst case: every device downloading at once.
fn files_per_device_at_peak(mode: Mode) -> u64 {
    match mode {
        Mode::Push => 1,
        Mode::Pull | Mode::PushPull => 2,
    }
}

/// Files the process needs besides the devices (runtime, logs, API client).
const FILES_RESERVED: u64 = 256;

impl Fleet {
    /// Writes each device's folder and starts its agent, `connect_rate` per
    /// second; returns once every device has started (not connected: ask
    /// the server which devices registered).
    pub async fn start(
        config: FleetConfig,
        enrolled: Vec<EnrollResponse>,
        log: InstallLog,
    ) -> Result<Fleet, FleetError> {
        let Some(first) = enrolled.first() else {
            return Err(FleetError::Empty);
        };
        let limit = limits::raise_open_files_limit();
        let needed = enrolled.len() as u64 * files_per_device(config.mode) + FILES_RESERVED;
        if needed > limit {
            return Err(FleetError::TooManyDevices {
                devices: enrolled.len(),
                mode: config.mode.as_str(),
                needed,
                limit,
            });
        }
        let at_peak =
            enrolled.len() as u64 * files_per_device_at_peak(config.mode) + FILES_RESERVED;
        if at_peak > limit {
            tracing::warn!(
                devices = enrolled.len(),
                at_peak,
                limit,
                "if nearly every device downloads at the same moment, some downloads will fail to connect and retry"
            );
        }
        let shared = SharedFiles {
            ca: config.work_dir.join("ca.crt"),
            signers: (0..first.trusted_signers.len())
                .map(|n| {
                    config
                        .work_dir
                        .join("signers")
                        .join(format!("signer-{n}.pub"))
                })
                .collect(),
        };
        let folders = {
            let config = config.clone();
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || write_folders(&config, &shared, &enrolled))
                .await
                .map_err(|e| FleetError::Task(e.to_string()))??
        };

        let cancel = CancellationToken::new();
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        let mut devices = Vec::with_capacity(folders.len());
        let started = tokio::time::Instant::now();
        for (index, (device_id, agent_toml)) in folders.into_iter().enumerate() {
            if config.connect_rate > 0 {
                let offset = Duration::from_secs_f64(index as f64 / f64::from(config.connect_rate));
                tokio::time::sleep_until(started + offset).await;
            }
            let handlers = Handlers {
                installer: Arc::new(RecordingInstaller::new(
                    device_id.clone(),
                    log.clone(),
                    config.hash_payloads,
                )),
                safe_state: Arc::new(AlwaysSafe),
            };
            tasks.spawn(run_device(
                device_id.clone(),
                agent_toml,
                handlers,
                cancel.clone(),
                failures.clone(),
            ));
            devices.push(device_id);
        }
        Ok(Fleet {
            devices,
            cancel,
            tasks,
            log,
            failures,
        })
    }

    /// The devices, in start order.
    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    pub fn install_log(&self) -> &InstallLog {
        &self.log
    }

    /// Devices whose agent stopped with an error (start-up problems, state
    /// that cannot be persisted).
    pub fn failures(&self) -> Vec<DeviceFailure> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Stops every agent (each sends its MQTT DISCONNECT) and waits for
    /// them, at most [`STOP_TIMEOUT`]; the rest are aborted.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let mut tasks = std::mem::take(&mut self.tasks);
        let drained = tokio::time::timeout(STOP_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "simulated devices did not stop in time"
            );
            tasks.shutdown().await;
        }
    }
}

/// Files every device reads.
#[derive(Debug, Clone)]
struct SharedFiles {
    ca: PathBuf,
    signers: Vec<PathBuf>,
}

/// Runs one device's agent until the fleet stops, again after each restart
/// (a configuration package); records why it ended if it was not asked to.
async fn run_device(
    device_id: DeviceId,
    agent_toml: PathBuf,
    handlers: Handlers,
    cancel: CancellationToken,
    failures: Arc<Mutex<Vec<DeviceFailure>>>,
) {
    let fail = |reason: String| {
        tracing::warn!(device = %device_id, %reason, "simulated device stopped");
        failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(DeviceFailure {
                device_id: device_id.to_string(),
                reason,
            });
    };
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let config = match AgentConfig::load(&agent_toml) {
            Ok(config) => config,
            Err(error) => return fail(format!("configuration: {error}")),
        };
        let tls = match DeviceTls::load(&config.ca, &config.certificate, &config.private_key) {
            Ok(tls) => tls,
            Err(error) => return fail(format!("TLS identity: {error}")),
        };
        let outcome = otter_agent::run_with_handlers(
            config,
            tls,
            handlers.clone(),
            cancel.clone().cancelled_owned(),
        )
        .await;
        match outcome {
            Ok(RunOutcome::Stopped) => return,
            Ok(RunOutcome::Restart) => continue,
            Ok(RunOutcome::SelfUpdateStaged) => {
                return fail("staged a self-update, which a simulated device cannot run".into());
            }
            Err(error) => return fail(format!("{error:#}")),
        }
    }
}

/// Writes the shared files and each device's folder; answers each device's
/// id and `agent.toml`.
fn write_folders(
    config: &FleetConfig,
    shared: &SharedFiles,
    enrolled: &[EnrollResponse],
) -> Result<Vec<(DeviceId, PathBuf)>, FleetError> {
    let Some(first) = enrolled.first() else {
        return Err(FleetError::Empty);
    };
    write_file(&shared.ca, first.ca_pem.as_bytes())?;
    for (path, pem) in shared.signers.iter().zip(&first.trusted_signers) {
        write_file(path, pem.as_bytes())?;
    }
    let mut folders = Vec::with_capacity(enrolled.len());
    for (index, device) in enrolled.iter().enumerate() {
        let host = config.hosts.get(index % config.hosts.len().max(1));
        let mqtt_url = with_host(&device.mqtt_url, host)?;
        let device_url = with_host(&device.device_url, host)?;
        let folder = config
            .work_dir
            .join("devices")
            .join(device.device_id.as_str());
        write_file(
            &folder.join("device.crt"),
            device.certificate_pem.as_bytes(),
        )?;
        write_file(
            &folder.join("device.key"),
            device.private_key_pem.as_bytes(),
        )?;
        let toml = agent_toml(config, shared, device, &mqtt_url, &device_url);
        // Validate now, so a bad setting fails the start, not each device.
        AgentConfig::from_toml_str(&toml, &folder).map_err(|error| FleetError::Device {
            device: device.device_id.to_string(),
            reason: error.to_string(),
        })?;
        let path = folder.join("agent.toml");
        write_file(&path, toml.as_bytes())?;
        folders.push((device.device_id.clone(), path));
    }
    Ok(folders)
}

fn agent_toml(
    config: &FleetConfig,
    shared: &SharedFiles,
    device: &EnrollResponse,
    mqtt_url: &str,
    device_url: &str,
) -> String {
    let quote = |text: &str| toml_string(text);
    let signers: Vec<String> = shared
        .signers
        .iter()
        .map(|path| quote(&path.to_string_lossy()))
        .collect();
    let reconcile = match config.reconcile_interval {
        Some(interval) => humantime::format_duration(interval).to_string(),
        None => "0s".to_owned(),
    };
    format!(
        "device_id = {device_id}\n\
         hardware = {hardware}\n\
         mode = {mode}\n\
         poll_interval = {poll}\n\
         reconcile_interval = {reconcile}\n\
         mqtt_url = {mqtt_url}\n\
         device_url = {device_url}\n\
         ca = {ca}\n\
         certificate = \"device.crt\"\n\
         private_key = \"device.key\"\n\
         trusted_signers = [{signers}]\n\
         state_dir = \"state\"\n\
         landing_zone = \"landing\"\n",
        device_id = quote(device.device_id.as_str()),
        hardware = quote(&config.hardware),
        mode = quote(config.mode.as_str()),
        poll = quote(&humantime::format_duration(config.poll_interval).to_string()),
        reconcile = quote(&reconcile),
        mqtt_url = quote(mqtt_url),
        device_url = quote(device_url),
        ca = quote(&shared.ca.to_string_lossy()),
        signers = signers.join(", "),
    )
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// `url` (`scheme://host:port`) with its host replaced by `host`.
fn with_host(url: &str, host: Option<&IpAddr>) -> Result<String, FleetError> {
    let Some(host) = host else {
        return Ok(url.to_owned());
    };
    let bad = || FleetError::BadUrl {
        url: url.to_owned(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    let (_, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let host = match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(format!("{scheme}://{host}:{port}{path}"))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), FleetError> {
    let error = |source| FleetError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(path, contents).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_replace_the_url_host() {
        let host: IpAddr = "127.0.0.3".parse().unwrap();
        assert_eq!(
            with_host("mqtts://127.0.0.1:8883", Some(&host)).unwrap(),
            "mqtts://127.0.0.3:8883"
        );
        assert_eq!(
            with_host("https://ota.example:8443/base", Some(&host)).unwrap(),
            "https://127.0.0.3:8443/base"
        );
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            with_host("https://[::1]:8443", Some(&v6)).unwrap(),
            "https://[::1]:8443"
        );
        assert_eq!(
            with_host("https://x:1", None).unwrap(),
            "https://x:1",
            "no host given: unchanged"
        );
        assert!(with_host("nonsense", Some(&host)).is_err());
        assert!(with_host("https://noport", Some(&host)).is_err());
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
