//! `POST /api/v1/releases`: a package upload, verified before anything is
//! stored; and the release listing.
//!
//! The upload streams to a temporary file with a size cap, is opened with
//! `otter_package::format::open_package_trusted` against the signer trust
//! store (direct signers, certified signers of pinned roots, revocations), and
//! only then has its artifact moved into the blob store and its manifest and
//! data key written to the database. Temporary files are removed on every
//! path (also when the client goes away mid-upload), so a refused upload
//! leaves nothing behind.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::StreamExt;
use otter_package::PackageError;
use otter_package::format::{OpenedPackage, open_package_trusted};
use otter_proto::api::ReleaseInfo;
use tokio::io::AsyncWriteExt;

use super::{ApiState, Authenticated};
use crate::audit::Actor;
use crate::blobs::BlobKey;
use crate::clock;
use crate::error::ApiError;
use crate::store::{NewRelease, ReleaseInsertOutcome};

/// Longest wait for the next piece of an upload.
const UPLOAD_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A file in `tmp/` removed when dropped, whatever happened meanwhile.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(dir: &FsPath, prefix: &str) -> Self {
        let suffix: u64 = rand::random();
        TempFile {
            path: dir.join(format!("{prefix}-{suffix:016x}")),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Absent after a successful rename into the blob store: not an error.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("a package may be at most {max} bytes"),
    )
}

pub(super) async fn upload(
    State(state): State<ApiState>,
    Authenticated(operator): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ReleaseInfo>), ApiError> {
    let max = state.max_upload_bytes;
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > max) {
        return Err(too_large(max));
    }

    let upload = TempFile::new(&state.tmp_dir, "upload");
    receive(body, &upload.path, max).await?;

    let trust = state
        .signer_trust
        .read()
        .map_err(|_| ApiError::internal("reading the signer trust", &"lock poisoned"))?
        .clone();
    let upload_path = upload.path.clone();
    let now = clock::now_unix();
    let opened =
        tokio::task::spawn_blocking(move || open_package_trusted(&upload_path, &trust, now))
            .await
            .map_err(|e| ApiError::internal("verifying a package", &e))?
            .map_err(package_error)?;
    let manifest = &opened.manifest;
    let release_id = manifest.release_id();
    let exists = || {
        ApiError::conflict(
            "release-exists",
            format!("release {release_id} already exists"),
        )
    };
    if state.store.release_exists(&release_id).await? {
        return Err(exists());
    }

    // The manifest was validated: its artifact digest is 64 lower-case hex.
    let blob_key = BlobKey::from_sha256_hex(&manifest.artifact.sha256).ok_or_else(|| {
        ApiError::unprocessable("invalid-package", "artifact digest is not a sha256")
    })?;
    let artifact = TempFile::new(&state.tmp_dir, "artifact");
    let newly_stored = if state.blobs.exists(&blob_key).await? {
        false
    } else {
        let (source, target, offset, length) = (
            upload.path.clone(),
            artifact.path.clone(),
            opened.artifact_offset,
            manifest.artifact.size,
        );
        tokio::task::spawn_blocking(move || copy_artifact(&source, &target, offset, length))
            .await
            .map_err(|e| ApiError::internal("extracting an artifact", &e))?
            .map_err(|e| ApiError::internal("extracting an artifact", &e))?;
        state.blobs.put_file(&blob_key, &artifact.path).await?;
        true
    };
    drop(upload);

    let info = release_info(&opened, &operator.name);
    let new_release = NewRelease {
        info: info.clone(),
        artifact_sha256: manifest.artifact.sha256.clone(),
        data_key: state.vault.seal(&info.id, &opened.header.data_key),
        blob_key: blob_key.as_str().to_owned(),
    };
    let outcome = state
        .store
        .insert_release(&new_release, &Actor::operator(&operator.name))
        .await;
    let failure = match outcome {
        Ok(ReleaseInsertOutcome::Inserted) => {
            tracing::info!(release = %info.id, operator = %operator.name, "release uploaded");
            return Ok((StatusCode::CREATED, Json(info)));
        }
        Ok(ReleaseInsertOutcome::AlreadyExists) => exists(),
        Err(error) => ApiError::from(error),
    };
    // Another upload of the same release won the race, or the database
    // failed: take back the blob unless a stored release uses it.
    if newly_stored
        && !state
            .store
            .blob_in_use(blob_key.as_str())
            .await
            .unwrap_or(true)
        && let Err(error) = state.blobs.delete(&blob_key).await
    {
        tracing::warn!(%error, blob = blob_key.as_str(), "cannot remove an unused blob");
    }
    Err(failure)
}

/// Streams the request body into `path`, refusing more than `max` bytes.
async fn receive(body: Body, path: &FsPath, max: u64) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::internal("creating an upload file", &e))?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    loop {
        let next = tokio::time::timeout(UPLOAD_READ_TIMEOUT, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "upload-timeout",
                    "the upload stalled",
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("upload-interrupted", format!("reading the upload: {e}"))
        })?;
        received = received.saturating_add(chunk.len() as u64);
        if received > max {
            return Err(too_large(max));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal("writing an upload file", &e))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal("writing an upload file", &e))?;
    Ok(())
}

/// Copies `length` bytes from `offset` of `source` into a new file `target`.
fn copy_artifact(
    source: &FsPath,
    target: &FsPath,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    let mut input = std::fs::File::open(source)?;
    input.seek(SeekFrom::Start(offset))?;
    let mut output = std::fs::File::create(target)?;
    let copied = std::io::copy(&mut input.take(length), &mut output)?;
    if copied != length {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "artifact shorter than verified",
        ));
    }
    output.sync_all()
}

/// Maps why a package was refused to the answer: everything about the bytes
/// the client sent is 422; only a failure of our own disk is 500.
fn package_error(error: PackageError) -> ApiError {
    match error {
        PackageError::Io(io)
            if !matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            ApiError::internal("reading an uploaded package", &io)
        }
        refused => ApiError::unprocessable(signer_error_code(&refused), refused.to_string()),
    }
}

/// The error code of a refused signer certificate or revoked signer;
/// `invalid-package` for the rest (an unknown signer or a bad signature
/// included, as before certificates existed).
pub(super) fn signer_error_code(error: &PackageError) -> &'static str {
    match error {
        PackageError::RevokedSigner { .. } => "revoked-signer",
        PackageError::UntrustedRoot => "untrusted-root",
        PackageError::BadCertificate(_) => "bad-signer-certificate",
        PackageError::CertificateExpired { .. } => "signer-certificate-expired",
        PackageError::CertificateNotYetValid { .. } => "signer-certificate-not-yet-valid",
        _ => "invalid-package",
    }
}

fn release_info(opened: &OpenedPackage, uploaded_by: &str) -> ReleaseInfo {
    let manifest = &opened.manifest;
    ReleaseInfo {
        id: manifest.release_id(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        kind: manifest.kind,
        hardware: manifest.hardware.clone(),
        payload_size: manifest.payload.size,
        artifact_size: manifest.artifact.size,
        payload_sha256: manifest.payload.sha256.clone(),
        manifest: opened.header.signed_manifest.clone(),
        uploaded_at: clock::now_rfc3339(),
        uploaded_by: uploaded_by.to_owned(),
    }
}

pub(super) async fn list(
    State(state): State<ApiState>,
    _operator: Authenticated,
) -> Result<Json<Vec<ReleaseInfo>>, ApiError> {
    Ok(Json(state.store.releases().await?))
}

pub(super) async fn show(
    State(state): State<ApiState>,
    _operator: Authenticated,
    Path(id): Path<String>,
) -> Result<Json<ReleaseInfo>, ApiError> {
    state
        .store
        .release(&id)
        .await?
        .map(|stored| Json(stored.info))
        .ok_or_else(|| ApiError::not_found("unknown-release", format!("no release {id:?}")))
}
