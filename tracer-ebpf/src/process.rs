//! The traced process's lifecycle, kernel side: exec and exit of the
//! target, always attached (every tracker depends on the image it probes).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::RingBuf,
    programs::TracePointContext,
};
use tracer_common::{
    counter,
    process::{event, ProcessEvent},
};

use crate::{bump, target_tgid};

/// Exec and exit records (a few per trace).
#[map]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Non-zero: `process_exec` reports every exec on the machine, not only
/// the target's (`leaktrace agent` finds new processes this way; its watcher
/// load has no target).
#[no_mangle]
static WATCH_EXECS: u32 = 0;

/// sched:sched_process_exec — the target runs a new image (with
/// `WATCH_EXECS`: any process does).
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    // SAFETY: a plain read of a global that user space wrote before load.
    if unsafe { core::ptr::read_volatile(&WATCH_EXECS) } != 0 {
        send(event::EXEC, (bpf_get_current_pid_tgid() >> 32) as u32);
    } else if let Some(tgid) = target_tgid() {
        send(event::EXEC, tgid);
    }
    0
}

/// sched:sched_process_exit — the target's main thread is leaving.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    if let Some(tgid) = target_tgid() {
        if bpf_get_current_pid_tgid() as u32 == tgid {
            send(event::EXIT, tgid);
        }
    }
    0
}

#[inline(always)]
fn send(kind: u32, tgid: u32) {
    // SAFETY: no preconditions.
    let at_ns = unsafe { bpf_ktime_get_ns() };
    if PROCESS_EVENTS.output::<ProcessEvent>(&ProcessEvent { kind, tgid, at_ns }, 0).is_err() {
        bump(counter::LOST_RING);
    }
}
