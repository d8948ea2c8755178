//! Harness for end-to-end tests: runs the real `otter-server`, `otter-agent`
//! and `otter` binaries in a temporary folder on loopback port 0, and kills
//! them when the test ends. Their output goes to log files that are printed
//! when a test fails, so a red run explains itself.
//!
//! Layout: processes ([`Process`], [`Server`]), then the steps every
//! end-to-end test repeats: signing keys and payloads, enrolment and
//! agent.toml edits, starting agents, building packages, releasing and
//! deploying, waiting for registrations and deployments, and reading the
//! audit.

#![allow(dead_code)] // each test file uses a different part

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use otter_proto::api::{AuditEntry, DeploymentStatus, DeviceInfo, ReleaseInfo};
use otter_proto::messages::Mode;

/// How long an end-to-end step may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(120);

/// Folder holding the workspace's binaries (next to the `otter` test binary).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_otter"))
        .parent()
        .expect("binary has a folder")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// Waits until `condition` returns `Some`, or fails the test after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed on drop, with its output in a log file.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Process {
        let log = log_dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .env("RUST_LOG", "info,otter_server=debug,otter_agent=debug")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended, `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGKILL (no chance to clean up, like a power cut for the
    /// process) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The addresses a server bound, from `DATA_DIR/endpoints.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Endpoints {
    pub api: String,
    pub device: String,
    pub mqtt: String,
}

/// A running `otter-server` on port 0 addresses.
pub struct Server {
    pub process: Process,
    pub data_dir: PathBuf,
    pub endpoints: Endpoints,
}

impl Server {
    pub fn start(root: &Path, trusted_signers: &[&Path]) -> Server {
        Server::start_with(root, trusted_signers, &[])
    }

    /// Like [`Server::start`], with more flags (e.g. `--push-window 2`).
    pub fn start_with(root: &Path, trusted_signers: &[&Path], extra_args: &[&str]) -> Server {
        let data_dir = root.join("server-data");
        let mut command = Command::new(binary("otter-server"));
        command.arg("--data-dir").arg(&data_dir).args([
            "--api-addr",
            "127.0.0.1:0",
            "--device-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
        ]);
        for signer in trusted_signers {
            command.arg("--trusted-signer").arg(signer);
        }
        command.args(extra_args);
        let mut process = Process::spawn("otter-server", &mut command, root);
        let endpoints_file = data_dir.join("endpoints.json");
        let endpoints = wait_for(
            "the server's endpoints.json",
            Duration::from_secs(60),
            || {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!(
                        "otter-server exited early ({status}):\n{}",
                        process.log_text()
                    );
                }
                let text = fs::read_to_string(&endpoints_file).ok()?;
                serde_json::from_str::<Endpoints>(&text).ok()
            },
        );
        Server {
            process,
            data_dir,
            endpoints,
        }
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.endpoints.api)
    }

    /// Runs `otter ARGS` against this server with the admin token.
    pub fn otter(&self, args: &[&str]) -> Output {
        Command::new(binary("otter"))
            .env("OTTER_SERVER", self.api_url())
            .env("OTTER_TOKEN_FILE", self.data_dir.join("admin.token"))
            .env_remove("OTTER_TOKEN")
            .args(args)
            .output()
            .expect("run otter")
    }

    /// Runs `otter ARGS`, asserts success and returns stdout.
    pub fn otter_ok(&self, args: &[&str]) -> String {
        let output = self.otter(args);
        assert!(
            output.status.success(),
            "otter {args:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs `otter ARGS --json` and parses its output.
    pub fn otter_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.otter_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("otter {args:?} --json: {e}\n{text}"))
    }

    /// Uploads a package file; returns the release id it was stored as.
    pub fn upload_release(&self, package: &Path) -> String {
        self.otter_ok(&["release", "upload", package.to_str().unwrap()])
            .trim()
            .to_owned()
    }

    /// Creates a deployment of `release` to `target` (`device:ID`,
    /// `fleet:TAG`, `all`); returns the deployment id.
    pub fn create_deployment(&self, release: &str, target: &str) -> String {
        self.otter_ok(&["deploy", "create", "--release", release, "--target", target])
            .trim()
            .to_owned()
    }

    /// Uploads `package` and deploys `release` (its id) to `target`.
    pub fn upload_and_deploy(&self, package: &Path, release: &str, target: &str) -> String {
        self.upload_release(package);
        self.create_deployment(release, target)
    }

    pub fn deployment_status(&self, deployment: &str) -> DeploymentStatus {
        self.otter_json(&["deploy", "status", deployment])
    }

    /// Waits until every target of `deployment` reached a final phase.
    pub fn wait_deployment_complete(&self, deployment: &str) -> DeploymentStatus {
        wait_for(
            &format!("deployment {deployment} to complete"),
            WAIT,
            || {
                let status = self.deployment_status(deployment);
                status.info.complete.then_some(status)
            },
        )
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.otter_json(&["devices", "list"])
    }

    /// The listed device `id`, `None` while it is not listed.
    pub fn device(&self, id: &str) -> Option<DeviceInfo> {
        self.devices()
            .into_iter()
            .find(|d| d.device_id.as_str() == id)
    }

    /// Waits until every device in `ids` is registered in `mode`.
    pub fn wait_modes(&self, ids: &[&str], mode: Mode) {
        wait_for(
            &format!("{ids:?} registered in mode {mode:?}"),
            WAIT,
            || {
                let all = self.devices();
                ids.iter()
                    .all(|id| {
                        all.iter()
                            .any(|d| d.device_id.as_str() == *id && d.mode == Some(mode))
                    })
                    .then_some(())
            },
        );
    }

    /// The size of the stored artifact of `release`.
    pub fn artifact_size(&self, release: &str) -> u64 {
        let releases: Vec<ReleaseInfo> = self.otter_json(&["release", "list"]);
        releases
            .into_iter()
            .find(|r| r.id == release)
            .map(|r| r.artifact_size)
            .expect("release listed")
    }

    /// The whole audit of one device.
    pub fn device_audit(&self, device: &str) -> Vec<AuditEntry> {
        self.otter_json(&["audit", "list", "--device", device])
    }

    /// The audit of one device within one deployment.
    pub fn audit(&self, device: &str, deployment: &str) -> Vec<AuditEntry> {
        self.otter_json(&[
            "audit",
            "list",
            "--device",
            device,
            "--deployment",
            deployment,
        ])
    }
}

/// Runs `otter ARGS` with no server (offline commands).
pub fn otter_offline(args: &[&str]) -> Output {
    Command::new(binary("otter"))
        .args(args)
        .env_remove("OTTER_TOKEN")
        .output()
        .expect("run otter")
}

/// Generates an Ed25519 signing key at `root/NAME` (and `root/NAME.pub`)
/// with `otter keys generate`; returns (private key, public key).
pub fn generate_signing_key(root: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = root.join(name);
    let output = otter_offline(&["keys", "generate", "--out", key.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "keys generate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (key, root.join(format!("{name}.pub")))
}

/// A server trusting a fresh signing key `root/signing.key`, started with
/// `extra_args`; returns it and the private key.
pub fn start_server_with_key(root: &Path, extra_args: &[&str]) -> (Server, PathBuf) {
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start_with(root, &[&public_key], extra_args);
    (server, key)
}

/// Deterministic, poorly compressible payload of `size` bytes.
pub fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Runs `otter package build` of `input` into `out` for hardware `revB`,
/// and returns its output without judging it.
pub fn run_package_build(
    key: &Path,
    name: &str,
    version: &str,
    kind: &str,
    input: &Path,
    out: &Path,
) -> Output {
    otter_offline(&[
        "package",
        "build",
        "--key",
        key.to_str().unwrap(),
        "--name",
        name,
        "--version",
        version,
        "--kind",
        kind,
        "--hardware",
        "revB",
        "--out",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ])
}

/// Builds `root/NAME-VERSION.otter` from the payload file `input` and
/// asserts the build succeeded; returns the package's path.
pub fn build_package_from(
    root: &Path,
    key: &Path,
    name: &str,
    version: &str,
    kind: &str,
    input: &Path,
) -> PathBuf {
    let out = root.join(format!("{name}-{version}.otter"));
    let output = run_package_build(key, name, version, kind, input, &out);
    assert!(
        output.status.success(),
        "package build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Writes `payload` to `root/NAME-VERSION.payload` and builds it into
/// `root/NAME-VERSION.otter` (see [`build_package_from`]).
pub fn build_package(
    root: &Path,
    key: &Path,
    name: &str,
    version: &str,
    kind: &str,
    payload: &[u8],
) -> PathBuf {
    let input = root.join(format!("{name}-{version}.payload"));
    fs::write(&input, payload).unwrap();
    build_package_from(root, key, name, version, kind, &input)
}

/// `sensor-fw` firmware `version` of `payload` (see [`build_package`]).
pub fn build_firmware(root: &Path, key: &Path, version: &str, payload: &[u8]) -> PathBuf {
    build_package(root, key, "sensor-fw", version, "firmware", payload)
}

/// Enrols `id` (hardware `revB`, with `tags` if given) with `otter device
/// enroll`; returns its bundle folder `root/ID`.
pub fn enroll(server: &Server, root: &Path, id: &str, tags: Option<&str>) -> PathBuf {
    let dir = root.join(id);
    let mut args = vec!["device", "enroll", id];
    if let Some(tags) = tags {
        args.extend(["--tags", tags]);
    }
    args.extend(["--hardware", "revB", "--out", dir.to_str().unwrap()]);
    server.otter_ok(&args);
    dir
}

/// Rewrites `DIR/agent.toml` with `edit`, asserts the edit changed it, and
/// returns the new text.
pub fn edit_agent_config(dir: &Path, edit: impl FnOnce(String) -> String) -> String {
    let config = dir.join("agent.toml");
    let text = fs::read_to_string(&config).unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit of agent.toml changed nothing");
    fs::write(&config, &edited).unwrap();
    edited
}

/// agent.toml `text` with the generated `mode = "push-pull"` set to `mode`.
pub fn with_mode(text: &str, mode: &str) -> String {
    text.replacen("mode = \"push-pull\"", &format!("mode = \"{mode}\""), 1)
}

/// agent.toml `text` polling every second instead of every 30 s, so tests
/// do not wait for pull devices.
pub fn with_fast_poll(text: &str) -> String {
    text.replacen("poll_interval = \"30s\"", "poll_interval = \"1s\"", 1)
}

/// Starts the build's `otter-agent` on `DIR/agent.toml`, logging to
/// `root/LOG_NAME.log`.
pub fn start_agent(root: &Path, log_name: &str, dir: &Path) -> Process {
    start_agent_exe(&binary("otter-agent"), root, log_name, dir)
}

/// Like [`start_agent`], running the agent executable `exe`.
pub fn start_agent_exe(exe: &Path, root: &Path, log_name: &str, dir: &Path) -> Process {
    Process::spawn(
        log_name,
        Command::new(exe)
            .arg("--config")
            .arg(dir.join("agent.toml")),
        root,
    )
}

/// How many audit rows are `event`.
pub fn count(audit: &[AuditEntry], event: &str) -> usize {
    audit.iter().filter(|e| e.event == event).count()
}

/// Whether some audit row is `event`.
pub fn has(audit: &[AuditEntry], event: &str) -> bool {
    audit.iter().any(|e| e.event == event)
}

/// The event names of `audit`, in order.
pub fn events(audit: &[AuditEntry]) -> Vec<&str> {
    audit.iter().map(|e| e.event.as_str()).collect()
}

/// The first audit row that is `event`; fails the test if there is none.
pub fn find_event<'a>(audit: &'a [AuditEntry], event: &str) -> &'a AuditEntry {
    audit
        .iter()
        .find(|e| e.event == event)
        .unwrap_or_else(|| panic!("no {event} in {audit:#?}"))
}

/// Asserts that `steps` occur in `audit`, in this order (others may be
/// between them); `who` names the audit in the failure message.
pub fn assert_steps_in_order(who: &str, audit: &[AuditEntry], steps: &[&str]) {
    let events = events(audit);
    let mut position = 0;
    for step in steps {
        let found = events[position..].iter().position(|e| e == step);
        assert!(
            found.is_some(),
            "{who}: audit lacks {step} after position {position}: {events:?}"
        );
        position += found.unwrap_or(0) + 1;
    }
}
