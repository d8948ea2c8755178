//! CSR enrolment with one-time tokens, against the real server over real
//! TLS: the operator creates a token, a client without a certificate posts
//! a CSR to `POST /v1/enrol`, and the certificate it gets back names the
//! device, carries the CSR's key and chains to the device CA. Every refused
//! attempt (replayed, expired, revoked, unknown or another device's token, a
//! garbage or mis-signed CSR, a key type we do not take) changes nothing;
//! the other device routes refuse a client without a certificate.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{HARDWARE, Server, error_code, eventually};
use otter_proto::api::{CreatedEnrolmentToken, CsrEnrolResponse, DeviceInfo, EnrolmentTokenInfo};
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use sha2::{Digest, Sha256};

async fn create_token(server: &Server, device_id: &str, ttl_seconds: u64) -> CreatedEnrolmentToken {
    let response = server
        .post_json(
            "/api/v1/enrolment-tokens",
            json!({ "device_id": device_id, "hardware": HARDWARE, "tags": ["line-2", "eu"], "ttl_seconds": ttl_seconds }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

fn ca_roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// An HTTPS client trusting the device CA and presenting no certificate.
fn anonymous_client(ca_pem: &str) -> reqwest::Client {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca_roots(ca_pem))
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

/// A CSR for `key` whose subject claims to be someone else: the server must
/// take only the key.
fn csr_for(key: &rcgen::KeyPair) -> String {
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "someone-else");
    params.serialize_request(key).unwrap().pem().unwrap()
}

async fn enrol(
    server: &Server,
    ca_pem: &str,
    token: &str,
    device_id: &str,
    csr_pem: &str,
) -> reqwest::Response {
    anonymous_client(ca_pem)
        .post(format!("https://{}/v1/enrol", server.endpoints.device))
        .json(&json!({ "token": token, "device_id": device_id, "csr_pem": csr_pem }))
        .send()
        .await
        .unwrap()
}

async fn devices(server: &Server) -> Vec<DeviceInfo> {
    server.get_json("/api/v1/devices").await
}

async fn tokens(server: &Server) -> Vec<EnrolmentTokenInfo> {
    server.get_json("/api/v1/enrolment-tokens").await
}

#[tokio::test]
async fn csr_enrolment_issues_a_certificate_for_the_device_key_once() {
    let server = Server::start().await;
    let created = create_token(&server, "plant1.dev-7", 3600).await;
    assert!(
        created.token.starts_with("otter-enrol-"),
        "{}",
        created.token
    );
    let ca_der = CertificateDer::from_pem_slice(created.ca_pem.as_bytes()).unwrap();
    assert_eq!(
        created.ca_sha256,
        hex::encode(Sha256::digest(ca_der.as_ref()))
    );
    // The list never shows the token.
    let listed = serde_json::to_string(&tokens(&server).await).unwrap();
    assert!(!listed.contains(&created.token));
    assert!(listed.contains(&created.info.id));

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let response = enrol(
        &server,
        &created.ca_pem,
        &created.token,
        "plant1.dev-7",
        &csr_for(&key),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let enrolled: CsrEnrolResponse = response.json().await.unwrap();
    assert_eq!(enrolled.device_id.as_str(), "plant1.dev-7");
    assert_eq!(enrolled.hardware, HARDWARE);
    assert_eq!(enrolled.ca_pem, created.ca_pem);
    assert_eq!(enrolled.trusted_signers.len(), 1);

    // CN = device id, the CSR's key, signed by the CA, no SAN from the CSR.
    let cert_der = CertificateDer::from_pem_slice(enrolled.certificate_pem.as_bytes()).unwrap();
    let (_, certificate) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
    let common_names: Vec<_> = certificate
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(common_names, ["plant1.dev-7"]);
    assert_eq!(
        certificate.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    certificate.verify_signature(Some(ca.public_key())).unwrap();
    assert!(!format!("{:?}", certificate.subject_alternative_name()).contains("evil.example"));

    // The certificate and the device's own key open the device endpoint.
    let device_tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca_roots(&created.ca_pem))
        .with_client_auth_cert(
            vec![cert_der.clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    let device_client = reqwest::Client::builder()
        .tls_backend_preconfigured(device_tls)
        .build()
        .unwrap();
    let response = device_client
        .get(format!(
            "https://{}/v1/download/not-a-token",
            server.endpoints.device
        ))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);
    assert_ne!(error_code(response).await, "device-certificate-required");

    // Stored with the token's hardware and tags, audited by the token.
    let device: DeviceInfo = server.get_json("/api/v1/devices/plant1.dev-7").await;
    assert_eq!(device.hardware, HARDWARE);
    assert_eq!(device.tags, ["eu", "line-2"]);
    let audit = server.audit("device=plant1.dev-7").await;
    let enrolled_rows: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "device.enrolled")
        .collect();
    assert_eq!(enrolled_rows.len(), 1);
    assert_eq!(
        enrolled_rows[0].actor,
        format!("enrolment-token:{}", created.info.id)
    );
    assert!(audit.iter().any(|e| e.event == "enrolment-token.created"));
    let token = tokens(&server).await.remove(0);
    assert!(token.used_at.is_some());

    // A replay, even with a fresh key, changes nothing.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let response = enrol(
        &server,
        &created.ca_pem,
        &created.token,
        "plant1.dev-7",
        &csr_for(&other_key),
    )
    .await;
    assert_eq!(response.status(), StatusCode::GONE);
    assert_eq!(error_code(response).await, "enrolment-token-used");
    assert_eq!(server.audit("device=plant1.dev-7").await, audit);
    assert_eq!(devices(&server).await.len(), 1);
    // A used token cannot be revoked.
    let response = server
        .http
        .delete(server.url(&format!("/api/v1/enrolment-tokens/{}", created.info.id)))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn ed25519_keys_are_accepted_and_other_key_types_refused() {
    let server = Server::start().await;
    let created = create_token(&server, "dev-ed", 3600).await;
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let response = enrol(
        &server,
        &created.ca_pem,
        &created.token,
        "dev-ed",
        &csr_for(&p384),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "invalid-csr");
    assert!(tokens(&server).await[0].used_at.is_none());

    let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let response = enrol(
        &server,
        &created.ca_pem,
        &created.token,
        "dev-ed",
        &csr_for(&ed25519),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// Flips the last byte of the CSR's DER (inside its signature) and encodes
/// it as PEM again.
fn tamper_signature(csr_pem: &str) -> String {
    let body: String = csr_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn refused_enrolments_change_nothing() {
    let server = Server::start().await;
    let created = create_token(&server, "dev-1", 3600).await;
    let ca = created.ca_pem.clone();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = csr_for(&key);
    let audit_before = server.audit("limit=1000").await;

    let cases: Vec<(&str, String, &str, String, StatusCode, &str)> = vec![
        (
            "unknown token",
            "otter-enrol-nope".into(),
            "dev-1",
            csr.clone(),
            StatusCode::UNAUTHORIZED,
            "enrolment-token-invalid",
        ),
        (
            "empty token",
            String::new(),
            "dev-1",
            csr.clone(),
            StatusCode::UNAUTHORIZED,
            "enrolment-token-invalid",
        ),
        (
            "another device",
            created.token.clone(),
            "dev-2",
            csr.clone(),
            StatusCode::FORBIDDEN,
            "enrolment-token-device-mismatch",
        ),
        (
            "garbage CSR",
            created.token.clone(),
            "dev-1",
            "not a csr".into(),
            StatusCode::BAD_REQUEST,
            "invalid-csr",
        ),
        (
            "bad signature",
            created.token.clone(),
            "dev-1",
            tamper_signature(&csr),
            StatusCode::BAD_REQUEST,
            "invalid-csr",
        ),
    ];
    for (what, token, device_id, csr_pem, status, code) in cases {
        let response = enrol(&server, &ca, &token, device_id, &csr_pem).await;
        assert_eq!(response.status(), status, "{what}");
        assert_eq!(error_code(response).await, code, "{what}");
    }
    // Malformed and oversized bodies.
    let client = anonymous_client(&ca);
    let url = format!("https://{}/v1/enrol", server.endpoints.device);
    let response = client.post(&url).body("{").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = client
        .post(&url)
        .body(vec![b' '; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    assert!(devices(&server).await.is_empty());
    assert!(tokens(&server).await[0].used_at.is_none());
    assert_eq!(server.audit("limit=1000").await, audit_before);

    // Revoked: refused with 410; a second revocation is a conflict.
    let revoke_url = server.url(&format!("/api/v1/enrolment-tokens/{}", created.info.id));
    let response = server
        .http
        .delete(&revoke_url)
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = enrol(&server, &ca, &created.token, "dev-1", &csr).await;
    assert_eq!(response.status(), StatusCode::GONE);
    assert_eq!(error_code(response).await, "enrolment-token-revoked");
    let response = server
        .http
        .delete(&revoke_url)
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(server.count("dev-1", "enrolment-token.revoked").await, 1);

    // Expired: a one-second token, tried until it has expired.
    let short = create_token(&server, "dev-3", 1).await;
    let response = eventually("the token to expire", || async {
        let response = enrol(&server, &ca, &short.token, "dev-3", "not a csr").await;
        (response.status() == StatusCode::GONE).then_some(response)
    })
    .await;
    assert_eq!(error_code(response).await, "enrolment-token-expired");
    let response = enrol(&server, &ca, &short.token, "dev-3", &csr).await;
    assert_eq!(response.status(), StatusCode::GONE);
    assert!(devices(&server).await.is_empty());

    // Bad token requests to the operator API.
    for body in [
        json!({ "device_id": "dev-4", "hardware": HARDWARE, "ttl_seconds": 0 }),
        json!({ "device_id": "dev-4", "hardware": "bad hw" }),
        json!({ "device_id": "no/slash", "hardware": HARDWARE }),
    ] {
        let response = server
            .post_json("/api/v1/enrolment-tokens", body.clone())
            .await;
        assert!(response.status().is_client_error(), "{body}");
    }
}

#[tokio::test]
async fn device_routes_refuse_a_client_without_certificate() {
    let server = Server::start().await;
    let enrolled = server.enroll("dev-1", &[]).await;
    let client = anonymous_client(&enrolled.ca_pem);
    let base = format!("https://{}", server.endpoints.device);
    let requests = [
        client.post(format!("{base}/v1/poll")).body("{}"),
        client.post(format!("{base}/v1/status")).body("{}"),
        client.get(format!("{base}/v1/download/anything")),
        client.get(format!("{base}/v1/no-such-route")),
    ];
    for request in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(response).await, "device-certificate-required");
    }
    // The device's own certificate still works on the same routes.
    let response = common::device_https_client(&enrolled)
        .post(format!("{base}/v1/poll"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}
