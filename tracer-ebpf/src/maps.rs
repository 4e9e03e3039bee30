//! Map tracker, kernel side: Go maps as they grow.
//!
//! No probe sits on `mapassign` (a trap per insert). A map grows O(log n)
//! times (classic maps double: `runtime.hashGrow`) or once per ~500-900
//! inserts (full Swiss tables split: `(*table).split`), so the probes sit on those rare
//! functions, at the first emulated instruction of the prologue (user space
//! picks it by disassembly), and record per map address: the stack of the
//! growth (the inserting code; `mapassign`'s return address is at `[sp]` and
//! is put back as `caller`), the map's hash seed and when it was first seen.
//! Maps under 256 entries are not registered, and a tracked map's stack is
//! walked again at most once a second: most growth events cost the trap and
//! one hash lookup.
//! User space reads the entry count from the map header every interval and
//! checks the seed, so a dead map whose address was reused is dropped.
//! `runtime.mapclear` draws a new seed: it is counted so user space accepts
//! the cleared map's new seed.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::{Array, HashMap},
    programs::{tracing::StackIdContext, ProbeContext},
};
use tracer_common::{
    counter,
    maps::{
        seed, MapInfo, KIND_MAP, KIND_TRIE, MAX_TRACKED_MAPS, MIN_REGISTER_ENTRIES, STACK_REFRESH_NS, TRIE_SEED_OFFSET,
    },
    stacks::StackKey,
};

use crate::{bump, stacks::STACKS, target_tgid};

/// Tracked maps by header address.
#[map]
static MAPS: HashMap<u64, MapInfo> = HashMap::with_max_entries(MAX_TRACKED_MAPS, crate::NO_PREALLOC);

/// Where the seed is in the map header (`seed::OFFSET`, `seed::MASK`);
/// written by user space from the target's Go version.
#[map]
static MAP_SEED: Array<u64> = Array::with_max_entries(2, 0);

#[inline(always)]
fn config(i: u32) -> u64 {
    MAP_SEED.get(i).copied().unwrap_or(0)
}

/// A growth of the map at `m` whose type descriptor is at `map_type`.
#[inline(always)]
fn grown(ctx: &ProbeContext, m: u64, map_type: u64) {
    let mask = config(seed::MASK);
    if mask == 0 {
        return; // not configured
    }
    grown_at(ctx, m, config(seed::OFFSET), mask, KIND_MAP, map_type);
}

/// A growth of the map (`kind`) at `m` whose seed is at `m + seed_at`.
#[inline(always)]
fn grown_at(ctx: &ProbeContext, m: u64, seed_at: u64, mask: u64, kind: u32, map_type: u64) {
    if m == 0 || target_tgid().is_none() {
        return;
    }
    // SAFETY: user memory read through the helper, which faults safely.
    let Ok(raw) = (unsafe { bpf_probe_read_user((m + seed_at) as *const u64) }) else { return };
    let seed = raw & mask;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    bump(tracer_common::maps::counter::EVENTS);
    let known = MAPS.get_ptr_mut(&m);
    if let Some(e) = known {
        // SAFETY: a map value; a concurrent update only races on statistics.
        let e = unsafe { &mut *e };
        if e.seed == seed {
            e.grows += 1;
            if now.wrapping_sub(e.last_ns) < STACK_REFRESH_NS {
                return;
            }
            e.stack = growth_stack(ctx);
            e.last_ns = now;
            return;
        }
    } else if kind == KIND_MAP {
        // SAFETY: user memory read through the helper. The count is the
        // u64 at offset 0 of the header in every Go version.
        let count = unsafe { bpf_probe_read_user(m as *const u64) }.unwrap_or(0);
        if count < MIN_REGISTER_ENTRIES {
            return;
        }
    }
    // A new map, or another map at a reused address: start over.
    let info = MapInfo { stack: growth_stack(ctx), seed, first_ns: now, last_ns: now, grows: 1, clears: 0, kind, _pad: 0, map_type };
    if MAPS.insert(&m, &info, 0).is_err() {
        bump(tracer_common::maps::counter::LOST);
    }
}

/// The user stack at a growth probe, with the caller from `[sp]`.
#[inline(always)]
fn growth_stack(ctx: &ProbeContext) -> StackKey {
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(_) => {
            bump(counter::LOST_STACKS);
            -1
        }
    };
    // SAFETY: the probe's saved registers, then user memory via the helper.
    let caller = unsafe { bpf_probe_read_user((*ctx.regs).rsp as *const u64).unwrap_or(0) };
    StackKey { stack_id, caller }
}

/// `runtime.hashGrow(t, h)` (Go <= 1.23): the map is in RBX, its type in RAX.
#[uprobe]
pub fn map_grow_rbx(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's saved registers.
    let (m, t) = unsafe { ((*ctx.regs).rbx, (*ctx.regs).rax) };
    grown(&ctx, m, t);
    0
}

/// `internal/runtime/maps.(*table).split(t, typ, m)` (Go 1.24+): the map
/// is in RCX, its type in RBX.
#[uprobe]
pub fn map_grow_rcx(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's saved registers.
    let (m, t) = unsafe { ((*ctx.regs).rcx, (*ctx.regs).rbx) };
    grown(&ctx, m, t);
    0
}

/// `internal/sync.(*HashTrieMap[...]).expand(ht, dict, ...)` (Go 1.24+
/// `sync.Map`): a new key collided with an entry and the trie grows a
/// level. The trie is in RAX (the generic shape's dictionary in RBX; the
/// prologue reads `ht.keyHash` and `ht.seed` through RAX).
#[uprobe]
pub fn map_trie_expand(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's saved registers.
    let m = unsafe { (*ctx.regs).rax };
    grown_at(&ctx, m, TRIE_SEED_OFFSET, u64::MAX, KIND_TRIE, 0);
    0
}

/// `runtime.mapclear(t, h)`, every version: the map is in RBX. Only maps
/// already tracked are counted.
#[uprobe]
pub fn map_clear(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the probe's saved registers.
    let m = unsafe { (*ctx.regs).rbx };
    if let Some(e) = MAPS.get_ptr_mut(&m) {
        // SAFETY: a map value.
        unsafe { (*e).clears += 1 };
        bump(tracer_common::maps::counter::EVENTS);
    }
    0
}
