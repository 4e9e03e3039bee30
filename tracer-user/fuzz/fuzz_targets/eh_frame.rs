//! An object's call frame information as the unwinder reads it: raw
//! `.eh_frame` / `.eh_frame_hdr` bytes (also read as a `.debug_frame`) at
//! given addresses, and a rule asked for at every FDE's start, middle and
//! end and at a few addresses of the input's choosing.
//! Input: the `.eh_frame`, `.eh_frame_hdr` and `.text` addresses (8 bytes
//! LE each), the header's length (4), the `.eh_frame_hdr` bytes, then the
//! `.eh_frame` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use leaktrace::stacks::unwind::ObjectCfi;

fuzz_target!(|data: &[u8]| {
    let u64_at = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let (Some(eh_svma), Some(hdr_svma), Some(text_svma)) = (u64_at(0), u64_at(8), u64_at(16)) else { return };
    let Some(hdr_len) = data.get(24..28).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize) else { return };
    let rest = &data[28..];
    let (hdr, eh) = rest.split_at(hdr_len.min(rest.len()));
    let cfi = ObjectCfi::from_sections(
        Some((eh_svma, eh.to_vec())),
        (!hdr.is_empty()).then(|| (hdr_svma, hdr.to_vec())),
        Some((0, eh.to_vec())),
        text_svma,
    );
    let mut at: Vec<u64> = Vec::new();
    for (start, len) in cfi.fde_ranges(256) {
        at.extend([start, start.wrapping_add(len / 2), start.wrapping_add(len).wrapping_sub(1), start.wrapping_add(len)]);
    }
    at.extend([0, 1, text_svma, eh_svma, u64::MAX]);
    for a in at {
        let _ = cfi.rule(a, false);
        let _ = cfi.rule(a, true);
    }
    let _ = cfi.size();
    let _ = cfi.has_cfi();
});
