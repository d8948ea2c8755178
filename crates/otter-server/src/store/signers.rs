//! Signer revocation lists published by operators: every list is kept (the
//! audit names each by sequence), the highest sequence is in force.
//! Publishing writes its `signer-revocations.published` audit row in the
//! same transaction and refuses a list that is not newer than the current
//! one, checked inside that transaction.

use otter_proto::trust::SignedRevocationList;
use sqlx::Row;

use super::{Store, StoreError};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// Result of [`Store::publish_signer_revocations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationsPublished {
    Published,
    /// The stored list has this sequence, greater or equal; nothing stored.
    NotNewer {
        current: u64,
    },
}

impl Store {
    /// Stores a verified revocation list if its `sequence` is greater than
    /// the stored one's. `revoked` (the key ids) only goes to the audit row.
    pub async fn publish_signer_revocations(
        &self,
        signed: &SignedRevocationList,
        sequence: u64,
        revoked: &[String],
        actor: &Actor,
    ) -> Result<RevocationsPublished, StoreError> {
        let sequence_column = i64::try_from(sequence)
            .map_err(|e| StoreError::corrupt("signer_revocations.sequence", e))?;
        let mut transaction = self.begin_write().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT MAX(sequence) FROM signer_revocations")
                .fetch_one(&mut *transaction)
                .await?;
        if let Some(current) = current
            && current >= sequence_column
        {
            return Ok(RevocationsPublished::NotNewer {
                current: u64::try_from(current).unwrap_or(0),
            });
        }
        let now = crate::clock::now_rfc3339();
        sqlx::query(
            "INSERT INTO signer_revocations \
             (sequence, root, list_json, signature, published_at, published_by) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(sequence_column)
        .bind(signed.root.as_str())
        .bind(signed.list.as_str())
        .bind(signed.signature.as_str())
        .bind(now.as_str())
        .bind(actor.name.as_str())
        .execute(&mut *transaction)
        .await?;
        let record = AuditRecord::new(actor, AuditEvent::SignerRevocationsPublished).details(
            serde_json::json!({
                "sequence": sequence,
                "root": signed.root,
                "revoked": revoked,
            }),
        );
        audit::append(&mut transaction, &now, &record).await?;
        transaction.commit().await?;
        Ok(RevocationsPublished::Published)
    }

    /// The revocation list in force (highest sequence), if any was published.
    pub async fn signer_revocations(&self) -> Result<Option<SignedRevocationList>, StoreError> {
        let row = sqlx::query(
            "SELECT root, list_json, signature FROM signer_revocations \
             ORDER BY sequence DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(SignedRevocationList {
                list: row.try_get("list_json")?,
                root: row.try_get("root")?,
                signature: row.try_get("signature")?,
            })
        })
        .transpose()
    }
}
