//! ChaCha20-Poly1305 STREAM (big-endian 32-bit counter + last-block flag,
//! `aead-stream`'s BE32 flavour) as a writer and a buffered reader.
//!
//! Chunk rule, shared by both sides: the plaintext is cut into chunks of
//! exactly `chunk_size` bytes sealed as "next" chunks, followed by one "last"
//! chunk of 0..`chunk_size` bytes (it may be empty). Every chunk carries a
//! 16-byte tag, so on the wire a full sealed chunk is `chunk_size + 16` bytes
//! and the final one is strictly shorter. A reader therefore knows from the
//! length alone which chunk is last, and a stream cut at any chunk boundary
//! fails authentication because its final chunk is missing.
//!
//! No associated data is used: the signed manifest carries the artifact's
//! hash, which pins the ciphertext as a whole.

use std::io::{self, BufRead, Read, Write};

use aead_stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::{ChaCha20Poly1305, Key};

use crate::PackageError;
use crate::format::DataKey;
use crate::pipeline::DigestBuilder;
use otter_proto::manifest::Digest;

/// Poly1305 tag appended to every chunk.
pub(crate) const TAG_SIZE: usize = 16;

/// The caller-chosen part of the 12-byte ChaCha20-Poly1305 nonce; STREAM BE32
/// uses the other 5 bytes for its counter and last-block flag.
pub(crate) type NoncePrefix = [u8; 7];

fn key(data_key: &DataKey) -> Key {
    Key::from(*data_key.as_bytes())
}

/// Encrypts everything written to it and writes the sealed chunks to `inner`,
/// keeping the size and SHA-256 of what it wrote (the artifact).
///
/// [`EncryptWriter::finish`] must be called: it seals the last chunk.
pub(crate) struct EncryptWriter<W: Write> {
    inner: W,
    encryptor: EncryptorBE32<ChaCha20Poly1305>,
    chunk_size: usize,
    /// Plaintext of the chunk being filled; sealed in place, so its capacity
    /// is `chunk_size + TAG_SIZE` and it never reallocates.
    buffer: Vec<u8>,
    written: DigestBuilder,
}

impl<W: Write> EncryptWriter<W> {
    pub(crate) fn new(
        inner: W,
        data_key: &DataKey,
        nonce_prefix: &NoncePrefix,
        chunk_size: usize,
    ) -> Self {
        Self {
            inner,
            encryptor: EncryptorBE32::new(&key(data_key), &(*nonce_prefix).into()),
            chunk_size,
            buffer: Vec::with_capacity(chunk_size + TAG_SIZE),
            written: DigestBuilder::new(),
        }
    }

    /// Seals the final chunk (possibly empty) and returns the inner writer and
    /// the digest of the ciphertext written.
    pub(crate) fn finish(self) -> io::Result<(W, Digest)> {
        let Self {
            mut inner,
            encryptor,
            mut buffer,
            mut written,
            ..
        } = self;
        encryptor
            .encrypt_last_in_place(&[], &mut buffer)
            .map_err(|_| io::Error::other("encrypting the last chunk failed"))?;
        inner.write_all(&buffer)?;
        written.update(&buffer);
        inner.flush()?;
        Ok((inner, written.finish()))
    }

    fn seal_full_chunk(&mut self) -> io::Result<()> {
        // Fails only when the 32-bit chunk counter is exhausted (2^32 chunks
        // of at least 1 KiB, far beyond the manifest's size cap).
        self.encryptor
            .encrypt_next_in_place(&[], &mut self.buffer)
            .map_err(|_| io::Error::other("STREAM chunk counter exhausted"))?;
        self.inner.write_all(&self.buffer)?;
        self.written.update(&self.buffer);
        self.buffer.clear();
        Ok(())
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk_size - self.buffer.len();
        let taken = data.get(..room.min(data.len())).unwrap_or(data);
        self.buffer.extend_from_slice(taken);
        // Seal as soon as a chunk is full: the last chunk is then always
        // shorter than `chunk_size`, which is how the reader recognises it.
        if self.buffer.len() == self.chunk_size {
            self.seal_full_chunk()?;
        }
        Ok(taken.len())
    }

    /// Flushes sealed chunks only; a partly filled chunk stays buffered until
    /// it is full or [`EncryptWriter::finish`] seals it.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum DecryptState {
    Reading(Box<DecryptorBE32<ChaCha20Poly1305>>),
    /// The last chunk was authenticated; nothing follows.
    Finished,
    /// A read or an authentication failed; every later call fails too, so a
    /// caller can never mistake a failure for the end of the stream.
    Failed,
}

/// Reads sealed chunks from `inner` and serves their authenticated plaintext
/// through [`BufRead`], one chunk in memory at a time.
///
/// Failures surface as `io::Error`s (the zstd decoder sits on top and only
/// speaks `io`); the precise [`PackageError`] is kept and handed out by
/// [`DecryptReader::take_failure`].
pub(crate) struct DecryptReader<R: Read> {
    inner: R,
    state: DecryptState,
    chunk_size: usize,
    /// Plaintext of the current chunk (decrypted in place).
    buffer: Vec<u8>,
    /// Bytes of `buffer` already consumed.
    position: usize,
    failure: Option<PackageError>,
}

impl<R: Read> DecryptReader<R> {
    pub(crate) fn new(
        inner: R,
        data_key: &DataKey,
        nonce_prefix: &NoncePrefix,
        chunk_size: usize,
    ) -> Self {
        Self {
            inner,
            state: DecryptState::Reading(Box::new(DecryptorBE32::new(
                &key(data_key),
                &(*nonce_prefix).into(),
            ))),
            chunk_size,
            buffer: Vec::with_capacity(chunk_size + TAG_SIZE),
            position: 0,
            failure: None,
        }
    }

    /// The error behind the last failed read, if a read failed.
    pub(crate) fn take_failure(&mut self) -> Option<PackageError> {
        self.failure.take()
    }

    fn fail(&mut self, failure: PackageError, kind: io::ErrorKind) -> io::Error {
        let message = failure.to_string();
        self.state = DecryptState::Failed;
        self.buffer.clear();
        self.position = 0;
        self.failure = Some(failure);
        io::Error::new(kind, message)
    }

    fn read_next_chunk(&mut self) -> io::Result<()> {
        let sealed_size = self.chunk_size + TAG_SIZE;
        self.buffer.clear();
        self.buffer.resize(sealed_size, 0);
        self.position = 0;
        let filled = match read_full(&mut self.inner, &mut self.buffer) {
            Ok(filled) => filled,
            Err(error) => {
                let kind = error.kind();
                return Err(self.fail(PackageError::Io(error), kind));
            }
        };
        self.buffer.truncate(filled);

        // A full sealed chunk is a "next" chunk; anything shorter (read_full
        // only stops short at end of input) must be the last one.
        let state = std::mem::replace(&mut self.state, DecryptState::Failed);
        let result = match state {
            DecryptState::Reading(mut decryptor) if filled == sealed_size => {
                let result = decryptor.decrypt_next_in_place(&[], &mut self.buffer);
                self.state = DecryptState::Reading(decryptor);
                result
            }
            DecryptState::Reading(decryptor) => {
                let result = decryptor.decrypt_last_in_place(&[], &mut self.buffer);
                self.state = DecryptState::Finished;
                result
            }
            DecryptState::Finished | DecryptState::Failed => Ok(()),
        };
        result.map_err(|_| self.fail(PackageError::Decrypt, io::ErrorKind::InvalidData))
    }
}

impl<R: Read> BufRead for DecryptReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.position >= self.buffer.len() {
            match self.state {
                DecryptState::Reading(_) => self.read_next_chunk()?,
                DecryptState::Finished => {}
                DecryptState::Failed => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "artifact stream already failed",
                    ));
                }
            }
        }
        Ok(self.buffer.get(self.position..).unwrap_or_default())
    }

    fn consume(&mut self, amount: usize) {
        self.position = self.position.saturating_add(amount).min(self.buffer.len());
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, output: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let count = available.len().min(output.len());
        if let (Some(target), Some(source)) = (output.get_mut(..count), available.get(..count)) {
            target.copy_from_slice(source);
        }
        self.consume(count);
        Ok(count)
    }
}

/// Reads until `buffer` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buffer.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 1024;

    fn seal(plaintext: &[u8], key: &DataKey, prefix: &NoncePrefix) -> Vec<u8> {
        let mut writer = EncryptWriter::new(Vec::new(), key, prefix, CHUNK);
        // Odd-sized writes cross chunk boundaries in every way.
        for piece in plaintext.chunks(333) {
            writer.write_all(piece).unwrap();
        }
        let (sealed, digest) = writer.finish().unwrap();
        assert_eq!(digest.size, sealed.len() as u64);
        sealed
    }

    fn open(sealed: &[u8], key: &DataKey, prefix: &NoncePrefix) -> Result<Vec<u8>, PackageError> {
        let mut reader = DecryptReader::new(sealed, key, prefix, CHUNK);
        let mut plaintext = Vec::new();
        match reader.read_to_end(&mut plaintext) {
            Ok(_) => Ok(plaintext),
            Err(error) => Err(reader.take_failure().unwrap_or(PackageError::Io(error))),
        }
    }

    #[test]
    fn round_trip_and_chunk_layout() {
        let key = DataKey::generate();
        let prefix = [7u8; 7];
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5] {
            let plaintext: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let sealed = seal(&plaintext, &key, &prefix);
            let chunks = size / CHUNK + 1;
            assert_eq!(sealed.len(), size + chunks * TAG_SIZE, "size {size}");
            assert_eq!(
                open(&sealed, &key, &prefix).unwrap(),
                plaintext,
                "size {size}"
            );
        }
    }

    #[test]
    fn wrong_key_prefix_truncation_and_garbage_fail() {
        let key = DataKey::generate();
        let prefix = [1u8; 7];
        let plaintext = vec![42u8; 2 * CHUNK + 10];
        let sealed = seal(&plaintext, &key, &prefix);
        let is_decrypt =
            |result: Result<Vec<u8>, PackageError>| matches!(result, Err(PackageError::Decrypt));

        assert!(is_decrypt(open(&sealed, &DataKey::generate(), &prefix)));
        assert!(is_decrypt(open(&sealed, &key, &[2u8; 7])));
        // Drop the last chunk: the stream now ends on a full "next" chunk.
        assert!(is_decrypt(open(
            &sealed[..2 * (CHUNK + TAG_SIZE)],
            &key,
            &prefix
        )));
        assert!(is_decrypt(open(&sealed[..sealed.len() - 1], &key, &prefix)));
        assert!(is_decrypt(open(&[], &key, &prefix)));
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(is_decrypt(open(&longer, &key, &prefix)));
        // Swapping two full chunks breaks their counters.
        let mut swapped = sealed.clone();
        let (first, rest) = swapped.split_at_mut(CHUNK + TAG_SIZE);
        first.swap_with_slice(&mut rest[..CHUNK + TAG_SIZE]);
        assert!(is_decrypt(open(&swapped, &key, &prefix)));
    }
}
