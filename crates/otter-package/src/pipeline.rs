//! The device side: check and unpack a downloaded artifact in bounded memory.
//!
//! [`hash_file`] (or [`DigestBuilder`] fed while downloading) checks the
//! artifact against the signed manifest; [`unpack`] then decrypts it chunk by
//! chunk, decompresses it with the zstd window capped at the manifest's
//! `window_log`, and writes the payload out while hashing it. Memory use
//! depends on the chunk size and window, never on the payload size.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;

use otter_proto::manifest::{Compression, Digest, Encryption, Manifest};
use sha2::{Digest as _, Sha256};

use crate::PackageError;
use crate::format::DataKey;
use crate::stream_cipher::{DecryptReader, NoncePrefix};

/// Buffer size for streaming reads and writes.
const IO_BUFFER_SIZE: usize = 64 * 1024;

/// Size and SHA-256 of a stream fed piece by piece.
#[derive(Clone, Default)]
pub struct DigestBuilder {
    size: u64,
    hasher: Sha256,
}

impl DigestBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.hasher.update(bytes);
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> Digest {
        Digest {
            size: self.size,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// Size and lower-case hex SHA-256 of a file, read in fixed-size pieces.
pub fn hash_file(path: &Path) -> Result<Digest, PackageError> {
    let mut file = File::open(path)?;
    hash_reader(&mut file)
}

/// Size and lower-case hex SHA-256 of everything `reader` yields.
pub fn hash_reader(reader: &mut impl Read) -> Result<Digest, PackageError> {
    let mut digest = DigestBuilder::new();
    let mut buffer = vec![0u8; IO_BUFFER_SIZE];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(digest.finish()),
            Ok(count) => digest.update(buffer.get(..count).unwrap_or_default()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
}

/// Decrypts and decompresses `artifact` into `output` and returns the digest
/// of what was written, which equals `manifest.payload`.
///
/// The artifact should already match `manifest.artifact` (see [`hash_file`]);
/// `unpack` authenticates every chunk regardless. Errors:
/// [`PackageError::Decrypt`] for a wrong key, a tampered or truncated
/// artifact or trailing bytes; [`PackageError::TooLarge`] as soon as the
/// output would exceed `manifest.payload.size` (the excess is not written);
/// [`PackageError::Decompress`] for a bad zstd stream, a window larger than
/// the manifest allows, or data after the zstd frame;
/// [`PackageError::HashMismatch`] (`"payload"`) if the output differs from
/// the manifest's payload size or hash. On error, `output` holds a partial,
/// unverified payload that the caller must discard.
pub fn unpack(
    artifact: &mut impl Read,
    manifest: &Manifest,
    data_key: &DataKey,
    output: &mut impl Write,
) -> Result<Digest, PackageError> {
    let (chunk_size, nonce_prefix) = stream_parameters(&manifest.encryption)?;
    let Compression::Zstd { window_log } = manifest.compression;

    let decrypting = DecryptReader::new(artifact, data_key, &nonce_prefix, chunk_size);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(decrypting)
        .map_err(|error| PackageError::Decompress(error.to_string()))?
        .single_frame();
    decoder
        .window_log_max(window_log)
        .map_err(|error| PackageError::Decompress(error.to_string()))?;

    let limit = manifest.payload.size;
    let mut written = DigestBuilder::new();
    let mut buffer = vec![0u8; IO_BUFFER_SIZE];
    loop {
        let count = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(classify(decoder.get_mut(), error)),
        };
        if written.size() + count as u64 > limit {
            return Err(PackageError::TooLarge);
        }
        let piece = buffer.get(..count).unwrap_or_default();
        written.update(piece);
        output.write_all(piece)?;
    }

    // The frame is complete; what follows must be the end of an
    // authenticated stream. Asking for more bytes reads (and authenticates)
    // the remaining chunks, which also rejects a stream missing its last chunk.
    let mut decrypting = decoder.into_inner();
    match decrypting.fill_buf() {
        Ok([]) => {}
        Ok(_) => {
            return Err(PackageError::Decompress(
                "data follows the zstd frame".into(),
            ));
        }
        Err(error) => return Err(classify(&mut decrypting, error)),
    }
    output.flush()?;

    let digest = written.finish();
    if digest != manifest.payload {
        return Err(PackageError::HashMismatch { what: "payload" });
    }
    Ok(digest)
}

/// Chunk size and nonce prefix from the manifest, checked again here so a
/// manifest that skipped validation cannot cause a panic.
fn stream_parameters(encryption: &Encryption) -> Result<(usize, NoncePrefix), PackageError> {
    let Encryption::ChaCha20Poly1305Stream {
        chunk_size,
        nonce_prefix,
    } = encryption;
    if !(1024..=(16 << 20)).contains(chunk_size) {
        return Err(PackageError::Malformed(format!(
            "chunk size {chunk_size} out of range"
        )));
    }
    let nonce_prefix: NoncePrefix = hex::decode(nonce_prefix)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| PackageError::Malformed("nonce prefix is not 7 bytes of hex".into()))?;
    Ok((*chunk_size as usize, nonce_prefix))
}

/// Turns an `io::Error` from the decoder stack into the precise error: the
/// decrypting reader's own failure if it had one, else a zstd error.
fn classify<R: Read>(decrypting: &mut DecryptReader<R>, error: io::Error) -> PackageError {
    decrypting
        .take_failure()
        .unwrap_or_else(|| PackageError::Decompress(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn hashes_known_values() {
        let empty = hash_reader(&mut Cursor::new(b"")).unwrap();
        assert_eq!(empty.size, 0);
        assert_eq!(
            empty.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let abc = hash_file(&path).unwrap();
        assert_eq!(abc.size, 3);
        assert_eq!(
            abc.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(matches!(
            hash_file(&dir.path().join("missing")),
            Err(PackageError::Io(_))
        ));
    }

    #[test]
    fn bad_stream_parameters_are_malformed() {
        let bad_prefix = Encryption::ChaCha20Poly1305Stream {
            chunk_size: 4096,
            nonce_prefix: "zz".into(),
        };
        assert!(matches!(
            stream_parameters(&bad_prefix),
            Err(PackageError::Malformed(_))
        ));
        let bad_chunk = Encryption::ChaCha20Poly1305Stream {
            chunk_size: 0,
            nonce_prefix: "00112233445566".into(),
        };
        assert!(matches!(
            stream_parameters(&bad_chunk),
            Err(PackageError::Malformed(_))
        ));
    }
}
