//! The agent's worker tasks: the slow part of each step (fetch, safe-state
//! wait, install) runs in its own task and hands back a `WorkOutcome`; the
//! loop in `mod.rs` owns all state and persists it.

use super::*;

impl Agent {
    pub(super) fn spawn_fetch(&mut self, job: &Job, manifest: Manifest) {
        let deployment_id = job.notification.deployment_id.clone();
        let cancel = CancellationToken::new();
        let (link_sender, link_receiver) = watch::channel(job.notification.link.clone());
        let data_key = job.notification.data_key.clone();
        let landing_zone = self.landing_zone.clone();
        let downloader = self.downloader.clone();
        let task_cancel = cancel.clone();
        let task_deployment = deployment_id.clone();
        let handle = tokio::spawn(async move {
            let data_key = match DataKey::from_base64(&data_key) {
                Ok(key) => key,
                Err(error) => return WorkOutcome::Failed(format!("invalid data key: {error}")),
            };
            let files = match landing_zone.prepare(&task_deployment).await {
                Ok(files) => files,
                Err(error) => return WorkOutcome::Failed(error.to_string()),
            };
            let link = move || link_receiver.borrow().clone();
            match crate::fetch::fetch(
                &downloader,
                &link,
                &files,
                &manifest,
                &data_key,
                &task_cancel,
            )
            .await
            {
                Ok(()) => WorkOutcome::Done,
                Err(error) if error.is_cancelled() => WorkOutcome::Cancelled,
                Err(error) => WorkOutcome::Failed(error.to_string()),
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
