//! Allocation tracker, kernel side: every heap block the target allocates
//! after attach, from its allocation to its free, counted per creation stack
//! in blocks and bytes.
//!
//! `malloc` itself has no entry or return probe when user space's analysis
//! of its code found "result points" (see `alloc_sites/results.rs`): probes
//! on the emulated branch just before each return, where the block's
//! address, the size, the return address and the caller's frame pointer can
//! all be read — one trap per `malloc` (`alloc_result`), plus, on paths
//! that lose the size before the result is known, a "size point" earlier on
//! the same path (`alloc_size`). Everything else, and `malloc` when no plan
//! was found, uses entry and return probes:
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
//! Age: the first live block of each stack is its sentinel (`ALLOC_OLDEST`);
//! when it is freed the slot is marked vacant (0) and the next block of the
//! stack takes over.
//! The sentinel's age is a lower bound of the oldest live block's age, exact
//! when the stack's oldest block is still live — no walk of `ALLOCS` needed.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{tracing::StackIdContext, ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    allocations::{
        call, point, AllocCounts, AllocInfo, AllocPending, OuterStack, ALLOC_MMAP, ALLOC_SENTINEL, MAX_ALLOC_STACKS,
        MAX_LIVE_ALLOCS, MAX_PENDING_ALLOCS,
    },
    counter,
    stacks::{StackKey, WalkedFrames, MAX_WALKED_STACKS, OVERFLOW_STACK, WALKED_STACK},
};

use crate::{
    bump,
    stacks::{
        read_user_u64, syscall_args, unwind_user_stack, unwinding, user_stack, walk_user_stack, UserRegs, AT_RETURN, STACKS,
    },
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
static ALLOC_STACKS: PerCpuHashMap<StackKey, AllocCounts> = PerCpuHashMap::with_max_entries(MAX_ALLOC_STACKS, crate::NO_PREALLOC);

/// Per creation stack: creation time of its sentinel block (see module docs).
#[map]
static ALLOC_OLDEST: HashMap<StackKey, u64> = HashMap::with_max_entries(MAX_ALLOC_STACKS, crate::NO_PREALLOC);

/// Allocator calls between entry and return, by pid_tgid. A plain
/// (preallocated) hash: cheaper per call than an LRU, and an entry lives
/// only from a call's entry to its return (a full table counts in
/// `tracer_common::allocations::counter::LOST_CALLS`).
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
        Err(e) if e == -EEXIST => {
            // A size point's leftover (from a malloc that returned NULL) is
            // not a call in progress.
            // SAFETY: copied out of the map value.
            if unsafe { ALLOC_PENDING.get(&id) }.is_some_and(|old| old.call == call::SIZE) {
                let _ = ALLOC_PENDING.insert(&id, &p, 0);
            }
        }
        Err(_) => bump(tracer_common::allocations::counter::LOST_CALLS),
    }
    0
}

/// The value of the register with `pt_regs` index `i`.
#[inline(always)]
fn reg_at(r: &aya_ebpf::bindings::pt_regs, i: u64) -> u64 {
    use point::reg;
    match i {
        reg::R15 => r.r15,
        reg::R14 => r.r14,
        reg::R13 => r.r13,
        reg::R12 => r.r12,
        reg::RBP => r.rbp,
        reg::RBX => r.rbx,
        reg::R11 => r.r11,
        reg::R10 => r.r10,
        reg::R9 => r.r9,
        reg::R8 => r.r8,
        reg::RAX => r.rax,
        reg::RCX => r.rcx,
        reg::RDX => r.rdx,
        reg::RSI => r.rsi,
        reg::RDI => r.rdi,
        _ => 0,
    }
}

/// A value a point's cookie locates: a register, or a stack slot above `sp`.
#[inline(always)]
fn located(r: &aya_ebpf::bindings::pt_regs, loc: u64) -> u64 {
    if loc & point::STACK != 0 {
        read_user_u64(r.rsp + (loc & 0xfff))
    } else {
        reg_at(r, loc)
    }
}

/// Whether a point counts this time: always, or when its branch goes the
/// way that leads to the return (x86 condition codes over the saved flags).
#[inline(always)]
fn point_counts(when: u64, flags: u64) -> bool {
    if when & point::BRANCH == 0 {
        return true;
    }
    let cf = flags & 1 != 0;
    let pf = flags & (1 << 2) != 0;
    let zf = flags & (1 << 6) != 0;
    let sf = flags & (1 << 7) != 0;
    let of = flags & (1 << 11) != 0;
    let cc = when & 0xf;
    let holds = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || sf != of,
    };
    let taken = holds != (cc & 1 != 0);
    taken != (when & point::NOT_TAKEN != 0)
}

/// The return address (`ret_slot` bytes above `sp`) and the caller's frame
/// pointer (where `bp_loc` says): one read of the user stack when the saved
/// frame pointer lies in the 64 bytes below the return address (glibc:
/// 16 bytes), else two.
#[inline(always)]
fn ret_and_bp(r: &aya_ebpf::bindings::pt_regs, ret_slot: u64, bp_loc: u64) -> (u64, u64) {
    if bp_loc & point::STACK != 0 {
        let bp_slot = bp_loc & 0xfff;
        if bp_slot <= ret_slot && ret_slot - bp_slot < 64 {
            // SAFETY: user memory read through the helper, which faults safely.
            let Ok(w) = (unsafe { bpf_probe_read_user((r.rsp + bp_slot) as *const [u64; 8]) }) else { return (0, 0) };
            return (w[(((ret_slot - bp_slot) / 8) & 7) as usize], w[0]);
        }
    }
    (read_user_u64(r.rsp + ret_slot), located(r, bp_loc))
}

/// A result or size point that counts this time (the target's thread, its
/// branch going the right way): its cookie, the saved registers, the
/// address of the call's return address, the thread's pid_tgid.
#[inline(always)]
fn point_hit(ctx: &ProbeContext) -> Option<(u64, &aya_ebpf::bindings::pt_regs, u64, u64)> {
    target_tgid()?;
    // SAFETY: the helper only reads the probe's attach cookie.
    let c = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    // SAFETY: the probe's saved registers.
    let regs = unsafe { &*ctx.regs };
    if !point_counts(point::when(c), regs.eflags) {
        return None;
    }
    Some((c, regs, regs.rsp + point::ret_slot(c), bpf_get_current_pid_tgid()))
}

/// A `malloc` result point: the block is known, count it (see module docs).
#[uprobe]
pub fn alloc_result(ctx: ProbeContext) -> u32 {
    let Some((c, regs, frame, id)) = point_hit(&ctx) else { return 0 };
    let mut stored_size = None;
    // SAFETY: copied out of the map value.
    if let Some(p) = (unsafe { ALLOC_PENDING.get(&id) }).copied() {
        if p.call == call::SIZE {
            if p.entry_sp == frame {
                stored_size = Some(p.size);
            }
            let _ = ALLOC_PENDING.remove(&id);
        } else if p.entry_sp >= frame {
            // This malloc is part of an outer call (`realloc(NULL, n)`,
            // `posix_memalign`): the outer call's return counts the block.
            return 0;
        }
    }
    let addr = located(regs, point::result(c));
    if addr == 0 {
        return 0;
    }
    let size = match point::size(c) {
        point::PENDING => match stored_size {
            Some(s) => s,
            None => {
                bump(tracer_common::allocations::counter::LOST_CALLS);
                return 0;
            }
        },
        loc => located(regs, loc),
    };
    if addr & 0xfff == 0x10 {
        // A block the allocator mapped for itself: its mmap was counted as
        // the program's; the block is what counts.
        forget_mapping(addr - 0x10);
    }
    let Some((bytes, count)) = sampled(size) else { return 0 };
    let outer = if new_probed() { outer_stack(id, frame) } else { None };
    let stack = match outer {
        Some(s) => s,
        None => {
            let (ret, bp) = ret_and_bp(regs, point::ret_slot(c), point::caller_bp(c));
            let caller_sp = regs.rsp + point::ret_slot(c) + 8;
            walk(UserRegs { ip: ret, sp: caller_sp, bp, at: AT_RETURN })
        }
    };
    track(addr, stack, bytes, count, 0);
    0
}

/// A `malloc` size point: keeps the size for the result point of the same
/// call, on a path where it would be gone by then.
#[uprobe]
pub fn alloc_size(ctx: ProbeContext) -> u32 {
    let Some((c, regs, frame, id)) = point_hit(&ctx) else { return 0 };
    // SAFETY: copied out of the map value.
    if unsafe { ALLOC_PENDING.get(&id) }.is_some_and(|p| p.call != call::SIZE && p.entry_sp >= frame) {
        return 0;
    }
    let p = AllocPending { size: located(regs, point::size(c)), arg: 0, entry_sp: frame, call: call::SIZE, _pad: 0 };
    if ALLOC_PENDING.insert(&id, &p, 0).is_err() {
        bump(tracer_common::allocations::counter::LOST_CALLS);
    }
    0
}

/// Frames of hand-walked allocation stacks, by hash.
#[map]
static ALLOC_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_WALKED_STACKS, crate::NO_PREALLOC);

/// Scratch space for a walk (too big for the BPF stack).
#[map]
static ALLOC_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// An allocation's stack from the caller's registers (`from.ip` is the
/// return address): walked with unwind rules (`stacks::unwind_user_stack`),
/// or the return address then the frame-pointer
/// chain from `from.bp` (`stacks::walk_user_stack`; cheaper than
/// `bpf_get_stackid`, and possible at a result point, where the probe's own
/// registers are not the caller's). (Reading a 512-byte window of the stack
/// at once instead of one read per frame was tried: no measurable gain on
/// `alloc_bench`'s 3-frame stacks.)
#[inline(always)]
fn walk(from: UserRegs) -> StackKey {
    let walked = if unwinding() {
        unwind_user_stack(&ALLOC_FRAMES, &ALLOC_SCRATCH, [0, 0], 0, from)
    } else {
        walk_user_stack(&ALLOC_FRAMES, &ALLOC_SCRATCH, [from.ip, 0], 1, from.bp)
    };
    match walked {
        Some(hash) => StackKey { stack_id: WALKED_STACK, caller: hash },
        None => StackKey { stack_id: -1, caller: 0 },
    }
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
    // SAFETY: copied out of the map value.
    if unsafe { ALLOC_PENDING.get(&id) }.is_some_and(|p| p.call != call::SIZE) {
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
    // SAFETY: user memory read through the helper, which faults safely.
    let caller = unsafe { bpf_probe_read_user(sp as *const u64).unwrap_or(0) };
    let stack = if unwinding() {
        // SAFETY: the probe's saved registers (rbp is still the caller's
        // before the prologue sets up a frame).
        walk(UserRegs { ip: caller, sp: sp + 8, bp: unsafe { (*ctx.regs).rbp }, at: AT_RETURN })
    } else {
        let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
            Ok(id) => id,
            Err(_) => {
                bump(counter::LOST_STACKS);
                -1
            }
        };
        StackKey { stack_id, caller }
    };
    let outer = OuterStack { stack, sp, ns };
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
    if p.call == call::SIZE || sp_of(ctx.regs) != p.entry_sp.wrapping_add(8) {
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
        // SAFETY: the probe's saved registers.
        None => unsafe { walk(UserRegs { ip: (*ctx.regs).rip, sp: (*ctx.regs).rsp, bp: (*ctx.regs).rbp, at: AT_RETURN }) },
    };
    track(addr, stack, bytes, count, 0);
    0
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
fn track(addr: u64, stack: StackKey, bytes: u64, count: u32, flags: u32) {
    let Some(totals) = totals(stack) else { return };
    let stack = totals.0;
    // The stack's sentinel slot is kept once made: 0 while vacant (its
    // block was freed), taken by the next block with its creation time —
    // a write, not a delete and an insert per block of a churning stack.
    // Two CPUs may both take a vacant slot; the age stays a lower bound.
    let mut now = 0;
    let sentinel = match ALLOC_OLDEST.get_ptr_mut(&stack) {
        // SAFETY: a plain read of the map value.
        Some(slot) if unsafe { *slot } != 0 => false,
        Some(slot) => {
            // SAFETY: no preconditions; then a plain write of the map value.
            unsafe {
                now = bpf_ktime_get_ns();
                *slot = now;
            }
            true
        }
        None => {
            // SAFETY: no preconditions.
            now = unsafe { bpf_ktime_get_ns() };
            ALLOC_OLDEST.insert(&stack, &now, BPF_NOEXIST as u64).is_ok()
        }
    };
    let flags = flags | if sentinel { ALLOC_SENTINEL } else { 0 };
    let info = AllocInfo { stack, bytes, count, flags, created_ns: now };
    let mut stored = ALLOCS.insert(&addr, &info, BPF_NOEXIST as u64);
    if stored == Err(-EEXIST) {
        // An address handed out again without a free we saw (a free path
        // we do not probe): the old block is gone.
        release(addr, false);
        stored = ALLOCS.insert(&addr, &info, BPF_NOEXIST as u64);
    }
    if stored.is_err() {
        bump(tracer_common::allocations::counter::LOST);
        if sentinel {
            vacate(&stack);
        }
        return;
    }
    // SAFETY: this CPU's copy of the value; no other writer while we run.
    unsafe {
        (*totals.1).created += count as u64;
        (*totals.1).bytes_created += bytes;
    }
    bump(tracer_common::allocations::counter::EVENTS);
}

/// Removes a block from the live table and counts it freed under its
/// stack. Unknown blocks count as untracked frees when `count_untracked`.
#[inline(always)]
fn release(addr: u64, count_untracked: bool) {
    // SAFETY: copied out before removal.
    let Some(info) = (unsafe { ALLOCS.get(&addr) }).copied() else {
        if count_untracked {
            bump(tracer_common::allocations::counter::UNTRACKED_FREES);
        }
        return;
    };
    // Only the side whose delete succeeds counts.
    if ALLOCS.remove(&addr).is_err() {
        return;
    }
    if info.flags & ALLOC_SENTINEL != 0 {
        vacate(&info.stack);
    }
    add(&info.stack, 0, info.count as u64, 0, info.bytes);
    bump(tracer_common::allocations::counter::EVENTS);
}

/// Marks a stack's sentinel slot vacant (its block is gone).
#[inline(always)]
fn vacate(stack: &StackKey) {
    if let Some(slot) = ALLOC_OLDEST.get_ptr_mut(stack) {
        // SAFETY: a plain write of the map value.
        unsafe { *slot = 0 };
    }
}

/// Takes back an anonymous mapping counted as the program's when the
/// allocator turns out to have made it (a `malloc` result 16 bytes into it:
/// glibc's mmapped chunks): as if it had never been counted.
#[inline(always)]
fn forget_mapping(start: u64) {
    // SAFETY: copied out before removal.
    let Some(info) = (unsafe { ALLOCS.get(&start) }).copied() else { return };
    if info.flags & ALLOC_MMAP == 0 || ALLOCS.remove(&start).is_err() {
        return;
    }
    if info.flags & ALLOC_SENTINEL != 0 {
        vacate(&info.stack);
    }
    if let Some(s) = ALLOC_STACKS.get_ptr_mut(&info.stack) {
        // This CPU's copy may wrap below zero; user space sums the CPUs
        // with wrapping arithmetic, so the totals come out right.
        // SAFETY: this CPU's copy of the value; no other writer while we run.
        unsafe {
            (*s).created = (*s).created.wrapping_sub(info.count as u64);
            (*s).bytes_created = (*s).bytes_created.wrapping_sub(info.bytes);
        }
    }
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
/// (not by the allocator, whose own mmaps happen inside a pending call, or,
/// for a `malloc` traced by result points, are taken back when the block
/// comes out of it: `forget_mapping`).
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
    // SAFETY: copied out of the map value.
    if unsafe { ALLOC_PENDING.get(&bpf_get_current_pid_tgid()) }.is_some_and(|p| p.call != call::SIZE) {
        return 0;
    }
    let [_, len, prot, flags] = syscall_args();
    // PROT_NONE: an address-space reservation (glibc's arena heaps, thread
    // stacks with a guard), not memory in use.
    if flags & MAP_ANONYMOUS == 0 || flags & MAP_FIXED != 0 || prot == 0 {
        return 0;
    }
    let Some((bytes, count)) = sampled(len) else { return 0 };
    track(ret as u64, user_stack(&ctx), bytes, count, ALLOC_MMAP);
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
