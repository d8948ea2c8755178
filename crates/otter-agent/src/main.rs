//! `otter-agent`: reads `agent.toml`, sets up logging, and runs in one of two
//! roles. All behaviour lives in the library.
//!
//! - Plain `otter-agent` is the **supervisor** ([`otter_agent::supervisor`]):
//!   it validates the configuration (a bad one ends the process with status
//!   2, as before), then runs the agent as a child process of the same
//!   executable, swaps in a staged self-update, rolls back a new agent that
//!   does not confirm, and re-executes itself into a confirmed one.
//! - `otter-agent --worker` (hidden; started by the supervisor) is the
//!   **agent** proper: it runs [`otter_agent::run`] until SIGINT, SIGTERM or
//!   the end of its stdin (the supervisor is gone); after a configuration
//!   package it loads the configuration again and runs anew in the same
//!   process; after staging a new executable it exits with
//!   [`otter_agent::self_update::STAGED_EXIT_CODE`].
//! - `otter-agent enrol ...` enrols the device with a CSR and a one-time
//!   token ([`otter_agent::enrol`]) and writes its bundle, then exits.
//! - `otter-agent inhibit --reason TEXT -- COMMAND ...` holds an inhibitor
//!   ([`otter_agent::inhibit`]) while COMMAND runs and exits with its status;
//!   `otter-agent inhibit --list` shows the inhibitors held.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use otter_agent::supervisor::{SupervisorExit, SupervisorOptions, executable_path, supervise};
use otter_agent::{AgentConfig, RunOutcome};
use tokio::sync::watch;

/// The Otter device agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Arguments {
    /// Path of the agent configuration file.
    #[arg(
        long,
        env = "OTTER_AGENT_CONFIG",
        default_value = "agent.toml",
        global = true
    )]
    config: PathBuf,
    /// Run the agent itself rather than its supervisor (set by the
    /// supervisor; the agent stops when its stdin closes).
    #[arg(long, hide = true)]
    worker: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate this device's key pair and enrol it with a one-time token
    /// (`otter device token create`), writing the bundle into --out.
    Enrol {
        /// The device endpoint, `https://HOST:8443`.
        #[arg(long)]
        server: String,
        /// The server's CA certificate (PEM): the only root trusted.
        #[arg(long)]
        ca: PathBuf,
        /// The enrolment token (`otter-enrol-...`).
        #[arg(long, env = "OTTER_ENROL_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        device_id: String,
        /// Hardware model written into agent.toml (default: the token's).
        #[arg(long)]
        hardware: Option<String>,
        /// Folder of the new bundle; must not hold one yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Hold an inhibitor while COMMAND runs: the agent does not install
    /// until it exits (or the time to live passes). Exits with COMMAND's
    /// status; 125 when the inhibitor cannot be taken.
    Inhibit(InhibitArguments),
}

#[derive(Debug, clap::Args)]
struct InhibitArguments {
    /// Why installing must wait, shown in logs and `--list`.
    #[arg(long, required_unless_present = "list")]
    reason: Option<String>,
    /// Longest the inhibitor lasts, even if COMMAND runs on (e.g. `2h`).
    #[arg(long, default_value = "2h")]
    ttl: String,
    /// Name of the inhibitor (default: COMMAND's file name and this pid).
    #[arg(long)]
    name: Option<String>,
    /// List the inhibitors held and exit.
    #[arg(long, conflicts_with_all = ["reason", "name", "command"])]
    list: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "list")]
    command: Vec<String>,
}

/// Exit status for an unusable configuration.
const CONFIG_ERROR: u8 = 2;

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

    match arguments.command {
        Some(Command::Enrol {
            server,
            ca,
            token,
            device_id,
            hardware,
            out,
        }) => return run_enrol(server, ca, token, &device_id, hardware, out),
        Some(Command::Inhibit(inhibit)) => return run_inhibit(&arguments.config, inhibit),
        None => {}
    }
    let config = match AgentConfig::load(&arguments.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("otter-agent: {error}");
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    if arguments.worker {
        run_worker(&arguments.config, config)
    } else {
        run_supervisor(&arguments.config, &config)
    }
}

/// `otter-agent enrol`.
fn run_enrol(
    server: String,
    ca: PathBuf,
    token: String,
    device_id: &str,
    hardware: Option<String>,
    out: PathBuf,
) -> ExitCode {
    let device_id = match otter_proto::topics::DeviceId::parse(device_id) {
        Ok(device_id) => device_id,
        Err(error) => {
            eprintln!("otter-agent: invalid device id {device_id:?}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = otter_agent::enrol::EnrolOptions {
        server,
        ca,
        token,
        device_id,
        hardware,
        out,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(otter_agent::enrol::enrol(&options)) {
        Ok(enrolled) => {
            println!(
                "enrolled {} -> {}",
                enrolled.device_id,
                options.out.display()
            );
            println!(
                "run it with: otter-agent --config {}",
                options.out.join("agent.toml").display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("otter-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `inhibit` when the inhibitor cannot be taken (as `env`
/// and `timeout` use 125 for their own failures).
const INHIBIT_FAILED: u8 = 125;

/// `otter-agent inhibit`.
fn run_inhibit(config_path: &Path, arguments: InhibitArguments) -> ExitCode {
    // Only the socket path is needed: the files the agent reads at start-up
    // need not be readable by the program taking the inhibitor.
    let socket = match read_inhibit_socket(config_path) {
        Ok(socket) => socket,
        Err(error) => {
            eprintln!("otter-agent: {error:#}");
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-agent: cannot start the runtime: {error}");
            return ExitCode::from(INHIBIT_FAILED);
        }
    };
    runtime.block_on(inhibit(&socket, arguments))
}

fn read_inhibit_socket(config_path: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let base = match config_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let config = AgentConfig::from_toml_str(&text, &base)
        .with_context(|| format!("invalid {}", config_path.display()))?;
    Ok(config.inhibit_socket)
}

async fn inhibit(socket: &Path, arguments: InhibitArguments) -> ExitCode {
    use otter_agent::inhibit::InhibitClient;
    let mut client = match InhibitClient::connect(socket).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("otter-agent: is the agent running? {error}");
            return ExitCode::from(INHIBIT_FAILED);
        }
    };
    if arguments.list {
        return match client.list().await {
            Ok(inhibitors) => {
                for inhibitor in inhibitors {
                    println!(
                        "{}\t{}s\t{}",
                        inhibitor.name, inhibitor.ttl_seconds, inhibitor.reason
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("otter-agent: {error}");
                ExitCode::from(INHIBIT_FAILED)
            }
        };
    }
    let Some((program, program_arguments)) = arguments.command.split_first() else {
        eprintln!("otter-agent: no command given after --");
        return ExitCode::from(INHIBIT_FAILED);
    };
    let ttl = match humantime::parse_duration(&arguments.ttl) {
        Ok(ttl) if ttl.as_secs() > 0 => ttl,
        _ => {
            eprintln!("otter-agent: invalid --ttl {:?}", arguments.ttl);
            return ExitCode::from(INHIBIT_FAILED);
        }
    };
    let name = arguments.name.unwrap_or_else(|| {
        let base = Path::new(program)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base: String = base
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(40)
            .collect();
        format!("{base}-{}", std::process::id())
    });
    let reason = arguments.reason.unwrap_or_default();
    if let Err(error) = client.take(&name, &reason, ttl).await {
        eprintln!("otter-agent: cannot take inhibitor {name:?}: {error}");
        return ExitCode::from(INHIBIT_FAILED);
    }
    let spawned = tokio::process::Command::new(program)
        .args(program_arguments)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            eprintln!("otter-agent: cannot run {program:?}: {error}");
            return ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    // A Ctrl-C reaches the command too (same process group): wait for it to
    // end rather than dropping the inhibitor while it is still running.
    let mut agent_gone = false;
    let mut signals_usable = true;
    let expiry = tokio::time::sleep(ttl);
    tokio::pin!(expiry);
    let mut expired = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            () = &mut expiry, if !expired => {
                expired = true;
                eprintln!("otter-agent: inhibitor {name:?} expired (--ttl); the agent may install now");
            }
            handled = tokio::signal::ctrl_c(), if signals_usable => {
                signals_usable = handled.is_ok();
            }
            () = client.closed(), if !agent_gone => {
                agent_gone = true;
                eprintln!("otter-agent: the agent closed the connection; the inhibitor is gone");
            }
        }
    };
    // Closing the connection releases the inhibitor.
    drop(client);
    match status {
        Ok(status) => ExitCode::from(exit_code(status)),
        Err(error) => {
            eprintln!("otter-agent: waiting for {program:?}: {error}");
            ExitCode::from(INHIBIT_FAILED)
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + signal).unwrap_or(255);
        }
    }
    status
        .code()
        .and_then(|code| u8::try_from(code).ok())
        .unwrap_or(1)
}

/// How long a new worker waits for the previous one (a worker outliving a
/// killed supervisor notices within a few seconds) to free the inhibitor
/// socket before it gives up.
const INHIBIT_SOCKET_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the inhibitor socket, waiting while another agent still answers
/// on it (the previous worker on its way out), at most
/// [`INHIBIT_SOCKET_PATIENCE`].
async fn start_inhibit_server(
    path: &std::path::Path,
    inhibitors: otter_agent::inhibit::Inhibitors,
) -> Result<otter_agent::inhibit::InhibitServer, otter_agent::inhibit::InhibitError> {
    let deadline = tokio::time::Instant::now() + INHIBIT_SOCKET_PATIENCE;
    let mut logged = false;
    loop {
        match otter_agent::inhibit::InhibitServer::start(path, inhibitors.clone()) {
            Err(otter_agent::inhibit::InhibitError::InUse(_))
                if tokio::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(socket = %path.display(), "another agent still answers on the inhibitor socket; waiting for it to exit");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// The agent proper; loops while configuration packages ask for a restart.
fn run_worker(config_path: &Path, mut config: AgentConfig) -> ExitCode {
    let executable = match std::env::current_exe() {
        Ok(path) => Some(executable_path(&path)),
        Err(error) => {
            tracing::warn!(%error, "cannot find this executable; self-updates are refused");
            None
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
    let supervisor_gone = watch_stdin();
    // One inhibitor socket for the whole process: inhibitors outlive a
    // restart with a new configuration.
    let inhibitors = otter_agent::inhibit::Inhibitors::new();
    let started = runtime.block_on(start_inhibit_server(
        &config.inhibit_socket,
        inhibitors.clone(),
    ));
    let inhibit_server = match started {
        Ok(server) => server,
        Err(error) => {
            eprintln!("otter-agent: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exit = loop {
        config.self_update.executable = executable.clone();
        let shutdown = shutdown_signal(Some(supervisor_gone.clone()));
        match runtime.block_on(otter_agent::run_inhibited(config, &inhibitors, shutdown)) {
            Ok(RunOutcome::Stopped) => break ExitCode::SUCCESS,
            Ok(RunOutcome::SelfUpdateStaged) => {
                break ExitCode::from(otter_agent::self_update::STAGED_EXIT_CODE);
            }
            Ok(RunOutcome::Restart) => {
                tracing::info!("restarting the agent with its new configuration");
                config = match AgentConfig::load(config_path) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("otter-agent: {error}");
                        break ExitCode::from(CONFIG_ERROR);
                    }
                };
            }
            Err(error) => {
                eprintln!("otter-agent: {error:#}");
                break ExitCode::FAILURE;
            }
        }
    };
    runtime.block_on(inhibit_server.stop());
    exit
}

/// The supervisor; re-executes itself after a confirmed self-update.
fn run_supervisor(config_path: &Path, config: &AgentConfig) -> ExitCode {
    let executable = match std::env::current_exe() {
        Ok(path) => executable_path(&path),
        Err(error) => {
            eprintln!("otter-agent: cannot find this executable: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = SupervisorOptions {
        executable,
        config_path: config_path.to_owned(),
        state_dir: config.state_dir.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otter-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exit = runtime.block_on(supervise(&options, shutdown_signal(None)));
    // Ends the signal handlers and timers before the process image goes.
    drop(runtime);
    match exit {
        SupervisorExit::Exit(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        SupervisorExit::ReExec => restart_into(&options.executable),
    }
}

/// Replaces this process with `executable`, same arguments and environment:
/// the supervisor's own code is updated too, and its pid stays the same for
/// the service manager.
#[cfg(unix)]
fn restart_into(executable: &Path) -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let error = std::process::Command::new(executable)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!(
        "otter-agent: cannot restart into {}: {error}",
        executable.display()
    );
    ExitCode::FAILURE
}

/// Without `exec`, the new executable runs as a child and its status is ours.
#[cfg(not(unix))]
fn restart_into(executable: &Path) -> ExitCode {
    match std::process::Command::new(executable)
        .args(std::env::args_os().skip(1))
        .status()
    {
        Ok(status) => ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ),
        Err(error) => {
            eprintln!(
                "otter-agent: cannot start {}: {error}",
                executable.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// A flag that turns true when stdin reaches its end: the supervisor holds
/// the other end of the pipe, so this is how the worker learns it is gone.
fn watch_stdin() -> watch::Receiver<bool> {
    let (closed, receiver) = watch::channel(false);
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            use std::io::Read as _;
            let mut stdin = std::io::stdin().lock();
            let mut buffer = [0u8; 256];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = closed.send(true);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot watch stdin; only signals stop the agent");
    }
    receiver
}

/// Completes on SIGINT or SIGTERM, or when `stdin_closed` turns true.
async fn shutdown_signal(stdin_closed: Option<watch::Receiver<bool>>) {
    let supervisor_gone = async move {
        match stdin_closed {
            Some(mut closed) => {
                // An error means the watcher thread is gone: treat as closed.
                let _ = closed.wait_for(|closed| *closed).await;
                tracing::info!("stdin closed: the supervisor is gone");
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = signals() => {}
        () = supervisor_gone => {}
    }
}

async fn signals() {
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
