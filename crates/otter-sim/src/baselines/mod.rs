//! The floors the benchmark compares Otter with, measured in the same run on
//! the same machine (issue 5, item 3; figures of an earlier run in
//! `shared/notes/baselines.md`):
//!
//! - [`mosquitto_fanout`]: one QoS 1 message to each of `N` persistent
//!   mutual-TLS subscribers of Debian's Mosquitto, started on its own port
//!   (never 1883) with a per-device ACL, against Otter's commit→notified;
//! - [`nginx_download`]: Debian's nginx serving the same file over TLS 1.3
//!   with client certificates, fetched by [`https_download`], the same loop
//!   that measures Otter's device endpoint;
//! - [`pipeline_baseline`]: the bare codecs against the agent's
//!   verify + decrypt + decompress on the same artifact.
//!
//! Mosquitto and nginx are installed by `scripts/install-baselines.sh`
//! (embedded here and run by [`install_baselines`]) when missing, and each
//! baseline stops the server it started before returning.
//!
//! Layout: the result types and shared helpers here; `certs` (throw-away
//! PKI), `process` (child servers, `/proc` figures), `mosquitto`, `nginx`,
//! `download`, `pipeline`, `sockets` (kernel byte counters of a port, for
//! the brokers whose sockets cannot be wrapped).

pub mod certs;
mod download;
pub mod mosquitto;
pub mod nginx;
pub mod pipeline;
pub mod process;
pub mod sockets;

pub use download::https_download;
pub use mosquitto::mosquitto_fanout;
pub use nginx::nginx_download;
pub use pipeline::{
    PIPELINE_CHILD_COMMAND, pipeline_baseline, pipeline_baseline_with_child, run_pipeline_child,
};
pub use sockets::{SocketTotals, socket_totals};

use anyhow::Context;
use serde::Serialize;

/// The MQTT fan-out floor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FanoutBaseline {
    pub devices: usize,
    /// Messages that arrived (all of them unless the run timed out).
    pub delivered: usize,
    /// From the start of publishing to the last delivery.
    pub all_delivered_secs: f64,
    /// Latency from the start of publishing, over the delivered messages.
    pub p50_secs: f64,
    pub p99_secs: f64,
    pub max_secs: f64,
    /// Broker resident memory after the fan-out, all clients connected.
    pub broker_rss_bytes: u64,
    /// Broker resident memory with all clients connected and subscribed,
    /// before publishing.
    pub broker_idle_rss_bytes: u64,
    /// Broker CPU time during the fan-out (publishing to last delivery).
    pub broker_cpu_secs: f64,
    /// Time to connect and subscribe every client.
    pub connect_secs: f64,
    /// Bytes the broker sent on its TCP connections during the fan-out
    /// (kernel counters: TLS, MQTT headers, payload), including the
    /// publisher's PUBACKs.
    pub broker_bytes_sent: u64,
}

/// A download-serving measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownloadBaseline {
    pub concurrency: usize,
    /// Body bytes received over all requests.
    pub bytes: u64,
    pub secs: f64,
    pub bytes_per_sec: f64,
}

/// The device pipeline floor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineBaseline {
    /// Plaintext bytes.
    pub bytes: u64,
    /// Artifact (encrypted, compressed) bytes.
    pub artifact_bytes: u64,
    /// Fastest time of the bare codecs.
    pub raw_secs: f64,
    /// Fastest time of the agent's `hash_file` + `unpack`.
    pub agent_secs: f64,
    /// Peak resident memory of a process running only the agent pipeline;
    /// `None` when not run from the `otter-sim` binary (tests).
    pub agent_peak_rss_bytes: Option<u64>,
}

/// The install script, embedded so the benchmark works from any folder.
const INSTALL_SCRIPT: &str = include_str!("../../scripts/install-baselines.sh");

/// Installs Debian's `mosquitto` and `nginx` if either is missing (a no-op
/// otherwise). Blocking: call it before the timed part.
pub fn install_baselines() -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut shell = std::process::Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sh for the baseline install script")?;
    shell
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin for the install script"))?
        .write_all(INSTALL_SCRIPT.as_bytes())?;
    let status = shell.wait()?;
    anyhow::ensure!(
        status.success(),
        "installing mosquitto and nginx failed ({status}); run crates/otter-sim/scripts/install-baselines.sh"
    );
    Ok(())
}

/// The `fraction` quantile (nearest rank) of sorted `values`; 0 when empty.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
