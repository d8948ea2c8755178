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
//! - [`download`]: resumable HTTPS download with Range and retries.
//! - [`fetch`]: step 6 end to end (download, hash check, unpack).
//! - [`landing_zone`]: the per-deployment folders.
//! - [`safe_state`]: step 7, the [`safe_state::SafeStateProbe`] trait and the wait.
//! - [`install`]: step 8, the [`install::Installer`] trait and its handlers.
//! - [`state`]: the persisted job and installed versions.
//! - [`backoff`]: exponential backoff with jitter.
//! - [`agent`]: the loop tying them together; [`run`] is the entry point.
//!
//! The rules of the job (what a notification means, which step comes next,
//! what to report) live in `otter_proto::job`; this crate is the I/O shell.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod download;
pub mod fetch;
pub mod install;
pub mod landing_zone;
pub mod mqtt;
pub mod safe_state;
pub mod state;
pub mod tls;

pub use agent::{Agent, Handlers, run};
pub use config::AgentConfig;
