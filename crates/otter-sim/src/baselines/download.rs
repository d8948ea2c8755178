//! The HTTPS download loop shared by the nginx baseline and the measurement
//! of Otter's device endpoint, so the ratio compares servers, not clients:
//! `concurrency` workers share one reqwest client (rustls, aws-lc-rs, the
//! caller's mutual-TLS configuration, kept-alive connections) and take the
//! next URL until none is left, streaming each body and counting its bytes
//! without keeping them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::DownloadBaseline;

/// A read that stalls this long fails the run rather than hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Downloads every URL of `urls` once, `concurrency` at a time, with
/// `client_tls` (which must present the client certificate the server
/// requires). Fails on any non-success status or transport error.
pub async fn https_download(
    urls: Vec<String>,
    client_tls: rustls::ClientConfig,
    concurrency: usize,
) -> anyhow::Result<DownloadBaseline> {
    anyhow::ensure!(concurrency > 0, "concurrency must be at least 1");
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls)
        .pool_max_idle_per_host(concurrency)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .build()
        .context("cannot build the HTTPS client")?;
    let urls = Arc::new(urls);
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(urls.len().max(1)) {
        let (client, urls, next, bytes) =
            (client.clone(), urls.clone(), next.clone(), bytes.clone());
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(url) = urls.get(index) else {
                    return anyhow::Ok(());
                };
                let mut response = client
                    .get(url)
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                let status = response.status();
                anyhow::ensure!(status.is_success(), "GET {url}: {status}");
                let mut received = 0u64;
                while let Some(piece) = response
                    .chunk()
                    .await
                    .with_context(|| format!("reading {url}"))?
                {
                    received += piece.len() as u64;
                }
                bytes.fetch_add(received, Ordering::Relaxed);
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a download worker panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = bytes.load(Ordering::Relaxed);
    Ok(DownloadBaseline {
        concurrency,
        bytes,
        secs,
        bytes_per_sec: if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
    })
}
