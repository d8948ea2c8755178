//! `otter-sim`: `run` keeps N simulated devices connected to a running
//! server until Ctrl-C; `bench` runs the three-mode benchmark on servers it
//! starts itself. Parses flags, sets up logging and the TLS provider, and
//! calls the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use otter_proto::messages::Mode;
use otter_sim::api::OperatorClient;
use otter_sim::bench::{self, BenchConfig};
use otter_sim::fleet::{Fleet, FleetConfig};
use otter_sim::handlers::InstallLog;

/// Fleet simulator and benchmark for Otter.
#[derive(Debug, Parser)]
#[command(name = "otter-sim", version, about)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol N devices (batch API) and run them against a server until Ctrl-C.
    Run {
        /// The operator API, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "OTTER_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// File holding an operator token (e.g. DATA_DIR/admin.token).
        #[arg(long, env = "OTTER_TOKEN_FILE")]
        token_file: PathBuf,
        #[arg(long)]
        devices: usize,
        #[arg(long, default_value = "push-pull")]
        mode: Mode,
        /// Server addresses to spread connections over (each must be in the
        /// server certificate: start it with --public-host for each).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<IpAddr>,
        /// Fleet tag of the devices (default: sim-MODE); deploy to fleet:TAG.
        #[arg(long)]
        tag: Option<String>,
        /// Pull mode: time between two polls.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        poll_interval: Duration,
        /// Devices started per second.
        #[arg(long, default_value_t = 200)]
        connect_rate: u32,
        /// Folder for the devices' files (default: ./otter-sim-work/RUN-ID).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Runs the three-mode benchmark on its own servers; writes results.json,
    /// results.md and installed.svg into --out.
    Bench {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Payload size in bytes (random, incompressible).
        #[arg(long, default_value_t = 1 << 20)]
        size: u64,
        #[arg(long, value_delimiter = ',', default_value = "push,pull,push-pull")]
        modes: Vec<Mode>,
        #[arg(long)]
        out: PathBuf,
        /// Server addresses to spread connections over, e.g.
        /// 127.0.0.1,127.0.0.2 (default: 127.0.0.1).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<IpAddr>,
        /// Pull mode: time between two polls.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        poll_interval: Duration,
        /// How long the idle cost is measured.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        idle_window: Duration,
        /// Devices started per second.
        #[arg(long, default_value_t = 300)]
        connect_rate: u32,
        /// Longest a deployment may take.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        deploy_timeout: Duration,
        /// The otter-server binary (default: next to otter-sim).
        #[arg(long)]
        server_binary: Option<PathBuf>,
        /// Skip the Mosquitto, nginx and codec baselines.
        #[arg(long)]
        no_baselines: bool,
    },
}

fn main() -> ExitCode {
    // The pipeline baseline measures the agent's peak memory in a process
    // of its own: this binary, run with a hidden first argument.
    let arguments: Vec<String> = std::env::args().collect();
    if arguments.get(1).map(String::as_str) == Some(otter_sim::baselines::PIPELINE_CHILD_COMMAND) {
        return match otter_sim::baselines::run_pipeline_child(
            arguments.get(2..).unwrap_or_default(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("otter-sim: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // ring is also compiled into the tree, so rustls cannot pick a provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-sim: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(flags.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otter-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            server,
            token_file,
            devices,
            mode,
            hosts,
            tag,
            poll_interval,
            connect_rate,
            work_dir,
        } => {
            let token = std::fs::read_to_string(&token_file)
                .with_context(|| format!("reading {}", token_file.display()))?;
            let client = OperatorClient::new(&server, &token)?;
            let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
            let tag = tag.unwrap_or_else(|| format!("sim-{}", mode.as_str()));
            let work_dir =
                work_dir.unwrap_or_else(|| PathBuf::from("otter-sim-work").join(&run_id));
            let enrolled = client
                .enroll_batch(otter_sim::enroll_request(
                    &format!("sim-{run_id}"),
                    devices,
                    &tag,
                    bench::HARDWARE,
                )?)
                .await
                .context("enrolling the devices")?;
            eprintln!(
                "enrolled {devices} devices (hardware {}, tag {tag}); files in {}",
                bench::HARDWARE,
                work_dir.display()
            );
            let log = InstallLog::new();
            let fleet = Fleet::start(
                FleetConfig {
                    work_dir,
                    mode,
                    hardware: bench::HARDWARE.to_owned(),
                    hosts,
                    poll_interval,
                    reconcile_interval: Some(Duration::from_secs(6 * 3600)),
                    connect_rate,
                    hash_payloads: false,
                },
                enrolled,
                log.clone(),
            )
            .await?;
            eprintln!(
                "{} devices started in {} mode; deploy to fleet:{tag}; Ctrl-C stops",
                fleet.devices().len(),
                mode.as_str()
            );
            let mut installs = log.watch();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    changed = installs.changed() => {
                        if changed.is_err() { break; }
                        let count = *installs.borrow();
                        if count.is_multiple_of(100) || count == devices {
                            eprintln!("{count} installs");
                        }
                    }
                }
            }
            let failures = fleet.failures();
            fleet.stop().await;
            if !failures.is_empty() {
                eprintln!("{} devices stopped on their own", failures.len());
            }
            Ok(())
        }
        Command::Bench {
            devices,
            size,
            modes,
            out,
            hosts,
            poll_interval,
            idle_window,
            connect_rate,
            deploy_timeout,
            server_binary,
            no_baselines,
        } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let config = BenchConfig {
                devices,
                payload_bytes: size,
                modes,
                out_dir: out.clone(),
                hosts,
                poll_interval,
                idle_window,
                connect_rate,
                deploy_timeout,
                server_binary,
                baselines: !no_baselines,
                progress: true,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            let results = bench::run(&config).await?;
            println!("{}", bench::report::markdown(&results));
            eprintln!(
                "results in {}: results.json, results.md, installed.svg",
                out.display()
            );
            Ok(())
        }
    }
}
