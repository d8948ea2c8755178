//! The signing-key hierarchy: offline roots, signer certificates, revocation.
//!
//! A *root* is an ordinary Ed25519 key pair ([`crate::keys`]) kept offline.
//! It signs two kinds of documents, each carried as its exact JSON bytes in
//! a string next to the root's signature (the envelopes are in
//! [`otter_proto::trust`]; nothing is re-serialised before a check):
//!
//! - a [`Certificate`]: "key K may sign packages as NAME between NOT_BEFORE
//!   and NOT_AFTER". A package signed by K embeds it in
//!   [`SignedManifest::signer_certificate`], so devices that pin only the
//!   root accept a new signer without any change on the device (rotation).
//! - a [`RevocationList`]: the key ids no longer trusted, with a `sequence`
//!   that only grows. The newest list wins; an older one never replaces it.
//!
//! A [`TrustStore`] holds the pinned roots, the directly trusted signer keys
//! (the flat `trusted_signers` model, still supported) and the newest
//! revocation list; [`TrustStore::verify_manifest`] decides whether a signed
//! manifest is acceptable at a given time. Order of the checks: revocation
//! of the signer, then the direct keys, then the certificate (root pinned,
//! root signature, document, key match, validity period), then the manifest
//! signature, and only then is the manifest parsed, so unauthenticated JSON
//! never reaches a parser other than the small certificate document's after
//! its signature was checked.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use otter_proto::manifest::{Manifest, SignedManifest};
use otter_proto::trust::{SignedCertificate, SignedRevocationList};
use serde::{Deserialize, Serialize};

use crate::PackageError;
use crate::keys::key_id;

/// Format version of [`Certificate`] and [`RevocationList`].
pub const TRUST_FORMAT: u32 = 1;

/// Longest signer name in a certificate.
const MAX_NAME_LEN: usize = 128;
/// Longest revocation reason.
const MAX_REASON_LEN: usize = 512;
/// Most entries in a revocation list (a list is sent to every device).
pub const MAX_REVOKED: usize = 4096;

/// A root's statement that `signer_key` may sign packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// [`TRUST_FORMAT`].
    pub format: u32,
    /// Key id (base64 of the 32 public-key bytes) of the certified signer.
    pub signer_key: String,
    /// Human name of the signer (a person, a build machine), informational.
    pub name: String,
    /// Unix seconds from which the certificate is valid.
    pub not_before: i64,
    /// Unix seconds after which it is not.
    pub not_after: i64,
    /// Key id of the root that signs this certificate.
    pub root_key_id: String,
}

/// One revoked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    pub key_id: String,
    #[serde(default)]
    pub reason: String,
}

/// A root's list of revoked signer keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// [`TRUST_FORMAT`].
    pub format: u32,
    /// Key id of the root that signs this list.
    pub root_key_id: String,
    /// Grows by one with each list; a list never replaces one with a
    /// greater or equal sequence.
    pub sequence: u64,
    /// Unix seconds at signing (informational).
    pub issued_at: i64,
    pub revoked: Vec<Revoked>,
}

impl RevocationList {
    /// The entry revoking `key_id`, if any.
    pub fn find(&self, key_id: &str) -> Option<&Revoked> {
        self.revoked.iter().find(|entry| entry.key_id == key_id)
    }
}

/// Signs a certificate for `signer` with `root`, valid from `not_before` to
/// `not_after` (Unix seconds).
pub fn certify(
    root: &SigningKey,
    signer: &VerifyingKey,
    name: &str,
    not_before: i64,
    not_after: i64,
) -> Result<SignedCertificate, PackageError> {
    let document = Certificate {
        format: TRUST_FORMAT,
        signer_key: key_id(signer),
        name: name.to_owned(),
        not_before,
        not_after,
        root_key_id: key_id(&root.verifying_key()),
    };
    check_certificate_fields(&document)?;
    let json = to_json(&document);
    Ok(SignedCertificate {
        signature: BASE64.encode(root.sign(json.as_bytes()).to_bytes()),
        root: document.root_key_id,
        certificate: json,
    })
}

/// Signs a revocation list: `previous` (if any, already verified) plus
/// `key_id`, with the next sequence number. Revoking a key already on the
/// list replaces its reason.
pub fn revoke(
    root: &SigningKey,
    previous: Option<&RevocationList>,
    key_id_to_revoke: &str,
    reason: &str,
    now: i64,
) -> Result<(SignedRevocationList, RevocationList), PackageError> {
    let root_id = key_id(&root.verifying_key());
    decode_key_id(key_id_to_revoke).ok_or_else(|| {
        PackageError::BadRevocationList("key id is not a base64 Ed25519 key".into())
    })?;
    let mut revoked = previous
        .map(|list| list.revoked.clone())
        .unwrap_or_default();
    revoked.retain(|entry| entry.key_id != key_id_to_revoke);
    revoked.push(Revoked {
        key_id: key_id_to_revoke.to_owned(),
        reason: reason.to_owned(),
    });
    let sequence = match previous {
        Some(list) => list
            .sequence
            .checked_add(1)
            .ok_or_else(|| PackageError::BadRevocationList("sequence number exhausted".into()))?,
        None => 1,
    };
    let list = RevocationList {
        format: TRUST_FORMAT,
        root_key_id: root_id.clone(),
        sequence,
        issued_at: now,
        revoked,
    };
    check_list_fields(&list)?;
    let json = to_json(&list);
    Ok((
        SignedRevocationList {
            signature: BASE64.encode(root.sign(json.as_bytes()).to_bytes()),
            root: root_id,
            list: json,
        },
        list,
    ))
}

/// Who signed an accepted manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerKind {
    /// A key listed in the store's direct signers.
    Direct,
    /// A key certified by a pinned root.
    Certified { name: String, root_key_id: String },
}

/// An accepted manifest and how its signer was trusted.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub signer: SignerKind,
}

/// Pinned roots, directly trusted signers and the newest revocation list.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    roots: BTreeMap<String, VerifyingKey>,
    direct: BTreeMap<String, VerifyingKey>,
    revocations: Option<(SignedRevocationList, RevocationList)>,
}

impl TrustStore {
    /// A store trusting `roots` (certifying keys) and `direct` (signing keys).
    pub fn new(roots: &[VerifyingKey], direct: &[VerifyingKey]) -> Self {
        Self {
            roots: roots.iter().map(|key| (key_id(key), *key)).collect(),
            direct: direct.iter().map(|key| (key_id(key), *key)).collect(),
            revocations: None,
        }
    }

    /// A store of directly trusted signers only (the flat model).
    pub fn direct(keys: &[VerifyingKey]) -> Self {
        Self::new(&[], keys)
    }

    /// Whether the store trusts nothing at all.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty() && self.direct.is_empty()
    }

    pub fn roots(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.roots.values()
    }

    /// The current revocation list, if any: its envelope and its document.
    pub fn revocations(&self) -> Option<&(SignedRevocationList, RevocationList)> {
        self.revocations.as_ref()
    }

    /// Sequence of the current revocation list, 0 when there is none.
    pub fn revocation_sequence(&self) -> u64 {
        self.revocations
            .as_ref()
            .map_or(0, |(_, list)| list.sequence)
    }

    /// Checks a revocation list against the pinned roots without applying it.
    pub fn check_revocation_list(
        &self,
        signed: &SignedRevocationList,
    ) -> Result<RevocationList, PackageError> {
        let root = self
            .roots
            .get(&signed.root)
            .ok_or(PackageError::UntrustedRoot)?;
        verify_signature(root, signed.list.as_bytes(), &signed.signature)
            .map_err(|()| PackageError::BadRevocationList("root signature is not valid".into()))?;
        let list: RevocationList = serde_json::from_str(&signed.list)
            .map_err(|error| PackageError::BadRevocationList(error.to_string()))?;
        if list.root_key_id != signed.root {
            return Err(PackageError::BadRevocationList(
                "list names another root than the one that signed it".into(),
            ));
        }
        check_list_fields(&list)?;
        Ok(list)
    }

    /// Verifies `signed` and makes it the current list if its sequence is
    /// greater than the current one's. A bad list or one that is not newer
    /// is an error and leaves the store unchanged.
    pub fn apply_revocation_list(
        &mut self,
        signed: &SignedRevocationList,
    ) -> Result<&RevocationList, PackageError> {
        let list = self.check_revocation_list(signed)?;
        let current = self.revocation_sequence();
        if self.revocations.is_some() && list.sequence <= current {
            return Err(PackageError::StaleRevocationList {
                current,
                offered: list.sequence,
            });
        }
        let stored = self.revocations.insert((signed.clone(), list));
        Ok(&stored.1)
    }

    /// Why `key_id` is revoked, if it is.
    pub fn revoked(&self, key_id: &str) -> Option<&Revoked> {
        self.revocations
            .as_ref()
            .and_then(|(_, list)| list.find(key_id))
    }

    /// Accepts `signed` if its signer is trusted directly or certified by a
    /// pinned root (valid at `now`, Unix seconds), is not revoked, and its
    /// signature over the exact manifest bytes holds; returns the parsed,
    /// validated manifest.
    pub fn verify_manifest(
        &self,
        signed: &SignedManifest,
        now: i64,
    ) -> Result<Verified, PackageError> {
        if let Some(entry) = self.revoked(&signed.signer) {
            return Err(PackageError::RevokedSigner {
                key_id: entry.key_id.clone(),
                reason: entry.reason.clone(),
            });
        }
        let (key, kind) = if let Some(key) = self.direct.get(&signed.signer) {
            (*key, SignerKind::Direct)
        } else if let Some(certificate) = &signed.signer_certificate {
            let document = self.check_certificate(certificate, now)?;
            if document.signer_key != signed.signer {
                return Err(PackageError::BadCertificate(
                    "the certificate is for another key than the manifest's signer".into(),
                ));
            }
            let key = decode_key_id(&document.signer_key).ok_or_else(|| {
                PackageError::BadCertificate("signer_key is not an Ed25519 key".into())
            })?;
            (
                key,
                SignerKind::Certified {
                    name: document.name,
                    root_key_id: document.root_key_id,
                },
            )
        } else {
            return Err(PackageError::UntrustedSigner);
        };
        verify_signature(&key, signed.manifest.as_bytes(), &signed.signature)
            .map_err(|()| PackageError::BadSignature)?;
        Ok(Verified {
            manifest: Manifest::from_json(&signed.manifest)?,
            signer: kind,
        })
    }

    /// Checks a certificate's root, signature, fields and validity at `now`
    /// (not revocation of its key: see [`Self::verify_manifest`]).
    pub fn check_certificate(
        &self,
        signed: &SignedCertificate,
        now: i64,
    ) -> Result<Certificate, PackageError> {
        let root = self
            .roots
            .get(&signed.root)
            .ok_or(PackageError::UntrustedRoot)?;
        if self.revoked(&signed.root).is_some() {
            return Err(PackageError::UntrustedRoot);
        }
        verify_signature(root, signed.certificate.as_bytes(), &signed.signature)
            .map_err(|()| PackageError::BadCertificate("root signature is not valid".into()))?;
        let document: Certificate = serde_json::from_str(&signed.certificate)
            .map_err(|error| PackageError::BadCertificate(error.to_string()))?;
        if document.root_key_id != signed.root {
            return Err(PackageError::BadCertificate(
                "certificate names another root than the one that signed it".into(),
            ));
        }
        check_certificate_fields(&document)?;
        if now < document.not_before {
            return Err(PackageError::CertificateNotYetValid {
                not_before: document.not_before,
            });
        }
        if now > document.not_after {
            return Err(PackageError::CertificateExpired {
                not_after: document.not_after,
            });
        }
        Ok(document)
    }
}

/// Parses a certificate file's text (the JSON of a [`SignedCertificate`]).
pub fn parse_certificate(text: &str) -> Result<SignedCertificate, PackageError> {
    serde_json::from_str(text).map_err(|error| {
        PackageError::BadCertificate(format!("not a signer certificate file: {error}"))
    })
}

/// Parses a revocation list file's text (the JSON of a [`SignedRevocationList`]).
pub fn parse_revocation_list(text: &str) -> Result<SignedRevocationList, PackageError> {
    serde_json::from_str(text).map_err(|error| {
        PackageError::BadRevocationList(format!("not a revocation list file: {error}"))
    })
}

/// Reads the certificate document inside `signed` without checking its
/// signature (for tools that display or match it; never for trust).
pub fn peek_certificate(signed: &SignedCertificate) -> Result<Certificate, PackageError> {
    serde_json::from_str(&signed.certificate)
        .map_err(|error| PackageError::BadCertificate(error.to_string()))
}

/// Verifies a revocation list under `root` alone (the CLI checks the
/// `--previous` list it extends).
pub fn verify_revocation_list(
    root: &VerifyingKey,
    signed: &SignedRevocationList,
) -> Result<RevocationList, PackageError> {
    TrustStore::new(&[*root], &[]).check_revocation_list(signed)
}

fn check_certificate_fields(document: &Certificate) -> Result<(), PackageError> {
    let bad = |what: &str| Err(PackageError::BadCertificate(what.to_owned()));
    if document.format != TRUST_FORMAT {
        return bad("unsupported certificate format");
    }
    if decode_key_id(&document.signer_key).is_none() {
        return bad("signer_key is not an Ed25519 key");
    }
    if document.name.is_empty()
        || document.name.len() > MAX_NAME_LEN
        || document.name.chars().any(char::is_control)
    {
        return bad("name must be 1 to 128 printable characters");
    }
    if document.not_after < document.not_before {
        return bad("not_after is before not_before");
    }
    Ok(())
}

fn check_list_fields(list: &RevocationList) -> Result<(), PackageError> {
    let bad = |what: &str| Err(PackageError::BadRevocationList(what.to_owned()));
    if list.format != TRUST_FORMAT {
        return bad("unsupported revocation list format");
    }
    if list.sequence == 0 {
        return bad("sequence starts at 1");
    }
    if list.revoked.len() > MAX_REVOKED {
        return bad("too many revoked keys");
    }
    for entry in &list.revoked {
        if decode_key_id(&entry.key_id).is_none() {
            return bad("a revoked key id is not a base64 Ed25519 key");
        }
        if entry.reason.len() > MAX_REASON_LEN || entry.reason.chars().any(char::is_control) {
            return bad("a revocation reason is too long or has control characters");
        }
    }
    Ok(())
}

/// The key a key id names, if it is base64 of a valid Ed25519 point.
pub fn decode_key_id(id: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = BASE64.decode(id).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn verify_signature(key: &VerifyingKey, message: &[u8], signature: &str) -> Result<(), ()> {
    let bytes: [u8; 64] = BASE64
        .decode(signature)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(())?;
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .map_err(|_| ())
}

fn to_json(value: &impl Serialize) -> String {
    // Strings, integers and lists only: serialising cannot fail.
    serde_json::to_string(value).expect("a trust document always serialises to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::sign_manifest;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn manifest() -> Manifest {
        crate::sign::tests::sample_manifest()
    }

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rng())
    }

    /// A manifest signed by `signer`, carrying a certificate from `root`.
    fn certified(root: &SigningKey, signer: &SigningKey, from: i64, to: i64) -> SignedManifest {
        let mut signed = sign_manifest(&manifest(), signer);
        signed.signer_certificate = Some(Box::new(
            certify(root, &signer.verifying_key(), "build-1", from, to).unwrap(),
        ));
        signed
    }

    #[test]
    fn certified_signer_is_accepted_and_rotation_needs_no_change() {
        let root = key();
        let store = TrustStore::new(&[root.verifying_key()], &[]);
        for name in ["first", "second"] {
            let signer = key();
            let mut signed = sign_manifest(&manifest(), &signer);
            signed.signer_certificate = Some(Box::new(
                certify(&root, &signer.verifying_key(), name, NOW - DAY, NOW + DAY).unwrap(),
            ));
            let verified = store.verify_manifest(&signed, NOW).unwrap();
            assert_eq!(verified.manifest, manifest());
            assert_eq!(
                verified.signer,
                SignerKind::Certified {
                    name: name.into(),
                    root_key_id: key_id(&root.verifying_key())
                }
            );
        }
    }

    #[test]
    fn direct_signers_still_work_and_certificate_is_optional_on_the_wire() {
        let signer = key();
        let signed = sign_manifest(&manifest(), &signer);
        let json = serde_json::to_string(&signed).unwrap();
        assert!(!json.contains("signer_certificate"), "{json}");
        let store = TrustStore::direct(&[signer.verifying_key()]);
        assert_eq!(
            store.verify_manifest(&signed, NOW).unwrap().signer,
            SignerKind::Direct
        );
        assert!(matches!(
            TrustStore::default().verify_manifest(&signed, NOW),
            Err(PackageError::UntrustedSigner)
        ));
    }

    #[test]
    fn distinct_errors() {
        let root = key();
        let signer = key();
        let store = TrustStore::new(&[root.verifying_key()], &[]);

        // Unknown signer: no certificate, not direct.
        let bare = sign_manifest(&manifest(), &signer);
        assert!(matches!(
            store.verify_manifest(&bare, NOW),
            Err(PackageError::UntrustedSigner)
        ));
        // Another root.
        let foreign = certified(&key(), &signer, NOW - DAY, NOW + DAY);
        assert!(matches!(
            store.verify_manifest(&foreign, NOW),
            Err(PackageError::UntrustedRoot)
        ));
        // Expired and not yet valid.
        let old = certified(&root, &signer, NOW - 2 * DAY, NOW - DAY);
        assert!(matches!(
            store.verify_manifest(&old, NOW),
            Err(PackageError::CertificateExpired { .. })
        ));
        let early = certified(&root, &signer, NOW + DAY, NOW + 2 * DAY);
        assert!(matches!(
            store.verify_manifest(&early, NOW),
            Err(PackageError::CertificateNotYetValid { .. })
        ));
        // Tampered certificate (validity stretched after signing).
        let mut tampered = certified(&root, &signer, NOW - 2 * DAY, NOW - DAY);
        let cert = tampered.signer_certificate.as_mut().unwrap();
        cert.certificate = cert
            .certificate
            .replace(&(NOW - DAY).to_string(), &(NOW + DAY).to_string());
        assert!(matches!(
            store.verify_manifest(&tampered, NOW),
            Err(PackageError::BadCertificate(_))
        ));
        // A valid certificate for another key, attached to this signer's manifest.
        let mut swapped = sign_manifest(&manifest(), &signer);
        swapped.signer_certificate = Some(Box::new(
            certify(&root, &key().verifying_key(), "x", NOW - DAY, NOW + DAY).unwrap(),
        ));
        assert!(matches!(
            store.verify_manifest(&swapped, NOW),
            Err(PackageError::BadCertificate(_))
        ));
        // A good certificate, tampered manifest.
        let mut forged = certified(&root, &signer, NOW - DAY, NOW + DAY);
        forged.manifest = forged.manifest.replace("sensor-fw", "sensor-fx");
        assert!(matches!(
            store.verify_manifest(&forged, NOW),
            Err(PackageError::BadSignature)
        ));
        // The root's own key used as a certificate signer in place of the root signature.
        let mut resigned = certified(&root, &signer, NOW - DAY, NOW + DAY);
        let cert = resigned.signer_certificate.as_mut().unwrap();
        cert.signature = BASE64.encode(signer.sign(cert.certificate.as_bytes()).to_bytes());
        assert!(matches!(
            store.verify_manifest(&resigned, NOW),
            Err(PackageError::BadCertificate(_))
        ));
    }

    #[test]
    fn revocation_applies_to_certified_and_direct_keys_and_only_grows() {
        let root = key();
        let certified_signer = key();
        let direct_signer = key();
        let mut store = TrustStore::new(&[root.verifying_key()], &[direct_signer.verifying_key()]);
        let by_certified = certified(&root, &certified_signer, NOW - DAY, NOW + DAY);
        let by_direct = sign_manifest(&manifest(), &direct_signer);
        assert!(store.verify_manifest(&by_certified, NOW).is_ok());

        let (first, first_doc) = revoke(
            &root,
            None,
            &key_id(&certified_signer.verifying_key()),
            "laptop stolen",
            NOW,
        )
        .unwrap();
        assert_eq!(first_doc.sequence, 1);
        store.apply_revocation_list(&first).unwrap();
        match store.verify_manifest(&by_certified, NOW) {
            Err(PackageError::RevokedSigner { reason, .. }) => assert_eq!(reason, "laptop stolen"),
            other => panic!("{other:?}"),
        }
        assert!(store.verify_manifest(&by_direct, NOW).is_ok());

        let (second, second_doc) = revoke(
            &root,
            Some(&first_doc),
            &key_id(&direct_signer.verifying_key()),
            "",
            NOW,
        )
        .unwrap();
        assert_eq!(second_doc.sequence, 2);
        assert_eq!(second_doc.revoked.len(), 2);
        store.apply_revocation_list(&second).unwrap();
        assert!(matches!(
            store.verify_manifest(&by_direct, NOW),
            Err(PackageError::RevokedSigner { .. })
        ));

        // The older list (which did not name the direct key) is refused and
        // changes nothing; so is the same list again.
        for stale in [&first, &second] {
            assert!(matches!(
                store.apply_revocation_list(stale),
                Err(PackageError::StaleRevocationList { current: 2, .. })
            ));
        }
        assert_eq!(store.revocation_sequence(), 2);
        assert!(store.verify_manifest(&by_direct, NOW).is_err());
    }

    #[test]
    fn bad_revocation_lists_are_refused_without_change() {
        let root = key();
        let mut store = TrustStore::new(&[root.verifying_key()], &[]);
        let victim = key_id(&key().verifying_key());
        let (good, _) = revoke(&root, None, &victim, "r", NOW).unwrap();
        let (foreign, _) = revoke(&key(), None, &victim, "r", NOW).unwrap();
        assert!(matches!(
            store.apply_revocation_list(&foreign),
            Err(PackageError::UntrustedRoot)
        ));
        let mut tampered = good.clone();
        tampered.list = tampered.list.replace("\"sequence\":1", "\"sequence\":9");
        assert!(matches!(
            store.apply_revocation_list(&tampered),
            Err(PackageError::BadRevocationList(_))
        ));
        assert_eq!(store.revocation_sequence(), 0);
        assert!(store.revocations().is_none());
        assert!(revoke(&root, None, "not a key", "", NOW).is_err());
        assert!(revoke(&root, None, &victim, "line\nbreak", NOW).is_err());
        store.apply_revocation_list(&good).unwrap();
        assert!(store.revoked(&victim).is_some());
    }

    #[test]
    fn certify_refuses_bad_fields() {
        let root = key();
        let signer = key().verifying_key();
        assert!(certify(&root, &signer, "", 0, 1).is_err());
        assert!(certify(&root, &signer, "a\u{7}", 0, 1).is_err());
        assert!(certify(&root, &signer, "ok", 10, 1).is_err());
        assert!(certify(&root, &signer, &"n".repeat(200), 0, 1).is_err());
        let signed = certify(&root, &signer, "ok", 0, 1).unwrap();
        assert_eq!(
            peek_certificate(&signed).unwrap().signer_key,
            key_id(&signer)
        );
        assert_eq!(
            parse_certificate(&serde_json::to_string(&signed).unwrap()).unwrap(),
            signed
        );
        assert!(parse_certificate("{").is_err());
        assert!(parse_revocation_list("[]").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Arbitrary certificates, signatures and key ids are errors, never panics.
        #[test]
        fn garbage_never_panics_or_verifies(
            certificate in ".{0,300}",
            root_field in ".{0,60}",
            signature in ".{0,100}",
            list in ".{0,300}",
            signer_field in ".{0,60}",
        ) {
            let root = SigningKey::from_bytes(&[9; 32]);
            let signer = SigningKey::from_bytes(&[3; 32]);
            let mut store = TrustStore::new(&[root.verifying_key()], &[]);
            let mut signed = sign_manifest(&manifest(), &signer);
            signed.signer_certificate = Some(Box::new(SignedCertificate {
                certificate: certificate.clone(),
                root: root_field.clone(),
                signature: signature.clone(),
            }));
            prop_assert!(store.verify_manifest(&signed, NOW).is_err());
            // The real root id with garbage around it.
            signed.signer_certificate = Some(Box::new(SignedCertificate {
                certificate,
                root: key_id(&root.verifying_key()),
                signature: signature.clone(),
            }));
            prop_assert!(store.verify_manifest(&signed, NOW).is_err());
            signed.signer = signer_field;
            prop_assert!(store.verify_manifest(&signed, NOW).is_err());
            let bad_list = SignedRevocationList {
                list,
                root: key_id(&root.verifying_key()),
                signature,
            };
            prop_assert!(store.apply_revocation_list(&bad_list).is_err());
            prop_assert_eq!(store.revocation_sequence(), 0);
            let _ = parse_certificate(&root_field);
            let _ = parse_revocation_list(&root_field);
        }

        /// A correctly signed certificate whose validity window is random
        /// verifies exactly when `now` lies inside it.
        #[test]
        fn validity_window_is_respected(from in -1_000i64..1_000, len in 0i64..1_000, now in -2_000i64..2_000) {
            let root = SigningKey::from_bytes(&[9; 32]);
            let signer = SigningKey::from_bytes(&[3; 32]);
            let store = TrustStore::new(&[root.verifying_key()], &[]);
            let signed = certified(&root, &signer, from, from + len);
            let inside = now >= from && now <= from + len;
            prop_assert_eq!(store.verify_manifest(&signed, now).is_ok(), inside);
        }
    }
}
