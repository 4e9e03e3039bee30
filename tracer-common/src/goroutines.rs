//! Goroutine tracker: goroutines are read from the Go runtime's memory (no
//! probes), except the creator probe — a uprobe on the `CALL
//! runtime.newproc` of a library's `go` statement whose goroutines leak,
//! attached only while they do, which records who ran that statement.

/// One creation seen at a probed `go` statement: the statement (its return
/// address, `gopc`) and the creating goroutine's stack (key into
/// `GO_CREATOR_FRAMES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoCreation {
    pub gopc: u64,
    pub stack: u64,
}

/// The creating goroutine and the statement, the key of `GO_CREATOR_OF`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoCreator {
    pub goid: u64,
    pub gopc: u64,
}

/// Creator stacks kept (walked frames, shared by every probed statement).
pub const MAX_CREATOR_STACKS: u32 = 1024;
/// Creations counted per (statement, creator stack).
pub const MAX_CREATIONS: u32 = 1024;
/// The last creator stack per (creating goroutine, statement), LRU: joined
/// with the live goroutines' `parentGoid`.
pub const MAX_CREATORS_BY_GOID: u32 = 16384;

/// The probe's cookie: the statement's `gopc` in the low 48 bits, the
/// offset of `goid` in a `g` above them.
pub const COOKIE_GOID_SHIFT: u32 = 48;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::GoCreation {}
    unsafe impl aya::Pod for super::GoCreator {}
}
