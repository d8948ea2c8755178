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
    #[error(
        "manifest is signed by an unknown key (neither trusted directly nor certified by a pinned root)"
    )]
    UntrustedSigner,
    /// The signer is on the current revocation list.
    #[error("manifest signer {key_id} is revoked (reason: {reason:?})")]
    RevokedSigner { key_id: String, reason: String },
    /// A signer certificate or revocation list names a root that is not pinned.
    #[error("signed by a root key that is not trusted")]
    UntrustedRoot,
    /// A signer certificate does not verify or is malformed.
    #[error("signer certificate is not valid: {0}")]
    BadCertificate(String),
    #[error("signer certificate expired (not_after {not_after})")]
    CertificateExpired { not_after: i64 },
    #[error("signer certificate is not valid yet (not_before {not_before})")]
    CertificateNotYetValid { not_before: i64 },
    /// A revocation list does not verify or is malformed.
    #[error("revocation list is not valid: {0}")]
    BadRevocationList(String),
    /// A revocation list is not newer than the one already held.
    #[error("revocation list sequence {offered} is not newer than the current {current}")]
    StaleRevocationList { current: u64, offered: u64 },
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
    /// A device encryption (X25519) public key is not base64 of 32 bytes, or
    /// is all zero.
    #[error("invalid encryption key: {0}")]
    BadEncryptionKey(String),
    /// A wrapped data key is malformed, or does not open with this device's
    /// key and context (another device's, another release's, or tampered).
    #[error("cannot unwrap the data key: {0}")]
    Unwrap(String),
    /// The payload grew larger than the manifest declares; unpacking stopped.
    #[error("payload is larger than the manifest declares")]
    TooLarge,
}
