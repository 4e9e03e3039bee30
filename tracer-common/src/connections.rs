//! Connection tracker: live socket fds of the target, grouped by creation stack.

use crate::stacks::StackKey;

/// Key of the live-socket table: one entry per socket fd of the target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// How the socket came to be.
pub mod origin {
    /// `socket(2)`.
    pub const SOCKET: u8 = 1;
    /// `accept(2)` / `accept4(2)`.
    pub const ACCEPT: u8 = 2;
    /// First seen at `connect(2)` (created before leaktrace attached).
    pub const CONNECT: u8 = 3;
}

/// Flags of a live socket.
pub mod flag {
    /// Closed on exec (SOCK_CLOEXEC at creation).
    pub const CLOEXEC: u8 = 1;
    /// `connect(2)` was called and did not fail (0 or EINPROGRESS).
    pub const CONNECTED: u8 = 2;
}

/// Raw bytes of a socket address kept per socket: enough for `sockaddr_in6`
/// (28 bytes) and the start of a `sockaddr_un` path.
pub const PEER_LEN: usize = 48;

/// Value of the live-socket table.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    /// Creation stack.
    pub stack: StackKey,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// Socket domain (AF_INET = 2, AF_INET6 = 10, AF_UNIX = 1 ...).
    pub family: u16,
    /// Socket type without flags (SOCK_STREAM = 1, SOCK_DGRAM = 2 ...).
    pub sock_type: u16,
    pub origin: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Peer address as passed to connect or returned by accept
    /// (`struct sockaddr`, little-endian family first, network-order port).
    pub peer: [u8; PEER_LEN],
}

/// Kinds of records sent through the ring buffer (rare events only).
pub mod ring_kind {
    /// The target called `close_range(a = first, b = last)` successfully at
    /// `c` (ktime ns): sockets in that range made before then are gone.
    pub const CLOSE_RANGE: u32 = 1;
}

/// A ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnRingEvent {
    pub kind: u32,
    pub tgid: u32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

/// Told apart the same way for fds (`tracer_common::stacks`).
pub use crate::stacks::{finalizer, FINALIZER_WALK_FRAMES};

/// Size of the live-socket table (entries). A full table counts in
/// `LOST_EVENTS`.
pub const MAX_LIVE_SOCKETS: u32 = 65536;
/// Size of the per-stack table.
pub const MAX_CONN_STACKS: u32 = 8192;

/// The connections tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::CONNECTIONS as BASE;
    /// Events seen for the target: sockets created or closed.
    pub const EVENTS: u32 = BASE;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FdKey {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::ConnRingEvent {}
}
