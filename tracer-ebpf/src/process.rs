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

/// sched:sched_process_exec — the target runs a new image.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    if let Some(tgid) = target_tgid() {
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
