//! Shared setup for the server's integration tests: the whole server
//! in-process (`otter_server::run` on port-0 loopback addresses in a
//! temporary folder) driven over its operator API, signed packages built
//! with the server's trusted key, and device-side mutual-TLS client
//! configurations.
//!
//! Layout: waiting ([`eventually`]), the in-process [`Server`] and its API
//! helpers, packages and payloads, device TLS.
//!
//! Waiting is always "until this holds, at most `TIMEOUT`", never a sleep.

#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use otter_package::format::{BuildOptions, build_package};
use otter_proto::api::{
    AuditEntry, DeploymentInfo, DeploymentStatus, EnrollResponse, ErrorBody, ReleaseInfo,
};
use otter_proto::deployment::Phase;
use otter_proto::manifest::PackageKind;
use otter_server::{Endpoints, ServerConfig};
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The encryption key test devices register with (one for all: the wrap
/// context still binds each device's id).
pub static DEVICE_KEY: std::sync::LazyLock<otter_package::wrap::DeviceKey> =
    std::sync::LazyLock::new(otter_package::wrap::DeviceKey::generate);

/// [`DEVICE_KEY`]'s public half, as a registration carries it.
pub fn encryption_key() -> Option<String> {
    Some(DEVICE_KEY.public_key().to_base64())
}

/// Opens a data key the server wrapped to `device_id` for `manifest` with
/// `key` (what that device's agent does).
pub fn unwrap_key(
    key: &otter_package::wrap::DeviceKey,
    device_id: &str,
    manifest: &otter_proto::manifest::SignedManifest,
    wrapped_key: &str,
) -> Result<otter_package::DataKey, otter_package::PackageError> {
    let manifest = otter_proto::manifest::Manifest::from_json(&manifest.manifest)?;
    let wrapped = otter_package::wrap::WrappedKey::from_base64(wrapped_key)?;
    let release = manifest.release_id();
    let context = otter_package::wrap::WrapContext {
        device_id,
        release: &release,
        artifact_sha256: &manifest.artifact.sha256,
    };
    otter_package::wrap::unwrap_data_key(key, &wrapped, &context)
}

pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The hardware every test device and package declares.
pub const HARDWARE: &str = "revB";

/// Polls `check` until it returns `Some`, at most `TIMEOUT`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
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
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole server running in this test process.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub endpoints: Endpoints,
    pub token: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Where a server's test folder keeps the package signing key it trusts.
pub fn signer_path(dir: &Path) -> PathBuf {
    dir.join("keys").join("signer.key")
}

/// The signing key the server in `dir` trusts.
pub fn signer(dir: &Path) -> SigningKey {
    otter_package::keys::read_signing_key(&signer_path(dir)).unwrap()
}

/// Where a server's test folder keeps the offline root key it trusts
/// (`--trusted-root`).
pub fn root_path(dir: &Path) -> PathBuf {
    dir.join("keys").join("root.key")
}

/// The offline root key the server in `dir` trusts.
pub fn root_key(dir: &Path) -> SigningKey {
    otter_package::keys::read_signing_key(&root_path(dir)).unwrap()
}

impl Server {
    /// A server on the default (ephemeral) configuration in a fresh folder.
    pub async fn start() -> Server {
        Server::start_configured(tempfile::tempdir().unwrap(), |_| {}).await
    }

    /// Starts a server in `dir` (kept from an earlier run, or fresh) after
    /// `configure` adjusted its ephemeral configuration. The signing key is
    /// generated only if `dir` has none.
    pub async fn start_configured(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Server {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let key_path = signer_path(dir.path());
        if !key_path.exists() {
            std::fs::create_dir_all(key_path.parent().unwrap()).unwrap();
            otter_package::keys::generate_key_pair(&key_path).unwrap();
        }
        let root_path = root_path(dir.path());
        if !root_path.exists() {
            otter_package::keys::generate_key_pair(&root_path).unwrap();
        }
        let data_dir = dir.path().join("data");
        let _ = std::fs::remove_file(data_dir.join("endpoints.json"));
        let mut config = ServerConfig::ephemeral(&data_dir);
        config.trusted_signers = vec![otter_package::keys::public_key_path(&key_path)];
        config.trusted_roots = vec![otter_package::keys::public_key_path(&root_path)];
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(otter_server::run(config, async move {
            let _ = stopped.await;
        }));
        let endpoints_path = data_dir.join("endpoints.json");
        let endpoints: Endpoints = eventually("endpoints.json", || {
            let path = endpoints_path.clone();
            async move {
                let bytes = std::fs::read(path).ok()?;
                serde_json::from_slice(&bytes).ok()
            }
        })
        .await;
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
        Server {
            dir,
            endpoints,
            token,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The signing key this server trusts.
    pub fn signer(&self) -> SigningKey {
        signer(self.dir.path())
    }

    /// Stops the server, asserts it ended cleanly, and hands back its folder.
    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(TIMEOUT, &mut self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.endpoints.api)
    }

    /// GET on the operator API with the admin token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// GET on the operator API; asserts 200 and parses the JSON body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Uploads package bytes; the answer is the caller's to judge.
    pub async fn upload(&self, package: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/releases"))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(package)
            .send()
            .await
            .unwrap()
    }

    /// Builds a firmware package of `payload` signed with the trusted key,
    /// uploads it (asserting 201); returns the release and the artifact
    /// bytes (the tail of the package).
    pub async fn upload_release(
        &self,
        name: &str,
        version: &str,
        payload: &[u8],
    ) -> (ReleaseInfo, Vec<u8>) {
        let package = package(&self.signer(), self.dir.path(), name, version, payload);
        let response = self.upload(package.clone()).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let release: ReleaseInfo = response.json().await.unwrap();
        let artifact = package[package.len() - release.artifact_size as usize..].to_vec();
        (release, artifact)
    }

    /// Enrols `device_id` with hardware [`HARDWARE`] and `tags` (asserting 201).
    pub async fn enroll(&self, device_id: &str, tags: &[&str]) -> EnrollResponse {
        let response = self
            .post_json(
                "/api/v1/devices",
                serde_json::json!({ "device_id": device_id, "hardware": HARDWARE, "tags": tags }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    /// Creates a deployment (asserting 201).
    pub async fn deploy(&self, release: &str, target: &str) -> DeploymentInfo {
        let response = self
            .post_json(
                "/api/v1/deployments",
                serde_json::json!({ "release": release, "target": target }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    /// The audit rows matching `query` (e.g. `device=dev-1`).
    pub async fn audit(&self, query: &str) -> Vec<AuditEntry> {
        let response = self.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// How many audit rows of `device_id` are `event`.
    pub async fn count(&self, device_id: &str, event: &str) -> usize {
        self.audit(&format!("device={device_id}"))
            .await
            .iter()
            .filter(|e| e.event == event)
            .count()
    }

    pub async fn phase(&self, deployment_id: &str, device_id: &str) -> Phase {
        let status: DeploymentStatus = self
            .get_json(&format!("/api/v1/deployments/{deployment_id}"))
            .await;
        status
            .targets
            .iter()
            .find(|t| t.device_id.as_str() == device_id)
            .unwrap()
            .phase
    }

    pub async fn wait_phase(&self, deployment_id: &str, device_id: &str, phase: Phase) {
        eventually(&format!("{device_id} to reach {phase:?}"), || async {
            (self.phase(deployment_id, device_id).await == phase).then_some(())
        })
        .await
    }

    pub async fn wait_audit_event(&self, query: &str, event: &str) -> AuditEntry {
        eventually(&format!("audit event {event}"), || async {
            self.audit(query)
                .await
                .into_iter()
                .find(|e| e.event == event)
        })
        .await
    }
}

/// Builds a firmware package of `payload` for [`HARDWARE`] signed with
/// `key`; returns its bytes.
pub fn package(
    key: &SigningKey,
    scratch: &Path,
    name: &str,
    version: &str,
    payload: &[u8],
) -> Vec<u8> {
    let options = BuildOptions::new(
        name,
        semver::Version::parse(version).unwrap(),
        PackageKind::Firmware,
        vec![HARDWARE.to_owned()],
    );
    let mut output = Vec::new();
    build_package(&mut &payload[..], &mut output, key, &options, scratch).unwrap();
    output
}

/// A patterned payload of `words` little-endian u32s (4 × `words` bytes).
pub fn payload(words: u32) -> Vec<u8> {
    (0..words).flat_map(|i| (i % 251).to_le_bytes()).collect()
}

/// The `error` code of an API error answer.
pub async fn error_code(response: reqwest::Response) -> String {
    response.json::<ErrorBody>().await.unwrap().error
}

/// A client TLS configuration trusting `ca_pem` and presenting the
/// certificate and key given as PEM.
pub fn client_tls_from_pem(
    ca_pem: &str,
    certificate_pem: &str,
    private_key_pem: &str,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(certificate_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(private_key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The client TLS configuration of an enrolled device.
pub fn client_tls(enrolled: &EnrollResponse) -> rustls::ClientConfig {
    client_tls_from_pem(
        &enrolled.ca_pem,
        &enrolled.certificate_pem,
        &enrolled.private_key_pem,
    )
}

/// An HTTPS client presenting an enrolled device's certificate.
pub fn device_https_client(enrolled: &EnrollResponse) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(enrolled))
        .build()
        .unwrap()
}

/// A CA of the operator's own (not the server's), and what it issued.
pub struct FactoryCa {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl FactoryCa {
    pub fn new(name: &str) -> FactoryCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        FactoryCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate with CN = `device_id`: (certificate, key) PEM.
    pub fn issue(&self, device_id: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device_id);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}
