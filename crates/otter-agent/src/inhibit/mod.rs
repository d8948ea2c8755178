//! Inhibitors: programs on the device say "do not install now" ("batch
//! running", "robot in motion") over a local Unix socket, and the agent
//! waits (step 7) while any is held.
//!
//! Layout: [`Inhibitors`] is the shared state (name → reason, expiry,
//! holding connection), with the rules and no I/O (every call takes `now`);
//! [`InhibitServer`] is the socket shell around it; [`InhibitorGate`] is the
//! [`SafeStateProbe`] that says "not safe" while any inhibitor is held and
//! asks the configured probe otherwise; [`InhibitClient`] is the client side
//! that `otter-agent inhibit` uses.
//!
//! # Protocol
//!
//! The socket is `inhibit_socket` in `agent.toml` (default
//! `<state_dir>/inhibit.sock`), mode 0660: the agent's user and group may
//! connect (its folder must let them reach it). A connection carries
//! newline-delimited JSON, one request per line, one answer per line, in
//! order. Request lines are at most [`MAX_LINE_BYTES`]; a longer one is
//! answered with an error and the connection is closed. Blank lines are
//! skipped.
//!
//! ```text
//! {"take": {"name": "batch-42", "reason": "batch running", "ttl_seconds": 7200}}
//!     → {"ok":true}
//! {"release": {"name": "batch-42"}}
//!     → {"ok":true}
//! {"list": {}}
//!     → {"ok":true,"inhibitors":[{"name":"batch-42","reason":"batch running","ttl_seconds":7170,"mine":true}]}
//! anything wrong
//!     → {"error":"…"}
//! ```
//!
//! - `name`: 1 to [`MAX_NAME_CHARS`] characters of `A-Z a-z 0-9 . _ -`;
//!   `reason`: 1 to [`MAX_REASON_CHARS`] characters, no control characters;
//!   `ttl_seconds`: 1 to [`MAX_TTL`] (7 days).
//! - An inhibitor belongs to the connection that took it. Taking a name the
//!   same connection holds again replaces its reason and expiry; a name held
//!   by another connection is refused; only the holder releases it.
//! - An inhibitor ends when it is released, when its time to live passes,
//!   or when its connection closes (the holder died): hold the connection
//!   open for as long as the inhibitor should last.
//! - At most [`MAX_INHIBITORS`] inhibitors and [`MAX_CONNECTIONS`]
//!   connections at a time; a connection over the limit is answered with an
//!   error and closed.
//!
//! From a shell, for example:
//!
//! ```text
//! { echo '{"take":{"name":"demo","reason":"robot in motion","ttl_seconds":600}}'; sleep 600; } \
//!     | socat - UNIX-CONNECT:/var/lib/otter/inhibit.sock
//! ```
//!
//! Inhibitors live in the agent process: they survive a configuration
//! restart of the agent loop (the server is started once per process), not
//! a restart of the process, after which holders must take them again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::safe_state::{SafeStateError, SafeStateProbe, Safety};

/// Longest request or answer line, newline excluded.
pub const MAX_LINE_BYTES: usize = 4096;
/// Longest inhibitor name.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest reason.
pub const MAX_REASON_CHARS: usize = 200;
/// Longest time to live.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most inhibitors held at once, over all connections.
pub const MAX_INHIBITORS: usize = 64;
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Why a request was refused, or the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum InhibitError {
    #[error("invalid name {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    #[error("invalid reason: 1 to 200 characters, no control characters")]
    InvalidReason,
    #[error("invalid ttl_seconds {0}: 1 to 604800")]
    InvalidTtl(u64),
    #[error("inhibitor {0:?} is held by another connection")]
    HeldByAnother(String),
    #[error("inhibitor {0:?} is not held by this connection")]
    NotHeld(String),
    #[error("too many inhibitors (at most {MAX_INHIBITORS})")]
    TooMany,
    #[error("inhibit socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inhibit socket {0} is in use by a running agent")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    #[error("the agent answered: {0}")]
    Refused(String),
    #[error("the agent closed the connection")]
    Closed,
    #[error("inhibitor connection: {0}")]
    Connection(std::io::Error),
    #[error("unexpected answer from the agent: {0}")]
    BadAnswer(String),
}

/// Identifies the connection holding an inhibitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HolderId(u64);

impl HolderId {
    /// A fresh id, unique in this process.
    pub fn next() -> HolderId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        HolderId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Take(TakeRequest),
    Release(ReleaseRequest),
    List(ListRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeRequest {
    pub name: String,
    pub reason: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {}

/// One answer line: `{"ok":true}` (with `inhibitors` for a list) or
/// `{"error":"…"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inhibitors: Option<Vec<InhibitorInfo>>,
}

impl Response {
    fn ok() -> Response {
        Response {
            ok: Some(true),
            ..Response::default()
        }
    }

    fn error(message: impl std::fmt::Display) -> Response {
        Response {
            error: Some(message.to_string()),
            ..Response::default()
        }
    }
}

/// A held inhibitor as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InhibitorInfo {
    pub name: String,
    pub reason: String,
    /// Seconds left to live, rounded up.
    pub ttl_seconds: u64,
    /// Whether the asking connection holds it.
    #[serde(default)]
    pub mine: bool,
}

#[derive(Debug, Clone)]
struct Held {
    reason: String,
    expires_at: Instant,
    holder: HolderId,
}

/// The inhibitors held on this device: a cheap handle to shared state.
///
/// A `std::sync::Mutex` guards a small map; it is held only for a lookup or
/// an insert, never across `.await`. Expired entries are dropped whenever
/// the map is read, so no timer task is needed.
#[derive(Debug, Clone, Default)]
pub struct Inhibitors {
    held: Arc<Mutex<BTreeMap<String, Held>>>,
}

impl Inhibitors {
    pub fn new() -> Inhibitors {
        Inhibitors::default()
    }

    fn locked(&self, now: Instant) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        // No code panics while holding the lock; a poisoned map is still a
        // consistent map.
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|_, inhibitor| inhibitor.expires_at > now);
        held
    }

    /// Takes (or, for its holder, renews) the inhibitor `request.name`.
    pub fn take(
        &self,
        holder: HolderId,
        request: &TakeRequest,
        now: Instant,
    ) -> Result<(), InhibitError> {
        validate_name(&request.name)?;
        validate_reason(&request.reason)?;
        if request.ttl_seconds == 0 || request.ttl_seconds > MAX_TTL.as_secs() {
            return Err(InhibitError::InvalidTtl(request.ttl_seconds));
        }
        let mut held = self.locked(now);
        match held.get(&request.name) {
            Some(existing) if existing.holder != holder => {
                return Err(InhibitError::HeldByAnother(request.name.clone()));
            }
            None if held.len() >= MAX_INHIBITORS => return Err(InhibitError::TooMany),
            _ => {}
        }
        held.insert(
            request.name.clone(),
            Held {
                reason: request.reason.clone(),
                expires_at: now + Duration::from_secs(request.ttl_seconds),
                holder,
            },
        );
        Ok(())
    }

    /// Releases `name`, which `holder` must hold.
    pub fn release(&self, holder: HolderId, name: &str, now: Instant) -> Result<(), InhibitError> {
        let mut held = self.locked(now);
        match held.get(name) {
            Some(existing) if existing.holder == holder => {
                held.remove(name);
                Ok(())
            }
            _ => Err(InhibitError::NotHeld(name.to_owned())),
        }
    }

    /// Releases everything `holder` holds (its connection closed); returns
    /// the names released.
    pub fn release_holder(&self, holder: HolderId) -> Vec<String> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let names: Vec<String> = held
            .iter()
            .filter(|(_, inhibitor)| inhibitor.holder == holder)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &names {
            held.remove(name);
        }
        names
    }

    /// The inhibitors held at `now`, by name; `mine` for those of `asking`.
    pub fn list(&self, asking: Option<HolderId>, now: Instant) -> Vec<InhibitorInfo> {
        self.locked(now)
            .iter()
            .map(|(name, inhibitor)| InhibitorInfo {
                name: name.clone(),
                reason: inhibitor.reason.clone(),
                ttl_seconds: inhibitor
                    .expires_at
                    .duration_since(now)
                    .as_secs_f64()
                    .ceil() as u64,
                mine: Some(inhibitor.holder) == asking,
            })
            .collect()
    }

    /// The first inhibitor held at `now` (by name), as `(name, reason)`.
    pub fn first_held(&self, now: Instant) -> Option<(String, String)> {
        self.locked(now)
            .iter()
            .next()
            .map(|(name, inhibitor)| (name.clone(), inhibitor.reason.clone()))
    }

    /// Answers one request line of `holder`'s connection.
    pub fn answer(&self, holder: HolderId, line: &[u8], now: Instant) -> Response {
        let request: Request = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(error) => return Response::error(format!("bad request: {error}")),
        };
        let result = match &request {
            Request::Take(take) => self.take(holder, take, now),
            Request::Release(release) => self.release(holder, &release.name, now),
            Request::List(ListRequest {}) => {
                return Response {
                    inhibitors: Some(self.list(Some(holder), now)),
                    ..Response::ok()
                };
            }
        };
        match result {
            Ok(()) => {
                if let Request::Take(take) = &request {
                    tracing::info!(name = %take.name, reason = %take.reason, ttl_seconds = take.ttl_seconds, "inhibitor taken");
                } else if let Request::Release(release) = &request {
                    tracing::info!(name = %release.name, "inhibitor released");
                }
                Response::ok()
            }
            Err(error) => Response::error(error),
        }
    }
}

fn validate_name(name: &str) -> Result<(), InhibitError> {
    let valid = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(InhibitError::InvalidName(name.chars().take(80).collect()))
    }
}

fn validate_reason(reason: &str) -> Result<(), InhibitError> {
    let valid = !reason.trim().is_empty()
        && reason.chars().count() <= MAX_REASON_CHARS
        && !reason.chars().any(char::is_control);
    if valid {
        Ok(())
    } else {
        Err(InhibitError::InvalidReason)
    }
}

/// The safe-state probe of an agent with inhibitors: not safe while any
/// inhibitor is held, otherwise whatever `inner` (the configured probe)
/// says.
pub struct InhibitorGate {
    inhibitors: Inhibitors,
    inner: Arc<dyn SafeStateProbe>,
}

impl InhibitorGate {
    pub fn new(inhibitors: Inhibitors, inner: Arc<dyn SafeStateProbe>) -> InhibitorGate {
        InhibitorGate { inhibitors, inner }
    }
}

impl SafeStateProbe for InhibitorGate {
    fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
        Box::pin(async move { Ok(matches!(self.check().await?, Safety::Safe)) })
    }

    fn check(&self) -> BoxFuture<'_, Result<Safety, SafeStateError>> {
        Box::pin(async move {
            if let Some((name, reason)) = self.inhibitors.first_held(Instant::now()) {
                return Ok(Safety::NotSafe(format!("inhibited by {name}: {reason}")));
            }
            self.inner.check().await
        })
    }
}

mod client;
mod server;

pub use client::InhibitClient;
pub use server::InhibitServer;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixStream;

    fn take(name: &str, reason: &str, ttl_seconds: u64) -> TakeRequest {
        TakeRequest {
            name: name.into(),
            reason: reason.into(),
            ttl_seconds,
        }
    }

    #[test]
    fn take_release_and_ownership() {
        let inhibitors = Inhibitors::new();
        let (a, b) = (HolderId::next(), HolderId::next());
        let now = Instant::now();
        inhibitors
            .take(a, &take("batch", "batch running", 60), now)
            .unwrap();
        assert_eq!(
            inhibitors.first_held(now),
            Some(("batch".into(), "batch running".into()))
        );
        // Another connection can neither take nor release it.
        assert!(matches!(
            inhibitors.take(b, &take("batch", "mine now", 60), now),
            Err(InhibitError::HeldByAnother(_))
        ));
        assert!(matches!(
            inhibitors.release(b, "batch", now),
            Err(InhibitError::NotHeld(_))
        ));
        // Its holder renews it with a new reason.
        inhibitors
            .take(a, &take("batch", "still running", 60), now)
            .unwrap();
        let listed = inhibitors.list(Some(b), now);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].reason, "still running");
        assert!(!listed[0].mine);
        inhibitors.release(a, "batch", now).unwrap();
        assert_eq!(inhibitors.first_held(now), None);
        assert!(matches!(
            inhibitors.release(a, "batch", now),
            Err(InhibitError::NotHeld(_))
        ));
    }

    #[test]
    fn an_inhibitor_ends_with_its_time_to_live() {
        let inhibitors = Inhibitors::new();
        let holder = HolderId::next();
        let now = Instant::now();
        inhibitors
            .take(holder, &take("motion", "robot in motion", 10), now)
            .unwrap();
        let listed = inhibitors.list(Some(holder), now + Duration::from_millis(500));
        assert_eq!(listed[0].ttl_seconds, 10);
        assert!(listed[0].mine);
        assert!(
            inhibitors
                .first_held(now + Duration::from_secs(9))
                .is_some()
        );
        assert_eq!(inhibitors.first_held(now + Duration::from_secs(10)), None);
        // Expired, the name is free for another connection.
        inhibitors
            .take(
                HolderId::next(),
                &take("motion", "again", 10),
                now + Duration::from_secs(11),
            )
            .unwrap();
    }

    #[test]
    fn a_dead_holder_releases_all_it_held_and_nothing_else() {
        let inhibitors = Inhibitors::new();
        let (dead, alive) = (HolderId::next(), HolderId::next());
        let now = Instant::now();
        inhibitors.take(dead, &take("a", "one", 60), now).unwrap();
        inhibitors.take(dead, &take("b", "two", 60), now).unwrap();
        inhibitors
            .take(alive, &take("c", "three", 60), now)
            .unwrap();
        assert_eq!(
            inhibitors.release_holder(dead),
            vec!["a".to_string(), "b".to_string()]
        );
        let names: Vec<String> = inhibitors
            .list(None, now)
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, vec!["c".to_string()]);
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let inhibitors = Inhibitors::new();
        let holder = HolderId::next();
        let now = Instant::now();
        let long_name = "n".repeat(MAX_NAME_CHARS + 1);
        let long_reason = "r".repeat(MAX_REASON_CHARS + 1);
        let cases: &[(&str, &str)] = &[
            ("", "bad request"),
            ("not json", "bad request"),
            (r#"{"take": {"name": "x", "reason": "y"}}"#, "bad request"),
            (
                r#"{"take": {"name": "x", "reason": "y", "ttl_seconds": 1, "extra": 1}}"#,
                "bad request",
            ),
            (
                r#"{"take": {"name": "x", "reason": "y", "ttl_seconds": -1}}"#,
                "bad request",
            ),
            (r#"{"launch": {}}"#, "bad request"),
            (
                r#"{"take": {"name": "", "reason": "y", "ttl_seconds": 1}}"#,
                "invalid name",
            ),
            (
                r#"{"take": {"name": "a b", "reason": "y", "ttl_seconds": 1}}"#,
                "invalid name",
            ),
            (
                r#"{"take": {"name": "../x", "reason": "y", "ttl_seconds": 1}}"#,
                "invalid name",
            ),
            (
                r#"{"take": {"name": "x", "reason": "", "ttl_seconds": 1}}"#,
                "invalid reason",
            ),
            (
                r#"{"take": {"name": "x", "reason": "a\u001b[2Jb", "ttl_seconds": 1}}"#,
                "invalid reason",
            ),
            (
                r#"{"take": {"name": "x", "reason": "line\nbreak", "ttl_seconds": 1}}"#,
                "invalid reason",
            ),
            (
                r#"{"take": {"name": "x", "reason": "y", "ttl_seconds": 0}}"#,
                "invalid ttl",
            ),
            (
                r#"{"take": {"name": "x", "reason": "y", "ttl_seconds": 604801}}"#,
                "invalid ttl",
            ),
            (r#"{"release": {"name": "x"}}"#, "not held"),
        ];
        let mut all: Vec<(String, &str)> = cases
            .iter()
            .map(|(line, want)| (line.to_string(), *want))
            .collect();
        all.push((
            format!(r#"{{"take": {{"name": "{long_name}", "reason": "y", "ttl_seconds": 1}}}}"#),
            "invalid name",
        ));
        all.push((
            format!(r#"{{"take": {{"name": "x", "reason": "{long_reason}", "ttl_seconds": 1}}}}"#),
            "invalid reason",
        ));
        for (line, want) in &all {
            let answer = inhibitors.answer(holder, line.as_bytes(), now);
            let error = answer.error.unwrap_or_default();
            assert!(error.contains(want), "{line}: {error:?}");
            assert_eq!(answer.ok, None, "{line}");
        }
        assert!(inhibitors.list(None, now).is_empty());
    }

    #[test]
    fn the_number_of_inhibitors_is_bounded() {
        let inhibitors = Inhibitors::new();
        let holder = HolderId::next();
        let now = Instant::now();
        for n in 0..MAX_INHIBITORS {
            inhibitors
                .take(holder, &take(&format!("i{n}"), "r", 60), now)
                .unwrap();
        }
        assert!(matches!(
            inhibitors.take(holder, &take("one-more", "r", 60), now),
            Err(InhibitError::TooMany)
        ));
        // Renewing one already held is still possible.
        inhibitors.take(holder, &take("i0", "r", 60), now).unwrap();
    }

    #[test]
    fn the_wire_shapes() {
        let inhibitors = Inhibitors::new();
        let holder = HolderId::next();
        let now = Instant::now();
        let ok = inhibitors.answer(
            holder,
            br#"{"take": {"name": "batch-42", "reason": "batch running", "ttl_seconds": 7200}}"#,
            now,
        );
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ok":true}"#);
        let list = inhibitors.answer(holder, br#"{"list": {}}"#, now);
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"{"ok":true,"inhibitors":[{"name":"batch-42","reason":"batch running","ttl_seconds":7200,"mine":true}]}"#
        );
        let error = inhibitors.answer(holder, br#"{"release": {"name": "other"}}"#, now);
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"error":"inhibitor \"other\" is not held by this connection"}"#
        );
    }

    struct Fixed(bool);

    impl SafeStateProbe for Fixed {
        fn is_safe(&self) -> BoxFuture<'_, Result<bool, SafeStateError>> {
            let answer = self.0;
            Box::pin(async move { Ok(answer) })
        }
    }

    #[tokio::test]
    async fn the_gate_says_not_safe_while_held_then_asks_the_probe() {
        let inhibitors = Inhibitors::new();
        let gate = InhibitorGate::new(inhibitors.clone(), Arc::new(Fixed(true)));
        assert_eq!(gate.check().await.unwrap(), Safety::Safe);
        let holder = HolderId::next();
        inhibitors
            .take(
                holder,
                &take("motion", "robot in motion", 60),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(
            gate.check().await.unwrap(),
            Safety::NotSafe("inhibited by motion: robot in motion".into())
        );
        assert!(!gate.is_safe().await.unwrap());
        inhibitors.release_holder(holder);
        assert!(gate.is_safe().await.unwrap());
        let closed = InhibitorGate::new(inhibitors, Arc::new(Fixed(false)));
        assert!(matches!(closed.check().await.unwrap(), Safety::NotSafe(_)));
    }

    #[tokio::test]
    async fn over_the_socket_a_closed_connection_releases_and_long_lines_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inhibit.sock");
        // A stale socket file from a dead agent is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let inhibitors = Inhibitors::new();
        let server = InhibitServer::start(&path, inhibitors.clone()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o660);
        }
        // A second agent on the same socket is refused.
        assert!(matches!(
            InhibitServer::start(&path, Inhibitors::new()),
            Err(InhibitError::InUse(_))
        ));

        let mut holder = InhibitClient::connect(&path).await.unwrap();
        holder
            .take("motion", "robot in motion", Duration::from_secs(60))
            .await
            .unwrap();
        let mut other = InhibitClient::connect(&path).await.unwrap();
        let error = other
            .take("motion", "me too", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("held by another"), "{error}");
        let listed = other.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].mine);

        drop(holder);
        let deadline = Instant::now() + Duration::from_secs(10);
        while inhibitors.first_held(Instant::now()).is_some() {
            assert!(
                Instant::now() < deadline,
                "not released after the holder closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A line over the limit is answered with an error and cut off.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        // The server may close before all of it is written.
        let _ = raw.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).await;
        let _ = raw.write_all(b"\n").await;
        let mut answer = String::new();
        let _ = raw.read_to_string(&mut answer).await;
        assert!(answer.contains("line longer than"), "{answer}");

        server.stop().await;
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn connections_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inhibit.sock");
        let server = InhibitServer::start(&path, Inhibitors::new()).unwrap();
        // Connections are bounded; one over the limit is told and closed,
        // and a freed slot serves again.
        let mut open = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut client = InhibitClient::connect(&path).await.unwrap();
            client.list().await.unwrap();
            open.push(client);
        }
        // Read without writing: the server answers and closes at once.
        let mut refused = UnixStream::connect(&path).await.unwrap();
        let mut answer = String::new();
        let _ = refused.read_to_string(&mut answer).await;
        assert_eq!(answer, "{\"error\":\"too many connections\"}\n");
        drop(open.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = InhibitClient::connect(&path).await.unwrap();
            if client.list().await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "the freed slot never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        server.stop().await;
    }
}
