//! Stored download links: creation (step 4), lookup on download and
//! revocation (step 6). Tokens and their MAC are in `crate::links`; a row
//! here adds what a token cannot carry: revocation.

use std::collections::HashMap;

use otter_proto::topics::DeviceId;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};

/// Links per `INSERT` statement (five parameters each).
const LINKS_PER_INSERT: usize = 500;
use crate::audit::{self, Actor, AuditEvent, AuditRecord};
use crate::links::{LinkId, StoredLink};

/// A link to store with [`Store::insert_links`].
#[derive(Debug, Clone)]
pub struct NewLink<'a> {
    pub link_id: LinkId,
    pub device_id: &'a DeviceId,
    pub expires_at: i64,
}

/// What serving a download needs of the link's release
/// ([`Store::link_for_download`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRelease {
    pub release_id: String,
    pub blob_key: String,
    pub artifact_sha256: String,
}

impl Store {
    /// The link with this id and what its download needs of the release
    /// (`None` if the deployment or release is gone), in one query: every
    /// download starts here, so it costs one read.
    pub async fn link_for_download(
        &self,
        link_id: &LinkId,
    ) -> Result<Option<(StoredLink, Option<DownloadRelease>)>, StoreError> {
        let row = sqlx::query(
            "SELECT l.id AS id, l.deployment_id AS deployment_id, l.device_id AS device_id, \
             l.expires_at AS expires_at, l.revoked_at AS revoked_at, \
             r.id AS release_id, r.blob_key AS blob_key, r.artifact_sha256 AS artifact_sha256 \
             FROM links l \
             LEFT JOIN deployments d ON d.id = l.deployment_id \
             LEFT JOIN releases r ON r.id = d.release_id \
             WHERE l.id = $1",
        )
        .bind(link_id.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let link = link_from_row(&row)?;
        let release_id: Option<String> = row.try_get("release_id")?;
        let blob_key: Option<String> = row.try_get("blob_key")?;
        let artifact_sha256: Option<String> = row.try_get("artifact_sha256")?;
        let release = match (release_id, blob_key, artifact_sha256) {
            (Some(release_id), Some(blob_key), Some(artifact_sha256)) => Some(DownloadRelease {
                release_id,
                blob_key,
                artifact_sha256,
            }),
            _ => None,
        };
        Ok(Some((link, release)))
    }

    /// Stores new links of `deployment_id` and their `link.created` audit
    /// rows, all in one transaction: a deployment's devices get their links
    /// in a few transactions rather than one each. A single link is a batch
    /// of one.
    pub async fn insert_links(
        &self,
        deployment_id: &str,
        links: &[NewLink<'_>],
        at: &str,
    ) -> Result<(), StoreError> {
        if links.is_empty() {
            return Ok(());
        }
        let actor = Actor::server();
        let mut transaction = self.begin_write().await?;
        // One multi-row statement per chunk: a batch of 500 links is two
        // statements, not 500 round trips to SQLite's worker.
        for chunk in links.chunks(LINKS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|row| {
                    let first = row * 5 + 1;
                    format!(
                        "(${}, ${}, ${}, ${}, ${})",
                        first,
                        first + 1,
                        first + 2,
                        first + 3,
                        first + 4
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO links (id, deployment_id, device_id, created_at, expires_at) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for link in chunk {
                query = query
                    .bind(link.link_id.to_hex())
                    .bind(deployment_id)
                    .bind(link.device_id.as_str())
                    .bind(at)
                    .bind(link.expires_at);
            }
            query.execute(&mut *transaction).await?;
        }
        let records: Vec<(&str, AuditRecord<'_>)> = links
            .iter()
            .map(|link| {
                let record = AuditRecord::new(&actor, AuditEvent::LinkCreated)
                    .device(link.device_id.as_str())
                    .deployment(deployment_id)
                    .details(serde_json::json!({
                        "link_id": link.link_id.to_hex(),
                        "expires_at": link.expires_at,
                    }));
                (at, record)
            })
            .collect();
        audit::append_all(&mut transaction, &records).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// For each of `device_ids`, its latest link for `deployment_id` that is
    /// neither revoked nor expiring before `valid_after` (Unix seconds), by
    /// device id; devices without one are absent. One query per batch.
    pub async fn usable_links(
        &self,
        deployment_id: &str,
        device_ids: &[&DeviceId],
        valid_after: i64,
    ) -> Result<HashMap<String, StoredLink>, StoreError> {
        let mut usable: HashMap<String, StoredLink> = HashMap::new();
        if device_ids.is_empty() {
            return Ok(usable);
        }
        let sql = format!(
            "SELECT id, deployment_id, device_id, expires_at, revoked_at FROM links \
             WHERE deployment_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND device_id IN ({})",
            super::placeholders(3, device_ids.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(deployment_id)
            .bind(valid_after);
        for device_id in device_ids {
            query = query.bind(device_id.as_str());
        }
        for row in query.fetch_all(&self.pool).await? {
            let link = link_from_row(&row)?;
            match usable.get(&link.device_id) {
                Some(kept) if kept.expires_at >= link.expires_at => {}
                _ => {
                    usable.insert(link.device_id.clone(), link);
                }
            }
        }
        Ok(usable)
    }

    /// The link with this id, or `None`.
    pub async fn link(&self, link_id: &LinkId) -> Result<Option<StoredLink>, StoreError> {
        let row = sqlx::query(
            "SELECT id, deployment_id, device_id, expires_at, revoked_at FROM links WHERE id = $1",
        )
        .bind(link_id.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(link_from_row).transpose()
    }

    /// Revokes every unrevoked link of `device_id` for `deployment_id`,
    /// auditing `link.revoked` when there was one. Returns how many.
    pub async fn revoke_links(
        &self,
        deployment_id: &str,
        device_id: &DeviceId,
        actor: &Actor,
        at: &str,
    ) -> Result<u64, StoreError> {
        let mut transaction = self.begin_write().await?;
        let revoked = revoke_in(&mut transaction, deployment_id, device_id, actor, at).await?;
        transaction.commit().await?;
        Ok(revoked)
    }
}

/// [`Store::revoke_links`] inside an open transaction.
pub(super) async fn revoke_in(
    connection: &mut super::WriteTransaction,
    deployment_id: &str,
    device_id: &DeviceId,
    actor: &Actor,
    at: &str,
) -> Result<u64, StoreError> {
    let revoked = sqlx::query(
        "UPDATE links SET revoked_at = $1 WHERE deployment_id = $2 AND device_id = $3 AND revoked_at IS NULL",
    )
    .bind(at)
    .bind(deployment_id)
    .bind(device_id.as_str())
    .execute(&mut **connection)
    .await?
    .rows_affected();
    if revoked > 0 {
        let record = AuditRecord::new(actor, AuditEvent::LinkRevoked)
            .device(device_id.as_str())
            .deployment(deployment_id)
            .details(serde_json::json!({ "links": revoked }));
        audit::append(connection, at, &record).await?;
    }
    Ok(revoked)
}

fn link_from_row(row: &AnyRow) -> Result<StoredLink, StoreError> {
    let id: String = row.try_get("id")?;
    let revoked_at: Option<String> = row.try_get("revoked_at")?;
    Ok(StoredLink {
        link_id: LinkId::from_hex(&id).ok_or_else(|| StoreError::corrupt("links.id", &id))?,
        deployment_id: row.try_get("deployment_id")?,
        device_id: row.try_get("device_id")?,
        expires_at: row.try_get("expires_at")?,
        revoked: revoked_at.is_some(),
    })
}
