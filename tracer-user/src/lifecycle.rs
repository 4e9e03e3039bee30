//! The traced process's lifecycle: exec and exit, from the kernel side's
//! `PROCESS_EVENTS` ring (tracer-ebpf/src/process.rs). Always attached,
//! whatever trackers run.

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tracer_common::process::{event, ProcessEvent};

use crate::probes::{Probes, Tracepoints};

/// The lifecycle programs.
const TRACEPOINTS: Tracepoints = &[
    ("process_exec", "sched", "sched_process_exec"),
    ("process_exit", "sched", "sched_process_exit"),
];

/// Exec and exit of the target, as they happen.
pub struct Lifecycle {
    ring: RingBuf<MapData>,
    /// The target's main thread exited.
    pub exited: bool,
    /// Warned once that /proc could not be read (our own failure).
    proc_unreadable: bool,
}

/// What happened since the last poll.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The target exec'd (the last exec's time, ktime ns).
    pub exec_at: Option<u64>,
}

impl Lifecycle {
    /// Takes the ring out of the loaded object and attaches the programs.
    pub fn attach(probes: &mut Probes) -> Result<Self> {
        let ring = probes.take_map("PROCESS_EVENTS")?;
        probes.attach_tracepoints(TRACEPOINTS)?;
        Ok(Self { ring, exited: false, proc_unreadable: false })
    }

    /// Whether the target still runs by /proc; a /proc read failing for
    /// leaktrace's own reasons (no descriptors, no memory) is a warning,
    /// once, never the target's death.
    pub fn target_alive(&mut self, pid: u32) -> bool {
        crate::procfs::liveness(pid).unwrap_or_else(|e| {
            if !self.proc_unreadable {
                crate::output::warn(format!("cannot read /proc/{pid}/stat ({e}): leaktrace's own failure, still tracing"));
                self.proc_unreadable = true;
            }
            true
        })
    }

    /// Reads the ring; cheap, call it often.
    pub fn poll(&mut self) -> Changes {
        let mut changes = Changes::default();
        for ev in crate::probes::drain_ring::<ProcessEvent>(&mut self.ring) {
            match ev.kind {
                event::EXEC => changes.exec_at = Some(ev.at_ns),
                event::EXIT => self.exited = true,
                _ => {}
            }
        }
        changes
    }
}
