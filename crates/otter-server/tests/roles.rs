//! Operator tokens and roles against the whole server in-process (port 0,
//! real HTTP, a real SQLite file): every route of the API's route table
//! refuses a missing, unknown or revoked token (401) and a role too weak
//! (403) without changing anything; tokens are created, listed and revoked
//! by admins only, stored as SHA-256 only, and the last admin token stays.
//!
//! The refusal test walks `otter_server::api::route_table()`, so a route
//! added to the table is checked without editing this file.

mod common;

use otter_proto::api::{
    ActorKind, AuditEntry, CreatedToken, DeploymentInfo, ReleaseInfo, Role, TokenInfo,
};
use otter_server::api::{Access, RouteMethod, RouteSpec, route_table, token_sha256};
use reqwest::StatusCode;

use common::{HARDWARE, Server, error_code, package, payload};

/// Creates a token with the admin token (asserting 201); returns it.
async fn create_token(server: &Server, name: &str, role: Role) -> String {
    let response = server
        .post_json(
            "/api/v1/tokens",
            serde_json::json!({ "name": name, "role": role }),
        )
        .await;
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "create token {name}"
    );
    let created: CreatedToken = response.json().await.unwrap();
    assert_eq!((created.name.as_str(), created.role), (name, role));
    created.token
}

/// Everything an API request could change, read with the admin token.
#[derive(Debug, PartialEq)]
struct Snapshot {
    devices: Vec<serde_json::Value>,
    releases: Vec<ReleaseInfo>,
    deployments: Vec<DeploymentInfo>,
    tokens: Vec<TokenInfo>,
    audit: Vec<AuditEntry>,
}

async fn snapshot(server: &Server) -> Snapshot {
    Snapshot {
        devices: server.get_json("/api/v1/devices").await,
        releases: server.get_json("/api/v1/releases").await,
        deployments: server.get_json("/api/v1/deployments").await,
        tokens: server.get_json("/api/v1/tokens").await,
        audit: server.get_json("/api/v1/audit?limit=10000").await,
    }
}

/// What a request needs beyond its route: existing ids for path
/// parameters, and a valid body for each write, so that a refused request
/// would have changed something had it been let through.
struct Fixture {
    device_id: String,
    release_id: String,
    deployment_id: String,
    /// A token the requests may try to revoke.
    victim_token: String,
    /// Bytes of a valid package not uploaded yet.
    new_package: Vec<u8>,
    /// An unused enrolment token the requests may try to revoke.
    enrolment_token_id: String,
    /// A certificate of the server's factory CA, not imported yet.
    factory_certificate: String,
    /// A signer revocation list signed by the server's root (revoking an
    /// unrelated key).
    revocation_list: serde_json::Value,
}

impl Fixture {
    fn path(&self, spec: &RouteSpec) -> String {
        match spec.path {
            "/api/v1/devices/{id}" => format!("/api/v1/devices/{}", self.device_id),
            "/api/v1/devices/{id}/revoke" => {
                format!("/api/v1/devices/{}/revoke", self.device_id)
            }
            "/api/v1/releases/{id}" => format!("/api/v1/releases/{}", self.release_id),
            "/api/v1/deployments/{id}" => format!("/api/v1/deployments/{}", self.deployment_id),
            "/api/v1/tokens/{name}" => format!("/api/v1/tokens/{}", self.victim_token),
            "/api/v1/enrolment-tokens/{id}" => {
                format!("/api/v1/enrolment-tokens/{}", self.enrolment_token_id)
            }
            // A route added later: any value reaches the guard.
            other => other.replace(['{', '}'], ""),
        }
    }

    fn request(
        &self,
        server: &Server,
        spec: &RouteSpec,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let url = server.url(&self.path(spec));
        let mut request = server.http.request(spec.method.as_method(), url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        match (spec.method, spec.path) {
            (RouteMethod::Get, _) | (RouteMethod::Delete, _) => request,
            (RouteMethod::Put, _) => request.json(&self.revocation_list),
            (RouteMethod::Post, "/api/v1/releases") => request
                .header("content-type", "application/octet-stream")
                .body(self.new_package.clone()),
            (RouteMethod::Post, "/api/v1/devices") => request.json(&serde_json::json!({
                "device_id": "dev-new", "hardware": HARDWARE, "tags": ["line-1"]
            })),
            (RouteMethod::Post, "/api/v1/devices/batch") => {
                request.json(&serde_json::json!({ "devices": [
                    { "device_id": "dev-batch-1", "hardware": HARDWARE },
                    { "device_id": "dev-batch-2", "hardware": HARDWARE },
                ]}))
            }
            (RouteMethod::Post, "/api/v1/deployments") => request.json(&serde_json::json!({
                "release": self.release_id, "target": format!("device:{}", self.device_id)
            })),
            (RouteMethod::Post, "/api/v1/enrolment-tokens") => request.json(&serde_json::json!({
                "device_id": "dev-csr", "hardware": HARDWARE
            })),
            (RouteMethod::Post, "/api/v1/devices/import") => {
                request.json(&serde_json::json!({ "devices": [
                    { "certificate_pem": self.factory_certificate, "hardware": HARDWARE },
                ]}))
            }
            (RouteMethod::Post, "/api/v1/tokens") => {
                request.json(&serde_json::json!({ "name": "intruder", "role": "admin" }))
            }
            (RouteMethod::Post, _) => request.json(&serde_json::json!({})),
        }
    }
}

/// A server with a release, an enrolled device, a deployment, and a viewer
/// and an operator token besides the admin's.
async fn populated_server() -> (Server, Fixture, String, String) {
    let factory = common::FactoryCa::new("Factory CA");
    let dir = tempfile::tempdir().unwrap();
    let factory_ca = dir.path().join("factory-ca.pem");
    std::fs::write(&factory_ca, &factory.pem).unwrap();
    let server = Server::start_configured(dir, |config| config.device_cas = vec![factory_ca]).await;
    let (release, _) = server.upload_release("fw", "1.0.0", &payload(64)).await;
    server.enroll("dev-1", &["line-1"]).await;
    let deployment = server.deploy(&release.id, "device:dev-1").await;
    let viewer = create_token(&server, "watcher", Role::Viewer).await;
    let operator = create_token(&server, "ops", Role::Operator).await;
    create_token(&server, "spare", Role::Viewer).await;
    let enrolment_token: otter_proto::api::CreatedEnrolmentToken = server
        .post_json(
            "/api/v1/enrolment-tokens",
            serde_json::json!({ "device_id": "dev-waiting", "hardware": HARDWARE }),
        )
        .await
        .json()
        .await
        .unwrap();
    let enrolment_token_id = enrolment_token.info.id;
    let new_package = package(
        &server.signer(),
        server.dir.path(),
        "fw",
        "2.0.0",
        &payload(32),
    );
    let fixture = Fixture {
        device_id: "dev-1".into(),
        release_id: release.id,
        deployment_id: deployment.deployment_id,
        victim_token: "spare".into(),
        new_package,
        enrolment_token_id,
        factory_certificate: factory.issue("dev-factory").0,
        revocation_list: revocation_list(&server),
    };
    (server, fixture, viewer, operator)
}

/// A list revoking a key nobody uses, signed by the server's root.
fn revocation_list(server: &Server) -> serde_json::Value {
    let unrelated = ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key();
    let (list, _) = otter_package::trust::revoke(
        &common::root_key(server.dir.path()),
        None,
        &otter_package::keys::key_id(&unrelated),
        "test",
        0,
    )
    .unwrap();
    serde_json::to_value(list).unwrap()
}

#[test]
fn route_table_follows_the_role_policy() {
    let table = route_table();
    let public: Vec<&str> = table
        .iter()
        .filter(|spec| spec.access == Access::Public)
        .map(|spec| spec.path)
        .collect();
    assert_eq!(public, ["/api/v1/health", "/metrics"]);
    for spec in &table {
        let Access::Role(required) = spec.access else {
            continue;
        };
        let expected = if spec.path.starts_with("/api/v1/tokens")
            || (spec.path == "/api/v1/signer-revocations" && spec.method == RouteMethod::Put)
        {
            Role::Admin
        } else if spec.method == RouteMethod::Get {
            Role::Viewer
        } else {
            Role::Operator
        };
        assert_eq!(required, expected, "{:?} {}", spec.method, spec.path);
    }
    for (index, spec) in table.iter().enumerate() {
        assert!(
            !table[..index]
                .iter()
                .any(|other| other.method == spec.method && other.path == spec.path),
            "{:?} {} twice",
            spec.method,
            spec.path
        );
    }
}

#[tokio::test]
async fn every_route_refuses_missing_tokens_and_weak_roles_without_changes() {
    let (server, fixture, viewer, operator) = populated_server().await;
    let before = snapshot(&server).await;
    let tokens = [
        (Role::Viewer, viewer.as_str()),
        (Role::Operator, operator.as_str()),
    ];

    for spec in route_table() {
        let what = format!("{:?} {}", spec.method, spec.path);
        let required = match spec.access {
            Access::Public => {
                let response = fixture.request(&server, &spec, None).send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{what}");
                continue;
            }
            Access::Role(required) => required,
        };
        for token in [None, Some("otter_not-a-token"), Some("")] {
            let response = fixture.request(&server, &spec, token).send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{what} {token:?}"
            );
            assert_eq!(error_code(response).await, "unauthorized", "{what}");
        }
        for (role, token) in tokens {
            let allowed = role.includes(required);
            if allowed && spec.method != RouteMethod::Get {
                // Writes by strong enough roles are tried by the admin below.
                continue;
            }
            let response = fixture
                .request(&server, &spec, Some(token))
                .send()
                .await
                .unwrap();
            if allowed {
                let status = response.status();
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{what} as {role}: {status}"
                );
                continue;
            }
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{what} as {role}");
            let body: otter_proto::api::ErrorBody = response.json().await.unwrap();
            assert_eq!(body.error, "forbidden", "{what}");
            assert!(body.message.contains(role.as_str()), "{}", body.message);
        }
    }
    assert_eq!(snapshot(&server).await, before);

    // The same requests do change the state when the role allows them: the
    // refusals above were the roles', not the requests'.
    for spec in route_table() {
        if spec.method == RouteMethod::Get {
            continue;
        }
        let response = fixture
            .request(&server, &spec, Some(&server.token))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{:?} {} as admin: {}",
            spec.method,
            spec.path,
            response.text().await.unwrap()
        );
    }
    let after = snapshot(&server).await;
    assert_eq!(after.devices.len(), before.devices.len() + 4); // enrol, a batch of two, an import of one
    assert_eq!(after.releases.len(), before.releases.len() + 1);
    assert_eq!(after.deployments.len(), before.deployments.len() + 1);
    assert_eq!(after.tokens.len(), before.tokens.len() + 1);
}

#[tokio::test]
async fn operator_deploys_under_its_name_but_cannot_manage_tokens() {
    let server = Server::start().await;
    let (release, _) = server.upload_release("fw", "1.0.0", &payload(64)).await;
    let operator = create_token(&server, "ops-alice", Role::Operator).await;
    let post = |path: &str, body: serde_json::Value| {
        server
            .http
            .post(server.url(path))
            .bearer_auth(&operator)
            .json(&body)
            .send()
    };

    let enrolled = post(
        "/api/v1/devices",
        serde_json::json!({ "device_id": "dev-1", "hardware": HARDWARE }),
    )
    .await
    .unwrap();
    assert_eq!(enrolled.status(), StatusCode::CREATED);
    let deployed = post(
        "/api/v1/deployments",
        serde_json::json!({ "release": release.id, "target": "device:dev-1" }),
    )
    .await
    .unwrap();
    assert_eq!(deployed.status(), StatusCode::CREATED);
    let deployment: DeploymentInfo = deployed.json().await.unwrap();
    assert_eq!(deployment.created_by, "ops-alice");

    let audit = server.audit("limit=10000").await;
    for event in [
        "device.enrolled",
        "deployment.created",
        "deployment.targeted",
    ] {
        let row = audit
            .iter()
            .find(|row| row.event == event)
            .unwrap_or_else(|| panic!("no {event} row"));
        assert_eq!(row.actor_kind, ActorKind::Operator, "{event}");
        assert_eq!(row.actor, "ops-alice", "{event}");
    }

    let tokens_before: Vec<TokenInfo> = server.get_json("/api/v1/tokens").await;
    let create = post(
        "/api/v1/tokens",
        serde_json::json!({ "name": "mine", "role": "admin" }),
    )
    .await
    .unwrap();
    assert_eq!(create.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(create).await, "forbidden");
    for request in [
        server.http.get(server.url("/api/v1/tokens")),
        server.http.delete(server.url("/api/v1/tokens/admin")),
    ] {
        let response = request.bearer_auth(&operator).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    let tokens_after: Vec<TokenInfo> = server.get_json("/api/v1/tokens").await;
    assert_eq!(tokens_after, tokens_before);
}

#[tokio::test]
async fn revoked_token_is_refused_from_the_next_request() {
    let server = Server::start().await;
    let token = create_token(&server, "ci", Role::Viewer).await;
    let get_devices = || {
        server
            .http
            .get(server.url("/api/v1/devices"))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get_devices().await.unwrap().status(), StatusCode::OK);

    let revoked = server
        .http
        .delete(server.url("/api/v1/tokens/ci"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let revoked: TokenInfo = revoked.json().await.unwrap();
    assert_eq!((revoked.name.as_str(), revoked.role), ("ci", Role::Viewer));
    assert!(revoked.revoked_at.is_some());

    let refused = get_devices().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(refused).await, "unauthorized");

    // Both changes are audited under the admin token's name.
    let audit = server.audit("limit=10000").await;
    for event in ["token.created", "token.revoked"] {
        let row = audit
            .iter()
            .find(|row| row.event == event)
            .unwrap_or_else(|| panic!("no {event} row"));
        assert_eq!(row.actor, "admin", "{event}");
        assert_eq!(row.details["token"], "ci", "{event}");
        assert_eq!(row.details["role"], "viewer", "{event}");
    }

    // A second revocation, an unknown name and a reused name are refused
    // and change nothing.
    let tokens_before: Vec<TokenInfo> = server.get_json("/api/v1/tokens").await;
    let audit_before = audit.len();
    for (name, status, code) in [
        ("ci", StatusCode::CONFLICT, "token-revoked"),
        ("nobody", StatusCode::NOT_FOUND, "unknown-token"),
    ] {
        let response = server
            .http
            .delete(server.url(&format!("/api/v1/tokens/{name}")))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(error_code(response).await, code, "{name}");
    }
    let reused = server
        .post_json(
            "/api/v1/tokens",
            serde_json::json!({ "name": "ci", "role": "viewer" }),
        )
        .await;
    assert_eq!(reused.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(reused).await, "token-exists");
    assert_eq!(
        server.get_json::<Vec<TokenInfo>>("/api/v1/tokens").await,
        tokens_before
    );
    assert_eq!(server.audit("limit=10000").await.len(), audit_before);

    // The revocation survives a restart.
    let dir = server.stop().await;
    let server = Server::start_configured(dir, |_| {}).await;
    let refused = server
        .http
        .get(server.url("/api/v1/devices"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_last_active_admin_token_cannot_be_revoked() {
    let server = Server::start().await;
    let revoke = |name: &'static str, token: String| {
        server
            .http
            .delete(server.url(&format!("/api/v1/tokens/{name}")))
            .bearer_auth(token)
            .send()
    };
    let refused = revoke("admin", server.token.clone()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(refused).await, "last-admin");
    assert_eq!(server.get("/api/v1/tokens").await.status(), StatusCode::OK);

    // With a second admin the first can go; then the second is the last.
    let second = create_token(&server, "root-2", Role::Admin).await;
    create_token(&server, "ops", Role::Operator).await;
    let revoked = revoke("admin", second.clone()).await.unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(
        server.get("/api/v1/tokens").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let refused = revoke("root-2", second.clone()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(refused).await, "last-admin");
    let listed: Vec<TokenInfo> = server
        .http
        .get(server.url("/api/v1/tokens"))
        .bearer_auth(&second)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let active_admins: Vec<&str> = listed
        .iter()
        .filter(|t| t.role == Role::Admin && t.revoked_at.is_none())
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(active_admins, ["root-2"]);
}

#[tokio::test]
async fn tokens_are_shown_once_and_stored_as_hashes_only() {
    let server = Server::start().await;
    let token = create_token(&server, "reader", Role::Viewer).await;
    assert!(token.starts_with("otter_") && token.len() > 40, "{token}");
    assert_ne!(token, create_token(&server, "reader-2", Role::Viewer).await);

    let listing = server.get("/api/v1/tokens").await;
    assert_eq!(listing.status(), StatusCode::OK);
    let text = listing.text().await.unwrap();
    assert!(!text.contains(&token));
    assert!(!text.contains(&token_sha256(&token)));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for entry in &listed {
        let mut keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(keys, ["created_at", "name", "revoked_at", "role"]);
    }

    // No file of the data directory holds the token itself.
    let mut folders = vec![server.data_dir()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                    "{} holds the token",
                    path.display()
                );
            }
        }
    }

    // Bad requests are refused with a clear error and store nothing.
    let before: Vec<TokenInfo> = server.get_json("/api/v1/tokens").await;
    for body in [
        serde_json::json!({ "name": "a/b", "role": "viewer" }),
        serde_json::json!({ "name": "", "role": "viewer" }),
        serde_json::json!({ "name": "x", "role": "root" }),
        serde_json::json!({ "name": "x" }),
        serde_json::json!({ "name": "x", "role": "viewer", "token": "chosen" }),
    ] {
        let response = server.post_json("/api/v1/tokens", body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
    }
    assert_eq!(
        server.get_json::<Vec<TokenInfo>>("/api/v1/tokens").await,
        before
    );
}
