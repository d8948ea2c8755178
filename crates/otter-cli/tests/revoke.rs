//! `otter device revoke` end to end: the real `otter-server` and `otter`
//! binaries. A revoke is audited with the operator's name and reason, shows
//! in `otter devices list`, and a second revoke or an unknown device is a
//! clear error that changes nothing.

mod support;

use otter_proto::api::DeviceInfo;
use support::{Server, count, enroll, find_event, generate_signing_key};

#[test]
fn a_device_is_revoked_from_the_cli() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (_key, public_key) = generate_signing_key(root, "k");
    let server = Server::start(root, &[&public_key]);
    enroll(&server, root, "dev-1", None);
    enroll(&server, root, "dev-2", None);

    let printed = server.otter_ok(&["device", "revoke", "dev-1", "--reason", "lost in transit"]);
    assert_eq!(printed.trim(), "revoked dev-1");

    // The list shows the revocation time for dev-1 only.
    let table = server.otter_ok(&["devices", "list"]);
    let header = table.lines().next().unwrap();
    assert!(header.contains("REVOKED"), "{table}");
    let row = |id: &str| {
        table
            .lines()
            .find(|line| line.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed: {table}"))
            .to_owned()
    };
    assert!(row("dev-1").trim_end().ends_with('Z'), "{table}");
    assert!(row("dev-2").trim_end().ends_with('-'), "{table}");
    let devices: Vec<DeviceInfo> = server.otter_json(&["devices", "list"]);
    assert!(devices[0].revoked_at.is_some());
    assert_eq!(devices[1].revoked_at, None);

    // Audited with the operator (the admin token) and the reason.
    let audit = server.device_audit("dev-1");
    let row = find_event(&audit, "device.revoked");
    assert_eq!(row.actor, "admin");
    assert_eq!(row.details["reason"], "lost in transit");

    // A second revoke: refused with the reason, nothing more audited.
    let again = server.otter(&["device", "revoke", "dev-1"]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already revoked"), "{stderr}");
    assert_eq!(count(&server.device_audit("dev-1"), "device.revoked"), 1);

    // An unknown device: refused, nothing audited.
    let unknown = server.otter(&["device", "revoke", "nobody"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no device"), "{stderr}");
    assert_eq!(count(&server.device_audit("dev-2"), "device.revoked"), 0);
}
