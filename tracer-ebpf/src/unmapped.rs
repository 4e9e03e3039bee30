//! Unwind rules must not outlive the code they were learned from: a library
//! closed with `dlclose` is unmapped, and the next one mapped at the same
//! addresses would be walked with its rules. User space lists the mappings
//! it learned rules in (`UNWIND_CODE`); when the target unmaps one of them
//! (`munmap` or `mmap(MAP_FIXED)` enter, and again at its exit, when the range is gone from
//! /proc/PID/maps) the generation in `UNWIND_SYNC` moves on, and walks use
//! no rule until user space has dropped the rules of the mappings gone and
//! caught up (`tracer_common::stacks::unwind_sync`). Unmaps of other
//! memory (the allocator's) cost one pass over at most
//! `MAX_RULE_MAPPINGS` ranges.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{Array, HashMap},
    programs::TracePointContext,
};
use tracer_common::stacks::{unwind_sync, CodeRange, MAX_RULE_MAPPINGS, MAX_UNMAPPED};

use crate::target_tgid;

/// Mappings rules were learned in (`unwind_sync::CODE_COUNT` of them).
#[map]
static UNWIND_CODE: Array<CodeRange> = Array::with_max_entries(MAX_RULE_MAPPINGS, 0);

/// See `tracer_common::stacks::unwind_sync`.
#[map]
static UNWIND_SYNC: Array<u64> = Array::with_max_entries(unwind_sync::SLOTS, 0);

/// The last ranges the target unmapped (by `unwind_sync::UNMAPS`): a miss
/// queued before one of them must not be learned from what is there now.
#[map]
static UNMAPPED: Array<CodeRange> = Array::with_max_entries(MAX_UNMAPPED, 0);

/// The target's unmaps so far, for a miss's snapshot.
#[inline(always)]
pub fn unmaps() -> u64 {
    sync_slot(unwind_sync::UNMAPS)
}

/// Threads inside a `munmap` of rule code (bumped again at its exit).
#[map]
static UNMAPPING: HashMap<u32, u8> = HashMap::with_max_entries(1024, crate::NO_PREALLOC);

#[inline(always)]
fn sync_slot(i: u32) -> u64 {
    UNWIND_SYNC.get(i).copied().unwrap_or(0)
}

/// Whether the rules match what is mapped (no unmap of rule code since
/// user space last caught up).
#[inline(always)]
pub fn rules_current() -> bool {
    sync_slot(unwind_sync::GENERATION) == sync_slot(unwind_sync::SYNCED)
}

/// Moves the generation on. Not atomic: two racing bumps may count once,
/// which still leaves it ahead of what user space had read.
#[inline(always)]
fn bump_generation() {
    if let Some(g) = UNWIND_SYNC.get_ptr_mut(unwind_sync::GENERATION) {
        // SAFETY: a map value.
        unsafe { *g += 1 };
    }
}

/// syscalls:sys_enter_munmap of the target: does it unmap rule code?
#[tracepoint]
pub fn unwind_munmap(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the record's arguments after the common header and nr.
    let (addr, len) = unsafe { (ctx.read_at::<u64>(16).unwrap_or(0), ctx.read_at::<u64>(24).unwrap_or(0)) };
    unmapping(addr, len);
    0
}

/// `MAP_FIXED`: the new mapping replaces whatever was at its range.
const MAP_FIXED: u64 = 0x10;

/// syscalls:sys_enter_mmap of the target: an `mmap(MAP_FIXED)` over rule
/// code unmaps it as `munmap` would (its exit is `unwind_munmap_exit`'s).
#[tracepoint]
pub fn unwind_mmap_fixed(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the record's arguments: addr, len, prot, flags.
    let (addr, len, flags) =
        unsafe { (ctx.read_at::<u64>(16).unwrap_or(0), ctx.read_at::<u64>(24).unwrap_or(0), ctx.read_at::<u64>(40).unwrap_or(0)) };
    if flags & MAP_FIXED != 0 {
        unmapping(addr, len);
    }
    0
}

/// The target is about to unmap `[addr, addr + len)`: into the ring, and
/// the rules are off until user space catches up if it held rule code.
#[inline(always)]
fn unmapping(addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    // Every unmap goes into the ring, rule code or not. Not atomic: racing
    // unmaps of two threads may share a slot (the lost range is a miss
    // learned from the wrong code: rare, and bounded to that path).
    if let Some(n) = UNWIND_SYNC.get_ptr_mut(unwind_sync::UNMAPS) {
        // SAFETY: a map value.
        let seq = unsafe { *n };
        let _ = UNMAPPED.set((seq % u64::from(MAX_UNMAPPED)) as u32, &CodeRange { start: addr, end }, 0);
        unsafe { *n = seq + 1 };
    }
    let mut hit = sync_slot(unwind_sync::CODE_ALL) != 0;
    let n = sync_slot(unwind_sync::CODE_COUNT);
    for i in 0..MAX_RULE_MAPPINGS {
        if hit || u64::from(i) >= n {
            break;
        }
        if let Some(r) = UNWIND_CODE.get(i) {
            hit = r.start < end && addr < r.end;
        }
    }
    if hit {
        bump_generation();
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = UNMAPPING.insert(&tid, &1, 0);
    }
}

/// syscalls:sys_exit_munmap (and sys_exit_mmap): the range is gone now;
/// user space must look again.
#[tracepoint]
pub fn unwind_munmap_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: lookup only.
    if unsafe { UNMAPPING.get(&tid) }.is_some() {
        let _ = UNMAPPING.remove(&tid);
        bump_generation();
    }
    0
}
