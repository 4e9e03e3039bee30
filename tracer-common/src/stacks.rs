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

/// `StackKey::stack_id` of a stack walked with unwind rules into the shared
/// `UNWOUND_STACKS` table: `caller` is then the key of its frames there.
pub const UNWOUND_STACK: i64 = -4;

/// How the kernel side walks user stacks (the `UNWIND_MODE` global).
pub mod unwind_mode {
    /// Frame pointers only (`bpf_get_stackid` and the hand-made FP walk).
    pub const FRAME_POINTERS: u32 = 0;
    /// Per-pc rules learned from `.eh_frame` / `.debug_frame` (`UNWIND_RULES`).
    pub const RULES: u32 = 1;
}

/// Set in an `UNWIND_RULES` / `UNWIND_MISSES` key when the pc is where the
/// thread *is* (the first frame, a frame a signal interrupted) rather than
/// a return address: user space then looks its rule up at the pc itself,
/// not at `pc - 1` (inside the call). User addresses never use bit 63.
pub const RULE_AT_PC: u64 = 1 << 63;

/// Frames of a closing stack searched for the Go finalizer goroutine's
/// `runtime.runfinq` (a finalizer's close is ~10 frames deep).
pub const FINALIZER_WALK_FRAMES: usize = 24;

/// Slots of a tracker's finalizer range array (`CONN_FINALIZER`,
/// `FDS_FINALIZER`): the pc range `[START, END)` of `runtime.runfinq` in the
/// target (0, 0: not a Go program, or unknown).
pub mod finalizer {
    pub const START: u32 = 0;
    pub const END: u32 = 1;
}

/// What a rule says to do at one pc (`UnwindRule::kind`).
pub mod rule_kind {
    /// `CFA = rsp + cfa_offset`.
    pub const CFA_SP: u32 = 1;
    /// `CFA = rbp + cfa_offset`.
    pub const CFA_BP: u32 = 2;
    /// The outermost frame (return address undefined: `_start`,
    /// `clone3`), code without a file (JIT, anonymous) or CFI we do not
    /// follow: the stack ends here, whole as far as it goes.
    pub const END: u32 = 3;
    /// A signal trampoline (`__restore_rt`): the interrupted registers are
    /// in the `ucontext` on the stack.
    pub const SIGNAL: u32 = 4;
    /// No unwind information for this pc: the frame-pointer step
    /// (`CFA = rbp + 16`, rbp saved at CFA - 16), counted.
    pub const FP_GUESS: u32 = 5;
}

/// The unwind rule of one exact pc, computed by user space from the
/// object's CFI. The return address is always at `CFA - 8` (x86-64); the
/// caller's rbp is at `CFA + rbp_offset` when `rbp_offset != 0`, else rbp is
/// unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRule {
    pub kind: u32,
    pub cfa_offset: i32,
    pub rbp_offset: i32,
    pub _pad: u32,
}

/// Exact-pc rules kept in the kernel (bound; a full table is shown).
pub const MAX_UNWIND_RULES: u32 = 16384;
/// Misses waiting for user space (4 KiB each; the first events of new
/// call paths: a few per path).
pub const MAX_UNWIND_MISSES: u32 = 256;

/// Bytes of stack copied with a miss (from the missing frame's sp): what
/// user space steps through to finish the event's stack and to learn the
/// rules of the rest of its call path at once.
pub const MISS_STACK_BYTES: usize = 4096;

/// Set in the key of a stack whose walk stopped at a pc without a rule: the
/// key is then unique to the event (it also mixes in a sequence number), so
/// that stacks of different call paths cut at the same pc never share one;
/// user space finishes it from the event's `MissSnapshot`.
pub const PROVISIONAL_KEY: u64 = 1 << 63;

/// A walk's miss, by the event's provisional stack key: the rule key of
/// the frame that had no rule, its registers, and the stack above it
/// (`stack[..len]` from `sp`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MissSnapshot {
    pub rule_key: u64,
    pub sp: u64,
    pub bp: u64,
    pub len: u64,
    /// The target's unmap count (`unwind_sync::UNMAPS`) when the miss was
    /// taken: the ranges unmapped since are in `UNMAPPED` (user space must
    /// not learn a pc of the copy from what is mapped there now).
    pub unmaps: u64,
    pub stack: [u8; MISS_STACK_BYTES],
}

/// Code mappings rules were learned in, whose unmapping the kernel watches
/// (`unwind_munmap`): beyond this many, every unmap of the target counts.
pub const MAX_RULE_MAPPINGS: u32 = 64;

/// A `[start, end)` range of the target's address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeRange {
    pub start: u64,
    pub end: u64,
}

/// Slots of `UNWIND_SYNC`: rules are walked only while `GENERATION ==
/// SYNCED`. The kernel bumps `GENERATION` when the target unmaps (enter and
/// exit of `munmap`) a range holding code rules were learned in; user space
/// drops the rules of every mapping gone, then writes the generation it
/// read before looking into `SYNCED`. Until then walks take the miss path
/// (a stack copy finished in user space with the new map): a rule of
/// unmapped code is never applied to what is mapped there next.
pub mod unwind_sync {
    pub const GENERATION: u32 = 0;
    pub const SYNCED: u32 = 1;
    /// Ranges in `UNWIND_CODE` (written by user space).
    pub const CODE_COUNT: u32 = 2;
    /// Non-zero when `UNWIND_CODE` overflowed: every unmap counts.
    pub const CODE_ALL: u32 = 3;
    /// Unmaps of the target so far; the last `MAX_UNMAPPED` ranges are in
    /// `UNMAPPED` at `count % MAX_UNMAPPED`.
    pub const UNMAPS: u32 = 4;
    pub const SLOTS: u32 = 5;
}

/// Ranges the target unmapped last (a ring; see `unwind_sync::UNMAPS`).
/// An allocator returning big blocks unmaps often: a miss older than this
/// many unmaps is checked against the newest ones only.
pub const MAX_UNMAPPED: u32 = 256;

/// Stacks walked with rules, shared by the trackers that take stacks at
/// syscalls and probes (connections, threads).
pub const MAX_UNWOUND_STACKS: u32 = 8192;

/// Counters of the unwinder (slots in `COUNTERS`, after the trackers' blocks).
pub mod unwind_counter {
    /// Walks cut at a pc whose rule was not learned yet (warm-up) or did
    /// not fit the rule table: the stack is kept as far as it went.
    pub const MISSES: u32 = crate::counter::UNWIND + 0;
    /// Walks cut at `MAX_WALKED_FRAMES` frames (deep recursion).
    pub const DEPTH_CAP: u32 = crate::counter::UNWIND + 1;
    /// Frames stepped by a frame-pointer guess (no unwind information).
    pub const FP_GUESSES: u32 = crate::counter::UNWIND + 2;
    /// Walks that ended on an unreadable or non-growing frame.
    pub const BAD_FRAMES: u32 = crate::counter::UNWIND + 3;
    /// First walks of a call path cut at a miss while the miss queue was
    /// full (user space behind: a burst of new paths at attach): kept cut,
    /// under the partial stack's own key (one per partial stack, not one
    /// per event: the stack tables stay bounded).
    pub const QUEUE_FULL: u32 = crate::counter::UNWIND_MORE;
}

/// `StackKey::stack_id` of a stack whose bucket in the kernel's stack map
/// was taken by another stack (`bpf_get_stackid` hashes into as many
/// buckets as entries and fails on a collision, long before the map is
/// full): walked by the program instead, `caller` is then its key in the
/// shared `STACK_FRAMES` map.
pub const COLLIDED_STACK: i64 = -5;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::UnwindRule {}
    unsafe impl aya::Pod for super::MissSnapshot {}
    unsafe impl aya::Pod for super::WalkedFrames {}
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::SyscallSite {}
    unsafe impl aya::Pod for super::StackCounts {}
    unsafe impl aya::Pod for super::CodeRange {}
}
