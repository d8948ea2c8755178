//! Property tests of the package pipeline: build → open → unpack gives back
//! the input for any bytes and chunk size; arbitrary or corrupted files are
//! errors, never panics, and never unpack to different bytes.

use std::io::Cursor;

use ed25519_dalek::SigningKey;
use otter_package::format::{BuildOptions, build_package, open_package, read_header};
use otter_package::pipeline::unpack;
use otter_proto::manifest::PackageKind;
use proptest::prelude::*;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// Builds a package of `input` in `dir`; returns its path.
fn build(dir: &std::path::Path, input: &[u8], chunk_size: u32) -> std::path::PathBuf {
    let mut options = BuildOptions::new(
        "fw",
        semver::Version::new(1, 0, 0),
        PackageKind::Firmware,
        vec!["revB".into()],
    );
    options.chunk_size = chunk_size;
    let path = dir.join("p.otter");
    let mut out = std::fs::File::create(&path).unwrap();
    build_package(&mut Cursor::new(input), &mut out, &key(), &options, dir).unwrap();
    path
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn build_then_unpack_gives_back_the_input(
        input in proptest::collection::vec(any::<u8>(), 0..40_000),
        chunk_size in 1024u32..6000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), &input, chunk_size);
        let opened = open_package(&path, &[key().verifying_key()]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut artifact = Cursor::new(&bytes[opened.artifact_offset as usize..]);
        let mut output = Vec::new();
        let digest = unpack(&mut artifact, &opened.manifest, &opened.header.data_key, &mut output).unwrap();
        prop_assert_eq!(digest, opened.manifest.payload.clone());
        prop_assert_eq!(output, input);
    }

    /// A flipped bit anywhere in the artifact is refused by the hash check,
    /// and unpacking the corrupted bytes anyway fails rather than producing
    /// other plaintext.
    #[test]
    fn corruption_is_always_detected(
        input in proptest::collection::vec(any::<u8>(), 1..20_000),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), &input, 1024);
        let opened = open_package(&path, &[key().verifying_key()]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let start = opened.artifact_offset as usize;
        let index = start + position.index(bytes.len() - start);
        bytes[index] ^= 1 << bit;
        std::fs::write(&path, &bytes).unwrap();
        prop_assert!(open_package(&path, &[key().verifying_key()]).is_err());
        let mut output = Vec::new();
        let unpacked = unpack(
            &mut Cursor::new(&bytes[start..]),
            &opened.manifest,
            &opened.header.data_key,
            &mut output,
        );
        prop_assert!(unpacked.is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_files_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read_header(&mut Cursor::new(&bytes));
        let mut with_magic = b"OTTERPKG".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = read_header(&mut Cursor::new(&with_magic));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.otter");
        std::fs::write(&path, &with_magic).unwrap();
        prop_assert!(open_package(&path, &[key().verifying_key()]).is_err());
    }
}
