//! Step 8: install handlers.
//!
//! Every handler implements [`Installer`]: take the verified payload of an
//! [`InstallRequest`] and make it the running version, atomically enough that
//! running the same install twice (after a crash mid-install) is harmless;
//! and, when a health check fails, [`Installer::rollback`] to the version the
//! install replaced.
//!
//! - [`FileInstaller`]: copies the payload to `target_dir/<name>` through a
//!   temporary file and a rename, keeping the old file as `<name>.previous`,
//!   which a rollback renames back.
//! - [`ArchiveInstaller`] (`archive.rs`): unpacks a tar payload into
//!   `target_dir/<name>/versions/<version>/` and switches the `current`
//!   symlink; a rollback points it back at the previous version.
//! - [`CommandInstaller`]: runs an argv with `{payload}`, `{name}` and
//!   `{version}` substituted, under a timeout; a non-zero exit fails with
//!   the tail of its stderr. Its optional rollback argv works the same way.
//!
//! [`installer_for`] picks one from a handler's configuration. Future
//! handlers (swupdate, rauc) are further implementations of the trait.

mod archive;

pub use archive::ArchiveInstaller;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::AsyncReadExt;

use crate::config::{HandlerConfig, HandlerKind};
use crate::state::sync_dir;

/// Bytes of a failed command's stderr kept for the report.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRequest {
    pub deployment_id: String,
    /// Package name from the verified manifest (a plain name, no separators).
    pub name: String,
    pub version: semver::Version,
    pub kind: otter_proto::manifest::PackageKind,
    /// The verified plaintext payload in the landing zone.
    pub payload: PathBuf,
}

/// Why an install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start install command {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("install command exited with {status}: {stderr_tail}")]
    CommandFailed { status: String, stderr_tail: String },
    #[error("install command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("install handler task failed: {0}")]
    Task(String),
    /// The handler refused the payload (a bad agent configuration, a
    /// self-update without a supervisor); the reason is reported.
    #[error("{0}")]
    Rejected(String),
    /// An archive entry the `archive` handler does not unpack; nothing of
    /// the archive is left behind.
    #[error("archive refused: {0}")]
    UnsafeArchive(String),
    /// This handler keeps no previous version to return to.
    #[error("the {0} handler cannot roll back")]
    NoRollback(&'static str),
}

/// An install handler.
pub trait Installer: Send + Sync {
    /// Short handler name for registration capabilities and logs.
    fn name(&self) -> &'static str;

    /// Installs `request.payload`. Running it twice with the same request
    /// must leave the same result as running it once.
    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>>;

    /// Undoes the install of `request` (just made by [`Installer::install`]):
    /// the version it replaced runs again, or, after a first install,
    /// nothing does. Running it twice is harmless. Handlers that keep no
    /// previous version answer [`InstallError::NoRollback`].
    fn rollback<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        let _ = request;
        let name = self.name();
        Box::pin(async move { Err(InstallError::NoRollback(name)) })
    }
}

/// The installer one handler configuration describes.
pub fn installer_for(config: &HandlerConfig) -> Box<dyn Installer> {
    match config.handler {
        HandlerKind::File => Box::new(FileInstaller::new(config.target_dir.clone())),
        HandlerKind::Archive => Box::new(ArchiveInstaller::new(config.target_dir.clone())),
        HandlerKind::Command => Box::new(
            CommandInstaller::new(config.command.clone(), config.timeout)
                .with_rollback(config.rollback_command.clone()),
        ),
    }
}

/// A map from an `io::Error` to [`InstallError::Io`] naming the action and
/// the path.
pub(crate) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> InstallError + use<> {
    let path = path.to_owned();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// Copies the payload to `target_dir/<name>` atomically.
#[derive(Debug, Clone)]
pub struct FileInstaller {
    target_dir: PathBuf,
}

impl FileInstaller {
    pub fn new(target_dir: impl Into<PathBuf>) -> Self {
        FileInstaller {
            target_dir: target_dir.into(),
        }
    }
}

/// Runs a blocking install step (`work(target_dir, request)`) on the
/// blocking pool: file system work must not stall the agent's runtime.
pub(crate) fn on_blocking_pool<'a>(
    target_dir: &Path,
    request: &InstallRequest,
    work: fn(&Path, &InstallRequest) -> Result<(), InstallError>,
) -> BoxFuture<'a, Result<(), InstallError>> {
    let target_dir = target_dir.to_owned();
    let request = request.clone();
    Box::pin(async move {
        tokio::task::spawn_blocking(move || work(&target_dir, &request))
            .await
            .map_err(|e| InstallError::Task(e.to_string()))?
    })
}

impl Installer for FileInstaller {
    fn name(&self) -> &'static str {
        "file"
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        on_blocking_pool(&self.target_dir, request, install_file)
    }

    fn rollback<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        on_blocking_pool(&self.target_dir, request, |dir, request| {
            rollback_file(dir, &request.name)
        })
    }
}

/// Renames `<name>.previous` over `<name>`; without a previous file (a first
/// install) the installed file is removed. A second run finds neither a
/// previous file nor, then, a target, and changes nothing.
fn rollback_file(target_dir: &Path, name: &str) -> Result<(), InstallError> {
    let target = target_dir.join(name);
    let previous = target_dir.join(format!("{name}.previous"));
    match std::fs::rename(&previous, &target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("cannot remove", &target)(e)),
        },
        Err(e) => return Err(io_error("cannot restore", &previous)(e)),
    }
    sync_dir(target_dir).map_err(io_error("cannot sync", target_dir))
}

fn install_file(target_dir: &Path, request: &InstallRequest) -> Result<(), InstallError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| InstallError::Io {
            action,
            path,
            source,
        }
    };
    // The name was validated with the manifest (letters, digits, '-', '_',
    // '.', no leading '.'), so it is a single path component.
    let target = target_dir.join(&request.name);
    let temporary = target_dir.join(format!(".{}.otter-tmp", request.name));
    let previous = target_dir.join(format!("{}.previous", request.name));

    std::fs::create_dir_all(target_dir).map_err(io("cannot create", target_dir))?;
    let mut source =
        std::fs::File::open(&request.payload).map_err(io("cannot open", &request.payload))?;
    let mut copy = std::fs::File::create(&temporary).map_err(io("cannot create", &temporary))?;
    std::io::copy(&mut source, &mut copy).map_err(io("cannot write", &temporary))?;
    copy.flush().map_err(io("cannot write", &temporary))?;
    copy.sync_all().map_err(io("cannot sync", &temporary))?;
    drop(copy);

    if target.exists() {
        // A second run of the same install finds the new file as the target
        // and would make it "previous"; that is the one case where a
        // repeated install differs, and it only loses the older previous.
        match std::fs::remove_file(&previous) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &previous)(e)),
        }
        if std::fs::hard_link(&target, &previous).is_err() {
            // File systems without hard links: a copy keeps the old content.
            std::fs::copy(&target, &previous).map_err(io("cannot keep", &previous))?;
        }
    }
    std::fs::rename(&temporary, &target).map_err(io("cannot replace", &target))?;
    sync_dir(target_dir).map_err(io("cannot sync", target_dir))?;
    Ok(())
}

/// Runs an install command, and an optional rollback command.
#[derive(Debug, Clone)]
pub struct CommandInstaller {
    argv: Vec<String>,
    /// Empty: the handler cannot roll back.
    rollback_argv: Vec<String>,
    timeout: Duration,
}

impl CommandInstaller {
    pub fn new(argv: Vec<String>, timeout: Duration) -> Self {
        CommandInstaller {
            argv,
            rollback_argv: Vec::new(),
            timeout,
        }
    }

    /// The same installer with a rollback argv (empty: none).
    pub fn with_rollback(mut self, rollback_argv: Vec<String>) -> Self {
        self.rollback_argv = rollback_argv;
        self
    }

    /// The argv with `{payload}`, `{name}` and `{version}` substituted.
    pub fn command_line(&self, request: &InstallRequest) -> Vec<String> {
        substitute(&self.argv, request)
    }
}

/// `argv` with `{payload}`, `{name}` and `{version}` substituted.
pub(crate) fn substitute(argv: &[String], request: &InstallRequest) -> Vec<String> {
    let payload = request.payload.to_string_lossy();
    let version = request.version.to_string();
    argv.iter()
        .map(|arg| {
            arg.replace("{payload}", &payload)
                .replace("{name}", &request.name)
                .replace("{version}", &version)
        })
        .collect()
}

impl Installer for CommandInstaller {
    fn name(&self) -> &'static str {
        "command"
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(run_command(
            substitute(&self.argv, request),
            request,
            self.timeout,
        ))
    }

    fn rollback<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        if self.rollback_argv.is_empty() {
            return Box::pin(async { Err(InstallError::NoRollback("command")) });
        }
        Box::pin(run_command(
            substitute(&self.rollback_argv, request),
            request,
            self.timeout,
        ))
    }
}

/// Runs one operator command for `request` under `timeout`; a non-zero exit
/// is an error with the tail of its stderr.
async fn run_command(
    argv: Vec<String>,
    request: &InstallRequest,
    timeout: Duration,
) -> Result<(), InstallError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(InstallError::Spawn {
            program: String::new(),
            source: std::io::Error::other("empty install command"),
        });
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("OTTER_DEPLOYMENT_ID", &request.deployment_id)
        .env("OTTER_PACKAGE_KIND", request.kind.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| InstallError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stderr = child.stderr.take();
    let run = async {
        let tail = match stderr {
            Some(stderr) => read_tail(stderr, STDERR_TAIL_BYTES).await,
            None => Vec::new(),
        };
        (child.wait().await, tail)
    };
    let (status, tail) = match tokio::time::timeout(timeout, run).await {
        Ok(done) => done,
        // Dropping `run` drops the child, and kill_on_drop kills it.
        Err(_elapsed) => return Err(InstallError::Timeout(timeout)),
    };
    let status = status.map_err(|source| InstallError::Spawn {
        program: program.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(InstallError::CommandFailed {
            status: status.to_string(),
            stderr_tail: String::from_utf8_lossy(&tail).trim().to_owned(),
        })
    }
}

/// Reads a stream to its end, keeping only its last `keep` bytes.
pub(crate) async fn read_tail(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    keep: usize,
) -> Vec<u8> {
    let mut tail = Vec::with_capacity(keep);
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => {
                tail.extend_from_slice(buffer.get(..n).unwrap_or_default());
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
            }
        }
    }
}
