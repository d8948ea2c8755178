//! The `archive` install handler: an application as a tar archive.
//!
//! Layout under `target_dir/<name>/`:
//!
//! ```text
//! versions/<version>/   one folder per kept version (the current and the previous)
//! current  -> versions/<version>    what runs
//! previous -> versions/<version>    what a rollback returns to (absent after a first install)
//! ```
//!
//! An install unpacks the payload (a tar archive, or a zstd-compressed one,
//! told apart by the zstd magic number) into a temporary sibling folder
//! `versions/.<version>.unpack`, checks every entry, syncs every file and
//! folder, renames the folder to `versions/<version>`, points `previous` at
//! the old `current`, then switches `current` with a rename of a new symlink
//! over it (atomic: `current` always names a complete version), syncs the
//! folder and prunes versions other than the current and the previous.
//!
//! Refused, with nothing left behind: entries with absolute paths or `..`,
//! symlinks whose target is absolute, leaves the version folder or does not
//! resolve to a path inside it once unpacked, hard links to paths outside
//! it, and device files, FIFOs and any other special entry.
//!
//! A rollback points `current` back at `previous` and removes the rolled
//! back version; after a first install it removes `current`, the state
//! before the install.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Component, Path, PathBuf};

use futures_util::future::BoxFuture;

use super::{InstallError, InstallRequest, Installer, io_error};
use crate::state::sync_dir;

/// The first four bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// The symlink naming the running version.
const CURRENT: &str = "current";
/// The symlink naming the version a rollback returns to.
const PREVIOUS: &str = "previous";
const VERSIONS: &str = "versions";

/// Unpacks tar payloads into versioned folders behind a `current` symlink.
#[derive(Debug, Clone)]
pub struct ArchiveInstaller {
    target_dir: PathBuf,
}

impl ArchiveInstaller {
    pub fn new(target_dir: impl Into<PathBuf>) -> Self {
        ArchiveInstaller {
            target_dir: target_dir.into(),
        }
    }
}

impl Installer for ArchiveInstaller {
    fn name(&self) -> &'static str {
        "archive"
    }

    fn install<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        super::on_blocking_pool(&self.target_dir, request, install_archive)
    }

    fn rollback<'a>(
        &'a self,
        request: &'a InstallRequest,
    ) -> BoxFuture<'a, Result<(), InstallError>> {
        super::on_blocking_pool(&self.target_dir, request, rollback_archive)
    }
}

fn install_archive(target_dir: &Path, request: &InstallRequest) -> Result<(), InstallError> {
    // The name was validated with the manifest and a semantic version has
    // no '/': both are single path components.
    let app = target_dir.join(&request.name);
    let versions = app.join(VERSIONS);
    let version = request.version.to_string();
    let current = version_of_link(&app.join(CURRENT))?;
    if current.as_deref() == Some(version.as_str()) && versions.join(&version).is_dir() {
        // A repeated install after a crash: `current` was switched already.
        return Ok(());
    }
    let app_existed = app.exists();
    std::fs::create_dir_all(&versions).map_err(io_error("cannot create", &versions))?;
    let unpack_dir = versions.join(format!(".{version}.unpack"));
    let result = unpack_checked(&request.payload, &unpack_dir);
    if let Err(error) = result {
        // Nothing of a refused or broken archive stays behind.
        let leftover = if app_existed { &unpack_dir } else { &app };
        if let Err(cleanup) = remove_dir_if_present(leftover) {
            tracing::warn!(%cleanup, "cannot remove a failed unpack");
        }
        return Err(error);
    }

    let final_dir = versions.join(&version);
    // A folder of this version that is not current is a leftover of an
    // earlier attempt: the fresh unpack replaces it.
    remove_dir_if_present(&final_dir)?;
    std::fs::rename(&unpack_dir, &final_dir).map_err(io_error("cannot rename", &unpack_dir))?;
    sync_dir(&versions).map_err(io_error("cannot sync", &versions))?;

    if let Some(old) = current.as_deref().filter(|old| *old != version) {
        switch_link(&app, PREVIOUS, old)?;
    }
    switch_link(&app, CURRENT, &version)?;
    sync_dir(&app).map_err(io_error("cannot sync", &app))?;

    // Keep the current and the previous version only; a failure here costs
    // disk space, not correctness.
    let previous = version_of_link(&app.join(PREVIOUS))?;
    if let Err(error) = prune(&versions, &version, previous.as_deref()) {
        tracing::warn!(%error, "cannot prune old versions");
    }
    Ok(())
}

fn rollback_archive(target_dir: &Path, request: &InstallRequest) -> Result<(), InstallError> {
    let app = target_dir.join(&request.name);
    let versions = app.join(VERSIONS);
    let version = request.version.to_string();
    let current = version_of_link(&app.join(CURRENT))?;
    match version_of_link(&app.join(PREVIOUS))? {
        Some(previous) => {
            switch_link(&app, CURRENT, &previous)?;
            remove_file_if_present(&app.join(PREVIOUS))?;
        }
        // A first install: the state before it had no `current`.
        None if current.as_deref() == Some(version.as_str()) => {
            remove_file_if_present(&app.join(CURRENT))?;
        }
        // Rolled back already (or never switched): nothing runs `version`.
        None => return Ok(()),
    }
    sync_dir(&app).map_err(io_error("cannot sync", &app))?;
    let now = version_of_link(&app.join(CURRENT))?;
    if now.as_deref() != Some(version.as_str()) {
        remove_dir_if_present(&versions.join(&version))?;
    }
    Ok(())
}

/// The version a `current` or `previous` symlink names (`versions/<v>`).
fn version_of_link(link: &Path) -> Result<Option<String>, InstallError> {
    match std::fs::read_link(link) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", link)(e)),
    }
}

/// Points `app/<name>` at `versions/<version>` atomically: a new symlink
/// renamed over the old one. The caller syncs `app`.
fn switch_link(app: &Path, name: &str, version: &str) -> Result<(), InstallError> {
    let temporary = app.join(format!(".{name}.tmp"));
    remove_file_if_present(&temporary)?;
    let target = Path::new(VERSIONS).join(version);
    symlink(&target, &temporary).map_err(io_error("cannot create", &temporary))?;
    let link = app.join(name);
    std::fs::rename(&temporary, &link).map_err(io_error("cannot replace", &link))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "the archive handler needs symlinks (Unix)",
    ))
}

/// Removes every version folder but `keep` and `previous`, and leftovers of
/// interrupted unpacks.
fn prune(versions: &Path, keep: &str, previous: Option<&str>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(versions)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == keep || Some(name.as_ref()) == previous {
            continue;
        }
        std::fs::remove_dir_all(entry.path())?;
    }
    sync_dir(versions)
}

fn remove_dir_if_present(dir: &Path) -> Result<(), InstallError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove", dir)(e)),
    }
}

fn remove_file_if_present(path: &Path) -> Result<(), InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove", path)(e)),
    }
}

/// Unpacks `payload` into the fresh folder `dir`, refusing unsafe entries,
/// then checks every symlink and syncs everything.
fn unpack_checked(payload: &Path, dir: &Path) -> Result<(), InstallError> {
    remove_dir_if_present(dir)?;
    std::fs::create_dir(dir).map_err(io_error("cannot create", dir))?;
    let mut file = File::open(payload).map_err(io_error("cannot open", payload))?;
    let mut magic = [0u8; 4];
    let read = read_up_to(&mut file, &mut magic).map_err(io_error("cannot read", payload))?;
    file.rewind().map_err(io_error("cannot read", payload))?;
    let reader: Box<dyn Read> = if read == magic.len() && magic == ZSTD_MAGIC {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(io_error("cannot read", payload))?)
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    // Modes are kept without set-id bits; owners are the agent's.
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    let unsafe_entry = InstallError::UnsafeArchive;
    let entries = archive
        .entries()
        .map_err(|e| unsafe_entry(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| unsafe_entry(format!("unreadable entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| unsafe_entry(format!("unreadable entry path: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        check_entry_path(&path).map_err(|reason| unsafe_entry(format!("{shown:?}: {reason}")))?;
        let link_name = || -> Result<PathBuf, InstallError> {
            entry
                .link_name()
                .ok()
                .flatten()
                .map(|name| name.into_owned())
                .ok_or_else(|| unsafe_entry(format!("{shown:?}: link without a target")))
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory => {}
            tar::EntryType::Symlink => {
                let target = link_name()?;
                check_symlink_target(&path, &target).map_err(|reason| {
                    unsafe_entry(format!(
                        "symlink {shown:?} -> {:?}: {reason}",
                        target.display().to_string()
                    ))
                })?;
            }
            tar::EntryType::Link => {
                let target = link_name()?;
                check_entry_path(&target).map_err(|reason| {
                    unsafe_entry(format!(
                        "hard link {shown:?} -> {:?}: {reason}",
                        target.display().to_string()
                    ))
                })?;
            }
            // `git archive` writes one; it carries no file.
            tar::EntryType::XGlobalHeader => continue,
            other => {
                return Err(unsafe_entry(format!(
                    "{shown:?}: entries of type {other:?} (devices, FIFOs, ...) are not installed"
                )));
            }
        }
        let unpacked = entry
            .unpack_in(dir)
            .map_err(|e| unsafe_entry(format!("{shown:?}: {e}")))?;
        if !unpacked {
            return Err(unsafe_entry(format!(
                "{shown:?}: outside the version folder"
            )));
        }
    }
    let root = dir
        .canonicalize()
        .map_err(io_error("cannot resolve", dir))?;
    check_and_sync_tree(&root, &root)
}

/// Reads until `buffer` is full or the input ends; the count read.
fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buffer.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A path inside the archive: relative, without `..`, not empty.
fn check_entry_path(path: &Path) -> Result<(), &'static str> {
    let mut normal = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => return Err("paths with `..` are refused"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are refused");
            }
        }
    }
    if normal == 0 {
        return Err("empty path");
    }
    Ok(())
}

/// A symlink target: relative, and inside the version folder when read from
/// the link's own folder. (Symlinked folders can still make a lexically
/// inside target point out; [`check_and_sync_tree`] resolves every link once
/// unpacked.)
fn check_symlink_target(link: &Path, target: &Path) -> Result<(), &'static str> {
    let mut depth: usize = link
        .parent()
        .map(|parent| {
            parent
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .count()
        })
        .unwrap_or(0);
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("the target leaves the version folder")?;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute targets are refused");
            }
        }
    }
    Ok(())
}

/// Walks the unpacked tree (never following symlinks): every symlink must
/// resolve to an existing path inside `root`; every file and folder is
/// synced.
fn check_and_sync_tree(root: &Path, dir: &Path) -> Result<(), InstallError> {
    let entries = std::fs::read_dir(dir).map_err(io_error("cannot read", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_error("cannot read", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_error("cannot read", &path))?;
        if kind.is_symlink() {
            let inside = path
                .canonicalize()
                .is_ok_and(|resolved| resolved.starts_with(root));
            if !inside {
                let shown = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                return Err(InstallError::UnsafeArchive(format!(
                    "symlink {shown:?} does not resolve to a path inside the version folder"
                )));
            }
        } else if kind.is_dir() {
            check_and_sync_tree(root, &path)?;
        } else {
            File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(io_error("cannot sync", &path))?;
        }
    }
    sync_dir(dir).map_err(io_error("cannot sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry for the tests, written with raw header fields so that
    /// hostile names (absolute, `..`) can be built too.
    enum Item<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Fifo(&'a str),
        CharDevice(&'a str),
    }

    fn tar_of(items: &[Item]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for item in items {
            let mut header = tar::Header::new_gnu();
            let (name, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match item {
                Item::File(name, data) => (name, tar::EntryType::Regular, data, None),
                Item::Dir(name) => (name, tar::EntryType::Directory, b"", None),
                Item::Symlink(name, to) => (name, tar::EntryType::Symlink, b"", Some(to)),
                Item::HardLink(name, to) => (name, tar::EntryType::Link, b"", Some(to)),
                Item::Fifo(name) => (name, tar::EntryType::Fifo, b"", None),
                Item::CharDevice(name) => (name, tar::EntryType::Char, b"", None),
            };
            let raw_name = &mut header.as_old_mut().name;
            raw_name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            if let Some(link) = link {
                header.set_link_name_literal(link).unwrap();
            }
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        target: PathBuf,
        payload: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            target: dir.path().join("apps"),
            payload: dir.path().join("payload"),
            _dir: dir,
        }
    }

    fn request(f: &Fixture, version: &str, payload: &[u8]) -> InstallRequest {
        std::fs::write(&f.payload, payload).unwrap();
        InstallRequest {
            deployment_id: "d1".into(),
            name: "web".into(),
            version: version.parse().unwrap(),
            kind: otter_proto::manifest::PackageKind::Application,
            payload: f.payload.clone(),
        }
    }

    fn app_tar(version: &str) -> Vec<u8> {
        tar_of(&[
            Item::Dir("bin"),
            Item::File("bin/run", version.as_bytes()),
            Item::Symlink("run", "bin/run"),
            Item::HardLink("bin/run-again", "bin/run"),
        ])
    }

    fn current_file(f: &Fixture) -> String {
        std::fs::read_to_string(f.target.join("web/current/run")).unwrap()
    }

    fn versions(f: &Fixture) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(f.target.join("web/versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn install(f: &Fixture, version: &str, payload: &[u8]) -> Result<(), InstallError> {
        install_archive(&f.target, &request(f, version, payload))
    }

    #[test]
    fn installs_switches_prunes_and_rolls_back() {
        let f = fixture();
        install(&f, "1.0.0", &app_tar("one")).unwrap();
        assert_eq!(current_file(&f), "one");
        assert_eq!(
            std::fs::read_link(f.target.join("web/current")).unwrap(),
            Path::new("versions/1.0.0")
        );
        assert!(!f.target.join("web/previous").exists());
        // A repeated install (after a crash) changes nothing.
        install(&f, "1.0.0", &app_tar("one")).unwrap();
        assert_eq!(versions(&f), ["1.0.0"]);

        install(&f, "2.0.0", &app_tar("two")).unwrap();
        assert_eq!(current_file(&f), "two");
        assert_eq!(
            std::fs::read_to_string(f.target.join("web/current/bin/run-again")).unwrap(),
            "two"
        );
        install(&f, "3.0.0", &app_tar("three")).unwrap();
        // Only the current and the previous version are kept.
        assert_eq!(versions(&f), ["2.0.0", "3.0.0"]);

        let three = request(&f, "3.0.0", b"");
        rollback_archive(&f.target, &three).unwrap();
        assert_eq!(current_file(&f), "two");
        assert_eq!(versions(&f), ["2.0.0"]);
        assert!(!f.target.join("web/previous").exists());
        // A second rollback is harmless.
        rollback_archive(&f.target, &three).unwrap();
        assert_eq!(current_file(&f), "two");
    }

    #[test]
    fn rollback_of_a_first_install_removes_it() {
        let f = fixture();
        install(&f, "1.0.0", &app_tar("one")).unwrap();
        rollback_archive(&f.target, &request(&f, "1.0.0", b"")).unwrap();
        assert!(std::fs::symlink_metadata(f.target.join("web/current")).is_err());
        assert!(versions(&f).is_empty());
    }

    #[test]
    fn zstd_compressed_archives_are_accepted() {
        let f = fixture();
        let compressed = zstd::encode_all(&app_tar("z")[..], 3).unwrap();
        install(&f, "1.0.0", &compressed).unwrap();
        assert_eq!(current_file(&f), "z");
    }

    /// Every refused entry kind fails the install with a reason naming it
    /// and leaves nothing: no version folder, no unpack leftovers, and the
    /// running version untouched.
    #[test]
    fn unsafe_entries_are_refused_and_leave_nothing() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "absolute path",
                tar_of(&[Item::File("/tmp/evil", b"x")]),
                "absolute",
            ),
            (
                "dot-dot path",
                tar_of(&[Item::File("a/../../evil", b"x")]),
                "..",
            ),
            (
                "absolute symlink",
                tar_of(&[Item::Symlink("etc", "/etc")]),
                "absolute targets",
            ),
            (
                "escaping symlink",
                tar_of(&[Item::Dir("a"), Item::Symlink("a/up", "../../..")]),
                "leaves the version folder",
            ),
            (
                // Lexically inside, but `x` is the version folder itself,
                // so `x/up` -> `..` is its parent.
                "symlink through a symlinked folder",
                tar_of(&[Item::Symlink("x", "."), Item::Symlink("x/up", "..")]),
                "does not resolve",
            ),
            (
                "dangling symlink",
                tar_of(&[Item::Symlink("gone", "nothing-here")]),
                "does not resolve",
            ),
            (
                "hard link outside",
                tar_of(&[Item::HardLink("passwd", "../../../etc/passwd")]),
                "hard link",
            ),
            (
                "absolute hard link",
                tar_of(&[Item::HardLink("passwd", "/etc/passwd")]),
                "hard link",
            ),
            ("fifo", tar_of(&[Item::Fifo("pipe")]), "Fifo"),
            ("device", tar_of(&[Item::CharDevice("null")]), "Char"),
            (
                "not a tar",
                b"this is not an archive at all".repeat(40),
                "refused",
            ),
        ];
        for (what, payload, expected) in cases {
            // First install refused: the application folder does not exist.
            let f = fixture();
            let mut archive = app_tar("bad");
            // The hostile entry comes after good ones, so the refusal has
            // something to clean up.
            archive.truncate(archive.len() - 1024);
            archive.extend_from_slice(&payload);
            let error = install(&f, "1.0.0", &archive).unwrap_err().to_string();
            assert!(error.contains(expected), "{what}: {error}");
            assert!(!f.target.join("web").exists(), "{what}: leftovers");

            // Refused over an installed version: that version keeps running.
            let f = fixture();
            install(&f, "1.0.0", &app_tar("one")).unwrap();
            let error = install(&f, "2.0.0", &archive).unwrap_err().to_string();
            assert!(error.contains(expected), "{what}: {error}");
            assert_eq!(current_file(&f), "one", "{what}");
            assert_eq!(versions(&f), ["1.0.0"], "{what}");
            assert!(!f.target.join("web/previous").exists(), "{what}");
        }
    }
}
