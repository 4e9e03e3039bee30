//! Allocation tracker: live heap blocks of the target (malloc family,
//! `operator new`, anonymous mmap), grouped by the user stack that made them.

use crate::stacks::StackKey;

/// Which allocator entry point a pending call is in; decides how its
/// arguments and return value are read at the return probe.
pub mod call {
    /// `malloc(size)`, `valloc(size)`, `pvalloc(size)` (size rounded up to a page).
    pub const MALLOC: u32 = 1;
    /// `calloc(n, size)`.
    pub const CALLOC: u32 = 2;
    /// `realloc(ptr, size)` and `reallocarray(ptr, n, size)`: a move.
    pub const REALLOC: u32 = 3;
    /// `posix_memalign(&ptr, align, size)`: returns 0 and stores the block in `*memptr`.
    pub const POSIX_MEMALIGN: u32 = 4;
    /// `memalign(align, size)` and `aligned_alloc(align, size)`.
    pub const MEMALIGN: u32 = 5;
}

/// A call into the allocator between its entry and return probes (key:
/// the calling thread's pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocPending {
    /// Requested bytes.
    pub size: u64,
    /// `realloc`: the old block; `posix_memalign`: where the result is stored.
    pub arg: u64,
    /// `sp` at the entry probe: the return probe of the same call sees `sp + 8`
    /// (nested calls, e.g. `realloc(NULL, n)` calling `malloc`, see less).
    pub entry_sp: u64,
    /// One of [`call`].
    pub call: u32,
    pub _pad: u32,
}

/// A live block (key: its address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocInfo {
    /// Creation stack.
    pub stack: StackKey,
    /// Bytes counted for this block (scaled up when sampling).
    pub bytes: u64,
    /// Blocks counted for this block (1, more when sampling).
    pub count: u32,
    /// [`ALLOC_SENTINEL`] when this block is its stack's age sentinel.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
}

/// `AllocInfo::flags`: the block is its stack's entry in `ALLOC_OLDEST`.
pub const ALLOC_SENTINEL: u32 = 1;

/// Per creation stack, per CPU: blocks and bytes created and freed
/// (user space sums over CPUs; live = created - ended).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocCounts {
    pub created: u64,
    pub ended: u64,
    pub bytes_created: u64,
    pub bytes_ended: u64,
}

/// Stack of an `operator new` in progress (key: pid_tgid): the `malloc` it
/// calls is counted under the stack of the function that called `new`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OuterStack {
    pub stack: StackKey,
    /// `sp` at `operator new`'s entry: only a `malloc` deeper than this uses it.
    pub sp: u64,
    pub ns: u64,
}

/// Default size of the live-block table (entries, preallocated: about 27
/// MiB of kernel memory). A full table counts in `counter::ALLOC_LOST`.
pub const MAX_LIVE_ALLOCS: u32 = 1 << 18;
/// Size of the per-stack table.
pub const MAX_ALLOC_STACKS: u32 = 16384;
/// Allocator calls in progress (one per thread, LRU).
pub const MAX_PENDING_ALLOCS: u32 = 16384;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::AllocPending {}
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::AllocCounts {}
    unsafe impl aya::Pod for super::OuterStack {}
}
