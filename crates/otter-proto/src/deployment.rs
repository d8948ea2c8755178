//! The server's view of one device in one deployment: a phase machine.
//!
//! Reports arrive over MQTT with QoS 1, so they can be duplicated, and a
//! device that restarts may repeat an older one. The machine therefore only
//! moves forward: a report for a phase already reached is [`Outcome::Ignored`],
//! never an error and never a second audit row. Terminal phases accept nothing.

use serde::{Deserialize, Serialize};

use crate::messages::DeviceEvent;

/// Where one device stands in one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Targeted at commit; no notification sent yet.
    Pending,
    /// A link was created and published to the device (step 4).
    Notified,
    /// The device acknowledged the notification (step 5).
    Received,
    /// The device downloaded and verified the payload (step 6).
    Downloaded,
    /// The device reached a safe state and started installing (step 7).
    Installing,
    /// Terminal: installed (step 8).
    Installed,
    /// Terminal: failed, with a reason in the audit.
    Failed,
    /// Terminal: installed, then rolled back.
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Notified,
        Phase::Received,
        Phase::Downloaded,
        Phase::Installing,
        Phase::Installed,
        Phase::Failed,
        Phase::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Notified => "notified",
            Phase::Received => "received",
            Phase::Downloaded => "downloaded",
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled-back",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Installed | Phase::Failed | Phase::RolledBack)
    }

    /// Whether the device still needs its download link: the server
    /// (re)publishes the notification to a device in these phases when it
    /// registers.
    pub fn needs_link(self) -> bool {
        matches!(self, Phase::Pending | Phase::Notified | Phase::Received)
    }

    fn of_event(event: DeviceEvent) -> Phase {
        match event {
            DeviceEvent::Received => Phase::Received,
            DeviceEvent::Downloaded => Phase::Downloaded,
            DeviceEvent::Installing => Phase::Installing,
            DeviceEvent::Installed => Phase::Installed,
            DeviceEvent::Failed => Phase::Failed,
            DeviceEvent::RolledBack => Phase::RolledBack,
        }
    }
}

/// Result of applying an event to a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The phase moves on; record it.
    Advanced {
        to: Phase,
        /// The device's download link is no longer needed: revoke it.
        revoke_link: bool,
    },
    /// Nothing changes (duplicate, stale or after the end).
    Ignored(&'static str),
}

/// Applies a device report to the current phase.
pub fn apply(phase: Phase, event: DeviceEvent) -> Outcome {
    if phase.is_terminal() {
        return Outcome::Ignored("deployment already finished for this device");
    }
    let to = Phase::of_event(event);
    if !to.is_terminal() && to <= phase {
        return Outcome::Ignored("phase already reached");
    }
    // A rollback means an install was attempted, so it is accepted from
    // `downloaded` on even if the `installing` report was lost on the way
    // (the device may have restarted into its old version before sending
    // it); before the download it can only be a confused device.
    if to == Phase::RolledBack && phase < Phase::Downloaded {
        return Outcome::Ignored("rollback reported before installing");
    }
    Outcome::Advanced {
        to,
        revoke_link: !to.needs_link(),
    }
}

/// The server published a notification to the device.
pub fn notified(phase: Phase) -> Phase {
    if phase == Phase::Pending {
        Phase::Notified
    } else {
        phase
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceEvent as E;
    use Phase as P;

    fn check(phase: Phase, event: DeviceEvent, expected: Option<(Phase, bool)>) {
        let got = apply(phase, event);
        match expected {
            Some((to, revoke_link)) => {
                assert_eq!(
                    got,
                    Outcome::Advanced { to, revoke_link },
                    "{phase:?} + {event:?}"
                )
            }
            None => assert!(
                matches!(got, Outcome::Ignored(_)),
                "{phase:?} + {event:?}: {got:?}"
            ),
        }
    }

    /// Event in, and the phase out with whether the link is revoked (`None`: ignored).
    type Case = (Phase, DeviceEvent, Option<(Phase, bool)>);

    #[test]
    fn table() {
        let cases: &[Case] = &[
            (P::Pending, E::Received, Some((P::Received, false))),
            (P::Notified, E::Received, Some((P::Received, false))),
            (P::Received, E::Received, None),
            (P::Received, E::Downloaded, Some((P::Downloaded, true))),
            (P::Notified, E::Downloaded, Some((P::Downloaded, true))),
            (P::Downloaded, E::Received, None),
            (P::Downloaded, E::Installing, Some((P::Installing, true))),
            (P::Installing, E::Installed, Some((P::Installed, true))),
            (P::Notified, E::Installed, Some((P::Installed, true))),
            (P::Received, E::Failed, Some((P::Failed, true))),
            (P::Installing, E::RolledBack, Some((P::RolledBack, true))),
            (P::Received, E::RolledBack, None),
            (P::Downloaded, E::RolledBack, Some((P::RolledBack, true))),
            (P::Installed, E::Installed, None),
            (P::Installed, E::Failed, None),
            (P::Failed, E::Installed, None),
            (P::RolledBack, E::Received, None),
        ];
        for &(phase, event, expected) in cases {
            check(phase, event, expected);
        }
    }

    #[test]
    fn notify_only_moves_pending() {
        assert_eq!(notified(P::Pending), P::Notified);
        for p in Phase::ALL.into_iter().filter(|p| *p != P::Pending) {
            assert_eq!(notified(p), p);
        }
    }

    #[test]
    fn names_round_trip() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
    }
}
