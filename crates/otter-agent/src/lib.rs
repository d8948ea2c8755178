//! The Otter device agent (push-pull mode): registers with the update
//! service over MQTT, receives update notifications, downloads the artifact
//! over mutually authenticated HTTPS with resume, verifies, decrypts and
//! decompresses it into a landing zone, waits for a safe state, installs,
//! and reports every step.
//!
//! Layout (one concept per module):
//! - [`config`]: `agent.toml`, parsed and validated into [`AgentConfig`].
//! - [`tls`]: the rustls client configurations (MQTT, HTTPS).
//! - [`mqtt`]: the MQTT session: connection, reconnection, registration,
//!   publishing, decoding notifications.
//! - [`poll`]: polling the device HTTPS endpoint: pull mode's uplink and
//!   push-pull's reconcile poll.
//! - [`download`]: resumable HTTPS download with Range and retries.
//! - [`fetch`]: step 6 end to end (download, hash check, unpack).
//! - [`push`]: push mode's chunk writer (append at the end, sync, acknowledge).
//! - [`landing_zone`]: the per-deployment folders.
//! - [`safe_state`]: step 7, the [`safe_state::SafeStateProbe`] trait and the wait.
//! - [`inhibit`]: inhibitors programs on the device take over a Unix socket
//!   (and `otter-agent inhibit`); while one is held the agent does not
//!   install.
//! - [`install`]: step 8, the [`install::Installer`] trait and its handlers.
//! - [`health`]: the health check after an install (a failure rolls it back).
//! - [`state`]: the persisted job and installed versions.
//! - [`backoff`]: exponential backoff with jitter.
//! - [`remote_config`]: the `otter-agent-config` package (mode switch by update).
//! - [`self_update`]: packages of kind `agent`: staging, the marker, the swap.
//! - [`supervisor`]: the parent process that swaps executables and rolls back.
//! - [`enrol`]: `otter-agent enrol`, CSR enrolment with a one-time token;
//!   [`bundle`]: the bundle folder both enrolment paths write.
//! - [`agent`]: the loop tying them together; [`run`] is the entry point
//!   ([`run_with_handlers`] with another installer and probe, for the
//!   simulator) and
//!   returns a [`RunOutcome`] (stopped, restart with a new configuration, or
//!   a staged self-update for the supervisor).
//!
//! The rules of the job (what a notification means, which step comes next,
//! what to report) live in `otter_proto::job`; this crate is the I/O shell.

pub mod agent;
pub mod backoff;
pub mod bundle;
pub mod config;
pub mod download;
pub mod enrol;
pub mod fetch;
pub mod health;
pub mod inhibit;
pub mod install;
pub mod landing_zone;
pub mod mqtt;
pub mod poll;
pub mod push;
pub mod remote_config;
pub mod safe_state;
pub mod self_update;
pub mod signer_trust;
pub mod state;
pub mod supervisor;
pub mod tls;

pub use agent::{Agent, Handlers, RunOutcome, run, run_inhibited, run_with_handlers};
pub use config::AgentConfig;
