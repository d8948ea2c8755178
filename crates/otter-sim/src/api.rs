//! A small client for the operator REST API, with what the simulator and the
//! benchmark need: batch enrolment, release upload, deployments, the device
//! listing, the audit (paged by sequence number) and the `/metrics` text.
//!
//! Error answers (`{ "error", "message" }`) become [`ApiError::Status`] with
//! the server's code and message, so a refusal reads as the server meant it.

use std::time::Duration;

use otter_proto::api::{
    AuditEntry, BatchEnrollRequest, BatchEnrollResponse, CreateDeployment, DeploymentInfo,
    DeploymentStatus, DeviceInfo, EnrollResponse, ErrorBody, MAX_BATCH_ENROLL, ReleaseInfo,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Time allowed for one API request (a batch of 10,000 enrolments issues
/// 10,000 certificates).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Rows asked for per audit page (the server's maximum).
pub const AUDIT_PAGE: usize = 10_000;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {path}: {source}")]
    Transport {
        method: &'static str,
        path: String,
        source: reqwest::Error,
    },
    #[error("{method} {path}: the server answered {status}: {code}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        code: String,
        message: String,
    },
}

/// The operator API of one server.
#[derive(Debug, Clone)]
pub struct OperatorClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl OperatorClient {
    /// `base` is `http://host:port`; `token` an operator token.
    pub fn new(base: &str, token: &str) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| ApiError::Transport {
                method: "-",
                path: base.to_owned(),
                source,
            })?;
        Ok(OperatorClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let transport = |source| ApiError::Transport {
            method,
            path: path.to_owned(),
            source,
        };
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let (code, message) = match serde_json::from_str::<ErrorBody>(&body) {
                Ok(error) => (error.error, error.message),
                Err(_) => ("-".to_owned(), body),
            };
            return Err(ApiError::Status {
                method,
                path: path.to_owned(),
                status: status.as_u16(),
                code,
                message,
            });
        }
        response.json().await.map_err(transport)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send("GET", path, request).await
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send("POST", path, request).await
    }

    /// Enrols every device of `request`, in calls of at most
    /// [`MAX_BATCH_ENROLL`]; answers in request order.
    pub async fn enroll_batch(
        &self,
        request: BatchEnrollRequest,
    ) -> Result<Vec<EnrollResponse>, ApiError> {
        let mut enrolled = Vec::with_capacity(request.devices.len());
        for chunk in request.devices.chunks(MAX_BATCH_ENROLL) {
            let answer: BatchEnrollResponse = self
                .post_json(
                    "/api/v1/devices/batch",
                    &BatchEnrollRequest {
                        devices: chunk.to_vec(),
                    },
                )
                .await?;
            enrolled.extend(answer.devices);
        }
        Ok(enrolled)
    }

    /// Uploads a package file's bytes.
    pub async fn upload_release(&self, package: Vec<u8>) -> Result<ReleaseInfo, ApiError> {
        let path = "/api/v1/releases";
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .body(package);
        self.send("POST", path, request).await
    }

    /// Commits `release` (`name@version`) to `target` (`fleet:TAG`, ...).
    pub async fn create_deployment(
        &self,
        release: &str,
        target: &str,
    ) -> Result<DeploymentInfo, ApiError> {
        self.post_json(
            "/api/v1/deployments",
            &CreateDeployment {
                release: release.to_owned(),
                target: target.to_owned(),
                allow_downgrade: false,
            },
        )
        .await
    }

    pub async fn deployment(&self, deployment_id: &str) -> Result<DeploymentStatus, ApiError> {
        self.get(&format!("/api/v1/deployments/{deployment_id}"))
            .await
    }

    /// Devices carrying `tag`.
    pub async fn devices(&self, tag: &str) -> Result<Vec<DeviceInfo>, ApiError> {
        self.get(&format!("/api/v1/devices?tag={tag}")).await
    }

    /// One page of audit rows after sequence number `after`, optionally of
    /// one deployment.
    pub async fn audit_page(
        &self,
        after: i64,
        deployment_id: Option<&str>,
    ) -> Result<Vec<AuditEntry>, ApiError> {
        let mut path = format!("/api/v1/audit?after={after}&limit={AUDIT_PAGE}");
        if let Some(deployment_id) = deployment_id {
            path.push_str(&format!("&deployment={deployment_id}"));
        }
        self.get(&path).await
    }

    /// Every audit row (of one deployment, when given), page by page.
    pub async fn audit_all(
        &self,
        deployment_id: Option<&str>,
    ) -> Result<Vec<AuditEntry>, ApiError> {
        let mut entries = Vec::new();
        let mut after = 0;
        loop {
            let page = self.audit_page(after, deployment_id).await?;
            let Some(last) = page.last() else {
                return Ok(entries);
            };
            after = last.seq;
            let full = page.len() == AUDIT_PAGE;
            entries.extend(page);
            if !full {
                return Ok(entries);
            }
        }
    }

    /// The Prometheus text of `GET /metrics` (no token needed, but sent).
    pub async fn metrics_text(&self) -> Result<String, ApiError> {
        let path = "/metrics";
        let transport = |source| ApiError::Transport {
            method: "GET",
            path: path.to_owned(),
            source,
        };
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(ApiError::Status {
                method: "GET",
                path: path.to_owned(),
                status: status.as_u16(),
                code: "-".to_owned(),
                message: text,
            });
        }
        Ok(text)
    }
}
