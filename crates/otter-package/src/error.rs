//! The one error type of this crate: every way building, opening, verifying
//! or unpacking a package can fail, with the expected conditions (bad
//! signature, tampered artifact, wrong key) as their own variants so callers
//! can report them precisely.

use otter_proto::manifest::ManifestError;

/// Why a package operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A key file could not be read, parsed or written.
    #[error("key file: {0}")]
    KeyFile(String),
    /// The manifest signature does not verify under the signer's key.
    #[error("manifest signature is not valid")]
    BadSignature,
    /// The manifest was signed by a key that is not trusted.
    #[error("manifest is signed by an untrusted key")]
    UntrustedSigner,
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The package file or artifact does not have the expected structure.
    #[error("malformed package: {0}")]
    Malformed(String),
    #[error("size mismatch: expected {expected} bytes, found {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// `what` names the checked stream: `"artifact"` or `"payload"`.
    #[error("{what} does not match the manifest (size or sha256)")]
    HashMismatch { what: &'static str },
    /// Decryption failed: wrong data key, tampered or truncated ciphertext.
    #[error("decryption failed (wrong key, tampered or truncated artifact)")]
    Decrypt,
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The payload grew larger than the manifest declares; unpacking stopped.
    #[error("payload is larger than the manifest declares")]
    TooLarge,
}
