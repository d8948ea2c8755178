//! CSR enrolment end to end, with the real binaries: `otter device token
//! create` makes a one-time token, `otter-agent enrol` generates the key on
//! the device, enrols over TLS pinned to the CA file and writes the bundle,
//! and the agent then runs from that bundle and registers. The token cannot
//! be used twice, and an existing bundle is never overwritten.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use otter_proto::api::EnrolmentTokenInfo;
use otter_proto::messages::Mode;
use support::{Server, WAIT, binary, start_agent, start_server_with_key, wait_for};

fn agent_enrol(server: &Server, ca: &Path, token: &str, device_id: &str, out: &Path) -> Output {
    Command::new(binary("otter-agent"))
        .args(["enrol", "--server"])
        .arg(format!("https://{}", server.endpoints.device))
        .arg("--ca")
        .arg(ca)
        .args(["--token", token, "--device-id", device_id, "--out"])
        .arg(out)
        .output()
        .expect("run otter-agent enrol")
}

#[test]
fn device_enrols_with_its_own_key_and_registers() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (server, _key) = start_server_with_key(root, &[]);
    let ca = root.join("server-ca.crt");
    let token = server.otter_ok(&[
        "device",
        "token",
        "create",
        "dev-csr",
        "--hardware",
        "revB",
        "--tags",
        "line-1",
        "--ttl",
        "1h",
        "--ca-out",
        ca.to_str().unwrap(),
    ]);
    let token = token.trim();
    assert!(token.starts_with("otter-enrol-"), "{token}");

    let dir = root.join("dev-csr");
    let output = agent_enrol(&server, &ca, token, "dev-csr", &dir);
    assert!(
        output.status.success(),
        "otter-agent enrol: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in [
        "device.key",
        "device.crt",
        "ca.crt",
        "agent.toml",
        "signers/signer-1.pub",
    ] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let mode = fs::metadata(dir.join("device.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let key_before = fs::read(dir.join("device.key")).unwrap();

    // Enrolling again into the same folder is refused before any request
    // and leaves the bundle as it was.
    let output = agent_enrol(&server, &ca, token, "dev-csr", &dir);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("already holds a device bundle"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(fs::read(dir.join("device.key")).unwrap(), key_before);
    // The token is spent: another folder is refused by the server.
    let output = agent_enrol(&server, &ca, token, "dev-csr", &root.join("again"));
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("enrolment-token-used"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!root.join("again/agent.toml").exists());
    // A CA file that is not the server's: the TLS handshake fails.
    let stranger_ca = root.join("stranger-ca.crt");
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let mut stranger = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    fs::write(
        &stranger_ca,
        stranger.self_signed(&stranger_key).unwrap().pem(),
    )
    .unwrap();
    let token2 = server.otter_ok(&["device", "token", "create", "dev-other"]);
    let output = agent_enrol(
        &server,
        &stranger_ca,
        token2.trim(),
        "dev-other",
        &root.join("other"),
    );
    assert!(!output.status.success());
    let tokens: Vec<EnrolmentTokenInfo> = server.otter_json(&["device", "token", "list"]);
    let other = tokens
        .iter()
        .find(|t| t.device_id.as_str() == "dev-other")
        .unwrap();
    assert!(other.used_at.is_none());
    let used = tokens
        .iter()
        .find(|t| t.device_id.as_str() == "dev-csr")
        .unwrap();
    assert!(used.used_at.is_some());
    // Unused tokens can be revoked from the CLI.
    server.otter_ok(&["device", "token", "revoke", &other.id]);
    let output = server.otter(&["device", "token", "revoke", &other.id]);
    assert!(!output.status.success());

    // The agent runs from the bundle it wrote and registers.
    let _agent = start_agent(root, "dev-csr", &dir);
    server.wait_modes(&["dev-csr"], Mode::PushPull);
    // agent.toml took the token's hardware, so registering keeps it.
    let device = server.device("dev-csr").unwrap();
    assert_eq!(device.hardware, "revB");
    assert_eq!(device.tags, ["line-1"]);
    let table = server.otter_ok(&["devices", "list"]);
    assert!(
        table.lines().any(|line| line.starts_with("dev-csr")),
        "{table}"
    );
    wait_for("the registration audit row", WAIT, || {
        let audit = server.device_audit("dev-csr");
        audit
            .iter()
            .any(|e| e.event == "device.registered")
            .then_some(())
    });
    let enrolled = server
        .device_audit("dev-csr")
        .into_iter()
        .find(|e| e.event == "device.enrolled")
        .unwrap();
    assert!(
        enrolled.actor.starts_with("enrolment-token:"),
        "{enrolled:?}"
    );
}
