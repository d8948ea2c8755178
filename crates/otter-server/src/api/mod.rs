//! The operator REST API (`/api/v1/...`): plain HTTP JSON, on the API
//! address (loopback by default), every route but `health` behind an
//! operator token, and `GET /metrics` (Prometheus text, no token; see
//! `crate::metrics`).
//!
//! Authorisation lives in one place: the route table ([`routes`]) gives
//! every route its method, path, handler and [`Access`], and [`router`]
//! builds the router from that table only, wrapping each handler in
//! [`authorize`]. That guard runs before the handler and its extractors, so
//! a refused request (401: no, unknown or revoked token; 403: a role too
//! weak) reads no body and changes nothing. Handlers get the operator from
//! the [`Authenticated`] extractor, which only the guard can satisfy: a
//! handler mounted outside the table that asks for an operator answers 401
//! to everyone rather than running unchecked. [`route_table`] lets tests
//! walk every route.
//!
//! Layout: this file holds the shared [`ApiState`], the route table, the
//! guard and the mapping of extractor rejections to JSON errors; `devices`,
//! `releases`, `deployments`, `audit`, `tokens` and `enrolment` (one-time
//! enrolment tokens, and the device endpoint's `POST /v1/enrol`) hold the
//! handlers of each resource (`signers`: the signer revocation list). Only
//! this module knows the JSON shapes of the API (they
//! are `otter_proto::api` types).

mod audit;
mod deployments;
mod devices;
pub mod enrolment;
mod releases;
mod signers;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Json, Query, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter};
use ed25519_dalek::VerifyingKey;
use otter_proto::api::Role;
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

/// The signer trust store, shared; replaced revocation lists are applied
/// in place once stored.
pub type SignerTrust = Arc<std::sync::RwLock<otter_package::trust::TrustStore>>;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// Seals each uploaded release's data key before it is stored.
    pub vault: crate::vault::KeyVault,
    pub store: Store,
    pub blobs: BlobStore,
    pub pki: Arc<Pki>,
    pub trusted_signers: Arc<Vec<VerifyingKey>>,
    /// PEM of each trusted signer, handed to devices at enrolment.
    pub trusted_signer_pems: Arc<Vec<String>>,
    /// PEM of each trusted offline root, handed to devices at enrolment.
    pub trusted_root_pems: Arc<Vec<String>>,
    /// Roots, direct signers and the revocation list in force: what uploads
    /// and new deployments are checked against.
    pub signer_trust: SignerTrust,
    pub urls: PublicUrls,
    /// Folder for uploads in progress (same file system as the blobs).
    pub tmp_dir: PathBuf,
    pub max_upload_bytes: u64,
    /// Asks the engine to notify the devices of a new deployment (step 4).
    pub engine: mpsc::Sender<EngineCommand>,
    /// Revoked certificate serials, shared with the broker and the device
    /// endpoint; a revocation is added here once committed.
    pub revocations: crate::revocation::Revocations,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Public,
    /// An active operator token whose role includes this one.
    Role(Role),
}

/// The HTTP methods of the API's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMethod {
    Get,
    Post,
    Put,
    Delete,
}

impl RouteMethod {
    pub fn as_method(self) -> Method {
        match self {
            RouteMethod::Get => Method::GET,
            RouteMethod::Post => Method::POST,
            RouteMethod::Put => Method::PUT,
            RouteMethod::Delete => Method::DELETE,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            RouteMethod::Get => MethodFilter::GET,
            RouteMethod::Post => MethodFilter::POST,
            RouteMethod::Put => MethodFilter::PUT,
            RouteMethod::Delete => MethodFilter::DELETE,
        }
    }
}

/// One row of the route table, without its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: RouteMethod,
    /// axum path syntax: `{id}` is a path parameter.
    pub path: &'static str,
    pub access: Access,
}

/// One row of the route table.
struct ApiRoute {
    spec: RouteSpec,
    handler: MethodRouter<ApiState>,
}

fn route<H, T>(method: RouteMethod, path: &'static str, access: Access, handler: H) -> ApiRoute
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    ApiRoute {
        spec: RouteSpec {
            method,
            path,
            access,
        },
        handler: axum::routing::on(method.filter(), handler),
    }
}

/// The route table: every route of the API and who may call it. A viewer
/// reads; an operator also uploads releases, enrols devices and creates
/// deployments; an admin also manages tokens. A new route is a new row
/// here, or it is not served.
fn routes() -> Vec<ApiRoute> {
    use RouteMethod::{Delete, Get, Post, Put};
    const PUBLIC: Access = Access::Public;
    const VIEWER: Access = Access::Role(Role::Viewer);
    const OPERATOR: Access = Access::Role(Role::Operator);
    const ADMIN: Access = Access::Role(Role::Admin);
    vec![
        route(Get, "/api/v1/health", PUBLIC, health),
        route(Get, "/metrics", PUBLIC, metrics),
        route(Get, "/api/v1/devices", VIEWER, devices::list),
        route(Post, "/api/v1/devices", OPERATOR, devices::enroll),
        route(Get, "/api/v1/devices/batch", VIEWER, devices::show_batch),
        route(
            Post,
            "/api/v1/devices/batch",
            OPERATOR,
            devices::enroll_batch,
        ),
        route(Post, "/api/v1/devices/import", OPERATOR, devices::import),
        route(Get, "/api/v1/devices/{id}", VIEWER, devices::show),
        route(
            Post,
            "/api/v1/devices/{id}/revoke",
            OPERATOR,
            devices::revoke,
        ),
        route(Get, "/api/v1/enrolment-tokens", VIEWER, enrolment::list),
        route(
            Post,
            "/api/v1/enrolment-tokens",
            OPERATOR,
            enrolment::create,
        ),
        route(
            Delete,
            "/api/v1/enrolment-tokens/{id}",
            OPERATOR,
            enrolment::revoke,
        ),
        route(Get, "/api/v1/releases", VIEWER, releases::list),
        route(Post, "/api/v1/releases", OPERATOR, releases::upload),
        route(Get, "/api/v1/releases/{id}", VIEWER, releases::show),
        route(Get, "/api/v1/deployments", VIEWER, deployments::list),
        route(Post, "/api/v1/deployments", OPERATOR, deployments::create),
        route(Get, "/api/v1/deployments/{id}", VIEWER, deployments::show),
        route(Get, "/api/v1/audit", VIEWER, audit::list),
        route(Get, "/api/v1/audit/verify", VIEWER, audit::verify),
        route(Get, "/api/v1/tokens", ADMIN, tokens::list),
        route(Post, "/api/v1/tokens", ADMIN, tokens::create),
        route(Delete, "/api/v1/tokens/{name}", ADMIN, tokens::revoke),
        route(
            Get,
            "/api/v1/signer-revocations",
            VIEWER,
            signers::show_revocations,
        ),
        route(
            Put,
            "/api/v1/signer-revocations",
            ADMIN,
            signers::publish_revocations,
        ),
    ]
}

/// Method, path and access of every route, in table order (for tests and
/// documentation).
pub fn route_table() -> Vec<RouteSpec> {
    routes().into_iter().map(|route| route.spec).collect()
}

/// The API's routes, built from the route table only.
pub fn router(state: ApiState) -> Router {
    let mut router = Router::new();
    for ApiRoute { spec, handler } in routes() {
        let handler = match spec.access {
            Access::Public => handler,
            Access::Role(required) => handler.route_layer(middleware::from_fn_with_state(
                Guard {
                    state: state.clone(),
                    required,
                },
                authorize,
            )),
        };
        router = router.route(spec.path, handler);
    }
    router
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

/// What [`authorize`] needs for one route.
#[derive(Clone)]
struct Guard {
    state: ApiState,
    required: Role,
}

/// The guard of every route that needs a token (see the module docs):
/// authenticates `Authorization: Bearer`, checks the role, and hands the
/// operator to the handler as [`Authenticated`].
async fn authorize(
    State(guard): State<Guard>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let operator = authenticate(&guard.state, request.headers()).await?;
    if !operator.role.includes(guard.required) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has the role {}; {} {} needs {}",
                operator.name,
                operator.role,
                request.method(),
                request.uri().path(),
                guard.required
            ),
        ));
    }
    request.extensions_mut().insert(Authenticated(operator));
    Ok(next.run(request).await)
}

/// The operator holding the request's bearer token, if it is active.
async fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Operator, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(ApiError::unauthorized)?;
    let token = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty() && token.len() <= 256)
        .ok_or_else(ApiError::unauthorized)?;
    state
        .store
        .operator_by_token_sha256(&token_sha256(token))
        .await?
        .ok_or_else(ApiError::unauthorized)
}

/// The operator who sent a request, as [`authorize`] found it.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Operator);

impl FromRequestParts<ApiState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &ApiState) -> Result<Self, ApiError> {
        // Absent only on a route mounted outside the route table: refuse
        // rather than run a handler nobody authorised.
        parts
            .extensions
            .get::<Authenticated>()
            .cloned()
            .ok_or_else(|| {
                tracing::error!(
                    path = parts.uri.path(),
                    "route without a guard asks for an operator"
                );
                ApiError::unauthorized()
            })
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
