//! The Otter package format.
//!
//! A publisher builds a package from a payload (firmware image, config
//! bundle, ...): the payload is compressed with zstd, encrypted with
//! ChaCha20-Poly1305 in the STREAM construction under a fresh data key, and
//! described by a [`otter_proto::manifest::Manifest`] that the publisher signs
//! with an Ed25519 key. A device runs the reverse, streaming pipeline on the
//! artifact it downloads: hash, signature, decrypt, decompress.
//!
//! Layout:
//! - [`keys`]: Ed25519 key files (PKCS#8 / SPKI PEM) and key ids.
//! - [`sign`]: signing and verifying a manifest.
//! - [`trust`]: offline roots, signer certificates, revocation lists and the
//!   [`trust::TrustStore`] that verifies manifests against them.
//! - [`format`]: the package file (magic, header, artifact), building and
//!   opening one.
//! - [`pipeline`]: what a device runs on a downloaded artifact (hash,
//!   decrypt, decompress), in bounded memory.
//! - [`wrap`]: device encryption keys (X25519) and the HPKE wrapping of a
//!   release's data key to one device.
//! - `stream_cipher` (private): the chunked encrypting writer and decrypting
//!   reader both sides share.

mod error;
pub mod format;
pub mod keys;
pub mod pipeline;
pub mod sign;
mod stream_cipher;
pub mod trust;
pub mod wrap;

pub use error::PackageError;
pub use format::DataKey;
