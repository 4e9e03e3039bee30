//! The traced process's lifecycle: exec and exit, from the kernel side's
//! `PROCESS_EVENTS` ring (tracer-ebpf/src/process.rs). Always attached,
//! whatever trackers run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    /// The target's pidfd (readable once it has exited): one poll(2) per
    /// check, where reading /proc/PID/stat every 100 ms was a third of
    /// what an idle target cost the agent. `Err`: the kernel refused one,
    /// /proc is read instead.
    pidfd: Option<std::io::Result<(u32, OwnedFd)>>,
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
        Ok(Self { ring, exited: false, proc_unreadable: false, pidfd: None })
    }

    /// Whether the target has exited by its pidfd; `None` when there is
    /// no pidfd (then /proc says).
    fn exited_by_pidfd(&mut self, pid: u32) -> Option<bool> {
        if matches!(self.pidfd, Some(Err(_))) {
            return None;
        }
        if !matches!(&self.pidfd, Some(Ok((p, _))) if *p == pid) {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ESRCH) {
                    return Some(true);
                }
                self.pidfd = Some(Err(e));
                return None;
            }
            // SAFETY: a new descriptor nothing else owns.
            self.pidfd = Some(Ok((pid, unsafe { OwnedFd::from_raw_fd(fd as RawFd) })));
        }
        let Some(Ok((_, fd))) = &self.pidfd else { return None };
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        match unsafe { libc::poll(&mut p, 1, 0) } {
            n if n >= 0 => Some(n > 0),
            _ => None,
        }
    }

    /// Whether the target still runs, by its pidfd, else by /proc (a read failing for
    /// leaktrace's own reasons (no descriptors, no memory) is a warning,
    /// once, never the target's death.
    pub fn target_alive(&mut self, pid: u32) -> bool {
        if let Some(exited) = self.exited_by_pidfd(pid) {
            return !exited;
        }
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
