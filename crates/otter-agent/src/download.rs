//! Resumable HTTPS download of an artifact into a `.part` file.
//!
//! [`Downloader::download`] appends to the destination file and, when the
//! file already holds bytes (an interrupted attempt, an agent restart), asks
//! for the rest with `Range: bytes=N-`. A `206` answer must carry
//! `Content-Range: bytes N-…`; a `200` means the server ignored the range,
//! so the file is truncated and the body written from the start. Any other
//! `206` start restarts from zero.
//!
//! `403`, `404` and `410` are final for the link ([`DownloadError::Refused`]):
//! the link is not ours, unknown, expired or revoked, and asking again will
//! not change that. Network errors and `5xx` are retried with exponential
//! backoff and jitter; [`DownloadPolicy::max_attempts`] bounds the attempts
//! in a row that bring no new byte, so a slow link that keeps making progress
//! is not abandoned, while a dead one is.
//!
//! The downloader never writes more than the size the manifest declares; the
//! caller checks the hash of the finished file.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Time allowed for TCP + TLS to the device endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence between two reads of a response before the attempt fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadPolicy {
    /// Attempts in a row without progress before giving up; at least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why a download stopped.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The server refused the link for good (403, 404, 410, other 4xx).
    #[error("download refused: HTTP {status} ({reason})")]
    Refused { status: u16, reason: &'static str },
    /// The server sent more bytes than the manifest declares.
    #[error("server sent more than the {expected} bytes the manifest declares")]
    Oversized { expected: u64 },
    #[error("download failed after {attempts} attempts without progress: {last_error}")]
    GaveUp { attempts: u32, last_error: String },
    /// The landing zone could not be written.
    #[error("cannot write {path}: {source}")]
    Local {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid download link {link:?}: {reason}")]
    BadLink { link: String, reason: String },
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
    #[error("download cancelled")]
    Cancelled,
}

/// What one attempt achieved when it did not end the download.
enum AttemptEnd {
    /// The file holds every expected byte.
    Complete,
    /// The answer cannot continue the file; truncate and start over.
    Restart(String),
    /// A transient failure; `progress` says whether bytes were added.
    Retry { progress: bool, error: String },
}

/// An HTTPS client with the device identity, and a retry policy.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    policy: DownloadPolicy,
}

impl Downloader {
    /// `tls` should come from [`crate::tls::DeviceTls::https_config`].
    pub fn new(tls: rustls::ClientConfig, policy: DownloadPolicy) -> Result<Self, DownloadError> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            // A link is a capability for one URL; following a redirect would
            // send the device's certificate somewhere the server did not name.
            .redirect(reqwest::redirect::Policy::none())
            // Downloads are days apart: a connection kept open after one
            // only holds a socket on both ends (and a file descriptor per
            // device on the server) until the idle timeout closes it.
            .pool_max_idle_per_host(0)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| DownloadError::Client(error_chain(&e)))?;
        Ok(Downloader { client, policy })
    }

    /// Downloads into `destination` until it holds `expected_size` bytes.
    ///
    /// `link` is asked for the URL before every attempt, so a link refreshed
    /// by a newer notification is picked up by the next retry.
    pub async fn download(
        &self,
        link: &(dyn Fn() -> String + Send + Sync),
        destination: &Path,
        expected_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(), DownloadError> {
        let mut backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        let mut failures = 0u32;
        loop {
            if cancel.is_cancelled() {
                return Err(DownloadError::Cancelled);
            }
            let mut offset = file_length(destination).await?;
            if offset > expected_size {
                truncate(destination).await?;
                offset = 0;
            }
            if offset == expected_size {
                return Ok(());
            }
            let url = link();
            if !url.starts_with("https://") {
                return Err(DownloadError::BadLink {
                    link: url,
                    reason: "not an https:// URL".into(),
                });
            }
            let error = match self
                .attempt(&url, destination, offset, expected_size, cancel)
                .await?
            {
                AttemptEnd::Complete => return Ok(()),
                AttemptEnd::Restart(reason) => {
                    tracing::warn!(%reason, "download cannot resume; starting over");
                    truncate(destination).await?;
                    reason
                }
                AttemptEnd::Retry { progress, error } => {
                    if progress {
                        failures = 0;
                        backoff.reset();
                    }
                    error
                }
            };
            failures += 1;
            if failures >= self.policy.max_attempts {
                return Err(DownloadError::GaveUp {
                    attempts: failures,
                    last_error: error,
                });
            }
            let delay = backoff.next_delay();
            tracing::info!(%error, attempt = failures, ?delay, "download interrupted; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Err(DownloadError::Cancelled),
            }
        }
    }

    async fn attempt(
        &self,
        url: &str,
        destination: &Path,
        offset: u64,
        expected_size: u64,
        cancel: &CancellationToken,
    ) -> Result<AttemptEnd, DownloadError> {
        // The file first: failing to open it after the server has started
        // sending would waste what is already on the wire.
        let local = |source| DownloadError::Local {
            path: destination.to_owned(),
            source,
        };
        let mut file = match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(destination)
            .await
        {
            Ok(file) => file,
            // Out of descriptors for a moment: the retry's backoff waits it out.
            Err(error) if crate::backoff::is_transient_io(&error) => {
                return Ok(AttemptEnd::Retry {
                    progress: false,
                    error: format!("opening {}: {error}", destination.display()),
                });
            }
            Err(error) => return Err(local(error)),
        };
        let mut request = self.client.get(url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let sent = tokio::select! {
            sent = request.send() => sent,
            () = cancel.cancelled() => return Err(DownloadError::Cancelled),
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(e) if e.is_builder() => {
                return Err(DownloadError::BadLink {
                    link: url.to_owned(),
                    reason: error_chain(&e),
                });
            }
            Err(e) => {
                return Ok(AttemptEnd::Retry {
                    progress: false,
                    error: error_chain(&e),
                });
            }
        };
        let status = response.status();
        let start = match status {
            StatusCode::OK => 0,
            StatusCode::PARTIAL_CONTENT => {
                let header = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok());
                match header.and_then(content_range_start) {
                    Some(start) if start == offset => start,
                    _ => {
                        return Ok(AttemptEnd::Restart(format!(
                            "206 with Content-Range {header:?} does not continue at byte {offset}"
                        )));
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Ok(AttemptEnd::Restart(format!(
                    "416 for a range from byte {offset}"
                )));
            }
            status if status.is_server_error() => {
                return Ok(AttemptEnd::Retry {
                    progress: false,
                    error: format!("HTTP {status}"),
                });
            }
            status => return Err(refused(status)),
        };
        if start == 0 && offset > 0 {
            tracing::info!("server ignored the range request; downloading from the start");
            // Appends go to the end whatever the position: emptying the
            // file is enough.
            file.set_len(0).await.map_err(local)?;
        }
        let mut length = start;
        let mut progress = false;
        let end = loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk,
                () = cancel.cancelled() => {
                    // Keep what was written: the next run resumes from it.
                    file.flush().await.map_err(local)?;
                    return Err(DownloadError::Cancelled);
                }
            };
            match chunk {
                Ok(Some(bytes)) => {
                    let chunk_length = bytes.len() as u64;
                    if length.saturating_add(chunk_length) > expected_size {
                        drop(file);
                        truncate(destination).await?;
                        return Err(DownloadError::Oversized {
                            expected: expected_size,
                        });
                    }
                    file.write_all(&bytes).await.map_err(local)?;
                    length += chunk_length;
                    progress = true;
                }
                Ok(None) if length == expected_size => break AttemptEnd::Complete,
                Ok(None) => {
                    break AttemptEnd::Retry {
                        progress,
                        error: format!("response ended at byte {length} of {expected_size}"),
                    };
                }
                Err(e) => {
                    break AttemptEnd::Retry {
                        progress,
                        error: error_chain(&e),
                    };
                }
            }
        };
        // Whatever the end, the bytes written are a correct prefix: make them
        // durable so a restart resumes from them.
        file.flush().await.map_err(local)?;
        file.sync_data().await.map_err(local)?;
        Ok(end)
    }
}

fn refused(status: StatusCode) -> DownloadError {
    let reason = match status {
        StatusCode::FORBIDDEN => "the link is not this device's",
        StatusCode::NOT_FOUND => "unknown link",
        StatusCode::GONE => "the link expired or was revoked",
        s if s.is_redirection() => "redirects are not followed",
        _ => "unexpected answer",
    };
    DownloadError::Refused {
        status: status.as_u16(),
        reason,
    }
}

/// The first byte position of `bytes N-M/T` (or `bytes N-M/*`).
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    let (span, _total) = range.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    (start <= end).then_some(start)
}

async fn file_length(path: &Path) -> Result<u64, DownloadError> {
    match tokio::fs::metadata(path).await {
        Ok(metadata) => Ok(metadata.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(DownloadError::Local {
            path: path.to_owned(),
            source,
        }),
    }
}

async fn truncate(path: &Path) -> Result<(), DownloadError> {
    tokio::fs::File::create(path)
        .await
        .map(drop)
        .map_err(|source| DownloadError::Local {
            path: path.to_owned(),
            source,
        })
}

/// An error and its sources on one line: reqwest's top-level message alone
/// ("error sending request") hides the cause.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range_start("bytes 10-99/100"), Some(10));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        for bad in [
            "bytes 10-5/100",
            "bytes */100",
            "items 1-2/3",
            "bytes 1-2",
            "",
        ] {
            assert_eq!(content_range_start(bad), None, "{bad}");
        }
    }
}
