//! Runs the baselines alone (no Otter server), in release:
//!
//! ```text
//! cargo bench -p otter-sim --bench baselines -- \
//!     [--devices 1000] [--hosts 127.0.0.1,127.0.0.2] \
//!     [--file-size 10000000] [--concurrency 16,64] [--requests 256] \
//!     [--pipeline-size 67108864] [--only fanout|nginx|pipeline] [--work-dir DIR]
//! ```
//!
//! Prints one JSON object per baseline. Mosquitto and nginx are installed by
//! the baselines themselves when missing. The same binary answers
//! `pipeline-child`, so the agent pipeline's peak memory is measured in a
//! process that runs nothing else.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use otter_sim::baselines::{self, PIPELINE_CHILD_COMMAND};

struct Options {
    devices: usize,
    hosts: Vec<IpAddr>,
    file_size: u64,
    concurrency: Vec<usize>,
    requests: usize,
    pipeline_size: u64,
    only: Option<String>,
    work_dir: Option<PathBuf>,
}

fn parse(arguments: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        devices: 1000,
        hosts: vec!["127.0.0.1".parse()?],
        file_size: 10_000_000,
        concurrency: vec![16, 64],
        requests: 256,
        pipeline_size: 64 << 20,
        only: None,
        work_dir: None,
    };
    let mut words = arguments.iter();
    while let Some(word) = words.next() {
        let mut value = || {
            words
                .next()
                .cloned()
                .with_context(|| format!("{word} needs a value"))
        };
        match word.as_str() {
            "--devices" => options.devices = value()?.parse()?,
            "--hosts" => {
                options.hosts = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--file-size" => options.file_size = value()?.parse()?,
            "--concurrency" => {
                options.concurrency = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--requests" => options.requests = value()?.parse()?,
            "--pipeline-size" => options.pipeline_size = value()?.parse()?,
            "--only" => options.only = Some(value()?),
            "--work-dir" => options.work_dir = Some(PathBuf::from(value()?)),
            // `cargo bench` adds `--bench`; nothing else is expected.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.first().map(String::as_str) == Some(PIPELINE_CHILD_COMMAND) {
        return baselines::run_pipeline_child(arguments.get(1..).unwrap_or_default());
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let options = parse(&arguments)?;
    let temporary = tempfile::tempdir()?;
    let work_dir = options
        .work_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    let runs = |name: &str| options.only.as_deref().is_none_or(|only| only == name);
    let runtime = tokio::runtime::Runtime::new()?;

    if runs("pipeline") {
        let executable = std::env::current_exe()?;
        let result = baselines::pipeline_baseline_with_child(
            options.pipeline_size,
            &work_dir,
            Some(&executable),
        )?;
        let mb_per_sec = |secs: f64| result.bytes as f64 / secs / 1e6;
        println!(
            "{}",
            serde_json::json!({
                "baseline": "pipeline",
                "result": result,
                "raw_mb_per_sec": mb_per_sec(result.raw_secs),
                "agent_mb_per_sec": mb_per_sec(result.agent_secs),
                "agent_over_raw_speed": result.raw_secs / result.agent_secs,
            })
        );
    }
    if runs("nginx") {
        let file = work_dir.join("download.bin");
        std::fs::write(&file, random_bytes(options.file_size))?;
        for concurrency in &options.concurrency {
            let result = runtime.block_on(baselines::nginx_download(
                &file,
                *concurrency,
                options.requests,
                &work_dir,
            ))?;
            println!(
                "{}",
                serde_json::json!({
                    "baseline": "nginx",
                    "file_size": options.file_size,
                    "result": result,
                    "mb_per_sec": result.bytes_per_sec / 1e6,
                })
            );
        }
    }
    if runs("fanout") {
        let result = runtime.block_on(baselines::mosquitto_fanout(
            options.devices,
            &options.hosts,
            &work_dir,
        ))?;
        println!(
            "{}",
            serde_json::json!({ "baseline": "mosquitto-fanout", "result": result })
        );
    }
    Ok(())
}

fn random_bytes(size: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut bytes);
    bytes
}
