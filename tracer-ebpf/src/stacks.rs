//! User stacks of every tracker, walked one of two ways (`UNWIND_MODE`):
//!
//! - with per-pc unwind rules (the default): `UNWIND_RULES` holds, for each
//!   exact pc seen so far, where the caller's frame is (learned by user
//!   space from the object's `.eh_frame`, see `tracer-user/src/stacks/unwind.rs`).
//!   One hash lookup and one or two reads per frame, correct in code built
//!   without frame pointers; a pc with no rule yet ends the walk there and
//!   is queued in `UNWIND_MISSES` with a copy of the stack above it, from
//!   which user space learns the rules of the whole call path at once;
//! - with frame pointers: `bpf_get_stackid` for syscall tracepoints, where
//!   the libc wrapper's caller (skipped: the wrapper has no frame) is read
//!   at the offset user space found by disassembly (`SYSCALL_SITES`), and the
//!   hand-made walk of `walk_user_stack`.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf, bpf_task_pt_regs},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext, ProbeContext, TracePointContext},
};
use tracer_common::{
    counter,
    stacks::{
        finalizer, rule_kind, unwind_counter, unwind_mode, MissSnapshot, FINALIZER_WALK_FRAMES, StackCounts, StackKey, SyscallSite, UnwindRule, WalkedFrames,
        MAX_UNWIND_MISSES, MAX_UNWIND_RULES, MISS_STACK_BYTES, MAX_UNWOUND_STACKS, MAX_WALKED_FRAMES, OVERFLOW_STACK, PROVISIONAL_KEY, RULE_AT_PC,
        UNWOUND_STACK, COLLIDED_STACK, MAX_WALKED_STACKS, SCAN_WORDS, WALKED_STACK,
    },
};

/// How user stacks are walked (`tracer_common::stacks::unwind_mode`); set
/// by user space at load time.
#[no_mangle]
static UNWIND_MODE: u32 = unwind_mode::RULES;

/// Exact pc (a return address, or with `RULE_AT_PC` the pc a thread is
/// at) -> how to find its caller's frame; filled by user space.
#[map]
static UNWIND_RULES: HashMap<u64, UnwindRule> = HashMap::with_max_entries(MAX_UNWIND_RULES, crate::NO_PREALLOC);

/// Walks that stopped at a pc without a rule, by their provisional stack
/// key, with the stack above that pc, for user space (which deletes them).
#[map]
static UNWIND_MISSES: HashMap<u64, MissSnapshot> = HashMap::with_max_entries(MAX_UNWIND_MISSES, crate::NO_PREALLOC);

/// Where a miss's snapshot is built (too big for the BPF stack).
#[map]
static MISS_SCRATCH: PerCpuArray<MissSnapshot> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU sequence numbers that make provisional keys unique.
#[map]
static MISS_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A provisional key for a walk that stopped at a miss (`hash`: the partial
/// stack's): unique to this event.
#[inline(always)]
fn provisional_key(hash: u64) -> u64 {
    let mut seq = 0;
    if let Some(n) = MISS_SEQ.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; no other writer while we run.
        unsafe {
            *n += 1;
            seq = *n;
        }
    }
    // SAFETY: no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() } as u64;
    mix(hash, seq ^ (cpu << 48)) | PROVISIONAL_KEY
}

/// Queues the miss of the walk keyed `key` for user space: the frame's rule
/// key and registers, and up to `MISS_STACK_BYTES` of stack from `sp` (read
/// in 512-byte pieces: a read past the stack's end fails whole).
/// Returns whether it was queued (not when the queue is full).
#[inline(always)]
fn queue_miss(key: u64, rule_key: u64, sp: u64, bp: u64) -> bool {
    let Some(m) = MISS_SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's scratch slot; no other user while we run.
    let m = unsafe { &mut *m };
    m.rule_key = rule_key;
    m.sp = sp;
    m.bp = bp;
    m.len = 0;
    m.unmaps = crate::unmapped::unmaps();
    const PIECE: usize = 512;
    for i in 0..MISS_STACK_BYTES / PIECE {
        let at = i * PIECE;
        // SAFETY: user memory through the helper, which faults safely.
        let ok = unsafe {
            aya_ebpf::helpers::bpf_probe_read_user_buf((sp + at as u64) as *const u8, &mut m.stack[at..at + PIECE])
        };
        if ok.is_err() {
            break;
        }
        m.len = (at + PIECE) as u64;
    }
    // The stack's end (a thread's top) is rarely 512-aligned: take what is
    // left of it in halving pieces.
    for shift in 0..6u32 {
        let piece = (PIECE / 2) >> shift;
        let at = m.len as usize;
        let Some(dst) = m.stack.get_mut(at..at + piece) else { continue };
        // SAFETY: user memory through the helper, which faults safely.
        if unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf((sp + at as u64) as *const u8, dst) }.is_ok() {
            m.len = (at + piece) as u64;
        }
    }
    UNWIND_MISSES.insert(&key, m, 0).is_ok()
}

/// Stacks walked with rules for the trackers that have no walked-stack
/// table of their own (connections, threads), by hash.
#[map]
static UNWOUND_STACKS: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_UNWOUND_STACKS, crate::NO_PREALLOC);

/// Scratch space for a walk into `UNWOUND_STACKS` (too big for the BPF stack).
#[map]
static UNWOUND_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// Whether stacks are walked with unwind rules (else frame pointers).
#[inline(always)]
pub fn unwinding() -> bool {
    // SAFETY: a plain read of a global that user space wrote before load.
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) == unwind_mode::RULES }
}

/// Where a walk starts: the registers of the innermost frame not yet
/// recorded, and whether `ip` is a return address (`at: AT_RETURN`: the
/// frame is a caller's, its rule is looked up at `ip - 1`) or the pc the
/// thread is at (`AT_PC`). All u64: a padded struct's copy hands the
/// verifier uninitialized bytes.
#[derive(Clone, Copy)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub at: u64,
}

/// `UserRegs::at` of a return address.
pub const AT_RETURN: u64 = 0;
/// `UserRegs::at` of the pc a thread is at.
pub const AT_PC: u64 = RULE_AT_PC;

/// `sigcontext` (in the `ucontext` a signal frame holds at `sp + 40` when
/// `__restore_rt` runs): rbp, rsp and rip, in 8-byte slots.
const SIGFRAME_MCONTEXT: u64 = 40;
const SIGCONTEXT_BP: u64 = 10;
const SIGCONTEXT_SP: u64 = 15;
const SIGCONTEXT_IP: u64 = 16;

/// User stacks of every tracker, deduplicated by the kernel.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Stacks whose `STACKS` bucket another stack holds, walked instead
/// ([`user_stack`]), by the hash of their frames.
#[map]
pub static STACK_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_WALKED_STACKS, crate::NO_PREALLOC);

/// This CPU's [`WalkedFrames`] being built for `STACK_FRAMES`.
#[map]
static STACK_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// Address after a `syscall` instruction in a libc wrapper -> return-address offset.
#[map]
static SYSCALL_SITES: HashMap<u64, SyscallSite> = HashMap::with_max_entries(1024, crate::NO_PREALLOC);

/// The executable's text, `[start, end)` (slots 0 and 1; 0 while unknown):
/// set by user space from the target's mappings.
#[map]
static APP_TEXT: Array<u64> = Array::with_max_entries(2, 0);

/// Per CPU: the part of a user stack [`app_stack`] scans (and one slot for
/// the index found).
#[map]
static SCAN_BUF: PerCpuArray<[u64; SAVED_RBP_WORDS + SCAN_WORDS + 1]> = PerCpuArray::with_max_entries(1, 0);

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

/// A user stack walked with unwind rules: the `known` innermost addresses
/// (`known[..n_known]`, 0 to 2: frames a probe already knows), then `regs.ip`
/// and each caller found by `UNWIND_RULES`, at most `MAX_WALKED_FRAMES` in
/// all. The walk ends at an outermost frame (`END`), a pc without a rule
/// (counted; the stack then gets a provisional key of its own and the miss
/// is queued in `UNWIND_MISSES` for user space to finish), an unreadable or
/// non-growing frame, or the frame cap (counted). Stored in `table` under
/// the same hash as [`walk_user_stack`]'s; returns the key, or `None` when
/// the table is full (counted in `LOST_STACKS`).
#[inline(always)]
pub fn unwind_user_stack(
    table: &HashMap<u64, WalkedFrames>,
    scratch: &PerCpuArray<WalkedFrames>,
    known: [u64; 2],
    n_known: usize,
    regs: UserRegs,
) -> Option<u64> {
    let f = scratch.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; no other user while we run.
    let f = unsafe { &mut *f };
    let mut hash = 0xcbf2_9ce4_8422_2325;
    let mut len = 0usize;
    if n_known > 0 {
        f.ips[0] = known[0];
        hash = mix(hash, known[0]);
        len = 1;
    }
    if n_known > 1 {
        f.ips[1] = known[1];
        hash = mix(hash, known[1]);
        len = 2;
    }
    let UserRegs { mut ip, mut sp, mut bp, at } = regs;
    let mut key = ip | (at & RULE_AT_PC);
    let mut missed = false;
    // Code with rules was unmapped and user space has not dropped them yet:
    // no rule is trusted (the miss path finishes the stack in user space).
    let rules_current = crate::unmapped::rules_current();
    // One more round than frames kept: a stack that still goes on there is
    // cut, and counted.
    for _ in 0..MAX_WALKED_FRAMES + 1 {
        if ip < LOWEST_FRAME {
            break;
        }
        let Some(slot) = f.ips.get_mut(len) else {
            crate::bump(unwind_counter::DEPTH_CAP);
            break;
        };
        *slot = ip;
        hash = mix(hash, ip);
        len += 1;
        // SAFETY: copied out of the map value.
        let found = if rules_current { unsafe { UNWIND_RULES.get(&key) }.copied() } else { None };
        let Some(rule) = found else {
            missed = true;
            crate::bump(unwind_counter::MISSES);
            break;
        };
        if rule.kind == rule_kind::SIGNAL {
            // The interrupted frame: its pc is where it was, not a return address.
            let m = sp + SIGFRAME_MCONTEXT;
            let (nip, nsp) = (read_user_u64(m + 8 * SIGCONTEXT_IP), read_user_u64(m + 8 * SIGCONTEXT_SP));
            bp = read_user_u64(m + 8 * SIGCONTEXT_BP);
            if nsp == 0 || nip == 0 {
                crate::bump(unwind_counter::BAD_FRAMES);
                break;
            }
            ip = nip;
            sp = nsp;
            key = ip | RULE_AT_PC;
            continue;
        }
        let base = match rule.kind {
            rule_kind::CFA_SP => sp,
            rule_kind::CFA_BP => bp,
            rule_kind::FP_GUESS => {
                crate::bump(unwind_counter::FP_GUESSES);
                bp
            }
            _ => break,
        };
        let cfa = base.wrapping_add(rule.cfa_offset as i64 as u64);
        let ret;
        if rule.rbp_offset == -16 {
            // The usual frame: saved rbp and the return address side by side.
            // SAFETY: user memory read through the helper, which faults safely.
            let Ok(w) = (unsafe { bpf_probe_read_user((cfa - 16) as *const [u64; 2]) }) else {
                crate::bump(unwind_counter::BAD_FRAMES);
                break;
            };
            bp = w[0];
            ret = w[1];
        } else {
            ret = read_user_u64(cfa - 8);
            if rule.rbp_offset != 0 {
                bp = read_user_u64(cfa.wrapping_add(rule.rbp_offset as i64 as u64));
            }
        }
        if ret == 0 || cfa <= sp {
            if ret != 0 {
                crate::bump(unwind_counter::BAD_FRAMES);
            }
            break;
        }
        sp = cfa;
        ip = ret;
        key = ret;
    }
    f.len = len as u64;
    let mut hash = mix(hash, len as u64).max(1);
    if missed {
        // A key of its own for user space to finish; with the queue full,
        // the partial stack's key (cut, counted): a key per event would
        // fill the stack tables with stacks never finished.
        let provisional = provisional_key(hash);
        if queue_miss(provisional, key, sp, bp) {
            hash = provisional;
        } else {
            crate::bump(unwind_counter::QUEUE_FULL);
        }
    }
    // SAFETY: lookup only.
    if unsafe { table.get(&hash) }.is_none() && table.insert(&hash, f, 0).is_err() {
        crate::bump(counter::LOST_STACKS);
        return None;
    }
    Some(hash)
}

/// The stack from `regs` (no known frames) as a key of the shared
/// `UNWOUND_STACKS` table; a lost stack when it does not fit.
#[inline(always)]
pub fn unwound_stack(regs: UserRegs) -> StackKey {
    match unwind_user_stack(&UNWOUND_STACKS, &UNWOUND_SCRATCH, [0, 0], 0, regs) {
        Some(hash) => StackKey { stack_id: UNWOUND_STACK, caller: hash },
        None => StackKey { stack_id: -1, caller: 0 },
    }
}

/// The stack of a uprobe placed on a function's first instruction: a JVM
/// thread's Java frames, walked with rules from the probe's registers, or with frame pointers plus the
/// return address at `[sp]` the frame-pointer walk skips.
#[inline(always)]
pub fn entry_probe_stack(ctx: &ProbeContext) -> StackKey {
    if let Some(java) = crate::jvm::java_stack_key() {
        return java;
    }
    // SAFETY: the probe's saved registers.
    let (ip, sp, bp) = unsafe { ((*ctx.regs).rip, (*ctx.regs).rsp, (*ctx.regs).rbp) };
    if unwinding() {
        return unwound_stack(UserRegs { ip, sp, bp, at: AT_PC });
    }
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(_) => {
            crate::bump(counter::LOST_STACKS);
            -1
        }
    };
    StackKey { stack_id, caller: read_user_u64(sp) }
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

/// The current user stack as a [`StackKey`] (a JVM thread's Java frames,
/// walked with rules, or the kernel's frame-pointer walk plus the wrapper's caller); counts a lost
/// stack on failure.
#[inline(always)]
pub fn user_stack(ctx: &TracePointContext) -> StackKey {
    if let Some(java) = crate::jvm::java_stack_key() {
        return java;
    }
    native_user_stack(ctx)
}

/// [`user_stack`] without the Java walk (a caller that looked for Java
/// frames already: one copy of the walk per program).
#[inline(always)]
fn native_user_stack(ctx: &TracePointContext) -> StackKey {
    if unwinding() {
        let Some((ip, sp, bp)) = user_ip_sp_bp() else {
            crate::bump(counter::LOST_STACKS);
            return StackKey { stack_id: -1, caller: 0 };
        };
        return unwound_stack(UserRegs { ip, sp, bp, at: AT_PC });
    }
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
    match caller_slot() {
        Some(slot) => read_user_u64(slot),
        None => 0,
    }
}

/// Where the libc wrapper keeps its return address (the user address of the
/// slot), when the current syscall site is known.
#[inline(always)]
fn caller_slot() -> Option<u64> {
    let regs = user_regs();
    if regs.is_null() {
        return None;
    }
    let ip = reg(regs, PT_REGS_IP);
    // SAFETY: copied out of the map value.
    let site = (unsafe { SYSCALL_SITES.get(&ip) }).copied()?;
    Some(reg(regs, PT_REGS_SP) + site.ret_offset as u64)
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

/// Words below the application's return address searched for the `rbp`
/// libc saved (`app_stack`).
const SAVED_RBP_WORDS: usize = 24;

/// The executable's text range (0, 0 until user space sets it).
#[inline(always)]
fn app_text() -> (u64, u64) {
    (APP_TEXT.get(0).copied().unwrap_or(0), APP_TEXT.get(1).copied().unwrap_or(0))
}

/// The current user stack (a JVM thread's Java frames first), also when the syscall is made deep inside libc
/// (`fopen` -> `__fopen_internal` -> ... -> `__libc_open64`): there libc
/// has reused `rbp` and the frame-pointer walk stops at the first frame, so
/// neither `bpf_get_stackid` nor the syscall-site fix reaches the
/// application. And a wrapper called directly may reuse `rbp` itself
/// (`__libc_open64` does), so the walk above its caller is garbage. When the
/// syscall is made in a known wrapper and either its caller is not in the
/// executable or `rbp` does not lead to a return address into it, the top
/// [`SCAN_WORDS`] words of the stack, from the wrapper's return address up,
/// are scanned for
/// the first return address into the executable (the call into libc), then,
/// below it, for the `rbp` libc saved (a pointer just up the stack to a
/// frame whose return address is in the executable), and the walk goes on
/// from there by frame pointers. Stored as a hand-walked stack (`[ip, return
/// address, callers...]` under `WALKED_STACK`). Cheap when not needed: two
/// range checks.
#[inline(always)]
pub fn app_stack(
    ctx: &TracePointContext,
    table: &HashMap<u64, WalkedFrames>,
    scratch: &PerCpuArray<WalkedFrames>,
) -> StackKey {
    if let Some(java) = crate::jvm::java_stack_key() {
        return java;
    }
    // Unwind rules follow libc's CFI through the wrappers that reuse rbp:
    // the scan below is the frame-pointer mode's stand-in for them.
    if unwinding() {
        return native_user_stack(ctx);
    }
    let (lo, hi) = app_text();
    let regs = user_regs();
    if regs.is_null() || lo == 0 || hi <= lo {
        return native_user_stack(ctx);
    }
    let in_app = |a: u64| a >= lo && a < hi;
    let (ip, sp, bp) = (reg(regs, PT_REGS_IP), reg(regs, PT_REGS_SP), reg(regs, PT_REGS_BP));
    // Go's raw syscalls, and anything outside a known libc wrapper.
    let Some(slot) = caller_slot() else { return native_user_stack(ctx) };
    if in_app(ip) || slot < sp {
        return native_user_stack(ctx);
    }
    // A wrapper called by the application that left `rbp` alone: the
    // frame-pointer walk works.
    if in_app(read_user_u64(slot)) && bp > sp && in_app(read_user_u64(bp + 8)) {
        return native_user_stack(ctx);
    }
    let Some(buf) = SCAN_BUF.get_ptr_mut(0) else { return native_user_stack(ctx) };
    // SAFETY: this CPU's scratch slot; user memory read through the helper.
    let buf = unsafe { &mut *buf };
    // `SAVED_RBP_WORDS` words below the wrapper's return address (where a
    // wrapper pushes the `rbp` it reuses), then `SCAN_WORDS` from it up.
    let base = slot - 8 * SAVED_RBP_WORDS as u64;
    let len = (SAVED_RBP_WORDS + SCAN_WORDS) * 8;
    if unsafe { bpf_probe_read_user_buf(base as *const u8, core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, len)) }.is_err() {
        return native_user_stack(ctx);
    }
    // The first return address into the executable at or above the
    // wrapper's (below it: the wrapper's own frame, maybe stale).
    let mut found = 0usize;
    for i in SAVED_RBP_WORDS..SAVED_RBP_WORDS + SCAN_WORDS {
        if in_app(buf[i]) {
            found = i;
            break;
        }
    }
    if found == 0 {
        return native_user_stack(ctx);
    }
    // Through map memory, so that the verifier goes on with one unknown
    // index rather than one state per position found.
    // SAFETY: the extra slot of this CPU's buffer.
    let at = unsafe {
        core::ptr::write_volatile(&mut buf[SAVED_RBP_WORDS + SCAN_WORDS], found as u64);
        core::ptr::read_volatile(&buf[SAVED_RBP_WORDS + SCAN_WORDS])
    } as usize
        & (2 * SCAN_WORDS - 1);
    if at < SAVED_RBP_WORDS || at >= SAVED_RBP_WORDS + SCAN_WORDS {
        return native_user_stack(ctx);
    }
    let Some(&ret) = buf.get(at) else { return native_user_stack(ctx) };
    // The application function's frame: the first libc function to reuse
    // `rbp` saved it, so it sits below the return address, among the live
    // libc frames — a pointer a little up the stack, at a frame whose
    // return address is in the executable again. (The words above the
    // return address are the application's own frame: uninitialised buffers
    // there hold stale return addresses of earlier calls.)
    let ret_slot = base + 8 * at as u64;
    let mut fp = 0u64;
    for k in 1..=SAVED_RBP_WORDS {
        let Some(&w) = buf.get(at.wrapping_sub(k)) else { break };
        if w <= ret_slot || w - ret_slot >= (1 << 16) || w & 7 != 0 {
            continue;
        }
        // SAFETY: user memory through the helper, which faults safely.
        if let Ok(frame) = unsafe { bpf_probe_read_user(w as *const [u64; 2]) } {
            if in_app(frame[1]) && (frame[0] > w || frame[0] < LOWEST_FRAME) {
                fp = w;
                break;
            }
        }
    }
    crate::bump(counter::SCANNED_STACKS);
    match walk_user_stack(table, scratch, [ip, ret], 2, fp) {
        Some(hash) => StackKey { stack_id: WALKED_STACK, caller: hash },
        None => StackKey { stack_id: -1, caller: 0 },
    }
}

/// Whether the current close runs on Go's finalizer goroutine: a return
/// address of the frame-pointer chain lies in `runtime.runfinq`, whose pc
/// range user space put in `range` (`finalizer::START`, `END`; 0, 0: not a
/// Go target). Walked only for closes of tracked objects, at most
/// `FINALIZER_WALK_FRAMES` 16-byte reads.
#[inline(always)]
pub fn closed_by_go_finalizer(range: &Array<u64>) -> bool {
    let (Some(&start), Some(&end)) = (range.get(finalizer::START), range.get(finalizer::END)) else {
        return false;
    };
    if start == 0 || end <= start {
        return false;
    }
    let Some((_, _, mut fp)) = user_ip_sp_bp() else { return false };
    for _ in 0..FINALIZER_WALK_FRAMES {
        if fp < LOWEST_FRAME {
            return false;
        }
        // SAFETY: user memory through the helper, which faults safely.
        let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else { return false };
        if frame[1] >= start && frame[1] < end {
            return true;
        }
        if frame[0] <= fp {
            return false;
        }
        fp = frame[0];
    }
    false
}

/// One more for `stack` in a per-CPU count table (a full table: a lost event).
#[inline(always)]
pub fn count_one(table: &PerCpuHashMap<StackKey, u64>, stack: &StackKey) {
    // SAFETY: this CPU's value; no other user while we run.
    match table.get_ptr_mut(stack) {
        Some(n) => unsafe { *n += 1 },
        None => {
            if table.insert(stack, &1, 0).is_err() {
                crate::bump(counter::LOST_EVENTS);
            }
        }
    }
}
