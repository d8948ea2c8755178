//! The database: one [`Store`] type whose methods are the only SQL in the
//! server.
//!
//! Queries are built at run time (no compile-time macros) with portable SQL
//! (`$1` placeholders, `RETURNING`, no SQLite-only syntax), over
//! `sqlx::AnyPool`, so adding PostgreSQL is a second connection URL, a second
//! migrations folder and the few backend differences kept in [`Backend`].
//! Multi-row changes run in one transaction together with their audit rows.
//!
//! SQLite lets one connection write at a time, and a connection that finds
//! the database locked sleeps and retries (the busy handler: 1, 2, 5 … 100
//! ms). Under load that polling wasted whole seconds: with a thousand
//! downloads each auditing itself, a batch of notifications waited up to
//! 15 s for the lock. So writers queue in the process instead, on one fair
//! lock taken before a connection is checked out ([`WriteTransaction`],
//! [`Store::write_gate`]), and the device endpoint reads from its own pool
//! ([`Store::for_device_endpoint`]) so that a burst of downloads does not
//! hold every connection the engine and the API need.
//!
//! Layout: this file opens the pool, runs migrations and holds the audit
//! query; `devices`, `releases`, `deployments`, `links` and `tokens`
//! (operator tokens) hold the methods of each table group, `push` the
//! progress of push-mode transfers, `enrolment` the one-time enrolment
//! tokens of CSR enrolment.

mod deployments;
mod devices;
mod enrolment;
mod links;
mod push;
mod releases;
mod signers;
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use otter_proto::api::{AuditEntry, AuditVerification};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::audit::{self, AuditKey, AuditRecord, KeyFile};

pub use deployments::{
    CreatedDeployment, DeliveryTarget, DeploymentCreation, NotificationTarget, ReportApplied,
    ReportToApply,
};
pub use devices::{
    BatchEnrollOutcome, DeviceRevoked, EnrollOutcome, NewDevice, RegistrationOutcome,
};
pub use enrolment::{CsrEnrolOutcome, EnrolmentRefusal, EnrolmentTokenRevoked, NewEnrolmentToken};
pub use links::{DownloadRelease, NewLink};
pub use push::PushProgress;
pub use releases::{DeploymentRelease, NewRelease, ReleaseInsertOutcome, StoredRelease};
pub use signers::RevocationsPublished;
pub use tokens::{NewToken, Operator, TokenCreated, TokenRevoked};

/// Why a store operation failed. Expected outcomes (a duplicate, an unknown
/// id) are not errors: methods return them as values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("audit key: {0}")]
    AuditKey(#[from] audit::AuditKeyError),
    /// A stored value the server did not write or cannot read back.
    #[error("corrupt database value in {column}: {reason}")]
    Corrupt {
        column: &'static str,
        reason: String,
    },
}

impl StoreError {
    fn corrupt(column: &'static str, reason: impl ToString) -> Self {
        StoreError::Corrupt {
            column,
            reason: reason.to_string(),
        }
    }
}

/// `$first, $first+1, …` for `count` values of an `IN (…)` list: portable
/// SQL, where SQLite has no array parameter. Callers keep `count` to a
/// batch (at most a thousand or so), well under SQLite's parameter limit.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Which database is behind the pool; the few statements that differ branch
/// on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
}

/// Filter of [`Store::audit_entries`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub device_id: Option<String>,
    pub deployment_id: Option<String>,
    /// Only rows with a larger sequence number.
    pub after: Option<i64>,
    pub limit: i64,
}

/// Handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// The pool this handle reads from (see [`Store::for_device_endpoint`]).
    pool: AnyPool,
    /// The device endpoint's pool, kept apart from the engine's and API's.
    device_pool: AnyPool,
    backend: Backend,
    /// Held for the whole of every write (see the module docs).
    write_gate: Arc<Mutex<()>>,
    /// Key of the audit hash chain, for [`audit::append`] (see `audit.rs`).
    audit_key: Arc<AuditKey>,
}

/// A write transaction and the write gate it holds until it ends. Derefs to
/// the connection, so queries run on `&mut *transaction`.
pub(crate) struct WriteTransaction {
    transaction: Transaction<'static, Any>,
    _gate: OwnedMutexGuard<()>,
    /// The audit key and the chain head once read in this transaction.
    pub(crate) audit_chain: audit::ChainWriter,
}

impl WriteTransaction {
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.transaction.commit().await
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.transaction
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.transaction
    }
}

/// Connections of the engine's and API's pool.
const MAIN_POOL_CONNECTIONS: u32 = 8;
/// Connections of the device endpoint's pool: its queries are single reads
/// and short writes, many at once.
const DEVICE_POOL_CONNECTIONS: u32 = 4;

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`, switches it
    /// to WAL and applies pending migrations. The audit key is `audit.key`
    /// in the same folder, created on first start; then, and only then,
    /// audit rows written before the hash chain existed are chained (see
    /// `audit.rs`).
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let key_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let key_file = AuditKey::load(key_dir)?;
        let url = sqlite_url(path);
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = sqlite_pool(&options, MAIN_POOL_CONNECTIONS).await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        let audit_key = match key_file {
            KeyFile::Established(key) => key,
            KeyFile::New(pending) => {
                let mut transaction = pool.begin_with("BEGIN IMMEDIATE").await?;
                let chained = audit::chain_unhashed(&mut transaction, &pending.key).await?;
                transaction.commit().await?;
                if chained > 0 {
                    tracing::info!(rows = chained, "chained the existing audit rows");
                }
                pending.establish()?
            }
        };
        let device_pool = sqlite_pool(&options, DEVICE_POOL_CONNECTIONS).await?;
        Ok(Store {
            pool,
            device_pool,
            backend: Backend::Sqlite,
            write_gate: Arc::new(Mutex::new(())),
            audit_key: Arc::new(audit_key),
        })
    }

    /// The same database through the device endpoint's own pool.
    pub fn for_device_endpoint(&self) -> Store {
        Store {
            pool: self.device_pool.clone(),
            ..self.clone()
        }
    }

    /// Taken before every write that is not a [`WriteTransaction`].
    async fn write_gate(&self) -> OwnedMutexGuard<()> {
        Arc::clone(&self.write_gate).lock_owned().await
    }

    /// Closes every connection; waits for checked-out ones to come back.
    pub async fn close(&self) {
        self.pool.close().await;
        self.device_pool.close().await;
    }

    /// Starts a transaction that will write. SQLite takes the write lock at
    /// once (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout
    /// instead of failing when the second upgrades a read lock.
    async fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let gate = self.write_gate().await;
        let transaction = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
        };
        Ok(WriteTransaction {
            transaction,
            _gate: gate,
            audit_chain: audit::ChainWriter::new(Arc::clone(&self.audit_key)),
        })
    }

    /// Appends one audit row outside any other change.
    pub async fn append_audit(
        &self,
        at: &str,
        record: &AuditRecord<'_>,
    ) -> Result<i64, StoreError> {
        let mut transaction = self.begin_write().await?;
        let seq = audit::append(&mut transaction, at, record).await?;
        transaction.commit().await?;
        Ok(seq)
    }

    /// Checks the audit hash chain from its first row (see `audit.rs`).
    pub async fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        Ok(audit::verify(&self.pool, &self.audit_key).await?)
    }

    /// Appends queued rows in one transaction, in order.
    pub async fn append_audits(&self, rows: &[audit::QueuedAudit]) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        let records: Vec<(&str, AuditRecord<'_>)> = rows
            .iter()
            .map(|row| (row.at.as_str(), row.record()))
            .collect();
        audit::append_all(&mut transaction, &records).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Audit rows matching `filter`, by increasing sequence number.
    pub async fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        // Conditions are added only when set, so every placeholder has a
        // column to take its type from (PostgreSQL cannot type `$1 IS NULL`).
        let mut sql = String::from(
            "SELECT seq, at, actor_kind, actor, device_id, deployment_id, event, details, hash FROM audit WHERE seq > $1",
        );
        let mut next_placeholder = 2;
        for (column, value) in [
            ("device_id", &filter.device_id),
            ("deployment_id", &filter.deployment_id),
        ] {
            if value.is_some() {
                sql.push_str(&format!(" AND {column} = ${next_placeholder}"));
                next_placeholder += 1;
            }
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT ${next_placeholder}"));
        // Safe: `sql` holds only fixed column names and placeholders.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(filter.after.unwrap_or(0));
        for value in [&filter.device_id, &filter.deployment_id]
            .into_iter()
            .flatten()
        {
            query = query.bind(value.as_str());
        }
        let rows = query.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("actor_kind")?;
                let details: String = row.try_get("details")?;
                Ok(AuditEntry {
                    seq: row.try_get("seq")?,
                    at: row.try_get("at")?,
                    actor_kind: audit::parse_actor_kind(&kind)
                        .ok_or_else(|| StoreError::corrupt("audit.actor_kind", &kind))?,
                    actor: row.try_get("actor")?,
                    device_id: row.try_get("device_id")?,
                    deployment_id: row.try_get("deployment_id")?,
                    event: row.try_get("event")?,
                    details: serde_json::from_str(&details)
                        .map_err(|e| StoreError::corrupt("audit.details", e))?,
                    hash: row.try_get("hash")?,
                })
            })
            .collect()
    }
}

/// `sqlite://` URL of a database file, created if missing. The path is
/// percent-encoded where sqlx would otherwise read a query or fragment.
/// A pool on the SQLite database. sqlx's defaults: foreign keys on, busy
/// timeout 5 s. WAL lets the API read while the engine writes; the mode is
/// stored in the database file, so setting it once per connection is cheap.
async fn sqlite_pool(
    options: &AnyConnectOptions,
    connections: u32,
) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(connections)
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL")
                    .execute(connection)
                    .await?;
                Ok(())
            })
        })
        .connect_with(options.clone())
        .await
}

fn sqlite_url(path: &Path) -> String {
    let mut encoded = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => encoded.push_str("%25"),
            '?' => encoded.push_str("%3F"),
            '#' => encoded.push_str("%23"),
            other => encoded.push(other),
        }
    }
    format!("sqlite://{encoded}?mode=rwc")
}

/// Parses a JSON column written by the server.
fn json_column<T: serde::de::DeserializeOwned>(
    column: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt(column, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_escapes_query_characters() {
        assert_eq!(
            sqlite_url(Path::new("/tmp/a?b#c%d/otter.db")),
            "sqlite:///tmp/a%3Fb%23c%25d/otter.db?mode=rwc"
        );
    }
}
