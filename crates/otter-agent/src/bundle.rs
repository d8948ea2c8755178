//! The device bundle: the folder an enrolment leaves behind, ready for
//! `otter-agent --config DIR/agent.toml`.
//!
//! | file          | what                                              |
//! |---------------|---------------------------------------------------|
//! | `device.key`  | the device's private key, mode 0600               |
//! | `device.crt`  | its certificate, CN = device id                   |
//! | `ca.crt`      | the device CA, the only root the agent trusts     |
//! | `signers/`    | `signer-N.pub`: the trusted package signers       |
//! | `installed/`  | the `file` installer's target                     |
//! | `agent.toml`  | a configuration whose paths all live in the folder |
//!
//! Both enrolment paths write it through this module: `otter device enroll`
//! (server-generated key) and `otter-agent enrol` (key generated on the
//! device, CSR). The key is written first and on its own
//! ([`write_private_key`]), so a device never loses a key the server may
//! already have certified; [`ensure_free`] refuses a folder that already
//! holds a bundle, so nothing is ever overwritten.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use otter_proto::topics::DeviceId;

/// File name of the private key inside a bundle.
pub const PRIVATE_KEY_FILE: &str = "device.key";

/// What a bundle holds besides the private key.
#[derive(Debug, Clone)]
pub struct Bundle<'a> {
    pub device_id: &'a DeviceId,
    pub hardware: &'a str,
    pub certificate_pem: &'a str,
    pub ca_pem: &'a str,
    pub trusted_signers: &'a [String],
    /// PEM of the offline roots the server trusts (`roots/root-N.pub`).
    pub trusted_roots: &'a [String],
    pub mqtt_url: &'a str,
    pub device_url: &'a str,
}

/// Refuses a folder that already holds an enrolled bundle (a certificate or
/// an `agent.toml`); with `allow_key`, an existing `device.key` alone (left
/// by an enrolment whose request failed) is accepted.
pub fn ensure_free(out: &Path, allow_key: bool) -> anyhow::Result<()> {
    let mut taken = vec!["device.crt", "agent.toml"];
    if !allow_key {
        taken.push(PRIVATE_KEY_FILE);
    }
    if taken.iter().any(|name| out.join(name).exists()) {
        bail!(
            "{} already holds a device bundle; choose another folder",
            out.display()
        );
    }
    Ok(())
}

/// Writes `DIR/device.key` (mode 0600, synced), creating the folder; fails
/// if the file exists.
pub fn write_private_key(out: &Path, pem: &str) -> anyhow::Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join(PRIVATE_KEY_FILE);
    write_private(&path, pem.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes everything but the key: certificate, CA, signers and `agent.toml`.
pub fn write_bundle(out: &Path, bundle: &Bundle<'_>) -> anyhow::Result<()> {
    fs::create_dir_all(out.join("signers"))?;
    fs::create_dir_all(out.join("installed"))?;
    fs::write(out.join("device.crt"), bundle.certificate_pem)?;
    fs::write(out.join("ca.crt"), bundle.ca_pem)?;
    let mut signer_files = Vec::new();
    for (index, pem) in bundle.trusted_signers.iter().enumerate() {
        let name = format!("signers/signer-{}.pub", index + 1);
        fs::write(out.join(&name), pem)?;
        signer_files.push(name);
    }
    let signers = signer_files
        .iter()
        .map(|s| toml_string(s))
        .collect::<Vec<_>>()
        .join(", ");
    let mut root_files = Vec::new();
    if !bundle.trusted_roots.is_empty() {
        fs::create_dir_all(out.join("roots"))?;
    }
    for (index, pem) in bundle.trusted_roots.iter().enumerate() {
        let name = format!("roots/root-{}.pub", index + 1);
        fs::write(out.join(&name), pem)?;
        root_files.push(name);
    }
    let roots = root_files
        .iter()
        .map(|s| toml_string(s))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"# Otter agent configuration, written at enrolment.
# Relative paths are relative to this file's folder.
device_id = {id}
hardware = {hardware}
# "push-pull" (MQTT notification, HTTPS download), "pull" (HTTPS polling only)
# or "push".
mode = "push-pull"
# Pull mode: time between two polls of device_url (each one ± 10 % jitter).
poll_interval = "30s"
# Push-pull: a safety-net poll this often picks up a missed notification;
# "0s" disables it.
reconcile_interval = "6h"
mqtt_url = {mqtt}
device_url = {device}
ca = "ca.crt"
certificate = "device.crt"
private_key = "device.key"
trusted_signers = [{signers}]
# Offline root keys: packages by any signer they certified are accepted.
trusted_roots = [{roots}]
state_dir = "state"
landing_zone = "landing"

[safe_state]
# A command whose exit status 0 means "safe to install now"; empty = always safe.
command = []
initial_backoff = "1s"
max_backoff = "60s"
deadline = "24h"

[install]
# "file": the payload replaces installed/<package name> atomically (previous kept).
handler = "file"
target_dir = "installed"
command = []
timeout = "10m"

[download]
max_attempts = 8
initial_backoff = "1s"
max_backoff = "60s"
"#,
        id = toml_string(bundle.device_id.as_str()),
        hardware = toml_string(bundle.hardware),
        mqtt = toml_string(bundle.mqtt_url),
        device = toml_string(bundle.device_url),
    );
    // Written last: its presence marks a complete bundle.
    fs::write(out.join("agent.toml"), config)?;
    Ok(())
}

fn toml_string(value: &str) -> String {
    // serde_json's string escaping is valid TOML basic-string escaping for
    // the characters that can occur here.
    serde_json::to_string(value).unwrap_or_default()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
