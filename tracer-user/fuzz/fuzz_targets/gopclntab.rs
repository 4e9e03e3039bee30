//! A `.gopclntab` section's bytes: parse, list the functions, look up pcs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use leaktrace::binary::golang::Pclntab;

fuzz_target!(|data: &[u8]| {
    let text = 0x401000;
    let Ok(t) = Pclntab::parse(data.to_vec(), text) else { return };
    let mut entries = Vec::new();
    for (_, entry, end) in t.functions().take(1 << 16) {
        entries.push(entry);
        entries.push(end.wrapping_sub(1));
    }
    for pc in entries.into_iter().take(256).chain([0, text, text + 0x10, u64::MAX]) {
        let _ = t.lookup(pc);
    }
    let _ = t.function_range("runtime.main");
});
