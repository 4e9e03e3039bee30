//! Types shared by the kernel side (`tracer-ebpf`) and user space (`tracer-user`).
//!
//! Every type here is `#[repr(C)]`, has no padding holes left implicit, and is
//! read by user space straight out of a BPF map. One module per tracker, named
//! as the tracker's modules in the two other crates.
#![no_std]

pub mod allocations;
pub mod connections;
pub mod maps;
pub mod process;
pub mod locks;
pub mod stacks;
pub mod threads;

/// Indexes into the per-CPU `COUNTERS` array that every tracker bumps.
///
/// User space sums them over CPUs and shows them as `lost` in the report and
/// as `leaktrace_events_total` / `leaktrace_events_lost_total` on /metrics.
pub mod counter {
    /// Events seen for the target (one per tracked syscall that succeeded).
    pub const EVENTS: u32 = 0;
    /// Events dropped because a state map (pending calls, live fds) was full.
    pub const LOST_EVENTS: u32 = 1;
    /// Stacks that could not be stored (stack map full or bucket collision):
    /// the object is still counted, under an unknown stack.
    pub const LOST_STACKS: u32 = 2;
    /// Ring-buffer records dropped because the ring was full.
    pub const LOST_RING: u32 = 3;
    /// Thread tracker events (thread created or ended); `EVENTS` counts
    /// the connection tracker's.
    pub const THREAD_EVENTS: u32 = 4;
    /// Map tracker: growth and clear events of tracked maps.
    pub const MAP_EVENTS: u32 = 20;
    /// Map tracker: maps not tracked because the tracked-map table was full.
    pub const MAP_LOST: u32 = 21;
    /// Allocation tracker events (blocks allocated or freed).
    pub const ALLOC_EVENTS: u32 = 8;
    /// Frees of blocks the tracker never saw allocated (made before attach,
    /// or not sampled): ignored, never subtracted from any stack.
    pub const ALLOC_UNTRACKED_FREES: u32 = 9;
    /// Blocks not tracked because the live-block table was full.
    pub const ALLOC_LOST: u32 = 10;
    /// Allocator calls not tracked because the pending-call table was full.
    pub const ALLOC_LOST_CALLS: u32 = 11;
    /// Lock tracker: contended waits recorded (futex waits on locks, Go
    /// semaphore waits).
    pub const LOCK_WAITS: u32 = 16;
    /// Lock tracker: futex waits seen that are not lock waits (condition
    /// variables, joins, other futex uses): not reported as contention.
    pub const LOCK_OTHER_WAITS: u32 = 17;
    /// Lock tracker: waits or wakes dropped because a lock table was full.
    pub const LOCK_LOST: u32 = 18;
    /// Lock tracker: holder wakes recorded (an unlock that woke waiters).
    pub const LOCK_WAKES: u32 = 19;
    /// Number of slots.
    pub const COUNT: u32 = 32;
}
