//! Arbitrary bytes as x86-64 code at an arbitrary address: the syscall-site
//! walk, the allocator result and probe-place analyses, Go's prologue and
//! RET finders.
#![no_main]

use iced_x86::Register;
use libfuzzer_sys::fuzz_target;
use leaktrace::binary::x86::go_cheap_entry;
use leaktrace::stacks::syscall_sites::sites_in_function;
use leaktrace::trackers::{allocations::{plan, results}, locks};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let entry = u64::from_le_bytes(data[..8].try_into().unwrap());
    let code = &data[8..];
    let _ = sites_in_function(code, entry);
    let _ = results::plan(code, entry);
    let _ = plan::probe_delta(code, entry, &[Register::RDI, Register::RSI], true);
    let _ = plan::probe_delta(code, entry, &[Register::RDI], false);
    let _ = go_cheap_entry(code, entry);
    let _ = locks::golang::rets(code, entry);
});
