//! The package file, and building and opening one.
//!
//! Layout of a package file:
//!
//! ```text
//! b"OTTERPKG"                  8 bytes, magic
//! header length                u32, big-endian, 1..=64 KiB
//! header                       JSON: {"signed_manifest": {...}, "data_key": "<base64>"}
//! artifact                     the rest: STREAM-encrypted zstd frame
//! ```
//!
//! The artifact is what devices download; the server keeps it apart from the
//! header after [`open_package`] has checked the signature and the artifact's
//! size and SHA-256 against the signed manifest. The data key travels in the
//! header to the server (wrapping it per device comes later), so the header
//! must never be published as is.
//!
//! [`build_package`] streams: input → zstd → STREAM encryption → a scratch
//! file, hashing the plaintext and the ciphertext on the way; only then is the
//! manifest complete, signed, and written with the artifact to the output.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use otter_proto::manifest::{
    Compression, Digest, Encryption, MANIFEST_FORMAT, Manifest, PackageKind, SignedManifest,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::PackageError;
use crate::pipeline::{DigestBuilder, hash_reader};
use crate::sign::sign_manifest;
use crate::stream_cipher::{EncryptWriter, NoncePrefix};
use crate::trust::TrustStore;

/// First bytes of every package file.
pub const MAGIC: &[u8; 8] = b"OTTERPKG";
/// Largest header accepted, so a hostile length cannot make a reader allocate.
pub const MAX_HEADER_SIZE: u32 = 64 * 1024;
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Buffer size for streaming input.
const IO_BUFFER_SIZE: usize = 64 * 1024;

/// The symmetric key that encrypts one package's artifact.
///
/// `Debug` never shows the bytes, so a key cannot leak into logs by accident.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A fresh random key from the thread-local CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Standard, padded base64 of the 32 key bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parses [`DataKey::to_base64`] output; anything else is
    /// [`PackageError::Malformed`].
    pub fn from_base64(text: &str) -> Result<Self, PackageError> {
        BASE64
            .decode(text)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(Self)
            .ok_or_else(|| PackageError::Malformed("data key is not base64 of 32 bytes".into()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("DataKey(..)")
    }
}

/// What to build. [`BuildOptions::new`] fills in the default zstd level and
/// chunk size.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub name: String,
    pub version: semver::Version,
    pub kind: PackageKind,
    pub hardware: Vec<String>,
    /// zstd compression level; [`DEFAULT_ZSTD_LEVEL`] by default.
    pub zstd_level: i32,
    /// Plaintext bytes per encrypted chunk (1 KiB..=16 MiB); a device holds
    /// one chunk in memory while unpacking. [`DEFAULT_CHUNK_SIZE`] by default.
    pub chunk_size: u32,
    /// Sign `allow_downgrade` into the manifest: devices may install this
    /// release over a newer one when a deployment allows it too. False by
    /// default.
    pub allow_downgrade: bool,
    /// The signing key's certificate from an offline root
    /// ([`crate::trust::certify`]), embedded in the signed manifest so
    /// devices that pin the root accept the key. Must certify the signing
    /// key. None by default (the key is trusted directly).
    pub signer_certificate: Option<otter_proto::trust::SignedCertificate>,
}

impl BuildOptions {
    pub fn new(
        name: impl Into<String>,
        version: semver::Version,
        kind: PackageKind,
        hardware: Vec<String>,
    ) -> Self {
        Self {
            name: name.into(),
            version,
            kind,
            hardware,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            chunk_size: DEFAULT_CHUNK_SIZE,
            allow_downgrade: false,
            signer_certificate: None,
        }
    }
}

/// The header of a package file.
#[derive(Debug, Clone)]
pub struct PackageHeader {
    pub signed_manifest: SignedManifest,
    pub data_key: DataKey,
}

/// A package whose signature and artifact have been checked.
#[derive(Debug, Clone)]
pub struct OpenedPackage {
    pub header: PackageHeader,
    /// The verified, validated manifest.
    pub manifest: Manifest,
    /// Where the artifact starts in the file; it runs to the end of the file
    /// and is `manifest.artifact.size` bytes long.
    pub artifact_offset: u64,
}

/// The header's JSON shape; kept private so the key is always a [`DataKey`]
/// in memory.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    signed_manifest: SignedManifest,
    data_key: String,
}

/// Builds a package from `input` into `output` and returns its signed
/// manifest. See the module documentation for the stages.
///
/// `scratch_dir` receives a temporary file as large as the artifact, removed
/// before returning. Nothing is written to `output` until the package is
/// complete, and name, hardware and chunk size are validated before any work.
pub fn build_package(
    input: &mut impl Read,
    output: &mut impl Write,
    key: &SigningKey,
    options: &BuildOptions,
    scratch_dir: &Path,
) -> Result<SignedManifest, PackageError> {
    let data_key = DataKey::generate();
    let mut nonce_prefix: NoncePrefix = [0; 7];
    rand::rng().fill_bytes(&mut nonce_prefix);

    let placeholder = Digest {
        size: 0,
        sha256: "0".repeat(64),
    };
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: options.name.clone(),
        version: options.version.clone(),
        kind: options.kind,
        hardware: options.hardware.clone(),
        payload: placeholder.clone(),
        artifact: placeholder,
        compression: Compression::Zstd { window_log: 10 },
        encryption: Encryption::ChaCha20Poly1305Stream {
            chunk_size: options.chunk_size,
            nonce_prefix: hex::encode(nonce_prefix),
        },
        created_at: unix_now(),
        allow_downgrade: options.allow_downgrade,
    };
    manifest.validate()?;
    if let Some(certificate) = &options.signer_certificate {
        let document = crate::trust::peek_certificate(certificate)?;
        if document.signer_key != crate::keys::key_id(&key.verifying_key()) {
            return Err(PackageError::BadCertificate(
                "the certificate is for another key than the signing key".into(),
            ));
        }
    }

    let mut scratch = ScratchFile::create(scratch_dir)?;
    let encrypting = EncryptWriter::new(
        &scratch.file,
        &data_key,
        &nonce_prefix,
        options.chunk_size as usize,
    );
    let mut encoder = zstd::stream::write::Encoder::new(
        FramePrefixRecorder::new(encrypting),
        options.zstd_level,
    )?;
    let mut payload = DigestBuilder::new();
    let mut buffer = vec![0u8; IO_BUFFER_SIZE];
    loop {
        let count = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        let piece = buffer.get(..count).unwrap_or_default();
        payload.update(piece);
        encoder.write_all(piece)?;
    }
    let recorder = encoder.finish()?;
    let window_log = zstd_window_log(&recorder.prefix)?;
    let (_, artifact) = recorder.inner.finish()?;

    manifest.payload = payload.finish();
    manifest.artifact = artifact;
    manifest.compression = Compression::Zstd { window_log };
    manifest.validate()?;
    let mut signed_manifest = sign_manifest(&manifest, key);
    signed_manifest.signer_certificate = options.signer_certificate.clone().map(Box::new);

    let header = PackageHeader {
        signed_manifest: signed_manifest.clone(),
        data_key,
    };
    let header_bytes = encode_header(&header)?;
    scratch.file.seek(SeekFrom::Start(0))?;
    output.write_all(MAGIC)?;
    output.write_all(&header_bytes.length.to_be_bytes())?;
    output.write_all(&header_bytes.json)?;
    let copied = io::copy(&mut (&scratch.file).take(manifest.artifact.size), output)?;
    if copied != manifest.artifact.size {
        return Err(PackageError::SizeMismatch {
            expected: manifest.artifact.size,
            actual: copied,
        });
    }
    output.flush()?;
    Ok(signed_manifest)
}

/// Writes the magic, length and header JSON, e.g. to re-emit a package with
/// a changed header. The artifact follows.
pub fn write_header(output: &mut impl Write, header: &PackageHeader) -> Result<(), PackageError> {
    let encoded = encode_header(header)?;
    output.write_all(MAGIC)?;
    output.write_all(&encoded.length.to_be_bytes())?;
    output.write_all(&encoded.json)?;
    Ok(())
}

struct EncodedHeader {
    length: u32,
    json: Vec<u8>,
}

fn encode_header(header: &PackageHeader) -> Result<EncodedHeader, PackageError> {
    let json = serde_json::to_vec(&HeaderJson {
        signed_manifest: header.signed_manifest.clone(),
        data_key: header.data_key.to_base64(),
    })
    .map_err(|error| PackageError::Malformed(format!("cannot encode header: {error}")))?;
    match u32::try_from(json.len()) {
        Ok(length) if length <= MAX_HEADER_SIZE => Ok(EncodedHeader { length, json }),
        _ => Err(PackageError::Malformed(format!(
            "header is {} bytes, more than the {MAX_HEADER_SIZE} allowed",
            json.len()
        ))),
    }
}

/// Reads the magic, length and header JSON, leaving `reader` at the first
/// artifact byte. Does not check the signature (see [`open_package`]).
///
/// Anything that is not a well-formed header is [`PackageError::Malformed`];
/// only real read failures are [`PackageError::Io`].
pub fn read_header(reader: &mut impl Read) -> Result<PackageHeader, PackageError> {
    let mut magic = [0u8; 8];
    read_exact_or_malformed(reader, &mut magic, "magic")?;
    if &magic != MAGIC {
        return Err(PackageError::Malformed(
            "not an Otter package (bad magic)".into(),
        ));
    }
    let mut length = [0u8; 4];
    read_exact_or_malformed(reader, &mut length, "header length")?;
    let length = u32::from_be_bytes(length);
    if length == 0 || length > MAX_HEADER_SIZE {
        return Err(PackageError::Malformed(format!(
            "header length {length} is outside 1..={MAX_HEADER_SIZE}"
        )));
    }
    // Bounded by MAX_HEADER_SIZE just above.
    let mut json = vec![0u8; length as usize];
    read_exact_or_malformed(reader, &mut json, "header")?;
    let parsed: HeaderJson = serde_json::from_slice(&json)
        .map_err(|error| PackageError::Malformed(format!("header is not valid: {error}")))?;
    Ok(PackageHeader {
        signed_manifest: parsed.signed_manifest,
        data_key: DataKey::from_base64(&parsed.data_key)?,
    })
}

fn read_exact_or_malformed(
    reader: &mut impl Read,
    buffer: &mut [u8],
    what: &str,
) -> Result<(), PackageError> {
    reader.read_exact(buffer).map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            PackageError::Malformed(format!("file ends inside the {what}"))
        } else {
            PackageError::Io(error)
        }
    })
}

/// Opens a package file: reads the header, verifies the manifest signature
/// against `trusted`, and checks that the artifact's size and SHA-256 match
/// the manifest, reading the file once in fixed-size pieces.
pub fn open_package(path: &Path, trusted: &[VerifyingKey]) -> Result<OpenedPackage, PackageError> {
    open_package_trusted(path, &TrustStore::direct(trusted), unix_now())
}

/// [`open_package`] against a [`TrustStore`] (pinned roots, direct signers,
/// revocations) at time `now` (Unix seconds).
pub fn open_package_trusted(
    path: &Path,
    trust: &TrustStore,
    now: i64,
) -> Result<OpenedPackage, PackageError> {
    let mut file = File::open(path)?;
    // Unbuffered on purpose: the header is read in three exact reads, so the
    // file position afterwards is the artifact's first byte.
    let header = read_header(&mut file)?;
    let manifest = trust
        .verify_manifest(&header.signed_manifest, now)?
        .manifest;
    let artifact_offset = file.stream_position()?;
    let expected = manifest.artifact.size;
    let actual = file.metadata()?.len().saturating_sub(artifact_offset);
    if actual != expected {
        return Err(PackageError::SizeMismatch { expected, actual });
    }
    // `take` keeps the read bounded even if the file grows meanwhile.
    let digest = hash_reader(&mut (&file).take(expected))?;
    if digest.size != expected {
        return Err(PackageError::SizeMismatch {
            expected,
            actual: digest.size,
        });
    }
    if digest.sha256 != manifest.artifact.sha256 {
        return Err(PackageError::HashMismatch { what: "artifact" });
    }
    Ok(OpenedPackage {
        header,
        manifest,
        artifact_offset,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Records the first bytes of the zstd output (the frame header) on their
/// way to the encrypting writer, to learn the window size zstd chose.
struct FramePrefixRecorder<W: Write> {
    inner: W,
    prefix: Vec<u8>,
}

/// A zstd frame header is at most 18 bytes: magic 4, descriptor 1, window 1,
/// dictionary id 4, content size 8.
const MAX_FRAME_HEADER_SIZE: usize = 18;

impl<W: Write> FramePrefixRecorder<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            prefix: Vec::with_capacity(MAX_FRAME_HEADER_SIZE),
        }
    }
}

impl<W: Write> Write for FramePrefixRecorder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let count = self.inner.write(data)?;
        let wanted = MAX_FRAME_HEADER_SIZE.saturating_sub(self.prefix.len());
        let written = data.get(..count).unwrap_or_default();
        self.prefix
            .extend_from_slice(written.get(..wanted.min(written.len())).unwrap_or_default());
        Ok(count)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The base-2 log of the window a decoder needs for the zstd frame starting
/// with `frame` (RFC 8878 §3.1.1.1), at least 10 as zstd's own minimum.
fn zstd_window_log(frame: &[u8]) -> Result<u32, PackageError> {
    let unexpected = || PackageError::Malformed("zstd produced an unexpected frame header".into());
    if frame.get(..4) != Some(&[0x28, 0xB5, 0x2F, 0xFD][..]) {
        return Err(unexpected());
    }
    let descriptor = *frame.get(4).ok_or_else(unexpected)?;
    let single_segment = descriptor & 0x20 != 0;
    let window_size: u64 = if single_segment {
        // No window descriptor: the window is the whole content, whose size
        // follows the dictionary id.
        let dictionary_id_size = match descriptor & 0b11 {
            0 => 0,
            1 => 1,
            2 => 2,
            _ => 4,
        };
        let start = 5 + dictionary_id_size;
        let read_le = |length: usize| -> Result<u64, PackageError> {
            let bytes = frame.get(start..start + length).ok_or_else(unexpected)?;
            Ok(bytes
                .iter()
                .rev()
                .fold(0u64, |value, byte| (value << 8) | u64::from(*byte)))
        };
        match descriptor >> 6 {
            0 => read_le(1)?,
            1 => read_le(2)? + 256,
            2 => read_le(4)?,
            _ => read_le(8)?,
        }
    } else {
        let window_descriptor = *frame.get(5).ok_or_else(unexpected)?;
        let exponent = u32::from(window_descriptor >> 3);
        let mantissa = u64::from(window_descriptor & 0b111);
        let base = 1u64 << (10 + exponent);
        base + base / 8 * mantissa
    };
    let window_log = if window_size <= 1 {
        0
    } else {
        u64::BITS - (window_size - 1).leading_zeros()
    };
    Ok(window_log.clamp(10, 31))
}

/// A temporary file in the caller's scratch directory, removed when dropped.
struct ScratchFile {
    path: PathBuf,
    file: File,
}

impl ScratchFile {
    fn create(directory: &Path) -> io::Result<Self> {
        // A random name and create_new: never clobber or follow an existing
        // file, even with several builds sharing the directory.
        for _ in 0..16 {
            let mut suffix = [0u8; 8];
            rand::rng().fill_bytes(&mut suffix);
            let path = directory.join(format!(".otter-package-{}.tmp", hex::encode(suffix)));
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            match options.open(&path) {
                Ok(file) => return Ok(Self { path, file }),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(error),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not pick an unused scratch file name",
        ))
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
