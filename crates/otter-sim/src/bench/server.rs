//! The benchmark's own `otter-server`: a child process on a fresh data
//! folder, every listener on port 0 (so no port in use is ever taken, and
//! never 1883), the device listeners on `0.0.0.0` so every loopback address
//! reaches them, one `--public-host` per address devices use (the server
//! certificate must name each), and the benchmark's signing key trusted.
//! Stopped with SIGTERM (graceful) when the mode is done, SIGKILL on drop.
//! [`ServerProcess::restart`] starts it again on the same data folder and
//! the same ports, so the devices' sessions find it again.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long the server may take to write `endpoints.json`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The addresses the server bound (its `endpoints.json`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Endpoints {
    pub api: SocketAddr,
    pub device: SocketAddr,
    pub mqtt: SocketAddr,
}

/// What the server is started with.
#[derive(Debug, Clone)]
pub struct ServerLaunch {
    pub binary: PathBuf,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    pub public_hosts: Vec<IpAddr>,
    pub trusted_signer: PathBuf,
    /// More flags, e.g. `--device-idle-timeout 75s`.
    pub extra_args: Vec<String>,
}

/// A running server process.
pub struct ServerProcess {
    child: Child,
    pub endpoints: Endpoints,
    pub token: String,
    pub log_file: PathBuf,
}

impl ServerProcess {
    /// Starts a server on free ports.
    pub fn start(launch: &ServerLaunch) -> anyhow::Result<ServerProcess> {
        Self::start_on(launch, None)
    }

    /// Stops the server gracefully and starts it again on the same data
    /// folder and ports; answers the new process and when it was started.
    pub fn restart(self, launch: &ServerLaunch) -> anyhow::Result<(ServerProcess, Instant)> {
        let endpoints = self.endpoints;
        self.stop()?;
        let started = Instant::now();
        let server = Self::start_on(launch, Some(endpoints))?;
        Ok((server, started))
    }

    fn start_on(launch: &ServerLaunch, ports: Option<Endpoints>) -> anyhow::Result<ServerProcess> {
        std::fs::create_dir_all(&launch.data_dir)
            .with_context(|| format!("creating {}", launch.data_dir.display()))?;
        // A restart appends to the first start's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(ports.is_some())
            .write(true)
            .truncate(ports.is_none())
            .open(&launch.log_file)
            .with_context(|| format!("opening {}", launch.log_file.display()))?;
        let endpoints_path = launch.data_dir.join("endpoints.json");
        // A previous run's file would read as this one being ready.
        match std::fs::remove_file(&endpoints_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("removing {}", endpoints_path.display()));
            }
        }
        let port =
            |pick: fn(&Endpoints) -> SocketAddr| ports.as_ref().map_or(0, |e| pick(e).port());
        let hosts: Vec<String> = launch.public_hosts.iter().map(IpAddr::to_string).collect();
        let mut command = Command::new(&launch.binary);
        command
            .arg("--data-dir")
            .arg(&launch.data_dir)
            .arg("--api-addr")
            .arg(format!("127.0.0.1:{}", port(|e| e.api)))
            .arg("--device-addr")
            .arg(format!("0.0.0.0:{}", port(|e| e.device)))
            .arg("--mqtt-addr")
            .arg(format!("0.0.0.0:{}", port(|e| e.mqtt)))
            .arg("--trusted-signer")
            .arg(&launch.trusted_signer)
            .args(&launch.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log)
            .env("RUST_LOG", "warn");
        if !hosts.is_empty() {
            command.arg("--public-host").arg(hosts.join(","));
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let endpoints = loop {
            if let Some(status) = child.try_wait().context("watching the server")? {
                bail!(
                    "otter-server exited at start ({status}); see {}",
                    launch.log_file.display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&endpoints_path)
                && let Ok(endpoints) = serde_json::from_str::<Endpoints>(&text)
            {
                break endpoints;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("otter-server did not start within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let token = std::fs::read_to_string(launch.data_dir.join("admin.token"))
            .context("reading the server's admin token")?
            .trim()
            .to_owned();
        Ok(ServerProcess {
            child,
            endpoints,
            token,
            log_file: launch.log_file.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.endpoints.api)
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        if !matches!(sent, Ok(status) if status.success()) {
            let _ = self.child.kill();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().context("killing the server")?;
        self.child.wait()?;
        bail!("otter-server did not stop within {STOP_TIMEOUT:?} of SIGTERM")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `otter-server` binary: `explicit`, or the one next to this executable.
pub fn server_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let me = std::env::current_exe().context("locating otter-sim")?;
    let beside = me
        .parent()
        .map(|dir| dir.join("otter-server"))
        .filter(|path| path.is_file());
    beside.with_context(|| {
        format!(
            "no otter-server next to {}: build the workspace (cargo build --release) or pass --server-binary",
            me.display()
        )
    })
}
