//! Push transfers (push mode, step 6 over MQTT): the acknowledged offset
//! and the bytes sent of each (deployment, device), kept so that a server
//! restart continues counting and the audit can show what a resume saved.

use otter_proto::topics::DeviceId;
use sqlx::Row;

use super::{Store, StoreError};
use crate::audit::{self, AuditRecord};

/// How far the push of one artifact to one device got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushProgress {
    /// Bytes the device acknowledged as durably written.
    pub acked_offset: u64,
    /// Bytes the server published, resends included.
    pub bytes_sent: u64,
}

impl Store {
    /// The stored progress, or `None` before the first acknowledgement.
    pub async fn push_progress(
        &self,
        deployment_id: &str,
        device_id: &DeviceId,
    ) -> Result<Option<PushProgress>, StoreError> {
        let row = sqlx::query(
            "SELECT acked_offset, bytes_sent FROM push_transfers \
             WHERE deployment_id = $1 AND device_id = $2",
        )
        .bind(deployment_id)
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let count = |column: &'static str, label: &'static str| -> Result<u64, StoreError> {
            let value: i64 = row.try_get(column)?;
            u64::try_from(value).map_err(|e| StoreError::corrupt(label, e))
        };
        Ok(Some(PushProgress {
            acked_offset: count("acked_offset", "push_transfers.acked_offset")?,
            bytes_sent: count("bytes_sent", "push_transfers.bytes_sent")?,
        }))
    }

    /// Stores the progress, with an audit row (e.g. `push.completed`) in the
    /// same transaction when given.
    pub async fn save_push_progress(
        &self,
        deployment_id: &str,
        device_id: &DeviceId,
        progress: &PushProgress,
        record: Option<&AuditRecord<'_>>,
        at: &str,
    ) -> Result<(), StoreError> {
        let as_integer = |column: &'static str, value: u64| {
            i64::try_from(value).map_err(|e| StoreError::corrupt(column, e))
        };
        let acked_offset = as_integer("push_transfers.acked_offset", progress.acked_offset)?;
        let bytes_sent = as_integer("push_transfers.bytes_sent", progress.bytes_sent)?;
        let mut transaction = self.begin_write().await?;
        // `ON CONFLICT ... DO UPDATE` is the upsert both SQLite (3.24+) and
        // PostgreSQL understand.
        sqlx::query(
            "INSERT INTO push_transfers (deployment_id, device_id, acked_offset, bytes_sent, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (deployment_id, device_id) DO UPDATE SET \
             acked_offset = excluded.acked_offset, bytes_sent = excluded.bytes_sent, updated_at = excluded.updated_at",
        )
        .bind(deployment_id)
        .bind(device_id.as_str())
        .bind(acked_offset)
        .bind(bytes_sent)
        .bind(at)
        .execute(&mut *transaction)
        .await?;
        if let Some(record) = record {
            audit::append(&mut transaction, at, record).await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}
