//! Test fixtures shared by the integration tests: a throw-away PKI (CA,
//! server certificate for 127.0.0.1, device certificate for `dev-1`) written
//! to files, and a small HTTPS server on 127.0.0.1:0 that demands the client
//! certificate, records every request, and answers as a test script says
//! (serve a range, ignore it, cut the connection after K bytes, answer a
//! status).
//!
//! The server speaks just enough HTTP/1.1 by hand (one request per
//! connection, `Connection: close`) so a test controls every byte.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `data_key` (base64) wrapped to the device whose encryption key file is
/// `key_file` (created first if missing, as the agent does at start), for
/// the release and artifact of `manifest`: what the server would send.
pub fn wrap_key(
    key_file: &Path,
    device_id: &str,
    manifest: &otter_proto::manifest::SignedManifest,
    data_key: &str,
) -> String {
    let device = otter_package::wrap::DeviceKey::load_or_create(key_file).unwrap();
    wrap_to(device.public_key(), device_id, manifest, data_key)
}

/// `data_key` wrapped to `public` for `device_id` and `manifest`. A
/// manifest that does not parse (a test of a broken one) gets a context
/// nothing matches.
pub fn wrap_to(
    public: &otter_package::wrap::EncryptionPublicKey,
    device_id: &str,
    manifest: &otter_proto::manifest::SignedManifest,
    data_key: &str,
) -> String {
    let parsed = otter_proto::manifest::Manifest::from_json(&manifest.manifest).ok();
    let release = parsed.as_ref().map(|m| m.release_id()).unwrap_or_default();
    let sha = parsed
        .as_ref()
        .map(|m| m.artifact.sha256.clone())
        .unwrap_or_default();
    let context = otter_package::wrap::WrapContext {
        device_id,
        release: &release,
        artifact_sha256: &sha,
    };
    let key = otter_package::DataKey::from_base64(data_key).unwrap();
    otter_package::wrap::wrap_data_key(public, &key, &context)
        .unwrap()
        .to_base64()
}

pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Files and server configuration of a test PKI.
pub struct Pki {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        install_provider();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "otter test ca");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let server_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

        let device_key = KeyPair::generate().unwrap();
        let mut device_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        device_params
            .distinguished_name
            .push(DnType::CommonName, "dev-1");
        let device_cert = device_params.signed_by(&device_key, &ca).unwrap();

        let pki = Pki {
            ca: dir.join("ca.crt"),
            certificate: dir.join("device.crt"),
            private_key: dir.join("device.key"),
            server_config: Arc::new({
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der().clone()).unwrap();
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .unwrap();
                rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(
                        vec![server_cert.der().clone(), ca.der().clone()],
                        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
                    )
                    .unwrap()
            }),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.certificate, device_cert.pem()).unwrap();
        std::fs::write(&pki.private_key, device_key.serialize_pem()).unwrap();
        pki
    }

    pub fn device_tls(&self) -> otter_agent::tls::DeviceTls {
        otter_agent::tls::DeviceTls::load(&self.ca, &self.certificate, &self.private_key).unwrap()
    }
}

/// How the server answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Serve the body: honour a Range as 206 when `honour_range`, else 200
    /// with everything; stop after `cut_after` body bytes and drop the
    /// connection (headers still announce the full length).
    Body {
        honour_range: bool,
        cut_after: Option<usize>,
    },
    /// 206 starting at this byte whatever was asked.
    PartialFrom(u64),
    /// Only a status line, no body.
    Status(u16),
}

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub path: String,
    /// The `N` of `Range: bytes=N-`.
    pub range_start: Option<u64>,
    /// Whether the client presented a certificate.
    pub client_certificate: bool,
}

type Script = dyn Fn(usize, Option<u64>) -> Answer + Send + Sync;

pub struct TestServer {
    pub base_url: String,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Serves `body`; `script(request_index, range_start)` chooses the answer.
    pub async fn start(
        pki: &Pki,
        body: Vec<u8>,
        script: impl Fn(usize, Option<u64>) -> Answer + Send + Sync + 'static,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config.clone());
        let requests: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let body = Arc::new(body);
        let script: Arc<Script> = Arc::new(script);
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let body = body.clone();
                let script = script.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let _ = serve(tls, &body, script.as_ref(), &seen).await;
                });
            }
        });
        TestServer {
            base_url: format!("https://{address}"),
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    body: &[u8],
    script: &Script,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    let client_certificate = tls.get_ref().1.peer_certificates().is_some();
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buffer).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("")
        .to_owned();
    let range_start = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, value)| {
            value
                .trim()
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        });
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(SeenRequest {
            path,
            range_start,
            client_certificate,
        });
        seen.len() - 1
    };
    let total = body.len() as u64;
    let (status_line, start, cut_after) = match script(index, range_start) {
        Answer::Status(code) => {
            let reply =
                format!("HTTP/1.1 {code} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            tls.write_all(reply.as_bytes()).await?;
            tls.shutdown().await?;
            return Ok(());
        }
        Answer::Body {
            honour_range: true,
            cut_after,
        } if range_start.is_some() => ("206 Partial Content", range_start.unwrap_or(0), cut_after),
        Answer::Body { cut_after, .. } => ("200 OK", 0, cut_after),
        Answer::PartialFrom(start) => ("206 Partial Content", start, None),
    };
    let rest = &body[start as usize..];
    let mut reply = format!(
        "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\nConnection: close\r\n",
        rest.len()
    );
    if status_line.starts_with("206") {
        reply.push_str(&format!(
            "Content-Range: bytes {start}-{}/{total}\r\n",
            total - 1
        ));
    }
    reply.push_str("\r\n");
    tls.write_all(reply.as_bytes()).await?;
    match cut_after {
        Some(limit) => {
            tls.write_all(&rest[..limit.min(rest.len())]).await?;
            tls.flush().await?;
            // Drop the connection without TLS close_notify: the client sees
            // a body that ends early.
        }
        None => {
            tls.write_all(rest).await?;
            tls.shutdown().await?;
        }
    }
    Ok(())
}

/// Deterministic, poorly compressible bytes.
pub fn pseudo_random_bytes(size: usize, seed: u64) -> Vec<u8> {
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

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The file installer, counting its runs: how a test tells that nothing was
/// installed.
pub struct Counting {
    pub inner: otter_agent::install::FileInstaller,
    pub runs: std::sync::atomic::AtomicUsize,
}

impl otter_agent::install::Installer for Counting {
    fn name(&self) -> &'static str {
        "file"
    }
    fn install<'a>(
        &'a self,
        request: &'a otter_agent::install::InstallRequest,
    ) -> futures_util::future::BoxFuture<'a, Result<(), otter_agent::install::InstallError>> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.install(request)
    }
}

/// A safe-state probe that always says yes.
pub struct AlwaysSafe;

impl otter_agent::safe_state::SafeStateProbe for AlwaysSafe {
    fn is_safe(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<bool, otter_agent::safe_state::SafeStateError>>
    {
        Box::pin(async { Ok(true) })
    }
}

/// How long the waiting helpers of [`Recorder`] wait for a report.
const REPORT_WAIT: Duration = Duration::from_secs(30);

/// The agent's uplink in a test: records every registration and status
/// report the agent publishes, and answers questions about them per
/// deployment.
#[derive(Default)]
pub struct Recorder {
    registrations: Mutex<Vec<otter_proto::messages::Registration>>,
    reports: Mutex<Vec<otter_proto::messages::StatusReport>>,
}

impl otter_agent::mqtt::Uplink for Recorder {
    fn register(
        &self,
        registration: &otter_proto::messages::Registration,
    ) -> Result<(), otter_agent::mqtt::MqttError> {
        self.registrations
            .lock()
            .unwrap()
            .push(registration.clone());
        Ok(())
    }
    fn report(
        &self,
        report: &otter_proto::messages::StatusReport,
    ) -> Result<(), otter_agent::mqtt::MqttError> {
        self.reports.lock().unwrap().push(report.clone());
        Ok(())
    }
}

impl Recorder {
    /// Every registration so far, oldest first.
    pub fn registrations(&self) -> Vec<otter_proto::messages::Registration> {
        self.registrations.lock().unwrap().clone()
    }

    /// The reports for `deployment`, oldest first.
    pub fn reports_for(&self, deployment: &str) -> Vec<otter_proto::messages::StatusReport> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.deployment_id == deployment)
            .cloned()
            .collect()
    }

    /// The events reported for `deployment`, oldest first.
    pub fn events(&self, deployment: &str) -> Vec<otter_proto::messages::DeviceEvent> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.deployment_id == deployment)
            .map(|r| r.event)
            .collect()
    }

    /// The last report for `deployment`, if any.
    pub fn last(&self, deployment: &str) -> Option<otter_proto::messages::StatusReport> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.deployment_id == deployment)
            .cloned()
    }

    /// Whether `event` was reported for `deployment`.
    pub fn has(&self, deployment: &str, event: otter_proto::messages::DeviceEvent) -> bool {
        self.events(deployment).contains(&event)
    }

    /// The detail of the last report for `deployment` (it must have one).
    pub fn last_detail(&self, deployment: &str) -> String {
        self.last(deployment).unwrap().detail.unwrap()
    }

    /// Waits until `event` was reported for `deployment`.
    pub async fn wait_event(&self, deployment: &str, event: otter_proto::messages::DeviceEvent) {
        wait_until(&format!("{deployment}: {event:?}"), REPORT_WAIT, || {
            self.has(deployment, event)
        })
        .await
    }

    /// Waits for `deployment`'s `failed` report; returns the detail of its
    /// last report.
    pub async fn wait_failure(&self, deployment: &str) -> String {
        wait_until(&format!("{deployment}: failed"), REPORT_WAIT, || {
            self.has(deployment, otter_proto::messages::DeviceEvent::Failed)
        })
        .await;
        self.last(deployment)
            .and_then(|r| r.detail)
            .expect("a failed report has a detail")
    }

    /// Waits for a final report (`installed` or `failed`) of `deployment`;
    /// returns the event and detail (empty if none) of its last report.
    pub async fn wait_outcome(
        &self,
        deployment: &str,
    ) -> (otter_proto::messages::DeviceEvent, String) {
        use otter_proto::messages::DeviceEvent;
        wait_until(&format!("{deployment}: finished"), REPORT_WAIT, || {
            self.events(deployment)
                .iter()
                .any(|e| matches!(e, DeviceEvent::Installed | DeviceEvent::Failed))
        })
        .await;
        let last = self.last(deployment).unwrap();
        (last.event, last.detail.unwrap_or_default())
    }
}

/// A running agent loop and the handles to drive it.
pub struct Running {
    pub events: tokio::sync::mpsc::Sender<otter_agent::mqtt::MqttEvent>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<otter_agent::RunOutcome>>,
}

impl Running {
    pub fn start(agent: otter_agent::Agent, uplink: Arc<Recorder>) -> Running {
        let (events, receiver) = tokio::sync::mpsc::channel(16);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(receiver, uplink.as_ref(), async {
                    let _ = stopped.await;
                })
                .await
        });
        Running {
            events,
            stop: Some(stop),
            task,
        }
    }

    pub async fn send(&self, event: otter_agent::mqtt::MqttEvent) {
        self.events.send(event).await.unwrap();
    }

    pub async fn update(&self, notification: otter_proto::messages::UpdateNotification) {
        self.send(otter_agent::mqtt::MqttEvent::Message(
            otter_proto::messages::ServerMessage::Update(notification),
        ))
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(REPORT_WAIT, self.task)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap();
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}
