//! A package file as uploaded to the server or inspected by the CLI.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = otter_package::format::read_header(&mut &data[..]);
});
