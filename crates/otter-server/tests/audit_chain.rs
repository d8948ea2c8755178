//! The tamper-evident audit log: rows written through the real store form a
//! keyed hash chain, and `Store::verify_audit` reports the first row an
//! attacker with raw database access altered, removed or moved (after
//! dropping the append-only triggers, as such an attacker would). Also the
//! upgrade path: rows written before the chain existed are chained when the
//! audit key is first created, and never again afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use otter_proto::api::{AuditProblemKind, AuditVerification};
use otter_proto::topics::DeviceId;
use otter_server::audit::{Actor, AuditEvent, AuditRecord, AuditRowFields};
use otter_server::store::{NewDevice, Store};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

/// Rows [`store_with_rows`] writes: 5 enrolments in one transaction, one
/// enrolment alone, 3 standalone rows.
const ROWS: u64 = 9;

async fn store_with_rows(dir: &Path) -> Store {
    let store = Store::open_sqlite(&dir.join("otter.db")).await.unwrap();
    let operator = Actor::operator("admin");
    let at = otter_server::clock::now_rfc3339();
    let devices: Vec<NewDevice> = (0..5).map(new_device).collect();
    store
        .enroll_devices(&devices, &operator, &at)
        .await
        .unwrap();
    store
        .enroll_device(&new_device(5), &operator, &at)
        .await
        .unwrap();
    let server = Actor::server();
    for index in 0..3 {
        let record = AuditRecord::new(&server, AuditEvent::MessageRejected)
            .device("dev-00001")
            .details(serde_json::json!({ "reason": format!("test {index}") }));
        store.append_audit(&at, &record).await.unwrap();
    }
    store
}

fn new_device(index: usize) -> NewDevice {
    NewDevice {
        device_id: DeviceId::parse(&format!("dev-{index:05}")).unwrap(),
        hardware: "board-a".to_owned(),
        tags: vec!["line-1".to_owned()],
        cert_serial: format!("{index:08x}"),
    }
}

/// A separate connection to the database file, as an attacker would open.
async fn raw(dir: &Path) -> SqlitePool {
    SqlitePool::connect_with(SqliteConnectOptions::new().filename(dir.join("otter.db")))
        .await
        .unwrap()
}

async fn drop_triggers(pool: &SqlitePool) {
    sqlx::raw_sql(
        "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; DROP TRIGGER audit_chained",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn stored_hash(pool: &SqlitePool, seq: i64) -> Option<String> {
    sqlx::query_scalar("SELECT hash FROM audit WHERE seq = ?")
        .bind(seq)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn assert_intact(verification: &AuditVerification, rows: u64) {
    assert!(verification.intact, "{verification:?}");
    assert_eq!(verification.problem, None);
    assert_eq!(verification.rows_checked, rows);
    let head = verification.head.as_ref().unwrap();
    assert_eq!(head.seq, rows as i64);
}

fn assert_broken_at(verification: &AuditVerification, seq: i64, kind: AuditProblemKind) {
    assert!(!verification.intact, "{verification:?}");
    let problem = verification.problem.as_ref().unwrap();
    assert_eq!((problem.seq, problem.kind), (seq, kind), "{problem:?}");
    // Everything before the problem verified, and the head is the row before.
    assert_eq!(verification.rows_checked, (seq - 1) as u64);
    assert_eq!(
        verification.head.as_ref().map(|head| head.seq),
        (seq > 1).then_some(seq - 1)
    );
}

#[tokio::test]
async fn rows_written_through_the_store_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let verification = store.verify_audit().await.unwrap();
    assert_intact(&verification, ROWS);

    // The head is the stored hash of the last row, and each row links to
    // the one before it (the first to 32 zero bytes).
    let pool = raw(dir.path()).await;
    assert_eq!(
        verification.head.unwrap().hash,
        stored_hash(&pool, ROWS as i64).await.unwrap()
    );
    let rows = sqlx::query("SELECT seq, prev_hash, hash FROM audit ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut previous = "0".repeat(64);
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<i64, _>("seq"), index as i64 + 1);
        assert_eq!(row.get::<String, _>("prev_hash"), previous);
        previous = row.get("hash");
    }

    // The key file is private.
    let mode = std::fs::metadata(dir.path().join("audit.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!dir.path().join("audit.key.pending").exists());
}

#[tokio::test]
async fn triggers_refuse_unchained_inserts_and_edits() {
    let dir = tempfile::tempdir().unwrap();
    let _store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    let insert = sqlx::query(
        "INSERT INTO audit (at, actor_kind, actor, event, details) VALUES ('t', 'server', 'server', 'x', '{}')",
    )
    .execute(&pool)
    .await;
    assert!(insert.is_err());
    let update = sqlx::query("UPDATE audit SET hash = NULL WHERE seq = 2")
        .execute(&pool)
        .await;
    assert!(update.is_err());
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, ROWS as i64);
    assert!(stored_hash(&pool, 2).await.is_some());
}

#[tokio::test]
async fn edited_row_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    sqlx::query("UPDATE audit SET details = '{\"hardware\":\"board-b\"}' WHERE seq = 4")
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        4,
        AuditProblemKind::Altered,
    );
}

#[tokio::test]
async fn deleted_rows_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    sqlx::query("DELETE FROM audit WHERE seq = 5")
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        5,
        AuditProblemKind::Missing,
    );

    // Deleting the first row too moves the problem there.
    sqlx::query("DELETE FROM audit WHERE seq = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        1,
        AuditProblemKind::Missing,
    );
}

#[tokio::test]
async fn deleted_and_renumbered_row_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    // Remove row 5 and close the gap, keeping every stored hash.
    sqlx::raw_sql("DELETE FROM audit WHERE seq = 5; UPDATE audit SET seq = seq - 1 WHERE seq > 5")
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        5,
        AuditProblemKind::Unlinked,
    );
}

const CONTENT_COLUMNS: &str = "at, actor_kind, actor, device_id, deployment_id, event, details";

/// Swaps `columns` between rows `a` and `b`.
async fn swap(pool: &SqlitePool, a: i64, b: i64, columns: &str) {
    let assignments = columns
        .split(", ")
        .map(|column| format!("{column} = (SELECT {column} FROM audit WHERE seq = $2)"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TEMP TABLE saved AS SELECT * FROM audit WHERE seq = {a}"
    )))
    .execute(&mut *transaction)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE audit SET {assignments} WHERE seq = $1"
    )))
    .bind(a)
    .bind(b)
    .execute(&mut *transaction)
    .await
    .unwrap();
    let from_saved = columns
        .split(", ")
        .map(|column| format!("{column} = (SELECT {column} FROM saved)"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE audit SET {from_saved} WHERE seq = $1"
    )))
    .bind(b)
    .execute(&mut *transaction)
    .await
    .unwrap();
    sqlx::query("DROP TABLE saved")
        .execute(&mut *transaction)
        .await
        .unwrap();
    transaction.commit().await.unwrap();
}

#[tokio::test]
async fn swapped_rows_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    let before: String = sqlx::query_scalar("SELECT details FROM audit WHERE seq = 3")
        .fetch_one(&pool)
        .await
        .unwrap();

    // The content moves, the hashes stay: row 3 no longer matches its hash.
    swap(&pool, 3, 7, CONTENT_COLUMNS).await;
    let moved: String = sqlx::query_scalar("SELECT details FROM audit WHERE seq = 7")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(moved, before);
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        3,
        AuditProblemKind::Altered,
    );

    // Swap back, then move whole rows, hashes included: row 3 no longer
    // follows row 2.
    swap(&pool, 3, 7, CONTENT_COLUMNS).await;
    assert_intact(&store.verify_audit().await.unwrap(), ROWS);
    swap(&pool, 3, 7, &format!("{CONTENT_COLUMNS}, prev_hash, hash")).await;
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        3,
        AuditProblemKind::Unlinked,
    );
}

#[tokio::test]
async fn edited_row_with_a_recomputed_unkeyed_hash_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;

    // The attacker knows the format but not the key: SHA-256 over the
    // previous hash and the edited row's canonical encoding.
    let row = sqlx::query("SELECT * FROM audit WHERE seq = 4")
        .fetch_one(&pool)
        .await
        .unwrap();
    let details = "{\"hardware\":\"board-b\"}";
    let fields = AuditRowFields {
        seq: 4,
        at: row.get("at"),
        actor_kind: row.get("actor_kind"),
        actor: row.get("actor"),
        device_id: row.get("device_id"),
        deployment_id: row.get("deployment_id"),
        event: row.get("event"),
        details,
    };
    let prev_hash = hex::decode(row.get::<&str, _>("prev_hash")).unwrap();
    let mut hasher = Sha256::new();
    hasher.update(&prev_hash);
    hasher.update(fields.encode());
    let forged = hex::encode(hasher.finalize());
    sqlx::query("UPDATE audit SET details = ?, hash = ? WHERE seq = 4")
        .bind(details)
        .bind(&forged)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(stored_hash(&pool, 4).await.unwrap(), forged);
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        4,
        AuditProblemKind::Altered,
    );
}

#[tokio::test]
async fn verification_pages_through_a_long_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    let operator = Actor::operator("admin");
    let at = otter_server::clock::now_rfc3339();
    // Several verification pages (1000 rows each), written in one
    // transaction.
    let devices: Vec<NewDevice> = (0..2500).map(new_device).collect();
    store
        .enroll_devices(&devices, &operator, &at)
        .await
        .unwrap();
    assert_intact(&store.verify_audit().await.unwrap(), 2500);

    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    sqlx::query("UPDATE audit SET actor = 'someone' WHERE seq = 2001")
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        2001,
        AuditProblemKind::Altered,
    );
}

/// A database as an older server left it: migrations before the chain,
/// with `rows` audit rows and no hash columns.
async fn legacy_database(dir: &Path, rows: usize) {
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(dir.join("otter.db"))
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::migrate!("migrations/sqlite")
        .run_to(3, &pool)
        .await
        .unwrap();
    for index in 0..rows {
        sqlx::query(
            "INSERT INTO audit (at, actor_kind, actor, device_id, event, details) \
             VALUES (?, 'operator', 'admin', ?, 'device.enrolled', '{}')",
        )
        .bind(format!("2026-11-01T10:00:00.{index:03}Z"))
        .bind(format!("dev-{index:05}"))
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
}

#[tokio::test]
async fn rows_from_before_the_chain_are_chained_at_first_start() {
    let dir = tempfile::tempdir().unwrap();
    legacy_database(dir.path(), 1200).await;

    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    assert_intact(&store.verify_audit().await.unwrap(), 1200);
    assert!(dir.path().join("audit.key").exists());
    assert!(!dir.path().join("audit.key.pending").exists());

    // New rows continue the chain.
    store
        .enroll_device(
            &new_device(9999),
            &Actor::operator("admin"),
            &otter_server::clock::now_rfc3339(),
        )
        .await
        .unwrap();
    assert_intact(&store.verify_audit().await.unwrap(), 1201);
    store.close().await;

    // Reopening chains nothing and changes nothing.
    let pool = raw(dir.path()).await;
    let head_before = stored_hash(&pool, 1201).await;
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    assert_intact(&store.verify_audit().await.unwrap(), 1201);
    assert_eq!(stored_hash(&pool, 1201).await, head_before);
}

#[tokio::test]
async fn an_interrupted_first_start_chains_with_the_pending_key() {
    let dir = tempfile::tempdir().unwrap();
    legacy_database(dir.path(), 10).await;
    // A first start that created its key and stopped before chaining.
    let key = [7u8; 32];
    std::fs::write(dir.path().join("audit.key.pending"), key).unwrap();

    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    assert_intact(&store.verify_audit().await.unwrap(), 10);
    assert_eq!(std::fs::read(dir.path().join("audit.key")).unwrap(), key);
    assert!(!dir.path().join("audit.key.pending").exists());
}

#[tokio::test]
async fn hashes_removed_after_the_upgrade_are_not_chained_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    store.close().await;

    // The attacker edits row 6 and clears the hashes from there on, hoping
    // the server re-chains them at its next start.
    let pool = raw(dir.path()).await;
    drop_triggers(&pool).await;
    sqlx::raw_sql(
        "UPDATE audit SET details = '{}' WHERE seq = 6; \
         UPDATE audit SET prev_hash = NULL, hash = NULL WHERE seq >= 6",
    )
    .execute(&pool)
    .await
    .unwrap();

    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    assert_eq!(stored_hash(&pool, 6).await, None);
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        6,
        AuditProblemKind::Unchained,
    );
    // Appending after an unchained head fails instead of extending a
    // chain it cannot vouch for.
    let server = Actor::server();
    let record = AuditRecord::new(&server, AuditEvent::MessageRejected);
    assert!(
        store
            .append_audit(&otter_server::clock::now_rfc3339(), &record)
            .await
            .is_err()
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, ROWS as i64);
}

#[tokio::test]
async fn a_wrong_key_breaks_the_chain_at_the_first_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    store.close().await;
    std::fs::write(dir.path().join("audit.key"), [1u8; 32]).unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        1,
        AuditProblemKind::Altered,
    );
}

#[tokio::test]
async fn a_malformed_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit.key"), [1u8; 31]).unwrap();
    let error = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("31 bytes"), "{error}");
    // Nothing was created.
    assert!(!dir.path().join("otter.db").exists());
}

/// Batches are written with multi-row statements (400 rows each): a batch
/// that spans several statements, appended after single rows, chains and
/// verifies exactly like rows appended one by one, in order, with each row's
/// own time.
#[tokio::test]
async fn a_batch_spanning_several_statements_chains_like_single_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_rows(dir.path()).await;
    let server = Actor::server();
    const BATCH: usize = 950;
    let rows: Vec<otter_server::audit::QueuedAudit> = (0..BATCH)
        .map(|index| {
            let record = AuditRecord::new(&server, AuditEvent::DownloadServed)
                .device("dev-00002")
                .details(serde_json::json!({ "index": index }));
            otter_server::audit::QueuedAudit::of(
                format!("2026-11-25T21:00:{:02}.{:03}Z", index / 1000, index % 1000),
                &record,
            )
        })
        .collect();
    store.append_audits(&rows).await.unwrap();
    // And one more single row after the batch.
    let record = AuditRecord::new(&server, AuditEvent::MessageRejected).device("dev-00003");
    store
        .append_audit(&otter_server::clock::now_rfc3339(), &record)
        .await
        .unwrap();

    let total = ROWS + BATCH as u64 + 1;
    assert_intact(&store.verify_audit().await.unwrap(), total);
    let pool = raw(dir.path()).await;
    let batch = sqlx::query(
        "SELECT seq, at, details FROM audit WHERE event = 'download.served' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(batch.len(), BATCH);
    for (index, row) in batch.iter().enumerate() {
        assert_eq!(row.get::<i64, _>("seq"), ROWS as i64 + 1 + index as i64);
        let details: serde_json::Value =
            serde_json::from_str(&row.get::<String, _>("details")).unwrap();
        assert_eq!(details["index"], index);
        assert_eq!(
            row.get::<String, _>("at"),
            format!("2026-11-25T21:00:{:02}.{:03}Z", index / 1000, index % 1000)
        );
    }

    // An edit inside the second statement's rows is still found.
    drop_triggers(&pool).await;
    let target = ROWS as i64 + 1 + 500;
    sqlx::query("UPDATE audit SET details = '{\"index\":0}' WHERE seq = ?")
        .bind(target)
        .execute(&pool)
        .await
        .unwrap();
    assert_broken_at(
        &store.verify_audit().await.unwrap(),
        target,
        AuditProblemKind::Altered,
    );
}
