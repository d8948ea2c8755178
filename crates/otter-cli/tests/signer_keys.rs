//! `otter keys create-root | certify | revoke` (offline) and `otter signers
//! revocations publish` end to end with the real binaries: the root key,
//! certificate and revocation lists are made with no server running, a
//! server started with `--trusted-root` (and no trusted signer) accepts a
//! package built with `--signer-cert`, a device enrolled from it pins the
//! root and installs that package, and after the list is published the
//! signer's next package is refused.

mod support;

use std::path::Path;
use std::process::Output;

use support::{
    Server, build_firmware, enroll, generate_signing_key, otter_offline, payload, start_agent,
};

fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `otter package build` of `sensor-fw@version` with `--signer-cert`.
fn build_certified(root: &Path, key: &Path, cert: &Path, version: &str) -> Output {
    let input = root.join(format!("fw-{version}.payload"));
    std::fs::write(&input, payload(4096, 7)).unwrap();
    let out = root.join(format!("fw-{version}.otter"));
    otter_offline(&[
        "package",
        "build",
        "--key",
        s(key),
        "--signer-cert",
        s(cert),
        "--name",
        "sensor-fw",
        "--version",
        version,
        "--kind",
        "firmware",
        "--hardware",
        "revB",
        "--out",
        s(&out),
        s(&input),
    ])
}

#[test]
fn offline_root_certifies_and_revokes_signers() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();

    // Offline: a root, a signer, its certificate.
    let root_key = root.join("root.key");
    let printed = ok(
        otter_offline(&["keys", "create-root", s(&root_key)]),
        "create-root",
    );
    assert!(printed.contains("offline"), "{printed}");
    let (signer, signer_pub) = generate_signing_key(root, "signer.key");
    let cert = root.join("signer.cert");
    ok(
        otter_offline(&[
            "keys",
            "certify",
            "--root",
            s(&root_key),
            "--signer",
            s(&signer_pub),
            "--name",
            "build-host",
            "--valid",
            "30d",
            "--out",
            s(&cert),
        ]),
        "certify",
    );
    // The certificate is never overwritten.
    let again = otter_offline(&[
        "keys",
        "certify",
        "--root",
        s(&root_key),
        "--signer",
        s(&signer_pub),
        "--name",
        "x",
        "--out",
        s(&cert),
    ]);
    assert!(!again.status.success());

    // A certificate for another key is refused at build time.
    let (other, _) = generate_signing_key(root, "other.key");
    let mismatch = build_certified(root, &other, &cert, "0.0.1");
    assert!(!mismatch.status.success());
    assert!(
        stderr(&mismatch).contains("not the signing key"),
        "{}",
        stderr(&mismatch)
    );
    assert!(!root.join("fw-0.0.1.otter").exists());
    ok(
        build_certified(root, &signer, &cert, "1.0.0"),
        "build 1.0.0",
    );

    // Revocation lists, offline: the second extends the first.
    let key_id =
        otter_package::keys::key_id(&otter_package::keys::read_verifying_key(&signer_pub).unwrap());
    let other_id = otter_package::keys::key_id(
        &otter_package::keys::read_verifying_key(&root.join("other.key.pub")).unwrap(),
    );
    let list1 = root.join("revocations-1.json");
    let printed = ok(
        otter_offline(&[
            "keys",
            "revoke",
            "--root",
            s(&root_key),
            "--key-id",
            &other_id,
            "--reason",
            "unused",
            "--out",
            s(&list1),
        ]),
        "revoke 1",
    );
    assert!(printed.contains("sequence 1"), "{printed}");
    let list2 = root.join("revocations-2.json");
    let printed = ok(
        otter_offline(&[
            "keys",
            "revoke",
            "--root",
            s(&root_key),
            "--key-id",
            &key_id,
            "--reason",
            "stolen",
            "--previous",
            s(&list1),
            "--out",
            s(&list2),
        ]),
        "revoke 2",
    );
    assert!(
        printed.contains("sequence 2") && printed.contains("2 revoked"),
        "{printed}"
    );
    // A --previous list from another root is refused.
    let (foreign_root, _) = generate_signing_key(root, "foreign-root.key");
    let foreign = otter_offline(&[
        "keys",
        "revoke",
        "--root",
        s(&foreign_root),
        "--key-id",
        &key_id,
        "--previous",
        s(&list1),
        "--out",
        s(&root.join("x.json")),
    ]);
    assert!(!foreign.status.success());

    // Offline verification against the root (and refusal against another).
    let root_pub = root.join("root.key.pub");
    let package = root.join("fw-1.0.0.otter");
    let inspected = ok(
        otter_offline(&[
            "package",
            "inspect",
            "--trusted-root",
            s(&root_pub),
            s(&package),
        ]),
        "inspect",
    );
    assert!(inspected.contains("valid"), "{inspected}");
    let foreign_pub = root.join("foreign-root.key.pub");
    let wrong = otter_offline(&[
        "package",
        "inspect",
        "--trusted-root",
        s(&foreign_pub),
        s(&package),
    ]);
    assert!(!wrong.status.success());

    // Online: a server trusting only the root.
    let server = Server::start_with(root, &[], &["--trusted-root", s(&root_pub)]);
    let release = server.upload_release(&package);
    assert_eq!(release, "sensor-fw@1.0.0");
    // A package by a directly signed, uncertified key is refused.
    let uncertified = build_firmware(root, &other, "1.0.1", &payload(64, 1));
    let refused = server.otter(&["release", "upload", s(&uncertified)]);
    assert!(!refused.status.success());

    // A device enrolled from it pins the root, and installs the package.
    let device = enroll(&server, root, "dev-1", None);
    let config = std::fs::read_to_string(device.join("agent.toml")).unwrap();
    assert!(
        config.contains(r#"trusted_roots = ["roots/root-1.pub"]"#),
        "{config}"
    );
    assert_eq!(
        std::fs::read_to_string(device.join("roots/root-1.pub")).unwrap(),
        std::fs::read_to_string(&root_pub).unwrap()
    );
    let mut agent = start_agent(root, "agent", &device);
    let deployment = server.create_deployment(&release, "device:dev-1");
    let status = server.wait_deployment_complete(&deployment);
    assert!(
        status
            .targets
            .iter()
            .all(|t| t.phase == otter_proto::deployment::Phase::Installed),
        "{status:?}\n{}",
        agent.log_text()
    );

    // Publish: the first list, then the second; a stale one is refused.
    let printed = server.otter_ok(&["signers", "revocations", "publish", s(&list1)]);
    assert!(printed.contains("sequence 1"), "{printed}");
    let printed = server.otter_ok(&["signers", "revocations", "publish", s(&list2)]);
    assert!(printed.contains("sequence 2"), "{printed}");
    let stale = server.otter(&["signers", "revocations", "publish", s(&list1)]);
    assert!(!stale.status.success());
    assert!(
        stderr(&stale).contains("stale-revocation-list"),
        "{}",
        stderr(&stale)
    );
    let shown = server.otter_ok(&["signers", "revocations", "show"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).unwrap(),
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&list2).unwrap())
            .unwrap()
    );

    // The revoked signer's next package is refused.
    ok(
        build_certified(root, &signer, &cert, "2.0.0"),
        "build 2.0.0",
    );
    let refused = server.otter(&["release", "upload", s(&root.join("fw-2.0.0.otter"))]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("revoked-signer"),
        "{}",
        stderr(&refused)
    );
    agent.kill();
}
