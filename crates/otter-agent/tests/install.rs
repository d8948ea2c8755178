//! Install handlers on real files and real processes: the file handler's
//! atomic replace and kept previous version, the command handler's
//! placeholders, failure with stderr, and timeout; both handlers' rollback.

use std::path::Path;
use std::time::Duration;

use otter_agent::install::{
    CommandInstaller, FileInstaller, InstallError, InstallRequest, Installer,
};
use otter_proto::manifest::PackageKind;

fn request(payload: &Path, version: &str) -> InstallRequest {
    InstallRequest {
        deployment_id: "dep-1".into(),
        name: "sensor-fw".into(),
        version: semver::Version::parse(version).unwrap(),
        kind: PackageKind::Firmware,
        payload: payload.to_owned(),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn file_installer_replaces_atomically_and_keeps_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("deep/installed");
    let installer = FileInstaller::new(&target);
    let first = dir.path().join("payload-1");
    std::fs::write(&first, b"version one").unwrap();
    installer.install(&request(&first, "1.0.0")).await.unwrap();
    assert_eq!(
        std::fs::read(target.join("sensor-fw")).unwrap(),
        b"version one"
    );
    assert_eq!(names(&target), vec!["sensor-fw"]);

    let second = dir.path().join("payload-2");
    std::fs::write(&second, b"version two").unwrap();
    installer.install(&request(&second, "2.0.0")).await.unwrap();
    assert_eq!(
        std::fs::read(target.join("sensor-fw")).unwrap(),
        b"version two"
    );
    assert_eq!(
        std::fs::read(target.join("sensor-fw.previous")).unwrap(),
        b"version one"
    );
    assert_eq!(names(&target), vec!["sensor-fw", "sensor-fw.previous"]);
    // The payload in the landing zone is copied, not moved.
    assert_eq!(std::fs::read(&second).unwrap(), b"version two");
}

#[tokio::test]
async fn file_installer_with_a_missing_payload_leaves_the_target_alone() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("installed");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("sensor-fw"), b"old").unwrap();
    let error = FileInstaller::new(&target)
        .install(&request(&dir.path().join("missing"), "2.0.0"))
        .await
        .unwrap_err();
    assert!(matches!(error, InstallError::Io { .. }), "{error}");
    assert!(error.to_string().contains("missing"), "{error}");
    assert_eq!(std::fs::read(target.join("sensor-fw")).unwrap(), b"old");
    assert_eq!(names(&target), vec!["sensor-fw"]);
}

#[tokio::test]
async fn command_installer_substitutes_placeholders() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload");
    std::fs::write(&payload, b"bits").unwrap();
    let out = dir.path().join("out.txt");
    let script = format!(
        "printf '%s|%s|%s|%s' \"$1\" \"$2\" \"$3\" \"$OTTER_DEPLOYMENT_ID\" > {}; cat \"$1\" >> {}",
        out.display(),
        out.display()
    );
    let installer = CommandInstaller::new(
        vec![
            "sh".into(),
            "-c".into(),
            script,
            "sh".into(),
            "{payload}".into(),
            "name={name}".into(),
            "v{version}".into(),
        ],
        Duration::from_secs(10),
    );
    installer
        .install(&request(&payload, "1.2.3"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("{}|name=sensor-fw|v1.2.3|dep-1bits", payload.display())
    );
}

#[tokio::test]
async fn command_installer_failure_carries_the_stderr_tail() {
    let dir = tempfile::tempdir().unwrap();
    let installer = CommandInstaller::new(
        vec![
            "sh".into(),
            "-c".into(),
            "i=0; while [ $i -lt 500 ]; do echo noise $i >&2; i=$((i+1)); done; echo 'flash: device busy' >&2; exit 3".into(),
        ],
        Duration::from_secs(10),
    );
    let error = installer
        .install(&request(&dir.path().join("p"), "1.0.0"))
        .await
        .unwrap_err();
    let InstallError::CommandFailed {
        status,
        stderr_tail,
    } = &error
    else {
        panic!("unexpected error {error}");
    };
    assert!(status.contains('3'), "{status}");
    assert!(stderr_tail.ends_with("flash: device busy"), "{stderr_tail}");
    assert!(stderr_tail.len() <= otter_agent::install::STDERR_TAIL_BYTES);
    assert!(!stderr_tail.contains("noise 0\n"), "tail kept the head");
}

#[tokio::test]
async fn command_installer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let installer = CommandInstaller::new(
        vec!["sleep".into(), "30".into()],
        Duration::from_millis(200),
    );
    let started = std::time::Instant::now();
    let error = installer
        .install(&request(&dir.path().join("p"), "1.0.0"))
        .await
        .unwrap_err();
    assert!(matches!(error, InstallError::Timeout(_)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn command_installer_missing_program_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let installer = CommandInstaller::new(
        vec!["/nonexistent/otter-flash".into()],
        Duration::from_secs(1),
    );
    let error = installer
        .install(&request(&dir.path().join("p"), "1.0.0"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("otter-flash"), "{error}");
}

#[tokio::test]
async fn file_installer_rolls_back_to_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("installed");
    let installer = FileInstaller::new(&target);
    let first = dir.path().join("payload-1");
    std::fs::write(&first, b"version one").unwrap();
    installer.install(&request(&first, "1.0.0")).await.unwrap();
    let second = dir.path().join("payload-2");
    std::fs::write(&second, b"version two").unwrap();
    installer.install(&request(&second, "2.0.0")).await.unwrap();

    installer
        .rollback(&request(&second, "2.0.0"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("sensor-fw")).unwrap(),
        b"version one"
    );
    assert_eq!(names(&target), vec!["sensor-fw"]);

    // A first install rolled back leaves no file: the state before it.
    let other = tempfile::tempdir().unwrap();
    let installer = FileInstaller::new(other.path());
    installer.install(&request(&first, "1.0.0")).await.unwrap();
    installer.rollback(&request(&first, "1.0.0")).await.unwrap();
    assert!(names(other.path()).is_empty());
    // Twice is harmless.
    installer.rollback(&request(&first, "1.0.0")).await.unwrap();
}

#[tokio::test]
async fn command_installer_rolls_back_with_its_rollback_command_or_says_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let payload = dir.path().join("payload");
    std::fs::write(&payload, b"x").unwrap();
    let script = |word: &str| {
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo {word} $0 $1 >> {}", log.display()),
            "{name}".to_owned(),
            "{version}".to_owned(),
        ]
    };
    let installer = CommandInstaller::new(script("install"), Duration::from_secs(10))
        .with_rollback(script("rollback"));
    let request = request(&payload, "2.0.0");
    installer.install(&request).await.unwrap();
    installer.rollback(&request).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "install sensor-fw 2.0.0\nrollback sensor-fw 2.0.0\n"
    );

    let without = CommandInstaller::new(script("install"), Duration::from_secs(10));
    let error = without.rollback(&request).await.unwrap_err();
    assert!(
        matches!(error, InstallError::NoRollback("command")),
        "{error}"
    );
    assert_eq!(error.to_string(), "the command handler cannot roll back");
}
