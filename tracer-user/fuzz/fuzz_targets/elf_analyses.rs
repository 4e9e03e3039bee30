//! Any file as an ELF: section checks (what blazesym is handed), symbols,
//! segments, and every analysis leaktrace runs on a library or executable
//! (syscall sites, allocator probes, lock sites, Go lock probes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use object::Object;
use leaktrace::binary::elf::{check_sections, data_symbols, text_symbols, Segments};
use leaktrace::stacks::syscall_sites::sites_in_elf;
use leaktrace::trackers::{allocations::plan, locks};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = object::File::parse(data) else { return };
    let _ = check_sections(&file, data.len() as u64);
    let segments = Segments::of(&file);
    for s in text_symbols(&file).take(4096) {
        let _ = segments.function_bytes(data, s.addr, s.size);
        let _ = segments.code_at(data, s.addr);
        let _ = segments.offset_of_vaddr(s.addr).map(|o| segments.vaddr_of_offset(o));
    }
    let _ = data_symbols(&file);
    let _ = file.entry();
    let _ = sites_in_elf(data, &["connect", "socket", "accept4", "close"]);
    let _ = plan::allocator_probes(data, "");
    let _ = plan::operator_new_probes(data);
    let _ = locks::sites::lock_sites_in_elf(data);
    let _ = locks::golang::go_probes(data);
});
