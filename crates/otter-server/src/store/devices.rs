//! Devices and their tags: enrolment (step 0), registration (step 1, over
//! MQTT or by poll, with the first channel kept) and last-seen times.

use std::collections::{BTreeMap, HashMap};

use otter_proto::api::{Channel, DeviceInfo};
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

/// Result of [`Store::enroll_devices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnrollOutcome {
    Enrolled,
    /// This device is already enrolled; nothing was stored.
    AlreadyExists(DeviceId),
}

/// Result of [`Store::record_registration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationOutcome {
    /// Stored and audited.
    Recorded,
    /// A poll's registration equal to the stored one: at most `last_seen`
    /// was refreshed, nothing audited.
    Unchanged,
    /// The device is not enrolled; nothing changed.
    UnknownDevice,
}

const DEVICE_COLUMNS: &str = "id, hardware, enrolled_at, mode, agent_version, installed, capabilities, registered_at, last_seen, registered_via, \
     (SELECT MAX(r.revoked_at) FROM revoked_certificates r WHERE r.serial = devices.cert_serial) AS revoked_at";

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
        let outcome = insert_device(&mut transaction, device, actor, at).await?;
        if outcome == EnrollOutcome::Enrolled {
            transaction.commit().await?;
        }
        Ok(outcome)
    }

    /// Stores many new devices in one transaction, each with its tags and
    /// its own `device.enrolled` audit row (as [`Store::enroll_device`]
    /// writes, so the audit reads the same whichever way a device came).
    /// If any id is already enrolled nothing is stored and that id is
    /// returned.
    pub async fn enroll_devices(
        &self,
        devices: &[NewDevice],
        actor: &Actor,
        at: &str,
    ) -> Result<BatchEnrollOutcome, StoreError> {
        let mut transaction = self.begin_write().await?;
        for device in devices {
            if insert_device(&mut transaction, device, actor, at).await?
                == EnrollOutcome::AlreadyExists
            {
                // Dropping the transaction rolls every insert back.
                return Ok(BatchEnrollOutcome::AlreadyExists(device.device_id.clone()));
            }
        }
        transaction.commit().await?;
        Ok(BatchEnrollOutcome::Enrolled)
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

    /// Records a registration (step 1) that arrived `via` a channel, in one
    /// transaction with its `device.registered` audit row (details carry
    /// `via`). The first channel a device registers on is kept in
    /// `registered_via`. A registration's encryption key (checked by the
    /// caller) replaces the one on record, audited
    /// `device.encryption-key-set` with both fingerprints when it changes;
    /// a registration without one keeps it.
    ///
    /// Every MQTT registration is written and audited: it opens a session,
    /// which happens rarely. A poll carries the registration every few
    /// seconds, so one equal to what is stored only refreshes `last_seen`,
    /// and only when that is older than `refresh_last_seen_before`: an idle
    /// poll usually writes nothing.
    pub async fn record_registration(
        &self,
        device_id: &DeviceId,
        registration: &Registration,
        via: Channel,
        at: &str,
        refresh_last_seen_before: &str,
    ) -> Result<RegistrationOutcome, StoreError> {
        let installed = serde_json::to_string(&registration.installed)
            .map_err(|e| StoreError::corrupt("devices.installed", e))?;
        let capabilities = serde_json::to_string(&registration.capabilities)
            .map_err(|e| StoreError::corrupt("devices.capabilities", e))?;
        if via == Channel::Poll {
            // Read without the write lock first: the common case is an idle
            // poll that changes nothing.
            let row = sqlx::query(
                "SELECT hardware, mode, agent_version, installed, capabilities, registered_at, last_seen, \
                 encryption_key FROM devices WHERE id = $1",
            )
            .bind(device_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                return Ok(RegistrationOutcome::UnknownDevice);
            };
            let unchanged = row.try_get::<Option<String>, _>("registered_at")?.is_some()
                && row.try_get::<String, _>("hardware")? == registration.hardware
                && row.try_get::<Option<String>, _>("mode")?.as_deref()
                    == Some(registration.mode.as_str())
                && row
                    .try_get::<Option<String>, _>("agent_version")?
                    .as_deref()
                    == Some(registration.agent_version.as_str())
                && row.try_get::<String, _>("installed")? == installed
                && row.try_get::<String, _>("capabilities")? == capabilities
                && (registration.encryption_key.is_none()
                    || row.try_get::<Option<String>, _>("encryption_key")?
                        == registration.encryption_key);
            if unchanged {
                let last_seen: Option<String> = row.try_get("last_seen")?;
                if last_seen.is_none_or(|seen| seen.as_str() < refresh_last_seen_before) {
                    self.touch_device(device_id, at).await?;
                }
                return Ok(RegistrationOutcome::Unchanged);
            }
        }
        let mut transaction = self.begin_write().await?;
        // The key on record, to audit a change; a registration without a
        // key (an older agent) leaves it as it is.
        let old_key: Option<Option<String>> =
            sqlx::query_scalar("SELECT encryption_key FROM devices WHERE id = $1")
                .bind(device_id.as_str())
                .fetch_optional(&mut *transaction)
                .await?;
        let updated = sqlx::query(
            "UPDATE devices SET hardware = $1, mode = $2, agent_version = $3, installed = $4, \
             capabilities = $5, registered_at = $6, last_seen = $6, \
             registered_via = COALESCE(registered_via, $7), \
             encryption_key = COALESCE($9, encryption_key) WHERE id = $8",
        )
        .bind(registration.hardware.as_str())
        .bind(registration.mode.as_str())
        .bind(registration.agent_version.as_str())
        .bind(installed)
        .bind(capabilities)
        .bind(at)
        .bind(via.as_str())
        .bind(device_id.as_str())
        .bind(registration.encryption_key.as_deref())
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(RegistrationOutcome::UnknownDevice);
        }
        let actor = Actor::device(device_id);
        let old_key = old_key.flatten();
        if let Some(new_key) = &registration.encryption_key
            && old_key.as_ref() != Some(new_key)
        {
            // A device whose state was wiped legitimately makes a new key;
            // the change is on record either way.
            let fingerprint = otter_package::wrap::fingerprint_of;
            let record = AuditRecord::new(&actor, AuditEvent::DeviceEncryptionKeySet)
                .device(device_id.as_str())
                .details(serde_json::json!({
                    "old_fingerprint": old_key.as_deref().map(fingerprint),
                    "new_fingerprint": fingerprint(new_key),
                    "via": via.as_str(),
                }));
            audit::append(&mut transaction, at, &record).await?;
        }
        let record = AuditRecord::new(&actor, AuditEvent::DeviceRegistered)
            .device(device_id.as_str())
            .details(serde_json::json!({
                "hardware": registration.hardware,
                "mode": registration.mode.as_str(),
                "agent_version": registration.agent_version,
                "installed": registration.installed,
                "capabilities": registration.capabilities,
                "via": via.as_str(),
            }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        Ok(RegistrationOutcome::Recorded)
    }

    /// Updates the time of the last sign of life of a device.
    pub async fn touch_device(&self, device_id: &DeviceId, at: &str) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
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
    let registered_via: Option<String> = row.try_get("registered_via")?;
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
        registered_via: match registered_via.as_deref() {
            None => None,
            Some("mqtt") => Some(Channel::Mqtt),
            Some("poll") => Some(Channel::Poll),
            Some(other) => return Err(StoreError::corrupt("devices.registered_via", other)),
        },
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Result of [`Store::revoke_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRevoked {
    /// Recorded and audited; the serial of the revoked certificate.
    Revoked {
        serial: String,
    },
    UnknownDevice,
    /// The device's current certificate was already revoked; nothing changed.
    AlreadyRevoked,
}

impl Store {
    /// Serials of every revoked device certificate, to load the in-memory
    /// set at start.
    pub async fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT serial FROM revoked_certificates")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Revokes the device's current certificate (by serial, so a later
    /// re-enrolment with a new certificate is unaffected) and its pending
    /// links, in one transaction with a `device.revoked` audit row naming
    /// `actor` (and `link.revoked` when links were revoked).
    pub async fn revoke_device(
        &self,
        device_id: &DeviceId,
        reason: Option<&str>,
        actor: &Actor,
        at: &str,
    ) -> Result<DeviceRevoked, StoreError> {
        let mut transaction = self.begin_write().await?;
        let serial: Option<String> =
            sqlx::query_scalar("SELECT cert_serial FROM devices WHERE id = $1")
                .bind(device_id.as_str())
                .fetch_optional(&mut *transaction)
                .await?;
        let Some(serial) = serial else {
            return Ok(DeviceRevoked::UnknownDevice);
        };
        let inserted = sqlx::query(
            "INSERT INTO revoked_certificates (serial, device_id, revoked_at, revoked_by, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (serial) DO NOTHING",
        )
        .bind(serial.as_str())
        .bind(device_id.as_str())
        .bind(at)
        .bind(actor.name.as_str())
        .bind(reason)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(DeviceRevoked::AlreadyRevoked);
        }
        let links = sqlx::query(
            "UPDATE links SET revoked_at = $1 WHERE device_id = $2 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(device_id.as_str())
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        let record = AuditRecord::new(actor, AuditEvent::DeviceRevoked)
            .device(device_id.as_str())
            .details(serde_json::json!({
                "certificate_serial": serial,
                "reason": reason,
                "links_revoked": links,
            }));
        audit::append(&mut transaction, at, &record).await?;
        if links > 0 {
            let record = AuditRecord::new(actor, AuditEvent::LinkRevoked)
                .device(device_id.as_str())
                .details(serde_json::json!({ "links": links }));
            audit::append(&mut transaction, at, &record).await?;
        }
        transaction.commit().await?;
        Ok(DeviceRevoked::Revoked { serial })
    }
}

/// Inserts one device, its tags and its audit row in `transaction`; leaves
/// committing to the caller.
pub(super) async fn insert_device(
    transaction: &mut super::WriteTransaction,
    device: &NewDevice,
    actor: &Actor,
    at: &str,
) -> Result<EnrollOutcome, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO devices (id, hardware, enrolled_at, cert_serial) VALUES ($1, $2, $3, $4)",
    )
    .bind(device.device_id.as_str())
    .bind(device.hardware.as_str())
    .bind(at)
    .bind(device.cert_serial.as_str())
    .execute(&mut **transaction)
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
            .execute(&mut **transaction)
            .await?;
    }
    let record = AuditRecord::new(actor, AuditEvent::DeviceEnrolled)
        .device(device.device_id.as_str())
        .details(serde_json::json!({
            "hardware": device.hardware,
            "tags": tags,
            "certificate_serial": device.cert_serial,
        }));
    audit::append(transaction, at, &record).await?;
    Ok(EnrollOutcome::Enrolled)
}
