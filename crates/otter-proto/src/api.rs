//! JSON shapes of the operator REST API (`/api/v1/...`) and the error body
//! shared with the device HTTPS endpoint. The server serialises them, the CLI
//! deserialises them; `--json` output of the CLI is these shapes verbatim.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::Phase;
use crate::manifest::{PackageKind, SignedManifest};
use crate::messages::Mode;
use crate::topics::DeviceId;

/// Every error answer: `{ "error": code, "message": text }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// `POST /api/v1/devices`: issue a certificate for a new device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub device_id: DeviceId,
    #[serde(default)]
    pub tags: Vec<String>,
    pub hardware: String,
}

/// What a device needs to run: its identity, whom to trust, where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: DeviceId,
    pub certificate_pem: String,
    pub private_key_pem: String,
    /// The CA that issued the server's certificates (and the device's).
    pub ca_pem: String,
    /// PEM public keys of the package signers the server trusts.
    pub trusted_signers: Vec<String>,
    /// PEM public keys of the offline roots whose certified signers the
    /// server trusts (devices pin them: signers rotate without re-enrolment).
    #[serde(default)]
    pub trusted_roots: Vec<String>,
    /// `mqtts://host:port` of the broker.
    pub mqtt_url: String,
    /// `https://host:port` of the device endpoint.
    pub device_url: String,
}

/// Most devices one `POST /api/v1/devices/batch` may enrol.
pub const MAX_BATCH_ENROLL: usize = 10_000;

/// `POST /api/v1/devices/batch`: enrol many devices at once (a simulated
/// fleet, a factory line). All are enrolled, or none: one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEnrollRequest {
    /// At most [`MAX_BATCH_ENROLL`], each id once.
    pub devices: Vec<EnrollRequest>,
}

/// The answer to a batch enrolment: one [`EnrollResponse`] per requested
/// device, in the order of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEnrollResponse {
    pub devices: Vec<EnrollResponse>,
}

/// One device whose certificate the operator's own CA issued (the factory
/// path): the certificate's common name is the device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportDevice {
    pub certificate_pem: String,
    pub hardware: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `POST /api/v1/devices/import`: register devices holding pre-issued
/// certificates of a CA the server trusts (`otter-server --device-ca`). All
/// are imported, or none; at most [`MAX_BATCH_ENROLL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportDevicesRequest {
    pub devices: Vec<ImportDevice>,
}

/// One imported device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedDevice {
    pub device_id: DeviceId,
    /// The certificate's serial, lower-case hex (what revocation records).
    pub cert_serial: String,
}

/// The answer to an import, in request order, with what the devices' agent
/// configuration needs besides their own key and certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportDevicesResponse {
    pub devices: Vec<ImportedDevice>,
    /// The CA of the server's certificate (devices pin it).
    pub ca_pem: String,
    pub mqtt_url: String,
    pub device_url: String,
}

/// A device as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: DeviceId,
    pub hardware: String,
    pub tags: Vec<String>,
    /// Set from the last registration; `None` before the first one.
    pub mode: Option<Mode>,
    pub agent_version: Option<String>,
    pub installed: BTreeMap<String, semver::Version>,
    pub capabilities: Vec<String>,
    /// RFC 3339 time of enrolment.
    pub enrolled_at: String,
    /// RFC 3339 time of the last registration, if any.
    pub registered_at: Option<String>,
    /// RFC 3339 time of the last message from the device, if any.
    pub last_seen: Option<String>,
    /// How the device first registered: over MQTT, or by polling the device
    /// HTTPS endpoint (a pull-mode device). `None` before any registration.
    pub registered_via: Option<Channel>,
    /// RFC 3339 time its current certificate was revoked (`otter device
    /// revoke`); `None` while it is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// `POST /api/v1/devices/{id}/revoke`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeDeviceRequest {
    /// Why, kept in the audit row.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The channel a device speaks to the server on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// The MQTT broker (push and push-pull).
    Mqtt,
    /// Polling the device HTTPS endpoint (pull, and push-pull's reconcile poll).
    Poll,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Mqtt => "mqtt",
            Channel::Poll => "poll",
        }
    }
}

/// A stored release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// `name@version`.
    pub id: String,
    pub name: String,
    pub version: semver::Version,
    pub kind: PackageKind,
    pub hardware: Vec<String>,
    pub payload_size: u64,
    pub artifact_size: u64,
    pub payload_sha256: String,
    /// The signed manifest, exactly as the publisher signed it.
    pub manifest: SignedManifest,
    pub uploaded_at: String,
    pub uploaded_by: String,
}

/// Whom a deployment targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    All,
    Fleet(String),
    Device(DeviceId),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        if s == "all" {
            return Ok(Target::All);
        }
        if let Some(tag) = s.strip_prefix("fleet:") {
            crate::manifest::validate_name(tag).map_err(|e| format!("invalid fleet tag: {e}"))?;
            return Ok(Target::Fleet(tag.to_owned()));
        }
        if let Some(id) = s.strip_prefix("device:") {
            return DeviceId::parse(id)
                .map(Target::Device)
                .map_err(|e| e.to_string());
        }
        Err(format!(
            "invalid target {s:?} (expected all, fleet:TAG or device:ID)"
        ))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Fleet(tag) => write!(f, "fleet:{tag}"),
            Target::Device(id) => write!(f, "device:{id}"),
        }
    }
}

/// `POST /api/v1/deployments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    /// `name@version`.
    pub release: String,
    /// `all`, `fleet:TAG` or `device:ID`.
    pub target: String,
    /// Allow devices to install this release over a newer version; the
    /// release's signed manifest must allow it too, or the request is
    /// refused (422 `downgrade-not-allowed`). Absent means false.
    #[serde(default, skip_serializing_if = "crate::manifest::is_false")]
    pub allow_downgrade: bool,
}

/// A deployment and how many of its devices are in each phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub deployment_id: String,
    pub release: String,
    pub target: String,
    pub created_at: String,
    pub created_by: String,
    /// Number of targeted devices.
    pub devices: u64,
    /// Devices per phase; phases with no device are omitted.
    pub phases: BTreeMap<Phase, u64>,
    /// True when every targeted device reached a terminal phase.
    pub complete: bool,
    /// Whether the deployment allows a downgrade (see [`CreateDeployment`]).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// One device's place in a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentDevice {
    pub device_id: DeviceId,
    pub phase: Phase,
    pub updated_at: String,
    /// Reason of a failure or rollback.
    pub detail: Option<String>,
}

/// `GET /api/v1/deployments/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    #[serde(flatten)]
    pub info: DeploymentInfo,
    pub targets: Vec<DeploymentDevice>,
}

/// Who did something recorded in the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    Operator,
    Device,
    Server,
}

/// One audit row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, strictly increasing.
    pub seq: i64,
    /// RFC 3339 time with milliseconds.
    pub at: String,
    pub actor_kind: ActorKind,
    /// Token name, device id or `server`.
    pub actor: String,
    pub device_id: Option<String>,
    pub deployment_id: Option<String>,
    /// Event name, e.g. `deployment.created`, `link.created`, `device.downloaded`.
    pub event: String,
    pub details: serde_json::Value,
    /// The row's audit chain hash (lowercase hex), to compare with a head
    /// recorded from `GET /api/v1/audit/verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Answer of `GET /api/v1/audit/verify`: the audit hash chain checked from
/// its first row, stopping at the first problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerification {
    /// True when every row verified (`problem` is `None`).
    pub intact: bool,
    /// Rows that verified, in sequence order, before `problem` if any.
    pub rows_checked: u64,
    /// The last row that verified; `None` when no row did. Record it
    /// outside the server to detect later truncation or rewriting.
    pub head: Option<AuditHead>,
    pub problem: Option<AuditProblem>,
}

/// The end of the verified part of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: i64,
    /// Lowercase hex of the row's 32-byte chain hash.
    pub hash: String,
}

/// The first row at which the audit chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditProblem {
    /// Sequence number of the first altered, missing or misplaced row.
    pub seq: i64,
    pub kind: AuditProblemKind,
    /// What was found, for people.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditProblemKind {
    /// Rows are missing before `seq` (a gap in sequence numbers).
    Missing,
    /// The row's `prev_hash` is not the previous row's hash: rows were
    /// removed, reordered or replaced.
    Unlinked,
    /// The row's hash does not match its content: the row was altered.
    Altered,
    /// The row has no hash or an unreadable one.
    Unchained,
}

/// What an operator token may do. Each role includes the ones before it:
/// a viewer reads, an operator also uploads releases, enrols devices and
/// creates deployments, an admin also manages tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether a token of this role may do what `required` may.
    pub fn includes(self, required: Role) -> bool {
        self >= required
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (expected viewer, operator or admin)"
            )),
        }
    }
}

/// `POST /api/v1/tokens`: a new operator token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Recorded as the actor of everything the token does; never reused,
    /// even once the token is revoked.
    pub name: String,
    pub role: Role,
}

/// The answer to `POST /api/v1/tokens`: the only time the token is shown
/// (the server keeps its SHA-256 only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub name: String,
    pub role: Role,
    pub token: String,
    pub created_at: String,
}

/// An operator token as `GET /api/v1/tokens` lists it: never the token
/// nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at: String,
    /// RFC 3339 time of the revocation; `None` while the token is active.
    pub revoked_at: Option<String>,
}

/// Longest lifetime an enrolment token may be given (30 days).
pub const MAX_ENROLMENT_TOKEN_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Lifetime of an enrolment token when none is asked for (24 hours).
pub const DEFAULT_ENROLMENT_TOKEN_TTL_SECONDS: u64 = 24 * 3600;
/// Largest body `POST /v1/enrol` accepts: a CSR is well under 2 KiB.
pub const MAX_CSR_ENROL_BODY_BYTES: usize = 16 * 1024;

/// `POST /api/v1/enrolment-tokens`: a one-time token with which the device
/// `device_id`, and no other, enrols itself with a CSR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrolmentToken {
    pub device_id: DeviceId,
    pub hardware: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Lifetime in seconds; [`DEFAULT_ENROLMENT_TOKEN_TTL_SECONDS`] if absent,
    /// at most [`MAX_ENROLMENT_TOKEN_TTL_SECONDS`].
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// An enrolment token as `GET /api/v1/enrolment-tokens` lists it: never the
/// token nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentTokenInfo {
    pub id: String,
    pub device_id: DeviceId,
    pub hardware: String,
    pub tags: Vec<String>,
    /// Name of the operator token that created it.
    pub created_by: String,
    pub created_at: String,
    pub expires_at: String,
    /// When the device enrolled with it; a token is used once.
    pub used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// The answer to `POST /api/v1/enrolment-tokens`: the only time the token is
/// shown, with the CA the device must pin and its fingerprint, so the
/// operator can check the CA file the device receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedEnrolmentToken {
    pub token: String,
    #[serde(flatten)]
    pub info: EnrolmentTokenInfo,
    pub ca_pem: String,
    /// SHA-256 (lower-case hex) of the CA certificate's DER.
    pub ca_sha256: String,
}

/// `POST /v1/enrol` on the device endpoint (no client certificate needed):
/// a device's CSR, authorised by a one-time enrolment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrEnrolRequest {
    pub token: String,
    pub device_id: DeviceId,
    /// PKCS#10, PEM; a P-256 ECDSA or Ed25519 key. Only the public key is
    /// used: the server sets subject and extensions itself.
    pub csr_pem: String,
}

/// The answer to `POST /v1/enrol`: [`EnrollResponse`] without a private key,
/// which never left the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsrEnrolResponse {
    pub device_id: DeviceId,
    /// The hardware model the token stored the device with.
    pub hardware: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    pub trusted_signers: Vec<String>,
    /// See [`EnrollResponse::trusted_roots`].
    #[serde(default)]
    pub trusted_roots: Vec<String>,
    pub mqtt_url: String,
    pub device_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Admin.includes(Role::Operator));
        assert!(Role::Operator.includes(Role::Viewer));
        assert!(Role::Viewer.includes(Role::Viewer));
        assert!(!Role::Viewer.includes(Role::Operator));
        assert!(!Role::Operator.includes(Role::Admin));
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{role}\""));
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse("all"), Ok(Target::All));
        assert_eq!(
            Target::parse("fleet:line-2"),
            Ok(Target::Fleet("line-2".into()))
        );
        assert_eq!(
            Target::parse("device:d1").map(|t| t.to_string()),
            Ok("device:d1".into())
        );
        for bad in ["", "fleet:", "device:a/b", "tag:x", "ALL"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phases_are_map_keys() {
        let info = DeploymentInfo {
            deployment_id: "d".into(),
            release: "a@1.0.0".into(),
            target: "all".into(),
            created_at: String::new(),
            created_by: "admin".into(),
            devices: 2,
            phases: [(Phase::Installed, 2)].into(),
            complete: true,
            allow_downgrade: false,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""phases":{"installed":2}"#), "{json}");
        assert_eq!(serde_json::from_str::<DeploymentInfo>(&json).unwrap(), info);
    }
}
