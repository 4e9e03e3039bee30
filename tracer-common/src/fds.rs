//! File-descriptor tracker: every non-socket fd of the target (files, pipes,
//! epoll, eventfd, timerfd, signalfd, inotify, fanotify, memfd, userfaultfd,
//! pidfd, dups, fds received with SCM_RIGHTS), grouped by creation stack.
//! Sockets made by socket/accept stay with the connection tracker.

use crate::stacks::StackKey;

pub use crate::connections::{ring_kind, ConnRingEvent as FdRingEvent, FdKey};

/// What kind of object an fd refers to, as the creating syscall says.
pub mod fd_type {
    /// Not known at creation (a dup of an fd made before attach, an fd
    /// received with SCM_RIGHTS): user space names it from /proc/PID/fd.
    pub const UNKNOWN: u8 = 0;
    pub const FILE: u8 = 1;
    pub const PIPE: u8 = 2;
    /// One end of a `socketpair(2)`.
    pub const SOCKETPAIR: u8 = 3;
    pub const EPOLL: u8 = 4;
    pub const EVENTFD: u8 = 5;
    pub const TIMERFD: u8 = 6;
    pub const SIGNALFD: u8 = 7;
    pub const INOTIFY: u8 = 8;
    pub const FANOTIFY: u8 = 9;
    pub const MEMFD: u8 = 10;
    pub const USERFAULTFD: u8 = 11;
    pub const PIDFD: u8 = 12;
    /// A socket reached through dup or SCM_RIGHTS.
    pub const SOCKET: u8 = 13;

    /// Wire name of a type (`file`, `pipe`...).
    pub fn name(t: u8) -> &'static str {
        match t {
            FILE => "file",
            PIPE => "pipe",
            SOCKETPAIR => "socketpair",
            EPOLL => "epoll",
            EVENTFD => "eventfd",
            TIMERFD => "timerfd",
            SIGNALFD => "signalfd",
            INOTIFY => "inotify",
            FANOTIFY => "fanotify",
            MEMFD => "memfd",
            USERFAULTFD => "userfaultfd",
            PIDFD => "pidfd",
            SOCKET => "socket",
            _ => "other",
        }
    }
}

/// Flags of a live fd.
pub mod flag {
    /// Closed on exec (O_CLOEXEC and its per-syscall equivalents).
    pub const CLOEXEC: u8 = 1;
    /// A dup (dup, dup2, dup3, fcntl F_DUPFD*): counted under the dup's caller.
    pub const DUP: u8 = 2;
    /// Received with SCM_RIGHTS: counted under the recvmsg caller.
    pub const RECEIVED: u8 = 4;
}

/// Value of the live-fd table.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FdInfo {
    /// Creation stack.
    pub stack: StackKey,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    pub fd_type: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Size of the live-fd table (entries). A full table counts in `LOST_EVENTS`.
pub const MAX_LIVE_FDS: u32 = 65536;
/// Size of the per-stack table.
pub const MAX_FD_STACKS: u32 = 8192;

/// The fd tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::FDS as BASE;
    /// Events seen for the target: fds created or closed.
    pub const EVENTS: u32 = BASE + 0;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FdInfo {}
}
