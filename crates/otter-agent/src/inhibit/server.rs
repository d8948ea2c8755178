//! The inhibitor socket server: binds the socket (replacing a stale one),
//! accepts connections and answers their requests; a connection's
//! inhibitors are released when it closes.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

/// The socket server: accepts connections and answers their requests until
/// stopped. One task per connection.
pub struct InhibitServer {
    path: PathBuf,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl InhibitServer {
    /// Binds `path` (removing a stale socket left by a previous agent), sets
    /// mode 0660 and starts serving `inhibitors`. Must be called inside a
    /// tokio runtime.
    pub fn start(path: &Path, inhibitors: Inhibitors) -> Result<InhibitServer, InhibitError> {
        let socket_error = |source| InhibitError::Socket {
            path: path.to_owned(),
            source,
        };
        // The default lives in the state folder, which a first start may
        // not have made yet.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(socket_error)?;
        }
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(socket_error)?;
        set_socket_mode(path).map_err(socket_error)?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, inhibitors, cancel.clone()));
        tracing::info!(socket = %path.display(), "inhibitor socket listening");
        Ok(InhibitServer {
            path: path.to_owned(),
            cancel,
            task,
        })
    }

    /// Stops accepting, closes every connection (their inhibitors end) and
    /// removes the socket file.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::debug!(%error, "removing the inhibitor socket");
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), InhibitError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(InhibitError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if !metadata.file_type().is_socket() {
            return Err(InhibitError::NotASocket(path.to_owned()));
        }
    }
    #[cfg(not(unix))]
    let _ = metadata;
    // A socket someone answers on belongs to a running agent.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(InhibitError::InUse(path.to_owned()));
    }
    std::fs::remove_file(path).map_err(|source| InhibitError::Socket {
        path: path.to_owned(),
        source,
    })
}

fn set_socket_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}

async fn serve(listener: UnixListener, inhibitors: Inhibitors, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors and the like: wait a little, go on.
                tracing::warn!(%error, "accepting an inhibitor connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // One non-blocking write into the socket buffer, then close:
            // refusing costs no task and no wait.
            let mut line =
                serde_json::to_vec(&Response::error("too many connections")).unwrap_or_default();
            line.push(b'\n');
            let _ = stream.try_write(&line);
            drop(stream);
            continue;
        };
        let inhibitors = inhibitors.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let holder = HolderId::next();
            tokio::select! {
                () = connection(stream, holder, &inhibitors) => {}
                () = cancel.cancelled() => {}
            }
            let released = inhibitors.release_holder(holder);
            if !released.is_empty() {
                tracing::info!(?released, "inhibitor holder gone; released");
            }
            drop(permit);
        });
    }
    connections.shutdown().await;
}

/// Answers the lines of one connection until it closes or sends a line too
/// long.
async fn connection(stream: UnixStream, holder: HolderId, inhibitors: &Inhibitors) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        let too_long = line.len() > MAX_LINE_BYTES;
        let answer = if too_long {
            Response::error(format!("line longer than {MAX_LINE_BYTES} bytes"))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            inhibitors.answer(holder, &line, Instant::now())
        };
        // Serialising these plain structs cannot fail.
        let mut text = serde_json::to_vec(&answer).unwrap_or_default();
        text.push(b'\n');
        if writer.write_all(&text).await.is_err() || too_long {
            return;
        }
    }
}
