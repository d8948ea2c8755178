//! `otter-agent enrol`: CSR enrolment with a one-time token, so the
//! device's private key never leaves it.
//!
//! The agent generates a P-256 key pair (or reuses the `device.key` an
//! earlier, failed attempt left in the folder), writes it (mode 0600)
//! before anything is sent, builds a CSR, and posts `{ token, device_id,
//! csr_pem }` to `POST /v1/enrol` on the device endpoint over TLS that
//! trusts only the given CA file (no system roots, no client certificate).
//! The answer completes the bundle ([`crate::bundle`]), the same layout
//! `otter device enroll` writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use otter_proto::api::{CsrEnrolRequest, CsrEnrolResponse, ErrorBody};
use otter_proto::topics::DeviceId;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::bundle::{self, Bundle, PRIVATE_KEY_FILE};

/// Largest answer read from the server (certificate, CA, signers).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What `otter-agent enrol` needs.
#[derive(Debug, Clone)]
pub struct EnrolOptions {
    /// `https://host:port` of the device endpoint.
    pub server: String,
    /// The CA certificate (PEM) to pin, as shown with the token.
    pub ca: PathBuf,
    pub token: String,
    pub device_id: DeviceId,
    /// Written into `agent.toml` instead of the hardware the token gave the
    /// device (the agent registers with what `agent.toml` says).
    pub hardware: Option<String>,
    pub out: PathBuf,
}

/// Enrols the device and writes its bundle into `options.out`.
pub async fn enrol(options: &EnrolOptions) -> anyhow::Result<CsrEnrolResponse> {
    let out = &options.out;
    bundle::ensure_free(out, true)?;
    let url = format!("{}/v1/enrol", options.server.trim_end_matches('/'));
    if !url.starts_with("https://") {
        bail!("--server must be an https:// URL, not {:?}", options.server);
    }
    let tls = pinned_tls_config(&options.ca)?;
    let key = device_key(out)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("cannot build the certificate request")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, options.device_id.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .context("cannot build the certificate request")?;

    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build the HTTPS client")?;
    let request = CsrEnrolRequest {
        token: options.token.clone(),
        device_id: options.device_id.clone(),
        csr_pem: csr,
    };
    let mut response = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading the answer of {url}"))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            bail!("the answer of {url} is larger than {MAX_RESPONSE_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let reason = serde_json::from_slice::<ErrorBody>(&body)
            .map(|error| format!("{}: {}", error.error, error.message))
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        bail!("enrolment refused ({status}): {reason}");
    }
    let enrolled: CsrEnrolResponse =
        serde_json::from_slice(&body).context("the server's answer is not an enrolment")?;
    if enrolled.device_id != options.device_id {
        bail!(
            "the server answered for device {}, not {}",
            enrolled.device_id,
            options.device_id
        );
    }
    let hardware = options.hardware.as_deref().unwrap_or(&enrolled.hardware);
    bundle::write_bundle(
        out,
        &Bundle {
            device_id: &enrolled.device_id,
            hardware,
            certificate_pem: &enrolled.certificate_pem,
            ca_pem: &enrolled.ca_pem,
            trusted_signers: &enrolled.trusted_signers,
            trusted_roots: &enrolled.trusted_roots,
            mqtt_url: &enrolled.mqtt_url,
            device_url: &enrolled.device_url,
        },
    )
    .with_context(|| format!("cannot write the bundle to {}", out.display()))?;
    Ok(enrolled)
}

/// The key left by an earlier attempt, or a fresh P-256 key written first.
fn device_key(out: &Path) -> anyhow::Result<rcgen::KeyPair> {
    let path = out.join(PRIVATE_KEY_FILE);
    if path.exists() {
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{} is not a usable private key", path.display()));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate a key pair")?;
    bundle::write_private_key(out, &key.serialize_pem())?;
    Ok(key)
}

/// TLS that trusts only the certificates of `ca` and presents none.
fn pinned_tls_config(ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let certificates = CertificateDer::pem_file_iter(ca)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    if certificates.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots
            .add(certificate)
            .with_context(|| format!("invalid CA certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
