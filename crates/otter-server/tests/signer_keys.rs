//! Offline root keys on the server (issue 6, item 4): with `--trusted-root`,
//! uploads by signers the root certified are accepted (certificate kept with
//! the release and handed to devices), other roots and expired certificates
//! are refused; `PUT /api/v1/signer-revocations` stores a root-signed list
//! (bad signature: 422, not newer: 409, nothing changed either way,
//! audited when stored), after which uploads and new deployments of the
//! revoked signer are refused, also after a restart, and devices get the
//! list with their update.

mod common;

use ed25519_dalek::SigningKey;
use otter_package::format::{BuildOptions, build_package};
use otter_package::keys::key_id;
use otter_package::trust::{certify, revoke};
use otter_proto::api::{EnrollResponse, ReleaseInfo};
use otter_proto::manifest::PackageKind;
use otter_proto::messages::{Mode, PollResponse, Registration, encode};
use otter_proto::trust::{RevocationListInfo, SignedCertificate, SignedRevocationList};
use reqwest::StatusCode;

use common::{HARDWARE, Server, device_https_client, error_code, payload};

const DAY: i64 = 86_400;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rng())
}

/// A server trusting its test folder's root key (`common::root_path`, as
/// `otter keys create-root` writes it) besides its direct signer.
async fn start(dir: tempfile::TempDir) -> Server {
    Server::start_configured(dir, |_| {}).await
}

fn root_key(server: &Server) -> SigningKey {
    common::root_key(server.dir.path())
}

fn package(
    server: &Server,
    signer: &SigningKey,
    certificate: Option<SignedCertificate>,
    version: &str,
) -> Vec<u8> {
    let mut options = BuildOptions::new(
        "fw",
        semver::Version::parse(version).unwrap(),
        PackageKind::Firmware,
        vec![HARDWARE.to_owned()],
    );
    options.signer_certificate = certificate;
    let mut output = Vec::new();
    build_package(
        &mut &payload(64)[..],
        &mut output,
        signer,
        &options,
        server.dir.path(),
    )
    .unwrap();
    output
}

async fn put_list(server: &Server, list: &SignedRevocationList) -> reqwest::Response {
    server
        .http
        .put(server.url("/api/v1/signer-revocations"))
        .bearer_auth(&server.token)
        .json(list)
        .send()
        .await
        .unwrap()
}

async fn published_rows(server: &Server) -> Vec<serde_json::Value> {
    server
        .audit("limit=1000")
        .await
        .into_iter()
        .filter(|e| e.event == "signer-revocations.published")
        .map(|e| e.details)
        .collect()
}

async fn poll(server: &Server, enrolled: &EnrollResponse) -> PollResponse {
    let registration = Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.into(),
        installed: Default::default(),
        agent_version: "0.1.0".into(),
        mode: Mode::Pull,
        capabilities: vec!["file".into()],
        encryption_key: common::encryption_key(),
    };
    let response = device_https_client(enrolled)
        .post(format!(
            "https://127.0.0.1:{}/v1/poll",
            server.endpoints.device.port()
        ))
        .header("content-type", "application/json")
        .body(encode(&registration))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[tokio::test]
async fn certified_signers_upload_and_revocation_is_enforced() {
    let server = start(tempfile::tempdir().unwrap()).await;
    let root = root_key(&server);
    let now = now();

    // Devices are given the root at enrolment.
    let enrolled = server.enroll("dev-1", &[]).await;
    assert_eq!(
        enrolled.trusted_roots,
        [otter_package::keys::verifying_key_pem(
            &root.verifying_key()
        )]
    );

    // A certified signer uploads; the certificate is kept with the release.
    let signer = new_key();
    let certificate = certify(&root, &signer.verifying_key(), "ci", now - DAY, now + DAY).unwrap();
    let response = server
        .upload(package(
            &server,
            &signer,
            Some(certificate.clone()),
            "1.0.0",
        ))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let release: ReleaseInfo = server.get_json("/api/v1/releases/fw@1.0.0").await;
    assert_eq!(
        release.manifest.signer_certificate,
        Some(Box::new(certificate.clone()))
    );

    // Another root, an expired certificate, no certificate: refused, not stored.
    let foreign = certify(
        &new_key(),
        &signer.verifying_key(),
        "x",
        now - DAY,
        now + DAY,
    )
    .unwrap();
    let expired = certify(
        &root,
        &signer.verifying_key(),
        "ci",
        now - 3 * DAY,
        now - DAY,
    )
    .unwrap();
    for (certificate, code) in [
        (Some(foreign), "untrusted-root"),
        (Some(expired), "signer-certificate-expired"),
        (None, "invalid-package"),
    ] {
        let response = server
            .upload(package(&server, &signer, certificate, "1.1.0"))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{code}"
        );
        assert_eq!(error_code(response).await, code);
    }
    let releases: Vec<ReleaseInfo> = server.get_json("/api/v1/releases").await;
    assert_eq!(releases.len(), 1);

    // No list yet.
    assert_eq!(
        server.get("/api/v1/signer-revocations").await.status(),
        StatusCode::NOT_FOUND
    );

    // Lists made offline: sequence 1 revokes the signer.
    let (list1, doc1) =
        revoke(&root, None, &key_id(&signer.verifying_key()), "leaked", now).unwrap();
    let (forged, _) = revoke(&new_key(), None, &key_id(&signer.verifying_key()), "", now).unwrap();
    let mut tampered = list1.clone();
    tampered.list = tampered.list.replace("leaked", "fine!!");
    for (list, code) in [
        (&forged, "untrusted-root"),
        (&tampered, "invalid-revocation-list"),
    ] {
        let response = put_list(&server, list).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{code}"
        );
        assert_eq!(error_code(response).await, code);
    }
    assert_eq!(
        server.get("/api/v1/signer-revocations").await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(published_rows(&server).await.is_empty());

    let response = put_list(&server, &list1).await;
    assert_eq!(response.status(), StatusCode::OK);
    let info: RevocationListInfo = response.json().await.unwrap();
    assert_eq!(info.sequence, 1);
    assert_eq!(info.revoked, [key_id(&signer.verifying_key())]);
    let stored: SignedRevocationList = server.get_json("/api/v1/signer-revocations").await;
    assert_eq!(stored, list1);
    let rows = published_rows(&server).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["sequence"], 1);
    assert_eq!(rows[0]["revoked"][0], key_id(&signer.verifying_key()));

    // The same list again, and another list with the same sequence: 409.
    let (same_sequence, _) =
        revoke(&root, None, &key_id(&new_key().verifying_key()), "", now).unwrap();
    for list in [&list1, &same_sequence] {
        let response = put_list(&server, list).await;
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(error_code(response).await, "stale-revocation-list");
    }
    let stored: SignedRevocationList = server.get_json("/api/v1/signer-revocations").await;
    assert_eq!(stored, list1);
    assert_eq!(published_rows(&server).await.len(), 1);

    // The revoked signer can no longer upload, nor can its release be deployed.
    let certificate_again =
        certify(&root, &signer.verifying_key(), "ci", now - DAY, now + DAY).unwrap();
    let response = server
        .upload(package(&server, &signer, Some(certificate_again), "2.0.0"))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(response).await, "revoked-signer");
    let response = server
        .post_json(
            "/api/v1/deployments",
            serde_json::json!({ "release": "fw@1.0.0", "target": "device:dev-1" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(response).await, "revoked-signer");

    // A rotated signer works, and its deployment carries the list to devices.
    let rotated = new_key();
    let certificate = certify(
        &root,
        &rotated.verifying_key(),
        "ci-2",
        now - DAY,
        now + DAY,
    )
    .unwrap();
    let response = server
        .upload(package(
            &server,
            &rotated,
            Some(certificate.clone()),
            "3.0.0",
        ))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    server.deploy("fw@3.0.0", "device:dev-1").await;
    let update = poll(&server, &enrolled).await.update.expect("an update");
    assert_eq!(update.signer_revocations, Some(Box::new(list1.clone())));
    assert_eq!(
        update.manifest.signer_certificate,
        Some(Box::new(certificate))
    );

    // After a restart the stored list is still in force.
    let dir = server.stop().await;
    let server = start(dir).await;
    let (list2, _) = revoke(
        &root,
        Some(&doc1),
        &key_id(&new_key().verifying_key()),
        "",
        now,
    )
    .unwrap();
    let response = server
        .upload(package(
            &server,
            &signer,
            Some(certify(&root, &signer.verifying_key(), "ci", now - DAY, now + DAY).unwrap()),
            "4.0.0",
        ))
        .await;
    assert_eq!(error_code(response).await, "revoked-signer");
    let response = put_list(&server, &list2).await;
    assert_eq!(response.status(), StatusCode::OK);
    server.stop().await;
}
