//! Push mode, seen from the agent loop: answering an offer with the bytes
//! durably held, appending chunks, and unpacking once the artifact is
//! complete. The chunk writer itself is `crate::push`.

use super::*;

impl Agent {
    /// Push mode, while receiving: tells the server how many bytes are
    /// durably held (it sends from there), or unpacks once all are.
    pub(super) async fn answer_push(
        &mut self,
        job: &Job,
        manifest: Manifest,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        let deployment_id = job.notification.deployment_id.clone();
        let files = match self.landing_zone.files(&deployment_id) {
            Ok(files) => files,
            Err(error) => {
                return self
                    .finish(StepResult::Failed(error.to_string()), uplink)
                    .await;
            }
        };
        let artifact_part = files.artifact_part.clone();
        let held = tokio::task::spawn_blocking(move || crate::push::durable_length(&artifact_part))
            .await
            .context("landing zone task")?;
        let held = match held {
            Ok(held) => held,
            Err(error) => {
                return self
                    .finish(StepResult::Failed(format!("landing zone: {error}")), uplink)
                    .await;
            }
        };
        if held >= manifest.artifact.size {
            self.spawn_unpack(job, manifest);
        } else {
            log_queue_error(uplink.push_ack(&PushAck {
                deployment_id,
                offset: held,
            }));
        }
        Ok(())
    }

    /// Push mode: a chunk of the current job's artifact arrives. It is
    /// written only where `artifact.part` ends (`crate::push`), synced, and
    /// acknowledged; the last one starts the check and unpack.
    pub(super) async fn on_chunk(
        &mut self,
        payload: Bytes,
        uplink: &dyn Uplink,
    ) -> anyhow::Result<()> {
        let (deployment_id, offset, data) = match PushChunk::decode(&payload) {
            Ok(chunk) => {
                // The data is the tail of the payload: share it, no copy.
                let start = payload.len().saturating_sub(chunk.data.len());
                (
                    chunk.deployment_id.to_owned(),
                    chunk.offset,
                    payload.slice(start..),
                )
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring a malformed push chunk");
                return Ok(());
            }
        };
        let Some(job) = self.job.clone().filter(|job| {
            job.notification.deployment_id == deployment_id
                && !job.delivery.is_link()
                && job.stage == Stage::Received
        }) else {
            tracing::debug!(deployment = %deployment_id, offset, "dropping a chunk no push job waits for");
            return Ok(());
        };
        if self.worker.is_some() {
            // Complete already: the unpack runs.
            return Ok(());
        }
        let manifest = match self.job_manifest(&job) {
            Ok(manifest) => manifest,
            Err(reason) => {
                return self.finish(StepResult::Failed(reason), uplink).await;
            }
        };
        let files = match self.landing_zone.files(&deployment_id) {
            Ok(files) => files,
            Err(error) => {
                return self
                    .finish(StepResult::Failed(error.to_string()), uplink)
                    .await;
            }
        };
        let size = manifest.artifact.size;
        let written = tokio::task::spawn_blocking(move || {
            crate::push::append_chunk(&files, size, offset, &data)
        })
        .await
        .context("landing zone task")?;
        let written = match written {
            Ok(written) => written,
            Err(error) => {
                return self
                    .finish(StepResult::Failed(format!("landing zone: {error}")), uplink)
                    .await;
            }
        };
        match written.decision {
            // A duplicate is acknowledged too: the server may have missed
            // the acknowledgement that made it one.
            ChunkDecision::Append { .. } | ChunkDecision::Duplicate => {
                log_queue_error(uplink.push_ack(&PushAck {
                    deployment_id,
                    offset: written.held,
                }));
            }
            ChunkDecision::Gap | ChunkDecision::Oversized => {
                tracing::debug!(deployment = %deployment_id, offset, held = written.held, decision = ?written.decision, "dropping a push chunk");
            }
        }
        if written.held >= size {
            tracing::info!(deployment = %job.notification.deployment_id, bytes = written.held, "pushed artifact complete");
            self.spawn_unpack(&job, manifest);
        }
        Ok(())
    }

    /// Push mode's step 6 once every byte arrived: the same check and
    /// unpack as after a download.
    pub(super) fn spawn_unpack(&mut self, job: &Job, manifest: Manifest) {
        let deployment_id = job.notification.deployment_id.clone();
        let cancel = CancellationToken::new();
        let data_key = self.data_key(&job.notification, &manifest);
        let landing_zone = self.landing_zone.clone();
        let task_cancel = cancel.clone();
        let task_deployment = deployment_id.clone();
        let handle = tokio::spawn(async move {
            let data_key = match data_key {
                Ok(key) => key,
                Err(error) => return WorkOutcome::Failed(error.to_string()),
            };
            let files = match landing_zone.prepare(&task_deployment).await {
                Ok(files) => files,
                Err(error) => return WorkOutcome::Failed(error.to_string()),
            };
            match crate::fetch::verify_and_unpack(&files, &manifest, &data_key, &task_cancel).await
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
            link: None,
            handle,
        });
    }
}
