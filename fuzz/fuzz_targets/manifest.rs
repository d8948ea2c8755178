//! The signed manifest, as a device reads it from a notification, offer or
//! job file and the server from an upload: `SignedManifest` JSON,
//! `verify_manifest`, `Manifest::from_json`; and a signer's SPKI PEM public
//! key (the agent's `trusted_signers` files, the server's signer keys).
//!
//! Properties:
//! - a manifest that parses is valid and survives serialise → parse;
//! - any text signed by the trusted key verifies to exactly what the parser
//!   makes of it: the signature check neither loses a valid manifest nor
//!   lets an invalid one through;
//! - the same text with one signature bit flipped, signed by another key,
//!   or claimed for the trusted key with another key's signature, never
//!   verifies;
//! - a `SignedManifest` that verifies names the trusted signer;
//! - a PEM key that parses prints to a PEM that parses to the same key.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use libfuzzer_sys::fuzz_target;
use otter_fuzz_support::{sign_text, trusted_key, untrusted_key};
use otter_package::PackageError;
use otter_package::keys::{key_id, parse_verifying_key_pem, verifying_key_pem};
use otter_package::sign::verify_manifest;
use otter_proto::manifest::{Manifest, SignedManifest};
use otter_proto::messages::decode;

fuzz_target!(|data: &[u8]| {
    let trusted = [trusted_key().verifying_key()];

    if let Ok(signed) = decode::<SignedManifest>(data)
        && let Ok(manifest) = verify_manifest(&signed, &trusted)
    {
        assert_eq!(signed.signer, key_id(&trusted[0]));
        assert_eq!(Manifest::from_json(&signed.manifest), Ok(manifest));
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let parsed = Manifest::from_json(text);
    if let Ok(manifest) = &parsed {
        assert_eq!(manifest.validate(), Ok(()));
        let json = serde_json::to_string(manifest).expect("a manifest serialises");
        assert_eq!(Manifest::from_json(&json).as_ref(), Ok(manifest));
    }

    let signed = sign_text(text, &trusted_key());
    match (&parsed, verify_manifest(&signed, &trusted)) {
        (Ok(expected), Ok(verified)) => assert_eq!(&verified, expected),
        (Err(expected), Err(PackageError::Manifest(error))) => assert_eq!(&error, expected),
        (parsed, verified) => {
            panic!("signed text verified to {verified:?}, but the parser gives {parsed:?}")
        }
    }

    let mut signature = BASE64
        .decode(&signed.signature)
        .expect("sign_text writes base64");
    let bit = data.len() % (signature.len() * 8);
    signature[bit / 8] ^= 1 << (bit % 8);
    let flipped = SignedManifest {
        signature: BASE64.encode(&signature),
        ..signed.clone()
    };
    assert!(matches!(
        verify_manifest(&flipped, &trusted),
        Err(PackageError::BadSignature)
    ));

    let foreign = sign_text(text, &untrusted_key());
    assert!(matches!(
        verify_manifest(&foreign, &trusted),
        Err(PackageError::UntrustedSigner)
    ));
    let impostor = SignedManifest {
        signer: signed.signer.clone(),
        ..foreign
    };
    assert!(matches!(
        verify_manifest(&impostor, &trusted),
        Err(PackageError::BadSignature)
    ));

    if let Ok(key) = parse_verifying_key_pem(text) {
        let pem = verifying_key_pem(&key);
        assert_eq!(parse_verifying_key_pem(&pem).ok(), Some(key));
    }
});
