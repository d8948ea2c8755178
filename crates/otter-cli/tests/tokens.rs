//! `otter token create | list | revoke` end to end: the real `otter-server`
//! and `otter` binaries. A created token is printed alone (so it can be
//! redirected into a token file), works with its role's rights only, and is
//! refused once revoked; the last admin token cannot be revoked.

mod support;

use std::process::{Command, Output};

use otter_proto::api::{CreatedToken, Role, TokenInfo};
use support::{Server, binary, generate_signing_key};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `otter ARGS` against `server` with the token in `token_file`.
fn otter_with(server: &Server, token_file: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary("otter"))
        .env("OTTER_SERVER", server.api_url())
        .env("OTTER_TOKEN_FILE", token_file)
        .env_remove("OTTER_TOKEN")
        .args(args)
        .output()
        .expect("run otter")
}

#[test]
fn tokens_are_created_listed_and_revoked_from_the_cli() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (_key, public_key) = generate_signing_key(root, "k");
    let server = Server::start(root, &[&public_key]);

    // `create` prints the token and nothing else: straight into a file.
    let printed = server.otter_ok(&["token", "create", "ci-viewer", "--role", "viewer"]);
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.starts_with("otter_"), "{printed}");
    let viewer_file = root.join("viewer.token");
    std::fs::write(&viewer_file, &printed).unwrap();

    let created: CreatedToken =
        server.otter_json(&["token", "create", "ci-ops", "--role", "operator"]);
    assert_eq!(
        (created.name.as_str(), created.role),
        ("ci-ops", Role::Operator)
    );
    assert_ne!(created.token, printed.trim());

    // A viewer reads but cannot write, with the server's reason.
    let listed = otter_with(&server, &viewer_file, &["devices", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let refused = otter_with(
        &server,
        &viewer_file,
        &[
            "deploy",
            "create",
            "--release",
            "fw@1.0.0",
            "--target",
            "all",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("forbidden"),
        "{}",
        stderr(&refused)
    );
    let refused = otter_with(&server, &viewer_file, &["token", "list"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("HTTP 403"),
        "{}",
        stderr(&refused)
    );

    let tokens: Vec<TokenInfo> = server.otter_json(&["token", "list"]);
    let mut names: Vec<(&str, Role, bool)> = tokens
        .iter()
        .map(|t| (t.name.as_str(), t.role, t.revoked_at.is_some()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("admin", Role::Admin, false),
            ("ci-ops", Role::Operator, false),
            ("ci-viewer", Role::Viewer, false),
        ]
    );
    let table = server.otter_ok(&["token", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("ci-viewer") && line.contains("viewer")),
        "{table}"
    );

    // Revoked: refused from the next command on.
    let revoked = server.otter_ok(&["token", "revoke", "ci-viewer"]);
    assert_eq!(revoked.trim(), "revoked ci-viewer");
    let refused = otter_with(&server, &viewer_file, &["devices", "list"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("unauthorized"),
        "{}",
        stderr(&refused)
    );
    let tokens: Vec<TokenInfo> = server.otter_json(&["token", "list"]);
    let viewer = tokens.iter().find(|t| t.name == "ci-viewer").unwrap();
    assert!(viewer.revoked_at.is_some());

    // Refusals change nothing: the last admin, a bad name, a bad role, a
    // name already used.
    let audit_before: Vec<serde_json::Value> = server.otter_json(&["audit", "list"]);
    let cases: &[(&[&str], Option<i32>, &str)] = &[
        (&["token", "revoke", "admin"], Some(1), "last-admin"),
        (&["token", "revoke", "nobody"], Some(1), "unknown-token"),
        (
            &["token", "create", "a/b", "--role", "viewer"],
            Some(1),
            "invalid token name",
        ),
        (
            &["token", "create", "x", "--role", "root"],
            Some(2),
            "unknown role",
        ),
        (
            &["token", "create", "ci-viewer", "--role", "admin"],
            Some(1),
            "token-exists",
        ),
    ];
    for (args, code, expected) in cases {
        let output = server.otter(args);
        assert_eq!(output.status.code(), *code, "{args:?}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    let tokens_after: Vec<TokenInfo> = server.otter_json(&["token", "list"]);
    assert_eq!(tokens_after, tokens);
    let audit_after: Vec<serde_json::Value> = server.otter_json(&["audit", "list"]);
    assert_eq!(audit_after, audit_before);

    // Token changes are audited under the admin token's name.
    let events: Vec<(String, String)> = audit_after
        .iter()
        .filter(|row| row["event"].as_str().unwrap().starts_with("token."))
        .map(|row| {
            (
                row["event"].as_str().unwrap().to_owned(),
                row["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("token.created".to_owned(), "admin".to_owned()),
            ("token.created".to_owned(), "admin".to_owned()),
            ("token.revoked".to_owned(), "admin".to_owned()),
        ]
    );
}
