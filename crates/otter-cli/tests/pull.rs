//! Pull mode and push-pull's reconcile poll end to end, with real processes:
//! `otter-server`, `otter-agent` and the `otter` CLI on loopback.
//!
//! - A pull-mode agent never opens MQTT: it registers by polling the device
//!   HTTPS endpoint, receives a deployment in a poll answer, installs it and
//!   reports over HTTPS.
//! - A push-pull agent whose MQTT connection runs through a gate the test
//!   closes misses the notification of a deployment (its broker session
//!   exists but cannot reach it) and picks it up with its reconcile poll;
//!   once the gate opens again, its queued reports reach the server over
//!   MQTT and the deployment completes.

mod support;

use std::fs;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use otter_proto::api::{AuditEntry, Channel};
use otter_proto::deployment::Phase;
use otter_proto::messages::Mode;
use support::{
    Server, WAIT, assert_steps_in_order, build_firmware, edit_agent_config, enroll,
    generate_signing_key, payload, start_agent, wait_for, with_fast_poll, with_mode,
};

/// Builds and uploads sensor-fw `version` of `content`.
fn release(server: &Server, root: &Path, key: &Path, version: &str, content: &[u8]) {
    server.upload_release(&build_firmware(root, key, version, content));
}

fn deploy(server: &Server, release: &str, device: &str) -> String {
    server.create_deployment(release, &format!("device:{device}"))
}

#[test]
fn pull_mode_agent_registers_by_polling_and_installs() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);
    let dir = enroll(&server, root, "dev-pull", None);
    edit_agent_config(&dir, |text| with_fast_poll(&with_mode(&text, "pull")));
    let agent = start_agent(root, "dev-pull", &dir);

    // First contact is a poll: the device is registered, marked as such.
    let info = wait_for("dev-pull to register by polling", WAIT, || {
        server
            .device("dev-pull")
            .filter(|d| d.registered_at.is_some())
    });
    assert_eq!(info.registered_via, Some(Channel::Poll));
    assert_eq!(info.mode, Some(Mode::Pull));
    let table = server.otter_ok(&["devices", "list"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("VIA"), "{table}");
    let row = table
        .lines()
        .find(|line| line.starts_with("dev-pull"))
        .unwrap_or_default();
    assert!(row.split_whitespace().any(|cell| cell == "poll"), "{table}");

    // A deployment reaches it through its polls and completes.
    let content = payload(2 << 20, 21);
    release(&server, root, &key, "1.0.0", &content);
    let deployment = deploy(&server, "sensor-fw@1.0.0", "dev-pull");
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert!(
        fs::read(dir.join("installed/sensor-fw")).unwrap() == content,
        "dev-pull installed different bytes"
    );

    // Steps 3–9, every one audited; the notification went by poll.
    let entries = server.audit("dev-pull", &deployment);
    assert_steps_in_order(
        "dev-pull",
        &entries,
        &[
            "deployment.targeted",
            "link.created",
            "notification.sent",
            "device.received",
            "download.served",
            "device.downloaded",
            "link.revoked",
            "device.installing",
            "device.installed",
        ],
    );
    let sent: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.event == "notification.sent")
        .collect();
    assert!(
        !sent.is_empty() && sent.iter().all(|e| e.details["via"] == "poll"),
        "{sent:#?}"
    );

    // After the install the next poll tells the server the new version.
    wait_for("dev-pull to announce sensor-fw 1.0.0", WAIT, || {
        server.device("dev-pull").filter(|d| {
            d.installed.get("sensor-fw").map(ToString::to_string) == Some("1.0.0".into())
        })
    });
    // It never spoke MQTT.
    let log = agent.log_text();
    assert!(!log.contains("MQTT connected"), "{log}");
    assert!(log.contains("pull mode"), "{log}");
}

/// A TCP forwarder to the broker that the test can close (cutting every
/// connection and refusing new ones) and open again.
struct Gate {
    address: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    fn start(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (thread_open, thread_connections) = (open.clone(), connections.clone());
        // Detached: it ends with the test process.
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(client) = incoming else { continue };
                if !thread_open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = thread_connections.lock().unwrap();
                for stream in [&client, &upstream] {
                    if let Ok(clone) = stream.try_clone() {
                        list.push(clone);
                    }
                }
                drop(list);
                for (from, to) in [(&client, &upstream), (&upstream, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Gate {
            address,
            open,
            connections,
        }
    }

    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[test]
fn push_pull_reconcile_poll_picks_up_a_missed_notification() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let (key, public_key) = generate_signing_key(root, "signing.key");
    let server = Server::start(root, &[&public_key]);
    let broker: SocketAddr = server.endpoints.mqtt.parse().unwrap();
    let gate = Gate::start(broker);
    let dir = enroll(&server, root, "dev-rc", None);
    edit_agent_config(&dir, |text| {
        text.replacen(
            &format!("mqtt_url = \"mqtts://127.0.0.1:{}\"", broker.port()),
            &format!("mqtt_url = \"mqtts://127.0.0.1:{}\"", gate.address.port()),
            1,
        )
        .replacen(
            "reconcile_interval = \"6h\"",
            "reconcile_interval = \"2s\"",
            1,
        )
    });
    let agent = start_agent(root, "dev-rc", &dir);
    let info = wait_for("dev-rc to register over MQTT", WAIT, || {
        server
            .device("dev-rc")
            .filter(|d| d.registered_at.is_some())
    });
    assert_eq!(info.registered_via, Some(Channel::Mqtt));
    assert_eq!(info.mode, Some(Mode::PushPull));

    // Cut MQTT: the notification of the deployment goes to the broker's
    // session for the device and cannot reach it.
    gate.close();
    let content = payload(1 << 20, 33);
    release(&server, root, &key, "1.0.0", &content);
    let deployment = deploy(&server, "sensor-fw@1.0.0", "dev-rc");

    // The reconcile poll brings it: downloaded and installed with MQTT down.
    wait_for("dev-rc to install through its reconcile poll", WAIT, || {
        fs::read(dir.join("installed/sensor-fw"))
            .ok()
            .filter(|bytes| *bytes == content)
    });
    let entries = server.audit("dev-rc", &deployment);
    assert!(
        entries
            .iter()
            .any(|e| e.event == "notification.sent" && e.details["via"] == "poll"),
        "{entries:#?}"
    );
    assert!(entries.iter().any(|e| e.event == "download.served"));
    // Its reports travel over MQTT, which is still cut: the server has not
    // heard them.
    let status = server.deployment_status(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Notified, "{status:?}");

    // MQTT back: the queued reports arrive and the deployment completes.
    gate.open();
    let status = server.wait_deployment_complete(&deployment);
    assert_eq!(status.targets[0].phase, Phase::Installed, "{status:?}");
    assert_steps_in_order(
        "dev-rc",
        &server.audit("dev-rc", &deployment),
        &[
            "deployment.targeted",
            "link.created",
            "notification.sent",
            "download.served",
            "link.revoked",
            "device.installed",
        ],
    );
    // Still the device that first came over MQTT.
    assert_eq!(
        server.device("dev-rc").and_then(|d| d.registered_via),
        Some(Channel::Mqtt)
    );
    drop(agent);
}
