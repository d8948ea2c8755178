//! Pull mode on the device endpoint: `POST /v1/poll` and `POST /v1/status`
//! over real mutual TLS against the whole server (`otter_server::run` on
//! port-0 loopback addresses), driven by a reqwest client holding a device
//! certificate issued through the enrol API.
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

mod common;

use otter_proto::api::{AuditEntry, Channel, DeviceInfo, EnrollResponse};
use otter_proto::deployment::Phase;
use otter_proto::messages::{
    DeviceEvent, Mode, PollResponse, Registration, StatusReport, UpdateNotification, encode,
};
use reqwest::StatusCode;

use common::{HARDWARE, Server, device_https_client, error_code, payload};

/// A device: its HTTPS client with its certificate, and what it reports.
struct PollingDevice {
    http: reqwest::Client,
    base: String,
    registration: Registration,
}

impl PollingDevice {
    fn new(server: &Server, enrolled: &EnrollResponse) -> PollingDevice {
        PollingDevice {
            http: device_https_client(enrolled),
            base: format!("https://127.0.0.1:{}", server.endpoints.device.port()),
            registration: Registration {
                protocol: otter_proto::PROTOCOL_VERSION,
                hardware: HARDWARE.into(),
                installed: Default::default(),
                agent_version: "0.1.0".into(),
                mode: Mode::Pull,
                capabilities: vec!["file".into()],
                encryption_key: common::encryption_key(),
            },
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>, etag: Option<&str>) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(etag) = etag {
            request = request.header("if-none-match", etag);
        }
        request.send().await.unwrap()
    }

    /// Polls; returns the status, the ETag and the answer (None on 304).
    async fn poll(&self, etag: Option<&str>) -> (StatusCode, String, Option<PollResponse>) {
        let response = self
            .post("/v1/poll", encode(&self.registration), etag)
            .await;
        let status = response.status();
        let etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if status == StatusCode::NOT_MODIFIED {
            // An idle poll stays small: ETag and Date, nothing else.
            let names: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
            assert!(names.len() <= 2, "{names:?}");
        }
        let body = response.bytes().await.unwrap();
        let answer = if status == StatusCode::NOT_MODIFIED {
            assert!(body.is_empty(), "304 with a body: {body:?}");
            None
        } else {
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            Some(serde_json::from_slice(&body).unwrap())
        };
        (status, etag, answer)
    }

    async fn update(&self) -> (String, UpdateNotification) {
        let (_, etag, answer) = self.poll(None).await;
        (etag, answer.unwrap().update.expect("an update"))
    }

    async fn report(&self, deployment_id: &str, event: DeviceEvent) -> reqwest::Response {
        let report = StatusReport {
            deployment_id: deployment_id.into(),
            event,
            detail: None,
        };
        self.post("/v1/status", encode(&report), None).await
    }
}

#[tokio::test]
async fn poll_registers_answers_with_etags_and_delivers() {
    let server = Server::start().await;
    let enrolled = server.enroll("dev-p", &[]).await;
    let mut device = PollingDevice::new(&server, &enrolled);

    // First contact by polling registers the device, as via poll.
    let (status, etag_none, answer) = device.poll(None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, Some(PollResponse { update: None }));
    assert_eq!(etag_none, "\"none\"");
    let info: DeviceInfo = server.get_json("/api/v1/devices/dev-p").await;
    assert_eq!(info.registered_via, Some(Channel::Poll));
    assert_eq!(info.mode, Some(Mode::Pull));
    assert!(info.last_seen.is_some());
    let registered: Vec<AuditEntry> = server
        .audit("device=dev-p")
        .await
        .into_iter()
        .filter(|e| e.event == "device.registered")
        .collect();
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].details["via"], "poll");

    // Nothing changed: 304, no body (checked in `poll`), nothing audited.
    let (status, etag, _) = device.poll(Some(&etag_none)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(etag, etag_none);
    assert_eq!(server.count("dev-p", "device.registered").await, 1);

    // A changed registration is stored and audited again.
    device
        .registration
        .installed
        .insert("other".into(), semver::Version::new(2, 0, 0));
    let (status, _, _) = device.poll(Some(&etag_none)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(server.count("dev-p", "device.registered").await, 2);
    let info: DeviceInfo = server.get_json("/api/v1/devices/dev-p").await;
    assert_eq!(info.installed["other"], semver::Version::new(2, 0, 0));

    // A deployment: the poll answers with the update and its link.
    let (release, artifact) = server
        .upload_release("fw", "1.0.0", &payload(100_000))
        .await;
    let deployment = server
        .deploy("fw@1.0.0", "device:dev-p")
        .await
        .deployment_id;
    let (status, etag_update, answer) = device.poll(Some(&etag_none)).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(etag_update, etag_none);
    let update = answer.unwrap().update.expect("an update");
    assert_eq!(update.deployment_id, deployment);
    assert_eq!(update.release, "fw@1.0.0");
    assert_eq!(update.manifest, release.manifest);
    assert_eq!(server.phase(&deployment, "dev-p").await, Phase::Notified);
    let sent: Vec<AuditEntry> = server
        .audit("device=dev-p")
        .await
        .into_iter()
        .filter(|e| e.event == "notification.sent")
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].details["via"], "poll");

    // Same answer again: 304 (the link is reused, so the ETag holds).
    let (status, _, _) = device.poll(Some(&etag_update)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (_, again) = device.update().await;
    assert_eq!(again.link, update.link);
    assert_eq!(server.count("dev-p", "link.created").await, 1);

    // The link downloads with the same certificate.
    let download = device.http.get(&update.link).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.bytes().await.unwrap(), artifact);

    // Reports over HTTPS drive the phase machine; downloaded revokes the link.
    let response = device.report(&deployment, DeviceEvent::Received).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.phase(&deployment, "dev-p").await, Phase::Received);
    let response = device.report(&deployment, DeviceEvent::Downloaded).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.phase(&deployment, "dev-p").await, Phase::Downloaded);
    let gone = device.http.get(&update.link).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::GONE);
    assert_eq!(server.count("dev-p", "link.revoked").await, 1);

    // Past needing the link: nothing pending again.
    let (status, etag, answer) = device.poll(Some(&etag_update)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(etag, etag_none);
    assert_eq!(answer, Some(PollResponse { update: None }));

    // A malformed report changes nothing and is audited.
    let rejected_before = server.count("dev-p", "message.rejected").await;
    let response = device
        .post(
            "/v1/status",
            br#"{"deployment_id":"x","event":"exploded"}"#.to_vec(),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "malformed-message");
    assert_eq!(server.phase(&deployment, "dev-p").await, Phase::Downloaded);
    assert_eq!(
        server.count("dev-p", "message.rejected").await,
        rejected_before + 1
    );

    let response = device.report(&deployment, DeviceEvent::Installing).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = device.report(&deployment, DeviceEvent::Installed).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.phase(&deployment, "dev-p").await, Phase::Installed);
    for event in [
        "device.received",
        "device.downloaded",
        "device.installing",
        "device.installed",
    ] {
        assert_eq!(server.count("dev-p", event).await, 1, "{event}");
    }
}

#[tokio::test]
async fn device_endpoint_refuses_what_is_not_the_devices() {
    let server = Server::start().await;
    let device_p = PollingDevice::new(&server, &server.enroll("dev-p", &[]).await);
    let _device_q = server.enroll("dev-q", &[]).await;
    server
        .upload_release("fw", "1.0.0", &payload(100_000))
        .await;
    let deployment_q = server
        .deploy("fw@1.0.0", "device:dev-q")
        .await
        .deployment_id;

    // Another device's deployment, or none at all: 404, nothing changes.
    for deployment_id in [deployment_q.as_str(), "no-such-deployment"] {
        let response = device_p
            .report(deployment_id, DeviceEvent::Downloaded)
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(response).await, "unknown-deployment");
    }
    assert_eq!(server.phase(&deployment_q, "dev-q").await, Phase::Pending);
    // dev-p's poll does not see dev-q's deployment.
    let (_, _, answer) = device_p.poll(None).await;
    assert_eq!(answer, Some(PollResponse { update: None }));

    // Malformed, wrong protocol and oversized polls are refused and audited.
    let response = device_p.post("/v1/poll", b"{not json".to_vec(), None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "malformed-message");
    let mut old = device_p.registration.clone();
    old.protocol += 1;
    let response = device_p.post("/v1/poll", encode(&old), None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "malformed-message");
    let big = vec![b' '; otter_proto::MAX_MESSAGE_BYTES + 10];
    let response = device_p.post("/v1/poll", big, None).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(response).await, "message-too-large");
    let rejected: Vec<AuditEntry> = server
        .audit("device=dev-p")
        .await
        .into_iter()
        .filter(|e| e.event == "message.rejected")
        .collect();
    assert_eq!(rejected.len(), 5, "{rejected:#?}");
    assert!(rejected.iter().all(|e| e.actor == "dev-p"));

    // The device registered by its one good poll only.
    let info: DeviceInfo = server.get_json("/api/v1/devices/dev-p").await;
    assert_eq!(info.registered_via, Some(Channel::Poll));
    assert_eq!(server.count("dev-p", "device.registered").await, 1);
    let info_q: DeviceInfo = server.get_json("/api/v1/devices/dev-q").await;
    assert_eq!(info_q.registered_via, None);
}
