//! Per-device step times of one deployment, from the server's audit: the
//! `deployment.created` row is the commit; each device's first
//! `notification.sent`, `device.downloaded` and `device.installed` rows are
//! its notified, downloaded and installed times. The audit is the record the
//! server keeps anyway, so the numbers are the server's own clock and need
//! no instrumentation of the devices.

use std::collections::BTreeMap;

use otter_proto::api::AuditEntry;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The audited steps the benchmark times, in order.
pub const STEPS: [&str; 3] = ["notification.sent", "device.downloaded", "device.installed"];

/// Seconds from commit to each step, per device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTimes {
    /// When the deployment was committed.
    pub committed_at: Option<OffsetDateTime>,
    /// Step name → device id → seconds after the commit.
    pub by_step: BTreeMap<&'static str, BTreeMap<String, f64>>,
}

/// Why the audit cannot be read as step times.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    #[error("the audit has no deployment.created row for {0}")]
    NoCommit(String),
    #[error("audit row {seq} has an unreadable time {at:?}")]
    BadTime { seq: i64, at: String },
}

fn parse_time(entry: &AuditEntry) -> Result<OffsetDateTime, TimingError> {
    OffsetDateTime::parse(&entry.at, &Rfc3339).map_err(|_| TimingError::BadTime {
        seq: entry.seq,
        at: entry.at.clone(),
    })
}

impl StepTimes {
    /// Reads the rows of `deployment_id` out of `entries`.
    pub fn from_audit(
        entries: &[AuditEntry],
        deployment_id: &str,
    ) -> Result<StepTimes, TimingError> {
        let ours = || {
            entries
                .iter()
                .filter(move |e| e.deployment_id.as_deref() == Some(deployment_id))
        };
        let commit = ours()
            .find(|e| e.event == "deployment.created")
            .ok_or_else(|| TimingError::NoCommit(deployment_id.to_owned()))?;
        let committed_at = parse_time(commit)?;
        let mut by_step: BTreeMap<&'static str, BTreeMap<String, f64>> = BTreeMap::new();
        for entry in ours() {
            let Some(step) = STEPS.iter().find(|step| **step == entry.event) else {
                continue;
            };
            let Some(device) = &entry.device_id else {
                continue;
            };
            let seconds = (parse_time(entry)? - committed_at).as_seconds_f64();
            // First occurrence only: a repeated notification is not news.
            by_step
                .entry(step)
                .or_default()
                .entry(device.clone())
                .or_insert(seconds);
        }
        Ok(StepTimes {
            committed_at: Some(committed_at),
            by_step,
        })
    }

    /// The seconds of one step, sorted.
    pub fn sorted(&self, step: &str) -> Vec<f64> {
        let mut values: Vec<f64> = self
            .by_step
            .get(step)
            .map(|devices| devices.values().copied().collect())
            .unwrap_or_default();
        values.sort_by(f64::total_cmp);
        values
    }

    pub fn summary(&self, step: &str) -> Percentiles {
        Percentiles::of_sorted(&self.sorted(step))
    }
}

/// p50 / p99 / max of a set of seconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of_sorted(sorted: &[f64]) -> Percentiles {
        let rank = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted.get(index).copied().unwrap_or(0.0)
        };
        Percentiles {
            count: sorted.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otter_proto::api::ActorKind;

    fn row(seq: i64, at: &str, device: Option<&str>, event: &str) -> AuditEntry {
        AuditEntry {
            seq,
            at: at.to_owned(),
            actor_kind: ActorKind::Server,
            actor: "server".to_owned(),
            device_id: device.map(str::to_owned),
            deployment_id: Some("dep".to_owned()),
            event: event.to_owned(),
            details: serde_json::Value::Null,
            hash: None,
        }
    }

    #[test]
    fn first_rows_after_the_commit() {
        let entries = vec![
            row(1, "2026-01-01T00:00:00.000Z", None, "deployment.created"),
            row(
                2,
                "2026-01-01T00:00:00.250Z",
                Some("a"),
                "notification.sent",
            ),
            row(
                3,
                "2026-01-01T00:00:00.500Z",
                Some("b"),
                "notification.sent",
            ),
            row(
                4,
                "2026-01-01T00:00:09.000Z",
                Some("a"),
                "notification.sent",
            ),
            row(
                5,
                "2026-01-01T00:00:01.000Z",
                Some("a"),
                "device.downloaded",
            ),
            row(6, "2026-01-01T00:00:02.000Z", Some("a"), "device.installed"),
        ];
        let times = StepTimes::from_audit(&entries, "dep").unwrap();
        assert_eq!(times.sorted("notification.sent"), [0.25, 0.5]);
        assert_eq!(times.summary("device.installed").max, 2.0);
        assert_eq!(times.summary("device.downloaded").count, 1);
        assert!(StepTimes::from_audit(&entries, "other").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of_sorted(&values);
        assert_eq!((p.p50, p.p99, p.max, p.count), (50.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of_sorted(&[]), Percentiles::default());
        assert_eq!(Percentiles::of_sorted(&[3.0]).p99, 3.0);
    }
}
