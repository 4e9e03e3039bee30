//! A `.go.buildinfo` section's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use leaktrace::binary::golang::buildinfo::{version_string, GoVersion};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = version_string(data) {
        let _ = GoVersion::parse(&s);
    }
    let _ = GoVersion::parse(&String::from_utf8_lossy(data));
});
