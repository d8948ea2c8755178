//! Ed25519 key files.
//!
//! A publisher's private key is stored as PKCS#8 PEM (`BEGIN PRIVATE KEY`),
//! readable by its owner only (mode 0600); the public key next to it, in a
//! file with `.pub` appended to the name, as SPKI PEM (`BEGIN PUBLIC KEY`), so
//! both open with standard tools (`openssl pkey -in key`). A key is named in
//! manifests by its [`key_id`]: standard base64 of the 32 public-key bytes.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::PackageError;

/// A PEM key file is a few hundred bytes; anything much larger is not one.
const MAX_KEY_FILE_SIZE: u64 = 16 * 1024;

/// Generates a key pair, writes the private key to `path` (mode 0600) and the
/// public key to `path` + `.pub`, and returns the public key.
///
/// Never overwrites: if either file exists, nothing is written and a
/// [`PackageError::KeyFile`] is returned.
pub fn generate_key_pair(path: &Path) -> Result<VerifyingKey, PackageError> {
    let public_path = public_key_path(path);
    if public_path.exists() {
        return Err(PackageError::KeyFile(format!(
            "{} already exists, not overwriting",
            public_path.display()
        )));
    }

    let signing_key = SigningKey::generate(&mut rand::rng());
    let private_pem = signing_key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| PackageError::KeyFile(format!("cannot encode private key: {error}")))?;
    let verifying_key = signing_key.verifying_key();
    let public_pem = verifying_key_pem(&verifying_key);

    write_new_file(path, private_pem.as_bytes(), 0o600)?;
    if let Err(error) = write_new_file(&public_path, public_pem.as_bytes(), 0o644) {
        // Leave no half pair behind: the private key was created by us above.
        let _ = fs::remove_file(path);
        return Err(error);
    }
    Ok(verifying_key)
}

/// Reads a PKCS#8 PEM Ed25519 private key.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, PackageError> {
    let pem = read_key_file(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|error| {
        PackageError::KeyFile(format!(
            "{} is not an Ed25519 PKCS#8 PEM private key: {error}",
            path.display()
        ))
    })
}

/// Reads an SPKI PEM Ed25519 public key.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, PackageError> {
    let pem = read_key_file(path)?;
    parse_verifying_key_pem(&pem).map_err(|error| match error {
        PackageError::KeyFile(message) => {
            PackageError::KeyFile(format!("{}: {message}", path.display()))
        }
        other => other,
    })
}

/// Parses an SPKI PEM Ed25519 public key (e.g. one pasted into a config).
pub fn parse_verifying_key_pem(pem: &str) -> Result<VerifyingKey, PackageError> {
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|error| {
        PackageError::KeyFile(format!("not an Ed25519 SPKI PEM public key: {error}"))
    })
}

/// The SPKI PEM text of a public key, LF line endings.
pub fn verifying_key_pem(key: &VerifyingKey) -> String {
    // Encoding 32 bytes into a fixed SPKI structure cannot fail; the Result
    // only exists for key types whose encoding can.
    key.to_public_key_pem(LineEnding::LF)
        .expect("an Ed25519 public key always encodes as SPKI PEM")
}

/// The key id used in [`otter_proto::manifest::SignedManifest::signer`]:
/// standard, padded base64 of the 32 public-key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    BASE64.encode(key.as_bytes())
}

/// `path` with `.pub` appended to its full file name (`key` -> `key.pub`,
/// `key.pem` -> `key.pem.pub`).
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".pub");
    PathBuf::from(name)
}

pub(crate) fn read_key_file(path: &Path) -> Result<String, PackageError> {
    let file = File::open(path).map_err(|error| {
        PackageError::KeyFile(format!("cannot open {}: {error}", path.display()))
    })?;
    let mut text = String::new();
    // One byte over the cap tells a too-large file from one exactly at it.
    file.take(MAX_KEY_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|error| {
            PackageError::KeyFile(format!("cannot read {}: {error}", path.display()))
        })?;
    if text.len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(PackageError::KeyFile(format!(
            "{} is larger than {MAX_KEY_FILE_SIZE} bytes, not a key file",
            path.display()
        )));
    }
    Ok(text)
}

pub(crate) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PackageError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            PackageError::KeyFile(format!(
                "{} already exists, not overwriting",
                path.display()
            ))
        } else {
            PackageError::KeyFile(format!("cannot create {}: {error}", path.display()))
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|error| PackageError::KeyFile(format!("cannot write {}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, Verifier};

    #[test]
    fn generate_then_read_back_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        let generated = generate_key_pair(&path).unwrap();

        let private_text = fs::read_to_string(&path).unwrap();
        assert!(private_text.starts_with("-----BEGIN PRIVATE KEY-----"));
        let public_path = dir.path().join("publisher.key.pub");
        let public_text = fs::read_to_string(&public_path).unwrap();
        assert!(public_text.starts_with("-----BEGIN PUBLIC KEY-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let signing = read_signing_key(&path).unwrap();
        let verifying = read_verifying_key(&public_path).unwrap();
        assert_eq!(signing.verifying_key(), generated);
        assert_eq!(verifying, generated);
        assert_eq!(
            parse_verifying_key_pem(&verifying_key_pem(&generated)).unwrap(),
            generated
        );

        let signature = signing.sign(b"hello");
        assert!(verifying.verify(b"hello", &signature).is_ok());
        assert!(verifying.verify(b"hellO", &signature).is_err());

        let id = key_id(&generated);
        assert_eq!(id.len(), 44);
        assert_eq!(BASE64.decode(&id).unwrap(), generated.as_bytes());
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate_key_pair(&path).unwrap();
        let before = fs::read(&path).unwrap();
        assert!(matches!(
            generate_key_pair(&path),
            Err(PackageError::KeyFile(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), before);

        // Only the public half exists: still refused, and no private key appears.
        let other = dir.path().join("other");
        fs::write(public_key_path(&other), "x").unwrap();
        assert!(matches!(
            generate_key_pair(&other),
            Err(PackageError::KeyFile(_))
        ));
        assert!(!other.exists());
    }

    #[test]
    fn corrupt_or_missing_files_are_key_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate_key_pair(&path).unwrap();

        let mut pem = fs::read_to_string(&path).unwrap();
        pem.replace_range(40..44, "!!!!");
        let corrupt = dir.path().join("corrupt");
        fs::write(&corrupt, &pem).unwrap();
        assert!(matches!(
            read_signing_key(&corrupt),
            Err(PackageError::KeyFile(_))
        ));
        assert!(matches!(
            read_verifying_key(&corrupt),
            Err(PackageError::KeyFile(_))
        ));

        // A private key where a public key is expected, and the reverse.
        assert!(matches!(
            read_verifying_key(&path),
            Err(PackageError::KeyFile(_))
        ));
        assert!(matches!(
            read_signing_key(&public_key_path(&path)),
            Err(PackageError::KeyFile(_))
        ));
        assert!(matches!(
            read_signing_key(&dir.path().join("missing")),
            Err(PackageError::KeyFile(_))
        ));
        let huge = dir.path().join("huge");
        fs::write(&huge, vec![b'a'; 20_000]).unwrap();
        assert!(matches!(
            read_signing_key(&huge),
            Err(PackageError::KeyFile(_))
        ));
        assert!(matches!(
            parse_verifying_key_pem("garbage"),
            Err(PackageError::KeyFile(_))
        ));
    }
}
