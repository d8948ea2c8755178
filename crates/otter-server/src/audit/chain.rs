//! The keyed hash chain of the audit log: the key file (`audit.key`), each
//! row's chain hash, chaining rows written before the chain existed, and
//! [`verify`]. See the parent module for what it defends against.

use super::*;

/// Length of the audit key and of every chain hash, in bytes.
pub const AUDIT_KEY_LEN: usize = 32;
/// Name of the key file in the data directory.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// The key while the rows written before the chain existed are chained.
pub(super) const PENDING_KEY_FILE: &str = "audit.key.pending";
/// What the first row's `prev_hash` is.
pub(super) const GENESIS_HASH: [u8; AUDIT_KEY_LEN] = [0; AUDIT_KEY_LEN];
/// Rows read per query by [`verify`] and [`chain_unhashed`].
pub(super) const CHAIN_PAGE: i64 = 1000;

/// The key of the audit hash chain. Lives in `DATA_DIR/audit.key`.
#[derive(Clone)]
pub struct AuditKey(pub(super) [u8; AUDIT_KEY_LEN]);

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
pub(super) fn read_key(path: &Path) -> Result<Option<AuditKey>, AuditKeyError> {
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
pub(super) fn decode_hash(text: &str) -> Option<[u8; AUDIT_KEY_LEN]> {
    let mut hash = [0u8; AUDIT_KEY_LEN];
    if text.len() != 2 * AUDIT_KEY_LEN || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

pub(super) const CHAIN_COLUMNS: &str =
    "seq, at, actor_kind, actor, device_id, deployment_id, event, details, prev_hash, hash";

/// One stored row as read for the chain.
pub(super) struct ChainRow {
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
pub(super) async fn chain_page(
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

pub(super) fn unreadable_hash(seq: i64) -> sqlx::Error {
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
pub(super) struct ChainChecker {
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
