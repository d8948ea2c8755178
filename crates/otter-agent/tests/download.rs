//! The resumable downloader against a real HTTPS server with mutual TLS on
//! 127.0.0.1: resume with Range after a cut connection, final refusals
//! without retry, a server that ignores Range, a wrong Content-Range, a
//! bounded number of attempts, and a body longer than declared.
//!
//! Layout: helpers (a downloader, one download, the resume scenario run
//! with different part files and server scripts), then the tests.

mod support;

use std::path::Path;
use std::time::Duration;

use otter_agent::download::{DownloadError, DownloadPolicy, Downloader};
use support::{Answer, Pki, TestServer, pseudo_random_bytes};
use tokio_util::sync::CancellationToken;

/// The well-behaved answer: the body, honouring Range, never cut.
const SERVE_ALL: Answer = Answer::Body {
    honour_range: true,
    cut_after: None,
};

fn downloader(pki: &Pki, max_attempts: u32) -> Downloader {
    Downloader::new(
        pki.device_tls().https_config().unwrap(),
        DownloadPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        },
    )
    .unwrap()
}

/// Downloads `path` from `server` into `destination`, expecting
/// `expected_size` bytes, with at most `max_attempts` attempts.
async fn download(
    pki: &Pki,
    max_attempts: u32,
    server: &TestServer,
    path: &str,
    destination: &Path,
    expected_size: u64,
) -> Result<(), DownloadError> {
    let link = server.url(path);
    downloader(pki, max_attempts)
        .download(
            &move || link.clone(),
            destination,
            expected_size,
            &CancellationToken::new(),
        )
        .await
}

fn ranges(server: &TestServer) -> Vec<Option<u64>> {
    server.seen().iter().map(|r| r.range_start).collect()
}

/// A download that starts with `part_file(body)` already on disk, against a
/// server answering by `script`, ends with exactly the body after requests
/// whose Range starts are `expected_ranges`.
async fn assert_resumed_download(
    size: usize,
    seed: u64,
    part_file: impl FnOnce(&[u8]) -> Vec<u8>,
    script: impl Fn(usize, Option<u64>) -> Answer + Send + Sync + 'static,
    expected_ranges: Vec<Option<u64>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(size, seed);
    let destination = dir.path().join("artifact.part");
    std::fs::write(&destination, part_file(&body)).unwrap();
    let server = TestServer::start(&pki, body.clone(), script).await;
    download(&pki, 3, &server, "/a", &destination, body.len() as u64)
        .await
        .unwrap();
    assert!(std::fs::read(&destination).unwrap() == body);
    assert_eq!(ranges(&server), expected_ranges);
}

#[tokio::test]
async fn resumes_with_range_after_a_cut_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(200_000, 1);
    const CUT: usize = 70_000;
    let server = TestServer::start(&pki, body.clone(), |index, _| Answer::Body {
        honour_range: true,
        cut_after: (index == 0).then_some(CUT),
    })
    .await;
    let destination = dir.path().join("artifact.part");
    download(
        &pki,
        3,
        &server,
        "/v1/download/abc",
        &destination,
        body.len() as u64,
    )
    .await
    .unwrap();
    assert!(
        std::fs::read(&destination).unwrap() == body,
        "content differs"
    );
    assert_eq!(ranges(&server), vec![None, Some(CUT as u64)]);
    let seen = server.seen();
    assert!(
        seen.iter()
            .all(|r| r.client_certificate && r.path == "/v1/download/abc")
    );
}

#[tokio::test]
async fn resumes_from_a_part_file_left_by_an_earlier_run() {
    assert_resumed_download(
        50_000,
        2,
        |body| body[..12_345].to_vec(),
        |_, _| SERVE_ALL,
        vec![Some(12_345)],
    )
    .await;
}

#[tokio::test]
async fn gone_is_final_without_retry() {
    for status in [410u16, 403, 404] {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path());
        let server = TestServer::start(&pki, Vec::new(), move |_, _| Answer::Status(status)).await;
        let error = download(&pki, 5, &server, "/gone", &dir.path().join("a.part"), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(error, DownloadError::Refused { status: s, .. } if s == status),
            "{status}: {error}"
        );
        assert_eq!(server.seen().len(), 1, "{status} was retried");
    }
}

#[tokio::test]
async fn a_server_ignoring_range_restarts_from_zero() {
    // Wrong bytes on disk: only a full restart can end with the right file.
    assert_resumed_download(
        40_000,
        3,
        |_| vec![0xAA; 10_000],
        |_, _| Answer::Body {
            honour_range: false,
            cut_after: None,
        },
        vec![Some(10_000)],
    )
    .await;
}

#[tokio::test]
async fn a_partial_answer_from_the_wrong_offset_restarts_from_zero() {
    assert_resumed_download(
        30_000,
        4,
        |body| body[..5_000].to_vec(),
        |index, _| {
            if index == 0 {
                Answer::PartialFrom(100)
            } else {
                SERVE_ALL
            }
        },
        vec![Some(5_000), None],
    )
    .await;
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let server = TestServer::start(&pki, Vec::new(), |_, _| Answer::Status(503)).await;
    let error = download(&pki, 4, &server, "/busy", &dir.path().join("a.part"), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, DownloadError::GaveUp { attempts: 4, .. }),
        "{error}"
    );
    assert_eq!(server.seen().len(), 4);
}

#[tokio::test]
async fn more_bytes_than_declared_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(20_000, 5);
    let server = TestServer::start(&pki, body, |_, _| SERVE_ALL).await;
    let destination = dir.path().join("a.part");
    let error = download(&pki, 3, &server, "/a", &destination, 10_000)
        .await
        .unwrap_err();
    assert!(
        matches!(error, DownloadError::Oversized { expected: 10_000 }),
        "{error}"
    );
    assert_eq!(std::fs::metadata(&destination).unwrap().len(), 0);
}

#[tokio::test]
async fn a_server_with_another_ca_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::create(other_dir.path());
    let server = TestServer::start(&other, vec![1; 10], |_, _| SERVE_ALL).await;
    let error = download(&pki, 2, &server, "/a", &dir.path().join("a.part"), 10)
        .await
        .unwrap_err();
    assert!(matches!(error, DownloadError::GaveUp { .. }), "{error}");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    assert!(server.seen().is_empty());
}
