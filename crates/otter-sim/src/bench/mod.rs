//! `otter-sim bench`: the three-mode benchmark.
//!
//! For each mode in turn, on a fresh `otter-server` child process
//! ([`server`]) so that its CPU time and peak memory are that mode's alone:
//! enrol N devices with the batch API, upload one package of random
//! (incompressible) bytes, start N simulated devices in the mode
//! ([`crate::fleet`]), wait until all registered, measure the idle cost over
//! an idle window (server CPU from `/proc` ([`procfs`]), bytes sent from
//! `/metrics` ([`metrics`])), commit a deployment to the mode's fleet tag,
//! wait with a progress bar until it is complete, and read each device's
//! commit → notified / downloaded / installed times from the audit
//! ([`timings`]). Then the baselines of `crate::baselines` run on the same
//! machine, and [`report`] writes `results.json`, `results.md` and
//! `installed.svg`.
//!
//! Layout: [`BenchConfig`] and [`run`], then one function per phase of a
//! mode, then the baselines and the targets.

pub mod download;
pub mod metrics;
pub mod procfs;
pub mod report;
mod restart;
pub mod server;
pub mod timings;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use otter_proto::messages::Mode;

use crate::api::OperatorClient;
use crate::fleet::{Fleet, FleetConfig};
use crate::handlers::InstallLog;
use metrics::{BytesSent, MetricsSnapshot};
use report::{BenchResults, Comparison, IdleCost, Machine, ModeResult, Settings, TargetCheck};
use server::{ServerLaunch, ServerProcess};
use timings::StepTimes;

/// The hardware model of simulated devices and benchmark packages.
pub const HARDWARE: &str = "sim";

/// How a benchmark runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub devices: usize,
    pub payload_bytes: u64,
    pub modes: Vec<Mode>,
    pub out_dir: PathBuf,
    /// Server addresses devices connect to (round-robin); each also goes
    /// into the server certificate. Empty: 127.0.0.1.
    pub hosts: Vec<IpAddr>,
    pub poll_interval: Duration,
    pub idle_window: Duration,
    pub connect_rate: u32,
    pub deploy_timeout: Duration,
    pub server_binary: Option<PathBuf>,
    /// Run the Mosquitto, nginx and codec baselines too.
    pub baselines: bool,
    /// Show progress bars (off in tests).
    pub progress: bool,
    /// The command line, recorded in the results.
    pub command: String,
}

impl BenchConfig {
    fn hosts(&self) -> Vec<IpAddr> {
        if self.hosts.is_empty() {
            vec![IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)]
        } else {
            self.hosts.clone()
        }
    }
}

/// Runs the benchmark and writes its reports into `config.out_dir`.
pub async fn run(config: &BenchConfig) -> anyhow::Result<BenchResults> {
    if config.devices == 0 || config.modes.is_empty() {
        bail!("the benchmark needs at least one device and one mode");
    }
    let server_binary = server::server_binary(config.server_binary.as_deref())?;
    let work_dir = config.out_dir.join("work");
    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir)
            .with_context(|| format!("clearing {}", work_dir.display()))?;
    }
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    let key_path = work_dir.join("signer.key");
    otter_package::keys::generate_key_pair(&key_path).context("generating the signing key")?;
    let signing_key = otter_package::keys::read_signing_key(&key_path)?;
    let payload = crate::package::random_payload(
        usize::try_from(config.payload_bytes).context("the payload does not fit in memory")?,
    );
    let ticks = procfs::clock_ticks_per_second();

    let mut modes = Vec::new();
    for mode in &config.modes {
        eprintln!("== {} devices in {} mode", config.devices, mode.as_str());
        let launch = ServerLaunch {
            binary: server_binary.clone(),
            data_dir: work_dir.join(format!("server-{}", mode.as_str())),
            log_file: config.out_dir.join(format!("server-{}.log", mode.as_str())),
            public_hosts: config.hosts(),
            trusted_signer: otter_package::keys::public_key_path(&key_path),
            extra_args: vec![
                "--device-idle-timeout".to_owned(),
                humantime::format_duration(idle_timeout(config.poll_interval)).to_string(),
            ],
        };
        let result = run_mode(
            config,
            *mode,
            &launch,
            &work_dir.join(format!("devices-{}", mode.as_str())),
            &signing_key,
            &payload,
            ticks,
        )
        .await
        .with_context(|| format!("{} mode", mode.as_str()))?;
        modes.push(result);
    }
    drop(payload);

    let baselines = if config.baselines {
        let launch = ServerLaunch {
            binary: server_binary.clone(),
            data_dir: work_dir.join("server-download"),
            log_file: config.out_dir.join("server-download.log"),
            public_hosts: config.hosts(),
            trusted_signer: otter_package::keys::public_key_path(&key_path),
            extra_args: Vec::new(),
        };
        measure_baselines(config, &work_dir, &launch, &signing_key).await
    } else {
        BaselineFigures::default()
    };
    let comparisons = compare(config, &modes, &baselines);
    let targets = targets(config, &modes, &baselines);
    let results = BenchResults {
        started_at,
        command: config.command.clone(),
        machine: Machine::describe(),
        settings: Settings {
            devices: config.devices,
            payload_bytes: config.payload_bytes,
            modes: config.modes.iter().map(|m| m.as_str().to_owned()).collect(),
            hosts: config.hosts().iter().map(IpAddr::to_string).collect(),
            poll_interval_secs: config.poll_interval.as_secs_f64(),
            idle_window_secs: config.idle_window.as_secs_f64(),
            connect_rate: config.connect_rate,
        },
        modes,
        baselines: comparisons,
        targets,
    };
    write_reports(&config.out_dir, &results)?;
    Ok(results)
}

/// The device endpoint's idle timeout: above the poll interval, so pull
/// devices keep their connection between polls (as in production).
fn idle_timeout(poll_interval: Duration) -> Duration {
    (poll_interval * 3).max(Duration::from_secs(75))
}

fn write_reports(out_dir: &Path, results: &BenchResults) -> anyhow::Result<()> {
    let write = |name: &str, contents: String| {
        let path = out_dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
    };
    write("results.json", serde_json::to_string_pretty(results)?)?;
    write("results.md", report::markdown(results))?;
    write("installed.svg", report::installed_svg(&results.modes))?;
    Ok(())
}

/// One mode, start to finish; the server and the devices are stopped
/// whatever happens.
async fn run_mode(
    config: &BenchConfig,
    mode: Mode,
    launch: &ServerLaunch,
    devices_dir: &Path,
    signing_key: &ed25519_dalek::SigningKey,
    payload: &[u8],
    ticks: f64,
) -> anyhow::Result<ModeResult> {
    let server = ServerProcess::start(launch)?;
    let client = OperatorClient::new(&server.api_url(), &server.token)?;
    let tag = format!("bench-{}", mode.as_str());
    let prefix = match mode {
        Mode::Push => "push",
        Mode::Pull => "pull",
        Mode::PushPull => "pp",
    };
    let enrolled = client
        .enroll_batch(crate::enroll_request(
            prefix,
            config.devices,
            &tag,
            HARDWARE,
        )?)
        .await
        .context("enrolling the devices")?;
    let scratch = devices_dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let version = semver::Version::new(1, 0, 0);
    let package = crate::package::build(signing_key, &tag, &version, HARDWARE, payload, &scratch)?;
    let release = client
        .upload_release(package.bytes)
        .await
        .context("uploading the package")?;

    let log = InstallLog::new();
    let fleet_config = FleetConfig {
        work_dir: devices_dir.to_owned(),
        mode,
        hardware: HARDWARE.to_owned(),
        hosts: config.hosts.clone(),
        poll_interval: config.poll_interval,
        reconcile_interval: None,
        connect_rate: config.connect_rate,
        hash_payloads: false,
    };
    let start = Instant::now();
    let fleet = Fleet::start(fleet_config, enrolled, log.clone()).await?;
    let measured = measure_mode(
        config,
        mode,
        &server,
        &client,
        &fleet,
        &tag,
        &release.id,
        release.artifact_size,
        start,
        ticks,
    )
    .await;
    // The reconnect storm, for the modes whose devices hold a session.
    let (server, measured) = match measured {
        Ok(mut result) if mode != Mode::Pull => {
            match restart::reconnect_storm(config, server, launch, &client, &tag, mode).await {
                Ok((server, storm)) => {
                    result.reconnect = Some(storm);
                    (Some(server), Ok(result))
                }
                // The server, if any, was killed on the way.
                Err(error) => (None, Err(error)),
            }
        }
        other => (Some(server), other),
    };
    fleet.stop().await;
    let stopped = server.map_or(Ok(()), ServerProcess::stop);
    let result = measured?;
    stopped?;
    Ok(result)
}

/// The measurements of a running fleet: registration, idle, deployment.
#[allow(clippy::too_many_arguments)] // one call site, each argument distinct
async fn measure_mode(
    config: &BenchConfig,
    mode: Mode,
    server: &ServerProcess,
    client: &OperatorClient,
    fleet: &Fleet,
    tag: &str,
    release: &str,
    artifact_bytes: u64,
    start: Instant,
    ticks: f64,
) -> anyhow::Result<ModeResult> {
    let devices = config.devices;
    wait_registered(config, client, fleet, tag, mode).await?;
    let connect_secs = start.elapsed().as_secs_f64();

    // Idle: everybody connected, nothing pending.
    let idle_before = (procfs::sample(server.pid(), ticks)?, scrape(client).await);
    tokio::time::sleep(config.idle_window).await;
    let idle_after = (procfs::sample(server.pid(), ticks)?, scrape(client).await);
    let device_hours = devices as f64 * config.idle_window.as_secs_f64() / 3600.0;
    let idle_cpu = idle_after.0.cpu_seconds - idle_before.0.cpu_seconds;
    let idle_bytes = match (&idle_before.1, &idle_after.1) {
        (Some(before), Some(after)) => BytesSent::between(before, after).map(|b| b.total),
        _ => None,
    };
    let idle = IdleCost {
        window_secs: config.idle_window.as_secs_f64(),
        server_cpu_seconds: idle_cpu,
        server_cpu_seconds_per_device_hour: idle_cpu / device_hours,
        server_bytes_sent: idle_bytes,
        server_bytes_per_device_hour: idle_bytes.map(|b| b as f64 / device_hours),
        server_rss_bytes: idle_after.0.rss_bytes,
    };

    // The deployment.
    let before = (procfs::sample(server.pid(), ticks)?, scrape(client).await);
    let committed = Instant::now();
    let deployment = client
        .create_deployment(release, &format!("fleet:{tag}"))
        .await
        .context("committing the deployment")?;
    let status = wait_deployment(config, client, fleet, &deployment.deployment_id, mode).await?;
    let deployment_secs = committed.elapsed().as_secs_f64();
    let after = (procfs::sample(server.pid(), ticks)?, scrape(client).await);

    let audit = client
        .audit_all(Some(&deployment.deployment_id))
        .await
        .context("reading the audit")?;
    let times = StepTimes::from_audit(&audit, &deployment.deployment_id)?;
    let (bytes_sent, peak_downloads, notifications) = match (&before.1, &after.1) {
        (Some(before_metrics), Some(after_metrics)) => (
            BytesSent::between(before_metrics, after_metrics),
            after_metrics
                .value(metrics::names::DOWNLOADS_IN_FLIGHT_PEAK)
                .map(|peak| peak as u64),
            after_metrics
                .delta(before_metrics, metrics::names::NOTIFICATIONS)
                .map(|n| n as u64),
        ),
        _ => (None, None, None),
    };
    let phase_count = |phase: otter_proto::deployment::Phase| {
        status.info.phases.get(&phase).copied().unwrap_or(0)
    };
    Ok(ModeResult {
        mode: mode.as_str().to_owned(),
        devices,
        artifact_bytes,
        connect_secs,
        idle,
        notified: times.summary("notification.sent"),
        downloaded: times.summary("device.downloaded"),
        installed: times.summary("device.installed"),
        installed_devices: phase_count(otter_proto::deployment::Phase::Installed),
        failed_devices: phase_count(otter_proto::deployment::Phase::Failed),
        deployment_secs,
        bytes_per_artifact_byte: bytes_sent
            .map(|b| b.total as f64 / (devices as f64 * artifact_bytes as f64)),
        bytes_sent,
        peak_concurrent_downloads: peak_downloads,
        notifications,
        server_cpu_seconds: after.0.cpu_seconds - before.0.cpu_seconds,
        server_peak_rss_bytes: after.0.peak_rss_bytes,
        installed_curve: times.sorted("device.installed"),
        reconnect: None,
    })
}

/// A scrape of `/metrics`, or `None` (logged) if the server has none.
async fn scrape(client: &OperatorClient) -> Option<MetricsSnapshot> {
    match client.metrics_text().await {
        Ok(text) => Some(MetricsSnapshot::parse(&text)),
        Err(error) => {
            tracing::warn!(%error, "no server metrics; bytes are not measured");
            None
        }
    }
}

fn progress_bar(config: &BenchConfig, length: usize, message: String) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:24} [{elapsed_precise}] {wide_bar} {pos}/{len}")
    {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar
}

/// Waits until every device of `tag` has registered in `mode`.
async fn wait_registered(
    config: &BenchConfig,
    client: &OperatorClient,
    fleet: &Fleet,
    tag: &str,
    mode: Mode,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(60) + Duration::from_millis(20 * config.devices as u64);
    let deadline = Instant::now() + timeout;
    let bar = progress_bar(
        config,
        config.devices,
        format!("{} registered", mode.as_str()),
    );
    loop {
        let devices = client.devices(tag).await?;
        let registered = devices
            .iter()
            .filter(|device| device.mode == Some(mode) && device.registered_at.is_some())
            .count();
        bar.set_position(registered as u64);
        if registered >= config.devices {
            bar.finish();
            return Ok(());
        }
        let failures = fleet.failures();
        if let Some(failure) = failures.first() {
            bar.abandon();
            bail!(
                "{} simulated devices stopped, e.g. {}: {}",
                failures.len(),
                failure.device_id,
                failure.reason
            );
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!(
                "only {registered} of {} devices registered within {timeout:?}",
                config.devices
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the deployment is complete, showing installs as they happen.
async fn wait_deployment(
    config: &BenchConfig,
    client: &OperatorClient,
    fleet: &Fleet,
    deployment_id: &str,
    mode: Mode,
) -> anyhow::Result<otter_proto::api::DeploymentStatus> {
    let deadline = Instant::now() + config.deploy_timeout;
    let bar = progress_bar(
        config,
        config.devices,
        format!("{} installed", mode.as_str()),
    );
    let mut installs = fleet.install_log().watch();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = installs.changed() => {
                if changed.is_ok() {
                    bar.set_position(*installs.borrow() as u64);
                }
            }
            _ = check.tick() => {
                let status = client.deployment(deployment_id).await?;
                if status.info.complete {
                    bar.set_position(fleet.install_log().len() as u64);
                    bar.finish();
                    return Ok(status);
                }
                if Instant::now() > deadline {
                    bar.abandon();
                    bail!(
                        "the deployment was not complete after {:?}: {:?}",
                        config.deploy_timeout,
                        status.info.phases
                    );
                }
            }
        }
    }
}

/// The baseline figures of one run (`None`: not measured; the note says why).
#[derive(Debug, Default)]
pub struct BaselineFigures {
    /// Mosquitto: one QoS 1 publish to each of N subscribers: p99 and all
    /// delivered, seconds; broker RSS.
    pub fanout: Option<(f64, f64, u64)>,
    pub fanout_note: String,
    /// nginx and Otter serving the same file at the same concurrency:
    /// bytes per second each, and the concurrency.
    pub download: Option<(f64, Option<f64>, usize)>,
    pub download_note: String,
    /// The agent's pipeline and the raw codecs on the same bytes: seconds
    /// each, bytes, and the agent's peak RSS.
    pub pipeline: Option<(f64, f64, u64, Option<u64>)>,
    pub pipeline_note: String,
}

/// Concurrency of the download comparison (the target).
pub const DOWNLOAD_CONCURRENCY: usize = 64;
/// Size of the file both servers serve (the figure: 10 MB).
pub const DOWNLOAD_BYTES: usize = 10 << 20;
/// Downloads per side.
pub const DOWNLOAD_REQUESTS: usize = 4 * DOWNLOAD_CONCURRENCY;

/// Runs the baselines; a baseline that cannot run is reported with why.
async fn measure_baselines(
    config: &BenchConfig,
    work_dir: &Path,
    launch: &ServerLaunch,
    signing_key: &ed25519_dalek::SigningKey,
) -> BaselineFigures {
    let mut figures = BaselineFigures::default();
    let dir = work_dir.join("baselines");
    eprintln!(
        "== baselines: Mosquitto fan-out to {} subscribers",
        config.devices
    );
    match crate::baselines::mosquitto_fanout(config.devices, &config.hosts(), &dir).await {
        Ok(fanout) => {
            figures.fanout = Some((
                fanout.p99_secs,
                fanout.all_delivered_secs,
                fanout.broker_rss_bytes,
            ));
            figures.fanout_note = format!(
                "{} of {} delivered, all in {:.3} s; broker RSS {}",
                fanout.delivered,
                fanout.devices,
                fanout.all_delivered_secs,
                report::bytes(fanout.broker_rss_bytes as f64)
            );
        }
        Err(error) => figures.fanout_note = format!("failed: {error:#}"),
    }
    eprintln!("== baselines: downloads at concurrency {DOWNLOAD_CONCURRENCY} (Otter, then nginx)");
    match download::otter_download(
        launch,
        signing_key,
        DOWNLOAD_BYTES,
        DOWNLOAD_CONCURRENCY,
        DOWNLOAD_REQUESTS,
        &dir.join("otter-download"),
    )
    .await
    {
        Ok(run) => {
            let otter = run.otter.bytes_per_sec;
            match crate::baselines::nginx_download(
                &run.artifact,
                DOWNLOAD_CONCURRENCY,
                DOWNLOAD_REQUESTS,
                &dir,
            )
            .await
            {
                Ok(nginx) => {
                    figures.download =
                        Some((nginx.bytes_per_sec, Some(otter), DOWNLOAD_CONCURRENCY));
                    figures.download_note = format!(
                        "{DOWNLOAD_REQUESTS} downloads of the same {} artifact, mutual TLS",
                        report::bytes(run.otter.bytes as f64 / DOWNLOAD_REQUESTS as f64)
                    );
                }
                Err(error) => {
                    figures.download_note =
                        format!("Otter {}/s; nginx failed: {error:#}", report::bytes(otter))
                }
            }
        }
        Err(error) => figures.download_note = format!("Otter's download run failed: {error:#}"),
    }
    eprintln!("== baselines: agent pipeline vs raw codecs");
    let size = config.payload_bytes.max(DOWNLOAD_BYTES as u64);
    let pipeline_dir = dir.clone();
    let pipeline = tokio::task::spawn_blocking(move || {
        crate::baselines::pipeline_baseline(size, &pipeline_dir)
    })
    .await;
    match pipeline {
        Ok(Ok(pipeline)) => {
            figures.pipeline = Some((
                pipeline.agent_secs,
                pipeline.raw_secs,
                pipeline.bytes,
                pipeline.agent_peak_rss_bytes,
            ));
            figures.pipeline_note = format!(
                "{} of plaintext; agent {}/s, raw {}/s",
                report::bytes(pipeline.bytes as f64),
                report::bytes(pipeline.bytes as f64 / pipeline.agent_secs),
                report::bytes(pipeline.bytes as f64 / pipeline.raw_secs)
            );
        }
        Ok(Err(error)) => figures.pipeline_note = format!("failed: {error:#}"),
        Err(error) => figures.pipeline_note = format!("failed: {error}"),
    }
    figures
}

fn mode_result(modes: &[ModeResult], mode: Mode) -> Option<&ModeResult> {
    modes.iter().find(|m| m.mode == mode.as_str())
}

/// Baselines beside Otter's figures, as ratios (higher is better for Otter).
fn compare(
    config: &BenchConfig,
    modes: &[ModeResult],
    baselines: &BaselineFigures,
) -> Vec<Comparison> {
    let push_pull = mode_result(modes, Mode::PushPull);
    let mut comparisons = Vec::new();
    let notified_p99 = push_pull.map(|m| m.notified.p99);
    comparisons.push(Comparison {
        name: format!(
            "fan-out to {} subscribers, p99 (Mosquitto vs push-pull commit → notified)",
            config.devices
        ),
        baseline: baselines.fanout.map_or_else(
            || "not measured".to_owned(),
            |(p99, _, _)| format!("{:.3} s", p99),
        ),
        otter: notified_p99.map_or_else(|| "not measured".to_owned(), |p99| format!("{p99:.3} s")),
        ratio: match (baselines.fanout, notified_p99) {
            (Some((baseline, _, _)), Some(otter)) if otter > 0.0 => Some(baseline / otter),
            _ => None,
        },
        note: baselines.fanout_note.clone(),
    });
    comparisons.push(Comparison {
        name: "download serving, bytes/s at the same concurrency (nginx vs Otter)".to_owned(),
        baseline: baselines.download.map_or_else(
            || "not measured".to_owned(),
            |(nginx, _, concurrency)| format!("{}/s at {concurrency}", report::bytes(nginx)),
        ),
        otter: baselines
            .download
            .and_then(|(_, otter, _)| otter)
            .map_or_else(
                || "not measured".to_owned(),
                |otter| format!("{}/s", report::bytes(otter)),
            ),
        ratio: baselines
            .download
            .and_then(|(nginx, otter, _)| Some(otter? / nginx)),
        note: baselines.download_note.clone(),
    });
    comparisons.push(Comparison {
        name: "device pipeline, seconds (raw codecs vs agent)".to_owned(),
        baseline: baselines.pipeline.map_or_else(
            || "not measured".to_owned(),
            |(_, raw, bytes, _)| format!("{raw:.3} s for {}", report::bytes(bytes as f64)),
        ),
        otter: baselines.pipeline.map_or_else(
            || "not measured".to_owned(),
            |(agent, _, _, _)| format!("{agent:.3} s"),
        ),
        ratio: baselines.pipeline.map(|(agent, raw, _, _)| raw / agent),
        note: baselines.pipeline_note.clone(),
    });
    comparisons
}

/// The targets, met or not in this run.
fn targets(
    config: &BenchConfig,
    modes: &[ModeResult],
    baselines: &BaselineFigures,
) -> Vec<TargetCheck> {
    let push_pull = mode_result(modes, Mode::PushPull);
    let scale = if config.devices < 10_000 {
        format!(" (run at {} devices, not 10,000)", config.devices)
    } else {
        String::new()
    };
    let mut checks = Vec::new();
    checks.push(match (push_pull, baselines.fanout) {
        (Some(m), Some((mosquitto_p99, _, _))) => TargetCheck {
            target: "push-pull p99 commit → notified ≤ Mosquitto fan-out p99".to_owned(),
            measured: format!("{:.3} s vs {mosquitto_p99:.3} s{scale}", m.notified.p99),
            met: Some(m.notified.p99 <= mosquitto_p99),
        },
        (Some(m), None) => TargetCheck {
            target: "push-pull p99 commit → notified ≤ Mosquitto fan-out p99".to_owned(),
            measured: format!("{:.3} s; Mosquitto not measured", m.notified.p99),
            met: None,
        },
        (None, _) => TargetCheck {
            target: "push-pull p99 commit → notified ≤ Mosquitto fan-out p99".to_owned(),
            measured: "push-pull not run".to_owned(),
            met: None,
        },
    });
    let connected_rss = modes.iter().map(|m| m.idle.server_rss_bytes).max();
    checks.push(TargetCheck {
        target: "server resident memory ≤ 512 MiB with 10,000 connected".to_owned(),
        measured: connected_rss.map_or_else(
            || "not run".to_owned(),
            |rss| {
                format!(
                    "{} with {} connected{scale}",
                    report::bytes(rss as f64),
                    config.devices
                )
            },
        ),
        met: connected_rss
            .filter(|_| config.devices >= 10_000)
            .map(|rss| rss <= 512 << 20),
    });
    let storm = push_pull.and_then(|m| Some((m, m.reconnect?)));
    checks.push(TargetCheck {
        target: "reconnect storm: 10,000 re-registered within 15 s of a server restart".to_owned(),
        measured: match storm {
            Some((m, storm)) => format!(
                "push-pull: {} of {} re-registered {:.2} s after the new server started{scale}",
                storm.reregistered, m.devices, storm.secs_after_start
            ),
            None => "push-pull not run".to_owned(),
        },
        met: storm
            .filter(|_| config.devices >= 10_000)
            .map(|(m, storm)| storm.reregistered >= m.devices && storm.secs_after_start <= 15.0),
    });
    checks.push(TargetCheck {
        target: "download serving ≥ 0.9 × nginx at concurrency 64 over mutual TLS".to_owned(),
        measured: match baselines.download {
            Some((nginx, Some(otter), concurrency)) => {
                format!("{:.2} × at concurrency {concurrency}", otter / nginx)
            }
            _ => "not measured".to_owned(),
        },
        met: match baselines.download {
            Some((nginx, Some(otter), 64)) => Some(otter >= 0.9 * nginx),
            _ => None,
        },
    });
    checks.push(TargetCheck {
        target: "agent pipeline ≥ 1.0 × raw codecs, resident memory ≤ 16 MiB".to_owned(),
        measured: match baselines.pipeline {
            Some((agent, raw, _, rss)) => format!(
                "{:.2} ×, peak RSS {}",
                raw / agent,
                rss.map_or_else(|| "not measured".to_owned(), |r| report::bytes(r as f64))
            ),
            None => "not measured".to_owned(),
        },
        met: baselines
            .pipeline
            .and_then(|(agent, raw, _, rss)| Some(raw / agent >= 1.0 && rss? <= 16 << 20)),
    });
    checks.push(
        match push_pull.and_then(|m| Some((m, m.bytes_per_artifact_byte?))) {
            Some((_, ratio)) => TargetCheck {
                target: "push-pull bytes sent ≤ 1.02 × N × package size".to_owned(),
                measured: format!("{ratio:.4} × N × package size{scale}"),
                met: Some(ratio <= 1.02),
            },
            None => TargetCheck {
                target: "push-pull bytes sent ≤ 1.02 × N × package size".to_owned(),
                measured: "not measured".to_owned(),
                met: None,
            },
        },
    );
    checks
}
