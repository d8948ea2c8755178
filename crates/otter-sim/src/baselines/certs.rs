//! A throw-away PKI for the baseline servers: one P-256 CA, a server
//! certificate for the baseline's addresses, and client certificates whose
//! common name is the MQTT user name (Mosquitto's `use_identity_as_username`).
//!
//! Everything is generated with rcgen (aws-lc-rs) at the start of a run and
//! written as PEM into the run's work folder, where Mosquitto and nginx read
//! it. The client side gets rustls configurations that share one verifier,
//! so thousands of clients cost one parsed root store.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client certificate and its key, in memory.
pub struct ClientIdentity {
    pub common_name: String,
    pub certificate: CertificateDer<'static>,
    pub private_key_der: Vec<u8>,
}

/// The CA, the server certificate files, and what clients need to trust it.
pub struct BaselinePki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_cert_path: PathBuf,
    pub server_cert_path: PathBuf,
    pub server_key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
}

fn p256_key() -> anyhow::Result<KeyPair> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

impl BaselinePki {
    /// Creates the CA and a server certificate valid for `server_addresses`
    /// (as IP SANs: the clients dial IP literals), written into `dir`.
    pub fn create(dir: &Path, server_addresses: &[IpAddr]) -> anyhow::Result<BaselinePki> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca_key = p256_key()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = named("otter baseline CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let names: Vec<String> = server_addresses.iter().map(IpAddr::to_string).collect();
        let server_key = p256_key()?;
        let mut server_params = CertificateParams::new(names)?;
        server_params.distinguished_name = named("otter baseline server");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let ca_cert_path = dir.join("ca.pem");
        let server_cert_path = dir.join("server.pem");
        let server_key_path = dir.join("server.key");
        std::fs::write(&ca_cert_path, ca_cert.pem())?;
        std::fs::write(&server_cert_path, server_cert.pem())?;
        std::fs::write(&server_key_path, server_key.serialize_pem())?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        Ok(BaselinePki {
            issuer,
            ca_cert_path,
            server_cert_path,
            server_key_path,
            provider,
            verifier,
        })
    }

    /// Issues a client certificate (P-256) named `common_name`.
    pub fn issue_client(&self, common_name: &str) -> anyhow::Result<ClientIdentity> {
        let key = p256_key()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = named(common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(ClientIdentity {
            common_name: common_name.to_owned(),
            certificate: certificate.der().clone(),
            private_key_der: key.serialize_der(),
        })
    }

    /// A TLS client configuration presenting `identity`, sharing this PKI's
    /// verifier and provider. Resumption is off: its default cache costs
    /// about 12 KiB per client, and each baseline client connects once.
    pub fn client_config(&self, identity: &ClientIdentity) -> anyhow::Result<rustls::ClientConfig> {
        let key = PrivateKeyDer::try_from(identity.private_key_der.clone())
            .map_err(|error| anyhow::anyhow!("client key: {error}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(self.verifier.clone())
            .with_client_auth_cert(vec![identity.certificate.clone()], key)?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// The CA certificate, e.g. to check that the written file parses.
    pub fn ca_certificate(&self) -> anyhow::Result<CertificateDer<'static>> {
        CertificateDer::from_pem_file(&self.ca_cert_path)
            .with_context(|| format!("cannot read {}", self.ca_cert_path.display()))
    }
}
