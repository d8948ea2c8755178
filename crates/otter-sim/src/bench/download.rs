//! Otter's device endpoint measured the way the nginx baseline measures
//! nginx (`crate::baselines::https_download`, same client loop, same
//! concurrency, same file): a fresh server, one enrolled device, one package
//! whose artifact is the file, a deployment to that device, and the
//! device's link fetched by a poll of the device endpoint. The device never
//! reports, so its link stays valid while it is downloaded `requests` times
//! with the device's certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use otter_agent::poll::{PollAnswer, PollClient};
use otter_agent::tls::DeviceTls;
use otter_proto::messages::{Mode, Registration};

use super::HARDWARE;
use super::server::{ServerLaunch, ServerProcess};
use crate::api::OperatorClient;
use crate::baselines::{DownloadBaseline, https_download};

/// What the download comparison measured.
#[derive(Debug, Clone)]
pub struct DownloadRun {
    /// The artifact file, for the nginx side.
    pub artifact: PathBuf,
    pub otter: DownloadBaseline,
}

/// Serves a package of `payload_bytes` random bytes from a fresh server and
/// downloads its artifact `requests` times at `concurrency`.
pub async fn otter_download(
    launch: &ServerLaunch,
    signing_key: &ed25519_dalek::SigningKey,
    payload_bytes: usize,
    concurrency: usize,
    requests: usize,
    work_dir: &Path,
) -> anyhow::Result<DownloadRun> {
    std::fs::create_dir_all(work_dir)?;
    let server = ServerProcess::start(launch)?;
    let client = OperatorClient::new(&server.api_url(), &server.token)?;
    let tag = "bench-download";
    let enrolled = client
        .enroll_batch(crate::enroll_request("dl", 1, tag, HARDWARE)?)
        .await?;
    let Some(device) = enrolled.into_iter().next() else {
        bail!("the server enrolled no device");
    };
    let payload = crate::package::random_payload(payload_bytes);
    let package = crate::package::build(
        signing_key,
        tag,
        &semver::Version::new(1, 0, 0),
        HARDWARE,
        &payload,
        work_dir,
    )?;
    drop(payload);
    let release = client.upload_release(package.bytes.clone()).await?;
    let artifact = work_dir.join("artifact.bin");
    let artifact_size = usize::try_from(release.artifact_size)?;
    let tail = package
        .bytes
        .len()
        .checked_sub(artifact_size)
        .and_then(|start| package.bytes.get(start..))
        .context("the package is shorter than its artifact")?;
    std::fs::write(&artifact, tail)?;

    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = work_dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let tls = DeviceTls::load(
        &write("ca.crt", &device.ca_pem)?,
        &write("device.crt", &device.certificate_pem)?,
        &write("device.key", &device.private_key_pem)?,
    )?;
    let poll = PollClient::new(&device.device_url, tls.https_config()?)?;
    let registration = Registration {
        protocol: otter_proto::PROTOCOL_VERSION,
        hardware: HARDWARE.to_owned(),
        installed: Default::default(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: Mode::Pull,
        capabilities: vec!["range-resume".to_owned()],
        // The server sends a release only to a device with a key.
        encryption_key: Some(
            otter_package::wrap::DeviceKey::generate()
                .public_key()
                .to_base64(),
        ),
    };
    poll.poll(&registration, None).await?;
    client
        .create_deployment(&release.id, &format!("device:{}", device.device_id))
        .await?;
    let link = match poll.poll(&registration, None).await? {
        PollAnswer::Fresh {
            update: Some(update),
            ..
        } => update.link,
        _ => bail!("the poll after the deployment brought no link"),
    };
    let measured = https_download(vec![link; requests], tls.https_config()?, concurrency).await;
    let stopped = server.stop();
    let otter = measured?;
    stopped?;
    Ok(DownloadRun { artifact, otter })
}
