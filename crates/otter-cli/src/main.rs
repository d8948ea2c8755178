//! `otter`, the operator's command line.
//!
//! Layout: [`cli`] declares the commands (clap derive), [`client`] talks to
//! the operator REST API, [`commands`] runs each command ([`keys`]: the
//! offline root-key commands), [`output`] prints
//! tables. Every listing takes `--json`, which prints the API's JSON shapes
//! (`otter_proto::api`) unchanged: the stable interface for scripts.
//!
//! Errors end the process with a message on stderr and exit code 1 (2 for
//! usage errors, from clap).

mod cli;
mod client;
mod commands;
mod keys;
mod output;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // ring is compiled into the tree as well, so rustls cannot pick a
    // provider by itself: choose aws-lc-rs, the one the whole tree uses.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = cli::Cli::parse();
    match commands::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
