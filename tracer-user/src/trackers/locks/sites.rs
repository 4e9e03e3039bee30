//! Where glibc's lock functions keep their return addresses when they make a
//! futex call, found by disassembling libc from its exported lock functions.
//!
//! Debian's libc has no frame pointers and uses `rbp` as a plain register,
//! so a stack taken at the futex syscall inside `__lll_lock_wait` skips the
//! application function that called `pthread_mutex_lock`, and under an
//! rwlock walks garbage. From each exported root (`pthread_mutex_lock`,
//! `pthread_rwlock_wrlock`, `pthread_cond_wait`, `pthread_join`...) we follow
//! every path (iced-x86), tracking how far `sp` is below the function's
//! return-address slot and where it saved the caller's `rbp`, into the
//! internal helpers it calls (two levels: `__lll_lock_wait`,
//! `__futex_abstimed_wait_common`, ...). Each `syscall` and each `call` gets
//! a [`LockSite`]; the kernel side follows them from the syscall to the
//! application's return address and frame pointer, and learns which root
//! the call was made under (mutex vs condvar vs join) on the way. Only
//! exported names are needed, so a stripped libc works.

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{Context, Result};
use tracer_common::locks::{root, LockSite};

use crate::binary::{
    elf::{self, Segments},
    x86::{self, Reached},
};

/// Exported libc functions the analysis starts from, and what they are.
pub const ROOTS: &[(&str, u32)] = &[
    ("pthread_mutex_lock", root::MUTEX_LOCK),
    ("pthread_mutex_timedlock", root::MUTEX_LOCK),
    ("pthread_mutex_clocklock", root::MUTEX_LOCK),
    ("pthread_mutex_unlock", root::MUTEX_UNLOCK),
    ("pthread_rwlock_rdlock", root::RWLOCK_READ),
    ("pthread_rwlock_timedrdlock", root::RWLOCK_READ),
    ("pthread_rwlock_clockrdlock", root::RWLOCK_READ),
    ("pthread_rwlock_wrlock", root::RWLOCK_WRITE),
    ("pthread_rwlock_timedwrlock", root::RWLOCK_WRITE),
    ("pthread_rwlock_clockwrlock", root::RWLOCK_WRITE),
    ("pthread_rwlock_unlock", root::RWLOCK_UNLOCK),
    ("pthread_cond_wait", root::COND_WAIT),
    ("pthread_cond_timedwait", root::COND_WAIT),
    ("pthread_cond_clockwait", root::COND_WAIT),
    ("pthread_join", root::JOIN),
    ("pthread_timedjoin_np", root::JOIN),
    ("pthread_clockjoin_np", root::JOIN),
];

/// Levels of internal helpers followed below a root.
const MAX_LEVEL: u32 = 2;
/// Instructions decoded per function at most (bounds the work).
const MAX_INSNS: usize = 20_000;

/// Sites at ELF virtual addresses (add the load bias for the process).
#[derive(Debug, Default, Clone)]
pub struct LockSites {
    /// Address after a `syscall` -> its site.
    pub syscalls: HashMap<u64, LockSite>,
    /// Address after a `call` (a return address) -> its site.
    pub calls: HashMap<u64, LockSite>,
    /// Per recorded address: its distance from the entry it was explored
    /// from. Code reached from the nearest entry below it wins: decoding
    /// that runs past a call to a function that never returns reaches the
    /// next function with the wrong depth.
    rank: HashMap<u64, u64>,
    /// Functions that never return (exported names): a path ends at a call to one.
    noreturn: HashSet<u64>,
}

/// Analyses a libc image.
pub fn lock_sites_in_elf(data: &[u8]) -> Result<LockSites> {
    let file = object::File::parse(data).context("not a valid ELF")?;
    let segments = Segments::of(&file);
    let text = |addr: u64| segments.code_at(data, addr);
    let mut roots: Vec<(u64, u32)> = Vec::new();
    let mut out = LockSites::default();
    for sym in elf::text_symbols(&file).filter(|s| s.addr != 0) {
        if NORETURN.contains(&sym.name) {
            out.noreturn.insert(sym.addr);
        }
        if let Some((_, r)) = ROOTS.iter().find(|(n, _)| *n == sym.name) {
            roots.push((sym.addr, *r));
        }
    }
    roots.sort();
    roots.dedup();
    let mut queue: VecDeque<(u64, u32)> = VecDeque::new();
    let mut explored: HashSet<u64> = HashSet::new();
    for &(addr, r) in &roots {
        explore(&text, addr, r, &mut out, &mut |t| queue.push_back((t, 1)));
    }
    while let Some((addr, level)) = queue.pop_front() {
        if !explored.insert(addr) || roots.iter().any(|(a, _)| *a == addr) {
            continue;
        }
        let mut next = Vec::new();
        explore(&text, addr, root::NONE, &mut out, &mut |t| next.push(t));
        if level < MAX_LEVEL {
            queue.extend(next.into_iter().map(|t| (t, level + 1)));
        }
    }
    Ok(out)
}

/// Exported functions that never return.
const NORETURN: &[&str] = &["abort", "__assert_fail", "__stack_chk_fail", "__fortify_fail", "__libc_fatal", "exit", "_exit"];

fn record(table: &mut HashMap<u64, LockSite>, rank: &mut HashMap<u64, u64>, ip: u64, entry: u64, mut site: LockSite) {
    let r = ip.wrapping_sub(entry);
    let old = table.get(&ip).copied();
    if let Some(old) = old {
        let old_rank = rank.get(&ip).copied().unwrap_or(u64::MAX);
        let same_frame = old.depth == site.depth && old.rbp_at == site.rbp_at;
        if old_rank <= r {
            // A root's own code wins over the same code reached as a helper.
            if same_frame && old.root == root::NONE && site.root != root::NONE {
                table.insert(ip, LockSite { root: site.root, ..old });
            }
            return;
        }
        if same_frame && site.root == root::NONE {
            site.root = old.root;
        }
    }
    table.insert(ip, site);
    rank.insert(ip, r);
}

/// Follows every path from `entry`, recording syscalls and calls; direct
/// call targets are handed to `callee`. Jumps are followed wherever they go
/// (a tail call keeps the same return-address slot).
fn explore<'d>(text: &dyn Fn(u64) -> Option<&'d [u8]>, entry: u64, r: u32, out: &mut LockSites, callee: &mut dyn FnMut(u64)) {
    x86::walk_sp(text, entry, MAX_INSNS, |reached, sp| {
        let site = LockSite { depth: sp.depth as u32, root: r, rbp_at: sp.rbp_at as u32, _pad: 0 };
        match reached {
            Reached::Syscall { ip_after } => {
                if sp.depth >= 0 {
                    record(&mut out.syscalls, &mut out.rank, ip_after, entry, site);
                }
            }
            Reached::Call { ip_after, target } => {
                if sp.depth >= 0 {
                    record(&mut out.calls, &mut out.rank, ip_after, entry, site);
                }
                if let Some(t) = target {
                    if out.noreturn.contains(&t) {
                        return false;
                    }
                    callee(t);
                }
            }
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc on this machine: the mutex slow path's syscall is reached from
    /// pthread_mutex_lock through a call whose frame is 0x18 deep, and
    /// rwlock/cond/join roots are told apart on their call sites.
    #[test]
    fn system_libc_lock_paths() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else { return };
        let sites = lock_sites_in_elf(&data).unwrap();
        assert!(sites.syscalls.len() >= 4, "{sites:?}");
        let roots: HashSet<u32> = sites.calls.values().chain(sites.syscalls.values()).map(|s| s.root).collect();
        for r in [root::MUTEX_LOCK, root::MUTEX_UNLOCK, root::RWLOCK_WRITE, root::COND_WAIT, root::JOIN] {
            assert!(roots.contains(&r), "root {r} missing: {roots:?}");
        }
        assert!(sites.calls.values().any(|s| s.root == root::MUTEX_LOCK && s.depth == 0x18));
        assert!(sites.syscalls.len() + sites.calls.len() < tracer_common::locks::MAX_LOCK_SITES as usize);
    }

    #[test]
    fn tracks_rbp_saves_and_tail_jumps() {
        // push rbp; push rbx; sub $8,%rsp; syscall; add $8,%rsp; pop rbx; pop rbp; ret
        let code: &[u8] = &[0x55, 0x53, 0x48, 0x83, 0xec, 0x08, 0x0f, 0x05, 0x48, 0x83, 0xc4, 0x08, 0x5b, 0x5d, 0xc3];
        let text = |a: u64| (0x1000..0x1000 + code.len() as u64).contains(&a).then(|| &code[(a - 0x1000) as usize..]);
        let mut out = LockSites::default();
        explore(&text, 0x1000, root::MUTEX_LOCK, &mut out, &mut |_| {});
        assert_eq!(out.syscalls.get(&0x1008), Some(&LockSite { depth: 0x18, root: root::MUTEX_LOCK, rbp_at: 8, _pad: 0 }));
    }
}
