//! `GET|PUT /api/v1/signer-revocations`: the signer revocation list in
//! force, signed offline by a trusted root (`otter keys revoke`).
//!
//! A published list is checked against the pinned roots (signature, fields)
//! and must have a greater sequence than the stored one (409 otherwise, in
//! the store's transaction); once stored it is applied to the shared trust
//! store, so uploads and deployments of releases by a revoked signer are
//! refused from then on, and it travels to devices with every update offer.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, State};
use otter_package::PackageError;
use otter_proto::trust::{RevocationListInfo, SignedRevocationList};

use super::{ApiState, Authenticated, json_body};
use crate::audit::Actor;
use crate::error::ApiError;
use crate::store::RevocationsPublished;

pub(super) async fn show_revocations(
    State(state): State<ApiState>,
) -> Result<Json<SignedRevocationList>, ApiError> {
    state
        .store
        .signer_revocations()
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no-revocations", "no revocation list was published"))
}

pub(super) async fn publish_revocations(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    body: Result<Json<SignedRevocationList>, JsonRejection>,
) -> Result<Json<RevocationListInfo>, ApiError> {
    let signed = json_body(body)?;
    let list = {
        let trust = state
            .signer_trust
            .read()
            .map_err(|_| ApiError::internal("reading the signer trust", &"lock poisoned"))?;
        trust.check_revocation_list(&signed)
    }
    .map_err(|error| match error {
        PackageError::UntrustedRoot => ApiError::unprocessable(
            "untrusted-root",
            "the revocation list is not signed by a trusted root (--trusted-root)",
        ),
        other => ApiError::unprocessable("invalid-revocation-list", other.to_string()),
    })?;
    let revoked: Vec<String> = list
        .revoked
        .iter()
        .map(|entry| entry.key_id.clone())
        .collect();
    match state
        .store
        .publish_signer_revocations(
            &signed,
            list.sequence,
            &revoked,
            &Actor::operator(&operator.name),
        )
        .await?
    {
        RevocationsPublished::Published => {}
        RevocationsPublished::NotNewer { current } => {
            return Err(ApiError::conflict(
                "stale-revocation-list",
                format!(
                    "revocation list sequence {} is not newer than the current {current}",
                    list.sequence
                ),
            ));
        }
    }
    {
        let mut trust = state
            .signer_trust
            .write()
            .map_err(|_| ApiError::internal("updating the signer trust", &"lock poisoned"))?;
        // Stored first, so the store's order decides: a concurrent older
        // list that got here second is refused by the trust store as stale.
        if let Err(error) = trust.apply_revocation_list(&signed) {
            tracing::warn!(%error, "revocation list stored but not applied in memory");
        }
    }
    tracing::info!(
        sequence = list.sequence,
        revoked = revoked.len(),
        operator = %operator.name,
        "signer revocation list published"
    );
    Ok(Json(RevocationListInfo {
        sequence: list.sequence,
        root: signed.root,
        revoked,
    }))
}
