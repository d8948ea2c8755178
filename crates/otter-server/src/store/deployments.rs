//! Deployments and their per-device targets: commit (steps 2–3), the phase
//! of each device (steps 4–8) and the status views of the API.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use otter_proto::api::{DeploymentDevice, DeploymentInfo, DeploymentStatus, Target};
use otter_proto::deployment::{self, Phase};
use otter_proto::manifest::Manifest;
use otter_proto::messages::{DeviceEvent, Mode};
use otter_proto::topics::DeviceId;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, json_column};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// A deployment to commit.
#[derive(Debug, Clone)]
pub struct DeploymentCreation<'a> {
    pub deployment_id: &'a str,
    pub release_id: &'a str,
    pub target: &'a Target,
    /// Devices may install the release over a newer version; refused
    /// ([`CreatedDeployment::DowngradeNotAllowed`]) unless the release's
    /// signed manifest allows it too.
    pub allow_downgrade: bool,
    pub actor: &'a Actor,
    pub at: &'a str,
}

/// Result of [`Store::create_deployment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatedDeployment {
    /// Committed; these devices are targeted, in phase pending.
    Created {
        device_ids: Vec<DeviceId>,
    },
    UnknownRelease,
    UnknownDevice,
    /// `device:ID` names a device whose hardware the release does not list.
    IncompatibleDevice {
        hardware: String,
    },
    /// The target matched no device of a compatible hardware.
    EmptyTarget,
    /// A downgrade was asked for, but the release's signed manifest does not
    /// allow one.
    DowngradeNotAllowed,
}

/// A device's place in a deployment, as the notifier needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationTarget {
    pub deployment_id: String,
    pub release_id: String,
    pub phase: Phase,
    /// The deployment allows a downgrade; carried to the device.
    pub allow_downgrade: bool,
}

/// A targeted device as the batch notifier needs it
/// ([`Store::delivery_targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTarget {
    pub device_id: DeviceId,
    pub phase: Phase,
    /// The mode the device last registered; `None` if it never did.
    pub mode: Option<Mode>,
    /// The device's encryption key (base64) as registered; `None` if it
    /// never sent one.
    pub encryption_key: Option<String>,
}

/// One device report for [`Store::apply_reports`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportToApply<'a> {
    pub deployment_id: &'a str,
    pub device_id: &'a DeviceId,
    pub event: DeviceEvent,
    pub detail: Option<&'a str>,
}

/// What [`Store::apply_reports`] did with one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportApplied {
    /// The deployment does not target the device; nothing written.
    UnknownDeployment,
    /// The phase machine refused the event in `phase`; nothing written.
    Ignored { phase: Phase, reason: &'static str },
    /// The phase moved; this many links were revoked with it.
    Advanced {
        from: Phase,
        to: Phase,
        revoked_links: u64,
    },
}

/// Devices per phase read of [`Store::apply_reports`], well under
/// SQLite's parameter limit.
const PHASE_READ_CHUNK: usize = 500;

/// Devices per `UPDATE … IN (…)` statement.
const DEVICES_PER_UPDATE: usize = 500;

impl Store {
    /// Resolves `target` and stores the deployment, its targets (phase
    /// pending) and their audit rows in one transaction (steps 2–3).
    /// Devices whose hardware the release does not list are left out.
    pub async fn create_deployment(
        &self,
        creation: &DeploymentCreation<'_>,
    ) -> Result<CreatedDeployment, StoreError> {
        let mut transaction = self.begin_write().await?;
        let release = sqlx::query("SELECT hardware, manifest_json FROM releases WHERE id = $1")
            .bind(creation.release_id)
            .fetch_optional(&mut *transaction)
            .await?;
        let Some(release) = release else {
            return Ok(CreatedDeployment::UnknownRelease);
        };
        let release_hardware: Vec<String> = json_column(
            "releases.hardware",
            &release.try_get::<String, _>("hardware")?,
        )?;
        if creation.allow_downgrade {
            // The manifest was verified at upload; parsing it again reads
            // the signed flag, never a copy that could disagree with it.
            let manifest_json: String = release.try_get("manifest_json")?;
            let manifest = Manifest::from_json(&manifest_json)
                .map_err(|e| StoreError::corrupt("releases.manifest_json", e))?;
            if !manifest.allow_downgrade {
                return Ok(CreatedDeployment::DowngradeNotAllowed);
            }
        }

        let candidates = match creation.target {
            Target::All => {
                sqlx::query("SELECT id, hardware FROM devices ORDER BY id")
                    .fetch_all(&mut *transaction)
                    .await?
            }
            Target::Fleet(tag) => sqlx::query(
                "SELECT d.id, d.hardware FROM devices d JOIN device_tags t ON t.device_id = d.id \
                     WHERE t.tag = $1 ORDER BY d.id",
            )
            .bind(tag.as_str())
            .fetch_all(&mut *transaction)
            .await?,
            Target::Device(device_id) => {
                sqlx::query("SELECT id, hardware FROM devices WHERE id = $1")
                    .bind(device_id.as_str())
                    .fetch_all(&mut *transaction)
                    .await?
            }
        };
        if candidates.is_empty() && matches!(creation.target, Target::Device(_)) {
            return Ok(CreatedDeployment::UnknownDevice);
        }
        let mut device_ids = Vec::new();
        let mut skipped = Vec::new();
        for row in &candidates {
            let id: String = row.try_get("id")?;
            let hardware: String = row.try_get("hardware")?;
            if release_hardware.contains(&hardware) {
                device_ids
                    .push(DeviceId::parse(&id).map_err(|e| StoreError::corrupt("devices.id", e))?);
            } else if matches!(creation.target, Target::Device(_)) {
                return Ok(CreatedDeployment::IncompatibleDevice { hardware });
            } else {
                skipped.push(id);
            }
        }
        if device_ids.is_empty() {
            return Ok(CreatedDeployment::EmptyTarget);
        }

        sqlx::query(
            "INSERT INTO deployments (id, release_id, target, created_at, created_by, allow_downgrade) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(creation.deployment_id)
        .bind(creation.release_id)
        .bind(creation.target.to_string())
        .bind(creation.at)
        .bind(creation.actor.name.as_str())
        .bind(i64::from(creation.allow_downgrade))
        .execute(&mut *transaction)
        .await?;
        let created = AuditRecord::new(creation.actor, AuditEvent::DeploymentCreated)
            .deployment(creation.deployment_id)
            .details(serde_json::json!({
                "release": creation.release_id,
                "target": creation.target.to_string(),
                "devices": device_ids.len(),
                "skipped_incompatible_hardware": skipped,
                "allow_downgrade": creation.allow_downgrade,
            }));
        audit::append(&mut transaction, creation.at, &created).await?;
        // Multi-row statements: 10,000 targets are 20 statements, not 10,000.
        for chunk in device_ids.chunks(DEVICES_PER_UPDATE) {
            let values: Vec<String> = (0..chunk.len())
                .map(|row| {
                    let first = row * 4 + 1;
                    format!(
                        "(${}, ${}, ${}, ${})",
                        first,
                        first + 1,
                        first + 2,
                        first + 3
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO deployment_targets (deployment_id, device_id, phase, updated_at) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for device_id in chunk {
                query = query
                    .bind(creation.deployment_id)
                    .bind(device_id.as_str())
                    .bind(Phase::Pending.as_str())
                    .bind(creation.at);
            }
            query.execute(&mut *transaction).await?;
        }
        let targeted: Vec<(&str, AuditRecord<'_>)> = device_ids
            .iter()
            .map(|device_id| {
                let record = AuditRecord::new(creation.actor, AuditEvent::DeploymentTargeted)
                    .device(device_id.as_str())
                    .deployment(creation.deployment_id)
                    .details(serde_json::json!({ "release": creation.release_id }));
                (creation.at, record)
            })
            .collect();
        audit::append_all(&mut transaction, &targeted).await?;
        transaction.commit().await?;
        Ok(CreatedDeployment::Created { device_ids })
    }

    /// All deployments, newest first.
    pub async fn deployments(&self) -> Result<Vec<DeploymentInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, release_id, target, created_at, created_by, allow_downgrade FROM deployments \
             ORDER BY created_at DESC, id",
        )
        .fetch_all(&self.pool)
        .await?;
        let counts = sqlx::query(
            "SELECT deployment_id, phase, COUNT(*) AS devices FROM deployment_targets GROUP BY deployment_id, phase",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut phases_by_deployment: BTreeMap<String, BTreeMap<Phase, u64>> = BTreeMap::new();
        for row in &counts {
            let deployment_id: String = row.try_get("deployment_id")?;
            let phase = parse_phase(&row.try_get::<String, _>("phase")?)?;
            let devices: i64 = row.try_get("devices")?;
            phases_by_deployment
                .entry(deployment_id)
                .or_default()
                .insert(phase, u64::try_from(devices).unwrap_or(0));
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let phases = phases_by_deployment.remove(&id).unwrap_or_default();
                deployment_info(row, phases)
            })
            .collect()
    }

    /// One deployment with every target, or `None`.
    pub async fn deployment_status(
        &self,
        deployment_id: &str,
    ) -> Result<Option<DeploymentStatus>, StoreError> {
        let row = sqlx::query(
            "SELECT id, release_id, target, created_at, created_by, allow_downgrade FROM deployments \
             WHERE id = $1",
        )
        .bind(deployment_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let target_rows = sqlx::query(
            "SELECT device_id, phase, updated_at, detail FROM deployment_targets \
             WHERE deployment_id = $1 ORDER BY device_id",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        let mut targets = Vec::with_capacity(target_rows.len());
        let mut phases: BTreeMap<Phase, u64> = BTreeMap::new();
        for target in &target_rows {
            let device_id: String = target.try_get("device_id")?;
            let phase = parse_phase(&target.try_get::<String, _>("phase")?)?;
            *phases.entry(phase).or_default() += 1;
            targets.push(DeploymentDevice {
                device_id: DeviceId::parse(&device_id)
                    .map_err(|e| StoreError::corrupt("deployment_targets.device_id", e))?,
                phase,
                updated_at: target.try_get("updated_at")?,
                detail: target.try_get("detail")?,
            });
        }
        Ok(Some(DeploymentStatus {
            info: deployment_info(&row, phases)?,
            targets,
        }))
    }

    /// The phase of `device_id` in `deployment_id` with the release, or
    /// `None` when the deployment does not target the device.
    pub async fn notification_target(
        &self,
        deployment_id: &str,
        device_id: &DeviceId,
    ) -> Result<Option<NotificationTarget>, StoreError> {
        let row = sqlx::query(
            "SELECT t.phase, d.release_id, d.allow_downgrade FROM deployment_targets t \
             JOIN deployments d ON d.id = t.deployment_id \
             WHERE t.deployment_id = $1 AND t.device_id = $2",
        )
        .bind(deployment_id)
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(NotificationTarget {
            deployment_id: deployment_id.to_owned(),
            release_id: row.try_get("release_id")?,
            phase: parse_phase(&row.try_get::<String, _>("phase")?)?,
            allow_downgrade: row.try_get::<i64, _>("allow_downgrade")? != 0,
        }))
    }

    /// Which of `device_ids` `deployment_id` targets, with each one's phase
    /// and the mode it last registered (`None`: never registered), in one
    /// query; untargeted devices are absent.
    pub async fn delivery_targets(
        &self,
        deployment_id: &str,
        device_ids: &[DeviceId],
    ) -> Result<Vec<DeliveryTarget>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT t.device_id, t.phase, d.mode, d.encryption_key FROM deployment_targets t \
             JOIN devices d ON d.id = t.device_id \
             WHERE t.deployment_id = $1 AND t.device_id IN ({})",
            super::placeholders(2, device_ids.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(deployment_id);
        for device_id in device_ids {
            query = query.bind(device_id.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut targets = Vec::with_capacity(rows.len());
        for row in &rows {
            let device_id: String = row.try_get("device_id")?;
            let mode: Option<String> = row.try_get("mode")?;
            targets.push(DeliveryTarget {
                device_id: DeviceId::parse(&device_id)
                    .map_err(|e| StoreError::corrupt("deployment_targets.device_id", e))?,
                phase: parse_phase(&row.try_get::<String, _>("phase")?)?,
                mode: mode
                    .map(|m| m.parse::<Mode>())
                    .transpose()
                    .map_err(|e| StoreError::corrupt("devices.mode", e))?,
                encryption_key: row.try_get("encryption_key")?,
            });
        }
        Ok(targets)
    }

    /// The deployments in which `device_id` still needs its link
    /// ([`Phase::needs_link`]), oldest first.
    pub async fn deployments_needing_link(
        &self,
        device_id: &DeviceId,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.deployment_id, t.phase FROM deployment_targets t \
             JOIN deployments d ON d.id = t.deployment_id \
             WHERE t.device_id = $1 ORDER BY d.created_at, d.id",
        )
        .bind(device_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut deployment_ids = Vec::new();
        for row in &rows {
            if parse_phase(&row.try_get::<String, _>("phase")?)?.needs_link() {
                deployment_ids.push(row.try_get("deployment_id")?);
            }
        }
        Ok(deployment_ids)
    }

    /// Records that a notification was published (step 4): the phase moves
    /// from pending to notified and `notification.sent` is audited. A
    /// delivery is a batch of one of [`Store::record_notifications`].
    pub async fn record_notification(
        &self,
        deployment_id: &str,
        device_id: &DeviceId,
        details: serde_json::Value,
        at: &str,
    ) -> Result<(), StoreError> {
        self.record_notifications(deployment_id, &[(device_id, details)], at)
            .await
    }

    /// [`Store::record_notification`] for several devices of one deployment
    /// in one transaction, each with its own `notification.sent` row.
    pub async fn record_notifications(
        &self,
        deployment_id: &str,
        deliveries: &[(&DeviceId, serde_json::Value)],
        at: &str,
    ) -> Result<(), StoreError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let actor = Actor::server();
        let mut transaction = self.begin_write().await?;
        // One statement per chunk of devices rather than one each.
        for chunk in deliveries.chunks(DEVICES_PER_UPDATE) {
            let sql = format!(
                "UPDATE deployment_targets SET phase = $1, updated_at = $2 \
                 WHERE deployment_id = $3 AND phase = $4 AND device_id IN ({})",
                super::placeholders(5, chunk.len())
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(Phase::Notified.as_str())
                .bind(at)
                .bind(deployment_id)
                .bind(Phase::Pending.as_str());
            for (device_id, _) in chunk {
                query = query.bind(device_id.as_str());
            }
            query.execute(&mut *transaction).await?;
        }
        let records: Vec<(&str, AuditRecord<'_>)> = deliveries
            .iter()
            .map(|(device_id, details)| {
                let record = AuditRecord::new(&actor, AuditEvent::NotificationSent)
                    .device(device_id.as_str())
                    .deployment(deployment_id)
                    .details(details.clone());
                (at, record)
            })
            .collect();
        audit::append_all(&mut transaction, &records).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Applies `reports` in order, in one transaction: for each, the
    /// target's current phase (as left by the earlier reports of the batch)
    /// goes through `decide`; an advance updates the phase guarded by the
    /// phase it was computed from, audits `device.<event>` with the move and
    /// detail, and when `decide` says so revokes the device's links for the
    /// deployment (auditing `link.revoked`). The phases are read once per
    /// deployment of the batch. Returns one result per report, in order.
    pub async fn apply_reports(
        &self,
        reports: &[ReportToApply<'_>],
        at: &str,
        decide: impl Fn(Phase, DeviceEvent) -> deployment::Outcome,
    ) -> Result<Vec<ReportApplied>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let mut transaction = self.begin_write().await?;
        // Current phase of every (deployment, device) pair of the batch;
        // a pair absent after the read is not targeted.
        let mut phases: HashMap<(String, String), Phase> = HashMap::new();
        let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for report in reports {
            wanted
                .entry(report.deployment_id)
                .or_default()
                .insert(report.device_id.as_str());
        }
        for (deployment_id, device_ids) in &wanted {
            let device_ids: Vec<&str> = device_ids.iter().copied().collect();
            for chunk in device_ids.chunks(PHASE_READ_CHUNK) {
                let sql = format!(
                    "SELECT device_id, phase FROM deployment_targets \
                     WHERE deployment_id = $1 AND device_id IN ({})",
                    super::placeholders(2, chunk.len())
                );
                // Safe: `sql` holds only fixed text and placeholders.
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(*deployment_id);
                for device_id in chunk {
                    query = query.bind(*device_id);
                }
                for row in query.fetch_all(&mut *transaction).await? {
                    let device_id: String = row.try_get("device_id")?;
                    let phase = parse_phase(&row.try_get::<String, _>("phase")?)?;
                    phases.insert(((*deployment_id).to_owned(), device_id), phase);
                }
            }
        }

        let mut results = Vec::with_capacity(reports.len());
        for report in reports {
            let key = (
                report.deployment_id.to_owned(),
                report.device_id.as_str().to_owned(),
            );
            // A lost compare-and-set (possible only on a database without
            // SQLite's single writer) is recomputed from a fresh read.
            const ATTEMPTS: usize = 3;
            let mut result = ReportApplied::UnknownDeployment;
            for _ in 0..ATTEMPTS {
                let Some(&from) = phases.get(&key) else {
                    result = ReportApplied::UnknownDeployment;
                    break;
                };
                let (to, revoke_link) = match decide(from, report.event) {
                    deployment::Outcome::Advanced { to, revoke_link } => (to, revoke_link),
                    deployment::Outcome::Ignored(reason) => {
                        result = ReportApplied::Ignored {
                            phase: from,
                            reason,
                        };
                        break;
                    }
                };
                let updated = sqlx::query(
                    "UPDATE deployment_targets SET phase = $1, updated_at = $2, detail = $3 \
                     WHERE deployment_id = $4 AND device_id = $5 AND phase = $6",
                )
                .bind(to.as_str())
                .bind(at)
                .bind(report.detail)
                .bind(report.deployment_id)
                .bind(report.device_id.as_str())
                .bind(from.as_str())
                .execute(&mut *transaction)
                .await?;
                if updated.rows_affected() == 0 {
                    let row = sqlx::query(
                        "SELECT phase FROM deployment_targets \
                         WHERE deployment_id = $1 AND device_id = $2",
                    )
                    .bind(report.deployment_id)
                    .bind(report.device_id.as_str())
                    .fetch_optional(&mut *transaction)
                    .await?;
                    match row {
                        Some(row) => {
                            let phase = parse_phase(&row.try_get::<String, _>("phase")?)?;
                            phases.insert(key.clone(), phase);
                        }
                        None => {
                            phases.remove(&key);
                        }
                    }
                    result = ReportApplied::Ignored {
                        phase: from,
                        reason: "raced another change",
                    };
                    continue;
                }
                phases.insert(key.clone(), to);
                let actor = Actor::device(report.device_id);
                let record = AuditRecord::new(&actor, AuditEvent::Device(report.event))
                    .device(report.device_id.as_str())
                    .deployment(report.deployment_id)
                    .details(serde_json::json!({
                        "from": from.as_str(),
                        "to": to.as_str(),
                        "detail": report.detail,
                    }));
                audit::append(&mut transaction, at, &record).await?;
                let revoked_links = if revoke_link {
                    super::links::revoke_in(
                        &mut transaction,
                        report.deployment_id,
                        report.device_id,
                        &Actor::server(),
                        at,
                    )
                    .await?
                } else {
                    0
                };
                result = ReportApplied::Advanced {
                    from,
                    to,
                    revoked_links,
                };
                break;
            }
            results.push(result);
        }
        transaction.commit().await?;
        Ok(results)
    }
}

fn parse_phase(text: &str) -> Result<Phase, StoreError> {
    Phase::parse(text).ok_or_else(|| StoreError::corrupt("deployment_targets.phase", text))
}

fn deployment_info(
    row: &AnyRow,
    phases: BTreeMap<Phase, u64>,
) -> Result<DeploymentInfo, StoreError> {
    let devices = phases.values().sum();
    let complete = phases.keys().all(|phase| phase.is_terminal());
    Ok(DeploymentInfo {
        deployment_id: row.try_get("id")?,
        release: row.try_get("release_id")?,
        target: row.try_get("target")?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
        devices,
        phases,
        complete,
        allow_downgrade: row.try_get::<i64, _>("allow_downgrade")? != 0,
    })
}
