//! Allocation tracker, kernel side: every heap block the target allocates
//! after attach, from its allocation to its free, counted per creation stack
//! in blocks and bytes.
//!
//! Entry uprobes sit where user space's disassembly found the first
//! instruction the kernel emulates (`push`, `jcc`, ...) with the arguments
//! and `sp` still as at the call (glibc 2.36: `malloc+0`, `free+3`): a probe
//! on a single-stepped instruction costs 30x more here. An entry records the
//! call in `ALLOC_PENDING` (per thread); the return probe of the same call
//! (same `sp`) reads the block's address, takes the stack — at the return
//! the frame-pointer walk starts in the caller, so the function that called
//! `malloc` is in it — and adds the block to `ALLOCS` and its stack's totals
//! in `ALLOC_STACKS`. A call made inside another allocator call (`realloc`
//! calling `malloc` or `free`, `malloc` calling `mmap`) is left to the outer
//! one. `operator new` records its caller's stack for the `malloc` it makes.
//!
//! Age: the first live block of each stack is its sentinel (`ALLOC_OLDEST`,
//! insert-if-absent); when it is freed the next block of the stack takes over.
//! The sentinel's age is a lower bound of the oldest live block's age, exact
//! when the stack's oldest block is still live — no walk of `ALLOCS` needed.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::{tracing::StackIdContext, ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    allocations::{
        call, AllocCounts, AllocInfo, AllocPending, OuterStack, ALLOC_SENTINEL, MAX_ALLOC_STACKS, MAX_LIVE_ALLOCS,
        MAX_PENDING_ALLOCS,
    },
    counter,
    stacks::{StackKey, OVERFLOW_STACK},
};

use crate::{
    bump,
    stacks::{syscall_args, user_stack, STACKS},
    target_tgid,
};

/// Byte-weighted sampling period (0: track every block); set at load.
#[no_mangle]
static ALLOC_SAMPLE_BYTES: u64 = 0;

/// Live blocks by address, preallocated at the size set at load: an
/// on-demand table can fail an insert under a burst of allocations (its
/// per-CPU cache refills asynchronously), a preallocated one only when full.
#[map]
static ALLOCS: HashMap<u64, AllocInfo> = HashMap::with_max_entries(MAX_LIVE_ALLOCS, 0);

/// Per creation stack: blocks and bytes allocated and freed (per CPU).
#[map]
static ALLOC_STACKS: PerCpuHashMap<StackKey, AllocCounts> = PerCpuHashMap::with_max_entries(MAX_ALLOC_STACKS, 0);

/// Per creation stack: creation time of its sentinel block (see module docs).
#[map]
static ALLOC_OLDEST: HashMap<StackKey, u64> = HashMap::with_max_entries(MAX_ALLOC_STACKS, 0);

/// Allocator calls between entry and return, by pid_tgid. A plain
/// (preallocated) hash: cheaper per call than an LRU, and an entry lives
/// only from a call's entry to its return (a full table counts in
/// `counter::ALLOC_LOST_CALLS`).
#[map]
static ALLOC_PENDING: HashMap<u64, AllocPending> = HashMap::with_max_entries(MAX_PENDING_ALLOCS, 0);

/// `operator new` calls in progress, by pid_tgid.
#[map]
static ALLOC_OUTER: LruHashMap<u64, OuterStack> = LruHashMap::with_max_entries(MAX_PENDING_ALLOCS, 0);

const MAP_ANONYMOUS: u64 = 0x20;
const EEXIST: i32 = 17;
const MAP_FIXED: u64 = 0x10;
/// An `operator new` older than this did not lead to the `malloc` now returning.
const OUTER_MAX_NS: u64 = 10_000_000;

#[inline(always)]
fn sp_of(regs: *const aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: the probe's saved registers.
    unsafe { (*regs).rsp }
}

/// Records an allocator call at its entry probe, unless one is already in
/// progress in this thread (then this one is part of it).
#[inline(always)]
fn enter(ctx: &ProbeContext, call: u32, size: u64, arg: u64) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let p = AllocPending { size, arg, entry_sp: sp_of(ctx.regs), call, _pad: 0 };
    // Insert-if-absent: a call already pending in this thread is the outer one.
    match ALLOC_PENDING.insert(&id, &p, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(_) => bump(counter::ALLOC_LOST_CALLS),
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// `a * b`, or `u64::MAX` on overflow (no 128-bit multiply in BPF).
#[inline(always)]
fn product(a: u64, b: u64) -> u64 {
    let (big, small) = if a > b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return u64::MAX;
    }
    // Schoolbook with 32-bit halves: LLVM would turn a division check into
    // a 128-bit multiply, which BPF does not have.
    let hi = (big >> 32) * small;
    let lo = (big & 0xffff_ffff) * small;
    if hi >> 32 != 0 {
        return u64::MAX;
    }
    let r = (hi << 32).wrapping_add(lo);
    if r < lo {
        u64::MAX
    } else {
        r
    }
}

/// `malloc`, `valloc`.
#[uprobe]
pub fn alloc_malloc(ctx: ProbeContext) -> u32 {
    enter(&ctx, call::MALLOC, arg(&ctx, 0), 0)
}

/// `pvalloc`: the size is rounded up to whole pages.
#[uprobe]
pub fn alloc_pvalloc(ctx: ProbeContext) -> u32 {
    let size = (arg(&ctx, 0).max(1) + 4095) & !4095;
    enter(&ctx, call::MALLOC, size, 0)
}

/// `calloc(n, size)`; an overflowing product fails in the allocator.
#[uprobe]
pub fn alloc_calloc(ctx: ProbeContext) -> u32 {
    let size = product(arg(&ctx, 0), arg(&ctx, 1));
    enter(&ctx, call::CALLOC, size, 0)
}

/// `realloc(ptr, size)`.
#[uprobe]
pub fn alloc_realloc(ctx: ProbeContext) -> u32 {
    enter(&ctx, call::REALLOC, arg(&ctx, 1), arg(&ctx, 0))
}

/// `reallocarray(ptr, n, size)`.
#[uprobe]
pub fn alloc_reallocarray(ctx: ProbeContext) -> u32 {
    let size = product(arg(&ctx, 1), arg(&ctx, 2));
    enter(&ctx, call::REALLOC, size, arg(&ctx, 0))
}

/// `posix_memalign(&ptr, align, size)`.
#[uprobe]
pub fn alloc_posix_memalign(ctx: ProbeContext) -> u32 {
    enter(&ctx, call::POSIX_MEMALIGN, arg(&ctx, 2), arg(&ctx, 0))
}

/// `memalign(align, size)`, `aligned_alloc(align, size)`.
#[uprobe]
pub fn alloc_memalign(ctx: ProbeContext) -> u32 {
    enter(&ctx, call::MEMALIGN, arg(&ctx, 1), 0)
}

/// `free(ptr)`. A free made inside `realloc(p, 0)` ends `p` here; the
/// realloc's return then finds it gone and counts nothing more.
#[uprobe]
pub fn alloc_free(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let ptr = arg(&ctx, 0);
    if ptr != 0 {
        release(ptr, true);
    }
    0
}

/// `operator new` (every variant): remembers the caller's stack for the
/// `malloc` it makes. At the entry the walk misses the direct caller: it is
/// the return address at `[sp]`.
#[uprobe]
pub fn alloc_new(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    if ALLOC_PENDING.get_ptr(&id).is_some() {
        return 0;
    }
    // The probe's cookie: how far `sp` moved before the probed instruction.
    // SAFETY: the helper only reads the probe's attach cookie.
    let depth = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let sp = sp_of(ctx.regs).wrapping_add(depth);
    // SAFETY: no preconditions.
    let ns = unsafe { bpf_ktime_get_ns() };
    // A `new` inside a `new` in progress (nothrow new calls plain new):
    // the outer one's caller is the one that counts.
    // SAFETY: copied out of the map value.
    if let Some(o) = unsafe { ALLOC_OUTER.get(&id) } {
        if o.sp > sp && ns.wrapping_sub(o.ns) < OUTER_MAX_NS {
            return 0;
        }
    }
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(_) => {
            bump(counter::LOST_STACKS);
            -1
        }
    };
    // SAFETY: user memory read through the helper, which faults safely.
    let caller = unsafe { bpf_probe_read_user(sp as *const u64).unwrap_or(0) };
    let outer = OuterStack { stack: StackKey { stack_id, caller }, sp, ns };
    let _ = ALLOC_OUTER.insert(&id, &outer, 0);
    0
}

/// The return of every allocator entry point.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out of the map value.
    let Some(p) = (unsafe { ALLOC_PENDING.get(&id) }).copied() else { return 0 };
    if sp_of(ctx.regs) != p.entry_sp.wrapping_add(8) {
        // The return of a call nested in the pending one.
        return 0;
    }
    let _ = ALLOC_PENDING.remove(&id);
    let ret: u64 = ctx.ret();
    let addr = match p.call {
        call::REALLOC => {
            // A move: the old block is gone when a new one came back, and
            // when `realloc(p, 0)` returned NULL (glibc frees p then).
            if p.arg != 0 && (ret != 0 || p.size == 0) {
                release(p.arg, false);
            }
            ret
        }
        call::POSIX_MEMALIGN => {
            if ret as u32 != 0 {
                return 0;
            }
            // SAFETY: user memory read through the helper, which faults safely.
            unsafe { bpf_probe_read_user(p.arg as *const u64).unwrap_or(0) }
        }
        _ => ret,
    };
    if addr == 0 {
        // Failed (or a free through realloc): nothing allocated.
        return 0;
    }
    let Some((bytes, count)) = sampled(p.size) else { return 0 };
    let outer = if new_probed() { outer_stack(id, p.entry_sp) } else { None };
    let stack = match outer {
        Some(s) => s,
        None => {
            StackKey { stack_id: return_stack_id(&ctx), caller: 0 }
        }
    };
    track(addr, stack, bytes, count);
    0
}

/// Frames the kernel's walk stores at most: the stack map's value size
/// (`PERF_MAX_STACK_DEPTH`), the return address included.
const WALK_MAX_FRAMES: usize = 127;
/// Below `vm.mmap_min_addr` nothing is mapped: the kernel's read of such a
/// frame pointer faults and ends its walk there.
const LOWEST_FRAME: u64 = 4096;

/// A user stack as the kernel's frame-pointer walk sees it: a 64-bit hash of
/// its addresses, its depth and first address.
#[repr(C)]
#[derive(Clone, Copy)]
struct WalkKey {
    hash: u64,
    ip: u64,
    depth: u64,
}

/// Stack ids already handed out by `bpf_get_stackid`, by the walk that
/// produced them (ids are stable: `STACKS` is never cleared or reused).
#[map]
static ALLOC_STACK_IDS: HashMap<WalkKey, i64> = HashMap::with_max_entries(16384, 0);

/// The id of the user stack at an allocator's return, as
/// `bpf_get_stackid(BPF_F_USER_STACK)` gives it, without its cost on a known
/// stack. Every chain of frame pointers ends in a pointer to unmapped memory
/// (0 in a thread, a small integer left by glibc's startup in `main`'s
/// caller), and the kernel's walk (x86 `perf_callchain_user`) only stops on
/// the fault of reading it: ~0.8 µs of exception handling on these VMs, more
/// than the rest of the return probe. This walk follows the same rules (the
/// return address, then `[fp+8]` while `[fp]`..`[fp+16]` reads, at most
/// 127 addresses) but stops without reading a pointer below
/// `LOWEST_FRAME`, so it yields the same addresses; the kernel is asked only
/// for a walk not seen before.
#[inline(always)]
fn return_stack_id(ctx: &RetProbeContext) -> i64 {
    // SAFETY: the probe's saved registers.
    let (ip, mut fp) = unsafe { ((*ctx.regs).rip, (*ctx.regs).rbp) };
    let mut hash = ip.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut depth = 1u64;
    for _ in 1..WALK_MAX_FRAMES {
        if fp < LOWEST_FRAME {
            break;
        }
        // SAFETY: user memory read through the helper, which faults safely.
        let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else { break };
        hash = (hash ^ frame[1]).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        hash ^= hash >> 31;
        depth += 1;
        fp = frame[0];
    }
    let key = WalkKey { hash, ip, depth };
    // SAFETY: copied out of the map value.
    if let Some(id) = unsafe { ALLOC_STACK_IDS.get(&key) } {
        return *id;
    }
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => {
            // A full cache only means the kernel walks again next time.
            let _ = ALLOC_STACK_IDS.insert(&key, &id, 0);
            id
        }
        Err(_) => {
            bump(counter::LOST_STACKS);
            -1
        }
    }
}

/// Whether `operator new` is probed (user space sets slot 0 when it
/// attaches one): C programs skip the `ALLOC_OUTER` lookup.
#[map]
static ALLOC_FLAGS: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn new_probed() -> bool {
    ALLOC_FLAGS.get(0).is_some_and(|v| *v != 0)
}

/// The stack of the `operator new` this call is part of, if any.
#[inline(always)]
fn outer_stack(id: u64, entry_sp: u64) -> Option<StackKey> {
    // SAFETY: copied out of the map value.
    let o = (unsafe { ALLOC_OUTER.get(&id) }).copied()?;
    let _ = ALLOC_OUTER.remove(&id);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    (entry_sp < o.sp && now.wrapping_sub(o.ns) < OUTER_MAX_NS).then_some(o.stack)
}

/// Whether a block of `size` bytes is tracked, and the bytes and blocks it
/// stands for. Byte-weighted sampling with period N keeps a block with
/// probability min(1, size/N) and weighs it by the inverse: totals stay
/// unbiased.
#[inline(always)]
fn sampled(size: u64) -> Option<(u64, u32)> {
    // SAFETY: a plain read of a global that user space wrote before load.
    let period = unsafe { core::ptr::read_volatile(&ALLOC_SAMPLE_BYTES) };
    if period == 0 || size >= period {
        return Some((size, 1));
    }
    let size = size.max(1);
    // SAFETY: no preconditions.
    let r = unsafe { bpf_get_prandom_u32() } as u64;
    if r % period >= size {
        return None;
    }
    Some((period, ((period + size / 2) / size) as u32))
}

/// Adds a new block to the live table and its stack's totals.
#[inline(always)]
fn track(addr: u64, stack: StackKey, bytes: u64, count: u32) {
    let Some(totals) = totals(stack) else { return };
    let stack = totals.0;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Lockless look first: the sentinel exists for every busy stack.
    let sentinel =
        ALLOC_OLDEST.get_ptr(&stack).is_none() && ALLOC_OLDEST.insert(&stack, &now, BPF_NOEXIST as u64).is_ok();
    let info = AllocInfo { stack, bytes, count, flags: if sentinel { ALLOC_SENTINEL } else { 0 }, created_ns: now };
    let mut stored = ALLOCS.insert(&addr, &info, BPF_NOEXIST as u64);
    if stored == Err(-EEXIST) {
        // An address handed out again without a free we saw (a free path
        // we do not probe): the old block is gone.
        release(addr, false);
        stored = ALLOCS.insert(&addr, &info, BPF_NOEXIST as u64);
    }
    if stored.is_err() {
        bump(counter::ALLOC_LOST);
        if sentinel {
            let _ = ALLOC_OLDEST.remove(&stack);
        }
        return;
    }
    // SAFETY: this CPU's copy of the value; no other writer while we run.
    unsafe {
        (*totals.1).created += count as u64;
        (*totals.1).bytes_created += bytes;
    }
    bump(counter::ALLOC_EVENTS);
}

/// Removes a block from the live table and counts it freed under its
/// stack. Unknown blocks count as untracked frees when `count_untracked`.
#[inline(always)]
fn release(addr: u64, count_untracked: bool) {
    // SAFETY: copied out before removal.
    let Some(info) = (unsafe { ALLOCS.get(&addr) }).copied() else {
        if count_untracked {
            bump(counter::ALLOC_UNTRACKED_FREES);
        }
        return;
    };
    // Only the side whose delete succeeds counts.
    if ALLOCS.remove(&addr).is_err() {
        return;
    }
    if info.flags & ALLOC_SENTINEL != 0 {
        let _ = ALLOC_OLDEST.remove(&info.stack);
    }
    add(&info.stack, 0, info.count as u64, 0, info.bytes);
    bump(counter::ALLOC_EVENTS);
}

/// The key a new block of `stack` is counted under (`stack`, or the
/// overflow key when the per-stack table is full) and this CPU's totals.
#[inline(always)]
fn totals(stack: StackKey) -> Option<(StackKey, *mut AllocCounts)> {
    if let Some(t) = ALLOC_STACKS.get_ptr_mut(&stack) {
        return Some((stack, t));
    }
    let key = if ALLOC_STACKS.insert(&stack, &AllocCounts::default(), 0).is_ok() {
        stack
    } else {
        bump(counter::LOST_STACKS);
        OVERFLOW_STACK
    };
    ALLOC_STACKS.get_ptr_mut(&key).map(|t| (key, t))
}

#[inline(always)]
fn add(stack: &StackKey, created: u64, ended: u64, bytes_created: u64, bytes_ended: u64) {
    if let Some(s) = ALLOC_STACKS.get_ptr_mut(stack) {
        // SAFETY: this CPU's copy of the value; no other writer while we run.
        unsafe {
            (*s).created += created;
            (*s).ended += ended;
            (*s).bytes_created += bytes_created;
            (*s).bytes_ended += bytes_ended;
        }
    } else {
        let v = AllocCounts { created, ended, bytes_created, bytes_ended };
        if ALLOC_STACKS.insert(stack, &v, 0).is_err() {
            bump(counter::LOST_STACKS);
        }
    }
}

/// syscalls:sys_exit_mmap: an anonymous mapping made by the program itself
/// (not by the allocator, whose own mmaps happen inside a pending call).
#[tracepoint]
pub fn alloc_mmap_exit(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the record's `ret` field (after the common header and nr).
    let ret = unsafe { ctx.read_at::<i64>(16).unwrap_or(-1) };
    if ret <= 0 {
        return 0;
    }
    if ALLOC_PENDING.get_ptr(&bpf_get_current_pid_tgid()).is_some() {
        return 0;
    }
    let [_, len, _, flags] = syscall_args();
    if flags & MAP_ANONYMOUS == 0 || flags & MAP_FIXED != 0 {
        return 0;
    }
    let Some((bytes, count)) = sampled(len) else { return 0 };
    track(ret as u64, user_stack(&ctx), bytes, count);
    0
}

/// syscalls:sys_enter_munmap: a tracked mapping unmapped from its start
/// (partial unmaps end the whole mapping). Unmaps of untracked ranges are
/// the allocator's own and are not untracked frees.
#[tracepoint]
pub fn alloc_munmap_enter(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the record's first argument (after the common header and nr).
    let addr = unsafe { ctx.read_at::<u64>(16).unwrap_or(0) };
    if addr != 0 {
        release(addr, false);
    }
    0
}
