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
    /// Not a call in progress: a size point stored the requested size of a
    /// `malloc` for its result point (never an outer call of anything).
    pub const SIZE: u32 = 6;
}

/// How a `malloc` result or size point (user space's disassembly, see
/// `tracer-user/src/alloc_sites/results.rs`) is described to its BPF
/// program: packed in the probe's cookie.
///
/// | bits | field |
/// | --- | --- |
/// | 0-5 | when the probe counts: 0 always; else [`point::BRANCH`] + x86 condition code (0-15), [`point::NOT_TAKEN`] to count when the branch is not taken |
/// | 6-15 | bytes from `sp` to the return address |
/// | 16-31 | where the block's address is ([`point::STACK`] + bytes above `sp`, or a register as its `pt_regs` index) |
/// | 32-47 | where the size is (same encoding, [`point::PENDING`]: a size point stored it) |
/// | 48-63 | where the caller's frame pointer is (same encoding) |
pub mod point {
    pub const BRANCH: u64 = 0x20;
    pub const NOT_TAKEN: u64 = 0x10;
    pub const STACK: u64 = 0x8000;
    pub const PENDING: u64 = 0xffff;

    /// `pt_regs` index of each general-purpose register (x86-64 order:
    /// r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di).
    pub mod reg {
        pub const R15: u64 = 0;
        pub const R14: u64 = 1;
        pub const R13: u64 = 2;
        pub const R12: u64 = 3;
        pub const RBP: u64 = 4;
        pub const RBX: u64 = 5;
        pub const R11: u64 = 6;
        pub const R10: u64 = 7;
        pub const R9: u64 = 8;
        pub const R8: u64 = 9;
        pub const RAX: u64 = 10;
        pub const RCX: u64 = 11;
        pub const RDX: u64 = 12;
        pub const RSI: u64 = 13;
        pub const RDI: u64 = 14;
    }

    pub const fn pack(when: u64, ret_slot: u64, result: u64, size: u64, caller_bp: u64) -> u64 {
        (when & 0x3f) | (ret_slot & 0x3ff) << 6 | (result & 0xffff) << 16 | (size & 0xffff) << 32 | (caller_bp & 0xffff) << 48
    }
    pub const fn when(c: u64) -> u64 {
        c & 0x3f
    }
    pub const fn ret_slot(c: u64) -> u64 {
        (c >> 6) & 0x3ff
    }
    pub const fn result(c: u64) -> u64 {
        (c >> 16) & 0xffff
    }
    pub const fn size(c: u64) -> u64 {
        (c >> 32) & 0xffff
    }
    pub const fn caller_bp(c: u64) -> u64 {
        (c >> 48) & 0xffff
    }
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
/// [`AllocInfo::flags`]: an anonymous mapping made by a program's `mmap`
/// call (a `malloc` result 16 bytes into it shows it was the allocator's).
pub const ALLOC_MMAP: u32 = 2;

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

/// The allocations tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::ALLOCATIONS as BASE;
    /// Blocks allocated or freed.
    pub const EVENTS: u32 = BASE;
    /// Frees of blocks the tracker never saw allocated (made before attach,
    /// or not sampled): ignored, never subtracted from any stack.
    pub const UNTRACKED_FREES: u32 = BASE + 1;
    /// Blocks not tracked because the live-block table was full.
    pub const LOST: u32 = BASE + 2;
    /// Allocator calls not tracked because the pending-call table was full.
    pub const LOST_CALLS: u32 = BASE + 3;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::AllocPending {}
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::AllocCounts {}
    unsafe impl aya::Pod for super::OuterStack {}
}
