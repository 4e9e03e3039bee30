//! Java frames of a HotSpot JVM, walked by the kernel side from the
//! thread's own frame anchor (`JavaThread::_anchor`) and named by user space
//! from the JVM's exported VMStructs tables. Not a tracker: every tracker
//! whose stacks come from `stacks::user_stack` (and the lock tracker's
//! futex stacks) gets Java frames for a JVM target.

use crate::stacks::MAX_WALKED_FRAMES;

/// `StackKey::stack_id` of a Java stack: `caller` is then its key in the
/// `JAVA_STACKS` table. `ips[0]` of such a stack holds [`header`] flags,
/// the Java frames follow, innermost first.
pub const JAVA_STACK: i64 = -6;

/// JVMs configured at once (by tgid).
pub const MAX_JVMS: u32 = 64;

/// Java stacks kept (entries of `JAVA_STACKS`).
pub const MAX_JAVA_STACKS: u32 = 8192;

/// Code heaps of a JVM (non-nmethods, profiled, non-profiled; or one).
pub const MAX_CODE_HEAPS: usize = 3;

/// Physical Java frames walked per event (slot 0 is the header).
pub const MAX_JAVA_FRAMES: usize = MAX_WALKED_FRAMES - 1;

/// Set in a frame of an interpreted method: bits 0..44 are its `Method*`
/// shifted right by 3 (metadata is 8-aligned), bits 44..51 a check of its
/// `ConstMethod*` ([`const_method_check`]), bits 51..63 the bytecode index
/// (`BCI_UNKNOWN` when it could not be read or is larger). A frame without
/// it is a pc in compiled code: bits 0..47 the pc, bits 47..62 the low
/// bits of its nmethod's compile id ([`COMPILE_ID_SHIFT`]).
///
/// The checks make a frame name what ran then, not what the memory holds
/// when user space reads it: a class unloaded and its metadata reused, or
/// an nmethod flushed and its code-cache space recompiled for another
/// method, give other frames (other keys), and a name read later is only
/// taken when the check still matches (else `[unknown]`, counted).
pub const INTERPRETED_FRAME: u64 = 1 << 63;
/// Set (without `INTERPRETED_FRAME`) in the last frame of a cut walk: the
/// pc the walk could not step past (shown, never named as Java code).
pub const UNKNOWN_PC_FRAME: u64 = 1 << 62;
/// A user-space address in a frame (pc of a compiled or cut frame).
pub const ADDRESS_MASK: u64 = (1 << 47) - 1;
/// An interpreted frame's `Method*` is `(slot & METHOD_BITS) << 3`.
pub const METHOD_BITS: u64 = (1 << 44) - 1;
/// Shift and mask of an interpreted frame's `ConstMethod*` check.
pub const CHECK_SHIFT: u32 = 44;
pub const CHECK_MASK: u64 = 0x7f;
/// Shift of the bytecode index in an interpreted frame.
pub const BCI_SHIFT: u32 = 51;
/// An interpreted frame whose bytecode index is not known (bcp outside its
/// method, or an index of 4095 and more).
pub const BCI_UNKNOWN: u64 = 0xfff;
/// Shift and mask of a compiled frame's compile-id bits.
pub const COMPILE_ID_SHIFT: u32 = 47;
pub const COMPILE_ID_MASK: u64 = 0x7fff;

/// The check kept beside an interpreted frame's `Method*`: 7 bits of its
/// `ConstMethod*` (allocated with it, elsewhere for another method).
#[inline(always)]
pub fn const_method_check(const_method: u64) -> u64 {
    let x = const_method >> 3;
    (x ^ (x >> 7) ^ (x >> 14) ^ (x >> 21) ^ (x >> 28) ^ (x >> 35)) & CHECK_MASK
}

/// An interpreted frame's slot: its `Method*`, the check of its
/// `ConstMethod*` and its bytecode index (`BCI_UNKNOWN` when larger). One
/// encoding for the kernel's walk and user space's (the wait tracker).
#[inline(always)]
pub fn interpreted_slot(method: u64, const_method: u64, bci: u64) -> u64 {
    let bci = if bci >= BCI_UNKNOWN { BCI_UNKNOWN } else { bci };
    INTERPRETED_FRAME | (bci << BCI_SHIFT) | (const_method_check(const_method) << CHECK_SHIFT) | ((method >> 3) & METHOD_BITS)
}

/// A compiled frame's slot: its pc and the low bits of its nmethod's
/// compile id.
#[inline(always)]
pub fn compiled_slot(pc: u64, compile_id: u64) -> u64 {
    (pc & ADDRESS_MASK) | ((compile_id & COMPILE_ID_MASK) << COMPILE_ID_SHIFT)
}

/// The last slot of a cut walk: the pc it could not step past.
#[inline(always)]
pub fn unknown_pc_slot(pc: u64) -> u64 {
    UNKNOWN_PC_FRAME | (pc & ADDRESS_MASK)
}

/// Flags in `ips[0]` of a Java stack.
pub mod header {
    /// The thread was entering a contended `synchronized` monitor
    /// (`JavaThread::_current_pending_monitor` set).
    pub const PENDING_MONITOR: u64 = 1;
    /// The walk stopped at a pc that is neither the interpreter's nor the
    /// code cache's: the outer frames are unknown (counted, never guessed).
    pub const CUT: u64 = 2;
}

/// One code heap: its address range, its segment map and segment size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeHeapRange {
    pub lo: u64,
    pub hi: u64,
    pub segmap: u64,
    pub log2_segment: u64,
}

/// What the kernel side needs to walk one JVM's Java frames (all read by
/// user space from the target's VMStructs tables, its TLS and the kernel's
/// BTF), by tgid in `JVM_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JvmConfig {
    /// Offset of `task_struct.thread.fsbase` (vmlinux BTF).
    pub fsbase_offset: u64,
    /// libjvm's TLS block: `dtv + dtv_slot` holds it (16 * module id).
    pub dtv_slot: u64,
    /// `Thread::_thr_current` in libjvm's TLS block.
    pub tls_offset: u64,
    /// `JavaThread::_anchor`.
    pub anchor: u64,
    /// `JavaFrameAnchor::_last_Java_sp/_pc/_fp` (each 0, 8 or 16).
    pub anchor_sp: u64,
    pub anchor_pc: u64,
    pub anchor_fp: u64,
    /// `JavaThread::_current_pending_monitor` (0: not known).
    pub pending_monitor: u64,
    /// The template interpreter's code, `[lo, hi)`.
    pub interp_lo: u64,
    pub interp_hi: u64,
    /// `StubRoutines::_call_stub_return_address`: where Java was entered.
    pub call_stub_return: u64,
    /// `sizeof(HeapBlock)`: a blob starts after its heap block header.
    pub heap_block: u64,
    /// `CodeBlob::_frame_size` (an i32, in words).
    pub frame_size: u64,
    /// `nmethod::_compile_id` (an i32; 0: not known, no check).
    pub compile_id: u64,
    /// `Method::_constMethod`, and `sizeof(ConstMethod)` (the bytecodes follow it).
    pub const_method: u64,
    pub const_method_size: u64,
    pub n_heaps: u64,
    pub heaps: [CodeHeapRange; MAX_CODE_HEAPS],
}

/// Counters of the Java walker (slots in `COUNTERS`).
pub mod counter {
    use crate::counter::JVM as BASE;
    /// Events of a JVM's threads walked as Java stacks.
    pub const WALKS: u32 = BASE;
    /// Walks that stopped at an unknown pc (their outer frames are lost).
    pub const CUT: u32 = BASE + 1;
    /// Events of a JVM's threads with no Java frames to walk (JVM-internal
    /// threads, a thread in Java code): native stacks as usual.
    pub const NATIVE: u32 = BASE + 2;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::JvmConfig {}
}
