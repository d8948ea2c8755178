//! What each command does. Offline commands (`keys`, `package`) use
//! `otter-package` directly; the others go through [`ApiClient`].

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use otter_proto::api::{
    AuditEntry, AuditVerification, CreateDeployment, DeploymentInfo, DeploymentStatus, DeviceInfo,
    EnrollRequest, EnrollResponse, ReleaseInfo, Target,
};
use otter_proto::api::{CreateEnrolmentToken, CreatedEnrolmentToken, EnrolmentTokenInfo};
use otter_proto::api::{CreateToken, CreatedToken, TokenInfo};
use otter_proto::topics::DeviceId;

use crate::cli::{
    AuditCommand, Cli, Command, DeployCommand, DeviceCommand, DevicesCommand, PackageCommand,
    ReleaseCommand,
};
use crate::cli::{DeviceTokenCommand, TokenCommand};
use crate::client::ApiClient;
use crate::output;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keys(command) => crate::keys::run(command)?,
        Command::Package(command) => package(command)?,
        command => return remote(&ApiClient::new(&cli.global)?, command).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn package(command: PackageCommand) -> anyhow::Result<()> {
    match command {
        PackageCommand::Build {
            key,
            name,
            version,
            kind,
            hardware,
            level,
            allow_downgrade,
            signer_cert,
            out,
            input,
        } => {
            let signing_key = otter_package::keys::read_signing_key(&key)
                .with_context(|| format!("cannot read the signing key {}", key.display()))?;
            let mut source = fs::File::open(&input)
                .with_context(|| format!("cannot open the input {}", input.display()))?;
            let options = otter_package::format::BuildOptions {
                name,
                version,
                kind,
                hardware,
                zstd_level: level,
                chunk_size: 64 * 1024,
                allow_downgrade,
                signer_certificate: signer_cert
                    .as_deref()
                    .map(|path| crate::keys::read_certificate_for(path, &signing_key))
                    .transpose()?,
            };
            // Write next to the destination and rename, so a failed build
            // never leaves a half-written package under the final name.
            let folder = parent_folder(&out);
            let mut temporary = tempfile::NamedTempFile::new_in(folder)
                .with_context(|| format!("cannot write in {}", folder.display()))?;
            let signed = otter_package::format::build_package(
                &mut source,
                temporary.as_file_mut(),
                &signing_key,
                &options,
                folder,
            )
            .context("cannot build the package")?;
            temporary.as_file_mut().sync_all()?;
            temporary
                .persist(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let manifest = otter_proto::manifest::Manifest::from_json(&signed.manifest)?;
            println!(
                "built {} ({} {}, payload {} bytes, artifact {} bytes) -> {}",
                manifest.release_id(),
                manifest.kind.as_str(),
                manifest.hardware.join(","),
                manifest.payload.size,
                manifest.artifact.size,
                out.display()
            );
        }
        PackageCommand::Inspect {
            trusted_signers,
            trusted_roots,
            json,
            package,
        } => {
            let checked = !trusted_signers.is_empty() || !trusted_roots.is_empty();
            let mut file = fs::File::open(&package)
                .with_context(|| format!("cannot open {}", package.display()))?;
            let header = otter_package::format::read_header(&mut file)
                .with_context(|| format!("{} is not an Otter package", package.display()))?;
            let manifest = if !checked {
                otter_proto::manifest::Manifest::from_json(&header.signed_manifest.manifest)?
            } else {
                let read = |paths: &[std::path::PathBuf]| {
                    paths
                        .iter()
                        .map(|path| {
                            otter_package::keys::read_verifying_key(path)
                                .with_context(|| format!("cannot read {}", path.display()))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                };
                let trust = otter_package::trust::TrustStore::new(
                    &read(&trusted_roots)?,
                    &read(&trusted_signers)?,
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_secs() as i64);
                let opened = otter_package::format::open_package_trusted(&package, &trust, now)
                    .context("the package does not verify")?;
                opened.manifest
            };
            if json {
                output::json(&serde_json::json!({
                    "manifest": manifest,
                    "signer": header.signed_manifest.signer,
                    "verified": checked,
                }))?;
            } else {
                println!("release     {}", manifest.release_id());
                println!("kind        {}", manifest.kind.as_str());
                println!("hardware    {}", manifest.hardware.join(","));
                if manifest.allow_downgrade {
                    println!("downgrade   allowed by the manifest");
                }
                println!(
                    "payload     {} bytes, sha256 {}",
                    manifest.payload.size, manifest.payload.sha256
                );
                println!(
                    "artifact    {} bytes, sha256 {}",
                    manifest.artifact.size, manifest.artifact.sha256
                );
                println!("signer      {}", header.signed_manifest.signer);
                let verdict = if !checked {
                    "not checked (no --trusted-signer or --trusted-root)"
                } else {
                    "valid"
                };
                println!("signature   {verdict}");
            }
        }
    }
    Ok(())
}

async fn remote(client: &ApiClient, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Signers(command) => crate::keys::remote(client, command).await?,
        Command::Release(ReleaseCommand::Upload { package }) => {
            let release: ReleaseInfo = client.post_file("/api/v1/releases", &package).await?;
            println!("{}", release.id);
        }
        Command::Release(ReleaseCommand::List { json }) => {
            let releases: Vec<ReleaseInfo> = client.get("/api/v1/releases").await?;
            if json {
                output::json(&releases)?;
            } else {
                let rows = releases
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.kind.as_str().to_owned(),
                            r.hardware.join(","),
                            r.payload_size.to_string(),
                            r.uploaded_at.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["RELEASE", "KIND", "HARDWARE", "SIZE", "UPLOADED"], &rows);
            }
        }
        Command::Device(DeviceCommand::Enroll {
            id,
            tags,
            hardware,
            out,
        }) => enroll(client, &id, tags, hardware, &out).await?,
        Command::Device(DeviceCommand::Token(command)) => device_token(client, command).await?,
        Command::Device(DeviceCommand::Import {
            certificates,
            hardware,
            tags,
            json,
        }) => {
            let mut devices = Vec::with_capacity(certificates.len());
            for path in &certificates {
                let certificate_pem = read_small_text_file(path, 64 * 1024)?;
                devices.push(otter_proto::api::ImportDevice {
                    certificate_pem,
                    hardware: hardware.clone(),
                    tags: tags.clone(),
                });
            }
            let imported: otter_proto::api::ImportDevicesResponse = client
                .post_json(
                    "/api/v1/devices/import",
                    &otter_proto::api::ImportDevicesRequest { devices },
                )
                .await?;
            if json {
                output::json(&imported)?;
            } else {
                for device in &imported.devices {
                    println!(
                        "imported {} (serial {})",
                        device.device_id, device.cert_serial
                    );
                }
            }
        }
        Command::Device(DeviceCommand::Revoke { id, reason, json }) => {
            let path = format!("/api/v1/devices/{}/revoke", query_value(&id)?);
            let device: DeviceInfo = client
                .post_json(&path, &otter_proto::api::RevokeDeviceRequest { reason })
                .await?;
            if json {
                output::json(&device)?;
            } else {
                println!("revoked {}", device.device_id);
            }
        }
        Command::Devices(DevicesCommand::List { tag, json }) => {
            let path = match &tag {
                Some(tag) => format!("/api/v1/devices?tag={}", query_value(tag)?),
                None => "/api/v1/devices".to_owned(),
            };
            let devices: Vec<DeviceInfo> = client.get(&path).await?;
            if json {
                output::json(&devices)?;
            } else {
                let rows = devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.device_id.to_string(),
                            d.hardware.clone(),
                            d.tags.join(","),
                            d.mode.map(|m| m.as_str()).unwrap_or("-").to_owned(),
                            d.registered_via
                                .map(|via| via.as_str())
                                .unwrap_or("-")
                                .to_owned(),
                            installed_summary(&d.installed),
                            output::or_dash(d.last_seen.as_deref()),
                            output::or_dash(d.revoked_at.as_deref()),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "DEVICE",
                        "HARDWARE",
                        "TAGS",
                        "MODE",
                        "VIA",
                        "INSTALLED",
                        "LAST SEEN",
                        "REVOKED",
                    ],
                    &rows,
                );
            }
        }
        Command::Deploy(DeployCommand::Create {
            release,
            target,
            allow_downgrade,
        }) => {
            otter_proto::manifest::parse_release_id(&release).map_err(anyhow::Error::msg)?;
            Target::parse(&target).map_err(anyhow::Error::msg)?;
            let request = CreateDeployment {
                release,
                target,
                allow_downgrade,
            };
            let info: DeploymentInfo = client.post_json("/api/v1/deployments", &request).await?;
            println!("{}", info.deployment_id);
        }
        Command::Deploy(DeployCommand::Status {
            id,
            watch,
            timeout,
            json,
        }) => {
            return deploy_status(client, &id, watch, timeout.into(), json).await;
        }
        Command::Deploy(DeployCommand::List { json }) => {
            let deployments: Vec<DeploymentInfo> = client.get("/api/v1/deployments").await?;
            if json {
                output::json(&deployments)?;
            } else {
                let rows = deployments
                    .iter()
                    .map(|d| {
                        vec![
                            d.deployment_id.clone(),
                            d.release.clone(),
                            d.target.clone(),
                            d.devices.to_string(),
                            phase_summary(d),
                            d.created_at.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "DEPLOYMENT",
                        "RELEASE",
                        "TARGET",
                        "DEVICES",
                        "PHASES",
                        "CREATED",
                    ],
                    &rows,
                );
            }
        }
        Command::Audit(AuditCommand::List {
            device,
            deployment,
            limit,
            json,
        }) => {
            let mut path = format!("/api/v1/audit?limit={limit}");
            if let Some(device) = &device {
                path.push_str(&format!("&device={}", query_value(device)?));
            }
            if let Some(deployment) = &deployment {
                path.push_str(&format!("&deployment={}", query_value(deployment)?));
            }
            let entries: Vec<AuditEntry> = client.get(&path).await?;
            if json {
                output::json(&entries)?;
            } else {
                let rows = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.clone(),
                            e.actor.clone(),
                            output::or_dash(e.device_id.as_deref()),
                            output::or_dash(e.deployment_id.as_deref()),
                            e.event.clone(),
                            if e.details.is_null() {
                                String::new()
                            } else {
                                e.details.to_string()
                            },
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "SEQ",
                        "AT",
                        "ACTOR",
                        "DEVICE",
                        "DEPLOYMENT",
                        "EVENT",
                        "DETAILS",
                    ],
                    &rows,
                );
            }
        }
        Command::Audit(AuditCommand::Verify { json }) => {
            let verification: AuditVerification = client.get("/api/v1/audit/verify").await?;
            if json {
                output::json(&verification)?;
            } else if let Some(problem) = &verification.problem {
                println!(
                    "audit chain broken at row {}: {}",
                    problem.seq, problem.message
                );
            } else if let Some(head) = &verification.head {
                println!(
                    "audit chain intact: {} rows, head seq {} hash {}",
                    verification.rows_checked, head.seq, head.hash
                );
            } else {
                println!("audit chain intact: 0 rows");
            }
            if verification.problem.is_some() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Token(command) => token(client, command).await?,
        Command::Keys(_) | Command::Package(_) => {
            unreachable!("offline commands are handled in run")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token(client: &ApiClient, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, role, json } => {
            otter_proto::manifest::validate_name(&name)
                .map_err(|e| anyhow::anyhow!("invalid token name {name:?}: {e}"))?;
            let created: CreatedToken = client
                .post_json("/api/v1/tokens", &CreateToken { name, role })
                .await?;
            if json {
                output::json(&created)?;
            } else {
                // The token alone, so that `> file` captures exactly it.
                println!("{}", created.token);
            }
        }
        TokenCommand::List { json } => {
            let tokens: Vec<TokenInfo> = client.get("/api/v1/tokens").await?;
            if json {
                output::json(&tokens)?;
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.role.as_str().to_owned(),
                            t.created_at.clone(),
                            output::or_dash(t.revoked_at.as_deref()),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["NAME", "ROLE", "CREATED", "REVOKED"], &rows);
            }
        }
        TokenCommand::Revoke { name, json } => {
            let path = format!("/api/v1/tokens/{}", query_value(&name)?);
            let revoked: TokenInfo = client.delete(&path).await?;
            if json {
                output::json(&revoked)?;
            } else {
                println!("revoked {}", revoked.name);
            }
        }
    }
    Ok(())
}

/// Ids and tags only contain URL-safe characters once validated, so no
/// percent-encoding is needed; anything else is refused here.
fn query_value(value: &str) -> anyhow::Result<&str> {
    otter_proto::manifest::validate_name(value).map_err(anyhow::Error::msg)?;
    Ok(value)
}

async fn deploy_status(
    client: &ApiClient,
    id: &str,
    watch: bool,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = format!("/api/v1/deployments/{}", query_value(id)?);
    let started = Instant::now();
    let mut last_summary = String::new();
    let status = loop {
        let status: DeploymentStatus = client.get(&path).await?;
        if !watch || status.info.complete {
            break status;
        }
        let summary = phase_summary(&status.info);
        if summary != last_summary && !json {
            println!("{:>6.1}s  {summary}", started.elapsed().as_secs_f64());
            std::io::stdout().flush()?;
            last_summary = summary;
        }
        if started.elapsed() > timeout {
            bail!(
                "deployment {id} not complete after {}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if json {
        output::json(&status)?;
    } else {
        let info = &status.info;
        println!("deployment  {}", info.deployment_id);
        println!("release     {}", info.release);
        println!("target      {} ({} devices)", info.target, info.devices);
        println!("phases      {}", phase_summary(info));
        println!("complete    {}", if info.complete { "yes" } else { "no" });
        println!();
        let rows = status
            .targets
            .iter()
            .map(|t| {
                vec![
                    t.device_id.to_string(),
                    t.phase.as_str().to_owned(),
                    t.updated_at.clone(),
                    output::or_dash(t.detail.as_deref()),
                ]
            })
            .collect::<Vec<_>>();
        output::table(&["DEVICE", "PHASE", "UPDATED", "DETAIL"], &rows);
    }
    let failed = status
        .targets
        .iter()
        .filter(|t| {
            !matches!(t.phase, otter_proto::deployment::Phase::Installed) && t.phase.is_terminal()
        })
        .count();
    if watch && failed > 0 {
        eprintln!("error: {failed} device(s) did not install the release");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn phase_summary(info: &DeploymentInfo) -> String {
    if info.phases.is_empty() {
        return "no devices".to_owned();
    }
    info.phases
        .iter()
        .map(|(phase, count)| format!("{} {count}", phase.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn installed_summary(installed: &BTreeMap<String, semver::Version>) -> String {
    if installed.is_empty() {
        return "-".to_owned();
    }
    installed
        .iter()
        .map(|(name, version)| format!("{name}@{version}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parent_folder(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

async fn enroll(
    client: &ApiClient,
    id: &str,
    tags: Vec<String>,
    hardware: String,
    out: &Path,
) -> anyhow::Result<()> {
    let device_id = DeviceId::parse(id).with_context(|| format!("invalid device id {id:?}"))?;
    for tag in &tags {
        otter_proto::manifest::validate_name(tag)
            .map_err(|e| anyhow::anyhow!("invalid tag {tag:?}: {e}"))?;
    }
    otter_proto::manifest::validate_name(&hardware)
        .map_err(|e| anyhow::anyhow!("invalid hardware {hardware:?}: {e}"))?;
    // Refuse before asking the server for a certificate: a bundle folder that
    // already holds a key belongs to another enrolment.
    otter_agent::bundle::ensure_free(out, false)?;
    let request = EnrollRequest {
        device_id,
        tags,
        hardware: hardware.clone(),
    };
    let enrolled: EnrollResponse = client.post_json("/api/v1/devices", &request).await?;
    write_bundle(out, &enrolled, &hardware)
        .with_context(|| format!("cannot write the agent bundle to {}", out.display()))?;
    println!("enrolled {} -> {}", enrolled.device_id, out.display());
    println!(
        "run it with: otter-agent --config {}",
        out.join("agent.toml").display()
    );
    Ok(())
}

/// Writes the agent bundle (`otter_agent::bundle`, the layout
/// `otter-agent enrol` writes too): the server-generated key first, then
/// certificate, trust anchors and a ready `agent.toml`.
pub fn write_bundle(out: &Path, enrolled: &EnrollResponse, hardware: &str) -> anyhow::Result<()> {
    otter_agent::bundle::write_private_key(out, &enrolled.private_key_pem)?;
    otter_agent::bundle::write_bundle(
        out,
        &otter_agent::bundle::Bundle {
            device_id: &enrolled.device_id,
            hardware,
            certificate_pem: &enrolled.certificate_pem,
            ca_pem: &enrolled.ca_pem,
            trusted_signers: &enrolled.trusted_signers,
            trusted_roots: &enrolled.trusted_roots,
            mqtt_url: &enrolled.mqtt_url,
            device_url: &enrolled.device_url,
        },
    )
}

/// `otter device token create|list|revoke`.
async fn device_token(client: &ApiClient, command: DeviceTokenCommand) -> anyhow::Result<()> {
    match command {
        DeviceTokenCommand::Create {
            id,
            hardware,
            tags,
            ttl,
            ca_out,
            json,
        } => {
            let device_id =
                DeviceId::parse(&id).with_context(|| format!("invalid device id {id:?}"))?;
            let request = CreateEnrolmentToken {
                device_id,
                hardware,
                tags,
                ttl_seconds: Some(ttl.as_secs()),
            };
            let created: CreatedEnrolmentToken = client
                .post_json("/api/v1/enrolment-tokens", &request)
                .await?;
            if let Some(path) = &ca_out {
                fs::write(path, &created.ca_pem)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if json {
                output::json(&created)?;
            } else {
                // The token alone on stdout, so that `> file` captures it.
                println!("{}", created.token);
                eprintln!(
                    "enrolment token {} for device {} (expires {}); CA SHA-256 {}",
                    created.info.id,
                    created.info.device_id,
                    created.info.expires_at,
                    created.ca_sha256
                );
            }
        }
        DeviceTokenCommand::List { json } => {
            let tokens: Vec<EnrolmentTokenInfo> = client.get("/api/v1/enrolment-tokens").await?;
            if json {
                output::json(&tokens)?;
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.device_id.to_string(),
                            t.created_by.clone(),
                            t.expires_at.clone(),
                            output::or_dash(t.used_at.as_deref()),
                            output::or_dash(t.revoked_at.as_deref()),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &["ID", "DEVICE", "CREATED BY", "EXPIRES", "USED", "REVOKED"],
                    &rows,
                );
            }
        }
        DeviceTokenCommand::Revoke { token_id, json } => {
            let path = format!("/api/v1/enrolment-tokens/{}", query_value(&token_id)?);
            let revoked: EnrolmentTokenInfo = client.delete(&path).await?;
            if json {
                output::json(&revoked)?;
            } else {
                println!("revoked enrolment token {}", revoked.id);
            }
        }
    }
    Ok(())
}

/// Reads a text file of at most `max` bytes (a certificate, a key, a list):
/// a larger file is an error, not a read of unbounded size.
pub(crate) fn read_small_text_file(path: &Path, max: u64) -> anyhow::Result<String> {
    let length = fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if length > max {
        bail!(
            "{} is too large ({length} bytes, at most {max})",
            path.display()
        );
    }
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
