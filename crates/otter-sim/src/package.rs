//! Packages for simulated fleets: random (incompressible) payloads, signed
//! with a key the server trusts, built with the real package builder.

use std::path::Path;

use ed25519_dalek::SigningKey;
use otter_package::format::{BuildOptions, build_package};
use otter_proto::manifest::PackageKind;
use rand::Rng as _;
use sha2::{Digest, Sha256};

/// A built package and what a device should end up with.
#[derive(Debug, Clone)]
pub struct BuiltPackage {
    /// The package file's bytes, ready to upload.
    pub bytes: Vec<u8>,
    /// `name@version`.
    pub release: String,
    pub payload_size: u64,
    /// SHA-256 (hex) of the payload.
    pub payload_sha256: String,
}

/// `size` random bytes.
pub fn random_payload(size: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size];
    rand::rng().fill_bytes(&mut payload);
    payload
}

/// Builds a firmware package `name@version` of `payload` for `hardware`.
/// `scratch_dir` holds the builder's temporary file.
pub fn build(
    key: &SigningKey,
    name: &str,
    version: &semver::Version,
    hardware: &str,
    payload: &[u8],
    scratch_dir: &Path,
) -> Result<BuiltPackage, otter_package::PackageError> {
    let options = BuildOptions::new(
        name,
        version.clone(),
        PackageKind::Firmware,
        vec![hardware.to_owned()],
    );
    let mut bytes = Vec::with_capacity(payload.len() + 4096);
    build_package(&mut &payload[..], &mut bytes, key, &options, scratch_dir)?;
    Ok(BuiltPackage {
        bytes,
        release: format!("{name}@{version}"),
        payload_size: payload.len() as u64,
        payload_sha256: hex::encode(Sha256::digest(payload)),
    })
}
