//! `GET /api/v1/audit`: the audit log, filtered by device and deployment,
//! paged by sequence number. `GET /api/v1/audit/verify`: the audit hash
//! chain checked from its first row (`crate::audit::verify`); a broken chain
//! is a result (`200`, `intact: false`), not an error.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Json, Query, State};
use otter_proto::api::{AuditEntry, AuditVerification};
use serde::Deserialize;

use super::{ApiState, Authenticated, query_params};
use crate::error::ApiError;
use crate::store::AuditFilter;

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 1000;
/// Most rows per page.
pub const MAX_LIMIT: i64 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    device: Option<String>,
    deployment: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let query = query_params(query)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid-query",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let filter = AuditFilter {
        device_id: query.device,
        deployment_id: query.deployment,
        after: query.after,
        limit,
    };
    Ok(Json(state.store.audit_entries(&filter).await?))
}

pub(super) async fn verify(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<AuditVerification>, ApiError> {
    Ok(Json(state.store.verify_audit().await?))
}
