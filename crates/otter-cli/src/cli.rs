//! Command-line grammar of `otter`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "otter", version, about = "Operate an Otter update server")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Operator API of the server.
    #[arg(
        long,
        global = true,
        env = "OTTER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Operator token.
    #[arg(
        long,
        global = true,
        env = "OTTER_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the operator token (e.g. otter-data/admin.token).
    #[arg(long, global = true, env = "OTTER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Package signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Build and inspect packages (offline: no server needed).
    #[command(subcommand)]
    Package(PackageCommand),
    /// Releases stored on the server.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Enrol a device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Devices known to the server.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Deployments.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Operator tokens (admin only).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 signing key: writes FILE (private, mode 0600) and FILE.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PackageCommand {
    /// Compress, encrypt and sign INPUT into one package file.
    Build {
        /// Private signing key (from `otter keys generate`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: semver::Version,
        /// firmware, config, application or agent.
        #[arg(long)]
        kind: otter_proto::manifest::PackageKind,
        /// Compatible hardware models, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hardware: Vec<String>,
        /// zstd level (1–19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Sign into the manifest that devices may install this release over
        /// a newer version (only when the deployment allows it too).
        #[arg(long)]
        allow_downgrade: bool,
        #[arg(long)]
        out: PathBuf,
        /// The payload file.
        input: PathBuf,
    },
    /// Show a package's manifest, and check it against a public key if given.
    Inspect {
        /// Public key(s) to verify the signature with.
        #[arg(long = "trusted-signer")]
        trusted_signers: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
        package: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Upload a package; prints the release id NAME@VERSION.
    Upload { package: PathBuf },
    /// List releases.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Issue a certificate for device ID and write a ready-to-run agent bundle into DIR.
    Enroll {
        id: String,
        /// Fleet tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Hardware model.
        #[arg(long, default_value = "generic")]
        hardware: String,
        /// Bundle folder (created; must not already hold a device key).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke device ID's certificate: the broker and the device endpoint
    /// refuse it at once, live connections included; its pending links are
    /// revoked. A second revoke is refused (409).
    Revoke {
        id: String,
        /// Why, kept in the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices.
    List {
        /// Only devices carrying this tag.
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Commit a release to a target; prints the deployment id.
    Create {
        /// NAME@VERSION.
        #[arg(long)]
        release: String,
        /// all, fleet:TAG or device:ID.
        #[arg(long)]
        target: String,
        /// Let devices install this release over a newer version; refused
        /// unless the release's signed manifest allows it too.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Devices per phase; --watch follows until every device is done.
    Status {
        id: String,
        #[arg(long)]
        watch: bool,
        /// Give up watching after this long (e.g. 10m).
        #[arg(long, default_value = "1h", requires = "watch")]
        timeout: humantime::Duration,
        #[arg(long)]
        json: bool,
    },
    /// List deployments.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit rows in order, optionally for one device and/or deployment.
    List {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
        /// Most rows to show.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Check the audit hash chain; exits non-zero at the first altered,
    /// removed or reordered row.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints only the token (shown once), e.g. to pipe into a file.
    Create {
        /// Name recorded as the actor of everything the token does.
        name: String,
        /// viewer (read only), operator (also releases, devices, deployments) or admin (also tokens).
        #[arg(long)]
        role: otter_proto::api::Role,
        #[arg(long)]
        json: bool,
    },
    /// List tokens: names, roles, creation and revocation times.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: refused from its next request on.
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}
