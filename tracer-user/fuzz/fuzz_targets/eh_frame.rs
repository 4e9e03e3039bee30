//! An object's call frame information as the unwinder reads it: raw
//! `.eh_frame` / `.eh_frame_hdr` bytes (also read as a `.debug_frame`) at
//! given addresses, and a rule asked for at every FDE's start, middle and
//! end and at a few addresses of the input's choosing.
//! Input: the `.eh_frame`, `.eh_frame_hdr` and `.text` addresses (8 bytes
//! LE each), the header's length (4), the `.eh_frame_hdr` bytes, then the
//! `.eh_frame` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| leaktrace::stacks::unwind::ask_rules_of_fuzz_input(data));
