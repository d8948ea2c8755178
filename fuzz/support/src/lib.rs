//! What the fuzz targets and the corpus generator (`make-corpus`) share.
//!
//! Both sides must agree on the keys a target trusts and on how a target
//! cuts its input into fields, or the seed corpus would not reach the code
//! it was written for. So both live here, once.
//!
//! Layout:
//! - the fixed keys and [`sign_text`] (a signature over any text, so a
//!   target can hand the manifest parser authenticated garbage);
//! - [`unpack_case`]: the `unpack` target's input layout and the STREAM
//!   encryption that lets fuzzed bytes through authentication;
//! - [`samples`]: real values of every type a target parses, encoded by the
//!   generator into the seed corpora.

pub mod samples;
pub mod unpack_case;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey};
use otter_package::keys::key_id;
use otter_proto::manifest::SignedManifest;

/// The publisher key every target trusts. Fixed, so the seed packages and
/// signed manifests in the corpus verify on every run.
pub fn trusted_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A key no target trusts.
pub fn untrusted_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

/// `text` as the manifest string of a [`SignedManifest`], signed by `key`,
/// whatever the text holds (`otter_package::sign::sign_manifest` signs only
/// valid manifests).
pub fn sign_text(text: &str, key: &SigningKey) -> SignedManifest {
    SignedManifest {
        manifest: text.to_owned(),
        signer: key_id(&key.verifying_key()),
        signature: BASE64.encode(key.sign(text.as_bytes()).to_bytes()),
        signer_certificate: None,
    }
}
