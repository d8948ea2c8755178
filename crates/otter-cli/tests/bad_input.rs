//! Bad input at the CLI and the operator API: each gets a clear message, a
//! non-zero exit, and changes nothing on the server.

mod support;

use std::fs;
use std::path::Path;

use otter_proto::api::{AuditEntry, DeviceInfo, ReleaseInfo};
use support::{Server, generate_signing_key, otter_offline, run_package_build};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn offline_commands_refuse_bad_arguments() {
    let temp = tempfile::tempdir().unwrap();
    let (key, _) = generate_signing_key(temp.path(), "k");
    let key_arg = key.to_str().unwrap();
    let again = otter_offline(&["keys", "generate", "--out", key_arg]);
    assert_eq!(again.status.code(), Some(1), "overwriting a key must fail");

    let input = temp.path().join("in.bin");
    fs::write(&input, b"payload").unwrap();
    let out = temp.path().join("out.otter");
    let build = |version: &str, kind: &str, key: &str| {
        run_package_build(Path::new(key), "fw", version, kind, &input, &out)
    };
    let bad_version = build("one", "firmware", key_arg);
    assert_eq!(
        bad_version.status.code(),
        Some(2),
        "{}",
        stderr(&bad_version)
    );
    let bad_kind = build("1.0.0", "kernel", key_arg);
    assert_eq!(bad_kind.status.code(), Some(2), "{}", stderr(&bad_kind));
    let public_as_private = build("1.0.0", "firmware", &format!("{key_arg}.pub"));
    assert_eq!(public_as_private.status.code(), Some(1));
    assert!(
        stderr(&public_as_private).contains("signing key"),
        "{}",
        stderr(&public_as_private)
    );
    assert!(!out.exists(), "a failed build left a package behind");

    let not_a_package = otter_offline(&["package", "inspect", input.to_str().unwrap()]);
    assert_eq!(not_a_package.status.code(), Some(1));
    assert!(
        stderr(&not_a_package).contains("not an Otter package"),
        "{}",
        stderr(&not_a_package)
    );
}

#[test]
fn server_refuses_bad_requests_and_keeps_its_state() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "k");
    let server = Server::start(root, &[&public_key]);
    let audit_before: Vec<AuditEntry> = server.otter_json(&["audit", "list"]);

    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "deploy",
                "create",
                "--release",
                "nope@1.0.0",
                "--target",
                "all",
            ],
            "unknown-release",
        ),
        (
            &[
                "deploy",
                "create",
                "--release",
                "nope@1.0.0",
                "--target",
                "fleet:",
            ],
            "invalid",
        ),
        (
            &["deploy", "status", "no-such-deployment"],
            "unknown-deployment",
        ),
    ];
    for (args, expected) in cases {
        let output = server.otter(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }

    // Garbage and unsigned uploads are refused and store nothing.
    let garbage = root.join("garbage.otter");
    fs::write(&garbage, b"OTTERPKG\x00\x00\x00\x05{not json").unwrap();
    let output = server.otter(&["release", "upload", garbage.to_str().unwrap()]);
    assert!(
        stderr(&output).contains("invalid-package"),
        "{}",
        stderr(&output)
    );
    let (other_key, _) = generate_signing_key(root, "other");
    let input = root.join("in.bin");
    fs::write(&input, b"payload").unwrap();
    let foreign = root.join("foreign.otter");
    let built = run_package_build(&other_key, "fw", "1.0.0", "firmware", &input, &foreign);
    assert!(built.status.success(), "{}", stderr(&built));
    let output = server.otter(&["release", "upload", foreign.to_str().unwrap()]);
    assert!(
        stderr(&output).contains("invalid-package"),
        "{}",
        stderr(&output)
    );
    let releases: Vec<ReleaseInfo> = server.otter_json(&["release", "list"]);
    assert!(releases.is_empty());
    let blobs = fs::read_dir(server.data_dir.join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "a refused upload left a blob");

    // Unknown device target, duplicate enrolment, wrong token.
    let good = root.join("good.otter");
    let built = run_package_build(&key, "fw", "1.0.0", "firmware", &input, &good);
    assert!(built.status.success());
    server.otter_ok(&["release", "upload", good.to_str().unwrap()]);
    let output = server.otter(&["release", "upload", good.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a duplicate upload must be refused"
    );
    for (target, expected) in [
        ("device:ghost", "unknown-device"),
        ("fleet:empty", "empty-target"),
    ] {
        let output = server.otter(&[
            "deploy",
            "create",
            "--release",
            "fw@1.0.0",
            "--target",
            target,
        ]);
        assert!(
            stderr(&output).contains(expected),
            "{target}: {}",
            stderr(&output)
        );
    }

    let bundle = root.join("dev-1");
    server.otter_ok(&[
        "device",
        "enroll",
        "dev-1",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    let output = server.otter(&[
        "device",
        "enroll",
        "dev-1",
        "--out",
        root.join("dev-1b").to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("exists"), "{}", stderr(&output));
    let devices: Vec<DeviceInfo> = server.otter_json(&["devices", "list"]);
    assert_eq!(devices.len(), 1);

    let wrong_token = std::process::Command::new(support::binary("otter"))
        .env("OTTER_SERVER", server.api_url())
        .env("OTTER_TOKEN", "not-the-token")
        .args(["devices", "list"])
        .output()
        .unwrap();
    assert_eq!(wrong_token.status.code(), Some(1));
    assert!(
        stderr(&wrong_token).contains("unauthorized"),
        "{}",
        stderr(&wrong_token)
    );

    // None of the refusals above wrote a deployment.
    let audit_after: Vec<AuditEntry> = server.otter_json(&["audit", "list"]);
    let new_events: Vec<&str> = audit_after[audit_before.len()..]
        .iter()
        .map(|e| e.event.as_str())
        .collect();
    assert!(
        new_events.iter().all(|e| !e.starts_with("deployment.")),
        "refused requests wrote audit rows: {new_events:?}"
    );
}
