//! Release data keys at rest.
//!
//! A release's data key decrypts its artifact. The blob store holds only the
//! artifact; the database holds the data key, sealed here under
//! `DATA_DIR/data-key.secret` (32 random bytes, mode 0600, created on first
//! start and kept outside the database like `link.secret` and `audit.key`).
//! So whoever reads both the database and the blob store still cannot
//! decrypt a payload; devices receive the key only wrapped to their own
//! public key (`otter_package::wrap`).
//!
//! A sealed key is `v1:` followed by base64 of a random 12-byte nonce and
//! the ChaCha20-Poly1305 ciphertext of the 32 key bytes, with the release id
//! as associated data: a sealed value copied onto another release's row
//! does not open.
//!
//! Losing `data-key.secret` makes every stored release undeliverable (the
//! packages must be uploaded again): back it up with the device CA.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use otter_package::DataKey;

/// Length of the vault's secret in bytes.
pub const VAULT_SECRET_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const SEALED_PREFIX: &str = "v1:";

/// Why a stored data key cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("the stored data key of release {release} is not a sealed key")]
    Malformed { release: String },
    #[error(
        "the stored data key of release {release} does not open under data-key.secret \
         (altered row, or another server's secret)"
    )]
    WrongKey { release: String },
}

/// Seals and opens release data keys. Cheap to clone.
#[derive(Clone)]
pub struct KeyVault {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for KeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyVault(..)")
    }
}

impl KeyVault {
    pub fn from_secret(secret: [u8; VAULT_SECRET_LEN]) -> Self {
        KeyVault {
            cipher: ChaCha20Poly1305::new(&Key::from(secret)),
        }
    }

    /// Reads the secret at `path`, or creates it (32 random bytes, 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, crate::files::SecretFileError> {
        crate::files::load_or_create_secret(path).map(KeyVault::from_secret)
    }

    /// Seals `key` for the row of `release_id`.
    pub fn seal(&self, release_id: &str, key: &DataKey) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let payload = Payload {
            msg: key.as_bytes(),
            aad: release_id.as_bytes(),
        };
        // Encrypting 32 bytes under a valid key and nonce cannot fail.
        let ciphertext = self
            .cipher
            .encrypt(&Nonce::from(nonce_bytes), payload)
            .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 encrypts 32 bytes"));
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&ciphertext);
        format!("{SEALED_PREFIX}{}", BASE64.encode(sealed))
    }

    /// Opens what [`KeyVault::seal`] produced for the same release id.
    pub fn open(&self, release_id: &str, stored: &str) -> Result<DataKey, VaultError> {
        let malformed = || VaultError::Malformed {
            release: release_id.to_owned(),
        };
        let encoded = stored.strip_prefix(SEALED_PREFIX).ok_or_else(malformed)?;
        let sealed = BASE64.decode(encoded).map_err(|_| malformed())?;
        if sealed.len() != NONCE_LEN + 32 + TAG_LEN {
            return Err(malformed());
        }
        let (nonce_bytes, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce_bytes: [u8; NONCE_LEN] = nonce_bytes.try_into().map_err(|_| malformed())?;
        let plaintext = self
            .cipher
            .decrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: ciphertext,
                    aad: release_id.as_bytes(),
                },
            )
            .map_err(|_| VaultError::WrongKey {
                release: release_id.to_owned(),
            })?;
        let bytes: [u8; 32] = plaintext.as_slice().try_into().map_err(|_| malformed())?;
        Ok(DataKey::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> KeyVault {
        KeyVault::from_secret([7; VAULT_SECRET_LEN])
    }

    #[test]
    fn sealed_keys_open_for_their_release_only() {
        let key = DataKey::generate();
        let sealed = vault().seal("fw@1.0.0", &key);
        assert!(sealed.starts_with("v1:"));
        assert!(!sealed.contains(&key.to_base64()));
        let opened = vault().open("fw@1.0.0", &sealed).unwrap();
        assert_eq!(opened.as_bytes(), key.as_bytes());
        assert_eq!(
            vault().open("fw@2.0.0", &sealed).unwrap_err(),
            VaultError::WrongKey {
                release: "fw@2.0.0".into()
            }
        );
        // Two seals of one key differ (fresh nonce).
        assert_ne!(sealed, vault().seal("fw@1.0.0", &key));
    }

    #[test]
    fn another_secret_or_an_altered_row_does_not_open() {
        let key = DataKey::generate();
        let sealed = vault().seal("fw@1.0.0", &key);
        let other = KeyVault::from_secret([8; VAULT_SECRET_LEN]);
        assert!(matches!(
            other.open("fw@1.0.0", &sealed),
            Err(VaultError::WrongKey { .. })
        ));
        let mut bytes = BASE64.decode(&sealed[3..]).unwrap();
        bytes[20] ^= 1;
        let altered = format!("v1:{}", BASE64.encode(bytes));
        assert!(matches!(
            vault().open("fw@1.0.0", &altered),
            Err(VaultError::WrongKey { .. })
        ));
    }

    #[test]
    fn malformed_values_are_refused_without_panic() {
        for stored in [
            "",
            "v1:",
            "v1:not base64!",
            "v1:AAAA",
            "v2:AAAA",
            // A legacy plaintext key is not a sealed key.
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            assert!(
                matches!(vault().open("r", stored), Err(VaultError::Malformed { .. })),
                "{stored:?}"
            );
        }
    }
}
