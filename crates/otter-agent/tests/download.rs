//! The resumable downloader against a real HTTPS server with mutual TLS on
//! 127.0.0.1: resume with Range after a cut connection, final refusals
//! without retry, a server that ignores Range, a wrong Content-Range, a
//! bounded number of attempts, and a body longer than declared.

mod support;

use std::time::Duration;

use otter_agent::download::{DownloadError, DownloadPolicy, Downloader};
use support::{Answer, Pki, TestServer, pseudo_random_bytes};
use tokio_util::sync::CancellationToken;

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

fn ranges(server: &TestServer) -> Vec<Option<u64>> {
    server.seen().iter().map(|r| r.range_start).collect()
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
    let link = server.url("/v1/download/abc");
    downloader(&pki, 3)
        .download(
            &move || link.clone(),
            &destination,
            body.len() as u64,
            &CancellationToken::new(),
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
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(50_000, 2);
    let destination = dir.path().join("artifact.part");
    std::fs::write(&destination, &body[..12_345]).unwrap();
    let server = TestServer::start(&pki, body.clone(), |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    })
    .await;
    let link = server.url("/a");
    downloader(&pki, 3)
        .download(
            &move || link.clone(),
            &destination,
            body.len() as u64,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(&destination).unwrap() == body);
    assert_eq!(ranges(&server), vec![Some(12_345)]);
}

#[tokio::test]
async fn gone_is_final_without_retry() {
    for status in [410u16, 403, 404] {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path());
        let server = TestServer::start(&pki, Vec::new(), move |_, _| Answer::Status(status)).await;
        let link = server.url("/gone");
        let error = downloader(&pki, 5)
            .download(
                &move || link.clone(),
                &dir.path().join("a.part"),
                10,
                &CancellationToken::new(),
            )
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
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(40_000, 3);
    let destination = dir.path().join("artifact.part");
    // Wrong bytes on disk: only a full restart can end with the right file.
    std::fs::write(&destination, vec![0xAA; 10_000]).unwrap();
    let server = TestServer::start(&pki, body.clone(), |_, _| Answer::Body {
        honour_range: false,
        cut_after: None,
    })
    .await;
    let link = server.url("/a");
    downloader(&pki, 3)
        .download(
            &move || link.clone(),
            &destination,
            body.len() as u64,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(&destination).unwrap() == body);
    assert_eq!(ranges(&server), vec![Some(10_000)]);
}

#[tokio::test]
async fn a_partial_answer_from_the_wrong_offset_restarts_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let body = pseudo_random_bytes(30_000, 4);
    let destination = dir.path().join("artifact.part");
    std::fs::write(&destination, &body[..5_000]).unwrap();
    let server = TestServer::start(&pki, body.clone(), |index, _| {
        if index == 0 {
            Answer::PartialFrom(100)
        } else {
            Answer::Body {
                honour_range: true,
                cut_after: None,
            }
        }
    })
    .await;
    let link = server.url("/a");
    downloader(&pki, 3)
        .download(
            &move || link.clone(),
            &destination,
            body.len() as u64,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(&destination).unwrap() == body);
    assert_eq!(ranges(&server), vec![Some(5_000), None]);
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let server = TestServer::start(&pki, Vec::new(), |_, _| Answer::Status(503)).await;
    let link = server.url("/busy");
    let error = downloader(&pki, 4)
        .download(
            &move || link.clone(),
            &dir.path().join("a.part"),
            10,
            &CancellationToken::new(),
        )
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
    let server = TestServer::start(&pki, body, |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    })
    .await;
    let link = server.url("/a");
    let destination = dir.path().join("a.part");
    let error = downloader(&pki, 3)
        .download(
            &move || link.clone(),
            &destination,
            10_000,
            &CancellationToken::new(),
        )
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
    let server = TestServer::start(&other, vec![1; 10], |_, _| Answer::Body {
        honour_range: true,
        cut_after: None,
    })
    .await;
    let link = server.url("/a");
    let error = downloader(&pki, 2)
        .download(
            &move || link.clone(),
            &dir.path().join("a.part"),
            10,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, DownloadError::GaveUp { .. }), "{error}");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    assert!(server.seen().is_empty());
}
