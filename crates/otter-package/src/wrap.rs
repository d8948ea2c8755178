//! Per-device wrapping of a release's data key (HPKE, RFC 9180).
//!
//! Every device holds an X25519 key pair, its *encryption key*
//! ([`DeviceKey`]); it sends the public half ([`EncryptionPublicKey`],
//! standard base64 of 32 bytes) when it registers. The server wraps the
//! release's [`DataKey`] to that public key before it tells the device about
//! the release, so the data key never travels in clear and a wrapped key only
//! opens on the device it was made for.
//!
//! Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base
//! mode, single-shot seal/open. The HPKE `info` binds a [`WrapContext`]: the
//! fixed label `otter data key v1`, the device id, the release
//! (`name@version`) and the artifact sha256 of the signed manifest, each
//! length-prefixed; a wrapped key therefore does not open for another device
//! or another release even with the right private key. A [`WrappedKey`] is
//! `enc || ciphertext` (32 + 32 + 16 bytes), carried as one standard base64
//! string.
//!
//! Key file format (mode 0600, never overwritten): three lines,
//!
//! ```text
//! -----BEGIN OTTER ENCRYPTION KEY-----
//! <standard base64 of the 32 X25519 private-key bytes>
//! -----END OTTER ENCRYPTION KEY-----
//! ```

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};

use crate::PackageError;
use crate::format::DataKey;
use crate::keys::{read_key_file, write_new_file};

type Kem = X25519HkdfSha256;
type Aead = ChaCha20Poly1305;
type Kdf = HkdfSha256;

/// The label at the start of every HPKE `info`; a new wrapping scheme gets a
/// new label.
const LABEL: &[u8] = b"otter data key v1";
const KEY_LEN: usize = 32;
/// `enc` (32) + sealed data key (32) + Poly1305 tag (16).
const WRAPPED_LEN: usize = KEY_LEN + KEY_LEN + 16;
const PEM_BEGIN: &str = "-----BEGIN OTTER ENCRYPTION KEY-----";
const PEM_END: &str = "-----END OTTER ENCRYPTION KEY-----";

/// A device's X25519 public encryption key.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionPublicKey([u8; KEY_LEN]);

impl EncryptionPublicKey {
    /// Parses standard base64 of 32 bytes; refuses the all-zero key.
    pub fn from_base64(text: &str) -> Result<Self, PackageError> {
        let bytes = BASE64
            .decode(text)
            .ok()
            .and_then(|bytes| <[u8; KEY_LEN]>::try_from(bytes).ok())
            .ok_or_else(|| {
                PackageError::BadEncryptionKey("not standard base64 of 32 bytes".into())
            })?;
        if bytes == [0u8; KEY_LEN] {
            return Err(PackageError::BadEncryptionKey("all-zero key".into()));
        }
        Ok(Self(bytes))
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A short name for logs and audit: the first 16 hex digits of the
    /// sha256 of the key bytes.
    pub fn fingerprint(&self) -> String {
        fingerprint_bytes(&self.0)
    }
}

impl fmt::Debug for EncryptionPublicKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "EncryptionPublicKey({})", self.fingerprint())
    }
}

/// [`EncryptionPublicKey::fingerprint`] of a key as stored (its base64),
/// without validating it: the sha256 is taken of the decoded bytes, or of the
/// text itself if it is not base64.
pub fn fingerprint_of(base64_key: &str) -> String {
    match BASE64.decode(base64_key) {
        Ok(bytes) => fingerprint_bytes(&bytes),
        Err(_) => fingerprint_bytes(base64_key.as_bytes()),
    }
}

fn fingerprint_bytes(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// A device's X25519 key pair.
pub struct DeviceKey {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: EncryptionPublicKey,
}

impl DeviceKey {
    /// A fresh key pair from the system RNG.
    pub fn generate() -> Self {
        let (private, _) = Kem::gen_keypair();
        Self::from_private(private)
    }

    fn from_private(private: <Kem as hpke::Kem>::PrivateKey) -> Self {
        let public = Kem::sk_to_pk(&private).to_bytes();
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&public);
        Self {
            private,
            public: EncryptionPublicKey(bytes),
        }
    }

    pub fn public_key(&self) -> &EncryptionPublicKey {
        &self.public
    }

    /// Writes the private key to a new file (mode 0600); refuses to replace
    /// an existing one.
    pub fn write_new(&self, path: &Path) -> Result<(), PackageError> {
        let text = format!(
            "{PEM_BEGIN}\n{}\n{PEM_END}\n",
            BASE64.encode(self.private.to_bytes())
        );
        write_new_file(path, text.as_bytes(), 0o600)
    }

    /// Reads a key file written by [`DeviceKey::write_new`].
    pub fn read(path: &Path) -> Result<Self, PackageError> {
        let text = read_key_file(path)?;
        Self::parse(&text).map_err(|reason| {
            PackageError::KeyFile(format!(
                "{} is not an encryption key file: {reason}",
                path.display()
            ))
        })
    }

    /// Reads the key file at `path`, or creates it with a fresh key if there
    /// is none. An existing file is never overwritten, even if unreadable.
    pub fn load_or_create(path: &Path) -> Result<Self, PackageError> {
        if path.exists() {
            return Self::read(path);
        }
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                PackageError::KeyFile(format!("cannot create {}: {error}", parent.display()))
            })?;
        }
        let key = Self::generate();
        key.write_new(path)?;
        Ok(key)
    }

    fn parse(text: &str) -> Result<Self, &'static str> {
        let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        if lines.next() != Some(PEM_BEGIN) {
            return Err("missing BEGIN line");
        }
        let body = lines.next().ok_or("missing key")?;
        if lines.next() != Some(PEM_END) || lines.next().is_some() {
            return Err("missing END line or trailing data");
        }
        let bytes = BASE64
            .decode(body)
            .ok()
            .filter(|bytes| bytes.len() == KEY_LEN)
            .ok_or("key is not base64 of 32 bytes")?;
        let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(&bytes)
            .map_err(|_| "key is not an X25519 private key")?;
        Ok(Self::from_private(private))
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "DeviceKey({})", self.public.fingerprint())
    }
}

/// What a wrapped key is bound to: it opens only with the same context.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub device_id: &'a str,
    /// `name@version`.
    pub release: &'a str,
    /// The artifact sha256 (hex) from the signed manifest.
    pub artifact_sha256: &'a str,
}

impl WrapContext<'_> {
    /// The HPKE `info`: the label, then each field as a 4-byte big-endian
    /// length and its bytes, so no two contexts encode alike.
    fn info(&self) -> Vec<u8> {
        let mut info = LABEL.to_vec();
        for field in [self.device_id, self.release, self.artifact_sha256] {
            // Ids, release names and digests are far shorter than 4 GiB.
            info.extend_from_slice(&(field.len() as u32).to_be_bytes());
            info.extend_from_slice(field.as_bytes());
        }
        info
    }
}

/// A data key wrapped to one device: `enc || ciphertext`.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }

    pub fn from_base64(text: &str) -> Result<Self, PackageError> {
        let bytes = BASE64
            .decode(text)
            .map_err(|_| PackageError::Unwrap("wrapped key is not standard base64".into()))?;
        if bytes.len() != WRAPPED_LEN {
            return Err(PackageError::Unwrap(format!(
                "wrapped key is {} bytes, expected {WRAPPED_LEN}",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("WrappedKey(..)")
    }
}

/// Wraps `data_key` to `recipient` under `context` (HPKE base mode). Fails
/// only for a public key X25519 refuses (a low-order point).
pub fn wrap_data_key(
    recipient: &EncryptionPublicKey,
    data_key: &DataKey,
    context: &WrapContext<'_>,
) -> Result<WrappedKey, PackageError> {
    let public = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient.as_bytes())
        .map_err(|error| PackageError::BadEncryptionKey(error.to_string()))?;
    let (enc, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
        &OpModeS::Base,
        &public,
        &context.info(),
        data_key.as_bytes(),
        &[],
    )
    .map_err(|error| PackageError::BadEncryptionKey(format!("cannot wrap to this key: {error}")))?;
    let mut bytes = enc.to_bytes().to_vec();
    bytes.extend_from_slice(&ciphertext);
    Ok(WrappedKey(bytes))
}

/// Opens a key wrapped by [`wrap_data_key`] with this device's key and the
/// same context; another key, another context or a changed byte fails with
/// [`PackageError::Unwrap`].
pub fn unwrap_data_key(
    key: &DeviceKey,
    wrapped: &WrappedKey,
    context: &WrapContext<'_>,
) -> Result<DataKey, PackageError> {
    if wrapped.0.len() != WRAPPED_LEN {
        return Err(PackageError::Unwrap(
            "wrapped key has the wrong length".into(),
        ));
    }
    let (enc, ciphertext) = wrapped.0.split_at(KEY_LEN);
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc)
        .map_err(|error| PackageError::Unwrap(format!("bad encapsulated key: {error}")))?;
    let plaintext = hpke::single_shot_open::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &key.private,
        &enc,
        &context.info(),
        ciphertext,
        &[],
    )
    .map_err(|_| {
        PackageError::Unwrap(
            "it was not wrapped for this device and release, or was altered".into(),
        )
    })?;
    let bytes = <[u8; KEY_LEN]>::try_from(plaintext.as_slice())
        .map_err(|_| PackageError::Unwrap("unwrapped key is not 32 bytes".into()))?;
    Ok(DataKey::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn context(device_id: &str) -> WrapContext<'_> {
        WrapContext {
            device_id,
            release: "fw@1.2.3",
            artifact_sha256: SHA,
        }
    }

    fn is_unwrap(result: Result<DataKey, PackageError>) -> bool {
        matches!(result, Err(PackageError::Unwrap(_)))
    }

    #[test]
    fn round_trip_through_base64() {
        let device = DeviceKey::generate();
        let data_key = DataKey::generate();
        let wrapped = wrap_data_key(device.public_key(), &data_key, &context("dev-1")).unwrap();
        let text = wrapped.to_base64();
        assert!(!text.contains(&data_key.to_base64()));
        let parsed = WrappedKey::from_base64(&text).unwrap();
        let opened = unwrap_data_key(&device, &parsed, &context("dev-1")).unwrap();
        assert_eq!(opened.as_bytes(), data_key.as_bytes());
        // Two wraps of the same key differ (fresh ephemeral key each time).
        let again = wrap_data_key(device.public_key(), &data_key, &context("dev-1")).unwrap();
        assert_ne!(again, wrapped);
    }

    #[test]
    fn another_devices_key_does_not_open_it() {
        let device = DeviceKey::generate();
        let other = DeviceKey::generate();
        let wrapped =
            wrap_data_key(device.public_key(), &DataKey::generate(), &context("dev-1")).unwrap();
        assert!(is_unwrap(unwrap_data_key(
            &other,
            &wrapped,
            &context("dev-1")
        )));
    }

    #[test]
    fn another_context_does_not_open_it() {
        let device = DeviceKey::generate();
        let wrapped =
            wrap_data_key(device.public_key(), &DataKey::generate(), &context("dev-1")).unwrap();
        assert!(is_unwrap(unwrap_data_key(
            &device,
            &wrapped,
            &context("dev-2")
        )));
        let other_release = WrapContext {
            release: "fw@1.2.4",
            ..context("dev-1")
        };
        assert!(is_unwrap(unwrap_data_key(
            &device,
            &wrapped,
            &other_release
        )));
        let other_artifact = WrapContext {
            artifact_sha256: &SHA[1..],
            ..context("dev-1")
        };
        assert!(is_unwrap(unwrap_data_key(
            &device,
            &wrapped,
            &other_artifact
        )));
        // Length prefixes: moving a character between fields changes the info.
        let shifted = WrapContext {
            device_id: "dev-1f",
            release: "w@1.2.3",
            ..context("x")
        };
        assert_ne!(shifted.info(), context("dev-1").info());
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let device = DeviceKey::generate();
        let wrapped =
            wrap_data_key(device.public_key(), &DataKey::generate(), &context("dev-1")).unwrap();
        for index in 0..WRAPPED_LEN {
            let mut bytes = wrapped.0.clone();
            bytes[index] ^= 0x01;
            let tampered = WrappedKey(bytes);
            assert!(
                is_unwrap(unwrap_data_key(&device, &tampered, &context("dev-1"))),
                "byte {index}"
            );
        }
    }

    #[test]
    fn malformed_wrapped_keys_are_clear_errors() {
        for bad in [
            "",
            "not base64!",
            "AAAA",
            &BASE64.encode([7u8; WRAPPED_LEN + 1]),
        ] {
            let error = WrappedKey::from_base64(bad).unwrap_err();
            assert!(matches!(error, PackageError::Unwrap(_)), "{bad}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with("cannot unwrap the data key: ")
            );
        }
    }

    #[test]
    fn public_keys_are_validated() {
        let key = DeviceKey::generate();
        let text = key.public_key().to_base64();
        assert_eq!(
            &EncryptionPublicKey::from_base64(&text).unwrap(),
            key.public_key()
        );
        for bad in [
            "",
            "###",
            "AAAA",
            &BASE64.encode([1u8; 31]),
            &BASE64.encode([0u8; 32]),
        ] {
            assert!(matches!(
                EncryptionPublicKey::from_base64(bad),
                Err(PackageError::BadEncryptionKey(_))
            ));
        }
        assert_eq!(key.public_key().fingerprint().len(), 16);
        assert_eq!(fingerprint_of(&text), key.public_key().fingerprint());
    }

    #[test]
    fn low_order_public_key_cannot_be_wrapped_to() {
        // u = 1 is a low-order point: the shared secret would be all zero.
        let mut bytes = [0u8; KEY_LEN];
        bytes[0] = 1;
        let weak = EncryptionPublicKey::from_base64(&BASE64.encode(bytes)).unwrap();
        let result = wrap_data_key(&weak, &DataKey::generate(), &context("dev-1"));
        assert!(matches!(result, Err(PackageError::BadEncryptionKey(_))));
    }

    #[test]
    fn key_file_round_trip_mode_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/encryption.key");
        let created = DeviceKey::load_or_create(&path).unwrap();
        let loaded = DeviceKey::load_or_create(&path).unwrap();
        assert_eq!(created.public_key(), loaded.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            DeviceKey::generate().write_new(&path),
            Err(PackageError::KeyFile(_))
        ));
        assert_eq!(
            DeviceKey::read(&path).unwrap().public_key(),
            created.public_key()
        );

        for bad in ["", "garbage", &format!("{PEM_BEGIN}\nAAAA\n{PEM_END}\n")] {
            let bad_path = dir.path().join("bad.key");
            std::fs::write(&bad_path, bad).unwrap();
            assert!(matches!(
                DeviceKey::read(&bad_path),
                Err(PackageError::KeyFile(_))
            ));
            // A corrupt file is reported, never replaced.
            assert!(DeviceKey::load_or_create(&bad_path).is_err());
            assert_eq!(std::fs::read_to_string(&bad_path).unwrap(), bad);
        }
    }
}
