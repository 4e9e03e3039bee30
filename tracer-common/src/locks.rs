//! Lock-contention tracker: who waits on which lock, for how long, and who
//! held it. Only contended paths are observed: futex waits and wakes (the
//! syscall tracepoints) and Go's semaphore slow paths (uprobes), so an
//! uncontended lock costs the target nothing.

use crate::stacks::StackKey;

/// What a wait or a wake is, decided in the kernel from the libc function
/// that made the futex call (its "root", see [`root`]), the futex op and value.
pub mod kind {
    /// glibc mutex (`pthread_mutex_lock`, or a condvar re-taking its mutex).
    pub const MUTEX: u32 = 1;
    /// glibc rwlock, reader waiting.
    pub const RWLOCK_READ: u32 = 2;
    /// glibc rwlock, writer waiting.
    pub const RWLOCK_WRITE: u32 = 3;
    /// A futex word used as a lock outside known libc functions (value 2,
    /// the "locked, with waiters" state of the common futex-lock protocol).
    pub const FUTEX: u32 = 4;
    /// Go `runtime_SemacquireMutex`: a sync.Mutex (or, before Go 1.21, an
    /// RWMutex) waits on its semaphore; the key is the semaphore's address.
    pub const GO_MUTEX_SEMA: u32 = 5;
    /// Go `runtime_SemacquireRWMutexR`: an RWMutex reader waits.
    pub const GO_RWMUTEX_READ: u32 = 6;
    /// Go `runtime_SemacquireRWMutex`: an RWMutex writer waits for readers.
    pub const GO_RWMUTEX_WRITE: u32 = 7;
    /// A JVM thread's futex wait with Java frames: the word is the
    /// thread's own Parker/ParkEvent; what it waits for (lock, condition,
    /// monitor) is read from its Java frames in user space.
    pub const JAVA: u32 = 8;
}

/// The exported libc function a futex call was made under (the innermost
/// one known along the return-address chain).
pub mod root {
    pub const NONE: u32 = 0;
    pub const MUTEX_LOCK: u32 = 1;
    pub const RWLOCK_READ: u32 = 2;
    pub const RWLOCK_WRITE: u32 = 3;
    pub const COND_WAIT: u32 = 4;
    pub const JOIN: u32 = 5;
    pub const MUTEX_UNLOCK: u32 = 6;
    pub const RWLOCK_UNLOCK: u32 = 7;
}

/// Value of `LOCK_SYSCALL_SITES` (key: address after a `syscall`) and of
/// `LOCK_CALL_SITES` (key: address after a `call`, i.e. a return address)
/// inside libc: found by disassembling libc from its exported lock functions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockSite {
    /// Bytes from `sp` (at the instruction) up to the function's return address.
    pub depth: u32,
    /// [`root`] of the function the instruction is in (0: internal helper).
    pub root: u32,
    /// When the function saved its caller's `rbp` on the stack before this
    /// instruction: bytes below the return-address slot where it is (0: not
    /// saved, `rbp` still holds the caller's). glibc uses `rbp` as a plain
    /// register, so the application's frame chain starts from the saved one.
    pub rbp_at: u32,
    pub _pad: u32,
}

/// A per-lock, per-stack aggregate key. `walked != 0`: the stack was
/// walked by hand (libc code without frame pointers) and its frames are in
/// `LOCK_FRAMES[walked]`; else `stack` is a kernel stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockStack {
    /// Futex word (C) or semaphore (Go) address.
    pub lock: u64,
    pub stack: StackKey,
    pub walked: u64,
}

/// Per (lock, stack): waits (or holder wakes) and their total time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitTotals {
    pub count: u64,
    pub wait_ns: u64,
}

/// log2 buckets of wait time: bucket `i` counts waits in `[2^i, 2^(i+1))` ns,
/// the last one everything longer.
pub const HIST_BUCKETS: usize = 36;

/// Per lock word (per CPU; user space sums, and takes the max of `max_wait_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LockStats {
    pub contentions: u64,
    pub wait_ns: u64,
    pub max_wait_ns: u64,
    /// [`kind`].
    pub kind: u32,
    pub _pad: u32,
    /// The first waiter's stack on this CPU (names an anonymous lock).
    pub first: LockStack,
    pub hist: [u64; HIST_BUCKETS],
}

impl Default for LockStats {
    fn default() -> Self {
        LockStats {
            contentions: 0,
            wait_ns: 0,
            max_wait_ns: 0,
            kind: 0,
            _pad: 0,
            first: LockStack::default(),
            hist: [0; HIST_BUCKETS],
        }
    }
}

/// A wait in progress (key: the thread's pid_tgid for futexes, the g
/// pointer for Go).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingWait {
    pub start_ns: u64,
    pub kind: u32,
    pub _pad: u32,
    pub at: LockStack,
}

pub use crate::stacks::{WalkedFrames, MAX_WALKED_FRAMES, MAX_WALKED_STACKS};

/// Index of `LOCK_CONFIG`: 1 when futex calls from outside libc are the
/// runtime's own (a Go program's `runtime.futex`) and must be ignored.
pub const CONFIG_IGNORE_FOREIGN: u32 = 0;

/// Locks (futex words / semaphores) kept in the per-lock table.
pub const MAX_LOCKS: u32 = 4096;
/// (lock, stack) pairs kept for waiters and for holders, each.
pub const MAX_LOCK_STACKS: u32 = 8192;
/// Waits in progress (threads or goroutines), LRU: a goroutine that never
/// returns (panic, Goexit) ages out.
pub const MAX_PENDING_WAITS: u32 = 16384;
/// libc sites (syscalls and calls) known.
pub const MAX_LOCK_SITES: u32 = 4096;

/// The locks tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::LOCKS as BASE;
    /// Contended waits recorded (futex waits on locks, Go semaphore waits).
    pub const WAITS: u32 = BASE;
    /// Futex waits seen that are not lock waits (condition variables, joins,
    /// other futex uses): not reported as contention.
    pub const OTHER_WAITS: u32 = BASE + 1;
    /// Waits or wakes dropped because a lock table was full.
    pub const LOST: u32 = BASE + 2;
    /// Holder wakes recorded (an unlock that woke waiters).
    pub const WAKES: u32 = BASE + 3;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::LockSite {}
    unsafe impl aya::Pod for super::LockStack {}
    unsafe impl aya::Pod for super::WaitTotals {}
    unsafe impl aya::Pod for super::LockStats {}
    unsafe impl aya::Pod for super::PendingWait {}
}
