//! Go `sync.Mutex` / `sync.RWMutex` contention through the runtime's
//! semaphore entry points, which run only when a lock must wait (acquire)
//! or an unlock has waiters to wake (release). Their fast paths are inlined
//! atomics and never reach these functions.
//!
//! Probe placement (`binary::x86::go_cheap_entry`): never at +0 (`CMPQ SP,
//! 16(R14)` is single-stepped, ~17 µs) but at the first emulated instruction
//! of the prologue: `PUSHQ BP` (Go 1.21+), else the stack-check's
//! conditional jump (Go 1.19's prologue is `SUBQ; MOVQ BP; LEAQ`, all
//! single-stepped). The wait ends at each RET (single-stepped, but only
//! under contention). No uretprobes: they crash Go programs.

use anyhow::{Context, Result};
use iced_x86::Mnemonic;
use crate::binary::{elf::Segments, golang::text_functions, x86::{go_cheap_entry, linear}};

/// Role of a probed Go function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `runtime_SemacquireMutex`: sync.Mutex (and RWMutex before Go 1.21).
    AcquireMutex,
    /// `runtime_SemacquireRWMutexR`: an RWMutex reader waits (Go 1.21+).
    AcquireRead,
    /// `runtime_SemacquireRWMutex`: an RWMutex writer waits for readers (Go 1.21+).
    AcquireWrite,
    /// `runtime_Semrelease`: an unlock wakes a waiter.
    Release,
}

/// Function names (package `sync` up to 1.23, `internal/sync` from 1.24 for
/// Mutex) and their roles.
const FUNCS: &[(&str, Role)] = &[
    ("sync.runtime_SemacquireMutex", Role::AcquireMutex),
    ("internal/sync.runtime_SemacquireMutex", Role::AcquireMutex),
    ("sync.runtime_SemacquireRWMutexR", Role::AcquireRead),
    ("sync.runtime_SemacquireRWMutex", Role::AcquireWrite),
    ("sync.runtime_Semrelease", Role::Release),
    ("internal/sync.runtime_Semrelease", Role::Release),
];

/// Where to probe one function, as file offsets of the executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoProbe {
    pub name: &'static str,
    pub role: Role,
    /// The cheap prologue instruction.
    pub entry: u64,
    /// Every RET (acquire roles only).
    pub rets: Vec<u64>,
}

/// The probes for a Go executable (found through its symbol table, or its
/// `.gopclntab` when stripped); empty when it does not use sync.Mutex.
pub fn go_probes(data: &[u8]) -> Result<Vec<GoProbe>> {
    let file = object::File::parse(data).context("not a valid ELF")?;
    let segments = Segments::of(&file);
    let mut out = Vec::new();
    for (name, address, size) in text_functions(&file)? {
        let Some(&(fname, role)) = FUNCS.iter().find(|(n, _)| *n == name) else { continue };
        let Some(code) = segments.function_bytes(data, address, size) else { continue };
        let Some(entry) = go_cheap_entry(code, address) else { continue };
        let rets = if role == Role::Release { Vec::new() } else { rets(code, address) };
        if role != Role::Release && rets.is_empty() {
            continue;
        }
        // Inside the function's bytes: every address has an offset.
        let Some(entry) = segments.offset_of_vaddr(entry) else { continue };
        let Some(rets) = rets.into_iter().map(|r| segments.offset_of_vaddr(r)).collect() else { continue };
        out.push(GoProbe { name: fname, role, entry, rets });
    }
    Ok(out)
}

/// Addresses of every RET in the function (linear sweep: Go emits no data
/// inside functions).
pub fn rets(code: &[u8], addr: u64) -> Vec<u64> {
    linear(code, addr).filter(|ins| ins.mnemonic() == Mnemonic::Ret).map(|ins| ins.ip()).collect()
}

/// Offset of the semaphore inside the lock it belongs to, by who waits or
/// wakes on it: Mutex `sema` at +4; RWMutex `writerSem` at +8, `readerSem`
/// at +12 (Go 1.19-1.27 layouts; 1.24's sync.Mutex wraps internal/sync.Mutex
/// at offset 0). `function` is the caller's name (the [sp] return address).
pub fn sema_offset(role: Role, caller_function: &str) -> (u64, &'static str) {
    let rw = caller_function.contains("RWMutex");
    match role {
        Role::AcquireRead => (12, "rwmutex-read"),
        Role::AcquireWrite => (8, "rwmutex-write"),
        // A Mutex waits only from lockSlow (never inlined). Before Go 1.21
        // RWMutex used the same entry point: from RWMutex.Lock a writer,
        // from anything else RLock (small, inlined into its caller).
        Role::AcquireMutex if caller_function.ends_with("lockSlow") => (4, "mutex"),
        Role::AcquireMutex if rw && caller_function.ends_with(".Lock") => (8, "rwmutex-write"),
        Role::AcquireMutex => (12, "rwmutex-read"),
        // Holders: RWMutex.Unlock releases readers (readerSem), a last
        // reader's rUnlockSlow releases the writer (writerSem).
        Role::Release if rw && caller_function.contains("rUnlockSlow") => (8, "rwmutex"),
        Role::Release if rw => (12, "rwmutex"),
        Role::Release => (4, "mutex"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rets_by_linear_sweep() {
        assert_eq!(rets(&[0x5d, 0xc3, 0x90, 0xc3], 0x10), vec![0x11, 0x13]);
    }

    #[test]
    fn sema_offsets_by_caller() {
        assert_eq!(sema_offset(Role::AcquireMutex, "internal/sync.(*Mutex).lockSlow").0, 4);
        assert_eq!(sema_offset(Role::AcquireMutex, "sync.(*RWMutex).RLock").0, 12);
        assert_eq!(sema_offset(Role::AcquireMutex, "").0, 12, "RLock inlined into the program (Go 1.19)");
        assert_eq!(sema_offset(Role::AcquireMutex, "sync.(*RWMutex).Lock").0, 8);
        assert_eq!(sema_offset(Role::AcquireRead, "main.get").0, 12);
        assert_eq!(sema_offset(Role::Release, "sync.(*RWMutex).rUnlockSlow").0, 8);
        assert_eq!(sema_offset(Role::Release, "sync.(*Mutex).unlockSlow").0, 4);
    }
}
