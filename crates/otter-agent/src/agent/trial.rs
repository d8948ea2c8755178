//! The self-update trial, seen from the agent loop: at start a trial marker
//! makes this process the new agent on trial, a rolled-back marker is
//! reported; on the first contact with the server the trial is confirmed.
//! The marker's states and the swap itself live in `crate::self_update`
//! and `crate::supervisor`.

use super::*;

impl Agent {
    /// At start: a trial marker makes this process the new agent on trial; a
    /// rolled-back marker is reported for its deployment (with the previous
    /// version put back in `installed.json`) and cleared.
    pub(super) async fn resume_self_update(&mut self, uplink: &dyn Uplink) -> anyhow::Result<()> {
        let marker = match self.markers.load() {
            Ok(marker) => marker,
            Err(error) => {
                tracing::error!(%error, "cannot read the self-update marker");
                None
            }
        };
        let Some(marker) = marker else {
            return Ok(());
        };
        match &marker.state {
            MarkerState::Trial => {
                tracing::info!(version = %marker.version, "running as the new agent on trial");
                self.trial = Some(marker);
            }
            MarkerState::RolledBack { reason } => {
                tracing::warn!(version = %marker.version, %reason, "the self-update was rolled back");
                if self.installed.get(&marker.package) == Some(&marker.version) {
                    match &marker.previous_version {
                        Some(previous) => {
                            self.installed
                                .insert(marker.package.clone(), previous.clone());
                        }
                        None => {
                            self.installed.remove(&marker.package);
                        }
                    }
                    self.save_installed().await?;
                }
                let this_job = self.job.as_ref().is_some_and(|job| {
                    job.notification.deployment_id == marker.deployment_id
                        && !matches!(
                            job.stage,
                            Stage::Finished {
                                event: DeviceEvent::RolledBack,
                                ..
                            }
                        )
                });
                if this_job {
                    self.finish(StepResult::RolledBack(reason.clone()), uplink)
                        .await?;
                }
                self.markers
                    .remove()
                    .context("clearing the self-update marker")?;
            }
            MarkerState::Staged => {
                tracing::warn!("a new agent executable is staged but no supervisor swapped it in");
            }
            MarkerState::Confirmed => {}
        }
        Ok(())
    }

    /// The trial succeeded: record the version, report `installed`, then
    /// mark the marker `confirmed` (last, so that a crash before it is
    /// rolled back and the version put back).
    pub(super) async fn confirm_self_update(&mut self, uplink: &dyn Uplink) -> anyhow::Result<()> {
        let Some(marker) = self.trial.take() else {
            return Ok(());
        };
        let pending = self.job.clone().filter(|job| {
            job.notification.deployment_id == marker.deployment_id && !job.is_finished()
        });
        if let Some(job) = pending {
            match self.job_manifest(&job) {
                Ok(manifest) => self.complete_install(&manifest, uplink).await?,
                Err(reason) => self.finish(StepResult::Failed(reason), uplink).await?,
            }
        }
        self.markers
            .transition(&marker, MarkerState::Confirmed)
            .context("confirming the self-update")?;
        tracing::info!(version = %marker.version, "self-update confirmed");
        Ok(())
    }
}
