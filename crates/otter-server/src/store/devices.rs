//! Devices and their tags: enrolment (step 0), registration (step 1) and
//! last-seen times.

use std::collections::{BTreeMap, HashMap};

use otter_proto::api::DeviceInfo;
use otter_proto::messages::{Mode, Registration};
use otter_proto::topics::DeviceId;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, is_unique_violation, json_column};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// A device to enrol.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub device_id: DeviceId,
    pub hardware: String,
    pub tags: Vec<String>,
    /// Serial number (hex) of the certificate issued at enrolment.
    pub cert_serial: String,
}

/// Result of [`Store::enroll_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollOutcome {
    Enrolled,
    AlreadyExists,
}

const DEVICE_COLUMNS: &str = "id, hardware, enrolled_at, mode, agent_version, installed, capabilities, registered_at, last_seen";

impl Store {
    /// Whether a device is enrolled.
    pub async fn device_exists(&self, device_id: &DeviceId) -> Result<bool, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE id = $1")
            .bind(device_id.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(count > 0)
    }

    /// Stores a new device, its tags and the `device.enrolled` audit row.
    pub async fn enroll_device(
        &self,
        device: &NewDevice,
        actor: &Actor,
        at: &str,
    ) -> Result<EnrollOutcome, StoreError> {
        let mut transaction = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO devices (id, hardware, enrolled_at, cert_serial) VALUES ($1, $2, $3, $4)",
        )
        .bind(device.device_id.as_str())
        .bind(device.hardware.as_str())
        .bind(at)
        .bind(device.cert_serial.as_str())
        .execute(&mut *transaction)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Ok(EnrollOutcome::AlreadyExists),
            Err(error) => return Err(error.into()),
        }
        let mut tags = device.tags.clone();
        tags.sort();
        tags.dedup();
        for tag in &tags {
            sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2)")
                .bind(device.device_id.as_str())
                .bind(tag.as_str())
                .execute(&mut *transaction)
                .await?;
        }
        let record = AuditRecord::new(actor, AuditEvent::DeviceEnrolled)
            .device(device.device_id.as_str())
            .details(serde_json::json!({
                "hardware": device.hardware,
                "tags": tags,
                "certificate_serial": device.cert_serial,
            }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        Ok(EnrollOutcome::Enrolled)
    }

    /// One device, or `None` if unknown.
    pub async fn device(&self, device_id: &DeviceId) -> Result<Option<DeviceInfo>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"
        )))
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let tags: Vec<String> =
            sqlx::query_scalar("SELECT tag FROM device_tags WHERE device_id = $1 ORDER BY tag")
                .bind(device_id.as_str())
                .fetch_all(&self.pool)
                .await?;
        Ok(Some(device_from_row(&row, tags)?))
    }

    /// All devices, or those carrying `tag`, by id.
    pub async fn devices(&self, tag: Option<&str>) -> Result<Vec<DeviceInfo>, StoreError> {
        let rows = match tag {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"
                )))
                .fetch_all(&self.pool)
                .await?
            }
            Some(tag) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices \
                     WHERE id IN (SELECT device_id FROM device_tags WHERE tag = $1) ORDER BY id"
                )))
                .bind(tag)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let tag_rows =
            sqlx::query("SELECT device_id, tag FROM device_tags ORDER BY device_id, tag")
                .fetch_all(&self.pool)
                .await?;
        let mut tags_by_device: HashMap<String, Vec<String>> = HashMap::new();
        for row in &tag_rows {
            tags_by_device
                .entry(row.try_get("device_id")?)
                .or_default()
                .push(row.try_get("tag")?);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let tags = tags_by_device.remove(&id).unwrap_or_default();
                device_from_row(row, tags)
            })
            .collect()
    }

    /// Records a registration (step 1) and its audit row. Returns false,
    /// changing nothing, when the device is not enrolled.
    pub async fn record_registration(
        &self,
        device_id: &DeviceId,
        registration: &Registration,
        at: &str,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let installed = serde_json::to_string(&registration.installed)
            .map_err(|e| StoreError::corrupt("devices.installed", e))?;
        let capabilities = serde_json::to_string(&registration.capabilities)
            .map_err(|e| StoreError::corrupt("devices.capabilities", e))?;
        let updated = sqlx::query(
            "UPDATE devices SET hardware = $1, mode = $2, agent_version = $3, installed = $4, \
             capabilities = $5, registered_at = $6, last_seen = $6 WHERE id = $7",
        )
        .bind(registration.hardware.as_str())
        .bind(registration.mode.as_str())
        .bind(registration.agent_version.as_str())
        .bind(installed)
        .bind(capabilities)
        .bind(at)
        .bind(device_id.as_str())
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        let actor = Actor::device(device_id);
        let record = AuditRecord::new(&actor, AuditEvent::DeviceRegistered)
            .device(device_id.as_str())
            .details(serde_json::json!({
                "hardware": registration.hardware,
                "mode": registration.mode.as_str(),
                "agent_version": registration.agent_version,
                "installed": registration.installed,
                "capabilities": registration.capabilities,
            }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Updates the time of the last sign of life of a device.
    pub async fn touch_device(&self, device_id: &DeviceId, at: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE devices SET last_seen = $1 WHERE id = $2")
            .bind(at)
            .bind(device_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn device_from_row(row: &AnyRow, tags: Vec<String>) -> Result<DeviceInfo, StoreError> {
    let id: String = row.try_get("id")?;
    let mode: Option<String> = row.try_get("mode")?;
    let installed: String = row.try_get("installed")?;
    let capabilities: String = row.try_get("capabilities")?;
    Ok(DeviceInfo {
        device_id: DeviceId::parse(&id).map_err(|e| StoreError::corrupt("devices.id", e))?,
        hardware: row.try_get("hardware")?,
        tags,
        mode: mode
            .map(|m| m.parse::<Mode>())
            .transpose()
            .map_err(|e| StoreError::corrupt("devices.mode", e))?,
        agent_version: row.try_get("agent_version")?,
        installed: json_column::<BTreeMap<String, semver::Version>>(
            "devices.installed",
            &installed,
        )?,
        capabilities: json_column("devices.capabilities", &capabilities)?,
        enrolled_at: row.try_get("enrolled_at")?,
        registered_at: row.try_get("registered_at")?,
        last_seen: row.try_get("last_seen")?,
        registered_via: None,
    })
}
