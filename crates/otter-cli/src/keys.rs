//! The offline root-key commands (`otter keys create-root | certify |
//! revoke`) and the online `otter signers revocations ...`.
//!
//! Everything but `signers` runs without a server: a root key stays on a
//! machine that never talks to one. Output files are written with
//! create-new semantics (a certificate or list is never overwritten in
//! place) and hold the JSON envelopes of `otter_proto::trust`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use otter_package::keys::{key_id, read_signing_key, read_verifying_key};
use otter_package::trust;
use otter_proto::trust::{RevocationListInfo, SignedCertificate, SignedRevocationList};

use crate::cli::{KeysCommand, RevocationsCommand, SignersCommand};
use crate::client::ApiClient;

/// A certificate or revocation list file is small; cap what we read.
const MAX_TRUST_FILE: u64 = 1 << 20;

pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate { out } => {
            let key = otter_package::keys::generate_key_pair(&out)
                .with_context(|| format!("cannot create the key pair {}", out.display()))?;
            println!("wrote {} and {}.pub", out.display(), out.display());
            println!("key id {}", key_id(&key));
        }
        KeysCommand::CreateRoot { path } => {
            let key = otter_package::keys::generate_key_pair(&path)
                .with_context(|| format!("cannot create the root key {}", path.display()))?;
            println!(
                "wrote root key {} and {}.pub",
                path.display(),
                path.display()
            );
            println!("root key id {}", key_id(&key));
            println!(
                "keep {} offline; give {}.pub to the server (--trusted-root) and devices",
                path.display(),
                path.display()
            );
        }
        KeysCommand::Certify {
            root,
            signer,
            name,
            valid,
            out,
        } => {
            let root_key = read_root(&root)?;
            let signer_key = read_verifying_key(&signer)
                .with_context(|| format!("cannot read the signer key {}", signer.display()))?;
            let now = unix_now();
            let seconds = i64::try_from(valid.as_secs()).context("--valid is too long")?;
            let not_after = now.checked_add(seconds).context("--valid is too long")?;
            let certificate = trust::certify(&root_key, &signer_key, &name, now, not_after)
                .context("cannot certify the signer")?;
            write_new_json(&out, &certificate)?;
            println!(
                "certified {} as {name:?} until {} -> {}",
                key_id(&signer_key),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after.max(0) as u64)
                ),
                out.display()
            );
        }
        KeysCommand::Revoke {
            root,
            key_id: revoked,
            reason,
            previous,
            out,
        } => {
            let root_key = read_root(&root)?;
            let previous_list = previous
                .as_deref()
                .map(|path| {
                    let signed = trust::parse_revocation_list(&read_small(path)?)?;
                    trust::verify_revocation_list(&root_key.verifying_key(), &signed).with_context(
                        || format!("{} is not a list signed by this root", path.display()),
                    )
                })
                .transpose()?;
            let (signed, list) = trust::revoke(
                &root_key,
                previous_list.as_ref(),
                &revoked,
                &reason,
                unix_now(),
            )
            .context("cannot revoke")?;
            write_new_json(&out, &signed)?;
            println!(
                "revocation list sequence {} ({} revoked key(s)) -> {}",
                list.sequence,
                list.revoked.len(),
                out.display()
            );
        }
    }
    Ok(())
}

pub async fn remote(client: &ApiClient, command: SignersCommand) -> anyhow::Result<()> {
    match command {
        SignersCommand::Revocations(RevocationsCommand::Publish { list }) => {
            let signed = trust::parse_revocation_list(&read_small(&list)?)?;
            let info: RevocationListInfo = client
                .put_json("/api/v1/signer-revocations", &signed)
                .await?;
            println!(
                "published revocation list sequence {} ({} revoked key(s))",
                info.sequence,
                info.revoked.len()
            );
        }
        SignersCommand::Revocations(RevocationsCommand::Show) => {
            let signed: SignedRevocationList = client.get("/api/v1/signer-revocations").await?;
            crate::output::json(&signed)?;
        }
    }
    Ok(())
}

/// Reads a certificate file for `otter package build` and checks that it
/// certifies `key`.
pub fn read_certificate_for(path: &Path, key: &SigningKey) -> anyhow::Result<SignedCertificate> {
    let signed = trust::parse_certificate(&read_small(path)?)
        .with_context(|| format!("cannot read the signer certificate {}", path.display()))?;
    let document = trust::peek_certificate(&signed)?;
    if document.signer_key != key_id(&key.verifying_key()) {
        bail!(
            "{} certifies key {}, not the signing key {}",
            path.display(),
            document.signer_key,
            key_id(&key.verifying_key())
        );
    }
    Ok(signed)
}

fn read_root(path: &Path) -> anyhow::Result<SigningKey> {
    read_signing_key(path).with_context(|| format!("cannot read the root key {}", path.display()))
}

fn read_small(path: &Path) -> anyhow::Result<String> {
    crate::commands::read_small_text_file(path, MAX_TRUST_FILE)
}

fn write_new_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}
