//! `POST /api/v1/deployments` (commit, steps 2–3, then hand the targeted
//! devices to the engine for step 4) and the deployment views.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use otter_proto::api::{CreateDeployment, DeploymentInfo, DeploymentStatus, Target};
use otter_proto::manifest::parse_release_id;

use super::{ApiState, Authenticated, json_body};
use crate::audit::Actor;
use crate::clock;
use crate::engine::EngineCommand;
use crate::error::ApiError;
use crate::store::{CreatedDeployment, DeploymentCreation};

pub(super) async fn create(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<CreateDeployment>, JsonRejection>,
) -> Result<(StatusCode, Json<DeploymentInfo>), ApiError> {
    let request = json_body(body)?;
    parse_release_id(&request.release)
        .map_err(|e| ApiError::unprocessable("invalid-release", e))?;
    let target =
        Target::parse(&request.target).map_err(|e| ApiError::unprocessable("invalid-target", e))?;
    // A release whose signer was revoked (or whose certificate expired)
    // since its upload is not sent anywhere: devices would refuse it anyway.
    if let Some(release) = state.store.release(&request.release).await? {
        let verdict = state
            .signer_trust
            .read()
            .map_err(|_| ApiError::internal("reading the signer trust", &"lock poisoned"))?
            .verify_manifest(&release.info.manifest, clock::now_unix());
        if let Err(error) = verdict {
            return Err(ApiError::unprocessable(
                super::releases::signer_error_code(&error),
                format!("release {} is no longer trusted: {error}", request.release),
            ));
        }
    }
    let deployment_id = new_deployment_id();
    let actor = Actor::operator(&operator.name);
    let outcome = state
        .store
        .create_deployment(&DeploymentCreation {
            deployment_id: &deployment_id,
            release_id: &request.release,
            target: &target,
            allow_downgrade: request.allow_downgrade,
            actor: &actor,
            at: &clock::now_rfc3339(),
        })
        .await?;
    let device_ids = match outcome {
        CreatedDeployment::Created { device_ids } => device_ids,
        CreatedDeployment::UnknownRelease => {
            return Err(ApiError::not_found(
                "unknown-release",
                format!("no release {:?}", request.release),
            ));
        }
        CreatedDeployment::UnknownDevice => {
            return Err(ApiError::not_found(
                "unknown-device",
                format!("no device for target {target}"),
            ));
        }
        CreatedDeployment::IncompatibleDevice { hardware } => {
            return Err(ApiError::unprocessable(
                "incompatible-hardware",
                format!(
                    "release {} does not list the hardware {hardware:?} of {target}",
                    request.release
                ),
            ));
        }
        CreatedDeployment::DowngradeNotAllowed => {
            return Err(ApiError::unprocessable(
                "downgrade-not-allowed",
                format!(
                    "release {} was not built with --allow-downgrade: its signed manifest does \
                     not allow a downgrade, so a deployment cannot allow one",
                    request.release
                ),
            ));
        }
        CreatedDeployment::EmptyTarget => {
            return Err(ApiError::unprocessable(
                "empty-target",
                format!("{target} matches no device with a hardware the release lists"),
            ));
        }
    };
    tracing::info!(
        deployment = %deployment_id,
        release = %request.release,
        %target,
        allow_downgrade = request.allow_downgrade,
        devices = device_ids.len(),
        operator = %operator.name,
        "deployment created"
    );
    // Step 4 runs in the engine, which owns notifications; the deployment is
    // committed either way, and a device learns of it when it registers.
    if state
        .engine
        .send(EngineCommand::NotifyDeployment {
            deployment_id: deployment_id.clone(),
            device_ids,
        })
        .await
        .is_err()
    {
        tracing::warn!(deployment = %deployment_id, "engine stopped; devices will be notified when they register");
    }
    let status = state
        .store
        .deployment_status(&deployment_id)
        .await?
        .ok_or_else(|| ApiError::internal("reading a new deployment", &"it vanished"))?;
    Ok((StatusCode::CREATED, Json(status.info)))
}

/// A fresh deployment id: `dep-` and 16 random hex digits.
fn new_deployment_id() -> String {
    let bytes: [u8; 8] = rand::random();
    format!("dep-{}", hex::encode(bytes))
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<Vec<DeploymentInfo>>, ApiError> {
    Ok(Json(state.store.deployments().await?))
}

pub(super) async fn show(
    State(state): State<ApiState>,
    _operator: Authenticated,
    Path(id): Path<String>,
) -> Result<Json<DeploymentStatus>, ApiError> {
    state
        .store
        .deployment_status(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("unknown-deployment", format!("no deployment {id:?}")))
}
