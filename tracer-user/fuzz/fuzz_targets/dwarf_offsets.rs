//! The DWARF offset reader: input = u32 length of `.debug_abbrev`, its
//! bytes, then `.debug_info`; plus the zlib inflater with a claimed size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use leaktrace::binary::golang::offsets::{inflate_zlib, struct_members_in};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let n = (u32::from_le_bytes(data[..4].try_into().unwrap()) as usize).min(data.len() - 4);
    let (abbrev, info) = data[4..].split_at(n);
    let load = |id: gimli::SectionId| -> anyhow::Result<Vec<u8>> {
        Ok(match id {
            gimli::SectionId::DebugAbbrev => abbrev.to_vec(),
            gimli::SectionId::DebugInfo => info.to_vec(),
            _ => Vec::new(),
        })
    };
    let _ = struct_members_in(load, &["runtime.g", "runtime.gobuf"]);
    // The same bytes as a compressed section claiming the length in its
    // first word (a lie, mostly).
    let claimed = u64::from(u32::from_le_bytes(data[..4].try_into().unwrap())) << (data.get(4).copied().unwrap_or(0) % 40);
    let _ = inflate_zlib(".debug_info", &data[4..], claimed);
});
