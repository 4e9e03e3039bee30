//! Where a libc syscall wrapper keeps its return address when it traps.
//!
//! A stack taken in a syscall tracepoint starts inside the libc wrapper
//! (`connect`, `socket`...), which has no frame of its own, so the
//! frame-pointer walk jumps from the wrapper to its caller's caller: the
//! function that called `connect` is lost. We
//! disassemble each wrapper (iced-x86), follow the stack pointer along every
//! path from its entry to each `syscall` instruction, and give the kernel
//! side the offset of the return address from `sp` at that instruction. The
//! BPF program reads it from the user stack: no uprobe, no trap.

use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, Result};

use crate::{
    binary::{
        elf::{self, Segments},
        x86::{self, Reached},
    },
    procfs::MemoryMap,
};

/// libc functions whose callers the trackers need.
pub const WRAPPERS: &[&str] = &[
    "socket", "connect", "accept", "accept4", "__libc_connect", "__libc_accept", "mmap", "mmap64",
    // The fd tracker's: every libc function that makes a new fd.
    "open", "open64", "__libc_open64", "openat", "openat64", "creat", "creat64", "pipe", "pipe2", "socketpair",
    "dup", "dup2", "dup3", "fcntl", "fcntl64", "__libc_fcntl64", "epoll_create", "epoll_create1", "eventfd",
    "timerfd_create", "signalfd", "inotify_init", "inotify_init1", "fanotify_init", "memfd_create", "pidfd_open",
    "pidfd_getfd", "recvmsg", "__libc_recvmsg",
];

/// One `syscall` instruction: address just after it (what the kernel sees
/// as the user ip) and the return address's offset from `sp` there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallSite {
    pub ip_after: u64,
    pub ret_offset: u32,
}

/// Finds the syscall sites of [`WRAPPERS`] in every libc the process maps,
/// or in its executable when it is static (glibc linked in).
pub fn find_in_process(pid: u32, map: &MemoryMap) -> Result<Vec<SyscallSite>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let static_exe = if map.is_static() { crate::procfs::exe_path(pid) } else { None };
    let holds_wrappers = |m: &&crate::procfs::Mapping| is_libc(&m.path) || Some(&m.path) == static_exe.as_ref();
    for m in map.mappings.iter().filter(|m| m.executable).filter(holds_wrappers) {
        if !seen.insert(m.path.clone()) {
            continue;
        }
        let path = crate::procfs::object_path(pid, m);
        let data = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = object::File::parse(&*data).context("libc is not a valid ELF")?;
        let Some(bias) = Segments::of(&file).load_bias(m) else { continue };
        for site in sites_in_elf(&data, WRAPPERS)? {
            out.push(SyscallSite { ip_after: site.ip_after.wrapping_add(bias), ret_offset: site.ret_offset });
        }
    }
    Ok(out)
}

pub fn is_libc(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
}

/// Syscall sites of the named functions in an ELF image, at ELF virtual
/// addresses.
pub fn sites_in_elf(data: &[u8], names: &[&str]) -> Result<Vec<SyscallSite>> {
    let file = object::File::parse(data).context("not a valid ELF")?;
    let mut funcs: HashMap<u64, u64> = HashMap::new();
    for sym in elf::text_symbols(&file).filter(|s| s.size != 0 && names.contains(&s.name)) {
        funcs.insert(sym.addr, sym.size);
    }
    let segments = Segments::of(&file);
    let mut out = Vec::new();
    for (addr, size) in funcs {
        let Some(bytes) = segments.function_bytes(data, addr, size) else { continue };
        out.extend(sites_in_function(bytes, addr));
    }
    out.sort_by_key(|s| s.ip_after);
    out.dedup();
    Ok(out)
}

/// Follows every path through one function from its entry, tracking how far
/// `sp` is below the entry `sp` (where the return address is), and returns
/// each `syscall` reached with a known depth. Paths that set `sp` some other
/// way are abandoned rather than guessed.
pub fn sites_in_function(code: &[u8], entry: u64) -> Vec<SyscallSite> {
    let end = entry.saturating_add(code.len() as u64);
    let within = |a: u64| (a >= entry && a < end).then(|| &code[(a - entry) as usize..]);
    let mut out = Vec::new();
    x86::walk_sp(within, entry, usize::MAX, |reached, sp| {
        if let Reached::Syscall { ip_after } = reached {
            if sp.depth >= 0 {
                out.push(SyscallSite { ip_after, ret_offset: sp.depth as u32 });
            }
        }
        true
    });
    out.sort_by_key(|s| s.ip_after);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc 2.36's `connect`: a fast path that traps with the return address
    /// at [sp], and a cancellable path that traps 0x18 bytes deeper.
    #[test]
    fn follows_both_paths_of_a_cancellable_wrapper() {
        let code: &[u8] = &[
            0x80, 0x3d, 0x21, 0x0e, 0x0d, 0x00, 0x00, // cmpb $0,rip+..      +0
            0x74, 0x17, // je +32                                            +7
            0xb8, 0x2a, 0x00, 0x00, 0x00, // mov $0x2a,%eax                  +9
            0x0f, 0x05, // syscall                                           +14
            0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff, // cmp $-4096,%rax           +16
            0x77, 0x58, // ja +112                                           +22
            0xc3, // ret                                                     +24
            0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00, // nopl               +25
            0x48, 0x83, 0xec, 0x18, // sub $0x18,%rsp                        +32
            0xb8, 0x2a, 0x00, 0x00, 0x00, // mov $0x2a,%eax                  +36
            0x0f, 0x05, // syscall                                           +41
            0x48, 0x83, 0xc4, 0x18, // add $0x18,%rsp                        +43
            0xc3, // ret                                                     +47
        ];
        let sites = sites_in_function(code, 0x1000);
        assert_eq!(
            sites,
            vec![
                SyscallSite { ip_after: 0x1000 + 16, ret_offset: 0 },
                SyscallSite { ip_after: 0x1000 + 43, ret_offset: 0x18 },
            ]
        );
    }

    /// The libc on this machine has sites for every wrapper we need.
    #[test]
    fn finds_sites_in_system_libc() {
        let path = "/lib/x86_64-linux-gnu/libc.so.6";
        let Ok(data) = fs::read(path) else { return };
        let sites = sites_in_elf(&data, &["socket", "connect"]).unwrap();
        assert!(sites.len() >= 3, "{sites:?}");
        assert!(sites.iter().any(|s| s.ret_offset == 0));
    }
}
