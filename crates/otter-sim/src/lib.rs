//! `otter-sim`: many simulated devices in one process against a real
//! `otter-server`, and the three-mode benchmark built on them.
//!
//! Each simulated device is the real agent library (`otter_agent`) with its
//! own certificate, MQTT session and/or poll client, downloads, checks,
//! landing zone and persisted state; only the installer and the safe-state
//! probe are simulated, behind the agent's own traits.
//!
//! Layout:
//! - [`fleet`]: [`fleet::Fleet`], N agents in this process, their folders,
//!   connection spreading over several server addresses, pacing;
//! - [`handlers`]: the simulated installer and the shared [`handlers::InstallLog`];
//! - [`api`]: the operator API client (batch enrolment, releases,
//!   deployments, audit, `/metrics`);
//! - [`package`]: random payloads built into signed packages;
//! - [`limits`]: the open-files limit;
//! - [`baselines`]: the floors measured in the same run (Mosquitto fan-out,
//!   nginx downloads, the bare codecs) and the shared HTTPS download loop;
//! - [`bench`]: `otter-sim bench`, its own server per mode, the measurements
//!   and the reports (JSON, Markdown, SVG).

pub mod api;
pub mod baselines;
pub mod bench;
pub mod fleet;
pub mod handlers;
pub mod limits;
pub mod package;

use otter_proto::api::{BatchEnrollRequest, EnrollRequest};
use otter_proto::topics::DeviceId;

/// The enrolment request for `count` devices `PREFIX-00000`, ... carrying
/// `tag`.
pub fn enroll_request(
    prefix: &str,
    count: usize,
    tag: &str,
    hardware: &str,
) -> Result<BatchEnrollRequest, otter_proto::topics::DeviceIdError> {
    let devices = (0..count)
        .map(|n| {
            Ok(EnrollRequest {
                device_id: DeviceId::parse(&format!("{prefix}-{n:05}"))?,
                tags: vec![tag.to_owned()],
                hardware: hardware.to_owned(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BatchEnrollRequest { devices })
}
