//! `GET /metrics` against the whole server: after one download through the
//! device endpoint (real mutual TLS), the counters show the artifact's exact
//! size as payload, more bytes than that at the socket, and the poll and
//! notification that led to it.
//!
//! The counters are process-wide, so this file holds one test: its own
//! process, its own server, exact counts.

mod common;

use std::collections::HashMap;

use otter_proto::messages::{Mode, PollResponse, Registration, encode};
use reqwest::StatusCode;

use common::{HARDWARE, Server, device_https_client, payload};

/// The unlabelled and labelled samples of a Prometheus text exposition.
fn parse_samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

async fn scrape(server: &Server) -> HashMap<String, f64> {
    // No token: the exporter is open, like the health route.
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    parse_samples(&response.text().await.unwrap())
}

#[tokio::test]
async fn download_counts_payload_and_wire_bytes() {
    let server = Server::start().await;
    let before = scrape(&server).await;
    assert_eq!(before["otter_artifact_bytes_served_total"], 0.0);
    assert_eq!(before["otter_downloads_in_flight"], 0.0);

    let enrolled = server.enroll("dev-m", &[]).await;
    let (_, artifact) = server
        .upload_release("fw", "1.0.0", &payload(200_000))
        .await;
    server.deploy("fw@1.0.0", "device:dev-m").await;

    let http = device_https_client(&enrolled);
    let base = format!("https://127.0.0.1:{}", server.endpoints.device.port());
    let registration = Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode: Mode::Pull,
        capabilities: vec!["file".into()],
        encryption_key: common::encryption_key(),
    };
    let answer: PollResponse = http
        .post(format!("{base}/v1/poll"))
        .header("content-type", "application/json")
        .body(encode(&registration))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let link = answer.update.expect("an update").link;
    let downloaded = http.get(&link).send().await.unwrap();
    assert_eq!(downloaded.status(), StatusCode::OK);
    assert_eq!(downloaded.bytes().await.unwrap(), artifact);

    let after = scrape(&server).await;
    let artifact_size = artifact.len() as f64;
    assert_eq!(after["otter_artifact_bytes_served_total"], artifact_size);
    // The socket saw the artifact plus TLS records, the handshake, the poll
    // answer and the HTTP headers.
    let written = after["otter_device_bytes_written_total"];
    assert!(written > artifact_size, "{written} <= {artifact_size}");
    assert!(after["otter_device_bytes_read_total"] > 0.0);
    assert_eq!(after["otter_downloads_started_total"], 1.0);
    assert_eq!(after["otter_downloads_completed_total"], 1.0);
    assert_eq!(after["otter_downloads_in_flight"], 0.0);
    assert_eq!(after["otter_downloads_in_flight_peak"], 1.0);
    assert_eq!(after["otter_polls_total"], 1.0);
    assert_eq!(after["otter_registrations_total{channel=\"poll\"}"], 1.0);
    assert_eq!(
        after["otter_notifications_sent_total{channel=\"poll\"}"],
        1.0
    );
    assert_eq!(
        after["otter_notifications_sent_total{channel=\"mqtt\"}"],
        0.0
    );
    assert!(after["otter_device_connections_accepted_total"] >= 1.0);
    assert!(after["process_resident_memory_bytes"] > 0.0);

    server.stop().await;
}
