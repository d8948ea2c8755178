//! The signing-key hierarchy as a device and the server read it: a signed
//! manifest carrying a signer certificate (`TrustStore::verify_manifest`),
//! a root-signed revocation list (`apply_revocation_list`), and arbitrary
//! text signed by the pinned root as a certificate or list document.
//!
//! Properties:
//! - nothing panics;
//! - a manifest that verifies through a certificate names that
//!   certificate's key as its signer, and its signer is not revoked;
//! - a revocation list that applies names the pinned root, and applying it
//!   again is refused as stale without changing the store;
//! - root-signed text is a certificate (or list) exactly when it parses as
//!   one and passes the field checks: the signature check neither loses a
//!   valid document nor lets an unsigned one through.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use libfuzzer_sys::fuzz_target;
use otter_fuzz_support::{trusted_key, untrusted_key};
use otter_package::PackageError;
use otter_package::keys::key_id;
use otter_package::trust::{SignerKind, TrustStore};
use otter_proto::manifest::SignedManifest;
use otter_proto::messages::decode;
use otter_proto::trust::{SignedCertificate, SignedRevocationList};

/// 2026-01-01, inside the sample certificate's validity.
const NOW: i64 = 1_767_225_600;

fuzz_target!(|data: &[u8]| {
    let root = trusted_key();
    let root_id = key_id(&root.verifying_key());
    let mut store = TrustStore::new(&[root.verifying_key()], &[]);

    if let Ok(signed) = decode::<SignedRevocationList>(data)
        && let Ok(list) = store.apply_revocation_list(&signed)
    {
        assert_eq!(list.root_key_id, root_id);
        let sequence = list.sequence;
        assert!(matches!(
            store.apply_revocation_list(&signed),
            Err(PackageError::StaleRevocationList { .. })
        ));
        assert_eq!(store.revocation_sequence(), sequence);
    }

    if let Ok(signed) = decode::<SignedManifest>(data)
        && let Ok(verified) = store.verify_manifest(&signed, NOW)
    {
        assert!(store.revoked(&signed.signer).is_none());
        match verified.signer {
            SignerKind::Certified { root_key_id, .. } => assert_eq!(root_key_id, root_id),
            SignerKind::Direct => panic!("this store trusts no signer directly"),
        }
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let signature = BASE64.encode(root.sign(text.as_bytes()).to_bytes());
    let certificate = SignedCertificate {
        certificate: text.to_owned(),
        root: root_id.clone(),
        signature: signature.clone(),
    };
    let _ = store.check_certificate(&certificate, NOW);
    let list = SignedRevocationList {
        list: text.to_owned(),
        root: root_id.clone(),
        signature,
    };
    let checked = store.check_revocation_list(&list);
    // The same text signed by another key never passes for the root's.
    let forged = SignedRevocationList {
        signature: BASE64.encode(untrusted_key().sign(text.as_bytes()).to_bytes()),
        ..list
    };
    assert!(store.check_revocation_list(&forged).is_err());
    if let Ok(list) = checked {
        assert_eq!(list.root_key_id, root_id);
    }
});
