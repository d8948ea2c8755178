//! The package manifest and its signed envelope.
//!
//! A [`Manifest`] describes one release: what it is, which hardware it fits,
//! and the exact bytes of its artifact (the encrypted, compressed payload) and
//! of its payload (the plaintext after decryption and decompression).
//!
//! The signature covers the manifest's exact JSON bytes as built, carried in
//! [`SignedManifest::manifest`] as a string, so no side ever re-serialises
//! before checking a signature. Signing and verifying live in
//! `otter-package`; this module only parses and validates.

use serde::{Deserialize, Serialize};

/// Format version of [`Manifest`]; a device refuses a manifest of another format.
pub const MANIFEST_FORMAT: u32 = 1;

/// Largest compressed or plaintext size a manifest may declare (64 GiB):
/// a larger claim is a malformed manifest, not a big update.
pub const MAX_DECLARED_SIZE: u64 = 64 << 30;

/// What a package updates. Chooses the install handler on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageKind {
    Firmware,
    Config,
    Application,
    Agent,
}

impl PackageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageKind::Firmware => "firmware",
            PackageKind::Config => "config",
            PackageKind::Application => "application",
            PackageKind::Agent => "agent",
        }
    }
}

impl std::str::FromStr for PackageKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firmware" => Ok(PackageKind::Firmware),
            "config" => Ok(PackageKind::Config),
            "application" => Ok(PackageKind::Application),
            "agent" => Ok(PackageKind::Agent),
            other => Err(format!(
                "unknown package kind {other:?} (expected firmware, config, application or agent)"
            )),
        }
    }
}

/// Size and SHA-256 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    /// Length in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// How the payload was compressed before encryption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase", deny_unknown_fields)]
pub enum Compression {
    /// zstd frame; `window_log` is the largest window the decoder must allow.
    Zstd { window_log: u32 },
}

/// How the compressed payload was encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", deny_unknown_fields)]
pub enum Encryption {
    /// ChaCha20-Poly1305 in the STREAM construction (big-endian 32-bit
    /// counter + last-block flag): plaintext cut into `chunk_size` chunks,
    /// each sealed with a 16-byte tag. `nonce_prefix` is 7 bytes, hex.
    #[serde(rename = "chacha20poly1305-stream-be32")]
    ChaCha20Poly1305Stream {
        chunk_size: u32,
        nonce_prefix: String,
    },
}

/// One release, as signed by its publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Package name, e.g. `sensor-fw`. Same rules as a device id.
    pub name: String,
    pub version: semver::Version,
    pub kind: PackageKind,
    /// Hardware models this package may be installed on; never empty.
    pub hardware: Vec<String>,
    /// The plaintext payload after decryption and decompression.
    pub payload: Digest,
    /// The artifact as stored and downloaded (encrypted, compressed).
    pub artifact: Digest,
    pub compression: Compression,
    pub encryption: Encryption,
    /// Unix seconds at build time (informational).
    pub created_at: i64,
    /// The publisher allows installing this release over a newer version of
    /// the same package (`otter package build --allow-downgrade`). A device
    /// downgrades only when the deployment allows it too (`job::decide`).
    /// Absent (old manifests) means false, and false is not written, so a
    /// manifest without the flag keeps the exact bytes it was signed with.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_downgrade: bool,
}

/// For `skip_serializing_if`: leaves a false flag out of the JSON.
pub(crate) fn is_false(flag: &bool) -> bool {
    !flag
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for this format: {0}")]
    Json(String),
    #[error("manifest format {0} is not supported (expected {MANIFEST_FORMAT})")]
    Format(u32),
    #[error("invalid package name: {0}")]
    Name(String),
    #[error("manifest lists no compatible hardware")]
    NoHardware,
    #[error("invalid hardware name {0:?}")]
    Hardware(String),
    #[error("invalid digest: {0}")]
    Digest(&'static str),
    #[error("invalid encryption parameters: {0}")]
    Encryption(&'static str),
    #[error("invalid compression parameters: {0}")]
    Compression(&'static str),
}

impl Manifest {
    /// Parses and validates manifest JSON.
    pub fn from_json(json: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(json).map_err(|e| ManifestError::Json(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every field for values no honest builder produces.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        validate_name(&self.name).map_err(ManifestError::Name)?;
        if self.hardware.is_empty() {
            return Err(ManifestError::NoHardware);
        }
        for hw in &self.hardware {
            validate_name(hw).map_err(|_| ManifestError::Hardware(hw.clone()))?;
        }
        for digest in [&self.payload, &self.artifact] {
            if digest.size > MAX_DECLARED_SIZE {
                return Err(ManifestError::Digest("declared size too large"));
            }
            if digest.sha256.len() != 64
                || !digest
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(ManifestError::Digest(
                    "sha256 must be 64 lower-case hex digits",
                ));
            }
        }
        match &self.compression {
            Compression::Zstd { window_log } => {
                if !(10..=31).contains(window_log) {
                    return Err(ManifestError::Compression(
                        "zstd window_log out of range 10..=31",
                    ));
                }
            }
        }
        match &self.encryption {
            Encryption::ChaCha20Poly1305Stream {
                chunk_size,
                nonce_prefix,
            } => {
                if !(1024..=(16 << 20)).contains(chunk_size) {
                    return Err(ManifestError::Encryption(
                        "chunk_size out of range 1 KiB..=16 MiB",
                    ));
                }
                if nonce_prefix.len() != 14 || !nonce_prefix.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(ManifestError::Encryption(
                        "nonce_prefix must be 7 bytes of hex",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The release id, `name@version`.
    pub fn release_id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Whether this package may be installed on `hardware`.
    pub fn fits_hardware(&self, hardware: &str) -> bool {
        self.hardware.iter().any(|h| h == hardware)
    }
}

/// Validates a package or hardware name: same character rules as a device id.
pub fn validate_name(name: &str) -> Result<(), String> {
    crate::topics::DeviceId::parse(name)
        .map(|_| ())
        .map_err(|e| e.to_string().replace("device id", "name"))
}

/// A manifest with its Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest's exact JSON bytes, as signed.
    pub manifest: String,
    /// Base64 (standard, padded) of the 32-byte Ed25519 public key that signed.
    pub signer: String,
    /// Base64 (standard, padded) of the 64-byte Ed25519 signature over `manifest`.
    pub signature: String,
    /// The root-signed certificate of `signer`, when the signer is not
    /// trusted directly but certified by an offline root. Absent (older
    /// packages, directly trusted signers) is not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_certificate: Option<Box<crate::trust::SignedCertificate>>,
}

/// Splits a release id `name@version` into its parts.
pub fn parse_release_id(id: &str) -> Result<(String, semver::Version), String> {
    let (name, version) = id
        .split_once('@')
        .ok_or_else(|| format!("release id {id:?} is not of the form NAME@VERSION"))?;
    validate_name(name)?;
    let version = semver::Version::parse(version)
        .map_err(|e| format!("release id {id:?} has an invalid version: {e}"))?;
    Ok((name.to_owned(), version))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "sensor-fw".into(),
            version: semver::Version::new(1, 2, 3),
            kind: PackageKind::Firmware,
            hardware: vec!["revB".into()],
            payload: Digest {
                size: 10,
                sha256: "a".repeat(64),
            },
            artifact: Digest {
                size: 42,
                sha256: "b".repeat(64),
            },
            compression: Compression::Zstd { window_log: 23 },
            encryption: Encryption::ChaCha20Poly1305Stream {
                chunk_size: 65536,
                nonce_prefix: "00112233445566".into(),
            },
            created_at: 0,
            allow_downgrade: false,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
        assert_eq!(m.release_id(), "sensor-fw@1.2.3");
    }

    #[test]
    fn allow_downgrade_is_optional_and_omitted_when_false() {
        let m = sample();
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("allow_downgrade"), "{json}");
        let mut v = serde_json::to_value(&m).unwrap();
        v["allow_downgrade"] = true.into();
        let parsed = Manifest::from_json(&v.to_string()).unwrap();
        assert!(parsed.allow_downgrade);
        let again = serde_json::to_string(&parsed).unwrap();
        assert!(again.contains(r#""allow_downgrade":true"#), "{again}");
    }

    #[test]
    fn rejects_bad_fields() {
        type Mutation = fn(&mut Manifest);
        let cases: &[(Mutation, &str)] = &[
            (|m| m.format = 2, "format"),
            (|m| m.name = "a/b".into(), "name"),
            (|m| m.hardware.clear(), "hardware"),
            (|m| m.hardware = vec!["#".into()], "hardware"),
            (|m| m.payload.sha256 = "ABC".into(), "sha256"),
            (|m| m.artifact.size = MAX_DECLARED_SIZE + 1, "size"),
            (
                |m| m.compression = Compression::Zstd { window_log: 40 },
                "window_log",
            ),
            (
                |m| {
                    m.encryption = Encryption::ChaCha20Poly1305Stream {
                        chunk_size: 1,
                        nonce_prefix: "00112233445566".into(),
                    }
                },
                "chunk_size",
            ),
        ];
        for (mutate, what) in cases {
            let mut m = sample();
            mutate(&mut m);
            let err = m.validate().expect_err(what).to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn unknown_fields_and_garbage_are_errors() {
        assert!(matches!(
            Manifest::from_json("{"),
            Err(ManifestError::Json(_))
        ));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = 1.into();
        assert!(matches!(
            Manifest::from_json(&v.to_string()),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn release_ids() {
        assert_eq!(
            parse_release_id("fw@1.0.0").unwrap(),
            ("fw".into(), semver::Version::new(1, 0, 0))
        );
        for bad in ["fw", "fw@", "@1.0.0", "fw@one", "a/b@1.0.0"] {
            assert!(parse_release_id(bad).is_err(), "{bad}");
        }
    }
}
