//! The agent loop: ties the MQTT session, the job state machine of
//! `otter_proto::job`, the landing zone, the safe-state policy and the
//! installer together (push-pull steps 1 and 5–8).
//!
//! [`Agent`] owns all mutable state: the current [`Job`], the installed
//! versions, and at most one [`Worker`] task doing the slow part of the
//! current step (fetch, safe-state wait, install). Workers never touch the
//! state; they return an outcome, and the loop persists the new stage
//! (atomically, `state.rs`) *before* it reports it, so the server never hears
//! of progress a crash could undo.
//!
//! Life of a job: notification → `decide` → `Start` persists the job and
//! reports `received`; a fetch worker downloads, verifies and unpacks into
//! the landing zone (`downloaded`); a safe-state worker waits for the probe;
//! the loop persists `Installing` and reports `installing`; an install worker
//! runs the handler (picked per package: name override, kind override,
//! `[install]`); the loop records the version in `installed.json`, then
//! the finished job, clears the landing zone, reports `installed`, and
//! registers again so the server sees the new installed versions.
//!
//! With `[health]` configured, a successful install first persists
//! `HealthCheck` and a worker runs the health command until it passes or
//! its deadline ends; only a pass records the version. A failure persists
//! `RollingBack` with the reason, a worker runs the installer's rollback,
//! and the job finishes `rolled-back` (`installed.json` never named the new
//! version). Both stages resume after a restart: the check runs again, the
//! rollback runs again (rollbacks are idempotent); neither reinstalls.
//! Any failure finishes the job with `failed` and its reason. The data key
//! travels wrapped to this device's encryption key (`otter_package::wrap`,
//! key file `encryption_key`, made at first start); it is unwrapped before
//! anything is fetched, and a key that does not open (another device's or
//! release's, or altered) refuses the update with nothing landed.
//!
//! After every (re)connection the loop publishes the registration and then
//! the current job's latest report, so an outcome the server missed is heard.
//! On restart the persisted stage is resumed; a finished job, or a version
//! already recorded as installed, is never installed again.
//!
//! Two packages are not handed to the configured installer: the agent's own
//! configuration (`otter-agent-config`, [`crate::remote_config`]), after
//! which the loop ends with [`RunOutcome::Restart`] so the binary runs again
//! with the new configuration; and packages of kind `agent`
//! ([`crate::self_update`]), which are staged, after which the loop ends with
//! [`RunOutcome::SelfUpdateStaged`] and the supervisor takes over. A new
//! agent on trial confirms once connected and registered; one started after
//! a rollback reports `rolled-back`.
//!
//! Layout: this file holds [`run`] (build everything from the configuration
//! and go), the [`Agent`] and its event handlers; `workers.rs` the worker
//! tasks, `push_delivery.rs` push mode's offers and chunks, `trial.rs` the
//! self-update trial (resume at start, confirm on first contact).

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use otter_package::wrap::{DeviceKey, WrapContext, WrappedKey, unwrap_data_key};
use otter_package::{DataKey, PackageError};
use otter_proto::job::{Action, Decision, Delivery, Job, Stage, StepResult, decide};
use otter_proto::manifest::{Manifest, PackageKind};
use otter_proto::messages::{
    DeviceEvent, Mode, PushAck, Registration, ServerMessage, StatusReport, UpdateNotification,
};
use otter_proto::push::PushChunk;
use otter_proto::topics::DeviceId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::download::{DownloadPolicy, Downloader};
use crate::inhibit::{InhibitServer, InhibitorGate, Inhibitors};
use crate::install::{InstallRequest, Installer, installer_for};
use crate::landing_zone::LandingZone;
use crate::mqtt::{MqttEvent, MqttSession, Uplink};
use crate::poll::{self, PollClient};
use crate::push::ChunkDecision;
use crate::remote_config::{RemoteConfigInstaller, is_agent_config};
use crate::safe_state::{SafeStatePolicy, SafeStateProbe, probe_for, wait_for_safe_state};
use crate::self_update::{Marker, MarkerState, MarkerStore, SelfUpdateInstaller};
use crate::state::{InstalledVersions, StateStore};
use crate::tls::DeviceTls;

mod push_delivery;
mod trial;
mod workers;

use workers::next_outcome;

/// How long shutdown waits for the MQTT DISCONNECT to go out.
const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How a run of the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// `shutdown` completed.
    Stopped,
    /// A new agent configuration was installed: load the configuration
    /// again (it includes the overlay) and run anew.
    Restart,
    /// A new agent executable is staged: exit with
    /// [`crate::self_update::STAGED_EXIT_CODE`] so the supervisor swaps it in.
    SelfUpdateStaged,
}

/// Runs the agent described by `config` until `shutdown` completes or the
/// agent must restart (see [`RunOutcome`]).
///
/// Errors are start-up problems (unreadable keys or certificates, an
/// unusable state folder, a mode this agent does not implement) and failures
/// to persist state; everything the network or a package does wrong is
/// reported to the server and logged instead.
///
/// The inhibitor socket (`inhibit_socket`) is served for as long as this
/// runs; [`run_inhibited`] keeps it across runs.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunOutcome> {
    let inhibitors = Inhibitors::new();
    let server = InhibitServer::start(&config.inhibit_socket, inhibitors.clone())
        .context("starting the inhibitor socket")?;
    let result = run_inhibited(config, &inhibitors, shutdown).await;
    server.stop().await;
    result
}

/// Like [`run`], with `inhibitors` served by the caller: `otter-agent
/// --worker` starts one [`InhibitServer`] per process, so inhibitors outlive
/// a restart with a new configuration. The configured safe-state probe is
/// asked only while no inhibitor is held ([`InhibitorGate`]).
pub async fn run_inhibited(
    config: AgentConfig,
    inhibitors: &Inhibitors,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunOutcome> {
    let tls = DeviceTls::load(&config.ca, &config.certificate, &config.private_key)
        .context("loading the device TLS identity")?;
    let mut handlers = Handlers::from_config(&config);
    handlers.safe_state = Arc::new(InhibitorGate::new(inhibitors.clone(), handlers.safe_state));
    run_with_handlers(config, tls, handlers, shutdown).await
}

/// Like [`run`], with a TLS identity already loaded and the given installer
/// and safe-state probe instead of the configured ones. The fleet simulator
/// (`otter-sim`) runs many agents in one process this way: everything else
/// (sessions, polls, downloads, checks, state) is the agent's own.
pub async fn run_with_handlers(
    config: AgentConfig,
    tls: DeviceTls,
    handlers: Handlers,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunOutcome> {
    let agent = Agent::with_handlers(&config, &tls, handlers)?;
    if config.mode == Mode::Pull {
        return run_pull(agent, &config, &tls, shutdown).await;
    }
    let (session, events, connection) = MqttSession::start(
        &config.device_id,
        &config.mqtt,
        tls.mqtt_config()
            .context("building the MQTT TLS configuration")?,
    );
    tracing::info!(
        device = %config.device_id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        "otter agent starting"
    );
    let result = match config.reconcile_interval {
        // Push-pull's safety net: poll now and then besides the session.
        Some(interval) if config.mode == Mode::PushPull => {
            let client = PollClient::new(
                &config.device_url,
                tls.https_config()
                    .context("building the HTTPS TLS configuration")?,
            )
            .context("building the poll client")?;
            let (uplink, events, reconcile) =
                poll::start_reconcile(client, interval, session.clone(), events);
            let result = agent.run(events, &uplink, shutdown).await;
            reconcile.abort();
            result
        }
        _ => agent.run(events, &session, shutdown).await,
    };
    session.close(DISCONNECT_GRACE).await;
    let mut connection = connection;
    if tokio::time::timeout(DISCONNECT_GRACE, &mut connection)
        .await
        .is_err()
    {
        connection.abort();
    }
    tracing::debug!("agent stopped");
    result
}

/// Pull mode: no MQTT at all; the poll task is the agent's uplink and its
/// source of updates (see [`crate::poll`]).
async fn run_pull(
    agent: Agent,
    config: &AgentConfig,
    tls: &DeviceTls,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunOutcome> {
    let client = PollClient::new(
        &config.device_url,
        tls.https_config()
            .context("building the HTTPS TLS configuration")?,
    )
    .context("building the poll client")?;
    let (events, receiver) = mpsc::channel(poll::EVENT_CAPACITY);
    let (uplink, poller) = poll::start_pull(client, config.poll_interval, events);
    tracing::info!(
        device = %config.device_id,
        endpoint = %config.device_url,
        interval = ?config.poll_interval,
        "otter agent starting in pull mode"
    );
    let result = agent.run(receiver, &uplink, shutdown).await;
    poller.abort();
    tracing::debug!("agent stopped");
    result
}

/// Replaceable parts of an agent, for other handlers and for tests.
#[derive(Clone)]
pub struct Handlers {
    pub installer: Arc<dyn Installer>,
    pub safe_state: Arc<dyn SafeStateProbe>,
}

impl Handlers {
    /// The installer and probe `config` names.
    pub fn from_config(config: &AgentConfig) -> Handlers {
        Handlers {
            installer: Arc::from(installer_for(&config.install.default)),
            safe_state: Arc::from(probe_for(&config.safe_state.command)),
        }
    }
}

/// The agent's state and the parts it drives. See the module documentation.
pub struct Agent {
    device_id: DeviceId,
    /// Opens the data keys the server wraps to this device.
    encryption_key: DeviceKey,
    hardware: String,
    mode: Mode,
    /// Pinned roots, direct signers and the newest revocation list
    /// (`crate::signer_trust`).
    trust: otter_package::trust::TrustStore,
    state_dir: std::path::PathBuf,
    store: StateStore,
    landing_zone: LandingZone,
    downloader: Downloader,
    handlers: Handlers,
    /// Per kind and per name installers, beside `handlers.installer`.
    overrides: InstallerOverrides,
    /// The check after an install (configured handlers only); `None`: none.
    health: Option<crate::config::HealthConfig>,
    safe_state_policy: SafeStatePolicy,
    job: Option<Job>,
    installed: InstalledVersions,
    worker: Option<Worker>,
    /// Installs the `otter-agent-config` package.
    remote_config: Arc<dyn Installer>,
    /// Stages packages of kind `agent`.
    self_update: Arc<dyn Installer>,
    /// Whether a supervisor runs this agent (self-update possible).
    supervised: bool,
    markers: MarkerStore,
    /// A self-update on trial in this process: confirmed once connected.
    trial: Option<Marker>,
    /// Set when the loop must end (new configuration, staged executable).
    outcome: Option<RunOutcome>,
}

/// The installers of `[install.kinds.*]` and `[install.packages.*]`; a
/// package without an override goes to `Handlers::installer`.
#[derive(Clone, Default)]
struct InstallerOverrides {
    kinds: std::collections::BTreeMap<String, Arc<dyn Installer>>,
    packages: std::collections::BTreeMap<String, Arc<dyn Installer>>,
}

impl InstallerOverrides {
    fn from_config(config: &crate::config::InstallConfig) -> Self {
        use crate::config::HandlerConfig;
        let build = |handlers: &std::collections::BTreeMap<String, HandlerConfig>| {
            handlers
                .iter()
                .map(|(key, handler)| (key.clone(), Arc::from(installer_for(handler))))
                .collect()
        };
        InstallerOverrides {
            kinds: build(&config.kinds),
            packages: build(&config.packages),
        }
    }

    /// A name override first, then a kind override.
    fn for_package(&self, manifest: &Manifest) -> Option<Arc<dyn Installer>> {
        self.packages
            .get(&manifest.name)
            .or_else(|| self.kinds.get(manifest.kind.as_str()))
            .cloned()
    }
}

/// The task doing the slow part of the current job's step.
struct Worker {
    deployment_id: String,
    kind: WorkKind,
    cancel: CancellationToken,
    /// For a fetch: the newest link, read before every download attempt.
    link: Option<watch::Sender<String>>,
    handle: JoinHandle<WorkOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkKind {
    Fetch,
    AwaitSafeState,
    Install,
    HealthCheck,
    RollBack,
}

#[derive(Debug)]
enum WorkOutcome {
    Done,
    Failed(String),
    /// Stopped by shutdown or a replacing job; the stage stays as it was.
    Cancelled,
    /// The health check failed for this reason: roll back.
    Unhealthy(String),
    /// Rolled back after a failed health check; the reason to report.
    RolledBack(String),
}

impl Agent {
    /// Loads the signer keys and the persisted state, and sweeps the landing
    /// zone of folders no job needs. Uses the configured installer and probe.
    pub fn new(config: &AgentConfig, tls: &DeviceTls) -> anyhow::Result<Agent> {
        Agent::with_handlers(config, tls, Handlers::from_config(config))
    }

    /// Like [`Agent::new`] with the given installer and safe-state probe.
    pub fn with_handlers(
        config: &AgentConfig,
        tls: &DeviceTls,
        handlers: Handlers,
    ) -> anyhow::Result<Agent> {
        let trust = crate::signer_trust::load(config)?;
        let downloader = Downloader::new(
            tls.https_config()
                .context("building the HTTPS TLS configuration")?,
            DownloadPolicy {
                max_attempts: config.download.max_attempts,
                initial_backoff: config.download.initial_backoff,
                max_backoff: config.download.max_backoff,
            },
        )?;
        let encryption_key = DeviceKey::load_or_create(&config.encryption_key)
            .context("loading the device encryption key")?;
        let store = StateStore::new(&config.state_dir);
        let (job, installed) = store
            .load_or_quarantine()
            .context("loading the agent state")?;
        if let Some(job) = &job {
            tracing::info!(
                deployment = %job.notification.deployment_id,
                stage = ?job.stage,
                "resuming job"
            );
        }
        Ok(Agent {
            device_id: config.device_id.clone(),
            encryption_key,
            hardware: config.hardware.clone(),
            mode: config.mode,
            trust,
            state_dir: config.state_dir.clone(),
            store,
            landing_zone: LandingZone::new(&config.landing_zone),
            downloader,
            handlers,
            overrides: InstallerOverrides::from_config(&config.install),
            health: config.health.clone(),
            safe_state_policy: SafeStatePolicy {
                initial_backoff: config.safe_state.initial_backoff,
                max_backoff: config.safe_state.max_backoff,
                deadline: config.safe_state.deadline,
            },
            job,
            installed,
            worker: None,
            remote_config: Arc::new(RemoteConfigInstaller::new(config.source.clone())),
            self_update: Arc::new(SelfUpdateInstaller::new(
                config.self_update.executable.clone(),
                &config.state_dir,
                config.self_update.deadline,
            )),
            supervised: config.self_update.executable.is_some(),
            markers: MarkerStore::new(&config.state_dir),
            trial: None,
            outcome: None,
        })
    }

    /// The current job, as persisted.
    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }

    pub fn installed(&self) -> &InstalledVersions {
        &self.installed
    }

    /// What the agent announces on every connection.
    pub fn registration(&self) -> Registration {
        let mut capabilities = vec![self.handlers.installer.name().to_owned()];
        let overrides = self.overrides.kinds.values();
        for installer in overrides.chain(self.overrides.packages.values()) {
            let name = installer.name().to_owned();
            if !capabilities.contains(&name) {
                capabilities.push(name);
            }
        }
        capabilities.push("range-resume".to_owned());
        capabilities.push(self.remote_config.name().to_owned());
        if self.supervised {
            capabilities.push(self.self_update.name().to_owned());
        }
        Registration {
            protocol: otter_proto::PROTOCOL_VERSION,
            hardware: self.hardware.clone(),
            installed: self.installed.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.mode,
            capabilities,
            encryption_key: Some(self.encryption_key.public_key().to_base64()),
        }
    }

    /// The data key of `notification`, unwrapped with this device's key and
    /// bound to its id, the release and the signed manifest's artifact.
    fn data_key(
        &self,
        notification: &UpdateNotification,
        manifest: &Manifest,
    ) -> Result<DataKey, PackageError> {
        let wrapped = WrappedKey::from_base64(&notification.wrapped_key)?;
        let release = manifest.release_id();
        let context = WrapContext {
            device_id: self.device_id.as_str(),
            release: &release,
            artifact_sha256: &manifest.artifact.sha256,
        };
        unwrap_data_key(&self.encryption_key, &wrapped, &context)
    }

    /// Handles session events and worker outcomes until `shutdown`
    /// completes, the session ends or the agent must restart; then stops the
    /// worker (a download is resumed next time) and returns.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<MqttEvent>,
        uplink: &dyn Uplink,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<RunOutcome> {
        let active = self
            .job
            .as_ref()
            .filter(|job| !job.is_finished())
            .map(|job| job.notification.deployment_id.clone());
        if let Err(error) = self.landing_zone.remove_all_except(active.as_deref()).await {
            tracing::warn!(%error, "cannot sweep the landing zone");
        }
        self.resume_self_update(uplink).await?;
        self.schedule(uplink).await?;
        tokio::pin!(shutdown);
        let result = loop {
            if let Some(outcome) = self.outcome {
                break Ok(outcome);
            }
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    break Ok(RunOutcome::Stopped);
                }
                event = events.recv() => {
                    let step = match event {
                        Some(MqttEvent::Connected) => self.on_connected(uplink).await,
                        Some(MqttEvent::Message(message)) => self.on_message(message, uplink).await,
                        Some(MqttEvent::Chunk(payload)) => self.on_chunk(payload, uplink).await,
                        Some(MqttEvent::ServerAnswered) => self.confirm_self_update(uplink).await,
                        None => break Err(anyhow::anyhow!("the MQTT session ended")),
                    };
                    if let Err(error) = step {
                        break Err(error);
                    }
                }
                (kind, deployment_id, outcome) = next_outcome(&mut self.worker) => {
                    self.worker = None;
                    if let Err(error) = self.on_outcome(kind, &deployment_id, outcome, uplink).await {
                        break Err(error);
                    }
                }
            }
        };
        self.stop_worker().await;
        result
    }

    /// After every (re)connection: register, repeat the latest report, and
    /// confirm a self-update on trial (connected and registered is the proof
    /// that the new agent works).
    pub async fn on_connected(&mut self, uplink: &dyn Uplink) -> anyhow::Result<()> {
        log_queue_error(uplink.register(&self.registration()));
        if let Some(job) = &self.job {
            log_queue_error(uplink.report(&job.last_report()));
        }
        // Over MQTT, `Connected` is a CONNACK: the server is reachable. In
        // pull mode it only asks for a registration; the confirmation waits
        // for `ServerAnswered`, the first answered poll.
        if self.mode == Mode::Pull {
            return Ok(());
        }
        self.confirm_self_update(uplink).await
    }

    async fn on_message(
        &mut self,
        message: ServerMessage,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        match message {
            ServerMessage::Error(error) => {
                tracing::warn!(code = %error.code, message = %error.message, "server error");
                Ok(())
            }
            ServerMessage::Update(notification) => {
                self.on_update(notification, Delivery::Link, uplink).await
            }
            ServerMessage::PushOffer(offer) => {
                // Push mode: the same checks and decision as an update; the
                // job remembers that its bytes come over MQTT.
                let (notification, delivery) = Job::from_offer(offer);
                self.on_update(notification, delivery, uplink).await
            }
        }
    }

    /// Step 5: a notification (or push offer) arrives.
    async fn on_update(
        &mut self,
        notification: UpdateNotification,
        delivery: Delivery,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        let deployment_id = notification.deployment_id.clone();
        tracing::info!(deployment = %deployment_id, release = %notification.release, ?delivery, "update notification");
        let refuse = |reason: String| {
            tracing::warn!(deployment = %deployment_id, %reason, "refusing the update");
            log_queue_error(uplink.report(&StatusReport {
                deployment_id: deployment_id.clone(),
                event: DeviceEvent::Failed,
                detail: Some(reason),
            }));
        };
        if let Some(list) = &notification.signer_revocations {
            crate::signer_trust::accept(&mut self.trust, list, &self.state_dir);
        }
        let manifest = match self
            .trust
            .verify_manifest(&notification.manifest, unix_now())
        {
            Ok(verified) => verified.manifest,
            Err(error) => {
                refuse(format!("signature check failed: {error}"));
                return Ok(());
            }
        };
        if notification.release != manifest.release_id() {
            refuse(format!(
                "notification names release {:?} but the signed manifest is {}",
                notification.release,
                manifest.release_id()
            ));
            return Ok(());
        }
        if let Err(error) = self.landing_zone.files(&deployment_id) {
            refuse(error.to_string());
            return Ok(());
        }
        // Before any byte is fetched: a key wrapped for another device or
        // release (or altered) ends it here, with nothing landed.
        if let Err(error) = self.data_key(&notification, &manifest) {
            refuse(error.to_string());
            return Ok(());
        }

        let installed = self.installed.get(&manifest.name);
        match decide(
            self.job.as_ref(),
            &notification,
            &manifest,
            installed,
            &self.hardware,
        ) {
            Decision::Start => self.start_job(notification, delivery, uplink).await?,
            Decision::RefreshLink => {
                // The same deployment again: a fresher link, or a repeated
                // push offer (answered with the bytes held, in `schedule`).
                // The server may also have switched the delivery when the
                // device's mode changed; both append to `artifact.part`.
                let switched = self
                    .job
                    .as_ref()
                    .is_some_and(|job| job.delivery != delivery);
                if let Some(job) = self.job.as_mut() {
                    if delivery.is_link() {
                        job.notification.link = notification.link.clone();
                        job.notification.link_expires_at = notification.link_expires_at;
                    }
                    job.delivery = delivery;
                }
                self.persist_job().await?;
                if switched {
                    self.stop_worker().await;
                }
                match &self.worker {
                    Some(Worker {
                        link: Some(link), ..
                    }) if delivery.is_link() => {
                        link.send_replace(notification.link);
                    }
                    _ => self.schedule(uplink).await?,
                }
            }
            Decision::Repeat(report) => log_queue_error(uplink.report(&report)),
            Decision::AlreadyInstalled => log_queue_error(uplink.report(&StatusReport {
                deployment_id: deployment_id.clone(),
                event: DeviceEvent::Installed,
                detail: Some(format!("{} is already installed", manifest.release_id())),
            })),
            Decision::Refuse(reason) => refuse(reason),
            Decision::Defer => {
                tracing::info!(deployment = %deployment_id, "an install is under way; the notification will come again");
            }
        }
        Ok(())
    }

    /// Replaces the current job (if any, not installing) with a new one.
    async fn start_job(
        &mut self,
        notification: UpdateNotification,
        delivery: Delivery,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        self.stop_worker().await;
        if let Some(old) = self.job.take() {
            let old_id = old.notification.deployment_id.clone();
            if !old.is_finished() {
                // The server moved on; tell it this deployment will not
                // complete here, so it does not wait for it forever.
                let mut old = old;
                let report = old.advance(StepResult::Failed(format!(
                    "superseded by deployment {}",
                    notification.deployment_id
                )));
                log_queue_error(uplink.report(&report));
            }
            if let Err(error) = self.landing_zone.remove(&old_id).await {
                tracing::warn!(%error, "cannot clear the landing zone of the replaced job");
            }
        }
        let job = Job::with_delivery(notification, delivery);
        let report = job.last_report();
        self.job = Some(job);
        self.persist_job().await?;
        log_queue_error(uplink.report(&report));
        self.schedule(uplink).await
    }

    /// Starts the worker the current job's stage needs, if none is running.
    async fn schedule(&mut self, uplink: &dyn Uplink) -> anyhow::Result<()> {
        if self.worker.is_some() {
            return Ok(());
        }
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        let action = job.next_action();
        if action == Action::Idle {
            return Ok(());
        }
        let manifest = match self.job_manifest(&job) {
            Ok(manifest) => manifest,
            Err(reason) => {
                // Only possible after a restart with other trusted keys.
                return self.finish(StepResult::Failed(reason), uplink).await;
            }
        };
        if manifest.kind == PackageKind::Agent
            && job.stage == Stage::Installing
            && self.self_update_pending(&job.notification.deployment_id)
        {
            // Staged, on trial or rolled back: the supervisor and the marker
            // own the rest of this install; never stage it twice.
            return Ok(());
        }
        match (action, &job.stage) {
            (Action::Download, _) if !job.delivery.is_link() => {
                return self.answer_push(&job, manifest, uplink).await;
            }
            (Action::Download, _) => {
                if job.notification.link_expires_at <= unix_now() {
                    // Typically after a restart: the server answers our
                    // registration with a fresh link (RefreshLink).
                    tracing::info!("download link expired; waiting for a fresh one");
                    return Ok(());
                }
                self.spawn_fetch(&job, manifest);
            }
            (Action::Install, Stage::Installing)
                if self.installed.get(&manifest.name) == Some(&manifest.version) =>
            {
                // installed.json was written, the job was not: the install
                // completed before a crash. Do not run it twice.
                return self.complete_install(&manifest, uplink).await;
            }
            (Action::Install, _) => self.spawn_safe_state_wait(&job),
            (Action::CheckHealth, _)
                if self.installed.get(&manifest.name) == Some(&manifest.version) =>
            {
                // The check passed and the version was recorded before a
                // crash; checking again could only roll back a version
                // installed.json already names.
                return self.complete_install(&manifest, uplink).await;
            }
            (Action::CheckHealth, _) => self.spawn_health_check(&job, &manifest),
            (Action::RollBack, Stage::RollingBack { reason }) => {
                self.spawn_rollback(&job, &manifest, reason.clone())
            }
            (Action::RollBack, _) => {}
            (Action::Idle, _) => {}
        }
        Ok(())
    }

    async fn on_outcome(
        &mut self,
        kind: WorkKind,
        deployment_id: &str,
        outcome: WorkOutcome,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        if job.notification.deployment_id != deployment_id {
            return Ok(());
        }
        match outcome {
            WorkOutcome::Cancelled => Ok(()),
            WorkOutcome::Failed(reason) => self.finish(StepResult::Failed(reason), uplink).await,
            WorkOutcome::Done => match kind {
                WorkKind::Fetch => {
                    self.advance(StepResult::Downloaded, uplink).await?;
                    self.schedule(uplink).await
                }
                WorkKind::AwaitSafeState => {
                    if job.stage == Stage::Downloaded {
                        self.advance(StepResult::InstallStarted, uplink).await?;
                    }
                    let manifest = self.job_manifest(&job);
                    match manifest {
                        Ok(manifest)
                            if self.installed.get(&manifest.name) == Some(&manifest.version) =>
                        {
                            self.complete_install(&manifest, uplink).await
                        }
                        Ok(manifest) => match self.spawn_install(&job, &manifest) {
                            Ok(()) => Ok(()),
                            Err(reason) => self.finish(StepResult::Failed(reason), uplink).await,
                        },
                        Err(reason) => self.finish(StepResult::Failed(reason), uplink).await,
                    }
                }
                WorkKind::Install => {
                    match self.job_manifest(&job) {
                        Ok(manifest) if manifest.kind == PackageKind::Agent => {
                            // Staged: the version is recorded by the new
                            // agent once it confirms, not here.
                            self.outcome = Some(RunOutcome::SelfUpdateStaged);
                            Ok(())
                        }
                        Ok(manifest) if is_agent_config(&manifest) => {
                            self.complete_install(&manifest, uplink).await?;
                            self.outcome = Some(RunOutcome::Restart);
                            Ok(())
                        }
                        Ok(manifest) if self.is_health_checked(&manifest) => {
                            // Persisted before the check runs: a restart
                            // checks again rather than installing again.
                            self.advance_quietly(StepResult::InstallDone).await?;
                            self.spawn_health_check(&job, &manifest);
                            Ok(())
                        }
                        Ok(manifest) => self.complete_install(&manifest, uplink).await,
                        Err(reason) => self.finish(StepResult::Failed(reason), uplink).await,
                    }
                }
                WorkKind::HealthCheck => match self.job_manifest(&job) {
                    Ok(manifest) => self.complete_install(&manifest, uplink).await,
                    Err(reason) => self.finish(StepResult::Failed(reason), uplink).await,
                },
                // A rollback worker ends with `RolledBack` or `Failed`.
                WorkKind::RollBack => Ok(()),
            },
            WorkOutcome::Unhealthy(reason) => {
                let failed = StepResult::HealthFailed(reason);
                self.advance_quietly(failed).await?;
                self.schedule(uplink).await
            }
            WorkOutcome::RolledBack(reason) => {
                self.finish(StepResult::RolledBack(reason), uplink).await
            }
        }
    }

    /// The job's manifest, checked against the pinned signer keys again (the
    /// keys may have changed across a restart); the error is the reason to
    /// report.
    fn job_manifest(&self, job: &Job) -> Result<Manifest, String> {
        self.trust
            .verify_manifest(&job.notification.manifest, unix_now())
            .map(|verified| verified.manifest)
            .map_err(|error| format!("signature check failed: {error}"))
    }

    /// Records the version (before anything else), finishes the job, reports
    /// `installed` and clears the landing zone.
    async fn complete_install(
        &mut self,
        manifest: &Manifest,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        self.installed
            .insert(manifest.name.clone(), manifest.version.clone());
        self.save_installed().await?;
        tracing::info!(release = %manifest.release_id(), "installed");
        self.finish(StepResult::Installed, uplink).await?;
        // The installed versions are part of the registration: announce the
        // new ones now rather than at the next reconnection. After the
        // report, so the server already knows this deployment is done.
        log_queue_error(uplink.register(&self.registration()));
        Ok(())
    }

    /// Applies a final result: persist, clear the landing zone, report (so
    /// that once the server hears the outcome, the device holds no leftovers).
    async fn finish(&mut self, result: StepResult, uplink: &dyn Uplink) -> anyhow::Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let report = job.advance(result);
        self.persist_job().await?;
        if let Err(error) = self.landing_zone.remove(&report.deployment_id).await {
            tracing::warn!(%error, "cannot clear the landing zone");
        }
        log_queue_error(uplink.report(&report));
        Ok(())
    }

    /// Moves the job on and persists it without a report: for stages the
    /// server does not know (the health check and the rollback happen while
    /// it shows `installing`).
    async fn advance_quietly(&mut self, result: StepResult) -> anyhow::Result<()> {
        if let Some(job) = self.job.as_mut() {
            job.advance(result);
        }
        self.persist_job().await
    }

    /// Whether an install of this package is confirmed by the health check:
    /// when one is configured, for the configured handlers (not the agent's
    /// own configuration or executable, which have their own checks).
    fn is_health_checked(&self, manifest: &Manifest) -> bool {
        self.health.is_some() && !is_agent_config(manifest) && manifest.kind != PackageKind::Agent
    }

    /// Moves the job on, persists it, then reports the new stage.
    async fn advance(&mut self, result: StepResult, uplink: &dyn Uplink) -> anyhow::Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let report = job.advance(result);
        self.persist_job().await?;
        log_queue_error(uplink.report(&report));
        Ok(())
    }

    async fn save_installed(&self) -> anyhow::Result<()> {
        let store = self.store.clone();
        let installed = self.installed.clone();
        crate::state::write_retrying(move || store.save_installed(&installed))
            .await
            .context("persisting the installed versions")
    }

    /// Whether a self-update marker exists for `deployment_id`.
    fn self_update_pending(&self, deployment_id: &str) -> bool {
        matches!(self.markers.load(), Ok(Some(marker)) if marker.deployment_id == deployment_id)
    }

    /// The installer for a package: the agent's configuration and the agent
    /// itself have their own; everything else goes to the configured one.
    fn installer_for(&self, manifest: &Manifest) -> Arc<dyn Installer> {
        if is_agent_config(manifest) {
            self.remote_config.clone()
        } else if manifest.kind == PackageKind::Agent {
            self.self_update.clone()
        } else {
            self.overrides
                .for_package(manifest)
                .unwrap_or_else(|| self.handlers.installer.clone())
        }
    }

    async fn persist_job(&self) -> anyhow::Result<()> {
        let Some(job) = self.job.clone() else {
            return Ok(());
        };
        let store = self.store.clone();
        crate::state::write_retrying(move || store.save_job(&job))
            .await
            .context("persisting the job")
    }

    async fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.cancel.cancel();
            // Wait, so that no task still writes the landing zone when the
            // next one starts (or the process exits).
            if let Err(error) = worker.handle.await {
                tracing::warn!(%error, "worker task ended abnormally");
            }
        }
    }
}

fn log_queue_error(result: Result<(), crate::mqtt::MqttError>) {
    if let Err(error) = result {
        tracing::warn!(%error, "message not queued; it is repeated after the next connection");
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
