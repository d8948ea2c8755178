//! One-time enrolment tokens, the authorisation of CSR enrolment
//! (`POST /v1/enrol` on the device endpoint).
//!
//! A token is stored by SHA-256 only, bound to one device id with the
//! hardware and tags the device gets, and never deleted: it is used once
//! (`used_at`), revoked while unused (`revoked_at`), or expires. Creation and
//! revocation write their audit rows in the same transaction;
//! [`Store::enrol_with_token`] checks the token, marks it used and stores the
//! device with its `device.enrolled` row in one transaction, so a token
//! replayed, even concurrently, enrols nothing a second time.

use otter_proto::api::EnrolmentTokenInfo;
use otter_proto::topics::DeviceId;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::devices::insert_device;
use super::{EnrollOutcome, NewDevice, Store, StoreError};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// An enrolment token to store.
#[derive(Debug, Clone)]
pub struct NewEnrolmentToken<'a> {
    pub id: &'a str,
    /// SHA-256 (hex) of the token; the token itself is never stored.
    pub token_sha256: &'a str,
    pub device_id: &'a DeviceId,
    pub hardware: &'a str,
    pub tags: &'a [String],
    pub expires_at: &'a str,
}

/// Why an enrolment token does not authorise an enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolmentRefusal {
    /// No token has this hash.
    Unknown,
    Expired,
    /// A device already enrolled with it.
    Used,
    Revoked,
    /// The token is bound to another device id.
    WrongDevice,
}

impl EnrolmentRefusal {
    /// Decides whether `token` lets `device_id` enrol at `now` (stored
    /// format, which sorts as text).
    pub fn check(
        token: &EnrolmentTokenInfo,
        device_id: &DeviceId,
        now: &str,
    ) -> Result<(), EnrolmentRefusal> {
        if token.used_at.is_some() {
            Err(EnrolmentRefusal::Used)
        } else if token.revoked_at.is_some() {
            Err(EnrolmentRefusal::Revoked)
        } else if token.expires_at.as_str() <= now {
            Err(EnrolmentRefusal::Expired)
        } else if &token.device_id != device_id {
            Err(EnrolmentRefusal::WrongDevice)
        } else {
            Ok(())
        }
    }
}

/// Result of [`Store::enrol_with_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsrEnrolOutcome {
    /// Stored, with the id of the token that allowed it and the hardware
    /// it gave the device.
    Enrolled { token_id: String, hardware: String },
    /// Nothing changed.
    Refused(EnrolmentRefusal),
    /// The device id is already enrolled; nothing changed, the token stays
    /// unused.
    DeviceExists,
}

/// Result of [`Store::revoke_enrolment_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrolmentTokenRevoked {
    Revoked(Box<EnrolmentTokenInfo>),
    Unknown,
    /// Used tokens stay as they are: revoke the device instead.
    AlreadyUsed,
    AlreadyRevoked,
}

const COLUMNS: &str =
    "id, device_id, hardware, tags, created_by, created_at, expires_at, used_at, revoked_at";

fn token_info(row: &AnyRow) -> Result<EnrolmentTokenInfo, StoreError> {
    let device_id: String = row.try_get("device_id")?;
    let tags: String = row.try_get("tags")?;
    Ok(EnrolmentTokenInfo {
        id: row.try_get("id")?,
        device_id: DeviceId::parse(&device_id)
            .map_err(|e| StoreError::corrupt("enrolment_tokens.device_id", e))?,
        hardware: row.try_get("hardware")?,
        tags: serde_json::from_str(&tags)
            .map_err(|e| StoreError::corrupt("enrolment_tokens.tags", e))?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used_at: row.try_get("used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// The actor of what a device does with an enrolment token: the token, on
/// behalf of the operator who created it.
pub fn enrolment_token_actor(token_id: &str) -> Actor {
    Actor::operator(&format!("enrolment-token:{token_id}"))
}

impl Store {
    /// Stores a token and its `enrolment-token.created` row, by `actor`.
    pub async fn create_enrolment_token(
        &self,
        token: &NewEnrolmentToken<'_>,
        actor: &Actor,
        at: &str,
    ) -> Result<EnrolmentTokenInfo, StoreError> {
        let mut tags = token.tags.to_vec();
        tags.sort();
        tags.dedup();
        let tags_json = serde_json::to_string(&tags).map_err(|e| StoreError::corrupt("tags", e))?;
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO enrolment_tokens (id, token_sha256, device_id, hardware, tags, created_by, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(token.id)
        .bind(token.token_sha256)
        .bind(token.device_id.as_str())
        .bind(token.hardware)
        .bind(tags_json)
        .bind(actor.name.as_str())
        .bind(at)
        .bind(token.expires_at)
        .execute(&mut *transaction)
        .await?;
        let record = AuditRecord::new(actor, AuditEvent::EnrolmentTokenCreated)
            .device(token.device_id.as_str())
            .details(serde_json::json!({
                "enrolment_token": token.id,
                "hardware": token.hardware,
                "tags": tags,
                "expires_at": token.expires_at,
            }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        Ok(EnrolmentTokenInfo {
            id: token.id.to_owned(),
            device_id: token.device_id.clone(),
            hardware: token.hardware.to_owned(),
            tags,
            created_by: actor.name.clone(),
            created_at: at.to_owned(),
            expires_at: token.expires_at.to_owned(),
            used_at: None,
            revoked_at: None,
        })
    }

    /// Every enrolment token, newest first.
    pub async fn enrolment_tokens(&self) -> Result<Vec<EnrolmentTokenInfo>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM enrolment_tokens ORDER BY created_at DESC, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_info).collect()
    }

    /// The token with this SHA-256 (hex), whatever its state.
    pub async fn enrolment_token_by_sha256(
        &self,
        token_sha256: &str,
    ) -> Result<Option<EnrolmentTokenInfo>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM enrolment_tokens WHERE token_sha256 = $1"
        )))
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_info).transpose()
    }

    /// Revokes an unused token and writes its `enrolment-token.revoked` row.
    pub async fn revoke_enrolment_token(
        &self,
        id: &str,
        actor: &Actor,
        at: &str,
    ) -> Result<EnrolmentTokenRevoked, StoreError> {
        let mut transaction = self.begin_write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM enrolment_tokens WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(EnrolmentTokenRevoked::Unknown);
        };
        let mut info = token_info(&row)?;
        if info.used_at.is_some() {
            return Ok(EnrolmentTokenRevoked::AlreadyUsed);
        }
        if info.revoked_at.is_some() {
            return Ok(EnrolmentTokenRevoked::AlreadyRevoked);
        }
        sqlx::query("UPDATE enrolment_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        let record = AuditRecord::new(actor, AuditEvent::EnrolmentTokenRevoked)
            .device(info.device_id.as_str())
            .details(serde_json::json!({ "enrolment_token": id }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        info.revoked_at = Some(at.to_owned());
        Ok(EnrolmentTokenRevoked::Revoked(Box::new(info)))
    }

    /// Enrols `device` with the token whose SHA-256 is `token_sha256`, in one
    /// transaction: the token is checked ([`EnrolmentRefusal::check`]) and
    /// marked used, and the device stored with the token's hardware and tags
    /// and its `device.enrolled` row, whose actor names the token. Anything
    /// refused changes nothing.
    pub async fn enrol_with_token(
        &self,
        token_sha256: &str,
        device_id: &DeviceId,
        cert_serial: &str,
        at: &str,
    ) -> Result<CsrEnrolOutcome, StoreError> {
        let mut transaction = self.begin_write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM enrolment_tokens WHERE token_sha256 = $1"
        )))
        .bind(token_sha256)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(CsrEnrolOutcome::Refused(EnrolmentRefusal::Unknown));
        };
        let token = token_info(&row)?;
        if let Err(refusal) = EnrolmentRefusal::check(&token, device_id, at) {
            return Ok(CsrEnrolOutcome::Refused(refusal));
        }
        let marked = sqlx::query(
            "UPDATE enrolment_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(token.id.as_str())
        .execute(&mut *transaction)
        .await?;
        if marked.rows_affected() != 1 {
            return Ok(CsrEnrolOutcome::Refused(EnrolmentRefusal::Used));
        }
        let device = NewDevice {
            device_id: device_id.clone(),
            hardware: token.hardware.clone(),
            tags: token.tags.clone(),
            cert_serial: cert_serial.to_owned(),
        };
        let actor = enrolment_token_actor(&token.id);
        match insert_device(&mut transaction, &device, &actor, at).await? {
            // Dropping the transaction leaves the token unused.
            EnrollOutcome::AlreadyExists => return Ok(CsrEnrolOutcome::DeviceExists),
            EnrollOutcome::Enrolled => {}
        }
        transaction.commit().await?;
        Ok(CsrEnrolOutcome::Enrolled {
            token_id: token.id,
            hardware: token.hardware,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(device: &str) -> EnrolmentTokenInfo {
        EnrolmentTokenInfo {
            id: "t".into(),
            device_id: DeviceId::parse(device).unwrap(),
            hardware: "hw".into(),
            tags: Vec::new(),
            created_by: "admin".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            expires_at: "2026-01-02T00:00:00.000Z".into(),
            used_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn token_checks() {
        let device = DeviceId::parse("d1").unwrap();
        let before = "2026-01-01T12:00:00.000Z";
        let check = |token: &EnrolmentTokenInfo, device: &DeviceId, now: &str| {
            EnrolmentRefusal::check(token, device, now)
        };
        assert_eq!(check(&token("d1"), &device, before), Ok(()));
        assert_eq!(
            check(&token("d1"), &device, "2026-01-02T00:00:00.000Z"),
            Err(EnrolmentRefusal::Expired)
        );
        assert_eq!(
            check(&token("d2"), &device, before),
            Err(EnrolmentRefusal::WrongDevice)
        );
        let mut used = token("d1");
        used.used_at = Some(before.into());
        assert_eq!(check(&used, &device, before), Err(EnrolmentRefusal::Used));
        let mut revoked = token("d1");
        revoked.revoked_at = Some(before.into());
        assert_eq!(
            check(&revoked, &device, before),
            Err(EnrolmentRefusal::Revoked)
        );
    }
}
