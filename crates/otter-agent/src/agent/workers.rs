//! The agent's worker tasks: the slow part of each step (fetch, safe-state
//! wait, install, health check, rollback) runs in its own task and hands
//! back a `WorkOutcome`; the loop in `mod.rs` owns all state and persists it.

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

    /// What the installer, the health check and the rollback of `job` get;
    /// `Err` when the payload path cannot be formed.
    fn install_request(&self, job: &Job, manifest: &Manifest) -> Result<InstallRequest, String> {
        let deployment_id = job.notification.deployment_id.clone();
        let payload = self
            .landing_zone
            .files(&deployment_id)
            .map_err(|e| e.to_string())?
            .payload;
        Ok(InstallRequest {
            deployment_id,
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            payload,
        })
    }

    /// Starts the installer; `Err` when the payload path cannot be formed.
    pub(super) fn spawn_install(&mut self, job: &Job, manifest: &Manifest) -> Result<(), String> {
        let request = self.install_request(job, manifest)?;
        let deployment_id = request.deployment_id.clone();
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

impl Agent {
    /// Starts the health check of the install of `job` (stage
    /// `HealthCheck`, persisted).
    pub(super) fn spawn_health_check(&mut self, job: &Job, manifest: &Manifest) {
        let deployment_id = job.notification.deployment_id.clone();
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        let health = self.health.clone();
        let request = self.install_request(job, manifest);
        tracing::info!(release = %manifest.release_id(), "checking the health of the install");
        let handle = tokio::spawn(async move {
            let (Some(health), Ok(request)) = (health, request) else {
                // Configured when the install ran, gone after a restart
                // with another configuration: nothing is left to check.
                return WorkOutcome::Done;
            };
            match crate::health::check_health(&health, &request, &task_cancel).await {
                Ok(()) => WorkOutcome::Done,
                Err(crate::health::HealthError::Cancelled) => WorkOutcome::Cancelled,
                Err(error) => WorkOutcome::Unhealthy(error.to_string()),
            }
        });
        self.worker = Some(Worker {
            deployment_id,
            kind: WorkKind::HealthCheck,
            cancel,
            link: None,
            handle,
        });
    }

    /// Starts the rollback of the install of `job` (stage `RollingBack`,
    /// persisted), which failed its health check for `reason`.
    pub(super) fn spawn_rollback(&mut self, job: &Job, manifest: &Manifest, reason: String) {
        let deployment_id = job.notification.deployment_id.clone();
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        let installer = self.installer_for(manifest);
        let request = self.install_request(job, manifest);
        // installed.json still names the version the install replaced.
        let previous = match self.installed.get(&manifest.name) {
            Some(version) => format!("rolled back to {version}"),
            None => "rolled back (no earlier version)".to_owned(),
        };
        tracing::warn!(release = %manifest.release_id(), %reason, "rolling back");
        let handle = tokio::spawn(async move {
            let request = match request {
                Ok(request) => request,
                Err(error) => {
                    return WorkOutcome::Failed(format!("{reason}; rollback failed: {error}"));
                }
            };
            tokio::select! {
                result = installer.rollback(&request) => match result {
                    Ok(()) => WorkOutcome::RolledBack(format!("{reason}; {previous}")),
                    Err(error) => WorkOutcome::Failed(format!("{reason}; rollback failed: {error}")),
                },
                // Stage RollingBack is persisted: the next start rolls back again.
                () = task_cancel.cancelled() => WorkOutcome::Cancelled,
            }
        });
        self.worker = Some(Worker {
            deployment_id,
            kind: WorkKind::RollBack,
            cancel,
            link: None,
            handle,
        });
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
