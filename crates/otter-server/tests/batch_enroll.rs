//! `POST /api/v1/devices/batch`: many devices in one call, all or none.
//!
//! One test enrols 100 devices and checks every answer (certificates that
//! chain to the CA and name their device, the tags, the audit rows); the
//! other sends batches that must be refused whole (a duplicate inside the
//! batch, an id already enrolled, an invalid id, an empty or oversized
//! batch) and checks that nothing of them was stored.

mod common;

use std::collections::HashSet;

use common::{HARDWARE, Server, error_code};
use otter_proto::api::{BatchEnrollResponse, DeviceInfo, MAX_BATCH_ENROLL};
use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn batch(ids: &[String], tags: &[&str]) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::json!({ "device_id": id, "hardware": HARDWARE, "tags": tags }))
        .collect();
    serde_json::json!({ "devices": devices })
}

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n:03}")).collect()
}

#[tokio::test]
async fn a_hundred_devices_in_one_call() {
    let server = Server::start().await;
    let wanted = ids("sim", 100);
    let response = server
        .post_json("/api/v1/devices/batch", batch(&wanted, &["fleet-a"]))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let answer: BatchEnrollResponse = response.json().await.unwrap();
    assert_eq!(
        answer
            .devices
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        wanted.iter().map(String::as_str).collect::<Vec<_>>(),
        "one answer per device, in request order"
    );
    let mut keys = HashSet::new();
    for enrolled in &answer.devices {
        assert!(keys.insert(enrolled.private_key_pem.clone()), "keys differ");
        let der = CertificateDer::from_pem_slice(enrolled.certificate_pem.as_bytes()).unwrap();
        let (_, certificate) = x509_parser::parse_x509_certificate(&der).unwrap();
        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(common_name, enrolled.device_id.as_str());
        assert_eq!(
            enrolled.mqtt_url,
            format!("mqtts://127.0.0.1:{}", server.endpoints.mqtt.port())
        );
        assert_eq!(enrolled.trusted_signers.len(), 1);
    }
    // The answers work: the device endpoint accepts a batch-issued
    // certificate (any HTTP answer means the mutual TLS handshake passed).
    let last = &answer.devices[99];
    let answered = common::device_https_client(last)
        .get(format!("{}/v1/nothing", last.device_url))
        .send()
        .await
        .expect("a batch-issued certificate is accepted");
    assert_eq!(answered.status(), StatusCode::NOT_FOUND);

    let listed: Vec<DeviceInfo> = server.get_json("/api/v1/devices?tag=fleet-a").await;
    assert_eq!(listed.len(), 100);
    let audit = server.audit("limit=10000").await;
    let enrolled_rows: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "device.enrolled")
        .collect();
    assert_eq!(enrolled_rows.len(), 100, "one audit row per device");
    assert!(enrolled_rows.iter().all(|e| e.actor == "admin"));
    server.stop().await;
}

#[tokio::test]
async fn a_bad_batch_stores_nothing() {
    let server = Server::start().await;
    server.enroll("taken", &[]).await;

    let mut twice = ids("dup", 5);
    twice.push("dup-002".to_owned());
    let mut clashing = ids("clash", 5);
    clashing.push("taken".to_owned());
    let mut invalid = ids("bad", 5);
    invalid.push("a/b".to_owned());
    let cases = [
        (
            batch(&twice, &[]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (batch(&clashing, &[]), StatusCode::CONFLICT, "device-exists"),
        (
            batch(&invalid, &[]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            batch(&ids("tag", 3), &["no space"]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            batch(&[], &[]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            batch(&ids("many", MAX_BATCH_ENROLL + 1), &[]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
    ];
    for (body, status, code) in cases {
        let response = server.post_json("/api/v1/devices/batch", body).await;
        assert_eq!(response.status(), status);
        assert_eq!(error_code(response).await, code);
    }
    let listed: Vec<DeviceInfo> = server.get_json("/api/v1/devices").await;
    assert_eq!(
        listed
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        ["taken"],
        "no refused batch left a device behind"
    );
    let enrolled_rows = server
        .audit("limit=10000")
        .await
        .into_iter()
        .filter(|e| e.event == "device.enrolled")
        .count();
    assert_eq!(enrolled_rows, 1);

    // A device named `batch` is still reachable.
    server.enroll("batch", &[]).await;
    let named: DeviceInfo = server.get_json("/api/v1/devices/batch").await;
    assert_eq!(named.device_id.as_str(), "batch");
    server.stop().await;
}
