//! Types shared by the kernel side (`tracer-ebpf`) and user space (`tracer-user`).
//!
//! Every type here is `#[repr(C)]`, has no padding holes left implicit, and is
//! read by user space straight out of a BPF map. One module per tracker, named
//! as the tracker's modules in the two other crates.
#![no_std]

pub mod allocations;
pub mod connections;
pub mod fds;
pub mod jvm;
pub mod goroutines;
pub mod hub;
pub mod maps;
pub mod process;
pub mod locks;
pub mod stacks;
pub mod threads;

/// Indexes into the per-CPU `COUNTERS` array: the counters every tracker
/// shares, and the first slot of each tracker's own block of four (each
/// tracker's module names its counters in its `counter` module).
///
/// User space sums them over CPUs and shows them as `lost` and `events` in
/// the report and as `leaktrace_events_total` /
/// `leaktrace_events_lost_total` on /metrics.
pub mod counter {
    /// Events dropped because a state map (pending calls, live objects) was full.
    pub const LOST_EVENTS: u32 = 0;
    /// Stacks that could not be stored (stack map full or bucket collision):
    /// the object is still counted, under an unknown stack.
    pub const LOST_STACKS: u32 = 1;
    /// Ring-buffer records dropped because the ring was full.
    pub const LOST_RING: u32 = 2;
    /// Stacks of syscalls made deep inside libc whose application caller
    /// was found by scanning the user stack (`stacks::app_stack`).
    pub const SCANNED_STACKS: u32 = 3;
    /// First slot of the connection tracker's counters.
    pub const CONNECTIONS: u32 = 4;
    /// First slot of the thread tracker's counters.
    pub const THREADS: u32 = 8;
    /// First slot of the map tracker's counters.
    pub const MAPS: u32 = 12;
    /// First slot of the allocation tracker's counters.
    pub const ALLOCATIONS: u32 = 16;
    /// First slot of the lock tracker's counters.
    pub const LOCKS: u32 = 20;
    /// First slot of the unwinder's counters (`stacks::unwind_counter`).
    pub const UNWIND: u32 = 24;
    /// First slot of the fd tracker's counters.
    pub const FDS: u32 = 28;
    /// First slot of the Java walker's counters (`jvm::counter`).
    pub const JVM: u32 = 32;
    /// Second block of the unwinder's counters (`stacks::unwind_counter`).
    pub const UNWIND_MORE: u32 = 36;
    /// Number of slots.
    pub const COUNT: u32 = 40;
}
