//! `POST /api/v1/devices` (enrolment: issue a certificate, store the device),
//! `POST /api/v1/devices/batch` (many at once, all or none) and the device
//! listing, and `POST /api/v1/devices/{id}/revoke`.
//!
//! A revocation is stored (the certificate's serial, the device's pending
//! links revoked, `device.revoked` audited), then added to the shared
//! in-memory set, which kicks the device's MQTT session and makes the device
//! endpoint refuse its certificate. A second revoke of the same certificate
//! is `409 device-revoked` and changes nothing.
//!
//! A batch is checked as a whole before anything is issued (every request
//! valid, no id twice, none enrolled yet), its certificates are issued on
//! the blocking pool spread over the cores, and its devices are stored in
//! one transaction with one `device.enrolled` audit row each, exactly the
//! rows a single enrolment writes.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Json, Path, Query, State};
use axum::http::StatusCode;
use otter_proto::api::{
    BatchEnrollRequest, BatchEnrollResponse, DeviceInfo, EnrollRequest, EnrollResponse,
    ImportDevicesRequest, ImportDevicesResponse, ImportedDevice, MAX_BATCH_ENROLL,
    RevokeDeviceRequest,
};
use otter_proto::manifest::validate_name;
use otter_proto::topics::DeviceId;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use super::{ApiState, Authenticated, json_body, query_params};
use crate::audit::Actor;
use crate::clock;
use crate::error::ApiError;
use crate::pki::IssuedCertificate;
use crate::store::{BatchEnrollOutcome, DeviceRevoked, EnrollOutcome, NewDevice};

/// Most tags one device may carry.
const MAX_TAGS: usize = 64;

/// Checks what one enrolment request may contain.
pub(super) fn validate_request(request: &EnrollRequest) -> Result<(), ApiError> {
    let device = &request.device_id;
    validate_name(&request.hardware).map_err(|e| {
        ApiError::unprocessable("invalid-request", format!("{device}: hardware: {e}"))
    })?;
    if request.tags.len() > MAX_TAGS {
        return Err(ApiError::unprocessable(
            "invalid-request",
            format!("{device}: at most {MAX_TAGS} tags per device"),
        ));
    }
    for tag in &request.tags {
        validate_name(tag).map_err(|e| {
            ApiError::unprocessable("invalid-request", format!("{device}: tag {tag:?}: {e}"))
        })?;
    }
    Ok(())
}

fn device_exists(device_id: &DeviceId) -> ApiError {
    ApiError::conflict(
        "device-exists",
        format!("device {device_id} is already enrolled"),
    )
}

fn new_device(request: &EnrollRequest, issued: &IssuedCertificate) -> NewDevice {
    NewDevice {
        device_id: request.device_id.clone(),
        hardware: request.hardware.clone(),
        tags: request.tags.clone(),
        cert_serial: issued.serial_hex.clone(),
    }
}

fn enroll_response(
    state: &ApiState,
    device_id: DeviceId,
    issued: IssuedCertificate,
) -> EnrollResponse {
    EnrollResponse {
        device_id,
        certificate_pem: issued.certificate_pem,
        private_key_pem: issued.private_key_pem,
        ca_pem: state.pki.ca_pem().to_owned(),
        trusted_signers: state.trusted_signer_pems.as_ref().clone(),
        trusted_roots: state.trusted_root_pems.as_ref().clone(),
        mqtt_url: state.urls.mqtt_url.clone(),
        device_url: state.urls.device_url.clone(),
    }
}

pub(super) async fn enroll(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let request = json_body(body)?;
    validate_request(&request)?;
    if state.store.device_exists(&request.device_id).await? {
        return Err(device_exists(&request.device_id));
    }
    let pki = state.pki.clone();
    let device_id = request.device_id.clone();
    let issued = tokio::task::spawn_blocking(move || pki.issue_device(&device_id))
        .await
        .map_err(|e| ApiError::internal("issuing a device certificate", &e))?
        .map_err(|e| ApiError::internal("issuing a device certificate", &e))?;
    let actor = Actor::operator(&operator.name);
    match state
        .store
        .enroll_device(
            &new_device(&request, &issued),
            &actor,
            &clock::now_rfc3339(),
        )
        .await?
    {
        EnrollOutcome::Enrolled => {}
        EnrollOutcome::AlreadyExists => return Err(device_exists(&request.device_id)),
    }
    tracing::info!(device = %request.device_id, operator = %operator.name, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(enroll_response(&state, request.device_id, issued)),
    ))
}

pub(super) async fn enroll_batch(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<BatchEnrollRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<BatchEnrollResponse>), ApiError> {
    let requests = json_body(body)?.devices;
    check_batch_len("a batch", requests.len())?;
    let mut seen = std::collections::HashSet::with_capacity(requests.len());
    for request in &requests {
        validate_request(request)?;
        if !seen.insert(request.device_id.as_str()) {
            return Err(ApiError::unprocessable(
                "invalid-request",
                format!("device {} is listed twice", request.device_id),
            ));
        }
    }
    // A cheap check before the expensive part; the transaction checks again.
    for request in &requests {
        if state.store.device_exists(&request.device_id).await? {
            return Err(device_exists(&request.device_id));
        }
    }
    let issued = issue_all(&state, &requests).await?;
    let new_devices: Vec<NewDevice> = requests
        .iter()
        .zip(&issued)
        .map(|(request, issued)| new_device(request, issued))
        .collect();
    store_batch(&state, &new_devices, &operator.name).await?;
    tracing::info!(devices = requests.len(), operator = %operator.name, "devices enrolled in a batch");
    let devices = requests
        .into_iter()
        .zip(issued)
        .map(|(request, issued)| enroll_response(&state, request.device_id, issued))
        .collect();
    Ok((StatusCode::CREATED, Json(BatchEnrollResponse { devices })))
}

/// A batch (enrolment or import) holds 1 to [`MAX_BATCH_ENROLL`] devices.
fn check_batch_len(what: &str, len: usize) -> Result<(), ApiError> {
    if len == 0 || len > MAX_BATCH_ENROLL {
        return Err(ApiError::unprocessable(
            "invalid-request",
            format!("{what} holds 1 to {MAX_BATCH_ENROLL} devices, not {len}"),
        ));
    }
    Ok(())
}

/// Stores a checked batch in one transaction; an id enrolled meanwhile is
/// `409 device-exists` and stores nothing.
async fn store_batch(
    state: &ApiState,
    devices: &[NewDevice],
    operator: &str,
) -> Result<(), ApiError> {
    match state
        .store
        .enroll_devices(devices, &Actor::operator(operator), &clock::now_rfc3339())
        .await?
    {
        BatchEnrollOutcome::Enrolled => Ok(()),
        BatchEnrollOutcome::AlreadyExists(device_id) => Err(device_exists(&device_id)),
    }
}

/// `POST /api/v1/devices/import`: the factory path. Each certificate must
/// verify against a trusted device CA (ours or a `--device-ca`) exactly as
/// the TLS layer will check it; its common name is the device id and its
/// serial is recorded (for revocation). All devices are stored in one
/// transaction with their `device.enrolled` rows, or none.
pub(super) async fn import(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<ImportDevicesRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ImportDevicesResponse>), ApiError> {
    let devices = json_body(body)?.devices;
    check_batch_len("an import", devices.len())?;
    let mut new_devices = Vec::with_capacity(devices.len());
    let mut seen = std::collections::HashSet::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let der =
            CertificateDer::from_pem_slice(device.certificate_pem.as_bytes()).map_err(|e| {
                ApiError::unprocessable(
                    "invalid-certificate",
                    format!("device {}: not a PEM certificate: {e}", index + 1),
                )
            })?;
        let identity = state.pki.verify_device_certificate(&der).map_err(|e| {
            ApiError::unprocessable("invalid-certificate", format!("device {}: {e}", index + 1))
        })?;
        let request = EnrollRequest {
            device_id: identity.device_id,
            tags: device.tags,
            hardware: device.hardware,
        };
        validate_request(&request)?;
        if !seen.insert(request.device_id.clone()) {
            return Err(ApiError::unprocessable(
                "invalid-request",
                format!("device {} is listed twice", request.device_id),
            ));
        }
        if state.revocations.is_revoked(&identity.serial_hex) {
            return Err(ApiError::conflict(
                "device-revoked",
                format!(
                    "the certificate of {} (serial {}) is revoked",
                    request.device_id, identity.serial_hex
                ),
            ));
        }
        new_devices.push(NewDevice {
            device_id: request.device_id,
            hardware: request.hardware,
            tags: request.tags,
            cert_serial: identity.serial_hex,
        });
    }
    store_batch(&state, &new_devices, &operator.name).await?;
    tracing::info!(devices = new_devices.len(), operator = %operator.name, "devices imported");
    Ok((
        StatusCode::CREATED,
        Json(ImportDevicesResponse {
            devices: new_devices
                .into_iter()
                .map(|device| ImportedDevice {
                    device_id: device.device_id,
                    cert_serial: device.cert_serial,
                })
                .collect(),
            ca_pem: state.pki.ca_pem().to_owned(),
            mqtt_url: state.urls.mqtt_url.clone(),
            device_url: state.urls.device_url.clone(),
        }),
    ))
}

/// Issues one certificate per request, in request order, on the blocking
/// pool with one task per core (key generation and signing are CPU work).
async fn issue_all(
    state: &ApiState,
    requests: &[EnrollRequest],
) -> Result<Vec<IssuedCertificate>, ApiError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_task = requests.len().div_ceil(cores).max(1);
    let mut tasks = Vec::new();
    for chunk in requests.chunks(per_task) {
        let pki = state.pki.clone();
        let device_ids: Vec<DeviceId> = chunk.iter().map(|r| r.device_id.clone()).collect();
        tasks.push(tokio::task::spawn_blocking(move || {
            device_ids
                .iter()
                .map(|device_id| pki.issue_device(device_id))
                .collect::<Result<Vec<_>, _>>()
        }));
    }
    let mut issued = Vec::with_capacity(requests.len());
    for task in tasks {
        let chunk = task
            .await
            .map_err(|e| ApiError::internal("issuing device certificates", &e))?
            .map_err(|e| ApiError::internal("issuing device certificates", &e))?;
        issued.extend(chunk);
    }
    Ok(issued)
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
    show_device(&state, &id).await
}

/// `GET /api/v1/devices/batch`: the batch route must not hide a device
/// named `batch`.
pub(super) async fn show_batch(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<DeviceInfo>, ApiError> {
    show_device(&state, "batch").await
}

async fn show_device(state: &ApiState, id: &str) -> Result<Json<DeviceInfo>, ApiError> {
    let unknown = || ApiError::not_found("unknown-device", format!("no device {id:?}"));
    let device_id = DeviceId::parse(id).map_err(|_| unknown())?;
    state
        .store
        .device(&device_id)
        .await?
        .map(Json)
        .ok_or_else(unknown)
}

/// Longest revocation reason kept, in bytes.
const MAX_REASON_LEN: usize = 1024;

pub(super) async fn revoke(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<RevokeDeviceRequest>, JsonRejection>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let request = json_body(body)?;
    if let Some(reason) = &request.reason
        && (reason.len() > MAX_REASON_LEN || reason.chars().any(char::is_control))
    {
        return Err(ApiError::unprocessable(
            "invalid-request",
            format!("reason: at most {MAX_REASON_LEN} bytes, no control characters"),
        ));
    }
    let unknown = || ApiError::not_found("unknown-device", format!("no device {id:?}"));
    let device_id = DeviceId::parse(&id).map_err(|_| unknown())?;
    let outcome = state
        .store
        .revoke_device(
            &device_id,
            request.reason.as_deref(),
            &Actor::operator(&operator.name),
            &clock::now_rfc3339(),
        )
        .await?;
    match outcome {
        DeviceRevoked::Revoked { serial } => {
            state.revocations.revoke(&device_id, &serial);
            tracing::info!(device = %device_id, operator = %operator.name, "device certificate revoked");
        }
        DeviceRevoked::UnknownDevice => return Err(unknown()),
        DeviceRevoked::AlreadyRevoked => {
            return Err(ApiError::conflict(
                "device-revoked",
                format!("the certificate of device {device_id} is already revoked"),
            ));
        }
    }
    show_device(&state, &id).await
}
