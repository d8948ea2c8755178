//! Smoke run of the simulator: a real `otter-server` (in this process, on
//! port-0 listeners bound to `0.0.0.0`, its certificate naming two loopback
//! addresses) and ten simulated devices per mode spread over both addresses.
//! One deployment per mode; every device must install it exactly once with
//! the right bytes, and the audit must hold every step for every device.
//! Correctness only: no timing is asserted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use otter_proto::messages::Mode;
use otter_sim::api::OperatorClient;
use otter_sim::fleet::{Fleet, FleetConfig};
use otter_sim::handlers::InstallLog;
use tokio::sync::oneshot;

const DEVICES: usize = 10;
const HARDWARE: &str = "sim";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `check` answers `Some`, at most [`TIMEOUT`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_simulated_device_installs_once_in_every_mode() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("signer.key");
    otter_package::keys::generate_key_pair(&key_path).unwrap();
    let signing_key = otter_package::keys::read_signing_key(&key_path).unwrap();

    let hosts: Vec<IpAddr> = vec![
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    ];
    let data_dir = dir.path().join("server");
    let mut config = otter_server::ServerConfig::ephemeral(&data_dir);
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    config.device_addr = any;
    config.mqtt_addr = any;
    config.public_hosts = hosts.iter().map(IpAddr::to_string).collect();
    config.trusted_signers = vec![otter_package::keys::public_key_path(&key_path)];
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(otter_server::run(config, async move {
        let _ = stopped.await;
    }));
    let endpoints: otter_server::Endpoints = eventually("endpoints.json", || {
        let path = data_dir.join("endpoints.json");
        async move { serde_json::from_slice(&std::fs::read(path).ok()?).ok() }
    })
    .await;
    let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
    let client = OperatorClient::new(&format!("http://{}", endpoints.api), &token).unwrap();

    for (index, mode) in [Mode::Push, Mode::Pull, Mode::PushPull]
        .into_iter()
        .enumerate()
    {
        let tag = format!("smoke-{}", mode.as_str());
        let enrolled = client
            .enroll_batch(otter_sim::enroll_request(&tag, DEVICES, &tag, HARDWARE).unwrap())
            .await
            .unwrap();
        assert_eq!(enrolled.len(), DEVICES);
        let log = InstallLog::new();
        let fleet = Fleet::start(
            FleetConfig {
                work_dir: dir.path().join(&tag),
                mode,
                hardware: HARDWARE.to_owned(),
                hosts: hosts.clone(),
                poll_interval: Duration::from_millis(500),
                reconcile_interval: None,
                connect_rate: 0,
                hash_payloads: true,
            },
            enrolled,
            log.clone(),
        )
        .await
        .unwrap();
        eventually(
            &format!("{DEVICES} {} registrations", mode.as_str()),
            || {
                let client = client.clone();
                let tag = tag.clone();
                async move {
                    let devices = client.devices(&tag).await.ok()?;
                    let registered = devices
                        .iter()
                        .filter(|d| d.mode == Some(mode) && d.registered_at.is_some())
                        .count();
                    (registered == DEVICES).then_some(())
                }
            },
        )
        .await;

        // A payload that is not a multiple of any chunk size.
        let payload = otter_sim::package::random_payload(48 * 1024 + 7 * (index + 1));
        let package = otter_sim::package::build(
            &signing_key,
            &tag,
            &semver::Version::new(1, 0, 0),
            HARDWARE,
            &payload,
            dir.path(),
        )
        .unwrap();
        client.upload_release(package.bytes.clone()).await.unwrap();
        let deployment = client
            .create_deployment(&package.release, &format!("fleet:{tag}"))
            .await
            .unwrap();
        assert_eq!(deployment.devices, DEVICES as u64);
        let status = eventually(&format!("the {} deployment", mode.as_str()), || {
            let client = client.clone();
            let id = deployment.deployment_id.clone();
            async move {
                client
                    .deployment(&id)
                    .await
                    .ok()
                    .filter(|s| s.info.complete)
            }
        })
        .await;
        assert_eq!(
            status
                .info
                .phases
                .get(&otter_proto::deployment::Phase::Installed),
            Some(&(DEVICES as u64)),
            "{mode:?}: {:?}",
            status.info.phases
        );

        // Every device installed exactly once, the right bytes.
        let records = log.records_of(&deployment.deployment_id);
        let installed: BTreeSet<String> = records.iter().map(|r| r.device_id.to_string()).collect();
        assert_eq!(records.len(), DEVICES, "{mode:?}: one install per device");
        assert_eq!(installed.len(), DEVICES);
        for record in &records {
            assert_eq!(
                record.payload_sha256.as_deref(),
                Some(package.payload_sha256.as_str())
            );
            assert_eq!(record.payload_bytes, payload.len() as u64);
        }
        assert!(fleet.failures().is_empty(), "{:?}", fleet.failures());

        // The audit holds every step of every device.
        let audit = client
            .audit_all(Some(&deployment.deployment_id))
            .await
            .unwrap();
        assert!(audit.iter().any(|e| e.event == "deployment.created"));
        let mut events: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in &audit {
            if let Some(device) = &entry.device_id {
                events
                    .entry(device.clone())
                    .or_default()
                    .insert(entry.event.clone());
            }
        }
        assert_eq!(events.len(), DEVICES);
        for (device, seen) in &events {
            for step in [
                "deployment.targeted",
                "notification.sent",
                "device.received",
                "device.downloaded",
                "device.installing",
                "device.installed",
            ] {
                assert!(
                    seen.contains(step),
                    "{mode:?} {device}: no {step} in {seen:?}"
                );
            }
        }
        let times =
            otter_sim::bench::timings::StepTimes::from_audit(&audit, &deployment.deployment_id)
                .unwrap();
        assert_eq!(times.summary("device.installed").count, DEVICES);

        // Spread: the devices connected over both addresses (mode-specific
        // URLs in each agent.toml).
        let urls: BTreeSet<String> = installed
            .iter()
            .map(|device| {
                let toml = std::fs::read_to_string(
                    dir.path()
                        .join(&tag)
                        .join("devices")
                        .join(device)
                        .join("agent.toml"),
                )
                .unwrap();
                let key = if mode == Mode::Pull {
                    "device_url"
                } else {
                    "mqtt_url"
                };
                toml.lines()
                    .find(|line| line.starts_with(key))
                    .unwrap()
                    .split("//")
                    .nth(1)
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(urls.len(), 2, "{urls:?}");
        fleet.stop().await;
    }
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
