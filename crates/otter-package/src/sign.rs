//! Signing and verifying manifests.
//!
//! The manifest is serialised once, when it is signed, and those exact bytes
//! travel in [`SignedManifest::manifest`]; verification checks the signature
//! over that string before parsing it, so no side ever re-serialises a
//! manifest and signature checks never depend on JSON formatting.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use otter_proto::manifest::{Manifest, SignedManifest};

use crate::PackageError;
use crate::keys::key_id;

/// Serialises `manifest` and signs those bytes with `key`.
pub fn sign_manifest(manifest: &Manifest, key: &SigningKey) -> SignedManifest {
    // The manifest has only strings, numbers, enums and lists: serialising it
    // cannot fail (serde_json fails only on non-string map keys or on a
    // failing Serialize impl).
    let json = serde_json::to_string(manifest).expect("a manifest always serialises to JSON");
    let signature = key.sign(json.as_bytes());
    SignedManifest {
        manifest: json,
        signer: key_id(&key.verifying_key()),
        signature: BASE64.encode(signature.to_bytes()),
        signer_certificate: None,
    }
}

/// Checks that `signed` was signed by one of `trusted` and returns the parsed,
/// validated manifest.
///
/// Order matters: the signer is looked up first (an untrusted key is
/// [`PackageError::UntrustedSigner`]), then the signature is checked with
/// `verify_strict` over the exact manifest bytes ([`PackageError::BadSignature`]),
/// and only then is the JSON parsed, so unauthenticated input never reaches
/// the parser.
pub fn verify_manifest(
    signed: &SignedManifest,
    trusted: &[VerifyingKey],
) -> Result<Manifest, PackageError> {
    let signer = trusted
        .iter()
        .find(|key| key_id(key) == signed.signer)
        .ok_or(PackageError::UntrustedSigner)?;
    let signature_bytes: [u8; 64] = BASE64
        .decode(&signed.signature)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(PackageError::BadSignature)?;
    let signature = Signature::from_bytes(&signature_bytes);
    signer
        .verify_strict(signed.manifest.as_bytes(), &signature)
        .map_err(|_| PackageError::BadSignature)?;
    Ok(Manifest::from_json(&signed.manifest)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use otter_proto::manifest::{
        Compression, Digest, Encryption, MANIFEST_FORMAT, ManifestError, PackageKind,
    };

    /// A valid manifest, shared with `trust`'s tests.
    pub(crate) fn sample_manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "sensor-fw".into(),
            version: semver::Version::new(1, 0, 0),
            kind: PackageKind::Firmware,
            hardware: vec!["revB".into()],
            payload: Digest {
                size: 1,
                sha256: "a".repeat(64),
            },
            artifact: Digest {
                size: 2,
                sha256: "b".repeat(64),
            },
            compression: Compression::Zstd { window_log: 20 },
            encryption: Encryption::ChaCha20Poly1305Stream {
                chunk_size: 65536,
                nonce_prefix: "00112233445566".into(),
            },
            created_at: 0,
            allow_downgrade: false,
        }
    }

    fn new_key() -> SigningKey {
        SigningKey::generate(&mut rand::rng())
    }

    #[test]
    fn sign_then_verify() {
        let key = new_key();
        let manifest = sample_manifest();
        let signed = sign_manifest(&manifest, &key);
        let other = new_key().verifying_key();
        assert_eq!(
            verify_manifest(&signed, &[other, key.verifying_key()]).unwrap(),
            manifest
        );
    }

    #[test]
    fn allow_downgrade_is_signed() {
        let key = new_key();
        let trusted = [key.verifying_key()];
        // A manifest signed without the flag (as every manifest before it
        // existed) verifies and does not allow a downgrade.
        let signed = sign_manifest(&sample_manifest(), &key);
        assert!(!signed.manifest.contains("allow_downgrade"));
        assert!(!verify_manifest(&signed, &trusted).unwrap().allow_downgrade);
        // Adding the flag after signing breaks the signature.
        let mut tampered = signed.clone();
        tampered.manifest = tampered
            .manifest
            .replacen('{', r#"{"allow_downgrade":true,"#, 1);
        assert!(matches!(
            verify_manifest(&tampered, &trusted),
            Err(PackageError::BadSignature)
        ));
        let mut allowing = sample_manifest();
        allowing.allow_downgrade = true;
        let signed = sign_manifest(&allowing, &key);
        assert!(verify_manifest(&signed, &trusted).unwrap().allow_downgrade);
    }

    #[test]
    fn rejections() {
        let key = new_key();
        let signed = sign_manifest(&sample_manifest(), &key);
        let trusted = [key.verifying_key()];

        assert!(matches!(
            verify_manifest(&signed, &[new_key().verifying_key()]),
            Err(PackageError::UntrustedSigner)
        ));
        assert!(matches!(
            verify_manifest(&signed, &[]),
            Err(PackageError::UntrustedSigner)
        ));

        let mut tampered = signed.clone();
        tampered.manifest = tampered.manifest.replace("sensor-fw", "sensor-fx");
        assert!(matches!(
            verify_manifest(&tampered, &trusted),
            Err(PackageError::BadSignature)
        ));

        let mut garbled = signed.clone();
        garbled.signature = "not base64!".into();
        assert!(matches!(
            verify_manifest(&garbled, &trusted),
            Err(PackageError::BadSignature)
        ));
        garbled.signature = BASE64.encode([0u8; 63]);
        assert!(matches!(
            verify_manifest(&garbled, &trusted),
            Err(PackageError::BadSignature)
        ));

        // Correctly signed but invalid content: the validator still runs.
        let mut invalid = sample_manifest();
        invalid.hardware.clear();
        let signed_invalid = sign_manifest(&invalid, &key);
        assert!(matches!(
            verify_manifest(&signed_invalid, &trusted),
            Err(PackageError::Manifest(ManifestError::NoHardware))
        ));
    }
}
