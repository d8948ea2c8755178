//! `otter-sim bench` end to end on a handful of devices: the real server
//! binary as a child process, a deployment per mode, the restart under the
//! connected fleet, and the three report files. Correctness only: the
//! figures are checked for consistency, never against a time.

use std::path::PathBuf;
use std::time::Duration;

use otter_proto::messages::Mode;
use otter_sim::bench::{self, BenchConfig};

const DEVICES: usize = 4;

fn server_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_otter-sim")).with_file_name("otter-server");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_each_mode_and_the_restart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let out = tempfile::tempdir().unwrap();
    let config = BenchConfig {
        devices: DEVICES,
        payload_bytes: 64 * 1024,
        modes: vec![Mode::PushPull, Mode::Pull],
        out_dir: out.path().to_owned(),
        hosts: Vec::new(),
        poll_interval: Duration::from_secs(1),
        idle_window: Duration::from_secs(1),
        connect_rate: 100,
        deploy_timeout: Duration::from_secs(120),
        server_binary: Some(server_binary()),
        baselines: false,
        progress: false,
        command: "otter-sim bench (test)".to_owned(),
    };
    let results = bench::run(&config).await.unwrap();

    assert_eq!(results.modes.len(), 2);
    for mode in &results.modes {
        assert_eq!(mode.installed_devices, DEVICES as u64, "{}", mode.mode);
        assert_eq!(mode.failed_devices, 0, "{}", mode.mode);
        assert_eq!(mode.installed.count, DEVICES, "{}", mode.mode);
        // Each step comes after the one before it, for every percentile.
        assert!(mode.notified.max <= mode.installed.max, "{}", mode.mode);
        assert!(mode.downloaded.p50 <= mode.installed.p50, "{}", mode.mode);
        let ratio = mode.bytes_per_artifact_byte.expect("bytes measured");
        assert!(ratio >= 1.0, "{}: {ratio}", mode.mode);
    }

    // The restart: push-pull devices come back on their own; pull devices
    // hold no session, so there is no storm to measure.
    let push_pull = &results.modes[0];
    let storm = push_pull.reconnect.expect("push-pull measures the restart");
    assert_eq!(storm.reregistered, DEVICES);
    assert!(storm.secs_after_start > 0.0);
    assert!(storm.secs_after_stop >= storm.secs_after_start);
    assert!(results.modes[1].reconnect.is_none());

    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(
        markdown.contains("restart: all re-registered"),
        "{markdown}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(
        json["modes"][0]["reconnect"]["reregistered"],
        serde_json::json!(DEVICES)
    );
    let svg = std::fs::read_to_string(out.path().join("installed.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{svg:.80}"
    );
}
