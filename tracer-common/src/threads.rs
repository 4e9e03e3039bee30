//! Thread tracker: live threads of the target, grouped by the user stack
//! that created them (the `pthread_create` call site in the creating thread).

use crate::stacks::StackKey;

/// Value of the live-thread table (key: the thread's tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadInfo {
    /// Creation stack (the creator's, at `pthread_create` or at the clone).
    pub stack: StackKey,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
}

/// Size of the live-thread table (entries). A full table counts in
/// `LOST_EVENTS`.
pub const MAX_LIVE_THREADS: u32 = 65536;
/// Size of the per-stack table.
pub const MAX_THREAD_STACKS: u32 = 4096;
/// Pending `pthread_create` calls (one per creating thread, LRU).
pub const MAX_PENDING_CREATES: u32 = 4096;

/// Offset of `child_pid` in the `sched:sched_process_fork` record on Linux
/// 6.18 (comms are `__data_loc`); older kernels have inline comms and put it
/// at 44. User space reads the real offset from the tracepoint's format.
pub const FORK_CHILD_PID_OFFSET: u32 = 20;

/// The threads tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::THREADS as BASE;
    /// Threads created or ended.
    pub const EVENTS: u32 = BASE;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ThreadInfo {}
}
