//! Polling the device HTTPS endpoint: the whole uplink of pull mode, and the
//! reconcile poll of push-pull.
//!
//! [`PollClient`] speaks the two routes over one reqwest client holding the
//! device certificate: `POST /v1/poll` (the `Registration` in, a
//! `PollResponse` or `304 Not Modified` out; the last `ETag` goes back as
//! `If-None-Match`, so an idle poll costs a few hundred bytes) and
//! `POST /v1/status` (a `StatusReport`). Answers are read with a size cap and
//! every request has a deadline.
//!
//! The poll task feeds the agent exactly as the MQTT session does: an update
//! in a poll answer becomes `MqttEvent::Message(ServerMessage::Update)`, so
//! the `Agent` loop and its `on_update` path are the same in every mode.
//!
//! - Pull mode, [`start_pull`]: the task is the agent's only link. It sends
//!   `MqttEvent::Connected` first (the agent then registers, which triggers
//!   a poll, and repeats its job's latest report), polls every
//!   `poll_interval` with ±10 % jitter, and posts reports in order between
//!   polls. [`HttpUplink`] is the agent's `Uplink`: `register` stores the
//!   registration and asks for a poll now (after an install the server
//!   hears the new versions at once); `report` queues without waiting. A
//!   report that could not be posted (network, server error, full queue)
//!   makes the next successful poll send `Connected` again, so the agent
//!   repeats its latest report, as after an MQTT reconnection.
//! - Push-pull, [`start_reconcile`]: the MQTT session stays the agent's link;
//!   the task only polls every `reconcile_interval` (± jitter) so that a
//!   notification the device missed is still picked up. Its events are
//!   merged with the session's. [`ReconcileUplink`] wraps the MQTT uplink to
//!   keep the latest registration for the poll.
//!
//! Failed polls back off exponentially (never a tight loop) and are logged.
//! A new registration clears the kept `ETag`: the device wants the current
//! answer again even if the server's has not changed (e.g. an update it
//! deferred while installing another).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otter_proto::messages::{
    PollResponse, Registration, ServerMessage, StatusReport, UpdateNotification, decode, encode,
};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::download::error_chain;
use crate::mqtt::{MqttError, MqttEvent, Uplink};

/// Time allowed for TCP + TLS to the device endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one whole poll or report request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest poll answer read: a notification carries a signed manifest, which
/// the server keeps within a device message.
const MAX_ANSWER_BYTES: usize = 4 * otter_proto::MAX_MESSAGE_BYTES;
/// Reports queued for posting.
const REPORT_CAPACITY: usize = 16;
/// Events queued for the agent (as the MQTT session's).
pub const EVENT_CAPACITY: usize = 16;
/// First delay after a failed poll; doubles up to the poll interval (at
/// least a minute).
const ERROR_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Jitter on every poll interval: ± this fraction.
const JITTER: f64 = 0.1;

/// Why a poll or a report failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("invalid device_url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
    /// Connection, TLS, timeout: worth trying again.
    #[error("device endpoint unreachable: {0}")]
    Network(String),
    /// The server answered with an error status.
    #[error("device endpoint answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("device endpoint answer of more than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error("malformed answer from the device endpoint: {0}")]
    Malformed(String),
}

impl PollError {
    /// Whether sending the same request again cannot help: the server
    /// refused it (4xx) rather than failed (5xx, network).
    pub fn is_final(&self) -> bool {
        match self {
            PollError::Status { status, .. } => (400..500).contains(status),
            PollError::BadUrl { .. } | PollError::Client(_) => true,
            PollError::Network(_) | PollError::TooLarge | PollError::Malformed(_) => false,
        }
    }
}

/// What a poll brought back.
// One answer per poll, moved once into the loop: boxing the large variant
// would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    /// `304`: the same as the last answer.
    NotModified,
    /// `200`: the answer, with its `ETag` if the server sent one.
    Fresh {
        etag: Option<String>,
        update: Option<UpdateNotification>,
    },
}

/// An HTTPS client of the device endpoint with the device identity.
#[derive(Debug, Clone)]
pub struct PollClient {
    client: reqwest::Client,
    poll_url: String,
    status_url: String,
}

impl PollClient {
    /// `device_url` is the endpoint's base (`https://host:port`); `tls`
    /// should come from [`crate::tls::DeviceTls::https_config`].
    pub fn new(device_url: &str, tls: rustls::ClientConfig) -> Result<Self, PollError> {
        let base = device_url.trim_end_matches('/');
        let parsed = reqwest::Url::parse(base).map_err(|e| PollError::BadUrl {
            url: device_url.to_owned(),
            reason: e.to_string(),
        })?;
        if parsed.scheme() != "https" {
            return Err(PollError::BadUrl {
                url: device_url.to_owned(),
                reason: "scheme must be https".into(),
            });
        }
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| PollError::Client(error_chain(&e)))?;
        Ok(PollClient {
            client,
            poll_url: format!("{base}/v1/poll"),
            status_url: format!("{base}/v1/status"),
        })
    }

    /// One poll: sends `registration`, with `etag` as `If-None-Match`.
    pub async fn poll(
        &self,
        registration: &Registration,
        etag: Option<&str>,
    ) -> Result<PollAnswer, PollError> {
        let mut request = self
            .client
            .post(&self.poll_url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(encode(registration));
        if let Some(etag) = etag.and_then(|etag| HeaderValue::from_str(etag).ok()) {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let response = request
            .send()
            .await
            .map_err(|e| PollError::Network(error_chain(&e)))?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(PollAnswer::NotModified);
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = read_bounded(response).await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        let answer: PollResponse =
            decode(&body).map_err(|e| PollError::Malformed(e.to_string()))?;
        Ok(PollAnswer::Fresh {
            etag,
            update: answer.update,
        })
    }

    /// Posts one status report.
    pub async fn report(&self, report: &StatusReport) -> Result<(), PollError> {
        let response = self
            .client
            .post(&self.status_url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(encode(report))
            .send()
            .await
            .map_err(|e| PollError::Network(error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = read_bounded(response).await?;
        Err(status_error(status, &body))
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> PollError {
    // Error bodies are short JSON; keep a printable prefix for the log.
    let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
    PollError::Status {
        status: status.as_u16(),
        body: text,
    }
}

/// Reads a response body of at most [`MAX_ANSWER_BYTES`].
async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, PollError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| PollError::Network(error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(PollError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `interval` ± [`JITTER`], so a fleet does not poll in step.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range((1.0 - JITTER)..=(1.0 + JITTER)))
}

/// State shared by an uplink and its poll task. The mutex is never held
/// across an `.await`.
#[derive(Debug, Default)]
struct Shared {
    /// The agent's latest registration, the body of every poll.
    registration: Mutex<Option<Registration>>,
    /// Set by a new registration: poll without `If-None-Match`.
    forget_etag: AtomicBool,
    /// Set when a report was lost: have the agent repeat its latest one.
    resync: AtomicBool,
    /// Poll now rather than at the end of the interval.
    poll_now: Notify,
}

impl Shared {
    fn set_registration(&self, registration: &Registration) {
        if let Ok(mut slot) = self.registration.lock() {
            *slot = Some(registration.clone());
        }
        self.forget_etag.store(true, Ordering::SeqCst);
    }

    fn registration(&self) -> Option<Registration> {
        self.registration.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Pull mode's [`Uplink`]: everything the server must hear goes over HTTPS.
#[derive(Debug, Clone)]
pub struct HttpUplink {
    shared: Arc<Shared>,
    reports: mpsc::Sender<StatusReport>,
}

impl Uplink for HttpUplink {
    fn register(&self, registration: &Registration) -> Result<(), MqttError> {
        self.shared.set_registration(registration);
        self.shared.poll_now.notify_one();
        Ok(())
    }

    fn report(&self, report: &StatusReport) -> Result<(), MqttError> {
        tracing::info!(
            deployment = %report.deployment_id,
            event = report.event.as_str(),
            detail = report.detail.as_deref().unwrap_or(""),
            "reporting"
        );
        self.reports.try_send(report.clone()).map_err(|error| {
            self.shared.resync.store(true, Ordering::SeqCst);
            MqttError::Queue {
                topic: "POST /v1/status".to_owned(),
                reason: error.to_string(),
            }
        })
    }
}

/// Push-pull's [`Uplink`]: the MQTT uplink, keeping the latest registration
/// for the reconcile poll.
pub struct ReconcileUplink<U> {
    inner: U,
    shared: Arc<Shared>,
}

impl<U: Uplink> Uplink for ReconcileUplink<U> {
    fn register(&self, registration: &Registration) -> Result<(), MqttError> {
        self.shared.set_registration(registration);
        self.inner.register(registration)
    }

    fn report(&self, report: &StatusReport) -> Result<(), MqttError> {
        self.inner.report(report)
    }

    /// A push offer can reach a push-pull device whose mode the server has
    /// not yet heard of: its acknowledgements go over the session too.
    fn push_ack(&self, ack: &otter_proto::messages::PushAck) -> Result<(), MqttError> {
        self.inner.push_ack(ack)
    }
}

/// Starts pull mode's poll task; the agent reads `events` and uses the
/// returned uplink. The task ends when the agent drops its receiver.
pub fn start_pull(
    client: PollClient,
    interval: Duration,
    events: mpsc::Sender<MqttEvent>,
) -> (HttpUplink, JoinHandle<()>) {
    let shared = Arc::new(Shared::default());
    let (reports, report_queue) = mpsc::channel(REPORT_CAPACITY);
    let task = tokio::spawn(
        PollTask {
            client,
            interval,
            shared: shared.clone(),
            events,
            etag: None,
            first_poll: FirstPoll::WhenRegistered,
            answered: false,
        }
        .run(Some(report_queue)),
    );
    (HttpUplink { shared, reports }, task)
}

/// Starts push-pull's reconcile poll beside the MQTT session: returns the
/// uplink wrapping `inner`, the merged event receiver for the agent, and the
/// task. The first poll comes one interval after the start (the MQTT
/// registration already brings what is pending). When the session's event
/// stream ends, so does the merged one.
pub fn start_reconcile<U: Uplink>(
    client: PollClient,
    interval: Duration,
    inner: U,
    mut session_events: mpsc::Receiver<MqttEvent>,
) -> (
    ReconcileUplink<U>,
    mpsc::Receiver<MqttEvent>,
    JoinHandle<()>,
) {
    let shared = Arc::new(Shared::default());
    let (events, merged) = mpsc::channel(EVENT_CAPACITY);
    let poll_task = PollTask {
        client,
        interval,
        shared: shared.clone(),
        events: events.clone(),
        etag: None,
        first_poll: FirstPoll::AfterInterval,
        answered: false,
    };
    let task = tokio::spawn(async move {
        let forward = async move {
            while let Some(event) = session_events.recv().await {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        };
        // Whichever ends first ends both: the session closing must reach the
        // agent as the end of its event stream.
        tokio::select! {
            () = forward => {}
            () = poll_task.run(None) => {}
        }
    });
    (ReconcileUplink { inner, shared }, merged, task)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstPoll {
    /// Pull mode: as soon as the agent has registered.
    WhenRegistered,
    /// Reconcile: one interval after the start.
    AfterInterval,
}

struct PollTask {
    client: PollClient,
    interval: Duration,
    shared: Arc<Shared>,
    events: mpsc::Sender<MqttEvent>,
    /// The `ETag` of the last answer.
    etag: Option<String>,
    first_poll: FirstPoll,
    /// Whether [`MqttEvent::ServerAnswered`] was sent (pull mode, once).
    answered: bool,
}

impl PollTask {
    /// Polls (and, with a report queue, posts reports) until the agent stops
    /// listening.
    async fn run(mut self, mut reports: Option<mpsc::Receiver<StatusReport>>) {
        let pull = reports.is_some();
        let mut backoff = Backoff::new(
            ERROR_INITIAL_BACKOFF,
            self.interval.max(Duration::from_secs(60)),
        );
        if pull && self.events.send(MqttEvent::Connected).await.is_err() {
            return;
        }
        let mut next_poll = match self.first_poll {
            FirstPoll::WhenRegistered => Instant::now(),
            FirstPoll::AfterInterval => Instant::now() + jittered(self.interval),
        };
        loop {
            tokio::select! {
                // Reports first: the server should hear progress before the
                // next poll carries the registration that follows it.
                biased;
                () = self.events.closed() => return,
                report = next_report(&mut reports) => match report {
                    Some(report) => self.post_report(&report).await,
                    None => return,
                },
                () = self.shared.poll_now.notified() => next_poll = Instant::now(),
                () = tokio::time::sleep_until(next_poll) => {
                    let Some(registration) = self.shared.registration() else {
                        // Not registered yet: the registration asks for a poll.
                        next_poll = Instant::now() + jittered(self.interval);
                        continue;
                    };
                    match self.poll_once(&registration).await {
                        Ok(()) => {
                            backoff.reset();
                            next_poll = Instant::now() + jittered(self.interval);
                            if pull && !self.answered {
                                self.answered = true;
                                if self.events.send(MqttEvent::ServerAnswered).await.is_err() {
                                    return;
                                }
                            }
                            if pull && self.shared.resync.swap(false, Ordering::SeqCst)
                                && self.events.send(MqttEvent::Connected).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(PollOutcomeError::AgentGone) => return,
                        Err(PollOutcomeError::Poll(error)) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(%error, ?delay, "poll failed; trying again");
                            next_poll = Instant::now() + delay;
                        }
                    }
                }
            }
        }
    }

    async fn poll_once(&mut self, registration: &Registration) -> Result<(), PollOutcomeError> {
        if self.shared.forget_etag.swap(false, Ordering::SeqCst) {
            self.etag = None;
        }
        let answer = self
            .client
            .poll(registration, self.etag.as_deref())
            .await
            .map_err(PollOutcomeError::Poll)?;
        match answer {
            PollAnswer::NotModified => {
                tracing::debug!("poll: nothing new");
            }
            PollAnswer::Fresh { etag, update } => {
                self.etag = etag;
                match update {
                    None => tracing::debug!("poll: nothing pending"),
                    Some(update) => {
                        tracing::info!(deployment = %update.deployment_id, "poll brought an update");
                        self.events
                            .send(MqttEvent::Message(ServerMessage::Update(update)))
                            .await
                            .map_err(|_| PollOutcomeError::AgentGone)?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_report(&self, report: &StatusReport) {
        match self.client.report(report).await {
            Ok(()) => {}
            Err(error) if error.is_final() => {
                tracing::warn!(%error, deployment = %report.deployment_id, "the server refused a report");
            }
            Err(error) => {
                tracing::warn!(%error, deployment = %report.deployment_id, "report not delivered; repeated after the next successful poll");
                self.shared.resync.store(true, Ordering::SeqCst);
            }
        }
    }
}

enum PollOutcomeError {
    Poll(PollError),
    AgentGone,
}

/// The next queued report; pending forever without a queue (reconcile).
async fn next_report(reports: &mut Option<mpsc::Receiver<StatusReport>>) -> Option<StatusReport> {
    match reports {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let interval = Duration::from_secs(30);
        for _ in 0..1000 {
            let delay = jittered(interval);
            assert!(
                delay >= Duration::from_secs(27) && delay <= Duration::from_secs(33),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn client_refuses_non_https_urls() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        assert!(matches!(
            PollClient::new("http://127.0.0.1:1", tls.clone()),
            Err(PollError::BadUrl { .. })
        ));
        let client = PollClient::new("https://127.0.0.1:8443/", tls).unwrap();
        assert_eq!(client.poll_url, "https://127.0.0.1:8443/v1/poll");
        assert_eq!(client.status_url, "https://127.0.0.1:8443/v1/status");
    }

    #[test]
    fn only_client_errors_are_final() {
        let status = |status| PollError::Status {
            status,
            body: String::new(),
        };
        assert!(status(404).is_final());
        assert!(status(400).is_final());
        assert!(!status(500).is_final());
        assert!(!status(503).is_final());
        assert!(!PollError::Network("refused".into()).is_final());
    }
}
