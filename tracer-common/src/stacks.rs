//! How a user stack is named in the kernel maps.

/// Key of a per-stack aggregate.
///
/// `stack_id` is the id from the `STACKS` stack-trace map (negative when the
/// stack could not be stored). `caller` is the direct caller of the libc
/// syscall wrapper that the frame-pointer walk skips (0 when none): it is read
/// from the user stack at `sp + delta`, where `delta` comes from user space's
/// disassembly of the wrapper (see `SyscallSite`). User space rebuilds the
/// stack as `frames[0], caller, frames[1..]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    pub stack_id: i64,
    pub caller: u64,
}

/// Value of the `SYSCALL_SITES` map, keyed by the user address just after a
/// `syscall` instruction inside a libc wrapper of the target.
///
/// `ret_offset` is where the wrapper's return address sits relative to the
/// user stack pointer at that instruction, found by disassembling the wrapper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallSite {
    pub ret_offset: u32,
    pub _pad: u32,
}

/// Per-stack totals every tracker keeps per CPU (user space sums them):
/// objects created from the stack and objects from it that ended (closed,
/// exited). `live = created - ended`, before user space subtracts what it
/// found gone without an event (reconciliation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackCounts {
    pub created: u64,
    pub ended: u64,
}

/// Where objects are counted when their stack does not fit the per-stack
/// table; user space inserts it in every tracker's table before attaching.
pub const OVERFLOW_STACK: StackKey = StackKey { stack_id: -2, caller: 0 };

/// Deepest user stack kept (frames), as the kernel's default for stack maps.
pub const MAX_STACK_DEPTH: u32 = 127;

/// Frames kept per hand-walked stack (innermost first).
pub const MAX_WALKED_FRAMES: usize = 32;

/// A user stack walked by a BPF program itself (frame pointers read with
/// `bpf_probe_read_user`) rather than by `bpf_get_stackid`: `ips[..len]`.
/// Kept in a hash map keyed by a hash of the frames.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WalkedFrames {
    pub len: u64,
    pub ips: [u64; MAX_WALKED_FRAMES],
}

/// Words of user stack scanned for the executable's return address when a
/// syscall is made deep inside libc (`stacks::app_stack`): 1 KiB.
pub const SCAN_WORDS: usize = 128;

/// Hand-walked stacks a tracker keeps (entries of its walked-stack map).
pub const MAX_WALKED_STACKS: u32 = 8192;

/// `StackKey::stack_id` of a hand-walked stack: `caller` is then the key of
/// its frames in the tracker's walked-stack map.
pub const WALKED_STACK: i64 = -3;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::WalkedFrames {}
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::SyscallSite {}
    unsafe impl aya::Pod for super::StackCounts {}
}
