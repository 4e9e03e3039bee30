//! Lock-contention tracker, kernel side: contended waits only.
//!
//! C (glibc) and other futex users: `sys_enter_futex` / `sys_exit_futex`,
//! filtered to the target. An uncontended `pthread_mutex_lock` never makes a
//! syscall, so nothing here runs for it. A wait is told from a condvar or a
//! join wait by the libc function that made the call: user space
//! disassembles libc from its exported lock functions and gives us, for each
//! `syscall` and each `call` on the way, where the return address sits
//! relative to `sp` and whether the function saved `rbp` (see
//! `tracer_common::locks::LockSite`). Following that chain gives the
//! application's return address and frame pointer even though Debian's libc
//! has no frame pointers; the rest of the stack is walked by hand from there
//! (`bpf_get_stackid` would start from glibc's clobbered `rbp`). Holders:
//! the futex wake an unlock makes only when there are waiters
//! (`__lll_lock_wake`), with the unlocking code's stack.
//!
//! Go: uprobes on the runtime's semaphore entry points that `sync.Mutex` and
//! `sync.RWMutex` reach only when they must wait (`sync.runtime_SemacquireMutex`,
//! `..RWMutexR`, `..RWMutex`) at a cheap (emulated) prologue instruction,
//! their RETs for the wait end (keyed by the g pointer in R14: a goroutine
//! may resume on another thread; never uretprobes on Go), and
//! `runtime_Semrelease` for holders. Go's own runtime futexes are ignored.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
    programs::{tracing::StackIdContext, ProbeContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    counter,
    locks::{
        kind, root, LockSite, LockStack, LockStats, PendingWait, WaitTotals, WalkedFrames, CONFIG_IGNORE_FOREIGN,
        HIST_BUCKETS, MAX_LOCKS, MAX_LOCK_SITES, MAX_LOCK_STACKS, MAX_PENDING_WAITS,
        MAX_WALKED_STACKS,
    },
    stacks::StackKey,
};

use crate::{
    bump,
    stacks::{
        read_user_u64, unwind_user_stack, unwinding, unwound_stack, user_ip_sp_bp, walk_user_stack, UserRegs, AT_PC, STACKS,
    },
    target_tgid,
};

/// libc: address after a `syscall` in a lock path -> where the return address is.
#[map]
static LOCK_SYSCALL_SITES: HashMap<u64, LockSite> = HashMap::with_max_entries(MAX_LOCK_SITES, crate::NO_PREALLOC);
/// libc: return address of a `call` in a lock path -> the caller's frame.
#[map]
static LOCK_CALL_SITES: HashMap<u64, LockSite> = HashMap::with_max_entries(MAX_LOCK_SITES, crate::NO_PREALLOC);
/// Switches set by user space (see `CONFIG_*`).
#[map]
static LOCK_CONFIG: Array<u64> = Array::with_max_entries(4, 0);
/// Per lock word: contentions, wait time, histogram (per CPU).
#[map]
static LOCKS: PerCpuHashMap<u64, LockStats> = PerCpuHashMap::with_max_entries(MAX_LOCKS, crate::NO_PREALLOC);
/// Per (lock, waiter stack): waits and wait time (per CPU).
#[map]
static LOCK_WAITERS: PerCpuHashMap<LockStack, WaitTotals> = PerCpuHashMap::with_max_entries(MAX_LOCK_STACKS, crate::NO_PREALLOC);
/// Per (lock, holder stack): wakes of waiters by an unlock (per CPU).
#[map]
static LOCK_HOLDERS: PerCpuHashMap<LockStack, WaitTotals> = PerCpuHashMap::with_max_entries(MAX_LOCK_STACKS, crate::NO_PREALLOC);
/// Go semaphores a sync.Mutex/RWMutex wait was seen on (LRU-bounded): a
/// release of any other (sync.WaitGroup, sync.Cond...) is no lock's holder
/// and would only fill `LOCK_HOLDERS`.
#[map]
static GO_WAITED_SEMAS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_LOCKS, 0);
/// Hand-walked stacks, by hash of their frames.
#[map]
static LOCK_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_WALKED_STACKS, crate::NO_PREALLOC);
/// Scratch space (too big for the BPF stack).
#[map]
static LOCK_SCRATCH_FRAMES: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LOCK_SCRATCH_STATS: PerCpuArray<LockStats> = PerCpuArray::with_max_entries(1, 0);
/// `lock_futex_enter_java`, the futex program of a JVM (slot 0; set by user space).
#[map]
static LOCK_JAVA: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Futex waits in progress, by thread.
#[map]
static FUTEX_PENDING: LruHashMap<u64, PendingWait> = LruHashMap::with_max_entries(MAX_PENDING_WAITS, 0);
/// Go semaphore waits in progress, by g.
#[map]
static GO_PENDING: LruHashMap<u64, PendingWait> = LruHashMap::with_max_entries(MAX_PENDING_WAITS, 0);

const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_UNLOCK_PI: u64 = 7;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_LOCK_PI2: u64 = 13;
/// `op` without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME.
const FUTEX_CMD_MASK: u64 = 0x7f;

#[inline(always)]
fn config(index: u32) -> u64 {
    LOCK_CONFIG.get(index).copied().unwrap_or(0)
}

/// What the libc return-address chain says about the current futex call.
struct Chain {
    root: u32,
    /// Innermost libc address to show (the call site in the lock function).
    first: u64,
    /// The application's return address and frame pointer.
    app_ret: u64,
    app_bp: u64,
}

/// Follows the return addresses from a known libc syscall site out to the
/// application; `None` when the site is not one user space knows.
#[inline(always)]
fn libc_chain(ip: u64, sp: u64, bp: u64) -> Option<Chain> {
    // SAFETY: copied out of the map value.
    let site = unsafe { LOCK_SYSCALL_SITES.get(&ip) }.copied()?;
    let mut slot = sp + site.depth as u64;
    let mut rbp_slot = if site.rbp_at != 0 { slot - site.rbp_at as u64 } else { 0 };
    let mut root = site.root;
    let mut first = ip;
    let mut ret = read_user_u64(slot);
    for _ in 0..6 {
        // SAFETY: copied out of the map value.
        let Some(c) = (unsafe { LOCK_CALL_SITES.get(&ret) }).copied() else { break };
        if root == root::NONE {
            root = c.root;
        }
        first = ret;
        slot = slot + 8 + c.depth as u64;
        if c.rbp_at != 0 {
            rbp_slot = slot - c.rbp_at as u64;
        }
        ret = read_user_u64(slot);
    }
    let app_bp = if rbp_slot != 0 { read_user_u64(rbp_slot) } else { bp };
    Some(Chain { root, first, app_ret: ret, app_bp })
}

/// Walks the stack from the futex call `at` with unwind rules, or the
/// application's frame-pointer chain from the chain's end; stores the frames
/// in `LOCK_FRAMES` and returns their key (0 on failure).
#[inline(always)]
fn walked_stack(chain: &Chain, at: UserRegs) -> u64 {
    if unwinding() {
        return unwind_user_stack(&LOCK_FRAMES, &LOCK_SCRATCH_FRAMES, [0, 0], 0, at).unwrap_or(0);
    }
    walk_user_stack(&LOCK_FRAMES, &LOCK_SCRATCH_FRAMES, [chain.first, chain.app_ret], 2, chain.app_bp).unwrap_or(0)
}

/// The kernel's frame-pointer stack of the current task (`caller`: the
/// return address the walk skips at a function entry, or 0).
#[inline(always)]
fn kernel_stack<C: EbpfContext + StackIdContext>(ctx: &C, caller: u64) -> StackKey {
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(_) => {
            bump(counter::LOST_STACKS);
            -1
        }
    };
    StackKey { stack_id, caller }
}

/// Adds one completed wait to the lock's and the (lock, stack) totals.
#[inline(always)]
fn record_wait(w: &PendingWait, now: u64) {
    let dt = now.saturating_sub(w.start_ns);
    let lock = w.at.lock;
    if LOCKS.get_ptr_mut(&lock).is_none() {
        let Some(z) = LOCK_SCRATCH_STATS.get_ptr_mut(0) else { return };
        // SAFETY: this CPU's scratch slot.
        let z = unsafe { &mut *z };
        z.contentions = 0;
        z.wait_ns = 0;
        z.max_wait_ns = 0;
        z.kind = w.kind;
        z.first = w.at;
        for i in 0..HIST_BUCKETS {
            z.hist[i] = 0;
        }
        if LOCKS.insert(&lock, z, 0).is_err() {
            bump(tracer_common::locks::counter::LOST);
            return;
        }
    }
    let Some(s) = LOCKS.get_ptr_mut(&lock) else { return };
    // SAFETY: this CPU's copy of the value.
    let s = unsafe { &mut *s };
    // The entry exists, but this CPU's copy may never have been written.
    if s.kind == 0 {
        s.kind = w.kind;
        s.first = w.at;
    }
    s.contentions += 1;
    s.wait_ns += dt;
    if dt > s.max_wait_ns {
        s.max_wait_ns = dt;
    }
    let b = if dt == 0 { 0 } else { 63 - dt.leading_zeros() as usize };
    let b = if b >= HIST_BUCKETS { HIST_BUCKETS - 1 } else { b };
    s.hist[b] += 1;
    add(&LOCK_WAITERS, &w.at, dt);
    bump(tracer_common::locks::counter::WAITS);
}

#[inline(always)]
fn add(table: &PerCpuHashMap<LockStack, WaitTotals>, key: &LockStack, wait_ns: u64) {
    if let Some(t) = table.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of the value.
        unsafe {
            (*t).count += 1;
            (*t).wait_ns += wait_ns;
        }
    } else if table.insert(key, &WaitTotals { count: 1, wait_ns }, 0).is_err() {
        bump(tracer_common::locks::counter::LOST);
    }
}

/// What a futex wait is: a lock kind, or `None` (condvar, join, other).
#[inline(always)]
fn wait_kind(root: u32, cmd: u64, val: u64, known_site: bool) -> Option<u32> {
    let lll = (cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET) && val == 2;
    let pi = cmd == FUTEX_LOCK_PI || cmd == FUTEX_LOCK_PI2;
    match root {
        root::MUTEX_LOCK => Some(kind::MUTEX),
        root::RWLOCK_READ => Some(kind::RWLOCK_READ),
        root::RWLOCK_WRITE => Some(kind::RWLOCK_WRITE),
        // A condvar waiter re-taking its mutex waits on the mutex word.
        root::COND_WAIT if lll || pi => Some(kind::MUTEX),
        root::NONE if known_site && (lll || pi) => Some(kind::MUTEX),
        root::NONE if !known_site && (lll || pi) => Some(kind::FUTEX),
        _ => None,
    }
}

/// syscalls:sys_enter_futex.
#[tracepoint]
pub fn lock_futex_enter(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: reads within the tracepoint record (arguments from offset 16).
    let (uaddr, op, val) = unsafe {
        (
            ctx.read_at::<u64>(16).unwrap_or(0),
            ctx.read_at::<u64>(24).unwrap_or(0),
            ctx.read_at::<u64>(32).unwrap_or(0) as u32 as u64,
        )
    };
    let cmd = op & FUTEX_CMD_MASK;
    let is_wait = matches!(cmd, FUTEX_WAIT | FUTEX_WAIT_BITSET | FUTEX_LOCK_PI | FUTEX_LOCK_PI2);
    let is_wake = matches!(cmd, FUTEX_WAKE | FUTEX_WAKE_BITSET | FUTEX_UNLOCK_PI);
    if !is_wait && !is_wake {
        return 0;
    }
    // A JVM: its own program (the Java walk and this one together are too
    // much for older verifiers). It does not come back; when it is not
    // set up the native path below goes on.
    if crate::jvm::is_jvm() {
        // SAFETY: a tail call into a program of the same type.
        unsafe { LOCK_JAVA.tail_call(&ctx, 0) };
    }
    let Some((ip, sp, bp)) = user_ip_sp_bp() else { return 0 };
    let regs = UserRegs { ip, sp, bp, at: AT_PC };
    // A `None`'s payload is undefined, and copies of it spill registers the
    // verifier has never seen written: keep a defined value behind it.
    let found = libc_chain(ip, sp, bp);
    let known = found.is_some();
    let defined = found.unwrap_or(Chain { root: root::NONE, first: 0, app_ret: 0, app_bp: 0 });
    let chain = if known { Some(&defined) } else { None };
    if chain.is_none() && config(CONFIG_IGNORE_FOREIGN) != 0 {
        // A Go program's runtime.futex: the runtime's own locks and parking.
        return 0;
    }
    let root = chain.map_or(root::NONE, |c| c.root);
    if is_wake {
        let holder = match root {
            root::MUTEX_UNLOCK | root::RWLOCK_UNLOCK => true,
            // cond_wait releasing its mutex to waiters.
            root::COND_WAIT => cmd == FUTEX_WAKE && val == 1,
            // Outside known lock functions: a wake of a word already seen
            // contended (after the first completed wait on it).
            root::NONE => chain.is_none() && (val == 1 || cmd == FUTEX_UNLOCK_PI) && LOCKS.get_ptr(&uaddr).is_some(),
            _ => false,
        };
        if !holder {
            return 0;
        }
        let at = stack_at(&ctx, uaddr, chain, regs);
        add(&LOCK_HOLDERS, &at, 0);
        bump(tracer_common::locks::counter::WAKES);
        return 0;
    }
    let Some(k) = wait_kind(root, cmd, val, chain.is_some()) else {
        bump(tracer_common::locks::counter::OTHER_WAITS);
        return 0;
    };
    let at = stack_at(&ctx, uaddr, chain, regs);
    // SAFETY: no preconditions.
    let w = PendingWait { start_ns: unsafe { bpf_ktime_get_ns() }, kind: k, _pad: 0, at };
    if FUTEX_PENDING.insert(&bpf_get_current_pid_tgid(), &w, 0).is_err() {
        bump(tracer_common::locks::counter::LOST);
    }
    0
}

/// syscalls:sys_enter_futex of a JVM, tail-called from `lock_futex_enter`:
/// a thread out of Java code waits on or wakes its own Parker's or
/// ParkEvent's word, whatever it waits for; every wait and wake is taken
/// with its Java stack, and user space groups the waits by their Java wait
/// site and pairs the wakes to them through the word. Threads without Java
/// frames (the JVM's own: compiler, GC) are left out.
#[tracepoint]
pub fn lock_futex_enter_java(ctx: TracePointContext) -> u32 {
    // SAFETY: reads within the tracepoint record (arguments from offset 16).
    let (uaddr, op) = unsafe { (ctx.read_at::<u64>(16).unwrap_or(0), ctx.read_at::<u64>(24).unwrap_or(0)) };
    let cmd = op & FUTEX_CMD_MASK;
    let is_wake = matches!(cmd, FUTEX_WAKE | FUTEX_WAKE_BITSET | FUTEX_UNLOCK_PI);
    let Some(stack) = crate::jvm::java_stack_key() else { return 0 };
    let at = LockStack { lock: uaddr, stack, walked: 0 };
    if is_wake {
        add(&LOCK_HOLDERS, &at, 0);
        bump(tracer_common::locks::counter::WAKES);
        return 0;
    }
    // SAFETY: no preconditions.
    let w = PendingWait { start_ns: unsafe { bpf_ktime_get_ns() }, kind: kind::JAVA, _pad: 0, at };
    if FUTEX_PENDING.insert(&bpf_get_current_pid_tgid(), &w, 0).is_err() {
        bump(tracer_common::locks::counter::LOST);
    }
    0
}

#[inline(always)]
fn stack_at(ctx: &TracePointContext, lock: u64, chain: Option<&Chain>, at: UserRegs) -> LockStack {
    match chain {
        Some(c) => LockStack { lock, stack: StackKey::default(), walked: walked_stack(c, at) },
        None if unwinding() => LockStack { lock, stack: unwound_stack(at), walked: 0 },
        None => LockStack { lock, stack: kernel_stack(ctx, 0), walked: 0 },
    }
}

/// syscalls:sys_exit_futex.
#[tracepoint]
pub fn lock_futex_exit(_ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before removal.
    let Some(w) = (unsafe { FUTEX_PENDING.get(&id) }).copied() else { return 0 };
    let _ = FUTEX_PENDING.remove(&id);
    // SAFETY: no preconditions.
    record_wait(&w, unsafe { bpf_ktime_get_ns() });
    0
}

#[inline(always)]
fn go_acquire(ctx: &ProbeContext, k: u32) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the probe's saved registers.
    let (g, sema, sp) = unsafe { ((*ctx.regs).r14, (*ctx.regs).rax, (*ctx.regs).rsp) };
    let at = LockStack { lock: sema, stack: kernel_stack(ctx, read_user_u64(sp)), walked: 0 };
    let _ = GO_WAITED_SEMAS.insert(&sema, &1, 0);
    // SAFETY: no preconditions.
    let w = PendingWait { start_ns: unsafe { bpf_ktime_get_ns() }, kind: k, _pad: 0, at };
    if GO_PENDING.insert(&g, &w, 0).is_err() {
        bump(tracer_common::locks::counter::LOST);
    }
    0
}

/// Uprobe at a cheap prologue instruction of Go's `runtime_SemacquireMutex`,
/// reached only by a contended sync.Mutex (RAX = the semaphore, R14 = g,
/// the return address at [sp]).
#[uprobe]
pub fn lock_go_acquire_mutex(ctx: ProbeContext) -> u32 {
    go_acquire(&ctx, kind::GO_MUTEX_SEMA)
}

/// The same for `runtime_SemacquireRWMutexR` (an RWMutex reader waits).
#[uprobe]
pub fn lock_go_acquire_read(ctx: ProbeContext) -> u32 {
    go_acquire(&ctx, kind::GO_RWMUTEX_READ)
}

/// The same for `runtime_SemacquireRWMutex` (an RWMutex writer waits).
#[uprobe]
pub fn lock_go_acquire_write(ctx: ProbeContext) -> u32 {
    go_acquire(&ctx, kind::GO_RWMUTEX_WRITE)
}

/// Uprobe on each RET of those functions: the wait is over.
#[uprobe]
pub fn lock_go_acquired(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the probe's saved registers.
    let g = unsafe { (*ctx.regs).r14 };
    // SAFETY: copied out before removal.
    let Some(w) = (unsafe { GO_PENDING.get(&g) }).copied() else { return 0 };
    let _ = GO_PENDING.remove(&g);
    // SAFETY: no preconditions.
    record_wait(&w, unsafe { bpf_ktime_get_ns() });
    0
}

/// Uprobe at a cheap prologue instruction of Go's semaphore release, called
/// by an unlock that has waiters to wake: the holder's stack.
#[uprobe]
pub fn lock_go_release(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    // SAFETY: the probe's saved registers.
    let (sema, sp) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rsp) };
    // Only the holders a wait can need: semaphores of locks waited on.
    // SAFETY: lookup only.
    if unsafe { GO_WAITED_SEMAS.get(&sema) }.is_none() {
        return 0;
    }
    let at = LockStack { lock: sema, stack: kernel_stack(&ctx, read_user_u64(sp)), walked: 0 };
    add(&LOCK_HOLDERS, &at, 0);
    bump(tracer_common::locks::counter::WAKES);
    0
}
