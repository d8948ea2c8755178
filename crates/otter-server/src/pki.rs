//! The server's private PKI: the device CA, the server certificate and device
//! client certificates.
//!
//! Everything lives in `DATA_DIR/pki/`:
//!
//! | file         | what                                                        |
//! |--------------|-------------------------------------------------------------|
//! | `ca.crt`     | the device CA (ECDSA P-256, CN "Otter Device CA", 10 years) |
//! | `ca.key`     | its private key, mode 0600                                  |
//! | `server.crt` | the server certificate, signed by the CA                    |
//! | `server.key` | its private key, mode 0600                                  |
//!
//! [`Pki::load_or_create`] creates what is missing on first start and keeps the
//! CA forever after (devices trust it); the server certificate is reissued
//! whenever it no longer chains to the CA, is about to expire, or does not
//! cover every configured public host name.
//!
//! Layout: [`Pki`] (loading, issuing, the device TLS configuration), then the
//! certificate templates (`ca_params`, `server_params`, `device_params`), then
//! certificate inspection ([`certificate_identity`]) and file helpers. Device
//! certificates are issued by `issue_for_public_key`, which takes only the
//! device's public key: [`Pki::issue_device`] generates the key here (the
//! server-generated-key path), [`Pki::issue_for_csr`] takes it from a
//! device's CSR, whose key never leaves the device.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use otter_proto::topics::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use time::{Duration, OffsetDateTime};

/// Common name of the device CA.
pub const CA_COMMON_NAME: &str = "Otter Device CA";
/// Common name of the server certificate. It contains a space, so it can never
/// be mistaken for a device id.
pub const SERVER_COMMON_NAME: &str = "Otter Server";

const CA_VALIDITY: Duration = Duration::days(3650);
const SERVER_VALIDITY: Duration = Duration::days(825);
const DEVICE_VALIDITY: Duration = Duration::days(5 * 365);
/// A server certificate closer than this to its end is reissued at start.
const SERVER_RENEW_BEFORE: Duration = Duration::days(30);
/// Certificates start a little in the past so that a device whose clock is
/// slightly behind still accepts them.
const BACKDATE: Duration = Duration::hours(1);
/// Names the server certificate always covers, for local clients and tests.
const ALWAYS_SERVED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Largest PEM file we read: certificates and keys are a few KiB.
const MAX_PEM_FILE_LEN: u64 = 64 * 1024;

/// Why the PKI could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("pki file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(error: rcgen::Error) -> Self {
        PkiError::Rcgen(error.to_string())
    }
}

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM PKCS#10 request, or its self-signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    Invalid(String),
    #[error("unsupported key type {0}: use ECDSA P-256 or Ed25519")]
    UnsupportedKey(String),
    #[error(transparent)]
    Pki(PkiError),
}

/// A certificate and private key issued to a device, both PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
    /// Lower-case hex without leading zeros, the same form rmqtt reports for a
    /// connected client's certificate (`CertInfo::serial`).
    pub serial_hex: String,
}

impl std::fmt::Debug for IssuedCertificate {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// What a client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    pub device_id: DeviceId,
    /// Same form as [`IssuedCertificate::serial_hex`].
    pub serial_hex: String,
}

/// The loaded PKI. Cheap to share behind an `Arc`; issuing needs only `&self`.
pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca_issuer: Issuer<'static, KeyPair>,
    server_cert_der: CertificateDer<'static>,
    server_key_der: PrivateKeyDer<'static>,
    ca_cert_path: PathBuf,
    server_cert_path: PathBuf,
    server_key_path: PathBuf,
    /// The operator's own device CAs (`--device-ca`), trusted next to ours.
    extra_cas: Vec<CertificateDer<'static>>,
    /// `pki/client-cas.pem`: our CA and the extra ones, for the broker.
    client_cas_path: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca_cert_path", &self.ca_cert_path)
            .field("server_cert_path", &self.server_cert_path)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads `DATA_DIR/pki/{ca.crt,ca.key,server.crt,server.key}`, creating what
    /// is missing: a device CA and a server certificate signed by it whose SANs
    /// are "localhost", 127.0.0.1, ::1 and every entry of `public_hosts` (DNS
    /// name or IP literal; IPv6 may be bracketed). An existing server
    /// certificate that does not cover `public_hosts`, no longer chains to the
    /// CA or expires within 30 days is reissued; the CA is never replaced.
    pub fn load_or_create(data_dir: &Path, public_hosts: &[String]) -> Result<Pki, PkiError> {
        let served_names = served_names(public_hosts)?;
        let pki_dir = data_dir.join("pki");
        fs::create_dir_all(&pki_dir).map_err(|source| io_error(&pki_dir, source))?;
        fs::set_permissions(&pki_dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_error(&pki_dir, source))?;

        let ca_cert_path = pki_dir.join("ca.crt");
        let ca_key_path = pki_dir.join("ca.key");
        let server_cert_path = pki_dir.join("server.crt");
        let server_key_path = pki_dir.join("server.key");

        let (ca_pem, ca_key, ca_created) = match (ca_cert_path.exists(), ca_key_path.exists()) {
            (true, true) => {
                let ca_pem = read_pem_file(&ca_cert_path)?;
                let ca_key = load_key(&ca_key_path)?;
                (ca_pem, ca_key, false)
            }
            (false, false) => {
                let ca_key = generate_key()?;
                let ca_pem = ca_params()?.self_signed(&ca_key)?.pem();
                write_private_file(&ca_key_path, ca_key.serialize_pem().as_bytes())?;
                write_public_file(&ca_cert_path, ca_pem.as_bytes())?;
                tracing::info!(path = %ca_cert_path.display(), "created the device CA");
                (ca_pem, ca_key, true)
            }
            // Replacing half a CA would silently strand every enrolled device.
            (true, false) | (false, true) => {
                return Err(PkiError::Invalid(format!(
                    "only one of {} and {} exists; restore the missing file or remove both to create a new CA",
                    ca_cert_path.display(),
                    ca_key_path.display()
                )));
            }
        };
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|error| PkiError::Invalid(format!("{}: {error}", ca_cert_path.display())))?;
        if !key_matches_certificate(&ca_key, &ca_der) {
            return Err(PkiError::Invalid(format!(
                "{} does not belong to {}",
                ca_key_path.display(),
                ca_cert_path.display()
            )));
        }
        let ca_issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;

        let existing_server =
            if !ca_created && server_cert_path.exists() && server_key_path.exists() {
                let cert_pem = read_pem_file(&server_cert_path)?;
                let key = load_key(&server_key_path)?;
                let cert_der =
                    CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|error| {
                        PkiError::Invalid(format!("{}: {error}", server_cert_path.display()))
                    })?;
                match server_certificate_problem(&ca_der, &cert_der, &key, &served_names) {
                    None => Some((cert_der, key)),
                    Some(problem) => {
                        tracing::info!(%problem, "reissuing the server certificate");
                        None
                    }
                }
            } else {
                None
            };
        let (server_cert_der, server_key) = match existing_server {
            Some(existing) => existing,
            None => {
                let key = generate_key()?;
                let cert = server_params(&served_names)?.signed_by(&key, &ca_issuer)?;
                write_private_file(&server_key_path, key.serialize_pem().as_bytes())?;
                write_public_file(&server_cert_path, cert.pem().as_bytes())?;
                tracing::info!(names = ?served_names, "issued the server certificate");
                (cert.der().clone(), key)
            }
        };
        let server_key_der = PrivateKeyDer::try_from(server_key.serialize_der())
            .map_err(|error| PkiError::Invalid(format!("server key: {error}")))?;

        let client_cas_path = pki_dir.join("client-cas.pem");
        let pki = Pki {
            ca_pem,
            ca_der,
            ca_issuer,
            server_cert_der,
            server_key_der,
            ca_cert_path,
            server_cert_path,
            server_key_path,
            extra_cas: Vec::new(),
            client_cas_path,
        };
        pki.write_client_cas()?;
        Ok(pki)
    }

    /// Also trusts device certificates issued by the operator's own CAs
    /// (`--device-ca`, the factory path): each file holds one or more PEM CA
    /// certificates. The broker and the device endpoint then accept those
    /// certificates (CN = device id) for devices the operator imported
    /// (`POST /api/v1/devices/import`). A file that holds no certificate, or
    /// a certificate that is not a CA, is refused.
    pub fn trust_device_cas(&mut self, paths: &[PathBuf]) -> Result<(), PkiError> {
        for path in paths {
            let pem = read_pem_file(path)?;
            let mut found = 0;
            for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let certificate = certificate
                    .map_err(|error| PkiError::Invalid(format!("{}: {error}", path.display())))?;
                if !is_ca_certificate(&certificate) {
                    return Err(PkiError::Invalid(format!(
                        "{}: holds a certificate that is not a CA (basicConstraints CA:TRUE missing)",
                        path.display()
                    )));
                }
                self.extra_cas.push(certificate.into_owned());
                found += 1;
            }
            if found == 0 {
                return Err(PkiError::Invalid(format!(
                    "{}: no PEM certificate found",
                    path.display()
                )));
            }
        }
        self.write_client_cas()
    }

    /// Writes `pki/client-cas.pem`: every CA whose device certificates the
    /// broker accepts (ours first).
    fn write_client_cas(&self) -> Result<(), PkiError> {
        let mut bundle = self.ca_pem.trim_end().to_owned();
        bundle.push('\n');
        for certificate in &self.extra_cas {
            bundle.push_str(&certificate_pem(certificate));
        }
        write_public_file(&self.client_cas_path, bundle.as_bytes())
    }

    /// Every CA whose device certificates are accepted, PEM, ours first
    /// (`pki/client-cas.pem`): what the broker verifies clients against.
    pub fn client_cas_path(&self) -> &Path {
        &self.client_cas_path
    }

    /// Checks a device certificate as the TLS layer will (chain to one of
    /// the trusted device CAs, validity now, client-auth usage) and returns
    /// its identity. Used to import pre-issued (factory) certificates.
    pub fn verify_device_certificate(&self, der: &[u8]) -> Result<CertificateIdentity, PkiError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.ca_root_store()?, aws_lc_provider())
                .build()
                .map_err(|error| PkiError::Invalid(format!("client verifier: {error}")))?;
        let certificate = CertificateDer::from(der.to_vec());
        verifier
            .verify_client_cert(&certificate, &[], UnixTime::now())
            .map_err(|error| {
                PkiError::Invalid(format!(
                    "not a valid certificate of a trusted device CA: {error}"
                ))
            })?;
        certificate_identity(der).ok_or_else(|| {
            PkiError::Invalid(
                "the certificate's subject has no single common name that is a valid device id"
                    .to_owned(),
            )
        })
    }

    /// The device CA certificate, PEM: what devices and the CLI trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    pub fn server_cert_path(&self) -> &Path {
        &self.server_cert_path
    }

    pub fn server_key_path(&self) -> &Path {
        &self.server_key_path
    }

    /// Issues a client certificate for a device: CN = device id, EKU
    /// clientAuth, 5 years, random serial, fresh P-256 key generated here.
    pub fn issue_device(&self, device_id: &DeviceId) -> Result<IssuedCertificate, PkiError> {
        let key = generate_key()?;
        let (certificate_pem, serial_hex) = self.issue_for_public_key(device_id, &key)?;
        Ok(IssuedCertificate {
            certificate_pem,
            private_key_pem: key.serialize_pem(),
            serial_hex,
        })
    }

    /// Issues a device certificate for the public key of a PEM CSR, whose
    /// self-signature rcgen verifies. Only P-256 ECDSA and Ed25519 keys are
    /// accepted; subject, names and extensions come from `device_params`,
    /// never from the CSR. Returns the certificate PEM and its serial.
    pub fn issue_for_csr(
        &self,
        device_id: &DeviceId,
        csr_pem: &str,
    ) -> Result<(String, String), CsrError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| CsrError::Invalid(error.to_string()))?;
        let algorithm = csr.public_key.algorithm();
        if algorithm != &rcgen::PKCS_ECDSA_P256_SHA256 && algorithm != &rcgen::PKCS_ED25519 {
            return Err(CsrError::UnsupportedKey(format!("{algorithm:?}")));
        }
        self.issue_for_public_key(device_id, &csr.public_key)
            .map_err(CsrError::Pki)
    }

    /// SHA-256 (lower-case hex) of the device CA certificate's DER: what an
    /// operator compares with the CA file a device pins.
    pub fn ca_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.ca_der.as_ref()))
    }

    /// Signs a device certificate for `public_key`. The one place device
    /// certificates are made, so server-side keys and CSR enrolment share it.
    fn issue_for_public_key(
        &self,
        device_id: &DeviceId,
        public_key: &impl PublicKeyData,
    ) -> Result<(String, String), PkiError> {
        let cert = device_params(device_id)?.signed_by(public_key, &self.ca_issuer)?;
        let identity = certificate_identity(cert.der()).ok_or_else(|| {
            PkiError::Invalid("issued device certificate does not parse back".to_owned())
        })?;
        Ok((cert.pem(), identity.serial_hex))
    }

    /// The device CA as a one-root store.
    fn ca_root_store(&self) -> Result<Arc<RootCertStore>, PkiError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|error| PkiError::Invalid(format!("device CA: {error}")))?;
        for certificate in &self.extra_cas {
            roots
                .add(certificate.clone())
                .map_err(|error| PkiError::Invalid(format!("extra device CA: {error}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// rustls server configuration for the device HTTPS endpoint: the server
    /// certificate, a client certificate verified against the device CA only,
    /// ALPN "http/1.1", aws-lc-rs. A client without a certificate completes
    /// the handshake (so a new device can reach `POST /v1/enrol`); the
    /// endpoint refuses its requests to every other route
    /// (`crate::device_http`). A certificate that does not verify still fails
    /// the handshake.
    pub fn device_tls_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = aws_lc_provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(self.ca_root_store()?, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|error| PkiError::Invalid(format!("client verifier: {error}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| PkiError::Invalid(format!("tls versions: {error}")))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                vec![self.server_cert_der.clone()],
                self.server_key_der.clone_key(),
            )
            .map_err(|error| PkiError::Invalid(format!("server certificate: {error}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The device identity in a DER client certificate: the subject's single
/// common name, validated as a [`DeviceId`]. `None` for anything else. The
/// certificate's chain must already have been verified (by the TLS layer).
pub fn device_id_from_certificate(der: &[u8]) -> Option<DeviceId> {
    certificate_identity(der).map(|identity| identity.device_id)
}

/// Device id and serial of a DER client certificate, for revocation checks.
pub fn certificate_identity(der: &[u8]) -> Option<CertificateIdentity> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut common_names = certificate.subject().iter_common_name();
    let common_name = common_names.next()?.as_str().ok()?;
    // Two common names would make the identity depend on which one a reader
    // picks; our CA never issues such certificates.
    if common_names.next().is_some() {
        return None;
    }
    let device_id = DeviceId::parse(common_name).ok()?;
    Some(CertificateIdentity {
        device_id,
        serial_hex: certificate.serial.to_str_radix(16),
    })
}

/// Whether `der` is a CA certificate (basicConstraints CA:TRUE).
fn is_ca_certificate(der: &CertificateDer<'_>) -> bool {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, certificate)) => certificate.is_ca(),
        Err(_) => false,
    }
}

/// PEM text of a DER certificate (64-column base64 lines).
fn certificate_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn aws_lc_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The names the server certificate must cover, validated and deduplicated.
fn served_names(public_hosts: &[String]) -> Result<Vec<String>, PkiError> {
    let mut names: Vec<String> = Vec::new();
    let extra = public_hosts.iter().map(|host| {
        let host = host.trim();
        // "[::1]" is how IPv6 hosts appear in URLs; the SAN is the bare address.
        host.strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(host)
    });
    for name in ALWAYS_SERVED_NAMES.into_iter().chain(extra) {
        if ServerName::try_from(name).is_err() {
            return Err(PkiError::Invalid(format!(
                "public host {name:?} is neither a DNS name nor an IP address"
            )));
        }
        let name = name.to_ascii_lowercase();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and exactly 16 bytes long: RFC 5280 asks for a positive serial
    // of at most 20 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = common_name(CA_COMMON_NAME);
    // Path length 0: the CA signs end-entity certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    validity(&mut params, CA_VALIDITY);
    Ok(params)
}

fn server_params(served_names: &[String]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(served_names.to_vec())?;
    params.distinguished_name = common_name(SERVER_COMMON_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, SERVER_VALIDITY);
    Ok(params)
}

fn device_params(device_id: &DeviceId) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = common_name(device_id.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, DEVICE_VALIDITY);
    Ok(params)
}

/// Whether `key` is the private key of the certificate `der`.
fn key_matches_certificate(key: &KeyPair, der: &CertificateDer<'_>) -> bool {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, certificate)) => {
            certificate.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
        }
        Err(_) => false,
    }
}

/// Why an existing server certificate must be reissued, or `None` if it is fine.
/// The check is the one a client does: webpki verification of the chain to the
/// CA, of the validity period and of every served name.
fn server_certificate_problem(
    ca_der: &CertificateDer<'static>,
    cert_der: &CertificateDer<'static>,
    key: &KeyPair,
    served_names: &[String],
) -> Option<String> {
    if !key_matches_certificate(key, cert_der) {
        return Some("server.key does not belong to server.crt".to_owned());
    }
    let mut roots = RootCertStore::empty();
    if let Err(error) = roots.add(ca_der.clone()) {
        return Some(format!("device CA: {error}"));
    }
    let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        aws_lc_provider(),
    )
    .build()
    {
        Ok(verifier) => verifier,
        Err(error) => return Some(format!("server verifier: {error}")),
    };
    // Verifying "as of" the renewal horizon also catches a certificate that
    // is about to expire.
    let horizon = OffsetDateTime::now_utc() + SERVER_RENEW_BEFORE;
    let horizon = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(horizon.unix_timestamp()).unwrap_or(0),
    ));
    for name in served_names {
        let server_name = match ServerName::try_from(name.as_str()) {
            Ok(server_name) => server_name,
            Err(error) => return Some(format!("{name}: {error}")),
        };
        if let Err(error) = verifier.verify_server_cert(cert_der, &[], &server_name, &[], horizon) {
            return Some(format!("{name}: {error}"));
        }
    }
    None
}

fn io_error(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_pem_file(path: &Path) -> Result<String, PkiError> {
    let length = fs::metadata(path)
        .map_err(|source| io_error(path, source))?
        .len();
    if length > MAX_PEM_FILE_LEN {
        return Err(PkiError::Invalid(format!(
            "{} is {length} bytes, more than a PEM file of ours can be",
            path.display()
        )));
    }
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

/// Reads a private key, tightening its mode to 0600 if someone loosened it.
fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    let mode = fs::metadata(path)
        .map_err(|source| io_error(path, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "private key readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|source| io_error(path, source))?;
    }
    let pem = read_pem_file(path)?;
    KeyPair::from_pem(&pem)
        .map_err(|error| PkiError::Invalid(format!("{}: {error}", path.display())))
}

fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file_atomically(path, contents, 0o600)
}

fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file_atomically(path, contents, 0o644)
}

/// Writes through a temporary file and a rename (`crate::files`), so a crash
/// never leaves a truncated key or certificate behind. The temporary file is
/// created with the final mode, so a key is never readable by others, not
/// even briefly.
fn write_file_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    crate::files::write_atomically(path, contents, mode).map_err(|source| io_error(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use x509_parser::extensions::GeneralName;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    fn first_certificate(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn subject_alt_names(path: &Path) -> Vec<String> {
        let der = first_certificate(&fs::read_to_string(path).unwrap());
        let (_, certificate) = x509_parser::parse_x509_certificate(&der).unwrap();
        let extension = certificate.subject_alternative_name().unwrap().unwrap();
        extension
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => (*dns).to_owned(),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()).to_string(),
                    _ => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()).to_string(),
                },
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect()
    }

    fn verify_as_client(pki: &Pki, certificate_pem: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            pki.ca_root_store().unwrap(),
            aws_lc_provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&first_certificate(certificate_pem), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn second_load_keeps_ca_and_server_certificate() {
        let data_dir = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(data_dir.path(), &hosts(&["otter.example"])).unwrap();
        let server_pem = fs::read_to_string(first.server_cert_path()).unwrap();
        let second = Pki::load_or_create(data_dir.path(), &hosts(&["otter.example"])).unwrap();
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_eq!(
            server_pem,
            fs::read_to_string(second.server_cert_path()).unwrap()
        );
        assert!(second.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn new_public_host_reissues_server_certificate_but_keeps_ca() {
        let data_dir = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        let first_server_pem = fs::read_to_string(first.server_cert_path()).unwrap();
        let names = subject_alt_names(first.server_cert_path());
        for expected in ["localhost", "127.0.0.1", "::1"] {
            assert!(
                names.contains(&expected.to_owned()),
                "{expected} not in {names:?}"
            );
        }
        assert!(!names.iter().any(|name| name.contains("otter.example")));

        let second = Pki::load_or_create(
            data_dir.path(),
            &hosts(&["otter.example", "192.0.2.7", "[2001:db8::1]"]),
        )
        .unwrap();
        assert_eq!(first.ca_pem(), second.ca_pem());
        let second_server_pem = fs::read_to_string(second.server_cert_path()).unwrap();
        assert_ne!(first_server_pem, second_server_pem);
        let names = subject_alt_names(second.server_cert_path());
        for expected in [
            "otter.example",
            "192.0.2.7",
            "2001:db8::1",
            "localhost",
            "::1",
        ] {
            assert!(
                names.contains(&expected.to_owned()),
                "{expected} not in {names:?}"
            );
        }

        // A subset of what is covered needs no new certificate.
        let third = Pki::load_or_create(data_dir.path(), &hosts(&["otter.example"])).unwrap();
        assert_eq!(
            second_server_pem,
            fs::read_to_string(third.server_cert_path()).unwrap()
        );
    }

    #[test]
    fn invalid_public_host_is_refused() {
        let data_dir = tempfile::tempdir().unwrap();
        let result = Pki::load_or_create(data_dir.path(), &hosts(&["not a host"]));
        assert!(matches!(result, Err(PkiError::Invalid(_))), "{result:?}");
    }

    #[test]
    fn half_a_ca_is_an_error() {
        let data_dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        fs::remove_file(data_dir.path().join("pki/ca.key")).unwrap();
        drop(pki);
        let result = Pki::load_or_create(data_dir.path(), &[]);
        assert!(matches!(result, Err(PkiError::Invalid(_))), "{result:?}");
    }

    #[test]
    fn device_certificate_names_the_device_and_chains_to_the_ca() {
        let data_dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        let issued = pki.issue_device(&device("plant3.line_2")).unwrap();
        let der = first_certificate(&issued.certificate_pem);
        assert_eq!(
            device_id_from_certificate(&der),
            Some(device("plant3.line_2"))
        );
        let identity = certificate_identity(&der).unwrap();
        assert_eq!(identity.serial_hex, issued.serial_hex);
        assert!(issued.serial_hex.len() >= 30, "{}", issued.serial_hex);
        assert!(issued.private_key_pem.contains("PRIVATE KEY"));
        KeyPair::from_pem(&issued.private_key_pem).unwrap();

        verify_as_client(&pki, &issued.certificate_pem).unwrap();
        let other = pki.issue_device(&device("plant3.line_2")).unwrap();
        assert_ne!(other.serial_hex, issued.serial_hex);

        // A device certificate from another CA does not verify.
        let other_dir = tempfile::tempdir().unwrap();
        let other_pki = Pki::load_or_create(other_dir.path(), &[]).unwrap();
        let foreign = other_pki.issue_device(&device("plant3.line_2")).unwrap();
        assert!(verify_as_client(&pki, &foreign.certificate_pem).is_err());
    }

    #[test]
    fn server_and_ca_certificates_are_not_device_certificates() {
        let data_dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        let server_pem = fs::read_to_string(pki.server_cert_path()).unwrap();
        assert_eq!(
            device_id_from_certificate(&first_certificate(&server_pem)),
            None
        );
        assert_eq!(
            device_id_from_certificate(&first_certificate(pki.ca_pem())),
            None
        );
        // The server certificate lacks the clientAuth usage.
        assert!(verify_as_client(&pki, &server_pem).is_err());
        assert_eq!(device_id_from_certificate(b"not a certificate"), None);
    }

    #[test]
    fn key_files_are_private() {
        let data_dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        for key in [
            data_dir.path().join("pki/ca.key"),
            pki.server_key_path().to_owned(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let mode = fs::metadata(data_dir.path().join("pki"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);

        // A loosened key is tightened again on the next start.
        let ca_key = data_dir.path().join("pki/ca.key");
        fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
        Pki::load_or_create(data_dir.path(), &[]).unwrap();
        let mode = fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// Drives a TLS handshake between two in-memory connections.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut bytes = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut bytes).unwrap();
            }
            server.read_tls(&mut bytes.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut bytes = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut bytes).unwrap();
            }
            client.read_tls(&mut bytes.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn client_config(
        pki: &Pki,
        device_certificate: Option<&IssuedCertificate>,
    ) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(aws_lc_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.ca_root_store().unwrap());
        let mut config = match device_certificate {
            Some(issued) => builder
                .with_client_auth_cert(
                    vec![first_certificate(&issued.certificate_pem)],
                    PrivateKeyDer::from_pem_slice(issued.private_key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn connect(
        pki: &Pki,
        device_certificate: Option<&IssuedCertificate>,
    ) -> (Result<(), rustls::Error>, rustls::ServerConnection) {
        let mut client = rustls::ClientConnection::new(
            client_config(pki, device_certificate),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(pki.device_tls_config().unwrap()).unwrap();
        (handshake(&mut client, &mut server), server)
    }

    #[test]
    fn device_tls_config_requires_a_device_certificate() {
        let data_dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(data_dir.path(), &[]).unwrap();
        let issued = pki.issue_device(&device("dev-1")).unwrap();

        let (result, server) = connect(&pki, Some(&issued));
        result.unwrap();
        assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
        let peer = &server.peer_certificates().unwrap()[0];
        assert_eq!(device_id_from_certificate(peer), Some(device("dev-1")));

        // Without a certificate the handshake completes (for enrolment) but
        // names no peer; the endpoint refuses such requests but enrolment.
        let (result, server) = connect(&pki, None);
        result.unwrap();
        assert!(server.peer_certificates().is_none());

        let other_dir = tempfile::tempdir().unwrap();
        let other_pki = Pki::load_or_create(other_dir.path(), &[]).unwrap();
        let foreign = other_pki.issue_device(&device("dev-1")).unwrap();
        let mut client = rustls::ClientConnection::new(
            client_config(&pki, Some(&foreign)),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(pki.device_tls_config().unwrap()).unwrap();
        assert!(
            handshake(&mut client, &mut server).is_err(),
            "a foreign certificate was accepted"
        );
    }
}
