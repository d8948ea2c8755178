//! A small client for the operator REST API: bearer token, JSON in and out,
//! and the server's `{ "error", "message" }` bodies turned into messages a
//! person can act on.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use otter_proto::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cli::Global;

pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(global: &Global) -> anyhow::Result<Self> {
        let token = match (&global.token, &global.token_file) {
            (Some(token), _) => token.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_owned(),
            (None, None) => bail!(
                "no operator token: pass --token or --token-file, or set OTTER_TOKEN or \
                 OTTER_TOKEN_FILE (the server writes an admin token to DATA_DIR/admin.token)"
            ),
        };
        if token.is_empty() {
            bail!("the operator token is empty");
        }
        let base = global.server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server must be an http:// or https:// URL, got {base:?}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(ApiClient { base, token, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.http.get(self.url(path)).bearer_auth(&self.token);
        self.send(request).await
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    pub async fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    /// Sends `body` as JSON with the operator token.
    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
            .json(body);
        self.send(request).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.http.delete(self.url(path)).bearer_auth(&self.token);
        self.send(request).await
    }

    /// Streams a file as the request body.
    pub async fn post_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &Path,
    ) -> anyhow::Result<T> {
        let handle = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let length = handle.metadata().await?.len();
        let request = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(reqwest::Body::from(handle));
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the server at {}: {e}", self.base))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .context("the server's answer was cut off")?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) => anyhow!(
                    "{} ({}, HTTP {})",
                    error.message,
                    error.error,
                    status.as_u16()
                ),
                Err(_) => anyhow!("the server answered HTTP {status}"),
            });
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("unexpected answer from the server (HTTP {status})"))
    }
}
