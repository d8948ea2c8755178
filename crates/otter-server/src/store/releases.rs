//! Releases: verified packages whose artifact is in the blob store and
//! whose signed manifest and data key are here.

use otter_proto::api::ReleaseInfo;
use otter_proto::manifest::{PackageKind, SignedManifest};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, is_unique_violation, json_column};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// A release to store, taken from a verified package.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub info: ReleaseInfo,
    pub artifact_sha256: String,
    /// Base64 of the 32-byte data key.
    pub data_key: String,
    pub blob_key: String,
}

/// A stored release with what only the server sees.
#[derive(Debug, Clone)]
pub struct StoredRelease {
    pub info: ReleaseInfo,
    pub artifact_sha256: String,
    pub data_key: String,
    pub blob_key: String,
}

/// Result of [`Store::insert_release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseInsertOutcome {
    Inserted,
    AlreadyExists,
}

const RELEASE_COLUMNS: &str = "id, name, version, kind, hardware, manifest_json, manifest_signer, \
    manifest_signature, data_key, payload_size, payload_sha256, artifact_size, artifact_sha256, \
    blob_key, uploaded_at, uploaded_by, manifest_signer_certificate";

impl Store {
    /// Whether a release id is taken.
    pub async fn release_exists(&self, release_id: &str) -> Result<bool, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM releases WHERE id = $1")
            .bind(release_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(count > 0)
    }

    /// Whether any release uses a blob.
    pub async fn blob_in_use(&self, blob_key: &str) -> Result<bool, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM releases WHERE blob_key = $1")
            .bind(blob_key)
            .fetch_one(&self.pool)
            .await?;
        Ok(count > 0)
    }

    /// Stores a release and its `release.uploaded` audit row.
    pub async fn insert_release(
        &self,
        release: &NewRelease,
        actor: &Actor,
    ) -> Result<ReleaseInsertOutcome, StoreError> {
        let info = &release.info;
        let hardware = serde_json::to_string(&info.hardware)
            .map_err(|e| StoreError::corrupt("releases.hardware", e))?;
        let certificate_json = info
            .manifest
            .signer_certificate
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::corrupt("releases.manifest_signer_certificate", e))?;
        let mut transaction = self.begin_write().await?;
        let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        )))
        .bind(info.id.as_str())
        .bind(info.name.as_str())
        .bind(info.version.to_string())
        .bind(info.kind.as_str())
        .bind(hardware)
        .bind(info.manifest.manifest.as_str())
        .bind(info.manifest.signer.as_str())
        .bind(info.manifest.signature.as_str())
        .bind(release.data_key.as_str())
        .bind(to_i64(info.payload_size))
        .bind(info.payload_sha256.as_str())
        .bind(to_i64(info.artifact_size))
        .bind(release.artifact_sha256.as_str())
        .bind(release.blob_key.as_str())
        .bind(info.uploaded_at.as_str())
        .bind(info.uploaded_by.as_str())
        .bind(certificate_json)
        .execute(&mut *transaction)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                return Ok(ReleaseInsertOutcome::AlreadyExists);
            }
            Err(error) => return Err(error.into()),
        }
        let record =
            AuditRecord::new(actor, AuditEvent::ReleaseUploaded).details(serde_json::json!({
                "release": info.id,
                "kind": info.kind.as_str(),
                "hardware": info.hardware,
                "artifact_size": info.artifact_size,
                "artifact_sha256": release.artifact_sha256,
                "payload_sha256": info.payload_sha256,
                "signer": info.manifest.signer,
            }));
        audit::append(&mut transaction, &info.uploaded_at, &record).await?;
        transaction.commit().await?;
        Ok(ReleaseInsertOutcome::Inserted)
    }

    /// One release, or `None`.
    pub async fn release(&self, release_id: &str) -> Result<Option<StoredRelease>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE id = $1"
        )))
        .bind(release_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// All releases, newest upload first.
    pub async fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RELEASE_COLUMNS} FROM releases ORDER BY uploaded_at DESC, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| release_from_row(row).map(|stored| stored.info))
            .collect()
    }
}

/// Sizes are below 2^63 (the manifest caps them at 64 GiB).
fn to_i64(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

fn to_u64(column: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|e| StoreError::corrupt(column, e))
}

fn release_from_row(row: &AnyRow) -> Result<StoredRelease, StoreError> {
    let version: String = row.try_get("version")?;
    let kind: String = row.try_get("kind")?;
    let hardware: String = row.try_get("hardware")?;
    let info = ReleaseInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        version: semver::Version::parse(&version)
            .map_err(|e| StoreError::corrupt("releases.version", e))?,
        kind: kind
            .parse::<PackageKind>()
            .map_err(|e| StoreError::corrupt("releases.kind", e))?,
        hardware: json_column("releases.hardware", &hardware)?,
        payload_size: to_u64("releases.payload_size", row.try_get("payload_size")?)?,
        artifact_size: to_u64("releases.artifact_size", row.try_get("artifact_size")?)?,
        payload_sha256: row.try_get("payload_sha256")?,
        manifest: SignedManifest {
            manifest: row.try_get("manifest_json")?,
            signer: row.try_get("manifest_signer")?,
            signature: row.try_get("manifest_signature")?,
            signer_certificate: row
                .try_get::<Option<String>, _>("manifest_signer_certificate")?
                .map(|json| serde_json::from_str(&json).map(Box::new))
                .transpose()
                .map_err(|e| StoreError::corrupt("releases.manifest_signer_certificate", e))?,
        },
        uploaded_at: row.try_get("uploaded_at")?,
        uploaded_by: row.try_get("uploaded_by")?,
    };
    Ok(StoredRelease {
        info,
        artifact_sha256: row.try_get("artifact_sha256")?,
        data_key: row.try_get("data_key")?,
        blob_key: row.try_get("blob_key")?,
    })
}

/// What [`Store::release_of_deployment`] reads: the release and what the
/// deployment adds to every notification of it.
#[derive(Debug, Clone)]
pub struct DeploymentRelease {
    pub release: StoredRelease,
    /// The deployment allows a downgrade (`deployments.allow_downgrade`).
    pub allow_downgrade: bool,
}

impl Store {
    /// The release a deployment delivers, or `None` for an unknown deployment.
    pub async fn release_of_deployment(
        &self,
        deployment_id: &str,
    ) -> Result<Option<DeploymentRelease>, StoreError> {
        let row = sqlx::query("SELECT release_id, allow_downgrade FROM deployments WHERE id = $1")
            .bind(deployment_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let release_id: String = row.try_get("release_id")?;
        let allow_downgrade = row.try_get::<i64, _>("allow_downgrade")? != 0;
        Ok(self
            .release(&release_id)
            .await?
            .map(|release| DeploymentRelease {
                release,
                allow_downgrade,
            }))
    }
}

impl Store {
    /// Seals every data key still stored in clear (rows written before
    /// `data-key.secret` existed) under `vault`, in one transaction; returns
    /// how many were sealed. Run at start, before anything reads a key.
    pub async fn seal_plaintext_data_keys(
        &self,
        vault: &crate::vault::KeyVault,
    ) -> Result<usize, StoreError> {
        let mut transaction = self.begin_write().await?;
        let rows = sqlx::query("SELECT id, data_key FROM releases WHERE data_key NOT LIKE 'v1:%'")
            .fetch_all(&mut *transaction)
            .await?;
        for row in &rows {
            let id: String = row.try_get("id")?;
            let stored: String = row.try_get("data_key")?;
            let key = otter_package::DataKey::from_base64(&stored)
                .map_err(|e| StoreError::corrupt("releases.data_key", e))?;
            sqlx::query("UPDATE releases SET data_key = $1 WHERE id = $2")
                .bind(vault.seal(&id, &key))
                .bind(id.as_str())
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(rows.len())
    }
}
