//! A package file, as the server reads an upload and the CLI inspects one:
//! `read_header`, then `open_package` (signature, artifact size and
//! SHA-256).
//!
//! Properties:
//! - `read_header` never panics and stops exactly at the end of the header
//!   the file declares (the artifact starts there);
//! - a header that parses survives `write_header` → `read_header`
//!   unchanged;
//! - a file `open_package` accepts has its artifact where `read_header`
//!   stopped, matching the signed manifest in size and SHA-256.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use otter_fuzz_support::trusted_key;
use otter_fuzz_support::unpack_case::digest;
use otter_package::format::{MAGIC, open_package, read_header, write_header};
use otter_package::sign::verify_manifest;

/// One scratch file per fuzzing process, overwritten by every input.
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("otter-fuzz-package-{}.otter", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let Ok(header) = read_header(&mut rest) else {
        return;
    };
    let header_end = data.len() - rest.len();
    let declared = data
        .get(MAGIC.len()..MAGIC.len() + 4)
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(u32::from_be_bytes)
        .expect("a header that parses has its length");
    assert_eq!(header_end, MAGIC.len() + 4 + declared as usize);

    let mut rewritten = Vec::new();
    write_header(&mut rewritten, &header).expect("a header that was read can be written");
    let again = read_header(&mut &rewritten[..]).expect("a written header reads back");
    assert_eq!(again.signed_manifest, header.signed_manifest);
    assert_eq!(again.data_key.as_bytes(), header.data_key.as_bytes());

    // Only inputs with a well-formed header reach the file system.
    let trusted = [trusted_key().verifying_key()];
    if std::fs::write(scratch_path(), data).is_err() {
        return;
    }
    if let Ok(opened) = open_package(scratch_path(), &trusted) {
        assert_eq!(opened.artifact_offset, header_end as u64);
        assert_eq!(digest(rest), opened.manifest.artifact);
        assert_eq!(opened.header.signed_manifest, header.signed_manifest);
        let verified = verify_manifest(&header.signed_manifest, &trusted)
            .expect("open_package accepted this signature");
        assert_eq!(verified, opened.manifest);
    }
});
