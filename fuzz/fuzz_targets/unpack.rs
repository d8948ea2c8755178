//! The device's unpack pipeline (decrypt → decompress → hash), in the two
//! modes of `otter_fuzz_support::unpack_case`:
//!
//! - a fuzzed zstd stream, encrypted with the manifest's key so it passes
//!   authentication and reaches the decompressor. Properties: `unpack`
//!   never writes more than the manifest's payload size (a zstd bomb stops
//!   at the limit); when it succeeds, what it wrote matches the manifest;
//!   and decryption is transparent: when the plain zstd decoder (same
//!   window limit, single frame, nothing after it) accepts the stream and
//!   its output matches the manifest, `unpack` succeeds with the same bytes;
//! - a fuzzed payload, built into a real package (`build_package`), whose
//!   header is read and verified and whose artifact must unpack to exactly
//!   the payload, for any chunk size.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use otter_fuzz_support::trusted_key;
use otter_fuzz_support::unpack_case::{
    DATA_KEY, MAX_DECLARED_SIZE, Mode, UnpackCase, digest, encrypt_stream, manifest,
};
use otter_package::DataKey;
use otter_package::format::{BuildOptions, build_package, read_header};
use otter_package::pipeline::unpack;
use otter_package::sign::verify_manifest;
use otter_proto::manifest::{Digest, PackageKind};

fuzz_target!(|input: &[u8]| {
    let Some(case) = UnpackCase::parse(input) else {
        return;
    };
    match case.mode {
        Mode::Stream => unpack_stream(&case),
        Mode::Payload => build_then_unpack(&case),
    }
});

fn unpack_stream(case: &UnpackCase<'_>) {
    let reference = reference_decode(case.data, case.window_log);
    let payload = match (case.declared_size, &reference) {
        (None, Some(bytes)) => digest(bytes),
        (Some(size), Some(bytes)) if bytes.len() == size as usize => digest(bytes),
        // A size with a hash no output has: unpack must stop at the size
        // and then fail the hash check.
        (declared, _) => Digest {
            size: u64::from(declared.unwrap_or(0)),
            sha256: "0".repeat(64),
        },
    };
    let artifact = encrypt_stream(case.data, case.chunk_size as usize);
    let manifest = manifest(case, payload, digest(&artifact));

    let mut output = Vec::new();
    let result = unpack(
        &mut &artifact[..],
        &manifest,
        &DataKey::from_bytes(DATA_KEY),
        &mut output,
    );
    assert!(
        output.len() as u64 <= manifest.payload.size,
        "unpack wrote {} bytes, the manifest declares {}",
        output.len(),
        manifest.payload.size
    );
    if let Ok(written) = &result {
        assert_eq!(written, &manifest.payload);
        assert_eq!(digest(&output), manifest.payload);
    }
    if let Some(bytes) = &reference
        && digest(bytes) == manifest.payload
    {
        assert!(
            result.is_ok(),
            "the plain decoder accepts the stream, unpack says {result:?}"
        );
        assert_eq!(&output, bytes);
    }
}

/// What zstd alone makes of `stream` under unpack's rules: one frame, a
/// window of at most `2^window_log`, nothing after the frame. `None` for
/// anything it refuses or that decodes to more than the largest declared
/// size.
fn reference_decode(stream: &[u8], window_log: u32) -> Option<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stream)
        .ok()?
        .single_frame();
    decoder.window_log_max(window_log).ok()?;
    let limit = u64::from(MAX_DECLARED_SIZE);
    let mut output = Vec::new();
    (&mut decoder)
        .take(limit + 1)
        .read_to_end(&mut output)
        .ok()?;
    if output.len() as u64 > limit || !decoder.finish().is_empty() {
        return None;
    }
    Some(output)
}

fn build_then_unpack(case: &UnpackCase<'_>) {
    let mut options = BuildOptions::new(
        "fw",
        semver::Version::new(1, 0, 0),
        PackageKind::Firmware,
        vec!["revB".into()],
    );
    options.chunk_size = case.chunk_size;
    options.zstd_level = 1 + (case.window_log % 3) as i32;
    let mut package = Vec::new();
    // Fails only if the temporary folder is unusable, which is no finding.
    if build_package(
        &mut &case.data[..],
        &mut package,
        &trusted_key(),
        &options,
        &std::env::temp_dir(),
    )
    .is_err()
    {
        return;
    }
    let mut artifact = &package[..];
    let header = read_header(&mut artifact).expect("a built package has a readable header");
    let manifest = verify_manifest(&header.signed_manifest, &[trusted_key().verifying_key()])
        .expect("a built package is signed by its builder");
    assert_eq!(manifest.payload, digest(case.data));
    assert_eq!(manifest.artifact, digest(artifact));
    let mut output = Vec::new();
    unpack(&mut artifact, &manifest, &header.data_key, &mut output)
        .expect("a built package unpacks");
    assert_eq!(output, case.data);
}
