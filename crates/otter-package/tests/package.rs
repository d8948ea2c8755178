//! End-to-end tests of the package format through the public API: build a
//! package file, open it as the server does, unpack the artifact as a device
//! does, and check that every kind of tampering is caught with its own error.

use std::fs;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use otter_package::format::{
    BuildOptions, DEFAULT_CHUNK_SIZE, MAGIC, OpenedPackage, build_package, open_package,
    read_header,
};
use otter_package::pipeline::{hash_file, unpack};
use otter_package::sign::{sign_manifest, verify_manifest};
use otter_package::{DataKey, PackageError, keys};
use otter_proto::manifest::{Compression, Encryption, Manifest, PackageKind};
use rand::{Rng as _, RngExt as _};

const CHUNK: u32 = 4096;

struct Fixture {
    _directory: tempfile::TempDir,
    package_path: PathBuf,
    key: SigningKey,
}

fn options(chunk_size: u32) -> BuildOptions {
    let mut options = BuildOptions::new(
        "sensor-fw",
        semver::Version::new(1, 2, 3),
        PackageKind::Firmware,
        vec!["revB".into(), "revC".into()],
    );
    options.chunk_size = chunk_size;
    options
}

fn build(payload: &[u8], chunk_size: u32) -> Fixture {
    let directory = tempfile::tempdir().unwrap();
    let package_path = directory.path().join("sensor-fw.otterpkg");
    let key = SigningKey::generate(&mut rand::rng());
    let mut output = fs::File::create(&package_path).unwrap();
    build_package(
        &mut Cursor::new(payload),
        &mut output,
        &key,
        &options(chunk_size),
        directory.path(),
    )
    .unwrap();
    // The scratch file is gone: only the package remains.
    let names: Vec<_> = fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, ["sensor-fw.otterpkg"]);
    Fixture {
        _directory: directory,
        package_path,
        key,
    }
}

fn open(fixture: &Fixture) -> Result<OpenedPackage, PackageError> {
    open_package(&fixture.package_path, &[fixture.key.verifying_key()])
}

/// The artifact bytes of an opened package.
fn artifact_bytes(path: &Path, opened: &OpenedPackage) -> Vec<u8> {
    let mut file = fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(opened.artifact_offset)).unwrap();
    let mut artifact = Vec::new();
    file.read_to_end(&mut artifact).unwrap();
    artifact
}

fn unpack_bytes(
    artifact: &[u8],
    manifest: &Manifest,
    data_key: &DataKey,
) -> Result<Vec<u8>, PackageError> {
    let mut output = Vec::new();
    unpack(&mut Cursor::new(artifact), manifest, data_key, &mut output)?;
    Ok(output)
}

/// Compressible text interleaved with incompressible random bytes.
fn mixed_payload(size: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut payload = Vec::with_capacity(size);
    while payload.len() < size {
        if rng.random_bool(0.5) {
            payload.extend_from_slice(b"the quick brown fox jumps over the lazy dog; ");
        } else {
            let mut noise = [0u8; 97];
            rng.fill_bytes(&mut noise);
            payload.extend_from_slice(&noise);
        }
    }
    payload.truncate(size);
    payload
}

#[test]
fn round_trip_at_chunk_boundaries_and_large() {
    let chunk = CHUNK as usize;
    for size in [0, 1, chunk - 1, chunk, chunk + 1, 3 * 1024 * 1024 + 17] {
        let payload = mixed_payload(size);
        let fixture = build(&payload, CHUNK);
        let opened = open(&fixture).unwrap();
        let manifest = &opened.manifest;

        assert_eq!(manifest.name, "sensor-fw");
        assert_eq!(manifest.version, semver::Version::new(1, 2, 3));
        assert_eq!(manifest.kind, PackageKind::Firmware);
        assert_eq!(manifest.hardware, ["revB", "revC"]);
        assert_eq!(manifest.payload.size, size as u64);
        let Encryption::ChaCha20Poly1305Stream {
            chunk_size,
            nonce_prefix,
        } = &manifest.encryption;
        assert_eq!(*chunk_size, CHUNK);
        assert_eq!(nonce_prefix.len(), 14);
        let Compression::Zstd { window_log } = manifest.compression;
        assert!((10..=31).contains(&window_log), "window_log {window_log}");
        assert!(manifest.created_at > 1_600_000_000);
        assert_eq!(
            opened.header.signed_manifest.signer,
            keys::key_id(&fixture.key.verifying_key())
        );

        let artifact = artifact_bytes(&fixture.package_path, &opened);
        assert_eq!(artifact.len() as u64, manifest.artifact.size);
        let artifact_path = fixture.package_path.with_extension("artifact");
        fs::write(&artifact_path, &artifact).unwrap();
        assert_eq!(hash_file(&artifact_path).unwrap(), manifest.artifact);

        let mut output = Vec::new();
        let digest = unpack(
            &mut fs::File::open(&artifact_path).unwrap(),
            manifest,
            &opened.header.data_key,
            &mut output,
        )
        .unwrap();
        assert_eq!(digest, manifest.payload, "size {size}");
        assert!(output == payload, "size {size}: output differs from input");
    }
}

#[test]
fn randomized_round_trips() {
    let mut rng = rand::rng();
    for _ in 0..8 {
        let chunk_size = rng.random_range(1024..=8192);
        let size = rng.random_range(0..=5 * chunk_size as usize);
        let payload = mixed_payload(size);
        let fixture = build(&payload, chunk_size);
        let opened = open(&fixture).unwrap();
        let artifact = artifact_bytes(&fixture.package_path, &opened);
        let output = unpack_bytes(&artifact, &opened.manifest, &opened.header.data_key).unwrap();
        assert!(output == payload, "chunk {chunk_size} size {size}");
    }
}

#[test]
fn default_options_and_recorded_window_is_tight() {
    let options = BuildOptions::new(
        "cfg",
        semver::Version::new(0, 1, 0),
        PackageKind::Config,
        vec!["x".into()],
    );
    assert_eq!(options.zstd_level, 3);
    assert_eq!(options.chunk_size, DEFAULT_CHUNK_SIZE);
    let payload = b"small config".to_vec();
    let fixture = build(&payload, DEFAULT_CHUNK_SIZE);
    let opened = open(&fixture).unwrap();
    // zstd streams of unknown length use the level's default window: 2 MiB
    // at level 3. The manifest records what the frame header asks for.
    assert_eq!(
        opened.manifest.compression,
        Compression::Zstd { window_log: 21 }
    );
    let artifact = artifact_bytes(&fixture.package_path, &opened);
    let mut one_less = opened.manifest.clone();
    one_less.compression = Compression::Zstd { window_log: 20 };
    assert!(matches!(
        unpack_bytes(&artifact, &one_less, &opened.header.data_key),
        Err(PackageError::Decompress(_))
    ));
    assert!(unpack_bytes(&artifact, &opened.manifest, &opened.header.data_key).unwrap() == payload);
}

#[test]
fn build_rejects_invalid_options_and_writes_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(&mut rand::rng());
    let cases: [fn(&mut BuildOptions); 4] = [
        |options| options.name = "bad/name".into(),
        |options| options.hardware.clear(),
        |options| options.hardware = vec!["#".into()],
        |options| options.chunk_size = 10,
    ];
    for mutate in cases {
        let mut options = options(CHUNK);
        mutate(&mut options);
        let mut output = Vec::new();
        let result = build_package(
            &mut Cursor::new(b"payload"),
            &mut output,
            &key,
            &options,
            directory.path(),
        );
        assert!(
            matches!(result, Err(PackageError::Manifest(_))),
            "{options:?}"
        );
        assert!(output.is_empty());
    }
    // No scratch file is left behind.
    assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 0);
}

#[test]
fn tampered_artifact_is_a_hash_mismatch() {
    let fixture = build(&mixed_payload(10_000), CHUNK);
    let opened = open(&fixture).unwrap();
    let mut bytes = fs::read(&fixture.package_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&fixture.package_path, &bytes).unwrap();
    assert!(matches!(
        open(&fixture),
        Err(PackageError::HashMismatch { what: "artifact" })
    ));

    // One byte more or less is a size mismatch.
    bytes[last] ^= 1;
    bytes.push(0);
    fs::write(&fixture.package_path, &bytes).unwrap();
    let expected = opened.manifest.artifact.size;
    assert!(matches!(
        open(&fixture),
        Err(PackageError::SizeMismatch { expected: e, actual: a }) if e == expected && a == expected + 1
    ));
}

/// Rewrites the package file with a modified header, keeping the artifact.
fn rewrite_header(
    fixture: &Fixture,
    modify: impl FnOnce(&mut otter_package::format::PackageHeader),
) {
    let mut file = fs::File::open(&fixture.package_path).unwrap();
    let mut header = read_header(&mut file).unwrap();
    let mut artifact = Vec::new();
    file.read_to_end(&mut artifact).unwrap();
    modify(&mut header);
    let mut bytes = Vec::new();
    otter_package::format::write_header(&mut bytes, &header).unwrap();
    bytes.extend_from_slice(&artifact);
    fs::write(&fixture.package_path, bytes).unwrap();
}

#[test]
fn tampered_manifest_is_a_bad_signature() {
    let fixture = build(b"payload", CHUNK);
    rewrite_header(&fixture, |header| {
        let manifest = &mut header.signed_manifest.manifest;
        *manifest = manifest.replace("\"revB\"", "\"revX\"");
    });
    assert!(matches!(open(&fixture), Err(PackageError::BadSignature)));
}

#[test]
fn untrusted_signer_is_refused() {
    let fixture = build(b"payload", CHUNK);
    let stranger = SigningKey::generate(&mut rand::rng()).verifying_key();
    assert!(matches!(
        open_package(&fixture.package_path, &[stranger]),
        Err(PackageError::UntrustedSigner)
    ));

    // Re-signing with another key changes the signer, which is not trusted.
    let opened = open(&fixture).unwrap();
    let other_key = SigningKey::generate(&mut rand::rng());
    let resigned = sign_manifest(&opened.manifest, &other_key);
    assert!(matches!(
        verify_manifest(&resigned, &[fixture.key.verifying_key()]),
        Err(PackageError::UntrustedSigner)
    ));
}

#[test]
fn malformed_files_are_malformed_errors() {
    let fixture = build(b"payload", CHUNK);
    let good = fs::read(&fixture.package_path).unwrap();
    let trusted = [fixture.key.verifying_key()];
    let header_length = u32::from_be_bytes(good[8..12].try_into().unwrap()) as usize;

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut huge_length = good.clone();
    huge_length[8..12].copy_from_slice(&0xFFFF_FFFFu32.to_be_bytes());
    let mut zero_length = good.clone();
    zero_length[8..12].copy_from_slice(&0u32.to_be_bytes());
    let mut garbage_json = MAGIC.to_vec();
    garbage_json.extend_from_slice(&5u32.to_be_bytes());
    garbage_json.extend_from_slice(b"{nope");
    let mut bad_data_key = MAGIC.to_vec();
    let json =
        br#"{"signed_manifest":{"manifest":"{}","signer":"","signature":""},"data_key":"AAAA"}"#;
    bad_data_key.extend_from_slice(&(json.len() as u32).to_be_bytes());
    bad_data_key.extend_from_slice(json);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("magic only", MAGIC.to_vec()),
        ("bad magic", bad_magic),
        ("length 0xFFFFFFFF", huge_length),
        ("length 0", zero_length),
        ("truncated header", good[..12 + header_length - 1].to_vec()),
        ("garbage json", garbage_json),
        ("bad data key", bad_data_key),
    ];
    for (what, bytes) in cases {
        assert!(
            matches!(
                read_header(&mut Cursor::new(&bytes)),
                Err(PackageError::Malformed(_))
            ),
            "{what}"
        );
        fs::write(&fixture.package_path, &bytes).unwrap();
        assert!(
            matches!(
                open_package(&fixture.package_path, &trusted),
                Err(PackageError::Malformed(_))
            ),
            "{what}"
        );
    }

    // Header complete but artifact cut short: a size mismatch, not a panic.
    fs::write(&fixture.package_path, &good[..good.len() - 3]).unwrap();
    assert!(matches!(
        open_package(&fixture.package_path, &trusted),
        Err(PackageError::SizeMismatch { .. })
    ));
}

#[test]
fn read_header_leaves_reader_at_artifact() {
    let fixture = build(b"payload", CHUNK);
    let opened = open(&fixture).unwrap();
    let bytes = fs::read(&fixture.package_path).unwrap();
    let mut cursor = Cursor::new(&bytes);
    let header = read_header(&mut cursor).unwrap();
    assert_eq!(cursor.position(), opened.artifact_offset);
    assert_eq!(header.signed_manifest, opened.header.signed_manifest);
    assert_eq!(
        header.data_key.as_bytes(),
        opened.header.data_key.as_bytes()
    );
    assert_eq!(format!("{:?}", header.data_key), "DataKey(..)");
}

#[test]
fn unpack_refuses_bad_keys_truncation_and_wrong_manifests() {
    let chunk = CHUNK as usize;
    let payload = mixed_payload(6 * chunk + 100);
    let fixture = build(&payload, CHUNK);
    let opened = open(&fixture).unwrap();
    let manifest = &opened.manifest;
    let data_key = &opened.header.data_key;
    let artifact = artifact_bytes(&fixture.package_path, &opened);
    assert!(
        artifact.len() > chunk + 16,
        "test needs more than one chunk"
    );
    assert!(unpack_bytes(&artifact, manifest, data_key).unwrap() == payload);

    // Wrong data key.
    assert!(matches!(
        unpack_bytes(&artifact, manifest, &DataKey::generate()),
        Err(PackageError::Decrypt)
    ));

    // Truncated by one chunk: the stream ends without its final chunk.
    let sealed_chunk = chunk + 16;
    let whole_chunks = artifact.len() / sealed_chunk;
    let truncated = &artifact[..whole_chunks * sealed_chunk];
    assert!(matches!(
        unpack_bytes(truncated, manifest, data_key),
        Err(PackageError::Decrypt)
    ));
    let truncated = &artifact[..(whole_chunks - 1) * sealed_chunk];
    assert!(matches!(
        unpack_bytes(truncated, manifest, data_key),
        Err(PackageError::Decrypt)
    ));

    // Trailing garbage after the last chunk.
    let mut longer = artifact.clone();
    longer.extend_from_slice(b"junk");
    assert!(matches!(
        unpack_bytes(&longer, manifest, data_key),
        Err(PackageError::Decrypt)
    ));

    // Flipped byte inside the first chunk.
    let mut flipped = artifact.clone();
    flipped[5] ^= 0x80;
    assert!(matches!(
        unpack_bytes(&flipped, manifest, data_key),
        Err(PackageError::Decrypt)
    ));

    // Declared payload smaller than the real one: stops early, writes no more.
    let mut smaller = manifest.clone();
    smaller.payload.size = payload.len() as u64 - 1;
    let mut output = Vec::new();
    let result = unpack(&mut Cursor::new(&artifact), &smaller, data_key, &mut output);
    assert!(matches!(result, Err(PackageError::TooLarge)));
    assert!(output.len() < payload.len());

    // Declared payload larger than the real one, or a wrong hash.
    let mut larger = manifest.clone();
    larger.payload.size += 1;
    assert!(matches!(
        unpack_bytes(&artifact, &larger, data_key),
        Err(PackageError::HashMismatch { what: "payload" })
    ));
    let mut wrong_hash = manifest.clone();
    wrong_hash.payload.sha256 = "0".repeat(64);
    assert!(matches!(
        unpack_bytes(&artifact, &wrong_hash, data_key),
        Err(PackageError::HashMismatch { what: "payload" })
    ));

    // Wrong nonce prefix in the manifest.
    let mut wrong_nonce = manifest.clone();
    wrong_nonce.encryption = Encryption::ChaCha20Poly1305Stream {
        chunk_size: CHUNK,
        nonce_prefix: "00000000000000".into(),
    };
    assert!(matches!(
        unpack_bytes(&artifact, &wrong_nonce, data_key),
        Err(PackageError::Decrypt)
    ));
}

#[test]
fn unpack_enforces_the_window_limit() {
    // A payload that compresses with long back-references needs a big window.
    let mut block = vec![0u8; 600 * 1024];
    rand::rng().fill_bytes(&mut block);
    let payload = [block.clone(), block].concat();
    let fixture = build(&payload, DEFAULT_CHUNK_SIZE);
    let opened = open(&fixture).unwrap();
    let Compression::Zstd { window_log } = opened.manifest.compression;
    assert!(window_log > 10);
    let artifact = artifact_bytes(&fixture.package_path, &opened);
    let mut limited = opened.manifest.clone();
    limited.compression = Compression::Zstd { window_log: 10 };
    assert!(matches!(
        unpack_bytes(&artifact, &limited, &opened.header.data_key),
        Err(PackageError::Decompress(_))
    ));
}

#[test]
fn data_key_base64() {
    let key = DataKey::generate();
    let text = key.to_base64();
    assert_eq!(
        DataKey::from_base64(&text).unwrap().as_bytes(),
        key.as_bytes()
    );
    assert_ne!(DataKey::generate().as_bytes(), key.as_bytes());
    for bad in ["", "AAAA", "not base64!", &text[..text.len() - 4]] {
        assert!(
            matches!(DataKey::from_base64(bad), Err(PackageError::Malformed(_))),
            "{bad}"
        );
    }
}
