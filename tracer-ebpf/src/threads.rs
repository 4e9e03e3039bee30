//! Thread tracker, kernel side: every thread the target creates, from its
//! creation to its exit, counted per creation stack.
//!
//! The creation stack is the creator's at `pthread_create` (a uprobe on its
//! first instruction, `push %r15` on glibc 2.36: emulated, cheap), walked
//! by the shared stack code (`stacks::entry_probe_stack`). The stack waits
//! in `THREAD_PENDING` (per creating thread) until `sched_process_fork`
//! fires in the creator for the new thread. A thread made without
//! `pthread_create` (Go, raw `clone`) gets the stack taken at the fork
//! tracepoint itself (good for Go; from glibc's `clone3` the walk is garbage).
//! Forks of new processes are not threads and are ignored.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, tracepoint, uprobe},
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::{ProbeContext, TracePointContext},
};
use tracer_common::{
    counter,
    stacks::{StackCounts, StackKey},
    threads::{
        ThreadInfo, FORK_CHILD_PID_OFFSET, MAX_LIVE_THREADS, MAX_PENDING_CREATES,
        MAX_THREAD_STACKS,
    },
};

use crate::{
    bump,
    stacks::{count, counted_stack, entry_probe_stack, syscall_nr_and_arg0, user_stack},
    target_tgid,
};

/// Offset of `child_pid` in the `sched_process_fork` record; set by user
/// space from the tracepoint's format (it moved in Linux 6.x).
#[no_mangle]
static FORK_CHILD_PID_AT: u32 = FORK_CHILD_PID_OFFSET;

/// Live threads of the target, by tid.
#[map]
static THREADS: HashMap<u32, ThreadInfo> = HashMap::with_max_entries(MAX_LIVE_THREADS, crate::NO_PREALLOC);

/// Per creation stack: threads created and ended (per CPU).
#[map]
static THREAD_STACKS: PerCpuHashMap<StackKey, StackCounts> =
    PerCpuHashMap::with_max_entries(MAX_THREAD_STACKS, crate::NO_PREALLOC);

/// Creation stack of a `pthread_create` in progress, by the creator's pid_tgid.
#[map]
static THREAD_PENDING: LruHashMap<u64, StackKey> = LruHashMap::with_max_entries(MAX_PENDING_CREATES, 0);

const CLONE_THREAD: u64 = 0x0001_0000;
const NR_CLONE: u64 = 56;
const NR_CLONE3: u64 = 435;

/// Uprobe on libc's `pthread_create`, first instruction.
#[uprobe]
pub fn thread_create(ctx: ProbeContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let key = entry_probe_stack(&ctx);
    let id = bpf_get_current_pid_tgid();
    if THREAD_PENDING.insert(&id, &key, 0).is_err() {
        bump(counter::LOST_EVENTS);
    }
    0
}

/// True when the current syscall makes a thread (not a process).
#[inline(always)]
fn clone_makes_thread() -> bool {
    let Some((nr, arg0)) = syscall_nr_and_arg0() else { return false };
    let flags = match nr {
        NR_CLONE => arg0,
        // SAFETY: `struct clone_args` starts with the flags; read through the helper.
        NR_CLONE3 => unsafe { bpf_probe_read_user(arg0 as *const u64).unwrap_or(0) },
        _ => 0,
    };
    flags & CLONE_THREAD != 0
}

/// sched:sched_process_fork, in the creator's context.
#[tracepoint]
pub fn thread_fork(ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // SAFETY: reads within the tracepoint record.
    let at = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_AT) } as usize;
    let child = unsafe { ctx.read_at::<i32>(at).unwrap_or(0) };
    if child <= 0 || !clone_makes_thread() {
        return 0;
    }
    // SAFETY: copied out of the map value.
    let pending = unsafe { THREAD_PENDING.get(&id) }.copied();
    let stack = match pending {
        Some(k) => {
            let _ = THREAD_PENDING.remove(&id);
            k
        }
        None => user_stack(&ctx),
    };
    let stack = counted_stack(&THREAD_STACKS, stack);
    // SAFETY: no preconditions.
    let info = ThreadInfo { stack, created_ns: unsafe { bpf_ktime_get_ns() } };
    if THREADS.insert(&(child as u32), &info, 0).is_err() {
        bump(counter::LOST_EVENTS);
        return 0;
    }
    count(&THREAD_STACKS, &stack, 1, 0);
    bump(tracer_common::threads::counter::EVENTS);
    0
}

/// sched:sched_process_exit, in the exiting thread.
#[tracepoint]
pub fn thread_exit(_ctx: TracePointContext) -> u32 {
    if target_tgid().is_none() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal.
    let stack = match unsafe { THREADS.get(&tid) } {
        Some(info) => info.stack,
        None => return 0,
    };
    // Only the side whose delete succeeds counts (user space reconciles too).
    if THREADS.remove(&tid).is_ok() {
        count(&THREAD_STACKS, &stack, 0, 1);
        bump(tracer_common::threads::counter::EVENTS);
    }
    0
}
