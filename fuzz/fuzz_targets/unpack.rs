//! The device's unpack pipeline (decrypt → decompress → hash) on arbitrary
//! downloaded bytes, against a fixed, valid manifest and key: it must fail
//! cleanly, never panic, and never write more than the manifest declares.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otter_package::DataKey;
use otter_proto::manifest::{Compression, Digest, Encryption, MANIFEST_FORMAT, Manifest, PackageKind};

fuzz_target!(|data: &[u8]| {
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "fw".into(),
        version: semver::Version::new(1, 0, 0),
        kind: PackageKind::Firmware,
        hardware: vec!["revB".into()],
        payload: Digest { size: 4096, sha256: "0".repeat(64) },
        artifact: Digest { size: data.len() as u64, sha256: "0".repeat(64) },
        compression: Compression::Zstd { window_log: 20 },
        encryption: Encryption::ChaCha20Poly1305Stream {
            chunk_size: 1024,
            nonce_prefix: "00000000000000".into(),
        },
        created_at: 0,
    };
    let key = DataKey::from_bytes([0u8; 32]);
    let mut output = Vec::new();
    let _ = otter_package::pipeline::unpack(&mut &data[..], &manifest, &key, &mut output);
    assert!(output.len() <= 4096);
});
