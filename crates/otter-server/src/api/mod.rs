//! The operator REST API (`/api/v1/...`): plain HTTP JSON, on the API
//! address (loopback by default), every route but `health` behind an
//! operator token, and `GET /metrics` (Prometheus text, no token; see
//! `crate::metrics`).
//!
//! Layout: this file holds the shared [`ApiState`], the router, token
//! authentication and the mapping of extractor rejections to JSON errors;
//! `devices`, `releases`, `deployments` and `audit` hold the handlers of
//! each resource. Only this module knows the JSON shapes of the API (they
//! are `otter_proto::api` types).

mod audit;
mod deployments;
mod devices;
mod releases;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Json, Query};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::blobs::BlobStore;
use crate::engine::EngineCommand;
use crate::error::ApiError;
use crate::pki::Pki;
use crate::store::{Operator, Store};

/// Where devices reach the server, as given to them at enrolment.
#[derive(Debug, Clone)]
pub struct PublicUrls {
    /// `mqtts://host:port`.
    pub mqtt_url: String,
    /// `https://host:port`.
    pub device_url: String,
}

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub blobs: BlobStore,
    pub pki: Arc<Pki>,
    pub trusted_signers: Arc<Vec<VerifyingKey>>,
    /// PEM of each trusted signer, handed to devices at enrolment.
    pub trusted_signer_pems: Arc<Vec<String>>,
    pub urls: PublicUrls,
    /// Folder for uploads in progress (same file system as the blobs).
    pub tmp_dir: PathBuf,
    pub max_upload_bytes: u64,
    /// Asks the engine to notify the devices of a new deployment (step 4).
    pub engine: mpsc::Sender<EngineCommand>,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", post(devices::enroll).get(devices::list))
        .route(
            "/api/v1/devices/batch",
            post(devices::enroll_batch).get(devices::show_batch),
        )
        .route("/api/v1/devices/{id}", get(devices::show))
        .route(
            "/api/v1/releases",
            post(releases::upload).get(releases::list),
        )
        .route("/api/v1/releases/{id}", get(releases::show))
        .route(
            "/api/v1/deployments",
            post(deployments::create).get(deployments::list),
        )
        .route("/api/v1/deployments/{id}", get(deployments::show))
        .route("/api/v1/audit", get(audit::list))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`: the server's counters as Prometheus text. Without a
/// token, like most exporters: the figures are counts and sizes, and the API
/// address is loopback by default.
async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("not-found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not accept that method",
    )
}

/// SHA-256 (hex) of an operator token: what the store keeps.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The operator who sent a request, authenticated by `Authorization: Bearer`.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Operator);

impl FromRequestParts<ApiState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(ApiError::unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|token| !token.is_empty() && token.len() <= 256)
            .ok_or_else(ApiError::unauthorized)?;
        match state
            .store
            .operator_by_token_sha256(&token_sha256(token))
            .await?
        {
            Some(operator) => Ok(Authenticated(operator)),
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// Maps a JSON body rejection to the API's error shape.
fn json_error(rejection: JsonRejection) -> ApiError {
    let message = rejection.body_text();
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::unprocessable("invalid-request", message),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            message,
        ),
        _ => ApiError::bad_request("invalid-json", message),
    }
}

/// Maps a query string rejection to the API's error shape.
fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid-query", rejection.body_text())
}

/// Unwraps a JSON body or answers with the API's error shape.
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(json_error)
}

/// Unwraps a query string or answers with the API's error shape.
fn query_params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(value)| value).map_err(query_error)
}
