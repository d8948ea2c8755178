//! `POST /api/v1/devices` (enrolment: issue a certificate, store the device)
//! and the device listing.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Json, Path, Query, State};
use axum::http::StatusCode;
use otter_proto::api::{DeviceInfo, EnrollRequest, EnrollResponse};
use otter_proto::manifest::validate_name;
use otter_proto::topics::DeviceId;
use serde::Deserialize;

use super::{ApiState, Authenticated, json_body, query_params};
use crate::audit::Actor;
use crate::clock;
use crate::error::ApiError;
use crate::store::{EnrollOutcome, NewDevice};

/// Most tags one device may carry.
const MAX_TAGS: usize = 64;

pub(super) async fn enroll(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let request = json_body(body)?;
    validate_name(&request.hardware)
        .map_err(|e| ApiError::unprocessable("invalid-request", format!("hardware: {e}")))?;
    if request.tags.len() > MAX_TAGS {
        return Err(ApiError::unprocessable(
            "invalid-request",
            format!("at most {MAX_TAGS} tags per device"),
        ));
    }
    for tag in &request.tags {
        validate_name(tag)
            .map_err(|e| ApiError::unprocessable("invalid-request", format!("tag {tag:?}: {e}")))?;
    }
    let exists = || {
        ApiError::conflict(
            "device-exists",
            format!("device {} is already enrolled", request.device_id),
        )
    };
    if state.store.device_exists(&request.device_id).await? {
        return Err(exists());
    }
    let pki = state.pki.clone();
    let device_id = request.device_id.clone();
    let issued = tokio::task::spawn_blocking(move || pki.issue_device(&device_id))
        .await
        .map_err(|e| ApiError::internal("issuing a device certificate", &e))?
        .map_err(|e| ApiError::internal("issuing a device certificate", &e))?;
    let new_device = NewDevice {
        device_id: request.device_id.clone(),
        hardware: request.hardware.clone(),
        tags: request.tags.clone(),
        cert_serial: issued.serial_hex.clone(),
    };
    let actor = Actor::operator(&operator.name);
    match state
        .store
        .enroll_device(&new_device, &actor, &clock::now_rfc3339())
        .await?
    {
        EnrollOutcome::Enrolled => {}
        EnrollOutcome::AlreadyExists => return Err(exists()),
    }
    tracing::info!(device = %request.device_id, operator = %operator.name, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            device_id: request.device_id,
            certificate_pem: issued.certificate_pem.clone(),
            private_key_pem: issued.private_key_pem.clone(),
            ca_pem: state.pki.ca_pem().to_owned(),
            trusted_signers: state.trusted_signer_pems.as_ref().clone(),
            mqtt_url: state.urls.mqtt_url.clone(),
            device_url: state.urls.device_url.clone(),
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    tag: Option<String>,
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let query = query_params(query)?;
    Ok(Json(state.store.devices(query.tag.as_deref()).await?))
}

pub(super) async fn show(
    State(state): State<ApiState>,
    _operator: Authenticated,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let unknown = || ApiError::not_found("unknown-device", format!("no device {id:?}"));
    let device_id = DeviceId::parse(&id).map_err(|_| unknown())?;
    state
        .store
        .device(&device_id)
        .await?
        .map(Json)
        .ok_or_else(unknown)
}
