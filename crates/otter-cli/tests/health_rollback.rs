//! The `archive` install handler, the health check and the automatic
//! rollback end to end, with the real `otter-server`, `otter-agent` and
//! `otter` CLI: the device installs applications with `archive`
//! (`[install.kinds.application]`) and checks each with the `bin/healthy`
//! script of the version `current` points at (`[health]`). A healthy 1.0.0
//! is installed; an unhealthy 2.0.0 is rolled back to 1.0.0 and the server
//! records `rolled-back` with the reason.

mod support;

use std::fs;
use std::path::Path;

use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    Server, build_package, edit_agent_config, enroll, find_event, generate_signing_key, start_agent,
};

/// A tar archive of the `web` application: `VERSION` and `bin/healthy`.
fn app_tar(version: &str, healthy: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data, mode) in [
        ("VERSION", version.as_bytes(), 0o644),
        ("bin/healthy", healthy.as_bytes(), 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Deploys `release` to the device, waits for the outcome, and returns the
/// deployment id, the device's phase and detail.
fn deploy(server: &Server, release: &str) -> (String, Phase, String) {
    let deployment = server.create_deployment(release, "device:dev-app");
    let status = server.wait_deployment_complete(&deployment);
    let target = &status.targets[0];
    (
        deployment,
        target.phase,
        target.detail.clone().unwrap_or_default(),
    )
}

fn installed_web(device_dir: &Path) -> String {
    let text = fs::read_to_string(device_dir.join("state/installed.json")).unwrap();
    let installed: serde_json::Value = serde_json::from_str(&text).unwrap();
    installed["web"].as_str().unwrap().to_owned()
}

#[test]
fn an_unhealthy_archive_install_is_rolled_back_and_reported() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);
    let dir = enroll(&server, root, "dev-app", None);
    let apps = dir.join("apps");
    edit_agent_config(&dir, |text| {
        format!(
            "{text}\n[install.kinds.application]\nhandler = \"archive\"\ntarget_dir = \"apps\"\n\n\
             [health]\ncommand = [\"sh\", \"{}/{{name}}/current/bin/healthy\"]\ndeadline = \"3s\"\n",
            apps.display()
        )
    });
    let _agent = start_agent(root, "dev-app", &dir);
    server.wait_modes(&["dev-app"], Mode::PushPull);
    let capabilities = server.device("dev-app").unwrap().capabilities;
    assert!(
        capabilities.iter().any(|c| c == "archive"),
        "{capabilities:?}"
    );

    // 1.0.0 passes its health check.
    let v1 = app_tar("1.0.0", "exit 0\n");
    server.upload_release(&build_package(
        root,
        &key,
        "web",
        "1.0.0",
        "application",
        &v1,
    ));
    let (_, phase, detail) = deploy(&server, "web@1.0.0");
    assert_eq!(phase, Phase::Installed, "{detail}");
    assert_eq!(
        fs::read_link(apps.join("web/current")).unwrap(),
        Path::new("versions/1.0.0")
    );
    assert_eq!(installed_web(&dir), "1.0.0");

    // 2.0.0 fails it: rolled back, and the server hears why.
    let v2 = app_tar("2.0.0", "echo 'web 2 does not start' >&2\nexit 1\n");
    server.upload_release(&build_package(
        root,
        &key,
        "web",
        "2.0.0",
        "application",
        &v2,
    ));
    let (deployment, phase, detail) = deploy(&server, "web@2.0.0");
    assert_eq!(phase, Phase::RolledBack, "{detail}");
    assert_eq!(
        detail,
        "health check failed: exit 1: web 2 does not start; rolled back to 1.0.0"
    );
    assert_eq!(
        fs::read_link(apps.join("web/current")).unwrap(),
        Path::new("versions/1.0.0")
    );
    assert_eq!(
        fs::read_to_string(apps.join("web/current/VERSION")).unwrap(),
        "1.0.0"
    );
    assert!(!apps.join("web/versions/2.0.0").exists());
    assert_eq!(installed_web(&dir), "1.0.0");
    let audit = server.audit("dev-app", &deployment);
    let rolled_back = find_event(&audit, "device.rolled-back");
    assert!(
        rolled_back
            .details
            .to_string()
            .contains("web 2 does not start"),
        "{rolled_back:?}"
    );
    // The server's record of the device still says 1.0.0.
    let device = server.device("dev-app").unwrap();
    assert_eq!(
        device.installed.get("web").map(|v| v.to_string()),
        Some("1.0.0".to_owned())
    );
}
