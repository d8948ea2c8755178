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
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::DeviceEnrolled => "device.enrolled",
            AuditEvent::DeviceRegistered => "device.registered",
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
    let (seq, prev_hash) = match transaction.audit_chain.head {
        Some((seq, hash)) => (next_seq(seq)?, hash),
        None => chain_head(transaction).await?,
    };
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
    sqlx::query(
        "INSERT INTO audit (seq, at, actor_kind, actor, device_id, deployment_id, event, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(seq)
    .bind(at)
    .bind(fields.actor_kind)
    .bind(fields.actor)
    .bind(fields.device_id)
    .bind(fields.deployment_id)
    .bind(fields.event)
    .bind(fields.details)
    .bind(hex::encode(prev_hash))
    .bind(hex::encode(hash))
    .execute(&mut **transaction)
    .await?;
    transaction.audit_chain.head = Some((seq, hash));
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

/// Rows queued by [`AuditQueue::record`] written per transaction at most.
pub const QUEUE_BATCH: usize = 512;
/// Rows the queue holds before [`AuditQueue::record`] waits for room.
const QUEUE_CAPACITY: usize = 8192;

/// An owned row, for [`AuditQueue`].
#[derive(Debug, Clone)]
pub struct QueuedAudit {
    pub at: String,
    pub actor: Actor,
    pub device_id: Option<String>,
    pub deployment_id: Option<String>,
    pub event: AuditEvent,
    pub details: serde_json::Value,
}

impl QueuedAudit {
    pub fn of(at: String, record: &AuditRecord<'_>) -> QueuedAudit {
        QueuedAudit {
            at,
            actor: record.actor.clone(),
            device_id: record.device_id.map(str::to_owned),
            deployment_id: record.deployment_id.map(str::to_owned),
            event: record.event,
            details: record.details.clone(),
        }
    }

    pub fn record(&self) -> AuditRecord<'_> {
        AuditRecord {
            actor: &self.actor,
            device_id: self.device_id.as_deref(),
            deployment_id: self.deployment_id.as_deref(),
            event: self.event,
            details: self.details.clone(),
        }
    }
}

/// Audit rows of events that change no other state (a download served, a
/// link refused), written in the background in batches by
/// [`write_queued`]: one transaction for up to [`QUEUE_BATCH`] rows instead
/// of one each, and the request that caused them never waits for the
/// database's write lock. A row keeps the time of its event; it is in the
/// database a few milliseconds later, and lost only if the process dies in
/// between (a graceful stop writes everything queued).
#[derive(Debug, Clone)]
pub struct AuditQueue {
    sender: mpsc::Sender<QueuedAudit>,
}

impl AuditQueue {
    /// The queue and its receiving end, for [`write_queued`].
    pub fn new() -> (AuditQueue, mpsc::Receiver<QueuedAudit>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (AuditQueue { sender }, receiver)
    }

    /// Queues a row stamped `at`; waits only if the queue is full.
    pub async fn record(&self, at: String, record: &AuditRecord<'_>) {
        if self.sender.send(QueuedAudit::of(at, record)).await.is_err() {
            tracing::error!(
                event = record.event.as_str(),
                device = record.device_id,
                "audit writer stopped; row lost"
            );
        }
    }
}

/// Writes queued rows until every [`AuditQueue`] is dropped and the queue
/// is empty.
pub async fn write_queued(store: Store, mut receiver: mpsc::Receiver<QueuedAudit>) {
    let mut batch = Vec::with_capacity(QUEUE_BATCH);
    while receiver.recv_many(&mut batch, QUEUE_BATCH).await > 0 {
        if let Err(error) = store.append_audits(&batch).await {
            tracing::error!(%error, rows = batch.len(), "cannot write queued audit rows");
        }
        batch.clear();
    }
}

// ---------------------------------------------------------------------------
// The hash chain.

/// Length of the audit key and of every chain hash, in bytes.
pub const AUDIT_KEY_LEN: usize = 32;
/// Name of the key file in the data directory.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// The key while the rows written before the chain existed are chained.
const PENDING_KEY_FILE: &str = "audit.key.pending";
/// What the first row's `prev_hash` is.
const GENESIS_HASH: [u8; AUDIT_KEY_LEN] = [0; AUDIT_KEY_LEN];
/// Rows read per query by [`verify`] and [`chain_unhashed`].
const CHAIN_PAGE: i64 = 1000;

/// The key of the audit hash chain. Lives in `DATA_DIR/audit.key`.
#[derive(Clone)]
pub struct AuditKey([u8; AUDIT_KEY_LEN]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

/// Best effort: do not leave the key in freed memory.
impl Drop for AuditKey {
    fn drop(&mut self) {
        self.0 = [0; AUDIT_KEY_LEN];
    }
}

/// Why the audit key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, expected {AUDIT_KEY_LEN}")]
    WrongLength { path: String, len: usize },
}

/// The audit key as found in the data directory.
#[derive(Debug)]
pub enum KeyFile {
    /// `audit.key` exists: the chain is established.
    Established(AuditKey),
    /// First start with a chain: the key is still `audit.key.pending`
    /// until [`PendingKey::establish`]; rows without hash may be chained.
    New(PendingKey),
}

/// A key not yet promoted to `audit.key`.
#[derive(Debug)]
pub struct PendingKey {
    pub key: AuditKey,
    pending_path: PathBuf,
    final_path: PathBuf,
}

impl PendingKey {
    /// Renames `audit.key.pending` to `audit.key`.
    pub fn establish(self) -> Result<AuditKey, AuditKeyError> {
        std::fs::rename(&self.pending_path, &self.final_path).map_err(|source| {
            AuditKeyError::Io {
                path: self.final_path.display().to_string(),
                source,
            }
        })?;
        Ok(self.key)
    }
}

impl AuditKey {
    pub fn from_bytes(bytes: [u8; AUDIT_KEY_LEN]) -> Self {
        AuditKey(bytes)
    }

    /// Reads `dir/audit.key`; without it, reads or creates (32 random
    /// bytes, mode 0600) `dir/audit.key.pending`.
    pub fn load(dir: &Path) -> Result<KeyFile, AuditKeyError> {
        let final_path = dir.join(AUDIT_KEY_FILE);
        if let Some(key) = read_key(&final_path)? {
            return Ok(KeyFile::Established(key));
        }
        let pending_path = dir.join(PENDING_KEY_FILE);
        let key = match read_key(&pending_path)? {
            Some(key) => key,
            None => {
                let bytes: [u8; AUDIT_KEY_LEN] = rand::random();
                crate::files::write_private_atomically(&pending_path, &bytes).map_err(
                    |source| AuditKeyError::Io {
                        path: pending_path.display().to_string(),
                        source,
                    },
                )?;
                AuditKey(bytes)
            }
        };
        Ok(KeyFile::New(PendingKey {
            key,
            pending_path,
            final_path,
        }))
    }

    /// `HMAC-SHA256(key, prev_hash || fields.encode())`.
    pub fn chain_hash(
        &self,
        prev_hash: &[u8; AUDIT_KEY_LEN],
        fields: &AuditRowFields<'_>,
    ) -> [u8; AUDIT_KEY_LEN] {
        // A 32-byte key is always a valid HMAC key.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(prev_hash);
        mac.update(&fields.encode());
        let mut hash = [0u8; AUDIT_KEY_LEN];
        hash.copy_from_slice(&mac.finalize().into_bytes());
        hash
    }
}

/// The key file's 32 bytes, or `None` if it does not exist.
fn read_key(path: &Path) -> Result<Option<AuditKey>, AuditKeyError> {
    let io_error = |source| AuditKeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(error)),
    };
    let mut bytes = Vec::with_capacity(AUDIT_KEY_LEN);
    // One byte more than needed reveals a longer file.
    file.take(AUDIT_KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    let key: [u8; AUDIT_KEY_LEN] =
        bytes
            .as_slice()
            .try_into()
            .map_err(|_| AuditKeyError::WrongLength {
                path: path.display().to_string(),
                len: bytes.len(),
            })?;
    Ok(Some(AuditKey(key)))
}

/// The hashed content of one audit row, as stored (`details` is the stored
/// JSON text, not a re-serialisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRowFields<'a> {
    pub seq: i64,
    pub at: &'a str,
    pub actor_kind: &'a str,
    pub actor: &'a str,
    pub device_id: Option<&'a str>,
    pub deployment_id: Option<&'a str>,
    pub event: &'a str,
    pub details: &'a str,
}

impl AuditRowFields<'_> {
    /// The canonical encoding: `seq` as 8 bytes big-endian, then each text
    /// field as its length (8 bytes big-endian) and its UTF-8 bytes; an
    /// optional field is one byte, 0 (absent) or 1 (present, followed by
    /// the text). Every field's extent is explicit, so moving bytes from
    /// one field to the next changes the encoding.
    pub fn encode(&self) -> Vec<u8> {
        fn text(out: &mut Vec<u8>, value: &str) {
            out.extend_from_slice(&(value.len() as u64).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        fn optional(out: &mut Vec<u8>, value: Option<&str>) {
            match value {
                None => out.push(0),
                Some(value) => {
                    out.push(1);
                    text(out, value);
                }
            }
        }
        let mut out = Vec::with_capacity(
            8 + 7 * 9 + self.at.len() + self.actor.len() + self.event.len() + self.details.len(),
        );
        out.extend_from_slice(&self.seq.to_be_bytes());
        text(&mut out, self.at);
        text(&mut out, self.actor_kind);
        text(&mut out, self.actor);
        optional(&mut out, self.device_id);
        optional(&mut out, self.deployment_id);
        text(&mut out, self.event);
        text(&mut out, self.details);
        out
    }
}

/// A 64-character lowercase hex hash, decoded.
fn decode_hash(text: &str) -> Option<[u8; AUDIT_KEY_LEN]> {
    let mut hash = [0u8; AUDIT_KEY_LEN];
    if text.len() != 2 * AUDIT_KEY_LEN || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

const CHAIN_COLUMNS: &str =
    "seq, at, actor_kind, actor, device_id, deployment_id, event, details, prev_hash, hash";

/// One stored row as read for the chain.
struct ChainRow {
    seq: i64,
    at: String,
    actor_kind: String,
    actor: String,
    device_id: Option<String>,
    deployment_id: Option<String>,
    event: String,
    details: String,
    prev_hash: Option<String>,
    hash: Option<String>,
}

impl ChainRow {
    fn read(row: &AnyRow) -> Result<ChainRow, sqlx::Error> {
        Ok(ChainRow {
            seq: row.try_get("seq")?,
            at: row.try_get("at")?,
            actor_kind: row.try_get("actor_kind")?,
            actor: row.try_get("actor")?,
            device_id: row.try_get("device_id")?,
            deployment_id: row.try_get("deployment_id")?,
            event: row.try_get("event")?,
            details: row.try_get("details")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
        })
    }

    fn fields(&self) -> AuditRowFields<'_> {
        AuditRowFields {
            seq: self.seq,
            at: &self.at,
            actor_kind: &self.actor_kind,
            actor: &self.actor,
            device_id: self.device_id.as_deref(),
            deployment_id: self.deployment_id.as_deref(),
            event: &self.event,
            details: &self.details,
        }
    }
}

/// Rows after `after`, in sequence order, one page.
async fn chain_page(
    connection: &mut AnyConnection,
    after: i64,
) -> Result<Vec<AnyRow>, sqlx::Error> {
    // Safe: only the fixed column list is formatted in.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {CHAIN_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"
    )))
    .bind(after)
    .bind(CHAIN_PAGE)
    .fetch_all(connection)
    .await
}

/// Chains every row whose hash is NULL (rows written before the chain
/// existed), in sequence order, each from the hash of the row before it;
/// rows that already have a hash are left as they are. Runs inside the
/// caller's transaction; returns the number of rows chained.
pub(crate) async fn chain_unhashed(
    connection: &mut AnyConnection,
    key: &AuditKey,
) -> Result<u64, sqlx::Error> {
    let first: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM audit WHERE hash IS NULL")
        .fetch_one(&mut *connection)
        .await?;
    let Some(first) = first else {
        return Ok(0);
    };
    let before: Option<Option<String>> =
        sqlx::query_scalar("SELECT hash FROM audit WHERE seq < $1 ORDER BY seq DESC LIMIT 1")
            .bind(first)
            .fetch_optional(&mut *connection)
            .await?;
    let mut prev_hash = match before {
        None => GENESIS_HASH,
        // Not NULL: `first` is the smallest seq with a NULL hash.
        Some(hash) => hash
            .as_deref()
            .and_then(decode_hash)
            .ok_or_else(|| unreadable_hash(first))?,
    };
    let mut after = first - 1;
    let mut chained = 0;
    loop {
        let page = chain_page(connection, after).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.try_get("seq")?;
        for row in &page {
            let row = ChainRow::read(row)?;
            if let Some(hash) = &row.hash {
                prev_hash = decode_hash(hash).ok_or_else(|| unreadable_hash(row.seq))?;
                continue;
            }
            let hash = key.chain_hash(&prev_hash, &row.fields());
            sqlx::query("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3")
                .bind(hex::encode(prev_hash))
                .bind(hex::encode(hash))
                .bind(row.seq)
                .execute(&mut *connection)
                .await?;
            prev_hash = hash;
            chained += 1;
        }
    }
    Ok(chained)
}

fn unreadable_hash(seq: i64) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: "hash".to_owned(),
        source: format!("audit row {seq} has an unreadable chain hash").into(),
    }
}

/// Checks the whole chain from its first row, [`CHAIN_PAGE`] rows per
/// query, and stops at the first problem. Rows appended while it runs are
/// checked too if they arrive before the walk ends.
pub(crate) async fn verify(
    pool: &AnyPool,
    key: &AuditKey,
) -> Result<AuditVerification, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let mut checker = ChainChecker::default();
    let mut after = 0;
    loop {
        let page = chain_page(&mut connection, after).await?;
        let Some(last) = page.last() else {
            return Ok(checker.finish(None));
        };
        after = last.try_get("seq")?;
        for row in &page {
            if let Some(problem) = checker.check(key, row) {
                return Ok(checker.finish(Some(problem)));
            }
        }
    }
}

/// The state of a walk along the chain: the last row that verified.
#[derive(Debug, Default)]
struct ChainChecker {
    rows_checked: u64,
    head: Option<(i64, [u8; AUDIT_KEY_LEN])>,
}

impl ChainChecker {
    /// Checks the next row in sequence order; on success it becomes the head.
    fn check(&mut self, key: &AuditKey, row: &AnyRow) -> Option<AuditProblem> {
        let expected_seq = self.head.map_or(1, |(seq, _)| seq.saturating_add(1));
        let expected_prev = self.head.map_or(GENESIS_HASH, |(_, hash)| hash);
        let problem = |seq, kind, message: String| Some(AuditProblem { seq, kind, message });
        let row = match ChainRow::read(row) {
            Ok(row) => row,
            Err(error) => {
                let seq = row.try_get("seq").unwrap_or(expected_seq);
                return problem(
                    seq,
                    AuditProblemKind::Altered,
                    format!("the row cannot be read: {error}"),
                );
            }
        };
        if row.seq < expected_seq {
            return problem(
                row.seq,
                AuditProblemKind::Unlinked,
                format!(
                    "row {} is out of sequence (expected row {expected_seq})",
                    row.seq
                ),
            );
        }
        if row.seq != expected_seq {
            let message = if row.seq - 1 == expected_seq {
                format!(
                    "row {expected_seq} is missing (the next row is {})",
                    row.seq
                )
            } else {
                format!(
                    "rows {expected_seq} to {} are missing (the next row is {})",
                    row.seq - 1,
                    row.seq
                )
            };
            return problem(expected_seq, AuditProblemKind::Missing, message);
        }
        let (Some(prev_text), Some(hash_text)) = (&row.prev_hash, &row.hash) else {
            return problem(
                row.seq,
                AuditProblemKind::Unchained,
                "the row has no chain hash".to_owned(),
            );
        };
        let (Some(prev_hash), Some(hash)) = (decode_hash(prev_text), decode_hash(hash_text)) else {
            return problem(
                row.seq,
                AuditProblemKind::Unchained,
                "the row's chain hash is not 64 lowercase hex digits".to_owned(),
            );
        };
        if prev_hash != expected_prev {
            let message = match self.head {
                None => "the first row does not start the chain: earlier rows were removed or the row was moved".to_owned(),
                Some((seq, _)) => format!(
                    "prev_hash is not the hash of row {seq}: rows were removed, reordered or replaced"
                ),
            };
            return problem(row.seq, AuditProblemKind::Unlinked, message);
        }
        if key.chain_hash(&prev_hash, &row.fields()) != hash {
            return problem(
                row.seq,
                AuditProblemKind::Altered,
                "the hash does not match the row's content: the row was altered".to_owned(),
            );
        }
        self.rows_checked += 1;
        self.head = Some((row.seq, hash));
        None
    }

    fn finish(self, problem: Option<AuditProblem>) -> AuditVerification {
        AuditVerification {
            intact: problem.is_none(),
            rows_checked: self.rows_checked,
            head: self.head.map(|(seq, hash)| AuditHead {
                seq,
                hash: hex::encode(hash),
            }),
            problem,
        }
    }
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
