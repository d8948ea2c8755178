//! Operator tokens over the API (admin only, see `ROUTES` in `api/mod.rs`):
//! `POST /api/v1/tokens` creates one and shows it once,
//! `GET /api/v1/tokens` lists names, roles and times (never a token or its
//! hash), `DELETE /api/v1/tokens/{name}` revokes one.
//!
//! A token is `otter_` and 32 random bytes in URL-safe base64 (the first
//! admin token too, [`new_token`]); the store keeps its SHA-256 only.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use otter_proto::api::{CreateToken, CreatedToken, TokenInfo};
use otter_proto::manifest::validate_name;

use super::{ApiState, Authenticated, json_body, token_sha256};
use crate::audit::Actor;
use crate::clock;
use crate::error::ApiError;
use crate::store::{NewToken, TokenCreated, TokenRevoked};

/// A fresh operator token: `otter_` and 32 random bytes, URL-safe base64.
pub fn new_token() -> String {
    let secret: [u8; 32] = rand::random();
    format!(
        "otter_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

pub(super) async fn create(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let request = json_body(body)?;
    validate_name(&request.name)
        .map_err(|e| ApiError::unprocessable("invalid-request", format!("token name: {e}")))?;
    let token = new_token();
    let created_at = clock::now_rfc3339();
    let outcome = state
        .store
        .create_operator_token(
            &NewToken {
                name: &request.name,
                token_sha256: &token_sha256(&token),
                role: request.role,
            },
            &Actor::operator(&operator.name),
            &created_at,
        )
        .await?;
    match outcome {
        TokenCreated::Created => {}
        TokenCreated::NameTaken => {
            return Err(ApiError::conflict(
                "token-exists",
                format!(
                    "a token named {:?} exists (names of revoked tokens stay taken)",
                    request.name
                ),
            ));
        }
    }
    tracing::info!(token = %request.name, role = %request.role, operator = %operator.name, "operator token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name: request.name,
            role: request.role,
            token,
            created_at,
        }),
    ))
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(state.store.operator_tokens().await?))
}

pub(super) async fn revoke(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    Path(name): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let outcome = state
        .store
        .revoke_operator_token(
            &name,
            &Actor::operator(&operator.name),
            &clock::now_rfc3339(),
        )
        .await?;
    match outcome {
        TokenRevoked::Revoked(info) => {
            tracing::info!(token = %name, operator = %operator.name, "operator token revoked");
            Ok(Json(info))
        }
        TokenRevoked::Unknown => Err(ApiError::not_found(
            "unknown-token",
            format!("no token named {name:?}"),
        )),
        TokenRevoked::AlreadyRevoked => Err(ApiError::conflict(
            "token-revoked",
            format!("token {name:?} is already revoked"),
        )),
        TokenRevoked::LastAdmin => Err(ApiError::conflict(
            "last-admin",
            format!(
                "token {name:?} is the last active admin token; create another admin token first"
            ),
        )),
    }
}
