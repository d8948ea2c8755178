//! The reconnect storm: the server restarted under the connected, idle
//! fleet of one mode, and the time until every device registered again.

use std::time::Duration;

use anyhow::Context as _;
use otter_proto::messages::Mode;
use time::format_description::well_known::Rfc3339;

use super::report::ReconnectStorm;
use super::server::{ServerLaunch, ServerProcess};
use super::{BenchConfig, progress_bar};
use crate::api::OperatorClient;

/// Restarts the server (SIGTERM, then the same binary on the same data
/// folder and ports) under the connected, idle fleet, and waits until every
/// device has registered again: each agent reconnects with its backoff and
/// registers on the new session's CONNACK. The times are the server's own
/// registration times (`registered_at`), so polling the API adds nothing.
pub(super) async fn reconnect_storm(
    config: &BenchConfig,
    server: ServerProcess,
    launch: &ServerLaunch,
    client: &OperatorClient,
    tag: &str,
    mode: Mode,
) -> anyhow::Result<(ServerProcess, ReconnectStorm)> {
    let stopping = time::OffsetDateTime::now_utc();
    let relaunch = launch.clone();
    let (server, started) = tokio::task::spawn_blocking(move || server.restart(&relaunch))
        .await
        .context("restarting the server")??;
    let started_at = time::OffsetDateTime::now_utc() - started.elapsed();
    let timeout = Duration::from_secs(60) + Duration::from_millis(20 * config.devices as u64);
    let bar = progress_bar(
        config,
        config.devices,
        format!("{} re-registered", mode.as_str()),
    );
    let mut latest = None;
    let mut reregistered = 0;
    while started.elapsed() < timeout {
        // Refused for a moment while the new server comes up: ask again.
        if let Ok(devices) = client.devices(tag).await {
            let times: Vec<time::OffsetDateTime> = devices
                .iter()
                .filter_map(|device| device.registered_at.as_deref())
                .filter_map(|at| time::OffsetDateTime::parse(at, &Rfc3339).ok())
                .filter(|at| *at >= stopping)
                .collect();
            reregistered = times.len();
            latest = times.into_iter().max();
            bar.set_position(reregistered as u64);
            if reregistered >= config.devices {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if reregistered >= config.devices {
        bar.finish();
    } else {
        bar.abandon();
    }
    let seconds = |from: time::OffsetDateTime| {
        latest.map_or(timeout.as_secs_f64(), |at| (at - from).as_seconds_f64())
    };
    let storm = ReconnectStorm {
        secs_after_start: seconds(started_at),
        secs_after_stop: seconds(stopping),
        reregistered,
    };
    Ok((server, storm))
}
