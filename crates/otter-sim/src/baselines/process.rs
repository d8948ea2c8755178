//! The baseline servers as child processes: start, wait until they listen,
//! read their memory and CPU from `/proc`, and stop them — only the
//! processes we started, by their pid, never by name.
//!
//! nginx runs a master with worker processes: stopping sends SIGTERM to the
//! master (which stops its workers) and, if it has not exited within
//! [`STOP_TIMEOUT`], SIGKILL to the master and to the workers it had.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// How long a server may take to listen after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The standard MQTT port, which the baselines never use (the machine's own
/// broker may be listening there).
pub const MQTT_STANDARD_PORT: u16 = 1883;

/// A started server; stopped by [`ManagedProcess::stop`], or killed when
/// dropped (with its children) if the caller never got there.
pub struct ManagedProcess {
    name: &'static str,
    child: Option<Child>,
    pid: u32,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Starts `program` with `arguments`, stdout and stderr into `log_path`.
    pub fn start(
        name: &'static str,
        program: &str,
        arguments: &[&str],
        log_path: &Path,
    ) -> anyhow::Result<ManagedProcess> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(program)
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("{name} exited at once"))?;
        Ok(ManagedProcess {
            name,
            child: Some(child),
            pid,
            log_path: log_path.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The end of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until every address in `addresses` accepts TCP connections,
    /// failing early if the process exits.
    pub async fn wait_listening(&mut self, addresses: &[SocketAddr]) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        for address in addresses {
            loop {
                if let Some(child) = self.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    anyhow::bail!(
                        "{} exited with {status} before listening on {address}:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                if tokio::net::TcpStream::connect(address).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "{} does not listen on {address} after {START_TIMEOUT:?}:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Resident memory now and at its peak (VmRSS, VmHWM), in bytes.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        Some((
            status_kilobytes(&status, "VmRSS:")? * 1024,
            status_kilobytes(&status, "VmHWM:")? * 1024,
        ))
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        stat_cpu_seconds(&stat)
    }

    /// SIGTERM, wait, then SIGKILL to the process and the children it had.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let children = child_pids(self.pid);
        send_signal(self.pid, "TERM");
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                tracing::warn!(
                    name = self.name,
                    pid = self.pid,
                    "did not stop on SIGTERM; killing it"
                );
                child.kill().await?;
            }
        }
        for pid in children {
            if Path::new(&format!("/proc/{pid}")).exists() {
                send_signal(pid, "KILL");
            }
        }
        Ok(())
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && matches!(child.try_wait(), Ok(None))
        {
            let children = child_pids(self.pid);
            let _ = child.start_kill();
            for pid in children {
                send_signal(pid, "KILL");
            }
        }
    }
}

/// The direct children of `pid` (nginx's workers).
fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|text| text.parse().ok())
        .collect()
}

fn send_signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A `kB` figure of `/proc/<pid>/status`.
pub fn status_kilobytes(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|number| number.trim().parse().ok())
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (USER_HZ is 100 on Linux).
pub fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn own_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(status_kilobytes(&status, "VmHWM:")? * 1024)
}

/// A TCP port that is free on `host` now (bound and released; another
/// process could take it in between, which the start then reports). Never
/// the standard MQTT port.
pub fn free_port(host: IpAddr) -> anyhow::Result<u16> {
    loop {
        let listener = std::net::TcpListener::bind(SocketAddr::new(host, 0))
            .with_context(|| format!("cannot bind a port on {host}"))?;
        let port = listener.local_addr()?.port();
        if port != MQTT_STANDARD_PORT {
            return Ok(port);
        }
    }
}

/// 127.0.0.1, the default host of the baselines.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        let status = "VmHWM:\t  300 kB\nVmRSS:\t 200 kB\n";
        assert_eq!(status_kilobytes(status, "VmRSS:"), Some(200));
        assert_eq!(status_kilobytes(status, "VmSwap:"), None);
        let stat = "7 (ng inx) S 1 2 3 4 5 6 7 8 9 10 120 30 0";
        assert_eq!(stat_cpu_seconds(stat), Some(1.5));
        assert_eq!(stat_cpu_seconds("7 (x"), None);
    }

    #[test]
    fn free_ports_are_bindable_and_never_1883() {
        let port = free_port(LOOPBACK).unwrap();
        assert_ne!(port, MQTT_STANDARD_PORT);
        std::net::TcpListener::bind((LOOPBACK, port)).unwrap();
    }
}
