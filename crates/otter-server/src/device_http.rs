//! The device HTTPS endpoint: mutual TLS, three routes, each answering the
//! device named by the client certificate and no other.
//!
//! - `GET /v1/download/{token}` (step 6) streams a release artifact with
//!   `Range` support to the one device a link belongs to.
//! - `POST /v1/poll` (pull mode, and push-pull's reconcile poll) takes the
//!   device's `Registration`, stores it like an MQTT registration, and
//!   answers `PollResponse` with the device's first pending deployment, its
//!   link and notification made by `notify` (the same code as the MQTT
//!   publish). The `ETag` names the answer (deployment and link, or
//!   `"none"`), so a device that sends it back as `If-None-Match` gets a
//!   bodiless `304` while nothing changed: an idle poll costs a few hundred
//!   bytes.
//! - `POST /v1/status` takes a `StatusReport` and applies it with
//!   `engine::apply_report`, the function the MQTT path uses.
//! - `POST /v1/enrol` (CSR enrolment with a one-time token, see
//!   `crate::api::enrolment`) is the one route a client without a
//!   certificate may call: the TLS layer lets such a client finish the
//!   handshake, and every other request of its connection is answered
//!   `401 device-certificate-required` before routing.
//!
//! Device bodies are bounded by `otter_proto::MAX_MESSAGE_BYTES`; a
//! malformed one is answered `400 malformed-message` and audited
//! `message.rejected`, as over MQTT.
//!
//! The accept loop is ours (tokio `TcpListener` → `tokio-rustls` with the
//! device TLS configuration of the PKI, which requires a client certificate
//! of the device CA) so that the verified certificate's device id can be put
//! into each request's extensions as [`PeerDevice`] before axum sees it. A
//! A request made with a revoked certificate (see [`crate::revocation`]) is
//! answered `403 device-revoked` before routing, on every request, so a
//! connection kept alive from before the revocation is refused too. A
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
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use otter_proto::api::Channel;
use otter_proto::messages::{
    DecodeError, PollResponse, Registration, StatusReport, decode, encode,
};
use otter_proto::topics::DeviceId;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::audit::{Actor, AuditEvent, AuditQueue, AuditRecord};
use crate::blobs::{BlobKey, BlobStore};
use crate::clock;
use crate::engine::{self, ReportOutcome};
use crate::error::ApiError;
use crate::links::{self, LinkRefusal, LinkSecret, LinkToken};
use crate::metrics::{CountedDownload, CountingStream, metrics};
use crate::notify::{Notifier, NotifyError, Preparation, PreparedUpdate};
use crate::pki;
use crate::revocation::Revocations;
use crate::store::{RegistrationOutcome, Store};

/// A poll whose registration equals the stored one refreshes the device's
/// `last_seen` at most this often, so idle polls rarely write the database.
pub const LAST_SEEN_REFRESH: Duration = Duration::from_secs(60);

/// Bytes read from the blob per body piece. `ReaderStream`'s default (4 KiB)
/// costs a blocking-pool round trip per 4 KiB of a file; 64 KiB fills four
/// TLS records per read.
const DOWNLOAD_READ_SIZE: usize = 64 * 1024;

/// Default of [`DeviceEndpointLimits::header_read_timeout`] (`--device-idle-timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Limits of the endpoint.
#[derive(Debug, Clone)]
pub struct DeviceEndpointLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// How long a connection may wait for its next request's headers, idle
    /// time included (hyper starts this timer as soon as it waits for a
    /// request). It is also how long a kept-alive connection survives
    /// between two polls: above the default poll interval (30 s ± 10 %), a
    /// pull device reuses its connection and an idle poll costs a few
    /// hundred bytes instead of a new TLS handshake (about 4 KB with the
    /// hybrid post-quantum key exchange).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for connections to finish.
    pub drain_timeout: Duration,
}

impl Default for DeviceEndpointLimits {
    fn default() -> Self {
        DeviceEndpointLimits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: DEFAULT_IDLE_TIMEOUT,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The authenticated device of a request, from its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDevice(pub DeviceId);

/// What the endpoint's handlers need.
#[derive(Clone)]
pub struct DeviceEndpointState {
    pub store: Store,
    /// Audit rows of downloads and refused links (see [`AuditQueue`]).
    pub audit: AuditQueue,
    pub blobs: BlobStore,
    pub link_secret: Arc<LinkSecret>,
    /// Makes the links and notifications a poll answers with.
    pub notifier: Notifier,
    /// Signs the certificates of `POST /v1/enrol`.
    pub enrolment: crate::api::enrolment::DeviceEnrolment,
}

/// The route a client without a certificate may call.
pub const ENROL_PATH: &str = "/v1/enrol";

/// The endpoint's routes. Requests but enrolment's must carry a
/// [`PeerDevice`] extension, which [`serve`] adds (and without which it
/// answers 401 before routing).
pub fn router(state: DeviceEndpointState) -> Router {
    Router::new()
        .route("/v1/download/{token}", get(download))
        .route("/v1/poll", post(poll))
        .route("/v1/status", post(status))
        .route(ENROL_PATH, post(crate::api::enrolment::enrol_with_csr))
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
    revocations: Revocations,
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
        let revocations = revocations.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Held for the connection's lifetime: bounds concurrent connections
            // and lets shutdown wait for them.
            let _permit = permit;
            let tls_stream = match tokio::time::timeout(
                limits.handshake_timeout,
                acceptor.accept(CountingStream::new(tcp)),
            )
            .await
            {
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
            // `None`: no certificate (only enrolment is allowed then). A
            // certificate that verified but names no device id is refused.
            let peer = match tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
            {
                None => None,
                Some(certificate) => match pki::certificate_identity(certificate.as_ref()) {
                    Some(identity) => Some((PeerDevice(identity.device_id), identity.serial_hex)),
                    None => {
                        tracing::debug!(%peer_address, "client certificate names no valid device id");
                        return;
                    }
                },
            };
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let refused = match &peer {
                    // Checked per request, not per connection, so a
                    // revocation also refuses a connection kept alive from
                    // before it.
                    Some((peer, serial)) => {
                        let revoked = revocations.is_revoked(serial).then(|| revoked_answer(peer));
                        request.extensions_mut().insert(peer.clone());
                        revoked
                    }
                    None => (request.uri().path() != ENROL_PATH).then(certificate_required_answer),
                };
                let router = router.clone();
                async move {
                    if let Some(answer) = refused {
                        return Ok(answer);
                    }
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

/// `401 device-certificate-required`: a request without a client
/// certificate to any route but enrolment, answered before routing.
fn certificate_required_answer() -> Response {
    use axum::response::IntoResponse;
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "device-certificate-required",
        "this route needs a device client certificate",
    )
    .into_response()
}

/// `403 device-revoked`, closing the connection: every request made with a
/// revoked certificate gets it, before any handler runs or anything is read
/// or stored.
fn revoked_answer(peer: &PeerDevice) -> Response {
    use axum::response::IntoResponse;
    tracing::info!(device = %peer.0, "request with a revoked certificate refused");
    let mut response = ApiError::new(
        StatusCode::FORBIDDEN,
        "device-revoked",
        format!("the certificate of device {} is revoked", peer.0),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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
    State(state): State<DeviceEndpointState>,
    Extension(PeerDevice(device_id)): Extension<PeerDevice>,
    Path(token_text): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(token) = LinkToken::decode(&token_text) else {
        return Err(refusal_error(LinkRefusal::NotFound));
    };
    let (stored, release) = match state.store.link_for_download(&token.link_id).await? {
        Some((stored, release)) => (Some(stored), release),
        None => (None, None),
    };
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
            state.audit.record(clock::now_rfc3339(), &record).await;
            tracing::info!(device = %device_id, link = %stored.link_id.to_hex(), reason = refusal.code(), "download refused");
        }
        return Err(refusal_error(refusal));
    }
    // `verify` succeeded, so the link is stored.
    let Some(stored) = stored else {
        return Err(refusal_error(LinkRefusal::NotFound));
    };
    let release = release
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
            "release": release.release_id,
            "link_id": stored.link_id.to_hex(),
            "range_start": start,
            "bytes": length,
            "size": size,
        }));
    state.audit.record(clock::now_rfc3339(), &record).await;

    let reader = state.blobs.open_range(&blob_key, start, length).await?;
    let body = CountedDownload::new(
        ReaderStream::with_capacity(reader, DOWNLOAD_READ_SIZE),
        length,
    );
    let mut response = Response::new(Body::from_stream(body));
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

impl From<NotifyError> for ApiError {
    fn from(error: NotifyError) -> Self {
        ApiError::internal("preparing a notification", &error)
    }
}

/// Reads and decodes a device message body (at most
/// `otter_proto::MAX_MESSAGE_BYTES`). A refused one is audited
/// `message.rejected` with `topic` and answered 413 or 400.
async fn device_message<T: serde::de::DeserializeOwned>(
    store: &Store,
    device_id: &DeviceId,
    topic: &'static str,
    body: Body,
) -> Result<T, ApiError> {
    let decoded = match axum::body::to_bytes(body, otter_proto::MAX_MESSAGE_BYTES).await {
        Ok(bytes) => decode::<T>(&bytes),
        Err(error) => {
            let too_large = error
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            if !too_large {
                // The connection failed mid-body: nothing to answer or audit.
                return Err(ApiError::bad_request(
                    "malformed-message",
                    "the request body could not be read",
                ));
            }
            Err(DecodeError::TooLarge(otter_proto::MAX_MESSAGE_BYTES + 1))
        }
    };
    match decoded {
        Ok(message) => Ok(message),
        Err(error) => {
            let (status, code) = match error {
                DecodeError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "message-too-large"),
                DecodeError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed-message"),
            };
            reject(store, device_id, topic, status, code, error.to_string()).await
        }
    }
}

/// Audits `message.rejected` and returns the error answer.
async fn reject<T>(
    store: &Store,
    device_id: &DeviceId,
    topic: &'static str,
    status: StatusCode,
    code: &'static str,
    message: String,
) -> Result<T, ApiError> {
    tracing::warn!(device = %device_id, topic, code, %message, "rejected a device message");
    engine::audit_rejection(store, device_id, topic, code, &message).await?;
    Err(ApiError::new(status, code, message))
}

/// The `ETag` of a poll answer: it names the deployment and the link, which
/// together fix everything the answer carries.
pub fn poll_etag(prepared: Option<&PreparedUpdate>) -> String {
    let Some(prepared) = prepared else {
        return "\"none\"".to_owned();
    };
    let mut hasher = Sha256::new();
    hasher.update(prepared.notification.deployment_id.as_bytes());
    hasher.update([0]);
    hasher.update(prepared.link_id.to_hex().as_bytes());
    let digest = hasher.finalize();
    format!("\"{}\"", hex::encode(&digest[..8]))
}

/// Whether an `If-None-Match` header lists `etag` (weak or strong) or `*`.
fn matches_if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// `POST /v1/poll`: registration in, the first pending update (or none) out.
async fn poll(
    State(state): State<DeviceEndpointState>,
    Extension(PeerDevice(device_id)): Extension<PeerDevice>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let registration: Registration = device_message(&state.store, &device_id, "poll", body).await?;
    metrics().polls.increment();
    if registration.protocol != otter_proto::PROTOCOL_VERSION {
        let message = format!(
            "protocol version {} is not supported (expected {})",
            registration.protocol,
            otter_proto::PROTOCOL_VERSION
        );
        return reject(
            &state.store,
            &device_id,
            "poll",
            StatusCode::BAD_REQUEST,
            "malformed-message",
            message,
        )
        .await;
    }
    if let Some(key) = &registration.encryption_key
        && let Err(message) = crate::notify::check_encryption_key(key)
    {
        return reject(
            &state.store,
            &device_id,
            "poll",
            StatusCode::BAD_REQUEST,
            "malformed-message",
            message,
        )
        .await;
    }
    let outcome = state
        .store
        .record_registration(
            &device_id,
            &registration,
            Channel::Poll,
            &clock::now_rfc3339(),
            &clock::rfc3339_ago(LAST_SEEN_REFRESH),
        )
        .await?;
    match outcome {
        RegistrationOutcome::UnknownDevice => {
            return reject(
                &state.store,
                &device_id,
                "poll",
                StatusCode::FORBIDDEN,
                "unknown-device",
                "this device is not enrolled".to_owned(),
            )
            .await;
        }
        RegistrationOutcome::Recorded => {
            tracing::info!(device = %device_id, mode = registration.mode.as_str(), agent = %registration.agent_version, via = "poll", "device registered");
        }
        RegistrationOutcome::Unchanged => {}
    }
    metrics().registration(Channel::Poll);

    let mut prepared = None;
    for deployment_id in state.store.deployments_needing_link(&device_id).await? {
        if let Preparation::Ready(update) = state
            .notifier
            .prepare_update(&device_id, &deployment_id)
            .await?
        {
            prepared = Some(*update);
            break;
        }
    }
    let etag = poll_etag(prepared.as_ref());
    // Built from hex digits and quotes only.
    let etag_value =
        HeaderValue::from_str(&etag).map_err(|e| ApiError::internal("formatting an ETag", &e))?;
    if matches_if_none_match(&headers, &etag) {
        metrics().polls_not_modified.increment();
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response.headers_mut().insert(header::ETAG, etag_value);
        return Ok(response);
    }
    if let Some(update) = &prepared {
        state
            .notifier
            .record_delivery(&device_id, update, Channel::Poll)
            .await?;
    }
    let answer = PollResponse {
        update: prepared.map(|update| update.notification),
    };
    let mut response = Response::new(Body::from(encode(&answer)));
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response_headers.insert(header::ETAG, etag_value);
    Ok(response)
}

/// `POST /v1/status`: a status report over HTTPS, handled as over MQTT.
async fn status(
    State(state): State<DeviceEndpointState>,
    Extension(PeerDevice(device_id)): Extension<PeerDevice>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let report: StatusReport = device_message(&state.store, &device_id, "status", body).await?;
    match engine::apply_report(&state.store, &device_id, &report).await? {
        ReportOutcome::UnknownDeployment => {
            reject(
                &state.store,
                &device_id,
                "status",
                StatusCode::NOT_FOUND,
                "unknown-deployment",
                engine::unknown_deployment_message(&report),
            )
            .await
        }
        ReportOutcome::Applied | ReportOutcome::Ignored => Ok(StatusCode::NO_CONTENT),
    }
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
