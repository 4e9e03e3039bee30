//! User stacks taken in syscall tracepoints, with the caller the
//! frame-pointer walk misses put back.
//!
//! Inside a libc syscall wrapper (no frame of its own) the walk goes from the
//! wrapper straight to its caller's caller. User space disassembles the
//! wrappers and fills `SYSCALL_SITES` with where the return address sits
//! relative to `sp` at each `syscall` instruction; here we read it.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs},
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext, TracePointContext},
};
use tracer_common::{
    counter,
    stacks::{StackCounts, StackKey, SyscallSite, WalkedFrames, COLLIDED_STACK, MAX_WALKED_FRAMES, MAX_WALKED_STACKS, OVERFLOW_STACK},
};

/// User stacks of every tracker, deduplicated by the kernel.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Stacks whose `STACKS` bucket another stack holds, walked instead
/// ([`user_stack`]), by the hash of their frames.
#[map]
pub static STACK_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_WALKED_STACKS, 0);

/// This CPU's [`WalkedFrames`] being built for `STACK_FRAMES`.
#[map]
static STACK_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// Address after a `syscall` instruction in a libc wrapper -> return-address offset.
#[map]
static SYSCALL_SITES: HashMap<u64, SyscallSite> = HashMap::with_max_entries(1024, 0);

/// x86-64 `struct pt_regs`, in 8-byte slots.
const PT_REGS_BP: usize = 4;
const PT_REGS_R10: usize = 7;
const PT_REGS_DX: usize = 12;
const PT_REGS_SI: usize = 13;
const PT_REGS_DI: usize = 14;
const PT_REGS_ORIG_AX: usize = 15;
const PT_REGS_IP: usize = 16;
const PT_REGS_SP: usize = 19;

/// The current task's saved user registers (null if unavailable).
#[inline(always)]
fn user_regs() -> *const u64 {
    // SAFETY: the helpers only read the current task.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64 }
}

/// The current task's saved user ip, sp and bp (where a syscall or a
/// tracepoint left the program).
#[inline(always)]
pub fn user_ip_sp_bp() -> Option<(u64, u64, u64)> {
    let regs = user_regs();
    if regs.is_null() {
        return None;
    }
    Some((reg(regs, PT_REGS_IP), reg(regs, PT_REGS_SP), reg(regs, PT_REGS_BP)))
}

/// Below `vm.mmap_min_addr` nothing is mapped: a frame pointer there (0 in
/// a thread's outermost frame, a small integer glibc's startup leaves in
/// `main`'s caller) ends a walk without a faulting read (~0.8 µs of
/// exception handling on these VMs).
const LOWEST_FRAME: u64 = 4096;

#[inline(always)]
fn mix(h: u64, x: u64) -> u64 {
    let h = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 31)
}

/// A user stack walked by the BPF program itself (where `bpf_get_stackid`
/// cannot start: the probe's registers are not the caller's, or the libc
/// frames below have no frame pointers): the `known` innermost addresses
/// (`known[..n_known]`, 1 or 2), then the return addresses of the
/// frame-pointer chain from `fp`, one 16-byte read per frame, at most
/// `MAX_WALKED_FRAMES` in all, ending at a pointer below 4096, an unreadable
/// or non-growing frame. Built in this CPU's `scratch` slot, stored once in
/// `table`; returns its key (a hash of its addresses, never 0), or `None`
/// when the table is full (counted in `LOST_STACKS`).
#[inline(always)]
pub fn walk_user_stack(
    table: &HashMap<u64, WalkedFrames>,
    scratch: &PerCpuArray<WalkedFrames>,
    known: [u64; 2],
    n_known: usize,
    mut fp: u64,
) -> Option<u64> {
    let f = scratch.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; no other user while we run.
    let f = unsafe { &mut *f };
    let mut hash = 0xcbf2_9ce4_8422_2325;
    f.ips[0] = known[0];
    hash = mix(hash, known[0]);
    let mut len = 1usize;
    if n_known > 1 {
        f.ips[1] = known[1];
        hash = mix(hash, known[1]);
        len = 2;
    }
    for i in 1..MAX_WALKED_FRAMES {
        if i < len {
            continue;
        }
        if fp < LOWEST_FRAME {
            break;
        }
        // SAFETY: user memory read through the helper, which faults safely.
        let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else { break };
        if frame[1] == 0 {
            break;
        }
        f.ips[i] = frame[1];
        len = i + 1;
        hash = mix(hash, frame[1]);
        if frame[0] <= fp {
            break;
        }
        fp = frame[0];
    }
    f.len = len as u64;
    let hash = mix(hash, len as u64).max(1);
    // SAFETY: lookup only.
    if unsafe { table.get(&hash) }.is_none() && table.insert(&hash, f, 0).is_err() {
        crate::bump(counter::LOST_STACKS);
        return None;
    }
    Some(hash)
}

/// The u64 at `addr` in the current task's user memory (0 when unreadable).
#[inline(always)]
pub fn read_user_u64(addr: u64) -> u64 {
    // SAFETY: user memory through the helper, which faults safely.
    unsafe { bpf_probe_read_user(addr as *const u64).unwrap_or(0) }
}

#[inline(always)]
fn reg(regs: *const u64, slot: usize) -> u64 {
    // SAFETY: reading kernel memory through the helper, which faults safely.
    unsafe { bpf_probe_read_kernel(regs.add(slot)).unwrap_or(0) }
}

/// The first four arguments of the current syscall, read from the saved user
/// registers. x86-64 syscalls leave rdi, rsi, rdx and r10 as they were, so
/// an exit tracepoint sees the arguments too and needs no enter program.
#[inline(always)]
pub fn syscall_args() -> [u64; 4] {
    let regs = user_regs();
    if regs.is_null() {
        return [u64::MAX; 4];
    }
    [reg(regs, PT_REGS_DI), reg(regs, PT_REGS_SI), reg(regs, PT_REGS_DX), reg(regs, PT_REGS_R10)]
}

/// The number of the syscall the current task is in (its saved `orig_ax`)
/// and its first argument; `None` when the registers cannot be read.
#[inline(always)]
pub fn syscall_nr_and_arg0() -> Option<(u64, u64)> {
    let regs = user_regs();
    if regs.is_null() {
        return None;
    }
    Some((reg(regs, PT_REGS_ORIG_AX), reg(regs, PT_REGS_DI)))
}

/// The current user stack as a [`StackKey`]; counts a lost stack on failure.
#[inline(always)]
pub fn user_stack(ctx: &TracePointContext) -> StackKey {
    const EEXIST: i32 = 17;
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(stack_id) => StackKey { stack_id, caller: missing_caller() },
        // The bucket is another stack's: walk this one ourselves (the same
        // frame-pointer chain, the wrapper's caller put back).
        Err(e) if e == -EEXIST => {
            let caller = missing_caller();
            let Some((ip, _, bp)) = user_ip_sp_bp() else {
                crate::bump(counter::LOST_STACKS);
                return StackKey { stack_id: -1, caller: 0 };
            };
            match walk_user_stack(&STACK_FRAMES, &STACK_SCRATCH, [ip, caller], if caller != 0 { 2 } else { 1 }, bp) {
                Some(key) => StackKey { stack_id: COLLIDED_STACK, caller: key },
                None => StackKey { stack_id: -1, caller: 0 },
            }
        }
        Err(_) => {
            crate::bump(counter::LOST_STACKS);
            StackKey { stack_id: -1, caller: missing_caller() }
        }
    }
}

/// The wrapper's return address when the current syscall site is known.
#[inline(always)]
fn missing_caller() -> u64 {
    let regs = user_regs();
    if regs.is_null() {
        return 0;
    }
    let ip = reg(regs, PT_REGS_IP);
    // SAFETY: copied out of the map value.
    let Some(site) = (unsafe { SYSCALL_SITES.get(&ip) }).copied() else { return 0 };
    let sp = reg(regs, PT_REGS_SP);
    // SAFETY: user memory read through the helper, which faults safely.
    unsafe { bpf_probe_read_user((sp + site.ret_offset as u64) as *const u64).unwrap_or(0) }
}

/// The key a new object of `stack` is counted under in a tracker's per-stack
/// table: `stack` itself, or, when the table is full, the overflow key user
/// space inserted (a lost stack; the object is still counted). The object
/// keeps this key so its end is counted where its creation was.
#[inline(always)]
pub fn counted_stack(table: &PerCpuHashMap<StackKey, StackCounts>, stack: StackKey) -> StackKey {
    if table.get_ptr(&stack).is_none() && table.insert(&stack, &StackCounts::default(), 0).is_err() {
        crate::bump(counter::LOST_STACKS);
        return OVERFLOW_STACK;
    }
    stack
}

/// Adds to a stack's created or ended total (this CPU's copy).
#[inline(always)]
pub fn count(table: &PerCpuHashMap<StackKey, StackCounts>, stack: &StackKey, created: u64, ended: u64) {
    if let Some(s) = table.get_ptr_mut(stack) {
        // SAFETY: this CPU's copy of the value; no other writer while we run.
        unsafe {
            (*s).created += created;
            (*s).ended += ended;
        }
    } else if table.insert(stack, &StackCounts { created, ended }, 0).is_err() {
        crate::bump(counter::LOST_STACKS);
    }
}
