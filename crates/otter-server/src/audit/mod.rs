//! The audit log: the one way the server records what happened (step 9).
//!
//! Every step of the push-pull process, every refused link and every
//! rejected device message becomes one row written by [`append`], inside the
//! transaction of the change it describes when there is one, so a change and
//! its record commit together or not at all. Rows are never updated or
//! deleted (the SQLite schema enforces this with triggers).
//!
//! The log is tamper-evident: rows form a keyed hash chain. Row `n` stores
//! `prev_hash` (row `n-1`'s hash; 32 zero bytes for the first row) and
//! `hash = HMAC-SHA256(audit key, prev_hash || encoding of row n)`, where
//! [`AuditRowFields::encode`] length-prefixes every field so that no two
//! rows encode alike. The key, [`AuditKey`], is 32 random bytes in
//! `DATA_DIR/audit.key` (0600), never in the database: someone who can only
//! write the database cannot compute a valid hash for an edited row.
//! [`verify`] walks the chain in pages and reports the first row that was
//! altered, removed or moved ([`otter_proto::api::AuditVerification`]).
//!
//! [`append`] reads the chain head (last seq and hash) and inserts the next
//! row with an explicit `seq = head + 1`, on the transaction it is given.
//! That is safe because every SQLite write holds the store's in-process
//! write gate (and `BEGIN IMMEDIATE`); were two appends ever to race, the
//! second would fail on the primary key instead of forking the chain.
//! PostgreSQL (several server replicas) will need a lock on the chain head
//! in the same transaction, e.g. `SELECT … FOR UPDATE` on a one-row
//! `audit_head` table, since its writers are not serialised in-process.
//!
//! Upgrade: rows written before the chain existed have NULL hashes. They
//! are chained once, by [`chain_unhashed`], when the key is first created
//! ([`KeyFile::New`]); the key is kept as `audit.key.pending` until that
//! transaction commits, so an interrupted first start redoes it with the
//! same key. Once `audit.key` exists NULL hashes are never filled in again:
//! verification reports them, as an attacker could otherwise have the
//! server re-chain rows edited after their hash was set.
//!
//! Layout: actors, events and records; [`append`] and the [`AuditQueue`];
//! then the chain: [`AuditKey`] and its file, [`AuditRowFields`],
//! [`chain_unhashed`], [`verify`].

use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use otter_proto::api::{ActorKind, AuditHead, AuditProblem, AuditProblemKind, AuditVerification};
use otter_proto::messages::DeviceEvent;
use otter_proto::topics::DeviceId;
use sha2::Sha256;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::mpsc;

use crate::store::{Store, WriteTransaction};

mod chain;
mod queue;

pub use chain::*;
pub use queue::*;

/// Who caused an audited event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub kind: ActorKind,
    /// Operator token name, device id or `server`.
    pub name: String,
}

impl Actor {
    pub fn operator(token_name: &str) -> Actor {
        Actor {
            kind: ActorKind::Operator,
            name: token_name.to_owned(),
        }
    }

    pub fn device(device_id: &DeviceId) -> Actor {
        Actor {
            kind: ActorKind::Device,
            name: device_id.to_string(),
        }
    }

    pub fn server() -> Actor {
        Actor {
            kind: ActorKind::Server,
            name: "server".to_owned(),
        }
    }

    fn kind_str(&self) -> &'static str {
        match self.kind {
            ActorKind::Operator => "operator",
            ActorKind::Device => "device",
            ActorKind::Server => "server",
        }
    }
}

/// Parses a stored actor kind.
pub(crate) fn parse_actor_kind(kind: &str) -> Option<ActorKind> {
    match kind {
        "operator" => Some(ActorKind::Operator),
        "device" => Some(ActorKind::Device),
        "server" => Some(ActorKind::Server),
        _ => None,
    }
}

/// The events the server records. Names are part of the audit's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    DeviceEnrolled,
    DeviceRegistered,
    /// A device's registration set or changed its encryption key, with the
    /// old and new key fingerprints.
    DeviceEncryptionKeySet,
    ReleaseUploaded,
    DeploymentCreated,
    /// One per device a deployment targets (step 3).
    DeploymentTargeted,
    LinkCreated,
    /// A notification with a link was published to the device (step 4).
    NotificationSent,
    /// A device report advanced its phase (steps 5–8).
    Device(DeviceEvent),
    LinkRevoked,
    /// One per download request, with the range start.
    DownloadServed,
    /// A download link was refused (403/410), with the reason.
    LinkRefused,
    /// A device message could not be accepted.
    MessageRejected,
    /// Push mode: the offer was published, with the offset last
    /// acknowledged (step 4).
    PushOffered,
    /// Push mode: a transfer restarted from a non-zero acknowledged offset.
    PushResumed,
    /// Push mode: the device holds the whole artifact, with the bytes sent.
    PushCompleted,
    /// An operator token was created, with its name and role.
    TokenCreated,
    /// An operator token was revoked, with its name and role.
    TokenRevoked,
    /// A device certificate was revoked, with its serial and the reason.
    DeviceRevoked,
    /// A one-time enrolment token was created, with its id and device.
    EnrolmentTokenCreated,
    /// An unused enrolment token was revoked, with its id and device.
    EnrolmentTokenRevoked,
    /// A signer revocation list was published, with its sequence and the
    /// revoked key ids.
    SignerRevocationsPublished,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::DeviceEnrolled => "device.enrolled",
            AuditEvent::DeviceRegistered => "device.registered",
            AuditEvent::DeviceEncryptionKeySet => "device.encryption-key-set",
            AuditEvent::ReleaseUploaded => "release.uploaded",
            AuditEvent::DeploymentCreated => "deployment.created",
            AuditEvent::DeploymentTargeted => "deployment.targeted",
            AuditEvent::LinkCreated => "link.created",
            AuditEvent::NotificationSent => "notification.sent",
            AuditEvent::Device(DeviceEvent::Received) => "device.received",
            AuditEvent::Device(DeviceEvent::Downloaded) => "device.downloaded",
            AuditEvent::Device(DeviceEvent::Installing) => "device.installing",
            AuditEvent::Device(DeviceEvent::Installed) => "device.installed",
            AuditEvent::Device(DeviceEvent::Failed) => "device.failed",
            AuditEvent::Device(DeviceEvent::RolledBack) => "device.rolled-back",
            AuditEvent::LinkRevoked => "link.revoked",
            AuditEvent::DownloadServed => "download.served",
            AuditEvent::LinkRefused => "link.refused",
            AuditEvent::MessageRejected => "message.rejected",
            AuditEvent::PushOffered => "push.offered",
            AuditEvent::PushResumed => "push.resumed",
            AuditEvent::PushCompleted => "push.completed",
            AuditEvent::TokenCreated => "token.created",
            AuditEvent::TokenRevoked => "token.revoked",
            AuditEvent::DeviceRevoked => "device.revoked",
            AuditEvent::EnrolmentTokenCreated => "enrolment-token.created",
            AuditEvent::EnrolmentTokenRevoked => "enrolment-token.revoked",
            AuditEvent::SignerRevocationsPublished => "signer-revocations.published",
        }
    }
}

/// One row to append.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub actor: &'a Actor,
    pub device_id: Option<&'a str>,
    pub deployment_id: Option<&'a str>,
    pub event: AuditEvent,
    pub details: serde_json::Value,
}

impl<'a> AuditRecord<'a> {
    pub fn new(actor: &'a Actor, event: AuditEvent) -> Self {
        AuditRecord {
            actor,
            device_id: None,
            deployment_id: None,
            event,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn device(mut self, device_id: &'a str) -> Self {
        self.device_id = Some(device_id);
        self
    }

    pub fn deployment(mut self, deployment_id: &'a str) -> Self {
        self.deployment_id = Some(deployment_id);
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// Appends one audit row, chained to the last one, in `transaction` and
/// returns its sequence number.
pub(crate) async fn append(
    transaction: &mut WriteTransaction,
    at: &str,
    record: &AuditRecord<'_>,
) -> Result<i64, sqlx::Error> {
    append_all(transaction, &[(at, record.clone())]).await?;
    // `append_all` leaves the head at the row it just wrote.
    let (seq, _) = transaction
        .audit_chain
        .head
        .ok_or_else(|| sqlx::Error::Protocol("the audit append wrote no row".to_owned()))?;
    tracing::debug!(
        seq,
        event = record.event.as_str(),
        actor = %record.actor.name,
        device = record.device_id,
        deployment = record.deployment_id,
        "audit"
    );
    Ok(seq)
}

/// Rows per `INSERT` statement of [`append_all`] (ten parameters each, far
/// below SQLite's limit of 32,766).
const ROWS_PER_INSERT: usize = 400;

/// Appends `records` (each with its time), in order: the same rows as one
/// [`append`] each, chained the same way, but written with one multi-row
/// `INSERT` per [`ROWS_PER_INSERT`] rows instead of one statement each (a
/// deployment's batch of 500 notifications writes its 500 audit rows in two
/// statements).
pub(crate) async fn append_all(
    transaction: &mut WriteTransaction,
    records: &[(&str, AuditRecord<'_>)],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev_hash) = match transaction.audit_chain.head {
        Some((seq, hash)) => (next_seq(seq)?, hash),
        None => chain_head(transaction).await?,
    };
    for chunk in records.chunks(ROWS_PER_INSERT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for (at, record) in chunk {
            let details = record.details.to_string();
            let fields = AuditRowFields {
                seq,
                at,
                actor_kind: record.actor.kind_str(),
                actor: &record.actor.name,
                device_id: record.device_id,
                deployment_id: record.deployment_id,
                event: record.event.as_str(),
                details: &details,
            };
            let hash = transaction.audit_chain.key.chain_hash(&prev_hash, &fields);
            rows.push((seq, *at, record, details, prev_hash, hash));
            transaction.audit_chain.head = Some((seq, hash));
            prev_hash = hash;
            seq = next_seq(seq)?;
        }
        let values: Vec<String> = (0..rows.len())
            .map(|row| {
                let first = row * 10 + 1;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    first,
                    first + 1,
                    first + 2,
                    first + 3,
                    first + 4,
                    first + 5,
                    first + 6,
                    first + 7,
                    first + 8,
                    first + 9
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO audit (seq, at, actor_kind, actor, device_id, deployment_id, event, details, prev_hash, hash) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (row_seq, at, record, details, row_prev, row_hash) in &rows {
            query = query
                .bind(*row_seq)
                .bind(*at)
                .bind(record.actor.kind_str())
                .bind(record.actor.name.as_str())
                .bind(record.device_id)
                .bind(record.deployment_id)
                .bind(record.event.as_str())
                .bind(details.as_str())
                .bind(hex::encode(row_prev))
                .bind(hex::encode(row_hash));
        }
        query.execute(&mut **transaction).await?;
    }
    tracing::debug!(rows = records.len(), "audit rows appended");
    Ok(())
}

/// What [`append`] needs in a write transaction: the key, and the chain
/// head once read. Caching the head is safe because the transaction holds
/// the write lock: no other row can be appended before it ends.
#[derive(Debug)]
pub(crate) struct ChainWriter {
    key: std::sync::Arc<AuditKey>,
    /// Seq and hash of the last row this transaction appended.
    head: Option<(i64, [u8; AUDIT_KEY_LEN])>,
}

impl ChainWriter {
    pub(crate) fn new(key: std::sync::Arc<AuditKey>) -> Self {
        ChainWriter { key, head: None }
    }
}

/// The seq and `prev_hash` of the row to append after the stored head.
async fn chain_head(
    transaction: &mut WriteTransaction,
) -> Result<(i64, [u8; AUDIT_KEY_LEN]), sqlx::Error> {
    let head = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **transaction)
        .await?;
    let Some(row) = head else {
        return Ok((1, GENESIS_HASH));
    };
    let seq: i64 = row.try_get("seq")?;
    let hash: Option<String> = row.try_get("hash")?;
    let prev_hash =
        hash.as_deref()
            .and_then(decode_hash)
            .ok_or_else(|| sqlx::Error::ColumnDecode {
                index: "hash".to_owned(),
                source: format!(
                    "audit row {seq} has no valid chain hash; run `otter audit verify`"
                )
                .into(),
            })?;
    Ok((next_seq(seq)?, prev_hash))
}

fn next_seq(seq: i64) -> Result<i64, sqlx::Error> {
    seq.checked_add(1).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "seq".to_owned(),
        source: "audit sequence number overflow".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_event_names() {
        let expected = [
            (DeviceEvent::Received, "device.received"),
            (DeviceEvent::Downloaded, "device.downloaded"),
            (DeviceEvent::Installing, "device.installing"),
            (DeviceEvent::Installed, "device.installed"),
            (DeviceEvent::Failed, "device.failed"),
            (DeviceEvent::RolledBack, "device.rolled-back"),
        ];
        for (event, name) in expected {
            assert_eq!(AuditEvent::Device(event).as_str(), name);
            assert_eq!(format!("device.{}", event.as_str()), name);
        }
    }

    fn fields<'a>(
        actor: &'a str,
        device_id: Option<&'a str>,
        details: &'a str,
    ) -> AuditRowFields<'a> {
        AuditRowFields {
            seq: 7,
            at: "2026-11-25T10:00:00.000Z",
            actor_kind: "operator",
            actor,
            device_id,
            deployment_id: None,
            event: "device.enrolled",
            details,
        }
    }

    #[test]
    fn encoding_keeps_field_boundaries() {
        let base = fields("admin", Some("d1"), "{}");
        let variants = [
            // Bytes moved from one field to its neighbour.
            fields("admind", Some("1"), "{}"),
            fields("admin", Some("d1{"), "}"),
            // Absent and empty differ.
            fields("admin", None, "{}"),
            fields("admin", Some(""), "{}"),
            AuditRowFields { seq: 8, ..base },
        ];
        for variant in variants {
            assert_ne!(base.encode(), variant.encode(), "{variant:?}");
        }
        assert_eq!(base.encode(), fields("admin", Some("d1"), "{}").encode());
    }

    #[test]
    fn chain_hash_depends_on_key_previous_hash_and_content() {
        let key = AuditKey::from_bytes([1; AUDIT_KEY_LEN]);
        let row = fields("admin", Some("d1"), "{}");
        let hash = key.chain_hash(&GENESIS_HASH, &row);
        assert_eq!(hash, key.chain_hash(&GENESIS_HASH, &row));
        assert_ne!(
            hash,
            AuditKey::from_bytes([2; AUDIT_KEY_LEN]).chain_hash(&GENESIS_HASH, &row)
        );
        assert_ne!(hash, key.chain_hash(&[9; AUDIT_KEY_LEN], &row));
        assert_ne!(
            hash,
            key.chain_hash(&GENESIS_HASH, &fields("admin", Some("d2"), "{}"))
        );
    }

    #[test]
    fn hashes_decode_only_as_written() {
        let hash = [0xab; AUDIT_KEY_LEN];
        assert_eq!(decode_hash(&hex::encode(hash)), Some(hash));
        assert_eq!(decode_hash(&hex::encode(hash).to_uppercase()), None);
        assert_eq!(decode_hash(&hex::encode(&hash[..31])), None);
        assert_eq!(decode_hash(&"zz".repeat(AUDIT_KEY_LEN)), None);
        assert_eq!(decode_hash(""), None);
    }

    #[test]
    fn key_file_is_pending_until_established() {
        let dir = tempfile::tempdir().unwrap();
        let KeyFile::New(pending) = AuditKey::load(dir.path()).unwrap() else {
            panic!("a fresh folder has no established key");
        };
        let pending_bytes = std::fs::read(dir.path().join(PENDING_KEY_FILE)).unwrap();
        // Loading again before establishing gives the same pending key.
        let KeyFile::New(again) = AuditKey::load(dir.path()).unwrap() else {
            panic!("still pending");
        };
        assert_eq!(again.key.0.to_vec(), pending_bytes);
        let key = pending.establish().unwrap();
        assert_eq!(key.0.to_vec(), pending_bytes);
        let KeyFile::Established(loaded) = AuditKey::load(dir.path()).unwrap() else {
            panic!("established after the rename");
        };
        assert_eq!(loaded.0, key.0);
        assert!(!dir.path().join(PENDING_KEY_FILE).exists());

        std::fs::write(dir.path().join(AUDIT_KEY_FILE), [0u8; 40]).unwrap();
        assert!(matches!(
            AuditKey::load(dir.path()),
            Err(AuditKeyError::WrongLength { len: 33, .. })
        ));
    }

    #[test]
    fn actor_kinds_round_trip() {
        for actor in [
            Actor::operator("admin"),
            Actor::device(&DeviceId::parse("d1").unwrap()),
            Actor::server(),
        ] {
            assert_eq!(parse_actor_kind(actor.kind_str()), Some(actor.kind));
        }
    }
}
