//! `otter audit verify` end to end: the real server records some activity
//! and the chain verifies; the server is stopped, one audit row is edited in
//! its SQLite file (as someone with access to the file would, dropping the
//! append-only trigger first), and after a restart the command fails and
//! names that row.

mod support;

use std::path::Path;

use otter_proto::api::{AuditEntry, AuditProblemKind, AuditVerification};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use support::{Server, WAIT, enroll};

/// Edits the details of audit row `seq` directly in the database file.
fn edit_audit_row(database: &Path, seq: i64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(database))
            .await
            .unwrap();
        sqlx::raw_sql("DROP TRIGGER audit_no_update")
            .execute(&pool)
            .await
            .unwrap();
        let changed =
            sqlx::query("UPDATE audit SET details = '{\"hardware\":\"revC\"}' WHERE seq = ?")
                .bind(seq)
                .execute(&pool)
                .await
                .unwrap()
                .rows_affected();
        assert_eq!(changed, 1);
        pool.close().await;
    });
}

#[test]
fn audit_verify_reports_a_row_edited_in_the_database() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let mut server = Server::start(root, &[]);
    for id in ["dev-a", "dev-b", "dev-c"] {
        enroll(&server, root, id, Some("line-1"));
    }
    let entries: Vec<AuditEntry> = server.otter_json(&["audit", "list"]);
    let rows = entries.len();
    assert!(rows >= 3, "{entries:?}");
    let target = entries
        .iter()
        .find(|entry| {
            entry.event == "device.enrolled" && entry.device_id.as_deref() == Some("dev-b")
        })
        .unwrap()
        .seq;

    let text = server.otter_ok(&["audit", "verify"]);
    let last = entries.last().unwrap().seq;
    assert!(
        text.starts_with(&format!(
            "audit chain intact: {rows} rows, head seq {last} hash "
        )),
        "{text}"
    );
    let verification: AuditVerification = server.otter_json(&["audit", "verify"]);
    assert!(verification.intact);
    assert_eq!(verification.rows_checked, rows as u64);
    let head = verification.head.unwrap();
    assert_eq!(head.seq, last);
    assert!(text.trim_end().ends_with(&head.hash), "{text}");
    // Each listed row carries its chain hash; the head is the last one's.
    assert!(entries.iter().all(|entry| entry.hash.is_some()));
    assert_eq!(
        entries.last().unwrap().hash.as_deref(),
        Some(head.hash.as_str())
    );

    let status = server.process.terminate(WAIT).expect("server stops");
    assert!(status.success(), "{status}");
    let data_dir = server.data_dir.clone();
    drop(server);
    edit_audit_row(&data_dir.join("otter.db"), target);

    let server = Server::start(root, &[]);
    let output = server.otter(&["audit", "verify"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.starts_with(&format!("audit chain broken at row {target}: ")),
        "{stdout}"
    );

    let output = server.otter(&["audit", "verify", "--json"]);
    assert!(!output.status.success());
    let verification: AuditVerification = serde_json::from_slice(&output.stdout).unwrap();
    assert!(!verification.intact);
    let problem = verification.problem.unwrap();
    assert_eq!(
        (problem.seq, problem.kind),
        (target, AuditProblemKind::Altered)
    );
    assert_eq!(verification.rows_checked, (target - 1) as u64);
}
