//! Signed envelopes of the signing-key hierarchy.
//!
//! An offline root key certifies the signer keys that sign manifests
//! ([`SignedCertificate`]) and revokes them ([`SignedRevocationList`]). Like
//! [`crate::manifest::SignedManifest`], each envelope carries the signed
//! document as its exact JSON bytes in a string next to the root's
//! signature, so nothing is re-serialised before a signature check. Parsing
//! the documents and checking signatures live in `otter-package` (`trust`).

use serde::{Deserialize, Serialize};

/// A signer certificate: a root's signature over a certificate document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCertificate {
    /// The certificate document's exact JSON bytes, as signed.
    pub certificate: String,
    /// Key id (base64 of the 32 public-key bytes) of the root that signed.
    pub root: String,
    /// Base64 of the 64-byte Ed25519 signature over `certificate`.
    pub signature: String,
}

/// A signer revocation list: a root's signature over a list document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRevocationList {
    /// The list document's exact JSON bytes, as signed.
    pub list: String,
    /// Key id of the root that signed.
    pub root: String,
    /// Base64 of the 64-byte Ed25519 signature over `list`.
    pub signature: String,
}

/// The server's answer to `PUT /api/v1/signer-revocations`: what is now in
/// force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationListInfo {
    pub sequence: u64,
    /// Key id of the root that signed the list.
    pub root: String,
    /// Key ids on the list.
    pub revoked: Vec<String>,
}
