//! Harness for end-to-end tests: runs the real `otter-server`, `otter-agent`
//! and `otter` binaries in a temporary folder on loopback port 0, and kills
//! them when the test ends. Their output goes to log files that are printed
//! when a test fails, so a red run explains itself.

#![allow(dead_code)] // each test file uses a different part

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
}

/// Runs `otter ARGS` with no server (offline commands).
pub fn otter_offline(args: &[&str]) -> Output {
    Command::new(binary("otter"))
        .args(args)
        .env_remove("OTTER_TOKEN")
        .output()
        .expect("run otter")
}
