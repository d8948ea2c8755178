//! The Otter update server: operator REST API, device HTTPS endpoint (mutual
//! TLS), embedded MQTT broker, SQLite store, local blob store, per-device
//! download links, the rollout engine and the audit log.
//!
//! [`run`] starts everything from a [`ServerConfig`] and stops on the given
//! future; `main.rs` is a thin shell around it.
//!
//! Layout (one concept per module), with the push-pull steps of `DESIGN.md`:
//! - [`config`]: settings; [`files`], [`clock`]: data-directory files, time.
//! - [`pki`]: the device CA, server and device certificates.
//! - [`broker`]: the embedded MQTT broker behind `MessageBus` (step 1 in).
//! - [`store`]: the database, the only SQL; [`audit`]: the one audit writer (steps 3, 9).
//! - [`api`]: operator REST API (step 2); [`error`]: JSON error answers.
//! - [`links`]: link tokens and their verification (steps 4, 6).
//! - [`notify`]: the one way a link is created and published (step 4).
//! - [`push`]: push mode, the artifact in acknowledged chunks over MQTT (steps 4–6).
//! - [`engine`]: registrations and reports driving the phase machine (steps 1, 5–8).
//! - [`device_http`]: the mTLS device endpoint: downloads with ranges (step 6),
//!   and the poll and status routes of pull mode.
//! - [`blobs`]: artifact storage.
//! - [`metrics`]: process-wide counters, served as Prometheus text at `GET /metrics`.

pub mod api;
pub mod audit;
pub mod blobs;
pub mod broker;
pub mod clock;
pub mod config;
pub mod device_http;
pub mod engine;
pub mod error;
pub mod files;
pub mod links;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod push;
pub mod revocation;
pub mod store;
pub mod vault;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::ServerConfig;

use crate::api::{ApiState, PublicUrls};
use crate::audit::AuditQueue;
use crate::blobs::BlobStore;
use crate::broker::{BrokerConfig, MessageBus};
use crate::device_http::DeviceEndpointState;
use crate::engine::Engine;
use crate::links::LinkSecret;
use crate::notify::Notifier;
use crate::pki::Pki;
use crate::push::Pusher;
use crate::store::Store;
use crate::vault::KeyVault;

/// Name of the first operator token, created on first start.
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// How long shutdown waits for API requests in flight.
const API_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses the server listens on, as written to `endpoints.json`
/// (unspecified addresses replaced by loopback, so they can be dialled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub api: SocketAddr,
    pub device: SocketAddr,
    pub mqtt: SocketAddr,
}

/// Paths inside the data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn database(&self) -> PathBuf {
        self.root.join("otter.db")
    }
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn link_secret(&self) -> PathBuf {
        self.root.join("link.secret")
    }
    pub fn data_key_secret(&self) -> PathBuf {
        self.root.join("data-key.secret")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn endpoints(&self) -> PathBuf {
        self.root.join("endpoints.json")
    }
}

/// Runs the server until `shutdown` completes, then stops gracefully: stops
/// accepting, lets requests in flight finish (bounded), closes the database.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let data_dir = DataDir {
        root: config.data_dir.clone(),
    };
    files::create_private_dir(&data_dir.root)
        .with_context(|| format!("cannot create data directory {}", data_dir.root.display()))?;
    files::create_private_dir(&data_dir.tmp())
        .with_context(|| format!("cannot create {}", data_dir.tmp().display()))?;
    clear_directory(&data_dir.tmp());

    config
        .push
        .validate()
        .map_err(|reason| anyhow::anyhow!("invalid push settings: {reason}"))?;
    let (trusted_signers, trusted_signer_pems) = load_trusted_signers(&config.trusted_signers)?;
    let (trusted_roots, trusted_root_pems) = load_keys(&config.trusted_roots, "trusted root")?;
    if trusted_signers.is_empty() && trusted_roots.is_empty() {
        tracing::warn!(
            "no trusted signer or root configured (--trusted-signer, --trusted-root): \
             every package upload will be refused"
        );
    }
    let mut pki = Pki::load_or_create(&data_dir.root, &config.public_hosts)
        .context("cannot load or create the PKI")?;
    pki.trust_device_cas(&config.device_cas)
        .context("cannot load the device CAs (--device-ca)")?;
    let pki = Arc::new(pki);
    let link_secret = Arc::new(LinkSecret::load_or_create(&data_dir.link_secret())?);
    let blobs = BlobStore::open_local(&data_dir.blobs()).context("cannot open blob storage")?;
    let store = Store::open_sqlite(&data_dir.database())
        .await
        .with_context(|| format!("cannot open the database {}", data_dir.database().display()))?;
    ensure_admin_token(&store, &data_dir.admin_token()).await?;
    let vault = KeyVault::load_or_create(&data_dir.data_key_secret())?;
    let sealed = store
        .seal_plaintext_data_keys(&vault)
        .await
        .context("cannot seal the release data keys stored in clear")?;
    if sealed > 0 {
        tracing::info!(
            releases = sealed,
            "sealed data keys stored in clear under data-key.secret"
        );
    }
    let signer_trust = load_signer_trust(&store, &trusted_roots, &trusted_signers).await?;
    let revocations = revocation::Revocations::new(
        store
            .revoked_serials()
            .await
            .context("cannot load the revoked device certificates")?,
    );

    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("cannot listen on the API address {}", config.api_addr))?;
    let device_listener = TcpListener::bind(config.device_addr)
        .await
        .with_context(|| format!("cannot listen on the device address {}", config.device_addr))?;
    let device_tls = pki
        .device_tls_config()
        .context("cannot build the device TLS configuration")?;
    let mut broker_config = BrokerConfig::from_pki(config.mqtt_addr, &pki);
    broker_config.max_packet_size =
        u32::try_from(otter_proto::MAX_MESSAGE_BYTES + 4096).unwrap_or(u32::MAX);
    broker_config.revocations = revocations.clone();
    let (broker, mqtt_bound, broker_events) = broker::start_embedded(broker_config)
        .await
        .with_context(|| format!("cannot start the MQTT broker on {}", config.mqtt_addr))?;

    let api_bound = api_listener.local_addr()?;
    let device_bound = device_listener.local_addr()?;
    let url_host = config.url_host();
    let urls = PublicUrls {
        mqtt_url: format!("mqtts://{url_host}:{}", mqtt_bound.port()),
        device_url: format!("https://{url_host}:{}", device_bound.port()),
    };

    let stop = CancellationToken::new();
    let bus: Arc<dyn MessageBus> = Arc::new(broker.clone());
    let notifier = Notifier {
        store: store.clone(),
        bus,
        link_secret: link_secret.clone(),
        device_base_url: urls.device_url.clone(),
        link_ttl: config.link_ttl,
        push_chunk_size: config.push.chunk_size,
        vault: vault.clone(),
    };
    let (engine_commands, engine_inbox) = mpsc::channel(engine::COMMAND_CAPACITY);
    let pusher = Pusher::new(
        store.clone(),
        notifier.bus.clone(),
        blobs.clone(),
        config.push,
    );
    let (audit_queue, audit_rows) = AuditQueue::new();
    let engine_done = spawn_engine_thread(
        Engine::new(notifier.clone(), pusher).run(broker_events, engine_inbox, stop.clone()),
        audit::write_queued(store.clone(), audit_rows),
    )?;

    let api_state = ApiState {
        vault,
        store: store.clone(),
        blobs: blobs.clone(),
        pki: pki.clone(),
        trusted_signers: Arc::new(trusted_signers),
        trusted_signer_pems: Arc::new(trusted_signer_pems),
        trusted_root_pems: Arc::new(trusted_root_pems),
        signer_trust: signer_trust.clone(),
        urls,
        tmp_dir: data_dir.tmp(),
        max_upload_bytes: config.max_upload_bytes,
        engine: engine_commands,
        revocations: revocations.clone(),
    };
    let device_enrolment = api::enrolment::DeviceEnrolment {
        pki: pki.clone(),
        trusted_signer_pems: api_state.trusted_signer_pems.clone(),
        trusted_root_pems: api_state.trusted_root_pems.clone(),
        urls: api_state.urls.clone(),
    };
    let api_stop = stop.clone();
    let mut api_task = tokio::spawn(async move {
        axum::serve(api_listener, api::router(api_state))
            .with_graceful_shutdown(api_stop.cancelled_owned())
            .await
    });
    let device_router = device_http::router(DeviceEndpointState {
        store: store.for_device_endpoint(),
        audit: audit_queue,
        blobs,
        link_secret,
        notifier,
        enrolment: device_enrolment,
    });
    let device_task = tokio::spawn(device_http::serve(
        device_listener,
        device_tls,
        device_router,
        config.device_limits.clone(),
        revocations,
        stop.clone(),
    ));

    let endpoints = Endpoints {
        api: config::connectable(api_bound),
        device: config::connectable(device_bound),
        mqtt: config::connectable(mqtt_bound),
    };
    let endpoints_json = serde_json::to_vec_pretty(&endpoints)?;
    files::write_atomically(&data_dir.endpoints(), &endpoints_json, 0o644)
        .with_context(|| format!("cannot write {}", data_dir.endpoints().display()))?;
    tracing::info!(
        "otter-server ready api={} device={} mqtt={}",
        endpoints.api,
        endpoints.device,
        endpoints.mqtt
    );

    // Run until asked to stop, or until the API server fails on its own.
    let api_result = tokio::select! {
        _ = shutdown => None,
        result = &mut api_task => Some(result),
    };
    tracing::info!("otter-server shutting down");
    stop.cancel();
    let api_result = match api_result {
        Some(result) => Some(result),
        None => match tokio::time::timeout(API_DRAIN_TIMEOUT, &mut api_task).await {
            Ok(result) => Some(result),
            Err(_) => {
                tracing::warn!("API requests still running after the drain timeout");
                api_task.abort();
                None
            }
        },
    };
    let _ = device_task.await;
    // The engine stops on `stop`; the audit writer once the device
    // endpoint's last connection has let go of its queue.
    if tokio::time::timeout(ENGINE_STOP_TIMEOUT, engine_done)
        .await
        .is_err()
    {
        tracing::warn!("the engine or the audit writer did not stop in time");
    }
    broker.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_file(data_dir.endpoints());
    match api_result {
        Some(Ok(Ok(()))) | None => Ok(()),
        Some(Ok(Err(error))) => Err(anyhow::Error::new(error).context("the API server failed")),
        Some(Err(error)) => Err(anyhow::Error::new(error).context("the API server task failed")),
    }
}

/// How long the engine thread may take to finish at shutdown.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the engine and the audit writer on a thread and runtime of their
/// own. On the shared runtime, a deployment's notification batches and the
/// device reports waited their turn among every task serving a download
/// (with 1,600 downloads in flight, each turn of the runtime's queue took
/// hundreds of milliseconds); as a thread of its own the engine gets its
/// share of the CPU from the kernel whatever the download load. Answers a
/// receiver that completes when both have finished.
fn spawn_engine_thread(
    engine: impl Future<Output = ()> + Send + 'static,
    audit_writer: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("otter-engine")
        .build()
        .context("cannot build the engine's runtime")?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("otter-engine".to_owned())
        .spawn(move || {
            runtime.block_on(async {
                tokio::join!(engine, audit_writer);
            });
            let _ = done.send(());
        })
        .context("cannot start the engine thread")?;
    Ok(finished)
}

/// Reads each trusted signer key; returns the keys and their PEM.
fn load_trusted_signers(
    paths: &[PathBuf],
) -> anyhow::Result<(Vec<ed25519_dalek::VerifyingKey>, Vec<String>)> {
    load_keys(paths, "trusted signer")
}

/// Reads each public key file; returns the keys and their PEM.
fn load_keys(
    paths: &[PathBuf],
    what: &str,
) -> anyhow::Result<(Vec<ed25519_dalek::VerifyingKey>, Vec<String>)> {
    let mut keys = Vec::with_capacity(paths.len());
    let mut pems = Vec::with_capacity(paths.len());
    for path in paths {
        let key = otter_package::keys::read_verifying_key(path)
            .with_context(|| format!("cannot read {what} key {}", path.display()))?;
        pems.push(otter_package::keys::verifying_key_pem(&key));
        keys.push(key);
    }
    Ok((keys, pems))
}

/// The trust store uploads are verified with: pinned roots, direct signers
/// and the revocation list in force (the stored one, if a pinned root still
/// signs it; otherwise it is ignored with a warning).
async fn load_signer_trust(
    store: &Store,
    roots: &[ed25519_dalek::VerifyingKey],
    signers: &[ed25519_dalek::VerifyingKey],
) -> anyhow::Result<api::SignerTrust> {
    let mut trust = otter_package::trust::TrustStore::new(roots, signers);
    if let Some(list) = store
        .signer_revocations()
        .await
        .context("cannot load the signer revocation list")?
        && let Err(error) = trust.apply_revocation_list(&list)
    {
        tracing::warn!(%error, "the stored signer revocation list is not signed by a trusted root; ignored");
    }
    Ok(Arc::new(std::sync::RwLock::new(trust)))
}

/// On first start (no operator token in the database) creates the admin
/// token: written to `admin.token` (0600), only its SHA-256 stored.
async fn ensure_admin_token(store: &Store, path: &Path) -> anyhow::Result<()> {
    if store.has_operator_tokens().await? {
        return Ok(());
    }
    let token = api::tokens::new_token();
    files::write_private_atomically(path, token.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    store
        .insert_first_admin_token(
            ADMIN_TOKEN_NAME,
            &api::token_sha256(&token),
            &clock::now_rfc3339(),
        )
        .await?;
    tracing::info!(path = %path.display(), "created the admin operator token");
    Ok(())
}

/// Removes leftovers of uploads interrupted by a crash.
fn clear_directory(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if let Err(error) = std::fs::remove_file(entry.path()) {
            tracing::warn!(path = %entry.path().display(), %error, "cannot remove a stale temporary file");
        }
    }
}
