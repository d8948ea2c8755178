//! `otter-server`: parses flags (each also an environment variable), sets up
//! logging and the TLS crypto provider, and runs `otter_server::run` until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use otter_proto::push::MAX_CHUNK_BYTES;
use otter_server::ServerConfig;
use otter_server::config::DEFAULT_MAX_UPLOAD_BYTES;
use otter_server::device_http::DeviceEndpointLimits;
use otter_server::push::{self, PushSettings};

/// The Otter update server.
#[derive(Debug, Parser)]
#[command(name = "otter-server", version, about)]
struct Flags {
    /// Directory for the PKI, database, blobs and tokens.
    #[arg(long, env = "OTTER_DATA_DIR", default_value = "./otter-data")]
    data_dir: PathBuf,
    /// Operator REST API address (plain HTTP).
    #[arg(long, env = "OTTER_API_ADDR", default_value = "127.0.0.1:8080")]
    api_addr: SocketAddr,
    /// Device HTTPS endpoint address (mutual TLS).
    #[arg(long, env = "OTTER_DEVICE_ADDR", default_value = "0.0.0.0:8443")]
    device_addr: SocketAddr,
    /// Embedded MQTT broker address (TLS, client certificates).
    #[arg(long, env = "OTTER_MQTT_ADDR", default_value = "0.0.0.0:8883")]
    mqtt_addr: SocketAddr,
    /// Host name or address devices use to reach the server (repeatable; the
    /// first one goes into URLs). Default: 127.0.0.1.
    #[arg(long, env = "OTTER_PUBLIC_HOST", value_delimiter = ',', value_parser = parse_host)]
    public_host: Vec<String>,
    /// PEM public key of a trusted package signer (repeatable).
    #[arg(long, env = "OTTER_TRUSTED_SIGNER", value_delimiter = ',')]
    trusted_signer: Vec<PathBuf>,
    /// PEM public key of a trusted offline root key (repeatable): packages
    /// signed by a signer it certified are accepted (`otter keys certify`).
    #[arg(long, env = "OTTER_TRUSTED_ROOT", value_delimiter = ',')]
    trusted_root: Vec<PathBuf>,
    /// PEM file of an operator-run device CA (repeatable; the factory path):
    /// certificates it issued are accepted for devices imported with
    /// `otter device import`.
    #[arg(long, env = "OTTER_DEVICE_CA", value_delimiter = ',')]
    device_ca: Vec<PathBuf>,
    /// Lifetime of a download link, e.g. `1h`, `30m`.
    #[arg(long, env = "OTTER_LINK_TTL", default_value = "1h", value_parser = parse_ttl)]
    link_ttl: Duration,
    /// Largest package upload, in bytes.
    #[arg(long, env = "OTTER_MAX_UPLOAD", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    max_upload: u64,
    /// Push mode: bytes per MQTT chunk (at most 524288).
    #[arg(long, env = "OTTER_PUSH_CHUNK_SIZE", default_value_t = push::DEFAULT_CHUNK_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CHUNK_BYTES as i64))]
    push_chunk_size: u32,
    /// Push mode: chunks sent ahead of the device's last acknowledgement.
    #[arg(long, env = "OTTER_PUSH_WINDOW", default_value_t = push::DEFAULT_WINDOW_CHUNKS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    push_window: u32,
    /// Device endpoint: how long a connection may stay idle between two
    /// requests (keep it above the pull devices' poll interval).
    #[arg(long, env = "OTTER_DEVICE_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_idle_timeout)]
    device_idle_timeout: Duration,
}

fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&timeout) {
        return Err("the idle timeout must be between 1s and 1h".to_owned());
    }
    Ok(timeout)
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) {
        return Err("the link lifetime must be at least 1s".to_owned());
    }
    Ok(ttl)
}

/// A DNS name or an IP address: it goes into URLs and the server certificate.
fn parse_host(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.parse::<std::net::IpAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if text.is_empty() || text.len() > 253 || !text.split('.').all(valid_label) {
        return Err(format!("{text:?} is not a host name or IP address"));
    }
    Ok(text.to_ascii_lowercase())
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // ring is also compiled into the tree (through rmqtt and rumqttc), so
    // rustls cannot pick a provider by itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Every device holds a connection: a soft limit of 1024 (many systems'
    // default) would cap the fleet long before memory does.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-files limit"),
    }

    let config = ServerConfig {
        public_hosts: flags.public_host,
        trusted_signers: flags.trusted_signer,
        trusted_roots: flags.trusted_root,
        device_cas: flags.device_ca,
        link_ttl: flags.link_ttl,
        max_upload_bytes: flags.max_upload,
        api_addr: flags.api_addr,
        device_addr: flags.device_addr,
        mqtt_addr: flags.mqtt_addr,
        push: PushSettings {
            chunk_size: flags.push_chunk_size,
            window_chunks: flags.push_window,
            ..PushSettings::default()
        },
        device_limits: DeviceEndpointLimits {
            header_read_timeout: flags.device_idle_timeout,
            ..DeviceEndpointLimits::default()
        },
        ..ServerConfig::new(flags.data_dir)
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-server: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(otter_server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("otter-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
