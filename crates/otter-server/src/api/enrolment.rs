//! CSR enrolment: one-time enrolment tokens on the operator API, and
//! `POST /v1/enrol`, the one route of the device endpoint a client without a
//! certificate may call.
//!
//! - `POST /api/v1/enrolment-tokens` (operator) creates a token for one
//!   device id and shows it once, with the device CA and its SHA-256 for the
//!   device to pin; `GET` (viewer, like every read) lists tokens, never a
//!   token or its hash;
//!   `DELETE /api/v1/enrolment-tokens/{id}` revokes an unused one. Both
//!   changes are audited (`enrolment-token.created`, `.revoked`).
//! - `POST /v1/enrol` ([`enrol_with_csr`]) takes `{ token, device_id,
//!   csr_pem }`. The token is checked before any signing work (unknown 401,
//!   expired, used or revoked 410, another device's 403), then the CSR (its
//!   self-signature, a P-256 or Ed25519 key: otherwise 400 and nothing
//!   stored), then `Store::enrol_with_token` marks the token used and stores
//!   the device with the token's hardware and tags in one transaction. The
//!   certificate's subject and extensions are the server's own
//!   (`Pki::issue_for_csr`); the private key never leaves the device.
//!
//! A token is `otter-enrol-` and 32 random bytes in URL-safe base64; the
//! store keeps its SHA-256 only.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use otter_proto::api::{
    CreateEnrolmentToken, CreatedEnrolmentToken, CsrEnrolRequest, CsrEnrolResponse,
    DEFAULT_ENROLMENT_TOKEN_TTL_SECONDS, EnrollRequest, EnrolmentTokenInfo,
    MAX_CSR_ENROL_BODY_BYTES, MAX_ENROLMENT_TOKEN_TTL_SECONDS,
};

use super::{ApiState, Authenticated, PublicUrls, json_body, token_sha256};
use crate::audit::Actor;
use crate::clock;
use crate::device_http::DeviceEndpointState;
use crate::error::ApiError;
use crate::pki::{CsrError, Pki};
use crate::store::{CsrEnrolOutcome, EnrolmentRefusal, EnrolmentTokenRevoked, NewEnrolmentToken};

/// Prefix of every enrolment token, so one is recognised in a log or a
/// secret scanner.
pub const ENROLMENT_TOKEN_PREFIX: &str = "otter-enrol-";
/// Longest token accepted: ours are 55 characters.
const MAX_TOKEN_LEN: usize = 256;

/// What `POST /v1/enrol` needs besides the store: the PKI that signs, and
/// what a device is told at enrolment.
#[derive(Clone)]
pub struct DeviceEnrolment {
    pub pki: Arc<Pki>,
    pub trusted_signer_pems: Arc<Vec<String>>,
    pub trusted_root_pems: Arc<Vec<String>>,
    pub urls: PublicUrls,
}

/// A fresh enrolment token.
fn new_enrolment_token() -> String {
    let secret: [u8; 32] = rand::random();
    format!(
        "{ENROLMENT_TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

fn new_token_id() -> String {
    let id: [u8; 8] = rand::random();
    hex::encode(id)
}

pub(super) async fn create(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<CreateEnrolmentToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedEnrolmentToken>), ApiError> {
    let request = json_body(body)?;
    super::devices::validate_request(&EnrollRequest {
        device_id: request.device_id.clone(),
        tags: request.tags.clone(),
        hardware: request.hardware.clone(),
    })?;
    let ttl = request
        .ttl_seconds
        .unwrap_or(DEFAULT_ENROLMENT_TOKEN_TTL_SECONDS);
    if ttl == 0 || ttl > MAX_ENROLMENT_TOKEN_TTL_SECONDS {
        return Err(ApiError::unprocessable(
            "invalid-request",
            format!("ttl_seconds must be between 1 and {MAX_ENROLMENT_TOKEN_TTL_SECONDS}"),
        ));
    }
    if state.store.device_exists(&request.device_id).await? {
        return Err(ApiError::conflict(
            "device-exists",
            format!("device {} is already enrolled", request.device_id),
        ));
    }
    let now = time::OffsetDateTime::now_utc();
    // ttl is at most 30 days, so the cast and the addition cannot overflow.
    let expires_at = clock::format_rfc3339(now + time::Duration::seconds(ttl as i64));
    let token = new_enrolment_token();
    let id = new_token_id();
    let info = state
        .store
        .create_enrolment_token(
            &NewEnrolmentToken {
                id: &id,
                token_sha256: &token_sha256(&token),
                device_id: &request.device_id,
                hardware: &request.hardware,
                tags: &request.tags,
                expires_at: &expires_at,
            },
            &Actor::operator(&operator.name),
            &clock::format_rfc3339(now),
        )
        .await?;
    tracing::info!(token = %id, device = %request.device_id, operator = %operator.name, "enrolment token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrolmentToken {
            token,
            info,
            ca_pem: state.pki.ca_pem().to_owned(),
            ca_sha256: state.pki.ca_sha256(),
        }),
    ))
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<Vec<EnrolmentTokenInfo>>, ApiError> {
    Ok(Json(state.store.enrolment_tokens().await?))
}

pub(super) async fn revoke(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<EnrolmentTokenInfo>, ApiError> {
    let outcome = state
        .store
        .revoke_enrolment_token(&id, &Actor::operator(&operator.name), &clock::now_rfc3339())
        .await?;
    match outcome {
        EnrolmentTokenRevoked::Revoked(info) => {
            tracing::info!(token = %id, operator = %operator.name, "enrolment token revoked");
            Ok(Json(*info))
        }
        EnrolmentTokenRevoked::Unknown => Err(ApiError::not_found(
            "unknown-enrolment-token",
            format!("no enrolment token {id:?}"),
        )),
        EnrolmentTokenRevoked::AlreadyUsed => Err(ApiError::conflict(
            "enrolment-token-used",
            format!("enrolment token {id:?} was used; revoke the device instead"),
        )),
        EnrolmentTokenRevoked::AlreadyRevoked => Err(ApiError::conflict(
            "enrolment-token-revoked",
            format!("enrolment token {id:?} is already revoked"),
        )),
    }
}

fn refusal_error(refusal: EnrolmentRefusal) -> ApiError {
    match refusal {
        EnrolmentRefusal::Unknown => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "enrolment-token-invalid",
            "the enrolment token is not valid",
        ),
        EnrolmentRefusal::Expired => ApiError::new(
            StatusCode::GONE,
            "enrolment-token-expired",
            "the enrolment token has expired",
        ),
        EnrolmentRefusal::Used => ApiError::new(
            StatusCode::GONE,
            "enrolment-token-used",
            "the enrolment token was already used",
        ),
        EnrolmentRefusal::Revoked => ApiError::new(
            StatusCode::GONE,
            "enrolment-token-revoked",
            "the enrolment token was revoked",
        ),
        EnrolmentRefusal::WrongDevice => ApiError::new(
            StatusCode::FORBIDDEN,
            "enrolment-token-device-mismatch",
            "the enrolment token belongs to another device id",
        ),
    }
}

/// Reads the bounded JSON body of `POST /v1/enrol`.
async fn enrol_request(body: Body) -> Result<CsrEnrolRequest, ApiError> {
    let bytes = match axum::body::to_bytes(body, MAX_CSR_ENROL_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let too_large = error
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "message-too-large",
                    format!("an enrolment request is at most {MAX_CSR_ENROL_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request("malformed-message", "the request body could not be read")
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|error| ApiError::bad_request("malformed-message", error.to_string()))
}

/// `POST /v1/enrol` on the device endpoint (see the module docs).
pub async fn enrol_with_csr(
    State(state): State<DeviceEndpointState>,
    body: Body,
) -> Result<(StatusCode, Json<CsrEnrolResponse>), ApiError> {
    let request = enrol_request(body).await?;
    if request.token.is_empty() || request.token.len() > MAX_TOKEN_LEN {
        return Err(refusal_error(EnrolmentRefusal::Unknown));
    }
    let token_hash = token_sha256(&request.token);
    // Checked before any signing, so a caller without a valid token costs
    // one indexed read. The transaction below checks again.
    let token = state
        .store
        .enrolment_token_by_sha256(&token_hash)
        .await?
        .ok_or_else(|| refusal_error(EnrolmentRefusal::Unknown))?;
    EnrolmentRefusal::check(&token, &request.device_id, &clock::now_rfc3339())
        .map_err(refusal_error)?;
    let enrolment = state.enrolment.clone();
    let device_id = request.device_id.clone();
    let csr_pem = request.csr_pem;
    let pki = enrolment.pki.clone();
    let (certificate_pem, serial_hex) =
        tokio::task::spawn_blocking(move || pki.issue_for_csr(&device_id, &csr_pem))
            .await
            .map_err(|e| ApiError::internal("issuing a device certificate", &e))?
            .map_err(|error| match error {
                CsrError::Invalid(_) | CsrError::UnsupportedKey(_) => {
                    ApiError::bad_request("invalid-csr", error.to_string())
                }
                CsrError::Pki(error) => ApiError::internal("issuing a device certificate", &error),
            })?;
    let outcome = state
        .store
        .enrol_with_token(
            &token_hash,
            &request.device_id,
            &serial_hex,
            &clock::now_rfc3339(),
        )
        .await?;
    let hardware = match outcome {
        CsrEnrolOutcome::Enrolled { token_id, hardware } => {
            tracing::info!(device = %request.device_id, token = %token_id, "device enrolled with a CSR");
            hardware
        }
        CsrEnrolOutcome::Refused(refusal) => return Err(refusal_error(refusal)),
        CsrEnrolOutcome::DeviceExists => {
            return Err(ApiError::conflict(
                "device-exists",
                format!("device {} is already enrolled", request.device_id),
            ));
        }
    };
    Ok((
        StatusCode::CREATED,
        Json(CsrEnrolResponse {
            device_id: request.device_id,
            hardware,
            certificate_pem,
            ca_pem: enrolment.pki.ca_pem().to_owned(),
            trusted_signers: enrolment.trusted_signer_pems.as_ref().clone(),
            trusted_roots: enrolment.trusted_root_pems.as_ref().clone(),
            mqtt_url: enrolment.urls.mqtt_url.clone(),
            device_url: enrolment.urls.device_url.clone(),
        }),
    ))
}
