//! The device HTTPS endpoint (step 6): mutual TLS, one route,
//! `GET /v1/download/{token}`, streaming a release artifact with `Range`
//! support to the one device a link belongs to.
//!
//! The accept loop is ours (tokio `TcpListener` → `tokio-rustls` with the
//! device TLS configuration of the PKI, which requires a client certificate
//! of the device CA) so that the verified certificate's device id can be put
//! into each request's extensions as [`PeerDevice`] before axum sees it. A
//! semaphore bounds connections, the handshake has a deadline, and shutdown
//! stops accepting, lets requests in flight finish, and waits (bounded) for
//! connections to close.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use otter_proto::topics::DeviceId;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::audit::{Actor, AuditEvent, AuditRecord};
use crate::blobs::{BlobKey, BlobStore};
use crate::clock;
use crate::error::ApiError;
use crate::links::{self, LinkRefusal, LinkSecret, LinkToken};
use crate::pki;
use crate::store::Store;

/// Limits of the endpoint.
#[derive(Debug, Clone)]
pub struct DeviceEndpointLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Deadline for a request's headers once a connection is idle.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for connections to finish.
    pub drain_timeout: Duration,
}

impl Default for DeviceEndpointLimits {
    fn default() -> Self {
        DeviceEndpointLimits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The authenticated device of a request, from its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDevice(pub DeviceId);

/// What the download handler needs.
#[derive(Clone)]
pub struct DownloadState {
    pub store: Store,
    pub blobs: BlobStore,
    pub link_secret: Arc<LinkSecret>,
}

/// The endpoint's routes. Requests must carry a [`PeerDevice`] extension,
/// which [`serve`] adds.
pub fn router(state: DownloadState) -> Router {
    Router::new()
        .route("/v1/download/{token}", get(download))
        .fallback(|| async { ApiError::not_found("not-found", "no such route") })
        .with_state(state)
}

/// Accepts TLS connections on `listener` and serves `router` until
/// `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: DeviceEndpointLimits,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer_address) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "device endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Held for the connection's lifetime: bounds concurrent connections
            // and lets shutdown wait for them.
            let _permit = permit;
            let tls_stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer_address, %error, "device TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer_address, "device TLS handshake timed out");
                        return;
                    }
                };
            let device_id = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|certificate| pki::device_id_from_certificate(certificate.as_ref()));
            let Some(device_id) = device_id else {
                tracing::debug!(%peer_address, "client certificate names no valid device id");
                return;
            };
            let peer = PeerDevice(device_id);
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(peer.clone());
                let router = router.clone();
                async move {
                    router
                        .oneshot(request)
                        .await
                        .map_err(|never: Infallible| never)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let builder = builder.http1_only();
            let connection = builder.serve_connection(TokioIo::new(tls_stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer_address, %error, "device connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("device connections still open after the drain timeout");
    }
}

/// Which bytes of a blob of `size` bytes a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeDecision {
    /// No usable range: send everything (200).
    Full,
    /// Send bytes `start..=end` (206).
    Partial { start: u64, end: u64 },
    /// The range starts past the end (416).
    Unsatisfiable,
}

/// Interprets a `Range` header. Only one range of unit `bytes` is served;
/// anything else is ignored, as RFC 9110 allows, and the whole blob sent.
pub fn decide_range(header_value: Option<&str>, size: u64) -> RangeDecision {
    let Some(spec) = header_value.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return RangeDecision::Full;
    };
    if spec.contains(',') {
        return RangeDecision::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeDecision::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |text: &str| -> Option<u64> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        return match number(last) {
            None => RangeDecision::Full,
            Some(0) => RangeDecision::Unsatisfiable,
            Some(_) if size == 0 => RangeDecision::Unsatisfiable,
            Some(length) => RangeDecision::Partial {
                start: size.saturating_sub(length),
                end: size - 1,
            },
        };
    }
    let Some(start) = number(first) else {
        return RangeDecision::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match number(last) {
            Some(end) if end >= start => Some(end),
            _ => return RangeDecision::Full,
        }
    };
    if start >= size {
        return RangeDecision::Unsatisfiable;
    }
    RangeDecision::Partial {
        start,
        end: end.map_or(size - 1, |end| end.min(size - 1)),
    }
}

fn refusal_error(refusal: LinkRefusal) -> ApiError {
    let status = match refusal {
        LinkRefusal::NotFound => StatusCode::NOT_FOUND,
        LinkRefusal::WrongDevice => StatusCode::FORBIDDEN,
        LinkRefusal::Expired | LinkRefusal::Revoked => StatusCode::GONE,
    };
    ApiError::new(status, refusal.code(), refusal.to_string())
}

async fn download(
    State(state): State<DownloadState>,
    Extension(PeerDevice(device_id)): Extension<PeerDevice>,
    Path(token_text): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(token) = LinkToken::decode(&token_text) else {
        return Err(refusal_error(LinkRefusal::NotFound));
    };
    let stored = state.store.link(&token.link_id).await?;
    let now = clock::now_unix();
    if let Err(refusal) =
        links::verify(&state.link_secret, &token, stored.as_ref(), &device_id, now)
    {
        if let (
            Some(stored),
            LinkRefusal::WrongDevice | LinkRefusal::Expired | LinkRefusal::Revoked,
        ) = (&stored, refusal)
        {
            let actor = Actor::device(&device_id);
            let record = AuditRecord::new(&actor, AuditEvent::LinkRefused)
                .device(device_id.as_str())
                .deployment(&stored.deployment_id)
                .details(serde_json::json!({
                    "reason": refusal.code(),
                    "link_id": stored.link_id.to_hex(),
                    "link_device": stored.device_id,
                }));
            state
                .store
                .append_audit(&clock::now_rfc3339(), &record)
                .await?;
            tracing::info!(device = %device_id, link = %stored.link_id.to_hex(), reason = refusal.code(), "download refused");
        }
        return Err(refusal_error(refusal));
    }
    // `verify` succeeded, so the link is stored.
    let Some(stored) = stored else {
        return Err(refusal_error(LinkRefusal::NotFound));
    };
    let release = state
        .store
        .release_of_deployment(&stored.deployment_id)
        .await?
        .ok_or_else(|| ApiError::internal("finding a link's release", &stored.deployment_id))?;
    let blob_key = BlobKey::from_sha256_hex(&release.blob_key)
        .ok_or_else(|| ApiError::internal("reading a release's blob key", &release.blob_key))?;
    let size = state.blobs.size(&blob_key).await?;
    let etag = format!("\"{}\"", release.artifact_sha256);

    // A resumed download whose validator no longer matches gets everything.
    let if_range_matches = headers
        .get(header::IF_RANGE)
        .map(|value| value.as_bytes() == etag.as_bytes())
        .unwrap_or(true);
    let range_header = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok());
    let decision = if if_range_matches {
        decide_range(range_header, size)
    } else {
        RangeDecision::Full
    };
    let (status, start, length) = match decision {
        RangeDecision::Full => (StatusCode::OK, 0, size),
        RangeDecision::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeDecision::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("the artifact has {size} bytes"),
            )
            .into_response_with_header(header::CONTENT_RANGE, &format!("bytes */{size}"));
            response
                .headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            return Ok(response);
        }
    };

    let actor = Actor::device(&device_id);
    let record = AuditRecord::new(&actor, AuditEvent::DownloadServed)
        .device(device_id.as_str())
        .deployment(&stored.deployment_id)
        .details(serde_json::json!({
            "release": release.info.id,
            "link_id": stored.link_id.to_hex(),
            "range_start": start,
            "bytes": length,
            "size": size,
        }));
    state
        .store
        .append_audit(&clock::now_rfc3339(), &record)
        .await?;

    let reader = state.blobs.open_range(&blob_key, start, length).await?;
    let mut response = Response::new(Body::from_stream(ReaderStream::new(reader)));
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response_headers.insert(header::ETAG, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let content_range = format!("bytes {start}-{}/{size}", start + length - 1);
        if let Ok(value) = HeaderValue::from_str(&content_range) {
            response_headers.insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeDecision::*;

    #[test]
    fn ranges() {
        let cases: &[(Option<&str>, u64, RangeDecision)] = &[
            (None, 100, Full),
            (Some("bytes=0-"), 100, Partial { start: 0, end: 99 }),
            (Some("bytes=10-"), 100, Partial { start: 10, end: 99 }),
            (Some("bytes=10-19"), 100, Partial { start: 10, end: 19 }),
            (Some("bytes=90-500"), 100, Partial { start: 90, end: 99 }),
            (Some("bytes=99-99"), 100, Partial { start: 99, end: 99 }),
            (Some("bytes=-10"), 100, Partial { start: 90, end: 99 }),
            (Some("bytes=-500"), 100, Partial { start: 0, end: 99 }),
            (Some("bytes=100-"), 100, Unsatisfiable),
            (Some("bytes=100-200"), 100, Unsatisfiable),
            (Some("bytes=-0"), 100, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=20-10"), 100, Full),
            (Some("bytes=0-1,5-6"), 100, Full),
            (Some("items=0-1"), 100, Full),
            (Some("bytes=a-"), 100, Full),
            (Some("bytes=+1-"), 100, Full),
            (Some("bytes=-"), 100, Full),
            (Some("bytes=18446744073709551616-"), 100, Full),
        ];
        for (header_value, size, expected) in cases {
            assert_eq!(
                decide_range(*header_value, *size),
                *expected,
                "{header_value:?} of {size}"
            );
        }
    }
}
