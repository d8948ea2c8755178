//! `otter-agent`: reads `agent.toml`, sets up logging, runs the agent until
//! SIGINT or SIGTERM. All behaviour lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The Otter device agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Arguments {
    /// Path of the agent configuration file.
    #[arg(long, env = "OTTER_AGENT_CONFIG", default_value = "agent.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // ring is also compiled into the tree; make aws-lc-rs the process default
    // for anything that does not take an explicit provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let config = match otter_agent::AgentConfig::load(&arguments.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("otter-agent: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(otter_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otter-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
