//! The agent's worker tasks: the slow part of each step (fetch, safe-state
//! wait, install) runs in its own task and hands back a `WorkOutcome`; the
//! loop in `mod.rs` owns all state and persists it.

use super::*;

/// How long a fetch keeps trying while short of a resource.
const FETCH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

impl Agent {
    pub(super) fn spawn_fetch(&mut self, job: &Job, manifest: Manifest) {
        let deployment_id = job.notification.deployment_id.clone();
        let cancel = CancellationToken::new();
        let (link_sender, link_receiver) = watch::channel(job.notification.link.clone());
        let data_key = self.data_key(&job.notification, &manifest);
        let landing_zone = self.landing_zone.clone();
        let downloader = self.downloader.clone();
        let task_cancel = cancel.clone();
        let task_deployment = deployment_id.clone();
        let handle = tokio::spawn(async move {
            let data_key = match data_key {
                Ok(key) => key,
                Err(error) => return WorkOutcome::Failed(error.to_string()),
            };
            let link = move || link_receiver.borrow().clone();
            // A fetch that fails for want of file descriptors or memory is
            // tried again (resuming the download) rather than failing the
            // update; anything else ends it.
            let deadline = tokio::time::Instant::now() + FETCH_PATIENCE;
            let mut backoff = crate::backoff::Backoff::new(
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(10),
            );
            loop {
                let error = match landing_zone.prepare(&task_deployment).await {
                    Err(crate::landing_zone::LandingZoneError::Io { source, .. })
                        if crate::backoff::is_transient_io(&source) =>
                    {
                        source.to_string()
                    }
                    Err(error) => return WorkOutcome::Failed(error.to_string()),
                    Ok(files) => match crate::fetch::fetch(
                        &downloader,
                        &link,
                        &files,
                        &manifest,
                        &data_key,
                        &task_cancel,
                    )
                    .await
                    {
                        Ok(()) => return WorkOutcome::Done,
                        Err(error) if error.is_cancelled() => return WorkOutcome::Cancelled,
                        Err(error) if error.is_transient() => error.to_string(),
                        Err(error) => return WorkOutcome::Failed(error.to_string()),
                    },
                };
                if tokio::time::Instant::now() >= deadline {
                    return WorkOutcome::Failed(error);
                }
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "fetch short of a resource; trying again");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = task_cancel.cancelled() => return WorkOutcome::Cancelled,
                }
            }
        });
        self.worker = Some(Worker {
            deployment_id,
            kind: WorkKind::Fetch,
            cancel,
            link: Some(link_sender),
            handle,
        });
    }

    pub(super) fn spawn_safe_state_wait(&mut self, job: &Job) {
        let cancel = CancellationToken::new();
        let probe = self.handlers.safe_state.clone();
        let policy = self.safe_state_policy.clone();
        let task_cancel = cancel.clone();
        let handle = tokio::spawn(async move {
            match wait_for_safe_state(probe.as_ref(), &policy, &task_cancel).await {
                Ok(()) => WorkOutcome::Done,
                Err(crate::safe_state::SafeStateError::Cancelled) => WorkOutcome::Cancelled,
                Err(error) => WorkOutcome::Failed(error.to_string()),
            }
        });
        self.worker = Some(Worker {
            deployment_id: job.notification.deployment_id.clone(),
            kind: WorkKind::AwaitSafeState,
            cancel,
            link: None,
            handle,
        });
    }

    /// Starts the installer; `Err` when the payload path cannot be formed.
    pub(super) fn spawn_install(&mut self, job: &Job, manifest: &Manifest) -> Result<(), String> {
        let deployment_id = job.notification.deployment_id.clone();
        let payload = self
            .landing_zone
            .files(&deployment_id)
            .map_err(|e| e.to_string())?
            .payload;
        let request = InstallRequest {
            deployment_id: deployment_id.clone(),
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            payload,
        };
        let installer = self.installer_for(manifest);
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        tracing::info!(release = %manifest.release_id(), handler = installer.name(), "installing");
        let handle = tokio::spawn(async move {
            tokio::select! {
                result = installer.install(&request) => match result {
                    Ok(()) => WorkOutcome::Done,
                    Err(error) => WorkOutcome::Failed(format!("install failed: {error}")),
                },
                // Stage Installing is persisted: the next start installs again.
                () = task_cancel.cancelled() => WorkOutcome::Cancelled,
            }
        });
        self.worker = Some(Worker {
            deployment_id,
            kind: WorkKind::Install,
            cancel,
            link: None,
            handle,
        });
        Ok(())
    }
}

/// The next worker outcome; pending forever when no worker runs.
pub(super) async fn next_outcome(worker: &mut Option<Worker>) -> (WorkKind, String, WorkOutcome) {
    let Some(worker) = worker.as_mut() else {
        return std::future::pending().await;
    };
    let outcome = match (&mut worker.handle).await {
        Ok(outcome) => outcome,
        Err(error) => WorkOutcome::Failed(format!("internal error in the worker: {error}")),
    };
    (worker.kind, worker.deployment_id.clone(), outcome)
}
