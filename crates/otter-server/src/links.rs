//! Temporary per-device download links (step 4) and their verification
//! (step 6).
//!
//! A link token is `base64url(link id ‖ expiry ‖ MAC)`: 16 random bytes
//! naming the stored link, the expiry as 8 big-endian bytes of Unix seconds,
//! and HMAC-SHA256 under the server's `link.secret` over the link id, the
//! expiry, the device id and the deployment id (each id length-prefixed, so
//! no two pairs of ids share an input). The MAC makes tokens unforgeable and
//! binds each to one device and one deployment; the stored row adds
//! revocation.
//!
//! Everything here is pure apart from [`LinkSecret::load_or_create`]:
//! [`verify`] takes the stored link and `now` as arguments.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use otter_proto::topics::DeviceId;
use sha2::Sha256;

/// Length of a link id in bytes.
pub const LINK_ID_LEN: usize = 16;
const EXPIRY_LEN: usize = 8;
const MAC_LEN: usize = 32;
/// Length of a decoded token in bytes.
pub const TOKEN_LEN: usize = LINK_ID_LEN + EXPIRY_LEN + MAC_LEN;
/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The key that signs link tokens. Lives in `DATA_DIR/link.secret`.
#[derive(Clone)]
pub struct LinkSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSecret(..)")
    }
}

impl LinkSecret {
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        LinkSecret(bytes)
    }

    /// Reads the secret, or creates it with 32 random bytes (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, crate::files::SecretFileError> {
        crate::files::load_or_create_secret(path).map(LinkSecret)
    }

    fn mac(
        &self,
        link_id: &LinkId,
        expires_at: i64,
        device_id: &str,
        deployment_id: &str,
    ) -> Hmac<Sha256> {
        // A 32-byte key is always a valid HMAC key.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(&link_id.0);
        mac.update(&expires_at.to_be_bytes());
        for part in [device_id, deployment_id] {
            // Ids are at most a few hundred bytes; the length fits in u32.
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }
}

/// Best effort: do not leave the key in freed memory.
impl Drop for LinkSecret {
    fn drop(&mut self) {
        self.0 = [0; SECRET_LEN];
    }
}

/// The random identifier of one link; the primary key of its stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId([u8; LINK_ID_LEN]);

impl LinkId {
    pub fn random() -> Self {
        LinkId(rand::random())
    }

    /// Lower-case hex, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; LINK_ID_LEN];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(LinkId(bytes))
    }
}

/// A decoded link token. Decoding checks only the shape; [`verify`] checks
/// the MAC against the stored link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkToken {
    pub link_id: LinkId,
    pub expires_at: i64,
    mac: [u8; MAC_LEN],
}

impl LinkToken {
    /// Creates the token of a link.
    pub fn sign(
        secret: &LinkSecret,
        link_id: LinkId,
        expires_at: i64,
        device_id: &DeviceId,
        deployment_id: &str,
    ) -> Self {
        let mac = secret
            .mac(&link_id, expires_at, device_id.as_str(), deployment_id)
            .finalize()
            .into_bytes();
        let mut mac_bytes = [0u8; MAC_LEN];
        mac_bytes.copy_from_slice(&mac);
        LinkToken {
            link_id,
            expires_at,
            mac: mac_bytes,
        }
    }

    /// The URL path segment.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_LEN);
        bytes.extend_from_slice(&self.link_id.0);
        bytes.extend_from_slice(&self.expires_at.to_be_bytes());
        bytes.extend_from_slice(&self.mac);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses a token from a URL; `None` for anything not of the right shape.
    pub fn decode(text: &str) -> Option<Self> {
        // 56 bytes encode to 75 characters; refuse longer input before decoding.
        if text.len() > 80 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let bytes: &[u8; TOKEN_LEN] = bytes.as_slice().try_into().ok()?;
        let (link_id, rest) = bytes.split_at(LINK_ID_LEN);
        let (expiry, mac) = rest.split_at(EXPIRY_LEN);
        Some(LinkToken {
            link_id: LinkId(link_id.try_into().ok()?),
            expires_at: i64::from_be_bytes(expiry.try_into().ok()?),
            mac: mac.try_into().ok()?,
        })
    }
}

/// A link as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLink {
    pub link_id: LinkId,
    pub deployment_id: String,
    pub device_id: String,
    pub expires_at: i64,
    pub revoked: bool,
}

/// Why a link does not serve a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefusal {
    /// Malformed, unknown or forged: answered as if the link never existed.
    #[error("no such link")]
    NotFound,
    #[error("this link belongs to another device")]
    WrongDevice,
    #[error("this link has expired")]
    Expired,
    #[error("this link has been revoked")]
    Revoked,
}

impl LinkRefusal {
    /// Short machine-readable code for error bodies and the audit.
    pub fn code(self) -> &'static str {
        match self {
            LinkRefusal::NotFound => "unknown-link",
            LinkRefusal::WrongDevice => "wrong-device",
            LinkRefusal::Expired => "link-expired",
            LinkRefusal::Revoked => "link-revoked",
        }
    }
}

/// Decides whether `token`, looked up as `stored`, lets `presenter` download
/// at Unix time `now`. The device check comes before expiry and revocation:
/// another device learns nothing about the state of a link not its own.
pub fn verify(
    secret: &LinkSecret,
    token: &LinkToken,
    stored: Option<&StoredLink>,
    presenter: &DeviceId,
    now: i64,
) -> Result<(), LinkRefusal> {
    let stored = stored.ok_or(LinkRefusal::NotFound)?;
    if stored.link_id != token.link_id || stored.expires_at != token.expires_at {
        return Err(LinkRefusal::NotFound);
    }
    secret
        .mac(
            &token.link_id,
            token.expires_at,
            &stored.device_id,
            &stored.deployment_id,
        )
        .verify_slice(&token.mac)
        .map_err(|_| LinkRefusal::NotFound)?;
    if stored.device_id != presenter.as_str() {
        return Err(LinkRefusal::WrongDevice);
    }
    if stored.revoked {
        return Err(LinkRefusal::Revoked);
    }
    if now >= stored.expires_at {
        return Err(LinkRefusal::Expired);
    }
    Ok(())
}

/// The download URL of a token, under the device endpoint's base URL
/// (`https://host:port`).
pub fn download_url(device_base_url: &str, token: &LinkToken) -> String {
    format!("{device_base_url}/v1/download/{}", token.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    fn setup() -> (LinkSecret, LinkToken, StoredLink) {
        let secret = LinkSecret::from_bytes([7; SECRET_LEN]);
        let link_id = LinkId::random();
        let token = LinkToken::sign(&secret, link_id, 1_000, &device("dev-a"), "dep-1");
        let stored = StoredLink {
            link_id,
            deployment_id: "dep-1".into(),
            device_id: "dev-a".into(),
            expires_at: 1_000,
            revoked: false,
        };
        (secret, token, stored)
    }

    #[test]
    fn round_trip_and_shape() {
        let (_, token, _) = setup();
        let text = token.encode();
        assert_eq!(text.len(), 75);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(LinkToken::decode(&text), Some(token));
    }

    #[test]
    fn malformed_tokens_do_not_decode() {
        let (_, token, _) = setup();
        let text = token.encode();
        for bad in [
            "",
            "abc",
            &text[..74],
            &format!("{text}A"),
            &text.replace(|c: char| c.is_ascii_alphabetic(), "*"),
            &"A".repeat(10_000),
        ] {
            assert_eq!(LinkToken::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn verification_table() {
        let (secret, token, stored) = setup();
        let other_secret = LinkSecret::from_bytes([8; SECRET_LEN]);
        let forged = LinkToken::sign(
            &other_secret,
            token.link_id,
            1_000,
            &device("dev-a"),
            "dep-1",
        );
        let stretched = LinkToken::sign(
            &other_secret,
            token.link_id,
            9_999,
            &device("dev-a"),
            "dep-1",
        );
        let for_other_deployment =
            LinkToken::sign(&secret, token.link_id, 1_000, &device("dev-a"), "dep-2");
        let revoked = StoredLink {
            revoked: true,
            ..stored.clone()
        };
        let elsewhere = StoredLink {
            link_id: LinkId::random(),
            ..stored.clone()
        };
        type Case<'a> = (
            &'a LinkToken,
            Option<&'a StoredLink>,
            &'a str,
            i64,
            Result<(), LinkRefusal>,
        );
        let cases: &[Case] = &[
            (&token, Some(&stored), "dev-a", 999, Ok(())),
            (
                &token,
                Some(&stored),
                "dev-a",
                1_000,
                Err(LinkRefusal::Expired),
            ),
            (
                &token,
                Some(&stored),
                "dev-b",
                999,
                Err(LinkRefusal::WrongDevice),
            ),
            (
                &token,
                Some(&stored),
                "dev-b",
                5_000,
                Err(LinkRefusal::WrongDevice),
            ),
            (
                &token,
                Some(&revoked),
                "dev-a",
                999,
                Err(LinkRefusal::Revoked),
            ),
            (&token, None, "dev-a", 999, Err(LinkRefusal::NotFound)),
            (
                &token,
                Some(&elsewhere),
                "dev-a",
                999,
                Err(LinkRefusal::NotFound),
            ),
            (
                &forged,
                Some(&stored),
                "dev-a",
                999,
                Err(LinkRefusal::NotFound),
            ),
            (
                &stretched,
                Some(&stored),
                "dev-a",
                999,
                Err(LinkRefusal::NotFound),
            ),
            (
                &for_other_deployment,
                Some(&stored),
                "dev-a",
                999,
                Err(LinkRefusal::NotFound),
            ),
        ];
        for (i, (token, stored, presenter, now, expected)) in cases.iter().enumerate() {
            assert_eq!(
                verify(&secret, token, *stored, &device(presenter), *now),
                *expected,
                "case {i}"
            );
        }
    }

    #[test]
    fn secret_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.secret");
        let first = LinkSecret::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = LinkSecret::load_or_create(&path).unwrap();
        assert_eq!(first.0, second.0);
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            LinkSecret::load_or_create(&path),
            Err(crate::files::SecretFileError::WrongLength { len: 5, .. })
        ));
    }

    #[test]
    fn link_ids_in_hex() {
        let id = LinkId::random();
        assert_eq!(LinkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(LinkId::from_hex("zz"), None);
    }
}
