//! TLS client configurations for the broker and the device HTTPS endpoint.
//!
//! Both use rustls with the aws-lc-rs provider chosen explicitly (ring is
//! also compiled into the tree, so rustls cannot pick a default), the
//! configured CA as the only root, and the device certificate and key as the
//! client identity. [`DeviceTls::mqtt_config`] disables session resumption:
//! the default session cache costs memory per client and the agent reconnects
//! rarely. [`DeviceTls::https_config`] asks for HTTP/1.1 by ALPN, which is
//! what the agent's HTTP client speaks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} contains no certificate")]
    NoCertificate { path: PathBuf },
    #[error("invalid CA certificate in {path}: {reason}")]
    BadRoot { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The device's TLS identity and trust anchors, read once from PEM files.
#[derive(Debug, Clone)]
pub struct DeviceTls {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl DeviceTls {
    /// Reads the CA, the device certificate (chain) and its private key.
    pub fn load(ca: &Path, certificate: &Path, private_key: &Path) -> Result<Self, TlsError> {
        let roots_der = read_certificates("CA certificates", ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in roots_der {
            roots.add(cert).map_err(|e| TlsError::BadRoot {
                path: ca.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let chain = read_certificates("device certificate", certificate)?;
        let key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| TlsError::Pem {
            what: "private key",
            path: private_key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(DeviceTls {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        })
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(config)
    }

    /// The configuration for MQTT over TLS (rumqttc), without resumption.
    pub fn mqtt_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = self.client_config()?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// The configuration for HTTPS downloads (reqwest).
    pub fn https_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = self.client_config()?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}
