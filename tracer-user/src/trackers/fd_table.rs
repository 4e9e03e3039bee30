//! What the two trackers with fd-keyed live tables share (connections:
//! sockets; fds: every fd): the ends the kernel side reports through its
//! ring (`close_range`), the ends user space finds behind its back (exec,
//! anything missed), and the pc range of Go's finalizer goroutine that
//! tells a `Close` from a garbage-collected `*os.File`.

use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use tracer_common::{
    connections::{ring_kind, ConnRingEvent, FdKey},
    stacks::{finalizer, StackKey},
};

use super::{end_if_unchanged, LiveEntry};
use crate::probes::Probes;

/// One target's live fds as the kernel side keeps them, with what user
/// space adds.
pub struct LiveFds<V: LiveEntry> {
    pid: u32,
    /// (tgid, fd) -> what the fd was made as.
    pub fds: BpfHashMap<MapData, FdKey, V>,
    ring: RingBuf<MapData>,
    /// `runtime.runfinq`'s pc range for the kernel side (0, 0: not Go).
    finalizer_range: Array<MapData, u64>,
    /// fds user space found closed behind the kernel side's back, per stack.
    pub reconciled: HashMap<StackKey, u64>,
    /// The target is a Go program whose finalizer closes are told apart.
    pub is_go: bool,
    /// Whether the table was empty at the last read (skip reading again).
    empty: super::EmptyTable,
}

impl<V: LiveEntry> LiveFds<V> {
    /// Takes the live table, the event ring and the finalizer-range array
    /// (by their map names) out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32, live: &str, ring: &str, finalizer_range: &str) -> Result<Self> {
        Ok(Self {
            pid,
            fds: probes.take_map(live)?,
            ring: probes.take_map(ring)?,
            finalizer_range: probes.take_map(finalizer_range)?,
            reconciled: HashMap::new(),
            is_go: false,
            empty: Default::default(),
        })
    }

    /// Tells the kernel side where the target's `runtime.runfinq` is (a
    /// close on the finalizer goroutine has it in its stack), or that there
    /// is none: at start and after each exec.
    pub fn set_finalizer_range(&mut self) {
        let range = crate::binary::golang::finalizer_range(self.pid);
        let _ = self.finalizer_range.set(finalizer::START, range.0, 0);
        let _ = self.finalizer_range.set(finalizer::END, range.1, 0);
        self.is_go = range.0 != 0;
    }

    /// Ends the fds of each `close_range` the ring reported, those made
    /// before the call only: the numbers may belong to new fds by the time
    /// the ring is read.
    pub fn poll_close_ranges(&mut self) {
        let ranges: Vec<(u32, u32, u64)> = crate::probes::drain_ring::<ConnRingEvent>(&mut self.ring)
            .into_iter()
            .filter(|ev| ev.kind == ring_kind::CLOSE_RANGE)
            .map(|ev| (ev.a as u32, ev.b.min(u32::MAX as u64) as u32, ev.c))
            .collect();
        for (first, last, at) in ranges {
            self.end_where(|fd, info| fd >= first && fd <= last && info.created_ns() < at);
        }
    }

    /// Ends (removes and counts) the target's live fds matching `pred`.
    pub fn end_where(&mut self, pred: impl Fn(u32, &V) -> bool) {
        let victims: Vec<(FdKey, V)> =
            self.fds.iter().filter_map(|r| r.ok()).filter(|(k, v)| k.tgid == self.pid && pred(k.fd, v)).collect();
        for (key, info) in victims {
            self.remove_stale(key, info);
        }
    }

    /// Ends the entry `key` if it is still the one seen.
    pub fn remove_stale(&mut self, key: FdKey, seen: V) {
        end_if_unchanged(&mut self.fds, key, &seen, &mut self.reconciled);
    }

    /// The target's live entries; `events`: the tracker's `EVENTS`
    /// counter, read first (an empty table is not read again while it
    /// stands still, see [`super::EmptyTable`]).
    pub fn live(&mut self, events: u64) -> Vec<(FdKey, V)> {
        let (fds, pid) = (&self.fds, self.pid);
        self.empty.read(events, || fds.iter().filter_map(|r| r.ok()).filter(|(k, _)| k.tgid == pid).collect())
    }
}
