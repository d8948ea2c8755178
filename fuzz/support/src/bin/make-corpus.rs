//! Writes the seed corpora, `fuzz/corpus/<target>/`, from the real
//! encodings of [`otter_fuzz_support::samples`]. Run from `fuzz/`:
//!
//! ```sh
//! cargo run -p otter-fuzz-support --bin make-corpus
//! ```
//!
//! Each target's folder is emptied first, so the committed seeds are exactly
//! what this program writes. Package seeds differ on every run (a package
//! gets a fresh data key and nonce prefix), everything else is stable.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use otter_fuzz_support::samples;
use otter_fuzz_support::unpack_case::{Mode, UnpackCase};
use otter_package::keys::verifying_key_pem;
use otter_proto::messages::{Mode as AgentMode, encode};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("make-corpus: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Seeds by target, each a (file name, bytes) list.
#[derive(Default)]
struct Corpus(BTreeMap<&'static str, Vec<(String, Vec<u8>)>>);

impl Corpus {
    fn add(&mut self, target: &'static str, name: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.0
            .entry(target)
            .or_default()
            .push((name.into(), bytes.into()));
    }

    fn add_all<T>(
        &mut self,
        target: &'static str,
        prefix: &str,
        values: &[T],
        encode: impl Fn(&T) -> Vec<u8>,
    ) {
        for (index, value) in values.iter().enumerate() {
            self.add(target, format!("{prefix}-{index}"), encode(value));
        }
    }

    fn write(&self, root: &Path) -> io::Result<()> {
        let mut total = 0;
        for (target, seeds) in &self.0 {
            let folder = root.join(target);
            empty_folder(&folder)?;
            let mut bytes = 0;
            for (name, contents) in seeds {
                let path = folder.join(name);
                fs::write(&path, contents).map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
                })?;
                bytes += contents.len();
            }
            println!("{target:>16}: {} seeds, {bytes} bytes", seeds.len());
            total += bytes;
        }
        println!("{:>16}: {total} bytes in {}", "total", root.display());
        Ok(())
    }
}

/// Creates `folder`, or removes the files already in it.
fn empty_folder(folder: &Path) -> io::Result<()> {
    fs::create_dir_all(folder)?;
    for entry in fs::read_dir(folder)? {
        let path = entry?.path();
        if path.is_file() {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    // Sample values serialise: no maps with non-string keys.
    serde_json::to_vec(value).unwrap_or_default()
}

/// As the agent's `StateStore` writes its files.
fn pretty_json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn run() -> io::Result<()> {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut corpus = Corpus::default();

    corpus.add("messages", "registration", encode(&samples::registration()));
    corpus.add_all("messages", "status", &samples::status_reports(), encode);
    corpus.add("messages", "push-ack", encode(&samples::push_ack()));
    corpus.add_all("messages", "server", &samples::server_messages(), encode);
    corpus.add_all("messages", "poll", &samples::poll_responses(), encode);

    corpus.add_all("push_chunk", "chunk", &samples::push_chunks(), Clone::clone);
    corpus.add_all("names", "name", &samples::names(), |name| {
        name.clone().into_bytes()
    });

    corpus.add("api", "enroll", json(&samples::enroll_request()));
    corpus.add(
        "api",
        "batch-enroll",
        json(&samples::batch_enroll_request()),
    );
    corpus.add(
        "api",
        "create-deployment",
        json(&samples::create_deployment()),
    );
    corpus.add("api", "error-body", json(&samples::error_body()));

    corpus.add("trust", "certified", json(&samples::certified_manifest()));
    corpus.add("trust", "revocations", json(&samples::revocation_list()));
    if let Some(certificate) = samples::certified_manifest().signer_certificate {
        corpus.add("trust", "certificate-document", certificate.certificate);
    }
    corpus.add("trust", "list-document", samples::revocation_list().list);

    corpus.add("manifest", "manifest", json(&samples::manifest()));
    corpus.add("manifest", "signed", json(&samples::signed_manifest()));
    corpus.add(
        "manifest",
        "signer-pem",
        verifying_key_pem(&otter_fuzz_support::trusted_key().verifying_key()),
    );

    corpus.add_all(
        "package_header",
        "package",
        &samples::packages()?,
        Clone::clone,
    );

    let payload = b"sensor calibration table v7\n".repeat(40);
    let stream = zstd::encode_all(&payload[..], 3)?;
    let cases = [
        UnpackCase {
            mode: Mode::Stream,
            chunk_size: 1024,
            window_log: 20,
            declared_size: None,
            data: &stream,
        },
        UnpackCase {
            mode: Mode::Stream,
            chunk_size: 1024,
            window_log: 20,
            declared_size: Some(100),
            data: &stream,
        },
        UnpackCase {
            mode: Mode::Payload,
            chunk_size: 1024,
            window_log: 10,
            declared_size: None,
            data: &payload[..200],
        },
    ];
    corpus.add_all("unpack", "case", &cases, UnpackCase::to_bytes);

    corpus.add(
        "agent_config",
        "push-pull",
        samples::agent_toml(AgentMode::PushPull, false),
    );
    corpus.add(
        "agent_config",
        "pull-commands",
        samples::agent_toml(AgentMode::Pull, true),
    );
    corpus.add(
        "agent_config",
        "push",
        samples::agent_toml(AgentMode::Push, false),
    );
    corpus.add_all("remote_config", "overlay", &samples::overlays(), |text| {
        text.clone().into_bytes()
    });

    corpus.add_all("state_files", "job", &samples::jobs(), pretty_json);
    corpus.add(
        "state_files",
        "installed",
        pretty_json(&samples::installed()),
    );
    corpus.add_all("state_files", "marker", &samples::markers(), pretty_json);

    corpus.write(&root)
}
