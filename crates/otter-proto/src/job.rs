//! The agent's update job: one deployment on one device, from notification
//! to report, as a state machine the agent persists after every step.
//!
//! The agent shell performs the I/O (download, unpack, probe, install) and
//! feeds the result back with [`Job::advance`]; this module decides what the
//! next step is, what to report, and whether a new notification starts a
//! job, refreshes a link, or only repeats an old answer.
//!
//! A job remembers how its artifact arrives ([`Delivery`]): fetched from the
//! notification's link (push-pull, pull), or pushed by the server over MQTT
//! (push, [`Job::from_offer`]). Everything after the artifact is complete is
//! the same for both.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::messages::{DeviceEvent, PushOffer, StatusReport, UpdateNotification};

/// Where a job stands. Persisted by the agent, so a restart resumes here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
pub enum Stage {
    /// Notification accepted; the download (possibly partial) is under way.
    Received,
    /// Payload verified and unpacked in the landing zone.
    Downloaded,
    /// Safe state reached; the installer was started. A restart here runs the
    /// installer again: handlers are atomic, so a repeated install is safe,
    /// while a skipped one would leave the device without the update.
    Installing,
    /// The installer succeeded and the health check runs (or must run again
    /// after a restart). The installed-version record still names the
    /// previous version: it changes only once the check passes, and a
    /// failed check rolls the install back.
    HealthCheck,
    /// The health check failed for `reason`; the installer's rollback runs
    /// (again, after a restart: rollbacks are idempotent).
    RollingBack { reason: String },
    /// Nothing more to do but make sure the server heard the outcome.
    Finished {
        event: DeviceEvent,
        detail: Option<String>,
    },
}

/// What the shell must do next for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Download (resuming) and verify into the landing zone.
    Download,
    /// Wait for a safe state, then install.
    Install,
    /// Run the health check of a completed install; roll back if it fails.
    CheckHealth,
    /// Roll the install back; then report `rolled-back`.
    RollBack,
    /// Nothing left to do.
    Idle,
}

/// How a job's artifact reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Delivery {
    /// Downloaded from `notification.link` (push-pull and pull modes).
    #[default]
    Link,
    /// Sent by the server in chunks on the device's `chunk` topic (push
    /// mode). The notification's `link` is empty and unused.
    Push {
        /// Size of the server's chunks, from the offer.
        chunk_size: u32,
    },
}

impl Delivery {
    pub fn is_link(&self) -> bool {
        matches!(self, Delivery::Link)
    }
}

/// One deployment on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub notification: UpdateNotification,
    /// Absent in jobs persisted before push mode existed: those are links.
    #[serde(default, skip_serializing_if = "Delivery::is_link")]
    pub delivery: Delivery,
    #[serde(flatten)]
    pub stage: Stage,
}

/// The result of a step performed by the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    Downloaded,
    InstallStarted,
    /// The installer succeeded and a health check must confirm it.
    InstallDone,
    /// The health check failed: roll back.
    HealthFailed(String),
    Installed,
    Failed(String),
    RolledBack(String),
}

/// What to do with an incoming notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a new job for it (replacing a job that has not begun installing).
    Start,
    /// Same deployment, still downloading: take the new link and expiry.
    RefreshLink,
    /// Same deployment, already past the download: repeat our last report.
    Repeat(StatusReport),
    /// This exact version is installed already: report it without installing.
    AlreadyInstalled,
    /// Refuse it; the reason is reported as a failure of that deployment.
    Refuse(String),
    /// Drop it silently (a busy installer; the server re-sends on registration).
    Defer,
}

impl Job {
    /// A new job fetching from the notification's link.
    pub fn new(notification: UpdateNotification) -> Self {
        Job::with_delivery(notification, Delivery::Link)
    }

    pub fn with_delivery(notification: UpdateNotification, delivery: Delivery) -> Self {
        Job {
            notification,
            delivery,
            stage: Stage::Received,
        }
    }

    /// The notification and delivery of a push offer: the same fields as an
    /// update, with no link (see [`Delivery::Push`]), so [`decide`] and every
    /// later step treat both alike.
    pub fn from_offer(offer: PushOffer) -> (UpdateNotification, Delivery) {
        let delivery = Delivery::Push {
            chunk_size: offer.chunk_size,
        };
        let notification = UpdateNotification {
            signer_revocations: offer.signer_revocations,
            deployment_id: offer.deployment_id,
            release: offer.release,
            manifest: offer.manifest,
            link: String::new(),
            link_expires_at: 0,
            wrapped_key: offer.wrapped_key,
            allow_downgrade: offer.allow_downgrade,
        };
        (notification, delivery)
    }

    pub fn next_action(&self) -> Action {
        match self.stage {
            Stage::Received => Action::Download,
            Stage::Downloaded | Stage::Installing => Action::Install,
            Stage::HealthCheck => Action::CheckHealth,
            Stage::RollingBack { .. } => Action::RollBack,
            Stage::Finished { .. } => Action::Idle,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Finished { .. })
    }

    /// Applies a step's result and returns the report to send.
    pub fn advance(&mut self, result: StepResult) -> StatusReport {
        let (stage, event, detail) = match result {
            StepResult::Downloaded => (Stage::Downloaded, DeviceEvent::Downloaded, None),
            StepResult::InstallStarted => (Stage::Installing, DeviceEvent::Installing, None),
            // The server knows no phase between installing and the outcome.
            StepResult::InstallDone => (Stage::HealthCheck, DeviceEvent::Installing, None),
            StepResult::HealthFailed(reason) => {
                (Stage::RollingBack { reason }, DeviceEvent::Installing, None)
            }
            StepResult::Installed => finished(DeviceEvent::Installed, None),
            StepResult::Failed(reason) => finished(DeviceEvent::Failed, Some(reason)),
            StepResult::RolledBack(reason) => finished(DeviceEvent::RolledBack, Some(reason)),
        };
        self.stage = stage;
        self.report(event, detail)
    }

    /// The report matching the current stage, to repeat after a reconnect.
    pub fn last_report(&self) -> StatusReport {
        match &self.stage {
            Stage::Received => self.report(DeviceEvent::Received, None),
            Stage::Downloaded => self.report(DeviceEvent::Downloaded, None),
            Stage::Installing | Stage::HealthCheck | Stage::RollingBack { .. } => {
                self.report(DeviceEvent::Installing, None)
            }
            Stage::Finished { event, detail } => self.report(*event, detail.clone()),
        }
    }

    pub fn report(&self, event: DeviceEvent, detail: Option<String>) -> StatusReport {
        StatusReport {
            deployment_id: self.notification.deployment_id.clone(),
            event,
            detail,
        }
    }
}

fn finished(event: DeviceEvent, detail: Option<String>) -> (Stage, DeviceEvent, Option<String>) {
    (
        Stage::Finished {
            event,
            detail: detail.clone(),
        },
        event,
        detail,
    )
}

/// Decides what an incoming, signature-checked notification means.
///
/// `manifest` is the verified manifest of `incoming`; `installed` is the
/// version of that package on the device now; `hardware` the device's model.
/// A package for other hardware is refused (`DESIGN.md`: devices refuse
/// incompatible or downgraded packages). The version installed already is
/// [`Decision::AlreadyInstalled`], whatever the flags say: reinstalling it
/// is not a downgrade. An older version is refused unless both the signed
/// manifest and the deployment (`incoming.allow_downgrade`) allow a
/// downgrade, so neither a publisher's package nor an operator's deployment
/// alone can roll a device back.
pub fn decide(
    current: Option<&Job>,
    incoming: &UpdateNotification,
    manifest: &Manifest,
    installed: Option<&semver::Version>,
    hardware: &str,
) -> Decision {
    if let Some(job) = current
        && job.notification.deployment_id == incoming.deployment_id
    {
        return match job.stage {
            Stage::Received => Decision::RefreshLink,
            _ => Decision::Repeat(job.last_report()),
        };
    }
    if let Some(job) = current
        && matches!(
            job.stage,
            Stage::Installing | Stage::HealthCheck | Stage::RollingBack { .. }
        )
    {
        return Decision::Defer;
    }
    if !manifest.fits_hardware(hardware) {
        return Decision::Refuse(format!(
            "package {} is for hardware {:?}, this device is {hardware:?}",
            manifest.release_id(),
            manifest.hardware
        ));
    }
    if installed == Some(&manifest.version) {
        return Decision::AlreadyInstalled;
    }
    if let Some(installed) = installed
        && manifest.version < *installed
        && let Some(reason) = downgrade_refusal(manifest.allow_downgrade, incoming.allow_downgrade)
    {
        return Decision::Refuse(format!(
            "downgrade from {installed} to {} refused: {reason} (package {})",
            manifest.version, manifest.name
        ));
    }
    Decision::Start
}

/// Why a downgrade is not allowed, or `None` when both sides allow it.
fn downgrade_refusal(manifest_allows: bool, deployment_allows: bool) -> Option<&'static str> {
    match (manifest_allows, deployment_allows) {
        (true, true) => None,
        (false, false) => Some("neither the signed manifest nor the deployment allows a downgrade"),
        (false, true) => Some("the signed manifest does not allow a downgrade"),
        (true, false) => Some("the deployment does not allow a downgrade"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::SignedManifest;

    fn notification(deployment: &str) -> UpdateNotification {
        UpdateNotification {
            signer_revocations: None,
            deployment_id: deployment.into(),
            release: "sensor-fw@1.2.3".into(),
            manifest: SignedManifest {
                manifest: String::new(),
                signer: String::new(),
                signature: String::new(),
                signer_certificate: None,
            },
            link: "https://127.0.0.1:8443/v1/download/x".into(),
            link_expires_at: 100,
            wrapped_key: String::new(),
            allow_downgrade: false,
        }
    }

    fn job(deployment: &str, stage: Stage) -> Job {
        Job {
            notification: notification(deployment),
            delivery: Delivery::Link,
            stage,
        }
    }

    #[test]
    fn decisions() {
        let m = crate::manifest::tests::sample(); // sensor-fw 1.2.3 for revB
        let v1 = semver::Version::new(1, 0, 0);
        let same = m.version.clone();
        let newer = semver::Version::new(2, 0, 0);
        let done = Stage::Finished {
            event: DeviceEvent::Installed,
            detail: None,
        };
        let cases: Vec<(Option<Job>, Option<&semver::Version>, &str, Decision)> = vec![
            (None, None, "revB", Decision::Start),
            (None, Some(&v1), "revB", Decision::Start),
            (None, Some(&same), "revB", Decision::AlreadyInstalled),
            (None, None, "revA", Decision::Refuse(String::new())),
            (None, Some(&newer), "revB", Decision::Refuse(String::new())),
            (
                Some(job("d1", Stage::Received)),
                None,
                "revB",
                Decision::RefreshLink,
            ),
            (
                Some(job("d1", Stage::Downloaded)),
                None,
                "revB",
                Decision::Repeat(job("d1", Stage::Downloaded).last_report()),
            ),
            (
                Some(job("d1", done.clone())),
                Some(&same),
                "revB",
                Decision::Repeat(job("d1", done.clone()).last_report()),
            ),
            (
                Some(job("d0", Stage::Installing)),
                None,
                "revB",
                Decision::Defer,
            ),
            (
                Some(job("d0", Stage::HealthCheck)),
                None,
                "revB",
                Decision::Defer,
            ),
            (
                Some(job("d1", Stage::HealthCheck)),
                None,
                "revB",
                Decision::Repeat(job("d1", Stage::Installing).last_report()),
            ),
            (
                Some(job("d0", Stage::Downloaded)),
                None,
                "revB",
                Decision::Start,
            ),
            (Some(job("d0", done)), None, "revB", Decision::Start),
        ];
        for (current, installed, hardware, expected) in cases {
            let got = decide(
                current.as_ref(),
                &notification("d1"),
                &m,
                installed,
                hardware,
            );
            match (&got, &expected) {
                (Decision::Refuse(reason), Decision::Refuse(_)) => assert!(
                    reason.contains("revA") || reason.contains("downgrade"),
                    "{reason}"
                ),
                _ => assert_eq!(got, expected, "{current:?} {installed:?} {hardware}"),
            }
        }
    }

    /// Every combination of incoming version (lower, equal, higher than the
    /// installed one) × manifest flag × deployment flag.
    #[test]
    fn downgrades_need_both_flags() {
        use std::cmp::Ordering::{self, Equal, Greater, Less};
        let refused = |reason: &str| Decision::Refuse(reason.to_owned());
        let neither = "downgrade from 2.0.0 to 1.2.3 refused: neither the signed manifest nor \
                       the deployment allows a downgrade (package sensor-fw)";
        let manifest_only = "downgrade from 2.0.0 to 1.2.3 refused: the deployment does not \
                             allow a downgrade (package sensor-fw)";
        let deployment_only = "downgrade from 2.0.0 to 1.2.3 refused: the signed manifest does \
                               not allow a downgrade (package sensor-fw)";
        // (incoming compared with installed, manifest flag, deployment flag, decision)
        let cases: Vec<(Ordering, bool, bool, Decision)> = vec![
            (Less, false, false, refused(neither)),
            (Less, true, false, refused(manifest_only)),
            (Less, false, true, refused(deployment_only)),
            (Less, true, true, Decision::Start),
            (Equal, false, false, Decision::AlreadyInstalled),
            (Equal, true, false, Decision::AlreadyInstalled),
            (Equal, false, true, Decision::AlreadyInstalled),
            (Equal, true, true, Decision::AlreadyInstalled),
            (Greater, false, false, Decision::Start),
            (Greater, true, false, Decision::Start),
            (Greater, false, true, Decision::Start),
            (Greater, true, true, Decision::Start),
        ];
        for (order, manifest_allows, deployment_allows, expected) in cases {
            let mut m = crate::manifest::tests::sample(); // sensor-fw 1.2.3 for revB
            m.allow_downgrade = manifest_allows;
            let installed = match order {
                Less => semver::Version::new(2, 0, 0),
                Equal => m.version.clone(),
                Greater => semver::Version::new(1, 0, 0),
            };
            let mut incoming = notification("d1");
            incoming.allow_downgrade = deployment_allows;
            let got = decide(None, &incoming, &m, Some(&installed), "revB");
            assert_eq!(
                got, expected,
                "{order:?} manifest={manifest_allows} deployment={deployment_allows}"
            );
        }
    }

    #[test]
    fn offers_carry_the_deployment_flag() {
        let mut o = offer("d1");
        o.allow_downgrade = true;
        let (n, _) = Job::from_offer(o);
        assert!(n.allow_downgrade);
    }

    #[test]
    fn steps_and_reports() {
        let mut j = Job::new(notification("d1"));
        assert_eq!(j.next_action(), Action::Download);
        assert_eq!(j.last_report().event, DeviceEvent::Received);
        assert_eq!(
            j.advance(StepResult::Downloaded).event,
            DeviceEvent::Downloaded
        );
        assert_eq!(j.next_action(), Action::Install);
        assert_eq!(
            j.advance(StepResult::InstallStarted).event,
            DeviceEvent::Installing
        );
        assert_eq!(j.next_action(), Action::Install);
        let r = j.advance(StepResult::Failed("disk full".into()));
        assert_eq!(
            (r.event, r.detail.as_deref()),
            (DeviceEvent::Failed, Some("disk full"))
        );
        assert!(j.is_finished());
        assert_eq!(j.next_action(), Action::Idle);
        assert_eq!(j.last_report(), r);
    }

    /// A health-checked install: `installing` is the last report until the
    /// check decides between `installed` and `rolled-back`.
    #[test]
    fn health_check_stage() {
        let mut j = job("d1", Stage::Installing);
        let r = j.advance(StepResult::InstallDone);
        assert_eq!(
            (r.event, &j.stage),
            (DeviceEvent::Installing, &Stage::HealthCheck)
        );
        assert_eq!(j.next_action(), Action::CheckHealth);
        assert_eq!(j.last_report().event, DeviceEvent::Installing);
        let text = serde_json::to_string(&j).unwrap();
        assert!(text.contains(r#""stage":"health-check""#), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), j);
        let r = j.advance(StepResult::HealthFailed("exit 1".into()));
        assert_eq!(r.event, DeviceEvent::Installing);
        assert_eq!(j.next_action(), Action::RollBack);
        let text = serde_json::to_string(&j).unwrap();
        assert!(
            text.contains(r#""stage":"rolling-back","reason":"exit 1""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), j);
        assert_eq!(
            decide(
                Some(&j),
                &notification("d2"),
                &crate::manifest::tests::sample(),
                None,
                "revB"
            ),
            Decision::Defer
        );
        let r = j.advance(StepResult::RolledBack("health check failed".into()));
        assert_eq!(r.event, DeviceEvent::RolledBack);
        assert_eq!(j.next_action(), Action::Idle);
    }

    #[test]
    fn job_persists_as_json() {
        let mut j = Job::new(notification("d1"));
        j.advance(StepResult::RolledBack("health check".into()));
        let text = serde_json::to_string(&j).unwrap();
        assert!(!text.contains("delivery"), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), j);

        let (pushed, delivery) = Job::from_offer(offer("d2"));
        let p = Job::with_delivery(pushed, delivery);
        let text = serde_json::to_string(&p).unwrap();
        assert!(
            text.contains(r#""delivery":{"kind":"push","chunk_size":4096}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), p);
    }

    fn offer(deployment: &str) -> PushOffer {
        let n = notification(deployment);
        PushOffer {
            signer_revocations: None,
            deployment_id: n.deployment_id,
            release: n.release,
            manifest: n.manifest,
            wrapped_key: "a2V5".into(),
            chunk_size: 4096,
            allow_downgrade: false,
        }
    }

    #[test]
    fn offers_become_linkless_push_jobs() {
        let (n, delivery) = Job::from_offer(offer("d1"));
        assert_eq!(delivery, Delivery::Push { chunk_size: 4096 });
        assert_eq!(
            (n.deployment_id.as_str(), n.link.as_str(), n.link_expires_at),
            ("d1", "", 0)
        );
        assert_eq!(n.wrapped_key, "a2V5");
        let j = Job::with_delivery(n.clone(), delivery);
        assert_eq!(j.next_action(), Action::Download);
        // An offer is decided like an update: the same deployment while
        // receiving is a refresh (the shell answers with its offset).
        let m = crate::manifest::tests::sample();
        assert_eq!(
            decide(Some(&j), &n, &m, None, "revB"),
            Decision::RefreshLink
        );
        assert_eq!(decide(None, &n, &m, None, "revB"), Decision::Start);
    }

    #[test]
    fn jobs_persisted_before_push_mode_are_links() {
        let old = r#"{"notification":{"deployment_id":"d1","release":"sensor-fw@1.2.3","manifest":{"manifest":"","signer":"","signature":""},"link":"https://x/y","link_expires_at":100,"data_key":""},"stage":"received"}"#;
        let j: Job = serde_json::from_str(old).unwrap();
        assert_eq!((j.delivery, j.stage), (Delivery::Link, Stage::Received));
    }
}
