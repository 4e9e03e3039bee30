//! User-side stack code: where a libc wrapper keeps its caller's return
//! address (`syscall_sites`), addresses to frames (`symbolize`), and stack
//! keys to symbolized frames, cached (`resolve`).

pub mod resolve;
pub mod symbolize;
pub mod syscall_sites;
