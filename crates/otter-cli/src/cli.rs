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
    /// Signer keys as the server sees them (revocation list).
    #[command(subcommand)]
    Signers(SignersCommand),
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
    /// Generate an offline root key: writes PATH (private, 0600) and PATH.pub.
    /// Keep PATH offline; servers and devices pin PATH.pub (`--trusted-root`,
    /// `trusted_roots`). The root only certifies and revokes signer keys.
    CreateRoot { path: PathBuf },
    /// Certify a signer key with the root (offline): writes a signer
    /// certificate for `otter package build --signer-cert`.
    Certify {
        /// The root's private key.
        #[arg(long)]
        root: PathBuf,
        /// The signer's public key (KEY.pub from `otter keys generate`).
        #[arg(long)]
        signer: PathBuf,
        /// Who or what signs with the key (informational).
        #[arg(long)]
        name: String,
        /// How long the certificate is valid from now (e.g. 365d, 12h).
        #[arg(long, default_value = "365d")]
        valid: humantime::Duration,
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a signer key with the root (offline): writes the revocation
    /// list with the next sequence number (publish it with
    /// `otter signers revocations publish`).
    Revoke {
        /// The root's private key.
        #[arg(long)]
        root: PathBuf,
        /// Key id to revoke (base64, as printed by `otter keys generate`).
        #[arg(long)]
        key_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// The current list: its entries are kept and its sequence + 1 used.
        #[arg(long)]
        previous: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SignersCommand {
    /// The signer revocation list held by the server.
    #[command(subcommand)]
    Revocations(RevocationsCommand),
}

#[derive(Debug, Subcommand)]
pub enum RevocationsCommand {
    /// Upload a revocation list (from `otter keys revoke`); admin only.
    Publish { list: PathBuf },
    /// Print the server's current revocation list (JSON).
    Show,
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
        /// Certificate of the signing key from an offline root (`otter keys
        /// certify`), embedded in the package.
        #[arg(long)]
        signer_cert: Option<PathBuf>,
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
        /// Offline root key(s): a signer they certified is accepted.
        #[arg(long = "trusted-root")]
        trusted_roots: Vec<PathBuf>,
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
    /// The server generates the key (convenience path); to keep the key on the
    /// device, use `otter device token create` and `otter-agent enrol`.
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
    /// Register devices holding certificates your own CA issued (the factory
    /// path; the server must trust that CA: `otter-server --device-ca`). The
    /// certificate's common name is the device id. All or none.
    Import {
        /// PEM certificate files, one device each.
        #[arg(required = true)]
        certificates: Vec<PathBuf>,
        /// Hardware model of every imported device.
        #[arg(long, default_value = "generic")]
        hardware: String,
        /// Fleet tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        #[arg(long)]
        json: bool,
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
    /// One-time enrolment tokens: the device makes its own key and enrols
    /// with `otter-agent enrol --token ...`.
    #[command(subcommand)]
    Token(DeviceTokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeviceTokenCommand {
    /// Create a token with which device ID, and no other, enrols once;
    /// prints the token (shown only now) and the CA fingerprint to pin.
    Create {
        id: String,
        /// Hardware model the device is stored with.
        #[arg(long, default_value = "generic")]
        hardware: String,
        /// Fleet tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Lifetime (at most 30 days).
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
        /// Write the server CA (PEM) the device must pin to this file.
        #[arg(long)]
        ca_out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List enrolment tokens (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused enrolment token.
    Revoke {
        token_id: String,
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
