//! The `unpack` target's input, and the encryption that gets fuzzed bytes
//! past authentication.
//!
//! Random bytes fed to `otter_package::pipeline::unpack` as an artifact fail
//! the first Poly1305 tag, so the decompressor behind it would never see
//! them. The target therefore takes a zstd stream, encrypts it here with the
//! manifest's key (the chunk rule of `otter-package`'s `stream_cipher`,
//! written again from its documentation), and unpacks that.
//!
//! ```text
//! byte 0      mode: even = `data` is a zstd stream, odd = `data` is a payload
//!             to build into a real package and unpack again
//! byte 1      chunk size in KiB, minus one (1..=256 KiB)
//! byte 2      zstd window_log allowed by the manifest: 10 + byte % 22
//! bytes 3..7  declared payload size, u32 little-endian, modulo
//!             MAX_DECLARED_SIZE + 1; 0 means "what the plain zstd decoder
//!             produces", so a valid stream can unpack successfully
//! bytes 7..   data
//! ```

use aead_stream::EncryptorBE32;
use chacha20poly1305::{ChaCha20Poly1305, Key};
use otter_package::pipeline::DigestBuilder;
use otter_proto::manifest::{
    Compression, Digest, Encryption, MANIFEST_FORMAT, Manifest, PackageKind,
};

/// Bytes before the data.
pub const HEADER_LEN: usize = 7;

/// Largest payload size a case declares: bounds the output of a zstd bomb.
pub const MAX_DECLARED_SIZE: u32 = 1 << 20;

/// The data key of every case's manifest.
pub const DATA_KEY: [u8; 32] = [3; 32];

/// The STREAM nonce prefix of every case's manifest.
pub const NONCE_PREFIX: [u8; 7] = [5; 7];

/// What a case's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A zstd stream, encrypted and unpacked against a manifest built
    /// around it.
    Stream,
    /// A payload, built into a package and unpacked again.
    Payload,
}

/// One input of the `unpack` target, cut into its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackCase<'a> {
    pub mode: Mode,
    /// Plaintext bytes per encrypted chunk, 1..=256 KiB.
    pub chunk_size: u32,
    /// 10..=31.
    pub window_log: u32,
    /// `None`: the size the plain decoder finds.
    pub declared_size: Option<u32>,
    pub data: &'a [u8],
}

impl<'a> UnpackCase<'a> {
    /// Cuts an input into its fields; `None` when it is shorter than the
    /// header.
    pub fn parse(input: &'a [u8]) -> Option<Self> {
        let (header, data) = input.split_first_chunk::<HEADER_LEN>()?;
        let [mode, chunk_kib, window, size @ ..] = *header;
        let declared = u32::from_le_bytes(size);
        Some(UnpackCase {
            mode: if mode % 2 == 0 {
                Mode::Stream
            } else {
                Mode::Payload
            },
            chunk_size: (u32::from(chunk_kib) + 1) * 1024,
            window_log: 10 + u32::from(window) % 22,
            declared_size: (declared != 0).then_some(declared % (MAX_DECLARED_SIZE + 1)),
            data,
        })
    }

    /// The input [`UnpackCase::parse`] reads back as this case (fields
    /// outside their ranges are clamped into them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let chunk_kib = (self.chunk_size / 1024).clamp(1, 256) - 1;
        let window = self.window_log.clamp(10, 31) - 10;
        let declared = match self.declared_size {
            None => 0,
            // 0 itself means "not declared"; MAX + 1 reads back as 0.
            Some(0) => MAX_DECLARED_SIZE + 1,
            Some(size) => size.min(MAX_DECLARED_SIZE),
        };
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.data.len());
        bytes.push(match self.mode {
            Mode::Stream => 0,
            Mode::Payload => 1,
        });
        bytes.push(chunk_kib as u8);
        bytes.push(window as u8);
        bytes.extend_from_slice(&declared.to_le_bytes());
        bytes.extend_from_slice(self.data);
        bytes
    }
}

/// `plaintext` encrypted as an Otter artifact: ChaCha20-Poly1305 STREAM
/// (BE32) under [`DATA_KEY`] and [`NONCE_PREFIX`], full chunks of
/// `chunk_size` bytes sealed as "next", then one shorter (possibly empty)
/// chunk sealed as "last".
pub fn encrypt_stream(plaintext: &[u8], chunk_size: usize) -> Vec<u8> {
    let mut encryptor =
        EncryptorBE32::<ChaCha20Poly1305>::new(&Key::from(DATA_KEY), &NONCE_PREFIX.into());
    let mut artifact = Vec::with_capacity(plaintext.len() + plaintext.len() / chunk_size * 16 + 16);
    let mut chunks = plaintext.chunks_exact(chunk_size);
    for chunk in &mut chunks {
        // Fails only after 2^32 chunks.
        let sealed = encryptor
            .encrypt_next(chunk)
            .expect("the STREAM counter cannot run out in a fuzz input");
        artifact.extend_from_slice(&sealed);
    }
    let last = encryptor
        .encrypt_last(chunks.remainder())
        .expect("sealing the last chunk cannot fail");
    artifact.extend_from_slice(&last);
    artifact
}

/// The manifest a case is unpacked against: its chunk size and window,
/// [`NONCE_PREFIX`], and the given digests.
pub fn manifest(case: &UnpackCase<'_>, payload: Digest, artifact: Digest) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "fuzz".into(),
        version: semver::Version::new(1, 0, 0),
        kind: PackageKind::Firmware,
        hardware: vec!["any".into()],
        payload,
        artifact,
        compression: Compression::Zstd {
            window_log: case.window_log,
        },
        encryption: Encryption::ChaCha20Poly1305Stream {
            chunk_size: case.chunk_size,
            nonce_prefix: NONCE_PREFIX.iter().map(|b| format!("{b:02x}")).collect(),
        },
        created_at: 0,
        allow_downgrade: false,
    }
}

/// Size and SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> Digest {
    let mut builder = DigestBuilder::new();
    builder.update(bytes);
    builder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use otter_package::DataKey;

    #[test]
    fn cases_read_back() {
        let data = b"zstd";
        for case in [
            UnpackCase {
                mode: Mode::Stream,
                chunk_size: 1024,
                window_log: 10,
                declared_size: None,
                data,
            },
            UnpackCase {
                mode: Mode::Payload,
                chunk_size: 256 * 1024,
                window_log: 31,
                declared_size: Some(0),
                data,
            },
            UnpackCase {
                mode: Mode::Stream,
                chunk_size: 4096,
                window_log: 23,
                declared_size: Some(MAX_DECLARED_SIZE),
                data,
            },
        ] {
            assert_eq!(UnpackCase::parse(&case.to_bytes()), Some(case));
        }
        assert_eq!(UnpackCase::parse(&[0; HEADER_LEN - 1]), None);
    }

    #[test]
    fn sealed_sizes_follow_the_chunk_rule() {
        // Two full chunks and an empty last one: three tags.
        assert_eq!(encrypt_stream(&[0; 2048], 1024).len(), 2048 + 3 * 16);
        assert_eq!(encrypt_stream(&[], 1024).len(), 16);
        assert_eq!(encrypt_stream(&[0; 1500], 1024).len(), 1500 + 2 * 16);
    }

    /// The encryption here is the one `otter-package` reads: a valid zstd
    /// frame, encrypted by [`encrypt_stream`], unpacks to its content.
    #[test]
    fn encrypted_streams_unpack() {
        let payload = b"the same bytes again and again, the same bytes again".repeat(100);
        let stream = zstd::encode_all(&payload[..], 3).unwrap();
        for chunk_size in [1024, 2048, 64 * 1024] {
            let case = UnpackCase {
                mode: Mode::Stream,
                chunk_size,
                window_log: 20,
                declared_size: None,
                data: &stream,
            };
            let artifact = encrypt_stream(&stream, chunk_size as usize);
            let manifest = manifest(&case, digest(&payload), digest(&artifact));
            let mut output = Vec::new();
            otter_package::pipeline::unpack(
                &mut &artifact[..],
                &manifest,
                &DataKey::from_bytes(DATA_KEY),
                &mut output,
            )
            .unwrap();
            assert_eq!(output, payload);
        }
    }
}
