//! Otter's wire types, shared by the server and the agent.
//!
//! This crate does no I/O and reads no clock: every function takes its
//! inputs (bytes, events, `now` as Unix seconds) and returns outputs. The
//! server and the agent are shells that feed it.
//!
//! Layout:
//! - [`topics`]: MQTT topic names under `otter/devices/<id>/` and device id rules.
//! - [`manifest`]: the package manifest and its signed envelope.
//! - [`messages`]: what travels over MQTT (registration, notification, reports).
//! - [`deployment`]: the server's per-device deployment phase machine.
//! - [`job`]: the agent's update job state machine.
//! - [`push`]: the binary chunk format of push mode.
//! - [`api`]: JSON shapes of the operator REST API and the device HTTPS endpoint.
//! - [`trust`]: signed envelopes of signer certificates and revocation lists.

pub mod api;
pub mod deployment;
pub mod job;
pub mod manifest;
pub mod messages;
pub mod push;
pub mod topics;
pub mod trust;

/// Version of the device protocol spoken by this build. A registration with a
/// different major protocol is refused by the server with an error message.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest MQTT payload either side accepts, in bytes. A signed manifest plus
/// a link is a few KiB; anything near this bound is hostile or broken.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
