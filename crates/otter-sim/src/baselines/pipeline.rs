//! The device pipeline floor: the same artifact unpacked by the bare codecs
//! in the tightest loop we can write ("raw") and by the agent's own code
//! ("agent"), with the same work on both sides:
//!
//! - SHA-256 of the artifact (the agent's `hash_file` check against the
//!   signed manifest);
//! - ChaCha20-Poly1305 STREAM decryption, chunk by chunk as packages are cut;
//! - zstd decompression with the manifest's window limit;
//! - SHA-256 of the plaintext, and the plaintext written to a file.
//!
//! The raw loop reads the artifact once, hashing each sealed chunk before
//! decrypting it in place and feeding it straight into zstd's streaming
//! decoder; the agent path is `otter_package::pipeline::hash_file` followed by
//! `unpack` over a `BufReader`/`BufWriter`, exactly as `otter-agent`'s
//! `fetch` runs it (without the final fsync and rename, which are disk
//! costs, not codec costs). Each is run [`ROUNDS`] times and the fastest
//! kept, with the artifact in the page cache.
//!
//! The agent's peak memory is measured in a child process, the `otter-sim`
//! binary run as `otter-sim pipeline-child PACKAGE ARTIFACT OUTPUT` (see
//! [`run_pipeline_child`]), which prints its own VmHWM when done.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aead_stream::DecryptorBE32;
use anyhow::Context;
use chacha20poly1305::ChaCha20Poly1305;
use otter_package::DataKey;
use otter_package::format::{BuildOptions, build_package, open_package, read_header};
use otter_package::pipeline::{hash_file, unpack};
use otter_proto::manifest::{Compression, Encryption, Manifest, PackageKind};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::PipelineBaseline;
use super::process::own_peak_rss;

/// Each path runs this many times; the fastest counts.
pub const ROUNDS: usize = 3;
/// The first argument that makes `otter-sim` run [`run_pipeline_child`].
pub const PIPELINE_CHILD_COMMAND: &str = "pipeline-child";
/// Poly1305 tag of every sealed chunk.
const TAG_SIZE: usize = 16;
/// zstd's recommended output buffer (ZSTD_DStreamOutSize).
const ZSTD_OUTPUT_SIZE: usize = 128 * 1024;
/// Random payload is written in pieces of this size.
const WRITE_PIECE: usize = 1024 * 1024;

/// The files of one pipeline run.
pub struct PipelineFiles {
    pub package: PathBuf,
    pub artifact: PathBuf,
    pub manifest: Manifest,
    pub data_key: DataKey,
}

/// Builds a real package of `size` random bytes in `dir` (signed with a
/// throw-away key, default zstd level and chunk size) and extracts its
/// artifact, as a device holds it after the download.
pub fn prepare(size: u64, dir: &Path) -> anyhow::Result<PipelineFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let payload_path = dir.join("payload.bin");
    {
        let mut payload = BufWriter::new(File::create(&payload_path)?);
        let mut piece = vec![0u8; WRITE_PIECE];
        let mut remaining = size;
        let mut rng = rand::rng();
        while remaining > 0 {
            let length = remaining.min(WRITE_PIECE as u64) as usize;
            let piece = &mut piece[..length];
            rng.fill_bytes(piece);
            payload.write_all(piece)?;
            remaining -= length as u64;
        }
        payload.flush()?;
    }
    let signing_key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let options = BuildOptions::new(
        "pipeline-baseline",
        semver::Version::new(1, 0, 0),
        PackageKind::Firmware,
        vec!["sim".to_owned()],
    );
    let package = dir.join("package.otter");
    {
        let mut input = BufReader::new(File::open(&payload_path)?);
        let mut output = BufWriter::new(File::create(&package)?);
        build_package(&mut input, &mut output, &signing_key, &options, dir)
            .context("cannot build the pipeline package")?;
        output.flush()?;
    }
    std::fs::remove_file(&payload_path)?;
    let opened = open_package(&package, &[signing_key.verifying_key()])
        .context("cannot open the pipeline package")?;
    let artifact = dir.join("artifact.bin");
    {
        let mut source = File::open(&package)?;
        std::io::Seek::seek(
            &mut source,
            std::io::SeekFrom::Start(opened.artifact_offset),
        )?;
        let mut target = File::create(&artifact)?;
        std::io::copy(&mut source, &mut target)?;
    }
    Ok(PipelineFiles {
        package,
        artifact,
        manifest: opened.manifest,
        data_key: opened.header.data_key,
    })
}

/// What the agent runs: check the artifact, then unpack it into `output`.
/// Returns the plaintext SHA-256 (hex).
pub fn agent_unpack(
    artifact: &Path,
    manifest: &Manifest,
    data_key: &DataKey,
    output: &Path,
) -> anyhow::Result<String> {
    let digest = hash_file(artifact)?;
    anyhow::ensure!(
        digest == manifest.artifact,
        "the artifact does not match its manifest"
    );
    let mut reader = BufReader::new(File::open(artifact)?);
    let mut writer = BufWriter::new(File::create(output)?);
    let payload = unpack(&mut reader, manifest, data_key, &mut writer)?;
    writer.flush()?;
    Ok(payload.sha256)
}

/// The bare codecs in one pass over the artifact. Returns the plaintext
/// SHA-256 (hex); fails if the artifact's hash differs from the manifest's.
pub fn raw_unpack(
    artifact: &Path,
    manifest: &Manifest,
    data_key: &DataKey,
    output: &Path,
) -> anyhow::Result<String> {
    let Encryption::ChaCha20Poly1305Stream {
        chunk_size,
        nonce_prefix,
    } = &manifest.encryption;
    let Compression::Zstd { window_log } = manifest.compression;
    let nonce_prefix: [u8; 7] = hex::decode(nonce_prefix)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the nonce prefix is not 7 bytes"))?;
    let sealed_size = *chunk_size as usize + TAG_SIZE;

    let mut input = File::open(artifact)?;
    let total = input.metadata()?.len();
    // Every sealed chunk but the last is exactly `sealed_size`; the last is
    // shorter (STREAM chunk rule of `otter_package`).
    let full_chunks = total / sealed_size as u64;
    let last_size = (total % sealed_size as u64) as usize;
    anyhow::ensure!(
        last_size >= TAG_SIZE,
        "the artifact ends inside a chunk tag"
    );

    let key = chacha20poly1305::Key::from(*data_key.as_bytes());
    let mut decryptor = DecryptorBE32::<ChaCha20Poly1305>::new(&key, &nonce_prefix.into());
    let mut decoder = Decoder::new()?;
    decoder.set_parameter(DParameter::WindowLogMax(window_log))?;
    let mut artifact_hash = Sha256::new();
    let mut payload_hash = Sha256::new();
    let mut writer = File::create(output)?;
    let mut chunk = Vec::with_capacity(sealed_size);
    let mut decompressed = vec![0u8; ZSTD_OUTPUT_SIZE];

    let mut decompress = |plaintext: &[u8], finish: bool| -> anyhow::Result<()> {
        let mut source = InBuffer::around(plaintext);
        loop {
            let mut target = OutBuffer::around(&mut decompressed[..]);
            let hint = decoder.run(&mut source, &mut target)?;
            let produced = target.pos();
            let piece = &decompressed[..produced];
            payload_hash.update(piece);
            writer.write_all(piece)?;
            let input_done = source.pos == plaintext.len();
            let output_drained = produced < ZSTD_OUTPUT_SIZE;
            if input_done && output_drained && (!finish || hint == 0 || produced == 0) {
                if finish {
                    anyhow::ensure!(hint == 0, "the zstd frame is truncated");
                }
                return Ok(());
            }
        }
    };

    for _ in 0..full_chunks {
        chunk.resize(sealed_size, 0);
        input.read_exact(&mut chunk)?;
        artifact_hash.update(&chunk);
        decryptor
            .decrypt_next_in_place(&[], &mut chunk)
            .map_err(|_| anyhow::anyhow!("a chunk failed authentication"))?;
        decompress(&chunk, false)?;
    }
    chunk.resize(last_size, 0);
    input.read_exact(&mut chunk)?;
    artifact_hash.update(&chunk);
    decryptor
        .decrypt_last_in_place(&[], &mut chunk)
        .map_err(|_| anyhow::anyhow!("the last chunk failed authentication"))?;
    decompress(&chunk, true)?;
    writer.flush()?;

    anyhow::ensure!(
        hex::encode(artifact_hash.finalize()) == manifest.artifact.sha256,
        "the artifact does not match its manifest"
    );
    Ok(hex::encode(payload_hash.finalize()))
}

/// Times `run` [`ROUNDS`] times and returns the fastest time and its result.
fn fastest(mut run: impl FnMut() -> anyhow::Result<String>) -> anyhow::Result<(f64, String)> {
    let mut best: Option<(f64, String)> = None;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let hash = run()?;
        let secs = started.elapsed().as_secs_f64();
        if best.as_ref().is_none_or(|(best_secs, _)| secs < *best_secs) {
            best = Some((secs, hash));
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no round ran"))
}

/// Runs both paths on a fresh package of `size` random bytes in
/// `work_dir/pipeline`; fails unless both give the manifest's plaintext hash.
/// The agent's peak memory is measured when this runs in the `otter-sim`
/// binary.
pub fn pipeline_baseline(size: u64, work_dir: &Path) -> anyhow::Result<PipelineBaseline> {
    pipeline_baseline_with_child(size, work_dir, pipeline_child_executable().as_deref())
}

/// [`pipeline_baseline`] with the executable that answers
/// [`PIPELINE_CHILD_COMMAND`] given explicitly (`None`: no memory figure).
pub fn pipeline_baseline_with_child(
    size: u64,
    work_dir: &Path,
    child_executable: Option<&Path>,
) -> anyhow::Result<PipelineBaseline> {
    let dir = work_dir.join("pipeline");
    let files = prepare(size, &dir)?;
    let raw_output = dir.join("payload.raw");
    let agent_output = dir.join("payload.agent");
    let (raw_secs, raw_hash) = fastest(|| {
        raw_unpack(
            &files.artifact,
            &files.manifest,
            &files.data_key,
            &raw_output,
        )
    })?;
    let (agent_secs, agent_hash) = fastest(|| {
        agent_unpack(
            &files.artifact,
            &files.manifest,
            &files.data_key,
            &agent_output,
        )
    })?;
    anyhow::ensure!(
        raw_hash == files.manifest.payload.sha256 && agent_hash == raw_hash,
        "the raw and agent pipelines disagree on the plaintext"
    );
    let agent_peak_rss_bytes = match child_executable {
        Some(executable) => Some(measure_child(executable, &files, &agent_output)?),
        None => None,
    };
    let _ = std::fs::remove_file(&raw_output);
    let _ = std::fs::remove_file(&agent_output);
    Ok(PipelineBaseline {
        bytes: size,
        artifact_bytes: files.manifest.artifact.size,
        raw_secs,
        agent_secs,
        agent_peak_rss_bytes,
    })
}

/// The `otter-sim` binary, when that is what runs (not a test harness).
fn pipeline_child_executable() -> Option<PathBuf> {
    let executable = std::env::current_exe().ok()?;
    (executable.file_stem()? == "otter-sim").then_some(executable)
}

fn measure_child(executable: &Path, files: &PipelineFiles, output: &Path) -> anyhow::Result<u64> {
    let result = std::process::Command::new(executable)
        .arg(PIPELINE_CHILD_COMMAND)
        .arg(&files.package)
        .arg(&files.artifact)
        .arg(output)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run the pipeline child")?;
    anyhow::ensure!(
        result.status.success(),
        "the pipeline child failed ({}): {}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("peak_rss_bytes="))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the pipeline child printed no peak_rss_bytes: {stdout}"))
}

/// The child side: `arguments` are PACKAGE ARTIFACT OUTPUT (after the
/// [`PIPELINE_CHILD_COMMAND`] word). Reads the manifest and data key from
/// the package header, runs [`agent_unpack`], and prints
/// `peak_rss_bytes=<VmHWM>` on stdout. `otter-sim`'s `main` calls this
/// before parsing its own flags.
pub fn run_pipeline_child(arguments: &[String]) -> anyhow::Result<()> {
    let [package, artifact, output] = arguments else {
        anyhow::bail!("usage: otter-sim {PIPELINE_CHILD_COMMAND} PACKAGE ARTIFACT OUTPUT");
    };
    let header = read_header(&mut File::open(package)?)?;
    let manifest = Manifest::from_json(&header.signed_manifest.manifest)?;
    let hash = agent_unpack(
        Path::new(artifact),
        &manifest,
        &header.data_key,
        Path::new(output),
    )?;
    anyhow::ensure!(
        hash == manifest.payload.sha256,
        "the plaintext does not match"
    );
    let peak = own_peak_rss().ok_or_else(|| anyhow::anyhow!("cannot read VmHWM"))?;
    println!("peak_rss_bytes={peak}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_agent_paths_agree_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks (64 KiB each) and a short last one.
        let baseline = pipeline_baseline(300_000, dir.path()).unwrap();
        assert_eq!(baseline.bytes, 300_000);
        assert!(
            baseline.artifact_bytes > 300_000,
            "random bytes do not compress"
        );
        assert!(baseline.raw_secs > 0.0 && baseline.agent_secs > 0.0);
        assert_eq!(
            baseline.agent_peak_rss_bytes, None,
            "no otter-sim child in tests"
        );

        // A flipped bit fails the raw path, as it fails the agent's.
        let files = prepare(100_000, &dir.path().join("tampered")).unwrap();
        let mut bytes = std::fs::read(&files.artifact).unwrap();
        bytes[70_000] ^= 1;
        std::fs::write(&files.artifact, bytes).unwrap();
        let output = dir.path().join("out");
        assert!(raw_unpack(&files.artifact, &files.manifest, &files.data_key, &output).is_err());
        assert!(agent_unpack(&files.artifact, &files.manifest, &files.data_key, &output).is_err());
    }

    #[test]
    fn empty_payload() {
        let dir = tempfile::tempdir().unwrap();
        let files = prepare(0, dir.path()).unwrap();
        let output = dir.path().join("out");
        let raw = raw_unpack(&files.artifact, &files.manifest, &files.data_key, &output).unwrap();
        let agent =
            agent_unpack(&files.artifact, &files.manifest, &files.data_key, &output).unwrap();
        assert_eq!(raw, agent);
        assert_eq!(raw, files.manifest.payload.sha256);
    }
}
