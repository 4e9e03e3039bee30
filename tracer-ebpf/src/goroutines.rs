//! Goroutine tracker, kernel side: only the creator probe. Goroutines are
//! read from the runtime's memory by user space; when a group of them leaks
//! and its `go` statement is in a library (`concurrency.NewSession`), user
//! space puts this probe on that statement's `CALL runtime.newproc` (a
//! direct near call: emulated by the kernel, no single-step) for as long as
//! the group is judged a leak. Each hit records the creating goroutine's
//! stack (frame pointers: Go keeps them; the probe's pc first), counted per
//! (statement, stack), and remembered per (creating goroutine, statement) so
//! user space can join it with the live goroutines' `parentGoid`.

use aya_ebpf::{
    helpers::bpf_get_attach_cookie,
    macros::{map, uprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::ProbeContext,
    EbpfContext,
};
use tracer_common::{
    counter,
    goroutines::{GoCreation, GoCreator, COOKIE_GOID_SHIFT, MAX_CREATIONS, MAX_CREATORS_BY_GOID, MAX_CREATOR_STACKS},
    stacks::WalkedFrames,
};

use crate::{
    bump,
    stacks::{read_user_u64, walk_user_stack},
    target_tgid,
};

/// Creator stacks, by the hash of their addresses.
#[map]
static GO_CREATOR_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_CREATOR_STACKS, crate::NO_PREALLOC);

/// This CPU's stack being built for `GO_CREATOR_FRAMES`.
#[map]
static GO_CREATOR_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// Creations per (statement, creator stack), per CPU.
#[map]
static GO_CREATIONS: PerCpuHashMap<GoCreation, u64> = PerCpuHashMap::with_max_entries(MAX_CREATIONS, crate::NO_PREALLOC);

/// The last creator stack per (creating goroutine, statement).
#[map]
static GO_CREATOR_OF: LruHashMap<GoCreator, u64> = LruHashMap::with_max_entries(MAX_CREATORS_BY_GOID, 0);

/// Uprobe on a `go` statement's `CALL runtime.newproc`; cookie: `gopc`
/// and the offset of `goid` in a `g` (`COOKIE_GOID_SHIFT`).
#[uprobe]
pub fn go_creator(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: reads the probe's attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let gopc = cookie & ((1 << COOKIE_GOID_SHIFT) - 1);
    let goid_at = cookie >> COOKIE_GOID_SHIFT;
    // SAFETY: the probe's saved registers. R14 holds the current g in Go's
    // register ABI; rbp is this function's frame (after its prologue).
    let (ip, bp, g) = unsafe { ((*ctx.regs).rip, (*ctx.regs).rbp, (*ctx.regs).r14) };
    let Some(stack) = walk_user_stack(&GO_CREATOR_FRAMES, &GO_CREATOR_SCRATCH, [ip, 0], 1, bp) else { return 0 };
    let creation = GoCreation { gopc, stack };
    match GO_CREATIONS.get_ptr_mut(&creation) {
        // SAFETY: this CPU's slot.
        Some(n) => unsafe { *n += 1 },
        None => {
            if GO_CREATIONS.insert(&creation, &1, 0).is_err() {
                bump(counter::LOST_EVENTS);
            }
        }
    }
    let goid = read_user_u64(g.wrapping_add(goid_at));
    let _ = GO_CREATOR_OF.insert(&GoCreator { goid, gopc }, &stack, 0);
    0
}
