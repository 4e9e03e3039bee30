//! Any file as a Go executable, as the goroutine, map and lock trackers
//! read it: build info, pc table, `g` offsets (DWARF or table), allgs and
//! wait reasons found by disassembly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use leaktrace::binary::golang::{text_functions, GoRuntime};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(rt)) = GoRuntime::parse(data) {
        let _ = rt.function("runtime.main");
        let _ = rt.code(rt.allgs, 64);
    }
    if let Ok(file) = object::File::parse(data) {
        let _ = text_functions(&file);
    }
});
